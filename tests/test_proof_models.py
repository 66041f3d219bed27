"""The shipped proof models through the real export + runtime path: fp32 task accuracy on a
fresh held-out sample every run, quantized accuracy against fp32 on the same sample, and the
README's main job (ib-run on a generated image)."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from ib_edge.bench import proof_task
from ib_edge.runtime import Pipeline

# Both shipped proof models are held to the bar (>= 97% overall, >= 95% per question type).
PROOF_MODELS = ("proof-llama", "proof-t5")
N_EVAL = 300                     # 60 per question type
ALPHA = 1e-3                     # chance a model truly at the bound fails the test


def binom_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def consistent_with(correct: int, n: int, p: float) -> bool:
    """False when seeing <= ``correct`` successes in ``n`` would be rarer than ALPHA for a model
    whose true accuracy is ``p``: the sample-size-aware form of 'accuracy >= p'."""
    return binom_cdf(correct, n, p) >= ALPHA


@pytest.fixture(scope="session")
def eval_examples():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"\nproof eval seed {seed} (rerun: proof_task.make_eval_examples({N_EVAL}, {seed}))")
    return seed, proof_task.make_eval_examples(N_EVAL, seed)


@pytest.fixture(scope="session")
def predictions(proof_bundle, eval_examples):
    cache = {}

    def get(name, precision="fp32", llm_quant=None):
        key = (name, precision, llm_quant)
        if key not in cache:
            pipe = Pipeline.load(proof_bundle(*key))
            cache[key] = [pipe.generate(ex["image"], ex["question"], max_new_tokens=16) for ex in eval_examples[1]]
        return cache[key]

    return get


_score = proof_task.correct_by_type
_accuracy = proof_task.accuracy_percent


@pytest.mark.parametrize("name", PROOF_MODELS)
def test_fp32_task_accuracy(name, predictions, eval_examples):
    seed, examples = eval_examples
    per_type = _score(predictions(name), examples)
    total = sum(sum(v) for v in per_type.values())
    summary = {t: f"{sum(v)}/{len(v)}" for t, v in per_type.items()}
    print(f"{name} fp32 seed {seed}: {total}/{len(examples)} {summary}")
    assert set(per_type) == set(proof_task.QUESTION_TYPES)
    assert consistent_with(total, len(examples), 0.97), f"{name}: {total}/{len(examples)} {summary}"
    for qtype, oks in per_type.items():
        assert consistent_with(sum(oks), len(oks), 0.95), f"{name} {qtype}: {sum(oks)}/{len(oks)}"


@pytest.mark.parametrize("precision", ["int8", "fp16"])
@pytest.mark.parametrize("name", PROOF_MODELS)
def test_quantized_accuracy_within_half_a_point(name, precision, predictions, eval_examples):
    seed, examples = eval_examples
    ref, got = _accuracy(predictions(name), examples), _accuracy(predictions(name, precision), examples)
    agree = sum(a == b for a, b in zip(predictions(name), predictions(name, precision)))
    print(f"{name} {precision} seed {seed}: {got:.2f}% vs fp32 {ref:.2f}%, answers identical {agree}/{len(examples)}")
    assert got >= ref - 0.5, f"{name} {precision}: accuracy {got:.2f}% vs fp32 {ref:.2f}%"


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_4bit_llm_agrees_with_fp32(method, predictions, eval_examples):
    """4-bit LLM (fp32 vision and Q-Former): >= 98% identical greedy answers, accuracy within 1 point."""
    _check_llm_agreement("proof-llama", method, predictions, eval_examples)


def _check_llm_agreement(name, llm_quant, predictions, eval_examples):
    """>= 98% of greedy answers identical to the fp32 bundle's, task accuracy within 1 point."""
    seed, examples = eval_examples
    ref, q = predictions(name), predictions(name, "fp32", llm_quant)
    agree = sum(a == b for a, b in zip(ref, q))
    print(f"{name} {llm_quant} seed {seed}: identical {agree}/{len(examples)}, accuracy "
          f"{_accuracy(q, examples):.2f}% vs fp32 {_accuracy(ref, examples):.2f}%")
    assert agree >= 0.98 * len(examples), f"{llm_quant}: {agree}/{len(examples)} answers identical to fp32"
    assert _accuracy(q, examples) >= _accuracy(ref, examples) - 1.0


def test_full_stack_int8_and_4bit(predictions, eval_examples):
    """INT8 vision + Q-Former and a GPTQ 4-bit LLM: accuracy within 1.5 points of fp32."""
    seed, examples = eval_examples
    ref, q = predictions("proof-llama"), predictions("proof-llama", "int8", "gptq")
    print(f"proof-llama int8+gptq seed {seed}: {_accuracy(q, examples):.2f}% vs fp32 {_accuracy(ref, examples):.2f}%")
    assert _accuracy(q, examples) >= _accuracy(ref, examples) - 1.5


def test_readme_main_job(proof_bundle, tmp_path):
    from ib_edge.bench.demo import demo_image

    image = tmp_path / "demo.png"
    question, answer = demo_image(image, seed=7)
    proc = subprocess.run([sys.executable, "-m", "ib_edge.runtime.cli", "--bundle", str(proof_bundle("proof-llama")),
                           str(image), question], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proof_task.normalize_answer(proc.stdout) == answer


def test_default_model_is_proof_llama():
    from ib_edge.export import checkpoint

    path, kind = checkpoint.resolve(None)
    assert kind == "proof" and path.endswith("proof-llama")
    assert checkpoint.resolve("proof-llama") == (path, "proof")


@pytest.mark.parametrize("mode", ["int8", "mixed"])
def test_t5_weight_only_llm_agrees_with_fp32(mode, predictions, eval_examples):
    """proof-t5 with a weight-only LLM (issue 5's Flan-T5 path): >= 98% greedy answers identical
    to the fp32 bundle's. Measured on 1000 fresh examples (seed 777) with the shipped proof-t5:
    int8 1000, mixed (36 linears int4 g128, lm_head int8) 999 identical (an all-int4 plan is
    refused by the export's held-out validation: logits cosine 0.99794 < 0.998); with the first
    proof-t5, int8 997 and mixed 999. At <= 0.5% disagreement the chance of 7+ in 300 is below 1e-3."""
    _check_llm_agreement("proof-t5", mode, predictions, eval_examples)


def test_t5_mixed_bundle_runs_every_decoding_mode(proof_bundle, eval_examples):
    """The mixed proof-t5 bundle through Pipeline: low-bit kernels inside transformers' generate,
    so beams, seeded sampling and streaming work as on fp32."""
    import json

    bundle = proof_bundle("proof-t5", "fp32", "mixed")
    q = json.loads((bundle / "manifest.json").read_text())["artifacts"]["llm"]["quantization"]
    assert q["counts"]["int4"] > 0 and q["validation"]["logits_cosine_mean"] >= 0.998
    pipe = Pipeline.load(bundle)
    assert {"HFInt4Linear"} <= {type(m).__name__ for m in pipe.llm.model.modules()}
    ex = eval_examples[1][0]
    chunks = []
    greedy = pipe.run(ex["image"], ex["question"], max_new_tokens=16, on_text=chunks.append)
    assert "".join(chunks) == greedy.answer
    assert pipe.generate(ex["image"], ex["question"], max_new_tokens=16, num_beams=3)
    kw = dict(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=11)
    assert pipe.run(ex["image"], ex["question"], **kw).token_ids == pipe.run(ex["image"], ex["question"], **kw).token_ids


@pytest.mark.parametrize("name", PROOF_MODELS)
def test_trt_int8_over_fp16_graph_within_budget(name, proof_bundle, tmp_path):
    """The graph a TensorRT int8 bundle builds from (INT8 over FP16, export/trt_graphs.py),
    validated on ONNX Runtime CPU against the fp32 graphs with the int8 drift budgets."""
    from ib_edge.quant import budgets

    from .test_trt_int8 import validate_trt_int8

    out = validate_trt_int8(proof_bundle(name), tmp_path)
    for stage, tensor in (("vision", "image_embeds"), ("qformer", "query_embeds")):
        b = budgets.BUDGETS[(tensor, "int8")]
        d = out["stages"][stage]["drift"]
        assert d["cosine_mean"] >= b.min_cosine_mean and d["cosine_min"] >= b.min_cosine_worst, (stage, d)
    assert out["chain"]["cosine_min"] >= budgets.BUDGETS[("query_embeds", "int8")].min_cosine_worst
