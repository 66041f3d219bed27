"""The portable int4 format the runtime reads and its CPU kernel module (the checkpoint reader is
``safetensors_io``).

Storage (written by ``ib_edge.quant.int4``), per quantized linear: ``{name}.qweight`` uint8
[N, K/2] two nibbles per byte, low nibble = even k; ``{name}.scales`` [N, K/G];
``{name}.qzeros`` uint8 [N, K/G]; w = (q - qzeros) * scales; the group size is in the
safetensors metadata. That portable layout is converted at load time into torch's CPU int4
kernel layout (``_convert_weight_to_int4pack_for_cpu``; the packed form depends on the kernel,
so it is never stored). ``ortllm`` maps the same layout 1:1 onto ``MatMulNBits``.

The int4 kernel (``aten._weight_int4pack_mm_for_cpu``) computes x @ dequant(W).T with
dequant = (q - 8) * s + z in bf16 (its fp32 path is a slow scalar fallback, measured 30-40x
slower); so Int4Linear casts activations to bf16 and back.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import BundleError
from .formats import KERNEL_GROUP_SIZES

_N_ALIGN = 16  # the CPU kernel needs N divisible by 16: rows are padded, outputs sliced


# --- the portable int4 storage format (shared with ib_edge.quant.int4) ---------------------
def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> uint8 [N, K/2], low nibble = even k."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 values 0..15 [N, K]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def check_int4_shapes(qweight, scales, qzeros, group_size: int, kernel: str) -> tuple[int, int]:
    """(out_features, in_features) of a portable int4 weight whose group size ``kernel`` supports
    and whose scales/zeros match it; a BundleError naming the mismatch otherwise."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if group_size not in KERNEL_GROUP_SIZES or k % group_size:
        raise BundleError(f"int4 group size {group_size} with in_features {k} is not supported by {kernel} "
                          f"(group size one of {KERNEL_GROUP_SIZES}, dividing in_features)")
    if tuple(scales.shape) != (n, k // group_size) or tuple(qzeros.shape) != tuple(scales.shape):
        raise BundleError(f"int4 scales/zeros shapes {tuple(scales.shape)}/{tuple(qzeros.shape)} do not "
                          f"match weight [{n}, {k}] with group size {group_size}")
    return n, k


class Int4Linear(nn.Module):
    """y = x @ W.T (+ b) with W in group-wise asymmetric int4 on torch's CPU int4 kernel."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int,
                 in_features: int, group_size: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    @classmethod
    def from_int4(cls, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, group_size: int,
                  bias: torch.Tensor | None = None) -> "Int4Linear":
        """qweight uint8 [N, K/2] (portable nibbles), scales [N, K/G], qzeros [N, K/G] integer zero points."""
        n, k = check_int4_shapes(qweight, scales, qzeros, group_size, "the CPU kernel")
        q = unpack_nibbles(qweight).to(torch.int32)
        s = scales.float()
        z = (8.0 - qzeros.float()) * s          # (q - zp) * s == (q - 8) * s + (8 - zp) * s
        pad = -n % _N_ALIGN
        if pad:
            q = torch.cat([q, torch.full((pad, k), 8, dtype=torch.int32)])
            s = torch.cat([s, torch.zeros(pad, s.shape[1])])
            z = torch.cat([z, torch.zeros(pad, z.shape[1])])
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        sz = torch.stack([s.t(), z.t()], dim=-1).contiguous().to(torch.bfloat16)  # [K/G, N, 2]
        return cls(packed, sz, n, k, group_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                       self.packed, self.group_size, self.scales_and_zeros)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def weight_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + \
            self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()


def dense(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = nn.Parameter(weight.float(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.float(), requires_grad=False)
    return lin


def linear_bytes(m: nn.Module) -> int:
    if isinstance(m, Int4Linear):
        return m.weight_bytes()
    return m.weight.numel() * m.weight.element_size()
