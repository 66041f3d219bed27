"""The thin runtime: image (or video frames) + prompt -> answer, chaining the bundle's stages.

    from ib_edge.runtime import Pipeline
    pipe = Pipeline.load("path/to/bundle")
    print(pipe.generate("cat.jpg", "What is in this image?"))
    # a video bundle: its frame count of frames, or a video file
    print(video_pipe.generate(video=["f1.png", "f2.png", "f3.png", "f4.png"], prompt="What happens?"))
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from .embed_cache import EmbedCache
from .errors import InputError
from .manifest import MANIFEST, Manifest, sha256_file
from .preprocess import PromptEncoder, load_image, pixel_values
from .stages import OnnxStage, session_providers


def make_stage(manifest: Manifest, name: str, providers=None, threads: int | None = None):
    """The stage runner the manifest asks for: TensorRT engine or ONNX Runtime session.
    ``providers``: ORT provider names ("tensorrt", "cuda", "cpu"), for ONNX artifacts only."""
    art = manifest.artifact(name)
    if art.get("backend") == "tensorrt":
        from .tensorrt_stage import TensorRTStage

        return TensorRTStage(manifest, name)
    if providers:
        # ORT's TensorRT EP caches its engines per bundle, outside the bundle (which may be read-only)
        cache = cache_home() / "ort-trt-cache" / sha256_file(manifest.root / MANIFEST)[:16]
        providers = session_providers(providers, art.get("precision", "fp32"), cache)
    return OnnxStage(manifest, name, providers, threads)


def cache_home() -> Path:
    return Path(os.environ.get("IB_EDGE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "ib-edge"))


def default_bundle_dir() -> Path:
    """Where ``ib-export`` writes without ``--out`` and where ``ib-run`` looks without ``--bundle``."""
    if os.environ.get("IB_EDGE_BUNDLE"):
        return Path(os.environ["IB_EDGE_BUNDLE"])
    return cache_home() / "bundle"


@dataclasses.dataclass
class Result:
    answer: str
    token_ids: list[int]
    timings_ms: dict[str, float]


class Pipeline:
    def __init__(self, manifest: Manifest, providers=None, threads: int | None = None,
                 llm_engine: str | None = None, verify: bool = True, device: str | None = None):
        self.manifest = manifest
        self.llm_engine = llm_engine
        self._verify = verify
        if manifest.record("llm").backend == "fastllm":  # --device: runtime/cudallm.py
            from .cudallm import resolve_llm_engine

            self.llm_engine = resolve_llm_engine(llm_engine, device)
        elif device == "cuda":
            raise InputError("--device cuda runs fast-path (fastllm) LLM bundles; this bundle's LLM backend is "
                             f"{manifest.record('llm').backend!r}", hint="drop --device or re-export with --llm-quant")
        tok = manifest.data["tokenizers"]
        self.prompts = PromptEncoder(manifest.path(tok["llm"]), manifest.path(tok["qformer"]), manifest.model)
        self.vision = make_stage(manifest, "vision", providers, threads)
        self.qformer = make_stage(manifest, "qformer", providers, threads)
        self._llm = None
        self._threads = threads
        self.embed_cache: EmbedCache | None = None  # set one to reuse image_embeds across calls

    @classmethod
    def load(cls, bundle_dir: str | os.PathLike | None = None, *, providers=None, threads: int | None = None,
             verify: bool = True, llm_engine: str | None = None, device: str | None = None) -> "Pipeline":
        """Read and validate the manifest, check every artifact's sha256 (``verify``), refuse
        unlisted files in artifact directories and any bundle that names code, open the stages."""
        manifest = Manifest.load(bundle_dir if bundle_dir is not None else default_bundle_dir())
        if verify:
            manifest.verify()
        else:
            manifest.check_listed()
        manifest.refuse_code()
        return cls(manifest, providers, threads, llm_engine, verify, device)

    @property
    def llm(self):
        if self._llm is None:  # torch/transformers load only when text is generated
            # the LLM is read now, maybe long after load(): check again what is about to be read
            if self._verify:  # changed files are re-hashed, so load()'s code check still holds
                self.manifest.reverify("llm")
            else:
                self.manifest.check_listed(["llm"])
                self.manifest.refuse_code()
            if self.manifest.record("llm").backend == "fastllm":
                from .llm import FastLLM

                self._llm = FastLLM(self.manifest, self._threads, self.llm_engine)
            else:
                from .llm import TransformersLLM

                self._llm = TransformersLLM(self.manifest, self._threads)
        return self._llm

    # --- stage by stage (the bench and drift tests use these) -----------------------------
    def pixel_values(self, images) -> np.ndarray:
        return pixel_values([load_image(i) for i in images], self.manifest.preprocess)

    def video_pixel_values(self, video) -> np.ndarray:
        """A video bundle's frames (a list of them, or a video file) -> float32 [F,3,H,W], each
        frame preprocessed as an image; the frame count is the manifest's."""
        from .video import load_frames

        frames = self.manifest.frames
        if frames is None:
            raise InputError("this bundle is an image model: it takes one image, not video frames",
                             hint="export a video bundle: ib-export CHECKPOINT --video (or an InstructBlipVideo "
                                  "checkpoint)")
        return pixel_values(load_frames(video, frames), self.manifest.preprocess)

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        if self.embed_cache is not None:  # cached rows reused, the rest in one vision call
            return self.embed_cache.embeds(pixel_values, lambda pv: self.vision(pixel_values=pv)["image_embeds"])
        return self.vision(pixel_values=pixel_values)["image_embeds"]

    def query_embeds(self, image_embeds: np.ndarray, qformer_input_ids, qformer_attention_mask) -> np.ndarray:
        return self.qformer(image_embeds=image_embeds, qformer_input_ids=qformer_input_ids,
                            qformer_attention_mask=qformer_attention_mask)["query_embeds"]

    # --- end to end -----------------------------------------------------------------------
    def run(self, image=None, prompt: str | None = None, *, video=None, max_new_tokens: int = 32,
            num_beams: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
            on_text=None, min_new_tokens: int = 0) -> Result:
        """``image`` for an image bundle; ``video`` (its frame count of frames, or a video file)
        for a video bundle, whose ``image`` may also be a video file.
        ``min_new_tokens``: EOS suppressed before that many tokens (the benchmark's fixed length)."""
        t = {}
        t0 = time.perf_counter()
        frames = self.manifest.frames
        if video is not None and image is not None:
            raise InputError("give an image or a video, not both")
        if frames is not None and video is None:
            if image is None or not isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
                raise InputError(f"this bundle is a video model: it takes {frames} frames (video=[...]) or a video "
                                 "file, not one image")
            image, video = None, image
        if image is None and video is None:
            raise InputError("no image given")
        enc = self.prompts.encode(prompt, max_new_tokens, frames=frames if video is not None else None)
        pv = self.pixel_values([image]) if video is None else self.video_pixel_values(video)
        t1 = time.perf_counter()
        img = self.image_embeds(pv)
        t2 = time.perf_counter()
        n = pv.shape[0]  # frames: each its own Q-Former pass with the same instruction (repeat_interleave)
        q = self.query_embeds(img, np.repeat(enc["qformer_input_ids"], n, axis=0),
                              np.repeat(enc["qformer_attention_mask"], n, axis=0))
        q = q.reshape(1, n * q.shape[1], q.shape[2])  # [1, F*Q, D] in frame order, as the model reshapes
        t3 = time.perf_counter()
        llm = self.llm
        t4 = time.perf_counter()
        gen = llm.generate(q, enc["input_ids"], enc["attention_mask"], decode=self.prompts.decode,
                           max_new_tokens=max_new_tokens, num_beams=num_beams, temperature=temperature,
                           top_p=top_p, seed=seed, on_text=on_text, min_new_tokens=min_new_tokens)
        t5 = time.perf_counter()
        ids = gen.token_ids
        t = {"preprocess": (t1 - t0) * 1e3, "vision": (t2 - t1) * 1e3, "qformer": (t3 - t2) * 1e3,
             "llm_prefill": gen.timings_ms["prefill"], "llm_decode": gen.timings_ms["decode"],
             "total": (t5 - t0 - (t4 - t3)) * 1e3}
        return Result(self.prompts.decode(ids), ids, t)

    def generate(self, image=None, prompt: str | None = None, **options) -> str:
        """image: a path or a PIL image; video=[frames] (or a video file) for a video bundle.
        Options: max_new_tokens, num_beams, temperature, top_p, seed."""
        return self.run(image, prompt, **options).answer
