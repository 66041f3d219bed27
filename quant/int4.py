"""Group-wise asymmetric int4 weights: RTN quantization, GPTQ/AWQ checkpoint conversion, and
writing the ib-edge int4 checkpoint the fast runtime (``ib_edge.runtime.int4``) loads.

One representation for every source, ``Int4Weight``: ``q`` uint8 [N, K] in 0..15, ``scales``
fp32 [N, K/G], ``zeros`` uint8 [N, K/G] (integer zero points); w ~= (q - zeros) * scales, one
group = G consecutive input columns of one output row. Model-agnostic: functions take tensors.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from ib_edge.runtime.errors import IbEdgeError
from ib_edge.runtime.formats import DEFAULT_GROUP_SIZE, INT4_FORMAT, INT4_FORMAT_VERSION, KERNEL_GROUP_SIZES
from ib_edge.runtime.int4 import pack_nibbles

# Linear layers of a transformers Llama that are quantized (suffixes of ``...weight``).
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Int4Error(IbEdgeError):
    pass


@dataclasses.dataclass
class Int4Weight:
    q: torch.Tensor        # uint8 [N, K], 0..15
    scales: torch.Tensor   # float32 [N, K/G]
    zeros: torch.Tensor    # uint8 [N, K/G]
    group_size: int

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        s = self.scales.repeat_interleave(g, dim=1)
        z = self.zeros.float().repeat_interleave(g, dim=1)
        return (self.q.float() - z) * s

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The stored form (``{name}.qweight/.scales/.qzeros``) the runtime reads."""
        return {f"{name}.qweight": pack_nibbles(self.q).contiguous(), f"{name}.scales": self.scales.float().contiguous(),
                f"{name}.qzeros": self.zeros.to(torch.uint8).contiguous()}


def quantize_rtn(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Weight:
    """Round-to-nearest, per group min/max -> scale = (max - min) / 15, integer zero point."""
    n, k = w.shape
    if group_size not in KERNEL_GROUP_SIZES or k % group_size:
        raise Int4Error(f"group size {group_size} must be one of {KERNEL_GROUP_SIZES} and divide in_features {k}")
    g = w.detach().float().reshape(n, k // group_size, group_size)
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-8)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.clamp(torch.round(g / scales.unsqueeze(-1)) + zeros.unsqueeze(-1), 0, 15)
    return Int4Weight(q.reshape(n, k).to(torch.uint8), scales, zeros.to(torch.uint8), group_size)


def _unpack_int32(x: torch.Tensor, dim: int, order=None) -> torch.Tensor:
    """int32 holding 8 nibbles (lowest bits first) -> uint8, the packed axis ``dim`` grown 8x."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    vals = (x.unsqueeze(-1) >> shifts) & 0xF                       # [..., 8]
    if order is not None:                                          # AWQ stores nibbles interleaved
        vals = vals[..., torch.argsort(torch.tensor(order))]
    vals = vals.movedim(-1, dim + 1) if dim != x.dim() - 1 else vals
    shape = list(x.shape)
    shape[dim] *= 8
    return vals.reshape(shape).to(torch.uint8)


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
              *, group_size: int, checkpoint_format: str = "gptq") -> Int4Weight:
    """A 4-bit GPTQ linear (AutoGPTQ/gptqmodel layout: qweight int32 [K/8, N] packed along K,
    qzeros int32 [K/G, N/8] packed along N, scales [K/G, N]). ``checkpoint_format`` "gptq" (v1)
    stores zero points minus one; "gptq_v2" stores them as is. desc_act (a permuted g_idx) is
    refused: the kernel needs contiguous groups."""
    k = qweight.shape[0] * 8
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // group_size):
        raise Int4Error("GPTQ checkpoint uses act-order (desc_act) groups; re-quantize with desc_act=False")
    q = _unpack_int32(qweight, 0).t()                              # [N, K]
    z = _unpack_int32(qzeros, 1).t().to(torch.int16)               # [N, K/G]
    if checkpoint_format == "gptq":
        z = z + 1
    elif checkpoint_format != "gptq_v2":
        raise Int4Error(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported (gptq, gptq_v2)")
    if int(z.max()) > 15:
        raise Int4Error("GPTQ zero point 16 (v1 overflow) cannot be represented in int4")
    return Int4Weight(q.contiguous(), scales.float().t().contiguous(), z.to(torch.uint8).contiguous(), group_size)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, group_size: int) -> Int4Weight:
    """A 4-bit AWQ GEMM linear (qweight int32 [K, N/8] and qzeros int32 [K/G, N/8] packed along N
    in the interleaved order 0,2,4,6,1,3,5,7; scales [K/G, N])."""
    q = _unpack_int32(qweight, 1, AWQ_ORDER).t()
    z = _unpack_int32(qzeros, 1, AWQ_ORDER).t()
    return Int4Weight(q.contiguous(), scales.float().t().contiguous(), z.contiguous(), group_size)


def _is_quantized(name: str, include_lm_head: bool) -> bool:
    base = name.removesuffix(".weight")
    return name.endswith(".weight") and (base.rsplit(".", 1)[-1] in LLAMA_LINEARS or
                                         (include_lm_head and base == "lm_head"))


def quantize_state_dict(state: dict[str, torch.Tensor], group_size: int = DEFAULT_GROUP_SIZE,
                        include_lm_head: bool = True) -> dict[str, torch.Tensor]:
    """transformers Llama state dict -> the int4 checkpoint's tensors (RTN). Embeddings and norms
    stay fp32; with ``include_lm_head`` a tied lm_head gets its own int4 copy."""
    out: dict[str, torch.Tensor] = {}
    if include_lm_head and "lm_head.weight" not in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    for name, t in state.items():
        if _is_quantized(name, include_lm_head):
            out.update(quantize_rtn(t, group_size).tensors(name.removesuffix(".weight")))
        else:
            out[name] = t.detach().float().contiguous()
    return out


def save_int4(tensors: dict[str, torch.Tensor], config: dict, out_dir: str | Path, *, group_size: int,
              method: str, extra_files: tuple[Path, ...] = ()) -> dict:
    """Write ``config.json`` + ``model.safetensors`` (int4 format metadata) and return the record
    for the manifest's llm artifact ``quantization`` field."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    if "lm_head.qweight" in tensors:
        cfg["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    for f in extra_files:
        shutil.copy(f, out / Path(f).name)
    meta = {"format": INT4_FORMAT, "format_version": INT4_FORMAT_VERSION, "group_size": str(group_size),
            "method": method}
    save_file(tensors, str(out / "model.safetensors"), metadata=meta)
    n_q = sum(1 for k in tensors if k.endswith(".qweight"))
    return {"format": INT4_FORMAT, "format_version": INT4_FORMAT_VERSION, "bits": 4, "group_size": group_size,
            "symmetric": False, "method": method, "quantized_linears": n_q,
            "lm_head": "int4" if "lm_head.qweight" in tensors else "fp32"}


def quantize_model_dir(src: str | Path, out_dir: str | Path, group_size: int = DEFAULT_GROUP_SIZE, include_lm_head: bool = True) -> dict:
    """A transformers Llama directory (config.json + safetensors, any float dtype) -> int4 RTN
    checkpoint, read one tensor at a time: peak memory is the int4 output plus one fp32 tensor
    (at 7B ~4 GB, where the whole fp16 state dict would be 13.5 GB and its fp32 copies 27 GB).
    The same tensors as ``quantize_state_dict`` of the loaded state dict."""
    from .streamed import read_fp32, stored_index

    src = Path(src)
    files = stored_index(src)
    names = list(files)
    if include_lm_head and "lm_head.weight" not in files:
        names.append("lm_head.weight")  # tied: its own int4 copy of the embedding
    out: dict[str, torch.Tensor] = {}
    for name in names:
        key = name if name in files else "model.embed_tokens.weight"
        t = read_fp32(files, [key])[key]
        out.update(quantize_rtn(t, group_size).tensors(name.removesuffix(".weight"))
                   if _is_quantized(name, include_lm_head) else {name: t.contiguous()})
        del t
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    return save_int4(out, config, out_dir, group_size=group_size, method="rtn")


def convert_quantized_checkpoint(src: str | Path, out_dir: str | Path) -> dict:
    """A standard HF GPTQ or AWQ (GEMM) 4-bit checkpoint directory -> the ib-edge int4 checkpoint,
    without re-quantizing: the same integers, scales and zero points run on the CPU kernel."""
    from safetensors.torch import load_file

    src = Path(src)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    qc = config.get("quantization_config") or {}
    qfile = src / "quantize_config.json"
    if not qc and qfile.is_file():
        qc = json.loads(qfile.read_text(encoding="utf-8"))
    method = str(qc.get("quant_method", "gptq")).lower()
    bits, g = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
    if bits != 4:
        raise Int4Error(f"{method} checkpoint has {bits} bits; only 4-bit converts to the int4 kernel")
    state: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if method == "awq" and fmt not in ("gemm", "awq_gemm"):
        raise Int4Error(f"AWQ checkpoint version {fmt!r} is not supported (GEMM only)")
    out: dict[str, torch.Tensor] = {}
    for name in [k for k in state if k.endswith(".qweight")]:
        base = name.removesuffix(".qweight")
        if method == "awq":
            w = from_awq(state.pop(name), state.pop(base + ".qzeros"), state.pop(base + ".scales"), group_size=g)
        else:
            w = from_gptq(state.pop(name), state.pop(base + ".qzeros"), state.pop(base + ".scales"),
                          state.pop(base + ".g_idx", None), group_size=g,
                          checkpoint_format="gptq_v2" if fmt == "gptq_v2" else "gptq")
        out.update(w.tensors(base))
    for name, t in state.items():
        out[name] = t.float().contiguous() if t.is_floating_point() else t
    rec = save_int4(out, config, out_dir, group_size=g, method=method)
    rec["source_format"] = {"quant_method": method, "checkpoint_format": fmt, "sym": qc.get("sym"),
                            "desc_act": qc.get("desc_act")}
    return rec
