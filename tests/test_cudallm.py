"""The cuda LLM engine (runtime/cudallm.py): the tinygemm repacking maths and zero-point conversion,
the model itself on the CPU kernel against the torch engine, engine/device choice and its
refusals, and the GPU check's CPU rehearsal. The tests that need the CUDA kernel skip without one."""
from __future__ import annotations

import json

import pytest
import torch

from ib_edge.bench import decode as bench_decode
from ib_edge.runtime import InputError, cudallm, decode, engines, formats, int4, llama
from ib_edge.runtime.errors import BundleError

NO_CUDA = cudallm.cuda_unavailable_reason()
needs_cuda = pytest.mark.skipif(NO_CUDA is not None, reason=f"the CUDA int4 kernel cannot run here: {NO_CUDA}")
GQA = llama.LlamaArgs(vocab_size=300, hidden_size=128, n_layers=2, n_heads=4, n_kv_heads=2,
                        intermediate_size=192, max_positions=128)


def _portable(n, k, g, seed=0, scale=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    s = scale if scale is not None else 0.01 * (1 + torch.rand(n, k // g, generator=gen))
    zp = torch.randint(0, 16, (n, k // g), dtype=torch.uint8, generator=gen)
    return q, int4.pack_nibbles(q), s, zp


def test_tinygemm_inputs_nibble_order_and_padding():
    """tinygemm's packer takes the HIGH nibble as even k (ours: the low one); rows are padded to
    the kernel's N tile with weights that dequantize to 0; scales_and_zeros is [K/G, Np, 2] bf16."""
    q = torch.zeros(3, 32, dtype=torch.uint8)
    q[0, 0], q[0, 1], q[2, 30], q[2, 31] = 1, 2, 7, 12
    u8, sz = cudallm.tinygemm_inputs(int4.pack_nibbles(q), torch.full((3, 1), 0.5), torch.full((3, 1), 3,
                                     dtype=torch.uint8), 32, n_align=8)
    assert u8.dtype == torch.uint8 and u8.shape == (8, 16) and sz.shape == (1, 8, 2) and sz.dtype == torch.bfloat16
    assert int(u8[0, 0]) == 0x12 and int(u8[2, 15]) == 0x7C and int(u8[1, 3]) == 0x00
    assert bool((u8[3:] == 0x88).all()) and bool((sz[:, 3:] == 0).all())
    assert sz[0, 0].tolist() == [0.5, 2.5]                   # z = (8 - 3) * 0.5
    w = cudallm.reference_dequant(u8, sz, 32)
    assert w.shape == (8, 32) and bool((w[3:] == 0).all())
    assert w[0, :3].tolist() == [(1 - 3) * 0.5, (2 - 3) * 0.5, (0 - 3) * 0.5]
    assert w[2, 30:].tolist() == [(7 - 3) * 0.5, (12 - 3) * 0.5]


def test_zero_point_conversion_is_exact_where_bf16_holds_the_numbers():
    """z = (8 - zp) * s: the kernel's (q - 8) * s + z equals (q - zp) * s exactly when s is a power
    of two (every product then fits bf16), for every zero point 0..15 and group size."""
    for g in formats.KERNEL_GROUP_SIZES:
        n, k = 16, 2 * g
        gen = torch.Generator().manual_seed(g)
        s = 2.0 ** torch.randint(-12, -2, (n, k // g), generator=gen).float()
        q, packed, _, zp = _portable(n, k, g, seed=g)
        zp[0, 0], zp[1, 0] = 0, 15
        w = cudallm.reference_dequant(*cudallm.tinygemm_inputs(packed, s, zp, g), g)[:n]
        assert torch.equal(w.float(), cudallm.portable_dequant(packed, s, zp, g)), g


def test_zero_point_conversion_rounding_is_bounded_and_the_cpu_kernels():
    """With arbitrary fp32 scales the only loss is bf16 storage of s and z and the kernel's bf16
    result: |w_kernel - (q - zp) * s| <= 2^-8 (|z| + |s| * 8 + |w|), and the CPU int4 kernel, fed
    the same scales_and_zeros, produces bit for bit the reference dequantizer's weights."""
    n, k, g = 40, 256, 64
    q, packed, s, zp = _portable(n, k, g, seed=1)
    u8, sz = cudallm.tinygemm_inputs(packed, s, zp, g, n_align=16)
    w = cudallm.reference_dequant(u8, sz, g)[:n].float()
    exact = cudallm.portable_dequant(packed, s, zp, g)
    rep = lambda t: t.float().repeat_interleave(g, dim=1)  # noqa: E731
    bound = 2.0 ** -8 * (rep((8 - zp.float()) * s).abs() + 8 * rep(s) + exact.abs()) + 1e-12
    assert bool(((w - exact).abs() <= bound).all())
    eye = torch.eye(k, dtype=torch.bfloat16)
    cpu = int4.Int4Linear.from_int4(packed, s, zp, g)(eye)       # the torch engine's layer: columns of W.T
    assert torch.equal(cpu.t().float(), w)
    spec = llama.LinearSpec("int4", qweight=packed, scales=s, qzeros=zp, group_size=g)
    ours = cudallm.TinygemmLinear(spec, torch.device("cpu"))(eye)   # our unpacking of the swapped bytes
    assert torch.equal(ours.t().float(), w)


def test_inner_k_tiles_and_refusals():
    assert [cudallm.inner_k_tiles(k) for k in (4096, 5632, 11008, 2048, 64, 96)] == [8, 8, 8, 8, 4, 2]
    with pytest.raises(BundleError, match="multiple of 32"):
        cudallm.inner_k_tiles(48)
    _, packed, s, zp = _portable(8, 96, 32)
    with pytest.raises(BundleError, match="group size 48"):
        cudallm.tinygemm_inputs(packed, s, zp, 48)
    with pytest.raises(BundleError, match="do not match"):
        cudallm.tinygemm_inputs(packed, s[:, :2], zp, 32)


def _pair(a, group=64, seed=0):
    t = bench_decode.random_int4_tensors(a, group, seed, scale_spread=1.0)
    return engines.assemble(a, dict(t), group, "torch"), cudallm.CudaLlama(a, llama.collect(a, dict(t), group),
                                                                           device="cpu")


def test_cuda_engine_on_the_cpu_kernel_matches_the_torch_engine():
    """The cuda engine's model (full-length masked attention over a bf16 cache, positions as a
    tensor, grouped-query rows) run on the CPU kernel: logits cosine >= 0.9999 against the torch
    engine at every step, after a chunked prefill too; the same greedy, beam and seeded-sampling
    tokens; a cache reused for a shorter prompt hides its stale positions."""
    ref, m = _pair(GQA)
    assert m.engine == "cuda" and not m.graphs
    emb = ref.embed(torch.randint(0, GQA.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3)))
    for model in (ref, m):
        model.setup_cache(40)
    cos = [float(torch.nn.functional.cosine_similarity(ref(emb[:, :12], 0)[0], m(emb[:, :12], 0)[0], dim=0))]
    cos.append(float(torch.nn.functional.cosine_similarity(ref(emb[:, 12:], 12)[0], m(emb[:, 12:], 12)[0], dim=0)))
    for pos in range(20, 26):
        x = ref.embed.weight[pos].view(1, 1, -1)
        cos.append(float(torch.nn.functional.cosine_similarity(ref(x, pos)[0], m(x, pos)[0], dim=0)))
    assert min(cos) >= 0.9999, cos
    long_ids = decode.generate(m, emb, max_new_tokens=10)
    assert long_ids == decode.generate(ref, emb, max_new_tokens=10)
    short = emb[:, :5]
    assert decode.generate(m, short, max_new_tokens=6) == decode.generate(ref, short, max_new_tokens=6)
    assert decode.beam_search(m, emb, num_beams=3, max_new_tokens=6) == \
        decode.beam_search(ref, emb, num_beams=3, max_new_tokens=6)
    kw = dict(max_new_tokens=8, temperature=0.9, top_p=0.8, seed=5)
    assert decode.generate(m, emb, **kw) == decode.generate(ref, emb, **kw)
    assert m.k_cache[0].dtype == torch.bfloat16 and m.embed(torch.tensor([1, 2])).dtype == torch.float32
    with pytest.raises(InputError, match="past the KV cache"):
        m(emb, m.max_len)


def test_resolve_llm_engine():
    none, gone = None, "no CUDA GPU (torch.cuda.is_available() is False)"
    r = cudallm.resolve_llm_engine
    assert [r(None, None, none), r(None, "cuda", none), r("cuda", None, none), r(None, "cpu", none)] == \
        ["cuda", "cuda", "cuda", None]
    assert [r("ort", None, none), r("torch", "cpu", none), r(None, None, gone), r("ort", None, gone)] == \
        ["ort", "torch", None, "ort"]
    for args, match in [((None, "cuda", gone), "--device cuda: no CUDA GPU"), (("cuda", None, gone), "--llm-engine cuda"),
                        (("cuda", "cpu", none), "runs on the GPU"), (("ort", "cuda", none), "runs on the CPU"),
                        ((None, "gpu", none), "--device must be"), (("trt", None, none), "--llm-engine must be")]:
        with pytest.raises(InputError, match=match):
            r(*args)


@pytest.mark.skipif(NO_CUDA is None, reason="checks the refusal on a machine without a usable GPU")
def test_ib_run_device_refusals(rtn_bundle, bundle_dir, tmp_path, capsys):
    """ib-run --device cuda without a GPU, a bad --device, and --device cuda on a bundle whose LLM
    is not on the fast path: one line each, exit 2; --device cpu answers."""
    from PIL import Image

    from ib_edge.runtime import cli

    img = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(img)
    base = [str(img), "hi", "--max-new-tokens", "2"]
    fp32 = bundle_dir("llama")
    capsys.readouterr()   # the fixtures' export chatter
    for bundle, extra, says in [(rtn_bundle, ["--device", "cuda"], "--device cuda: no CUDA GPU"),
                                (rtn_bundle, ["--llm-engine", "cuda"], "--llm-engine cuda: no CUDA GPU"),
                                (rtn_bundle, ["--device", "gpu"], "--device must be cuda or cpu"),
                                (fp32, ["--device", "cuda"], "fast-path")]:
        assert cli.main(["--bundle", str(bundle)] + base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert cli.main(["--bundle", str(rtn_bundle)] + base + ["--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] is not None


@needs_cuda
def test_tinygemm_on_the_gpu_matches_the_reference_dequantizer():
    """On a GPU: the CUDA packer and kernel, fed tinygemm_inputs, compute exactly the reference
    dequantizer's weights (identity input), for every group size and inner k tiles."""
    for g, k in [(32, 96), (64, 128), (128, 256), (256, 512)]:
        n = 40
        _, packed, s, zp = _portable(n, k, g, seed=g)
        w = cudallm.reference_dequant(*cudallm.tinygemm_inputs(packed, s, zp, g), g)[:n]
        spec = llama.LinearSpec("int4", qweight=packed, scales=s, qzeros=zp, group_size=g)
        lin = cudallm.TinygemmLinear(spec, torch.device("cuda"))
        got = lin(torch.eye(k, dtype=torch.bfloat16, device="cuda")).t().cpu()
        assert torch.equal(got, w), (g, k)


@needs_cuda
def test_cuda_engine_on_the_gpu_with_graphs():
    """On a GPU: one graph capture per cache serves every decode step; logits agree with the CPU
    torch engine (cosine >= 0.999 every step) and so do greedy and beam tokens."""
    t = bench_decode.random_int4_tensors(GQA, 64, 0, scale_spread=1.0)
    ref = engines.assemble(GQA, dict(t), 64, "torch")
    m = engines.assemble(GQA, dict(t), 64, "cuda")
    assert m.engine == "cuda" and m.graphs and m.k_cache == []
    emb = ref.embed(torch.randint(0, GQA.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)))
    ids = decode.generate(ref, emb, max_new_tokens=12)
    assert decode.generate(m, emb, max_new_tokens=12) == ids and m.captures == 1
    for model in (ref, m):
        model.setup_cache(40)
    cos = [float(torch.nn.functional.cosine_similarity(ref(emb, 0)[0], m(emb, 0)[0].cpu(), dim=0))]
    for i, tok in enumerate(ids[:-1]):
        cos.append(float(torch.nn.functional.cosine_similarity(
            ref(ref.embed.weight[tok].view(1, 1, -1), 16 + i)[0], m(m.embed.weight[tok].view(1, 1, -1), 16 + i)[0].cpu(),
            dim=0)))
    assert min(cos) >= 0.999, cos
    torch.cuda.set_sync_debug_mode("error")   # a decode step never waits on the GPU
    try:
        m(m.embed.weight[1].view(1, 1, -1), 30)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert decode.beam_search(m, emb, num_beams=3, max_new_tokens=6) == \
        decode.beam_search(ref, emb, num_beams=3, max_new_tokens=6)


def test_gpu_check_cpu_rehearsal(rtn_bundle, tmp_path):
    """bench/gpu_check.py --cpu-rehearsal --quick: the 4-bit LLM section's code end to end on the
    CPU (agreement on an int4 bundle and a random model, decode timing, transformers, rendering),
    JSON + markdown written, the GPU-only sections skipped with the reason."""
    from ib_edge.bench import gpu_check

    assert gpu_check.main(["--out", str(tmp_path), "--cpu-rehearsal", "--quick", "--proof-bundle", str(rtn_bundle)]) == 0
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    sec = res["sections"]["llm_int4"]
    assert res["rehearsal"] is True and sec["device"] == "cpu"
    assert res["sections"]["vision_qformer"] == {"skipped": "--cpu-rehearsal"}
    proof = sec["agreement"]["proof-llama"]
    assert proof["greedy_equal"] == "1/1" and proof["min_cosine"] >= 0.999 and proof["rows"][0]["streamed_equals_text"]
    rnd = sec["agreement"]["tinyllama-1.1b"]
    assert rnd["within_goal"] and rnd["greedy_equal"] and rnd["beams_equal"] and rnd["seeded_samples_equal"]
    for name in ("tinyllama-1.1b", "vicuna-7b"):
        d = sec["decode"][name]
        assert "error" not in d, d
        assert d["decode_tokens_per_s"] > 0 and d["weight_MB_per_token"] > 0 and d["transformers"]["tokens_per_s"] > 0
    assert sec["goals"]["cosine_ge_0999_every_step_and_greedy_equal"] is True
    md = (tmp_path / "gpu_check.md").read_text()
    assert "CPU REHEARSAL" in md and "| vicuna-7b |" in md and "proof questions" in md
