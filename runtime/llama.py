"""The Llama decoder as the fast runtime runs it: args and presets, the torch model (engine
"torch": our own forward on a static KV cache, int4 or fp32 linears), and the fused weight
specs both engines are built from.

gpt-fast style: everything runs in fp32 except ``int4.Int4Linear``'s bf16 kernel call.
"""
from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F
from torch import nn

from .decode import StaticKVCache
from .errors import BundleError, InputError
from .int4 import Int4Linear, dense, linear_bytes


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


# --- weights, fused as both engines use them ---------------------------------------------------
LAYER = "model.layers.{}."


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
        p = LAYER.format(i)
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
        p = LAYER.format(i)
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
