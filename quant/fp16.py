"""FP16 graphs with fp32 inputs and outputs (dynamo-exported graphs convert cleanly and run on
ONNX Runtime's CPU provider; measured cosine 1.0, max-abs <= 0.004 on the tiny models).

Ops kept in FP32: normalisation statistics and softmax, whose sums of squares / exponentials
are where FP16 overflows first (ViT-g activations reach the thousands in late blocks).
"""
from __future__ import annotations

import warnings
from pathlib import Path

KEEP_FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt")


def convert(fp32_path: Path, out_path: Path, keep_fp32_ops=KEEP_FP32_OPS) -> Path:
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(fp32_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number 8.2e-08 will be truncated to 1e-07"
        fp16 = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_fp32_ops),
                                                disable_shape_infer=False)
    _restore_fp32_outputs(model, fp16)
    large = sum(len(t.raw_data) for t in fp16.graph.initializer) > 1_800_000_000
    onnx.save(fp16, str(out_path), save_as_external_data=large,
              location=Path(out_path).name + ".data" if large else None)
    return Path(out_path)


def _restore_fp32_outputs(original, converted) -> None:
    """onnxconverter-common ignores keep_io_types for an output whose producer is in the block
    list (it casts that output back to fp16); cast such outputs to fp32 again."""
    from onnx import TensorProto, helper

    want = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    for out in converted.graph.output:
        if want.get(out.name) == TensorProto.FLOAT and out.type.tensor_type.elem_type == TensorProto.FLOAT16:
            inner = out.name + "_fp16"
            for node in converted.graph.node:
                node.output[:] = [inner if o == out.name else o for o in node.output]
            converted.graph.node.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT,
                                                         name=out.name + "_to_fp32"))
            out.type.tensor_type.elem_type = TensorProto.FLOAT
