"""Decode speed of the fast LLM path: random int4 weights packed directly at a preset shape
(TinyLlama 1.1B by default), both engines, transformers fp32 and (when installed)
transformers + bitsandbytes NF4, in one process; tokens/s, GB/s of weights read and the percent
of the read-bandwidth bound.

    python -m ib_edge.bench.decode --threads 2                  # TinyLlama-shaped, group 128
    python -m ib_edge.bench.decode --preset smoke               # a few MB, checks the benchmark itself
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch
from torch import nn

from ib_edge.runtime.decode import generate
from ib_edge.runtime.cpuinfo import cpu_string
from ib_edge.runtime.engines import DEFAULT_ENGINE, ENGINES, assemble
from ib_edge.runtime.errors import InputError
from ib_edge.runtime.kernel_choice import ENGINE_DEFAULT_KERNEL, KERNELS, cannot_run
from ib_edge.runtime.formats import DEFAULT_GROUP_SIZE, KERNEL_GROUP_SIZES
from ib_edge.runtime.int4 import Int4Linear, linear_bytes
from ib_edge.runtime.llama import LAYER, PRESETS, FastLlama, LlamaArgs, collect

from .measure import best_time, memory_bandwidth, streaming_bound


def random_int4_model(a: LlamaArgs, group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0, engine: str = DEFAULT_ENGINE,
                      scale_spread: float = 0.0):
    """Random weights straight in int4 (see random_int4_tensors) on ``engine``, for speed measurements."""
    return assemble(a, random_int4_tensors(a, group_size, seed, scale_spread), group_size, engine)


def random_int4_tensors(a: LlamaArgs, group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0,
                        scale_spread: float = 0.0) -> dict[str, torch.Tensor]:
    """transformers-named tensors with every linear in int4 (uniform nibbles, small scales);
    ``scale_spread`` > 0 draws per-group scales and zero points too (for comparing engines)."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}

    def q4(name, n, k):
        t[name + ".qweight"] = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        t[name + ".scales"] = torch.full((n, k // group_size), 0.02 / 8)
        t[name + ".qzeros"] = torch.full((n, k // group_size), 8, dtype=torch.uint8)
        if scale_spread:
            t[name + ".scales"] *= 1 + scale_spread * torch.rand(n, k // group_size, generator=g)
            t[name + ".qzeros"] = torch.randint(4, 12, (n, k // group_size), dtype=torch.uint8, generator=g)

    d, hd = a.hidden_size, a.hd
    for i in range(a.n_layers):
        p = LAYER.format(i)
        for nm, n, k in (("self_attn.q_proj", a.n_heads * hd, d), ("self_attn.k_proj", a.n_kv_heads * hd, d),
                         ("self_attn.v_proj", a.n_kv_heads * hd, d), ("self_attn.o_proj", d, a.n_heads * hd),
                         ("mlp.gate_proj", a.intermediate_size, d), ("mlp.up_proj", a.intermediate_size, d),
                         ("mlp.down_proj", d, a.intermediate_size)):
            q4(p + nm, n, k)
        t[p + "input_layernorm.weight"] = torch.ones(d)
        t[p + "post_attention_layernorm.weight"] = torch.ones(d)
    t["model.embed_tokens.weight"] = torch.randn(a.vocab_size, d, generator=g) * 0.02
    t["model.norm.weight"] = torch.ones(d)
    q4("lm_head", a.vocab_size, d)
    return t


def bench(preset: str = "tinyllama-1.1b", group_size: int = DEFAULT_GROUP_SIZE, prompt_len: int = 40, new_tokens: int = 32,
          hf_tokens: int = 8, threads: int | None = None, nf4: bool = True, engine: str = "auto",
          llamacpp: bool = True, rounds: int = 6) -> dict:
    """Decode speed of the int4 path on every CPU kernel the runtime may choose
    (``kernel_choice.KERNELS``), the headline on ``engine`` ("auto": the fastest of this run, which
    is what the runtime's measured choice picks), transformers fp32, (when installed)
    transformers + bitsandbytes NF4 and llama.cpp (Q4_0, Q4_K) on the same weights, in one run.
    Then ``rounds`` interleaved rounds (order reversed every other round) of the headline kernel,
    or with "auto" of both ort int8-activation kernels when one of them won, and each llama.cpp
    file; with "auto" the headline is then the faster of those over the rounds. The host's rate
    drifts by 10-20 % within minutes here, which decides a one-after-another comparison; the
    medians of alternating rounds do not drift."""
    import resource

    if threads:
        torch.set_num_threads(threads)
    a = PRESETS[preset]
    emb = torch.randn(1, prompt_len, a.hidden_size) * 0.02

    def runner(model):
        def run(n):
            t0 = time.perf_counter()
            ids = generate(model, emb, max_new_tokens=n)
            return time.perf_counter() - t0, len(ids)
        return run

    def measure(kernel):
        t0 = time.perf_counter()
        model = random_int4_model(a, group_size, engine=kernel)
        build_s = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        prefill_s, tps = _decode_timing(runner(model), new_tokens)
        out = {"kernel": kernel, "engine": model.engine, "build_s": round(build_s, 1),
               "prefill_ms": round(prefill_s * 1e3, 1), "decode_tok_s": round(tps, 2),
               "weight_MB_per_token": round(model.weight_bytes_per_token() / 1e6, 1),
               "achieved_GB_s": round(model.weight_bytes_per_token() * tps / 1e9, 2),
               "decode_ms_per_token": round(1e3 / tps, 2), "process_peak_rss_MB": round(rss)}
        if model.engine == "ort":   # its weights on 2 MiB pages or not (runtime/hugepages.py)
            out["huge_pages"] = model.huge_pages
        if kernel == "torch":
            out.update(_linears_alone(model))
        return out

    # every kernel that can run here, one model at a time (the first one's peak RSS is its own);
    # which can run depends on the head shape and the int4 layout, so a 1-layer probe decides
    probe = dataclasses.replace(a, n_layers=1, vocab_size=64)
    probe_spec = collect(probe, random_int4_tensors(probe, group_size), group_size)
    not_run = {k: why for k in KERNELS if (why := cannot_run(k, probe, probe_spec))}
    kernels = {k: measure(k) for k in KERNELS if k not in not_run}
    head = (max(kernels, key=lambda k: kernels[k]["decode_tok_s"]) if engine == "auto"
            else ENGINE_DEFAULT_KERNEL.get(engine, engine))
    if head not in kernels:
        raise InputError(f"--engine {engine}: kernel {head} cannot run here ({not_run.get(head)})")
    main = kernels[head]
    runs: dict = {}                               # llama.cpp's open models, then ours
    cpp = (_llamacpp(a, group_size, prompt_len, new_tokens, torch.get_num_threads(), runs) if llamacpp
           else {"measured": False, "reason": "--no-llamacpp"})
    # interleaved: the headline, or (auto) every ort int8-activation kernel, which run within a few
    # % of each other, so that the one-after-another order above does not pick the headline
    # (only when one of them won above: a CPU where torch or ort-fp32 wins keeps that headline)
    ours_k = [k for k in kernels if k in ("ort-int8", "ort-q4x8")] if engine == "auto" else [head]
    if head not in ours_k:
        ours_k = [head]
    head_how = "fastest kernel of this run" if engine == "auto" else "--engine"
    if rounds and (runs or len(ours_k) > 1):
        mine = {}
        for k in ours_k:                          # rebuilt after the RSS readings above
            mine[f"ib-edge {k}"] = runner(random_int4_model(a, group_size, engine=k))
            mine[f"ib-edge {k}"](2)               # warm-up, as llama.cpp's were
        runs = {**mine, **runs}
        inter = interleaved(runs, new_tokens, rounds)
        if engine == "auto":
            head = max(ours_k, key=lambda k: inter["tok_s_median"][f"ib-edge {k}"])
            head_how = f"fastest ib-edge kernel over the {rounds} interleaved rounds"
            main = kernels[head]
        inter[f"rounds_ib-edge {head}_ahead"] = rounds_ahead(inter["tok_s_each"], f"ib-edge {head}")
    else:
        inter = {"measured": False, "reason": "--rounds 0" if not rounds else "nothing to interleave with"}
    runs.clear()
    # after the RSS readings: the probe's arrays are GiB-sized
    probes = memory_bandwidth(64 if preset == "smoke" else 1024)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      max_position_embeddings=a.max_positions, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    _, hf_tps = _hf_decode(hf, emb, hf_tokens)
    nf4 = _nf4_decode(hf, emb, hf_tokens) if nf4 else {"measured": False, "reason": "--no-nf4"}
    # the bound is the best streaming rate of this run: the probes and every system's own rate
    hf_bytes = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if "embed_tokens" not in n)
    del hf
    eff = {f"{k} kernel": r["achieved_GB_s"] for k, r in kernels.items()}
    eff["transformers fp32"] = hf_bytes * hf_tps / 1e9 if hf_tps == hf_tps else None
    bw, bound_by = streaming_bound({k: v["gb_per_s"] for k, v in probes["probes"].items()}, eff)
    for r in kernels.values():
        r["pct_of_bandwidth_bound"] = round(100 * r["achieved_GB_s"] / bw, 1)
    tps = main["decode_tok_s"]
    vs_cpp = {f"speedup_vs_llamacpp_{q}": round(tps / r["decode_tok_s"], 2) for q, r in cpp.items()
              if isinstance(r, dict) and r.get("measured")}
    if inter.get("measured", True):
        ours = inter["tok_s_median"][f"ib-edge {head}"]
        vs_cpp.update({f"speedup_vs_llamacpp_{q.removeprefix('llama.cpp ')}_interleaved": round(ours / v, 2)
                       for q, v in inter["tok_s_median"].items() if not q.startswith("ib-edge")})
    return {"preset": preset, "threads": torch.get_num_threads(), "group_size": group_size,
            "cpu": cpu_string(), "load_average": [round(v, 2) for v in os.getloadavg()],
            "headline_kernel": head, "headline_how": head_how,
            "int4_build_s": main["build_s"], "int4_prefill_ms": main["prefill_ms"],
            "int4_decode_tok_s": tps, "transformers_fp32_decode_tok_s": round(hf_tps, 2),
            "speedup": round(tps / hf_tps, 2), **vs_cpp, "int4_weight_MB_per_token": main["weight_MB_per_token"],
            "achieved_GB_s": main["achieved_GB_s"], "read_bandwidth_GB_s": round(bw, 2), "bound_set_by": bound_by,
            "read_probes_GB_s": {k: v["gb_per_s"] for k, v in probes["probes"].items()},
            "transformers_fp32_achieved_GB_s": None if eff["transformers fp32"] is None else round(eff["transformers fp32"], 2),
            "pct_of_bandwidth_bound": main["pct_of_bandwidth_bound"],
            "decode_ms_per_token": main["decode_ms_per_token"],
            "peak_rss_total_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "kernels": kernels, "kernels_not_run": not_run, "llama_cpp": cpp, "interleaved": inter, "transformers_bnb_nf4": nf4,
            **({"speedup_vs_nf4": round(tps / nf4["decode_tok_s"], 2)} if nf4.get("measured") else {})}


def _llamacpp(a: LlamaArgs, group_size: int, prompt_len: int, new_tokens: int, threads: int,
              keep: dict | None = None) -> dict:
    """llama.cpp on the same random weights (bench/llamacpp.py), or why it was skipped; its open
    models' ``run`` go into ``keep`` (named "llama.cpp Q4_0", ...)."""
    from . import llamacpp

    why = llamacpp.unavailable_reason()
    if why:
        return {"measured": False, "reason": why}
    opened: dict = {}
    res = llamacpp.bench(a, random_int4_tensors(a, group_size), prompt_len, new_tokens, threads, _decode_timing,
                         keep=opened)
    if keep is not None:
        keep.update({f"llama.cpp {q}": r for q, r in opened.items()})
    return res


def interleaved(runs: dict, n_tokens: int, rounds: int) -> dict:
    """Decode tokens/s of each ``run(n) -> (seconds, tokens)`` in ``rounds`` alternating rounds
    (each: 1 token, then ``n_tokens``; rate = the tokens after the first over the time after the
    prefill), the order reversed every other round; medians and how many rounds each system beat
    the first one."""
    import statistics

    names = list(runs)
    rates: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            prefill = runs[k](1)[0]
            total, made = runs[k](n_tokens)
            rates[k].append((made - 1) / (total - prefill) if total > prefill else float("nan"))
    return {"rounds": rounds, "order": "alternating, reversed every other round",
            "tok_s_median": {k: round(statistics.median(v), 2) for k, v in rates.items()},
            "tok_s_each": {k: [round(x, 2) for x in v] for k, v in rates.items()},
            f"rounds_{names[0]}_ahead": rounds_ahead(rates, names[0])}


def rounds_ahead(rates: dict[str, list[float]], name: str) -> dict[str, int]:
    """In how many rounds ``name`` decoded faster than each other system."""
    return {k: sum(a > b for a, b in zip(rates[name], v)) for k, v in rates.items() if k != name}


def _linears_alone(model: FastLlama, repeats: int = 3) -> dict:
    """Where a decode step's time goes: every linear of the model run once on a 1-token input
    (the kernels alone, weights streamed from DRAM as in decode; bytes = packed weights + scales),
    and a plain ``torch.sum`` over the same packed int4 buffers (packed bytes only: what
    reading them costs at best, one buffer at a time as the kernels read them)."""
    lins = [m for m in model.modules() if isinstance(m, (Int4Linear, nn.Linear))]
    xs = {m.in_features: torch.randn(1, m.in_features) for m in lins}
    packed = [m.packed for m in lins if isinstance(m, Int4Linear)]

    with torch.no_grad():
        t_lin = best_time(lambda: [m(xs[m.in_features]) for m in lins], repeats, warmup=1)
    # float sums of the raw bytes (integer sums are not vectorised: 5 GB/s measured), with
    # denormals flushed so that bit patterns that read as subnormal floats take no slow path
    torch.set_flush_denormal(True)
    try:
        t_read = best_time(lambda: [p.view(torch.float32).sum() for p in packed], repeats, warmup=1)
    finally:
        torch.set_flush_denormal(False)
    n_packed = sum(p.numel() * p.element_size() for p in packed)
    n_lin = sum(linear_bytes(m) for m in lins)
    return {"linears_alone_ms_per_token": round(t_lin * 1e3, 2),
            "linears_alone_GB_s": round(n_lin / t_lin / 1e9, 2),
            "sum_over_packed_int4_GB_s": round(n_packed / t_read / 1e9, 2)}


def _nf4_decode(hf, emb: torch.Tensor, n_tokens: int) -> dict:
    """Decode tokens/s of the same random model through transformers + bitsandbytes NF4 (what a
    user tries first): saved, then reloaded with BitsAndBytesConfig, fp32 compute on CPU."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"measured": False, "reason": "bitsandbytes is not installed"}
    import bitsandbytes
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        t0 = time.perf_counter()
        q = LlamaForCausalLM.from_pretrained(d, quantization_config=cfg, device_map={"": "cpu"}, trust_remote_code=False,
                                             dtype=torch.float32).eval()
        load_s = time.perf_counter() - t0
    prefill, tps = _hf_decode(q, emb, n_tokens)
    return {"measured": True, "bitsandbytes": bitsandbytes.__version__, "load_s": round(load_s, 1),
            "prefill_ms": round(prefill * 1e3, 1), "decode_tok_s": round(tps, 2)}


def _hf_decode(model, emb: torch.Tensor, n_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of a transformers model's greedy ``generate`` on
    ``emb``, after a warm-up (first-call costs; bitsandbytes packs its weights there)."""
    def run(n):
        t0 = time.perf_counter()
        out = model.generate(inputs_embeds=emb, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0, out.shape[1]

    with torch.no_grad():
        return _decode_timing(run, n_tokens)


def _decode_timing(run, n_tokens: int, repeats: int = 3) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) from ``run(n) -> (seconds, tokens produced)``: one
    warm-up, then the fastest of ``repeats`` runs of 1 token (the prefill) and of ``n_tokens``;
    decode rate = the tokens after the first over the time after the prefill. Fastest-of, because
    a single pair of runs on a busy 2-core machine can put the 1-token run above the n-token one."""
    if n_tokens < 2:
        raise ValueError("a decode rate needs at least 2 new tokens")
    run(2)
    prefill = min(run(1)[0] for _ in range(repeats))
    total, produced = min(run(n_tokens) for _ in range(repeats))
    if total <= prefill:  # timing noise swamped the decode time: say so rather than print a rate
        return prefill, float("nan")
    return prefill, (produced - 1) / (total - prefill)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ib_edge.bench.decode",
                                 description="Decode speed of the int4 fast path vs transformers fp32.")
    ap.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS))
    ap.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=KERNEL_GROUP_SIZES)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hf-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-nf4", action="store_true", help="skip the transformers + bitsandbytes NF4 comparison")
    ap.add_argument("--engine", choices=("auto", *ENGINES, *KERNELS), default="auto",
                    help="engine or kernel of the headline figures (default auto: the fastest of this run, as the "
                         "runtime's measured choice; every kernel is measured either way)")
    ap.add_argument("--rounds", type=int, default=6,
                    help="interleaved rounds of the headline kernel (auto: both ort int8 kernels) against each "
                         "llama.cpp file (0: none)")
    ap.add_argument("--no-llamacpp", action="store_true",
                    help="skip the llama.cpp baseline (skipped anyway when llama_cpp/gguf are not importable)")
    args = ap.parse_args(argv)
    try:
        res = bench(args.preset, args.group_size, new_tokens=args.new_tokens, hf_tokens=args.hf_tokens,
                    threads=args.threads, nf4=not args.no_nf4, engine=args.engine, llamacpp=not args.no_llamacpp,
                    rounds=args.rounds)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
