"""ib-bench times decode over a fixed number of tokens (issue 15 item 5): EOS is suppressed up
to --max-new-tokens for every system (our bundles on each LLM path and the transformers
baseline), and each run's stages add up to its total."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from ib_edge.bench.bench import BenchConfig, time_runs
from ib_edge.bench.systems import BundleSystem, TransformersSystem
from ib_edge.runtime import decode

MAX_NEW = 7


class _AlwaysEos(torch.nn.Module):
    """A decoder whose every step puts the highest logit on token 3 (the EOS), token 5 next."""
    vocab, eos = 11, 3

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(self.vocab, 4)

    def setup_cache(self, n):
        pass

    def forward(self, x, start):
        logits = torch.zeros(1, self.vocab)
        logits[0, self.eos], logits[0, 5] = 2.0, 1.0
        return logits


def test_generate_min_new_tokens_suppresses_eos():
    m, emb = _AlwaysEos(), torch.zeros(1, 2, 4)
    assert decode.generate(m, emb, max_new_tokens=MAX_NEW, eos_ids=(3,)) == [3]
    assert decode.generate(m, emb, max_new_tokens=MAX_NEW, eos_ids=(3,), min_new_tokens=MAX_NEW) == [5] * MAX_NEW
    # as transformers' min_new_tokens: EOS may come once the minimum is reached
    assert decode.generate(m, emb, max_new_tokens=MAX_NEW, eos_ids=(3,), min_new_tokens=2) == [5, 5, 3]


@pytest.fixture(scope="module")
def rtn_bundle(reference_dir, tmp_path_factory):
    from ib_edge.export.bundle import export_bundle

    return export_bundle(str(reference_dir("llama")), tmp_path_factory.mktemp("rtn") / "b", llm_quant="rtn",
                         group_size=32, llm_validation="record", quiet=True)


def _check(system):
    cfg = BenchConfig(runs=2, warmup=0, max_new_tokens=MAX_NEW)
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    rec = time_runs(system, {"image": img, "question": "What color is the square?"}, cfg, lambda: None)
    assert rec["new_tokens"]["min"] == rec["new_tokens"]["max"] == MAX_NEW
    lat = rec["latency_ms"]
    assert lat["other"]["min"] >= 0
    assert rec["decode_tokens_per_s"]["p50"] > 0
    return rec


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_bundle_decodes_max_new_tokens(bundle_dir, family):
    _check(BundleSystem(bundle_dir(family), threads=1))


def test_fast_int4_bundle_decodes_max_new_tokens(rtn_bundle):
    _check(BundleSystem(rtn_bundle, threads=1))


def test_transformers_baseline_decodes_max_new_tokens(reference_dir):
    _check(TransformersSystem(str(reference_dir("llama")), None, threads=1))
