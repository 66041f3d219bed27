"""The memory and speed planner (bench/plan.py), ib-bench --plan, ib-export --target, and the
real-size checkpoint builder (export/real_sizes.py) at reduced depth.

Expected bytes are derived here by hand from the published config numbers (hidden 4096,
intermediate 11008, 32 layers, vocab 32001, ...), not from the planner's own counting (which
instantiates the model on the meta device)."""
from __future__ import annotations

import json

import pytest

from ib_edge.bench import plan

GiB = 1024 ** 3
H, I, L, V = 4096, 11008, 32, 32001          # Vicuna-7B (Salesforce/instructblip-vicuna-7b text_config)
LIN = L * (4 * H * H + 3 * H * I)            # q, k, v, o + gate, up, down per layer
NORMS = (2 * L + 1) * H                       # two RMSNorms per layer + the final one


def _vision_params():
    """ViT-g/14 at 224: 39 layers, hidden 1408, MLP 6144, fused qkv with bias, LayerNorms with bias."""
    h, m, n, t = 1408, 6144, 39, (224 // 14) ** 2 + 1
    layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * m + m) + (m * h + h) + 2 * 2 * h
    embeddings = 3 * 14 * 14 * h + h + h + t * h     # patch conv + bias, class token, positions
    return n * layer + embeddings + 2 * h             # + post LayerNorm


@pytest.fixture(scope="module")
def vicuna():
    return plan.load_source("instructblip-vicuna-7b", plan.PlanOptions())


def _stages(src, dev, **opts):
    return plan.stage_bytes(plan.Source(src.counts, plan.PlanOptions(**opts), src.origin), dev)


def test_vicuna_counts_match_the_published_shapes(vicuna):
    c = vicuna.counts
    assert c.llm_linear == LIN
    assert c.llm_embed == V * H and c.llm_head == V * H and not c.llm_head_tied
    assert c.llm_other == NORMS
    assert c.vision_matmul + c.vision_other == _vision_params()
    assert c.llm_params == LIN + 2 * V * H + NORMS  # 6.74 B, Vicuna-7B with the <image> row


def test_fp16_weights_and_kv_on_a_jetson(vicuna):
    s = _stages(vicuna, plan.DEVICES["agx-orin-64"], context=2048)
    assert s["bytes"]["llm weights"] == (LIN + 2 * V * H + NORMS) * 2
    assert s["bytes"]["kv cache"] == 2 * L * H * 2048 * 2 == 1 * GiB
    # one decode step reads every linear, lm_head, the norms, one embedding row, and the whole cache
    assert s["per_token"] == (LIN + V * H + NORMS + H) * 2 + 1 * GiB


def test_int4_on_the_cpu_runtime_counts_fp32_scales_and_embeddings(vicuna):
    s = _stages(vicuna, plan.host_device(), llm_quant="rtn", group_size=128, context=100)
    lin = LIN + V * H                                   # lm_head is quantized too
    packed = lin // 2 + lin // 128 * (4 + 1)            # nibbles + fp32 scale + uint8 zero per group
    assert s["bytes"]["llm weights"] == packed + (V * H + NORMS) * 4
    assert s["bytes"]["kv cache"] == 2 * L * H * 100 * 4   # the fast runtime's static cache is fp32
    assert s["bytes"]["runtime overhead"] == plan.OVERHEAD["cpu-fastllm"]


def test_fits_and_decode_bound_on_a_custom_device(vicuna):
    opts = plan.PlanOptions(llm_quant="rtn", context=512)
    src = plan.Source(vicuna.counts, opts, "preset")
    total = plan.plan_device(src, plan.custom_device(64, 100.0))["total_bytes"]
    just_fits = plan.custom_device((total / GiB) + 1.0 + 0.01, 100.0)   # + the 1 GiB OS reserve
    just_not = plan.custom_device((total / GiB) + 1.0 - 0.01, 100.0)
    assert plan.plan_device(src, just_fits)["fits"] and not plan.plan_device(src, just_not)["fits"]
    p = plan.plan_device(src, just_fits)
    lin = LIN + V * H
    per_token = lin // 2 + lin // 128 * (2 + 0.5) + (NORMS + H) * 2 + 2 * L * H * 512 * 2
    assert p["decode_bytes_per_token"] == pytest.approx(per_token, rel=1e-6)
    assert p["decode_bound_tok_s"] == pytest.approx(100e9 / per_token, rel=1e-6)
    assert 0.5 < p["realistic_fraction"] < 1.0   # MLC's published 46.9 tok/s on AGX Orin against its bound


def test_flan_t5_xl_kv_uses_decoder_layers_and_all_heads():
    src = plan.load_source("instructblip-flan-t5-xl", plan.PlanOptions(llm_quant="int8", context=256))
    c = src.counts
    assert (c.family, c.dec_layers, c.kv_dim, c.hidden) == ("t5", 24, 32 * 64, 2048)
    s = plan.stage_bytes(src, plan.DEVICES["orin-nx-16"])
    assert s["bytes"]["kv cache"] == 2 * 24 * 2048 * 256 * 2
    # a decode step reads the decoder (self-attn + cross-attn q/k/v/o, gated FFN) and lm_head, not the encoder
    d, ff, vocab = 2048, 5120, 32128
    decoder = 24 * (8 * d * d + 3 * d * ff)
    assert c.llm_decode_linear == decoder
    assert c.llm_linear == decoder + 24 * (4 * d * d + 3 * d * ff)
    # the CPU weight-only loader builds on the meta device: no fp32 moment to add (tests/test_streamed.py)
    host = plan.plan_device(src, plan.host_device())
    assert host["peak_bytes"] == host["total_bytes"]
    jetson = plan.plan_device(src, plan.DEVICES["orin-nx-16"])
    assert jetson["peak_bytes"] == jetson["total_bytes"]


def test_cpu_int4_peak_adds_the_prepack_staging_copy():
    """ONNX Runtime prepacks MatMulNBits weights while the runtime's int4 arrays are alive: the
    CPU int4 peak is the steady total + the quantized linears once (measured on the full
    Vicuna-7B bundle); a Jetson's GPU runtime and the weight-only CPU runtime add nothing."""
    src = plan.load_source("instructblip-vicuna-7b", plan.PlanOptions(precision="int8", llm_quant="rtn", context=71))
    c = src.counts
    host = plan.plan_device(src, plan.host_device())
    linears = (c.llm_linear + c.llm_head) * (0.5 + 5 / 128)   # nibbles + fp32 scale + 1 B zero per 128
    assert host["load_transient_bytes"] == int(linears)
    assert host["peak_bytes"] == host["total_bytes"] + host["load_transient_bytes"]
    assert 3.3 * 2**30 < host["load_transient_bytes"] < 3.7 * 2**30    # 6.5 B linears at ~4.3 bits
    agx = plan.plan_device(src, plan.DEVICES["agx-orin-64"])
    assert agx["peak_bytes"] == agx["total_bytes"] and agx["load_transient_bytes"] == 0


def test_plan_of_a_bundle_uses_its_files(bundle_dir):
    b = bundle_dir("llama")
    m = json.loads((b / "manifest.json").read_text())
    src = plan.load_source(str(b), plan.PlanOptions())
    assert src.origin == "bundle"
    llm_files = sum((b / rel).stat().st_size for rel in m["artifacts"]["llm"]["files"])
    assert src.file_bytes["llm"] == llm_files
    p = plan.plan_device(src, plan.host_device())
    assert p["stages"]["llm weights"] == llm_files and p["fits"]


def test_ib_bench_plan_cli(tmp_path, capsys):
    from ib_edge.bench.cli import main

    out = tmp_path / "plan.json"
    assert main(["--plan", "instructblip-vicuna-7b", "--llm-quant", "rtn", "--context", "1024",
                 "--memory-gb", "12", "--bandwidth-gbs", "50", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| orin-nano-4 |" in text and "| custom |" in text and "decode bound" in text
    data = json.loads(out.read_text())
    assert [d["device"]["name"] for d in data["devices"]][-1] == "custom"
    nano4 = next(d for d in data["devices"] if d["device"]["name"] == "orin-nano-4")
    # int4 LLM (~3.5 GiB) beside fp32 graphs: ViT-g in fp32 (0.99 B params, 3.7 GiB) is the largest part
    assert not nano4["fits"] and nano4["largest"] == "vision weights"
    assert main(["--plan", "no-such-model"]) == 2
    assert "is not a preset" in capsys.readouterr().err


def test_ib_export_target_refuses_before_any_work(tmp_path, capsys):
    from ib_edge.export.cli import main

    out = tmp_path / "bundle"
    assert main(["Salesforce/instructblip-vicuna-7b", "--out", str(out), "--target", "orin-nx-16"]) == 2
    err = capsys.readouterr().err
    assert "does not fit orin-nx-16" in err and "largest part: llm weights" in err and "--llm-quant rtn" in err
    assert not out.exists()
    assert main(["Salesforce/instructblip-vicuna-7b", "--out", str(out), "--target", "orin-nano-8",
                 "--llm-quant", "rtn", "--context", "64000"]) == 2
    assert "largest part: kv cache" in capsys.readouterr().err
    assert main(["proof-llama", "--context", "10"]) == 2


def test_builder_at_reduced_depth_loads_in_fp16_with_sane_init(tmp_path):
    import torch
    from transformers import InstructBlipForConditionalGeneration

    from ib_edge.export import real_sizes

    out = tmp_path / "t5xl-1"
    rec = real_sizes.build_checkpoint("instructblip-flan-t5-xl", out, layers=1, shard_mb=200)
    assert rec["shards"] >= 2                      # written as it went, not in one piece
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == rec["bytes"] == rec["params"] * 2
    model, info = InstructBlipForConditionalGeneration.from_pretrained(out, dtype="auto", output_loading_info=True)
    assert not any(info.values()), info            # no missing, unexpected or mismatched keys
    sd = model.state_dict()
    lm = "language_model.encoder.block.0.layer."
    assert sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape == (6144, 1408)
    assert sd[lm + "1.DenseReluDense.wi_0.weight"].shape == (5120, 2048)
    assert sd["language_model.shared.weight"].shape == (32128, 2048)
    from safetensors import safe_open

    for f in out.glob("model-*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            assert {sf.get_slice(k).get_dtype() for k in sf.keys()} == {"F16"}, f   # written in fp16
    for name, std in [("vision_model.encoder.layers.0.mlp.fc1.weight", 0.02),
                      ("qformer.encoder.layer.0.crossattention.attention.key.weight", 0.02),
                      (lm + "0.SelfAttention.q.weight", (2048 * 64) ** -0.5),
                      (lm + "1.DenseReluDense.wo.weight", 5120 ** -0.5)]:
        t = sd[name]
        # dtype="auto" loads every part as stored, except T5's FFN wo, which transformers keeps in
        # fp32 (T5's _keep_in_fp32_modules: the fp16 overflow fix, transformers PR #21595)
        assert t.dtype == (torch.float32 if name.endswith("wo.weight") else torch.float16), name
        assert float(t.float().std()) == pytest.approx(std, rel=0.05), name
        assert abs(float(t.float().mean())) < std / 10, name
    assert torch.equal(sd[lm + "0.layer_norm.weight"], torch.ones(2048, dtype=torch.float16))
    assert float(sd["vision_model.encoder.layers.0.self_attn.qkv.bias"].abs().max()) == 0.0


def test_builder_refuses_planner_only_presets_at_full_depth(tmp_path):
    from ib_edge.export import real_sizes

    with pytest.raises(real_sizes.BuildError, match="does not fit"):
        real_sizes.build_checkpoint("instructblip-vicuna-13b", tmp_path / "x")
    assert real_sizes.config_dict(real_sizes.PRESETS["instructblip-vicuna-13b"], layers=2)["text_config"][
        "num_hidden_layers"] == 2
