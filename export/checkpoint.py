"""Resolve a model reference and load an InstructBLIP checkpoint (safetensors only).

A reference is one of: a shipped proof model's name (``proof-llama``, ``proof-t5``), a local
directory holding ``save_pretrained`` output, or a Hugging Face hub id (always has a ``/``).
Real checkpoints and the project's own go through the same path: ``from_pretrained`` for hub
ids, the stored tensors read directly (the LLM never loaded) for local directories.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import socket
from pathlib import Path

from ib_edge.runtime.errors import IbEdgeError

PROOF_MODELS_DIR = Path(__file__).resolve().parent / "proof_models"
PROOF_MODELS = ("proof-llama", "proof-t5", "proof-video-llama")
DEFAULT_MODEL = "proof-llama"


class ModelLoadError(IbEdgeError):
    pass


def resolve(ref: str | None) -> tuple[str, str]:
    """-> (what to pass to from_pretrained, kind) with kind in proof|local|hub. Checks names,
    paths and (offline, or with the hub unreachable) the hub cache without importing torch or
    transformers, so a typo fails in well under a second."""
    ref = ref or DEFAULT_MODEL
    if ref in PROOF_MODELS:
        path = PROOF_MODELS_DIR / ref
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"shipped model {ref} is missing from {path}",
                                 hint="reinstall ib-edge, or train it: python -m ib_edge.bench.train_proof")
        return str(path), "proof"
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file, not a checkpoint directory")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a transformers checkpoint (no config.json)")
        return str(path.resolve()), "local"
    if ref.startswith((".", "/", "~")) or ref.endswith("/") or ref.count("/") > 1:
        raise ModelLoadError(f"directory not found: {ref}",
                             hint="pass an existing save_pretrained directory (with config.json)")
    if "/" in ref:
        _check_hub(ref)
        return ref, "hub"
    close = difflib.get_close_matches(ref, PROOF_MODELS, n=1)
    raise ModelLoadError(f"unknown model {ref!r}" + (f" (did you mean {close[0]}?)" if close else ""),
                         hint=f"use {', '.join(PROOF_MODELS)}, a local checkpoint directory or a hub id like "
                              "Salesforce/instructblip-vicuna-7b")


def hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _check_hub(repo_id: str, timeout_s: float = 3.0) -> None:
    """A hub id must be in the local cache, or the hub reachable: say which fails now, not
    after the imports and the hub client's retries (33 s seen offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return  # transformers brings huggingface_hub; without it from_pretrained will say so
    try:
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError as e:  # not a valid repo id
        raise ModelLoadError(f"unknown model {repo_id!r}: {e}") from None
    if cached:
        return
    hint = "download the checkpoint where there is network (huggingface-cli download ID) and pass its directory"
    if hub_offline():
        raise ModelLoadError(f"{repo_id} is not in the local hub cache and the hub is off (HF_HUB_OFFLINE)", hint=hint)
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as e:
        raise ModelLoadError(f"{repo_id} is not in the local hub cache and {host} cannot be reached ({e})",
                             hint=hint) from None


VIDEO_FRAMES = 4  # InstructBlipVideoProcessor expands <video> x num_query_tokens x 4: "InstrucBLIP works with 4 frames only"


def _model_type(src: str, revision: str | None) -> str:
    from transformers import PretrainedConfig

    cfg, _ = PretrainedConfig.get_config_dict(src, revision=revision, trust_remote_code=False)
    return str(cfg.get("model_type", ""))


class VideoProcessorParts:
    """An InstructBlipVideo checkpoint's processor without ``InstructBlipVideoVideoProcessor``
    (it imports torchvision, whose wheel does not import beside the CPU torch here): its two
    tokenizers, and its video processor config as the BLIP image processor it equals per frame
    (resize, rescale, normalise). Called on text only it returns what the processor returns on
    text only; ``save_pretrained`` writes the layout the bundle's ``processor/`` has."""

    def __init__(self, tokenizer, qformer_tokenizer, image_processor, num_query_tokens: int):
        self.tokenizer, self.qformer_tokenizer = tokenizer, qformer_tokenizer
        self.image_processor, self.num_query_tokens = image_processor, num_query_tokens

    @classmethod
    def read(cls, src: str, revision: str | None = None, num_query_tokens: int | None = None):
        from transformers import AutoTokenizer
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
        from transformers.utils import cached_file

        tok = AutoTokenizer.from_pretrained(src, revision=revision, trust_remote_code=False)
        qtok = AutoTokenizer.from_pretrained(src, subfolder="qformer_tokenizer", revision=revision,
                                             trust_remote_code=False)
        cfg = None
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = cached_file(src, name, revision=revision, _raise_exceptions_for_missing_entries=False)
            if path:
                cfg = json.loads(Path(path).read_text(encoding="utf-8"))
                break
        if cfg is None:
            raise ModelLoadError(f"{src} has neither video_preprocessor_config.json nor preprocessor_config.json")
        keys = ("size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                "image_std", "do_convert_rgb", "do_center_crop", "crop_size", "do_pad")
        image_processor = BlipImageProcessorPil(**{k: cfg[k] for k in keys if cfg.get(k) is not None})
        nq = num_query_tokens
        proc = cached_file(src, "processor_config.json", revision=revision, _raise_exceptions_for_missing_entries=False)
        if proc:
            nq = json.loads(Path(proc).read_text(encoding="utf-8")).get("num_query_tokens", nq)
        return cls(tok, qtok, image_processor, nq)

    def __call__(self, text=None, images=None, **kw):
        if images is not None:
            raise ValueError("VideoProcessorParts tokenizes text only; frames go through the runtime's preprocessing")
        q = self.qformer_tokenizer(text, **kw)
        out = dict(self.tokenizer(text, **kw))
        out.update(qformer_input_ids=q["input_ids"], qformer_attention_mask=q["attention_mask"])
        return out

    def save_pretrained(self, out) -> None:
        out = Path(out)
        self.tokenizer.save_pretrained(out)
        self.qformer_tokenizer.save_pretrained(out / "qformer_tokenizer")
        self.image_processor.save_pretrained(out)


def video_record(model, processor, kind: str) -> dict:
    """The manifest's video fields: the frame count the processor hard-codes and the LLM token
    whose positions take the frames' query embeddings. A checkpoint loaded as a video model
    from an image InstructBLIP checkpoint (transformers' docs do so) may have no ``video_token_index``
    (transformers' generate then fails): its tokenizer's ``<video>`` token is the placeholder if it
    has one, else its ``<image>`` token (any in-vocabulary id serves: its embedding is replaced)."""
    cfg = model.config
    vid = getattr(cfg, "video_token_index", None)
    if vid is None:  # the tokenizer's own <video> (InstructBlipVideoProcessor's token) if it has one, else <image>
        vid = (getattr(processor, "tokenizer", None) and processor.tokenizer.get_vocab().get("<video>"))
        vid = vid if vid is not None else getattr(cfg, "image_token_index", None)
    rows = model.language_model.get_input_embeddings().weight.shape[0]
    if vid is None or not 0 <= int(vid) < rows:
        raise ModelLoadError(f"this checkpoint has no usable video token (video_token_index={vid}, "
                             f"{rows} embedding rows)", hint="its tokenizer needs a <video> or <image> token")
    return {"kind": kind, "frames": VIDEO_FRAMES, "video_token_id": int(vid)}


LLM_PREFIX = "language_model."


def load_checkpoint(ref: str | None, revision: str | None = None, video: bool = False):
    """-> (model, processor, source record, llm). Vision, Q-Former and projection are in fp32 for
    export. ``llm`` (``StoredLLM``) writes the LLM directory of the bundle in the checkpoint's own
    dtype. An InstructBlipVideo checkpoint loads as one; ``video`` loads an image InstructBLIP
    checkpoint as ``InstructBlipVideoForConditionalGeneration`` (transformers' docs do so).
    ``source["video"]``: the manifest's video fields, or None for an image model.

    A local safetensors image checkpoint whose tensor names are the model's (what
    ``save_pretrained`` writes; the real-size builder too) never loads its LLM:
    ``model.language_model`` stays on the meta device and ``llm.save`` copies its tensors file to
    file, one shard at a time (a 7B LLM would otherwise sit in RAM, 13.5 GB in fp16, through the
    whole graph export). Hub ids, video models and other layouts load through ``from_pretrained``."""
    import torch
    from transformers import (InstructBlipForConditionalGeneration, InstructBlipProcessor,
                              InstructBlipVideoForConditionalGeneration)

    from ib_edge.quant.streamed import stored_index

    src, kind = resolve(ref)
    try:
        model_type = _model_type(src, revision)
        is_video = video or model_type == "instructblipvideo"
        stored = ((stored_index(Path(src)) or None) if kind != "hub" and revision is None and not is_video
                  else None)
        model = _load_without_llm(src, stored) if stored else None
        if model is None:
            stored = None
            cls = InstructBlipVideoForConditionalGeneration if is_video else InstructBlipForConditionalGeneration
            model = cls.from_pretrained(
                src, revision=revision, use_safetensors=True, dtype="auto", trust_remote_code=False)
        if model_type == "instructblipvideo":
            processor = VideoProcessorParts.read(src, revision, model.config.num_query_tokens)
        else:
            processor = InstructBlipProcessor.from_pretrained(src, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("no network to the hub here? download the checkpoint elsewhere and pass its directory"
                if kind == "hub" else None)
        raise ModelLoadError(f"cannot load {ref or DEFAULT_MODEL}: {first}", hint=hint) from None
    if model_type not in ("instructblip", "instructblipvideo"):
        raise ModelLoadError(f"{ref or DEFAULT_MODEL} is a {model_type or 'unknown'} checkpoint, not InstructBLIP "
                             "or InstructBlipVideo")
    model.eval()
    for part in (model.vision_model, model.qformer, model.language_projection):
        part.float()
    model.query_tokens.data = model.query_tokens.data.float()
    if getattr(processor, "num_query_tokens", None) != model.config.num_query_tokens:
        raise ModelLoadError(
            f"processor num_query_tokens={getattr(processor, 'num_query_tokens', None)} but model has "
            f"{model.config.num_query_tokens}: this checkpoint predates the <image>-token processor")
    llm = StoredLLM(model.language_model, stored)
    config_json = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    source = {
        "model": src if kind == "local" else (ref or DEFAULT_MODEL),  # local: absolute, resolvable later
        "kind": kind,
        "revision": revision or getattr(model.config, "_commit_hash", None) or ("main" if kind == "hub" else "local"),
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "llm_family": model.config.text_config.model_type,
        "llm_dtype": str(llm.dtype).replace("torch.", ""),
        "model_type": model_type,
        "video": video_record(model, processor, "video") if is_video else None,
    }
    return model, processor, source, llm


def _load_without_llm(src: str, stored: dict[str, Path]):
    """The model with vision, Q-Former, projection and query tokens loaded in fp32 and the LLM
    on the meta device; None when the stored names are not this model's (then from_pretrained,
    which knows older layouts, loads it)."""
    import torch
    from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipQFormerModel,
                              InstructBlipVisionModel)
    from transformers.initialization import no_init_weights

    from ib_edge.quant.streamed import read_tensors

    config = InstructBlipConfig.from_pretrained(src, trust_remote_code=False)
    with torch.device("meta"):
        model = InstructBlipForConditionalGeneration(config)
    own_llm = set(model.language_model.state_dict())
    llm_keys = [k for k in stored if k.startswith(LLM_PREFIX)]
    if not llm_keys or any(k.removeprefix(LLM_PREFIX) not in own_llm for k in llm_keys):
        return None
    with no_init_weights():  # every weight is read from the checkpoint below; the buffers are built here
        model.vision_model = InstructBlipVisionModel._from_config(config.vision_config, dtype=torch.float32)
        model.qformer = InstructBlipQFormerModel._from_config(config.qformer_config, dtype=torch.float32)
        model.language_projection = torch.nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
    model.query_tokens = torch.nn.Parameter(torch.empty(model.query_tokens.shape, dtype=torch.float32))
    want = [k for k in model.state_dict() if not k.startswith(LLM_PREFIX)]
    if any(k not in stored for k in want):
        return None
    own = model.state_dict()
    with torch.no_grad():
        for k, t in read_tensors(stored, want).items():
            if tuple(t.shape) != tuple(own[k].shape):
                raise ModelLoadError(f"{k}: stored {list(t.shape)}, the config makes {list(own[k].shape)}")
            own[k].copy_(t)
    return model


class StoredLLM:
    """The checkpoint's LLM as the bundle keeps it (its own dtype, transformers layout):
    ``save(out)`` writes config.json, generation_config.json and the weights. From a stored
    checkpoint (``files``: {name: file}) the tensors go file to file, at most one shard
    (``shard_bytes``) in memory; otherwise ``module`` is a loaded model and saves itself."""

    def __init__(self, module, files: dict[str, Path] | None = None):
        self.module, self.files = module, files
        if files is None:
            self.dtype = next(module.parameters()).dtype
        else:
            self.keys = [k for k in files if k.startswith(LLM_PREFIX)]
            self.dtype = _stored_dtype(files, self.keys)

    def save(self, out: Path, shard_bytes: int = 2 * 1024 ** 3) -> None:
        if self.files is None:
            self.module.save_pretrained(out, safe_serialization=True)
            return
        from safetensors import safe_open
        from safetensors.torch import save_file

        from ib_edge.quant.streamed import read_tensors

        out.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.module.config)
        config.architectures = [type(self.module).__name__]
        config.dtype = self.dtype
        config.save_pretrained(out)
        if self.module.can_generate():
            self.module.generation_config.save_pretrained(out)
        sizes = {}
        for f in dict.fromkeys(self.files[k] for k in self.keys):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    if k in self.keys:
                        sl = fh.get_slice(k)
                        n = 1
                        for d in sl.get_shape():
                            n *= d
                        sizes[k] = n * _itemsize(sl.get_dtype())
        shards, cur, cur_bytes = [], [], 0
        for k in self.keys:
            if cur and cur_bytes + sizes[k] > shard_bytes:
                shards.append(cur)
                cur, cur_bytes = [], 0
            cur.append(k)
            cur_bytes += sizes[k]
        shards.append(cur)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        for name, keys in zip(names, shards):
            tensors = {k.removeprefix(LLM_PREFIX): t.contiguous() for k, t in read_tensors(self.files, keys).items()}
            save_file(tensors, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in tensors})
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _itemsize(st_dtype: str) -> int:
    return _ST_ITEMSIZE.get(st_dtype, 4)


def _stored_dtype(files: dict[str, Path], keys: list[str]):
    """The dtype of the LLM's first stored floating tensor (its "own" dtype; T5's fp32 ``wo``
    aside, every float tensor of a checkpoint shares it)."""
    import torch
    from safetensors import safe_open

    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for k in keys:
        with safe_open(str(files[k]), framework="pt") as fh:
            d = fh.get_slice(k).get_dtype()
        if d in names:
            return names[d]
    return torch.float32
