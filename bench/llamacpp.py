"""llama.cpp as an optional decode baseline: the decode bench's random int4 weights, dequantized and
written as GGUF with the ``gguf`` package (Q4_0: 32-weight blocks, one fp16 scale; Q4_K where
``gguf`` can quantize to it, else llama.cpp's own quantizer from an F16 GGUF), decoded greedily
with llama-cpp-python on the same number of threads.

Neither package is a dependency of ib-edge (``pip install ".[llamacpp]"`` or by hand). Build
llama-cpp-python from its sdist with ``GGML_NATIVE=OFF`` and the ISA you want: the native build
emitted AMX code that died with "Illegal instruction" on an Intel VM that hides AMX::

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" \\
        pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36 gguf

Only speed is compared: the tokenizer is a stand-in (32000 placeholder tokens, Llama's byte
tokens), q/k are not permuted to GGML's rotary layout (the same work either way), and the prompt
is 40 token ids instead of our embeddings (llama.cpp's prefill starts from ids).
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ib_edge.runtime.int4 import unpack_nibbles
from ib_edge.runtime.llama import LAYER

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def unavailable_reason() -> str | None:
    missing = [m for m in ("llama_cpp", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"{' and '.join(missing)} not importable (optional: pip install gguf and llama-cpp-python built from "
                "its sdist, see bench/llamacpp.py)")
    return None


def gguf_can_quantize(qtype_name: str) -> str | None:
    """None when ``gguf`` quantizes to ``qtype_name`` in Python, else why not."""
    import gguf
    from gguf import quants

    qt = getattr(gguf.GGMLQuantizationType, qtype_name)
    try:
        quants.quantize(np.zeros((1, 256), np.float32), qt)
    except NotImplementedError:
        from importlib.metadata import version

        return f"gguf {version('gguf')} cannot quantize to {qtype_name} (its quantize raises NotImplementedError)"
    return None


def _dequant(t: dict, base: str) -> np.ndarray:
    q = unpack_nibbles(t[base + ".qweight"]).float()
    g = q.shape[1] // t[base + ".scales"].shape[1]
    zp = t[base + ".qzeros"].float().repeat_interleave(g, dim=1)
    return ((q - zp) * t[base + ".scales"].float().repeat_interleave(g, dim=1)).numpy()


def write_gguf(path: Path, a, tensors: dict, qtype_name: str) -> None:
    """``tensors`` (bench.decode.random_int4_tensors' names) as a llama GGUF with every linear in
    ``qtype_name`` (Q4_0 / Q4_K / F16), norms F32, token embedding F16."""
    import gguf
    from gguf import quants

    qt = getattr(gguf.GGMLQuantizationType, qtype_name)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("ib-edge random TinyLlama shape")
    w.add_context_length(a.max_positions)
    w.add_embedding_length(a.hidden_size)
    w.add_block_count(a.n_layers)
    w.add_feed_forward_length(a.intermediate_size)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_rope_dimension_count(a.hd)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.rms_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if qtype_name == "Q4_0" else
                    gguf.LlamaFileType.MOSTLY_Q4_K_M if qtype_name == "Q4_K" else gguf.LlamaFileType.MOSTLY_F16)
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    toks += [f"t{i}" for i in range(a.vocab_size - len(toks))]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * len(toks))
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(toks) - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def lin(name, arr):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if qtype_name == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quants.quantize(arr, qt), raw_shape=quants.quant_shape_to_byte_shape(arr.shape, qt),
                         raw_dtype=qt)

    w.add_tensor("token_embd.weight", tensors["model.embed_tokens.weight"].numpy().astype(np.float16))
    for i in range(a.n_layers):
        p = LAYER.format(i)
        for hf, gg in GGUF_NAMES.items():
            if hf.endswith("norm"):
                w.add_tensor(f"blk.{i}.{gg}.weight", tensors[p + hf + ".weight"].float().numpy())
            else:
                lin(f"blk.{i}.{gg}.weight", _dequant(tensors, p + hf))
    w.add_tensor("output_norm.weight", tensors["model.norm.weight"].float().numpy())
    lin("output.weight", _dequant(tensors, "lm_head"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_quantize(src: Path, dst: Path, ftype_name: str, threads: int) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``), for types ``gguf`` cannot write."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype_name}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize -> {ftype_name} failed ({rc})")


def decode(path: Path, prompt_len: int, new_tokens: int, threads: int, timing, keep: dict | None = None,
           name: str = "") -> dict:
    """(prefill ms, decode tokens/s) of greedy decoding with llama-cpp-python, via ``timing``
    (bench.decode._decode_timing: warm-up, fastest of 3). ``keep``: leave the model open and put
    its ``run`` there under ``name`` (for interleaved rounds against another system)."""
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=prompt_len + new_tokens + 8, n_batch=max(64, prompt_len),
                n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
    load_s = time.perf_counter() - t0
    prompt = [int(x) for x in np.random.default_rng(0).integers(259, llm.n_vocab(), prompt_len)]

    import llama_cpp

    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        # the last evaluated position's logits from the context itself: without logits_all,
        # Llama.scores has n_batch rows and (0.3.x) is no longer filled by eval()
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    def run(n):
        t0 = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        out = [int(np.argmax(last_logits()))]
        while len(out) < n:
            llm.eval([out[-1]])
            out.append(int(np.argmax(last_logits())))
        return time.perf_counter() - t0, len(out)

    prefill, tps = timing(run, new_tokens)
    if keep is not None:
        keep[name] = run            # the closure holds llm; the mmap outlives the deleted file
    elif hasattr(llm, "close"):
        llm.close()
    return {"load_s": round(load_s, 1), "prefill_ms": round(prefill * 1e3, 1), "decode_tok_s": round(tps, 2),
            "file_MB": round(os.path.getsize(path) / 1e6)}


def bench(a, tensors: dict, prompt_len: int, new_tokens: int, threads: int, timing, work_dir: str | None = None,
          qtypes=("Q4_0", "Q4_K"), keep: dict | None = None) -> dict:
    """{qtype: result or {"measured": False, "reason"}} for each GGUF type; ``keep``: {qtype:
    run} of the models left open (``decode``)."""
    import llama_cpp

    why = unavailable_reason()
    if why:
        return {"measured": False, "reason": why}
    out = {"llama_cpp_python": llama_cpp.__version__}
    with tempfile.TemporaryDirectory(dir=work_dir) as d:
        for qt in qtypes:
            path = Path(d) / f"model-{qt}.gguf"
            how = "gguf package"
            t0 = time.perf_counter()
            try:
                why_not = gguf_can_quantize(qt)
                if why_not is None:
                    write_gguf(path, a, tensors, qt)
                else:  # F16 GGUF, then llama.cpp's quantizer
                    f16 = Path(d) / "model-F16.gguf"
                    if not f16.exists():
                        write_gguf(f16, a, tensors, "F16")
                    llama_quantize(f16, path, {"Q4_K": "MOSTLY_Q4_K_M"}.get(qt, f"MOSTLY_{qt}"), threads)
                    how = (f"{why_not}; written F16 by gguf, quantized by llama.cpp's llama_model_quantize to "
                           "Q4_K_M (its usual Q4_K file: attn_v, half the ffn_down and output in Q6_K)")
                write_s = time.perf_counter() - t0
                out[qt] = {"measured": True, "written_by": how, "write_s": round(write_s, 1),
                           **decode(path, prompt_len, new_tokens, threads, timing, keep, qt)}
            except Exception as e:  # an optional baseline: its failure is reported, not fatal
                out[qt] = {"measured": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            path.unlink(missing_ok=True)
    return out
