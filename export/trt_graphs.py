"""The graphs a TensorRT bundle builds its engines from, produced and validated before building.

fp32 and fp16 engines build from the bundle's own graphs (strongly typed: the graph carries the
precision). INT8 engines build from an INT8-over-FP16 graph made from the searched fp32 Q/DQ
graph (``ib_edge.quant.trt_int8.convert``), written beside it as ``{stage}.trt-int8.onnx``;
the fp32 Q/DQ graph stays in the bundle (ONNX Runtime CPU runs it fastest).

``int8_fp16_graphs`` validates the new graphs exactly as ``quantize_stages`` validates the CPU
ones: on ONNX Runtime CPU, against the fp32 graphs, on the held-out split of the calibration set,
per stage and for the chain (INT8+FP16 vision feeding the INT8+FP16 Q-Former), with the int8
drift budgets of ``quant/budgets.py``; a miss raises DriftBudgetError and the export stops.
This needs no TensorRT, so it is tested here; ``build_engines`` calls it before building.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from ib_edge.quant import budgets, int8, trt_int8
from ib_edge.quant.calibration import CalibrationSet
from ib_edge.quant.drift import compare
from ib_edge.runtime.preprocess import PromptEncoder

from .quantize import STAGE_OUTPUT, _qformer_feeds, _vision_feeds

SUFFIX = ".trt-int8.onnx"
GRAPH_PRECISION = "int8+fp16"
ISSUE = trt_int8.ISSUE_4832


def trt_int8_path(qdq_path: Path) -> Path:
    return Path(qdq_path).with_name(Path(qdq_path).name.removesuffix(".onnx") + SUFFIX)


def int8_fp16_graphs(fp32: dict[str, Path], qdq: dict[str, Path], *, preprocess: dict, prompts: PromptEncoder,
                     calib: CalibrationSet, recipes: dict[str, int8.Int8Recipe] | None = None,
                     log: Callable[[str], None] = print) -> dict:
    """Convert each stage's fp32 Q/DQ graph to INT8 over FP16 beside it, check it for
    TensorRT, and measure its drift against the fp32 graphs on the held-out split.

    When every stage is within budget but the chain is not (the Q-Former amplifies the vision
    stage's error) and ``recipes`` (the searched ones) are given, vision nodes are kept out of
    INT8 in the TensorRT graph, most sensitive first (1, 2, 4, ... as ``int8.search`` does, at
    most half), until the chain is within budget; the CPU graph keeps its recipe and the record
    lists the extra exclusions. Returns {"stages": {stage: record}, "chain": stats}. Raises
    GraphCheckError (a graph TensorRT would refuse) or DriftBudgetError (over the int8 budget)."""
    cal_imgs, held_imgs = calib.split()
    held = {"vision": _vision_feeds(held_imgs, preprocess)}
    held_emb = int8.run_graph(fp32["vision"], held["vision"], "image_embeds")
    held["qformer"] = _qformer_feeds(held_emb, calib.instructions, prompts, offset=7)
    ref_chain = int8.run_graph(fp32["qformer"], held["qformer"], "query_embeds")
    records, out_paths = {}, {}

    def make(stage, src):
        t0 = time.perf_counter()
        out = trt_int8_path(qdq[stage])
        conversion = trt_int8.convert(src, out)
        conversion["from"] = qdq[stage].name
        tensor = STAGE_OUTPUT[stage]
        drift = compare(int8.run_graph(fp32[stage], held[stage], tensor), int8.run_graph(out, held[stage], tensor))
        log(f"      {stage} int8+fp16 (TensorRT graph, {time.perf_counter() - t0:.1f} s): {drift.line()}")
        out_paths[stage] = out
        records[stage] = {"file": out.name, "precision": GRAPH_PRECISION, "conversion": conversion,
                          "drift": drift.to_json(), "reference": "fp32 graphs, held-out split, ONNX Runtime CPU"}
        return drift

    def chain_drift():
        q_held = _qformer_feeds(int8.run_graph(out_paths["vision"], held["vision"], "image_embeds"),
                                calib.instructions, prompts, offset=7)
        return compare(ref_chain, int8.run_graph(out_paths["qformer"], q_held, "query_embeds"))

    for stage in ("vision", "qformer"):
        drift = make(stage, qdq[stage])
        kept = records[stage]["conversion"]["activations_kept_fp16"]
        if kept:
            log(f"      {stage}: activations kept fp16 next to the fp32 inputs/outputs ({ISSUE}): {', '.join(kept)}")
        budgets.check(STAGE_OUTPUT[stage], "int8", drift)
    chain = chain_drift()
    log(f"      chain query_embeds int8+fp16: {chain.line()}")
    if budgets.violations("query_embeds", "int8", chain) and recipes and "vision" in recipes:
        base = recipes["vision"]
        # nodes whose activation the conversion already keeps fp16 (next to the fp32 input) are not
        # candidates: their INT8 part is the weights only
        done = set(base.exclude) | set(records["vision"]["conversion"]["activations_kept_fp16"])
        candidates = [n for n in int8.candidate_nodes(fp32["vision"], base.op_types) if n not in done]
        ranking = [g for g, _ in int8.node_sensitivity(fp32["vision"], qdq["vision"], held["vision"][:4],
                                                       "image_embeds", candidates)]
        cal = _vision_feeds(cal_imgs, preprocess)
        search_qdq = qdq["vision"].with_name(".vision.trt-search.onnx")
        k, limit = 1, max(1, len(ranking) // 2)
        try:
            while budgets.violations("query_embeds", "int8", chain):
                k = min(k, limit)
                chosen = sorted({n for group in ranking[:k] for n in group})
                recipe = dataclasses.replace(base, exclude=tuple(sorted(set(base.exclude) | set(chosen))))
                int8.apply(fp32["vision"], search_qdq, recipe, cal)
                budgets.check("image_embeds", "int8", make("vision", search_qdq))
                records["vision"]["conversion"]["extra_excluded_for_chain"] = chosen
                chain = chain_drift()
                log(f"      chain query_embeds int8+fp16, {len(chosen)} more vision node(s) kept fp16: {chain.line()}")
                if k >= limit:
                    break
                k *= 2
        finally:
            for f in search_qdq.parent.glob(search_qdq.name + "*"):
                f.unlink()
    budgets.check("query_embeds", "int8", chain)
    return {"stages": records, "chain": chain.to_json()}
