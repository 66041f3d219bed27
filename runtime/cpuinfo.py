"""What this CPU is, as the speed choices need it (torch-free): its model string and the ISA flags
that decide which kernels are fast (AVX-512 VNNI/BF16 on AMD Zen 4, AMX on Intel Xeon)."""
from __future__ import annotations

import platform
from pathlib import Path

# the flags that change which int4/int8/bf16 kernel wins (Linux /proc/cpuinfo names)
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "bf16", "sve")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model(text: str | None = None) -> str:
    """The CPU's model string (/proc/cpuinfo "model name"; the platform's name elsewhere)."""
    for line in (_cpuinfo() if text is None else text).splitlines():
        if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags(text: str | None = None) -> frozenset[str]:
    """The first CPU's flags (x86 "flags", ARM "Features")."""
    for line in (_cpuinfo() if text is None else text).splitlines():
        if line.lower().startswith(("flags", "features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_string(text: str | None = None) -> str:
    """Model + the kernel-relevant flags, e.g. "AMD EPYC | avx2 avx512_bf16 avx512_vnni ...": two
    machines with the same string run the same kernels at the same relative speed (a VM that hides
    AMX from its guest has another string than the host)."""
    flags = cpu_flags(text)
    return f"{cpu_model(text)} | {' '.join(f for f in KERNEL_FLAGS if f in flags) or 'no listed flags'}"


def bf16_flag(text: str | None = None) -> str | None:
    """The flag that gives this CPU native bf16 matrix math (None: bf16 is emulated, slow)."""
    flags = cpu_flags(text)
    return next((f for f in BF16_FLAGS if f in flags), None)
