"""Which engine runs a fast-path Llama, with the reasons, and loading one from a bundle directory.

Two engines behind ``decode.DecoderEngine``: "ort" (``ortllm.OrtLlama``: the whole decoder step
as one ONNX Runtime graph, MatMulNBits) and "torch" (``llama.FastLlama``: our forward, torch's
int4 kernel). Weights come from transformers' ``config.json`` + safetensors, plain float or the
``runtime.int4`` format, read as numpy arrays (``safetensors_io``): the ort engine runs on them
without importing torch; the torch and cuda engines wrap them as torch tensors (no copy).
"""
from __future__ import annotations

from pathlib import Path

from .decode import DecoderEngine
from .errors import InputError
from .formats import CPU_ENGINES, INT4_FORMAT, INT4_FORMAT_VERSION
from .kernel_choice import DEFAULT_ENGINE, ENGINE_DEFAULT_KERNEL, KERNELS, choose, pick_engine  # noqa: F401
from .llama_spec import LlamaArgs, ModelSpec, check_shapes, collect
from .ortllm import OrtLlama
from .safetensors_io import read_config, read_tensors

ENGINES = CPU_ENGINES


def assemble(a: LlamaArgs, tensors: dict, group_size: int | None, engine: str | None = None,
             threads: int | None = None) -> DecoderEngine:
    """The model on one engine: "torch" (FastLlama: our forward, torch's int4 kernel), "ort"
    (ortllm.OrtLlama: the whole step as one ONNX Runtime graph with MatMulNBits), a kernel of
    ``kernel_choice.KERNELS`` ("ort-int8", "ort-fp32", "torch"), or None: the kernel measured
    fastest on this CPU (``kernel_choice.choose``: cached, or the rule). ``model.engine`` and
    ``model.kernel`` say which; ``model.kernel_choice`` why (engine None). ``tensors``: numpy
    arrays or torch tensors; torch is imported only for the torch and cuda engines (and to
    measure the torch kernel once, where torch is installed)."""
    if engine is not None and engine not in ENGINES + ("cuda",) and engine not in KERNELS:
        raise InputError(f"LLM engine {engine!r} is not one of {', '.join(ENGINES)} (kernels: {', '.join(KERNELS)})")
    spec = collect(a, tensors, group_size)
    if engine == "cuda":  # the GPU engine (runtime/cudallm.py)
        from .cudallm import CudaLlama
        from .llama import torch_spec

        _torch_threads(threads)
        return CudaLlama(a, torch_spec(spec))
    threads = threads or default_threads()

    def build(kernel: str) -> DecoderEngine:
        eng, level = KERNELS[kernel]
        if eng == "ort":
            return OrtLlama(a, spec, threads, level)
        _torch_threads(threads)
        from .llama import build_torch

        return build_torch(a, spec)

    if engine is not None:
        return build(ENGINE_DEFAULT_KERNEL.get(engine, engine))
    model, record = choose(a, spec, threads, build)
    model.kernel_choice = record
    return model


def default_threads() -> int:
    """The engines' thread count when none is given: one per core this process may run on (the
    cache key of ``kernel_choice`` needs a number; ONNX Runtime and torch default to the same)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _torch_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def load(model_dir: str | Path, engine: str | None = None, threads: int | None = None,
         files: list[Path] | None = None) -> DecoderEngine:
    """The LLM from ``config.json`` + safetensors (float weights or ib-edge int4) on ``engine``
    (None: ``pick_engine``'s choice). ``files``: the safetensors to read (a bundle passes what its
    manifest lists); None reads every ``*.safetensors`` in the directory (export-time use on a
    directory the exporter just wrote)."""
    a = LlamaArgs.from_config(read_config(model_dir))
    tensors, group_size = read_tensors(model_dir, INT4_FORMAT, INT4_FORMAT_VERSION, required=False,
                                       strip_prefix="language_model.", files=files, framework="np")
    check_shapes(a, tensors)
    return assemble(a, tensors, group_size, engine, threads)
