"""The fast LLM's whole decoder step as one ONNX Runtime graph (onnxruntime-genai style).

Same weights, same interface as ``llama.FastLlama`` (``decode.DecoderEngine``: forward(inputs_embeds,
start) -> last position's logits, a static KV cache, expand/reorder for beams), so ``decode.generate``
and ``decode.beam_search`` drive either. Built in memory at load time from the same bundle files
(the int4 layout of ``runtime.int4`` maps 1:1 onto ``MatMulNBits``), nothing extra stored.

Per layer: RMSNorm -> fused q/k/v ``MatMulNBits`` -> ``GroupQueryAttention`` (rotary inside, KV
cache in BNSH with past and present bound to the same buffer, so nothing is copied per step) -> o
``MatMulNBits`` -> residual add + RMSNorm -> fused gate/up ``MatMulNBits`` -> SiLU * up -> down
``MatMulNBits`` -> residual add + the next RMSNorm (each "residual add + RMSNorm" is one
``SkipSimplifiedLayerNormalization``: 44 fewer nodes per TinyLlama step). Then lm_head on the last
position only. Why: torch's CPU int4 kernel streams the decode
weights at 13-18 GB/s on this machine, ``MatMulNBits`` (int8 compute, ``accuracy_level`` 4) at
~26 GB/s (``python -m ib_edge.bench.kernels``), and one graph keeps the Python loop out of the step.

Weights reach ONNX Runtime as OrtValues over our own numpy arrays
(``SessionOptions.add_external_initializers``): the graph proto holds no weight bytes (no 2 GB
protobuf limit, no serialisation copy); ORT copies them into its own buffers at session creation.
The q4x8 kernel's weights (``runtime/q4x8.py``) are graph inputs instead, bound once through the
IO binding to our packed arrays, which ORT then reads in place (one copy fewer while loading).

No torch and no ``onnx`` package: the graph is written by ``onnx_proto``, weights, KV cache and
logits are numpy (an int4 bundle answers from onnxruntime, numpy, tokenizers and Pillow alone;
a cold ``ib-run`` skips ~4 s of imports, README "Cold start"). torch tensors are accepted as
inputs (converted without a copy); beam search imports torch for its bookkeeping (decode.py).
"""
from __future__ import annotations

import numpy as np

from . import onnx_proto as pb
from . import q4x8
from .decode import NumpyEmbedding, StaticKVCache, as_numpy
from .errors import BundleError, InputError
from .hugepages import WeightPages
from .llama_spec import LlamaArgs, ModelSpec
from .threads import ort_session_options

ACCURACY_LEVEL = 4          # MatMulNBits: int8 activations x int4 weights (the fast CPU path)
Q4X8 = "q4x8"               # ib-edge's own int4 x int8 op instead of MatMulNBits (runtime/q4x8.py)
# the ort engine's kernels: MatMulNBits accuracy_level or Q4X8 -> name; most exact first
# (kernel_choice.KERNELS is built from this)
KERNEL_NAMES = {1: "ort-fp32", 4: "ort-int8", Q4X8: "ort-q4x8"}
_PLACEHOLDER = "ib-edge-in-memory"


def ort_cannot_run(a: LlamaArgs, spec: ModelSpec) -> str | None:
    """Why the ONNX Runtime engine cannot run this model (None when it can)."""
    if a.hd % 16:
        return f"head dim {a.hd} is not a multiple of 16 (ONNX Runtime's GroupQueryAttention)"
    if a.n_heads % a.n_kv_heads:
        return f"{a.n_heads} attention heads are not a multiple of {a.n_kv_heads} key/value heads"
    for g in {s.group_size for l in spec.layers for s in (l.qkv, l.o, l.gate_up, l.down, spec.head)
              if s.kind == "int4"}:
        if g < 16 or g & (g - 1):
            return f"int4 group size {g} is not a power of two >= 16 (ONNX Runtime's MatMulNBits)"
    return None


def int4_group_sizes(spec: ModelSpec) -> set[int]:
    return {s.group_size for l in spec.layers for s in (l.qkv, l.o, l.gate_up, l.down, spec.head) if s.kind == "int4"}


def rope_freqs(a: LlamaArgs) -> np.ndarray:
    """position x inverse frequency [max_positions, hd/2] float32 (transformers' default rope,
    computed in float32 as ``llama.rope_freqs`` does with torch)."""
    exponent = np.arange(0, a.hd, 2, dtype=np.int64).astype(np.float32) / np.float32(a.hd)
    inv = np.float32(1.0) / np.power(np.float32(a.rope_theta), exponent, dtype=np.float32)
    return np.outer(np.arange(a.max_positions, dtype=np.float32), inv).astype(np.float32)


def _nbits(qweight, scales, qzeros, group: int):
    """The portable int4 (qweight uint8 [N, K/2] low nibble = even k, scales [N, K/G],
    qzeros uint8 [N, K/G]) -> MatMulNBits' B [N, K/G, G/2], scales [N, K/G], packed zero points
    [N, ceil(K/G / 2)] (low nibble = even block)."""
    qweight, qzeros = as_numpy(qweight), as_numpy(qzeros).astype(np.uint8)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    nb = k // group
    b = np.ascontiguousarray(qweight.reshape(n, nb, group // 2))
    s = np.ascontiguousarray(as_numpy(scales), dtype=np.float32)
    zp = qzeros if nb % 2 == 0 else np.concatenate([qzeros, np.full((n, 1), 8, np.uint8)], axis=1)
    return b, s, zp[:, 0::2] | (zp[:, 1::2] << 4), n, k


class _Graph:
    """Nodes plus weights held as numpy arrays (fed to ORT as external initializers).
    ``matmul``: the int4 linears' kernel, ``MatMulNBits`` at that ``accuracy_level`` (4, 1) or
    "q4x8" (ib-edge's own op, ``runtime/q4x8.py``)."""

    def __init__(self, matmul: int | str = ACCURACY_LEVEL):
        self.nodes, self.inits, self.arrays = [], [], {}
        self.bound, self.bound_inputs = {}, []   # weights fed as graph inputs (q4x8, below)
        self.n = 0
        self.matmul = matmul

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def weight(self, name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        self.inits.append(pb.tensor(name, arr, external={"location": _PLACEHOLDER, "offset": "0",
                                                         "length": str(arr.nbytes)}))
        self.arrays[name] = arr
        return name

    def bound_weight(self, name: str, arr: np.ndarray) -> str:
        """A weight that is a graph input, bound once to our array through the IO binding: ONNX
        Runtime then reads it in place (an initializer it would copy at session creation, which
        at 7B held a third copy of the int4 weights during the load)."""
        arr = np.ascontiguousarray(arr)
        self.bound_inputs.append(pb.value_info(name, pb.tensor_type(arr), list(arr.shape)))
        self.bound[name] = arr
        return name

    def const(self, name: str, arr: np.ndarray) -> str:  # small constants live in the proto
        self.inits.append(pb.tensor(name, np.asarray(arr)))
        return name

    def op(self, op: str, inputs, n_out: int = 1, domain: str = "", **attrs):
        outs = [self.name(op) for _ in range(n_out)]
        self.nodes.append(pb.node(op, list(inputs), outs, self.name(op + "_n"), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def linear(self, x: str, spec, tag: str) -> str:
        if spec.kind == "int4" and self.matmul == Q4X8:
            w, s, z, n, k = q4x8.pack(as_numpy(spec.qweight), as_numpy(spec.scales), as_numpy(spec.qzeros),
                                      spec.group_size)
            y = self.op(q4x8.OP, [x, self.bound_weight(tag + ".W", w), self.bound_weight(tag + ".S", s),
                                  self.bound_weight(tag + ".Z", z)], domain=q4x8.DOMAIN, K=k, N=n)
        elif spec.kind == "int4":
            b, s, zp, n, k = _nbits(spec.qweight, spec.scales, spec.qzeros, spec.group_size)
            y = self.op("MatMulNBits", [x, self.weight(tag + ".B", b), self.weight(tag + ".scales", s),
                                        self.weight(tag + ".zp", zp)],
                        domain="com.microsoft", K=k, N=n, bits=4, block_size=spec.group_size,
                        accuracy_level=self.matmul)
        else:
            y = self.op("MatMul", [x, self.weight(tag + ".wT", _f32(spec.weight).T)])
        if spec.bias is not None:
            y = self.op("Add", [y, self.weight(tag + ".bias", _f32(spec.bias))])
        return y

    def rms(self, x: str, w, eps: float, tag: str) -> str:
        return self.op("SimplifiedLayerNormalization", [x, self.weight(tag, _f32(w))], axis=-1, epsilon=float(eps))

    def add_rms(self, x: str, y: str, w, eps: float, tag: str) -> tuple[str, str]:
        """(RMSNorm(x + y), x + y) as one SkipSimplifiedLayerNormalization node (the residual add
        and the next norm: one node instead of two)."""
        normed, total = self.name("skip_norm"), self.name("residual")
        self.nodes.append(pb.node("SkipSimplifiedLayerNormalization", [y, x, self.weight(tag, _f32(w))],
                                  [normed, "", "", total], self.name("skip_norm_n"), domain="com.microsoft",
                                  epsilon=float(eps)))
        return normed, total


def _f32(x) -> np.ndarray:
    return as_numpy(x).astype(np.float32, copy=False)


def build_graph(a: LlamaArgs, specs: ModelSpec, matmul: int | str = ACCURACY_LEVEL
                ) -> tuple[bytes, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The decoder-step ONNX model, serialized (weights as external placeholders), its weight
    arrays (initializers) and the weights that are graph inputs, bound at run time (q4x8's);
    ``matmul``: MatMulNBits' compute type (4: int8 activations, 1: fp32) or "q4x8"."""
    g = _Graph(matmul)
    f, i32 = pb.FLOAT, pb.INT32
    inputs = [pb.value_info("inputs_embeds", f, ["batch", "seq", a.hidden_size]),
              pb.value_info("seqlens_k", i32, ["batch"]),
              pb.value_info("total_sequence_length", i32, [])]
    outputs = [pb.value_info("logits", f, ["batch", a.vocab_size])]
    freqs = rope_freqs(a)
    cos = g.weight("cos_cache", np.cos(freqs))
    sin = g.weight("sin_cache", np.sin(freqs))
    x = "inputs_embeds"
    h = g.rms(x, specs.layers[0].attn_norm, a.rms_eps, "l0.attn_norm")
    for li, layer in enumerate(specs.layers):
        p = f"l{li}"
        qkv = g.linear(h, layer.qkv, p + ".qkv")
        past_k, past_v = f"past_key.{li}", f"past_value.{li}"
        pres_k, pres_v = f"present_key.{li}", f"present_value.{li}"
        cache = ["batch", a.n_kv_heads, "max_len", a.hd]
        inputs += [pb.value_info(n, f, cache) for n in (past_k, past_v)]
        outputs += [pb.value_info(n, f, cache) for n in (pres_k, pres_v)]
        attn = g.name("attn")
        g.nodes.append(pb.node(
            "GroupQueryAttention", [qkv, "", "", past_k, past_v, "seqlens_k", "total_sequence_length", cos, sin],
            [attn, pres_k, pres_v], g.name("gqa"), domain="com.microsoft",
            num_heads=a.n_heads, kv_num_heads=a.n_kv_heads, do_rotary=1, rotary_interleaved=0))
        h, x = g.add_rms(x, g.linear(attn, layer.o, p + ".o"), layer.ffn_norm, a.rms_eps, p + ".ffn_norm")
        gu = g.linear(h, layer.gate_up, p + ".gate_up")
        gate, up = g.op("Split", [gu, g.const(g.name("split"), np.array([a.intermediate_size] * 2, np.int64))],
                        n_out=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        # the residual add and the next norm (the next layer's, or the final one) in one node
        nxt = (specs.layers[li + 1].attn_norm, f"l{li + 1}.attn_norm") if li + 1 < len(specs.layers) else \
            (specs.norm, "final_norm")
        h, x = g.add_rms(x, g.linear(act, layer.down, p + ".down"), nxt[0], a.rms_eps, nxt[1])
    # the final norm ran on every position (as cheap as one at decode): lm_head on the last only
    last = g.op("Slice", [h, g.const("last_start", np.array([-1], np.int64)),
                          g.const("last_end", np.array([np.iinfo(np.int64).max], np.int64)),
                          g.const("last_axis", np.array([1], np.int64))])
    y = g.linear(last, specs.head, "lm_head")
    g.nodes.append(pb.node("Reshape", [y, g.const("logits_shape", np.array([-1, a.vocab_size], np.int64))],
                           ["logits"], "logits_reshape"))
    model = pb.model(g.nodes, "ib_edge_llama_step", inputs + g.bound_inputs, outputs, g.inits,
                     opsets={"": 18, "com.microsoft": 1, **({q4x8.DOMAIN: 1} if matmul == Q4X8 else {})},
                     ir_version=10)
    return model, g.arrays, g.bound


class OrtLlama(StaticKVCache):
    """forward(inputs_embeds [B, T, D], start) -> logits of the last position [B, V], filling the
    static KV cache at positions start..start+T-1 (as ``llama.FastLlama``; a chunk after a
    prefix, start > 0 and T > 1, only at batch 1: GroupQueryAttention's limit)."""
    engine = "ort"

    def __init__(self, a: LlamaArgs, specs: ModelSpec, threads: int | None = None,
                 matmul: int | str = ACCURACY_LEVEL):
        import onnxruntime as ort

        why = ort_cannot_run(a, specs)
        if not why and matmul == Q4X8:
            why = q4x8.why_not(int4_group_sizes(specs))
        if why:
            raise BundleError(f"the ort LLM engine cannot run this model: {why}", hint="run with --llm-engine torch")
        self.a = a
        self.embed = NumpyEmbedding(specs.embed)
        self._weight_bytes = specs.weight_bytes_per_token(a)
        self.kernel = KERNEL_NAMES.get(matmul, f"ort-acc{matmul}")
        opts = ort_session_options(ort, threads, log_severity=4)   # failures: one BundleError line below
        try:
            if matmul == Q4X8:
                opts.register_custom_ops_library(str(q4x8.library()))
            # the weights on 2 MiB pages (hugepages.py): ORT's copies made while the session is
            # built, and the bound weights (q4x8's, ours) packed inside the block as well
            with WeightPages() as pages:
                model, arrays, self._weights = build_graph(a, specs, matmul)
                names = list(arrays)
                opts.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(arrays[n]) for n in names])
                self.sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types
            raise BundleError(f"ONNX Runtime cannot build the LLM decoder graph: {str(e).splitlines()[0]}",
                              hint="run with --llm-engine torch") from None
        self.huge_pages = pages.record
        # ORT copied the initializers into its own buffers (MatMulNBits' weights prepacked): ours
        # go (tests/test_ortllm.py zeroes them after the build and decodes the same). The bound
        # weights (q4x8's) stay ours, read in place every step.
        del arrays, model
        self._no_cache()
        self._io = self._io_cache = None

    def __call__(self, x, start: int) -> np.ndarray:
        return self.forward(x, start)

    def _zeros(self, shape) -> np.ndarray:
        return np.zeros(shape, np.float32)

    def expand_cache(self, batch: int) -> None:
        self.k_cache = [np.ascontiguousarray(np.broadcast_to(kc, (batch, *kc.shape[1:]))) for kc in self.k_cache]
        self.v_cache = [np.ascontiguousarray(np.broadcast_to(vc, (batch, *vc.shape[1:]))) for vc in self.v_cache]

    def reorder_cache(self, rows, filled: int) -> None:
        rows = as_numpy(rows)
        if np.array_equal(rows, np.arange(len(rows))):
            return
        for kc, vc in zip(self.k_cache, self.v_cache):   # in place: the IO binding keeps its buffers
            kc[:, :, :filled] = kc[rows, :, :filled]
            vc[:, :, :filled] = vc[rows, :, :filled]

    def forward(self, x, start: int) -> np.ndarray:
        """x: inputs_embeds [B, T, D], numpy or a CPU torch tensor; logits [B, V] float32 numpy."""
        b, t, d = x.shape
        if d != self.a.hidden_size or t < 1:
            raise InputError(f"inputs_embeds [{b}, {t}, {d}]: expected at least one position of width "
                             f"{self.a.hidden_size}")
        if b > 1 and t > 1 and start > 0:
            raise InputError("the ort LLM engine runs a chunk after a prefix at batch 1 only "
                             "(GroupQueryAttention); use --llm-engine torch")
        if start + t > self.max_len:
            raise InputError(f"position {start + t} is past the KV cache ({self.max_len}); call setup_cache")
        if not self.k_cache or self.k_cache[0].shape[0] != b:
            raise InputError(f"batch {b} does not match the KV cache's {self.k_cache[0].shape[0] if self.k_cache else 0}")
        x = np.ascontiguousarray(as_numpy(x), dtype=np.float32)
        io = self._cache_binding()
        _bind(io.bind_input, "inputs_embeds", x)
        io.bind_cpu_input("seqlens_k", np.full((b,), start + t - 1, np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(start + t, np.int32))
        logits = np.empty((b, self.a.vocab_size), np.float32)
        _bind(io.bind_output, "logits", logits)
        self.sess.run_with_iobinding(io)
        return logits

    def _cache_binding(self):
        """An IO binding with every layer's K/V buffer bound as past and present, made again only
        when setup_cache/expand_cache replaced the buffers (reorder_cache writes in place): binding
        the 2 x 2 x 22 buffers of the TinyLlama shape costs ~0.3 ms, per step if redone."""
        if self._io_cache is not self.k_cache:
            io = self.sess.io_binding()
            for name, arr in self._weights.items():
                _bind(io.bind_input, name, arr)
            for i, (kc, vc) in enumerate(zip(self.k_cache, self.v_cache)):
                for kind, buf in (("key", kc), ("value", vc)):
                    _bind(io.bind_input, f"past_{kind}.{i}", buf)
                    _bind(io.bind_output, f"present_{kind}.{i}", buf)
            self._io, self._io_cache = io, self.k_cache   # the list held: its buffers stay alive
        return self._io

    def weight_bytes_per_token(self) -> int:
        return self._weight_bytes


def _bind(fn, name: str, t: np.ndarray) -> None:
    fn(name, "cpu", 0, t.dtype, list(t.shape), t.ctypes.data)
