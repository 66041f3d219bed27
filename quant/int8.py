"""INT8 by explicit quantization: Q/DQ ONNX graphs that ONNX Runtime and TensorRT both consume.

Search apart from apply (llm-awq's split):
  * ``search`` measures what quantizing costs at the stage output and, while the drift budget
    fails, keeps the most sensitive nodes in higher precision. It returns an ``Int8Recipe``.
  * ``apply`` turns a recipe + calibration feeds into a Q/DQ graph, deterministically. A recipe
    saved as JSON re-applies to the same graph and calibration set bit for bit.

TensorRT-style: symmetric INT8 activations (per tensor) and weights (per channel). The default
op set is MatMul/Conv/Gemm: measured here, quantizing Add, Softmax or LayerNormalization
collapses proof-task accuracy (99.7% -> 58-83%), MatMul/Conv/Gemm only keeps it.
Model-agnostic: nothing here knows InstructBLIP; inputs are ONNX paths and feed dicts.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .drift import DriftStats, compare

DEFAULT_OP_TYPES = ("MatMul", "Conv", "Gemm")
METHODS = ("minmax", "percentile")


@dataclasses.dataclass(frozen=True)
class Int8Recipe:
    """The saved result of a search: everything ``apply`` needs besides the feeds."""
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    exclude: tuple[str, ...] = ()
    method: str = "minmax"
    percentile: float = 99.999
    per_channel: bool = True
    symmetric: bool = True
    calibration_sha256: str | None = None
    graph_sha256: str | None = None          # the fp32 graph the recipe was searched on

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Int8Recipe":
        data = dict(data)
        for k in ("op_types", "exclude"):
            data[k] = tuple(data.get(k, ()))
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Int8Recipe":
        return cls.from_json(json.loads(Path(path).read_text()))


class _Reader:
    """ORT CalibrationDataReader over a list of feed dicts (re-iterable via rewind)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


def _quiet_ort_quantization() -> None:
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs per-weight warnings on the root logger


def _large(path: Path) -> bool:
    return sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + "*")) > 1_800_000_000


def apply(fp32_path: Path, out_path: Path, recipe: Int8Recipe, calib_feeds: list[dict[str, np.ndarray]]) -> Path:
    """Quantize ``fp32_path`` per ``recipe`` with ``calib_feeds``; write a Q/DQ graph to ``out_path``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if recipe.method not in METHODS:
        raise ValueError(f"calibration method {recipe.method!r}: use one of {METHODS}")
    _quiet_ort_quantization()
    method = CalibrationMethod.MinMax if recipe.method == "minmax" else CalibrationMethod.Percentile
    extra = {"ActivationSymmetric": recipe.symmetric, "WeightSymmetric": True}
    if recipe.method == "percentile":
        extra["CalibPercentile"] = recipe.percentile
    with tempfile.TemporaryDirectory(prefix="ib-int8-") as work:
        extra["CalibTensorRangeSymmetric"] = recipe.symmetric
        quantize_static(
            str(fp32_path), str(out_path), _Reader(calib_feeds),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(recipe.op_types),
            per_channel=recipe.per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=list(recipe.exclude), use_external_data_format=_large(fp32_path),
            calibrate_method=method, extra_options=extra,
            calibration_providers=["CPUExecutionProvider"],
        )
        del work
    return Path(out_path)


def run_graph(path: Path, feeds: list[dict[str, np.ndarray]], output: str) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return [sess.run([output], {n: f[n] for n in names})[0] for f in feeds]


def candidate_nodes(fp32_path: Path, op_types) -> list[str]:
    import onnx

    model = onnx.load(str(fp32_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in op_types]


def node_sensitivity(fp32_path: Path, qdq_path: Path, feeds: list[dict[str, np.ndarray]],
                     candidates: list[str]) -> list[tuple[str, float]]:
    """Rank candidate nodes by the SQNR (dB) of their own quantized activation inputs in the
    Q/DQ graph (pre- vs post-Q/DQ): lowest first = most sensitive. One run of each graph."""
    import onnx
    from onnxruntime.quantization import qdq_loss_debug as dbg

    with tempfile.TemporaryDirectory(prefix="ib-sens-") as work:
        aug = Path(work) / "aug.onnx"
        dbg.modify_model_output_intermediate_tensors(str(qdq_path), str(aug), save_as_external_data=_large(qdq_path))
        acts = dbg.collect_activations(str(aug), _Reader(feeds))
    matching = dbg.create_activation_matching(acts)
    errs = dbg.compute_activation_error(matching)
    model = onnx.load(str(fp32_path), load_external_data=False)
    scores = []
    wanted = set(candidates)
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        vals = [errs[i]["qdq_err"] for i in node.input if i in errs and "qdq_err" in errs[i]]
        scores.append((node.name, float(min(vals)) if vals else float("inf")))
    scores.sort(key=lambda kv: kv[1])
    return scores


@dataclasses.dataclass
class SearchStep:
    excluded: int
    drift: DriftStats

    def to_json(self) -> dict:
        return {"excluded": self.excluded, **self.drift.to_json()}


def search(fp32_path: Path, out_path: Path, output: str, calib_feeds, heldout_feeds,
           within_budget: Callable[[DriftStats], bool], *, base: Int8Recipe = Int8Recipe(),
           max_excluded_fraction: float = 0.5, name: str = "graph", log: Callable[[str], None] = lambda s: None,
           ) -> tuple[Int8Recipe, DriftStats, list[SearchStep]]:
    """Find the recipe with the fewest exclusions whose drift on ``heldout_feeds`` is within
    budget: quantize everything in ``base.op_types``; while over budget, rank nodes by
    sensitivity and exclude the most sensitive 1, 2, 4, ... The last applied graph is left at
    ``out_path``. Raises RuntimeError if even ``max_excluded_fraction`` exclusions fail."""
    ref = run_graph(fp32_path, heldout_feeds, output)
    candidates = candidate_nodes(fp32_path, base.op_types)
    recipe = base
    apply(fp32_path, out_path, recipe, calib_feeds)
    drift = compare(ref, run_graph(out_path, heldout_feeds, output))
    steps = [SearchStep(0, drift)]
    log(f"      {name} int8: {len(candidates)} {'/'.join(base.op_types)} nodes, 0 excluded: {drift.line()}")
    if within_budget(drift):
        return recipe, drift, steps
    ranking = [n for n, _ in node_sensitivity(fp32_path, out_path, heldout_feeds[:4], candidates)]
    k, limit = 1, max(1, int(len(candidates) * max_excluded_fraction))
    while True:
        k = min(k, limit)
        recipe = dataclasses.replace(base, exclude=tuple(sorted(set(base.exclude) | set(ranking[:k]))))
        apply(fp32_path, out_path, recipe, calib_feeds)
        drift = compare(ref, run_graph(out_path, heldout_feeds, output))
        steps.append(SearchStep(k, drift))
        log(f"      {name} int8: {k} most sensitive excluded: {drift.line()}")
        if within_budget(drift):
            return recipe, drift, steps
        if k >= limit:
            raise RuntimeError(f"INT8 drift still over budget with {k} of {len(candidates)} nodes excluded: "
                               f"{drift.line()}")
        k *= 2
