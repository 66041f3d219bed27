"""CPU thread pools of the runtime, configured in one place: the ONNX Runtime sessions (vision,
Q-Former, the ort LLM engine) and torch's OpenMP pool (transformers and the torch engine).

The stages run one after another, so at most one pool has work at a time; what hurts is a pool
that keeps its threads busy while it has none, or while the machine has other work. Measured on
this project's 2-core EPYC with one busy background process (issue 15 item 4, README "Threads
under load"): ONNX Runtime's intra-op threads spin between runs by default, and torch's libgomp
threads spin at every barrier (OMP_WAIT_POLICY unset, GOMP_SPINCOUNT large); two spinning
pools on two cores that are also running someone else's process turned a ~30 ms answer into
0.4-1.2 s. So:

- every ONNX Runtime session is made with spinning off (``session.intra_op.allow_spinning=0``,
  the same for inter-op): idle threads sleep instead of holding a core;
- ``OMP_WAIT_POLICY=PASSIVE`` is set (unless the user set it) before torch is first imported by
  the runtime, so libgomp's threads yield at barriers instead of spinning.

Thread counts keep their defaults (ONNX Runtime and torch: one per physical core) unless
``threads`` is given: on an idle machine they are the fastest on the real-shape stages.
"""
from __future__ import annotations

import os
import sys

WAIT_POLICY = "PASSIVE"
ORT_SPINNING = "0"


def ort_session_options(ort, threads: int | None = None, *, log_severity: int = 3):
    """``ort.SessionOptions`` with ``threads`` intra-op threads (None: ONNX Runtime's default),
    one inter-op thread and spinning off."""
    opts = ort.SessionOptions()
    opts.log_severity_level = log_severity
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", ORT_SPINNING)
    opts.add_session_config_entry("session.inter_op.allow_spinning", ORT_SPINNING)
    return opts


def before_torch_import() -> None:
    """Call before the runtime imports torch: libgomp reads OMP_WAIT_POLICY once, when torch
    loads it; a torch already imported (by the caller) keeps its own setting."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
