"""Which engine runs a fast-path Llama, with the reasons, and loading one from a bundle directory.

Two engines behind ``decode.DecoderEngine``: "ort" (``ortllm.OrtLlama``: the whole decoder step
as one ONNX Runtime graph, MatMulNBits) and "torch" (``llama.FastLlama``: our forward, torch's
int4 kernel). Weights come from transformers' ``config.json`` + safetensors, plain float or the
``runtime.int4`` format.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .decode import DecoderEngine
from .errors import InputError
from .formats import CPU_ENGINES, INT4_FORMAT, INT4_FORMAT_VERSION
from .int4 import read_config, read_tensors
from .llama import LlamaArgs, ModelSpec, build_torch, check_shapes, collect
from .kernel_choice import DEFAULT_ENGINE, ENGINE_DEFAULT_KERNEL, KERNELS, choose, pick_engine  # noqa: F401
from .ortllm import OrtLlama

ENGINES = CPU_ENGINES


def assemble(a: LlamaArgs, tensors: dict[str, torch.Tensor], group_size: int | None, engine: str | None = None,
             threads: int | None = None) -> DecoderEngine:
    """The model on one engine: "torch" (FastLlama: our forward, torch's int4 kernel), "ort"
    (ortllm.OrtLlama: the whole step as one ONNX Runtime graph with MatMulNBits, int8
    activations), a kernel of ``kernel_choice.KERNELS`` ("ort-int8", "ort-fp32", "torch"), or
    None: the kernel measured fastest on this CPU (``kernel_choice.choose``: cached, or the rule).
    ``model.engine`` and ``model.kernel`` say which; ``model.kernel_choice`` why (engine None)."""
    if engine == "cuda":  # the GPU engine (runtime/cudallm.py)
        from .cudallm import CudaLlama

        return CudaLlama(a, collect(a, tensors, group_size))
    if engine is not None and engine not in ENGINES and engine not in KERNELS:
        raise InputError(f"LLM engine {engine!r} is not one of {', '.join(ENGINES)} (kernels: {', '.join(KERNELS)})")
    spec = collect(a, tensors, group_size)
    threads = threads or torch.get_num_threads()

    def build(kernel: str) -> DecoderEngine:
        eng, level = KERNELS[kernel]
        return OrtLlama(a, spec, threads, level) if eng == "ort" else build_torch(a, spec)

    if engine is not None:
        return build(ENGINE_DEFAULT_KERNEL.get(engine, engine))
    model, record = choose(a, spec, threads, build)
    model.kernel_choice = record
    return model


def load(model_dir: str | Path, engine: str | None = None, threads: int | None = None,
         files: list[Path] | None = None) -> DecoderEngine:
    """The LLM from ``config.json`` + safetensors (float weights or ib-edge int4) on ``engine``
    (None: ``pick_engine``'s choice). ``files``: the safetensors to read (a bundle passes what its
    manifest lists); None reads every ``*.safetensors`` in the directory (export-time use on a
    directory the exporter just wrote)."""
    a = LlamaArgs.from_config(read_config(model_dir))
    tensors, group_size = read_tensors(model_dir, INT4_FORMAT, INT4_FORMAT_VERSION, required=False,
                                       strip_prefix="language_model.", files=files)
    check_shapes(a, tensors)
    return assemble(a, tensors, group_size, engine, threads)
