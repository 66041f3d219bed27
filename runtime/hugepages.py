"""Back the ort LLM engine's weights with 2 MiB pages (Linux transparent huge pages).

Decode streams every weight once per token, so it runs at the memory system's streaming rate.
ONNX Runtime copies the int4 weights into its own prepacked buffers at session creation, in
anonymous memory that the kernel maps with 4 KiB pages unless the range is madvised (THP
``enabled`` is ``madvise`` on most distributions, this machine's included). With 4 KiB pages
the CPU's stream prefetchers stop at every page boundary and the TLB misses every 4 KiB.
Measured on the 2-core EPYC Zen 4 (README "Decode vs llama.cpp after the graph and page work"):
under load the 88 MatMulNBits of a TinyLlama-shaped step took 26.5 ms on 4 KiB pages and 23.0 ms
on 2 MiB pages; on the idle machine decode ran +5 % and +12 % faster in two of three interleaved
runs (every round of those two), +0.5 % in the third.

So, after the session is built, the anonymous mappings that appeared or grew while ORT built it
(its weight buffers; for the q4x8 kernel, whose weights ORT reads in place, the arrays packed in
the same block) are madvised ``MADV_HUGEPAGE`` and collapsed with ``MADV_COLLAPSE`` (Linux
6.1+; synchronous; it ignores the sysfs THP mode). Best effort: where the kernel lacks it, or
memory is too fragmented for 2 MiB pages, the pages stay as they are and decode runs at the old
speed; nothing else changes (the bytes are the same). ``IB_EDGE_HUGEPAGES=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import errno
import os
import sys
import time

ENV = "IB_EDGE_HUGEPAGES"
HUGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
MIN_BYTES = 4 * HUGE          # smaller new mappings are not the weights


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get(ENV, "1").strip() != "0"


def anonymous_ranges(maps_text: str | None = None) -> set[tuple[int, int]]:
    """(start, end) of the private writable anonymous mappings (heap included) of this process."""
    if maps_text is None:
        try:
            with open("/proc/self/maps", encoding="ascii") as f:
                maps_text = f.read()
        except OSError:
            return set()
    out = set()
    for line in maps_text.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[1].startswith("rw") or parts[1][3] != "p":
            continue
        path = parts[5] if len(parts) > 5 else ""
        if parts[4] != "0" or (path and path != "[heap]"):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.add((lo, hi))
    return out


def new_ranges(before: set[tuple[int, int]], after: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """The 2 MiB-aligned interiors of the mappings in ``after`` that are not in ``before`` (new or
    grown) and at least MIN_BYTES long."""
    out = []
    for lo, hi in sorted(after - before):
        a, b = -(-lo // HUGE) * HUGE, hi // HUGE * HUGE
        if hi - lo >= MIN_BYTES and b > a:
            out.append((a, b))
    return out


def collapse(ranges: list[tuple[int, int]]) -> dict:
    """madvise(MADV_HUGEPAGE) then MADV_COLLAPSE on each range (one retry where the kernel answers
    EAGAIN). -> {"collapsed_MB", "failed_MB", "errors" (errno name -> MB), "seconds"}: the
    collapse copies the pages, and the kernel may first have to compact memory for 2 MiB pages
    (0.2-0.6 s for ~1.2 GB of mappings with memory free, ~3 s with the page cache filling RAM)."""
    t0 = time.perf_counter()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    done = failed = 0
    errors: dict[str, float] = {}
    for a, b in ranges:
        libc.madvise(a, b - a, MADV_HUGEPAGE)
        for _ in range(2):
            rc = libc.madvise(a, b - a, MADV_COLLAPSE)
            err = ctypes.get_errno() if rc else 0
            if err != errno.EAGAIN:
                break
        if rc == 0:
            done += b - a
        else:
            failed += b - a
            name = errno.errorcode.get(err, str(err))
            errors[name] = round(errors.get(name, 0) + (b - a) / 1e6, 1)
    return {"collapsed_MB": round(done / 1e6, 1), "failed_MB": round(failed / 1e6, 1), "errors": errors,
            "seconds": round(time.perf_counter() - t0, 2)}


class WeightPages:
    """``with WeightPages() as pages: build the session`` -> ``pages.record``: what was collapsed
    (None when turned off or not on Linux)."""

    def __init__(self):
        self.record = None
        self._before = anonymous_ranges() if enabled() else None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self._before is not None:
            try:
                self.record = collapse(new_ranges(self._before, anonymous_ranges()))
            except (OSError, AttributeError) as e:  # no libc madvise: pages stay as they are
                self.record = {"collapsed_MB": 0.0, "failed_MB": 0.0, "errors": {type(e).__name__: str(e)}, "seconds": 0.0}
        return False
