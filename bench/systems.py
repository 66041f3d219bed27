"""The things the benchmark times, behind one interface: ``run(image, question, max_new_tokens,
fixed_length=False) -> Answer`` with per-stage milliseconds named as the runtime names them;
``fixed_length`` suppresses EOS so that every system decodes exactly ``max_new_tokens``.

* ``BundleSystem``: an ib-edge bundle through ``ib_edge.runtime.Pipeline`` (the product path).
* ``TransformersSystem``: ``InstructBlipForConditionalGeneration.generate`` on the bundle's
  source checkpoint, fp32 eager, or NF4 through bitsandbytes on a CUDA GPU. Stage times come
  from forward hooks on the vision model, the Q-Former and the language projection, and a
  streamer that notes the first generated token, so one ``generate`` call gives all of them.

How the LLM is fed for one next-token forward is the runtime's LLM stage's to know
(``runtime.llm``); the benchmark asks it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import time

import numpy as np

STAGES = ("preprocess", "vision", "qformer", "llm_prefill", "llm_decode", "total")


@dataclasses.dataclass
class Answer:
    text: str
    token_ids: list[int]
    timings_ms: dict[str, float]   # STAGES + "new_tokens"


class NotAvailable(Exception):
    """A system cannot run on this machine; the message says why (goes into the report)."""


class BundleSystem:
    kind = "bundle"

    def __init__(self, path, providers=None, threads: int | None = None):
        from ib_edge.runtime import Pipeline

        self.pipe = Pipeline.load(path, providers=providers, threads=threads)
        _ = self.pipe.llm  # load the LLM now: its load is not part of the first run
        self.manifest = self.pipe.manifest

    def run(self, image, question: str, max_new_tokens: int, fixed_length: bool = False) -> Answer:
        """``fixed_length``: EOS suppressed, so exactly ``max_new_tokens`` are generated (timing)."""
        res = self.pipe.run(image, question, max_new_tokens=max_new_tokens,
                            min_new_tokens=max_new_tokens if fixed_length else 0)
        t = dict(res.timings_ms)
        # encoder-decoder output starts with the decoder start token, which is not generated
        t["new_tokens"] = float(len(res.token_ids) - (1 if self.pipe.llm.is_encoder_decoder else 0))
        return Answer(res.answer, list(res.token_ids), t)

    def tensors(self, image, question: str, ref_image_embeds: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The boundary tensors for drift: image_embeds, query_embeds (this bundle's chain),
        query_embeds_stage (this Q-Former fed the reference's image_embeds) and the LLM's
        next-token logits after the prompt."""
        frames = self.manifest.frames  # a video bundle: image is its frames; embeddings [F, ...], queries [1, F*Q, D]
        enc = self.pipe.prompts.encode(question, frames=frames)
        pv = self.pipe.pixel_values([image]) if frames is None else self.pipe.video_pixel_values(image)
        img = self.pipe.image_embeds(pv)
        q = self.pipe.frame_query_embeds(img, enc)
        out = {"image_embeds": img, "query_embeds": q,
               "next_token_logits": self.pipe.llm.next_token_logits(q, enc["input_ids"], enc["attention_mask"])}
        if ref_image_embeds is not None and ref_image_embeds.shape == img.shape:
            out["query_embeds_stage"] = self.pipe.frame_query_embeds(ref_image_embeds, enc)
        return out

    @property
    def llm_model(self):
        return self.pipe.llm.model


class _FirstToken:
    """transformers streamer: the first put() is the prompt, the second the first new token."""

    def __init__(self, sync):
        self.sync, self.calls, self.first_at = sync, 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.sync()
            self.first_at = time.perf_counter()

    def end(self):
        pass


def nf4_unavailable_reason() -> str | None:
    """Why transformers + bitsandbytes NF4 cannot run here, or None if it can. bitsandbytes
    >= 0.45 runs NF4 on CPU as well as on CUDA GPUs."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install -c constraints.txt -e '.[bench]')"
    return None


def bf16_unavailable_reason() -> str | None:
    """Why a bf16 eager baseline would not be what a user of this CPU runs (None: it is)."""
    from ib_edge.runtime.cpuinfo import BF16_FLAGS, bf16_flag, cpu_model

    if bf16_flag() is None:
        return (f"this CPU ({cpu_model()}) has no native bf16 ({' or '.join(BF16_FLAGS)} not in /proc/cpuinfo "
                "flags): torch would emulate it")
    return None


def _nf4_cpu_fallbacks(model) -> int:
    """bitsandbytes' packed CPU NF4 kernel (avx512-bf16) needs out_features % 32 == 0 and
    in_features % blocksize == 0 and fails otherwise ("N must be divisible by block_n"); such
    layers are put on bitsandbytes' own generic CPU path. Returns how many."""
    n = 0
    for mod in model.modules():
        if type(mod).__name__ == "Linear4bit" and getattr(mod, "support_avx512bf16_for_cpu", False):
            qs = getattr(mod.weight, "quant_state", None)
            block = getattr(qs, "blocksize", 64) or 64
            if mod.out_features % 32 or mod.in_features % block:
                mod.support_avx512bf16_for_cpu = False
                n += 1
    return n


class TransformersSystem:
    """transformers' own InstructBLIP generate. ``quantization``: None (fp32 eager on CPU), "bf16"
    (weights and compute in bfloat16 on CPU, eager: what a user tries on a CPU with native bf16)
    or "nf4" (bitsandbytes 4-bit NF4 weights, as a user would load them: fp16 compute on CUDA
    device 0 when there is a GPU, else fp32 compute on CPU)."""
    kind = "transformers"

    def __init__(self, checkpoint: str, quantization: str | None = None, threads: int | None = None):
        import torch
        import transformers
        from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        if threads:
            torch.set_num_threads(threads)
        kwargs = {"use_safetensors": True, "attn_implementation": "eager"}
        if quantization == "nf4":
            reason = nf4_unavailable_reason()
            if reason:
                raise NotAvailable(reason)
            cuda = torch.cuda.is_available()
            dt = torch.float16 if cuda else torch.float32
            kwargs.update(quantization_config=transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dt),
                device_map={"": 0} if cuda else {"": "cpu"}, dtype=dt)
        elif quantization is None:
            kwargs["dtype"] = torch.float32
        elif quantization == "bf16":
            reason = bf16_unavailable_reason()
            if reason:
                raise NotAvailable(reason)
            kwargs["dtype"] = torch.bfloat16
        else:
            raise ValueError(f"quantization {quantization!r}: None, 'bf16' or 'nf4'")
        self.model = InstructBlipForConditionalGeneration.from_pretrained(checkpoint, trust_remote_code=False,
                                                                          **kwargs).eval()
        self.processor = InstructBlipProcessor.from_pretrained(checkpoint, trust_remote_code=False)
        self.device = next(self.model.parameters()).device
        self.float_dtype = kwargs["dtype"]
        self.nf4_generic_layers = _nf4_cpu_fallbacks(self.model) if quantization == "nf4" else 0
        self._sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self._marks: dict[str, float] = {}
        m = self.model
        m.vision_model.register_forward_pre_hook(lambda mod, args: self._mark("vision_start"))
        m.vision_model.register_forward_hook(lambda mod, args, out: self._mark("vision_end"))
        m.qformer.register_forward_pre_hook(lambda mod, args: self._mark("qformer_start"))
        m.language_projection.register_forward_hook(lambda mod, args, out: self._mark("qformer_end"))
        self.is_encoder_decoder = bool(m.config.text_config.is_encoder_decoder)

    def _mark(self, name: str) -> None:
        if name not in self._marks:  # the first call of each hook in one generate
            self._sync()
            self._marks[name] = time.perf_counter()

    def run(self, image, question: str, max_new_tokens: int, fixed_length: bool = False) -> Answer:
        import torch

        t0 = time.perf_counter()
        inputs = self.processor(images=image, text=question, return_tensors="pt")
        inputs = {k: (v.to(self.device, self.float_dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        self._sync()
        t1 = time.perf_counter()
        self._marks = {}
        streamer = _FirstToken(self._sync)
        with torch.no_grad():
            out = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                      min_new_tokens=max_new_tokens if fixed_length else None, streamer=streamer)
        self._sync()
        t2 = time.perf_counter()
        if not self.is_encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1]:]
        ids = [int(v) for v in out[0].tolist()]
        text = self.processor.batch_decode(out, skip_special_tokens=True)[0]
        mk = self._marks
        first = streamer.first_at or t2
        t = {"preprocess": (t1 - t0) * 1e3,
             "vision": (mk["vision_end"] - mk["vision_start"]) * 1e3,
             "qformer": (mk["qformer_end"] - mk["qformer_start"]) * 1e3,
             "llm_prefill": (first - mk["qformer_end"]) * 1e3,
             "llm_decode": (t2 - first) * 1e3,
             "total": (t2 - t0) * 1e3,
             "new_tokens": float(len(ids) - (1 if self.is_encoder_decoder else 0))}
        return Answer(text, ids, t)

    @property
    def llm_model(self):
        return self.model.language_model
