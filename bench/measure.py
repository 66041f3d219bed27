"""Measurements the benchmark is made of: latency statistics, peak memory, artifact sizes,
memory bandwidth, the decode bandwidth bound and a description of the machine.

Model-agnostic and dependency-light (numpy, /proc, the standard library); torch is imported
only inside the functions that describe or measure it.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.metadata as md
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

PERCENTILES = (50, 90, 99)


# --- latency -----------------------------------------------------------------------------
def latency_stats(samples_ms) -> dict:
    """p50/p90/p99, mean, min, max of one stage's samples (ms). Percentiles interpolate
    linearly (numpy's default): with 10 runs p99 sits between the two slowest."""
    x = np.asarray([s for s in samples_ms if s is not None], dtype=np.float64)
    if x.size == 0:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None, "min": None, "max": None}
    p = np.percentile(x, PERCENTILES)
    return {"n": int(x.size), "p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2]),
            "mean": float(x.mean()), "min": float(x.min()), "max": float(x.max())}


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    """(result, milliseconds)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t0) * 1e3


# --- memory ------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float | None:
    """The process's peak resident set (VmHWM), else ru_maxrss (Linux reports kB)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs), so the
    next peak belongs to what runs after. False where the kernel refuses: then the peak is the
    whole process's so far."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak RSS (and GPU memory where torch sees CUDA) over a block of work.

        with PeakMemory() as mem: ...
        mem.record() -> {"rss_before_mb", "peak_rss_mb", "peak_added_mb", "peak_is_process_wide", "gpu"}
    """

    def __enter__(self):
        self.reset = reset_peak_rss()
        self.before = rss_mb()
        self.gpu = _gpu_peak_start()
        return self

    def __exit__(self, *exc):
        self.peak = peak_rss_mb()
        self.gpu_peak = _gpu_peak_end(self.gpu)
        return False

    def record(self) -> dict:
        added = None if self.peak is None or self.before is None else max(0.0, self.peak - self.before)
        return {"rss_before_mb": _r(self.before), "peak_rss_mb": _r(self.peak), "peak_added_mb": _r(added),
                "peak_is_process_wide": not self.reset, "gpu": self.gpu_peak}


def _r(v, nd=1):
    return None if v is None else round(float(v), nd)


def _gpu_peak_start():
    if "torch" not in __import__("sys").modules:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    return True


def _gpu_peak_end(started) -> dict:
    if not started:
        return {"measured": False, "reason": "no CUDA device in this process (CPU run)"}
    import torch

    return {"measured": True, "peak_allocated_mb": _r(torch.cuda.max_memory_allocated() / 2**20),
            "note": "torch's allocator only; ONNX Runtime's CUDA arena is not included"}


# --- artifacts ---------------------------------------------------------------------------
def artifact_sizes(manifest) -> dict:
    """Bytes on disk per manifest artifact (every listed file, external data included)."""
    out, total = {}, 0
    for name, art in manifest.data["artifacts"].items():
        size = sum(manifest.path(rel).stat().st_size for rel in art.get("files", {}))
        out[name] = {"bytes": size, "mb": round(size / 2**20, 3), "precision": art.get("precision")}
        total += size
    out["total"] = {"bytes": total, "mb": round(total / 2**20, 3)}
    return out


def llm_weight_bytes(model) -> dict:
    """Bytes of LLM weights read to produce one token: every parameter except the input
    embedding table (a lookup reads one row), unless that table is tied to the output head."""
    if hasattr(model, "weight_bytes_per_token"):  # the fast int4 runtime counts its packed weights
        per_token = int(model.weight_bytes_per_token())
        return {"total_bytes": per_token, "per_token_bytes": per_token, "tied_embeddings": False,
                "dtype": "int4+fp32"}
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    per_token = total if tied else total - emb.numel() * emb.element_size()
    return {"total_bytes": int(total), "per_token_bytes": int(per_token), "tied_embeddings": bool(tied),
            "dtype": str(emb.dtype).replace("torch.", "")}


# --- bandwidth ---------------------------------------------------------------------------
def memory_bandwidth(size_mb: int = 256, repeats: int = 5, threads: int | None = None) -> dict:
    """Streaming read rates, the denominator of the decode bound (decode reads every weight once
    per token and writes almost nothing), on ``threads`` threads (default: torch's current count,
    as the LLM runs), best of ``repeats`` over ``size_mb`` of float32, each probe in GB/s:

    * ``torch.sum``: a reduction, bytes read;
    * ``torch copy``: ``dst.copy_(src)``, bytes read + written;
    * ``numpy copy``: ``np.copyto`` on one core, bytes read + written;
    * ``fp32 GEMV``: ``torch.mv`` of a ``size_mb`` matrix by a vector, matrix bytes read.

    No single probe reads the memory system's ceiling on every CPU (torch.sum on 2 threads read
    21.6 GB/s on a Xeon whose fp32 decode streamed more), so ``gb_per_s`` is the best of them,
    ``set_by`` names which; ``streaming_bound`` then raises it to any system's own effective
    rate in the same run, so no system reads above 100% of the bound."""
    import torch

    n = max(1, size_mb * 2**20 // 4)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    probes: dict[str, dict] = {}
    try:
        x = torch.ones(n, dtype=torch.float32)
        x.sum()  # pages faulted in, threads spun up
        t = best_time(lambda: x.sum(), repeats)
        probes["torch.sum"] = {"gb_per_s": round(n * 4 / t / 1e9, 3), "bytes": "read"}
        half = x[: n // 2]
        dst = torch.empty_like(half)
        dst.copy_(half)
        t = best_time(lambda: dst.copy_(half), repeats)
        probes["torch copy"] = {"gb_per_s": round(2 * half.numel() * 4 / t / 1e9, 3), "bytes": "read + written"}
        del half, dst
        cols = 4096
        m = x[: (n // cols) * cols].view(-1, cols)
        v = torch.ones(cols, dtype=torch.float32)
        torch.mv(m, v)
        t = best_time(lambda: torch.mv(m, v), repeats)
        probes["fp32 GEMV"] = {"gb_per_s": round(m.numel() * 4 / t / 1e9, 3), "bytes": "matrix read"}
        del m, v, x
    finally:
        torch.set_num_threads(before)
    src = np.ones(n // 2, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    copy = best_time(lambda: np.copyto(dst, src), repeats)
    probes["numpy copy"] = {"gb_per_s": round(2 * src.nbytes / copy / 1e9, 3), "bytes": "read + written, one core"}
    del src, dst
    best = max(probes, key=lambda k: probes[k]["gb_per_s"])
    return {"gb_per_s": probes[best]["gb_per_s"], "set_by": best, "probes": probes,
            "array_mb": size_mb, "repeats": repeats, "threads": threads or before,
            "method": "best of the streaming probes (torch.sum, torch copy, numpy copy, fp32 GEMV), best of repeats",
            "copy_gb_per_s": probes["numpy copy"]["gb_per_s"],
            "copy_method": "numpy copyto on one core, bytes read + written"}


def streaming_bound(probes: dict[str, float], effective: dict[str, float | None]) -> tuple[float, str]:
    """The read-bandwidth bound of one run: the best streaming rate measured in it, over the
    probes (name -> GB/s) and every system's own effective rate (name -> weight bytes per token
    x tokens/s, GB/s; None where not measured). -> (GB/s, what set it)."""
    cands = {f"probe {k}": float(v) for k, v in probes.items() if v}
    cands.update({f"{k} (its own effective rate)": float(v) for k, v in effective.items() if v})
    if not cands:
        raise ValueError("no streaming rate measured: cannot state a bandwidth bound")
    best = max(cands, key=cands.get)
    return cands[best], best


def best_time(fn, repeats: int, warmup: int = 0) -> float:
    """Fastest of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, seconds."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def decode_bound(per_token_bytes: int, bandwidth_gb_s: float, measured_tok_s: float | None) -> dict:
    """Decode is memory-bound: each token reads every weight once. bound = bandwidth / bytes."""
    bound = bandwidth_gb_s * 1e9 / per_token_bytes if per_token_bytes else None
    pct = 100.0 * measured_tok_s / bound if bound and measured_tok_s else None
    return {"weights_bytes_per_token": per_token_bytes, "bound_tokens_per_s": _r(bound, 2),
            "measured_tokens_per_s": _r(measured_tok_s, 2), "percent_of_bound": _r(pct, 2)}


# --- the machine -------------------------------------------------------------------------
def _cpu_model() -> str:
    from ib_edge.runtime.cpuinfo import cpu_model

    return cpu_model()


def _mem_total_mb() -> float | None:
    try:
        m = re.search(r"^MemTotal:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text(), re.M)
        return round(int(m.group(1)) / 1024, 1) if m else None
    except OSError:
        return None


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def gpu_description() -> dict:
    """What GPU this process could use: torch's view first, else nvidia-smi's."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return {"available": True, "name": p.name, "memory_mb": round(p.total_memory / 2**20),
                    "compute_capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda, "source": "torch"}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            return {"available": False, "reason": f"nvidia-smi failed: {e}"}
        if out:
            return {"available": False, "name": out.splitlines()[0], "source": "nvidia-smi",
                    "reason": "a GPU is present but this torch build cannot use it"}
    return {"available": False, "reason": "no CUDA device (torch.cuda.is_available() is False, no nvidia-smi)"}


def hardware() -> dict:
    import torch

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import onnxruntime as ort

        ort_providers = ort.get_available_providers()
    except ImportError:
        ort_providers = []
    return {
        "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(), "memory_total_mb": _mem_total_mb(),
        "machine": platform.machine(), "os": f"{platform.system()} {platform.release()}",
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "gpu": gpu_description(),
        "software": {"python": platform.python_version(),
                     **{p: _version(p) for p in ("ib-edge", "torch", "transformers", "onnxruntime",
                                                 "onnxruntime-gpu", "onnx", "numpy", "tensorrt", "bitsandbytes")}},
        "onnxruntime_providers": ort_providers,
    }


@dataclasses.dataclass
class Timer:
    """Accumulates named stage samples over runs: t.add("vision", ms)."""
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def add(self, stage: str, ms: float | None) -> None:
        self.samples.setdefault(stage, []).append(ms)

    def stats(self) -> dict:
        return {k: latency_stats(v) for k, v in self.samples.items()}
