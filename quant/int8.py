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
    # One Q/DQ pair per consumer of a tensor (ORT's DedicatedQDQPair), so that every quantized
    # MatMul can fuse into QLinearMatMul (see runtime.stages.DISABLED_OPTIMIZERS). Recipes saved
    # before this field existed re-apply without it.
    dedicated_qdq_pair: bool = True
    # Weights in 7 bits ([-64, 63], ORT's reduce_range). x86 CPUs without VNNI (AVX2, AVX-512F)
    # run ORT's int8 MatMul/Conv with VPMADDUBSW, whose int16 pair sums saturate with full-range
    # weights (the known "saturation issue"; OpenVINO's workaround is the same 7-bit weights).
    # Measured on a 2-core AVX2-only AMD EPYC, proof-llama int8: Q-Former SQNR 24.4 -> 30.8 dB,
    # chain cosine mean 0.9897 -> 0.9954. A bundle may run on any CPU, so the CPU graph always
    # uses it. Recipes saved before this field existed re-apply without it.
    reduce_range: bool = True

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Int8Recipe":
        data = dict(data)
        for k in ("op_types", "exclude"):
            data[k] = tuple(data.get(k, ()))
        data.setdefault("dedicated_qdq_pair", False)
        data.setdefault("reduce_range", False)
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

    def __iter__(self):  # qdq_loss_debug.collect_activations iterates the reader
        return iter(self.feeds)


def _quiet_ort_quantization() -> None:
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs per-weight warnings on the root logger


def _large(path: Path) -> bool:
    return sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + "*")) > 1_800_000_000


def apply(fp32_path: Path, out_path: Path, recipe: Int8Recipe, calib_feeds: list[dict[str, np.ndarray]]) -> Path:
    """Quantize ``fp32_path`` per ``recipe`` with ``calib_feeds``; write a Q/DQ graph to ``out_path``.

    Two phases, so that at most one copy of the fp32 weights is alive at a time: the ranges are
    collected first (ORT's own calibrator, then freed) and handed to ``quantize_static`` as a
    calibration cache. Called in one go, ``quantize_static`` keeps its shape-inferred model
    while the calibrator holds the augmented copy and its session: three copies of ViT-g's
    3.9 GB of weights (measured 16.2 GiB peak at full depth)."""
    import tempfile

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if recipe.method not in METHODS:
        raise ValueError(f"calibration method {recipe.method!r}: use one of {METHODS}")
    _quiet_ort_quantization()
    extra = {"ActivationSymmetric": recipe.symmetric, "WeightSymmetric": True,
             "DedicatedQDQPair": recipe.dedicated_qdq_pair}
    # beside the output, not in $TMPDIR: the augmented copy of ViT-g is ~3.9 GB (tmpfs /tmp = RAM)
    with tempfile.TemporaryDirectory(prefix=".ib-edge-calib.", dir=Path(out_path).parent) as tmp:
        cache = Path(tmp) / "ranges.json"
        method = calibrate(fp32_path, recipe, calib_feeds, cache, Path(tmp) / "augmented.onnx")
        quantize_static(
            str(fp32_path), str(out_path), None,
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(recipe.op_types),
            per_channel=recipe.per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=list(recipe.exclude), use_external_data_format=_large(fp32_path),
            calibrate_method=method, extra_options=extra, calibration_cache_path=str(cache),
            reduce_range=recipe.reduce_range,
        )
    return Path(out_path)


def calibrate(fp32_path: Path, recipe: Int8Recipe, calib_feeds: list[dict[str, np.ndarray]],
              cache_path: Path, augmented_path: Path):
    """Collect activation ranges of ``recipe.op_types``' inputs and outputs with ONNX Runtime's
    calibrator, save them to ``cache_path`` (ORT's calibration-cache JSON) and free everything.
    Returns the ORT CalibrationMethod. The augmented proto is dropped as soon as its session
    exists (MinMax and Percentile only read the session afterwards)."""
    import gc

    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    method = CalibrationMethod.MinMax if recipe.method == "minmax" else CalibrationMethod.Percentile
    options = {"symmetric": recipe.symmetric}
    if recipe.method == "percentile":
        options["percentile"] = recipe.percentile
    calibrator = create_calibrator(Path(fp32_path), list(recipe.op_types), augmented_model_path=str(augmented_path),
                                   calibrate_method=method, use_external_data_format=_large(fp32_path),
                                   providers=["CPUExecutionProvider"], extra_options=options)
    calibrator.model = None
    gc.collect()
    calibrator.collect_data(_Reader(calib_feeds))
    save_tensors_data(calibrator.compute_data(), cache_path)
    del calibrator
    gc.collect()
    return method


def _session(model, opts):
    """A CPU session configured as the runtime runs Q/DQ graphs (CSE off; a no-op for fp32)."""
    import onnxruntime as ort

    from ib_edge.runtime.stages import DISABLED_OPTIMIZERS

    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS["int8"]))


def run_graph(path: Path, feeds: list[dict[str, np.ndarray]], output: str) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = _session(str(path), opts)
    names = [i.name for i in sess.get_inputs()]
    return [sess.run([output], {n: f[n] for n in names})[0] for f in feeds]


def candidate_nodes(fp32_path: Path, op_types) -> list[str]:
    import onnx

    model = onnx.load(str(fp32_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in op_types]


def _bypass(qdq, fp32, nodes: set[str]):
    """A copy of the Q/DQ graph in which ``nodes`` read their float inputs again (activations
    from before the QuantizeLinear, weights from the fp32 graph): what excluding them would
    give, without recalibrating."""
    import copy

    m = copy.deepcopy(qdq)
    producer = {o: n for n in m.graph.node for o in n.output}
    fp32_inits = {t.name: t for t in fp32.graph.initializer}
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    have = {t.name for t in m.graph.initializer}
    for node in m.graph.node:
        if node.name not in nodes:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]                       # activation: the float tensor
            elif node.name in fp32_nodes and k < len(fp32_nodes[node.name].input):
                orig = fp32_nodes[node.name].input[k]            # weight: the fp32 initializer
                if orig in fp32_inits:
                    # a Conv bias's DequantizeLinear outputs the bias's own name: the fp32 copy
                    # needs another one ("Duplicate definition of name ...patch_embedding.bias")
                    name = orig if orig not in producer else f"{orig}.fp32"
                    if name not in have:
                        init = copy.deepcopy(fp32_inits[orig])
                        init.name = name
                        m.graph.initializer.append(init)
                        have.add(name)
                    node.input[k] = name
    return m


def _groups(fp32, candidates: list[str], max_groups: int) -> list[list[str]]:
    """Single nodes for small graphs; for large ones, nodes grouped by transformer block
    (``layers.N`` / ``layer.N`` / ``blocks.N`` in their weight names), others alone."""
    import re

    if len(candidates) <= max_groups:
        return [[c] for c in candidates]
    pat = re.compile(r"(?:layers?|blocks?|h)[._](\d+)[._]")
    inits = {t.name for t in fp32.graph.initializer}
    groups: dict[str, list[str]] = {}
    wanted = set(candidates)
    for node in fp32.graph.node:
        if node.name not in wanted:
            continue
        key = node.name
        for name in node.input:
            hit = pat.search(name) if name in inits else None
            if hit:
                key = f"block {hit.group(1)}"
                break
        groups.setdefault(key, []).append(node.name)
    return list(groups.values())


def node_sensitivity(fp32_path: Path, qdq_path: Path, feeds: list[dict[str, np.ndarray]], output: str,
                     candidates: list[str], max_groups: int = 64) -> list[tuple[list[str], float]]:
    """Leave-one-out: for each candidate node (or block of nodes in large graphs) measure the
    stage output's worst-case cosine when only it is left unquantized. Most sensitive first
    (largest gain). Measured here: on the tiny ViT the patch-embedding Conv alone took worst
    cosine from 0.993 to 0.9999 while every MatMul moved it < 1e-4."""
    import onnx
    import onnxruntime as ort

    from .drift import compare

    fp32 = onnx.load(str(fp32_path))
    qdq = onnx.load(str(qdq_path))
    ref = run_graph(fp32_path, feeds, output)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    scores = []
    for group in _groups(fp32, candidates, max_groups):
        variant = _bypass(qdq, fp32, set(group))
        sess = _session(variant.SerializeToString(), opts)
        names = [i.name for i in sess.get_inputs()]
        got = [sess.run([output], {n: f[n] for n in names})[0] for f in feeds]
        scores.append((group, compare(ref, got).cosine_min))
    scores.sort(key=lambda kv: -kv[1])
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
    leave-one-out sensitivity and exclude the most sensitive 1, 2, 4, ... nodes (or blocks, in
    large graphs), recalibrating each time. The last applied graph is left at
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
    ranking = [g for g, _ in node_sensitivity(fp32_path, out_path, heldout_feeds[:4], output, candidates)]
    k, limit = 1, max(1, int(len(ranking) * max_excluded_fraction))
    while True:
        k = min(k, limit)
        chosen = {n for group in ranking[:k] for n in group}
        recipe = dataclasses.replace(base, exclude=tuple(sorted(set(base.exclude) | chosen)))
        apply(fp32_path, out_path, recipe, calib_feeds)
        drift = compare(ref, run_graph(out_path, heldout_feeds, output))
        steps.append(SearchStep(len(recipe.exclude), drift))
        log(f"      {name} int8: {len(chosen)} most sensitive node(s) excluded: {drift.line()}")
        if within_budget(drift):
            return recipe, drift, steps
        if k >= limit:
            raise RuntimeError(f"INT8 drift still over budget with {len(recipe.exclude)} of {len(candidates)} nodes excluded: "
                               f"{drift.line()}")
        k *= 2
