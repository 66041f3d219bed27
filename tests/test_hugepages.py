"""runtime/hugepages.py: the ort LLM engine's weight buffers collapsed to 2 MiB pages after the
session is built (the speed effect is a benchmark figure, README "Decode benchmark"; here: which
mappings are picked, that the collapse happens where the kernel can, and that it changes no
logits)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from ib_edge.runtime import hugepages as H

MB = 1 << 20
MAPS = """\
55d0c0000000-55d0c2000000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0004000000 rw-p 00000000 00:00 0
7f0004000000-7f0004100000 r--p 00000000 fd:01 1234                       /usr/lib/libc.so.6
7f0005000000-7f0006000000 rw-p 00000000 fd:01 1234                       /usr/lib/libc.so.6
7f0007000000-7f0008000000 rw-s 00000000 00:01 99                         /dev/zero (deleted)
7ffc00000000-7ffc00100000 rw-p 00000000 00:00 0                          [stack]
"""


def test_only_private_anonymous_writable_mappings_are_candidates():
    assert H.anonymous_ranges(MAPS) == {(0x55d0c0000000, 0x55d0c2000000), (0x7f0000000000, 0x7f0004000000)}


def test_new_or_grown_mappings_aligned_to_2mib():
    old = {(0x1000, 0x1000 + 64 * MB)}
    after = {(0x1000, 0x1000 + 64 * MB),                       # unchanged: left alone
             (0x200000 * 100 + 0x1000, 0x200000 * 110 + 0x5000),  # new, unaligned: the aligned interior
             (0x200000 * 200, 0x200000 * 201),                    # new but small: not the weights
             (0x200000 * 300, 0x200000 * 310)}                    # new, aligned
    assert H.new_ranges(old, after) == [(0x200000 * 101, 0x200000 * 110), (0x200000 * 300, 0x200000 * 310)]
    grown = {(0x200000 * 2, 0x200000 * 20)}
    assert H.new_ranges({(0x200000 * 2, 0x200000 * 10)}, grown) == [(0x200000 * 2, 0x200000 * 20)]


def _anon_huge_kb(lo: int, hi: int) -> int:
    """AnonHugePages of the mappings overlapping [lo, hi) (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="ascii") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                a, b = (int(x, 16) for x in head.split("-"))
                inside = a < hi and b > lo
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_collapse_backs_a_written_buffer_with_huge_pages():
    before = H.anonymous_ranges()
    buf = np.ones(48 * MB, np.uint8)          # written: every page present, as ORT's packed weights
    ranges = [r for r in H.new_ranges(before, H.anonymous_ranges())
              if r[0] < buf.ctypes.data + buf.nbytes and r[1] > buf.ctypes.data]
    assert ranges, "a fresh 48 MiB buffer is a new anonymous mapping"
    rec = H.collapse(ranges)
    if "EINVAL" in rec["errors"] and rec["collapsed_MB"] == 0:
        pytest.skip(f"this kernel has no MADV_COLLAPSE (Linux 6.1+): {rec}")
    if rec["collapsed_MB"] == 0:
        pytest.skip(f"no 2 MiB pages free right now: {rec}")
    assert _anon_huge_kb(buf.ctypes.data, buf.ctypes.data + buf.nbytes) >= 2048
    assert int(buf.sum(dtype=np.int64)) == buf.nbytes   # the bytes are what they were


def test_ort_engine_logits_do_not_depend_on_the_pages(monkeypatch):
    """Same weights, pages collapsed or not: the same logits, bit for bit; IB_EDGE_HUGEPAGES=0
    turns the collapse off (no record). How much is collapsed depends on the allocator's state
    (buffers carved from memory the process already had are not new mappings), so the amount is
    not asserted here; the collapse itself is tested on a fresh buffer above."""
    from ib_edge.bench.decode import random_int4_tensors
    from ib_edge.runtime import engines as eng
    from ib_edge.runtime.llama import LlamaArgs

    a = LlamaArgs(vocab_size=4096, hidden_size=1024, n_layers=2, n_heads=8, n_kv_heads=2,
                  intermediate_size=4096, max_positions=64)     # ~16 MB of int4 weights
    t = random_int4_tensors(a, 64, seed=1, scale_spread=1.0)
    x = np.random.default_rng(0).standard_normal((1, 5, a.hidden_size)).astype(np.float32)
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(H.ENV, flag)
        m = eng.assemble(a, dict(t), 64, "ort")
        m.setup_cache(8)
        out[flag] = (m(x, 0).copy(), m(x[:, :1], 5).copy(), m.huge_pages)
    assert out["0"][2] is None
    rec = out["1"][2]
    if sys.platform.startswith("linux"):
        assert isinstance(rec, dict) and set(rec) == {"collapsed_MB", "failed_MB", "errors", "seconds"}, rec
    np.testing.assert_array_equal(out["0"][0], out["1"][0])
    np.testing.assert_array_equal(out["0"][1], out["1"][1])
