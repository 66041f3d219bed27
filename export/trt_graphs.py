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


def trt_int8_path(qdq_path: Path) -> Path:
    return Path(qdq_path).with_name(Path(qdq_path).name.removesuffix(".onnx") + SUFFIX)


def int8_fp16_graphs(fp32: dict[str, Path], qdq: dict[str, Path], *, preprocess: dict, prompts: PromptEncoder,
                     calib: CalibrationSet, log: Callable[[str], None] = print) -> dict:
    """Convert each stage's fp32 Q/DQ graph to INT8 over FP16 beside it, check it for
    TensorRT, and measure its drift against the fp32 graphs on the held-out split.

    Returns {"stages": {stage: record}, "chain": stats}; each record names the file, the
    conversion and the drift. Raises GraphCheckError (a graph TensorRT would refuse) or
    DriftBudgetError (over the int8 budget)."""
    _, held_imgs = calib.split()
    held = {"vision": _vision_feeds(held_imgs, preprocess)}
    held_emb = int8.run_graph(fp32["vision"], held["vision"], "image_embeds")
    held["qformer"] = _qformer_feeds(held_emb, calib.instructions, prompts, offset=7)
    records, out_paths = {}, {}
    for stage in ("vision", "qformer"):
        t0 = time.perf_counter()
        out = trt_int8_path(qdq[stage])
        conversion = trt_int8.convert(qdq[stage], out)
        tensor = STAGE_OUTPUT[stage]
        drift = compare(int8.run_graph(fp32[stage], held[stage], tensor), int8.run_graph(out, held[stage], tensor))
        log(f"      {stage} int8+fp16 (TensorRT graph, {time.perf_counter() - t0:.1f} s): {drift.line()}")
        if conversion["activations_kept_fp16"]:
            log(f"      {stage}: activations kept fp16 next to the fp32 inputs ({ISSUE}): "
                f"{', '.join(conversion['activations_kept_fp16'])}")
        budgets.check(tensor, "int8", drift)
        out_paths[stage] = out
        records[stage] = {"file": out.name, "precision": GRAPH_PRECISION, "conversion": conversion,
                          "drift": drift.to_json(), "reference": "fp32 graphs, held-out split, ONNX Runtime CPU"}
    q_held = _qformer_feeds(int8.run_graph(out_paths["vision"], held["vision"], "image_embeds"),
                            calib.instructions, prompts, offset=7)
    chain = compare(int8.run_graph(fp32["qformer"], held["qformer"], "query_embeds"),
                    int8.run_graph(out_paths["qformer"], q_held, "query_embeds"))
    log(f"      chain query_embeds int8+fp16: {chain.line()}")
    budgets.check("query_embeds", "int8", chain)
    return {"stages": records, "chain": chain.to_json()}


ISSUE = trt_int8.ISSUE_4832
