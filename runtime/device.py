"""Where the fast-path LLM runs: the ``--llm-engine``/``--device`` choice and whether a usable CUDA
GPU is present, without importing torch on a machine that has no NVIDIA device (the cuda
engine itself is ``cudallm``)."""
from __future__ import annotations

import importlib.util
import os

from .errors import InputError
from .formats import CPU_ENGINES

MIN_CAPABILITY = (8, 0)       # int4mm.cu: __CUDA_ARCH__ >= 800
DEVICES = ("cuda", "cpu")
# a CUDA driver creates /dev/nvidiactl (desktop/server GPUs); Jetson's L4T /dev/nvhost-ctrl-gpu
# (JetPack <= 5) or /dev/nvgpu/ (JetPack 6); WSL2 exposes the GPU as /dev/dxg
NVIDIA_NODES = ("/dev/nvidiactl", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu", "/dev/dxg")


def cuda_unavailable_reason() -> str | None:
    """Why the cuda engine cannot run here (None when it can). Without an NVIDIA device node
    (``NVIDIA_NODES``) or without torch, no
    CUDA GPU is usable and torch is not imported (its import is ~2 s of a cold ``ib-run``)."""
    if not any(os.path.exists(p) for p in NVIDIA_NODES):
        return "no CUDA GPU (no NVIDIA device node: " + ", ".join(NVIDIA_NODES) + ")"
    if importlib.util.find_spec("torch") is None:
        return "no CUDA GPU usable (torch is not installed)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    cap = torch.cuda.get_device_capability(0)
    if cap < MIN_CAPABILITY:
        return (f"GPU {torch.cuda.get_device_name(0)} has compute capability {cap[0]}.{cap[1]}; torch's int4 "
                f"kernel needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer")
    return None


def resolve_llm_engine(engine: str | None, device: str | None, unavailable: str | None = "probe") -> str | None:
    """The fast-path engine for ``--llm-engine`` and ``--device``: "cuda", a CPU engine ("ort",
    "torch") or None (engines.pick_engine chooses among the CPU engines). Default device: cuda
    when usable, else the CPU. ``unavailable`` is ``cuda_unavailable_reason()``'s answer
    (probed when left at "probe"; tests pass it). Contradictions and a missing GPU raise
    InputError naming the fix."""
    ENGINES = CPU_ENGINES
    if device is not None and device not in DEVICES:
        raise InputError(f"--device must be cuda or cpu, not {device!r}")
    if engine is not None and engine not in ENGINES + ("cuda",):
        raise InputError(f"--llm-engine must be one of {', '.join(ENGINES + ('cuda',))}, not {engine!r}")
    if device == "cpu":
        if engine == "cuda":
            raise InputError("--llm-engine cuda runs on the GPU; drop --device cpu or pick ort/torch")
        return engine
    if engine in ENGINES:
        if device == "cuda":
            raise InputError(f"--llm-engine {engine} runs on the CPU; with --device cuda use --llm-engine cuda "
                             f"or leave it out")
        return engine
    if unavailable == "probe":
        unavailable = cuda_unavailable_reason()
    if unavailable is None:
        return "cuda"
    if device == "cuda" or engine == "cuda":
        raise InputError(f"{'--device cuda' if device == 'cuda' else '--llm-engine cuda'}: {unavailable}",
                         hint="use --device cpu")
    return None   # default device, no usable GPU: the CPU engines
