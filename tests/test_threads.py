"""Thread defaults under load (issue 15 item 4): ONNX Runtime sessions without spinning, torch's
OpenMP threads passive, and ib-bench's --background-load. The speed effect is a benchmark figure
(README "Threads under load"), not a timed test."""
from __future__ import annotations

import os
import subprocess
import sys

import onnxruntime as ort

from ib_edge.runtime.threads import ort_session_options


def test_ort_sessions_do_not_spin():
    opts = ort_session_options(ort, 3)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    assert ort_session_options(ort).intra_op_num_threads == 0   # ONNX Runtime's default


def test_stage_and_llm_sessions_use_them(bundle_dir):
    from ib_edge.runtime import Pipeline

    pipe = Pipeline.load(bundle_dir("llama"), threads=1)
    for stage in (pipe.vision, pipe.qformer):
        assert stage.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_omp_wait_policy_is_passive_before_torch_unless_set():
    code = ("import os, sys\nfrom ib_edge.runtime.threads import before_torch_import\nbefore_torch_import()\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["PASSIVE", "False"], out.stderr[-1000:]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, timeout=120)
    assert out.stdout.split() == ["ACTIVE", "False"]


def test_background_load_runs_and_stops_busy_processes():
    from ib_edge.bench.cli import background_load

    with background_load(2) as rec:
        kids = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "while 1: pass"], capture_output=True, text=True)
        assert len(kids.stdout.split()) == 2
    assert rec["processes"] == 2 and len(rec["load_average_start"]) == 3 and len(rec["load_average_end"]) == 3
    kids = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "while 1: pass"], capture_output=True, text=True)
    assert kids.stdout.split() == []
