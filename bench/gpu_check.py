"""GPU check: what InstructBLIP's parts cost on this machine's NVIDIA GPU, at real shapes.

    python bench/gpu_check.py --out DIR [--budget-s 420] [--quick] [--proof-bundle DIR]
    python bench/gpu_check.py --out DIR --cpu-rehearsal --proof-bundle DIR   # no GPU: the same LLM code, tiny

Needs only torch (with CUDA), transformers and numpy; random weights, no network, none of the
repo's trained models (ib_edge is used only for its version if it is importable). Runs, each
with warm-up and CUDA-event timing, p50/p90 over the runs:

  1. vision encoder (ViT-g/14 at 224: hidden 1408, 39 layers, 16 heads, MLP 6144), PyTorch
     eager, fp32 and fp16, batch 1 and 8;
  2. Q-Former (hidden 768, 12 layers, cross-attention every 2nd layer, 32 queries) + the
     language projection to 4096 (Vicuna-7B's width), fp32 and fp16, batch 1;
  3. LLM decode step of a ~1.1B Llama (hidden 2048, 22 layers, intermediate 5632, 32/4 heads,
     vocab 32000; a stand-in for Vicuna-7B) in fp16 with a KV cache: prefill time, ms/token,
     tokens/s, and % of the bandwidth bound (weight bytes per token / measured device-to-
     device copy bandwidth);
  4. ONNX Runtime CUDA / TensorRT EP on the vision encoder, only where onnxruntime-gpu has those
     providers; TensorRT (python) only where it is installed: each skipped with its reason;
  0. (first, it is what the budget is for) the project's cuda 4-bit LLM engine (bench/gpu_llm.py):
     logits and greedy tokens against the CPU engine on the same int4 weights (the proof-llama
     bundle given by --proof-bundle, a random 1.1 B shape), decode tokens/s at the 1.1 B and
     Vicuna-7B shapes vs transformers fp16 generate, % of the copy-bandwidth bound, peak memory.
     This one imports the project from this checkout (no install needed).

--cpu-rehearsal runs section 0's code on the CPU at tiny shapes (the cuda engine on the CPU int4
kernel, no graphs) and skips the rest: a dry run of the script before spending GPU minutes.

On a lent GPU machine (the bare tree under its own python3): export the proof bundle here first,
`ib-export proof-llama --llm-quant rtn --group-size 64 --out bundles/proof-llama-rtn` (bundles/ is
git-ignored, so name it in the run's carry), then run
`python3 bench/gpu_check.py --out $OUT --proof-bundle bundles/proof-llama-rtn`.

Writes DIR/gpu_check.json and DIR/gpu_check.md. Finishes within --budget-s (default 420 s):
every section checks the time left and is skipped with a reason when it would not fit.
Without a CUDA GPU it still writes both files, saying so, and exits 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata as md
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

VISION = dict(hidden_size=1408, num_hidden_layers=39, num_attention_heads=16, intermediate_size=6144,
              image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, initializer_range=0.02)
QFORMER = dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408,
               max_position_embeddings=512, initializer_range=0.02)
NUM_QUERY_TOKENS = 32
LLM_WIDTH_VICUNA_7B = 4096
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                tie_word_embeddings=False, initializer_range=0.02)
PROMPT_TOKENS = NUM_QUERY_TOKENS + 16   # 32 image tokens + a short instruction
INSTRUCTION_TOKENS = 12                  # Q-Former text tokens


@dataclasses.dataclass
class Check:
    deadline: float
    quick: bool
    runs: int
    sections: dict = dataclasses.field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _version(pkg):
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def stats(ms: list[float]) -> dict:
    x = np.asarray(ms, dtype=np.float64)
    return {"n": int(x.size), "p50": round(float(np.percentile(x, 50)), 4), "p90": round(float(np.percentile(x, 90)), 4),
            "min": round(float(x.min()), 4), "mean": round(float(x.mean()), 4)}


def cuda_time(fn, runs: int, warmup: int = 3) -> dict:
    """GPU time per call (CUDA events around each call, synchronised), warm-up excluded."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return stats(times)


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "transformers": _version("transformers"), "numpy": np.__version__,
           "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
           "tensorrt": _version("tensorrt"), "bitsandbytes": _version("bitsandbytes"),
           "ib_edge": _version("ib-edge") if importlib.util.find_spec("ib_edge") else None,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "memory_mb": round(p.total_memory / 2**20), "compute_capability": f"{p.major}.{p.minor}",
                      "multiprocessors": p.multi_processor_count}
    else:
        env["gpu"] = None
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime_providers"] = []
    return env


def bandwidth() -> dict:
    """Device-to-device copy of 1 GiB (fp16), best of 10; bytes read + written."""
    import torch

    n = 2**29
    src = torch.empty(n, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), runs=10, warmup=2)
    gbs = 2 * src.numel() * src.element_size() / (t["min"] / 1e3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return {"gb_per_s": round(gbs, 1), "method": "torch copy_ of 1 GiB fp16 on the GPU, fastest of 10, bytes read + written"}


def cpu_bandwidth() -> dict:
    """The rehearsal's stand-in for bandwidth(): a 256 MiB torch copy on the CPU, fastest of 5."""
    import torch

    src = torch.ones(2**26, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(6):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return {"gb_per_s": round(2 * src.numel() * 4 / best / 1e9, 1), "method": "CPU rehearsal: torch copy_ of 256 MiB "
            "fp32 on the CPU, fastest of 6, bytes read + written"}


def import_project():
    """ib_edge from this checkout when it is not installed (the GPU machine runs the bare tree):
    the package's subpackages live at the repository root (pyproject's package-dir)."""
    try:
        import ib_edge.runtime  # noqa: F401
    except ImportError:
        root = Path(__file__).resolve().parents[1]
        sys.path.insert(0, str(root))
        import ib_edge

        ib_edge.__path__.append(str(root))
        import ib_edge.runtime  # noqa: F401


def llm_int4(check: Check, bw: dict, device: str, proof_bundle: Path | None) -> dict:
    import_project()
    from ib_edge.bench import gpu_llm

    opts = gpu_llm.LlmOptions(device=device)
    if check.quick:
        opts = dataclasses.replace(opts, proof_questions=2, agree_steps=8, new_tokens=32, hf_tokens=16, repeats=2)
        if device == "cpu":   # the CI rehearsal: every code path once, seconds
            opts = dataclasses.replace(opts, proof_questions=1, agree_steps=4, new_tokens=6, hf_tokens=8, repeats=2,
                                       step_runs=3)
    return gpu_llm.run(check, bw["gb_per_s"], opts, proof_bundle)


def vision_qformer(check: Check) -> dict:
    import torch
    from transformers import InstructBlipQFormerConfig, InstructBlipVisionConfig
    from transformers.models.instructblip.modeling_instructblip import (InstructBlipQFormerModel,
                                                                        InstructBlipVisionModel)

    torch.manual_seed(0)
    out = {"shapes": {"vision": VISION, "qformer": QFORMER, "num_query_tokens": NUM_QUERY_TOKENS,
                      "projection_to": LLM_WIDTH_VICUNA_7B}}
    t0 = time.monotonic()
    vcfg = InstructBlipVisionConfig(**VISION)
    qcfg = InstructBlipQFormerConfig(**QFORMER)
    with torch.device("cuda"):
        vision = InstructBlipVisionModel(vcfg).eval()
        qformer = InstructBlipQFormerModel(qcfg).eval()
        proj = torch.nn.Linear(QFORMER["hidden_size"], LLM_WIDTH_VICUNA_7B)
        query_tokens = torch.randn(1, NUM_QUERY_TOKENS, QFORMER["hidden_size"]) * 0.5
    out["build_s"] = round(time.monotonic() - t0, 2)
    out["params_m"] = {"vision": round(sum(p.numel() for p in vision.parameters()) / 1e6, 1),
                       "qformer": round(sum(p.numel() for p in qformer.parameters()) / 1e6, 1)}
    out["attn_implementation"] = getattr(vision.config, "_attn_implementation", None)
    seq = (VISION["image_size"] // VISION["patch_size"]) ** 2 + 1

    def qformer_fn(img, dtype):
        ids = torch.randint(0, QFORMER["vocab_size"], (img.shape[0], INSTRUCTION_TOKENS), device="cuda")
        text_mask = torch.ones_like(ids)
        q = query_tokens.to(dtype).expand(img.shape[0], -1, -1)
        mask = torch.cat([torch.ones(q.shape[:2], dtype=torch.long, device="cuda"), text_mask], 1)
        img_mask = torch.ones(img.shape[:2], dtype=torch.long, device="cuda")

        def run():
            h = qformer(input_ids=ids, attention_mask=mask, query_embeds=q, encoder_hidden_states=img,
                        encoder_attention_mask=img_mask, return_dict=True).last_hidden_state
            return proj(h[:, :NUM_QUERY_TOKENS])
        return run

    results = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        if check.left() < 30:
            results[dtype_name] = {"skipped": "time budget"}
            continue
        vision.to(dtype), qformer.to(dtype), proj.to(dtype)
        torch.cuda.reset_peak_memory_stats()
        rec = {}
        with torch.inference_mode():
            for batch in ((1,) if check.quick else (1, 8)):
                pv = torch.randn(batch, 3, VISION["image_size"], VISION["image_size"], device="cuda", dtype=dtype)
                t = cuda_time(lambda: vision(pixel_values=pv), check.runs)
                t["images_per_s"] = round(batch / (t["p50"] / 1e3), 1)
                rec[f"vision_batch{batch}_ms"] = t
            img = torch.randn(1, seq, VISION["hidden_size"], device="cuda", dtype=dtype)
            rec["qformer_batch1_ms"] = cuda_time(qformer_fn(img, dtype), check.runs)
            pv = torch.randn(1, 3, VISION["image_size"], VISION["image_size"], device="cuda", dtype=dtype)
            e = vision(pixel_values=pv).last_hidden_state
            rec["finite"] = bool(torch.isfinite(e).all()) and bool(torch.isfinite(qformer_fn(e, dtype)()).all())
        rec["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        results[dtype_name] = rec
    out["results"] = results
    if "vision_batch1_ms" in results.get("fp16", {}) and "vision_batch1_ms" in results.get("fp32", {}):
        out["fp16_speedup_vision_batch1"] = round(results["fp32"]["vision_batch1_ms"]["p50"]
                                                  / results["fp16"]["vision_batch1_ms"]["p50"], 2)
    del vision, qformer, proj
    torch.cuda.empty_cache()
    return out


def llm_decode(check: Check, bw: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(LLAMA_1B)
    if check.quick:
        cfg["num_hidden_layers"] = 4
    config = LlamaConfig(**cfg)
    torch.manual_seed(0)
    t0 = time.monotonic()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(prev)
    build_s = time.monotonic() - t0
    params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    per_token = sum(p.numel() * p.element_size() for p in model.parameters()) - emb.numel() * emb.element_size()
    steps = 32 if check.quick else 64
    ids = torch.randint(0, cfg["vocab_size"], (1, PROMPT_TOKENS), device="cuda")

    def prefill():
        return model(input_ids=ids, use_cache=True)

    with torch.inference_mode():
        prefill_t = cuda_time(prefill, check.runs)
        # decode: one token at a time with the cache, greedy; EOS cannot stop it (no generate)
        times = []
        for rep in range(3):
            out = prefill()
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            for i in range(steps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                b.record()
                b.synchronize()
                if rep > 0 or i >= 4:  # the first steps of the first pass are warm-up
                    times.append(a.elapsed_time(b))
    step = stats(times)
    tok_s = 1e3 / step["p50"]
    bound = bw["gb_per_s"] * 1e9 / per_token
    rec = {"label": "~1.1B Llama (TinyLlama shape), a stand-in for Vicuna-7B; random weights, fp16, eager"
                    + (" (--quick: 4 layers)" if check.quick else ""),
           "config": cfg, "params_m": round(params / 1e6, 1), "build_s": round(build_s, 2),
           "prompt_tokens": PROMPT_TOKENS, "prefill_ms": prefill_t, "decode_step_ms": step,
           "decode_tokens_per_s": round(tok_s, 1), "weights_bytes_per_token": int(per_token),
           "bound_tokens_per_s": round(bound, 1), "percent_of_bound": round(100 * tok_s / bound, 2),
           "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20),
           "note": "eager PyTorch launches ~10 kernels per layer per token; at batch 1 launch overhead, not "
                   "bandwidth, usually bounds a 1B model (CUDA graphs / TensorRT-LLM close the gap)"}
    del model, past
    torch.cuda.empty_cache()
    return rec


def onnx_backends(check: Check) -> dict:
    """ONNX Runtime CUDA / TensorRT EP and TensorRT itself on the vision encoder, where present."""
    out = {}
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
        out["onnxruntime"] = {"skipped": "onnxruntime is not installed"}
    has_trt = importlib.util.find_spec("tensorrt") is not None
    want = [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p in providers]
    if providers and not want:
        out["onnxruntime"] = {"skipped": f"onnxruntime {ort.__version__} has no GPU provider (available: "
                                         f"{', '.join(providers)}); install onnxruntime-gpu"}
    if not has_trt:
        out["tensorrt"] = {"skipped": "the tensorrt python package is not installed"}
    if not want and not has_trt:
        return out
    if check.left() < 120:
        out["export"] = {"skipped": "time budget: exporting ViT-g to ONNX needs ~1-2 minutes"}
        return out
    import torch
    from transformers import InstructBlipVisionConfig
    from transformers.models.instructblip.modeling_instructblip import InstructBlipVisionModel

    layers = 4 if check.quick else VISION["num_hidden_layers"]
    vcfg = InstructBlipVisionConfig(**{**VISION, "num_hidden_layers": layers})

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.v = InstructBlipVisionModel(vcfg).eval()

        def forward(self, pixel_values):
            return self.v(pixel_values=pixel_values, return_dict=True).last_hidden_state

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    path = tmp / "vision.onnx"
    t0 = time.monotonic()
    pv = torch.randn(1, 3, VISION["image_size"], VISION["image_size"])
    try:
        torch.onnx.export(Graph(), (pv,), str(path), input_names=["pixel_values"], output_names=["image_embeds"],
                          opset_version=18, dynamo=True, external_data=True)
    except Exception as e:  # an export failure is reported, the other sections still ran
        out["export"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        return out
    out["export"] = {"layers": layers, "seconds": round(time.monotonic() - t0, 1), "opset": 18}
    feed = {"pixel_values": pv.numpy()}
    for prov in want:
        if check.left() < 60:
            out[prov] = {"skipped": "time budget"}
            continue
        try:
            opts = {"trt_fp16_enable": "1"} if prov.startswith("Tensorrt") else {}
            sess = ort.InferenceSession(str(path), providers=[(prov, opts), "CPUExecutionProvider"])
            for _ in range(3):
                sess.run(None, feed)
            times = []
            for _ in range(check.runs):
                t = time.perf_counter()
                sess.run(None, feed)
                times.append((time.perf_counter() - t) * 1e3)
            out[prov] = {"vision_batch1_ms_wall": stats(times), "providers_used": sess.get_providers(),
                         "precision": "fp16 (TensorRT EP)" if opts else "fp32"}
        except Exception as e:
            out[prov] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    if has_trt and check.left() > 90:
        out["tensorrt"] = _tensorrt_engine(path, feed, check)
    elif has_trt:
        out["tensorrt"] = {"skipped": "time budget"}
    return out


def _tensorrt_engine(path: Path, feed: dict, check: Check) -> dict:
    """Build an fp16 engine from the ONNX file and time it (TensorRT 10 API)."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        return {"error": "ONNX parse failed: " + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))}
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
    t0 = time.monotonic()
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        return {"error": "engine build failed"}
    build_s = time.monotonic() - t0
    engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
    ctx = engine.create_execution_context()
    x = torch.from_numpy(feed["pixel_values"]).cuda()
    name_in, name_out = engine.get_tensor_name(0), engine.get_tensor_name(1)
    y = torch.empty(tuple(ctx.get_tensor_shape(name_out)), dtype=torch.float32, device="cuda")
    ctx.set_tensor_address(name_in, x.data_ptr())
    ctx.set_tensor_address(name_out, y.data_ptr())
    stream = torch.cuda.current_stream()
    t = cuda_time(lambda: ctx.execute_async_v3(stream.cuda_stream), check.runs)
    return {"tensorrt": trt.__version__, "precision": "fp16", "build_s": round(build_s, 1), "vision_batch1_ms": t}


def render(result: dict) -> str:
    env = result["environment"]
    L = ["# GPU check", "", f"Created {result['created']}, {result['elapsed_s']} s. "
         f"GPU: {env['gpu']['name'] if env.get('gpu') else 'none'}; torch {env['torch']} (CUDA {env['cuda']}), "
         f"transformers {env['transformers']}, onnxruntime {env['onnxruntime']} ({', '.join(env['onnxruntime_providers'])}), "
         f"tensorrt {env['tensorrt'] or 'not installed'}.", ""]
    if "error" in result:
        return "\n".join(L + [f"**{result['error']}**", ""])
    bw = result.get("bandwidth", {})
    L += [f"Device memory bandwidth: {bw.get('gb_per_s', '–')} GB/s ({bw.get('method', '')}).", ""]
    vq = result["sections"].get("vision_qformer", {})
    if "skipped" in vq:
        L += ["## Vision encoder and Q-Former", "", f"skipped: {vq['skipped']}", ""]
    else:
        L += ["## Vision encoder (ViT-g/14, 224 px) and Q-Former, PyTorch eager, random weights", "",
          "| precision | vision b1 ms p50 | vision b8 ms p50 | images/s b8 | Q-Former+proj b1 ms p50 | peak MB | finite |",
          "|---|---|---|---|---|---|---|"]
    for prec, r in vq.get("results", {}).items():
        if "skipped" in r:
            L.append(f"| {prec} | skipped: {r['skipped']} | | | | | |")
            continue
        b8 = r.get("vision_batch8_ms", {})
        b8_ms = f"{b8['p50']:.2f}" if b8 else "–"
        L.append(f"| {prec} | {r['vision_batch1_ms']['p50']:.2f} | {b8_ms} | {b8.get('images_per_s', '–')} | "
                 f"{r['qformer_batch1_ms']['p50']:.2f} | {r['peak_memory_mb']} | {r['finite']} |")
    if "error" in vq:
        L.append(f"\nerror: {vq['error']}")
    L += ["", "GPU time per call from CUDA events, warm-up excluded; b8 = batch of 8 images. fp32 is true fp32 "
          "(TF32 off), so fp16's gain is the tensor cores'.", ""]
    llm = result["sections"].get("llm_decode", {})
    L += ["## LLM decode step", ""]
    if "decode_step_ms" in llm:
        L += [f"{llm['label']}, {llm['params_m']} M parameters.", "",
              "| prefill ms p50 | decode ms/token p50 | tokens/s | bound tokens/s | % of bound | peak MB |",
              "|---|---|---|---|---|---|",
              f"| {llm['prefill_ms']['p50']:.2f} ({llm['prompt_tokens']} tokens) | {llm['decode_step_ms']['p50']:.3f} | "
              f"{llm['decode_tokens_per_s']} | {llm['bound_tokens_per_s']} | {llm['percent_of_bound']}% | {llm['peak_memory_mb']} |",
              "", "bound = bandwidth / fp16 weight bytes read per token (all but the input embedding). " + llm["note"], ""]
    else:
        L += [f"{llm.get('error') or llm.get('skipped')}", ""]
    if "llm_int4" in result["sections"]:
        import_project()
        from ib_edge.bench import gpu_llm

        L += gpu_llm.render(result["sections"]["llm_int4"])
    L += ["## ONNX Runtime GPU / TensorRT", ""]
    for k, v in result["sections"].get("onnx_backends", {}).items():
        L.append(f"- {k}: {json.dumps(v)}")
    return "\n".join(L + [""])


def _errors(section: dict) -> list[str]:
    """The parts of the llm_int4 section that raised."""
    return [f"{part}/{name}" for part in ("agreement", "decode") for name, r in section.get(part, {}).items()
            if "error" in r] + (["llm_int4"] if "error" in section else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting sections after this (default 420)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="smaller LLM/ONNX depth and batch 1 only (a few seconds)")
    ap.add_argument("--proof-bundle", type=Path, default=None,
                    help="a proof-llama int4 bundle (ib-export proof-llama --llm-quant rtn --group-size 64 --out "
                         "bundles/proof-llama-rtn) for the cuda engine's agreement check")
    ap.add_argument("--cpu-rehearsal", action="store_true",
                    help="no GPU needed: run the 4-bit LLM section's code on the CPU at tiny shapes, skip the rest")
    args = ap.parse_args(argv)
    start = time.monotonic()
    check = Check(deadline=start + args.budget_s, quick=args.quick, runs=args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": environment(), "sections": check.sections}
    import torch

    code = 0
    if args.cpu_rehearsal:
        result["rehearsal"] = True
        result["bandwidth"] = cpu_bandwidth()
        t0 = time.monotonic()
        check.sections["llm_int4"] = llm_int4(check, result["bandwidth"], "cpu", args.proof_bundle)
        check.sections["llm_int4"]["section_s"] = round(time.monotonic() - t0, 1)
        for name in ("vision_qformer", "llm_decode", "onnx_backends"):
            check.sections[name] = {"skipped": "--cpu-rehearsal"}
        if _errors(check.sections["llm_int4"]):
            code = 1
    elif not torch.cuda.is_available():
        result["error"] = "no CUDA GPU: torch.cuda.is_available() is False (this check needs an NVIDIA GPU)"
        code = 2
    else:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
        torch.backends.cudnn.allow_tf32 = False
        result["bandwidth"] = bandwidth()
        for name, fn in (("llm_int4", lambda: llm_int4(check, result["bandwidth"], "cuda", args.proof_bundle)),
                         ("vision_qformer", lambda: vision_qformer(check)),
                         ("llm_decode", lambda: llm_decode(check, result["bandwidth"])),
                         ("onnx_backends", lambda: onnx_backends(check))):
            if check.left() < 20:
                check.sections[name] = {"skipped": "time budget"}
                continue
            t0 = time.monotonic()
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            try:
                check.sections[name] = fn()
            except Exception as e:  # one failing section is recorded; the others still run
                check.sections[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=5)}
                code = 1
            check.sections[name]["section_s"] = round(time.monotonic() - t0, 1)
            if name == "llm_int4" and _errors(check.sections[name]):
                code = 1
            torch.cuda.reset_peak_memory_stats()
    result["elapsed_s"] = round(time.monotonic() - start, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (args.out / "gpu_check.md").write_text(render(result))
    print(render(result))
    return code


if __name__ == "__main__":
    # run as a script, bench/ heads sys.path, and its kernels.py then shadows the `kernels` package
    # transformers probes for (ImportError on `from transformers import LlamaForCausalLM`)
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    raise SystemExit(main())
