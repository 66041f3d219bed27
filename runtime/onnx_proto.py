"""The few ONNX protobuf messages the ort LLM engine builds its decoder graph from, written
without the ``onnx`` package.

Why: ``import onnx`` pulls ml_dtypes, measured 0.5-1.9 s of a cold ``ib-run`` on this project's
2-core EPYC (``python -X importtime``), more than the whole answer of an int4 proof bundle. ONNX
Runtime only needs the serialized ``ModelProto``; the wire format of the messages used here is
a handful of varint and length-delimited fields (field numbers from onnx/onnx.proto3, which
``tests/test_ortllm.py`` checks by parsing the bytes back with the ``onnx`` package and
comparing them with the same model made by ``onnx.helper``).

Every function returns a message's encoded bytes; ``model(...)`` returns what
``ModelProto.SerializeToString`` returns for the same message (fields in field-number order, as
protobuf writes them; onnx.proto is proto2, so a set empty string, the default opset's domain, is
written).
"""
from __future__ import annotations

import struct

import numpy as np

# TensorProto.DataType
FLOAT, UINT8, INT32, INT64 = 1, 2, 6, 7
_NP_TYPES = {np.dtype(np.float32): FLOAT, np.dtype(np.uint8): UINT8, np.dtype(np.int32): INT32,
             np.dtype(np.int64): INT64}
_ATTR_FLOAT, _ATTR_INT = 1, 2   # AttributeProto.AttributeType


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1          # int64 fields: negative numbers as 10-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _int(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _str(field: int, s: str) -> bytes:
    return _bytes(field, s.encode("utf-8"))


def tensor_type(array: np.ndarray) -> int:
    try:
        return _NP_TYPES[array.dtype]
    except KeyError:
        raise TypeError(f"no ONNX type here for numpy {array.dtype}") from None


def tensor(name: str, array: np.ndarray, *, external: dict[str, str] | None = None) -> bytes:
    """TensorProto: dims, data_type, name, then raw_data, or (``external``: key/value pairs)
    data_location EXTERNAL with no bytes stored."""
    array = np.asarray(array)
    msg = b"".join(_int(1, d) for d in array.shape) + _int(2, tensor_type(array)) + _str(8, name)
    if external is None:
        return msg + _bytes(9, np.ascontiguousarray(array).tobytes())
    for k, v in external.items():
        msg += _bytes(13, _str(1, k) + _str(2, v))
    return msg + _int(14, 1)


def value_info(name: str, elem_type: int, shape) -> bytes:
    """ValueInfoProto of a tensor; dims are ints (fixed) or strings (named dynamic axes)."""
    dims = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _str(2, d)) for d in shape)
    return _str(1, name) + _bytes(2, _bytes(1, _int(1, elem_type) + _bytes(2, dims)))


def attribute(name: str, value) -> bytes:
    if isinstance(value, float):
        return _str(1, name) + _varint(2 << 3 | 5) + struct.pack("<f", value) + _int(20, _ATTR_FLOAT)
    if isinstance(value, int) and not isinstance(value, bool):
        return _str(1, name) + _int(3, value) + _int(20, _ATTR_INT)
    raise TypeError(f"attribute {name}: only float and int values are written here, not {type(value).__name__}")


def node(op_type: str, inputs, outputs, name: str, domain: str = "", **attrs) -> bytes:
    """NodeProto; attributes sorted by name (as onnx.helper.make_node writes them)."""
    msg = b"".join(_str(1, i) for i in inputs) + b"".join(_str(2, o) for o in outputs)
    msg += _str(3, name) + _str(4, op_type)
    msg += b"".join(_bytes(5, attribute(k, attrs[k])) for k in sorted(attrs))
    return msg + (_str(7, domain) if domain else b"")


def model(nodes, graph_name: str, inputs, outputs, initializers, opsets: dict[str, int], ir_version: int) -> bytes:
    """ModelProto bytes: ir_version, the graph, the opset imports."""
    graph = b"".join(_bytes(1, n) for n in nodes) + _str(2, graph_name)
    graph += b"".join(_bytes(5, t) for t in initializers)
    graph += b"".join(_bytes(11, v) for v in inputs) + b"".join(_bytes(12, v) for v in outputs)
    msg = _int(1, ir_version) + _bytes(7, graph)
    return msg + b"".join(_bytes(8, _str(1, d) + _int(2, v)) for d, v in opsets.items())  # "" written, as onnx does
