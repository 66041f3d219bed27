"""ib-edge's own int4 x int8 matmul (``native/q4x8.c``) for the ort LLM engine: where it runs, its
weight layout, and the compiled library.

The kernel is an ONNX Runtime custom op (domain ``ib_edge``, op ``MatMulQ4x8``) doing what
``MatMulNBits`` does at ``accuracy_level`` 4 (int8 activations per 128-value block, int4 weights
with a scale and a zero point per block, fp32 accumulation) with the weights laid out as one
sequential stream per thread (README "A faster int4 decode kernel"). It is the ``ort-q4x8``
candidate of ``kernel_choice``: measured against ``ort-int8`` on each machine, used where faster.

Where it can run: x86-64 with AVX-512 F/BW/VL and VNNI (Intel Ice Lake / Sapphire Rapids and
later, AMD Zen 4 and later), int4 group sizes that are multiples of 128, and a C compiler on the
first use (or a prebuilt library named by ``IB_EDGE_Q4X8_LIB``, e.g. from ``cmake`` with the
repository's CMakeLists.txt). The library is compiled once into ``$IB_EDGE_HOME/native/`` (keyed by
the source and compiler), never into the working directory; ``why_not()`` says what is missing.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .cpuinfo import cpu_flags
from .paths import cache_home

DOMAIN, OP = "ib_edge", "MatMulQ4x8"
ROWS = 8                    # weight rows per interleaved group (RR in q4x8.c)
BLOCK = 128                 # values per quantization block (QB)
ENV = "IB_EDGE_Q4X8_LIB"
NEEDS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
SOURCES = ("q4x8.c", "ort_abi.h")
CFLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden",
          "-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
_built: dict[str, Path | str] = {}


def source_dir() -> Path:
    return Path(__file__).resolve().parent / "native"


def cpu_why_not(flags: frozenset[str] | None = None, machine: str | None = None) -> str | None:
    """Why this CPU cannot run the kernel (None: it can)."""
    machine = machine or platform.machine()
    if machine.lower() not in ("x86_64", "amd64"):
        return f"the q4x8 kernel is x86-64 only (this machine: {machine})"
    flags = cpu_flags() if flags is None else flags
    missing = [f for f in NEEDS if f not in flags]
    return f"this CPU lacks {', '.join(missing)} (the q4x8 kernel needs AVX-512 with VNNI)" if missing else None


def layout_why_not(group_sizes) -> str | None:
    """Why int4 linears of these group sizes cannot use the kernel (None: they can)."""
    bad = sorted({g for g in group_sizes if g % BLOCK})
    return f"int4 group size {bad[0]} is not a multiple of {BLOCK} (the q4x8 kernel's block)" if bad else None


NO_COMPILER = f"no C compiler found (set CC, or build the library with cmake and set {ENV} to it)"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _prebuilt() -> Path | None:
    """The library named by ``IB_EDGE_Q4X8_LIB`` (None: unset); RuntimeError when it is missing."""
    prebuilt = os.environ.get(ENV)
    if prebuilt and not Path(prebuilt).is_file():
        raise RuntimeError(f"{ENV}={prebuilt}: no such file")
    return Path(prebuilt) if prebuilt else None


def _build(out: Path) -> None:
    """Compile the library to ``out`` (atomically: a temp file renamed into place)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError(NO_COMPILER)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *CFLAGS, str(source_dir() / "q4x8.c"), "-o", tmp],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            msg = next((l for l in lines if "error" in l.lower()), lines[0] if lines else f"exit {proc.returncode}")
            raise RuntimeError(f"{Path(cc).name} failed to compile q4x8.c: {msg.strip()}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)   # mkstemp made it 0600: others sharing IB_EDGE_HOME load it too
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def source_key() -> str:
    """A hash of the kernel's source and flags (part of kernel_choice's cache key)."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((source_dir() / name).read_bytes())
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()[:16]


def _library_key() -> str:
    h = hashlib.sha256(source_key().encode())
    cc = _compiler()
    if cc:
        try:
            h.update(subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout)
        except (OSError, subprocess.SubprocessError):
            pass
    return h.hexdigest()[:16]


def library() -> Path:
    """The compiled op library (built once per source and compiler); raises RuntimeError with the
    reason when it cannot be had."""
    why = cpu_why_not()
    if why:
        raise RuntimeError(why)
    prebuilt = _prebuilt()
    if prebuilt:
        return prebuilt
    if "lib" not in _built:
        path = cache_home() / "native" / f"libib_q4x8-{_library_key()}.so"
        try:
            if not path.is_file():
                _build(path)
            _built["lib"] = path
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            _built["lib"] = str(e).splitlines()[0] if str(e) else type(e).__name__
    got = _built["lib"]
    if isinstance(got, str):
        raise RuntimeError(got)
    return got


def why_not(group_sizes=(), build: bool = True) -> str | None:
    """Why the kernel is not available here for linears of ``group_sizes`` (None: it is).
    ``build=False``: without compiling (a library already built or named by ``IB_EDGE_Q4X8_LIB``,
    or a C compiler to build it with, is enough), for listing candidates cheaply."""
    why = cpu_why_not() or layout_why_not(group_sizes)
    if why:
        return why
    try:
        if build:
            library()
        elif not _prebuilt():
            got = _built.get("lib")
            if isinstance(got, str):   # an earlier build failed in this process
                return got
            if got is None and _compiler() is None:
                return NO_COMPILER
    except RuntimeError as e:
        return str(e)
    return None


def pack(qweight, scales, qzeros, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """The portable int4 (qweight uint8 [N, K/2], low nibble = even k; scales [N, K/G]; qzeros
    uint8 [N, K/G]) -> the kernel's W uint8 [G8, K/128, 8, 64], S float32 [G8, K/128, 8], Z uint8
    [G8, K/128, 8] (G8 = ceil(N / 8); padding rows have scale 0), and N, K."""
    qweight, qzeros = np.asarray(qweight, np.uint8), np.asarray(qzeros, np.uint8)
    scales = np.asarray(scales, np.float32)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if group % BLOCK or k % group:
        raise ValueError(f"q4x8 needs a group size that is a multiple of {BLOCK} dividing K (group {group}, K {k})")
    if scales.shape != (n, k // group) or qzeros.shape != (n, k // group):
        raise ValueError(f"scales {scales.shape} / zero points {qzeros.shape}: expected ({n}, {k // group})")
    nb, rep, g8 = k // BLOCK, group // BLOCK, -(-n // ROWS)
    pad = g8 * ROWS - n
    w = qweight.reshape(n, nb, BLOCK // 2)
    s = np.repeat(scales, rep, axis=1)
    z = np.repeat(qzeros, rep, axis=1)
    if pad:
        w = np.concatenate([w, np.zeros((pad, nb, BLOCK // 2), np.uint8)])
        s = np.concatenate([s, np.zeros((pad, nb), np.float32)])
        z = np.concatenate([z, np.zeros((pad, nb), np.uint8)])
    w = np.ascontiguousarray(w.reshape(g8, ROWS, nb, BLOCK // 2).transpose(0, 2, 1, 3))
    s = np.ascontiguousarray(s.reshape(g8, ROWS, nb).transpose(0, 2, 1))
    z = np.ascontiguousarray(z.reshape(g8, ROWS, nb).transpose(0, 2, 1))
    return w, s, z, n, k


def matmul(a: np.ndarray, packed) -> np.ndarray:
    """a [M, K] float32 @ the packed weights -> [M, N], on the calling thread, outside ONNX
    Runtime (tests and benchmarks; the engine runs the op inside its graph)."""
    w, s, z, n, k = packed
    a = np.ascontiguousarray(a, dtype=np.float32).reshape(-1, k)
    lib = ctypes.CDLL(str(library()))
    y = np.empty((a.shape[0], n), np.float32)
    p = ctypes.c_void_p
    rc = lib.ib_q4x8_matmul(a.ctypes.data_as(p), ctypes.c_int64(a.shape[0]), ctypes.c_int64(k), ctypes.c_int64(n),
                            w.ctypes.data_as(p), s.ctypes.data_as(p), z.ctypes.data_as(p), y.ctypes.data_as(p))
    if rc:
        raise RuntimeError(f"ib_q4x8_matmul failed ({rc})")
    return y
