"""The InstructBLIP adapter for quantization: which stages, what their calibration feeds are,
and how the chain is checked. The algorithms themselves live in ib_edge.quant (model-agnostic).

Vision is calibrated on pixel_values of the calibration images; the Q-Former on the fp32
vision graph's image_embeds of those images paired with the calibration instructions (it is
instruction-aware, so its activations depend on the text too). Drift is measured on the
held-out split of the calibration set, never on images calibrated on, per stage and for the
chain (quantized vision -> quantized Q-Former) against the fp32 graphs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from ib_edge.quant import budgets, fp16, int8
from ib_edge.quant.calibration import CalibrationError, CalibrationSet
from ib_edge.quant.drift import compare
from ib_edge.runtime.cpuinfo import cpu_string
from ib_edge.runtime.manifest import sha256_file
from ib_edge.runtime.preprocess import PromptEncoder, load_image, pixel_values

STAGE_OUTPUT = {"vision": "image_embeds", "qformer": "query_embeds"}
INSTRUCTIONS_PER_IMAGE = 2
MIN_IMAGES = 4


def _vision_feeds(images: list[Path], cfg: dict) -> list[dict[str, np.ndarray]]:
    return [{"pixel_values": pixel_values([load_image(p)], cfg)} for p in images]


def _qformer_feeds(embeds: list[np.ndarray], instructions, prompts: PromptEncoder, offset: int = 0):
    feeds = []
    for i, e in enumerate(embeds):
        for j in range(INSTRUCTIONS_PER_IMAGE):
            enc = prompts.encode(instructions[(offset + i * INSTRUCTIONS_PER_IMAGE + j) % len(instructions)])
            feeds.append({"image_embeds": e, "qformer_input_ids": enc["qformer_input_ids"],
                          "qformer_attention_mask": enc["qformer_attention_mask"]})
    return feeds


INT8_STAGES = ("all", "faster")   # as applied (ExportOptions.stage_choice resolves "auto")
SPEED_RUNS = 5


def time_graph(path: Path, feed: dict[str, np.ndarray], runs: int = SPEED_RUNS) -> float:
    """Median ms of one ``feed`` through ``path`` on ONNX Runtime CPU, configured as the runtime
    runs it (CSE off for Q/DQ graphs), after two warm-up runs."""
    import time

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = int8._session(str(path), opts)
    f = {i.name: feed[i.name] for i in sess.get_inputs()}
    for _ in range(2):
        sess.run(None, f)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, f)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _chain_drift(fp32: dict[str, Path], vision: Path, qformer: Path, feeds, calib, prompts):
    """query_embeds of ``vision`` feeding ``qformer`` against the fp32 chain, held-out split."""
    q_held = _qformer_feeds(int8.run_graph(vision, feeds["vision"][1], "image_embeds"),
                            calib.instructions, prompts, offset=7)
    return compare(int8.run_graph(fp32["qformer"], feeds["qformer"][1], "query_embeds"),
                   int8.run_graph(qformer, q_held, "query_embeds"))


def _search_vision_for_chain(fp32, out_dir: Path, feeds, calib, prompts, records, used, log) -> None:
    """Both stages can be within their own budgets while the chain is not (vision's error is
    amplified by the Q-Former; measured on proof-llama, AVX2 CPU: vision 0.99734 / Q-Former
    0.99956, chain worst 0.97846 < 0.98). Then the vision search runs again with the chain's
    budget as its acceptance test (the Q-Former graph fixed), excluding its most sensitive nodes
    1, 2, 4, ... as usual."""
    chain = _chain_drift(fp32, out_dir / "vision.onnx", out_dir / "qformer.onnx", feeds, calib, prompts)
    if not budgets.violations("query_embeds", "int8", chain):
        return
    log(f"      chain query_embeds int8: {chain.line()}: over budget; searching vision against the chain")
    out = out_dir / "vision.onnx"
    cal, held = feeds["vision"]

    def chain_ok(d) -> bool:
        if budgets.violations("image_embeds", "int8", d):
            return False
        return not budgets.violations("query_embeds", "int8",
                                      _chain_drift(fp32, out, out_dir / "qformer.onnx", feeds, calib, prompts))

    try:
        recipe, drift, steps = int8.search(fp32["vision"], out, "image_embeds", cal, held, chain_ok,
                                           base=used["vision"], name="vision (chain)", log=log)
    except RuntimeError as e:
        raise budgets.DriftBudgetError(f"chain query_embeds: {e}", hint="calibrate on your own images (--calib "
                                       "DIR) or use --precision fp16") from None
    if recipe.exclude:
        log(f"      vision: kept in higher precision for the chain: {', '.join(recipe.exclude)}")
    used["vision"] = recipe
    q = records["vision"]["quantization"]
    records["vision"]["drift"] = drift.to_json()
    q["excluded_nodes"] = list(recipe.exclude)
    q["search"] = q["search"] + [dict(s.to_json(), criterion="chain") for s in steps]


def input_nodes(fp32_path: Path, candidates) -> list[str]:
    """The candidate nodes that read one of the graph's inputs directly. In the Q-Former these
    are the cross-attention key/value projections over the 257 image tokens: its only matmuls
    with many rows (the rest see 32 queries + the instruction)."""
    import onnx

    model = onnx.load(str(fp32_path), load_external_data=False)
    inputs, cand = {i.name for i in model.graph.input}, set(candidates)
    return [n.name for n in model.graph.node if n.name in cand and inputs & set(n.input)]


def _replace_graph(src: Path, out_path: Path) -> None:
    """Replace the graph at ``out_path`` by ``src`` (and its external data)."""
    import shutil

    from .onnx_export import graph_files

    for f in list(out_path.parent.glob(out_path.name + "*")):
        f.unlink()
    for f in graph_files(src):
        shutil.copy(f, out_path.parent / (out_path.name + f.name[len(src.name):]))


def _partial_int8(stage: str, fp32: dict[str, Path], out_dir: Path, feeds, recipe: int8.Int8Recipe, log):
    """INT8 on the input-reading matmuls only (``input_nodes``), the rest fp32: (path, recipe,
    drift, number of int8 matmuls), or None when that is the whole recipe, nothing, or over the
    stage's drift budget."""
    tensor = STAGE_OUTPUT[stage]
    cands = [n for n in int8.candidate_nodes(fp32[stage], recipe.op_types) if n not in recipe.exclude]
    wide = input_nodes(fp32[stage], cands)
    if not wide or len(wide) == len(cands):
        return None
    part = dataclasses.replace(recipe, exclude=tuple(sorted(set(recipe.exclude) | (set(cands) - set(wide)))))
    path = out_dir / ".partial" / f"{stage}.onnx"
    path.parent.mkdir(exist_ok=True)
    cal, held = feeds[stage]
    int8.apply(fp32[stage], path, part, cal)
    drift = compare(int8.run_graph(fp32[stage], held, tensor), int8.run_graph(path, held, tensor))
    log(f"      {stage} int8 on the {len(wide)} matmuls reading its inputs only: {drift.line()}")
    if budgets.violations(tensor, "int8", drift):
        return None
    return path, part, drift, len(wide)


def _ship_fastest(stage: str, fp32: dict[str, Path], out_dir: Path, feeds, records: dict, used: dict, log) -> None:
    """``--int8-stages faster``: time the stage's INT8 and fp32 graphs on this machine's ONNX
    Runtime CPU and ship the faster. Where INT8 is not faster, INT8 on the input-reading matmuls
    alone is tried before fp32 (Flan-T5-XL's Q-Former, 2 AMD Zen-4 cores: all-int8 225.9 ms,
    fp32 100.0; int8 on its 12 image-embedding key/value projections 1.44x faster than fp32 in
    one run). The record keeps every timing, the CPU and the choice."""
    import shutil

    out = out_dir / f"{stage}.onnx"
    feed = feeds[stage][1][0]
    t_fp32, t_int8 = time_graph(fp32[stage], feed), time_graph(out, feed)
    check = {"fp32_ms": round(t_fp32, 2), "int8_ms": round(t_int8, 2), "runs": SPEED_RUNS,
             "where": "this machine, ONNX Runtime CPU", "cpu": cpu_string(), "onnxruntime": _ort_version()}
    records[stage]["speed_check"] = check
    if t_int8 < t_fp32:
        check["shipped"] = "int8"
        log(f"      {stage} speed: int8 {t_int8:.1f} ms vs fp32 {t_fp32:.1f} ms -> ships int8")
        return
    part = _partial_int8(stage, fp32, out_dir, feeds, used[stage], log)
    try:
        if part is not None:
            path, recipe, drift, n = part
            t_part = time_graph(path, feed)
            check["partial_int8_ms"], check["partial_int8_nodes"] = round(t_part, 2), n
            if t_part < t_fp32:
                log(f"      {stage} speed: int8 {t_int8:.1f} ms, fp32 {t_fp32:.1f} ms, int8 on its {n} input "
                    f"matmuls {t_part:.1f} ms -> ships the partial int8")
                _replace_graph(path, out)
                check["shipped"] = "partial int8"
                used[stage] = recipe
                q = records[stage]["quantization"]
                records[stage]["drift"] = drift.to_json()
                records[stage]["quantization"] = {
                    **q, "scheme": q["scheme"] + f"; only the {n} matmuls reading the stage's inputs (the rest fp32: "
                    "--int8-stages faster, all-int8 not faster on this machine)", "excluded_nodes": list(recipe.exclude)}
                return
    finally:
        shutil.rmtree(out_dir / ".partial", ignore_errors=True)
    check["shipped"] = "fp32"
    log(f"      {stage} speed: int8 {t_int8:.1f} ms vs fp32 {t_fp32:.1f} ms"
        + (f" (int8 on its input matmuls {check['partial_int8_ms']:.1f})" if "partial_int8_ms" in check else "")
        + " -> ships fp32 (int8 is not faster here)")
    _replace_graph(fp32[stage], out)
    records[stage]["precision"] = "fp32"
    ref = int8.run_graph(fp32[stage], feeds[stage][1], STAGE_OUTPUT[stage])
    records[stage]["drift"] = compare(ref, ref).to_json()  # the shipped graph is the fp32 one
    records[stage]["quantization"] = {"scheme": "kept fp32 (--int8-stages faster/auto: int8 not faster "
                                      "on this machine)", "int8_recipe_searched": records[stage]["quantization"]}


def quantize_stages(precision: str, fp32: dict[str, Path], out_dir: Path, *, preprocess: dict,
                    prompts: PromptEncoder, calib: CalibrationSet, method: str = "minmax",
                    recipes: dict[str, int8.Int8Recipe] | None = None, int8_stages: str = "all",
                    log: Callable[[str], None] = print) -> dict:
    """Write ``out_dir/{stage}.onnx`` at ``precision`` for vision and qformer, check every
    drift budget, and return {"stages": {stage: record}, "chain": stats, "recipes": {...}}.

    ``int8_stages="faster"``: after quantizing, time each stage's INT8 and fp32 graphs on this
    machine's ONNX Runtime CPU and ship fp32 where INT8 is not faster (measured at real shape:
    the INT8 Q-Former runs 2x slower than fp32, its matmuls see 32 queries + the instruction;
    the INT8 ViT-g 2.7x faster). The stage record keeps both timings and the reason."""
    if int8_stages not in INT8_STAGES:
        raise CalibrationError(f"int8_stages {int8_stages!r} is not one of {', '.join(INT8_STAGES)}")
    if len(calib.images) < MIN_IMAGES:
        raise CalibrationError(f"calibration set has {len(calib.images)} images; need at least {MIN_IMAGES} "
                               "(a quarter is held out to measure drift)")
    cal_imgs, held_imgs = calib.split()
    log(f"      calibration: {len(cal_imgs)} images + {len(calib.instructions)} instructions, "
        f"{len(held_imgs)} images held out (set {calib.sha256[:12]})")
    feeds = {"vision": (_vision_feeds(cal_imgs, preprocess), _vision_feeds(held_imgs, preprocess))}
    cal_emb = int8.run_graph(fp32["vision"], feeds["vision"][0], "image_embeds")
    held_emb = int8.run_graph(fp32["vision"], feeds["vision"][1], "image_embeds")
    feeds["qformer"] = (_qformer_feeds(cal_emb, calib.instructions, prompts),
                        _qformer_feeds(held_emb, calib.instructions, prompts, offset=7))
    records, used = {}, {}
    for stage in ("vision", "qformer"):
        out = out_dir / f"{stage}.onnx"
        tensor = STAGE_OUTPUT[stage]
        cal, held = feeds[stage]
        if precision == "fp16":
            fp16.convert(fp32[stage], out)
            drift = compare(int8.run_graph(fp32[stage], held, tensor), int8.run_graph(out, held, tensor))
            log(f"      {stage} fp16: {drift.line()}")
            budgets.check(tensor, precision, drift)
            records[stage] = {"drift": drift.to_json(), "quantization": {"scheme": "fp16 weights and activations, "
                              "fp32 inputs/outputs", "kept_fp32_ops": list(fp16.KEEP_FP32_OPS)}}
            continue
        graph_sha = sha256_file(fp32[stage])
        if recipes and stage in recipes:
            recipe = recipes[stage]
            if recipe.graph_sha256 not in (None, graph_sha):
                raise CalibrationError(f"the {stage} recipe was searched on another graph "
                                       f"({recipe.graph_sha256[:12]} vs {graph_sha[:12]})",
                                       hint="re-export without --recipe to search again")
            if recipe.calibration_sha256 not in (None, calib.sha256):
                raise CalibrationError(f"the {stage} recipe was calibrated on another set",
                                       hint="pass the same --calib as the recipe's export, or drop --recipe")
            int8.apply(fp32[stage], out, recipe, cal)
            drift = compare(int8.run_graph(fp32[stage], held, tensor), int8.run_graph(out, held, tensor))
            steps = []
            log(f"      {stage} int8 (recipe, {len(recipe.exclude)} excluded): {drift.line()}")
        else:
            base = int8.Int8Recipe(method=method, calibration_sha256=calib.sha256, graph_sha256=graph_sha)
            try:
                recipe, drift, steps = int8.search(
                    fp32[stage], out, tensor, cal, held,
                    lambda d: not budgets.violations(tensor, precision, d), base=base, name=stage, log=log)
            except RuntimeError as e:
                raise budgets.DriftBudgetError(f"{stage}: {e}", hint="calibrate on your own images (--calib DIR) "
                                               "or use --precision fp16") from None
        budgets.check(tensor, precision, drift)
        if recipe.exclude:
            log(f"      {stage}: kept in higher precision: {', '.join(recipe.exclude)}")
        used[stage] = recipe
        records[stage] = {"drift": drift.to_json(), "quantization": {
            "scheme": "QDQ int8, symmetric; activations per-tensor, weights per-channel"
                      + (" in 7 bits (reduce_range)" if recipe.reduce_range else ""),
            "op_types": list(recipe.op_types), "excluded_nodes": list(recipe.exclude),
            "method": recipe.method, "search": [s.to_json() for s in steps]}}
    if precision == "int8" and not (recipes and "vision" in recipes):
        _search_vision_for_chain(fp32, out_dir, feeds, calib, prompts, records, used, log)
    if precision == "int8" and int8_stages == "faster":
        for stage in ("vision", "qformer"):
            _ship_fastest(stage, fp32, out_dir, feeds, records, used, log)
    # The chain the LLM sees: quantized vision feeding the quantized Q-Former.
    chain = _chain_drift(fp32, out_dir / "vision.onnx", out_dir / "qformer.onnx", feeds, calib, prompts)
    log(f"      chain query_embeds {precision}: {chain.line()}")
    budgets.check("query_embeds", precision, chain)
    return {"stages": records, "chain": chain.to_json(), "recipes": used}
