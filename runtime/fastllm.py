"""A fast decoder-only LLM for CPU: our own Llama forward, static KV cache, int4 or fp32 linears.

gpt-fast style. Weights come from a directory holding transformers' ``config.json`` and
safetensors: either plain float weights (``model.layers.0.self_attn.q_proj.weight``...) or the
ib-edge int4 format written by ``ib_edge.quant.int4`` (per quantized linear ``{name}.qweight``
uint8 [N, K/2] two nibbles per byte, low nibble = even k; ``{name}.scales`` [N, K/G];
``{name}.qzeros`` uint8 [N, K/G]; w = (q - qzeros) * scales; the group size is in the
safetensors metadata). That portable layout is converted at load time into torch's CPU int4
kernel layout (``_convert_weight_to_int4pack_for_cpu``; the packed form depends on the kernel,
so it is never stored).

The int4 kernel (``aten._weight_int4pack_mm_for_cpu``) computes x @ dequant(W).T with
dequant = (q - 8) * s + z in bf16 (its fp32 path is a slow scalar fallback, measured 30-40x
slower); so Int4Linear casts activations to bf16 and back. Everything else runs in fp32.

The same weights also run on ONNX Runtime (``runtime/ortllm.py``, engine "ort", the default):
``assemble``/``load`` pick the engine; ``generate`` and ``beam_search`` drive either.

    python -m ib_edge.runtime.fastllm --bench     # TinyLlama-shaped decode speed: both engines, transformers, NF4
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BundleError, InputError

INT4_FORMAT = "ib-edge-int4"
INT4_FORMAT_VERSION = "1"
KERNEL_GROUP_SIZES = (32, 64, 128, 256)
_N_ALIGN = 16  # the CPU kernel needs N divisible by 16: rows are padded, outputs sliced


# --- the portable int4 storage format (shared with ib_edge.quant.int4) ---------------------
def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> uint8 [N, K/2], low nibble = even k."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 values 0..15 [N, K]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


class Int4Linear(nn.Module):
    """y = x @ W.T (+ b) with W in group-wise asymmetric int4 on torch's CPU int4 kernel."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int,
                 in_features: int, group_size: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    @classmethod
    def from_int4(cls, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, group_size: int,
                  bias: torch.Tensor | None = None) -> "Int4Linear":
        """qweight uint8 [N, K/2] (portable nibbles), scales [N, K/G], qzeros [N, K/G] integer zero points."""
        n, k = qweight.shape[0], qweight.shape[1] * 2
        if group_size not in KERNEL_GROUP_SIZES or k % group_size:
            raise BundleError(f"int4 group size {group_size} with in_features {k} is not supported by the CPU "
                              f"kernel (group size one of {KERNEL_GROUP_SIZES}, dividing in_features)")
        if scales.shape != (n, k // group_size) or qzeros.shape != scales.shape:
            raise BundleError(f"int4 scales/zeros shapes {tuple(scales.shape)}/{tuple(qzeros.shape)} do not "
                              f"match weight [{n}, {k}] with group size {group_size}")
        q = unpack_nibbles(qweight).to(torch.int32)
        s = scales.float()
        z = (8.0 - qzeros.float()) * s          # (q - zp) * s == (q - 8) * s + (8 - zp) * s
        pad = -n % _N_ALIGN
        if pad:
            q = torch.cat([q, torch.full((pad, k), 8, dtype=torch.int32)])
            s = torch.cat([s, torch.zeros(pad, s.shape[1])])
            z = torch.cat([z, torch.zeros(pad, z.shape[1])])
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        sz = torch.stack([s.t(), z.t()], dim=-1).contiguous().to(torch.bfloat16)  # [K/G, N, 2]
        return cls(packed, sz, n, k, group_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                       self.packed, self.group_size, self.scales_and_zeros)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def weight_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + \
            self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()


def dense(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = nn.Parameter(weight.float(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.float(), requires_grad=False)
    return lin


def linear_bytes(m: nn.Module) -> int:
    if isinstance(m, Int4Linear):
        return m.weight_bytes()
    return m.weight.numel() * m.weight.element_size()


# --- the model ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0                 # 0: hidden_size // n_heads
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_positions: int = 2048
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.n_heads

    @classmethod
    def from_config(cls, cfg: dict) -> "LlamaArgs":
        if cfg.get("model_type") != "llama":
            raise BundleError(f"the fast LLM runtime supports llama, not {cfg.get('model_type')!r}",
                              hint="export with the transformers LLM backend")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise BundleError("the LLM's config.json: rope parameters are not an object", hint="re-export the bundle")
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise BundleError(f"rope type {rope.get('rope_type')!r} is not supported by the fast LLM runtime",
                              hint="export with the transformers LLM backend")
        if cfg.get("hidden_act", "silu") != "silu":
            raise BundleError(f"activation {cfg['hidden_act']!r} is not supported by the fast LLM runtime")
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        for key in sizes + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = cfg.get(key)
            if (key in sizes or v is not None) and (isinstance(v, bool) or not isinstance(v, int) or not
                                                     0 <= v <= 1 << 24 or (key in sizes and v == 0)):
                raise BundleError(f"the LLM's config.json: {key} = {json.dumps(v)[:40]} is not a valid size",
                                  hint="re-export the bundle")
        a = cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                intermediate_size=cfg["intermediate_size"], head_dim=cfg.get("head_dim") or 0,
                rms_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                max_positions=cfg.get("max_position_embeddings", 2048),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)))
        if a.n_kv_heads == 0 or a.n_heads % a.n_kv_heads or a.hd % 2 or a.hd == 0:
            raise BundleError(f"the LLM's config.json: {a.n_heads} heads, {a.n_kv_heads} key/value heads and head "
                              f"dim {a.hd} do not describe a Llama attention", hint="re-export the bundle")
        return a


PRESETS = {"tinyllama-1.1b": LlamaArgs(vocab_size=32000, hidden_size=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                                       intermediate_size=5632, max_positions=2048),
           # a few MB, for checking the benchmark itself
           "smoke": LlamaArgs(vocab_size=1024, hidden_size=256, n_layers=2, n_heads=4, n_kv_heads=2,
                              intermediate_size=512, max_positions=256)}


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class Block(nn.Module):
    def __init__(self, a: LlamaArgs, wqkv: nn.Module, wo: nn.Module, w13: nn.Module, w2: nn.Module,
                 attn_norm: torch.Tensor, ffn_norm: torch.Tensor):
        super().__init__()
        self.a, self.wqkv, self.wo, self.w13, self.w2 = a, wqkv, wo, w13, w2
        self.register_buffer("attn_norm", attn_norm.float())
        self.register_buffer("ffn_norm", ffn_norm.float())
        self.q_size, self.kv_size = a.n_heads * a.hd, a.n_kv_heads * a.hd

    def forward(self, x, cos, sin, start: int, k_cache, v_cache):
        a = self.a
        b, t, _ = x.shape
        qkv = self.wqkv(rms_norm(x, self.attn_norm, a.rms_eps))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = _rope(q.view(b, t, a.n_heads, a.hd).transpose(1, 2), cos, sin)
        k = _rope(k.view(b, t, a.n_kv_heads, a.hd).transpose(1, 2), cos, sin)
        k_cache[:, :, start:start + t] = k
        v_cache[:, :, start:start + t] = v.view(b, t, a.n_kv_heads, a.hd).transpose(1, 2)
        keys, values = k_cache[:, :, :start + t], v_cache[:, :, :start + t]
        if t == 1:
            mask, causal = None, False
        elif start == 0:
            mask, causal = None, True
        else:  # a chunk after a prefix: causal within the chunk, everything before visible
            mask = torch.ones(t, start + t, dtype=torch.bool).tril(start)
            causal = False
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                           enable_gqa=a.n_kv_heads != a.n_heads)
        x = x + self.wo(o.transpose(1, 2).reshape(b, t, self.q_size))
        gate, up = self.w13(rms_norm(x, self.ffn_norm, a.rms_eps)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


def _rope(x, cos, sin):  # transformers' rotate_half convention
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def rope_freqs(a: LlamaArgs) -> torch.Tensor:
    """position x inverse frequency [max_positions, hd/2] (transformers' default rope)."""
    inv = 1.0 / (a.rope_theta ** (torch.arange(0, a.hd, 2, dtype=torch.int64).float() / a.hd))
    return torch.outer(torch.arange(a.max_positions, dtype=torch.float32), inv)


class StaticKVCache:
    """Per-layer K/V buffers [batch, kv_heads, max_len, head_dim] (fp32), shared by both engines:
    the torch engine writes them itself, the ONNX Runtime engine binds them as past and present."""
    a: LlamaArgs
    k_cache: list
    v_cache: list
    max_len: int

    def _no_cache(self) -> None:
        self.k_cache, self.v_cache, self.max_len = [], [], 0

    def setup_cache(self, max_len: int, batch: int = 1) -> None:
        a = self.a
        if max_len > a.max_positions:
            raise InputError(f"prompt + new tokens ({max_len}) exceed the LLM's {a.max_positions} positions")
        if self.k_cache and self.max_len >= max_len and self.k_cache[0].shape[0] == batch:
            return
        shape = (batch, a.n_kv_heads, max_len, a.hd)
        self.k_cache = [torch.zeros(shape) for _ in range(a.n_layers)]
        self.v_cache = [torch.zeros(shape) for _ in range(a.n_layers)]
        self.max_len = max_len

    def expand_cache(self, batch: int) -> None:
        """Copy a batch-1 cache (after a prefill) to ``batch`` rows, e.g. one per beam."""
        self.k_cache = [kc.expand(batch, -1, -1, -1).contiguous() for kc in self.k_cache]
        self.v_cache = [vc.expand(batch, -1, -1, -1).contiguous() for vc in self.v_cache]

    def reorder_cache(self, rows: torch.Tensor, filled: int) -> None:
        """Row i of every cache becomes old row ``rows[i]`` (beam search's survivors), for the
        first ``filled`` positions (the rest is unwritten); nothing to do when no beam moved."""
        if torch.equal(rows, torch.arange(len(rows))):
            return
        for kc, vc in zip(self.k_cache, self.v_cache):
            kc[:, :, :filled] = kc[:, :, :filled].index_select(0, rows)
            vc[:, :, :filled] = vc[:, :, :filled].index_select(0, rows)


class FastLlama(nn.Module, StaticKVCache):
    """forward(inputs_embeds [B, T, D], start) -> logits of the last position [B, V], filling the
    static KV cache at positions start..start+T-1."""
    engine = "torch"

    def __init__(self, a: LlamaArgs, embed: torch.Tensor, blocks: list[Block], norm: torch.Tensor, lm_head: nn.Module):
        super().__init__()
        self.a = a
        self.embed = nn.Embedding.from_pretrained(embed.float(), freeze=True)
        self.layers = nn.ModuleList(blocks)
        self.register_buffer("norm", norm.float())
        self.lm_head = lm_head
        freqs = rope_freqs(a)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self._no_cache()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        t = x.shape[1]
        if start + t > self.max_len:
            raise InputError(f"position {start + t} is past the KV cache ({self.max_len}); call setup_cache")
        cos, sin = self.cos[start:start + t], self.sin[start:start + t]
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            x = layer(x, cos, sin, start, kc, vc)
        return self.lm_head(rms_norm(x[:, -1], self.norm, self.a.rms_eps))

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights every decode step reads (linears, norms, one embedding row)."""
        lin = sum(linear_bytes(m) for m in self.modules() if isinstance(m, (nn.Linear, Int4Linear)))
        norms = (2 * len(self.layers) + 1) * self.a.hidden_size * 4
        return lin + norms + self.a.hidden_size * 4


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy when temperature == 0 and top_p == 1; otherwise transformers' temperature then
    top-p (nucleus) warping, then one multinomial draw. logits: [V] (batch 1)."""
    if temperature <= 0 and top_p >= 1.0:
        return int(torch.argmax(logits))
    logits = logits.float() / (temperature if temperature > 0 else 1.0)
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        remove[-1] = False
        logits = logits.masked_fill(remove.scatter(0, idx, remove), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(model: FastLlama, inputs_embeds: torch.Tensor, *, max_new_tokens: int, eos_ids=(),
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, on_token=None) -> list[int]:
    """Prefill on inputs_embeds [1, T, D], then decode one token per forward call; stops after
    an EOS id (included, as transformers does) or max_new_tokens."""
    if inputs_embeds.shape[0] != 1:
        raise InputError("the fast LLM runtime generates for batch size 1")
    t = inputs_embeds.shape[1]
    model.setup_cache(t + max_new_tokens)
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    eos = set(eos_ids)
    logits = model(inputs_embeds.float(), 0)[0]
    out: list[int] = []
    pos = t
    while True:
        tok = sample(logits, temperature, top_p, gen)
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in eos or len(out) >= max_new_tokens:
            return out
        logits = model(model.embed.weight[tok].view(1, 1, -1), pos)[0]
        pos += 1


@torch.no_grad()
def beam_search(model: FastLlama, inputs_embeds: torch.Tensor, *, num_beams: int, max_new_tokens: int,
                eos_ids=(), length_penalty: float = 1.0, early_stopping: bool | str = False,
                on_prefill=None) -> list[int]:
    """transformers' beam search (its vectorized v5 algorithm, batch 1; defaults as transformers':
    length_penalty 1.0, early_stopping False) on the static KV cache: one prefill, the cache
    copied to ``num_beams`` rows, then one batched decode step per token with the cache rows
    reordered to the surviving beams. Returns the best finished hypothesis' new tokens (its EOS
    included, as transformers returns it)."""
    if inputs_embeds.shape[0] != 1:
        raise InputError("the fast LLM runtime generates for batch size 1")
    t = inputs_embeds.shape[1]
    model.setup_cache(t + max_new_tokens, batch=1)
    logits = model(inputs_embeds.float(), 0)            # [1, V]
    if on_prefill is not None:
        on_prefill()
    model.expand_cache(num_beams)
    vocab = logits.shape[-1]
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
    keep = max(2, 1 + len(eos)) * num_beams              # candidates kept per step, as transformers
    top_mask = torch.arange(keep) < num_beams
    running = torch.zeros(num_beams, max_new_tokens, dtype=torch.long)
    running_scores = torch.full((num_beams,), -1.0e9)
    running_scores[0] = 0.0                              # all beams start equal: only the first counts
    finished = running.clone()
    finished_scores = torch.full((num_beams,), -1.0e9)
    finished_len = torch.zeros(num_beams, dtype=torch.long)
    finished_done = torch.zeros(num_beams, dtype=torch.bool)
    improvable = True
    logits = logits.expand(num_beams, -1)
    cur = 0
    while True:
        acc = (F.log_softmax(logits.float(), dim=-1) + running_scores[:, None]).reshape(-1)
        top_lp, top_idx = torch.topk(acc, keep)
        src, tok = top_idx // vocab, top_idx % vocab
        cand = running[src]                              # advanced indexing: a copy
        cand[:, cur] = tok
        hits = torch.isin(tok, eos) | (cur + 1 >= max_new_tokens)
        # the best num_beams unfinished candidates continue
        run_lp = top_lp + hits.float() * -1.0e9
        nxt = torch.topk(run_lp, num_beams).indices
        running, running_scores, rows = cand[nxt], run_lp[nxt], src[nxt]
        # candidates among the top num_beams that just finished compete for the finished slots
        just = hits & top_mask
        score = top_lp / ((cur + 1) ** length_penalty)
        if early_stopping is True and bool(finished_done.all()):
            score = score - 1.0e9
        if not improvable:
            score = score - 1.0e9
        score = score + (~just).float() * -1.0e9
        merged = torch.topk(torch.cat([finished_scores, score]), num_beams).indices
        finished = torch.cat([finished, cand])[merged]
        finished_scores = torch.cat([finished_scores, score])[merged]
        finished_len = torch.cat([finished_len, torch.full((keep,), cur + 1)])[merged]
        finished_done = torch.cat([finished_done, just])[merged]
        cur += 1
        best_len = max_new_tokens if (early_stopping == "never" and length_penalty > 0.0) else cur
        best_running = running_scores[0] / (best_len ** length_penalty)
        worst_finished = torch.where(finished_done, finished_scores.min(), torch.tensor(-1.0e9))
        improvable = improvable and bool((best_running > worst_finished).any())
        open_beam = not (bool(finished_done.all()) and early_stopping is True)
        if not (improvable and open_beam and not bool(hits.all())):
            break
        model.reorder_cache(rows, t + cur - 1)
        logits = model(model.embed(running[:, cur - 1]).view(num_beams, 1, -1), t + cur - 1)
    return [int(x) for x in finished[0, :int(finished_len[0])]]


# --- loading ----------------------------------------------------------------------------------
_LAYER = "model.layers.{}."


@dataclasses.dataclass
class LinearSpec:
    """One (fused) linear as stored: portable int4 (qweight/scales/qzeros, group_size) or a float weight."""
    kind: str                                   # "int4" | "dense"
    weight: torch.Tensor | None = None
    qweight: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    qzeros: torch.Tensor | None = None
    group_size: int = 0
    bias: torch.Tensor | None = None

    def module(self) -> nn.Module:
        if self.kind == "int4":
            return Int4Linear.from_int4(self.qweight, self.scales, self.qzeros, self.group_size, self.bias)
        return dense(self.weight, self.bias)

    def nbytes(self) -> int:
        """What one decode step reads: int4 nibbles + fp32 scales + zero points two per byte (as
        MatMulNBits holds them), or the float weight."""
        if self.kind == "int4":
            n, groups = self.scales.shape
            return self.qweight.numel() + self.scales.numel() * 4 + n * ((groups + 1) // 2)
        return self.weight.numel() * self.weight.element_size()


@dataclasses.dataclass
class LayerSpec:
    qkv: LinearSpec
    o: LinearSpec
    gate_up: LinearSpec
    down: LinearSpec
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor


@dataclasses.dataclass
class ModelSpec:
    """A Llama's weights, fused as both fast runtimes use them (q/k/v and gate/up concatenated)."""
    layers: list[LayerSpec]
    embed: torch.Tensor
    norm: torch.Tensor
    head: LinearSpec

    def weight_bytes_per_token(self, a: LlamaArgs) -> int:
        """Bytes of weights every decode step reads (linears, norms, one embedding row), as the
        ort engine holds them (the torch engine counts its own packed layout)."""
        lin = sum(s.nbytes() for l in self.layers for s in (l.qkv, l.o, l.gate_up, l.down)) + self.head.nbytes()
        return lin + (2 * len(self.layers) + 1) * a.hidden_size * 4 + a.hidden_size * 4


def collect(a: LlamaArgs, tensors: dict[str, torch.Tensor], group_size: int | None) -> ModelSpec:
    """Gather transformers-named tensors into a ModelSpec; a linear whose ``.qweight`` is present
    is int4, otherwise float. q/k/v and gate/up are fused."""
    def get(name):
        try:
            return tensors.pop(name)
        except KeyError:
            raise BundleError(f"LLM weights lack {name}") from None

    def lin(*names, bias=False):
        b = [get(n + ".bias") for n in names] if bias else None
        b = torch.cat(b).float() if b else None
        if names[0] + ".qweight" in tensors:
            if group_size is None:
                raise BundleError("int4 tensors found but the safetensors metadata gives no group_size")
            parts = [(get(n + ".qweight"), get(n + ".scales"), get(n + ".qzeros")) for n in names]
            q, s, z = (torch.cat(p) for p in zip(*parts))
            n, k = q.shape[0], q.shape[1] * 2
            if group_size < 1 or k % group_size or s.shape != (n, k // group_size) or z.shape != s.shape:
                raise BundleError(f"{names[0]}: int4 scales/zeros shapes {tuple(s.shape)}/{tuple(z.shape)} do not "
                                  f"match weight [{n}, {k}] with group size {group_size}", hint="re-export the bundle")
            return LinearSpec("int4", qweight=q, scales=s, qzeros=z, group_size=group_size, bias=b)
        return LinearSpec("dense", weight=torch.cat([get(n + ".weight") for n in names]), bias=b)

    layers = []
    for i in range(a.n_layers):
        p = _LAYER.format(i)
        att, mlp = p + "self_attn.", p + "mlp."
        layers.append(LayerSpec(lin(att + "q_proj", att + "k_proj", att + "v_proj", bias=a.attention_bias),
                                lin(att + "o_proj", bias=a.attention_bias),
                                lin(mlp + "gate_proj", mlp + "up_proj", bias=a.mlp_bias),
                                lin(mlp + "down_proj", bias=a.mlp_bias),
                                get(p + "input_layernorm.weight").float(),
                                get(p + "post_attention_layernorm.weight").float()))
    embed = get("model.embed_tokens.weight")
    if "lm_head.weight" in tensors or "lm_head.qweight" in tensors:
        head = lin("lm_head")
    elif a.tie_embeddings:
        head = LinearSpec("dense", weight=embed)
    else:
        raise BundleError("LLM weights lack lm_head.weight")
    return ModelSpec(layers, embed, get("model.norm.weight").float(), head)


def build_torch(a: LlamaArgs, spec: ModelSpec) -> FastLlama:
    """The torch engine: Int4Linear or fp32 nn.Linear modules in our Llama forward."""
    blocks = [Block(a, l.qkv.module(), l.o.module(), l.gate_up.module(), l.down.module(), l.attn_norm, l.ffn_norm)
              for l in spec.layers]
    return FastLlama(a, spec.embed, blocks, spec.norm, spec.head.module()).eval()


ENGINES = ("ort", "torch")
# preferred where it can run the model: ~1.5x the torch engine's decode rate on the
# TinyLlama-shaped bench (30.8-51.0 vs 23.2-27.4 tokens/s over 8 runs, README)
DEFAULT_ENGINE = "ort"


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


def pick_engine(a: LlamaArgs, spec: ModelSpec) -> str:
    """The default: the ort engine for int4 decoder layers it can run; torch otherwise (fp32
    weights: ORT kept a second copy of dense weights, 1181 vs 691 MB RSS on a 533 MB model)."""
    int4_layers = all(s.kind == "int4" for l in spec.layers for s in (l.qkv, l.o, l.gate_up, l.down))
    return DEFAULT_ENGINE if int4_layers and ort_cannot_run(a, spec) is None else "torch"


def assemble(a: LlamaArgs, tensors: dict[str, torch.Tensor], group_size: int | None, engine: str | None = None,
             threads: int | None = None):
    """The model on one engine: "torch" (FastLlama: our forward, torch's int4 kernel), "ort"
    (ortllm.OrtLlama: the whole step as one ONNX Runtime graph with MatMulNBits), or None:
    ``pick_engine``'s choice. ``model.engine`` says which."""
    if engine is not None and engine not in ENGINES:
        raise InputError(f"LLM engine {engine!r} is not one of {', '.join(ENGINES)}")
    spec = collect(a, tensors, group_size)
    engine = engine or pick_engine(a, spec)
    if engine == "ort":
        from .ortllm import OrtLlama

        return OrtLlama(a, spec, threads)
    return build_torch(a, spec)


def load(model_dir: str | Path, engine: str | None = None, threads: int | None = None,
         files: list[Path] | None = None):
    """The LLM from ``config.json`` + safetensors (float weights or ib-edge int4) on ``engine``
    (None: ``pick_engine``'s choice). ``files``: the safetensors to read (a bundle passes what
    its manifest lists); None reads every ``*.safetensors`` in the directory (export-time use on
    a directory the exporter just wrote)."""
    from safetensors import SafetensorError, safe_open

    d = Path(model_dir)
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read the LLM's config.json: {e}") from None
    if not isinstance(cfg, dict):
        raise BundleError("the LLM's config.json is not a JSON object", hint="re-export the bundle")
    a = LlamaArgs.from_config(cfg)
    files = sorted(d.glob("*.safetensors")) if files is None else list(files)
    if not files:
        raise BundleError(f"no safetensors in {d}")
    tensors, group_size = {}, None
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                meta = sf.metadata() or {}
                if meta.get("format") == INT4_FORMAT:
                    if meta.get("format_version") != INT4_FORMAT_VERSION:
                        raise BundleError(f"{f.name}: int4 format version {meta.get('format_version')!r}, this "
                                          f"runtime reads {INT4_FORMAT_VERSION}", hint="re-export the bundle")
                    try:
                        group_size = int(meta["group_size"])
                    except (KeyError, ValueError):
                        raise BundleError(f"{f.name}: int4 metadata gives no valid group_size",
                                          hint="re-export the bundle") from None
                for k in sf.keys():
                    tensors[k.removeprefix("language_model.")] = sf.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise BundleError(f"cannot read LLM weights {f.name}: {str(e).splitlines()[0] if str(e) else e}",
                              hint="re-export the bundle") from None
    check_shapes(a, tensors)
    return assemble(a, tensors, group_size, engine, threads)


def check_shapes(a: LlamaArgs, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor the config implies has the shape the config implies (a config whose sizes
    disagree with the weights is a corrupt bundle, refused here rather than deep in a kernel)."""
    d, hd = a.hidden_size, a.hd
    lin = {"self_attn.q_proj": (a.n_heads * hd, d), "self_attn.k_proj": (a.n_kv_heads * hd, d),
           "self_attn.v_proj": (a.n_kv_heads * hd, d), "self_attn.o_proj": (d, a.n_heads * hd),
           "mlp.gate_proj": (a.intermediate_size, d), "mlp.up_proj": (a.intermediate_size, d),
           "mlp.down_proj": (d, a.intermediate_size)}
    want = {"model.embed_tokens.weight": (a.vocab_size, d), "model.norm.weight": (d,)}
    linears = {"lm_head": (a.vocab_size, d)}
    for i in range(a.n_layers):
        p = _LAYER.format(i)
        want[p + "input_layernorm.weight"] = want[p + "post_attention_layernorm.weight"] = (d,)
        linears.update({p + k: v for k, v in lin.items()})
    for name, (n, k) in linears.items():
        if name + ".qweight" in tensors:
            want[name + ".qweight"] = (n, k // 2)
        else:
            want[name + ".weight"] = (n, k)
    for name, shape in want.items():
        t = tensors.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise BundleError(f"LLM weight {name} is {list(t.shape)}, its config.json implies {list(shape)}",
                              hint="re-export the bundle")


# --- the runtime's LLM stage ------------------------------------------------------------------
class FastLLM:
    """Drop-in for runtime.llm.TransformersLLM on bundles whose LLM artifact has backend "fastllm"."""

    def __init__(self, manifest, threads: int | None = None, engine: str | None = None):
        art = manifest.artifact("llm")
        if art.get("backend") != "fastllm" or art.get("format") not in (INT4_FORMAT, "safetensors"):
            raise BundleError(f"LLM artifact {art.get('backend')}/{art.get('format')} is not for the fast runtime")
        if threads:
            torch.set_num_threads(threads)
        self.model = load(manifest.path(art["dir"]), engine, threads, files=manifest.files("llm", ".safetensors"))
        self.engine = self.model.engine
        gen_path = manifest.path(art["dir"]) / "generation_config.json"
        try:
            gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
        except (OSError, ValueError) as e:
            raise BundleError(f"cannot read the LLM's generation_config.json: {e}") from None
        # beam search as transformers runs it for this checkpoint (its generation_config)
        self.length_penalty = float(gen.get("length_penalty", 1.0))
        self.early_stopping = gen.get("early_stopping", False)
        self.image_token_id = int(manifest.model["image_token_id"])
        eos = manifest.model.get("eos_token_id")
        self.eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        self.is_encoder_decoder = False
        self.timings: dict[str, float] = {}

    def embeds(self, query_embeds, input_ids) -> torch.Tensor:
        """The prompt's token embeddings with its <image> positions replaced by query_embeds."""
        ids = torch.from_numpy(input_ids)
        emb = self.model.embed(ids)
        mask = (ids == self.image_token_id).unsqueeze(-1)
        if int(mask.sum()) != query_embeds.shape[0] * query_embeds.shape[1] * 1:
            raise BundleError("prompt's image-token count does not match the Q-Former's query count")
        return emb.masked_scatter(mask, torch.from_numpy(query_embeds).float())

    def generate(self, query_embeds, input_ids, attention_mask, *, decode, max_new_tokens: int = 32,
                 num_beams: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 on_text=None) -> list[int]:
        from .llm import _Streamer

        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        if num_beams < 1:
            raise InputError("num_beams must be at least 1")
        if num_beams > 1 and (temperature > 0 or top_p < 1.0):
            raise InputError("sampling (--temperature/--top-p) and beam search (--num-beams) exclude each other")
        if not bool((attention_mask == 1).all()):
            raise InputError("the fast LLM runtime takes unpadded prompts (attention_mask all ones)")
        embeds = self.embeds(query_embeds, input_ids)
        first = []
        t0 = time.perf_counter()
        if num_beams > 1:  # as transformers: no streaming with beams, the text comes at the end
            with torch.no_grad():
                ids = beam_search(self.model, embeds, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                  eos_ids=self.eos_ids, length_penalty=self.length_penalty,
                                  early_stopping=self.early_stopping,
                                  on_prefill=lambda: first.append(time.perf_counter()))
            t1 = time.perf_counter()
            if on_text is not None:
                on_text(decode(ids))
        else:
            streamer = _Streamer(decode, on_text)
            streamer.put(input_ids)  # skipped: the prompt

            def on_token(tok):
                if not first:
                    first.append(time.perf_counter())
                streamer.put(torch.tensor([tok]))

            with torch.no_grad():
                ids = generate(self.model, embeds, max_new_tokens=max_new_tokens, eos_ids=self.eos_ids,
                               temperature=temperature, top_p=top_p, seed=seed, on_token=on_token)
            t1 = time.perf_counter()
            streamer.end()
        self.timings = {"prefill": (first[0] - t0) * 1e3, "decode": (t1 - first[0]) * 1e3,
                        "new_tokens": float(len(ids))}
        return ids


# --- benchmark ----------------------------------------------------------------------------------
def random_int4_model(a: LlamaArgs, group_size: int = 64, seed: int = 0, engine: str = DEFAULT_ENGINE,
                      scale_spread: float = 0.0):
    """Random weights straight in int4 (see random_int4_tensors) on ``engine``, for speed measurements."""
    return assemble(a, random_int4_tensors(a, group_size, seed, scale_spread), group_size, engine)


def random_int4_tensors(a: LlamaArgs, group_size: int = 64, seed: int = 0,
                        scale_spread: float = 0.0) -> dict[str, torch.Tensor]:
    """transformers-named tensors with every linear in int4 (uniform nibbles, small scales);
    ``scale_spread`` > 0 draws per-group scales and zero points too (for comparing engines)."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}

    def q4(name, n, k):
        t[name + ".qweight"] = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        t[name + ".scales"] = torch.full((n, k // group_size), 0.02 / 8)
        t[name + ".qzeros"] = torch.full((n, k // group_size), 8, dtype=torch.uint8)
        if scale_spread:
            t[name + ".scales"] *= 1 + scale_spread * torch.rand(n, k // group_size, generator=g)
            t[name + ".qzeros"] = torch.randint(4, 12, (n, k // group_size), dtype=torch.uint8, generator=g)

    d, hd = a.hidden_size, a.hd
    for i in range(a.n_layers):
        p = _LAYER.format(i)
        for nm, n, k in (("self_attn.q_proj", a.n_heads * hd, d), ("self_attn.k_proj", a.n_kv_heads * hd, d),
                         ("self_attn.v_proj", a.n_kv_heads * hd, d), ("self_attn.o_proj", d, a.n_heads * hd),
                         ("mlp.gate_proj", a.intermediate_size, d), ("mlp.up_proj", a.intermediate_size, d),
                         ("mlp.down_proj", d, a.intermediate_size)):
            q4(p + nm, n, k)
        t[p + "input_layernorm.weight"] = torch.ones(d)
        t[p + "post_attention_layernorm.weight"] = torch.ones(d)
    t["model.embed_tokens.weight"] = torch.randn(a.vocab_size, d, generator=g) * 0.02
    t["model.norm.weight"] = torch.ones(d)
    q4("lm_head", a.vocab_size, d)
    return t


def bench(preset: str = "tinyllama-1.1b", group_size: int = 64, prompt_len: int = 40, new_tokens: int = 32,
          hf_tokens: int = 8, threads: int | None = None, nf4: bool = True, engine: str = DEFAULT_ENGINE) -> dict:
    """Decode speed of the int4 path on ``engine`` (the headline figures), the other engine in
    the same run, transformers fp32 and (when installed) transformers + bitsandbytes NF4."""
    import resource

    from ib_edge.bench.measure import memory_bandwidth

    if threads:
        torch.set_num_threads(threads)
    a = PRESETS[preset]
    emb = torch.randn(1, prompt_len, a.hidden_size) * 0.02

    def measure(eng):
        t0 = time.perf_counter()
        model = random_int4_model(a, group_size, engine=eng)
        build_s = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        def run(n):
            t0 = time.perf_counter()
            ids = generate(model, emb, max_new_tokens=n)
            return time.perf_counter() - t0, len(ids)

        prefill_s, tps = _decode_timing(run, new_tokens)
        out = {"engine": eng, "build_s": round(build_s, 1), "prefill_ms": round(prefill_s * 1e3, 1),
               "decode_tok_s": round(tps, 2), "weight_MB_per_token": round(model.weight_bytes_per_token() / 1e6, 1),
               "achieved_GB_s": round(model.weight_bytes_per_token() * tps / 1e9, 2),
               "decode_ms_per_token": round(1e3 / tps, 2), "peak_rss_MB": round(rss)}
        if eng == "torch":
            out.update(_linears_alone(model))
        return out

    main = measure(engine)        # first: its peak RSS is its own
    other = measure(next(e for e in ENGINES if e != engine))
    # after the RSS readings: the probe's arrays are GiB-sized
    bw = memory_bandwidth(64 if preset == "smoke" else 1024)["gb_per_s"]
    for r in (main, other):
        r["pct_of_bandwidth_bound"] = round(100 * r["achieved_GB_s"] / bw, 1)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      max_position_embeddings=a.max_positions, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    _, hf_tps = _hf_decode(hf, emb, hf_tokens)
    nf4 = _nf4_decode(hf, emb, hf_tokens) if nf4 else {"measured": False, "reason": "--no-nf4"}
    del hf
    tps = main["decode_tok_s"]
    return {"preset": preset, "threads": torch.get_num_threads(), "group_size": group_size, "engine": engine,
            "int4_build_s": main["build_s"], "int4_prefill_ms": main["prefill_ms"],
            "int4_decode_tok_s": tps, "transformers_fp32_decode_tok_s": round(hf_tps, 2),
            "speedup": round(tps / hf_tps, 2), "int4_weight_MB_per_token": main["weight_MB_per_token"],
            "achieved_GB_s": main["achieved_GB_s"], "read_bandwidth_GB_s": round(bw, 2),
            "pct_of_bandwidth_bound": main["pct_of_bandwidth_bound"],
            "decode_ms_per_token": main["decode_ms_per_token"], "peak_rss_int4_MB": main["peak_rss_MB"],
            "peak_rss_total_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            f"{other['engine']}_engine": other,
            "transformers_bnb_nf4": nf4,
            **({"speedup_vs_nf4": round(tps / nf4["decode_tok_s"], 2)} if nf4.get("measured") else {})}


def _linears_alone(model: FastLlama, repeats: int = 3) -> dict:
    """Where a decode step's time goes: every linear of the model run once on a 1-token input
    (the kernels alone, weights streamed from DRAM as in decode; bytes = packed weights + scales),
    and a plain ``torch.sum`` over the same packed int4 buffers (packed bytes only: what
    reading them costs at best, one buffer at a time as the kernels read them)."""
    lins = [m for m in model.modules() if isinstance(m, (Int4Linear, nn.Linear))]
    xs = {m.in_features: torch.randn(1, m.in_features) for m in lins}
    packed = [m.packed for m in lins if isinstance(m, Int4Linear)]

    from ib_edge.bench.measure import best_time

    with torch.no_grad():
        t_lin = best_time(lambda: [m(xs[m.in_features]) for m in lins], repeats, warmup=1)
    # float sums of the raw bytes (integer sums are not vectorised: 5 GB/s measured), with
    # denormals flushed so that bit patterns that read as subnormal floats take no slow path
    torch.set_flush_denormal(True)
    try:
        t_read = best_time(lambda: [p.view(torch.float32).sum() for p in packed], repeats, warmup=1)
    finally:
        torch.set_flush_denormal(False)
    n_packed = sum(p.numel() * p.element_size() for p in packed)
    n_lin = sum(linear_bytes(m) for m in lins)
    return {"linears_alone_ms_per_token": round(t_lin * 1e3, 2),
            "linears_alone_GB_s": round(n_lin / t_lin / 1e9, 2),
            "sum_over_packed_int4_GB_s": round(n_packed / t_read / 1e9, 2)}


def _nf4_decode(hf, emb: torch.Tensor, n_tokens: int) -> dict:
    """Decode tokens/s of the same random model through transformers + bitsandbytes NF4 (what a
    user tries first): saved, then reloaded with BitsAndBytesConfig, fp32 compute on CPU."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"measured": False, "reason": "bitsandbytes is not installed"}
    import bitsandbytes
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        t0 = time.perf_counter()
        q = LlamaForCausalLM.from_pretrained(d, quantization_config=cfg, device_map={"": "cpu"}, trust_remote_code=False,
                                             dtype=torch.float32).eval()
        load_s = time.perf_counter() - t0
    prefill, tps = _hf_decode(q, emb, n_tokens)
    return {"measured": True, "bitsandbytes": bitsandbytes.__version__, "load_s": round(load_s, 1),
            "prefill_ms": round(prefill * 1e3, 1), "decode_tok_s": round(tps, 2)}


def _hf_decode(model, emb: torch.Tensor, n_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of a transformers model's greedy ``generate`` on
    ``emb``, after a warm-up (first-call costs; bitsandbytes packs its weights there)."""
    def run(n):
        t0 = time.perf_counter()
        out = model.generate(inputs_embeds=emb, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0, out.shape[1]

    with torch.no_grad():
        return _decode_timing(run, n_tokens)


def _decode_timing(run, n_tokens: int, repeats: int = 3) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) from ``run(n) -> (seconds, tokens produced)``: one
    warm-up, then the fastest of ``repeats`` runs of 1 token (the prefill) and of ``n_tokens``;
    decode rate = the tokens after the first over the time after the prefill. Fastest-of, because
    a single pair of runs on a busy 2-core machine can put the 1-token run above the n-token one."""
    if n_tokens < 2:
        raise ValueError("a decode rate needs at least 2 new tokens")
    run(2)
    prefill = min(run(1)[0] for _ in range(repeats))
    total, produced = min(run(n_tokens) for _ in range(repeats))
    if total <= prefill:  # timing noise swamped the decode time: say so rather than print a rate
        return prefill, float("nan")
    return prefill, (produced - 1) / (total - prefill)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Decode speed of the int4 fast path vs transformers fp32.")
    ap.add_argument("--bench", action="store_true", help="run the TinyLlama-shaped benchmark")
    ap.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS))
    ap.add_argument("--group-size", type=int, default=64, choices=KERNEL_GROUP_SIZES)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hf-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-nf4", action="store_true", help="skip the transformers + bitsandbytes NF4 comparison")
    ap.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE,
                    help="engine of the headline figures (the other one is measured too)")
    args = ap.parse_args(argv)
    if not args.bench:
        ap.error("nothing to do (use --bench)")
    res = bench(args.preset, args.group_size, new_tokens=args.new_tokens, hf_tokens=args.hf_tokens,
                threads=args.threads, nf4=not args.no_nf4, engine=args.engine)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
