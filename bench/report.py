"""Write a benchmark result: report.json (everything), report.md (tables read top to bottom,
each number explained in one line) and two PNG plots (matplotlib, Agg backend).

    write_report(result, out_dir) -> {"md": path, "json": path, "plots": [paths]}
"""
from __future__ import annotations

import json
import math
from pathlib import Path

LATENCY_COLUMNS = ("preprocess", "vision", "qformer", "llm_prefill", "ttft", "llm_decode", "other", "total")
STACK = ("preprocess", "vision", "qformer", "llm_prefill", "llm_decode")
PLOTS = ("latency_stages.png", "accuracy_vs_latency.png")


def systems(result: dict) -> list[dict]:
    """Bundles, then the baselines that ran, each with a display name."""
    out = list(result["bundles"])
    out += [b for b in result["baselines"].values() if b.get("available")]
    return out


def _f(v, fmt="{:.2f}", none="–") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return fmt.format(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def _pct(v) -> str:
    return _f(None if v is None else 100 * v, "{:.1f}%")


FLOAT_NAMES = ("fp32", "float32", "fp16", "float16", "bf16", "bfloat16")


def precision_label(s: dict) -> str:
    """A bundle's precision as tables and plots show it: the manifest's (vision + Q-Former)
    precision, and the LLM's where it differs and is not a float format, e.g. "int8 + int4 LLM"."""
    prec = s.get("precision")
    llm = (s.get("stages") or {}).get("llm") or {}
    lp = llm.get("precision")
    if lp and lp != prec and lp not in FLOAT_NAMES:
        return f"{prec} + {lp} LLM"
    return str(prec)


def _label(s: dict) -> str:
    if s.get("kind") == "bundle":
        ref = " (reference)" if s.get("is_reference") else ""
        return f"{s['name']} [{precision_label(s)}]{ref}"
    return s["name"]


def _bandwidth_cell(bw: dict) -> str:
    probes = bw.get("probes") or {}
    if probes:
        parts = ", ".join(f"{k} {v['gb_per_s']:.1f}" for k, v in probes.items())
        cell = f"probes (GB/s, {bw['array_mb']} MB, {bw.get('threads', '?')} threads): {parts}"
    else:
        cell = f"{bw['gb_per_s']:.1f} GB/s read ({bw['method']}, {bw['array_mb']} MB)"
    if bw.get("bound_gb_per_s") is not None:
        cell += f"; decode bound {bw['bound_gb_per_s']:.1f} GB/s, set by {bw['bound_set_by']}"
    return cell


def render_markdown(result: dict) -> str:
    hw, bw, ev, li = result["hardware"], result["bandwidth"], result["eval"], result["latency_input"]
    syss = systems(result)
    L: list[str] = []
    title = "ib-bench report" + (" — real-shape random-weight models (--scale real)" if result["mode"] == "scale-real" else "")
    L += [f"# {title}", "", f"Created {result['created']}. Command: `{result.get('command', 'run_bench(...)')}`", ""]
    if result["mode"] == "scale-real":
        sc = result["scale"]
        L += ["## Shapes", "", sc["description"], ""]
        L += _table(["part", "shape"], [[k, v] for k, v in sc["shapes"].items()])
        L += ["Accuracy is not applicable: the weights are random. Latency, memory, sizes and drift are.", ""]
        if sc.get("notes"):
            L += ["Exports:", ""] + [f"- {n}" for n in sc["notes"]] + [""]

    L += ["## Machine", ""]
    gpu = hw["gpu"]
    sw = hw["software"]
    L += _table(["what", "value"], [
        ["CPU", f"{hw['cpu_model']} ({hw['cpus_usable']} usable of {hw['cpu_count']} logical cores; torch threads {hw['torch_threads']})"],
        ["memory", _f(hw["memory_total_mb"], "{:.0f} MB")],
        ["load average at start", ", ".join(map(str, hw.get("load_average") or [])) or "–"],
        ["GPU", gpu.get("name", "none") + ("" if gpu.get("available") else f" (not used: {gpu.get('reason')})")],
        ["software", ", ".join(f"{k} {v}" for k, v in sw.items() if v)],
        ["ONNX Runtime providers", ", ".join(hw["onnxruntime_providers"])],
        ["memory bandwidth", _bandwidth_cell(bw)],
    ])
    L += ["The decode bound is the best streaming rate measured in this run: the probes above and every "
          "system's own effective rate (LLM weight bytes per token x decode tokens/s), so no system exceeds "
          "100%; the row says which set it. Decode of a large LLM cannot beat bound / bytes of weights per "
          "token (see Decode).", ""]
    bg = result.get("background_load")
    if bg:
        L += [f"**Loaded machine, on purpose: {bg['processes']} CPU-bound background process(es) "
              f"(--background-load) ran for the whole run** (load average {', '.join(map(str, bg['load_average_start']))} "
              f"at start, {', '.join(map(str, bg['load_average_end']))} at the end). The figures show how each "
              "system shares the cores with other work, not its speed on an idle machine.", ""]
    load = (hw.get("load_average") or [0])[0]
    if load > 0.5 * (hw.get("cpus_usable") or 1) and not bg:
        L += [f"**Warning: the machine was busy at the start (load {load:.1f} on {hw['cpus_usable']} cores).** "
              "Other processes compete for the cores and inflate every timing, torch's threads most of all; "
              "compare systems within this run only, and rerun on an idle machine (or with --threads 1) for "
              "absolute numbers.", ""]

    L += ["## What was run", ""]
    ref = result["reference"]
    L += [f"- Systems: {', '.join(_label(s) for s in syss)}.",
          f"- Drift reference: {ref['name'] or 'none'} — {ref['why']}.",
          f"- Eval set: {ev['n']} examples ({', '.join(f'{k} {v}' for k, v in ev['types'].items())}); "
          + (f"generated, seed {ev['seed']} (`{ev.get('regenerate')}`)." if ev.get("seed") is not None
             else f"{ev['source']} (sha256 {ev['sha256'][:12]})."),
          f"- Latency: {li['runs']} timed runs after {li['warmup']} warm-up runs on one input "
          f"({li['question']!r}, {li['image']}), greedy, exactly {li['max_new_tokens']} new tokens (EOS suppressed); "
          f"the accuracy pass stops at EOS as usual.", ""]

    L += ["## Latency per stage (ms, p50)", ""]
    rows = []
    for s in syss:
        lat = s["latency_ms"]
        rows.append([_label(s)] + [_f(lat.get(c, {}).get("p50")) for c in LATENCY_COLUMNS])
    L += _table(["system", *LATENCY_COLUMNS], rows)
    L += ["- p50 is the median of the timed runs; warm-up runs are excluded.",
          "- ttft = preprocess + vision + qformer + llm_prefill: image and prompt in, first token out.",
          "- llm_prefill is the LLM's own time to the first token; llm_decode is every later token.",
          "- total is end to end (model loading excluded); other = total − the stages in the same run (prompt "
          "splice, detokenising), so each run's stages add up to its total (medians of parts need not add up exactly).",
          "- every timed run decodes exactly the maximum new tokens (EOS suppressed, ours and the baselines alike).", ""]
    L += ["## Latency spread (ms, p90 / p99)", ""]
    rows = [[_label(s)] + [f"{_f(s['latency_ms'].get(c, {}).get('p90'))} / {_f(s['latency_ms'].get(c, {}).get('p99'))}"
                           for c in ("vision", "qformer", "ttft", "total")] for s in syss]
    L += _table(["system", "vision", "qformer", "ttft", "total"], rows)
    L += ["- p90/p99 interpolate between runs: with few runs p99 is close to the slowest run.", ""]

    L += ["## Decode", ""]
    rows = []
    for s in syss:
        b, r = s["bandwidth_bound"], s["decode_tokens_per_s"]
        wb = b.get("weights_bytes_per_token")
        rows.append([_label(s), s.get("providers", {}).get("llm") or "transformers",
                     _f(r.get("p50")), _f(r.get("p90")), _f(s["new_tokens"].get("p50"), "{:.0f}"),
                     _f(None if wb is None else wb / 2**20, "{:.1f}"), _f(b.get("bound_tokens_per_s")),
                     _f(b.get("percent_of_bound"), "{:.2f}%") if "reason" not in b else b["reason"]])
    L += _table(["system", "LLM engine", "tokens/s p50", "tokens/s p90", "new tokens", "LLM MB read/token",
                 "bound tokens/s", "% of bound"], rows)
    L += ["- LLM engine: ort / torch for the fast 4-bit path (ib-run --llm-engine), transformers otherwise.",
          "- tokens/s = (new tokens − 1) / llm_decode time; the first token belongs to prefill.",
          "- bound = the run's best streaming rate (see Machine: probes and every system's effective rate) / "
          "LLM weight bytes per token (all weights but the input embedding).",
          "- % of bound near 100 means decode is limited by memory; a tiny LLM that fits in cache is "
          "limited by per-token overhead instead, and the percentage says little.", ""]

    L += ["## Memory and size", ""]
    rows = []
    for s in syss:
        m, sz = s["memory"], s.get("sizes", {})
        g = m.get("gpu", {})
        rows.append([_label(s), _f(m["peak_rss_mb"], "{:.0f}"), _f(m["peak_added_mb"], "{:.0f}"),
                     _f(g.get("peak_allocated_mb"), "{:.0f}") if g.get("measured") else "–",
                     *(_f(sz.get(k, {}).get("mb"), "{:.2f}") for k in ("vision", "qformer", "llm", "total")),
                     _f(s.get("load_ms"), "{:.0f}")])
    L += _table(["system", "peak RSS MB", "added MB", "GPU peak MB", "vision MB", "qformer MB", "llm MB",
                 "bundle MB", "load ms"], rows)
    L += ["- peak RSS: the process's resident-set peak while this system loaded and ran (VmHWM, reset before each).",
          "- added: that peak minus the RSS just before loading: roughly what this system costs on its own.",
          "- sizes are the bytes on disk of each manifest artifact (baselines have none).",
          "- load ms: opening the system (sessions, LLM weights); the first one also pays one-time lazy imports.", ""]
    if any(s["memory"].get("peak_is_process_wide") for s in syss):
        L += ["Note: this kernel refused the VmHWM reset, so peaks are process-wide (cumulative).", ""]

    L += ["## Drift against the fp32 reference (same inputs)", ""]
    rows = []
    for s in result["bundles"]:
        d = s["drift"]
        if d.get("is_reference"):
            continue
        if not d.get("measured"):
            rows.append([_label(s), f"not measured: {d.get('reason')}", "", "", ""])
            continue
        cells = []
        for k in ("image_embeds", "query_embeds_stage", "query_embeds_chain", "next_token_logits"):
            x = d.get(k, {})
            cells.append("–" if "cosine_mean" not in x else
                         f"cos {x['cosine_mean']:.5f} (min {x['cosine_min']:.5f}), SQNR {_f(x['sqnr_db'], '{:.1f}')} dB, "
                         f"max-abs {x['max_abs']:.3g}")
        rows.append([_label(s), *cells])
    if rows:
        L += _table(["bundle", "image_embeds (vision)", "query_embeds (Q-Former alone)", "query_embeds (chain)",
                     "next-token logits"], rows)
    else:
        L += ["No bundle besides the reference: nothing to compare.", ""]
    L += ["- cosine per example (mean and worst), SQNR = 10·log10(|ref|² / |ref − got|²) over all examples, max-abs the largest error.",
          "- Expect fp16 cosine ≥ 0.9999 and SQNR 40–60 dB; good int8 cosine ≥ 0.995 and SQNR 20–35 dB; below 15 dB is broken.",
          "- Q-Former alone is fed the reference's image_embeds; the chain is what the LLM sees.", ""]

    L += ["## Agreement with the fp32 reference (greedy)", ""]
    rows = []
    for s in syss:
        a = s["agreement"]
        top1 = s.get("drift", {}).get("next_token_logits", {}).get("top1_agreement")
        if a.get("is_reference"):
            rows.append([_label(s), "reference", "reference", "reference"])
        elif not a.get("measured"):
            rows.append([_label(s), f"not measured: {a.get('reason')}", "", ""])
        else:
            rows.append([_label(s), _pct(a["answers_equal"]), _pct(a["token_ids_equal"]), _pct(top1)])
    L += _table(["system", "answers equal", "token ids equal", "next-token top-1 equal"], rows)
    L += ["- answers equal: normalised greedy answers identical to the reference bundle's on every eval example.",
          "- token ids equal: the generated token sequences identical; top-1: the first token's argmax identical.", ""]

    L += ["## Task accuracy (exact match, normalised)", ""]
    types = list(result["eval"]["types"])
    rows = []
    for s in syss:
        acc = s["accuracy"]
        if not acc.get("applicable"):
            rows.append([_label(s), f"not applicable: {acc.get('reason')}"] + [""] * len(types))
            continue
        rows.append([_label(s), f"{_pct(acc['overall']['accuracy'])} ({acc['overall']['correct']}/{acc['overall']['n']})"]
                    + [_pct(acc["by_type"].get(t, {}).get("accuracy")) for t in types])
    L += _table(["system", "overall", *types], rows)
    L += ["- an answer counts when it equals the expected one after lower-casing, removing punctuation and "
          "collapsing whitespace (proof_task.normalize_answer).", ""]

    L += ["## Baselines", ""]
    for key, b in result["baselines"].items():
        if b.get("available"):
            origin = f" ({b['source_from']})" if b.get("source_from") else ""
            extra = ""
            if b.get("nf4_generic_cpu_layers"):
                extra = (f" {b['nf4_generic_cpu_layers']} linear layer(s) ran on bitsandbytes' generic CPU path "
                         "(shapes its packed avx512-bf16 kernel cannot take).")
            L.append(f"- {key}: ran on {b['device']} from {b['checkpoint']}{origin}; "
                     f"quantization: {b['quantization']}.{extra}")
        else:
            L.append(f"- {key}: {b['reason']}")
    L += ["", "## Plots", "", "![per-stage latency](latency_stages.png)", "",
          "![accuracy vs latency](accuracy_vs_latency.png)", ""]
    return "\n".join(L)


def plot(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    syss = systems(result)
    labels = [_label(s) for s in syss]
    paths = []

    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(syss)))
    left = [0.0] * len(syss)
    for stage in STACK:
        vals = [s["latency_ms"].get(stage, {}).get("p50") or 0.0 for s in syss]
        ax.barh(labels, vals, left=left, label=stage)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("p50 latency per stage (ms)")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Where the time goes, per system")
    fig.tight_layout()
    paths.append(out_dir / PLOTS[0])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    applicable = False
    markers = "os^Dv<>p*h"
    for i, (s, lab) in enumerate(zip(syss, labels)):
        x = s["latency_ms"]["total"]["p50"]
        acc = s["accuracy"]
        if acc.get("applicable") and acc["overall"]["accuracy"] is not None:
            applicable = True
            ax.scatter([x], [100 * acc["overall"]["accuracy"]], s=50, marker=markers[i % len(markers)], label=lab)
    if applicable:
        ax.set_ylim(-3, 103)
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "accuracy not applicable (random weights)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("end-to-end latency p50 (ms)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title("Accuracy vs latency (one point per system)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / PLOTS[1])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _json_default(v):
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def _finite(v):
    """Strict JSON: infinite SQNR (identical outputs) becomes "inf", NaN becomes null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def to_json(result: dict) -> str:
    return json.dumps(_finite(result), indent=1, default=_json_default, allow_nan=False) + "\n"


def write_json(result: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(result), encoding="utf-8")
    return path


def write_report(result: dict, out_dir) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(result, out / "report.json")}
    paths["plots"] = plot(result, out)
    paths["md"] = out / "report.md"
    paths["md"].write_text(render_markdown(result), encoding="utf-8")
    return paths
