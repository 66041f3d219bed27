"""Train a small real InstructBLIP ("proof model") on the synthetic proof task.

The proof models let the project measure what quantization does to *answers*: they are
genuine ``InstructBlipForConditionalGeneration`` checkpoints (vision encoder, Q-Former,
Llama-style decoder or T5 encoder-decoder LLM) that answer the questions of
``ib_edge.bench.proof_task`` almost perfectly in float32.

    python -m ib_edge.bench.train_proof --family llama --out export/proof_models/proof-llama --threads 1
    python -m ib_edge.bench.train_proof --family t5    --out export/proof_models/proof-t5 --threads 1

(proof-video-llama: `bench/train_proof_video.py`, the command in its model card.
The shipped models were trained with these commands; ``--threads 1`` because on a 2-core
machine shared with other work, two OpenMP threads ran up to 10x slower than one.)

What it does:

* Tokenizers come from ``ib_edge.export.reference_models`` (byte-level BPE LLM tokenizer,
  WordPiece Q-Former tokenizer), trained on the reference corpus plus every question and
  answer of the task (``proof_task.task_text()``). The LLM tokenizer is re-wrapped without
  the ``image_token`` extra special token: with it, transformers 5.24's
  ``InstructBlipProcessor`` fails on ``processor(images=..., text=...)``
  (``'str' object has no attribute 'content'``); without it the processor registers
  ``<image>`` itself as an ``AddedToken`` (same id), exactly as for real checkpoints.
* Model shapes: ``SPECS`` below (``TinySpec`` + ``make_config``); vision
  ``initializer_range=0.02`` (make_config), ``query_tokens ~ N(0, 0.5)``, and the vision
  position embeddings start from a 2-D sine-cosine code (``sincos_2d``) instead of
  N(0, 0.02), which is ~10x weaker than the patch contents.
* Every training example is generated on the fly from ``proof_task.train_rng(seed)``
  (question types drawn with ``TrainSpec.type_weights``); validation uses
  ``make_eval_examples(100, VAL_SEED)`` and the final held-out score
  ``make_eval_examples(500, EVAL_SEED)``, streams that training never draws from.
* Inputs go through the processor exactly like real use: ``processor(images=img,
  text=question)`` (the processor prepends the query ``<image>`` tokens). Llama: the answer
  (" " + answer) and ``</s>`` are appended to the prompt and the loss is masked to them. T5:
  labels are ``answer </s>``.
* Two training-only auxiliary losses, whose heads are thrown away (the saved checkpoint is a
  plain InstructBLIP): a linear classifier on the vision encoder's patch outputs names the
  (shape, colour) whose centre lies in each patch (``aux_targets``), and a linear classifier
  on the flattened Q-Former query outputs names the (shape, colour) in each of the three
  columns (``scene_targets``). Without them the model stalled at chance on shapes: after
  3000 steps of any tried width, patch size, query count or learning rate, shape questions
  stayed at ~1/3 and "side" at 1/2 (the language loss alone is too weak a signal through
  LLM, Q-Former and ViT); with them every part learns within the budget.
* AdamW + OneCycle, gradient clipping 1.0, ``torch.set_num_threads(threads)``; seeded with
  ``torch.manual_seed(seed)`` and the data stream, so a rerun on the same machine, thread
  count and library versions gives the same weights.
* Output: ``save_pretrained`` of model (safetensors) and processor, ``eval_results.json``
  and a ``README.md`` model card with the held-out accuracy measured with greedy
  ``model.generate(**processor(images=..., text=q, return_tensors="pt"), max_new_tokens=16)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from ib_edge.bench import proof_task as pt
from ib_edge.bench.proof_task import QUESTION_TYPES

VAL_SEED = 7
EVAL_SEED = 123
EVAL_N = 500
MAX_NEW_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    num_query_tokens: int
    qformer_hidden: int
    qformer_layers: int
    text_hidden: int
    text_layers: int
    heads: int
    steps: int
    batch_size: int
    lr: float
    warmup: float = 0.1
    weight_decay: float = 0.01
    sincos_scale: float = 0.5   # 0: keep make_config's N(0, 0.02) position embeddings
    aux_weight: float = 1.0     # training-only patch classifier on the vision output; 0: off
    scene_aux_weight: float = 1.0  # training-only scene classifier on the Q-Former queries; 0: off
    t5_init_std: float = 0.02   # T5 LLM only: N(0, std) for its linears and (tied) embedding
    # Relative sampling weight of each question type (proof_task.QUESTION_TYPES order):
    # "side" (relational, two-shape images only) is the slowest to learn.
    type_weights: tuple = (1.0, 1.0, 0.5, 2.0, 1.0)


SPECS = {
    "llama": TrainSpec(image_size=112, patch_size=14, vision_hidden=96, vision_layers=3,
                       num_query_tokens=16, qformer_hidden=96, qformer_layers=2,
                       text_hidden=128, text_layers=2, heads=4,
                       steps=5000, batch_size=32, lr=2e-3),
    # T5 at lr 2e-3 stalled (language loss flat at ~0.5 for 2000+ steps); 1e-3 learns. With
    # the Llama weights it ended at 84% on "shape" (100% on the rest), hence shape weight 2.
    "t5": TrainSpec(image_size=112, patch_size=14, vision_hidden=96, vision_layers=3,
                    num_query_tokens=16, qformer_hidden=96, qformer_layers=2,
                    text_hidden=128, text_layers=2, heads=4,
                    steps=5000, batch_size=32, lr=1e-3, type_weights=(1.0, 2.0, 0.5, 2.0, 1.0)),
}


def tiny_spec(family: str, s: TrainSpec):
    from ib_edge.export.reference_models import TinySpec
    return TinySpec(family, image_size=s.image_size, patch_size=s.patch_size,
                    vision_hidden=s.vision_hidden, vision_layers=s.vision_layers,
                    num_query_tokens=s.num_query_tokens, qformer_hidden=s.qformer_hidden,
                    qformer_layers=s.qformer_layers, text_hidden=s.text_hidden,
                    text_layers=s.text_layers, heads=s.heads)


def build_tokenizers(family: str):
    from transformers import PreTrainedTokenizerFast

    from ib_edge.export.reference_models import build_llm_tokenizer, build_qformer_tokenizer

    extra = pt.task_text()
    ref = build_llm_tokenizer(family, extra_text=extra)
    # Same tokenizer, minus the ``image_token`` extra special token (see module docstring).
    llm_tok = PreTrainedTokenizerFast(
        tokenizer_object=ref.backend_tokenizer, bos_token=ref.bos_token, eos_token=ref.eos_token,
        unk_token=ref.unk_token, pad_token=ref.pad_token, padding_side=ref.padding_side)
    return llm_tok, build_qformer_tokenizer(extra_text=extra)


def build(family: str, spec: TrainSpec, seed: int):
    import torch
    from transformers import InstructBlipForConditionalGeneration

    from ib_edge.export.reference_models import build_processor, make_config

    llm_tok, qformer_tok = build_tokenizers(family)
    ts = tiny_spec(family, spec)
    processor = build_processor(ts, llm_tok, qformer_tok)
    config = make_config(ts, llm_tok, qformer_tok)
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.5)
        if family == "t5" and spec.t5_init_std:
            # transformers 5.x T5Config ties lm_head to the shared embedding whatever
            # tie_word_embeddings says, and with tie_word_embeddings=False it also skips the
            # d_model**-0.5 output scaling, so T5's own init (embedding N(0, 1)) starts with
            # logits of std ~sqrt(d_model) (loss ~64); shrinking only the embedding left the
            # blocks' outputs ~10x larger than the token embeddings and training stalled.
            # Use the Llama family's init instead: every linear and the embedding N(0, 0.02).
            for name, param in model.language_model.named_parameters():
                if param.ndim == 2 and "relative_attention_bias" not in name:
                    param.normal_(0.0, spec.t5_init_std)
        if spec.sincos_scale:
            emb = model.vision_model.embeddings.position_embedding
            grid = spec.image_size // spec.patch_size
            emb[0, 1:] = spec.sincos_scale * sincos_2d(grid, emb.shape[-1])
    return model, processor


def sincos_2d(grid: int, dim: int, temperature: float = 100.0):
    """(grid*grid, dim) 2-D sine-cosine position code (MAE-style: half the channels encode
    the row, half the column). Starting the vision position embeddings from it (instead of
    N(0, 0.02), ~10x weaker than the patch contents) lets the Q-Former tell columns apart
    from the first step; they stay trainable."""
    import torch
    assert dim % 4 == 0
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                            torch.arange(grid, dtype=torch.float32), indexing="ij")
    parts = []
    for pos in (ys.flatten(), xs.flatten()):
        arg = pos[:, None] * omega[None, :]
        parts += [arg.sin(), arg.cos()]
    return torch.cat(parts, dim=1)


def _pad(seqs, value):
    import torch
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def collate(examples, processor, family: str):
    """Training batch: processor inputs plus answer tokens (right-padded)."""
    import torch

    tok = processor.tokenizer
    enc = processor(images=[e["image"] for e in examples], text=[e["question"] for e in examples])
    pixel_values = torch.from_numpy(np.stack([np.asarray(p) for p in enc["pixel_values"]])).float()
    qf_ids = _pad(enc["qformer_input_ids"], processor.qformer_tokenizer.pad_token_id)
    qf_mask = _pad(enc["qformer_attention_mask"], 0)
    batch = {"pixel_values": pixel_values, "qformer_input_ids": qf_ids,
             "qformer_attention_mask": qf_mask}
    if family == "t5":
        answers = [tok(e["answer"]).input_ids for e in examples]  # "answer </s>"
        batch["input_ids"] = _pad(enc["input_ids"], tok.pad_token_id)
        batch["attention_mask"] = _pad(enc["attention_mask"], 0)
        batch["labels"] = _pad(answers, -100)
    else:
        ids, labels = [], []
        for prompt, e in zip(enc["input_ids"], examples):
            ans = tok(" " + e["answer"], add_special_tokens=False).input_ids + [tok.eos_token_id]
            ids.append(list(prompt) + ans)
            labels.append([-100] * len(prompt) + ans)
        batch["input_ids"] = _pad(ids, tok.pad_token_id)
        batch["attention_mask"] = _pad([[1] * len(s) for s in ids], 0)
        batch["labels"] = _pad(labels, -100)
    return batch


AUX_CLASSES = 1 + len(pt.SHAPES) * len(pt.COLOR_NAMES)


def aux_targets(scenes, grid: int):
    """(batch, grid*grid) class of each vision patch: 0 for background, else 1 + shape *
    n_colors + color for the patch holding an object's centre."""
    import torch
    t = torch.zeros(len(scenes), grid * grid, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            r = min(int(o.cy * grid / pt.IMAGE_SIZE), grid - 1)
            c = min(int(o.cx * grid / pt.IMAGE_SIZE), grid - 1)
            t[i, r * grid + c] = 1 + pt.SHAPES.index(o.shape) * len(pt.COLOR_NAMES) + pt.COLOR_NAMES.index(o.color)
    return t


def scene_targets(scenes):
    """(batch, 3) class of the object in each column (0: empty), as in ``aux_targets``."""
    import torch
    t = torch.zeros(len(scenes), 3, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            t[i, o.column] = 1 + pt.SHAPES.index(o.shape) * len(pt.COLOR_NAMES) + pt.COLOR_NAMES.index(o.color)
    return t


def aux_loss(logits, targets):
    """Mean cross-entropy over object-centre patches plus mean over background patches."""
    import torch.nn.functional as F
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    obj = targets.flatten() > 0
    return ce[obj].mean() + ce[~obj].mean()


def predict(model, processor, image, question: str) -> str:
    """Greedy answer, decoded the way the model card documents."""
    import torch

    inputs = processor(images=image, text=question, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    if not model.config.text_config.is_encoder_decoder:
        out = out[:, inputs["input_ids"].shape[1]:]
    return processor.batch_decode(out, skip_special_tokens=True)[0]


def evaluate(model, processor, examples) -> dict:
    model.eval()
    per_type = {t: [0, 0] for t in pt.QUESTION_TYPES}
    failures = []
    for ex in examples:
        pred = predict(model, processor, ex["image"], ex["question"])
        ok = pt.is_correct(pred, ex["answer"])
        per_type[ex["type"]][0] += ok
        per_type[ex["type"]][1] += 1
        if not ok and len(failures) < 20:
            failures.append({"question": ex["question"], "answer": ex["answer"], "prediction": pred})
    correct = sum(c for c, _ in per_type.values())
    return {"n": len(examples), "accuracy": correct / len(examples),
            "per_type": {t: {"n": n, "accuracy": c / n if n else float("nan")}
                         for t, (c, n) in per_type.items()},
            "failures": failures}


def train(family: str, out: Path, seed: int = 0, steps: int | None = None, threads: int = 2,
          val_every: int = 500, log=print, overrides: dict | None = None, device: str = "cpu",
          init: Path | None = None) -> dict:
    import torch

    torch.set_num_threads(threads)
    spec = SPECS[family]
    if steps is not None:
        spec = dataclasses.replace(spec, steps=steps)
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    model, processor = build(family, spec, seed)
    if init is not None:  # continue from a saved proof model (a second stage with other weights/lr)
        from safetensors.torch import load_file

        state = {}
        for f in sorted(Path(init).glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        sd = model.state_dict()  # tied weights (lm_head, T5's embed_tokens) are saved once
        loaded = {sd[k].data_ptr() for k in state if k in sd}
        missing = [k for k in missing if sd[k].data_ptr() not in loaded]
        if missing or unexpected:
            raise ValueError(f"--init {init}: checkpoint does not match the spec (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        log(f"initialised from {init}")
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{family}: {n_params:,} parameters, spec {spec}")

    aux_head = torch.nn.Linear(spec.vision_hidden, AUX_CLASSES).to(device) if spec.aux_weight else None
    scene_head = (torch.nn.Linear(spec.num_query_tokens * spec.qformer_hidden, 3 * AUX_CLASSES).to(device)
                  if spec.scene_aux_weight else None)
    params = list(model.named_parameters())
    for i, head in enumerate((aux_head, scene_head)):
        if head is not None:
            params += [(f"aux{i}.{n}", p) for n, p in head.named_parameters()]
    decay = [p for n, p in params if p.ndim >= 2 and "query_tokens" not in n]
    no_decay = [p for n, p in params if p.ndim < 2 or "query_tokens" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=spec.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps,
                                                pct_start=spec.warmup, anneal_strategy="cos")
    rng = pt.train_rng(seed)
    type_p = np.asarray(spec.type_weights, dtype=float) / sum(spec.type_weights)
    val = pt.make_eval_examples(100, VAL_SEED)
    history = []
    t0 = time.time()
    data_time = 0.0
    running = aux_running = scene_running = None
    for step in range(1, spec.steps + 1):
        model.train()
        td = time.time()
        types = rng.choice(len(pt.QUESTION_TYPES), size=spec.batch_size, p=type_p)
        examples = [pt.make_example(rng, pt.QUESTION_TYPES[int(t)], return_scene=True) for t in types]
        batch = {k: v.to(device) for k, v in collate(examples, processor, family).items()}
        data_time += time.time() - td
        res = model(**batch)
        loss = res.loss
        if aux_head is not None:
            grid = spec.image_size // spec.patch_size
            targets = aux_targets([e["scene"] for e in examples], grid).to(device)
            patches = res.vision_outputs.last_hidden_state[:, 1:]
            aux = aux_loss(aux_head(patches), targets)
            aux_running = aux.item() if aux_running is None else 0.98 * aux_running + 0.02 * aux.item()
            loss = loss + spec.aux_weight * aux
        if scene_head is not None:
            queries = res.qformer_outputs.last_hidden_state[:, :spec.num_query_tokens]
            logits = scene_head(queries.flatten(1)).view(-1, 3, AUX_CLASSES)
            targets = scene_targets([e["scene"] for e in examples]).to(device)
            saux = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            scene_running = saux.item() if scene_running is None else 0.98 * scene_running + 0.02 * saux.item()
            loss = loss + spec.scene_aux_weight * saux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        sched.step()
        lm = res.loss.item()
        running = lm if running is None else 0.98 * running + 0.02 * lm
        if step % 50 == 0:
            el = time.time() - t0
            aux_txt = f" aux {aux_running:.4f}" if aux_running is not None else ""
            aux_txt += f" scene {scene_running:.4f}" if scene_running is not None else ""
            log(f"step {step}/{spec.steps} loss {running:.4f}{aux_txt} lr {sched.get_last_lr()[0]:.2e} "
                f"{el:.0f}s ({el / step:.3f} s/step, data {data_time / step:.3f})")
        if val_every and (step % val_every == 0 or step == spec.steps):
            r = evaluate(model, processor, val)
            history.append({"step": step, "loss": running, "val_accuracy": r["accuracy"],
                            "elapsed_s": round(time.time() - t0, 1)})
            log(f"  val@{step}: {r['accuracy']:.3f} "
                + " ".join(f"{t}={v['accuracy']:.2f}" for t, v in r["per_type"].items()))
    train_time = time.time() - t0
    model.eval().cpu()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)

    # Score the saved checkpoint, reloaded the way users load it.
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor
    model = InstructBlipForConditionalGeneration.from_pretrained(out, trust_remote_code=False).eval().to(device)
    processor = InstructBlipProcessor.from_pretrained(out, trust_remote_code=False)
    te = time.time()
    result = evaluate(model, processor, pt.make_eval_examples(EVAL_N, EVAL_SEED))
    eval_time = time.time() - te
    log(f"held-out ({EVAL_N}, seed {EVAL_SEED}): {result['accuracy']:.4f} "
        + " ".join(f"{t}={v['accuracy']:.3f}" for t, v in result["per_type"].items()))

    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    info = {
        "family": family, "seed": seed, "parameters": n_params, "safetensors_bytes": size,
        "spec": dataclasses.asdict(spec), "train_time_s": round(train_time, 1),
        "train_s_per_step": round(train_time / spec.steps, 3), "eval_time_s": round(eval_time, 1),
        "threads": threads, "eval": {"n": EVAL_N, "seed": EVAL_SEED, **result},
        "val_history": history,
        "device": device, "versions": _versions(),
        "command": _command(family, out, seed, steps, overrides, device, threads, init),
        "init": str(init) if init else None,
    }
    (out / "eval_results.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(model_card(info))
    return info


def _versions() -> dict:
    import tokenizers
    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "numpy": np.__version__}


def _command(family, out, seed, steps, overrides=None, device="cpu", threads=2, init=None) -> str:
    cmd = f"python -m ib_edge.bench.train_proof --family {family} --out {out} --seed {seed}"
    if threads != 2:
        cmd += f" --threads {threads}"
    if steps is not None:
        cmd += f" --steps {steps}"
    for k, v in (overrides or {}).items():
        cmd += f" --set {k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
    if init is not None:
        cmd += f" --init {init}"
    return cmd + (f" --device {device}" if device != "cpu" else "")


def _parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    fields = {f.name: f.type for f in dataclasses.fields(TrainSpec)}
    if key not in fields:
        raise argparse.ArgumentTypeError(f"unknown spec field {key!r} (one of {sorted(fields)})")
    kind = fields[key] if isinstance(fields[key], str) else fields[key].__name__
    if kind == "tuple":  # type_weights=1,2,0.5,2,1
        return key, tuple(float(v) for v in value.split(","))
    return key, {"int": int, "float": float}[kind](value)


def model_card(info: dict) -> str:
    s = info["spec"]
    ev = info["eval"]
    llm = ("Llama-style decoder-only" if info["family"] == "llama"
           else "T5-style encoder-decoder")
    rows = "\n".join(f"| {t} | {v['n']} | {100 * v['accuracy']:.1f}% |"
                     for t, v in ev["per_type"].items())
    decode = ("out[:, inputs['input_ids'].shape[1]:]" if info["family"] == "llama" else "out")
    t5_note = ""
    if info["family"] == "t5" and s.get("t5_init_std"):
        t5_note = (f" The T5 LLM's linears and its embedding (which transformers 5.x ties to"
                   f" `lm_head`, unscaled) start from N(0, {s['t5_init_std']}) like the Llama"
                   f" family's, not T5's own init (first logits of std ~sqrt(d_model)).")
    return f"""# proof-{info['family']}: InstructBLIP proof model ({llm} LLM)

A small, real `InstructBlipForConditionalGeneration` trained from scratch on the synthetic
visual-QA task of `ib_edge.bench.proof_task`, so that the effect of export and quantization
on *answers* can be measured. It knows nothing beyond that task.

## Task

224x224 images, uniform light background, 1-3 shapes (circle, square, triangle; fixed 56 px
box) in three columns, six colours (red, green, blue, yellow, purple, orange). Questions:
"What color is the {{shape}}?", "What shape is the {{color}} object?", "How many shapes are
there?", "Is the {{shape}} on the left or the right?", "Describe this image." (answers such as
"a red circle, a blue square and a green triangle"). Exact match after
`proof_task.normalize_answer`.

## Model

| part | shape |
|---|---|
| vision | image {s['image_size']}x{s['image_size']} (the processor resizes), patch {s['patch_size']}, hidden {s['vision_hidden']}, {s['vision_layers']} layers |
| Q-Former | {s['num_query_tokens']} query tokens, hidden {s['qformer_hidden']}, {s['qformer_layers']} layers |
| LLM | {llm}, hidden {s['text_hidden']}, {s['text_layers']} layers, {s['heads']} heads |
| parameters | {info['parameters']:,} ({info['safetensors_bytes'] / 1e6:.1f} MB safetensors, float32) |

Tokenizers: byte-level BPE LLM tokenizer and WordPiece Q-Former tokenizer from
`ib_edge.export.reference_models`, trained on its corpus plus the task's questions and answers.

## Training

    {info['command']}

{s['steps']} steps of batch {s['batch_size']}, examples generated on the fly from
`proof_task.train_rng({info['seed']})` (never the evaluation streams; question types weighted
{dict(zip(QUESTION_TYPES, s['type_weights']))}), AdamW (peak lr {s['lr']}, OneCycle, weight
decay {s['weight_decay']}), gradient clipping 1.0, {info['threads']} CPU thread(s). Vision
position embeddings start from a 2-D sine-cosine code (scale {s['sincos_scale']}).{t5_note} Two
training-only auxiliary classifiers, not part of the checkpoint, supervise the vision patch
outputs (which shape and colour is centred in each patch, weight {s['aux_weight']}) and the
Q-Former query outputs (which shape and colour is in each column, weight
{s['scene_aux_weight']}); without them shape recognition stayed at chance.
Wall time {info['train_time_s'] / 60:.1f} min ({info['train_s_per_step']} s/step, periodic
validation included) on a 2-core CPU shared with other work.
Versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}.

## Held-out accuracy

{ev['n']} fresh examples, `proof_task.make_eval_examples({ev['n']}, seed={ev['seed']})` (types
balanced), greedy decoding of the saved checkpoint:

```python
inputs = processor(images=image, text=question, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=16)
answer = processor.batch_decode({decode}, skip_special_tokens=True)[0]
```

| type | n | exact match |
|---|---|---|
{rows}
| **overall** | {ev['n']} | **{100 * ev['accuracy']:.1f}%** |

Details (validation curve, failures): `eval_results.json`.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train an InstructBLIP proof model on the proof task.")
    ap.add_argument("--family", choices=sorted(SPECS), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help=f"default: per family ({ {k: v.steps for k, v in SPECS.items()} })")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--set", dest="overrides", type=_parse_override, action="append", default=[],
                    metavar="FIELD=VALUE", help="override a TrainSpec field (experiments)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--init", type=Path, default=None, metavar="DIR",
                    help="start from this saved proof model instead of a fresh init (a second training stage)")
    args = ap.parse_args(argv)
    info = train(args.family, args.out, seed=args.seed, steps=args.steps, threads=args.threads,
                 val_every=args.val_every, log=lambda m: print(m, flush=True),
                 overrides=dict(args.overrides), device=args.device, init=args.init)
    print(json.dumps({k: info[k] for k in ("parameters", "safetensors_bytes", "train_time_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
