"""Resolve a model reference and load an InstructBLIP checkpoint (safetensors only).

A reference is one of: a shipped proof model's name (``proof-llama``, ``proof-t5``), a local
directory holding ``save_pretrained`` output, or a Hugging Face hub id (always has a ``/``).
Real checkpoints and the project's own go through the same ``from_pretrained`` path.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import socket
from pathlib import Path

from ib_edge.runtime.errors import IbEdgeError

PROOF_MODELS_DIR = Path(__file__).resolve().parent / "proof_models"
PROOF_MODELS = ("proof-llama", "proof-t5")
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


def load_checkpoint(ref: str | None, revision: str | None = None):
    """-> (model, processor, source record). Vision, Q-Former and projection are cast to fp32
    for export; the LLM keeps the checkpoint's own dtype (a 7B LLM in fp32 would not fit)."""
    import torch
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    src, kind = resolve(ref)
    try:
        model = InstructBlipForConditionalGeneration.from_pretrained(
            src, revision=revision, use_safetensors=True, dtype="auto", trust_remote_code=False)
        processor = InstructBlipProcessor.from_pretrained(src, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("no network to the hub here? download the checkpoint elsewhere and pass its directory"
                if kind == "hub" else None)
        raise ModelLoadError(f"cannot load {ref or DEFAULT_MODEL}: {first}", hint=hint) from None
    model.eval()
    for part in (model.vision_model, model.qformer, model.language_projection):
        part.float()
    model.query_tokens.data = model.query_tokens.data.float()
    if getattr(processor, "num_query_tokens", None) != model.config.num_query_tokens:
        raise ModelLoadError(
            f"processor num_query_tokens={getattr(processor, 'num_query_tokens', None)} but model has "
            f"{model.config.num_query_tokens}: this checkpoint predates the <image>-token processor")
    config_json = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    source = {
        "model": src if kind == "local" else (ref or DEFAULT_MODEL),  # local: absolute, resolvable later
        "kind": kind,
        "revision": revision or getattr(model.config, "_commit_hash", None) or ("main" if kind == "hub" else "local"),
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "llm_family": model.config.text_config.model_type,
        "llm_dtype": str(next(model.language_model.parameters()).dtype).replace("torch.", ""),
    }
    return model, processor, source
