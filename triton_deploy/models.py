"""The Python-backend models Triton runs (each repository's ``model.py`` imports one).

    vision, qformer   the bundle's ONNX graph on ONNX Runtime, as ``ib-run`` opens it
                      (``make_stage``); a dynamic batch of requests is run as one batch
    llm               the project's LLM runtime: query embeddings + prompt ids -> token ids
    instructblip      BLS: image bytes + prompt (+ generation parameters) -> text; preprocesses
                      as ``ib-run`` does, then calls vision, qformer and llm through Triton

Only ``ib_edge.runtime`` is imported (this runs in the backend's stub, in an environment with
numpy < 2 and no export tools). ``triton_python_backend_utils`` exists only inside the stub.
Every failure becomes that request's Triton error (INVALID_ARG for bad input), never a crash
of the model.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

from ib_edge.runtime.errors import IbEdgeError, InputError
from ib_edge.runtime.manifest import Manifest

from .spec import GENERATION_INPUTS, Generation


def _pb():
    import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend stub

    return pb_utils


def _version_dir(args: dict) -> Path:
    return Path(args["model_repository"]) / args["model_version"]


def _parameters(args: dict) -> dict[str, str]:
    cfg = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}


def _threads(params: dict) -> int | None:
    return int(params.get("threads") or 0) or None


def describe(e: BaseException) -> str:
    """One line for an exception and its causes (libraries such as transformers hide the real
    import error in ``__cause__``; Triton's log shows only the message)."""
    parts = []
    while e is not None and len(parts) < 4:
        parts.append(e.line() if isinstance(e, IbEdgeError) else f"{type(e).__name__}: {e}")
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    return " <- ".join(p.replace("\n", " ") for p in parts)


def _error(pb, e: BaseException):
    code = pb.TritonError.INVALID_ARG if isinstance(e, InputError) else pb.TritonError.INTERNAL
    msg = e.line() if isinstance(e, IbEdgeError) else f"internal error: {describe(e)}"
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(msg, code))


class _Model:
    """initialize() turns any failure into one ModelLoadError line with its causes."""

    def initialize(self, args):
        try:
            self.setup(args)
        except Exception as e:
            raise ModelLoadError(f"{args.get('model_name')}: {describe(e)}") from None

    def setup(self, args):
        raise NotImplementedError


class ModelLoadError(IbEdgeError):
    pass


def _load_manifest(args: dict, artifacts: list[str]) -> Manifest:
    manifest = Manifest.load(_version_dir(args))
    manifest.verify(artifacts)
    return manifest


def generation_params(pb, request, rows: int) -> list[Generation]:
    """The optional generation inputs of one request ([rows, 1] or [1, 1] each; absent: ib-run's
    defaults), one checked ``Generation`` per row."""
    cols: dict[str, np.ndarray] = {}
    for name in GENERATION_INPUTS:
        t = pb.get_input_tensor_by_name(request, name)
        if t is not None:
            v = t.as_numpy().reshape(-1)
            if len(v) not in (1, rows):
                raise InputError(f"{name} has {len(v)} values for {rows} prompts")
            cols[name] = v
    out = []
    for i in range(rows):
        kw = {n: v[i if len(v) > 1 else 0].item() for n, v in cols.items()}
        out.append(Generation(**kw).check())
    return out


def make_llm(manifest: Manifest, threads: int | None = None, llm_engine: str | None = None):
    """The LLM runner the manifest asks for: the same choice as ``Pipeline.llm`` (tested), without
    opening the vision and Q-Former sessions a Pipeline holds."""
    if manifest.artifact("llm").get("backend") == "fastllm":
        from ib_edge.runtime.llm import FastLLM

        return FastLLM(manifest, threads, llm_engine)
    from ib_edge.runtime.llm import TransformersLLM

    return TransformersLLM(manifest, threads)


def decode_image(data: bytes):
    """Encoded image bytes -> RGB PIL image: ``preprocess.load_image`` on bytes (the same limits,
    errors and EXIF handling as ib-run)."""
    from ib_edge.runtime.preprocess import load_image

    if not data:
        raise InputError("image is empty (0 bytes)")
    return load_image(bytes(data))


def _text(value, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{name} is not UTF-8 text") from None
    return str(value)


# --- vision, qformer ---------------------------------------------------------------------
class _GraphModel(_Model):
    stage = ""

    def setup(self, args):
        from ib_edge.runtime.pipeline import make_stage

        self.pb = _pb()
        manifest = _load_manifest(args, [self.stage])
        self.run = make_stage(manifest, self.stage, threads=_threads(_parameters(args)))
        self.inputs, self.outputs = list(self.run.input_names), list(self.run.output_names)

    def execute(self, requests):
        pb = self.pb
        responses = [None] * len(requests)
        feeds, groups = [], {}
        for i, r in enumerate(requests):
            f = {n: pb.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs}
            feeds.append(f)
            # requests batch together when their non-batch dims agree (the Q-Former's text length)
            groups.setdefault(tuple(f[n].shape[1:] for n in self.inputs), []).append(i)
        for idx in groups.values():
            try:
                out = self.run(**{n: np.concatenate([feeds[i][n] for i in idx]) for n in self.inputs})
            except Exception as e:  # that batch's requests get the error; the model stays up
                for i in idx:
                    responses[i] = _error(pb, e)
                continue
            start = 0
            for i in idx:
                b = feeds[i][self.inputs[0]].shape[0]
                responses[i] = pb.InferenceResponse(
                    [pb.Tensor(n, np.ascontiguousarray(out[n][start:start + b])) for n in self.outputs])
                start += b
        return responses


class VisionModel(_GraphModel):
    stage = "vision"


class QFormerModel(_GraphModel):
    stage = "qformer"


# --- llm ---------------------------------------------------------------------------------
def _no_text(ids) -> str:  # nothing streams here; the BLS model decodes the ids
    return ""


class LLMModel(_Model):
    def setup(self, args):
        self.pb = _pb()
        params = _parameters(args)
        manifest = _load_manifest(args, ["llm"])
        self.llm = make_llm(manifest, _threads(params), params.get("llm_engine") or None)

    def execute(self, requests):
        pb = self.pb
        responses = []
        for r in requests:
            try:
                q, ids, mask = (pb.get_input_tensor_by_name(r, n).as_numpy()
                                for n in ("query_embeds", "input_ids", "attention_mask"))
                gen = generation_params(pb, r, 1)[0]
                tokens = self.llm.generate(q, ids, mask, decode=_no_text, **gen.as_kwargs()).token_ids
                responses.append(pb.InferenceResponse([pb.Tensor("token_ids", np.asarray(tokens, np.int64))]))
            except Exception as e:
                responses.append(_error(pb, e))
        return responses


# --- instructblip (BLS) ------------------------------------------------------------------
class StageError(IbEdgeError):
    """A model called through Triton answered with an error."""


class InstructBlipModel(_Model):
    def setup(self, args):
        from ib_edge.runtime.preprocess import PromptEncoder

        self.pb = _pb()
        params = _parameters(args)
        manifest = _load_manifest(args, ["processor"])
        tok = manifest.data["tokenizers"]
        self.prompts = PromptEncoder(manifest.path(tok["llm"]), manifest.path(tok["qformer"]), manifest.model)
        self.preprocess = manifest.preprocess
        self.vision, self.qformer, self.llm = (params[k] for k in ("vision_model", "qformer_model", "llm_model"))

    async def execute(self, requests):
        return list(await asyncio.gather(*(self._request(r) for r in requests)))

    async def _request(self, r):
        pb = self.pb
        try:
            images = pb.get_input_tensor_by_name(r, "image").as_numpy().reshape(-1)
            prompts = pb.get_input_tensor_by_name(r, "prompt").as_numpy().reshape(-1)
            if len(images) != len(prompts):
                raise InputError(f"{len(images)} images but {len(prompts)} prompts")
            gens = generation_params(pb, r, len(images))
            texts = await asyncio.gather(*(self._answer(images[i], prompts[i], gens[i]) for i in range(len(images))))
            return pb.InferenceResponse([pb.Tensor("text", np.array([[t.encode("utf-8")] for t in texts],
                                                                    dtype=np.object_))])
        except Exception as e:
            return _error(pb, e)

    async def _answer(self, image, prompt, gen: Generation) -> str:
        from ib_edge.runtime.preprocess import pixel_values

        if not isinstance(image, bytes):
            raise InputError("image must be the encoded file's bytes (PNG, JPEG, ...)")
        enc = self.prompts.encode(_text(prompt, "prompt"), gen.max_new_tokens)
        pv = pixel_values([decode_image(image)], self.preprocess)
        img = await self._call(self.vision, {"pixel_values": pv}, "image_embeds")
        q = await self._call(self.qformer, {"image_embeds": img, "qformer_input_ids": enc["qformer_input_ids"],
                                            "qformer_attention_mask": enc["qformer_attention_mask"]}, "query_embeds")
        feeds = {"query_embeds": q, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        for name, value in gen.as_kwargs().items():
            if value is not None:
                feeds[name] = np.asarray([value], GENERATION_INPUTS[name][1])
        ids = await self._call(self.llm, feeds, "token_ids")
        return self.prompts.decode(ids.tolist())

    async def _call(self, model: str, inputs: dict, output: str) -> np.ndarray:
        pb = self.pb
        req = pb.InferenceRequest(model_name=model, requested_output_names=[output],
                                  inputs=[pb.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()])
        resp = await req.async_exec()
        if resp.has_error():
            err = resp.error()
            cls = InputError if err.code() == pb.TritonError.INVALID_ARG else StageError
            raise cls(f"{model}: {err.message()}")
        return pb.get_output_tensor_by_name(resp, output).as_numpy()
