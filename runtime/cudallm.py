"""The fast Llama on an NVIDIA GPU (engine "cuda"): torch's CUDA int4 kernel, bf16, a static
KV cache in device memory and the decode step replayed as one CUDA graph.

The same ib-edge int4 bundle as the CPU engines (``runtime/int4.py``, ``runtime/llama.py``: portable nibbles, low
nibble = even k; fp32 scales; integer zero points; w = (q - zp) * s). At load time each int4
linear is repacked for tinygemm (``aten._weight_int4pack_mm``, compiled for compute capability
>= 8.0: Ampere, Orin's 8.7, Hopper), whose conventions, read from
``aten/src/ATen/native/cuda/int4mm.cu``:

- ``_convert_weight_to_int4pack(uint8 [N, K/2], innerKTiles)``: two nibbles per byte with the
  HIGH nibble = even k (the opposite of our storage), K a multiple of innerKTiles * 16 (2/4/8);
  output int32 [ceil(N/8), K/(innerKTiles*16), 32, innerKTiles/2];
- ``_weight_int4pack_mm(x bf16 [M, K] contiguous, packed, group_size 32/64/128/256,
  scales_and_zeros bf16 [K/G, ceil(N/8)*8, 2])`` -> bf16 [M, ceil(N/8)*8]; each weight is
  dequantized as bf16 fma((q - 8), scale, zero) (``__hfma2``), i.e. the zero point is a float
  offset. From integer zero points: (q - zp) * s == (q - 8) * s + (8 - zp) * s, so z = (8 - zp) * s,
  exact in real arithmetic; storing s and z in bf16 (the kernel reads bf16 pairs) rounds them, as
  the CPU engine's kernel does with the same numbers (``int4.Int4Linear.from_int4``).

``tinygemm_inputs`` (the layout transform fed to the packer) and ``reference_dequant`` (a pure
torch dequantizer with the kernel's semantics) are device-agnostic and tested on CPU.

The model: the residual stream in fp32, RMS norms computed in fp32 and handed to the linears in
bf16, rope in fp32, attention in bf16 (SDPA, fp32 softmax inside) over a bf16 KV cache of the full
static length with a position mask, so one captured graph serves every position: the position is
a device tensor written with ``fill_`` (a kernel argument, no copy, no sync) before each replay.
The only host sync per token is the decode loop reading the sampled id. On ``device="cpu"`` the
same model runs eagerly with the CPU int4 kernel: that is how CI and ``bench/gpu_check.py
--cpu-rehearsal`` exercise this file without a GPU.

Greedy, sampling, beams and streaming are ``runtime/decode.py``'s loops (``generate``/``beam_search``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BundleError, InputError
from .decode import StaticKVCache
from .device import DEVICES, MIN_CAPABILITY, cuda_unavailable_reason, resolve_llm_engine  # noqa: F401 (re-exported)
from .int4 import check_int4_shapes, unpack_nibbles
from .llama import LinearSpec, LlamaArgs, ModelSpec, rope_freqs

INNER_K_TILES = (8, 4, 2)     # 16/8/4-byte loads per lane: the widest that divides K wins
N_ALIGN = {"cuda": 8, "cpu": 16}  # kernel N tiles: CUDA kNTileSize 8; the CPU kernel wants 16
CACHE_QUANTUM = 128           # KV cache lengths are rounded up to this (masked slots cost little)


# --- tinygemm's layout, as data (CPU-testable) -------------------------------------------------
def inner_k_tiles(k: int) -> int:
    """The widest innerKTiles (8, 4, 2) whose 16-value k tiles divide in_features."""
    for t in INNER_K_TILES:
        if k % (t * 16) == 0:
            return t
    raise BundleError(f"in_features {k} is not a multiple of 32, which torch's CUDA int4 kernel needs")


def tinygemm_inputs(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, group_size: int,
                    n_align: int = N_ALIGN["cuda"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable int4 (qweight uint8 [N, K/2] low nibble = even k; scales [N, K/G]; integer qzeros
    [N, K/G]) -> what the tinygemm packer and kernel take: uint8 [Np, K/2] with the HIGH nibble =
    even k, and scales_and_zeros bf16 [K/G, Np, 2] with z = (8 - zp) * s (the kernel computes
    (q - 8) * s + z). Np = N rounded up to ``n_align``; padded rows dequantize to 0 (q = 8,
    s = z = 0) and their outputs are sliced off."""
    n, k = check_int4_shapes(qweight, scales, qzeros, group_size, "torch's CUDA int4 kernels")
    qw = qweight.to(torch.uint8)
    swapped = ((qw & 0x0F) << 4) | (qw >> 4)
    s = scales.float()
    z = (8.0 - qzeros.float()) * s          # (q - zp) * s == (q - 8) * s + (8 - zp) * s
    pad = -n % n_align
    if pad:
        swapped = torch.cat([swapped, torch.full((pad, k // 2), 0x88, dtype=torch.uint8, device=qw.device)])
        s = torch.cat([s, s.new_zeros(pad, s.shape[1])])
        z = torch.cat([z, z.new_zeros(pad, z.shape[1])])
    sz = torch.stack([s.t(), z.t()], dim=-1).contiguous().to(torch.bfloat16)
    return swapped.contiguous(), sz


def reference_dequant(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """What tinygemm computes per weight, in pure torch: from ``tinygemm_inputs``' uint8 [N, K/2]
    (high nibble = even k) and bf16 [K/G, N, 2], w = bf16((q - 8) * s + z) [N, K] (one rounding,
    as the kernel's bf16 fma; the fp32 expression is exact for 4-bit q and bf16 s, z)."""
    q = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(packed.shape[0], -1).float()
    s = scales_and_zeros[..., 0].t().float().repeat_interleave(group_size, dim=1)
    z = scales_and_zeros[..., 1].t().float().repeat_interleave(group_size, dim=1)
    return ((q - 8.0) * s + z).to(torch.bfloat16)


def portable_dequant(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The stored weight, fp32: (q - zp) * s, from the portable format (no kernel conventions)."""
    q = unpack_nibbles(qweight).float()
    rep = lambda t: t.float().repeat_interleave(group_size, dim=1)  # noqa: E731
    return (q - rep(qzeros)) * rep(scales)


# --- the linears --------------------------------------------------------------------------------
class TinygemmLinear(nn.Module):
    """y = x @ W.T (+ b), x bf16 [M, K] -> bf16 [M, N], W in int4 on torch's int4 kernel: CUDA's
    tinygemm on a GPU, the CPU kernel on ``device="cpu"`` (same scales_and_zeros, other packing)."""

    def __init__(self, spec: LinearSpec, device: torch.device):
        super().__init__()
        n, k = spec.qweight.shape[0], spec.qweight.shape[1] * 2
        self.in_features, self.out_features, self.group_size = k, n, spec.group_size
        # the transform runs where the weights will live (a GPU does a 7B model's in a blink)
        u8, sz = tinygemm_inputs(spec.qweight.to(device), spec.scales.to(device), spec.qzeros.to(device),
                                 spec.group_size, N_ALIGN[device.type])
        if device.type == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack(u8, inner_k_tiles(k))
            self._mm = torch.ops.aten._weight_int4pack_mm
        else:
            q = torch.stack([u8 >> 4, u8 & 0x0F], dim=-1).reshape(u8.shape[0], -1).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
            self._mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", sz)
        self.register_buffer("bias", None if spec.bias is None else spec.bias.to(device, torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._mm(x.contiguous(), self.packed, self.group_size, self.scales_and_zeros)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        return y if self.bias is None else y + self.bias

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))


class DenseLinear(nn.Module):
    """A float linear (fp32 bundles, tied heads) in bf16 on the device."""

    def __init__(self, spec: LinearSpec, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = spec.weight.shape[1], spec.weight.shape[0]
        self.register_buffer("weight", spec.weight.to(device, torch.bfloat16))
        self.register_buffer("bias", None if spec.bias is None else spec.bias.to(device, torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def make_linear(spec: LinearSpec, device: torch.device) -> nn.Module:
    return TinygemmLinear(spec, device) if spec.kind == "int4" else DenseLinear(spec, device)


class DeviceEmbedding(nn.Module):
    """Token embeddings kept in bf16 on the device; ids from anywhere, fp32 rows out."""

    def __init__(self, weight: torch.Tensor, device: torch.device):
        super().__init__()
        self.register_buffer("weight", weight.to(device, torch.bfloat16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.to(self.weight.device), self.weight).float()


# --- the model -----------------------------------------------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, eps).to(torch.bfloat16)   # fp32 in, bf16 for the linears


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x = x.float()
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rot * sin).to(torch.bfloat16)


class CudaBlock(nn.Module):
    def __init__(self, a: LlamaArgs, layer, device: torch.device):
        super().__init__()
        self.a = a
        self.wqkv, self.wo = make_linear(layer.qkv, device), make_linear(layer.o, device)
        self.w13, self.w2 = make_linear(layer.gate_up, device), make_linear(layer.down, device)
        self.register_buffer("attn_norm", layer.attn_norm.to(device, torch.float32))
        self.register_buffer("ffn_norm", layer.ffn_norm.to(device, torch.float32))
        self.q_size, self.kv_size = a.n_heads * a.hd, a.n_kv_heads * a.hd
        self.group = a.n_heads // a.n_kv_heads

    def forward(self, x, cos, sin, pos, mask, k_cache, v_cache):
        """x fp32 [B, T, D]; pos long [T] (device); mask bool [T, L]; caches bf16 [B, KV, L, hd]."""
        a = self.a
        b, t, d = x.shape
        qkv = self.wqkv(_rms(x, self.attn_norm, a.rms_eps).reshape(b * t, d)).view(b, t, -1)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # rope on the query and key heads at once (half the small kernels of doing each)
        qk = _rope(qk.reshape(b, t, a.n_heads + a.n_kv_heads, a.hd).transpose(1, 2), cos, sin)
        q, k = qk[:, :a.n_heads], qk[:, a.n_heads:]
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v.reshape(b, t, a.n_kv_heads, a.hd).transpose(1, 2).contiguous())
        # grouped-query attention without copying the cache: the `group` query heads that share
        # a key/value head (transformers' repeat_kv order) become `group * t` query rows of it
        qg = q.reshape(b, a.n_kv_heads, self.group * t, a.hd)
        o = F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=mask.repeat(self.group, 1))
        o = o.reshape(b, a.n_heads, t, a.hd).transpose(1, 2).reshape(b * t, self.q_size)
        x = x + self.wo(o).float().view(b, t, d)
        gate, up = self.w13(_rms(x, self.ffn_norm, a.rms_eps).reshape(b * t, d)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up).float().view(b, t, d)


class CudaLlama(nn.Module, StaticKVCache):
    """forward(inputs_embeds [B, T, D] (any device/dtype), start) -> fp32 logits of the last
    position [B, V] on the device, filling the static KV cache at start..start+T-1. Single-token
    steps replay a CUDA graph captured on first use for the cache's batch size (recaptured when
    the cache is reallocated); prefills run eagerly."""
    engine = "cuda"

    def __init__(self, a: LlamaArgs, spec: ModelSpec, device: str = "cuda", graphs: bool | None = None,
                 compile: bool = False):
        super().__init__()
        if device not in DEVICES:
            raise InputError(f"device must be cuda or cpu, not {device!r}")
        if device == "cuda":
            why = cuda_unavailable_reason()
            if why is not None:
                raise InputError(f"the cuda LLM engine cannot run: {why}", hint="use --device cpu")
        self.a, self.device = a, torch.device(device)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise InputError("CUDA graphs need device cuda")
        # compile: the decode step through torch.compile (inductor fuses the ~40 small elementwise
        # kernels per layer that eager launches; the graph then replays the fused ones). Costs a
        # compile per cache shape at first use; whether it pays is measured by bench/gpu_check.py.
        self.set_compile(compile)
        dev = self.device
        self.embed = DeviceEmbedding(spec.embed, dev)
        self.layers = nn.ModuleList(CudaBlock(a, l, dev) for l in spec.layers)
        self.register_buffer("norm", spec.norm.to(dev, torch.float32))
        self.lm_head = make_linear(spec.head, dev)
        freqs = rope_freqs(a)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos().to(dev))
        self.register_buffer("sin", emb.sin().to(dev))
        self._no_cache()
        self._drop_graph()
        self.eval()

    def set_compile(self, on: bool) -> None:
        """Decode steps through torch.compile (on) or eager ops (off); drops a captured graph."""
        self.compiled = on
        self._decode_step = torch.compile(self._step, dynamic=False, fullgraph=True) if on else self._step
        self._drop_graph()

    # --- the static KV cache, in device memory ---------------------------------------------
    cache_dtype = torch.bfloat16
    cache_quantum = CACHE_QUANTUM      # one captured graph (and compile) serves many prompt lengths

    @property
    def cache_device(self):
        return self.device

    def _new_cache(self, max_len: int) -> None:
        self._drop_graph()
        self._key_pos = torch.arange(max_len, device=self.device)

    def expand_cache(self, batch: int) -> None:
        self._drop_graph()
        self.k_cache = [kc.expand(batch, -1, -1, -1).contiguous() for kc in self.k_cache]
        self.v_cache = [vc.expand(batch, -1, -1, -1).contiguous() for vc in self.v_cache]

    def reorder_cache(self, rows: torch.Tensor, filled: int) -> None:
        """In place (the captured graph keeps its buffers): row i <- old row rows[i]."""
        rows = rows.cpu()
        if torch.equal(rows, torch.arange(len(rows))):
            return
        idx = rows.to(self.device)
        for kc, vc in zip(self.k_cache, self.v_cache):
            kc[:, :, :filled] = kc[:, :, :filled].index_select(0, idx)
            vc[:, :, :filled] = vc[:, :, :filled].index_select(0, idx)

    # --- forward ----------------------------------------------------------------------------
    def _step(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x fp32 [B, T, D] on the device, pos long [T] on the device -> fp32 logits [B, V]."""
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        mask = self._key_pos[None, :] <= pos[:, None]          # [T, L]: causal, and unwritten slots hidden
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            x = layer(x, cos, sin, pos, mask, kc, vc)
        h = _rms(x[:, -1], self.norm, self.a.rms_eps)
        return self.lm_head(h).float()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        b, t = x.shape[0], x.shape[1]
        if start + t > self.max_len:
            raise InputError(f"position {start + t} is past the KV cache ({self.max_len}); call setup_cache")
        if b != self.k_cache[0].shape[0]:
            raise InputError(f"batch {b} does not match the KV cache's {self.k_cache[0].shape[0]}; call setup_cache")
        if t == 1 and self.graphs:
            return self._replay(x, start)
        pos = torch.arange(start, start + t, device=self.device)
        step = self._decode_step if t == 1 else self._step
        return step(x.to(self.device, torch.float32), pos)

    def _drop_graph(self) -> None:
        self._graph = self._g_x = self._g_pos = self._g_out = None
        self.captures = getattr(self, "captures", 0)

    def _replay(self, x: torch.Tensor, start: int) -> torch.Tensor:
        if self._graph is None:
            self._capture(x, start)
        self._g_x.copy_(x)
        self._g_pos.fill_(start)       # a kernel argument: no host-to-device copy, no sync
        self._graph.replay()
        return self._g_out.clone()

    def _capture(self, x: torch.Tensor, start: int) -> None:
        """Capture one decode step. The warm-up runs write the real K/V of this step (the same
        values the replay writes again), so capturing costs nothing in correctness."""
        self._g_x = x.to(self.device, torch.float32).clone()
        self._g_pos = torch.full((1,), start, dtype=torch.long, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):   # compilation, kernel selection, allocator warm-up outside the graph
                self._decode_step(self._g_x, self._g_pos)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._g_out = self._decode_step(self._g_x, self._g_pos)
        self._graph = graph
        self.captures += 1

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads: linears as packed for the kernel, norms, one
        embedding row."""
        lin = sum(m.weight_bytes() for m in self.modules() if isinstance(m, (TinygemmLinear, DenseLinear)))
        norms = (2 * len(self.layers) + 1) * self.a.hidden_size * 4
        return lin + norms + self.a.hidden_size * self.embed.weight.element_size()
