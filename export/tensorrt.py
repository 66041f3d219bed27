"""Build TensorRT engines from the bundle's ONNX graphs: one strongly typed path for
TensorRT 10.x and 11.x.

TensorRT 11 builds every network strongly typed and has no precision builder flags (FP16, INT8,
BF16, ... and the precision-constraint flags are gone from its Python API; read from the
``tensorrt-cu12-bindings`` 11.4.0.106 wheel, see tests/trt_api/). TensorRT 10.x builds strongly
typed when the network is created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, which
11.x keeps and ignores. So every engine is built strongly typed, without precision flags, and
the precision comes from the graph: fp32 from the fp32 graph (TF32 off), fp16 from the bundle's
fp16 graph, INT8 from a Q/DQ graph whose unquantized parts are fp16 (``quant/trt_int8.py``).
``ib_edge.quant.trt_int8.check`` verifies the graph matches the requested precision (and
refuses NVIDIA/TensorRT#4832's pattern) before TensorRT is imported.

``build_engine`` parses the ONNX file (a parse failure is fatal and lists every parser error),
sets one optimization profile covering every input, the workspace limit and an optional timing
cache, then writes the serialized engine atomically and returns the record the manifest keeps
under the artifact's ``engine`` key: platform identity + precision + profiles + workspace + how
it was built. The runtime (``ib_edge.runtime.tensorrt_stage``) refuses an engine whose identity
differs from the machine it runs on.

``tensorrt`` is imported inside the functions that need it: this module imports without it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from ib_edge.quant import trt_int8
from ib_edge.runtime.errors import IbEdgeError
from ib_edge.runtime.stages import PRECISIONS, ort_provider_options  # noqa: F401  (re-exported)
from ib_edge.runtime.tensorrt_stage import (  # noqa: F401  (re-exported: the export side records them)
    IDENTITY_FIELDS, engine_mismatches, parse_l4t_release, platform_identity)

# 1 GiB: the largest scratch a ViT-g/Q-Former layer tactic is allowed. Jetson Orin shares its
# 8-64 GB between CPU and GPU, and the LLM must fit beside the engines at run time; TensorRT
# skips tactics that need more than this rather than failing, so a small pool costs a little
# speed, never correctness. Raise it on discrete GPUs with memory to spare.
DEFAULT_WORKSPACE_MB = 1024
DEFAULT_BATCH = (1, 1, 4)          # (min, opt, max): one image per prompt is the common case
DEFAULT_TEXT_LEN = (1, 32, 128)    # Q-Former instruction tokens; 128 covers long prompts


class TensorRTBuildError(IbEdgeError):
    """The engine could not be built (bad profile, unparsable graph, builder failure)."""


Triple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


# --- profiles -----------------------------------------------------------------------------
def _axis_range(name: str, rng) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(v) for v in rng)
    except (TypeError, ValueError):
        raise TensorRTBuildError(f"{name} range must be (min, opt, max) integers, got {rng!r}") from None
    if lo < 1 or not lo <= opt <= hi:
        raise TensorRTBuildError(f"{name} range {(lo, opt, hi)} must satisfy 1 <= min <= opt <= max")
    return lo, opt, hi


def validate_profiles(profiles: dict[str, Triple]) -> dict[str, Triple]:
    """Every (min, opt, max) of the same rank, all dims >= 1, min <= opt <= max elementwise."""
    out = {}
    for name, triple in profiles.items():
        try:
            lo, opt, hi = (tuple(int(d) for d in s) for s in triple)
        except (TypeError, ValueError):
            raise TensorRTBuildError(f"profile for {name} must be (min, opt, max) shapes, got {triple!r}") from None
        if not len(lo) == len(opt) == len(hi):
            raise TensorRTBuildError(f"profile for {name} mixes ranks: {lo}, {opt}, {hi}")
        if min(lo + opt + hi, default=1) < 1:
            raise TensorRTBuildError(f"profile for {name} has a dimension below 1: {lo}, {opt}, {hi}")
        bad = [i for i in range(len(lo)) if not lo[i] <= opt[i] <= hi[i]]
        if bad:
            raise TensorRTBuildError(f"profile for {name} breaks min <= opt <= max on axis {bad}: "
                                     f"min {lo}, opt {opt}, max {hi}")
        out[name] = (lo, opt, hi)
    return out


def profiles_from_manifest_inputs(inputs: list[dict], batch=DEFAULT_BATCH,
                                  text_len=DEFAULT_TEXT_LEN) -> dict[str, Triple]:
    """Manifest tensor specs with symbolic axes ("batch", "text_len") -> concrete (min, opt, max)."""
    axes = {"batch": _axis_range("batch", batch), "text_len": _axis_range("text_len", text_len)}
    out = {}
    for t in inputs:
        name, dims = t["name"], t["shape"]
        lo, opt, hi = [], [], []
        for d in dims:
            if isinstance(d, str):
                if d not in axes:
                    raise TensorRTBuildError(f"{name} has dynamic axis {d!r}; profiles know {sorted(axes)}")
                r = axes[d]
            elif isinstance(d, int) and not isinstance(d, bool) and d >= 1:
                r = (d, d, d)
            else:
                raise TensorRTBuildError(f"{name} has dimension {d!r}; expected an axis name or an int >= 1")
            lo.append(r[0]), opt.append(r[1]), hi.append(r[2])
        out[name] = (tuple(lo), tuple(opt), tuple(hi))
    return out


def profiles_to_json(profiles: dict[str, Triple]) -> dict:
    return {n: {"min": list(lo), "opt": list(opt), "max": list(hi)} for n, (lo, opt, hi) in profiles.items()}


# --- building -----------------------------------------------------------------------------
def _import_tensorrt():
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        raise TensorRTBuildError("TensorRT is not installed here",
                                 hint="build engines on the GPU host (JetPack ships python3-libnvinfer)")
    import tensorrt

    return tensorrt


def _atomic_write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _parser_error(err) -> str:
    node = err.node()
    where = f"node {node}" if node >= 0 else "graph"
    name = err.node_name() if hasattr(err, "node_name") else ""
    op = err.node_operator() if hasattr(err, "node_operator") else ""
    if name or op:
        where += f" ({' '.join(x for x in (op, name) if x)})"
    return f"{where}: {err.desc()}"


def network_flags(trt) -> int:
    """Creation flags for a strongly typed network: ``1 << STRONGLY_TYPED`` where TensorRT has
    the flag (10.x: required for strong typing; 11.x: kept, ignored, always strongly typed).
    A TensorRT without it builds strongly typed only from 11 on; older ones are refused."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is not None:
        return 1 << int(flag)
    try:
        major = int(str(trt.__version__).split(".")[0])
    except ValueError:
        major = 0
    if major >= 11:
        return 0
    raise TensorRTBuildError(f"TensorRT {trt.__version__} cannot build strongly typed networks",
                             hint="use TensorRT 10.x (JetPack 6) or newer")


def check_graph(onnx_path: Path, precision: str) -> None:
    """Refuse a graph whose types do not make a strongly typed ``precision`` engine."""
    problems = trt_int8.check(onnx_path, precision)
    if problems:
        hint = {"int8": "build from the INT8-over-FP16 graph ib-export --backend tensorrt writes "
                        "(ib_edge.quant.trt_int8.convert)",
                "fp16": "build from the bundle's fp16 graph (ib-export --precision fp16)"}.get(
                    precision, "build from the bundle's fp32 graph")
        raise TensorRTBuildError(f"{onnx_path.name} cannot build a strongly typed {precision} engine: "
                                 + "; ".join(problems), hint=hint)


def build_engine(onnx_path, engine_path, *, precision: str, profiles: dict[str, Triple],
                 workspace_mb: int = DEFAULT_WORKSPACE_MB, timing_cache=None,
                 log: Callable[[str], None] = print, identity: dict | None = None) -> dict:
    """ONNX file -> serialized engine at ``engine_path``; returns the manifest's engine record.

    ``identity`` replaces ``platform_identity()`` (tests, or a caller that already queried it);
    the TensorRT version is always the one that builds."""
    if precision not in PRECISIONS:
        raise TensorRTBuildError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if int(workspace_mb) < 1:
        raise TensorRTBuildError(f"workspace_mb must be >= 1, got {workspace_mb}")
    profiles = validate_profiles(profiles)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise TensorRTBuildError(f"ONNX graph not found: {onnx_path}")
    check_graph(onnx_path, precision)
    trt = _import_tensorrt()
    ident = dict(identity if identity is not None else platform_identity(tensorrt_version=trt.__version__),
                 tensorrt=trt.__version__)
    unknown = [IDENTITY_FIELDS[k] for k in ("gpu_name", "compute_capability") if not ident.get(k)]
    if unknown:
        raise TensorRTBuildError(f"cannot record the engine's platform: {', '.join(unknown)} unknown",
                                 hint="build on the GPU host with torch (CUDA) installed; the runtime "
                                      "refuses engines whose platform it cannot compare")
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))  # reads external data beside the file
    errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok or errors:
        raise TensorRTBuildError(f"TensorRT {trt.__version__} could not parse {onnx_path.name} "
                                 f"({len(errors)} error(s)):\n  - " + "\n  - ".join(errors or ["(no detail)"]),
                                 hint="re-export with an opset/ops this TensorRT supports, or upgrade TensorRT")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = [t.name for t in inputs]
    missing, extra = [n for n in names if n not in profiles], [n for n in profiles if n not in names]
    if missing or extra:
        raise TensorRTBuildError(f"profiles must cover exactly the graph's inputs {names}: "
                                 f"missing {missing}, unknown {extra}")
    for t in inputs:
        if len(t.shape) != len(profiles[t.name][0]):
            raise TensorRTBuildError(f"profile for {t.name} has rank {len(profiles[t.name][0])}, "
                                     f"the graph's input has rank {len(t.shape)} ({tuple(t.shape)})")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    # No precision flags (11.x has none; a strongly typed 10.x network must not set them): the
    # graph's types decide. TF32 off, so fp32 tensors (the fp32 graph; the fp16 graph's kept-fp32 norms) stay
    # fp32: TF32 matmuls drift ~1e-3.
    config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name in names:
        try:
            profile.set_shape(name, *profiles[name])
        except RuntimeError as e:
            raise TensorRTBuildError(f"TensorRT rejected the profile for {name}: {e}") from None
    if config.add_optimization_profile(profile) < 0:
        raise TensorRTBuildError("TensorRT rejected the optimization profile (log above)")
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise TensorRTBuildError(f"timing cache {timing_cache} does not fit this TensorRT/GPU",
                                     hint=f"delete {timing_cache} and build again")

    log(f"building {precision} engine from {onnx_path.name} (TensorRT {trt.__version__}, "
        f"workspace {workspace_mb} MiB); this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT could not build an engine from {onnx_path.name} (log above)",
                                 hint="if the log mentions memory, lower the profile's max shapes or raise "
                                      "workspace_mb")
    _atomic_write(engine_path, serialized)
    if timing_cache is not None:
        _atomic_write(timing_cache, config.get_timing_cache().serialize())
    seconds = time.perf_counter() - t0
    log(f"wrote {engine_path.name} ({engine_path.stat().st_size / 2**20:.1f} MiB) in {seconds:.0f} s")
    return {
        **ident,
        "precision": precision,
        "profiles": profiles_to_json(profiles),
        "workspace_mb": int(workspace_mb),
        "strongly_typed": True, "network_flags": flags, "tf32": False,
        "built_from": onnx_path.name,
        "build_s": round(seconds, 1),
    }
