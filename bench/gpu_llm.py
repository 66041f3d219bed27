"""The cuda LLM engine's checks for ``bench/gpu_check.py``: agreement with the CPU engine on the
same int4 weights, and decode speed against transformers fp16 ``generate``.

Sections (each skipped with its reason when the time budget would not fit it):

1. ``agreement``: the cuda engine vs the CPU torch engine (the same int4 weights, the same bf16
   scales and zero points) on the proof-llama int4 bundle (proof-task questions through the
   bundle's vision/Q-Former on ONNX Runtime CPU) and on a random 1.1 B shape: next-token logits
   cosine at every step of a teacher-forced decode (the CPU engine's greedy tokens fed to both;
   goal >= 0.999 every step), and the greedy tokens of ``FastLLM.generate`` on both (equal).
2. ``decode``: at the 1.1 B (TinyLlama) and Vicuna-7B shapes, random int4 weights packed
   directly: tokens/s of ``generate`` (the loop a user runs: one graph replay and one host read
   of the sampled id per token), the graph step alone (device timing), weight bytes per token,
   % of the copy-bandwidth bound, transformers fp16 ``generate`` in the same run, the speedup,
   and peak device memory of the cuda decode.

``device="cpu"`` is the rehearsal: the same code at tiny shapes, the cuda engine on the CPU int4
kernel without graphs, transformers in fp32, so a GPU's minutes go to measuring.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ib_edge.bench import decode as bench_decode
from ib_edge.runtime import cudallm, decode, engines, llama
from ib_edge.runtime.llama import LlamaArgs

VICUNA_7B = LlamaArgs(vocab_size=32000, hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      intermediate_size=11008, max_positions=2048)
SHAPES = {"tinyllama-1.1b": llama.PRESETS["tinyllama-1.1b"], "vicuna-7b": VICUNA_7B}
# the rehearsal's stand-ins: GQA like TinyLlama, MHA like Vicuna, a few MB each
REHEARSAL_SHAPES = {
    "tinyllama-1.1b": LlamaArgs(vocab_size=512, hidden_size=128, n_layers=2, n_heads=4, n_kv_heads=2,
                                intermediate_size=256, max_positions=256),
    "vicuna-7b": LlamaArgs(vocab_size=512, hidden_size=128, n_layers=2, n_heads=4, n_kv_heads=4,
                           intermediate_size=384, max_positions=256)}
MIN_COSINE = 0.999          # the goal, every step
GOAL_PCT_OF_BOUND = 35.0    # Vicuna-7B shape
GOAL_SPEEDUP = 5.0          # vs transformers fp16 eager generate


@dataclasses.dataclass(frozen=True)
class LlmOptions:
    device: str = "cuda"            # "cpu": the rehearsal
    prompt_tokens: int = 48         # 32 image tokens + a short instruction
    agree_steps: int = 16
    proof_questions: int = 5
    new_tokens: int = 64            # timed decode length
    hf_tokens: int = 32
    repeats: int = 3
    step_runs: int = 50             # graph replays timed for the step figure
    group_size: int = 128           # the timed models (ib-export's default)

    @property
    def shapes(self) -> dict[str, LlamaArgs]:
        return REHEARSAL_SHAPES if self.device == "cpu" else SHAPES


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.float().cpu(), y.float().cpu(), dim=0))


def cuda_model(a: LlamaArgs, tensors: dict, group_size: int | None, device: str):
    """The cuda engine: through engines.assemble (the runtime's path) on a GPU, built directly
    on the CPU for the rehearsal."""
    if device == "cuda":
        return engines.assemble(a, tensors, group_size, "cuda")
    return cudallm.CudaLlama(a, llama.collect(a, tensors, group_size), device="cpu")


def teacher_forced(ref, test, embeds: torch.Tensor, steps: int) -> dict:
    """Logits cosine per step: the prefill, then ``steps`` tokens chosen greedily by ``ref`` and
    fed to both models."""
    t = embeds.shape[1]
    ref.setup_cache(t + steps + 1)
    test.setup_cache(t + steps + 1)
    lr, lt = ref(embeds, 0)[0], test(embeds, 0)[0]
    cos, agree = [_cos(lr, lt)], [int(lr.argmax()) == int(lt.argmax())]
    for i in range(steps):
        tok = int(lr.argmax())
        lr = ref(ref.embed.weight[tok].view(1, 1, -1).float(), t + i)[0]
        lt = test(test.embed.weight[tok].view(1, 1, -1), t + i)[0]
        cos.append(_cos(lr, lt))
        agree.append(int(lr.argmax()) == int(lt.argmax()))
    return {"steps": len(cos), "min_cosine": round(min(cos), 6), "mean_cosine": round(sum(cos) / len(cos), 6),
            "top1_agree": f"{sum(agree)}/{len(agree)}", "within_goal": min(cos) >= MIN_COSINE}


def agreement_proof(bundle: Path, opts: LlmOptions) -> dict:
    """proof-llama int4 bundle: proof-task questions, CPU torch engine vs cuda engine."""
    from ib_edge.bench import proof_task
    from ib_edge.runtime import Pipeline

    pipe = Pipeline.load(bundle, llm_engine="torch", device="cpu")
    cpu = pipe.llm
    if opts.device == "cuda":
        gpu = Pipeline.load(bundle, device="cuda").llm       # ib-run's default path on a GPU
    else:
        gpu = copy.copy(cpu)
        gpu.model = cuda_model(cpu.model.a, _read_llm(pipe.manifest.path(pipe.manifest.artifact("llm")["dir"])),
                               _group_size(pipe), "cpu")
        gpu.engine = "cuda"
    rows, worst, same = [], 1.0, 0
    for ex in proof_task.make_eval_examples(opts.proof_questions, seed=2027):
        enc = pipe.prompts.encode(ex["question"], opts.agree_steps)
        q = pipe.query_embeds(pipe.image_embeds(pipe.pixel_values([ex["image"]])), enc["qformer_input_ids"],
                              enc["qformer_attention_mask"])
        tf = teacher_forced(cpu.model, gpu.model, cpu.embeds(q, enc["input_ids"]), opts.agree_steps)
        kw = dict(decode=pipe.prompts.decode, max_new_tokens=opts.agree_steps)
        ids_cpu = cpu.generate(q, enc["input_ids"], enc["attention_mask"], **kw).token_ids
        streamed: list[str] = []
        ids_gpu = gpu.generate(q, enc["input_ids"], enc["attention_mask"], on_text=streamed.append, **kw).token_ids
        equal = ids_cpu == ids_gpu
        same += equal
        worst = min(worst, tf["min_cosine"])
        rows.append({"question": ex["question"], "answer": ex["answer"],
                     "cpu_text": pipe.prompts.decode(ids_cpu), "cuda_text": pipe.prompts.decode(ids_gpu),
                     "streamed_equals_text": "".join(streamed) == pipe.prompts.decode(ids_gpu),
                     "greedy_equal": equal, **tf})
    return {"model": "proof-llama int4 bundle", "bundle": str(bundle), "cuda_engine": gpu.engine,
            "questions": len(rows), "greedy_equal": f"{same}/{len(rows)}", "min_cosine": worst,
            "within_goal": worst >= MIN_COSINE and same == len(rows), "rows": rows}


def _read_llm(d: Path) -> dict:
    from safetensors.torch import load_file

    t = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        t.update({k.removeprefix("language_model."): v for k, v in load_file(str(f)).items()})
    return t


def _group_size(pipe) -> int | None:
    return pipe.manifest.artifact("llm").get("quantization", {}).get("group_size")


def agreement_random(name: str, opts: LlmOptions, seed: int = 0) -> dict:
    """A random int4 model (per-group scales and zero points drawn) on both engines."""
    a = opts.shapes[name]
    t = bench_decode.random_int4_tensors(a, 64, seed, scale_spread=1.0)
    ref = engines.assemble(a, dict(t), 64, "torch")
    test = cuda_model(a, dict(t), 64, opts.device)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, a.vocab_size, (1, opts.prompt_tokens), generator=g)
    rec = teacher_forced(ref, test, ref.embed(ids), opts.agree_steps)
    emb = ref.embed(ids)
    greedy_cpu = decode.generate(ref, emb, max_new_tokens=opts.agree_steps)
    greedy_gpu = decode.generate(test, emb, max_new_tokens=opts.agree_steps)
    beams = [decode.beam_search(m, emb, num_beams=3, max_new_tokens=8) for m in (ref, test)]
    sampled = [decode.generate(m, emb, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=1) for m in (ref, test)]
    return {"model": f"random int4 {name} shape (group 64, scales and zero points drawn)", "shape": dataclasses.asdict(a),
            **rec, "greedy_equal": greedy_cpu == greedy_gpu, "beams_equal": beams[0] == beams[1],
            "seeded_samples_equal": sampled[0] == sampled[1]}


# --- decode speed ---------------------------------------------------------------------------------
def _generate_rate(model, emb: torch.Tensor, n: int, repeats: int) -> dict:
    """tokens/s of decode.generate after the first token (the prefill), from the times at
    which each token's id reached the host; fastest of ``repeats`` after a warm-up."""
    def once(k):
        stamps = []
        decode.generate(model, emb, max_new_tokens=k, on_token=lambda _: stamps.append(time.perf_counter()))
        return stamps

    once(n)   # warm-up at the timed length: the cache and its graph capture, allocator, kernel selection
    best = math.inf
    for _ in range(repeats):
        s = once(n)
        best = min(best, (s[-1] - s[0]) / (len(s) - 1))
    return {"decode_ms_per_token": round(best * 1e3, 4), "decode_tokens_per_s": round(1 / best, 1)}


def _step_time(model, device: str, pos: int, runs: int) -> float:
    """ms of one decode step (graph replay on a GPU) alone, device-timed, median of ``runs``."""
    x = model.embed.weight[1].view(1, 1, -1)
    for _ in range(3):
        model(x, pos)
    times = []
    for _ in range(runs):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            model(x, pos)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            model(x, pos)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _step_syncs(model, device: str, pos: int) -> str:
    """Whether one decode step (input copy, position fill, graph replay, logits clone) makes a
    synchronizing CUDA call: torch's sync debug mode set to raise on one."""
    if device != "cuda":
        return "not checked (CPU rehearsal)"
    x = model.embed.weight[1].view(1, 1, -1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x, pos)
        return "none"
    except RuntimeError as e:
        return f"yes: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _hf_rate(a: LlamaArgs, emb: torch.Tensor, n: int, repeats: int, device: str) -> dict:
    """transformers LlamaForCausalLM ``generate`` (greedy, eager, fp16 on a GPU / fp32 on the CPU),
    random weights: tokens/s after the prefill = (n - 1) / (t(n) - t(1)), fastest of ``repeats``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.float16 if device == "cuda" else torch.float32
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      max_position_embeddings=a.max_positions, eos_token_id=None, pad_token_id=0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            hf = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    e = emb.to(device, dtype)

    def run(k):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(inputs_embeds=e, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        _sync(device)
        return time.perf_counter() - t0, out.shape[1]

    run(2)
    t1 = min(run(1)[0] for _ in range(repeats))
    tn, produced = min(run(n) for _ in range(repeats))
    del hf
    if device == "cuda":
        torch.cuda.empty_cache()
    if tn <= t1:
        return {"dtype": str(dtype).removeprefix("torch."), "tokens_per_s": float("nan"),
                "note": "timing noise exceeded the decode time"}
    return {"dtype": str(dtype).removeprefix("torch."), "tokens_per_s": round((produced - 1) / (tn - t1), 1),
            "prefill_ms": round(t1 * 1e3, 2)}


def _compiled_variant(model, emb, wb: int, bw_gb_s: float, opts: LlmOptions, check, name: str) -> dict:
    """The same model with its decode step through torch.compile (inductor) inside the graph:
    compile time and tokens/s. Only on a GPU with time to spare (the compile is the unknown)."""
    if opts.device != "cuda":
        return {"skipped": "CPU rehearsal (inductor's CPU compile is not what this measures)"}
    if name != "vicuna-7b":
        return {"skipped": "measured at the Vicuna-7B shape only (the goal's shape; compiles cost minutes)"}
    if check.left() < 240:
        return {"skipped": f"time budget ({check.left():.0f} s left)"}
    t0 = time.monotonic()
    model.set_compile(True)
    try:
        decode.generate(model, emb, max_new_tokens=4)   # compile + capture
        compile_s = time.monotonic() - t0
        rec = {"compile_and_capture_s": round(compile_s, 1), **_generate_rate(model, emb, opts.new_tokens, opts.repeats)}
        rec["graph_step_ms"] = round(_step_time(model, opts.device, opts.prompt_tokens + 2, opts.step_runs), 4)
        rec["pct_of_bound"] = round(100 * wb * rec["decode_tokens_per_s"] / (bw_gb_s * 1e9), 1)
        return rec
    except Exception as e:  # a compile failure is a finding; the graphs-only figures stand
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        model.set_compile(False)


def decode_speed(name: str, opts: LlmOptions, bw_gb_s: float, check) -> dict:
    a = opts.shapes[name]
    if opts.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    model = cuda_model(a, bench_decode.random_int4_tensors(a, opts.group_size, seed=0), opts.group_size, opts.device)
    build_s = time.monotonic() - t0
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab_size, (1, opts.prompt_tokens), generator=g)
    emb = model.embed(ids)
    rec = {"shape": dataclasses.asdict(a), "group_size": opts.group_size, "build_s": round(build_s, 1),
           "prompt_tokens": opts.prompt_tokens, "new_tokens": opts.new_tokens,
           **_generate_rate(model, emb, opts.new_tokens, opts.repeats)}
    rec["graph_step_ms"] = round(_step_time(model, opts.device, opts.prompt_tokens + 2, opts.step_runs), 4)
    rec["graph_captures"] = model.captures
    rec["host_sync_in_step"] = _step_syncs(model, opts.device, opts.prompt_tokens + 2)
    wb = model.weight_bytes_per_token()
    tps = rec["decode_tokens_per_s"]
    rec.update({"weight_MB_per_token": round(wb / 1e6, 1), "achieved_GB_s": round(wb * tps / 1e9, 1),
                "bound_tokens_per_s": round(bw_gb_s * 1e9 / wb, 1),
                "pct_of_bound": round(100 * wb * tps / (bw_gb_s * 1e9), 1),
                "pct_of_bound_graph_step": round(100 * wb / (rec["graph_step_ms"] / 1e3) / (bw_gb_s * 1e9), 1)})
    if opts.device == "cuda":
        rec["peak_memory_MB"] = round(torch.cuda.max_memory_allocated() / 2**20)
    rec["compiled"] = _compiled_variant(model, emb, wb, bw_gb_s, opts, check, name)
    emb_cpu = emb.cpu()
    del model, emb
    if check.left() < (90 if name == "vicuna-7b" and opts.device == "cuda" else 15):
        rec["transformers"] = {"skipped": "time budget"}
    else:
        hf = _hf_rate(a, emb_cpu, opts.hf_tokens, opts.repeats, opts.device)
        rec["transformers"] = hf
        if hf.get("tokens_per_s") and hf["tokens_per_s"] == hf["tokens_per_s"]:
            rec["speedup_vs_transformers"] = round(tps / hf["tokens_per_s"], 2)
    return rec


def run(check, bw_gb_s: float, opts: LlmOptions, proof_bundle: Path | None) -> dict:
    """Every section, each with its own error record; returns the ``llm_int4`` section."""
    import traceback

    out: dict = {"device": opts.device, "options": dataclasses.asdict(opts), "agreement": {}, "decode": {}}
    jobs = [("agreement", "proof-llama", 30, lambda: agreement_proof(proof_bundle, opts) if proof_bundle else
             {"skipped": "no proof bundle (--proof-bundle DIR; build it with: ib-export proof-llama --llm-quant "
                         "rtn --group-size 64 --out bundles/proof-llama-rtn)"})]
    jobs += [("agreement", name, 60, lambda name=name: agreement_random(name, opts)) for name in ("tinyllama-1.1b",)]
    jobs += [("decode", name, 150 if name == "vicuna-7b" else 60,
              lambda name=name: decode_speed(name, opts, bw_gb_s, check)) for name in ("tinyllama-1.1b", "vicuna-7b")]
    for part, name, need_s, fn in jobs:
        if opts.device == "cuda" and check.left() < need_s:
            out[part][name] = {"skipped": f"time budget ({check.left():.0f} s left, ~{need_s} s needed)"}
            continue
        t0 = time.monotonic()
        try:
            out[part][name] = fn()
        except Exception as e:  # one failing part is recorded; the others still run
            out[part][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
        out[part][name]["section_s"] = round(time.monotonic() - t0, 1)
        if opts.device == "cuda":
            torch.cuda.empty_cache()
    out["goals"] = goals(out)
    return out


def goals(sec: dict) -> dict:
    """The issue's goals, read from the figures (None: not measured)."""
    d7 = dict(sec["decode"].get("vicuna-7b", {}))
    c7 = d7.get("compiled", {})
    if "pct_of_bound" in c7 and c7["pct_of_bound"] > d7.get("pct_of_bound", -1):   # the faster variant counts
        d7["pct_of_bound"] = c7["pct_of_bound"]
        if d7.get("speedup_vs_transformers"):
            d7["speedup_vs_transformers"] *= c7["decode_tokens_per_s"] / d7["decode_tokens_per_s"]
    agree = [v for v in sec["agreement"].values() if "within_goal" in v]
    return {"cosine_ge_0999_every_step_and_greedy_equal": all(v["within_goal"] for v in agree) if agree else None,
            "vicuna7b_pct_of_bound_ge_35": d7["pct_of_bound"] >= GOAL_PCT_OF_BOUND if "pct_of_bound" in d7 else None,
            "vicuna7b_speedup_ge_5x_transformers_fp16": (d7["speedup_vs_transformers"] >= GOAL_SPEEDUP
                                                         if "speedup_vs_transformers" in d7 else None)}


def render(sec: dict) -> list[str]:
    dev = sec.get("device")
    L = ["## 4-bit LLM decode: the cuda engine" + (" (CPU REHEARSAL: tiny shapes, CPU kernel, no graphs; "
                                                   "no figure here is a GPU figure)" if dev == "cpu" else ""), ""]
    if "error" in sec or "skipped" in sec:
        return L + [str(sec.get("error") or sec.get("skipped")), ""]
    L += ["Agreement with the CPU torch engine on the same int4 weights (teacher-forced logits, every step):", "",
          "| model | steps | min cosine | mean cosine | top-1 agree | greedy equal | goal met |", "|---|---|---|---|---|---|---|"]
    for name, r in sec["agreement"].items():
        if "min_cosine" not in r:
            L.append(f"| {name} | {r.get('skipped') or r.get('error')} | | | | | |")
        elif "rows" in r:
            n = sum(x["steps"] for x in r["rows"])
            mean = sum(x["mean_cosine"] * x["steps"] for x in r["rows"]) / max(n, 1)
            agree = sum(int(x["top1_agree"].split("/")[0]) for x in r["rows"])
            L.append(f"| {r['model']} ({r['questions']} proof questions) | {n} | {r['min_cosine']} | {mean:.6f} | "
                     f"{agree}/{n} | {r['greedy_equal']} | {r['within_goal']} |")
        else:
            L.append(f"| {r['model']} | {r['steps']} | {r['min_cosine']} | {r['mean_cosine']} | {r['top1_agree']} | "
                     f"{r['greedy_equal']} (beams {r['beams_equal']}, seeded samples {r['seeded_samples_equal']}) | "
                     f"{r['within_goal']} |")
    L += ["", "Decode, batch 1, random int4 weights packed directly (group %s):" % sec["options"]["group_size"], "",
          "| shape | weights MB/token | tokens/s (generate) | graph step ms | achieved GB/s | % of bound | "
          "% of bound (step) | transformers tokens/s | speedup | peak MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in sec["decode"].items():
        if "decode_tokens_per_s" not in r:
            L.append(f"| {name} | {r.get('skipped') or r.get('error')} | | | | | | | | |")
            continue
        hf = r["transformers"]
        L.append(f"| {name} | {r['weight_MB_per_token']} | {r['decode_tokens_per_s']} | {r['graph_step_ms']} | "
                 f"{r['achieved_GB_s']} | {r['pct_of_bound']}% | {r['pct_of_bound_graph_step']}% | "
                 f"{hf.get('tokens_per_s', hf.get('skipped'))} ({hf.get('dtype', '')}) | "
                 f"{r.get('speedup_vs_transformers', '–')} | {r.get('peak_memory_MB', '–')} |")
        c = r.get("compiled", {})
        if "decode_tokens_per_s" in c:
            L.append(f"| {name} + torch.compile (compile+capture {c['compile_and_capture_s']} s) | | "
                     f"{c['decode_tokens_per_s']} | {c['graph_step_ms']} | | {c['pct_of_bound']}% | | | | |")
        elif c:
            L.append(f"| {name} + torch.compile | {c.get('skipped') or c.get('error')} | | | | | | | | |")
    syncs = {n: r["host_sync_in_step"] for n, r in sec["decode"].items() if "host_sync_in_step" in r}
    L += ["", f"Synchronizing CUDA calls in one decode step (torch sync debug mode): {syncs}; graph captures per "
          f"timed model: { {n: r['graph_captures'] for n, r in sec['decode'].items() if 'graph_captures' in r} }."]
    L += ["", "bound = measured copy bandwidth / weight bytes per token (packed int4 + bf16 scales/zeros, norms, one "
          "embedding row); tokens/s from the host times of each sampled id in decode.generate (fastest of the "
          "repeats); graph step = one replay, device-timed, median.", "", f"Goals: {json.dumps(sec.get('goals'))}", ""]
    return L
