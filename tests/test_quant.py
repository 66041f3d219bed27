"""INT8 and FP16 stages against fp32: drift budgets on held-out inputs, the sensitivity search,
recipe re-application, FP16 graph structure, the calibration set."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from ib_edge.quant import budgets, int8
from ib_edge.quant.calibration import CalibrationError, CalibrationSet, verify_default_index
from ib_edge.quant.drift import compare
from ib_edge.runtime import Pipeline

from .conftest import FAMILIES

INSTRUCTIONS = ["Describe this image.", "What color is the circle?", "How many people are in the picture?",
                "Is the square on the left or the right?"]


def _chain(pipe: Pipeline, images, instructions):
    out = []
    for i, img in enumerate(images):
        enc = pipe.prompts.encode(instructions[i % len(instructions)])
        emb = pipe.image_embeds(pipe.pixel_values([img]))
        out.append((emb, pipe.query_embeds(emb, enc["qformer_input_ids"], enc["qformer_attention_mask"])))
    return out


@pytest.mark.parametrize("precision", ["int8", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_drift_budget_on_heldout(family, precision, bundle_dir, quant_bundle_dir, heldout_images):
    ref = Pipeline.load(bundle_dir(family))
    q = Pipeline.load(quant_bundle_dir(family, precision))
    photos, scenes = heldout_images
    for name, images in (("real photos", photos), ("proof scenes", scenes)):
        r, g = _chain(ref, images, INSTRUCTIONS), _chain(q, images, INSTRUCTIONS)
        for idx, tensor in ((0, "image_embeds"), (1, "query_embeds")):
            stats = compare([x[idx] for x in r], [x[idx] for x in g])
            bad = budgets.violations(tensor, precision, stats)
            assert not bad, f"{family} {name}: {bad} ({stats.line()})"


def test_manifest_records_quantization(quant_bundle_dir):
    d = quant_bundle_dir("llama", "int8")
    m = json.loads((d / "manifest.json").read_text())
    cset = CalibrationSet.load()
    assert m["precision"] == "int8" and m["calibration"]["sha256"] == cset.sha256
    for stage in ("vision", "qformer"):
        art = m["artifacts"][stage]
        assert art["precision"] == "int8"
        qz = art["quantization"]
        assert qz["op_types"] == ["MatMul", "Conv", "Gemm"] and qz["method"] == "minmax"
        assert isinstance(qz["excluded_nodes"], list)
        assert (d / qz["recipe"]).is_file()
        assert art["drift"]["cosine_mean"] >= 0.995
        ops = {n.op_type for n in onnx.load(str(d / art["file"])).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert m["drift"]["query_embeds_chain"]["cosine_min"] >= 0.98


def _initializers(path):
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_recipe_reapplies_identically(quant_bundle_dir, reference_dir, tmp_path):
    from ib_edge.export.bundle import export_bundle

    first = quant_bundle_dir("opt", "int8")
    again = export_bundle(str(reference_dir("opt")), tmp_path / "again", precision="int8", recipe_dir=first,
                          quiet=True)
    for stage in ("vision", "qformer"):
        a, b = _initializers(first / f"{stage}.onnx"), _initializers(again / f"{stage}.onnx")
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert (first / "recipes" / f"{stage}.int8.json").read_text() == (again / "recipes" / f"{stage}.int8.json").read_text()


def test_sensitivity_search_excludes_until_budget(bundle_dir, tmp_path):
    """With a budget the plain quantization misses, the search must exclude the most sensitive
    nodes, and the drift must end within that budget."""
    from ib_edge.export.quantize import _vision_feeds
    from ib_edge.quant.calibration import CalibrationSet

    d = bundle_dir("llama")
    pipe = Pipeline.load(d)
    cal, held = CalibrationSet.load().split()
    cfg = pipe.manifest.preprocess
    cal_f, held_f = _vision_feeds(cal, cfg), _vision_feeds(held, cfg)
    fp32 = d / "vision.onnx"
    plain = tmp_path / "plain.onnx"
    int8.apply(fp32, plain, int8.Int8Recipe(), cal_f)
    ref = int8.run_graph(fp32, held_f, "image_embeds")
    base = compare(ref, int8.run_graph(plain, held_f, "image_embeds"))
    target = base.cosine_min + (1 - base.cosine_min) * 0.5      # halfway to perfect: plain misses it
    recipe, drift, steps = int8.search(fp32, tmp_path / "s.onnx", "image_embeds", cal_f, held_f,
                                       lambda s: s.cosine_min >= target)
    assert recipe.exclude, "search excluded nothing although the plain graph misses the budget"
    assert drift.cosine_min >= target > base.cosine_min
    assert steps[0].excluded == 0 and steps[-1].excluded == len(recipe.exclude)
    excluded_ops = {n.name: n.op_type for n in onnx.load(str(fp32)).graph.node}
    assert all(excluded_ops[n] in int8.DEFAULT_OP_TYPES for n in recipe.exclude)
    q_nodes = {n.input[0] for n in onnx.load(str(tmp_path / "s.onnx")).graph.node if n.op_type == "QuantizeLinear"}
    assert q_nodes, "nothing quantized any more"


def test_all_ops_int8_breaks_budget(bundle_dir, tmp_path):
    """The measured reason for the default op set: quantizing Add/Softmax/LayerNorm too drifts
    further than MatMul/Conv/Gemm alone."""
    from ib_edge.export.quantize import _vision_feeds

    d = bundle_dir("llama")
    pipe = Pipeline.load(d)
    cal, held = CalibrationSet.load().split()
    cal_f, held_f = _vision_feeds(cal, pipe.manifest.preprocess), _vision_feeds(held, pipe.manifest.preprocess)
    ref = int8.run_graph(d / "vision.onnx", held_f, "image_embeds")
    drifts = {}
    for name, ops in {"default": int8.DEFAULT_OP_TYPES,
                      "all": int8.DEFAULT_OP_TYPES + ("Add", "Softmax", "LayerNormalization", "Mul")}.items():
        out = tmp_path / f"{name}.onnx"
        int8.apply(d / "vision.onnx", out, int8.Int8Recipe(op_types=ops), cal_f)
        drifts[name] = compare(ref, int8.run_graph(out, held_f, "image_embeds"))
    assert drifts["all"].sqnr_db < drifts["default"].sqnr_db


def test_fp16_graph_keeps_fp32_io_and_blocked_ops(quant_bundle_dir):
    from ib_edge.quant.fp16 import KEEP_FP32_OPS

    d = quant_bundle_dir("t5", "fp16")
    for stage in ("vision", "qformer"):
        g = onnx.load(str(d / f"{stage}.onnx")).graph
        assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in g.output)
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in g.initializer)
        assert any(n.op_type in KEEP_FP32_OPS for n in g.node)


def test_default_calibration_set_is_intact():
    assert verify_default_index() == []
    cset = CalibrationSet.load()
    calib, held = cset.split()
    assert not set(calib) & set(held) and len(held) >= 4
    assert any("photos" in str(p) for p in calib) and any("proof" in str(p) for p in calib)


def test_user_calibration_dir(tmp_path):
    from PIL import Image

    for i in range(5):
        Image.new("RGB", (32, 32), (i * 40, 10, 10)).save(tmp_path / f"{i}.png")
    a = CalibrationSet.load(tmp_path)
    assert len(a.images) == 5 and len(a.instructions) > 5  # default instructions when none given
    (tmp_path / "instructions.txt").write_text("Count the cars.\nWhat is the weather?\n")
    b = CalibrationSet.load(tmp_path)
    assert b.instructions == ("Count the cars.", "What is the weather?") and b.sha256 != a.sha256
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "0.png")
    assert CalibrationSet.load(tmp_path).sha256 != b.sha256
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError):
        CalibrationSet.load(empty)


def test_cli_bad_calibration_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ib_edge.export.cli", "--precision", "int8", "--calib",
                           str(tmp_path / "nope"), "--out", str(tmp_path / "b")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errs = [ln for ln in proc.stderr.splitlines() if ln.startswith("ib-export: error:")]
    assert len(errs) == 1 and "calibration directory not found" in errs[0]
    assert not (tmp_path / "b").exists()


def _shared_input_graph(path):
    """x -> LayerNorm -> three MatMuls with weights (q/k/v-like) -> Add: one tensor, three consumers."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.1, f"w{i}") for i in range(3)]
    inits += [numpy_helper.from_array(np.ones(64, np.float32), "g"), numpy_helper.from_array(np.zeros(64, np.float32), "b")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1, name="ln")]
    nodes += [helper.make_node("MatMul", ["h", f"w{i}"], [f"m{i}"], name=f"mm{i}") for i in range(3)]
    nodes += [helper.make_node("Add", ["m0", "m1"], ["s"], name="add0"), helper.make_node("Add", ["s", "m2"], ["y"], name="add1")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16, 64])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return [{"x": rng.standard_normal((1, 16, 64)).astype(np.float32)} for _ in range(4)]


def _fused_ops(path, disabled):
    import collections

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(path) + ".opt.onnx"
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    return collections.Counter(n.op_type for n in onnx.load(str(path) + ".opt.onnx").graph.node)


def test_dedicated_qdq_pairs_let_every_matmul_fuse(tmp_path):
    """The Q-Former's q/k/v MatMuls share one input. With one Q/DQ pair per consumer and ORT's
    common-subexpression elimination off (as the runtime runs int8 graphs), all three fuse into
    QLinearMatMul; a shared pair leaves them as DequantizeLinear + fp32 MatMul."""
    from ib_edge.runtime.stages import DISABLED_OPTIMIZERS

    feeds = _shared_input_graph(tmp_path / "g.onnx")
    disabled = list(DISABLED_OPTIMIZERS["int8"])
    shared = int8.apply(tmp_path / "g.onnx", tmp_path / "shared.onnx", int8.Int8Recipe(dedicated_qdq_pair=False), feeds)
    dedicated = int8.apply(tmp_path / "g.onnx", tmp_path / "ded.onnx", int8.Int8Recipe(), feeds)
    assert _fused_ops(dedicated, disabled)["QLinearMatMul"] == 3
    assert _fused_ops(dedicated, disabled)["MatMul"] == 0
    assert _fused_ops(shared, disabled)["MatMul"] == 3     # the failure mode this guards against
    ref = int8.run_graph(tmp_path / "g.onnx", feeds, "y")
    assert compare(ref, int8.run_graph(dedicated, feeds, "y")).cosine_min > 0.999


def test_old_recipes_reapply_without_dedicated_pairs():
    assert int8.Int8Recipe().dedicated_qdq_pair is True
    assert int8.Int8Recipe().reduce_range is True
    old = {"op_types": ["MatMul"], "exclude": [], "method": "minmax"}
    assert int8.Int8Recipe.from_json(old).dedicated_qdq_pair is False
    assert int8.Int8Recipe.from_json(old).reduce_range is False
    assert int8.Int8Recipe.from_json(int8.Int8Recipe().to_json()) == int8.Int8Recipe()


def _graph_inputs_readers(path):
    """MatMul/Conv/Gemm nodes of an fp32 graph that read a graph input directly (test-local)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    ins = {i.name for i in g.input}
    return {n.name for n in g.node if n.op_type in ("MatMul", "Gemm", "Conv") and ins & set(n.input)}


@pytest.mark.parametrize("partial_ms", [4.5, 3.5])
def test_int8_stages_faster_keeps_fp32_where_int8_is_slower(reference_dir, bundle_dir, tmp_path, monkeypatch,
                                                             partial_ms):
    """The default (--int8-stages auto = faster on ONNX Runtime): a stage whose INT8 graph times
    slower than fp32 tries INT8 on the matmuls reading its inputs only (the Q-Former's image
    key/value projections); it ships that where faster than fp32 (3.5 ms), else the fp32 graph
    (4.5 ms: byte-identical to the fp32 bundle's), recorded with every timing and the CPU; the
    other stage stays INT8 and the runtime runs the mixed bundle. Timing is stubbed so the
    decision is known in advance."""
    import hashlib

    import onnx

    from ib_edge.export import quantize
    from ib_edge.export.bundle import export_bundle

    ms = {("vision", "fp32"): 9.0, ("vision", "int8"): 3.0, ("qformer", "fp32"): 4.0, ("qformer", "int8"): 5.0,
          ("qformer", "partial"): partial_ms}

    def fake_time(path, feed, runs=quantize.SPEED_RUNS):  # fp32 graphs sit in the export's .fp32/ folder
        kind = "fp32" if ".fp32" in path.parts else "partial" if ".partial" in path.parts else "int8"
        return ms[(path.stem, kind)]

    monkeypatch.setattr(quantize, "time_graph", fake_time)
    monkeypatch.delenv("IB_EDGE_INT8_STAGES", raising=False)   # conftest pins "all"
    out = export_bundle(str(reference_dir("llama")), tmp_path / "faster", precision="int8", quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    vis, qf = m["artifacts"]["vision"], m["artifacts"]["qformer"]
    assert vis["precision"] == "int8"
    assert (vis["speed_check"]["fp32_ms"], vis["speed_check"]["int8_ms"], vis["speed_check"]["shipped"]) == (9.0, 3.0, "int8")
    assert "partial_int8_ms" not in vis["speed_check"]        # int8 was faster: nothing else tried
    readers = _graph_inputs_readers(bundle_dir("llama") / "qformer.onnx")
    assert readers                                             # the construction: cross-attention k/v on image_embeds
    assert (qf["speed_check"]["partial_int8_ms"], qf["speed_check"]["partial_int8_nodes"]) == (partial_ms, len(readers))
    from ib_edge.runtime.cpuinfo import cpu_string

    assert vis["speed_check"]["cpu"] == qf["speed_check"]["cpu"] == cpu_string()
    assert (out / "recipes" / "qformer.int8.json").is_file()   # still re-appliable with --recipe
    assert not (out / ".partial").exists()
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    if partial_ms > ms[("qformer", "fp32")]:
        assert qf["precision"] == "fp32" and qf["speed_check"]["shipped"] == "fp32"
        assert qf["drift"]["cosine_min"] == 1.0
        assert digest(out / "qformer.onnx") == digest(bundle_dir("llama") / "qformer.onnx")
    else:
        assert qf["precision"] == "int8" and qf["speed_check"]["shipped"] == "partial int8"
        g = onnx.load(str(out / "qformer.onnx")).graph
        dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
        # quantized = a matmul whose activation (first input) comes out of a DequantizeLinear
        quantized = {n.name for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[0] in dq_out}
        assert quantized == readers, (quantized, readers)
        recipe = json.loads((out / "recipes" / "qformer.int8.json").read_text())
        assert not readers & set(recipe["exclude"]) and len(recipe["exclude"]) > 0
        assert qf["drift"]["cosine_mean"] < 1.0
    from PIL import Image

    res = Pipeline.load(out).run(Image.new("RGB", (40, 40), (200, 30, 30)), "What is this?", max_new_tokens=3)
    assert 1 <= len(res.token_ids) <= 3


def test_int8_stages_all_forces_int8_without_timing(reference_dir, tmp_path, monkeypatch):
    from ib_edge.export import quantize
    from ib_edge.export.bundle import export_bundle

    def no_timing(*a, **k):
        raise AssertionError("--int8-stages all must not time the stages")

    monkeypatch.setattr(quantize, "time_graph", no_timing)
    monkeypatch.delenv("IB_EDGE_INT8_STAGES", raising=False)
    out = export_bundle(str(reference_dir("llama")), tmp_path / "all", precision="int8", int8_stages="all", quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    for stage in ("vision", "qformer"):
        assert m["artifacts"][stage]["precision"] == "int8" and "speed_check" not in m["artifacts"][stage]


def test_int8_stage_choice_rule(monkeypatch):
    """auto: faster for int8 on ONNX Runtime (where the export can time its target), all for
    TensorRT; $IB_EDGE_INT8_STAGES overrides auto only; a bad value is one ExportError line."""
    from ib_edge.export.options import ExportError, ExportOptions

    monkeypatch.delenv("IB_EDGE_INT8_STAGES", raising=False)
    assert ExportOptions(precision="int8").stage_choice() == "faster"
    assert ExportOptions(precision="int8", backend="tensorrt").stage_choice() == "all"
    assert ExportOptions(precision="int8", int8_stages="all").stage_choice() == "all"
    monkeypatch.setenv("IB_EDGE_INT8_STAGES", "all")
    assert ExportOptions(precision="int8").stage_choice() == "all"
    assert ExportOptions(precision="int8", int8_stages="faster").stage_choice() == "faster"
    monkeypatch.setenv("IB_EDGE_INT8_STAGES", "some")
    with pytest.raises(ExportError, match="IB_EDGE_INT8_STAGES"):
        ExportOptions(precision="int8").stage_choice()


def test_int8_stages_needs_int8_on_onnxruntime(reference_dir, tmp_path):
    from ib_edge.export.bundle import ExportError, export_bundle

    with pytest.raises(ExportError, match="int8-stages"):
        export_bundle(str(reference_dir("llama")), tmp_path / "x", precision="fp16", int8_stages="faster", quiet=True)


def test_time_graph_measures(bundle_dir):
    from ib_edge.export.quantize import time_graph

    ms = time_graph(bundle_dir("llama") / "qformer.onnx", _qformer_feed(bundle_dir("llama")), runs=3)
    assert 0 < ms < 10_000


def _qformer_feed(bundle):
    from ib_edge.runtime.manifest import Manifest

    m = Manifest.load(bundle)
    feed = {}
    for t in m.artifact("qformer")["inputs"]:
        shape = [d if isinstance(d, int) else 1 if i == 0 else 5 for i, d in enumerate(t["shape"])]
        feed[t["name"]] = (np.ones(shape, np.int64) if "int" in t["dtype"] else np.zeros(shape, np.float32))
    return feed


@pytest.mark.parametrize("method", int8.METHODS)
def test_two_phase_apply_equals_one_shot_quantize_static(bundle_dir, tmp_path, method):
    """apply() calibrates first and hands ORT the ranges as a calibration cache (so the fp32
    weights are not held three times at once); the Q/DQ graph must be byte-identical to ORT's
    own one-shot quantize_static with the same options."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from ib_edge.export.quantize import _vision_feeds
    from ib_edge.quant.calibration import CalibrationSet

    d = bundle_dir("llama")
    feeds = _vision_feeds(CalibrationSet.load().split()[0][:4], Pipeline.load(d).manifest.preprocess)
    recipe = int8.Int8Recipe(method=method, exclude=(next(iter(int8.candidate_nodes(d / "vision.onnx",
                                                                                      int8.DEFAULT_OP_TYPES))),))
    int8.apply(d / "vision.onnx", tmp_path / "two.onnx", recipe, feeds)
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "DedicatedQDQPair": True,
             "CalibTensorRangeSymmetric": True}
    if method == "percentile":
        extra["CalibPercentile"] = recipe.percentile
    quantize_static(str(d / "vision.onnx"), str(tmp_path / "one.onnx"), int8._Reader(feeds),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=list(recipe.op_types), per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=list(recipe.exclude),
                    calibrate_method=CalibrationMethod.MinMax if method == "minmax" else CalibrationMethod.Percentile,
                    extra_options=extra, reduce_range=recipe.reduce_range)
    assert (tmp_path / "two.onnx").read_bytes() == (tmp_path / "one.onnx").read_bytes()


def test_weights_are_7_bit_and_bypass_keeps_graphs_valid(bundle_dir, tmp_path):
    """The CPU graph's weights stay within 7 bits (reduce_range: no VPMADDUBSW saturation on
    x86 CPUs without VNNI); and excluding any candidate node without recalibrating (the
    sensitivity ranking's _bypass) gives a valid graph, also for the patch Conv whose bias
    DequantizeLinear carries the bias's own name."""
    from onnx import numpy_helper

    from ib_edge.export.quantize import _vision_feeds
    from ib_edge.quant.calibration import CalibrationSet

    d = bundle_dir("llama")
    feeds = _vision_feeds(CalibrationSet.load().split()[0][:4], Pipeline.load(d).manifest.preprocess)
    q = tmp_path / "q.onnx"
    int8.apply(d / "vision.onnx", q, int8.Int8Recipe(), feeds)
    qm, fm = onnx.load(str(q)), onnx.load(str(d / "vision.onnx"))
    weights = [numpy_helper.to_array(t) for t in qm.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and all(int(np.abs(w.astype(np.int32)).max()) <= 64 for w in weights)
    import onnxruntime as ort

    for node in int8.candidate_nodes(d / "vision.onnx", int8.DEFAULT_OP_TYPES):
        m = int8._bypass(qm, fm, {node})
        onnx.checker.check_model(m)
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
