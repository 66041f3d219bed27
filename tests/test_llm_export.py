"""ib-export --llm-quant: the bundle's LLM in 4 bits on the fast int4 runtime."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ib_edge.runtime import InputError, Pipeline


def _first_logits(pipe, image, prompt):
    enc = pipe.prompts.encode(prompt)
    q = pipe.query_embeds(pipe.image_embeds(pipe.pixel_values([image])), enc["qformer_input_ids"],
                          enc["qformer_attention_mask"])
    return q, enc


def test_rtn_bundle_manifest_and_runtime(rtn_bundle, bundle_dir):
    m = json.loads((rtn_bundle / "manifest.json").read_text())
    llm = m["artifacts"]["llm"]
    assert llm["backend"] == "fastllm" and llm["precision"] == "int4" and llm["format"] == "ib-edge-int4"
    assert llm["quantization"]["method"] == "rtn" and llm["quantization"]["group_size"] == 32
    assert llm["quantization"]["quantized_linears"] > 0
    assert "llm/generation_config.json" in llm["files"]  # kept for the runtime's beam settings
    v = llm["quantization"]["validation"]   # checked through the runtime right after writing
    assert v["engine"] == "ort" and v["inputs"]["split"] == "heldout" and v["tokens"] > 0
    assert v["logits_cosine_mean"] >= v["budget"]["min_cosine_mean"] and v["within_budget"] is True
    pipe = Pipeline.load(rtn_bundle)
    ref = Pipeline.load(bundle_dir("llama"))
    from ib_edge.runtime.llm import FastLLM
    assert isinstance(pipe.llm, FastLLM)
    rng = np.random.default_rng(0)
    cos = []
    for i, prompt in enumerate(["Describe this image.", "What color is the circle?", "How many shapes?"]):
        image = Image.fromarray(rng.integers(0, 256, (120, 150, 3), np.uint8))
        q, enc = _first_logits(pipe, image, prompt)
        with torch.no_grad():
            pipe.llm.model.setup_cache(enc["input_ids"].shape[1] + 1)
            got = np.asarray(pipe.llm.model(pipe.llm.embeds(q, enc["input_ids"]), 0)[0])   # ort engine: numpy
            lm = ref.llm.model
            ids = torch.from_numpy(enc["input_ids"])
            emb = lm.get_input_embeddings()(ids).masked_scatter((ids == ref.llm.image_token_id).unsqueeze(-1),
                                                                 torch.from_numpy(q))
            full = lm(inputs_embeds=emb).logits[0, -1].numpy()
        cos.append(float(got @ full / np.linalg.norm(got) / np.linalg.norm(full)))
        res = pipe.run(image, prompt, max_new_tokens=6)  # end to end on the int4 runtime
        assert 1 <= len(res.token_ids) <= 6 and res.timings_ms["llm_decode"] >= 0
    assert min(cos) > 0.95, cos


def test_llm_engines_agree_on_the_int4_bundle(rtn_bundle, tmp_path):
    """--llm-engine ort (default) and torch run the same int4 weights: first-token logits agree
    (cosine >= 0.999) through the whole pipeline, both CLIs answer, a bad engine is one line."""
    pipes = {e: Pipeline.load(rtn_bundle, llm_engine=e) for e in ("ort", "torch")}
    assert pipes["ort"].llm.engine == "ort" and pipes["torch"].llm.engine == "torch"
    assert Pipeline.load(rtn_bundle).llm.engine == "ort"
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8))
    logits = {}
    for e, pipe in pipes.items():
        q, enc = _first_logits(pipe, image, "What is in the picture?")
        pipe.llm.model.setup_cache(enc["input_ids"].shape[1] + 1)
        logits[e] = torch.as_tensor(pipe.llm.model(pipe.llm.embeds(q, enc["input_ids"]), 0)[0])
    cos = float(torch.nn.functional.cosine_similarity(logits["ort"], logits["torch"], dim=0))
    assert cos >= 0.999, cos
    img = tmp_path / "x.png"
    image.save(img)
    cli = [sys.executable, "-m", "ib_edge.runtime.cli", "--bundle", str(rtn_bundle), str(img), "hi",
           "--max-new-tokens", "3", "--json"]
    for e in ("ort", "torch"):
        ok = subprocess.run(cli + ["--llm-engine", e], capture_output=True, text=True, timeout=300)
        assert ok.returncode == 0 and json.loads(ok.stdout)["answer"] is not None, ok.stderr
    bad = subprocess.run(cli + ["--llm-engine", "tensorrt"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--llm-engine" in bad.stderr


def test_fast_runtime_beams_and_refusals(rtn_bundle, tmp_path):
    """The int4 bundle takes --num-beams through the CLI; beams with sampling, or zero beams,
    get one line and exit 2."""
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (10, 200, 10)).save(img)
    cli = [sys.executable, "-m", "ib_edge.runtime.cli", "--bundle", str(rtn_bundle), str(img), "hi",
           "--max-new-tokens", "4"]
    ok = subprocess.run(cli + ["--num-beams", "2"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    for bad in (["--num-beams", "2", "--temperature", "0.7"], ["--num-beams", "0"]):
        proc = subprocess.run(cli + bad, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "beam" in proc.stderr
    with pytest.raises(InputError):
        Pipeline.load(rtn_bundle).generate(Image.new("RGB", (40, 40)), "hi", num_beams=3, top_p=0.5)


def test_broken_int4_llm_fails_validation_and_leaves_nothing(reference_dir, tmp_path, monkeypatch):
    """A mis-packed int4 checkpoint (nibbles inverted after RTN) is caught by the export's
    held-out validation through the runtime: ExportError naming the metric, no bundle written."""
    from safetensors.torch import load_file, save_file

    from ib_edge.export.bundle import ExportError, export_bundle
    from ib_edge.quant import int4

    real = int4.quantize_model_dir

    def broken(src, dst, **kw):
        rec = real(src, dst, **kw)
        for f in Path(dst).glob("*.safetensors"):
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                meta = sf.metadata()
            t = load_file(str(f))
            save_file({k: (255 - v if k.endswith(".qweight") else v) for k, v in t.items()}, str(f), metadata=meta)
        return rec

    monkeypatch.setattr(int4, "quantize_model_dir", broken)
    out = tmp_path / "b"
    with pytest.raises(ExportError, match="int4 LLM validation.*cosine"):
        export_bundle(str(reference_dir("llama")), out, llm_quant="rtn", group_size=32, quiet=True)
    assert not out.exists() and not list(tmp_path.glob(".b*"))
    # random-weight benchmark bundles (ib-bench --scale real) record the miss instead
    export_bundle(str(reference_dir("llama")), out, llm_quant="rtn", group_size=32, quiet=True, llm_validation="record")
    v = json.loads((out / "manifest.json").read_text())["artifacts"]["llm"]["quantization"]["validation"]
    assert v["within_budget"] is False and v["logits_cosine_mean"] < v["budget"]["min_cosine_mean"]


def test_llm_quant_refuses_t5(reference_dir, tmp_path):
    from ib_edge.export.bundle import ExportError, export_bundle

    with pytest.raises(ExportError, match="Llama"):
        export_bundle(str(reference_dir("t5")), tmp_path / "b", llm_quant="rtn", quiet=True)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ExportError, match="--llm-calib"):
        export_bundle(str(reference_dir("llama")), tmp_path / "b", llm_quant="rtn", llm_calib="text", quiet=True)
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                    reason="gptqmodel is not installed (pip install -c constraints.txt gptqmodel==7.6.0)")
@pytest.mark.parametrize("method,calib", [("gptq", "multimodal"), ("awq", "multimodal"), ("gptq", "text")])
def test_gptq_awq_bundle(method, calib, reference_dir, tmp_path):
    from ib_edge.export.bundle import export_bundle

    out = export_bundle(str(reference_dir("llama")), tmp_path / method, llm_quant=method, group_size=32,
                        llm_calib=calib, quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    llm = m["artifacts"]["llm"]
    source = {"multimodal": "multimodal", "text": "text-only"}[calib]
    assert llm["llm_quant"]["method"] == method and llm["llm_quant"]["calibration"]["source"] == source
    assert (out / llm["hf_checkpoint"]["dir"] / "config.json").is_file()
    from ib_edge.runtime.llm import FastLLM

    pipe = Pipeline.load(out)
    res = pipe.run(Image.new("RGB", (64, 64), (200, 20, 20)), "What color?", max_new_tokens=4)
    assert isinstance(pipe.llm, FastLLM) and 1 <= len(res.token_ids) <= 4


def test_export_cli_passes_llm_validation(monkeypatch, tmp_path):
    """ib-export --llm-validation reaches export_bundle (default enforce); a bad value is refused."""
    from ib_edge.export import bundle, cli

    seen = {}

    def fake(model, out, **kw):
        seen.update(kw)
        return Path(out)

    monkeypatch.setattr(bundle, "export_bundle", fake)
    assert cli.main(["proof-llama", "--out", str(tmp_path / "b"), "--llm-quant", "rtn", "--quiet"]) == 0
    assert seen["llm_validation"] == "enforce"
    assert cli.main(["proof-llama", "--out", str(tmp_path / "b"), "--llm-quant", "rtn", "--quiet",
                     "--llm-validation", "record"]) == 0
    assert seen["llm_validation"] == "record"
    with pytest.raises(SystemExit) as e:
        cli.main(["proof-llama", "--llm-validation", "maybe"])
    assert e.value.code == 2
