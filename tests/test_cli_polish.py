"""ib-run / ib-export behaviour from issue 15 (items 10, 11): the proof-model note, answers
without the byte-level BPE leading space, --llm-engine refused where it cannot apply, --providers
in order of preference, help texts."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from ib_edge.runtime import cli as run_cli

NOTE = "only knows the synthetic shapes task"


def _ib_run(bundle, image, *extra):
    return subprocess.run([sys.executable, "-m", "ib_edge.runtime.cli", "--bundle", str(bundle), str(image),
                           "What color is the square?", "--max-new-tokens", "4", "--threads", "1", *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (64, 64), (220, 20, 20)).save(p)
    return p


@pytest.fixture(scope="module")
def proof_marked(bundle_dir, tmp_path_factory):
    """The llama test bundle with its manifest's source kind set to "proof" (what ib-export
    writes for the embedded proof models)."""
    dst = tmp_path_factory.mktemp("proofmark") / "b"
    shutil.copytree(bundle_dir("llama"), dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["source"]["kind"] = "proof"
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_proof_bundle_note_once_and_answer_without_leading_space(proof_marked, bundle_dir, image):
    proc = _ib_run(proof_marked, image, "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(NOTE) == 1 and "ib-export Salesforce/" in proc.stderr
    answer = json.loads(proc.stdout)["answer"]
    assert not answer.startswith(" ")
    plain = _ib_run(bundle_dir("llama"), image)
    assert plain.returncode == 0 and NOTE not in plain.stderr
    assert plain.stdout.rstrip("\n") == answer  # streamed text == JSON answer


def test_decode_drops_only_the_bpe_word_boundary(bundle_dir):
    from ib_edge.runtime import Pipeline

    enc = Pipeline.load(bundle_dir("llama")).prompts
    ids = enc.llm.encode(" yellow", add_special_tokens=False).ids
    assert enc.llm.decode(ids) == " yellow"          # the tokenizer itself keeps the space
    assert enc.decode(ids) == "yellow"
    ids2 = enc.llm.encode("  two", add_special_tokens=False).ids
    assert enc.decode(ids2) == " two"                # only one space goes


def test_llm_engine_refused_on_transformers_bundle(bundle_dir, image):
    proc = _ib_run(bundle_dir("t5"), image, "--llm-engine", "ort")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--llm-engine ort applies to the fast Llama path" in lines[0]


def test_providers_in_order_of_preference(bundle_dir, image):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has TensorRT: nothing to fall back from")
    proc = _ib_run(bundle_dir("llama"), image, "--providers", "tensorrt,cpu")
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if "lacks" in ln]
    assert notes == ["ib-run: note: this ONNX Runtime lacks tensorrt; using cpu"]
    bad = _ib_run(bundle_dir("llama"), image, "--providers", "tensorrt")
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "none of --providers tensorrt" in lines[0]
    typo = _ib_run(bundle_dir("llama"), image, "--providers", "cdua,cpu")
    assert typo.returncode == 2 and "cdua is not tensorrt, cuda or cpu" in typo.stderr


def test_run_help_explains_every_generation_flag():
    acts = {a.dest: a for a in run_cli.build_parser()._actions}
    for dest in ("max_new_tokens", "num_beams", "temperature", "top_p", "seed"):
        assert acts[dest].help, dest


@pytest.mark.parametrize("model, noted", [("proof-llama", True), ("local", False)])
def test_export_closing_line_notes_the_proof_model(model, noted, tmp_path, monkeypatch, capsys, reference_dir):
    """The closing line, with the export itself replaced (only the CLI's wording is under test)."""
    from ib_edge.export import bundle, cli

    monkeypatch.setattr(bundle, "export_bundle", lambda ref, out, **kw: out)
    ref = "proof-llama" if model == "proof-llama" else str(reference_dir("llama"))
    assert cli.main([ref, "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("try: ib-run --bundle") and (NOTE in err) == noted


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_beam_search_splits_prefill_and_decode(bundle_dir, image, family):
    from ib_edge.runtime import Pipeline

    pipe = Pipeline.load(bundle_dir(family), threads=1)
    res = pipe.run(Image.open(image), "What color is the square?", max_new_tokens=5, num_beams=3, min_new_tokens=5)
    t = res.timings_ms
    assert t["llm_prefill"] > 0 and t["llm_decode"] > 0, t
