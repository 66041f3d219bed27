"""A decoder-only LLM in fp32 without holding it: the transformers model built on the meta device,
each decoder layer's weights read from the stored safetensors (cast to fp32) just before the layer
runs and dropped right after; embeddings, final norm and lm_head stay resident in fp32.

``load_streamed(dir)`` is a drop-in for ``weight_only.load_fp32(dir)`` where the reference is
too big for RAM (Vicuna-7B: 27 GB in fp32; streamed, ~1 GB resident plus one 0.8 GB layer): the
same transformers classes and code run (``generate``, masks, rotary, KV cache), so the logits are
the whole model's up to summation order. Each forward pass re-reads every layer (13.5 GB of fp16
at 7B), so callers batch: ``LogitsProbe`` generates its greedy answers for all examples at once
(left-padded) on a streamed model instead of one prompt at a time.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ib_edge.runtime.errors import IbEdgeError
from ib_edge.runtime.lowbit import rebuild_meta_buffers


class StreamError(IbEdgeError):
    pass


def stored_index(src: Path) -> dict[str, Path]:
    """{tensor name: file} of a safetensors directory (its index file's map when it has one)."""
    from safetensors import safe_open

    index = src / "model.safetensors.index.json"
    if index.is_file():
        return {k: src / f for k, f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
    out: dict[str, Path] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


def read_tensors(files: dict[str, Path], keys, *, fp32: bool = False) -> dict[str, torch.Tensor]:
    """The named tensors (floats cast to fp32 with ``fp32``), each file opened once and closed
    after (its mapping goes with it)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    stored = getattr(files, "key_prefix", "")   # names inside a bigger checkpoint (``load_streamed``)
    out = {}
    for f, ks in by_file.items():
        with safe_open(str(f), framework="pt") as fh:
            for k in ks:
                t = fh.get_tensor(stored + k)
                out[k] = t.float() if fp32 and t.is_floating_point() else t
    return out


def read_fp32(files: dict[str, Path], keys) -> dict[str, torch.Tensor]:
    return read_tensors(files, keys, fp32=True)


def _set_param(root: nn.Module, name: str, value: torch.Tensor) -> None:
    parent, _, attr = name.rpartition(".")
    mod = root.get_submodule(parent) if parent else root
    mod._parameters[attr] = nn.Parameter(value, requires_grad=False)


class _LayerStream:
    """Forward hooks on one layer: load its parameters (fp32) before it runs, back to meta after."""

    def __init__(self, layer: nn.Module, prefix: str, files: dict[str, Path]):
        self.layer, self.prefix, self.files = layer, prefix, files
        self.names = [n for n, _ in layer.named_parameters()]
        missing = [prefix + n for n in self.names if prefix + n not in files]
        if missing:
            raise StreamError(f"the stored LLM lacks {', '.join(missing[:3])}")
        self.meta = {n: p for n, p in layer.named_parameters()}
        layer.register_forward_pre_hook(self.load)
        layer.register_forward_hook(self.drop)

    def load(self, module, args) -> None:
        loaded = read_fp32(self.files, [self.prefix + n for n in self.names])
        for n in self.names:
            _set_param(self.layer, n, loaded.pop(self.prefix + n))

    def drop(self, module, args, output) -> None:
        for n, p in self.meta.items():
            _set_param(self.layer, n, p)


def load_streamed(src_dir: str | Path, *, config=None, key_prefix: str = "") -> nn.Module:
    """The decoder-only transformers LLM saved in ``src_dir`` (any dtype), computing in fp32 with
    its decoder layers streamed from disk. ``model.ib_edge_streamed`` is True. ``config`` and
    ``key_prefix``: the LLM inside a bigger checkpoint (InstructBLIP's ``text_config`` and
    ``"language_model."``), read in place."""
    import transformers

    src = Path(src_dir)
    cfg = config or transformers.AutoConfig.from_pretrained(str(src), trust_remote_code=False)
    if cfg.is_encoder_decoder:
        raise StreamError("layer streaming is for decoder-only LLMs")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    if config is None and (src / "generation_config.json").is_file():  # as from_pretrained does
        model.generation_config = transformers.GenerationConfig.from_dict(  # plain JSON: no code, no hub
            json.loads((src / "generation_config.json").read_text(encoding="utf-8")))
    files = {k.removeprefix(key_prefix): f for k, f in stored_index(src).items() if k.startswith(key_prefix)}
    files = _Renamed(files, key_prefix)
    layers = model.get_decoder().layers
    prefix = next(n for n, m in model.named_modules() if m is layers) + "."
    for i, layer in enumerate(layers):
        _LayerStream(layer, f"{prefix}{i}.", files)
    streamed = {f"{prefix}{n}" for n, _ in layers.named_parameters()}
    resident = [n for n, _ in model.named_parameters() if n not in streamed]
    tied = model.config.tie_word_embeddings if hasattr(model.config, "tie_word_embeddings") else False
    absent = [n for n in resident if n not in files]
    if tied and absent == ["lm_head.weight"]:
        resident.remove("lm_head.weight")
        absent = []
    if absent:
        raise StreamError(f"the stored LLM lacks {', '.join(absent[:3])}")
    for n, t in read_fp32(files, resident).items():
        _set_param(model, n, t)
    if tied:
        model.tie_weights()
    rebuild_meta_buffers(model)  # rotary tables etc.: computed at construction, never stored
    model.ib_edge_streamed = True
    return model


class _Renamed(dict):
    """{model name: file} whose ``stored(name)`` is the name in the file (``key_prefix`` + name)."""

    def __init__(self, files: dict[str, Path], key_prefix: str):
        super().__init__(files)
        self.key_prefix = key_prefix
