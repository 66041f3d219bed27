"""Weight-only low-bit linears inside transformers models: any family (T5, OPT, Llama) generates
through transformers' own ``generate`` (greedy, beams, sampling, streaming) with each quantized
``nn.Linear`` swapped for a real low-bit CPU kernel.

Storage, format ``ib-edge-weight-only`` v1 (written by ``ib_edge.quant.weight_only``): the
bundle's ``llm/`` holds transformers' ``config.json`` and one ``model.safetensors`` whose
metadata gives ``format``, ``format_version`` and ``group_size``. Per linear ``{name}`` exactly
one of:

- int4: ``{name}.qweight`` uint8 [N, K/2], ``{name}.scales`` fp32 [N, K/G], ``{name}.qzeros``
  uint8 [N, K/G] (the ib-edge-int4 layout, see ``runtime.int4``);
- int8: ``{name}.int8_weight`` int8 [N, K] and ``{name}.int8_scales`` fp32 [N] (symmetric per
  output channel, w = q * scale);
- fp32: ``{name}.weight`` as transformers names it;

plus ``{name}.bias`` when the linear has one, and every other tensor (embeddings, norms, T5's
relative attention bias) in fp32 under its transformers name.

Kernels: int8 ``aten._weight_int8pack_mm`` (bf16 activations; with fp32 activations it takes a
slow path, measured 15 ms vs 2.0 ms for a 5632x2048 GEMV), int4 ``int4.Int4Linear``. Both
cast activations to bf16 and back: bf16 keeps fp32's exponent range, so T5's large FFN
activations (the FP16 overflow) cannot overflow here.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import BundleError
from .formats import WO_FORMAT, WO_FORMAT_VERSION
from .int4 import Int4Linear
from .safetensors_io import read_config, read_tensors

LINEAR_PRECISIONS = ("int4", "int8", "fp32")  # of one linear, lowest first


class Int8Linear(nn.Module):
    """y = x @ (q * scales[:, None]).T (+ b), q int8 [N, K] symmetric per output channel.

    The int8 matrix is the buffer ``weight`` on purpose: transformers' T5 FFN reads
    ``wo.weight.dtype`` and skips its activation cast for int8 weights."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or scales.shape != (weight.shape[0],):
            raise BundleError(f"int8 linear needs int8 [N, K] weights and [N] scales, got {weight.dtype} "
                              f"{tuple(weight.shape)} and {tuple(scales.shape)}")
        self.out_features, self.in_features = weight.shape
        # fresh (64-byte aligned) copies: the kernel segfaults on a weight whose data pointer is
        # not aligned, e.g. an int8 tensor read from safetensors at an odd file offset
        self.register_buffer("weight", _aligned(weight))
        self.register_buffer("scales", _aligned(scales.to(torch.bfloat16)))
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if xb.data_ptr() % 64:
            xb = _aligned(xb)
        y = torch._weight_int8pack_mm(xb, self.weight, self.scales)
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def weight_bytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous and 64-byte aligned (``safetensors_io.read_pt``'s fresh
    tensors are), else an aligned copy."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


class HFInt4Linear(Int4Linear):
    """``int4.Int4Linear`` where transformers code looks for ``.weight`` (T5's FFN checks
    ``isinstance(wo.weight, torch.Tensor)`` before casting): there is no float weight."""

    weight = None


def low_bit_linear(name: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> nn.Module | None:
    """The low-bit module stored for linear ``name`` (its tensors popped), or None if it is fp32."""
    bias = tensors.pop(f"{name}.bias", None)
    if f"{name}.int8_weight" in tensors:
        return Int8Linear(tensors.pop(f"{name}.int8_weight"), tensors.pop(f"{name}.int8_scales").float(), bias)
    if f"{name}.qweight" in tensors:
        if group_size is None:
            raise BundleError("int4 tensors found but the safetensors metadata gives no group_size")
        return HFInt4Linear.from_int4(tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.scales"),
                                      tensors.pop(f"{name}.qzeros"), group_size, bias)
    if bias is not None:
        tensors[f"{name}.bias"] = bias
    return None


def quantized_names(keys) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith((".int8_weight", ".qweight"))})


def swap_linears(model: nn.Module, tensors: dict[str, torch.Tensor], group_size: int | None) -> dict[str, str]:
    """Replace every linear that ``tensors`` stores in low bit; returns {name: "int4"|"int8"}."""
    out = {}
    for name in quantized_names(tensors):
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise BundleError(f"LLM weights quantize {name}, which this model does not have") from None
        if not isinstance(old, nn.Linear):
            raise BundleError(f"LLM weights quantize {name}, which is a {type(old).__name__}, not a Linear")
        new = low_bit_linear(name, tensors, group_size)
        if (new.out_features, new.in_features) != (old.out_features, old.in_features):
            raise BundleError(f"{name}: stored [{new.out_features}, {new.in_features}], the model has "
                              f"[{old.out_features}, {old.in_features}]")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        out[name] = "int8" if isinstance(new, Int8Linear) else "int4"
    return out


def read_weight_only(model_dir: str | Path, files: list[Path] | None = None
                     ) -> tuple[dict, dict[str, torch.Tensor], int | None]:
    """(config dict, tensors, group size) of an ib-edge-weight-only directory; refuses others.
    ``files``: the safetensors to read (a bundle passes what its manifest lists)."""
    cfg = read_config(model_dir)
    tensors, group_size = read_tensors(model_dir, WO_FORMAT, WO_FORMAT_VERSION, required=True, files=files)
    return cfg, tensors, group_size


def load_weight_only(model_dir: str | Path, *, encoder_decoder: bool, files: list[Path] | None = None) -> nn.Module:
    """A transformers model (AutoModelForSeq2SeqLM / AutoModelForCausalLM from config.json) with
    its stored low-bit linears swapped in and every other weight loaded in fp32. Built on the
    meta device, so no fp32 copy of the quantized linears ever exists (at Flan-T5-XL that
    moment was 11.4 GB, against 3.4 GB for the int8 model itself)."""
    import transformers

    _, tensors, group_size = read_weight_only(model_dir, files)
    config = transformers.AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    auto = transformers.AutoModelForSeq2SeqLM if encoder_decoder else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=torch.float32)
    model.tie_weights()  # from_config leaves tied weights (T5's lm_head) untied; tie before the swap
    swap_linears(model, tensors, group_size)
    own = model.state_dict(keep_vars=True)
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise BundleError(f"LLM weights hold tensors this model does not have: {', '.join(unexpected[:5])}",
                          hint="re-export the bundle")
    missing = _assign_stored(model, tensors)   # the low-bit modules already hold theirs
    rebuild_meta_buffers(model)
    missing += [n for n, t in model.named_buffers() if t.is_meta]
    if missing:
        raise BundleError(f"LLM weights lack {', '.join(missing[:5])}", hint="re-export the bundle")
    return model.eval()


def _assign_stored(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Give each meta parameter (and stored buffer) its stored tensor, once per shared object, so
    tied weights (T5's embeddings and fp32 lm_head) stay one tensor; -> the parameters none of
    whose names is stored."""
    groups: dict[int, list[tuple[str, bool]]] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        if t.is_meta:
            groups.setdefault(id(t), []).append((name, True))
    for name, t in model.named_buffers(remove_duplicate=False):
        if t.is_meta and name in tensors:
            groups.setdefault(id(t), []).append((name, False))
    missing = []
    for names in groups.values():
        src = next((n for n, _ in names if n in tensors), None)
        if src is None:
            missing.append(names[0][0])
            continue
        value = tensors[src]
        new = nn.Parameter(value, requires_grad=False) if names[0][1] else value
        for n, is_param in names:
            parent, _, attr = n.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            (owner._parameters if is_param else owner._buffers)[attr] = new
    return missing


def rebuild_meta_buffers(model: nn.Module) -> None:
    """Modules still holding meta buffers after a meta-device build (those computed at
    construction and never stored, e.g. rotary tables) are rebuilt from their config on the CPU."""
    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            if not hasattr(mod, "config"):
                raise BundleError(f"cannot rebuild {name} ({type(mod).__name__}) off the meta device")
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, type(mod)(config=mod.config))

