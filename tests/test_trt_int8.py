"""The INT8-over-FP16 graphs TensorRT bundles build from (quant/trt_int8.py, export/trt_graphs.py),
checked without TensorRT: conversion, graph checks, and drift against fp32 on ONNX Runtime CPU
with the int8 budgets, on the reference families (the proof models: tests/test_proof_models.py)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ib_edge.quant import budgets, int8, trt_int8
from ib_edge.quant.drift import compare

FAMILIES = ("llama", "opt", "t5")


def _tiny_fp32_graph(path):
    """x [b,16] -> MatMul -> Add -> LayerNormalization -> MatMul -> y [b,8], random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(32,)).astype(np.float32), "b1"),
             numpy_helper.from_array(np.ones(32, np.float32), "g"), numpy_helper.from_array(np.zeros(32, np.float32), "b"),
             numpy_helper.from_array(rng.normal(size=(32, 8)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Add", ["h", "b1"], ["h1"]),
             helper.make_node("LayerNormalization", ["h1", "g", "b"], ["n"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["n", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_convert_makes_int8_over_fp16_without_4832_pattern(tmp_path):
    import onnx
    from onnx import TensorProto

    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(4, 16)).astype(np.float32)} for _ in range(8)]
    fp32 = _tiny_fp32_graph(tmp_path / "fp32.onnx")
    qdq = int8.apply(fp32, tmp_path / "qdq.onnx", int8.Int8Recipe(), feeds)
    assert trt_int8.check(qdq, "int8")  # the CPU graph: opset 18, fp32 scales -> refused for TensorRT
    rec = trt_int8.convert(qdq, tmp_path / "trt.onnx")
    assert trt_int8.check(tmp_path / "trt.onnx", "int8") == []
    assert rec["opset"] == {"in": 18, "out": 19} and rec["scales"] == "fp16"
    # mm1 read the input's fp32->fp16 Cast through its Q/DQ: that pair is dropped, mm1's weights stay int8
    assert rec["activations_kept_fp16"] == ["mm1"]
    model = onnx.load(str(tmp_path / "trt.onnx"))
    assert [i.type.tensor_type.elem_type for i in list(model.graph.input) + list(model.graph.output)] == \
        [TensorProto.FLOAT] * 2
    producer = {o: n for n in model.graph.node for o in n.output}
    mm = {n.name: n for n in model.graph.node if n.op_type == "MatMul"}
    assert [producer[i].op_type for i in mm["mm1"].input] == ["Cast", "DequantizeLinear"]
    assert [producer[i].op_type for i in mm["mm2"].input] == ["DequantizeLinear", "DequantizeLinear"]
    ref = int8.run_graph(fp32, feeds, "y")
    got = int8.run_graph(tmp_path / "trt.onnx", feeds, "y")  # ONNX Runtime CPU runs it
    assert compare(ref, got).cosine_min > 0.99 and got[0].dtype == np.float32


def test_convert_refuses_what_it_cannot_repair(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    qdq = int8.apply(_tiny_fp32_graph(tmp_path / "fp32.onnx"), tmp_path / "qdq.onnx", int8.Int8Recipe(),
                     [{"x": rng.normal(size=(2, 16)).astype(np.float32)}])
    monkeypatch.setattr(trt_int8, "_bypass_fp32_neighbours", lambda model: [])  # leave the Q/DQ at the I/O
    with pytest.raises(trt_int8.GraphCheckError, match="NVIDIA/TensorRT#4832") as e:
        trt_int8.convert(qdq, tmp_path / "trt.onnx")
    assert "qdq.onnx: the INT8-over-FP16 conversion left problems" in str(e.value)
    assert not (tmp_path / "trt.onnx").exists()


def validate_trt_int8(bundle, tmp_path):
    """The export path's validation (trt_graphs.int8_fp16_graphs) on ``bundle``'s fp32 graphs and
    a Q/DQ graph of the default recipe (the search's first candidate), in ``tmp_path``."""
    from ib_edge.export.quantize import _qformer_feeds, _vision_feeds
    from ib_edge.export.trt_graphs import int8_fp16_graphs
    from ib_edge.quant.calibration import CalibrationSet
    from ib_edge.runtime.preprocess import PromptEncoder

    m = json.loads((bundle / "manifest.json").read_text())
    prompts = PromptEncoder(bundle / m["tokenizers"]["llm"], bundle / m["tokenizers"]["qformer"], m["model"])
    calib = CalibrationSet.load(None)
    cal_imgs, _ = calib.split()
    fp32 = {st: shutil.copy(bundle / f"{st}.onnx", tmp_path / f"{st}.fp32.onnx") for st in ("vision", "qformer")}
    cal = {"vision": _vision_feeds(cal_imgs, m["preprocess"])}
    cal["qformer"] = _qformer_feeds(int8.run_graph(fp32["vision"], cal["vision"], "image_embeds"),
                                    calib.instructions, prompts)
    qdq = {st: int8.apply(fp32[st], tmp_path / f"{st}.onnx", int8.Int8Recipe(), cal[st]) for st in fp32}
    return int8_fp16_graphs(fp32, qdq, preprocess=m["preprocess"], prompts=prompts, calib=calib,
                            recipes={st: int8.Int8Recipe() for st in qdq}, log=print)


@pytest.mark.parametrize("family", FAMILIES)
def test_trt_int8_graph_within_budget(family, bundle_dir, tmp_path):
    out = validate_trt_int8(bundle_dir(family), tmp_path)
    for stage, tensor in (("vision", "image_embeds"), ("qformer", "query_embeds")):
        rec = out["stages"][stage]
        assert rec["file"] == f"{stage}.trt-int8.onnx" and (tmp_path / rec["file"]).is_file()
        assert trt_int8.check(tmp_path / rec["file"], "int8") == []
        b = budgets.BUDGETS[(tensor, "int8")]
        assert rec["drift"]["cosine_mean"] >= b.min_cosine_mean and rec["drift"]["cosine_min"] >= b.min_cosine_worst
    assert out["chain"]["cosine_min"] >= budgets.BUDGETS[("query_embeds", "int8")].min_cosine_worst


def test_trt_int8_budget_miss_aborts(bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(budgets.BUDGETS, ("image_embeds", "int8"), budgets.Budget(1.0, 1.0, "impossible"))
    with pytest.raises(budgets.DriftBudgetError, match="image_embeds int8: cosine mean"):
        validate_trt_int8(bundle_dir("opt"), tmp_path)
