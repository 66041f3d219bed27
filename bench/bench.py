"""ib-bench's core: measure bundles side by side, with baselines, into one result dict.

    from ib_edge.bench.bench import BenchConfig, run_bench
    result = run_bench(BenchConfig(bundles=("b-fp32", "b-int8")))

For every bundle (and every baseline that runs here), on the same inputs:
  * latency per stage over ``runs`` timed runs after ``warmup`` untimed ones, one fixed input
    (the first eval example): p50/p90/p99 of preprocess, vision, qformer, llm_prefill, ttft
    (image in -> first token), llm_decode, total, and decode tokens/s;
  * peak memory (RSS; GPU where torch uses one) and artifact sizes;
  * drift against the reference bundle (the first fp32 one): image_embeds, query_embeds of the
    Q-Former alone (fed the reference's image_embeds) and of the whole chain, next-token logits
    (cosine, SQNR, max-abs; top-1 agreement), and greedy answers equal to the reference's;
  * exact-match task accuracy, overall and per question type;
  * decode tokens/s as a percentage of the memory-bandwidth bound.
Library code raises ``BenchError``; only the CLI exits.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from ib_edge.runtime.errors import IbEdgeError

from . import measure, proof_task
from .systems import (STAGES, BundleSystem, NotAvailable, TransformersSystem, bf16_unavailable_reason,
                      nf4_unavailable_reason)

SCHEMA = "ib-bench/1"
DEFAULT_N_EVAL = 50


class BenchError(IbEdgeError):
    pass


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    bundles: tuple[str, ...] = ()          # empty: the default bundle (where ib-export writes)
    eval_file: str | None = None           # None: a fresh proof-task set
    n_eval: int | None = None              # None: all rows of eval_file, DEFAULT_N_EVAL generated
    eval_seed: int | None = None           # generated set's seed; None: a random one (recorded)
    runs: int = 10
    warmup: int = 2
    max_new_tokens: int = 16
    baselines: bool = True
    source: str | None = None              # checkpoint for the baselines; None: the reference's manifest
    threads: int | None = None
    providers: tuple[str, ...] | None = None
    bandwidth_mb: int = 256
    accuracy_applicable: bool = True       # False for random-weight (--scale real) models
    progress: bool | None = None           # None: a bar only on a terminal


# --- eval set --------------------------------------------------------------------------------
def read_eval_file(path: Path) -> list[dict]:
    """The eval file's rows, validated (ib-bench checks it before measuring anything)."""
    if not path.is_file():
        raise BenchError(f"eval file not found: {path}")
    try:
        return proof_task.read_eval_set(path)
    except (ValueError, OSError) as e:
        raise BenchError(f"cannot read eval file {path}: {e}",
                         hint='one JSON object per line: {"image" (or "frames": [paths]), "question", "answer"} '
                              '(+ "type")') from None


def load_examples(cfg: BenchConfig) -> tuple[list[dict], dict]:
    """-> (examples with PIL images decoded up front, record for the report)."""
    from ib_edge.runtime.preprocess import load_image

    if cfg.eval_file:
        path = Path(cfg.eval_file)
        rows = read_eval_file(path)
        if cfg.n_eval is not None:
            rows = rows[:cfg.n_eval]
        examples = [{"image": [load_image(f) for f in r["frames"]] if "frames" in r else load_image(r["image"]),
                     "image_ref": r["frames"] if "frames" in r else r["image"], "question": r["question"],
                     "answer": r["answer"], "type": r["type"]} for r in rows]  # frames: a video bundle's input
        record = {"source": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                  "seed": None}
    else:
        seed = cfg.eval_seed if cfg.eval_seed is not None else int.from_bytes(os.urandom(4), "little") % 10**6
        n = cfg.n_eval if cfg.n_eval is not None else DEFAULT_N_EVAL
        examples = [dict(ex, image_ref=f"proof_task eval seed {seed} index {i}")
                    for i, ex in enumerate(proof_task.make_eval_examples(n, seed))]
        record = {"source": "generated (ib_edge.bench.proof_task.make_eval_examples)", "seed": seed,
                  "regenerate": f"python -m ib_edge.bench.proof_task --out DIR --n {n} --seed {seed}"}
    if not examples:
        raise BenchError("the eval set is empty")
    types: dict[str, int] = {}
    for ex in examples:
        types[ex["type"]] = types.get(ex["type"], 0) + 1
    record.update(n=len(examples), types=types)
    return examples, record


# --- one system --------------------------------------------------------------------------------
def _decode_rate(t: dict) -> float | None:
    """Tokens/s after the first token: (new_tokens - 1) / decode time."""
    n, ms = t.get("new_tokens", 0), t.get("llm_decode", 0)
    return (n - 1) / (ms / 1e3) if n > 1 and ms > 0 else None


def time_runs(system, example: dict, cfg: BenchConfig, tick) -> dict:
    """Latency over ``cfg.runs`` runs, each decoding exactly ``cfg.max_new_tokens`` (EOS
    suppressed, for every system), so decode tokens/s is measured over the same token count
    everywhere. Each run's ``other`` = total minus its stages (prompt splice, detokenising), so
    the stages add up to the total run by run."""
    for _ in range(cfg.warmup):
        system.run(example["image"], example["question"], cfg.max_new_tokens, fixed_length=True)
        tick()
    timer = measure.Timer()
    rates, tokens = [], []
    for _ in range(cfg.runs):
        t = system.run(example["image"], example["question"], cfg.max_new_tokens, fixed_length=True).timings_ms
        for stage in STAGES:
            timer.add(stage, t[stage])
        timer.add("ttft", t["preprocess"] + t["vision"] + t["qformer"] + t["llm_prefill"])
        timer.add("other", t["total"] - sum(t[k] for k in STAGES if k != "total"))
        rates.append(_decode_rate(t))
        tokens.append(t["new_tokens"])
        tick()
    return {"latency_ms": timer.stats(), "decode_tokens_per_s": measure.latency_stats(rates),
            "new_tokens": measure.latency_stats(tokens)}


def evaluate(system, examples: list[dict], cfg: BenchConfig, tick) -> list[dict]:
    preds = []
    for ex in examples:
        a = system.run(ex["image"], ex["question"], cfg.max_new_tokens)
        preds.append({"image": ex["image_ref"], "question": ex["question"], "answer": ex["answer"],
                      "type": ex["type"], "prediction": a.text, "token_ids": a.token_ids,
                      "correct": proof_task.is_correct(a.text, ex["answer"])})
        tick()
    return preds


def accuracy(preds: list[dict], applicable: bool) -> dict:
    if not applicable:
        return {"applicable": False, "reason": "random-weight models (--scale real): answers carry no meaning"}

    def summary(rows):
        c = sum(r["correct"] for r in rows)
        return {"n": len(rows), "correct": c, "accuracy": c / len(rows) if rows else None}
    by_type = {}
    for t in sorted({r["type"] for r in preds}):
        by_type[t] = summary([r for r in preds if r["type"] == t])
    return {"applicable": True, "overall": summary(preds), "by_type": by_type,
            "metric": "exact match after proof_task.normalize_answer (lower-case, no punctuation)"}


def agreement(preds: list[dict], ref_preds: list[dict] | None, ref_name: str | None) -> dict:
    if ref_preds is None:
        return {"measured": False, "reason": "no fp32 reference bundle in this run"}
    n = len(preds)
    same_ids = sum(p["token_ids"] == r["token_ids"] for p, r in zip(preds, ref_preds))
    same_text = sum(proof_task.normalize_answer(p["prediction"]) == proof_task.normalize_answer(r["prediction"])
                    for p, r in zip(preds, ref_preds))
    return {"measured": True, "against": ref_name, "n": n, "token_ids_equal": same_ids / n,
            "answers_equal": same_text / n}


def collect_tensors(system: BundleSystem, examples: list[dict], ref: dict | None, tick) -> dict[str, list]:
    out: dict[str, list] = {}
    for i, ex in enumerate(examples):
        ref_img = ref["image_embeds"][i] if ref is not None else None
        for k, v in system.tensors(ex["image"], ex["question"], ref_img).items():
            out.setdefault(k, []).append(v)
        tick()
    return out


def drift(got: dict[str, list], ref: dict[str, list]) -> dict:
    from ib_edge.quant.drift import compare

    out = {"measured": True}
    pairs = {"image_embeds": ("image_embeds", "image_embeds"),
             "query_embeds_stage": ("query_embeds", "query_embeds_stage"),
             "query_embeds_chain": ("query_embeds", "query_embeds"),
             "next_token_logits": ("next_token_logits", "next_token_logits")}
    for name, (rk, gk) in pairs.items():
        if gk not in got or len(got[gk]) != len(ref[rk]):
            out[name] = {"measured": False, "reason": "shapes differ from the reference"}
            continue
        try:
            out[name] = compare(ref[rk], got[gk]).to_json()
        except ValueError as e:
            out[name] = {"measured": False, "reason": str(e)}
    if out["next_token_logits"].get("samples"):
        top1 = [int(np.argmax(r) == np.argmax(g)) for r, g in zip(ref["next_token_logits"], got["next_token_logits"])]
        out["next_token_logits"]["top1_agreement"] = float(np.mean(top1))
    return out


def _bound(system, bandwidth: dict, rates: dict) -> dict:
    """A system's decode bound against the probes alone; ``apply_bound`` restates it against the
    run's best streaming rate once every system has been measured."""
    w = measure.llm_weight_bytes(system.llm_model)
    rec = measure.decode_bound(w["per_token_bytes"], bandwidth["gb_per_s"], rates.get("p50"))
    rec["llm_dtype"] = w["dtype"]
    rec["note"] = ("bound = best streaming rate of this run (probes and every system's own effective rate) / "
                   "bytes of LLM weights read per token (all weights but the input embedding; KV-cache reads "
                   "ignored); weights that fit in the CPU caches beat it")
    return rec


def apply_bound(bandwidth: dict, records: list[dict]) -> None:
    """Set the run's read-bandwidth bound to the best streaming rate measured in it: the probes
    of ``bandwidth`` and every system's effective rate (weight bytes per token x decode tokens/s
    p50), so no system exceeds 100%; restate each record's ``bandwidth_bound`` against it and
    record in ``bandwidth`` what set it. Records without a measured bound are left alone."""
    probes = {k: v["gb_per_s"] for k, v in (bandwidth.get("probes") or {}).items()} or \
        {bandwidth.get("method", "probe"): bandwidth["gb_per_s"]}
    eff = {}
    for r in records:
        b, rate = r.get("bandwidth_bound") or {}, (r.get("decode_tokens_per_s") or {}).get("p50")
        if b.get("weights_bytes_per_token") and rate:
            eff[r["name"]] = b["weights_bytes_per_token"] * rate / 1e9
    gb, by = measure.streaming_bound(probes, eff)
    bandwidth.update(bound_gb_per_s=round(gb, 3), bound_set_by=by,
                     effective_gb_per_s={k: round(v, 3) for k, v in eff.items()})
    for r in records:
        b = r.get("bandwidth_bound") or {}
        if not b.get("weights_bytes_per_token"):
            continue
        rate = (r.get("decode_tokens_per_s") or {}).get("p50")
        new = measure.decode_bound(b["weights_bytes_per_token"], gb, rate)
        b.update(new, bandwidth_gb_per_s=round(gb, 3), bound_set_by=by)


def _free(obj) -> None:
    del obj
    gc.collect()


def bench_bundle(path: str, cfg: BenchConfig, examples, bandwidth, bar, *, is_reference: bool = False,
                 ref_tensors=None, ref_preds=None, ref_name=None, why_not: str | None = None) -> tuple[dict, dict, list]:
    """Everything measured on one bundle -> (record, boundary tensors, predictions)."""
    bar.set_description(Path(path).name)
    with measure.PeakMemory() as mem:
        system, load_ms = measure.timed(BundleSystem, path, cfg.providers, cfg.threads)
        lat = time_runs(system, examples[0], cfg, bar.update)
        preds = evaluate(system, examples, cfg, bar.update)
        if is_reference or why_not is None:
            tensors = collect_tensors(system, examples, ref_tensors, bar.update)
        else:  # nothing to compare with: skip the drift passes
            tensors = {}
            bar.update(len(examples))
    m = system.manifest
    if is_reference:
        drift_rec = agree = {"measured": False, "is_reference": True, "reason": "this is the reference"}
    elif why_not is not None:
        drift_rec = agree = {"measured": False, "reason": why_not}
    else:
        drift_rec = drift(tensors, ref_tensors)
        agree = agreement(preds, ref_preds, ref_name)
    rec = {
        "name": display_name(path), "kind": "bundle", "path": str(Path(path).resolve()), "is_reference": is_reference,
        "precision": m.data.get("precision"), "source": m.data.get("source"),
        "stages": {n: {"precision": a.get("precision"), "backend": a.get("backend")}
                   for n, a in m.data["artifacts"].items() if n != "processor"},
        "providers": {"vision": getattr(system.pipe.vision, "providers", None),
                      "qformer": getattr(system.pipe.qformer, "providers", None),
                      "llm": getattr(system.pipe.llm, "engine", "transformers")},
        "load_ms": load_ms, **lat,
        "bandwidth_bound": _bound(system, bandwidth, lat["decode_tokens_per_s"]),
        "memory": mem.record(), "sizes": measure.artifact_sizes(m),
        "drift": drift_rec, "agreement": agree,
        "accuracy": accuracy(preds, cfg.accuracy_applicable),
        "predictions": preds,
    }
    _free(system)
    return rec, tensors, preds


def bench_transformers(name: str, checkpoint: str, quantization, cfg: BenchConfig, examples, bandwidth,
                       ref_preds, ref_name, bar) -> dict:
    bar.set_description(name)
    with measure.PeakMemory() as mem:
        try:
            system, load_ms = measure.timed(TransformersSystem, checkpoint, quantization, cfg.threads)
        except NotAvailable as e:
            return {"name": name, "available": False, "reason": f"not available: {e}"}
        except (OSError, ValueError) as e:  # e.g. a hub id that is not in the local cache
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return {"name": name, "available": False, "reason": f"not available: cannot load {checkpoint}: {first}"}
        lat = time_runs(system, examples[0], cfg, bar.update)
        preds = evaluate(system, examples, cfg, bar.update)
    if system.device.type == "cpu":
        bound = _bound(system, bandwidth, lat["decode_tokens_per_s"])
    else:
        bound = {"measured": False, "reason": f"the LLM runs on {system.device}; the bandwidth measured here is the "
                 "CPU's (python bench/gpu_check.py measures the GPU's)"}
    rec = {"name": name, "available": True, "kind": "transformers", "checkpoint": checkpoint,
           "quantization": {None: "none (fp32, eager attention)", "bf16": "none (bf16 weights and compute, eager "
                            "attention)"}.get(quantization, quantization), "device": str(system.device),
           "load_ms": load_ms, **lat, "bandwidth_bound": bound,
           **({"nf4_generic_cpu_layers": system.nf4_generic_layers} if quantization == "nf4" else {}),
           "memory": mem.record(), "agreement": agreement(preds, ref_preds, ref_name),
           "accuracy": accuracy(preds, cfg.accuracy_applicable), "predictions": preds}
    _free(system)
    return rec


def display_name(path: str) -> str:
    """A bundle's name in tables: its folder, with the parent's when the folder is called "bundle"."""
    p = Path(path).resolve()
    return f"{p.parent.name}/{p.name}" if p.name in ("bundle", "out") and p.parent.name else p.name


def _manifest(path: str):
    from ib_edge.runtime.manifest import Manifest

    return Manifest.load(path)


def choose_reference(bundles: list[str]) -> tuple[str | None, str]:
    for b in bundles:
        if _manifest(b).data.get("precision") == "fp32":
            return b, "the first bundle whose manifest precision is fp32"
    return None, "no fp32 bundle given: drift and answer agreement are not measured (add an fp32 bundle with --bundle)"


def resolve_source(cfg: BenchConfig, reference: str | None, bundles: list[str]) -> tuple[str | None, str]:
    """-> (checkpoint path for from_pretrained, or None, and where it came from / why not)."""
    from ib_edge.export.checkpoint import ModelLoadError, resolve

    if _manifest(reference or bundles[0]).frames is not None:
        return None, "a video bundle: the transformers baselines run InstructBLIP image models"
    if cfg.source:
        ref, origin = cfg.source, "--source"
    else:
        m = _manifest(reference or bundles[0]).data
        ref = (m.get("source") or {}).get("model")
        origin = f"manifest source of {Path(reference or bundles[0]).name}"
        if not ref:
            return None, "the bundle's manifest names no source model; pass --source CHECKPOINT"
    try:
        path, kind = resolve(ref)
    except ModelLoadError as e:
        return None, f"cannot resolve the source checkpoint {ref!r} ({origin}): {e.line()}; pass --source CHECKPOINT"
    if kind == "hub" and os.environ.get("HF_HUB_OFFLINE") == "1":
        origin += " (hub id; needs the checkpoint in the local cache)"
    return path, origin


def run_bench(cfg: BenchConfig, log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    from tqdm import tqdm

    from ib_edge.runtime.pipeline import default_bundle_dir

    if cfg.runs < 1 or cfg.warmup < 0 or cfg.max_new_tokens < 1:
        raise BenchError("--runs and --max-new-tokens must be >= 1, --warmup >= 0")
    bundles = [str(b) for b in cfg.bundles] or [str(default_bundle_dir())]
    for b in bundles:
        _manifest(b)  # a missing or broken bundle fails before anything is measured
    examples, eval_rec = load_examples(cfg)
    log(f"ib-bench: eval set: {eval_rec['n']} examples, "
        + (f"generated with seed {eval_rec['seed']}" if eval_rec["seed"] is not None else eval_rec["source"]))
    reference, ref_reason = choose_reference(bundles)
    log(f"ib-bench: drift reference: {reference or 'none'} ({ref_reason})")
    _import_backends(cfg)  # so the first system's load time and memory do not include library imports
    hw = measure.hardware()
    log("ib-bench: measuring memory bandwidth")
    bandwidth = measure.memory_bandwidth(cfg.bandwidth_mb)
    log(f"ib-bench: {bandwidth['gb_per_s']:.1f} GB/s (best probe: {bandwidth['set_by']})")

    checkpoint, src_origin = (resolve_source(cfg, reference, bundles) if cfg.baselines else (None, "--no-baselines"))
    n_ex = len(examples)
    per_bundle = cfg.warmup + cfg.runs + 2 * n_ex
    total = len(bundles) * per_bundle + (cfg.warmup + cfg.runs + n_ex if checkpoint else 0)
    order = ([reference] if reference else []) + [b for b in bundles if b != reference]
    results: dict[str, dict] = {}
    ref_tensors = ref_preds = None
    ref_name = display_name(reference) if reference else None
    with tqdm(total=total, disable=None if cfg.progress is None else not cfg.progress,
              file=sys.stderr, unit="run", dynamic_ncols=True) as bar:
        for b in order:
            if b == reference:
                rec, ref_tensors, ref_preds = bench_bundle(b, cfg, examples, bandwidth, bar, is_reference=True)
            else:
                why_not = ref_reason if reference is None else _not_comparable(reference, b)
                rec, _, _ = bench_bundle(b, cfg, examples, bandwidth, bar, ref_tensors=ref_tensors,
                                         ref_preds=ref_preds, ref_name=ref_name, why_not=why_not)
            results[b] = rec
        baselines = {}
        if not cfg.baselines:
            for key in ("transformers_fp32_eager", "transformers_bf16_eager", "transformers_bnb_nf4"):
                baselines[key] = {"available": False, "reason": "skipped (--no-baselines)"}
        else:
            if checkpoint is None:
                baselines["transformers_fp32_eager"] = {"available": False, "reason": f"not available: {src_origin}"}
            else:
                baselines["transformers_fp32_eager"] = bench_transformers(
                    "transformers fp32 eager", checkpoint, None, cfg, examples, bandwidth, ref_preds, ref_name, bar)
                baselines["transformers_fp32_eager"]["source_from"] = src_origin
            reason = bf16_unavailable_reason() or (None if checkpoint else src_origin)
            if reason:
                baselines["transformers_bf16_eager"] = {"available": False, "reason": f"not available: {reason}"}
            else:
                bar.total += cfg.warmup + cfg.runs + n_ex
                baselines["transformers_bf16_eager"] = bench_transformers(
                    "transformers bf16 eager", checkpoint, "bf16", cfg, examples, bandwidth, ref_preds, ref_name, bar)
                baselines["transformers_bf16_eager"]["source_from"] = src_origin
            reason = nf4_unavailable_reason() or (None if checkpoint else src_origin)
            if reason:
                baselines["transformers_bnb_nf4"] = {"available": False, "reason": f"not available: {reason}"}
            else:
                bar.total += cfg.warmup + cfg.runs + n_ex
                baselines["transformers_bnb_nf4"] = bench_transformers(
                    "transformers bnb nf4", checkpoint, "nf4", cfg, examples, bandwidth, ref_preds, ref_name, bar)
                baselines["transformers_bnb_nf4"]["source_from"] = src_origin
    apply_bound(bandwidth, [results[b] for b in bundles] + [v for v in baselines.values() if v.get("available")])
    log(f"ib-bench: decode bound {bandwidth['bound_gb_per_s']:.1f} GB/s, set by {bandwidth['bound_set_by']}")
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "bundles",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "hardware": hw,
        "bandwidth": bandwidth,
        "eval": eval_rec,
        "latency_input": {"image": examples[0]["image_ref"], "question": examples[0]["question"],
                          "warmup": cfg.warmup, "runs": cfg.runs, "max_new_tokens": cfg.max_new_tokens},
        "reference": {"bundle": reference, "name": ref_name, "why": ref_reason},
        "bundles": [results[b] for b in bundles],
        "baselines": baselines,
    }


def _import_backends(cfg: BenchConfig) -> None:
    import onnxruntime  # noqa: F401
    import torch
    import transformers  # noqa: F401

    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def _not_comparable(reference: str, other: str) -> str | None:
    """Drift between bundles of different checkpoints or preprocessing means nothing."""
    r, o = _manifest(reference).data, _manifest(other).data
    if (r.get("source") or {}).get("config_sha256") != (o.get("source") or {}).get("config_sha256"):
        return "exported from another checkpoint than the reference (config_sha256 differs)"
    if r.get("preprocess") != o.get("preprocess"):
        return "preprocessing differs from the reference's"
    return None
