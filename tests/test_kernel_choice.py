"""The LLM kernel choice (runtime/kernel_choice.py): measured once per CPU string + shape + options,
cached as JSON under $IB_EDGE_HOME, the rule where nothing is measured, and the accuracy gate.
Timings are injected (no timed assertions), except the last test, which measures the smoke
model for real and asserts only what the cache records."""
from __future__ import annotations

import json

import pytest
import torch

from ib_edge.bench.decode import random_int4_tensors
from ib_edge.runtime import engines as eng
from ib_edge.runtime import kernel_choice as kc
from ib_edge.runtime.errors import BundleError, InputError
from ib_edge.runtime.llama import PRESETS, LlamaArgs, collect

A = PRESETS["smoke"]


class Fake:
    def __init__(self, kernel):
        self.kernel = kernel


def _spec(a=A, group=64, dense=False):
    t = random_int4_tensors(a, group, seed=1)
    if dense:
        from tests.test_ortllm import _dequantized

        t, group = _dequantized(t, group), None
    return collect(a, t, group)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("IB_EDGE_HOME", str(tmp_path))
    monkeypatch.delenv(kc.ENV, raising=False)
    kc._noted.clear()
    return tmp_path


def _timer(ms: dict, logits: dict | None = None, calls: list | None = None):
    def timer(model):
        if calls is not None:
            calls.append(model.kernel)
        return ms[model.kernel], (logits or {}).get(model.kernel, torch.ones(8))
    return timer


def test_measured_once_then_cached(home):
    spec, calls, notes = _spec(), [], []
    timer = _timer({"ort-fp32": 9.0, "ort-int8": 5.0, "torch": 7.0}, calls=calls)
    m, rec = kc.choose(A, spec, 2, Fake, timer=timer, log=notes.append)
    assert (m.kernel, rec["how"]) == ("ort-int8", "measured now")
    assert calls == ["ort-fp32", "ort-int8", "torch"]
    data = json.loads((home / kc.CACHE_FILE).read_text())
    (entry,) = data["entries"].values()
    assert entry["kernel"] == "ort-int8" and entry["ms_per_token"] == {"ort-fp32": 9.0, "ort-int8": 5.0, "torch": 7.0}
    assert entry["key"]["cpu"] == kc.cpu_string() and entry["key"]["threads"] == 2
    # reused: nothing timed, same choice, even when the timer would now say otherwise
    m2, rec2 = kc.choose(A, spec, 2, Fake, timer=_timer({"ort-fp32": 1, "ort-int8": 9, "torch": 9}, calls=calls))
    assert (m2.kernel, len(calls)) == ("ort-int8", 3) and rec2["how"].startswith("cached")
    # other engine options (threads) are another entry
    kc.choose(A, spec, 1, Fake, timer=timer, log=notes.append)
    assert len(calls) == 6 and len(json.loads((home / kc.CACHE_FILE).read_text())["entries"]) == 2


def test_other_cpu_string_measures_again(home, monkeypatch):
    spec, calls = _spec(), []
    kc.choose(A, spec, 2, Fake, timer=_timer({"ort-fp32": 9, "ort-int8": 5, "torch": 7}, calls=calls), log=print)
    monkeypatch.setattr(kc, "cpu_string", lambda: "Intel(R) Xeon(R) | avx512_vnni amx_int8 amx_bf16")
    m, rec = kc.choose(A, spec, 2, Fake, timer=_timer({"ort-fp32": 9, "ort-int8": 8, "torch": 3}, calls=calls),
                       log=print)
    assert (m.kernel, rec["how"], len(calls)) == ("torch", "measured now", 6)
    cpus = {e["key"]["cpu"] for e in json.loads((home / kc.CACHE_FILE).read_text())["entries"].values()}
    assert len(cpus) == 2


@pytest.mark.parametrize("content", ["{not json", "[]", '{"schema": 99, "entries": {}}'])
def test_corrupt_cache_is_ignored_with_one_note(home, content):
    (home / kc.CACHE_FILE).write_text(content)
    notes = []
    timer = _timer({"ort-fp32": 9, "ort-int8": 5, "torch": 7})
    m, rec = kc.choose(A, _spec(), 2, Fake, timer=timer, log=notes.append)
    assert m.kernel == "ort-int8" and rec["how"] == "measured now"
    ignored = [n for n in notes if "ignoring the LLM kernel cache" in n]
    assert len(ignored) == 1 and "\n" not in ignored[0]
    data = json.loads((home / kc.CACHE_FILE).read_text())  # rewritten, valid
    assert data["schema"] == kc.CACHE_SCHEMA and len(data["entries"]) == 1
    notes.clear()
    kc.choose(A, _spec(), 2, Fake, timer=timer, log=notes.append)
    assert not [n for n in notes if "ignoring" in n]


def test_a_kernel_below_the_logits_gate_is_never_chosen(home):
    """The fastest candidate loses when its logits drift from the most exact one's."""
    ref = torch.linspace(-1, 1, 64)
    logits = {"ort-fp32": ref, "ort-int8": ref + 0.001 * torch.randn(64), "torch": ref.flip(0)}
    m, rec = kc.choose(A, _spec(), 2, Fake, timer=_timer({"ort-fp32": 9, "ort-int8": 5, "torch": 1}, logits),
                       log=print)
    assert m.kernel == "ort-int8"
    assert "torch" in rec["excluded"] and "torch" not in rec["ms_per_token"]


def test_rule_and_forcing(home, monkeypatch):
    calls = []
    timer = _timer({"ort-fp32": 1, "ort-int8": 9, "torch": 9}, calls=calls)
    monkeypatch.setenv(kc.ENV, "rule")
    assert kc.choose(A, _spec(), 2, Fake, timer=timer)[0].kernel == "ort-int8"
    monkeypatch.setenv(kc.ENV, "torch")
    m, rec = kc.choose(A, _spec(), 2, Fake, timer=timer)
    assert m.kernel == "torch" and kc.ENV in rec["how"]
    monkeypatch.setenv(kc.ENV, "ort-fp32")
    assert kc.choose(A, _spec(), 2, Fake, timer=timer)[0].kernel == "ort-fp32"
    monkeypatch.setenv(kc.ENV, "fastest")
    with pytest.raises(InputError, match="not one of rule"):
        kc.choose(A, _spec(), 2, Fake, timer=timer)
    monkeypatch.delenv(kc.ENV)
    # fp32 weights: torch is the only candidate, nothing measured
    m, rec = kc.choose(A, _spec(dense=True), 2, Fake, timer=timer)
    assert m.kernel == "torch" and "only candidate" in rec["how"]
    # a shape ORT refuses (head dim 24): only torch, and forcing an ORT kernel is one line
    odd = LlamaArgs(vocab_size=100, hidden_size=192, n_layers=1, n_heads=8, n_kv_heads=2,
                    intermediate_size=256, max_positions=32)
    assert kc.choose(odd, _spec(odd, 32), 2, Fake, timer=timer)[0].kernel == "torch"
    monkeypatch.setenv(kc.ENV, "ort-int8")
    with pytest.raises(InputError, match="cannot run this model"):
        kc.choose(odd, _spec(odd, 32), 2, Fake, timer=timer)
    assert calls == [] and not (home / kc.CACHE_FILE).exists()


def test_q4x8_is_a_candidate_where_it_can_run(home, monkeypatch):
    """ib-edge's q4x8 op joins the candidates at groups that are multiples of 128 on a CPU with
    AVX-512 VNNI, is chosen when measured fastest, and forcing it elsewhere says why not."""
    from ib_edge.runtime import q4x8

    monkeypatch.setattr(q4x8, "why_not", lambda groups=(), build=True: q4x8.layout_why_not(groups))  # any CPU
    spec128 = _spec(group=128)
    assert kc.candidates(A, spec128) == ["ort-fp32", "ort-int8", "ort-q4x8", "torch"]
    assert "ort-q4x8" not in kc.candidates(A, _spec(group=64))
    m, rec = kc.choose(A, spec128, 2, Fake, timer=_timer({"ort-fp32": 9, "ort-int8": 5, "ort-q4x8": 4, "torch": 7}),
                       log=print)
    assert m.kernel == "ort-q4x8" and rec["ms_per_token"]["ort-q4x8"] == 4
    monkeypatch.setenv(kc.ENV, "ort-q4x8")
    with pytest.raises(InputError, match="group size 64 is not a multiple of 128"):
        kc.choose(A, _spec(group=64), 2, Fake, timer=_timer({}))
    monkeypatch.setattr(q4x8, "why_not", lambda groups=(), build=True: "this CPU lacks avx512_vnni (...)")
    assert "ort-q4x8" not in kc.candidates(A, spec128)
    with pytest.raises(InputError, match="lacks avx512_vnni"):
        kc.choose(A, spec128, 2, Fake, timer=_timer({}))


def test_a_kernel_that_fails_to_build_is_excluded_not_fatal(home, monkeypatch):
    """A candidate whose engine cannot be built here (q4x8: the compile failed) is excluded with
    the reason; the load goes on with the others. A new candidate set is a new cache entry."""
    from ib_edge.runtime import q4x8

    monkeypatch.setattr(q4x8, "why_not", lambda groups=(), build=True: q4x8.layout_why_not(groups))
    spec = _spec(group=128)

    def build(k):
        if k == "ort-q4x8":
            raise BundleError("the ort LLM engine cannot run this model: cc failed to compile q4x8.c: error: x")
        return Fake(k)

    m, rec = kc.choose(A, spec, 2, build, timer=_timer({"ort-fp32": 9, "ort-int8": 5, "torch": 7}), log=print)
    assert m.kernel == "ort-int8" and "failed to compile" in rec["excluded"]["ort-q4x8"]
    assert rec["key"]["candidates"] == ["ort-fp32", "ort-int8", "ort-q4x8", "torch"]
    monkeypatch.setattr(q4x8, "why_not", lambda groups=(), build=True: "no C compiler found")
    m2, rec2 = kc.choose(A, spec, 2, Fake, timer=_timer({"ort-fp32": 9, "ort-int8": 5, "torch": 7}), log=print)
    assert rec2["how"] == "measured now"    # other candidates: not the first entry


def test_real_measurement_on_the_smoke_model(home):
    """engines.assemble with no engine measures the real kernels once, then reads the cache."""
    from ib_edge.runtime.q4x8 import cpu_why_not

    t = random_int4_tensors(A, 128, seed=2)
    m = eng.assemble(A, dict(t), 128, threads=1)
    rec = m.kernel_choice
    assert rec["how"] == "measured now" and m.kernel == rec["kernel"]
    want = set(kc.KERNELS) - ({"ort-q4x8"} if cpu_why_not() else set())
    assert set(rec["ms_per_token"]) | set(rec["excluded"]) == want
    assert rec["kernel"] == min(rec["ms_per_token"], key=rec["ms_per_token"].get)
    m2 = eng.assemble(A, dict(t), 128, threads=1)
    assert m2.kernel == m.kernel and m2.kernel_choice["how"].startswith("cached")
    m2.setup_cache(8)
    assert m2(torch.randn(1, 3, A.hidden_size), 0).shape == (1, A.vocab_size)


def test_time_decode_fits_a_model_with_few_positions():
    a = LlamaArgs(vocab_size=64, hidden_size=64, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=128,
                  max_positions=20)
    m = eng.assemble(a, random_int4_tensors(a, 32, seed=0), 32, "torch")
    ms, logits = kc.time_decode(m)
    assert ms > 0 and logits.shape == (64,)


def test_cpu_string_and_bf16_flag_from_cpuinfo_text():
    from ib_edge.runtime import cpuinfo

    amd = "processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 fma avx512f avx512_vnni avx512_bf16\n"
    intel = "model name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: avx2 avx512f avx512_vnni amx_tile amx_int8 amx_bf16\n"
    old = "model name\t: AMD EPYC 7B12\nflags\t\t: avx2 fma\n"
    assert cpuinfo.cpu_string(amd) == "AMD EPYC 9654 | avx2 fma avx512f avx512_vnni avx512_bf16"
    assert cpuinfo.cpu_string(intel) != cpuinfo.cpu_string(amd) and "amx_int8" in cpuinfo.cpu_string(intel)
    assert (cpuinfo.bf16_flag(amd), cpuinfo.bf16_flag(intel), cpuinfo.bf16_flag(old)) == ("avx512_bf16", "amx_bf16", None)
