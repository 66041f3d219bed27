"""The LLM stage: query embeddings + prompt -> generated token ids, behind one interface.

Mirrors ``InstructBlipForConditionalGeneration.generate``: the prompt's ``<image>`` positions
get the projected query embeddings (``splice_image``, the one place that does it), then a
decoder runs on ``inputs_embeds``. Two stages by the manifest's LLM backend:
``TransformersLLM`` (transformers' ``generate``, any family, float or weight-only low-bit) and
``FastLLM`` (Llama family, our decode loop on the ort or torch engine). Both check their
arguments with ``check_generate_args``, stream text through ``_Streamer`` and return a
``Generation``: the new token ids with their prefill/decode milliseconds.
torch and transformers are imported here only, lazily.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable, Protocol

import numpy as np

from .errors import BundleError, InputError
from .formats import INT4_FORMAT, WO_FORMAT, WO_FORMAT_VERSION
from .manifest import REBUILD, Manifest


@dataclasses.dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    timings_ms: dict[str, float]    # "prefill", "decode" (ms) and "new_tokens"


class LLMStage(Protocol):
    """What the pipeline and the bench use of an LLM stage."""
    is_encoder_decoder: bool
    image_token_id: int

    def generate(self, query_embeds: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray, *,
                 decode: Callable[[list[int]], str], max_new_tokens: int = 32, num_beams: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 on_text: Callable[[str], None] | None = None, min_new_tokens: int = 0) -> Generation: ...

    def next_token_logits(self, query_embeds: np.ndarray, input_ids: np.ndarray,
                          attention_mask: np.ndarray) -> np.ndarray: ...


def check_generate_args(max_new_tokens: int, num_beams: int, temperature: float, top_p: float) -> bool:
    """Refuse what no LLM stage can do; returns whether the options ask for sampling."""
    if max_new_tokens < 1:
        raise InputError("max_new_tokens must be at least 1")
    if num_beams < 1:
        raise InputError("num_beams must be at least 1")
    sample = temperature > 0 or top_p < 1.0
    if sample and num_beams > 1:
        raise InputError("sampling (--temperature/--top-p) and beam search (--num-beams) exclude each other")
    return sample


def splice_image(embeds, input_ids, query_embeds, image_token_id: int):
    """The prompt's token embeddings ``embeds`` [B, T, D] with its ``<image>`` positions
    (``input_ids == image_token_id``) replaced, in order, by the rows of ``query_embeds``
    ([B, Q, D] or [Q, D], numpy or torch). numpy ``embeds`` (the ort engine's) stay numpy."""
    if isinstance(embeds, np.ndarray):
        mask = np.asarray(input_ids) == image_token_id
        q = np.asarray(query_embeds, dtype=embeds.dtype)
        if int(mask.sum()) * q.shape[-1] != q.size:
            raise BundleError("prompt's image-token count does not match the Q-Former's query count", hint=REBUILD)
        out = embeds.copy()
        out[mask] = q.reshape(-1, q.shape[-1])
        return out
    import torch

    ids = torch.as_tensor(input_ids)
    mask = (ids == image_token_id).unsqueeze(-1)
    q = torch.from_numpy(np.asarray(query_embeds)) if not isinstance(query_embeds, torch.Tensor) else query_embeds
    if int(mask.sum()) * q.shape[-1] != q.numel():
        raise BundleError("prompt's image-token count does not match the Q-Former's query count", hint=REBUILD)
    return embeds.masked_scatter(mask.to(embeds.device), q.to(embeds.device, embeds.dtype))


def _timings(t0: float, first: float, t1: float, n_tokens: int) -> dict[str, float]:
    return {"prefill": (first - t0) * 1e3, "decode": (t1 - first) * 1e3, "new_tokens": float(n_tokens)}


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
    """The LLM artifact with backend "transformers" (any family): transformers' own ``generate``
    on the float checkpoint, or on the weight-only low-bit one (``lowbit``)."""
    def __init__(self, manifest: Manifest, threads: int | None = None):
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        art = manifest.artifact("llm")
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

    def generate(self, query_embeds: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray, *,
                 decode, max_new_tokens: int = 32, num_beams: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, on_text=None, min_new_tokens: int = 0) -> Generation:
        import torch

        sample = check_generate_args(max_new_tokens, num_beams, temperature, top_p)
        ids = torch.from_numpy(input_ids)
        with torch.no_grad():
            embeds = splice_image(self.model.get_input_embeddings()(ids), ids, query_embeds, self.image_token_id)
            kwargs = dict(inputs_embeds=embeds, attention_mask=torch.from_numpy(attention_mask),
                          max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=sample)
            if min_new_tokens:
                kwargs["min_new_tokens"] = min_new_tokens
            if sample:
                kwargs.update(temperature=temperature if temperature > 0 else 1.0, top_p=top_p, top_k=0)
                if seed is not None:
                    torch.manual_seed(seed)
            if not self.is_encoder_decoder:
                kwargs["input_ids"] = ids
            streamer = _Streamer(decode, on_text) if num_beams == 1 else None
            first_forward: list[float] = []  # beams do not stream: the end of the first forward is the prefill's
            if streamer is not None:
                kwargs["streamer"] = streamer
                hook = None
            else:
                hook = self.model.register_forward_hook(
                    lambda mod, args, out: first_forward.append(time.perf_counter()) if not first_forward else None)
            t0 = time.perf_counter()
            try:
                out = self.model.generate(**kwargs)
            finally:
                if hook is not None:
                    hook.remove()
            t1 = time.perf_counter()
        new = out[0, ids.shape[1]:] if not self.is_encoder_decoder else out[0]
        new_ids = [int(t) for t in new.tolist()]
        if streamer is None and on_text is not None:
            on_text(decode(new_ids))
        first = (streamer.first_token_at if streamer is not None else (first_forward or [None])[0]) or t1
        return Generation(new_ids, _timings(t0, first, t1, len(new_ids)))

    def next_token_logits(self, query_embeds: np.ndarray, input_ids: np.ndarray,
                          attention_mask: np.ndarray) -> np.ndarray:
        """float32 logits [1, vocab] of the first generated position (decoder-only: after the
        prompt; encoder-decoder: after the decoder start token), from one forward."""
        import torch

        model = self.model
        ids = torch.from_numpy(input_ids)
        with torch.no_grad():
            embeds = splice_image(model.get_input_embeddings()(ids), ids, query_embeds, self.image_token_id)
            kw = {"inputs_embeds": embeds, "attention_mask": torch.from_numpy(attention_mask)}
            if self.is_encoder_decoder:
                kw["decoder_input_ids"] = torch.tensor([[model.config.decoder_start_token_id]])
            logits = model(**kw).logits[:, -1]
        return logits.float().numpy()


class FastLLM:
    """The LLM artifact with backend "fastllm" (Llama family, float or ``int4`` weights): the
    decode loop of ``decode`` on the engine ``engines`` picks (or ``engine``)."""

    def __init__(self, manifest: Manifest, threads: int | None = None, engine: str | None = None):
        from .engines import load

        art = manifest.artifact("llm")
        if art.get("backend") != "fastllm" or art.get("format") not in (INT4_FORMAT, "safetensors"):
            raise BundleError(f"LLM artifact {art.get('backend')}/{art.get('format')} is not for the fast runtime")
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

    def embeds(self, query_embeds, input_ids):
        """The prompt's token embeddings with its <image> positions replaced by query_embeds
        (numpy on the ort engine, torch on the others)."""
        from .decode import NumpyEmbedding

        if isinstance(self.model.embed, NumpyEmbedding):
            return splice_image(self.model.embed(input_ids), input_ids, query_embeds, self.image_token_id)
        import torch

        ids = torch.from_numpy(input_ids)
        return splice_image(self.model.embed(ids), ids, query_embeds, self.image_token_id)

    def generate(self, query_embeds, input_ids, attention_mask, *, decode, max_new_tokens: int = 32,
                 num_beams: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 on_text=None, min_new_tokens: int = 0) -> Generation:
        from . import decode as loop

        check_generate_args(max_new_tokens, num_beams, temperature, top_p)
        if not bool((attention_mask == 1).all()):
            raise InputError("the fast LLM runtime takes unpadded prompts (attention_mask all ones)")
        embeds = self.embeds(query_embeds, input_ids)
        first = []
        t0 = time.perf_counter()
        if num_beams > 1 and min_new_tokens:
            raise InputError("the fast LLM runtime's beam search takes no min_new_tokens")
        if num_beams > 1:  # as transformers: no streaming with beams, the text comes at the end
            ids = loop.beam_search(self.model, embeds, num_beams=num_beams, max_new_tokens=max_new_tokens,
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
                streamer.put(np.array([tok]))

            ids = loop.generate(self.model, embeds, max_new_tokens=max_new_tokens, eos_ids=self.eos_ids,
                                temperature=temperature, top_p=top_p, seed=seed, on_token=on_token,
                                min_new_tokens=min_new_tokens)
            t1 = time.perf_counter()
            streamer.end()
        return Generation(ids, _timings(t0, first[0], t1, len(ids)))

    def next_token_logits(self, query_embeds: np.ndarray, input_ids: np.ndarray,
                          attention_mask: np.ndarray) -> np.ndarray:
        """float32 logits [1, vocab] after the prompt, from one prefill on a fresh cache."""
        from .decode import as_numpy

        self.model.setup_cache(input_ids.shape[1] + 1)
        return as_numpy(self.model(self.embeds(query_embeds, input_ids), 0)).astype(np.float32, copy=False)
