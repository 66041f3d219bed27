"""Exported ONNX graphs vs PyTorch fp32, per family and graph, at batch 1 and 3, two
instruction lengths, padded masks. Tolerances come from the graph specs."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ib_edge.export import onnx_export, specs, wrappers

from .conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage", ["vision", "qformer"])
def test_graph_parity(family, stage, bundle_dir, reference_dir, torch_model):
    model, processor = torch_model(reference_dir(family))
    spec = specs.GRAPH_SPECS[stage](model.config)
    module = wrappers.WRAPPERS[stage](model).eval()
    manifest = json.loads((bundle_dir(family) / "manifest.json").read_text())
    art = manifest["artifacts"][stage]
    sess = ort.InferenceSession(str(bundle_dir(family) / art["file"]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1234)
    for batch in (1, 3):
        for text_len in (4, 21):
            feeds = spec.make_inputs(rng, batch, text_len)
            if stage == "qformer" and batch == 3:
                assert feeds["qformer_attention_mask"].min() == 0 or text_len == 1
            with torch.no_grad():
                ref = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names)).numpy()
            got = sess.run(None, feeds)[0]
            assert got.shape == ref.shape
            for name, t in zip(spec.output_names, spec.outputs):
                expected = tuple(batch if d == specs.BATCH else d for d in t.shape)
                assert got.shape == expected, (name, got.shape, expected)
            cos = onnx_export.cosine(got, ref)
            err = float(np.abs(got - ref).max())
            tol = spec.tolerance
            assert cos >= tol.min_cosine, f"{family}/{stage} b={batch} t={text_len}: cosine {cos}"
            assert err <= tol.max_abs_rel * float(np.abs(ref).max()), f"{family}/{stage}: max-abs {err}"


@pytest.mark.parametrize("family", FAMILIES)
def test_qformer_uses_instruction_and_mask(family, bundle_dir):
    """The instruction changes query_embeds, and padded positions do not."""
    d = bundle_dir(family)
    manifest = json.loads((d / "manifest.json").read_text())
    sess = ort.InferenceSession(str(d / manifest["artifacts"]["qformer"]["file"]), providers=["CPUExecutionProvider"])
    seq, dim = manifest["artifacts"]["qformer"]["inputs"][0]["shape"][1:]
    rng = np.random.default_rng(0)
    img = rng.normal(size=(1, seq, dim)).astype(np.float32)
    a = np.array([[5, 6, 7, 8]], np.int64)
    b = np.array([[9, 10, 11, 12]], np.int64)
    ones = np.ones_like(a)
    qa = sess.run(None, {"image_embeds": img, "qformer_input_ids": a, "qformer_attention_mask": ones})[0]
    qb = sess.run(None, {"image_embeds": img, "qformer_input_ids": b, "qformer_attention_mask": ones})[0]
    assert np.abs(qa - qb).max() > 1e-3
    padded = np.concatenate([a, [[13, 14]]], 1)
    mask = np.array([[1, 1, 1, 1, 0, 0]], np.int64)
    qp = sess.run(None, {"image_embeds": img, "qformer_input_ids": padded, "qformer_attention_mask": mask})[0]
    np.testing.assert_allclose(qp, qa, atol=1e-5)


def test_manifest_records_validation_and_hashes(bundle_dir):
    from ib_edge.runtime.manifest import sha256_file

    d = bundle_dir("llama")
    m = json.loads((d / "manifest.json").read_text())
    assert m["schema_version"] == 1
    for stage in ("vision", "qformer"):
        art = m["artifacts"][stage]
        assert art["validation"]["cosine"] >= 0.99999
        assert art["opset"] >= 18 and art["precision"] == "fp32"
        for rel, digest in art["files"].items():
            assert sha256_file(d / rel) == digest
    assert [t["name"] for t in m["artifacts"]["qformer"]["inputs"]] == [
        "image_embeds", "qformer_input_ids", "qformer_attention_mask"]
    assert m["artifacts"]["qformer"]["outputs"][0]["shape"] == ["batch", 16, 128]
    assert m["artifacts"]["llm"]["files"] and m["artifacts"]["processor"]["files"]
    assert m["source"]["config_sha256"] and m["tools"]["onnxruntime"]


def test_export_releases_the_torch_model(reference_dir, tmp_path):
    """After export_graph the module's parameters must be freeable: onnxscript's rewrite rules
    otherwise keep the exported graph, whose initializers wrap the torch parameters (at real
    shape this kept the checkpoint's 3+ GB resident under INT8 calibration)."""
    import gc
    import weakref

    from transformers import InstructBlipForConditionalGeneration

    model = InstructBlipForConditionalGeneration.from_pretrained(str(reference_dir("opt")), use_safetensors=True).eval()
    spec = specs.GRAPH_SPECS["qformer"](model.config)
    module = wrappers.WRAPPERS["qformer"](model).eval()
    refs = [weakref.ref(p) for p in module.parameters()]
    onnx_export.export_graph(module, spec, tmp_path / "qformer.onnx", np.random.default_rng(0))
    del model, module
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of {len(refs)} Q-Former parameters still referenced after export"
