"""INT8-over-FP16 Q/DQ graphs for TensorRT's strongly typed builder, and the graph checks that
go with them. Model-agnostic: ONNX files in, ONNX files and problem lists out.

A strongly typed TensorRT build (every build on 11.x; ``NetworkDefinitionCreationFlag.
STRONGLY_TYPED`` on 10.x) runs each layer in the type the graph gives it; there are no precision
flags. An INT8 engine that runs its unquantized layers in FP16 (what Orin wants) therefore needs
a Q/DQ graph whose float parts are fp16, including the Q/DQ scales, which ONNX allows from opset
19 on. ``convert`` makes that graph from the searched fp32 Q/DQ graph (``quant/int8.py``; the CPU
bundle keeps that one: it is what ONNX Runtime CPU runs fastest):

1. raise the opset to 19 (ONNX's version converter),
2. convert every float tensor, initializer and Q/DQ scale to fp16 with onnxconverter-common,
   graph inputs and outputs kept fp32 (Casts at the boundary),
3. keep every Q/DQ away from an fp32 tensor: an activation Q/DQ pair fed by a graph input's
   fp32->fp16 Cast, or feeding a graph output's fp16->fp32 Cast, is dropped (that tensor then
   stays fp16; weights stay INT8). This is NVIDIA/TensorRT#4832's pattern: TensorRT fuses the Cast into the
   Q/DQ and a strongly typed build on SM 8.7 (Orin) fails with "Could not infer output types for
   operation: dequantize" (its report: fp32 data, int8 input, fp16 scale).

``check`` states what a graph must hold for an engine of a given precision; ``build_engine``
refuses a graph with problems before TensorRT is even imported.
"""
from __future__ import annotations

import warnings
from pathlib import Path

MIN_OPSET = 19                 # fp16 (and bf16) scales in QuantizeLinear/DequantizeLinear
QDQ = ("QuantizeLinear", "DequantizeLinear")
# Ops TensorRT folds into a neighbouring Q/DQ: a Cast behind any chain of these still meets it
# (the #4832 report's chain is reshape -> transpose -> reshape -> slice).
PASS_THROUGH = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice")
ISSUE_4832 = "NVIDIA/TensorRT#4832"


class GraphCheckError(ValueError):
    """The graph cannot be converted as asked (raised by ``convert``)."""


def _elem_types(model) -> dict[str, int]:
    """Tensor name -> ONNX element type, from shape inference (external data not needed)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    out = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t.data_type
    return out


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, (str, Path)):
        return onnx.load(str(model_or_path), load_external_data=False)
    return model_or_path


def _links(g) -> tuple[dict, dict[str, list]]:
    """(tensor -> the node making it, tensor -> the nodes reading it) of a graph."""
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def _upstream(producer: dict, t: str):
    """The tensor behind pass-through ops from ``t``, and the node that made it (or None)."""
    seen = set()
    while t not in seen:
        seen.add(t)
        p = producer.get(t)
        if p is None or p.op_type not in PASS_THROUGH:
            return t, p
        t = p.input[0]
    return t, producer.get(t)


def _downstream(consumers: dict, t: str) -> list:
    """Every (tensor, consumer) reached from ``t`` through pass-through ops."""
    out, todo, seen = [], [t], set()
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        for c in consumers.get(cur, []):
            out.append((cur, c))
            if c.op_type in PASS_THROUGH:
                todo.extend(c.output)
    return out


def _casts_to_fp32(node) -> bool:
    from onnx import TensorProto

    return node.op_type == "Cast" and next((a.i for a in node.attribute if a.name == "to"), None) == TensorProto.FLOAT


def issue_4832_problems(model) -> list[str]:
    """One line per Q/DQ with an fp16 scale whose float side meets fp32: a QuantizeLinear whose
    input is fp32 or comes (through pass-through ops) from a Cast of an fp32 tensor, or a
    DequantizeLinear whose output is fp32 or reaches (through pass-through ops) a Cast to fp32."""
    from onnx import TensorProto

    model = _load(model)
    types = _elem_types(model)
    g = model.graph
    producer, consumers = _links(g)
    fp32, fp16 = TensorProto.FLOAT, TensorProto.FLOAT16

    problems = []
    for n in g.node:
        if n.op_type not in QDQ or len(n.input) < 2 or types.get(n.input[1]) != fp16:
            continue
        name = n.name or n.output[0]
        if n.op_type == "QuantizeLinear":
            src, p = _upstream(producer, n.input[0])
            if types.get(n.input[0]) == fp32 or types.get(src) == fp32:
                problems.append(f"QuantizeLinear {name}: fp32 input {src!r} with an fp16 scale")
            elif p is not None and p.op_type == "Cast" and types.get(p.input[0]) == fp32:
                problems.append(f"QuantizeLinear {name}: input {src!r} is Cast {p.name or p.output[0]!r} "
                                f"of fp32 {p.input[0]!r}")
        else:
            if types.get(n.output[0]) == fp32:
                problems.append(f"DequantizeLinear {name}: fp32 output with an fp16 scale")
            for t, c in _downstream(consumers, n.output[0]):
                if _casts_to_fp32(c):
                    problems.append(f"DequantizeLinear {name}: output {t!r} is Cast to fp32 by "
                                    f"{c.name or c.output[0]!r}")
    return problems


def check(model_or_path, precision: str) -> list[str]:
    """What keeps ``model_or_path`` from building a strongly typed engine of ``precision``,
    one line each (empty: fine). fp32: no Q/DQ, no fp16 tensors. fp16: no Q/DQ, fp16 tensors
    present. int8: Q/DQ present, opset >= 19, every Q/DQ scale fp16, no float op computing in
    fp32 (Casts aside), and none of #4832's pattern."""
    from onnx import TensorProto

    model = _load(model_or_path)
    types = _elem_types(model)
    g = model.graph
    qdq = [n for n in g.node if n.op_type in QDQ]
    has_fp16 = any(t == TensorProto.FLOAT16 for t in types.values())
    if precision == "fp32":
        out = []
        if qdq:
            out.append(f"{len(qdq)} QuantizeLinear/DequantizeLinear nodes: this graph builds an int8 engine")
        if has_fp16:
            out.append("fp16 tensors present: a strongly typed build would run them in fp16, not fp32")
        return out
    if precision == "fp16":
        out = []
        if qdq:
            out.append(f"{len(qdq)} QuantizeLinear/DequantizeLinear nodes: this graph builds an int8 engine")
        if not has_fp16:
            out.append("no fp16 tensors: a strongly typed build of this graph is fp32 (convert it to fp16 first)")
        return out
    if precision != "int8":
        raise ValueError(f"precision {precision!r} is not fp32, fp16 or int8")
    if not qdq:
        return ["no QuantizeLinear/DequantizeLinear nodes: int8 engines are built from explicitly quantized graphs"]
    out = []
    if _opset(model) < MIN_OPSET:
        out.append(f"opset {_opset(model)} < {MIN_OPSET}: Q/DQ scales cannot be fp16")
    fp32_scales = [n.name or n.output[0] for n in qdq if types.get(n.input[1]) != TensorProto.FLOAT16]
    if fp32_scales:
        out.append(f"{len(fp32_scales)} Q/DQ node(s) with a non-fp16 scale (e.g. {fp32_scales[0]}): an "
                   "INT8+FP32 graph, not INT8 over FP16")
    fp32_ops = [n.name or n.output[0] for n in g.node if n.op_type not in ("Cast", "Shape", "Size") + QDQ
                and any(types.get(t) == TensorProto.FLOAT for t in list(n.input) + list(n.output) if t)]
    if fp32_ops:
        out.append(f"{len(fp32_ops)} node(s) compute in fp32 (e.g. {fp32_ops[0]}): the unquantized parts must "
                   "be fp16")
    bad = issue_4832_problems(model)
    if bad:
        out.append(f"{len(bad)} Q/DQ node(s) with an fp16 scale meet an fp32 tensor ({ISSUE_4832}: strongly typed "
                   "INT8 fails on SM 8.7 with 'Could not infer output types for operation: dequantize'): "
                   + "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else ""))
    return out


def _bypass_fp32_neighbours(model) -> list[str]:
    """Drop every activation Q/DQ pair that meets an fp32 tensor: a QuantizeLinear fed (through
    pass-through ops) by a Cast of an fp32 tensor (a graph input), or one whose DequantizeLinear
    reaches (through pass-through ops) a Cast to fp32 (a graph output). The pair's consumers read
    the fp16 tensor instead. Returns the names of the nodes whose input is no longer INT8."""
    from onnx import TensorProto

    types = _elem_types(model)
    g = model.graph
    producer, consumers = _links(g)

    def from_fp32_cast(t):
        _, p = _upstream(producer, t)
        return p is not None and p.op_type == "Cast" and types.get(p.input[0]) == TensorProto.FLOAT

    def to_fp32_cast(t):
        return any(_casts_to_fp32(c) for _, c in _downstream(consumers, t))

    drop, kept_fp16 = set(), []
    for q in g.node:
        if q.op_type != "QuantizeLinear":
            continue
        dqs = consumers.get(q.output[0], [])
        if not (from_fp32_cast(q.input[0]) or any(to_fp32_cast(dq.output[0]) for dq in dqs)):
            continue
        if not dqs or any(c.op_type != "DequantizeLinear" for c in dqs):
            raise GraphCheckError(f"QuantizeLinear {q.name} feeds {[c.op_type for c in dqs]}, not only "
                                  "DequantizeLinear; cannot keep it away from fp32")
        drop.add(id(q))
        for dq in dqs:
            drop.add(id(dq))
            for c in consumers.get(dq.output[0], []):
                c.input[:] = [q.input[0] if i == dq.output[0] else i for i in c.input]
                if c.op_type not in ("Shape", "Size", "Cast"):
                    kept_fp16.append(c.name or c.output[0])
            for o in g.output:
                if o.name == dq.output[0]:
                    raise GraphCheckError(f"graph output {o.name} comes straight from a DequantizeLinear")
    keep = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(keep)
    return sorted(set(kept_fp16))


def convert(qdq_path: Path, out_path: Path) -> dict:
    """The fp32 Q/DQ graph at ``qdq_path`` -> an INT8-over-FP16 graph at ``out_path`` (fp32
    inputs and outputs). Returns the record the manifest keeps. Raises GraphCheckError if the
    result still fails ``check(..., "int8")``."""
    import onnx
    from onnx import version_converter
    from onnxconverter_common import float16

    from .fp16 import _restore_fp32_outputs

    model = onnx.load(str(qdq_path))
    opset_in = _opset(model)
    if opset_in < MIN_OPSET:
        model = version_converter.convert_version(model, MIN_OPSET)
    original = model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated to ..."
        model = float16.convert_float_to_float16(original, keep_io_types=True, op_block_list=[],
                                                 disable_shape_infer=False)
    _restore_fp32_outputs(original, model)
    kept_fp16 = _bypass_fp32_neighbours(model)
    problems = check(model, "int8")
    if problems:
        raise GraphCheckError(f"{Path(qdq_path).name}: the INT8-over-FP16 conversion left problems: "
                              + " | ".join(problems))
    large = sum(len(t.raw_data) for t in model.graph.initializer) > 1_800_000_000
    onnx.save(model, str(out_path), save_as_external_data=large,
              location=Path(out_path).name + ".data" if large else None)
    qdq = sum(n.op_type in QDQ for n in model.graph.node)
    return {"from": Path(qdq_path).name, "converter": "ib_edge.quant.trt_int8 (onnxconverter-common float16, "
            "keep_io_types, no op kept fp32)", "opset": {"in": opset_in, "out": _opset(model)},
            "qdq_nodes": qdq, "scales": "fp16", "activations_kept_fp16": kept_fp16}
