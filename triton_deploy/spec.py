"""The four Triton models as data, rendered to config.pbtxt.

A model is a frozen ``ModelSpec``; ``render`` writes Triton's protobuf text format (the tests
parse every file with Triton's own ``model_config_pb2``). Tensor names, dtypes and dims come
from the bundle's manifest; ``instructblip`` and ``llm`` have fixed signatures, defined here.
"""
from __future__ import annotations

import dataclasses

from ib_edge.runtime.errors import BundleError, InputError

# manifest dtype -> Triton data type
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                 "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8"}
VARIANTS = ("ngc", "python")
MODELS = ("vision", "qformer", "llm", "instructblip")


@dataclasses.dataclass(frozen=True)
class Generation:
    """Generation parameters of one request; the defaults and limits are ib-run's (tested)."""
    max_new_tokens: int = 32
    num_beams: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> "Generation":
        if not 1 <= self.max_new_tokens <= 4096:
            raise InputError("max_new_tokens must be between 1 and 4096")
        if not 1 <= self.num_beams <= 16:
            raise InputError("num_beams must be between 1 and 16")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError("top_p must be in (0, 1]")
        if self.temperature < 0:
            raise InputError("temperature must be >= 0")
        if self.num_beams > 1 and (self.temperature > 0 or self.top_p < 1.0):
            raise InputError("sampling (temperature/top_p) and beam search (num_beams) exclude each other")
        return self

    def as_kwargs(self) -> dict:
        return dataclasses.asdict(self)


# Optional generation inputs of ``instructblip`` and ``llm``: name -> (Triton type, numpy dtype)
GENERATION_INPUTS = {"max_new_tokens": ("TYPE_INT32", "int32"), "num_beams": ("TYPE_INT32", "int32"),
                     "temperature": ("TYPE_FP32", "float32"), "top_p": ("TYPE_FP32", "float32"),
                     "seed": ("TYPE_INT64", "int64")}


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int
    instances: int
    kind: str = "KIND_CPU"            # KIND_CPU | KIND_GPU
    backend: str | None = "python"    # python-backend models
    platform: str | None = None       # onnxruntime_onnx | tensorrt_plan
    default_model_filename: str | None = None
    dynamic_batching: bool = False
    parameters: tuple[tuple[str, str], ...] = ()


def manifest_tensor(rec: dict, batched: bool) -> Tensor:
    """A manifest tensor record -> Triton tensor; the batch dim is dropped when Triton batches,
    named (dynamic) dims become -1."""
    if rec["dtype"] not in TRITON_DTYPES:
        raise BundleError(f"tensor {rec['name']} has dtype {rec['dtype']}, which this exporter does not map")
    shape = list(rec["shape"])
    if batched:
        shape = shape[1:]
    return Tensor(rec["name"], TRITON_DTYPES[rec["dtype"]], tuple(d if isinstance(d, int) else -1 for d in shape))


def generation_inputs() -> tuple[Tensor, ...]:
    return tuple(Tensor(n, t, (1,), optional=True) for n, (t, _) in GENERATION_INPUTS.items())


# --- config.pbtxt ------------------------------------------------------------------------
def _tensor(t: Tensor) -> str:
    parts = [f'name: "{t.name}"', f"data_type: {t.data_type}", f"dims: [ {', '.join(map(str, t.dims))} ]"]
    if t.optional:
        parts.append("optional: true")
    return "  {\n" + "".join(f"    {p}\n" for p in parts) + "  }"


def render(m: ModelSpec) -> str:
    lines = [f'name: "{m.name}"']
    if m.backend:
        lines.append(f'backend: "{m.backend}"')
    if m.platform:
        lines.append(f'platform: "{m.platform}"')
    if m.default_model_filename:
        lines.append(f'default_model_filename: "{m.default_model_filename}"')
    lines.append(f"max_batch_size: {m.max_batch_size}")
    lines.append("input [\n" + ",\n".join(_tensor(t) for t in m.inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor(t) for t in m.outputs) + "\n]")
    lines.append(f"instance_group [\n  {{\n    count: {m.instances}\n    kind: {m.kind}\n  }}\n]")
    if m.dynamic_batching:
        lines.append("dynamic_batching { }")
    for key, value in m.parameters:
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}')
    return "\n".join(lines) + "\n"
