"""ib-edge's own int4 x int8 matmul (runtime/native/q4x8.c, runtime/q4x8.py): the weight layout,
the arithmetic, the ONNX Runtime custom op and its ABI, the CMake build and the reasons it is not
offered.

Expected values come from numpy: the int4 weights dequantized in float64, times the activations.
Where the activations are exactly representable on the kernel's int8 grid (per 128-value block:
integers in [-127, 127] with one of magnitude 127, times a power of two) the kernel's only
rounding is fp32 accumulation, so it must match to ~1e-6 relative: any slip in the nibble order,
the row interleave, the zero points, the padding rows or the group-to-block expansion fails.
With random activations its error is that of int8 activations, compared against ONNX Runtime's
own MatMulNBits at accuracy_level 4 on the same weights."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from ib_edge.runtime import q4x8

pytestmark = pytest.mark.skipif(q4x8.cpu_why_not() is not None, reason=f"{q4x8.cpu_why_not()}")


def _weights(n, k, group, seed=0):
    rng = np.random.default_rng(seed)
    qw = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    sc = (rng.random((n, k // group)) * 0.02 + 0.001).astype(np.float32)
    qz = rng.integers(0, 16, (n, k // group), dtype=np.uint8)
    return qw, sc, qz


def _dequant(qw, sc, qz, group):
    n, k = qw.shape[0], qw.shape[1] * 2
    q = np.empty((n, k), np.float64)
    q[:, 0::2], q[:, 1::2] = qw & 15, qw >> 4
    return (q - np.repeat(qz, group, axis=1)) * np.repeat(sc.astype(np.float64), group, axis=1)


def _grid_activations(m, k, seed=1):
    """Activations the int8 quantizer represents exactly (see the module docstring)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-127, 128, (m, k)).astype(np.float32)
    x[:, ::128] = 127 * rng.choice([-1, 1], (m, k // 128))   # each block's max magnitude is 127
    return x * np.float32(2.0 ** -6)


@pytest.mark.parametrize("n,k,group,m", [(37, 256, 128, 1), (64, 384, 128, 3), (300, 512, 256, 2),
                                         (2560, 2048, 128, 1), (8, 128, 128, 7)])
def test_exact_on_the_int8_grid(n, k, group, m):
    qw, sc, qz = _weights(n, k, group)
    x = _grid_activations(m, k)
    got = q4x8.matmul(x, q4x8.pack(qw, sc, qz, group))
    want = x.astype(np.float64) @ _dequant(qw, sc, qz, group).T
    assert got.shape == (m, n)
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()


def test_pack_layout():
    """Row r of group g, block b sits at W[g, b, r % 8]: rows interleaved block by block, padding
    rows have scale 0 (their output is dropped), groups of 256 become two 128-blocks."""
    qw, sc, qz = _weights(11, 512, 256)
    w, s, z, n, k = q4x8.pack(qw, sc, qz, 256)
    assert (w.shape, s.shape, z.shape, n, k) == ((2, 4, 8, 64), (2, 4, 8), (2, 4, 8), 11, 512)
    assert np.array_equal(w[1, 2, 1], qw[9, 128:192]) and s[1, 3, 2] == sc[10, 1] and z[0, 0, 5] == qz[5, 0]
    assert not s[1, :, 3:].any()
    with pytest.raises(ValueError, match="multiple of 128"):
        q4x8.pack(*_weights(8, 256, 64), 64)
    with pytest.raises(ValueError, match="expected"):
        q4x8.pack(qw, sc[:, :1], qz, 256)


def _matmulnbits(x, qw, sc, qz, group, n, k):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nb = k // group
    zp = qz if nb % 2 == 0 else np.concatenate([qz, np.full((n, 1), 8, np.uint8)], axis=1)
    inits = [numpy_helper.from_array(qw.reshape(n, nb, group // 2), "B"), numpy_helper.from_array(sc, "S"),
             numpy_helper.from_array(zp[:, 0::2] | (zp[:, 1::2] << 4), "Z")]
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=group, accuracy_level=4)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": x})[0]


def test_random_activations_error_is_int8_rounding():
    """On random activations every output is within the bound that rounding each activation to
    the nearest step of its block (amax / 127) allows: sum over k of |w| * step / 2 (plus fp32
    accumulation slack). Where ONNX Runtime's MatMulNBits also quantizes activations (its
    accuracy_level 4 path on this CPU), our error is at most twice its own."""
    n, k, group = 512, 2048, 128
    qw, sc, qz = _weights(n, k, group, seed=4)
    x = np.random.default_rng(5).standard_normal((4, k)).astype(np.float32)
    w = _dequant(qw, sc, qz, group)
    want = x.astype(np.float64) @ w.T
    step = np.repeat(np.abs(x).reshape(4, -1, 128).max(axis=2) / 127, 128, axis=1)     # [M, K]
    bound = (step / 2) @ np.abs(w).T + 1e-5 * np.abs(want).max()
    err = np.abs(q4x8.matmul(x, q4x8.pack(qw, sc, qz, group)) - want)
    assert (err <= bound).all(), float((err / bound).max())
    rel = err.max() / np.abs(want).max()
    assert rel > 1e-4, rel          # int8 activations: visibly not the float result
    mlas = np.abs(_matmulnbits(x, qw, sc, qz, group, n, k) - want).max() / np.abs(want).max()
    if mlas > 1e-4:
        assert rel <= 2 * mlas, (rel, mlas)


def _op_session(packed, k, n, threads=2, w_shape=None):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w, s, z = packed[:3]
    if w_shape is not None:
        w = w.reshape(w_shape)
    node = helper.make_node(q4x8.OP, ["A", "W", "S", "Z"], ["Y"], domain=q4x8.DOMAIN, K=k, N=n)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(s, "S"),
                           numpy_helper.from_array(z, "Z")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(q4x8.DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.register_custom_ops_library(str(q4x8.library()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1000, 1001])
def test_onnxruntime_op(threads, n):
    """Inside ONNX Runtime (the ABI of ort_abi.h against the installed onnxruntime, the parallel
    split over its thread pool): exact against float64 on grid activations, N with and without a
    partial last row group, rank-3 and rank-1 inputs; a 0-row input gives a 0-row output."""
    k = 1024
    qw, sc, qz = _weights(n, k, 128, seed=6)
    sess = _op_session(q4x8.pack(qw, sc, qz, 128), k, n, threads)
    x = _grid_activations(10, k, seed=7).reshape(2, 5, k)
    (y,) = sess.run(None, {"A": x})
    want = x.reshape(10, k).astype(np.float64) @ _dequant(qw, sc, qz, 128).T
    assert y.shape == (2, 5, n)
    assert np.abs(y.reshape(10, n) - want).max() <= 2e-6 * np.abs(want).max()
    (y1,) = sess.run(None, {"A": x[0, 0]})
    assert y1.shape == (n,) and np.array_equal(y1, y[0, 0])
    assert sess.run(None, {"A": np.zeros((0, k), np.float32)})[0].shape == (0, n)


def test_nan_and_inf_reach_the_output():
    """A NaN or an infinity in an activation block makes that row's outputs NaN (as a float
    matmul's would be), not finite numbers; other rows are untouched."""
    qw, sc, qz = _weights(16, 256, 128)
    packed = q4x8.pack(qw, sc, qz, 128)
    x = _grid_activations(3, 256)
    x[0, 5], x[1, 200] = np.nan, np.inf
    y = q4x8.matmul(x, packed)
    assert np.isnan(y[0]).all() and np.isnan(y[1]).all() and np.isfinite(y[2]).all()


def test_onnxruntime_op_rejects_mismatched_shapes():
    n, k = 64, 256
    packed = q4x8.pack(*_weights(n, k, 128), 128)
    sess = _op_session(packed, k, n)
    with pytest.raises(Exception, match="A's last dimension is 128, K is 256"):
        sess.run(None, {"A": np.zeros((1, 128), np.float32)})
    bad = _op_session(packed, k, n, w_shape=(8, 2, 4, 128))
    with pytest.raises(Exception, match=r"W is not \[8, 2, 8, 64\]"):
        bad.run(None, {"A": np.zeros((1, k), np.float32)})


def test_reasons_it_is_not_offered(tmp_path, monkeypatch):
    assert "x86-64 only" in q4x8.cpu_why_not(frozenset({"avx512_vnni"}), machine="aarch64")
    assert "lacks avx512_vnni" in q4x8.cpu_why_not(frozenset({"avx512f", "avx512bw", "avx512vl"}), machine="x86_64")
    assert q4x8.cpu_why_not(frozenset(q4x8.NEEDS), machine="x86_64") is None
    assert "group size 64" in q4x8.layout_why_not([128, 64]) and q4x8.layout_why_not([128, 256]) is None
    monkeypatch.setattr(q4x8, "_built", {})
    monkeypatch.setenv(q4x8.ENV, str(tmp_path / "nope.so"))
    with pytest.raises(RuntimeError, match="no such file"):
        q4x8.library()
    monkeypatch.delenv(q4x8.ENV)
    monkeypatch.setenv("IB_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CC", str(tmp_path / "no-cc"))
    assert "no C compiler" in q4x8.why_not([128])
    assert not (tmp_path / "home" / "native").exists() or not any((tmp_path / "home" / "native").iterdir())


def test_a_failed_compile_is_one_line_with_the_compiler_error(tmp_path, monkeypatch):
    cc = tmp_path / "fake-cc"
    cc.write_text("#!/bin/sh\necho 'In file included from q4x8.c:1:' >&2\n"
                  "echo 'q4x8.c:9:1: error: something is wrong' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setattr(q4x8, "_built", {})
    monkeypatch.setenv("IB_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CC", str(cc))
    why = q4x8.why_not([128])
    assert why == "fake-cc failed to compile q4x8.c: q4x8.c:9:1: error: something is wrong"
    assert not list((tmp_path / "home" / "native").iterdir())    # nothing half-written left


def test_built_once_into_the_cache_home_not_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(q4x8, "_built", {})
    monkeypatch.setenv("IB_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    lib = q4x8.library()
    assert lib.parent == tmp_path / "home" / "native" and lib.is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert lib.stat().st_mode & 0o777 == 0o755 & ~umask    # loadable by others sharing IB_EDGE_HOME
    assert [p.name for p in tmp_path.iterdir()] == ["home"]
    monkeypatch.setattr(q4x8, "_built", {})
    mtime = lib.stat().st_mtime_ns
    assert q4x8.library() == lib and lib.stat().st_mtime_ns == mtime   # found, not rebuilt


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_the_library(tmp_path, monkeypatch):
    root = q4x8.source_dir().parents[1]
    for cmd in (["cmake", "-S", str(root), "-B", str(tmp_path)], ["cmake", "--build", str(tmp_path)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    monkeypatch.setattr(q4x8, "_built", {})
    monkeypatch.setenv(q4x8.ENV, str(tmp_path / "libib_q4x8.so"))
    qw, sc, qz = _weights(24, 256, 128)
    x = _grid_activations(2, 256)
    got = _op_session(q4x8.pack(qw, sc, qz, 128), 256, 24).run(None, {"A": x})[0]
    want = x.astype(np.float64) @ _dequant(qw, sc, qz, 128).T
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


def test_kernels_bench_times_the_op_beside_matmulnbits(monkeypatch):
    """python -m ib_edge.bench.kernels times the 88 decoder linears on MatMulNBits and on this op
    (here on a tiny stand-in shape; the real one streams 515 MB)."""
    from ib_edge.bench import kernels

    monkeypatch.setattr(kernels, "SHAPES", ((24, 256), (16, 384)))
    monkeypatch.setattr(kernels, "LAYERS", 2)
    ours, theirs = kernels.ort_nbits(128, 2, q4x8=True), kernels.ort_nbits(128, 2)
    # bytes: 4-bit weights + a float scale per 128 (+ a zero-point byte per 128 for ours)
    weights = 2 * (24 * 256 + 16 * 384) // 2
    assert theirs["bytes"] == weights + 2 * (24 * 2 + 16 * 3) * 4
    assert ours["bytes"] == weights + 2 * (24 * 2 + 16 * 3) * 5
    assert ours["ms"] > 0 and theirs["ms"] > 0
