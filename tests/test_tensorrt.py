"""TensorRT engine building and running.

Most tests run without TensorRT: identity parsing, profiles, mismatch messages, ORT provider
options, and the builder/runner logic against a small fake ``tensorrt`` module (host memory
stands in for device buffers). The last tests need the real TensorRT and a GPU: they build an
engine from a tiny ONNX graph and compare it with ONNX Runtime on CPU.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest

from ib_edge.export import tensorrt as trt_export
from ib_edge.export.tensorrt import (TensorRTBuildError, build_engine, ort_provider_options,
                                     profiles_from_manifest_inputs, validate_profiles)
from ib_edge.runtime.errors import BundleError, IbEdgeError, InputError
from ib_edge.runtime.manifest import MANIFEST, SCHEMA_VERSION, Manifest
from ib_edge.runtime.tensorrt_stage import (TensorRTRuntimeError, TensorRTStage, engine_mismatches,
                                            parse_l4t_release, platform_identity, read_l4t_release)

from .trt_standin import VERSIONS, load_api, strict_module

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not HAVE_TRT,
                                    reason="TensorRT is not installed on this machine (build engines on the GPU host)")

ORIN = {"tensorrt": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "l4t": "R36.3.0"}
JP6 = ("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, "
       "DATE: Mon May  6 17:34:21 UTC 2024\n")
JP5 = ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
       "DATE: Tue Aug  1 19:57:35 UTC 2023\n")


# --- platform identity ----------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [(JP6, "R36.3.0"), (JP5, "R35.4.1"),
                                        ("# R32 (release), REVISION: 7.1, GCID: 29818004\n", "R32.7.1"),
                                        ("custom build 7\n", "custom build 7"), ("", None)])
def test_parse_l4t_release(text, want):
    assert parse_l4t_release(text) == want


def test_read_l4t_release(tmp_path):
    (tmp_path / "nv_tegra_release").write_text(JP6)
    assert read_l4t_release(tmp_path / "nv_tegra_release") == "R36.3.0"
    assert read_l4t_release(tmp_path / "absent") is None


def test_platform_identity_injected(tmp_path):
    (tmp_path / "rel").write_text(JP6)
    ident = platform_identity(gpu=("Orin", (8, 7)), tensorrt_version="10.3.0", tegra_release=tmp_path / "rel")
    assert {k: ident[k] for k in ORIN} == ORIN
    off_jetson = platform_identity(gpu=("NVIDIA H100", "9.0"), tensorrt_version="10.7.0",
                                   tegra_release=tmp_path / "absent")
    assert (off_jetson["l4t"], off_jetson["compute_capability"]) == (None, "9.0")


def test_platform_identity_queries_torch_and_tensorrt(tmp_path, monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version="10.3.0.30"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=0: f"Orin-{d}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=0: (8, 7))
    ident = platform_identity(device=1, tegra_release=tmp_path / "absent")
    assert (ident["tensorrt"], ident["gpu_name"], ident["compute_capability"]) == ("10.3.0.30", "Orin-1", "8.7")


def test_engine_mismatches_name_each_field():
    assert engine_mismatches(ORIN, dict(ORIN, cuda_driver="12.6")) == []
    lines = engine_mismatches(ORIN, dict(ORIN, tensorrt="10.7.0", l4t=None))
    assert lines == ["TensorRT version: bundle '10.3.0', this machine '10.7.0'",
                     "JetPack/L4T release: bundle 'R36.3.0', this machine None"]
    old = {k: v for k, v in ORIN.items() if k != "compute_capability"}
    assert engine_mismatches(old, ORIN) == ["GPU compute capability: not recorded in the bundle, this machine '8.7'"]


# --- profiles -------------------------------------------------------------------------------
VISION_IN = [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 224, 224]}]
QFORMER_IN = [{"name": "image_embeds", "dtype": "float32", "shape": ["batch", 257, 1408]},
              {"name": "qformer_input_ids", "dtype": "int64", "shape": ["batch", "text_len"]},
              {"name": "qformer_attention_mask", "dtype": "int64", "shape": ["batch", "text_len"]}]


def test_profiles_from_manifest_inputs():
    assert profiles_from_manifest_inputs(VISION_IN) == {
        "pixel_values": ((1, 3, 224, 224), (1, 3, 224, 224), (4, 3, 224, 224))}
    prof = profiles_from_manifest_inputs(QFORMER_IN, batch=(1, 2, 8), text_len=(4, 16, 64))
    assert prof["image_embeds"] == ((1, 257, 1408), (2, 257, 1408), (8, 257, 1408))
    assert prof["qformer_input_ids"] == prof["qformer_attention_mask"] == ((1, 4), (2, 16), (8, 64))


@pytest.mark.parametrize("kwargs, inputs, needle", [
    ({"batch": (2, 1, 4)}, VISION_IN, "batch range (2, 1, 4) must satisfy 1 <= min <= opt <= max"),
    ({"batch": (0, 1, 4)}, VISION_IN, "batch range (0, 1, 4)"),
    ({"text_len": (1, 64, 32)}, QFORMER_IN, "text_len range (1, 64, 32)"),
    ({"batch": (1, 2)}, VISION_IN, "batch range must be (min, opt, max) integers"),
    ({}, [{"name": "x", "shape": ["batch", "seq"]}], "x has dynamic axis 'seq'"),
    ({}, [{"name": "x", "shape": ["batch", 0]}], "x has dimension 0"),
])
def test_profile_errors(kwargs, inputs, needle):
    with pytest.raises(TensorRTBuildError) as e:
        profiles_from_manifest_inputs(inputs, **kwargs)
    assert needle in str(e.value)


def test_validate_profiles():
    assert validate_profiles({"x": ([1, 4], [2, 4], [4, 4])}) == {"x": ((1, 4), (2, 4), (4, 4))}
    for bad, needle in [({"x": ((1, 4), (2,), (4, 4))}, "mixes ranks"),
                        ({"x": ((1, 0), (2, 4), (4, 4))}, "below 1"),
                        ({"x": ((1, 4), (8, 4), (4, 4))}, "on axis [0]")]:
        with pytest.raises(TensorRTBuildError, match=r"profile for x") as e:
            validate_profiles(bad)
        assert needle in str(e.value)


# --- ORT execution providers ----------------------------------------------------------------
def test_ort_provider_options_tensorrt(tmp_path):
    cache = tmp_path / "trt-cache"
    name, opts = ort_provider_options("tensorrt", "fp16", cache)
    assert name == "TensorrtExecutionProvider" and cache.is_dir()
    assert opts == {"device_id": "0", "trt_fp16_enable": "1", "trt_int8_enable": "0",
                    "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(cache),
                    "trt_max_workspace_size": str(1024 << 20)}
    _, int8 = ort_provider_options("TensorrtExecutionProvider", "int8", cache, workspace_mb=512)
    assert (int8["trt_int8_enable"], int8["trt_fp16_enable"], int8["trt_max_workspace_size"]) == \
        ("1", "1", str(512 << 20))
    _, fp32 = ort_provider_options("tensorrt", "fp32", cache)
    assert (fp32["trt_int8_enable"], fp32["trt_fp16_enable"]) == ("0", "0")


def test_ort_tensorrt_ep_precision_options_per_bundle_precision(tmp_path):
    """What the bundle's graphs need from ORT's TensorRT EP (runtime/stages.py states why): its
    options are TensorRT builder flags, which only weakly typed (10.x) builds have."""
    from ib_edge.runtime.stages import TRT_EP_PRECISION_OPTIONS

    assert TRT_EP_PRECISION_OPTIONS == {"fp32": {"trt_fp16_enable": "0", "trt_int8_enable": "0"},
                                        "fp16": {"trt_fp16_enable": "1", "trt_int8_enable": "0"},
                                        "int8": {"trt_fp16_enable": "1", "trt_int8_enable": "1"}}
    for precision, want in TRT_EP_PRECISION_OPTIONS.items():
        _, opts = ort_provider_options("tensorrt", precision, tmp_path)
        assert {k: opts[k] for k in want} == want
        assert not any("calibration" in k for k in opts)  # Q/DQ graphs carry their scales: no table


def test_ort_provider_options_cuda_and_errors(tmp_path):
    assert ort_provider_options("cuda", "fp32", tmp_path, device=1) == ("CUDAExecutionProvider", {"device_id": "1"})
    with pytest.raises(IbEdgeError, match="'rocm'"):
        ort_provider_options("rocm", "fp16", tmp_path)
    with pytest.raises(IbEdgeError, match="'int4'"):
        ort_provider_options("tensorrt", "int4", tmp_path)


@pytest.fixture(params=VERSIONS)
def trt_api(request):
    """Each test that builds or runs against the stand-in runs once per real release's API."""
    return load_api(request.param)


# --- a fake tensorrt module -----------------------------------------------------------------
class _Err:
    def __init__(self, node, name, op, desc):
        self._v = node, name, op, desc

    def node(self): return self._v[0]
    def node_name(self): return self._v[1]
    def node_operator(self): return self._v[2]
    def desc(self): return self._v[3]


def fake_tensorrt(api=None, *, parse_errors=(), build_fails=False, inputs=(("x", (-1, 16)),),
                  set_shape_ok=True, execute_ok=True, version=None):
    """The builder/runner's view of TensorRT, held to one real release's API (``api``, from
    tests/trt_api; default 10.3.0): every module name, class member, enum member and keyword
    the code touches must exist in that release (tests/trt_standin.py). Calls are recorded in
    ``trt.calls``. ``inputs="onnx"``: the network's inputs are the parsed graph's. The engine
    computes y = 2 x + 1 on host memory."""
    api = dict(api or load_api("10.3.0"))
    if version is not None:
        api["tensorrt_version"] = version
    calls = []
    io_mode = api["enums"]["TensorIOMode"]
    impl = types.SimpleNamespace()
    for dt in ("float32", "float16", "int32", "int64", "int8", "bool", "uint8", "bfloat16"):
        setattr(impl, dt, f"DataType.{dt}")

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            calls.append(("logger", severity))

    class Network:
        def __init__(self):
            self.inputs = [] if inputs == "onnx" else list(inputs)

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i][0], shape=self.inputs[i][1])

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = getattr(network, "_obj", network), 0  # the fake behind the stand-in

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            if inputs == "onnx":  # the graph's own inputs, dynamic axes as -1
                import onnx

                g = onnx.load(path, load_external_data=False).graph
                self.network.inputs = [(i.name, tuple(d.dim_value or -1 for d in i.type.tensor_type.shape.dim))
                                       for i in g.input]
            self.num_errors = len(parse_errors)
            return not parse_errors

        def get_error(self, i):
            return _Err(*parse_errors[i])

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls.append(("set_shape", name, lo, opt, hi))

    class Cache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return b"CACHE<" + self.blob + b">"

    class Config:
        def set_memory_pool_limit(self, pool, size): calls.append(("pool", pool, size))
        def set_flag(self, flag): calls.append(("set_flag", flag))
        def clear_flag(self, flag): calls.append(("clear_flag", flag))
        def add_optimization_profile(self, p): calls.append(("add_profile",)); return 0

        def create_timing_cache(self, blob):
            calls.append(("create_timing_cache", bytes(blob)))
            self.cache = Cache(bytes(blob))
            return self.cache

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", ignore_mismatch))
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger): pass
        def create_network(self, flags): calls.append(("create_network", flags)); return Network()
        def create_builder_config(self): return Config()
        def create_optimization_profile(self): return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build",))
            return None if build_fails else b"ENGINE"

    class Context:
        def __init__(self):
            self.shapes, self.addr = {}, {}

        def set_input_shape(self, name, shape):
            calls.append(("set_input_shape", name, tuple(shape)))
            self.shapes[name] = tuple(shape)
            return set_shape_ok

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def get_tensor_shape(self, name):
            return self.shapes["x"]

        def execute_async_v3(self, stream_handle):
            calls.append(("execute_async_v3", stream_handle))
            n = int(np.prod(self.shapes["x"]))
            x = np.ctypeslib.as_array(ctypes.cast(self.addr["x"], ctypes.POINTER(ctypes.c_float)), (n,))
            y = np.ctypeslib.as_array(ctypes.cast(self.addr["y"], ctypes.POINTER(ctypes.c_float)), (n,))
            y[:] = 2 * x + 1
            return execute_ok

    class Engine:
        num_io_tensors = 2
        def get_tensor_name(self, i): return ("x", "y")[i]
        def get_tensor_mode(self, n): return io_mode["INPUT"] if n == "x" else io_mode["OUTPUT"]
        def get_tensor_dtype(self, n): return impl.float32
        def create_execution_context(self): return Context()

    class Runtime:
        def __init__(self, logger): pass

        def deserialize_cuda_engine(self, blob):
            calls.append(("deserialize",))
            return Engine() if blob == b"ENGINE" else None

    impl.Logger, impl.Builder, impl.OnnxParser, impl.Runtime = Logger, Builder, OnnxParser, Runtime
    trt = strict_module(api, impl)
    trt.__dict__["calls"] = calls
    return trt


class HostBuffers:
    """Host memory in place of TorchCudaBuffers: same interface, stream handle 0."""
    handle = 0

    def __init__(self):
        import torch

        self.torch, self.synced = torch, 0

    def upload(self, a):
        return self.torch.from_numpy(np.ascontiguousarray(a)).clone()

    def empty(self, shape, dtype):
        return self.torch.full(shape, float("nan"), dtype=dtype)

    def synchronize(self):
        self.synced += 1


# --- build_engine against the fake ----------------------------------------------------------
def _graph(nodes, inits=(), opset=18):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])
    graph = helper.make_graph(nodes, "tiny", [x], [y], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _qdq_nodes(src, dst, scale_type):
    from onnx import TensorProto, helper

    dtype = {"fp16": TensorProto.FLOAT16, "fp32": TensorProto.FLOAT}[scale_type]
    inits = [helper.make_tensor("s", dtype, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])]
    return inits, [helper.make_node("QuantizeLinear", [src, "s", "z"], ["q"], name="q_node"),
                   helper.make_node("DequantizeLinear", ["q", "s", "z"], [dst], name="dq_node")]


def tiny_graph(kind):
    """fp32: Identity. fp16: fp16 Relu between Casts. int8: INT8 over FP16, the Q/DQ pair between
    fp16 Relus (what quant/trt_int8.py writes). int8-fp32: the CPU-style Q/DQ graph (fp32 scales).
    issue4832-q / -dq: an fp16-scale Q fed by the input's fp32->fp16 Cast / a DQ feeding (through
    a Reshape) a Cast to fp32."""
    from onnx import TensorProto, helper

    F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT
    to16 = helper.make_node("Cast", ["x"], ["x16"], to=F16, name="x_to_fp16")
    if kind == "fp32":
        return _graph([helper.make_node("Identity", ["x"], ["y"])])
    if kind == "fp16":
        return _graph([to16, helper.make_node("Relu", ["x16"], ["r"]), helper.make_node("Cast", ["r"], ["y"], to=F32)])
    if kind == "int8-fp32":
        inits, qdq = _qdq_nodes("x", "y", "fp32")
        return _graph(qdq, inits)
    inits, qdq = _qdq_nodes({"issue4832-q": "x16"}.get(kind, "a"), "d", "fp16")
    relu_in = [] if kind == "issue4832-q" else [helper.make_node("Relu", ["x16"], ["a"])]
    if kind == "issue4832-dq":
        shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 16])
        tail = [helper.make_node("Reshape", ["d", "shape"], ["d2"], name="reshape"),
                helper.make_node("Cast", ["d2"], ["y"], to=F32, name="dq_to_fp32")]
        return _graph([to16, *relu_in, *qdq, *tail], inits + [shape], opset=19)
    tail = [helper.make_node("Relu", ["d"], ["r"]), helper.make_node("Cast", ["r"], ["y"], to=F32)]
    return _graph([to16, *relu_in, *qdq, *tail], inits, opset=19)


def _onnx_file(path, kind="fp32"):
    import onnx

    onnx.save(tiny_graph(kind), str(path))
    return path


PROF = {"x": ((1, 16), (2, 16), (4, 16))}


def _build(tmp_path, monkeypatch, trt, precision="fp16", **kw):
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_path = _onnx_file(tmp_path / "tiny.onnx", precision)
    kw.setdefault("profiles", PROF)
    kw.setdefault("identity", dict(ORIN, tensorrt="ignored: the building TensorRT's version is recorded"))
    return build_engine(onnx_path, tmp_path / "out" / "tiny.engine", precision=precision, log=lambda m: None, **kw)


def test_parse_errors_are_all_reported_and_fatal(tmp_path, monkeypatch, trt_api):
    errors = [(3, "/attn/Einsum", "Einsum", "unsupported equation"),
              (7, "/mlp/Gelu", "Gelu", "approximate='tanh' not supported"),
              (-1, "", "", "graph input x has no shape")]
    trt = fake_tensorrt(trt_api, parse_errors=errors)
    with pytest.raises(TensorRTBuildError) as e:
        _build(tmp_path, monkeypatch, trt)
    msg = str(e.value)
    assert "(3 error(s))" in msg
    assert "node 3 (Einsum /attn/Einsum): unsupported equation" in msg
    assert "node 7 (Gelu /mlp/Gelu): approximate='tanh' not supported" in msg
    assert "graph: graph input x has no shape" in msg
    assert ("build",) not in trt.calls and not (tmp_path / "out" / "tiny.engine").exists()


# The strongly typed network flag has a different value in each release (10.3: EXPLICIT_BATCH 0,
# STRONGLY_TYPED 1; 11.4: STRONGLY_TYPED 0), read from the real bindings.
STRONGLY_TYPED_FLAGS = {"10.3.0": 1 << 1, "11.4.0.106": 1 << 0}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_strongly_typed_without_precision_flags(tmp_path, monkeypatch, precision, trt_api):
    trt = fake_tensorrt(trt_api)
    rec = _build(tmp_path, monkeypatch, trt, precision)
    flags = [c[1] for c in trt.calls if c[0] == "create_network"]
    assert flags == [STRONGLY_TYPED_FLAGS[trt_api["tensorrt_version"]]]
    assert [c for c in trt.calls if c[0] == "set_flag"] == []
    assert [c[1].member for c in trt.calls if c[0] == "clear_flag"] == ["TF32"]
    assert (rec["precision"], rec["strongly_typed"], rec["tf32"], rec["network_flags"]) == \
        (precision, True, False, flags[0])
    assert rec["built_from"] == "tiny.onnx"


def test_stand_in_mirrors_each_release():
    """The stand-ins differ where the releases differ: what broke the old builder on 11.x."""
    old, new = fake_tensorrt(load_api("10.3.0")), fake_tensorrt(load_api("11.4.0.106"))
    assert int(old.BuilderFlag.FP16) == 0 and int(old.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) == 0
    for name in ("FP16", "INT8", "BF16", "OBEY_PRECISION_CONSTRAINTS"):
        with pytest.raises(AttributeError, match=f"TensorRT 11.4.0.106: BuilderFlag has no member '{name}'"):
            getattr(new.BuilderFlag, name)
    with pytest.raises(AttributeError, match="NetworkDefinitionCreationFlag has no member 'EXPLICIT_BATCH'"):
        new.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    config = new.Builder(new.Logger(new.Logger.WARNING)).create_builder_config()
    with pytest.raises(AttributeError, match="IBuilderConfig has no attribute 'int8_calibrator'"):
        config.int8_calibrator
    with pytest.raises(TypeError, match="set_timing_cache"):
        config.set_timing_cache(None, ignore_mismatched=False)  # misspelt keyword: refused like pybind11
    with pytest.raises(AttributeError, match="module tensorrt has no attribute 'IInt8EntropyCalibrator2'"):
        new.IInt8EntropyCalibrator2
    assert not hasattr(new, "IInt8EntropyCalibrator2") and "IInt8EntropyCalibrator2" in load_api("10.3.0")["module"]


@pytest.mark.parametrize("version, flags", [("11.9.0", 0), ("12.0.1", 0)])
def test_network_flags_without_the_flag(version, flags):
    api = load_api("11.4.0.106")
    api = {**api, "tensorrt_version": version,
           "enums": {**api["enums"], "NetworkDefinitionCreationFlag": {"PREFER_JIT_PYTHON_PLUGINS": 1}}}
    assert trt_export.network_flags(fake_tensorrt(api)) == flags
    with pytest.raises(TensorRTBuildError, match="TensorRT 9.2.0 cannot build strongly typed networks"):
        trt_export.network_flags(fake_tensorrt({**api, "tensorrt_version": "9.2.0"}))


@pytest.mark.parametrize("precision, kind, needle", [
    ("int8", "fp32", "no QuantizeLinear/DequantizeLinear nodes"),
    ("int8", "int8-fp32", "opset 18 < 19: Q/DQ scales cannot be fp16"),
    ("int8", "int8-fp32", "2 Q/DQ node(s) with a non-fp16 scale (e.g. q_node): an INT8+FP32 graph"),
    ("fp16", "fp32", "no fp16 tensors: a strongly typed build of this graph is fp32"),
    ("fp16", "int8", "this graph builds an int8 engine"),
    ("fp32", "fp16", "fp16 tensors present"),
])
def test_graph_must_carry_the_precision(tmp_path, monkeypatch, precision, kind, needle, trt_api):
    trt = fake_tensorrt(trt_api)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(TensorRTBuildError, match=f"cannot build a strongly typed {precision} engine") as e:
        build_engine(_onnx_file(tmp_path / "g.onnx", kind), tmp_path / "e", precision=precision, profiles=PROF,
                     identity=ORIN, log=lambda m: None)
    assert needle in str(e.value) and trt.calls == []  # refused before TensorRT is touched


@pytest.mark.parametrize("kind, where", [
    ("issue4832-q", "QuantizeLinear q_node: input 'x16' is Cast 'x_to_fp16' of fp32 'x'"),
    ("issue4832-dq", "DequantizeLinear dq_node: output 'd2' is Cast to fp32 by 'dq_to_fp32'"),
])
def test_issue_4832_pattern_refused_before_building(tmp_path, monkeypatch, kind, where, trt_api):
    trt = fake_tensorrt(trt_api)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(TensorRTBuildError) as e:
        build_engine(_onnx_file(tmp_path / "g.onnx", kind), tmp_path / "e", precision="int8", profiles=PROF,
                     identity=ORIN, log=lambda m: None)
    msg = str(e.value)
    assert msg == (f"g.onnx cannot build a strongly typed int8 engine: 1 Q/DQ node(s) with an fp16 scale meet an "
                   f"fp32 tensor (NVIDIA/TensorRT#4832: strongly typed INT8 fails on SM 8.7 with 'Could not infer "
                   f"output types for operation: dequantize'): {where}")
    assert "trt_int8.convert" in e.value.hint and trt.calls == []


def test_profile_set_for_every_input_and_workspace(tmp_path, monkeypatch, trt_api):
    trt = fake_tensorrt(trt_api, inputs=(("x", (-1, 16)), ("mask", (-1, -1))))
    prof = {"x": ((1, 16), (2, 16), (4, 16)), "mask": ((1, 1), (2, 32), (4, 128))}
    rec = _build(tmp_path, monkeypatch, trt, profiles=prof, workspace_mb=256)
    assert [c for c in trt.calls if c[0] == "set_shape"] == [
        ("set_shape", "x", (1, 16), (2, 16), (4, 16)), ("set_shape", "mask", (1, 1), (2, 32), (4, 128))]
    assert ("add_profile",) in trt.calls
    assert [c[1:] for c in trt.calls if c[0] == "pool"] == [(trt.MemoryPoolType.WORKSPACE, 256 << 20)]
    assert rec["profiles"]["mask"] == {"min": [1, 1], "opt": [2, 32], "max": [4, 128]}
    assert rec["workspace_mb"] == 256 and rec["tensorrt"] == trt_api["tensorrt_version"]
    assert set(ORIN) <= set(rec)


@pytest.mark.parametrize("prof, needle", [({}, "missing ['x']"),
                                          ({**PROF, "y": ((1,), (1,), (1,))}, "unknown ['y']"),
                                          ({"x": ((1,), (2,), (4,))}, "rank 1, the graph's input has rank 2")])
def test_profiles_must_match_graph_inputs(tmp_path, monkeypatch, prof, needle, trt_api):
    trt = fake_tensorrt(trt_api)
    with pytest.raises(TensorRTBuildError) as e:
        _build(tmp_path, monkeypatch, trt, profiles=prof)
    assert needle in str(e.value) and ("build",) not in trt.calls


def test_timing_cache_loaded_and_saved(tmp_path, monkeypatch, trt_api):
    cache = tmp_path / "timing.cache"
    trt = fake_tensorrt(trt_api)
    _build(tmp_path, monkeypatch, trt, timing_cache=cache)
    assert ("create_timing_cache", b"") in trt.calls and ("set_timing_cache", False) in trt.calls
    assert cache.read_bytes() == b"CACHE<>"
    trt2 = fake_tensorrt(trt_api)
    _build(tmp_path, monkeypatch, trt2, timing_cache=cache)
    assert ("create_timing_cache", b"CACHE<>") in trt2.calls
    assert cache.read_bytes() == b"CACHE<CACHE<>>"


def test_engine_written_atomically(tmp_path, monkeypatch, trt_api):
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(trt_export.os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    _build(tmp_path, monkeypatch, fake_tensorrt(trt_api))
    engine = tmp_path / "out" / "tiny.engine"
    assert engine.read_bytes() == b"ENGINE"
    (src, dst), = replaced
    assert dst == engine and src.parent == engine.parent and src != engine
    assert sorted(p.name for p in engine.parent.iterdir()) == ["tiny.engine"]


def test_failed_build_leaves_no_file(tmp_path, monkeypatch, trt_api):
    cache = tmp_path / "timing.cache"
    with pytest.raises(TensorRTBuildError, match="could not build an engine"):
        _build(tmp_path, monkeypatch, fake_tensorrt(trt_api, build_fails=True), timing_cache=cache)
    assert not (tmp_path / "out").exists() and not cache.exists()


def test_failed_write_leaves_no_file(tmp_path, monkeypatch, trt_api):
    def broken(a, b):
        raise OSError("disk full")

    monkeypatch.setattr(trt_export.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        _build(tmp_path, monkeypatch, fake_tensorrt(trt_api))
    assert list((tmp_path / "out").iterdir()) == []


def test_build_refuses_unknown_gpu(tmp_path, monkeypatch, trt_api):
    trt = fake_tensorrt(trt_api)
    with pytest.raises(TensorRTBuildError, match="GPU, GPU compute capability unknown"):
        _build(tmp_path, monkeypatch, trt, identity=dict(ORIN, gpu_name=None, compute_capability=None))
    assert ("build",) not in trt.calls


@pytest.mark.skipif(HAVE_TRT, reason="checks the message shown where TensorRT is absent")
def test_build_without_tensorrt_says_where_to_build(tmp_path):
    with pytest.raises(TensorRTBuildError, match="TensorRT is not installed") as e:
        build_engine(_onnx_file(tmp_path / "t.onnx", "fp16"), tmp_path / "e", precision="fp16", profiles=PROF)
    assert "GPU host" in e.value.hint


# --- TensorRTStage against the fake ---------------------------------------------------------
def _bundle(root, record, backend="tensorrt"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny.engine").write_bytes(b"ENGINE")
    art = {"file": "tiny.engine", "backend": backend, "onnx": "tiny.onnx", "engine": record,
           "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}],
           "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 16]}]}
    data = {"schema_version": SCHEMA_VERSION, "precision": "fp16",
            "source": {"model": "Salesforce/instructblip-vicuna-7b"}, "model": {}, "preprocess": {},
            "artifacts": {"tiny": art}}
    (root / MANIFEST).write_text(json.dumps(data))
    return Manifest(root, data)  # one stage, not a whole bundle: not held to the bundle schema


RECORD = {**ORIN, "precision": "fp16", "workspace_mb": 1024,
          "profiles": {"x": {"min": [1, 16], "opt": [2, 16], "max": [4, 16]}}}


def test_stage_refuses_other_platform_before_deserializing(tmp_path, monkeypatch, trt_api):
    trt = fake_tensorrt(trt_api)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    m = _bundle(tmp_path / "b", RECORD)
    here = dict(ORIN, tensorrt="10.7.0", compute_capability="9.0", gpu_name="NVIDIA H100")
    with pytest.raises(BundleError) as e:
        TensorRTStage(m, "tiny", identity=here, buffers=HostBuffers())
    msg = str(e.value)
    assert "TensorRT version: bundle '10.3.0', this machine '10.7.0'" in msg
    assert "GPU compute capability: bundle '8.7', this machine '9.0'" in msg
    assert "GPU: bundle 'Orin', this machine 'NVIDIA H100'" in msg and "L4T" not in msg
    assert e.value.hint == ("rebuild it on this machine with: ib-export Salesforce/instructblip-vicuna-7b "
                            f"--precision fp16 --backend tensorrt --out {tmp_path / 'b'}")
    assert ("deserialize",) not in trt.calls


def test_stage_refuses_onnx_artifact(tmp_path):
    with pytest.raises(BundleError, match="backend 'onnxruntime', not tensorrt"):
        TensorRTStage(_bundle(tmp_path / "b", RECORD, backend="onnxruntime"), "tiny", identity=ORIN)


def test_stage_runs_engine(tmp_path, monkeypatch, trt_api):
    trt = fake_tensorrt(trt_api)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    buffers = HostBuffers()
    stage = TensorRTStage(_bundle(tmp_path / "b", RECORD), "tiny", identity=dict(ORIN), buffers=buffers)
    assert (stage.input_names, stage.output_names, stage.providers) == (["x"], ["y"], ["TensorRT"])
    for batch in (3, 1):
        x = np.random.default_rng(batch).normal(size=(batch, 16)).astype(np.float32)
        out = stage(x=x)
        assert list(out) == ["y"] and out["y"].dtype == np.float32
        np.testing.assert_array_equal(out["y"], 2 * x + 1)
    assert [c for c in trt.calls if c[0] == "set_input_shape"] == [("set_input_shape", "x", (3, 16)),
                                                                   ("set_input_shape", "x", (1, 16))]
    assert trt.calls.count(("execute_async_v3", 0)) == 2 and buffers.synced == 2


@pytest.mark.parametrize("shape, needle", [((5, 16), "x has shape [5, 16], outside the engine's profile "
                                                      "(min [1, 16], max [4, 16])"),
                                           ((2, 8), "x has shape [2, 8]"), ((16,), "x has shape [16]")])
def test_stage_refuses_shape_outside_profile(tmp_path, monkeypatch, shape, needle, trt_api):
    trt = fake_tensorrt(trt_api)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    stage = TensorRTStage(_bundle(tmp_path / "b", RECORD), "tiny", identity=ORIN, buffers=HostBuffers())
    with pytest.raises(InputError) as e:
        stage(x=np.zeros(shape, np.float32))
    assert needle in str(e.value) and not any(c[0] == "set_input_shape" for c in trt.calls)


def test_stage_refuses_wrong_dtype(tmp_path, monkeypatch, trt_api):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(trt_api))
    stage = TensorRTStage(_bundle(tmp_path / "b", RECORD), "tiny", identity=ORIN, buffers=HostBuffers())
    with pytest.raises(InputError, match="x is float64, the engine takes float32"):
        stage(x=np.zeros((1, 16)))


@pytest.mark.parametrize("kw, needle", [({"set_shape_ok": False}, "refused shape [2, 16] for x"),
                                        ({"execute_ok": False}, "failed to enqueue stage 'tiny'")])
def test_stage_checks_tensorrt_return_values(tmp_path, monkeypatch, kw, needle, trt_api):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(trt_api, **kw))
    stage = TensorRTStage(_bundle(tmp_path / "b", RECORD), "tiny", identity=ORIN, buffers=HostBuffers())
    with pytest.raises(TensorRTRuntimeError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        stage(x=np.zeros((2, 16), np.float32))


def test_stage_undeserializable_engine(tmp_path, monkeypatch, trt_api):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(trt_api))
    m = _bundle(tmp_path / "b", RECORD)
    (tmp_path / "b" / "tiny.engine").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="could not deserialize tiny.engine") as e:
        TensorRTStage(m, "tiny", identity=ORIN, buffers=HostBuffers())
    assert "--backend tensorrt" in e.value.hint


# --- the real TensorRT on a GPU -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm = torch.nn.Linear(16, 32), torch.nn.LayerNorm(32)

        def forward(self, x):
            return self.norm(self.fc(x))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(Tiny().eval(), (torch.randn(2, 16),), str(path), dynamo=True, opset_version=18,
                      input_names=["x"], output_names=["y"], dynamic_shapes={"x": {0: batch}})
    return path


def _graph_for(precision, fp32_path, tmp_path):
    """The graph a strongly typed engine of ``precision`` is built from, as the bundle makes it."""
    from ib_edge.quant import fp16, int8, trt_int8

    if precision == "fp32":
        return fp32_path
    if precision == "fp16":
        return fp16.convert(fp32_path, tmp_path / "tiny.fp16.onnx")
    feeds = [{"x": np.random.default_rng(i).normal(size=(4, 16)).astype(np.float32)} for i in range(8)]
    qdq = int8.apply(fp32_path, tmp_path / "tiny.qdq.onnx", int8.Int8Recipe(), feeds)
    trt_int8.convert(qdq, tmp_path / "tiny.trt-int8.onnx")
    return tmp_path / "tiny.trt-int8.onnx"


# Tolerances, against ONNX Runtime CPU on the same graph: fp32 builds with TF32 off, so only
# reduction order differs (1e-5 on LayerNorm outputs of order 1); fp16 keeps 10 mantissa bits,
# ~1e-3 relative per op, so 2e-2; int8 over fp16: the same Q/DQ arithmetic, but a value on a
# rounding boundary may land one quantization step away (scale ~0.03 here), so 1e-1.
@needs_tensorrt
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-4), ("fp16", 2e-2), ("int8", 1e-1)])
def test_real_engine_matches_onnxruntime(tiny_onnx, tmp_path, precision, atol):
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    bundle = tmp_path / "b"
    graph = _graph_for(precision, tiny_onnx, tmp_path)
    rec = build_engine(graph, bundle / "tiny.engine", precision=precision,
                       profiles={"x": ((1, 16), (2, 16), (4, 16))}, timing_cache=tmp_path / "timing.cache",
                       log=lambda m: None)
    data = {"schema_version": SCHEMA_VERSION, "precision": precision, "source": {"model": "tiny"},
            "model": {}, "preprocess": {}, "artifacts": {"tiny": {
                "file": "tiny.engine", "backend": "tensorrt", "onnx": "tiny.onnx", "engine": rec,
                "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 32]}]}}}
    (bundle / MANIFEST).write_text(json.dumps(data))
    stage = TensorRTStage(Manifest(bundle, data), "tiny")
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 4):
        x = np.random.default_rng(batch).normal(size=(batch, 16)).astype(np.float32)
        got, want = stage(x=x)["y"], sess.run(["y"], {"x": x})[0]
        assert got.shape == want.shape == (batch, 32)
        assert float(np.abs(got - want).max()) < atol
    with pytest.raises(InputError, match="outside the engine's profile"):
        stage(x=np.zeros((5, 16), np.float32))
