"""A Llama's shape and weights as the fast runtime's engines take them, without torch: ``LlamaArgs``
(from transformers' ``config.json``), the presets, and ``collect``: transformers-named tensors
fused into a ``ModelSpec`` (q/k/v and gate/up concatenated; portable int4 or float linears).

Arrays are numpy (what the ort engine reads, through safetensors' numpy API) or torch tensors
(the torch and cuda engines, the tests and benchmarks); ``collect`` keeps the kind it is given,
``ModelSpec.map`` converts one into the other. torch is imported only when torch tensors come in.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import numpy as np

from .errors import BundleError

Array = Any   # np.ndarray or torch.Tensor


def cat(parts: list) -> Array:
    """Concatenate along dim 0, numpy or torch as given."""
    if isinstance(parts[0], np.ndarray):
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    import torch

    return torch.cat(parts)


def f32(x: Array) -> Array:
    """float32, numpy or torch as given (no copy when it already is)."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float32, copy=False)
    return x.float()


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



LAYER = "model.layers.{}."


ARRAY_FIELDS = ("weight", "qweight", "scales", "qzeros", "bias")


def _size(x: Array) -> int:
    return int(x.size) if isinstance(x, np.ndarray) else x.numel()


@dataclasses.dataclass
class LinearSpec:
    """One (fused) linear as stored: portable int4 (qweight/scales/qzeros, group_size) or a float weight."""
    kind: str                                   # "int4" | "dense"
    weight: Array | None = None
    qweight: Array | None = None
    scales: Array | None = None
    qzeros: Array | None = None
    group_size: int = 0
    bias: Array | None = None

    def map(self, fn: Callable[[Array], Array]) -> "LinearSpec":
        return dataclasses.replace(self, **{f: fn(getattr(self, f)) for f in ARRAY_FIELDS
                                            if getattr(self, f) is not None})

    def nbytes(self) -> int:
        """What one decode step reads: int4 nibbles + fp32 scales + zero points two per byte (as
        MatMulNBits holds them), or the float weight."""
        if self.kind == "int4":
            n, groups = self.scales.shape
            return _size(self.qweight) + _size(self.scales) * 4 + n * ((groups + 1) // 2)
        return int(self.weight.nbytes) if isinstance(self.weight, np.ndarray) else \
            self.weight.numel() * self.weight.element_size()


@dataclasses.dataclass
class LayerSpec:
    qkv: LinearSpec
    o: LinearSpec
    gate_up: LinearSpec
    down: LinearSpec
    attn_norm: Array
    ffn_norm: Array


@dataclasses.dataclass
class ModelSpec:
    """A Llama's weights, fused as both fast runtimes use them (q/k/v and gate/up concatenated)."""
    layers: list[LayerSpec]
    embed: Array
    norm: Array
    head: LinearSpec

    def map(self, fn: Callable[[Array], Array]) -> "ModelSpec":
        """The same weights with ``fn`` applied to every array (``torch.from_numpy``, ``np.asarray``)."""
        layers = [LayerSpec(l.qkv.map(fn), l.o.map(fn), l.gate_up.map(fn), l.down.map(fn), fn(l.attn_norm),
                            fn(l.ffn_norm)) for l in self.layers]
        return ModelSpec(layers, fn(self.embed), fn(self.norm), self.head.map(fn))

    def weight_bytes_per_token(self, a: LlamaArgs) -> int:
        """Bytes of weights every decode step reads (linears, norms, one embedding row), as the
        ort engine holds them (the torch engine counts its own packed layout)."""
        lin = sum(s.nbytes() for l in self.layers for s in (l.qkv, l.o, l.gate_up, l.down)) + self.head.nbytes()
        return lin + (2 * len(self.layers) + 1) * a.hidden_size * 4 + a.hidden_size * 4


def collect(a: LlamaArgs, tensors: dict, group_size: int | None) -> ModelSpec:
    """Gather transformers-named tensors into a ModelSpec; a linear whose ``.qweight`` is present
    is int4, otherwise float. q/k/v and gate/up are fused."""
    def get(name):
        try:
            return tensors.pop(name)
        except KeyError:
            raise BundleError(f"LLM weights lack {name}") from None

    def lin(*names, bias=False):
        b = [get(n + ".bias") for n in names] if bias else None
        b = f32(cat(b)) if b else None
        if names[0] + ".qweight" in tensors:
            if group_size is None:
                raise BundleError("int4 tensors found but the safetensors metadata gives no group_size")
            parts = [(get(n + ".qweight"), get(n + ".scales"), get(n + ".qzeros")) for n in names]
            q, s, z = (cat(p) for p in zip(*parts))
            n, k = q.shape[0], q.shape[1] * 2
            if group_size < 1 or k % group_size or s.shape != (n, k // group_size) or z.shape != s.shape:
                raise BundleError(f"{names[0]}: int4 scales/zeros shapes {tuple(s.shape)}/{tuple(z.shape)} do not "
                                  f"match weight [{n}, {k}] with group size {group_size}", hint="re-export the bundle")
            return LinearSpec("int4", qweight=q, scales=s, qzeros=z, group_size=group_size, bias=b)
        return LinearSpec("dense", weight=cat([get(n + ".weight") for n in names]), bias=b)

    layers = []
    for i in range(a.n_layers):
        p = LAYER.format(i)
        att, mlp = p + "self_attn.", p + "mlp."
        layers.append(LayerSpec(lin(att + "q_proj", att + "k_proj", att + "v_proj", bias=a.attention_bias),
                                lin(att + "o_proj", bias=a.attention_bias),
                                lin(mlp + "gate_proj", mlp + "up_proj", bias=a.mlp_bias),
                                lin(mlp + "down_proj", bias=a.mlp_bias),
                                f32(get(p + "input_layernorm.weight")),
                                f32(get(p + "post_attention_layernorm.weight"))))
    embed = get("model.embed_tokens.weight")
    if "lm_head.weight" in tensors or "lm_head.qweight" in tensors:
        head = lin("lm_head")
    elif a.tie_embeddings:
        head = LinearSpec("dense", weight=embed)
    else:
        raise BundleError("LLM weights lack lm_head.weight")
    return ModelSpec(layers, embed, f32(get("model.norm.weight")), head)



def check_shapes(a: LlamaArgs, tensors: dict) -> None:
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
