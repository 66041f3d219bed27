"""Real-size bundles (Vicuna-7B, Flan-T5-XL, built by ``export.real_sizes`` and exported with
``ib-export``) against transformers on the same weights, one process, one system at a time:

* the bundle through ``Pipeline`` (the product path, what ``ib-run`` runs): time to first token
  (preprocess + vision + Q-Former + LLM prefill), LLM decode tokens/s with EOS suppressed, peak
  RSS from load through the runs, the LLM weight bytes one decode step reads and the percent of
  the read-bandwidth bound (``measure.memory_bandwidth`` in the same run);
* transformers' LLM alone (``AutoModelFor*.from_pretrained`` of the checkpoint's
  ``language_model.`` tensors) in each ``--hf-dtype``: prefill and decode tokens/s of
  greedy ``generate`` on random prompt embeddings of the same length, and its peak RSS.

    python -m ib_edge.bench.realsize BUNDLE --checkpoint CKPT [--hf-dtype bfloat16 ...] [--tokens N]

Bytes per decode token: int4 Llama, the engine's own count (packed linears + scales + zero
points, norms, one embedding row); weight-only T5, every decoder linear and lm_head as stored
except the cross-attention k/v projections (computed once per answer from the encoder output and
cached by transformers); transformers, every LLM parameter except the embeddings and, for T5,
the encoder and the cross-attention k/v.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from ib_edge.runtime.threads import before_torch_import

before_torch_import()   # OMP_WAIT_POLICY=PASSIVE before torch loads libgomp, as ib-run and ib-bench do
import torch  # noqa: E402
from torch import nn  # noqa: E402

from .measure import PeakMemory, memory_bandwidth, streaming_bound


def _trim() -> None:
    from ib_edge.export.bundle import _trim_heap

    gc.collect()
    _trim_heap()


def t5_decode_bytes(model: nn.Module) -> int:
    """Weight bytes one T5 decoder step reads (see the module docstring)."""
    total = 0
    for name, mod in model.named_modules():
        if not (name.startswith("decoder.") or name == "lm_head"):
            continue
        if name.endswith(("EncDecAttention.k", "EncDecAttention.v")):
            continue
        if len(list(mod.children())) == 0 and not isinstance(mod, nn.Embedding):
            total += sum(t.numel() * t.element_size() for t in [*mod.parameters(recurse=False),
                                                                   *mod.buffers(recurse=False)])
    return total


def hf_decode_bytes(model: nn.Module) -> int:
    if model.config.is_encoder_decoder:
        return t5_decode_bytes(model)
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)


def bundle_run(bundle: Path, image: str, question: str, tokens: int, runs: int, threads: int | None,
               kernel: str | None = None) -> dict:
    """``kernel``: force the int4 LLM kernel (``IB_EDGE_LLM_KERNEL``); None: the runtime's choice."""
    import os

    from ib_edge.runtime.kernel_choice import ENV

    from .systems import BundleSystem

    before = os.environ.get(ENV)
    if kernel:
        os.environ[ENV] = kernel
    try:
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            sys_ = BundleSystem(bundle, threads=threads)
            load_s = time.perf_counter() - t0
            out = _bundle_runs(sys_, bundle, image, question, tokens, runs, load_s)
        out.update(mem.record())
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
    del sys_
    _trim()
    return out


def _bundle_runs(sys_, bundle: Path, image: str, question: str, tokens: int, runs: int, load_s: float) -> dict:
    sys_.run(image, question, max_new_tokens=4, fixed_length=True)   # warm-up
    answers = [sys_.run(image, question, max_new_tokens=tokens, fixed_length=True) for _ in range(runs)]
    best = min(answers, key=lambda a: a.timings_ms["total"])
    t = best.timings_ms
    n = int(t["new_tokens"])
    model = sys_.llm_model
    per_token = (model.weight_bytes_per_token() if hasattr(model, "weight_bytes_per_token")
                 else t5_decode_bytes(model))
    decode_tps = (n - 1) / (t["llm_decode"] / 1e3) if n > 1 and t["llm_decode"] > 0 else float("nan")
    prompt_tokens = int(sys_.pipe.prompts.encode(question)["input_ids"].shape[1])
    kernel = getattr(model, "kernel", None) or getattr(model, "engine", None)
    out = {"system": f"ib-edge bundle ({sys_.manifest.data['artifacts']['llm']['precision']} LLM"
                     + (f", {kernel} kernel" if kernel else "") + ")",
           "llm_kernel": kernel, "kernel_choice": getattr(model, "kernel_choice", None),
           "bundle": str(bundle), "load_s": round(load_s, 1), "prompt_tokens": prompt_tokens, "new_tokens": n,
           "ttft_ms": round(t["preprocess"] + t["vision"] + t["qformer"] + t["llm_prefill"], 1),
           "stages_ms": {k: round(v, 1) for k, v in t.items()},
           "decode_tok_s": round(decode_tps, 3), "weight_MB_per_token": round(per_token / 1e6, 1),
           "achieved_GB_s": round(per_token * decode_tps / 1e9, 2),
           "answer_token_ids": best.token_ids}
    return out


def hf_run(checkpoint: Path, dtype: str, prompt_len: int, tokens: int) -> dict:
    """transformers' LLM alone, read straight from the InstructBLIP checkpoint (its
    ``language_model.`` tensors; the rest is skipped) in ``dtype``; ``"nf4"``: bitsandbytes
    4-bit NF4 weights as ``systems.TransformersSystem`` loads them on a CPU (fp32 compute; the
    layers its packed kernel cannot take on its generic path)."""
    import transformers

    from .decode import _hf_decode
    from .systems import _nf4_cpu_fallbacks, nf4_unavailable_reason

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()   # the load report lists every non-LLM tensor as unexpected
    cfg = transformers.InstructBlipConfig.from_pretrained(checkpoint, trust_remote_code=False).text_config
    auto = transformers.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else transformers.AutoModelForCausalLM
    kwargs = {"dtype": getattr(torch, dtype, None)}
    if dtype == "nf4":
        reason = nf4_unavailable_reason()
        if reason:
            return {"system": "transformers bnb nf4 (LLM alone)", "available": False, "reason": reason}
        kwargs = {"dtype": torch.float32, "device_map": {"": "cpu"},
                  "quantization_config": transformers.BitsAndBytesConfig(
                      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)}
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        model = auto.from_pretrained(checkpoint, config=cfg, use_safetensors=True, **kwargs,
                                     key_mapping={r"^language_model\.": ""}, trust_remote_code=False).eval()
        generic = _nf4_cpu_fallbacks(model) if dtype == "nf4" else 0
        load_s = time.perf_counter() - t0
        emb = (torch.randn(1, prompt_len, cfg.d_model if cfg.is_encoder_decoder else cfg.hidden_size) * 0.02
               ).to(kwargs["dtype"])
        prefill, tps = _hf_decode(model, emb, tokens)
    per_token = hf_decode_bytes(model)
    out = {"system": f"transformers {'bnb nf4' if dtype == 'nf4' else dtype} (LLM alone)",
           **({"nf4_generic_cpu_layers": generic} if dtype == "nf4" else {}), "load_s": round(load_s, 1), "prefill_ms": round(prefill * 1e3, 1),
           "decode_tok_s": round(tps, 3), "weight_MB_per_token": round(per_token / 1e6, 1),
           "achieved_GB_s": round(per_token * tps / 1e9, 2), **mem.record()}
    del model
    _trim()
    return out


def main(argv: list[str] | None = None) -> int:
    from ib_edge.runtime.quiet import quiet_libraries

    quiet_libraries()   # torchao/pytree import chatter (IB_EDGE_DEBUG=1 shows it)
    ap = argparse.ArgumentParser(prog="python -m ib_edge.bench.realsize", description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="+", type=Path)
    ap.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint the bundles were exported from")
    ap.add_argument("--hf-dtype", action="append", default=None, choices=["bfloat16", "float16", "float32", "nf4"],
                    help="transformers baselines, one per use (default bfloat16); nf4: bitsandbytes NF4")
    ap.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / "calib_data" / "photos" / "astronaut.jpg"))
    ap.add_argument("--question", default="Describe this image.")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--hf-tokens", type=int, default=4)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--llm-kernel", action="append", default=None, metavar="KERNEL",
                    help="int4 LLM kernel(s) to time the bundle with, one run each (ort-int8, ort-fp32, torch; "
                         "default: the runtime's own choice)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    res = {"systems": [], "threads": torch.get_num_threads()}
    for b in a.bundle:
        log(f"realsize: bundle {b}")
        for kernel in a.llm_kernel or [None]:
            res["systems"].append(bundle_run(b, a.image, a.question, a.tokens, a.runs, a.threads, kernel))
            log(json.dumps({k: v for k, v in res["systems"][-1].items() if k != "answer_token_ids"}))
    prompt_len = res["systems"][0]["prompt_tokens"]
    for dt in a.hf_dtype or ["bfloat16"]:
        log(f"realsize: transformers {dt}")
        res["systems"].append(hf_run(a.checkpoint, dt, prompt_len, a.hf_tokens))
        log(json.dumps(res["systems"][-1]))
    measured = [s for s in res["systems"] if s.get("available", True)]
    probes = memory_bandwidth(1024)
    bw, by = streaming_bound({k: v["gb_per_s"] for k, v in probes["probes"].items()},
                             {s["system"]: s["achieved_GB_s"] for s in measured})
    res["read_bandwidth_GB_s"], res["bound_set_by"] = round(bw, 2), by
    res["read_probes_GB_s"] = {k: v["gb_per_s"] for k, v in probes["probes"].items()}
    for s in measured:
        s["pct_of_bandwidth_bound"] = round(100 * s["achieved_GB_s"] / bw, 1) if s["achieved_GB_s"] == s["achieved_GB_s"] else None
        s["bound_tok_s"] = round(bw * 1e9 / (s["weight_MB_per_token"] * 1e6), 2)
    text = json.dumps(res, indent=1)
    if a.json:
        a.json.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
