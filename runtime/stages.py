"""Stage runners for the exported graphs. The runtime chains them by the manifest's names."""
from __future__ import annotations

import numpy as np

from pathlib import Path

from .errors import BundleError, IbEdgeError
from .manifest import REBUILD, Manifest
from .threads import ort_session_options

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_WORKSPACE_MB = 1024
# ORT graph optimizers to turn off per precision. On Q/DQ graphs, common-subexpression
# elimination merges the dedicated Q/DQ pairs the quantizer writes for each consumer of a
# tensor (q/k/v projections of one LayerNorm output, cross-attention k/v of image_embeds);
# a MatMul fed by a shared pair is then not fused into QLinearMatMul and runs as DequantizeLinear
# of its weights + fp32 MatMul on every call (measured on a 2-layer real-width Q-Former: 13 of 27 MatMuls unfused,
# INT8 Q-Former slower than fp32; with CSE off 5 remain). Numerics are unchanged by CSE itself.
DISABLED_OPTIMIZERS = {"int8": ("CommonSubexpressionElimination",)}


class ProviderError(IbEdgeError):
    pass


# ONNX Runtime's TensorRT EP (ib-run --providers tensorrt) on a bundle's ONNX graphs. Its
# trt_fp16_enable / trt_int8_enable options set TensorRT's FP16 / INT8 *builder flags* (ORT's
# "TensorRT Execution Provider" docs, provider-options table; the EP builds weakly typed
# networks). Checked 2026-12-02: those docs list TensorRT up to 10.x and say nothing of strong
# typing; TensorRT 11 has no such flags (its Python API lacks BuilderFlag.FP16/INT8, see
# tests/trt_api) and ORT's TensorRT-11 support (microsoft/onnxruntime#28611) guards the removed
# APIs, so under TensorRT 11 the options cannot take effect and the graph's own types decide,
# as in ib-export --backend tensorrt. What each bundle precision needs, per TensorRT release:
#   fp32: both off (a graph of fp32 tensors; on 10.x FP16 on would let TensorRT lower them).
#   fp16: trt_fp16_enable=1: on 10.x (weak typing) the fp16 graph's layers run in fp32 without
#         it; TensorRT may then also run the graph's kept-fp32 norms/softmax in fp16 (weak
#         typing's choice, not validated here; --backend tensorrt builds strongly typed and keeps
#         them fp32). On 11.x: ignored, the fp16 graph is fp16.
#   int8: trt_int8_enable=1 for the Q/DQ graph (weakly typed builds: "to enable any quantization
#         operations, the INT8 flag must be set", TensorRT 8.x developer guide; TensorRT's
#         current explicit-quantization page instead says to build strongly typed with no
#         precision flags) and trt_fp16_enable=1 for the layers left unquantized. On 11.x: ignored,
#         and the bundle's fp32 Q/DQ graph runs INT8 + FP32; for INT8 over FP16 on TensorRT 11
#         export with --backend tensorrt (the INT8-over-FP16 graph, validated).
TRT_EP_PRECISION_OPTIONS = {
    "fp32": {"trt_fp16_enable": "0", "trt_int8_enable": "0"},
    "fp16": {"trt_fp16_enable": "1", "trt_int8_enable": "0"},
    "int8": {"trt_fp16_enable": "1", "trt_int8_enable": "1"},
}


def ort_provider_options(provider: str, precision: str, cache_dir, *, device: int = 0,
                         workspace_mb: int = DEFAULT_WORKSPACE_MB) -> tuple[str, dict]:
    """(provider name, options) for ``InferenceSession(providers=[...])``. Values are strings
    ("1"/"0"), which every ORT version parses. The TensorRT EP caches the engines it builds in
    ``cache_dir``; ORT checks those against the TensorRT version itself. Precision options:
    ``TRT_EP_PRECISION_OPTIONS`` (what they mean on TensorRT 10 and 11 is written above it)."""
    if precision not in PRECISIONS:
        raise ProviderError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    kind = provider.lower().replace("executionprovider", "")
    if kind == "tensorrt":
        cache = Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        return "TensorrtExecutionProvider", {
            "device_id": str(device),
            **TRT_EP_PRECISION_OPTIONS[precision],
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": str(cache),
            "trt_max_workspace_size": str(int(workspace_mb) << 20),
        }
    if kind == "cuda":  # runs the graph in the precision it was exported with
        return "CUDAExecutionProvider", {"device_id": str(device)}
    if kind == "cpu":
        return "CPUExecutionProvider", {}
    raise ProviderError(f"provider {provider!r} is not 'tensorrt', 'cuda' or 'cpu'")


def session_providers(names, precision: str, cache_dir) -> list:
    """``--providers tensorrt,cuda,cpu`` -> ORT's providers list with options."""
    return [ort_provider_options(n, precision, cache_dir) for n in names]


# ONNX Runtime's tensor type strings for the manifest's dtypes
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
             "int32": "tensor(int32)"}


def check_signature(file: str, art: dict, inputs, outputs) -> None:
    """The graph's inputs and outputs (ORT NodeArg-likes: name, type, shape) against the
    manifest: names in order, dtypes, ranks, and every dim the graph fixes must be the dim the
    manifest fixes (a graph that fixes a dynamic axis, or another size, is refused at load: a
    rehashed graph with another input size or output width otherwise fails mid-answer)."""
    for side, want, got in (("inputs", art["inputs"], inputs), ("outputs", art["outputs"], outputs)):
        names = [g.name for g in got]
        if names != [t["name"] for t in want]:
            raise BundleError(f"{file} has {side} {names}, manifest says {[t['name'] for t in want]}", hint=REBUILD)
        for t, g in zip(want, got):
            if ORT_TYPES.get(t["dtype"]) != g.type:
                raise BundleError(f"{file}: {side[:-1]} {t['name']} is {g.type}, manifest says {t['dtype']}",
                                  hint=REBUILD)
            shape = list(g.shape) if g.shape is not None else None
            if shape is None or len(shape) != len(t["shape"]):
                raise BundleError(f"{file}: {side[:-1]} {t['name']} has shape {shape}, manifest says "
                                  f"{t['shape']}", hint=REBUILD)
            for i, (m, d) in enumerate(zip(t["shape"], shape)):
                if isinstance(d, int) and d > 0 and d != m:
                    raise BundleError(f"{file}: {side[:-1]} {t['name']} dim {i} is {d}, manifest says {m} "
                                      f"(shape {t['shape']})", hint=REBUILD)


class OnnxStage:
    """One ONNX graph in ONNX Runtime. Inputs and outputs are named as in the manifest."""

    def __init__(self, manifest: Manifest, name: str, providers=None, threads: int | None = None):
        import onnxruntime as ort

        self.name = name
        art = manifest.artifact(name)
        if art.get("backend", "onnxruntime") != "onnxruntime":
            raise BundleError(f"artifact '{name}' is for backend {art.get('backend')!r}, not onnxruntime")
        path = manifest.path(art["file"])
        opts = ort_session_options(ort, threads)   # spinning off: runtime/threads.py
        providers = list(providers or DEFAULT_PROVIDERS)
        missing = [p if isinstance(p, str) else p[0] for p in providers]
        missing = [p for p in missing if p not in ort.get_available_providers()]
        if missing:
            raise BundleError(f"ONNX Runtime here lacks {', '.join(missing)} (available: "
                              f"{', '.join(ort.get_available_providers())})",
                              hint="install onnxruntime-gpu for CUDA/TensorRT providers")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers,
                                                disabled_optimizers=list(DISABLED_OPTIMIZERS.get(
                                                    art.get("precision", "fp32"), ())))
        except Exception as e:  # ORT raises its own exception types for bad graphs
            raise BundleError(f"cannot load {art['file']}: {str(e).splitlines()[0]}", hint=REBUILD) from None
        self.input_names = [t["name"] for t in art["inputs"]]
        self.output_names = [t["name"] for t in art["outputs"]]
        check_signature(art["file"], art, self.session.get_inputs(), self.session.get_outputs())
        self.providers = self.session.get_providers()

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outs))
