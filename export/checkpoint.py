"""Resolve a model reference and load an InstructBLIP checkpoint (safetensors only).

A reference is one of: a shipped proof model's name (``proof-llama``, ``proof-t5``), a local
directory holding ``save_pretrained`` output, or a Hugging Face hub id (always has a ``/``).
Real checkpoints and the project's own go through the same ``from_pretrained`` path.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ib_edge.runtime.errors import IbEdgeError

PROOF_MODELS_DIR = Path(__file__).resolve().parent / "proof_models"
PROOF_MODELS = ("proof-llama", "proof-t5")
DEFAULT_MODEL = "proof-llama"


class ModelLoadError(IbEdgeError):
    pass


def resolve(ref: str | None) -> tuple[str, str]:
    """-> (what to pass to from_pretrained, kind) with kind in proof|local|hub."""
    ref = ref or DEFAULT_MODEL
    if ref in PROOF_MODELS:
        path = PROOF_MODELS_DIR / ref
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"shipped model {ref} is missing from {path}",
                                 hint="reinstall ib-edge, or train it: python -m ib_edge.bench.train_proof")
        return str(path), "proof"
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a transformers checkpoint (no config.json)")
        return str(path.resolve()), "local"
    if "/" in ref and not ref.startswith((".", "/", "~")):
        return ref, "hub"
    raise ModelLoadError(f"unknown model {ref!r}",
                         hint=f"use {', '.join(PROOF_MODELS)}, a local checkpoint directory or a hub id like "
                              "Salesforce/instructblip-vicuna-7b")


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
