"""The 7B-sized export paths on small models, against the whole-model paths they replace:
the checkpoint loaded without its LLM (the LLM copied file to file), the layer-streamed fp32
reference of the int4 validation, and the RTN quantizer read one tensor at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch


def _whole(path):
    from transformers import InstructBlipForConditionalGeneration

    m = InstructBlipForConditionalGeneration.from_pretrained(path, dtype="auto", use_safetensors=True).eval()
    for part in (m.vision_model, m.qformer, m.language_projection):
        part.float()
    return m


def _state(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def sharded_llama(reference_dir, tmp_path_factory):
    """The reference Llama's LLM written by ``StoredLLM.save`` in small shards (index file), as
    the real-size checkpoints are."""
    from ib_edge.export.checkpoint import load_checkpoint

    _, _, _, llm = load_checkpoint(str(reference_dir("llama")))
    out = tmp_path_factory.mktemp("sharded") / "llm"
    llm.save(out, shard_bytes=200_000)
    return out


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_checkpoint_without_llm_equals_from_pretrained(reference_dir, tmp_path, family):
    from transformers import AutoConfig

    from ib_edge.export.checkpoint import load_checkpoint

    src = reference_dir(family)
    whole = _whole(src)
    model, _, source, llm = load_checkpoint(str(src))
    assert llm.files is not None and all(p.is_meta for p in model.language_model.parameters())
    want = {k: v for k, v in whole.state_dict().items() if not k.startswith("language_model.")}
    got = {k: v for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k].float()), k
    assert source["llm_dtype"] == str(next(whole.language_model.parameters()).dtype).replace("torch.", "")
    llm.save(tmp_path / "new", shard_bytes=100_000)
    whole.language_model.save_pretrained(tmp_path / "old", safe_serialization=True)
    assert len(list((tmp_path / "new").glob("*.safetensors"))) > 1
    assert (tmp_path / "new" / "model.safetensors.index.json").is_file()
    old, new = _state(tmp_path / "old"), _state(tmp_path / "new")
    for k, v in old.items():   # save_pretrained drops tied copies; the stored ones are the same tensor
        assert torch.equal(new[k].to(v.dtype), v), k
    assert set(new) - set(old) <= {"lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    a = AutoConfig.from_pretrained(tmp_path / "old").to_dict()
    b = AutoConfig.from_pretrained(tmp_path / "new").to_dict()
    assert {k: v for k, v in a.items() if k not in ("transformers_version", "_name_or_path")} == \
           {k: v for k, v in b.items() if k not in ("transformers_version", "_name_or_path")}
    assert (tmp_path / "new" / "generation_config.json").read_text() == \
           (tmp_path / "old" / "generation_config.json").read_text()


def _examples(cfg, n, seed=0):
    from ib_edge.quant.llm_quant import Example

    rng = np.random.default_rng(seed)
    image_id, q = 5, 4
    out = []
    for i in range(n):
        text = rng.integers(10, cfg.vocab_size - 1, size=3 + 2 * i)
        ids = np.concatenate([[1], np.full(q, image_id), text]).astype(np.int64)
        out.append(Example(ids, rng.normal(0, 1, size=(q, cfg.hidden_size)).astype(np.float32)))
    return out, image_id


def test_streamed_reference_equals_whole_model(sharded_llama):
    """Same logits, same greedy answers (batched left-padded vs one at a time), same drift of an
    int4 model measured against either reference; the streamed model holds no layer at rest."""
    from ib_edge.quant import int4, streamed, weight_only
    from ib_edge.quant.logits_probe import LogitsProbe
    from ib_edge.runtime import engines

    whole = weight_only.load_fp32(sharded_llama)
    s = streamed.load_streamed(sharded_llama)
    assert all(p.is_meta for p in s.get_decoder().layers.parameters())
    x = torch.randn(2, 9, whole.config.hidden_size)
    with torch.no_grad():
        a = whole(inputs_embeds=x).logits
        b = s(inputs_embeds=x).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert all(p.is_meta for p in s.get_decoder().layers.parameters())
    examples, image_id = _examples(whole.config, 5)
    pw = LogitsProbe(whole, examples, image_id, batch=3)
    ps = LogitsProbe(s, examples, image_id, batch=3)
    assert [b["select"] for b in pw.batches] == [b["select"] for b in ps.batches]   # same answer lengths
    for bw, bs in zip(pw.batches, ps.batches):
        assert torch.allclose(bw["inputs_embeds"], bs["inputs_embeds"], atol=1e-6)  # same answer tokens
    for rw, rs in zip(pw.reference, ps.reference):
        assert torch.allclose(rw, rs, atol=1e-4, rtol=1e-4)
    q = int4.quantize_model_dir(sharded_llama, sharded_llama.parent / "q", group_size=32)
    assert q["quantized_linears"] > 0
    model = engines.load(sharded_llama.parent / "q")
    dw, ds = pw.drift_stepwise(model), ps.drift_stepwise(model)
    assert abs(dw.cosine_mean - ds.cosine_mean) < 1e-5 and dw.top1 == ds.top1 and dw.tokens == ds.tokens


def test_rtn_read_per_tensor_equals_whole_state_dict(sharded_llama, tmp_path):
    from ib_edge.quant import int4

    int4.quantize_model_dir(sharded_llama, tmp_path / "q", group_size=32)
    got = _state(tmp_path / "q")
    want = int4.quantize_state_dict(_state(sharded_llama), group_size=32)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("family", ["t5", "llama", "opt"])
def test_weight_only_loader_on_meta_equals_swapped_fp32_model(reference_dir, tmp_path, family):
    """``load_weight_only`` builds on the meta device (no fp32 moment): the same logits as the
    fp32 model with the same linears swapped in place, ties kept (T5's embeddings)."""
    from ib_edge.export.checkpoint import load_checkpoint
    from ib_edge.quant import weight_only as wo
    from ib_edge.runtime.lowbit import load_weight_only

    _, _, _, llm = load_checkpoint(str(reference_dir(family)))
    llm.save(tmp_path / "llm")
    m = wo.load_fp32(tmp_path / "llm")
    names = wo.linear_names(m)
    prec = {n: ("int4" if i % 3 == 0 and wo.int4_supported(m.get_submodule(n), 32) else
                "int8" if i % 3 == 1 else "fp32") for i, n in enumerate(names)}
    wo.save_weight_only(m, tmp_path / "llm", tmp_path / "q", {"mode": "mixed", "group_size": 32,
                                                             "precisions": prec, "drift": {}})
    q = load_weight_only(tmp_path / "q", encoder_decoder=m.config.is_encoder_decoder)
    assert not any(t.is_meta for t in [*q.parameters(), *q.buffers()])
    if family == "t5":
        assert q.encoder.embed_tokens.weight is q.shared.weight is q.decoder.embed_tokens.weight
    sw = wo.Swapper(m, names, 32)
    sw.apply(prec)
    x = torch.randint(5, 100, (2, 7))
    kw = {"input_ids": x, "decoder_input_ids": x[:, :4]} if m.config.is_encoder_decoder else {"input_ids": x}
    with torch.no_grad():
        assert torch.equal(m(**kw).logits, q(**kw).logits)


def test_streamed_reads_the_llm_inside_an_instructblip_checkpoint(reference_dir, sharded_llama):
    from transformers import InstructBlipConfig

    from ib_edge.quant import streamed, weight_only

    src = reference_dir("llama")
    s = streamed.load_streamed(src, config=InstructBlipConfig.from_pretrained(src).text_config,
                               key_prefix="language_model.")
    whole = weight_only.load_fp32(sharded_llama)
    x = torch.randn(1, 6, whole.config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(whole(inputs_embeds=x).logits, s(inputs_embeds=x).logits, atol=1e-5, rtol=1e-5)
