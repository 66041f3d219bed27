"""The Llama decoder as the torch engine runs it: our own forward on a static KV cache, int4 or
fp32 linears. Its shape and fused weights (``LlamaArgs``, ``ModelSpec``, ``collect``) live in the
torch-free ``llama_spec``, which the ort engine uses alone; they are re-exported here.

gpt-fast style: everything runs in fp32 except ``int4.Int4Linear``'s bf16 kernel call.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .decode import StaticKVCache
from .errors import BundleError, InputError
from .int4 import Int4Linear, dense, linear_bytes
from .llama_spec import (LAYER, PRESETS, LayerSpec, LinearSpec, LlamaArgs, ModelSpec,  # noqa: F401 (re-exported)
                         check_shapes, collect)


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


class FastLlama(nn.Module, StaticKVCache):
    """forward(inputs_embeds [B, T, D], start) -> logits of the last position [B, V], filling the
    static KV cache at positions start..start+T-1."""
    engine = kernel = "torch"

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


def linear_module(spec: LinearSpec) -> nn.Module:
    if spec.kind == "int4":
        return Int4Linear.from_int4(spec.qweight, spec.scales, spec.qzeros, spec.group_size, spec.bias)
    return dense(spec.weight, spec.bias)


def build_torch(a: LlamaArgs, spec: ModelSpec) -> FastLlama:
    """The torch engine: Int4Linear or fp32 nn.Linear modules in our Llama forward (a numpy spec
    is taken as torch tensors over the same memory)."""
    spec = torch_spec(spec)
    m = linear_module
    blocks = [Block(a, m(l.qkv), m(l.o), m(l.gate_up), m(l.down), l.attn_norm, l.ffn_norm) for l in spec.layers]
    return FastLlama(a, spec.embed, blocks, spec.norm, m(spec.head)).eval()


def torch_spec(spec: ModelSpec) -> ModelSpec:
    """A spec of torch tensors (numpy arrays wrapped without a copy; torch tensors kept)."""
    return spec.map(lambda x: torch.from_numpy(x) if isinstance(x, np.ndarray) else x)
