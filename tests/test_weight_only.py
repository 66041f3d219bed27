"""Weight-only INT8 / mixed 4-8-bit LLMs (quant/weight_only.py, runtime/lowbit.py) for any family.

Expected values: the int8 kernel matches x @ dequant(W).T within bf16 rounding (cosine >=
0.9999); per-channel int8 rounding error is at most half a step. The plan search is checked on
a constructed model whose sensitive layer is known by construction. Proof-t5 answer agreement
is in test_proof_models.py (it reuses that file's fp32 bundle and fresh examples)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ib_edge.quant import int4, weight_only as wo
from ib_edge.quant.budgets import VALIDATION_BUDGET, LogitsBudget
from ib_edge.quant.drift import drift_of
from ib_edge.runtime import Pipeline, engines, formats, lowbit
from ib_edge.runtime.int4 import Int4Linear
from ib_edge.runtime.errors import BundleError


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


@pytest.mark.parametrize("n,k,aligned", [(256, 512, True), (100, 128, True), (37, 96, False)])
def test_int8_linear_matches_dequantized_reference(n, k, aligned):
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.05
    qw = wo.quantize_int8(w)
    q = qw.q
    if not aligned:  # as read from safetensors at an odd offset: the kernel segfaults without a copy
        buf = torch.zeros(n * k + 8, dtype=torch.int8)
        buf[8:] = q.flatten()
        q = buf[8:].view(n, k)
        assert q.data_ptr() % 64
    bias = torch.randn(n)
    lin = lowbit.Int8Linear(q, qw.scales, bias)
    x = torch.randn(2, 3, k).bfloat16().float()
    y = lin(x)
    assert y.shape == (2, 3, n) and y.dtype == torch.float32
    # the kernel: bf16 activations and scales, bf16 output
    ref = x @ (qw.q.float() * qw.scales.bfloat16().float()[:, None]).t() + bias
    assert _cos(y, ref) > 0.9999
    assert (y - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert _cos(y, x @ w.t() + bias) > 0.999
    assert lin.weight.dtype == torch.int8  # transformers' T5 FFN skips its cast for int8 weights


def test_int8_error_within_half_step():
    torch.manual_seed(1)
    w = torch.randn(64, 256) * torch.rand(64, 1) * 3
    qw = wo.quantize_int8(w)
    assert int(qw.q.abs().max()) == 127
    assert bool(((qw.dequantize() - w).abs() <= qw.scales[:, None] / 2 + 1e-7).all())


class _OutputProbe:
    """Drift of a plain module's outputs (as 'logits') on fixed inputs, against fp32."""

    def __init__(self, model, x):
        self.x = x
        with torch.no_grad():
            self.ref = model(x)

    def drift(self, model):
        with torch.no_grad():
            return drift_of([model(self.x)], [self.ref])


def _fake(w, precision, g=32):
    """Independent fake-quant reference (dequantized weights, fp32 math)."""
    return int4.quantize_rtn(w, g).dequantize() if precision == "int4" else wo.quantize_int8(w).dequantize()


@pytest.fixture(scope="module")
def outlier_model():
    """Three 64x64 linears; the middle one has a 30-sigma weight in each group of 32 inputs, on
    an input that is always zero: it changes nothing in fp32, but int4 (15 steps per group)
    rounds the group's other weights away while int8 (127 steps per row) keeps them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)).eval()
    with torch.no_grad():
        for m in (model[0], model[2], model[4]):
            m.weight.normal_(0, 0.15)
        dead = [5, 40]                          # one input column in each group
        model[0].weight[dead] = 0
        model[0].bias[dead] = 0
        model[2].weight[:, dead] = 4.5
    x = torch.randn(256, 64)
    return model, x


def _drift_with(model, x, ref, plan):
    """Drift of ``plan`` computed with fake quant, apart from the code under test."""
    with torch.no_grad():
        h = x
        for i, m in enumerate(model):
            if isinstance(m, nn.Linear):
                p = plan[str(i)]
                w = m.weight if p == "fp32" else _fake(m.weight, p)
                h = h @ w.t() + m.bias
            else:
                h = m(h)
    return drift_of([h], [ref])


def test_search_promotes_the_sensitive_layer_only_when_needed(outlier_model):
    model, x = outlier_model
    probe = _OutputProbe(model, x)
    all4 = _drift_with(model, x, probe.ref, {"0": "int4", "2": "int4", "4": "int4"})
    mid8 = _drift_with(model, x, probe.ref, {"0": "int4", "2": "int8", "4": "int4"})
    assert mid8.cosine_mean - all4.cosine_mean > 0.02, (all4, mid8)   # the construction works
    between = LogitsBudget((all4.cosine_mean + mid8.cosine_mean) / 2, 0.0)
    sw = wo.Swapper(model, wo.linear_names(model), group_size=32)
    rec = wo.search_plan(sw, lambda: probe.drift(model), between)
    assert rec["sensitivity"][0]["name"] == "2"
    assert rec["precisions"] == {"0": "int4", "2": "int8", "4": "int4"}
    assert [p["name"] for p in rec["promoted"]] == ["2"]
    assert all(type(model[i]) is nn.Linear for i in (0, 2, 4))     # search leaves the model as it was
    # a budget all-int4 already meets: nothing promoted
    loose = LogitsBudget(all4.cosine_mean - 0.01, 0.0)
    rec = wo.search_plan(sw, lambda: probe.drift(model), loose)
    assert set(rec["precisions"].values()) == {"int4"} and rec["promoted"] == []
    # a budget only fp32 meets: everything goes through int8 before anything goes to fp32
    strict = LogitsBudget(1.0 - 1e-6, 1.0)
    rec = wo.search_plan(sw, lambda: probe.drift(model), strict)
    order = [p["to"] for p in rec["promoted"]]
    assert order[:3] == ["int8"] * 3 and set(order[3:]) == {"fp32"}
    assert "int4" not in rec["precisions"].values()


class _Blocks(nn.Module):
    """Three blocks of two 64x64 linears (``layers.i.a`` -> tanh -> ``layers.i.b`` -> tanh) and a
    ``head``; block 1 carries the outlier construction of ``outlier_model`` (dead inputs of
    ``layers.1.b`` with 30-sigma weights), so it is the sensitive block by construction."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"a": nn.Linear(64, 64), "b": nn.Linear(64, 64)}) for _ in range(3))
        self.head = nn.Linear(64, 64)

    def forward(self, x, plan=None):
        def lin(name, m, h):
            p = "fp32" if plan is None else plan[name]
            w = m.weight if p == "fp32" else _fake(m.weight, p)
            return h @ w.t() + m.bias
        for i, blk in enumerate(self.layers):
            if plan is None:
                x = torch.tanh(blk["b"](torch.tanh(blk["a"](x))))
            else:
                x = torch.tanh(lin(f"layers.{i}.b", blk["b"], torch.tanh(lin(f"layers.{i}.a", blk["a"], x))))
        return self.head(x) if plan is None else lin("head", self.head, x)


def test_search_units_group_linears_by_block():
    t5 = ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.1.DenseReluDense.wo",
          "encoder.block.11.layer.0.SelfAttention.o", "decoder.block.0.layer.1.EncDecAttention.k", "lm_head"]
    assert wo.units(t5, "block") == {"encoder.block.0": t5[:2], "encoder.block.11": [t5[2]],
                                     "decoder.block.0": [t5[3]], "lm_head": ["lm_head"]}
    assert wo.units(t5, "linear") == {n: [n] for n in t5}
    llama = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    assert list(wo.units(llama, "block")) == ["model.layers.0", "model.layers.1"]
    with pytest.raises(wo.WeightOnlyError, match="search unit"):
        wo.units(t5, "auto")
    # auto: per linear while the pass (linears x seconds per measured forward) fits 10 min
    assert wo.choose_granularity(37, 17, 0.05)[0] == "linear"
    unit, why = wo.choose_granularity(433, 49, 13.0)
    assert unit == "block" and "433 linears" in why and "49 blocks" in why
    assert wo.choose_granularity(433, 49, 13.0, "linear")[0] == "linear"
    with pytest.raises(wo.WeightOnlyError, match="--llm-search"):
        wo.choose_granularity(1, 1, 1.0, "layer")
    from ib_edge.export.options import LLM_SEARCH
    assert LLM_SEARCH == wo.SEARCH_UNITS


def test_block_search_promotes_the_sensitive_block_whole():
    torch.manual_seed(0)
    model = _Blocks().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.15)
        dead = [5, 40]
        model.layers[1]["a"].weight[dead] = 0
        model.layers[1]["a"].bias[dead] = 0
        model.layers[1]["b"].weight[:, dead] = 4.5
    x = torch.randn(256, 64)
    probe = _OutputProbe(model, x)
    names = wo.linear_names(model)
    assert names == ["layers.0.a", "layers.0.b", "layers.1.a", "layers.1.b", "layers.2.a", "layers.2.b", "head"]
    with torch.no_grad():
        all4 = drift_of([model(x, {n: "int4" for n in names})], [probe.ref])
        blk8 = drift_of([model(x, {**{n: "int4" for n in names}, "layers.1.a": "int8", "layers.1.b": "int8"})],
                        [probe.ref])
    assert blk8.cosine_mean - all4.cosine_mean > 0.02, (all4, blk8)   # the construction works
    between = LogitsBudget((all4.cosine_mean + blk8.cosine_mean) / 2, 0.0)
    sw = wo.Swapper(model, names, group_size=32)
    rec = wo.search_plan(sw, lambda: probe.drift(model), between, granularity="block")
    assert [r["name"] for r in rec["sensitivity"]][0] == "layers.1"
    assert {r["name"] for r in rec["sensitivity"]} == {"layers.0", "layers.1", "layers.2", "head"}
    assert rec["sensitivity"][0]["linears"] == 2
    assert rec["precisions"] == {**{n: "int4" for n in names}, "layers.1.a": "int8", "layers.1.b": "int8"}
    assert [p["name"] for p in rec["promoted"]] == ["layers.1"]
    assert rec["drift_all_int4"]["logits_cosine_mean"] == pytest.approx(all4.cosine_mean, abs=5e-3)  # real kernel vs fake quant
    assert all(type(m) is nn.Linear for m in (model.head, model.layers[1]["b"]))   # model left as it was


def test_storage_round_trip_and_refusals(tmp_path, outlier_model):
    """plan_tensors -> safetensors -> swap_linears reproduces the searched modules; the reader
    refuses other formats with one line."""
    from safetensors.torch import save_file

    model, x = outlier_model
    plan = {"0": "int4", "2": "int8", "4": "fp32"}
    stored = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors = wo.plan_tensors(model, stored, plan, 32)
    assert "2.int8_weight" in tensors and "0.qweight" in tensors and "4.weight" in tensors and "2.weight" not in tensors
    save_file(tensors, str(tmp_path / "model.safetensors"),
              metadata={"format": lowbit.WO_FORMAT, "format_version": lowbit.WO_FORMAT_VERSION, "group_size": "32"})
    (tmp_path / "config.json").write_text("{}")
    _, loaded, g = lowbit.read_weight_only(tmp_path)
    clone = nn.Sequential(*[nn.Linear(64, 64) if isinstance(m, nn.Linear) else nn.Tanh() for m in model])
    assert lowbit.swap_linears(clone, loaded, g) == {"0": "int4", "2": "int8"}
    clone.load_state_dict(loaded, strict=False)
    sw = wo.Swapper(model, wo.linear_names(model), 32)
    sw.apply(plan)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
    sw.restore()
    with pytest.raises(wo.WeightOnlyError, match="does not match"):
        wo.plan_tensors(model, stored, {"0": "int8"}, 32)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"),
              metadata={"format": formats.INT4_FORMAT, "format_version": "1"})
    with pytest.raises(BundleError, match="expected 'ib-edge-weight-only'"):
        lowbit.read_weight_only(tmp_path)


def test_old_int4_checkpoints_still_load_on_the_fast_runtime(tmp_path):
    """ib-edge-int4 v1 (written by quant.int4) is untouched by the weight-only format."""
    from ib_edge.export.reference_models import REFERENCE_SPECS, build_model

    lm = build_model(REFERENCE_SPECS["llama"])[0].language_model.eval()
    lm.save_pretrained(tmp_path / "fp32", safe_serialization=True)
    rec = int4.quantize_model_dir(tmp_path / "fp32", tmp_path / "int4", group_size=32)
    assert (rec["format"], rec["format_version"]) == ("ib-edge-int4", "1")
    fast = engines.load(tmp_path / "int4", "torch")
    assert isinstance(fast.lm_head, Int4Linear)


@pytest.fixture(scope="module")
def t5_mixed(reference_dir, tmp_path_factory):
    from ib_edge.export.bundle import export_bundle

    return export_bundle(str(reference_dir("t5")), tmp_path_factory.mktemp("wo") / "t5-mixed", llm_quant="mixed",
                         group_size=32, quiet=True)


def test_mixed_bundle_manifest_plan_and_generation(t5_mixed):
    m = json.loads((t5_mixed / "manifest.json").read_text())
    llm = m["artifacts"]["llm"]
    q = llm["quantization"]
    assert (llm["format"], llm["format_version"], llm["backend"]) == (lowbit.WO_FORMAT, "1", "transformers")
    assert llm["precision"] == "mixed" and q["method"] == "mixed" and q["group_size"] == 32
    plan = json.loads((t5_mixed / "llm" / wo.PLAN_FILE).read_text())
    assert "llm/" + wo.PLAN_FILE in llm["files"]
    assert sum(q["counts"].values()) == len(plan["precisions"]) == 37   # every T5 linear, lm_head included
    assert q["counts"] == wo.counts(plan["precisions"])
    assert [r["name"] for r in plan["sensitivity"]] == plan["order"]
    assert q["validation"]["logits_cosine_mean"] >= VALIDATION_BUDGET.min_cosine_mean
    pipe = Pipeline.load(t5_mixed)
    kinds = {type(mod).__name__ for mod in pipe.llm.model.modules()}
    if q["counts"]["int8"]:
        assert "Int8Linear" in kinds
    if q["counts"]["int4"]:
        assert "HFInt4Linear" in kinds
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), np.uint8))
    streamed = []
    res = pipe.run(image, "Describe this image.", max_new_tokens=8, on_text=streamed.append)
    # T5's token ids start with the decoder start id, as on the fp32 transformers path
    assert 2 <= len(res.token_ids) <= 9 and "".join(streamed) == res.answer
    beams = pipe.run(image, "Describe this image.", max_new_tokens=8, num_beams=3)
    assert 2 <= len(beams.token_ids) <= 9
    a = pipe.run(image, "Describe this image.", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = pipe.run(image, "Describe this image.", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert a.token_ids == b.token_ids


def test_saved_plan_reapplies_bit_for_bit(t5_mixed, reference_dir, tmp_path):
    from ib_edge.export.bundle import export_bundle

    out = export_bundle(str(reference_dir("t5")), tmp_path / "again", llm_quant="mixed", llm_plan=t5_mixed,
                        quiet=True)
    from safetensors import safe_open

    # same tensors and metadata (the file bytes are not: safetensors orders its metadata header
    # differently from run to run)
    with safe_open(str(t5_mixed / "llm/model.safetensors"), "pt") as a, \
            safe_open(str(out / "llm/model.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    plan = json.loads((out / "llm" / wo.PLAN_FILE).read_text())
    assert plan["precisions"] == json.loads((t5_mixed / "llm" / wo.PLAN_FILE).read_text())["precisions"]


def test_rtn_refused_for_t5_points_to_weight_only(reference_dir, tmp_path):
    from ib_edge.export.bundle import ExportError, export_bundle

    with pytest.raises(ExportError, match="Llama") as e:
        export_bundle(str(reference_dir("t5")), tmp_path / "b", llm_quant="rtn", quiet=True)
    assert "--llm-quant int8 or mixed" in e.value.hint
    with pytest.raises(ExportError, match="--llm-plan"):
        export_bundle(str(reference_dir("t5")), tmp_path / "b", llm_quant="int8", llm_plan=tmp_path, quiet=True)
    with pytest.raises(ExportError, match="--llm-search"):
        export_bundle(str(reference_dir("t5")), tmp_path / "b", llm_quant="int8", llm_search="block", quiet=True)
    assert not (tmp_path / "b").exists()


def test_runtime_refuses_unknown_weight_only_version(t5_mixed, tmp_path):
    import shutil

    from ib_edge.runtime.llm import TransformersLLM
    from ib_edge.runtime.manifest import Manifest

    b = shutil.copytree(t5_mixed, tmp_path / "b")
    man = Manifest.load(b)
    man.data["artifacts"]["llm"]["format_version"] = "2"
    with pytest.raises(BundleError, match="version '2'"):
        TransformersLLM(man)
