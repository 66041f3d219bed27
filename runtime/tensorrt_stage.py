"""Run one bundle graph as a TensorRT engine, with the same call interface as ``OnnxStage``.

A serialized engine only runs where it was built: same TensorRT version, same GPU (compute
capability and model), same JetPack/L4T release. The manifest's ``engine`` record holds that
identity; ``TensorRTStage`` compares it with this machine *before* deserializing and refuses a
mismatch with the rebuild command. It never rebuilds or falls back to another backend.

TensorRT and torch (device buffers and the CUDA stream) are imported inside the class, so this
module imports on machines that have neither.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np

from .errors import BundleError, IbEdgeError, InputError
from .manifest import Manifest

TEGRA_RELEASE = "/etc/nv_tegra_release"

# Fields of the engine record that make an engine non-portable, with how to name them.
IDENTITY_FIELDS = {
    "tensorrt": "TensorRT version",
    "gpu_name": "GPU",
    "compute_capability": "GPU compute capability",
    "l4t": "JetPack/L4T release",
}


class TensorRTRuntimeError(IbEdgeError):
    """TensorRT refused a call while running an engine (shape, address or enqueue failed)."""


# --- platform identity ------------------------------------------------------------------
def parse_l4t_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 3.0, GCID: ...`` -> ``R36.3.0``. A line that does not
    parse is returned as is (still compared), empty text gives None."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)", text)
    if m:
        return f"R{m.group(1)}.{m.group(2).rstrip('.')}"
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    return first or None


def read_l4t_release(path: str | Path = TEGRA_RELEASE) -> str | None:
    """The L4T release of a Jetson (JetPack 6.0 is R36.3.0), None elsewhere."""
    try:
        return parse_l4t_release(Path(path).read_text(encoding="utf-8", errors="replace"))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _torch_gpu(device: int) -> tuple[str | None, str | None, str | None]:
    try:
        import torch
    except ImportError:
        return None, None, None
    if not torch.cuda.is_available():
        return None, None, torch.version.cuda
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}", torch.version.cuda


def _cuda_driver_version() -> str | None:
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    v = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
        return None
    return f"{v.value // 1000}.{(v.value % 1000) // 10}"


def _tensorrt_version() -> str | None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    import tensorrt

    return tensorrt.__version__


def platform_identity(*, device: int = 0, gpu: tuple[str, str | tuple[int, int]] | None = None,
                      tensorrt_version: str | None = None, tegra_release: str | Path = TEGRA_RELEASE) -> dict:
    """What makes an engine built here non-portable, plus CUDA versions for the record.

    ``gpu=(name, capability)`` and ``tensorrt_version`` replace the queries (torch.cuda and the
    tensorrt module, both imported lazily) for tests and for callers that already know them."""
    cuda_runtime = None
    if gpu is None:
        name, cap, cuda_runtime = _torch_gpu(device)
    else:
        name, cap = gpu
        cap = f"{cap[0]}.{cap[1]}" if isinstance(cap, (tuple, list)) else cap
    return {
        "tensorrt": tensorrt_version if tensorrt_version is not None else _tensorrt_version(),
        "gpu_name": name,
        "compute_capability": cap,
        "l4t": read_l4t_release(tegra_release),
        "cuda_runtime": cuda_runtime,
        "cuda_driver": _cuda_driver_version() if gpu is None else None,
    }


def engine_mismatches(recorded: dict, current: dict) -> list[str]:
    """One line per identity field that differs: what the bundle says vs this machine."""
    out = []
    for key, label in IDENTITY_FIELDS.items():
        if key not in recorded:
            out.append(f"{label}: not recorded in the bundle, this machine {current.get(key)!r}")
        elif recorded[key] != current.get(key):
            out.append(f"{label}: bundle {recorded[key]!r}, this machine {current.get(key)!r}")
    return out


def rebuild_command(manifest: Manifest, precision: str | None = None) -> str:
    model = (manifest.data.get("source") or {}).get("model", "MODEL")
    precision = precision or manifest.data.get("precision", "fp16")
    return (f"ib-export {shlex.quote(str(model))} --precision {precision} --backend tensorrt "
            f"--out {shlex.quote(str(manifest.root))}")


def check_profile(name: str, shape: tuple[int, ...], profile: tuple) -> None:
    """Refuse a shape the engine was not built for (outside its optimization profile)."""
    lo, _, hi = profile
    if len(shape) != len(lo) or any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi)):
        raise InputError(f"{name} has shape {list(shape)}, outside the engine's profile "
                         f"(min {list(lo)}, max {list(hi)})",
                         hint="rebuild the engine with a wider profile, or split the batch")


# --- device memory ------------------------------------------------------------------------
class TorchCudaBuffers:
    """Device buffers and one CUDA stream from torch (present on every GPU host we target)."""

    def __init__(self, device: int = 0):
        import torch

        if not torch.cuda.is_available():
            raise BundleError("no CUDA device is visible to torch; TensorRT engines need one",
                              hint="run on the GPU host, or use the ONNX bundle on CPU")
        self.torch, self.device = torch, torch.device("cuda", device)
        self.stream = torch.cuda.Stream(device=self.device)
        self.handle = self.stream.cuda_stream

    def upload(self, array: np.ndarray):
        with self.torch.cuda.stream(self.stream):
            return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def empty(self, shape: tuple[int, ...], dtype):
        with self.torch.cuda.stream(self.stream):
            return self.torch.empty(shape, dtype=dtype, device=self.device)

    def synchronize(self) -> None:
        self.stream.synchronize()


def _torch_dtypes(trt, torch) -> dict:
    pairs = [("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"), ("int8", "int8"),
             ("int32", "int32"), ("int64", "int64"), ("bool", "bool"), ("uint8", "uint8")]
    return {getattr(trt, a): getattr(torch, b) for a, b in pairs if hasattr(trt, a)}


def _numpy_dtype(torch, dtype):
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:  # bfloat16 has no numpy type
        return None


# --- the stage ----------------------------------------------------------------------------
class TensorRTStage:
    """One engine from the bundle. ``stage(**feeds)`` -> {output name: array}, like OnnxStage."""

    def __init__(self, manifest: Manifest, name: str, device: int = 0, *, identity: dict | None = None,
                 buffers=None):
        self.name = name
        art = manifest.artifact(name)
        if art.get("backend") != "tensorrt":
            raise BundleError(f"artifact '{name}' is for backend {art.get('backend', 'onnxruntime')!r}, "
                              "not tensorrt")
        rec = art.get("engine")
        if not isinstance(rec, dict) or "profiles" not in rec:
            raise BundleError(f"artifact '{name}' has no engine record", hint=rebuild_command(manifest))
        current = identity if identity is not None else platform_identity(device=device)
        mismatched = engine_mismatches(rec, current)
        if mismatched:
            raise BundleError(f"{art['file']} was built for another platform: " + "; ".join(mismatched),
                              hint="rebuild it on this machine with: "
                                   + rebuild_command(manifest, rec.get("precision")))
        self.input_names = [t["name"] for t in art["inputs"]]
        self.output_names = [t["name"] for t in art["outputs"]]
        self._out_dtype = {t["name"]: t.get("dtype") for t in art["outputs"]}
        try:
            self.profiles = {n: tuple(tuple(int(d) for d in rec["profiles"][n][k]) for k in ("min", "opt", "max"))
                             for n in self.input_names}
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"engine record of '{name}' lacks a profile for every input {self.input_names}",
                              hint=rebuild_command(manifest)) from None

        import importlib.util

        if importlib.util.find_spec("tensorrt") is None:
            raise BundleError("TensorRT is not installed here", hint="install JetPack's python3-libnvinfer")
        import tensorrt as trt

        self._buffers = buffers if buffers is not None else TorchCudaBuffers(device)
        torch = self._buffers.torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(manifest.path(art["file"]).read_bytes())
        if self._engine is None:
            raise BundleError(f"TensorRT could not deserialize {art['file']} (log above)",
                              hint=rebuild_command(manifest, rec.get("precision")))
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise TensorRTRuntimeError(f"TensorRT could not create an execution context for {art['file']}",
                                       hint="free GPU memory (other processes) and retry")
        io = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        ins = [n for n in io if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in io if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(ins) != sorted(self.input_names) or sorted(outs) != sorted(self.output_names):
            raise BundleError(f"{art['file']} has inputs {ins} and outputs {outs}; the manifest says "
                              f"{self.input_names} and {self.output_names}", hint=rebuild_command(manifest))
        to_torch = _torch_dtypes(trt, torch)
        self._dtype = {}
        for n in io:
            dt = self._engine.get_tensor_dtype(n)
            if dt not in to_torch:
                raise BundleError(f"{art['file']} tensor {n} has type {dt}, which this runtime cannot buffer")
            self._dtype[n] = to_torch[dt]
        self.providers = ["TensorRT"]

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._buffers.torch
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"stage '{self.name}' needs inputs {missing}")
        arrays = {}
        for n in self.input_names:
            a = np.asarray(feeds[n])
            check_profile(n, a.shape, self.profiles[n])
            want = _numpy_dtype(torch, self._dtype[n])
            if a.dtype != want:
                raise InputError(f"{n} is {a.dtype}, the engine takes {want}")
            arrays[n] = a
        ctx, keep = self._context, {}
        for n, a in arrays.items():
            keep[n] = self._buffers.upload(a)
            if not ctx.set_input_shape(n, tuple(a.shape)):
                raise TensorRTRuntimeError(f"TensorRT refused shape {list(a.shape)} for {n}")
            if not ctx.set_tensor_address(n, keep[n].data_ptr()):
                raise TensorRTRuntimeError(f"TensorRT refused the device address of {n}")
        for n in self.output_names:
            shape = tuple(ctx.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise TensorRTRuntimeError(f"TensorRT could not infer the shape of {n} (got {list(shape)})")
            keep[n] = self._buffers.empty(shape, self._dtype[n])
            if not ctx.set_tensor_address(n, keep[n].data_ptr()):
                raise TensorRTRuntimeError(f"TensorRT refused the device address of {n}")
        if not ctx.execute_async_v3(self._buffers.handle):
            raise TensorRTRuntimeError(f"TensorRT failed to enqueue stage '{self.name}' (log above)")
        self._buffers.synchronize()
        out = {}
        for n in self.output_names:
            t = keep[n]
            if self._out_dtype.get(n) and hasattr(torch, self._out_dtype[n]):
                t = t.to(getattr(torch, self._out_dtype[n]))
            out[n] = t.cpu().numpy()
        return out
