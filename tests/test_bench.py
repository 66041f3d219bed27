"""ib-bench end to end on the small reference models (CPU): the report files, every field of the
JSON, and the accuracy in it against an independent count; the real-shape config; the GPU
check script on a machine without a GPU."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest

from ib_edge.bench import cli, proof_task
from ib_edge.runtime import Pipeline

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 6
RUNS = 2
STAGES = ("preprocess", "vision", "qformer", "llm_prefill", "ttft", "llm_decode", "total")


def _norm(text: str) -> str:
    """The proof task's answer normalisation, restated here: lower-case, drop ASCII
    punctuation, collapse whitespace."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(text.split())


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory, bundle_dir):
    """A proof-task eval set whose expected answers are set so that some rows are right: rows
    0 and 3 take the fp32 bundle's own greedy answer, shouted and punctuated (normalisation
    must make them match); the rest keep the task's answer, which the untrained model misses."""
    out = tmp_path_factory.mktemp("evalset")
    path = proof_task.write_eval_set(out, n=5, seed=11)
    pipe = Pipeline.load(bundle_dir("llama"))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i in (0, 3):
        pred = pipe.generate(out / rows[i]["image"], rows[i]["question"], max_new_tokens=MAX_NEW)
        rows[i]["answer"] = f"  {pred.upper()}!! "
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, bundle_dir, quant_bundle_dir, eval_file):
    out = tmp_path_factory.mktemp("bench-report")
    int8, fp32 = quant_bundle_dir("llama", "int8"), bundle_dir("llama")
    # int8 first: the reference must be chosen by manifest precision, not by position
    argv = ["--bundle", str(int8), "--bundle", str(fp32), "--eval", str(eval_file), "--report", str(out),
            "--runs", str(RUNS), "--warmup", "1", "--max-new-tokens", str(MAX_NEW), "--threads", "1",
            "--no-progress", "--bandwidth-mb", "32"]
    assert cli.main(argv) == 0
    return out, json.loads((out / "report.json").read_text()), {"int8": int8, "fp32": fp32}


def test_report_files(bench_run):
    out, result, _ = bench_run
    md = (out / "report.md").read_text()
    for heading in ("## Machine", "## Latency per stage", "## Decode", "## Memory and size", "## Drift against",
                    "## Agreement", "## Task accuracy", "## Baselines"):
        assert heading in md
    for png in ("latency_stages.png", "accuracy_vs_latency.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"({png})" in md
    assert "not available: bitsandbytes" in md or result["baselines"]["transformers_bnb_nf4"]["available"]
    # the LLM engine of every bundle is recorded and shown (these bundles run the transformers LLM)
    assert "| LLM engine |" in md
    assert all(b["providers"]["llm"] == "transformers" for b in result["bundles"]), result["bundles"]


def _check_latency(rec):
    lat = rec["latency_ms"]
    assert set(STAGES) <= set(lat)
    for stage in STAGES:
        s = lat[stage]
        assert s["n"] == RUNS, stage
        assert 0 <= s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"], (stage, s)
    assert lat["total"]["p50"] >= lat["vision"]["p50"] + lat["qformer"]["p50"]
    assert 1 <= rec["new_tokens"]["p50"] <= MAX_NEW
    rate = rec["decode_tokens_per_s"]
    assert rate["p50"] is None or rate["p50"] > 0
    bound = rec["bandwidth_bound"]
    assert bound["weights_bytes_per_token"] > 0 and bound["bound_tokens_per_s"] > 0
    mem = rec["memory"]
    assert mem["peak_rss_mb"] > 50 and mem["peak_added_mb"] >= 0 and mem["gpu"]["measured"] is False


def test_json_has_every_field(bench_run):
    _, result, paths = bench_run
    assert {"schema", "created", "command", "mode", "config", "hardware", "bandwidth", "eval", "latency_input",
            "reference", "bundles", "baselines"} <= set(result)
    hw = result["hardware"]
    assert hw["cpu_model"] and hw["cpu_count"] >= 1
    for pkg in ("torch", "onnxruntime", "transformers"):
        assert hw["software"][pkg]
    assert "available" in hw["gpu"]
    assert result["bandwidth"]["gb_per_s"] > 0
    assert result["eval"]["n"] == 5 and sum(result["eval"]["types"].values()) == 5

    by_prec = {b["precision"]: b for b in result["bundles"]}
    assert [b["precision"] for b in result["bundles"]] == ["int8", "fp32"]  # the order given
    assert result["reference"]["bundle"] == str(paths["fp32"])
    assert by_prec["fp32"]["is_reference"] and not by_prec["int8"]["is_reference"]
    for b in result["bundles"]:
        _check_latency(b)
        sizes = b["sizes"]
        assert sizes["total"]["bytes"] == sum(v["bytes"] for k, v in sizes.items() if k != "total")
        for art in ("vision", "qformer", "llm"):
            assert sizes[art]["bytes"] > 0
        assert b["accuracy"]["applicable"] and len(b["predictions"]) == 5
    assert by_prec["int8"]["sizes"]["vision"]["bytes"] < by_prec["fp32"]["sizes"]["vision"]["bytes"]

    drift = by_prec["int8"]["drift"]
    assert drift["measured"]
    for tensor in ("image_embeds", "query_embeds_stage", "query_embeds_chain", "next_token_logits"):
        d = drift[tensor]
        assert d["samples"] == 5
        assert 0.98 < d["cosine_mean"] <= 1.0 and d["cosine_min"] <= d["cosine_mean"]
        assert 15 < d["sqnr_db"] < 80 and d["max_abs"] > 0  # int8 is lossy, but not broken
    assert 0 <= drift["next_token_logits"]["top1_agreement"] <= 1
    agree = by_prec["int8"]["agreement"]
    assert agree["measured"] and agree["n"] == 5 and 0 <= agree["token_ids_equal"] <= agree["answers_equal"] <= 1
    assert by_prec["fp32"]["drift"]["is_reference"]

    base = result["baselines"]["transformers_fp32_eager"]
    assert base["available"], base
    _check_latency(base)
    # transformers' own generate on the source checkpoint answers exactly like the fp32 bundle
    assert base["agreement"]["token_ids_equal"] == 1.0
    nf4 = result["baselines"]["transformers_bnb_nf4"]
    if importlib.util.find_spec("bitsandbytes") is None:
        assert not nf4["available"] and nf4["reason"].startswith("not available: bitsandbytes")
    else:  # bitsandbytes runs NF4 on CPU too: the baseline must have run, with real answers
        assert nf4["available"], nf4
        _check_latency(nf4)
        assert nf4["quantization"] == "nf4" and nf4["device"] == "cpu"
        assert len(nf4["predictions"]) == len(base["predictions"])
        assert nf4["agreement"]["measured"] and 0.0 <= nf4["agreement"]["answers_equal"] <= 1.0
    # transformers in bf16 where the CPU has native bf16 (avx512_bf16 / amx_bf16), else a reason
    from ib_edge.runtime.cpuinfo import bf16_flag

    bf16 = result["baselines"]["transformers_bf16_eager"]
    if bf16_flag() is None:
        assert not bf16["available"] and "no native bf16" in bf16["reason"]
    else:
        assert bf16["available"], bf16
        _check_latency(bf16)
        assert "bf16" in bf16["quantization"] and len(bf16["predictions"]) == len(base["predictions"])


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_accuracy_matches_independent_count(bench_run, eval_file, which):
    _, result, paths = bench_run
    rec = next(b for b in result["bundles"] if b["path"] == str(Path(paths[which]).resolve()))
    pipe = Pipeline.load(paths[which])
    correct, by_type = 0, {}
    for line in eval_file.read_text().splitlines():
        row = json.loads(line)
        pred = pipe.generate(eval_file.parent / row["image"], row["question"], max_new_tokens=MAX_NEW)
        ok = _norm(pred) == _norm(row["answer"])
        correct += ok
        n, c = by_type.get(row["type"], (0, 0))
        by_type[row["type"]] = (n + 1, c + ok)
    acc = rec["accuracy"]
    assert acc["overall"]["correct"] == correct and acc["overall"]["n"] == 5
    assert acc["overall"]["accuracy"] == pytest.approx(correct / 5)
    assert {t: (v["n"], v["correct"]) for t, v in acc["by_type"].items()} == by_type
    if which == "fp32":
        assert correct >= 2  # the planted rows, matched only through normalisation


def test_without_fp32_drift_is_not_invented(tmp_path, quant_bundle_dir):
    out = tmp_path / "r.json"
    argv = ["--bundle", str(quant_bundle_dir("llama", "int8")), "--n-eval", "2", "--eval-seed", "4", "--runs", "1",
            "--warmup", "0", "--max-new-tokens", "2", "--threads", "1", "--no-baselines", "--no-progress",
            "--bandwidth-mb", "16", "--json", str(out)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["reference"]["bundle"] is None and "no fp32 bundle" in result["reference"]["why"]
    b = result["bundles"][0]
    assert b["drift"]["measured"] is False and "no fp32 bundle" in b["drift"]["reason"]
    assert b["agreement"]["measured"] is False
    assert result["eval"]["seed"] == 4 and result["eval"]["n"] == 2  # generated, seed recorded
    assert all(not v["available"] for v in result["baselines"].values())


def test_bad_bundle_is_one_line_error(tmp_path, capsys):
    assert cli.main(["--bundle", str(tmp_path / "nope"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ib-bench: error: bundle not found")


def test_real_shape_config():
    from ib_edge.bench.scale import ScaleSpec, real_shape_config
    from ib_edge.export.reference_models import build_llm_tokenizer, build_qformer_tokenizer

    cfg = real_shape_config(ScaleSpec(), build_llm_tokenizer("llama"), build_qformer_tokenizer())
    v, q, t = cfg.vision_config, cfg.qformer_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1408, 39, 16, 6144)
    assert (v.image_size, v.patch_size, v.initializer_range) == (224, 14, 0.02)
    assert (q.hidden_size, q.num_hidden_layers, q.cross_attention_frequency, q.encoder_hidden_size) == (768, 12, 2, 1408)
    assert cfg.num_query_tokens == 32
    assert (t.hidden_size, t.num_hidden_layers, t.intermediate_size) == (2048, 22, 5632)
    small = ScaleSpec.with_layers(1)
    assert (small.vision_layers, small.qformer_layers, small.llm_layers, small.vision_hidden) == (1, 1, 1, 1408)


@pytest.mark.skipif(os.environ.get("IB_EDGE_SLOW_TESTS") != "1",
                    reason="~100 s on 2 CPU cores: builds a 1-layer real-width checkpoint (~1 GB, 32k-vocab LLM) "
                           "and exports it twice; run with IB_EDGE_SLOW_TESTS=1")
def test_scale_real_smoke(tmp_path):
    argv = ["--scale", "real", "--scale-layers", "1", "--scale-dir", str(tmp_path / "scale"), "--runs", "1",
            "--warmup", "0", "--n-eval", "1", "--max-new-tokens", "2", "--threads", "1", "--no-progress",
            "--report", str(tmp_path / "rep")]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert result["mode"] == "scale-real" and "NOT Vicuna-7B" in result["scale"]["shapes"]["llm"]
    assert all(b["accuracy"]["applicable"] is False for b in result["bundles"])
    assert result["baselines"]["transformers_fp32_eager"]["available"]
    assert {b["precision"] for b in result["bundles"]} <= {"fp32", "int8"}
    assert len(result["bundles"]) == 3  # fp32, int8, int8 + int4 LLM (the fast decode path)


def test_gpu_check_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run python bench/gpu_check.py --out DIR by hand")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "no CUDA GPU" in result["error"] and result["environment"]["torch"]
    assert re.search(r"no CUDA GPU", (tmp_path / "gpu_check.md").read_text())


def test_kernels_profile_graph(bundle_dir):
    """python -m ib_edge.bench.kernels --profile-graph: per-op-type times of a graph as the runtime runs it."""
    from ib_edge.bench import kernels

    prof = kernels.profile_graph(str(bundle_dir("llama") / "vision.onnx"), threads=1, precision="fp32", runs=2)
    assert prof["run_ms"] > 0
    ops = prof["ms_per_run_by_op"]
    assert "MatMul" in ops or "Gemm" in ops, ops
    assert all(v >= 0 for v in ops.values())
