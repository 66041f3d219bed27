"""The LLM stage: query embeddings + prompt -> generated token ids.

Mirrors ``InstructBlipForConditionalGeneration.generate``: the prompt's ``<image>`` positions
get the projected query embeddings, then the language model's own ``generate`` runs on
``inputs_embeds`` (plus ``input_ids`` for decoder-only models, as transformers does).
torch and transformers are imported here only, lazily.
"""
from __future__ import annotations

import time

import numpy as np

from .errors import BundleError, InputError
from .manifest import REBUILD, Manifest


class _Streamer:
    """transformers streamer protocol: put(ids) / end(). Skips the prompt, emits text deltas."""

    def __init__(self, decode, on_text):
        self.decode, self.on_text = decode, on_text
        self.ids: list[int] = []
        self.sent = ""
        self.skip_prompt = True
        self.first_token_at: float | None = None

    def put(self, value):
        if self.skip_prompt:
            self.skip_prompt = False
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            return
        self._emit(text)

    def end(self):
        self._emit(self.decode(self.ids))

    def _emit(self, text):
        if self.on_text and text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
        self.sent = text


class TransformersLLM:
    def __init__(self, manifest: Manifest, threads: int | None = None):
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        art = manifest.artifact("llm")
        from .lowbit import WO_FORMAT, WO_FORMAT_VERSION

        if art.get("format") not in ("safetensors", WO_FORMAT):
            raise BundleError(f"LLM format {art.get('format')!r} is not supported by this runtime", hint=REBUILD)
        if art.get("format") == WO_FORMAT and str(art.get("format_version")) != WO_FORMAT_VERSION:
            raise BundleError(f"LLM format {WO_FORMAT} version {art.get('format_version')!r} is not supported "
                              f"(this runtime reads {WO_FORMAT_VERSION})", hint=REBUILD)
        if threads:
            torch.set_num_threads(threads)
        path = manifest.path(art["dir"])
        self.is_encoder_decoder = bool(manifest.model["is_encoder_decoder"])
        self.image_token_id = int(manifest.model["image_token_id"])
        auto = transformers.AutoModelForSeq2SeqLM if self.is_encoder_decoder else transformers.AutoModelForCausalLM
        dtype = art.get("dtype", "float32")
        if dtype not in ("float32", "float16", "bfloat16"):
            raise BundleError(f"LLM dtype {dtype!r} is not float32, float16 or bfloat16", hint=REBUILD)
        try:
            if art.get("format") == WO_FORMAT:  # weight-only int4/int8/fp32 linears on low-bit kernels
                from .lowbit import load_weight_only

                self.model = load_weight_only(path, encoder_decoder=self.is_encoder_decoder,
                                              files=manifest.files("llm", ".safetensors"))
            else:
                # trust_remote_code=False: a bundle is data; transformers must never import code
                # from it (nor prompt on a terminal for leave to), whatever its config.json says
                self.model = auto.from_pretrained(str(path), dtype=getattr(torch, dtype), use_safetensors=True,
                                                  trust_remote_code=False)
        except BundleError:
            raise
        except Exception as e:  # transformers/safetensors raise many types for a bad checkpoint
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"cannot load the bundle's LLM: {msg[:300]}", hint=REBUILD) from None
        self.model.eval()
        self.timings: dict[str, float] = {}

    def generate(self, query_embeds: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray, *,
                 decode, max_new_tokens: int = 32, num_beams: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, on_text=None) -> list[int]:
        import torch

        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        if num_beams < 1:
            raise InputError("num_beams must be at least 1")
        sample = temperature > 0 or top_p < 1.0
        if sample and num_beams > 1:
            raise InputError("sampling (--temperature/--top-p) and beam search (--num-beams) exclude each other")
        ids = torch.from_numpy(input_ids)
        with torch.no_grad():
            embeds = self.model.get_input_embeddings()(ids)
            image_mask = (ids == self.image_token_id).unsqueeze(-1)
            if int(image_mask.sum()) != query_embeds.shape[0] * query_embeds.shape[1]:
                raise BundleError("prompt's image-token count does not match the Q-Former's query count", hint=REBUILD)
            embeds = embeds.masked_scatter(image_mask, torch.from_numpy(query_embeds).to(embeds.dtype))
            kwargs = dict(inputs_embeds=embeds, attention_mask=torch.from_numpy(attention_mask),
                          max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=sample)
            if sample:
                kwargs.update(temperature=temperature if temperature > 0 else 1.0, top_p=top_p, top_k=0)
                if seed is not None:
                    torch.manual_seed(seed)
            if not self.is_encoder_decoder:
                kwargs["input_ids"] = ids
            streamer = _Streamer(decode, on_text) if num_beams == 1 else None
            if streamer is not None:
                kwargs["streamer"] = streamer
            t0 = time.perf_counter()
            out = self.model.generate(**kwargs)
            t1 = time.perf_counter()
        new = out[0, ids.shape[1]:] if not self.is_encoder_decoder else out[0]
        new_ids = [int(t) for t in new.tolist()]
        if streamer is None and on_text is not None:
            on_text(decode(new_ids))
        first = streamer.first_token_at if streamer and streamer.first_token_at else t1
        self.timings = {"prefill": (first - t0) * 1e3, "decode": (t1 - first) * 1e3,
                        "new_tokens": float(len(new_ids))}
        return new_ids
