"""GPTQ / AWQ through gptqmodel, calibrated on the bundle's own query embeddings, converted to
the fast runtime's int4 format. Skips where gptqmodel is not installed.

Expected (tiny llama reference bundle, group 32, 4 images x 2 instructions): last-position
logits cosine vs fp32 on multimodal prompts, GPTQ ~0.999, AWQ ~0.994 (RTN: ~0.987)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gptqmodel", reason="gptqmodel not installed (pip install -c constraints.txt gptqmodel==7.6.0)")

from ib_edge.quant import int4, llm_quant  # noqa: E402
from ib_edge.quant.calibration import CalibrationSet  # noqa: E402
from ib_edge.runtime import engines  # noqa: E402
from ib_edge.runtime.decode import as_numpy  # noqa: E402
from ib_edge.runtime.manifest import Manifest  # noqa: E402


@pytest.fixture(scope="module")
def calib_examples(bundle_dir):
    bundle = bundle_dir("llama")
    ex, rec = llm_quant.multimodal_examples(bundle, CalibrationSet.load(), max_images=4)
    return bundle, ex, rec


def _embeds(model, e, image_id):
    ids = torch.from_numpy(e.input_ids)[None]
    return model.embed(ids).masked_scatter((ids == image_id)[..., None], torch.from_numpy(e.query_embeds))


@pytest.mark.parametrize("method,min_cos", [("gptq", 0.995), ("awq", 0.985)])
def test_gptqmodel_checkpoint_runs_on_int4_kernel(calib_examples, tmp_path, method, min_cos):
    bundle, ex, rec = calib_examples
    m = Manifest.load(bundle)
    image_id = m.model["image_token_id"]
    assert rec["source"] == "multimodal" and len(ex) == 8 and ex[0].query_embeds.shape[0] == m.model["num_query_tokens"]
    out = llm_quant.quantize_llm(bundle / "llm", tmp_path / method, ex, method=method, group_size=32,
                                 image_token_id=image_id, tokenizer_dir=bundle / "processor", calib_record=rec)
    assert out["method"] == method and out["bits"] == 4 and out["group_size"] == 32
    assert out["calibration"]["calibration_sha256"] == CalibrationSet.load().sha256
    qc = json.loads((tmp_path / method / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and qc["group_size"] == 32
    conv = int4.convert_quantized_checkpoint(tmp_path / method, tmp_path / f"{method}-int4")
    assert conv["method"] == method and conv["quantized_linears"] == 14
    fp, q = engines.load(bundle / "llm"), engines.load(tmp_path / f"{method}-int4")
    cos = []
    for e in ex:
        x = _embeds(fp, e, image_id)
        fp.setup_cache(64)
        q.setup_cache(64)
        # fp32 weights run on the torch engine, int4 on the ort engine (numpy logits)
        cos.append(float(torch.nn.functional.cosine_similarity(torch.as_tensor(as_numpy(fp(x, 0)[0])),
                                                               torch.as_tensor(as_numpy(q(x, 0)[0])), dim=0)))
    assert sum(cos) / len(cos) >= min_cos, cos


def test_text_only_baseline_examples(bundle_dir):
    bundle = bundle_dir("llama")
    cal = CalibrationSet.load()
    ex, rec = llm_quant.text_examples(bundle, cal)
    image_id = Manifest.load(bundle).model["image_token_id"]
    assert rec["source"] == "text-only" and len(ex) == len(cal.instructions)
    assert all(e.query_embeds is None and image_id not in e.input_ids for e in ex)
