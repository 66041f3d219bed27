"""InstructBLIP at its real sizes: exact configs of the Salesforce checkpoints, and a builder that
writes random-weight checkpoints of them as sharded fp16/bf16 safetensors without ever holding
the model (fp32 Vicuna-7B is ~27 GB, more than the 24 GB machines this runs on).

The builder instantiates the model on the meta device (shapes only, no memory), then makes one
tensor at a time directly in the target dtype and writes a shard whenever ``shard_mb`` is
reached: peak memory is one shard plus one tensor. The output is ``save_pretrained``-shaped
(``config.json``, ``model-0000K-of-0000N.safetensors``, ``model.safetensors.index.json``,
processor files) and loads through ``InstructBlipForConditionalGeneration.from_pretrained``.

    python -m ib_edge.export.real_sizes --preset instructblip-vicuna-7b --out /data/ib-vicuna7b
    python -m ib_edge.export.real_sizes --preset instructblip-flan-t5-xl --layers 2 --out /tmp/t5xl-2

Where each number comes from (read 2026-12-02):
  * vision and Q-Former, all four presets: transformers'
    ``models/instructblip/convert_instructblip_original_to_pytorch.py`` (``get_blip2_config``)
    builds ``InstructBlipVisionConfig(image_size=224)`` and ``InstructBlipQFormerConfig(
    vocab_size=30523)`` ("the authors add one special [DEC] token ... vocab size = 30522 + 1"),
    i.e. the class defaults of transformers 5.24: vision hidden 1408, MLP 6144, 39 layers,
    16 heads, 224 px / patch 14, qkv bias, layer-norm eps 1e-6; Q-Former hidden 768, MLP 3072,
    12 layers, 12 heads, cross-attention every 2nd layer to encoder width 1408, 512 positions;
    ``InstructBlipConfig`` default ``num_query_tokens=32``.
  * Vicuna-7B: the same script uses ``LlamaConfig.from_pretrained("decapoda-research/llama-7b-hf",
    vocab_size=32001)``; the published ``Salesforce/instructblip-vicuna-7b`` config.json
    text_config (as copied into ``Mayank1309/mayankBLIP/config.json``, ``_name_or_path``
    Salesforce/instructblip-vicuna-7b): hidden 4096, intermediate 11008, 32 layers, 32 heads,
    32 KV heads, rms_norm_eps 1e-6, vocab 32001, untied lm_head, float16, max_sequence_length 2048.
  * Vicuna-13B: script ``llama-13b-hf`` + vocab 32001; published config (copied into
    ``Mediocreatmybest/instructblip-vicuna-13b_8bit/config.json``): hidden 5120, intermediate
    13824, 40 layers, 40 heads, vocab 32001, float16.
  * Flan-T5-XL: script ``T5Config.from_pretrained("google/flan-t5-xl", dense_act_fn="gelu",
    bos_token_id=1)``; published config (copied into ``benferns/instructblip-flan-t5-xl_8bit_nf4/
    config.json``): d_model 2048, d_ff 5120, d_kv 64, gated-gelu, vocab 32128; 24 + 24 layers and
    32 heads as google/flan-t5-xl (issue 19 states the same).
  * Flan-T5-XXL: ``Salesforce/instructblip-flan-t5-xxl`` config.json at 0a81e90: d_model 4096,
    d_ff 10240, d_kv 64, 64 heads, 24 + 24 layers, gated-gelu, vocab 32128, float32 on the hub.
Token ids (pad/bos/eos/<image>) come from the project's offline tokenizers, not the real ones:
they change no shape, only which rows of the embedding are special.

Initialisation ("sane": activations of order one through the stack, nothing at 1e-10):
biases 0, norm weights 1, ``query_tokens`` N(0, 0.5) (as ``reference_models``: zeros make every
query identical), T5 weights with T5's own scheme (``T5PreTrainedModel._init_weights``, factor
1: q ~ (d_model*d_kv)^-1/2, k/v/wi ~ d_model^-1/2, o ~ (heads*d_kv)^-1/2, wo ~ d_ff^-1/2,
embeddings 1), everything else N(0, 0.02) (the configs' ``initializer_range``; the vision
default 1e-10 would make image_embeds ~1e-5).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from ib_edge.runtime.errors import IbEdgeError

VISION = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
              image_size=224, patch_size=14, qkv_bias=True, layer_norm_eps=1e-6, initializer_range=0.02)
QFORMER = dict(vocab_size=30523, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, cross_attention_frequency=2, encoder_hidden_size=1408,
               max_position_embeddings=512, layer_norm_eps=1e-12, initializer_range=0.02)


@dataclasses.dataclass(frozen=True)
class RealSize:
    """One Salesforce InstructBLIP checkpoint's shapes (the sources are in the module docstring)."""
    name: str
    hub_id: str
    family: str            # llama | t5
    text: dict             # LlamaConfig / T5Config keyword arguments
    hub_dtype: str         # what the hub checkpoint stores
    buildable: bool = True  # False: too big to build on a 24 GB / 77 GB-disk machine; planner only

    @property
    def llm_layers_key(self) -> tuple[str, ...]:
        return ("num_hidden_layers",) if self.family == "llama" else ("num_layers", "num_decoder_layers")


_LLAMA = dict(hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=2048, rope_theta=10000.0,
              tie_word_embeddings=False, attention_bias=False, initializer_range=0.02)
_T5 = dict(d_kv=64, feed_forward_proj="gated-gelu", dense_act_fn="gelu", is_gated_act=True,
           layer_norm_epsilon=1e-6, relative_attention_num_buckets=32, relative_attention_max_distance=128,
           tie_word_embeddings=False, vocab_size=32128, initializer_factor=1.0)

PRESETS: dict[str, RealSize] = {p.name: p for p in (
    RealSize("instructblip-vicuna-7b", "Salesforce/instructblip-vicuna-7b", "llama",
             dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32001), "float16"),
    RealSize("instructblip-vicuna-13b", "Salesforce/instructblip-vicuna-13b", "llama",
             dict(_LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40, vocab_size=32001), "float16", buildable=False),
    RealSize("instructblip-flan-t5-xl", "Salesforce/instructblip-flan-t5-xl", "t5",
             dict(_T5, d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32), "float32"),
    RealSize("instructblip-flan-t5-xxl", "Salesforce/instructblip-flan-t5-xxl", "t5",
             dict(_T5, d_model=4096, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64), "float32",
             buildable=False),
)}
HUB_IDS = {p.hub_id: p.name for p in PRESETS.values()}
DTYPES = ("float16", "bfloat16")
DEFAULT_SHARD_MB = 2000


class BuildError(IbEdgeError):
    pass


def preset(name: str) -> RealSize:
    name = HUB_IDS.get(name, name)
    if name not in PRESETS:
        raise BuildError(f"unknown real-size preset {name!r}", hint=f"choose {', '.join(PRESETS)}")
    return PRESETS[name]


def config_dict(p: RealSize, *, layers: int | None = None, token_ids: dict | None = None) -> dict:
    """The InstructBlipConfig keyword arguments of ``p``; ``layers`` cuts every stack (vision,
    Q-Former, LLM encoder and decoder) to at most that many layers, widths unchanged."""
    vision, qformer, text = dict(VISION), dict(QFORMER), dict(p.text)
    if layers is not None:
        if layers < 1:
            raise BuildError("--layers must be at least 1")
        for d, keys in ((vision, ("num_hidden_layers",)), (qformer, ("num_hidden_layers",)), (text, p.llm_layers_key)):
            for k in keys:
                d[k] = min(layers, d[k])
    ids = token_ids or {}
    text.update({k: v for k, v in ids.items() if k in ("pad_token_id", "bos_token_id", "eos_token_id")})
    if p.family == "t5":
        text.pop("bos_token_id", None)
        text["decoder_start_token_id"] = ids.get("pad_token_id", 0)
    if "qformer_pad_token_id" in ids:
        qformer["pad_token_id"] = ids["qformer_pad_token_id"]
    out = dict(vision_config=vision, qformer_config=qformer, text_config=dict(text, model_type=p.family),
               num_query_tokens=32, initializer_range=0.02)
    if "image_token_index" in ids:
        out["image_token_index"] = ids["image_token_index"]
    return out


def make_config(p: RealSize, *, layers: int | None = None, token_ids: dict | None = None):
    from transformers import InstructBlipConfig, LlamaConfig, T5Config

    kw = config_dict(p, layers=layers, token_ids=token_ids)
    text = dict(kw.pop("text_config"))
    text.pop("model_type")
    text_cfg = LlamaConfig(**text) if p.family == "llama" else T5Config(**text)
    return InstructBlipConfig(text_config=text_cfg.to_dict(), **kw)


# --- initialisation ---------------------------------------------------------------------------
def init_std(name: str, shape, p: RealSize, text: dict) -> float | str:
    """The init of one tensor: a standard deviation, or "zeros" / "ones"."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return "zeros"
    if len(shape) == 1 and leaf == "weight":    # LayerNorm / RMSNorm / T5LayerNorm scales
        return "ones"
    if name == "query_tokens":
        return 0.5
    if p.family == "t5" and name.startswith("language_model."):
        d, dkv, h, ff = text["d_model"], text["d_kv"], text["num_heads"], text["d_ff"]
        parts = name.split(".")
        if "relative_attention_bias" in parts:
            return d ** -0.5
        if "shared" in parts or "embed_tokens" in parts:
            return 1.0
        if "lm_head" in parts:
            return d ** -0.5
        table = {"q": (d * dkv) ** -0.5, "k": d ** -0.5, "v": d ** -0.5, "o": (h * dkv) ** -0.5,
                 "wi": d ** -0.5, "wi_0": d ** -0.5, "wi_1": d ** -0.5, "wo": ff ** -0.5}
        if parts[-2] in table:
            return table[parts[-2]]
    return 0.02


def _make(shape, how, dtype, gen):
    import torch

    if how == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if how == "ones":
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, float(how), generator=gen)


# --- the builder --------------------------------------------------------------------------------
def build_checkpoint(name: str, out: str | Path, *, dtype: str = "float16", layers: int | None = None,
                     seed: int = 0, shard_mb: int = DEFAULT_SHARD_MB, log=lambda m: None) -> dict:
    """Write a random-weight checkpoint of preset ``name`` at ``out``; returns a record (params,
    bytes, shards, seconds). Holds at most one shard plus one tensor in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import InstructBlipForConditionalGeneration

    from .reference_models import TinySpec, build_llm_tokenizer, build_processor, build_qformer_tokenizer

    p = preset(name)
    if dtype not in DTYPES:
        raise BuildError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not p.buildable and layers is None:
        raise BuildError(f"{p.name} at full depth does not fit this machine's disk and memory budget "
                         "(it is in the planner: ib-bench --plan)", hint="build it cut: --layers N")
    if shard_mb < 1:
        raise BuildError("--shard-mb must be at least 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BuildError(f"{out} exists and is not empty", hint="choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    llm_tok, qformer_tok = build_llm_tokenizer(p.family), build_qformer_tokenizer()
    ids = {"pad_token_id": llm_tok.pad_token_id, "eos_token_id": llm_tok.eos_token_id,
           "image_token_index": llm_tok.convert_tokens_to_ids("<image>"),
           "qformer_pad_token_id": qformer_tok.pad_token_id}
    if llm_tok.bos_token_id is not None:
        ids["bos_token_id"] = llm_tok.bos_token_id
    config = make_config(p, layers=layers, token_ids=ids)
    with torch.device("meta"):
        model = InstructBlipForConditionalGeneration(config)
    params = list(model.named_parameters())   # tied parameters appear once, under the name save_pretrained keeps
    text = config.text_config.to_dict()
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    limit = shard_mb * 1024 * 1024
    shard: dict = {}
    shard_bytes, total, n_params, files, weight_map = 0, 0, 0, [], {}

    def flush():
        nonlocal shard, shard_bytes
        if not shard:
            return
        tmp = out / f".shard-{len(files):05d}.safetensors"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        files.append((tmp, list(shard)))
        log(f"      shard {len(files)}: {len(shard)} tensors, {shard_bytes / 2**30:.2f} GiB")
        shard, shard_bytes = {}, 0

    for pname, param in params:
        nbytes = param.numel() * torch_dtype.itemsize
        if shard and shard_bytes + nbytes > limit:
            flush()
        shard[pname] = _make(tuple(param.shape), init_std(pname, param.shape, p, text), torch_dtype, gen)
        shard_bytes += nbytes
        total += nbytes
        n_params += param.numel()
    flush()
    del model
    n = len(files)
    for i, (tmp, names) in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, out / final)
        weight_map.update({k: final for k in names})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n", encoding="utf-8")
    for c in (config, config.vision_config, config.qformer_config, config.text_config):
        c.dtype = torch_dtype   # dtype="auto" reads each sub-config's own
    config.save_pretrained(out)
    vc = config.vision_config
    build_processor(TinySpec(p.family, image_size=vc.image_size, patch_size=vc.patch_size,
                             num_query_tokens=config.num_query_tokens), llm_tok, qformer_tok).save_pretrained(out)
    rec = {"preset": p.name, "hub_id": p.hub_id, "dtype": dtype, "layers": layers, "params": n_params,
           "bytes": total, "shards": n, "seconds": round(time.perf_counter() - t0, 1), "seed": seed,
           "note": "random weights at the real shapes" + (f", every stack cut to {layers} layers" if layers else "")}
    (out / "real_size.json").write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
    return rec


def main(argv: list[str] | None = None) -> int:
    from ib_edge.runtime.quiet import quiet_libraries

    quiet_libraries()   # torchao/pytree import chatter (IB_EDGE_DEBUG=1 shows it)
    ap = argparse.ArgumentParser(prog="python -m ib_edge.export.real_sizes", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dtype", default="float16", choices=DTYPES)
    ap.add_argument("--layers", type=int, default=None, metavar="N",
                    help="cut every stack to at most N layers (widths unchanged): smoke tests and RSS checks")
    ap.add_argument("--shard-mb", type=int, default=DEFAULT_SHARD_MB, help="shard size (also the builder's peak memory)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        rec = build_checkpoint(args.preset, args.out, dtype=args.dtype, layers=args.layers, seed=args.seed,
                               shard_mb=args.shard_mb, log=lambda m: print(m, file=sys.stderr, flush=True))
    except IbEdgeError as e:
        print(f"real_sizes: error: {e.line()}", file=sys.stderr)
        return 2
    print(f"{args.out}: {rec['params'] / 1e9:.3f} B params, {rec['bytes'] / 2**30:.2f} GiB in {rec['shards']} "
          f"shard(s), {rec['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
