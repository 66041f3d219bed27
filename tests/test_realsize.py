"""``bench/realsize.py`` (the real-size benchmark) end to end on the small reference Llama: the
bundle once per forced int4 kernel, the transformers baselines (a float dtype and bitsandbytes
NF4), the bound from the same run, and the kernel variable restored afterwards."""
from __future__ import annotations

import json
import os

import pytest

from ib_edge.bench import realsize
from ib_edge.runtime.kernel_choice import ENV


@pytest.mark.parametrize("kernels", [("ort-int8", "ort-fp32")])
def test_realsize_kernels_and_baselines(rtn_bundle, reference_dir, tmp_path, kernels):
    before = os.environ.get(ENV)
    out = tmp_path / "r.json"
    argv = [str(rtn_bundle), "--checkpoint", str(reference_dir("llama")), "--hf-dtype", "float32",
            "--hf-dtype", "nf4", "--tokens", "3", "--hf-tokens", "2", "--runs", "1", "--threads", "1",
            "--json", str(out)]
    for k in kernels:
        argv += ["--llm-kernel", k]
    assert realsize.main(argv) == 0
    assert os.environ.get(ENV) == before
    d = json.loads(out.read_text())
    systems = d["systems"]
    assert [s.get("llm_kernel") for s in systems[:2]] == list(kernels)
    assert all(s["kernel_choice"]["kernel"] == k for s, k in zip(systems, kernels))
    assert all(s["new_tokens"] == 3 and s["decode_tok_s"] > 0 for s in systems[:2])
    assert systems[2]["system"] == "transformers float32 (LLM alone)"
    nf4 = systems[3]
    assert nf4["system"] == "transformers bnb nf4 (LLM alone)"
    measured = [s for s in systems if s.get("available", True)]
    assert len(measured) >= 3
    # the bound is the best streaming rate seen in the run: nothing exceeds it
    assert all(0 < s["pct_of_bandwidth_bound"] <= 100 for s in measured)
    assert d["bound_set_by"]
