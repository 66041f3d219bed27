"""``ib-bench --plan``: will an InstructBLIP configuration fit a device, and how fast can it decode?

Resident bytes per stage, from a bundle's manifest (weights = the bytes of its artifact files,
what the runtime loads) or from a config alone (weights = parameters x bytes per parameter at
the chosen precision; parameters counted on a meta-device model, so any config works and
nothing is allocated):

  * vision / Q-Former graph weights: fp32 4 B, fp16 2 B, int8 1 B for MatMul/Conv/Gemm weights
    (the rest, embeddings, norms and biases, at 4 B on the CPU runtime, 2 B on a GPU);
  * graph activations at the profile's max shapes (GPU: the TensorRT profile's max batch and
    text length, ``ib-export``'s defaults 4 and 128; CPU: ``ib-run``'s batch 1): per layer the
    attention scores heads x T x T plus T x (4 hidden + MLP) (q, k, v, out, MLP hidden);
  * LLM weights: no ``--llm-quant``: the checkpoint dtype on the CPU runtime (what
    ``TransformersLLM`` loads), fp16 on a GPU; rtn/gptq/awq: every decoder linear and lm_head
    as nibbles + one scale (fp32 on CPU as ``quant/int4.py`` stores it, fp16 on GPU) + one
    zero point (1 B as stored on CPU, a nibble on GPU) per group, embeddings/norms fp32 (CPU,
    as ``fastllm`` holds them) or fp16; int8: 1 B per linear weight + one fp32 scale per row;
    mixed from a config: int8's size (an upper bound: the search keeps some linears int4);
  * LLM prefill activations over the whole context in one pass, T x (4 hidden + 3 MLP) (fused
    attention: no T x T score matrix);
  * KV cache: 2 x decoder layers x KV heads x head dim x context x dtype bytes (fp32 in the CPU
    int4 runtime's static cache and in the weight-only runtime, the checkpoint dtype in
    transformers, fp16 on a GPU). ``--context`` counts every position the LLM holds: for T5
    the prompt (cross-attention cache) plus the generated tokens (self-attention cache);
  * runtime overhead (see ``OVERHEAD``).

Decode bound: bandwidth / bytes read per generated token (every linear incl. lm_head with its
scales, norms, one embedding row, the whole KV cache at the context). The realistic rate applies
the fraction of that bound published runtimes reach on AGX Orin (``REFERENCE_RUNS``: the
fraction is computed with this planner's own bytes for the model they ran).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ib_edge.runtime.errors import IbEdgeError

GiB = 1024 ** 3


class PlanError(IbEdgeError):
    pass


# --- devices ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float          # GB as the datasheet says (LPDDR5 module size, 10^9 ... treated as GiB: see usable)
    bandwidth_gbs: float | None
    runtime: str              # "gpu" (TensorRT engines + LLM on the GPU) | "cpu" (ib-edge's CPU runtime)
    source: str
    carveout: float = 0.0     # fraction of memory reserved below Linux (firmware/GPU carveouts)
    os_gb: float = 1.0        # what the OS and its services hold before our process starts

    @property
    def usable_bytes(self) -> int:
        return int((self.memory_gb * (1 - self.carveout) - self.os_gb) * GiB)


_ORIN_SRC = ("NVIDIA Jetson AGX Orin / Orin NX / Orin Nano module data sheets (DS-10712 Orin NX v1.1: 128-bit "
             "LPDDR5; Orin Nano: 8GB 128-bit, 4GB 64-bit LPDDR5); bandwidths as /work/shared/notes/gpu-facts.md "
             "gathered them (AGX 204.8, NX 102.4, Nano 68 GB/s; Nano 4GB: half the bus of the 8GB, 34 GB/s)")
# Carveout: tegrastats on an 8 GB Orin reports 7772 of 8192 MB visible to Linux (~5%, proventusnova.com
# "Jetson Orin high RAM usage at idle"); OS: 1.0 GiB assumed for a headless JetPack (desktop adds more).
_JETSON = dict(runtime="gpu", source=_ORIN_SRC, carveout=0.05, os_gb=1.0)
DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("agx-orin-64", 64, 204.8, **_JETSON),
    Device("agx-orin-32", 32, 204.8, **_JETSON),
    Device("orin-nx-16", 16, 102.4, **_JETSON),
    Device("orin-nx-8", 8, 102.4, **_JETSON),
    Device("orin-nano-8", 8, 68.0, **_JETSON),
    Device("orin-nano-4", 4, 34.0, **_JETSON),
)}


def host_device(bandwidth_gbs: float | None = None) -> Device:
    """This machine, running ib-edge's CPU runtime (memory from /proc/meminfo)."""
    total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    if total is None:
        raise PlanError("cannot read this machine's memory (/proc/meminfo)", hint="pass --memory-gb")
    return Device("host", round(total, 1), bandwidth_gbs, "cpu", "this machine: /proc/meminfo MemTotal", os_gb=1.0)


def custom_device(memory_gb: float, bandwidth_gbs: float | None, runtime: str = "gpu") -> Device:
    if memory_gb <= 0 or (bandwidth_gbs is not None and bandwidth_gbs <= 0):
        raise PlanError("--memory-gb and --bandwidth-gbs must be positive")
    return Device("custom", memory_gb, bandwidth_gbs, runtime, "--memory-gb/--bandwidth-gbs", os_gb=1.0)


def device(name: str) -> Device:
    if name == "host":
        return host_device()
    if name not in DEVICES:
        raise PlanError(f"unknown target {name!r}", hint=f"choose {', '.join([*DEVICES, 'host'])}")
    return DEVICES[name]


# Runtime overhead: the bytes a process holds before any model weight.
#   cpu: measured here (2026-12-02, AMD EPYC, Python 3.11): RSS after importing what ib-run imports,
#        260028 kB with the fast int4 LLM runtime (numpy, onnxruntime, tokenizers, torch), 412168 kB
#        with transformers (weight-only / float LLM runtimes).
#   gpu: ASSUMED, not measured (no Jetson here): 1.5 GiB = CUDA context + cuBLAS/cuDNN/TensorRT runtime
#        (~1 GiB) + the Python/torch host process (~0.5 GiB); on a Jetson both come out of the same
#        unified memory. The device script of the GPU issue records torch.cuda.max_memory_allocated
#        to check it.
OVERHEAD = {"cpu-fastllm": 260028 * 1024, "cpu-transformers": 412168 * 1024, "gpu": int(1.5 * GiB)}


# --- options --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """What ib-export would build (same names and defaults as its options) plus the context."""
    precision: str = "fp32"
    llm_quant: str | None = None
    group_size: int = 128
    context: int | None = None          # None: the LLM's max positions (2048 when it has none)
    trt_batch_max: int = 4              # ib-export --trt-batch default 1,1,4
    trt_text_len_max: int = 128         # ib-export --trt-text-len default 1,32,128

    def __post_init__(self):
        if self.precision not in ("fp32", "fp16", "int8"):
            raise PlanError(f"precision {self.precision!r} is not fp32, fp16 or int8")
        if self.llm_quant not in (None, "rtn", "gptq", "awq", "int8", "mixed"):
            raise PlanError(f"--llm-quant {self.llm_quant!r} is not rtn, gptq, awq, int8 or mixed")
        if self.group_size not in (32, 64, 128, 256):
            raise PlanError(f"--group-size {self.group_size} is not 32, 64, 128 or 256")
        if self.context is not None and self.context < 1:
            raise PlanError("--context must be at least 1")


# --- the model, counted -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Counts:
    """Parameter counts and shapes the planner needs, read off a meta-device model."""
    name: str
    family: str                   # llama | t5 | opt
    vision_matmul: int            # weights int8 would quantize
    vision_other: int
    qformer_matmul: int           # Q-Former + language projection (+ query tokens in other)
    qformer_other: int
    llm_linear: int               # decoder-layer linears (T5: encoder + decoder)
    llm_linear_rows: int          # their output rows (one int8 scale each)
    llm_decode_linear: int        # the linears one decode step reads (T5: the decoder's only)
    llm_head: int                 # lm_head parameters (vocab x hidden), tied or not
    llm_head_tied: bool
    llm_embed: int
    llm_other: int                # norms, biases, T5 relative-attention tables
    llm_dtype_bytes: int          # checkpoint dtype
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int                   # KV heads x head dim
    dec_layers: int
    max_positions: int | None
    vision_tokens: int
    vision_hidden: int
    vision_mlp: int
    vision_heads: int
    vision_layers: int
    q_hidden: int
    q_mlp: int
    q_heads: int
    q_layers: int
    num_query: int

    @property
    def llm_params(self) -> int:
        return self.llm_linear + (0 if self.llm_head_tied else self.llm_head) + self.llm_embed + self.llm_other


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def count(config, name: str = "model") -> Counts:
    """Counts of an ``InstructBlipConfig`` (a meta-device model: exact for any config, no memory)."""
    import torch
    from transformers import InstructBlipForConditionalGeneration

    with torch.device("meta"):
        model = InstructBlipForConditionalGeneration(config)
    parts = {"vision_matmul": 0, "vision_other": 0, "qformer_matmul": 0, "qformer_other": 0}
    llm = {"linear": 0, "rows": 0, "decode": 0, "head": 0, "embed": 0, "other": 0}
    for pname, p in model.named_parameters():
        n = p.numel()
        if pname.startswith("language_model."):
            leaf = pname.split(".")
            if "lm_head" in leaf:
                llm["head"] += n
            elif "embed_tokens" in leaf or "shared" in leaf:
                llm["embed"] += n
            elif p.dim() == 2 and "relative_attention_bias" not in leaf:
                llm["linear"] += n
                llm["rows"] += p.shape[0]
                llm["decode"] += 0 if pname.startswith("language_model.encoder.") else n
            else:
                llm["other"] += n
            continue
        stage = "vision" if pname.startswith("vision_model.") else "qformer"
        matmul = p.dim() >= 2 and "embedding" not in pname and "embeddings" not in pname and pname != "query_tokens"
        parts[f"{stage}_{'matmul' if matmul else 'other'}"] += n
    text = config.text_config
    tied = llm["head"] == 0
    emb = model.language_model.get_input_embeddings().weight
    if tied:
        llm["head"] = emb.numel()
    if text.model_type == "t5":
        hidden, inter, heads = text.d_model, text.d_ff, text.num_heads
        kv_dim, dec_layers, max_pos = text.num_heads * text.d_kv, text.num_decoder_layers, None
    else:
        hidden, inter, heads = text.hidden_size, getattr(text, "intermediate_size", None) or text.ffn_dim, \
            text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        hd = getattr(text, "head_dim", None) or hidden // heads
        kv_dim, dec_layers, max_pos = kv_heads * hd, text.num_hidden_layers, getattr(text, "max_position_embeddings", None)
    v, q = config.vision_config, config.qformer_config
    dtype = getattr(text, "dtype", None) or getattr(config, "dtype", None) or "float32"
    dtype = str(dtype).replace("torch.", "")
    return Counts(name=name, family=text.model_type, **parts, llm_linear=llm["linear"], llm_linear_rows=llm["rows"],
                  llm_decode_linear=llm["decode"],
                  llm_head=llm["head"], llm_head_tied=tied, llm_embed=llm["embed"], llm_other=llm["other"],
                  llm_dtype_bytes=_DTYPE_BYTES.get(dtype, 4), hidden=hidden, intermediate=inter, heads=heads,
                  kv_dim=kv_dim, dec_layers=dec_layers, max_positions=max_pos,
                  vision_tokens=(v.image_size // v.patch_size) ** 2 + 1, vision_hidden=v.hidden_size,
                  vision_mlp=v.intermediate_size, vision_heads=v.num_attention_heads, vision_layers=v.num_hidden_layers,
                  q_hidden=q.hidden_size, q_mlp=q.intermediate_size, q_heads=q.num_attention_heads,
                  q_layers=q.num_hidden_layers, num_query=config.num_query_tokens)


# --- bytes ---------------------------------------------------------------------------------------
def graph_weight_bytes(matmul: int, other: int, precision: str, runtime: str) -> int:
    rest = 4 if runtime == "cpu" else 2
    per = {"fp32": 4, "fp16": 2, "int8": 1}[precision]
    return matmul * per + other * (per if precision != "int8" else rest)


def llm_weight_bytes(c: Counts, llm_quant: str | None, group_size: int, runtime: str) -> dict:
    """-> {"resident": bytes held, "per_token": bytes one decode step reads}."""
    fbytes = c.llm_dtype_bytes if runtime == "cpu" else 2
    enc = c.llm_linear - c.llm_decode_linear       # T5's encoder linears: read once per prompt, not per token
    if llm_quant is None:
        head = 0 if c.llm_head_tied else c.llm_head
        resident = (c.llm_linear + head + c.llm_embed + c.llm_other) * fbytes
        per_token = (c.llm_decode_linear + c.llm_head + c.llm_other + c.hidden) * fbytes
        return {"resident": resident, "per_token": per_token}
    small = 4 if runtime == "cpu" else 2   # embeddings, norms: fp32 in ib-edge's CPU low-bit runtimes
    if llm_quant in ("rtn", "gptq", "awq"):
        scale, zero = (4, 1) if runtime == "cpu" else (2, 0.5)
        per_weight = 0.5 + (scale + zero) / group_size
    else:                                    # int8 (mixed: int8's size, an upper bound)
        per_weight = 1 + 4 * (c.llm_linear_rows + c.llm_head // c.hidden) / (c.llm_linear + c.llm_head)
    lin = c.llm_linear + c.llm_head          # lm_head is quantized too (quant/int4.py include_lm_head)
    q = int(lin * per_weight)
    resident = q + (c.llm_embed + c.llm_other) * small
    per_token = int((lin - enc) * per_weight) + (c.llm_other + c.hidden) * small
    return {"resident": resident, "per_token": per_token, "quantized_linears": q}


def kv_dtype_bytes(c: Counts, llm_quant: str | None, runtime: str) -> int:
    if runtime == "gpu":
        return 2
    return c.llm_dtype_bytes if llm_quant is None else 4


def kv_bytes(c: Counts, context: int, dtype_bytes: int) -> int:
    return 2 * c.dec_layers * c.kv_dim * context * dtype_bytes


def vision_act_bytes(c: Counts, batch: int, b: int) -> int:
    t = c.vision_tokens
    return batch * (c.vision_heads * t * t + t * (4 * c.vision_hidden + c.vision_mlp)) * b


def qformer_act_bytes(c: Counts, batch: int, text_len: int, b: int) -> int:
    t = c.num_query + text_len
    return batch * (c.q_heads * t * (t + c.vision_tokens) + t * (4 * c.q_hidden + c.q_mlp)
                    + c.vision_tokens * c.vision_hidden) * b


def llm_act_bytes(c: Counts, context: int, b: int) -> int:
    # no heads x T x T term: every LLM runtime here uses fused attention that does not hold the whole
    # score matrix (torch SDPA, ONNX Runtime GroupQueryAttention, TensorRT fused MHA)
    return context * (4 * c.hidden + 3 * c.intermediate) * b


def default_context(c: Counts) -> int:
    return min(c.max_positions or 2048, 2048)


# --- the plan ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    """What is planned: counts, the options it is built with, and measured artifact bytes (bundle)."""
    counts: Counts
    options: PlanOptions
    origin: str                       # "preset" | "config" | "bundle"
    file_bytes: dict | None = None    # bundle: {"vision": B, "qformer": B, "llm": B}


def stage_bytes(src: Source, dev: Device) -> dict:
    """Resident bytes per stage on ``dev``, with the assumptions in words."""
    c, o = src.counts, src.options
    rt = dev.runtime
    ctx = o.context or default_context(c)
    act_b = 4 if (rt == "cpu" or o.precision == "fp32") else 2
    batch, text_len = (o.trt_batch_max, o.trt_text_len_max) if rt == "gpu" else (1, o.trt_text_len_max)
    w = llm_weight_bytes(c, o.llm_quant, o.group_size, rt)
    fb = src.file_bytes or {}
    kvb = kv_dtype_bytes(c, o.llm_quant, rt)
    fast = o.llm_quant in ("rtn", "gptq", "awq")
    overhead_key = "gpu" if rt == "gpu" else ("cpu-fastllm" if fast else "cpu-transformers")
    parts = {
        "vision weights": fb.get("vision", graph_weight_bytes(c.vision_matmul, c.vision_other, o.precision, rt)),
        "vision activations": vision_act_bytes(c, batch, act_b),
        "qformer weights": fb.get("qformer", graph_weight_bytes(c.qformer_matmul, c.qformer_other, o.precision, rt)),
        "qformer activations": qformer_act_bytes(c, batch, text_len, act_b),
        "llm weights": fb.get("llm", w["resident"]),
        "llm activations": llm_act_bytes(c, ctx, 4 if rt == "cpu" else 2),
        "kv cache": kv_bytes(c, ctx, kvb),
        "runtime overhead": OVERHEAD[overhead_key],
    }
    notes = {
        "vision weights": "artifact files" if "vision" in fb else f"{o.precision} graph",
        "vision activations": f"batch {batch}, {c.vision_tokens} tokens",
        "qformer weights": "artifact files" if "qformer" in fb else f"{o.precision} graph",
        "qformer activations": f"batch {batch}, {c.num_query} queries + {text_len} text tokens",
        "llm weights": "artifact files" if "llm" in fb else (o.llm_quant or ("fp16" if rt == "gpu" else
                                                                             f"{c.llm_dtype_bytes * 8}-bit float")),
        "llm activations": f"prefill of {ctx} tokens in one pass",
        "kv cache": f"{ctx} positions, {kvb * 8}-bit",
        "runtime overhead": {"gpu": "assumed: CUDA context + cuBLAS/cuDNN/TensorRT + host process",
                             "cpu-fastllm": "measured: imports of ib-run with the int4 LLM runtime",
                             "cpu-transformers": "measured: imports of ib-run with transformers"}[overhead_key],
    }
    # (The weight-only loader builds on the meta device, runtime/lowbit.py: no fp32 moment.)
    return {"bytes": parts, "notes": notes, "context": ctx, "per_token": w["per_token"] + kv_bytes(c, ctx, kvb)}


def load_transient(src: Source, dev: Device) -> tuple[int, str | None]:
    """Bytes held only while the LLM loads, on top of the steady total. The CPU int4 runtime's ort
    engine (``runtime/ortllm.py``) hands its packed int4 arrays to ONNX Runtime, which prepacks
    every ``MatMulNBits`` weight into buffers of its own before the arrays are dropped: one more
    copy of the quantized linears at load (modelled: 3.32 GiB at Vicuna-7B, RTN g128). Measured
    on the full Vicuna-7B bundle (2026-12-05, ort-fp32 kernel): VmHWM 9648 MiB against 6810 MiB
    RSS after the answer, +2.77 GiB; ~+0.25 GiB on the 2-layer bundle."""
    o = src.options
    if dev.runtime != "cpu" or o.llm_quant not in ("rtn", "gptq", "awq"):
        return 0, None
    w = llm_weight_bytes(src.counts, o.llm_quant, o.group_size, dev.runtime)
    return w["quantized_linears"], "int4 linears staged while ONNX Runtime prepacks them (load only)"


def plan_device(src: Source, dev: Device) -> dict:
    s = stage_bytes(src, dev)
    total = sum(s["bytes"].values())
    transient, why = load_transient(src, dev)
    peak = total + transient
    usable = dev.usable_bytes
    largest = max(s["bytes"], key=s["bytes"].get)
    out = {"device": dataclasses.asdict(dev), "usable_bytes": usable, "total_bytes": total,
           "peak_bytes": peak, "load_transient_bytes": transient, "load_transient": why,
           "fits": peak <= usable, "headroom_bytes": usable - peak, "largest": largest,
           "stages": s["bytes"], "notes": s["notes"], "context": s["context"],
           "decode_bytes_per_token": s["per_token"]}
    if dev.bandwidth_gbs:
        bound = dev.bandwidth_gbs * 1e9 / s["per_token"]
        frac, ref = realistic_fraction(src.options.llm_quant, dev.runtime)
        out.update(decode_bound_tok_s=bound, realistic_fraction=frac, realistic_tok_s=bound * frac if frac else None,
                   realistic_reference=ref)
    return out


def suggestion(src: Source, largest: str) -> str:
    o, fam = src.options, src.counts.family
    if largest == "llm weights":
        if o.llm_quant is None:
            return "--llm-quant rtn (4-bit)" if fam == "llama" else "--llm-quant int8 or mixed"
        if o.llm_quant in ("int8", "mixed") and fam == "llama":
            return "--llm-quant rtn (4-bit)"
        return "a larger device (the LLM alone does not fit at 4 bits)"
    if largest == "kv cache" or largest == "llm activations":
        return f"a shorter --context (now {o.context or default_context(src.counts)})"
    if largest in ("vision weights", "qformer weights") and o.precision != "int8":
        return "--precision int8"
    if largest in ("vision activations", "qformer activations"):
        return "a smaller max batch (--trt-batch) or --trt-text-len"
    return "a larger device"


# --- where a plan comes from ------------------------------------------------------------------------
def _bundle_source(path: Path, options: PlanOptions | None) -> Source:
    from transformers import InstructBlipConfig

    from ib_edge.runtime.manifest import Manifest

    m = Manifest.load(path)
    src = m.data.get("source", {})
    model = src.get("model")
    cfg_path = Path(model) / "config.json" if model else None
    if not cfg_path or not cfg_path.is_file():
        raise PlanError(f"bundle {path} names source {model!r}, whose config.json is not here",
                        hint="plan from the checkpoint directory or config.json instead")
    config = InstructBlipConfig.from_pretrained(str(cfg_path.parent), trust_remote_code=False)
    llm = m.artifact("llm")
    quant = (llm.get("quantization") or {})
    llm_quant = {"int4": quant.get("method", "rtn"), "int8": "int8", "mixed": "mixed"}.get(llm.get("precision"))
    prec = {m.artifact(s).get("precision", "fp32") for s in ("vision", "qformer")}
    opts = PlanOptions(precision=m.data.get("precision", "fp32") if len(prec) > 1 else prec.pop(),
                       llm_quant=llm_quant, group_size=int(quant.get("group_size") or 128),
                       context=options.context if options else None)

    def size(art):
        return sum(m.path(rel).stat().st_size for rel in art.get("files", {}))

    files = {"vision": size(m.artifact("vision")), "qformer": size(m.artifact("qformer")), "llm": size(llm)}
    return Source(count(config, str(path)), opts, "bundle", files)


def load_source(model: str, options: PlanOptions) -> Source:
    """MODEL: a preset name (or its hub id), a bundle directory, a checkpoint directory or a config.json."""
    from ib_edge.export import real_sizes

    if model in real_sizes.PRESETS or model in real_sizes.HUB_IDS:
        p = real_sizes.preset(model)
        cfg = real_sizes.make_config(p)
        cfg.text_config.dtype = p.hub_dtype
        return Source(count(cfg, p.name), options, "preset")
    path = Path(model).expanduser()
    if path.is_dir() and (path / "manifest.json").is_file():
        return _bundle_source(path, options)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(f"{model!r} is not a preset, a bundle, a checkpoint directory or a config.json",
                        hint=f"presets: {', '.join(real_sizes.PRESETS)}")
    from transformers import InstructBlipConfig

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        config = InstructBlipConfig(**{k: v for k, v in data.items() if k not in ("architectures", "model_type",
                                                                                    "transformers_version")})
    except (OSError, ValueError, TypeError) as e:
        raise PlanError(f"cannot read {path} as an InstructBLIP config: {e}") from None
    dtype = data.get("dtype") or data.get("torch_dtype") or data.get("text_config", {}).get("torch_dtype")
    if dtype:
        config.text_config.dtype = str(dtype)
    return Source(count(config, str(path)), options, "config")


def realistic_fraction(llm_quant: str | None, runtime: str) -> tuple[float | None, str | None]:
    """The share of the decode bound a published runtime reaches on a device of this kind."""
    if runtime != "gpu":
        return None, None
    key = "int4" if llm_quant in ("rtn", "gptq", "awq") else "fp16"
    ref = REFERENCE_RUNS[key]
    return _reference_fraction(key), ref["label"]


# Published decode rates on Jetson AGX Orin 64 GB (204.8 GB/s), batch 1, short context; the fraction of
# the bound is computed with this planner's bytes per token for the model and format they ran.
REFERENCE_RUNS = {
    "int4": {"label": "MLC q4f16 Llama-2-7B, 46.9 tok/s on AGX Orin (jetson-containers MLC docs)",
             "tok_s": 46.9, "llm_quant": "rtn", "group_size": 32},
    "fp16": {"label": "HF transformers fp16 Llama-2-7B, 6.2 tok/s on AGX Orin (jetson-ai-lab API examples)",
             "tok_s": 6.2, "llm_quant": None, "group_size": 128},
}
ALSO_PUBLISHED = "TinyChat AWQ Vicuna-7B 32.5 tok/s on AGX Orin (mit-han-lab/llm-awq tinychat README)"


def llama2_7b_counts() -> Counts:
    """Llama-2-7B by hand (hidden 4096, 32 layers, MLP 11008, vocab 32000): the reference runs' model."""
    h, i, L, v = 4096, 11008, 32, 32000
    lin = L * (4 * h * h + 3 * h * i)
    return Counts("llama-2-7b", "llama", 0, 0, 0, 0, lin, L * (4 * h + 2 * i + h), lin, v * h, False, v * h,
                  L * 2 * h + h, 2, h, i, 32, h, L, 4096, 257, 1408, 6144, 16, 39, 768, 3072, 12, 12, 32)


def _reference_fraction(key: str) -> float:
    ref = REFERENCE_RUNS[key]
    c = llama2_7b_counts()
    per_token = llm_weight_bytes(c, ref["llm_quant"], ref["group_size"], "gpu")["per_token"] + kv_bytes(c, 256, 2)
    return ref["tok_s"] / (DEVICES["agx-orin-64"].bandwidth_gbs * 1e9 / per_token)


def make_plan(model: str, options: PlanOptions, devices: list[Device]) -> dict:
    src = load_source(model, options)
    c = src.counts
    return {"model": c.name, "origin": src.origin, "family": c.family,
            "options": dataclasses.asdict(src.options),
            "params": {"vision": c.vision_matmul + c.vision_other, "qformer": c.qformer_matmul + c.qformer_other,
                       "llm": c.llm_params},
            "devices": [plan_device(src, d) for d in devices],
            "assumptions": {"overhead_bytes": OVERHEAD, "reference_runs": REFERENCE_RUNS,
                            "also_published": ALSO_PUBLISHED}}


# --- ib-export's hook --------------------------------------------------------------------------------
def check_export_fits(model_ref: str | None, target: str, *, precision: str = "fp32", llm_quant: str | None = None,
                      group_size: int = 128, context: int | None = None) -> dict:
    """Raise PlanError (before any export work) when the planner says the bundle ib-export would
    build cannot fit ``target``; returns the device plan otherwise."""
    from ib_edge.export.checkpoint import resolve
    from ib_edge.export import real_sizes

    ref = model_ref or "proof-llama"
    if ref in real_sizes.HUB_IDS:
        where = ref
    else:
        where, kind = resolve(ref)
        if kind == "hub":
            raise PlanError(f"--target cannot plan {ref}: its config.json is not on this machine",
                            hint="download the checkpoint and pass its directory")
    dev = device(target)
    src = load_source(where, PlanOptions(precision=precision, llm_quant=llm_quant, group_size=group_size,
                                         context=context))
    p = plan_device(src, dev)
    if not p["fits"]:
        big = p["largest"]
        raise PlanError(f"{src.counts.name} does not fit {dev.name}: needs {p['peak_bytes'] / GiB:.1f} GiB of "
                        f"{dev.usable_bytes / GiB:.1f} usable; largest part: {big} {p['stages'][big] / GiB:.1f} GiB",
                        hint=f"try {suggestion(src, big)}, or ib-bench --plan {ref} for the breakdown")
    return p


# --- text -------------------------------------------------------------------------------------------
def _gib(b) -> str:
    return f"{b / GiB:.2f}"


def render(plan: dict) -> str:
    o = plan["options"]
    lines = [f"# Plan: {plan['model']} ({plan['origin']}, {plan['family']} LLM)", "",
             f"Graphs {o['precision']}, LLM {o['llm_quant'] or 'unquantized'}"
             + (f" (group {o['group_size']})" if o['llm_quant'] in ('rtn', 'gptq', 'awq') else "")
             + f"; parameters: vision {plan['params']['vision'] / 1e9:.3f} B, Q-Former "
               f"{plan['params']['qformer'] / 1e9:.3f} B, LLM {plan['params']['llm'] / 1e9:.3f} B", "",
             "| device | memory GB | usable GiB | needs GiB (peak) | fits | headroom GiB | largest part | "
             "bytes/token GiB | decode bound tok/s | realistic tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d in plan["devices"]:
        dev = d["device"]
        bound = f"{d['decode_bound_tok_s']:.1f}" if d.get("decode_bound_tok_s") else "-"
        real = f"{d['realistic_tok_s']:.1f}" if d.get("realistic_tok_s") else "-"
        lines.append(f"| {dev['name']} | {dev['memory_gb']:g} | {_gib(d['usable_bytes'])} | {_gib(d['peak_bytes'])} | "
                     f"{'yes' if d['fits'] else 'NO'} | {_gib(d['headroom_bytes'])} | {d['largest']} | "
                     f"{_gib(d['decode_bytes_per_token'])} | {bound} | {real} |")
    first = plan["devices"][0]
    lines += ["", f"Per stage on {first['device']['name']} ({first['device']['runtime']} runtime, context "
              f"{first['context']}):", "", "| stage | GiB | how |", "|---|---|---|"]
    for k, v in first["stages"].items():
        lines.append(f"| {k} | {_gib(v)} | {first['notes'][k]} |")
    if first.get("load_transient_bytes"):
        lines.append(f"| + at load only (in the peak) | {_gib(first['load_transient_bytes'])} | {first['load_transient']} |")
    refs = plan["assumptions"]["reference_runs"]
    lines += ["", "Usable = memory x (1 - carveout) - OS; Jetson: 5% carveout (tegrastats shows 7772 of 8192 MB "
              "visible), 1.0 GiB headless OS (assumed). Realistic = bound x the fraction of its bound a published "
              f"runtime reaches: {refs['int4']['label']} for 4-bit, {refs['fp16']['label']} otherwise; also "
              f"published: {plan['assumptions']['also_published']}. GPU runtime overhead 1.5 GiB is assumed, not "
              "measured."]
    return "\n".join(lines) + "\n"


def write_json(plan: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(plan, indent=1, default=str) + "\n", encoding="utf-8")


# --- ib-bench --plan ---------------------------------------------------------------------------------
def add_arguments(ap) -> None:
    """The --plan options of ib-bench (--json-out is ib-bench's own)."""
    d = PlanOptions()
    g = ap.add_argument_group("memory and speed planner (--plan MODEL)")
    g.add_argument("--plan", metavar="MODEL", default=None,
                   help="plan MODEL (a preset: instructblip-vicuna-7b|-13b|flan-t5-xl|-xxl, a bundle, a checkpoint "
                        "directory or config.json) on every Jetson Orin: resident bytes per stage, fits, decode bound")
    g.add_argument("--precision", default=None, choices=["fp32", "fp16", "int8"],
                   help=f"vision/Q-Former precision as in ib-export (default {d.precision}; a bundle brings its own)")
    g.add_argument("--llm-quant", default=None, choices=["rtn", "gptq", "awq", "int8", "mixed"],
                   help="LLM quantization as in ib-export (a bundle brings its own)")
    g.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128, 256],
                   help=f"4-bit group size (default {d.group_size})")
    g.add_argument("--context", type=int, default=None, metavar="N",
                   help="positions the LLM holds: prompt incl. query tokens + generated (default: its max, <= 2048)")
    g.add_argument("--target", default=None, metavar="NAME",
                   help=f"plan for one device only: {', '.join([*DEVICES, 'host'])} (host: this machine's CPU runtime)")
    g.add_argument("--memory-gb", type=float, default=None, help="also plan for a device with this much memory")
    g.add_argument("--bandwidth-gbs", type=float, default=None, help="... and this memory bandwidth (GB/s)")


def run_cli(args) -> dict:
    """ib-bench --plan: -> the plan (rendered by the caller with ``render``)."""
    d = PlanOptions()
    bundle = Path(args.plan).expanduser().is_dir() and (Path(args.plan).expanduser() / "manifest.json").is_file()
    given = [f for f in ("precision", "llm_quant", "group_size") if getattr(args, f) is not None]
    if bundle and given:
        raise PlanError(f"a bundle brings its own {', '.join('--' + f.replace('_', '-') for f in given)}",
                        hint="plan its checkpoint directory to try other options")
    opts = PlanOptions(precision=args.precision or d.precision, llm_quant=args.llm_quant,
                       group_size=args.group_size or d.group_size, context=args.context)
    devices = [device(args.target)] if args.target else list(DEVICES.values())
    if args.memory_gb is not None:
        devices.append(custom_device(args.memory_gb, args.bandwidth_gbs))
    elif args.bandwidth_gbs is not None:
        raise PlanError("--bandwidth-gbs needs --memory-gb")
    return make_plan(args.plan, opts, devices)
