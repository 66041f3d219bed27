"""The ONNX Runtime engine of the fast LLM path (runtime/ortllm.py): the whole decoder step as
one graph (MatMulNBits, GroupQueryAttention), same interface as the torch engine.

Expected values: both int4 engines against an fp32 model built from the same weights
dequantized: logits cosine >= 0.999 at every step (measured over the three shapes below: ort,
int8 activations, 0.99996-0.99999; torch, bf16 activations, 0.99999-1.0). fp32 weights: the ORT engine
reproduces transformers' greedy and beam tokens exactly (tests/test_int4.py, parametrized)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ib_edge.bench.decode import random_int4_tensors
from ib_edge.runtime import engines as eng
from ib_edge.runtime.int4 import unpack_nibbles
from ib_edge.runtime.kernel_choice import KERNELS, cannot_run
from ib_edge.runtime.q4x8 import cpu_why_not
from ib_edge.runtime.llama import PRESETS, LlamaArgs
from ib_edge.runtime.errors import BundleError, InputError

ODD = LlamaArgs(vocab_size=300, hidden_size=192, n_layers=2, n_heads=6, n_kv_heads=2,
                        intermediate_size=320, max_positions=96)   # 320 / 64 = 5 blocks: odd zero-point packing


def _dequantized(t: dict[str, torch.Tensor], group: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in t.items():
        if k.endswith(".qweight"):
            base = k[:-len(".qweight")]
            q = unpack_nibbles(v).float()
            zp = t[base + ".qzeros"].float().repeat_interleave(group, dim=1)
            out[base + ".weight"] = (q - zp) * t[base + ".scales"].float().repeat_interleave(group, dim=1)
        elif not k.endswith((".scales", ".qzeros")):
            out[k] = v
    return out


def _tensors(a, group, seed=3):
    t = random_int4_tensors(a, group, seed=seed, scale_spread=1.0)
    g = torch.Generator().manual_seed(seed)
    for k in t:  # norms that are not all ones, so a dropped gamma fails
        if k.endswith("norm.weight"):
            t[k] = 1 + 0.3 * torch.randn(t[k].shape, generator=g)
    return t


def _cos(a, b):  # the ort engine returns numpy logits
    return float(torch.nn.functional.cosine_similarity(torch.as_tensor(a).flatten(), torch.as_tensor(b).flatten(), dim=0))


# K multiple of 128, N = 300 and 3 x 64 (q/k/v) not multiples of the q4x8 kernel's 8 rows... and
# group 256 (two 128-blocks per scale)
ODD128 = LlamaArgs(vocab_size=300, hidden_size=256, n_layers=2, n_heads=4, n_kv_heads=1,
                   intermediate_size=384, max_positions=96)


@pytest.mark.parametrize("shape,group", [("smoke", 64), ("odd", 64), ("smoke", 32), ("smoke", 128),
                                         ("odd128", 128), ("smoke", 256)])
def test_int4_engines_match_dequantized_fp32(shape, group):
    a = {"smoke": PRESETS["smoke"], "odd": ODD, "odd128": ODD128}[shape]
    t = _tensors(a, group)
    ref = eng.assemble(a, _dequantized(t, group), None, "torch")
    # every kernel the runtime may choose (runtime/kernel_choice.py) that can run here passes the
    # same gate; ort-q4x8 must be among them on a CPU with AVX-512 VNNI at groups of 128 and 256
    spec = eng.collect(a, dict(t), group)
    runs = [k for k in KERNELS if cannot_run(k, a, spec) is None]
    if group % 128 == 0 and cpu_why_not() is None:
        assert "ort-q4x8" in runs, cannot_run("ort-q4x8", a, spec)
    engines = {k: eng.assemble(a, dict(t), group, k) for k in runs}
    g = torch.Generator().manual_seed(0)
    steps = [(torch.randn(1, 9, a.hidden_size, generator=g) * 0.5, 0)]
    steps += [(torch.randn(1, 1, a.hidden_size, generator=g) * 0.5, 9 + i) for i in range(4)]
    steps += [(torch.randn(1, 3, a.hidden_size, generator=g) * 0.5, 13)]   # a chunk after a prefix
    for m in (ref, *engines.values()):
        m.setup_cache(32)
    for x, start in steps:
        want = ref(x, start)
        for name, m in engines.items():
            got = m(x, start)
            assert got.shape == want.shape
            assert _cos(got, want) >= 0.999, (name, start, _cos(got, want))
    # bytes per token as each engine holds the weights: the same nibbles; scales + zero points
    # 4.5 bytes per group (ort) vs a bf16 scale/offset pair and rows padded to 16 (torch)
    per = {e: m.weight_bytes_per_token() for e, m in engines.items()}
    assert 0.9 < per["torch"] / per["ort-int8"] < 1.1, per


def test_ort_engine_kv_cache_is_written_in_place():
    """GroupQueryAttention writes the keys/values of the new positions into our numpy buffers
    (past and present bound to the same memory): positions past the filled ones stay zero."""
    a = PRESETS["smoke"]
    m = eng.assemble(a, _tensors(a, 64), 64, "ort")
    m.setup_cache(16)
    kc = m.k_cache[0]
    assert isinstance(kc, np.ndarray)
    m(torch.randn(1, 5, a.hidden_size), 0)
    assert kc is m.k_cache[0]
    assert np.abs(kc[:, :, :5]).sum() > 0 and np.abs(kc[:, :, 5:]).sum() == 0
    m(torch.randn(1, 1, a.hidden_size).numpy(), 5)   # numpy or torch inputs
    assert np.abs(kc[:, :, 5]).sum() > 0 and np.abs(kc[:, :, 6:]).sum() == 0


def test_onnx_proto_writer_matches_onnx_helper():
    """runtime/onnx_proto.py writes the decoder graph without the onnx package: parsed back by
    onnx, its bytes equal the same model built with onnx.helper (every node, attribute,
    initializer, value info and opset), and the model passes onnx's checker."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ib_edge.runtime import onnx_proto as pb
    from ib_edge.runtime.ortllm import build_graph

    a = ODD
    model_bytes, arrays, bound = build_graph(a, eng.collect(a, _tensors(a, 64), 64))
    assert bound == {}   # MatMulNBits: every weight an initializer
    ours = onnx.ModelProto.FromString(model_bytes)
    assert len(ours.graph.node) > 20 and {n.op_type for n in ours.graph.node} >= {"MatMulNBits", "GroupQueryAttention"}
    # the same messages through onnx.helper, from what our proto says (a round trip per field)
    ref = helper.make_model(helper.make_graph(
        [helper.make_node(n.op_type, list(n.input), list(n.output), name=n.name, domain=n.domain or None,
                          **{t.name: helper.get_attribute_value(t) for t in n.attribute}) for n in ours.graph.node],
        ours.graph.name,
        [helper.make_tensor_value_info(v.name, v.type.tensor_type.elem_type,
                                       [d.dim_value if d.HasField("dim_value") else d.dim_param
                                        for d in v.type.tensor_type.shape.dim]) for v in ours.graph.input],
        [helper.make_tensor_value_info(v.name, v.type.tensor_type.elem_type,
                                       [d.dim_value if d.HasField("dim_value") else d.dim_param
                                        for d in v.type.tensor_type.shape.dim]) for v in ours.graph.output],
        [numpy_helper.from_array(numpy_helper.to_array(t), t.name) if t.data_location != TensorProto.EXTERNAL
         else t for t in ours.graph.initializer]),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    ref.ir_version = 10
    assert model_bytes == ref.SerializeToString()
    # independent spot checks of the encoding itself
    gqa = next(n for n in ours.graph.node if n.op_type == "GroupQueryAttention")
    assert gqa.domain == "com.microsoft" and {t.name: helper.get_attribute_value(t) for t in gqa.attribute} == \
        {"do_rotary": 1, "kv_num_heads": a.n_kv_heads, "num_heads": a.n_heads, "rotary_interleaved": 0}
    norm = next(n for n in ours.graph.node if n.op_type == "SimplifiedLayerNormalization")
    assert {t.name: helper.get_attribute_value(t) for t in norm.attribute} == {"axis": -1, "epsilon": pytest.approx(a.rms_eps)}
    # every residual add after the first norm is fused with the norm that follows it
    ops = [n.op_type for n in ours.graph.node]
    assert ops.count("SimplifiedLayerNormalization") == 1 and "Add" not in ops
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * a.n_layers
    shape = next(t for t in ours.graph.initializer if t.name == "logits_shape")
    assert numpy_helper.to_array(shape).tolist() == [-1, a.vocab_size]
    ext = next(t for t in ours.graph.initializer if t.name == "l0.qkv.B")
    assert ext.data_location == TensorProto.EXTERNAL and list(ext.dims) == list(arrays["l0.qkv.B"].shape)
    assert {e.key: e.value for e in ext.external_data}["length"] == str(arrays["l0.qkv.B"].nbytes)
    assert [d.dim_param or d.dim_value for d in ours.graph.input[0].type.tensor_type.shape.dim] == \
        ["batch", "seq", a.hidden_size]
    assert ours.graph.input[2].type.tensor_type.HasField("shape") and not ours.graph.input[2].type.tensor_type.shape.dim
    assert pb.tensor("n", np.array([-3], np.int64)) == numpy_helper.from_array(np.array([-3], np.int64), "n").SerializeToString()
    with pytest.raises(TypeError):
        pb.tensor("x", np.zeros(2, np.float16))


def test_ort_engine_refusals():
    a = PRESETS["smoke"]
    m = eng.assemble(a, _tensors(a, 64), 64, "ort")
    m.setup_cache(8)
    with pytest.raises(InputError, match="past the KV cache"):
        m(torch.randn(1, 4, a.hidden_size), 6)
    with pytest.raises(InputError, match="batch"):
        m(torch.randn(2, 1, a.hidden_size), 0)
    with pytest.raises(InputError, match="positions"):
        m.setup_cache(a.max_positions + 1)
    with pytest.raises(InputError, match="engine"):
        eng.assemble(a, _tensors(a, 64), 64, "tensorrt")
    with pytest.raises(InputError, match="width"):
        m(torch.randn(1, 1, a.hidden_size + 1), 0)
    m.setup_cache(8, batch=2)
    with pytest.raises(InputError, match="batch 1 only"):
        m(torch.randn(2, 2, a.hidden_size), 3)


def test_engine_choice():
    """The rule (the suite runs with IB_EDGE_LLM_KERNEL=rule, conftest): ort for int4 decoder
    layers it can run; torch for fp32 weights and for shapes GroupQueryAttention refuses (head dim
    not a multiple of 16), where an explicit ort is one line."""
    a = PRESETS["smoke"]
    t = _tensors(a, 64)
    assert eng.assemble(a, dict(t), 64).engine == "ort"
    assert eng.assemble(a, _dequantized(t, 64), None).engine == "torch"
    odd_heads = LlamaArgs(vocab_size=100, hidden_size=192, n_layers=1, n_heads=8, n_kv_heads=2,
                                  intermediate_size=256, max_positions=32)   # head dim 24
    t = _tensors(odd_heads, 32)
    m = eng.assemble(odd_heads, dict(t), 32)
    assert m.engine == "torch"
    m.setup_cache(4)
    assert m(torch.randn(1, 2, 192), 0).shape == (1, 100)
    with pytest.raises(BundleError, match="head dim 24") as e:
        eng.assemble(odd_heads, dict(t), 32, "ort")
    assert "--llm-engine torch" in e.value.line()


def test_ort_engine_bad_group_size_is_one_line():
    """A block size MatMulNBits does not take gives a BundleError naming the way out, not a traceback."""
    a = LlamaArgs(vocab_size=100, hidden_size=192, n_layers=1, n_heads=6, n_kv_heads=2,
                          intermediate_size=384, max_positions=32)
    with pytest.raises(BundleError, match="group size 48") as e:
        eng.assemble(a, _tensors(a, 48), 48, "ort")
    assert "--llm-engine torch" in e.value.line()


@pytest.mark.parametrize("kernel", ["ort-int8", "ort-q4x8"])
def test_ort_engine_weight_ownership(kernel, monkeypatch):
    """Initializers: OrtLlama drops the arrays it fed ONNX Runtime, safe only because ORT copies
    them at session creation (MatMulNBits' prepacked): zeroing them after the build changes no
    logit. q4x8's weights are graph inputs bound to the engine's own arrays instead (no ORT copy,
    one copy fewer at load): the engine holds them and ORT reads them in place, so zeroing them
    does change the logits."""
    import gc

    from ib_edge.runtime import ortllm

    a = ODD128
    t = _tensors(a, 128)
    spec = eng.collect(a, dict(t), 128)
    if kernel == "ort-q4x8" and cannot_run(kernel, a, spec):
        pytest.skip(cannot_run(kernel, a, spec))
    fed = []
    real = ortllm.build_graph
    monkeypatch.setattr(ortllm, "build_graph", lambda *args: fed.append(real(*args)) or fed[-1])
    m = eng.assemble(a, dict(t), 128, kernel)
    x = np.random.default_rng(0).standard_normal((1, 4, a.hidden_size)).astype(np.float32)
    (_, arrays, bound), = fed
    fed.clear()
    gc.collect()
    m.setup_cache(8)
    before = m(x, 0)
    for arr in arrays.values():
        arr[...] = 0
    m.setup_cache(8)
    assert np.array_equal(m(x, 0), before)
    assert bool(bound) == (kernel == "ort-q4x8")
    if bound:
        assert all(m._weights[k] is v for k, v in bound.items())
        for arr in bound.values():
            arr[...] = 0
        m.setup_cache(8)
        assert not np.array_equal(m(x, 0), before)


def test_int4_engines_batched_decode_match_dequantized_fp32():
    """A batch of 3 (beams, or ib-serve's batched decode): every kernel that runs here, q4x8's
    multi-row path included, against the dequantized fp32 model, row by row."""
    a, group = ODD128, 128
    t = _tensors(a, group, seed=5)
    ref = eng.assemble(a, _dequantized(t, group), None, "torch")
    spec = eng.collect(a, dict(t), group)
    runs = {k: eng.assemble(a, dict(t), group, k) for k in KERNELS if cannot_run(k, a, spec) is None}
    g = torch.Generator().manual_seed(1)
    prompt = torch.randn(1, 6, a.hidden_size, generator=g) * 0.5
    step = torch.randn(3, 1, a.hidden_size, generator=g) * 0.5
    for m in (ref, *runs.values()):
        m.setup_cache(16)
        m(prompt, 0)
        m.expand_cache(3)
    want = ref(step, 6)
    for name, m in runs.items():
        got = m(step, 6)
        for row in range(3):
            assert _cos(got[row], want[row]) >= 0.999, (name, row, _cos(got[row], want[row]))
