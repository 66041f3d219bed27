"""Export one graph with torch.onnx's dynamo exporter, then validate it against PyTorch fp32.

Validation follows optimum's exporters: onnx.checker, then ONNX Runtime on fresh inputs at
other batch sizes and instruction lengths than traced (with padding in the mask): shapes first,
then values, every failure collected into one typed error.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np

from .specs import BATCH, TEXT, GraphSpec

# protobuf's hard limit is 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
TRACE_SHAPE = (2, 8)                                  # (batch, instruction length) traced
VALIDATION_SHAPES = ((1, 5), (3, 13))                 # different from the traced ones


class ExportValidationError(RuntimeError):
    """An exported graph disagrees with PyTorch. ``failures`` lists every problem found."""

    def __init__(self, stage: str, failures: list[str]):
        self.stage, self.failures = stage, failures
        super().__init__(f"{stage} graph failed validation:\n  - " + "\n  - ".join(failures))


@dataclasses.dataclass
class ParityReport:
    stage: str
    cosine: float            # worst over validation cases
    max_abs: float           # worst over validation cases
    ref_max_abs: float       # magnitude of the reference output, for scale
    cases: list[str]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two tensors, flattened per batch row; the worst row is returned."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)))


def _dynamic_shapes(spec: GraphSpec, module_arg_names: list[str]):
    import torch

    dims = {BATCH: torch.export.Dim("batch", min=1, max=1024),
            TEXT: torch.export.Dim("text_len", min=1, max=4096)}
    shapes = {}
    for arg, t in zip(module_arg_names, spec.inputs):
        shapes[arg] = {i: dims[a] for i, a in enumerate(t.shape) if isinstance(a, str)}
    return shapes


def export_graph(module, spec: GraphSpec, path: Path, rng: np.random.Generator) -> Path:
    """Export ``module`` (a wrapper from wrappers.py) to ``path``; returns the path written."""
    import inspect

    import torch

    import logging

    # "torchvision is not installed. Skipping torchvision::nms" and friends, on every export.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    path = Path(path)
    feeds = spec.make_inputs(rng, *TRACE_SHAPE)
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    arg_names = list(inspect.signature(module.forward).parameters)
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = n_bytes > EXTERNAL_DATA_THRESHOLD
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter chatter; failures raise
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=spec.opset,
                input_names=spec.input_names, output_names=spec.output_names,
                dynamic_shapes=_dynamic_shapes(spec, arg_names), verbose=False,
            )
        program.save(str(path), external_data=external)
        del program
    finally:  # also when export or save fails: the rules' last match would pin the model
        _release_rewriter_state()
    return path


def _release_rewriter_state() -> None:
    """onnxscript 0.7's rewrite rules (module-level, e.g. onnxscript.rewriter.rules.common) keep
    their last match on each rule's matcher (``_graph``, ``_match``, ``_current_node``,
    ``_tracer``; all reset at the start of the next match), so the exported ONNX IR graph
    outlives the export, and with it the torch parameters its initializers wrap. Measured: the
    real-shape checkpoint's safetensors mapping (3.1 GB resident at 8 layers) stayed in RSS after
    export_bundle returned, and INT8 calibration stacked on top of it. Best effort."""
    import gc

    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:
        return
    for obj in gc.get_objects():
        if isinstance(obj, PatternMatcher):
            for attr in ("_graph", "_match", "_tracer"):
                obj.__dict__.pop(attr, None)
            obj.__dict__["_current_node"] = None


def graph_files(path: Path) -> list[Path]:
    """The ONNX file plus any external-data files it references."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    files = {path}
    for init in model.graph.initializer:
        if uses_external_data(init):
            for kv in init.external_data:
                if kv.key == "location":
                    files.add(path.parent / kv.value)
    return sorted(files)


def validate_graph(module, spec: GraphSpec, path: Path, rng: np.random.Generator,
                   providers: list[str] | None = None) -> ParityReport:
    """onnx.checker, then ORT vs PyTorch on fresh inputs; raises ExportValidationError."""
    import onnx
    import onnxruntime as ort
    import torch

    failures: list[str] = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # the checker raises several types; all are fatal here
        raise ExportValidationError(spec.stage, [f"onnx.checker: {e}"]) from e

    sess = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    got_in = [i.name for i in sess.get_inputs()]
    got_out = [o.name for o in sess.get_outputs()]
    if got_in != spec.input_names:
        failures.append(f"inputs are {got_in}, spec says {spec.input_names}")
    if got_out != spec.output_names:
        failures.append(f"outputs are {got_out}, spec says {spec.output_names}")
    if failures:
        raise ExportValidationError(spec.stage, failures)

    worst_cos, worst_abs, ref_scale, cases = 1.0, 0.0, 0.0, []
    for batch, text_len in VALIDATION_SHAPES:
        feeds = spec.make_inputs(rng, batch, text_len)
        case = f"batch={batch} text_len={text_len}"
        with torch.no_grad():
            ref = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
        refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        outs = sess.run(None, feeds)
        for name, r, o, t in zip(spec.output_names, refs, outs, spec.outputs):
            r = r.numpy()
            if o.shape != r.shape:  # shapes first: values of a wrong shape mean nothing
                failures.append(f"{case}: {name} shape {o.shape}, PyTorch gives {r.shape}")
                continue
            if str(o.dtype) != t.dtype:
                failures.append(f"{case}: {name} dtype {o.dtype}, spec says {t.dtype}")
            if not np.all(np.isfinite(o)):
                failures.append(f"{case}: {name} has non-finite values")
                continue
            cos = cosine(o, r)
            abs_err = float(np.max(np.abs(o.astype(np.float64) - r)))
            scale = float(np.max(np.abs(r)))
            worst_cos, worst_abs, ref_scale = min(worst_cos, cos), max(worst_abs, abs_err), max(ref_scale, scale)
            tol = spec.tolerance
            if cos < tol.min_cosine:
                failures.append(f"{case}: {name} cosine {cos:.7f} < {tol.min_cosine}")
            if abs_err > tol.max_abs_rel * max(scale, 1e-6):
                failures.append(f"{case}: {name} max-abs {abs_err:.3g} > {tol.max_abs_rel:g} x {scale:.3g}")
        cases.append(case)
    if failures:
        raise ExportValidationError(spec.stage, failures)
    return ParityReport(spec.stage, worst_cos, worst_abs, ref_scale, cases)
