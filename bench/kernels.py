"""Kernel ceilings on this machine: what the decode path and the INT8 vision encoder can hope for.

    python -m ib_edge.bench.kernels [--threads 2] [--profile-graph BUNDLE/vision.onnx]

* Decode: the 88 decoder linears of a TinyLlama-shaped LLM (22 layers of q/k/v fused, o,
  gate/up fused, down; int4, group 64 and 128) streamed from DRAM once, as one decode step
  reads them: torch's ``_weight_int4pack_mm_for_cpu`` (the fast path's torch engine) against ONNX
  Runtime's ``MatMulNBits`` (int8 compute, ``accuracy_level=4``; the ort engine's kernel) with all
  88 nodes in one session, ib-edge's own ``MatMulQ4x8`` (the ``ort-q4x8`` kernel, runtime/q4x8.py)
  where the CPU runs it, and a
  plain ``torch.sum`` over a 1 GiB array (read bandwidth). Separate weights per layer, so the
  caches cannot hold them (a single matrix timed in a loop fits in L3 and flatters a kernel 2-3x).
* INT8 GEMM peak: a 2048-cube product in torch fp32, bf16 (operands converted beforehand),
  ``_int_mm`` (int8) and ORT ``MatMulInteger`` (u8 x s8), the ceiling for the INT8 ViT's
  QLinearMatMuls; ``--gemm-only`` runs just these.
* ``--profile-graph``: ONNX Runtime's per-op-type time for one graph (as the runtime runs it).

Random weights throughout; only speed is measured. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from ib_edge.runtime.cpuinfo import cpu_string

from .measure import best_time, memory_bandwidth

SHAPES = ((2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632))   # N, K of one layer's linears
LAYERS = 22


def _best(fn, repeats: int = 5) -> float:
    return best_time(fn, repeats, warmup=1)


def torch_int4(group: int) -> dict:
    import torch

    from ib_edge.runtime.int4 import Int4Linear

    mods = [Int4Linear.from_int4(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8),
                                 torch.full((n, k // group), 0.01), torch.full((n, k // group), 8, dtype=torch.uint8),
                                 group) for _ in range(LAYERS) for n, k in SHAPES]
    xs = {k: torch.randn(1, k) for _, k in SHAPES}
    with torch.no_grad():
        t = _best(lambda: [m(xs[m.in_features]) for m in mods])
    nbytes = sum(m.weight_bytes() for m in mods)
    return {"ms": round(t * 1e3, 2), "MB": round(nbytes / 1e6), "GB_s": round(nbytes / t / 1e9, 2)}


def ort_nbits(group: int, threads: int, accuracy_level: int = 4, q4x8: bool = False) -> dict:
    """The 88 linears in one ONNX Runtime session: ``MatMulNBits`` at ``accuracy_level``, or
    (``q4x8``) ib-edge's own op (runtime/q4x8.py) on the same int4 weights with zero points."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ib_edge.runtime import q4x8 as q4

    rng = np.random.default_rng(0)
    nodes, inits, outs, nbytes = [], [], [], 0
    for layer in range(LAYERS):
        for j, (n, k) in enumerate(SHAPES):
            i, nb = f"{layer}_{j}", k // group
            b = rng.integers(0, 256, (n, nb, group // 2), dtype=np.uint8)
            s = np.full((n * nb,), 0.01, np.float32)
            if q4x8:
                w, s, z, _, _ = q4.pack(b.reshape(n, k // 2), s.reshape(n, nb), np.full((n, nb), 8, np.uint8), group)
                arrays = {"B" + i: w, "S" + i: s, "Z" + i: z}
                nodes.append(helper.make_node(q4.OP, [f"A{k}", "B" + i, "S" + i, "Z" + i], ["Y" + i], domain=q4.DOMAIN,
                                              K=k, N=n))
            else:
                arrays = {"B" + i: b, "S" + i: s}
                nodes.append(helper.make_node("MatMulNBits", [f"A{k}", "B" + i, "S" + i], ["Y" + i],
                                              domain="com.microsoft", K=k, N=n, bits=4, block_size=group,
                                              accuracy_level=accuracy_level))
            inits += [numpy_helper.from_array(v, name) for name, v in arrays.items()]
            nbytes += sum(v.nbytes for v in arrays.values())
            outs.append(helper.make_tensor_value_info("Y" + i, TensorProto.FLOAT, [1, n]))
    ins = [helper.make_tensor_value_info(f"A{k}", TensorProto.FLOAT, [1, k]) for k in sorted({k for _, k in SHAPES})]
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    if q4x8:
        opsets.append(helper.make_opsetid(q4.DOMAIN, 1))
    model = helper.make_model(helper.make_graph(nodes, "linears", ins, outs, inits), opset_imports=opsets)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if q4x8:
        opts.register_custom_ops_library(str(q4.library()))
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: rng.standard_normal((1, int(i.name[1:]))).astype(np.float32) for i in sess.get_inputs()}
    t = _best(lambda: sess.run(None, feed))
    return {"ms": round(t * 1e3, 2), "MB": round(nbytes / 1e6), "bytes": nbytes, "GB_s": round(nbytes / t / 1e9, 2)}


def gemm_peaks(threads: int, size: int = 2048) -> dict:
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    ops = 2 * size ** 3
    a, b = torch.randn(size, size), torch.randn(size, size)
    ah, bh = a.bfloat16(), b.bfloat16()   # converted once: the GEMM alone is timed
    ai = torch.randint(-128, 127, (size, size), dtype=torch.int8)
    bi = torch.randint(-128, 127, (size, size), dtype=torch.int8)
    out = {"fp32_GFLOP_s": ops / _best(lambda: a @ b) / 1e9,
           "bf16_GFLOP_s": ops / _best(lambda: ah @ bh) / 1e9,
           "torch_int_mm_GOP_s": ops / _best(lambda: torch._int_mm(ai, bi)) / 1e9}
    w = np.random.default_rng(0).integers(-128, 127, (size, size), dtype=np.int8)
    g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "mm",
                          [helper.make_tensor_value_info("A", TensorProto.UINT8, [size, size])],
                          [helper.make_tensor_value_info("Y", TensorProto.INT32, [size, size])],
                          [numpy_helper.from_array(w, "B")])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(),
                                opts, providers=["CPUExecutionProvider"])
    x = {"A": np.random.default_rng(1).integers(0, 255, (size, size), dtype=np.uint8)}
    out["ort_MatMulInteger_GOP_s"] = ops / _best(lambda: sess.run(None, x)) / 1e9
    return {k: round(v, 1) for k, v in out.items()}


def profile_graph(path: str, threads: int, precision: str = "int8", runs: int = 3) -> dict:
    """ms per run by op type, as the runtime runs the graph (CSE off for Q/DQ graphs)."""
    import collections
    import os

    import onnxruntime as ort

    from ib_edge.runtime.stages import DISABLED_OPTIMIZERS

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS.get(precision, ())))
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feed[i.name] = (np.ones(shape, np.int64) if "int" in i.type else
                        np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        walls.append(time.perf_counter() - t0)
    trace = sess.end_profiling()
    try:
        with open(trace) as f:
            events = json.load(f)
    finally:
        os.remove(trace)
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    return {"run_ms": round(min(walls) * 1e3, 1),
            "ms_per_run_by_op": {k: round(v / runs / 1e3, 1) for k, v in per_op.most_common(12)}}


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description="Kernel ceilings on this machine (decode linears, int8 GEMM).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", action="store_true",
                    help="decode linears over MatMulNBits accuracy_level 0/1/4 x block 32/64/128 and torch's int4 "
                         "kernel at the same groups (the knobs behind the engine choice, runtime/kernel_choice.py)")
    ap.add_argument("--gemm-only", action="store_true", help="only the 2048-cube GEMM rates")
    ap.add_argument("--profile-graph", metavar="ONNX", default=None,
                    help="also profile this graph with ONNX Runtime (per op type)")
    ap.add_argument("--precision", default="int8", help="the graph's precision (int8: CSE off, as the runtime)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"threads": args.threads, "cpu": cpu_string(), "load_average_before": [round(v, 2) for v in os.getloadavg()]}
    if args.gemm_only:
        res["gemm_2048"] = gemm_peaks(args.threads)
        print(json.dumps(res, indent=2))
        return 0
    res["read_bandwidth_GB_s"] = memory_bandwidth(1024)["gb_per_s"]
    groups, levels = ((32, 64, 128), (0, 1, 4)) if args.sweep else ((64, 128), (4,))
    res["decode_linears_from_dram"] = {f"torch_int4_g{g}": torch_int4(g) for g in groups}
    for lvl in levels:
        for g in groups:
            tag = "" if lvl == 4 and not args.sweep else f"_acc{lvl}"
            res["decode_linears_from_dram"][f"ort_MatMulNBits_g{g}{tag}"] = ort_nbits(g, args.threads, lvl)
    from ib_edge.runtime.q4x8 import why_not

    why = why_not([128])   # ib-edge's own int4 op (the ort-q4x8 kernel), where this CPU runs it
    res["decode_linears_from_dram"]["ort_q4x8_g128"] = ({"not_run": why} if why else ort_nbits(128, args.threads, q4x8=True))
    res["gemm_2048"] = gemm_peaks(args.threads)
    if args.profile_graph:
        res["profile"] = {"graph": args.profile_graph, **profile_graph(args.profile_graph, args.threads, args.precision)}
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
