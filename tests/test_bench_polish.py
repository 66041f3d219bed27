"""Small ib-bench checks on hand-made inputs (issue 15): the decode bound is the best streaming
rate of the run, the labels name the LLM precision of a 4-bit-LLM bundle."""
from __future__ import annotations

import pytest

from ib_edge.bench import measure, report
from ib_edge.bench.bench import apply_bound


def _rec(name, per_token_bytes, tok_s):
    return {"name": name, "decode_tokens_per_s": {"p50": tok_s},
            "bandwidth_bound": {"weights_bytes_per_token": per_token_bytes, "note": "n"}}


def test_streaming_bound_takes_a_system_rate_above_the_probes():
    gb, by = measure.streaming_bound({"torch.sum": 21.6, "fp32 GEMV": 18.0}, {"fp32": 25.0, "nf4": None})
    assert gb == 25.0 and by == "fp32 (its own effective rate)"
    gb, by = measure.streaming_bound({"torch.sum": 21.6, "fp32 GEMV": 30.5}, {"fp32": 25.0})
    assert gb == 30.5 and by == "probe fp32 GEMV"
    with pytest.raises(ValueError):
        measure.streaming_bound({}, {"x": None})


def test_apply_bound_no_system_above_100_percent():
    # probes read at most 21.6 GB/s; the fp32 system streams 100 MB x 250 tok/s = 25 GB/s
    bw = {"gb_per_s": 21.6, "probes": {"torch.sum": {"gb_per_s": 21.6}, "torch copy": {"gb_per_s": 15.0},
                                       "fp32 GEMV": {"gb_per_s": 19.0}, "numpy copy": {"gb_per_s": 12.0}}}
    fast = _rec("b-fp32", 100_000_000, 250.0)
    slow = _rec("b-int4", 25_000_000, 500.0)       # 12.5 GB/s: half the bound
    gone = {"name": "gpu", "decode_tokens_per_s": {"p50": 9.0}, "bandwidth_bound": {"measured": False, "reason": "r"}}
    apply_bound(bw, [fast, slow, gone])
    assert bw["bound_gb_per_s"] == 25.0 and bw["bound_set_by"] == "b-fp32 (its own effective rate)"
    assert fast["bandwidth_bound"]["percent_of_bound"] == 100.0
    assert fast["bandwidth_bound"]["bound_tokens_per_s"] == 250.0
    assert slow["bandwidth_bound"]["percent_of_bound"] == 50.0
    assert slow["bandwidth_bound"]["bound_set_by"] == "b-fp32 (its own effective rate)"
    assert gone["bandwidth_bound"] == {"measured": False, "reason": "r"}
    cell = report._bandwidth_cell({**bw, "array_mb": 32, "threads": 2})
    assert "set by b-fp32 (its own effective rate)" in cell and "torch.sum 21.6" in cell


def test_apply_bound_probe_wins_when_systems_are_slower():
    bw = {"gb_per_s": 30.0, "probes": {"torch.sum": {"gb_per_s": 21.0}, "fp32 GEMV": {"gb_per_s": 30.0}}}
    r = _rec("b", 10**8, 150.0)  # 15 GB/s
    apply_bound(bw, [r])
    assert bw["bound_set_by"] == "probe fp32 GEMV" and r["bandwidth_bound"]["percent_of_bound"] == 50.0


def test_memory_bandwidth_lists_every_probe():
    bw = measure.memory_bandwidth(size_mb=8, repeats=1, threads=1)
    assert set(bw["probes"]) == {"torch.sum", "torch copy", "numpy copy", "fp32 GEMV"}
    assert bw["gb_per_s"] == max(p["gb_per_s"] for p in bw["probes"].values()) > 0
    assert bw["probes"][bw["set_by"]]["gb_per_s"] == bw["gb_per_s"]


@pytest.mark.parametrize("bundle, label", [
    ({"precision": "int8", "stages": {"vision": {"precision": "int8"}, "llm": {"precision": "int4"}}},
     "b [int8 + int4 LLM]"),
    ({"precision": "fp32", "stages": {"llm": {"precision": "int4"}}}, "b [fp32 + int4 LLM]"),
    ({"precision": "int8", "stages": {"llm": {"precision": "float32"}}}, "b [int8]"),
    ({"precision": "fp32", "stages": {"llm": {"precision": "float32"}}, "is_reference": True}, "b [fp32] (reference)"),
    ({"precision": "int8", "stages": {"llm": {"precision": "mixed"}}}, "b [int8 + mixed LLM]"),
])
def test_label_names_the_llm_precision(bundle, label):
    assert report._label({"name": "b", "kind": "bundle", **bundle}) == label


def test_report_tables_and_plots_use_the_llm_label(tmp_path):
    """A hand-made two-system result through render_markdown and plot."""
    def sysrec(name, prec, llm_prec):
        lat = {k: {"p50": 1.0, "p90": 1.0, "p99": 1.0} for k in report.LATENCY_COLUMNS}
        return {"name": name, "kind": "bundle", "precision": prec, "is_reference": prec == "fp32",
                "stages": {"llm": {"precision": llm_prec}}, "latency_ms": lat, "providers": {"llm": "ort"},
                "decode_tokens_per_s": {"p50": 10.0, "p90": 9.0}, "new_tokens": {"p50": 6},
                "bandwidth_bound": {"weights_bytes_per_token": 2**20, "bound_tokens_per_s": 20.0, "percent_of_bound": 50.0},
                "memory": {"peak_rss_mb": 100.0, "peak_added_mb": 10.0, "gpu": {"measured": False}},
                "sizes": {}, "load_ms": 1.0, "drift": {"measured": False, "reason": "x"},
                "agreement": {"measured": False, "reason": "x"},
                "accuracy": {"applicable": True, "overall": {"accuracy": 0.5, "correct": 1, "n": 2}, "by_type": {}}}
    result = {"hardware": {"gpu": {"available": False, "reason": "none"}, "software": {}, "cpu_model": "c",
                           "cpus_usable": 2, "cpu_count": 2, "torch_threads": 2, "memory_total_mb": 1.0,
                           "onnxruntime_providers": ["CPUExecutionProvider"], "load_average": [0.0]},
              "bandwidth": {"gb_per_s": 20.0, "array_mb": 8, "method": "m"}, "mode": "bundles", "created": "now",
              "eval": {"n": 2, "types": {}, "seed": 1}, "latency_input": {"runs": 1, "warmup": 0, "question": "q",
                                                                         "image": "i", "max_new_tokens": 6},
              "reference": {"name": "a", "why": "w"}, "baselines": {},
              "bundles": [sysrec("a", "fp32", "float32"), sysrec("q", "int8", "int4")]}
    md = report.render_markdown(result)
    assert "q [int8 + int4 LLM]" in md and "q [int8] " not in md and "q [int8]|" not in md
    from matplotlib.axes import Axes
    seen = []
    orig = Axes.barh

    def spy(self, labels, *a, **k):
        seen.extend(labels)
        return orig(self, labels, *a, **k)
    Axes.barh = spy
    try:
        report.plot(result, tmp_path)
    finally:
        Axes.barh = orig
    assert "q [int8 + int4 LLM]" in seen


def test_eval_file_json_error_names_the_files_line(tmp_path):
    from ib_edge.bench.bench import BenchConfig, BenchError, load_examples

    p = tmp_path / "eval.jsonl"
    p.write_text('{"image": "a.png", "question": "q", "answer": "a"}\n\n{"image": "b.png", "question": \n')
    with pytest.raises(BenchError, match=r"line 3: Expecting value \(column 32\)"):
        load_examples(BenchConfig(eval_file=str(p)))


def test_gptq_checkpoint_keeps_the_sources_generation_config(tmp_path):
    from ib_edge.quant.llm_quant import keep_generation_config

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir(), out.mkdir()
    (src / "generation_config.json").write_text('{"do_sample": false, "num_beams": 1}')
    (out / "generation_config.json").write_text('{"do_sample": true}')  # as gptqmodel's save wrote it
    keep_generation_config(src, out)
    assert (out / "generation_config.json").read_text() == '{"do_sample": false, "num_beams": 1}'
