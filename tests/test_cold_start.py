"""Cold start (issue 15 item 8): an int4 bundle on the ort engine answers from onnxruntime, numpy,
tokenizers and Pillow alone. ``ib-run`` runs in a fresh interpreter here and reports which
modules it imported; the wall-time goal (<= 1.5 s on the proof model) is a benchmark figure in
the README, not a timed test."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ib_edge.bench import proof_task

HEAVY = ("torch", "transformers", "scipy", "onnx", "ml_dtypes")
# runs ib-run's main() in this interpreter, then prints the heavy top-level modules it imported
RUNNER = ("import json, sys\nfrom ib_edge.runtime.cli import main\nrc = main(sys.argv[1:])\n"
          "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(%r))), file=sys.stderr)\n"
          "raise SystemExit(rc)\n" % (HEAVY,))


def ib_run(*args: str) -> tuple[list[dict], list[str]]:
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args, "--json"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = json.loads(proc.stderr.strip().splitlines()[-1])
    return [json.loads(line) for line in proc.stdout.splitlines()], imported


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    out = []
    for i, ex in enumerate(proof_task.make_eval_examples(3, seed=15)):
        path = d / f"{i}.png"
        ex["image"].save(path)
        out.append((str(path), ex["question"], ex["answer"]))
    return out


def test_int4_ort_bundle_answers_without_torch(proof_bundle, examples):
    """ib-run on a proof-llama rtn bundle: the default engine is ort, and neither torch,
    transformers, scipy nor onnx is imported; the answers equal the torch engine's (which
    imports torch) and are right; --json carries load_ms, token counts, precisions and the engine."""
    bundle = str(proof_bundle("proof-llama", "fp32", "rtn"))
    for image, question, answer in examples:
        (ort,), imported = ib_run("--bundle", bundle, image, question)
        assert imported == [], f"ib-run on the ort engine imported {imported}"
        assert ort["llm_engine"] == "ort" and proof_task.is_correct(ort["answer"], answer), (ort, answer)
        (tor,), imported_torch = ib_run("--bundle", bundle, image, question, "--llm-engine", "torch")
        assert "torch" in imported_torch and tor["llm_engine"] == "torch"
        assert tor["answer"] == ort["answer"]
        assert ort["precision"] == {"vision": "fp32", "qformer": "fp32", "llm": "int4"}
        assert ort["load_ms"] > 0 and ort["completion_tokens"] >= 1
        # the query tokens + the question's tokens (the proof tokenizer: at least one per word)
        n_query = json.loads((Path(bundle) / "manifest.json").read_text())["model"]["num_query_tokens"]
        assert ort["prompt_tokens"] >= n_query + len(question.split())


def test_beam_search_on_the_ort_engine(proof_bundle, examples):
    """Beams on the ort engine (bookkeeping in torch, imported for it) give the torch engine's
    answer; --json on a transformers-LLM bundle names that engine."""
    bundle = str(proof_bundle("proof-llama", "fp32", "rtn"))
    image, question, _ = examples[0]
    (ort,), imported = ib_run("--bundle", bundle, image, question, "--num-beams", "3")
    (tor,), _ = ib_run("--bundle", bundle, image, question, "--num-beams", "3", "--llm-engine", "torch")
    assert "torch" in imported and ort["answer"] == tor["answer"]
    (fp32,), imported = ib_run("--bundle", str(proof_bundle("proof-llama")), image, question)
    assert fp32["llm_engine"] == "transformers" and fp32["precision"]["llm"] == "float32"
    assert "transformers" in imported


def test_cached_kernel_choice_keeps_the_cold_path(proof_bundle, examples, tmp_path, monkeypatch):
    """Without IB_EDGE_LLM_KERNEL the first load measures the kernels (and writes the cache under
    IB_EDGE_HOME); the second load reads the cache: where an ort kernel won, it answers without
    importing torch, where the torch kernel won it must import torch."""
    monkeypatch.delenv("IB_EDGE_LLM_KERNEL", raising=False)
    monkeypatch.setenv("IB_EDGE_HOME", str(tmp_path))
    bundle = str(proof_bundle("proof-llama", "fp32", "rtn"))
    image, question, answer = examples[0]
    (first,), _ = ib_run("--bundle", bundle, image, question)
    cache = json.loads((tmp_path / "llm-kernels.json").read_text())
    (entry,) = cache["entries"].values()
    (second,), imported = ib_run("--bundle", bundle, image, question)
    assert second["answer"] == first["answer"] and proof_task.is_correct(second["answer"], answer)
    if entry["kernel"].startswith("ort"):
        assert imported == [], f"a cached {entry['kernel']} choice imported {imported}"
    else:
        assert "torch" in imported
