"""Train ``proof-video-llama``: a small real InstructBlipVideo on the temporal proof task.

    python -m ib_edge.bench.train_proof_video --out export/proof_models/proof-video-llama

A genuine ``InstructBlipVideoForConditionalGeneration`` (vision encoder and Q-Former run once
per frame, the per-frame query outputs concatenated in frame order in front of the prompt,
Llama-style LLM) with proof-llama's shapes, started from proof-llama's weights (issue 18 allows
it), trained on ``ib_edge.bench.proof_video`` with the recipe of ``train_proof``:

* Tokenizers: ``train_proof.build_tokenizers`` on the image *and* video task text, so the video
  words ("moving", "standing", "frames", ...) are whole tokens and the longest answer (a
  two-shape description) fits in 16 new tokens. proof-llama's embedding rows (LLM input and
  output, Q-Former words) are copied by token string; tokens new to the vocabulary start from
  N(0, 0.02). The LLM's ``<image>`` special (id 4) is renamed ``<video>``: the video token.
* Inputs exactly as ``InstructBlipVideoProcessor`` builds them (it needs torchvision, which does
  not import beside the CPU torch here): every frame through proof-llama's BLIP image
  processor (``frame_pixels``), input ids ``<video>`` x num_query_tokens x 4, then the
  tokenized question (``<s>`` first), then " " + answer and ``</s>`` with the loss masked to
  them.
* Training-only auxiliary losses (heads thrown away; the checkpoint is a plain
  InstructBlipVideo): per frame, the vision patch classifier of ``train_proof`` (which shape
  and colour is centred in each patch) and a per-frame classifier on the flattened Q-Former
  query outputs naming, for each shape kind, its colour or absence and regressing its box
  centre x (``frame_targets``); optionally (``track_aux_weight``) a classifier on the LLM's
  last prompt position naming every shape kind's motion and first frame (``track_targets``).
* AdamW, warm-up then cosine, clipping 1.0, ``torch.set_num_threads(threads)``; ``--workers N``
  data-parallel processes (gloo all-reduce of the gradients, one data stream each); with
  ``budget_min`` the schedule follows elapsed wall time and training stops at the budget, with
  ``budget_cpu_min`` the same for the CPU time of all processes together (so "40 minutes on 2
  cores" = 80 CPU-minutes holds whatever else loads the machine). Wall
  and CPU time (all processes) and the load average are recorded.
* Measured here (2 shared cores, load average 12-18): one process with 2 threads ran 6.1 s/step
  against 0.58 s/step with 1 thread (batch 8, side by side), hence ``--threads 1``.
* Output: ``save_pretrained`` of the model (safetensors), the tokenizers and processor config
  (``save_processor``), ``eval_results.json`` and a model card with the held-out accuracy on
  ``proof_video.make_eval_examples(500, 123)`` measured on the reloaded checkpoint with greedy
  ``model.generate(..., max_new_tokens=16)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from ib_edge.bench import proof_task as pt
from ib_edge.bench import proof_video as pv
from ib_edge.bench import train_proof as tp

VAL_SEED = 7
EVAL_SEED = 123
EVAL_N = 500
MAX_NEW_TOKENS = 16
INIT = Path(__file__).resolve().parent.parent / "export" / "proof_models" / "proof-llama"
VIDEO_TOKEN = "<video>"


@dataclasses.dataclass(frozen=True)
class VideoTrainSpec:
    steps: int = 3000
    batch_size: int = 16          # clips (x 4 frames)
    lr: float = 1e-3
    warmup: float = 0.1
    weight_decay: float = 0.01
    aux_weight: float = 1.0       # per-frame patch classifier on the vision output; 0: off
    frame_aux_weight: float = 1.0  # per-frame classifier/regressor on the Q-Former queries; 0: off
    track_aux_weight: float = 0.0  # classifier on the LLM's last prompt position naming every shape's motion and first frame; 0: off
    budget_min: float = 0.0       # >0: stop after this many minutes of training (the lr schedule follows time)
    budget_cpu_min: float = 0.0   # >0: stop when the CPU time of all processes together reaches this many minutes
                                  # (80 = 40 min on 2 cores, whatever else runs on them); the lr schedule follows it
    frame_pool: int = 0           # 1: the per-frame head reads the frame's *mean* projected query (LLM input space,
                                  # what attention can pool), not the flattened Q-Former outputs
    frame_y: int = 0              # 1: the per-frame head also regresses each shape's box-centre y (upper/lower order)
    delta_aux_weight: float = 0.0  # head on the LLM's first-layer output at every video token of frames 2-4: each
                                   # shape kind's motion (left/right/still) from this frame and the ones before; 0: off
    freeze_vision: int = 0        # 1: proof-llama's vision encoder stays fixed (no backward through it)
    vision_lr_scale: float = 1.0  # the vision encoder's lr relative to the rest (when not frozen)
    # proof_video.QUESTION_TYPES order: motion, later, frames, color, describe
    type_weights: tuple = (1.5, 1.0, 1.5, 0.5, 1.5)


def image_spec() -> tp.TrainSpec:
    """The model shapes: proof-llama's."""
    return tp.SPECS["llama"]


def build_tokenizers():
    """(llm_tok, qformer_tok) trained on both tasks' text; the LLM's ``<image>`` special is
    renamed ``<video>`` (same id)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from ib_edge.export.reference_models import build_llm_tokenizer, build_qformer_tokenizer

    extra = pt.task_text() + pv.task_text()
    ref = build_llm_tokenizer("llama", extra_text=extra)
    state = json.loads(ref.backend_tokenizer.to_str())
    for tok in state["added_tokens"]:
        if tok["content"] == "<image>":
            tok["content"] = VIDEO_TOKEN
    vocab = state["model"]["vocab"]
    vocab[VIDEO_TOKEN] = vocab.pop("<image>")
    backend = Tokenizer.from_str(json.dumps(state))
    llm_tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=ref.bos_token, eos_token=ref.eos_token,
        unk_token=ref.unk_token, pad_token=ref.pad_token, padding_side=ref.padding_side)
    return llm_tok, build_qformer_tokenizer(extra_text=extra)


def make_video_config(llm_tok, qformer_tok):
    from transformers import InstructBlipVideoConfig

    from ib_edge.export.reference_models import make_config

    image_tok = _ImageNamed(llm_tok)
    c = make_config(tp.tiny_spec("llama", image_spec()), image_tok, qformer_tok)
    return InstructBlipVideoConfig(
        vision_config=c.vision_config.to_dict(), qformer_config=c.qformer_config.to_dict(),
        text_config=c.text_config.to_dict(), num_query_tokens=c.num_query_tokens,
        video_token_index=llm_tok.convert_tokens_to_ids(VIDEO_TOKEN))


class _ImageNamed:
    """``llm_tok`` as make_config sees it: ``<image>`` answers with the video token's id."""

    def __init__(self, tok):
        self._tok = tok

    def convert_tokens_to_ids(self, t):
        return self._tok.convert_tokens_to_ids(VIDEO_TOKEN if t == "<image>" else t)

    def __len__(self):
        return len(self._tok)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _old_vocab(init: Path):
    from transformers import AutoTokenizer
    llm = AutoTokenizer.from_pretrained(init, trust_remote_code=False)
    qf = AutoTokenizer.from_pretrained(init / "qformer_tokenizer", trust_remote_code=False)
    return llm.get_vocab(), qf.get_vocab()


def load_init(model, llm_tok, qformer_tok, init: Path, log=print):
    """proof-llama's weights into ``model``; vocabulary-indexed rows copied by token string."""
    import torch
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(init).glob("*.safetensors")):
        state.update(load_file(str(f)))
    old_llm, old_qf = _old_vocab(Path(init))
    old_llm = {(VIDEO_TOKEN if t == "<image>" else t): i for t, i in old_llm.items()}
    sd = model.state_dict()
    copied = {}
    for key, value in state.items():
        if key not in sd:
            raise ValueError(f"--init {init}: unexpected tensor {key}")
        target = sd[key]
        if key.endswith(("embed_tokens.weight", "lm_head.weight", "word_embeddings.weight")):
            new_vocab, old_vocab = ((qformer_tok.get_vocab(), old_qf) if "qformer" in key
                                    else (llm_tok.get_vocab(), old_llm))
            rows = target.clone()
            torch.nn.init.normal_(rows, 0.0, 0.02)
            hits = 0
            for tok, i in new_vocab.items():
                j = old_vocab.get(tok)
                if j is not None and j < value.shape[0] and i < rows.shape[0]:
                    rows[i] = value[j]
                    hits += 1
            copied[key] = f"{hits}/{rows.shape[0]}"
            value = rows
        if value.shape != target.shape:
            raise ValueError(f"--init {init}: {key} has shape {tuple(value.shape)}, model {tuple(target.shape)}")
        state[key] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {sd[k].data_ptr() for k in state if k in sd}
    missing = [k for k in missing if sd[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(f"--init {init}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    log(f"initialised from {init}; rows copied by token: {copied}")


def build(spec: VideoTrainSpec, seed: int, init: Path | None, log=print):
    import torch
    from transformers import InstructBlipVideoForConditionalGeneration

    llm_tok, qformer_tok = build_tokenizers()
    config = make_video_config(llm_tok, qformer_tok)
    torch.manual_seed(seed)
    model = InstructBlipVideoForConditionalGeneration(config)
    if init is not None:
        load_init(model, llm_tok, qformer_tok, init, log)
    return model, llm_tok, qformer_tok


def image_processor():
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    s = image_spec().image_size
    return BlipImageProcessorPil(size={"height": s, "width": s})


def frame_pixels(frames, processor) -> "np.ndarray":
    """(F, 3, H, W) float32: every frame through the BLIP image processor."""
    enc = processor(images=list(frames))
    return np.stack([np.asarray(p, dtype=np.float32) for p in enc["pixel_values"]])


def prompt_ids(llm_tok, question: str, num_query_tokens: int, frames: int = pv.NUM_FRAMES) -> list[int]:
    """``InstructBlipVideoProcessor``'s input ids: <video> x Q x 4, then the question with <s>."""
    vid = llm_tok.convert_tokens_to_ids(VIDEO_TOKEN)
    return [vid] * (num_query_tokens * frames) + llm_tok(question).input_ids


def collate(examples, llm_tok, qformer_tok, proc, num_query_tokens):
    import torch

    pixel_values = torch.from_numpy(np.stack([frame_pixels(e["frames"], proc) for e in examples]))
    qf = [qformer_tok(e["question"]).input_ids for e in examples]
    ids, labels = [], []
    for e in examples:
        prompt = prompt_ids(llm_tok, e["question"], num_query_tokens)
        ans = llm_tok(" " + e["answer"], add_special_tokens=False).input_ids + [llm_tok.eos_token_id]
        ids.append(prompt + ans)
        labels.append([-100] * len(prompt) + ans)
    return {"pixel_values": pixel_values,
            "qformer_input_ids": tp._pad(qf, qformer_tok.pad_token_id),
            "qformer_attention_mask": tp._pad([[1] * len(s) for s in qf], 0),
            "input_ids": tp._pad(ids, llm_tok.pad_token_id),
            "attention_mask": tp._pad([[1] * len(s) for s in ids], 0),
            "labels": tp._pad(labels, -100)}


N_SHAPES = len(pt.SHAPES)
FRAME_CLASSES = 1 + len(pt.COLOR_NAMES)   # absent, or the shape's colour


def frame_targets(scenes, with_y: bool = False):
    """Per frame (clip-major, as the model flattens them), for each shape kind: class (0 absent,
    else 1 + colour) and box-centre x / IMAGE_SIZE (NaN when absent); ``with_y``: also box-centre
    y / IMAGE_SIZE."""
    import torch
    n = len(scenes) * pv.NUM_FRAMES
    cls = torch.zeros(n, N_SHAPES, dtype=torch.long)
    xs = torch.full((n, N_SHAPES), float("nan"))
    ys = torch.full((n, N_SHAPES), float("nan"))
    for i, scene in enumerate(scenes):
        for t in range(pv.NUM_FRAMES):
            for s in scene.shapes:
                if s.shown(t):
                    k = pt.SHAPES.index(s.shape)
                    cls[i * pv.NUM_FRAMES + t, k] = 1 + pt.COLOR_NAMES.index(s.color)
                    xs[i * pv.NUM_FRAMES + t, k] = s.cx(t) / pt.IMAGE_SIZE
                    ys[i * pv.NUM_FRAMES + t, k] = s.cy / pt.IMAGE_SIZE
    return (cls, xs, ys) if with_y else (cls, xs)


DELTA_CLASSES = 3   # left, right, still


def delta_targets(scenes, num_query_tokens: int):
    """(clips, (NUM_FRAMES - 1) * num_query_tokens, shape kinds): for every video token of frames
    2..4 (0-based t >= 1), each shape kind's motion class (0 left, 1 right, 2 still) when that shape
    is shown in frame t and in frame t - 1 (so the frames up to t show its motion), else -100."""
    import torch
    t_ = torch.full((len(scenes), pv.NUM_FRAMES - 1, N_SHAPES), -100, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for s in scene.shapes:
            k = pt.SHAPES.index(s.shape)
            for t in range(max(1, s.first + 1), pv.NUM_FRAMES):
                t_[i, t - 1, k] = 0 if s.step < 0 else 1 if s.step > 0 else 2
    return t_.repeat_interleave(num_query_tokens, dim=1)


TRACK_CLASSES = 4   # motion: absent, left, right, still; first frame: absent, 1, 2, 3


def track_targets(scenes):
    """(clips, shape kinds x 2) classes: each shape kind's motion and first frame (0: absent)."""
    import torch
    t = torch.zeros(len(scenes), N_SHAPES, 2, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for s in scene.shapes:
            k = pt.SHAPES.index(s.shape)
            t[i, k, 0] = 1 if s.step < 0 else 2 if s.step > 0 else 3
            t[i, k, 1] = 1 + s.first
    return t.view(len(scenes), -1)


def patch_targets(scenes, grid: int):
    return tp.aux_targets([pv.frame_scene(s, t) for s in scenes for t in range(pv.NUM_FRAMES)], grid)


def predict_batch(model, llm_tok, qformer_tok, proc, examples) -> list[str]:
    """Greedy answers for a list of examples (left-padded batch)."""
    import torch
    Q = model.config.num_query_tokens
    pixel_values = torch.from_numpy(np.stack([frame_pixels(e["frames"], proc) for e in examples]))
    qf = [qformer_tok(e["question"]).input_ids for e in examples]
    ids = [prompt_ids(llm_tok, e["question"], Q) for e in examples]
    width = max(map(len, ids))
    input_ids = torch.tensor([[llm_tok.pad_token_id] * (width - len(s)) + s for s in ids])
    attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])
    with torch.no_grad():
        out = model.generate(pixel_values=pixel_values, qformer_input_ids=tp._pad(qf, qformer_tok.pad_token_id),
                             qformer_attention_mask=tp._pad([[1] * len(s) for s in qf], 0),
                             input_ids=input_ids, attention_mask=attn, max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False)
    return llm_tok.batch_decode(out[:, width:], skip_special_tokens=True)


def evaluate(model, llm_tok, qformer_tok, proc, examples, batch: int = 25) -> dict:
    model.eval()
    per_type = {t: [0, 0] for t in pv.QUESTION_TYPES}
    failures = []
    for k in range(0, len(examples), batch):
        chunk = examples[k:k + batch]
        for ex, pred in zip(chunk, predict_batch(model, llm_tok, qformer_tok, proc, chunk)):
            ok = pt.is_correct(pred, ex["answer"])
            per_type[ex["type"]][0] += ok
            per_type[ex["type"]][1] += 1
            if not ok and len(failures) < 20:
                failures.append({"question": ex["question"], "answer": ex["answer"], "prediction": pred})
    correct = sum(c for c, _ in per_type.values())
    return {"n": len(examples), "accuracy": correct / len(examples),
            "per_type": {t: {"n": n, "accuracy": c / n if n else float("nan")} for t, (c, n) in per_type.items()},
            "failures": failures}


def save_processor(out: Path, llm_tok, qformer_tok):
    """The processor files of an InstructBlipVideo checkpoint (the layout
    ``reference_models.VideoProcessorFiles`` writes: tokenizers, the Q-Former's in
    ``qformer_tokenizer/``, ``video_preprocessor_config.json``, ``processor_config.json``)."""
    from ib_edge.export.reference_models import VideoProcessorFiles
    VideoProcessorFiles(tp.tiny_spec("llama", image_spec()), llm_tok, qformer_tok).save_pretrained(out)


def train(out: Path, seed: int = 0, steps: int | None = None, threads: int = 2, val_every: int = 500,
          log=print, overrides: dict | None = None, init: Path | None = INIT, val_n: int = 100,
          eval_n: int = EVAL_N, workers: int = 1) -> dict:
    """Trains, saves and scores. ``workers`` > 1: that many data-parallel processes (gloo
    all-reduce of the gradients, one data stream each, ``threads`` threads each); rank 0 logs,
    validates, saves and scores."""
    kw = dict(out=out, seed=seed, steps=steps, threads=threads, val_every=val_every, overrides=overrides,
              init=init, val_n=val_n, eval_n=eval_n, workers=workers)
    if workers == 1:
        return _run(0, kw, log)
    import tempfile

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        kw["rendezvous"] = f"file://{tmp}/rendezvous"
        mp.spawn(_spawned, args=(kw,), nprocs=workers, join=True)
    name = "eval_results.json" if eval_n else "train_info.json"
    return json.loads((Path(out) / name).read_text())


def _spawned(rank: int, kw: dict):
    _run(rank, kw, lambda m: print(m, flush=True))


def _run(rank: int, kw: dict, log) -> dict:
    import torch
    import torch.distributed as dist

    out, seed, steps, threads, val_every, overrides, init, val_n, eval_n, world = (
        kw["out"], kw["seed"], kw["steps"], kw["threads"], kw["val_every"], kw["overrides"], kw["init"],
        kw["val_n"], kw["eval_n"], kw["workers"])
    if world > 1:
        dist.init_process_group("gloo", init_method=kw["rendezvous"], rank=rank, world_size=world)
    if rank:
        log = lambda m: None  # noqa: E731
    torch.set_num_threads(threads)
    spec = VideoTrainSpec()
    if steps is not None:
        spec = dataclasses.replace(spec, steps=steps)
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    ispec = image_spec()
    model, llm_tok, qformer_tok = build(spec, seed, init, log)
    proc = image_processor()
    Q = model.config.num_query_tokens
    n_params = sum(p.numel() for p in model.parameters())
    load_start = [round(v, 2) for v in os.getloadavg()]
    log(f"proof-video-llama: {n_params:,} parameters, spec {spec}, threads {threads}, load {load_start}")

    if spec.freeze_vision:
        for p in model.vision_model.parameters():
            p.requires_grad_(False)
    grid = ispec.image_size // ispec.patch_size
    patch_head = torch.nn.Linear(ispec.vision_hidden, tp.AUX_CLASSES) if spec.aux_weight else None
    frame_out = FRAME_CLASSES + 1 + (1 if spec.frame_y else 0)
    frame_in = ispec.text_hidden if spec.frame_pool else Q * ispec.qformer_hidden
    frame_head = torch.nn.Linear(frame_in, N_SHAPES * frame_out) if spec.frame_aux_weight else None
    delta_head = (torch.nn.Linear(ispec.text_hidden, N_SHAPES * DELTA_CLASSES)
                  if spec.delta_aux_weight else None)
    track_head = (torch.nn.Linear(ispec.text_hidden, N_SHAPES * 2 * TRACK_CLASSES)
                  if spec.track_aux_weight else None)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for i, head in enumerate((patch_head, frame_head, track_head, delta_head)):
        if head is not None:
            params += [(f"aux{i}.{n}", p) for n, p in head.named_parameters()]
    groups = []
    for vision in (False, True):
        mine = [(n, p) for n, p in params if n.startswith("vision_model.") == vision]
        scale = spec.vision_lr_scale if vision else 1.0
        groups += [{"params": [p for n, p in mine if p.ndim >= 2 and "query_tokens" not in n],
                    "weight_decay": spec.weight_decay, "lr_scale": scale},
                   {"params": [p for n, p in mine if p.ndim < 2 or "query_tokens" in n],
                    "weight_decay": 0.0, "lr_scale": scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr, betas=(0.9, 0.98))
    t0, c0 = time.time(), time.process_time()
    budget = spec.budget_min * 60.0
    cpu_budget = spec.budget_cpu_min * 60.0

    def progress(step: int) -> float:
        """Fraction of training done: of the steps, or of the wall-time budget if that runs out first."""
        p = step / spec.steps
        return max(p, (time.time() - t0) / budget) if budget else p

    def lr_factor(p: float) -> float:
        if p < spec.warmup:
            return 0.04 + 0.96 * p / spec.warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (p - spec.warmup) / (1.0 - spec.warmup))))

    # rank 0 draws the single-process stream; other ranks their own
    rng = pv.train_rng(seed) if rank == 0 else np.random.default_rng([pv.VIDEO_TRAIN_STREAM, seed, rank])
    type_p = np.asarray(spec.type_weights, dtype=float) / sum(spec.type_weights)
    val = pv.make_eval_examples(val_n, VAL_SEED)
    history = []
    data_time = 0.0
    run = {}

    def smooth(name, v):
        run[name] = v if name not in run else 0.98 * run[name] + 0.02 * v

    def synced_progress(step: int) -> float:
        """progress(step), the same on every rank (the largest), so the lr and the stop agree; with
        ``budget_cpu_min`` also the CPU time of all ranks together over that budget."""
        p = torch.tensor([progress(step)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(p, op=dist.ReduceOp.MAX)
        if cpu_budget:
            c = torch.tensor([time.process_time() - c0], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(c)
            p = torch.maximum(p, c / cpu_budget)
        return float(p)

    trainable = [p for _, p in params]
    step, lr = 0, 0.0
    while step < spec.steps:
        p_now = synced_progress(step)
        if p_now >= 1.0:
            break
        lr = spec.lr * lr_factor(p_now)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        step += 1
        model.train()
        td = time.time()
        types = rng.choice(len(pv.QUESTION_TYPES), size=spec.batch_size, p=type_p)
        examples = [pv.make_example(rng, pv.QUESTION_TYPES[int(t)], return_scene=True) for t in types]
        batch = collate(examples, llm_tok, qformer_tok, proc, Q)
        data_time += time.time() - td
        res = model(**batch, output_hidden_states=track_head is not None or delta_head is not None)
        loss = res.loss
        smooth("loss", res.loss.item())
        scenes = [e["scene"] for e in examples]
        if patch_head is not None:
            patches = res.vision_outputs.last_hidden_state[:, 1:]
            aux = tp.aux_loss(patch_head(patches), patch_targets(scenes, grid))
            smooth("patch", aux.item())
            loss = loss + spec.aux_weight * aux
        if frame_head is not None:
            queries = res.qformer_outputs.last_hidden_state[:, :Q]
            feats = model.language_projection(queries).mean(1) if spec.frame_pool else queries.flatten(1)
            pred = frame_head(feats).view(-1, N_SHAPES, frame_out)
            cls, xs, ys = frame_targets(scenes, with_y=True)
            ce = torch.nn.functional.cross_entropy(pred[..., :FRAME_CLASSES].flatten(0, 1), cls.flatten())
            present = ~torch.isnan(xs)
            mse = ((pred[..., FRAME_CLASSES][present] - xs[present]) ** 2).mean() * 100.0
            smooth("frame_ce", ce.item())
            smooth("x_mse", mse.item() / 100.0)
            if spec.frame_y:
                ymse = ((pred[..., FRAME_CLASSES + 1][present] - ys[present]) ** 2).mean() * 100.0
                smooth("y_mse", ymse.item() / 100.0)
                mse = mse + ymse
            loss = loss + spec.frame_aux_weight * (ce + mse)
        if delta_head is not None:
            first_layer = res.language_model_outputs.hidden_states[1][:, Q:Q * pv.NUM_FRAMES]  # frames 2-4
            logits = delta_head(first_layer).view(-1, DELTA_CLASSES)
            dce = torch.nn.functional.cross_entropy(logits, delta_targets(scenes, Q).flatten(), ignore_index=-100)
            smooth("delta", dce.item())
            loss = loss + spec.delta_aux_weight * dce
        if track_head is not None:
            hidden = res.language_model_outputs.hidden_states[-1]
            last = (batch["labels"] != -100).int().argmax(dim=1) - 1   # the position predicting the answer's first token
            logits = track_head(hidden[torch.arange(len(examples)), last]).view(-1, TRACK_CLASSES)
            tce = torch.nn.functional.cross_entropy(logits, track_targets(scenes).flatten())
            smooth("track", tce.item())
            loss = loss + spec.track_aux_weight * tce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # average the gradients over the ranks (one flat all-reduce)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for p, g in zip(trainable, grads):
                p.grad = flat[offset:offset + g.numel()].view_as(p).clone()
                offset += g.numel()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if step % 25 == 0 or step <= 10:
            el = time.time() - t0
            log(f"step {step}/{spec.steps} " + " ".join(f"{k} {v:.4f}" for k, v in run.items())
                + f" lr {lr:.2e} {el:.0f}s ({el / step:.3f} s/step, data {data_time / step:.3f}) "
                f"cpu {time.process_time() - c0:.0f}s load {os.getloadavg()[0]:.2f}")
        if val_every and step % val_every == 0 and rank == 0:
            tv = time.time()
            r = evaluate(model, llm_tok, qformer_tok, proc, val)
            history.append({"step": step, "loss": run["loss"], "val_accuracy": r["accuracy"],
                            "elapsed_s": round(time.time() - t0, 1)})
            log(f"  val@{step}: {r['accuracy']:.3f} "
                + " ".join(f"{t}={v['accuracy']:.2f}" for t, v in r["per_type"].items())
                + f" ({time.time() - tv:.0f}s) {r['failures'][:3]}")
    train_wall, train_cpu = time.time() - t0, time.process_time() - c0
    if world > 1:  # CPU time of all ranks together
        c = torch.tensor([train_cpu], dtype=torch.float64)
        dist.all_reduce(c)
        train_cpu = float(c)
        dist.destroy_process_group()
        if rank:
            return {}
    log(f"trained {step} steps in {train_wall:.0f}s wall, {train_cpu:.0f}s CPU ({world} process(es)), "
        f"load {os.getloadavg()[0]:.2f}")
    if val_n:
        r = evaluate(model, llm_tok, qformer_tok, proc, val)
        history.append({"step": step, "loss": run["loss"], "val_accuracy": r["accuracy"],
                        "per_type": {t: v["accuracy"] for t, v in r["per_type"].items()},
                        "elapsed_s": round(time.time() - t0, 1), "final": True})
        log(f"  val final ({val_n}, seed {VAL_SEED}) @{step}: {r['accuracy']:.3f} "
            + " ".join(f"{t}={v['accuracy']:.2f}" for t, v in r["per_type"].items()))
    spec = dataclasses.replace(spec, steps=step)
    model.eval()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_processor(out, llm_tok, qformer_tok)
    info = {"seed": seed, "parameters": n_params, "spec": dataclasses.asdict(spec),
            "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
            "train_s_per_step": round(train_wall / spec.steps, 3), "threads": threads, "workers": world,
            "loadavg_start": load_start, "loadavg_end": [round(v, 2) for v in os.getloadavg()], "val_history": history, "versions": tp._versions(),
            "command": _command(out, seed, steps, overrides, threads, init, world, val_every, val_n), "init": str(init) if init else None}
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if eval_n:
        info = score(out, info, eval_n, log)
    return info


def load(out: Path):
    """(model, llm_tok, qformer_tok, image_processor) of a saved proof-video model."""
    from transformers import AutoTokenizer, InstructBlipVideoForConditionalGeneration
    model = InstructBlipVideoForConditionalGeneration.from_pretrained(out, trust_remote_code=False).eval()
    llm_tok = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    qformer_tok = AutoTokenizer.from_pretrained(Path(out) / "qformer_tokenizer", trust_remote_code=False)
    return model, llm_tok, qformer_tok, image_processor()


def score(out: Path, info: dict, eval_n: int = EVAL_N, log=print) -> dict:
    """Held-out accuracy of the saved checkpoint (reloaded), eval_results.json and the card."""
    out = Path(out)
    model, llm_tok, qformer_tok, proc = load(out)
    te = time.time()
    result = evaluate(model, llm_tok, qformer_tok, proc, pv.make_eval_examples(eval_n, EVAL_SEED))
    log(f"held-out ({eval_n}, seed {EVAL_SEED}): {result['accuracy']:.4f} "
        + " ".join(f"{t}={v['accuracy']:.3f}" for t, v in result["per_type"].items()))
    info = dict(info)
    info["eval"] = {"n": eval_n, "seed": EVAL_SEED, **result}
    info["eval_time_s"] = round(time.time() - te, 1)
    info["safetensors_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    (out / "eval_results.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(model_card(info))
    return info


def _command(out, seed, steps, overrides=None, threads=2, init=INIT, workers=1, val_every=500, val_n=100) -> str:
    cmd = f"python -m ib_edge.bench.train_proof_video --out {out} --seed {seed}"
    if threads != 2:
        cmd += f" --threads {threads}"
    if workers != 1:
        cmd += f" --workers {workers}"
    if val_every != 500:   # validation runs inside the timed (and CPU-budgeted) loop
        cmd += f" --val-every {val_every}"
    if val_n != 100:
        cmd += f" --val-n {val_n}"
    if steps is not None:
        cmd += f" --steps {steps}"
    for k, v in (overrides or {}).items():
        cmd += f" --set {k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
    if init != INIT:
        cmd += f" --init {init}" if init else " --no-init"
    return cmd


def _parse_override(text: str):
    key, _, value = text.partition("=")
    fields = {f.name: f.type for f in dataclasses.fields(VideoTrainSpec)}
    if key not in fields:
        raise argparse.ArgumentTypeError(f"unknown spec field {key!r} (one of {sorted(fields)})")
    kind = fields[key] if isinstance(fields[key], str) else fields[key].__name__
    if kind == "tuple":
        return key, tuple(float(v) for v in value.split(","))
    return key, {"int": int, "float": float}[kind](value)


def model_card(info: dict) -> str:
    s, ev = info["spec"], info["eval"]
    ispec = image_spec()
    rows = "\n".join(f"| {t} | {v['n']} | {100 * v['accuracy']:.1f}% |" for t, v in ev["per_type"].items())
    frozen = (" The vision encoder stayed frozen at proof-llama's weights (no backward through it)."
              if s.get("freeze_vision") else
              f" The vision encoder trained too, at {s.get('vision_lr_scale', 1.0):g} x the lr."
              if s.get("vision_lr_scale", 1.0) != 1.0 else "")
    frame_in = ("the frame's mean query output after `language_projection` (the LLM's input space, what its"
                " attention can pool)" if s.get("frame_pool") else "the flattened Q-Former query outputs")
    frame_what = "its x and y position" if s.get("frame_y") else "its x position"
    delta = (f"; a classifier on the LLM's first-layer output at every video token of frames 2-4 naming each"
             f" shape kind's motion as seen up to that frame (weight {s['delta_aux_weight']})"
             if s.get("delta_aux_weight") else "")
    patch = (f" a per-frame patch classifier on the vision output (which shape and colour is centred in"
             f" each patch, weight {s['aux_weight']}) and" if s.get("aux_weight") and not s.get("freeze_vision") else "")
    track = (f" and a classifier on the LLM's last prompt position naming every shape kind's motion and"
             f" first frame (weight {s['track_aux_weight']}), so every clip teaches the LLM the temporal part"
             if s.get("track_aux_weight") else "; the LLM learns the temporal part from the language loss alone")
    budget = (f", stopped by its wall-time budget of {s['budget_min']:g} min (the cosine schedule follows"
              f" elapsed time)" if s.get("budget_min") else "")
    if s.get("budget_cpu_min"):
        cpu_min, wall_min = info["train_cpu_s"] / 60, info["train_wall_s"] / 60
        by_wall = s.get("budget_min") and cpu_min < s["budget_cpu_min"] and wall_min >= s["budget_min"] * 0.99
        budget = (f", with a CPU-time budget of {s['budget_cpu_min']:g} min summed over all processes"
                  f" ({s['budget_cpu_min'] / 2:g} min on 2 cores) and a wall-time cap of {s['budget_min']:g} min, stopped"
                  f" by the wall-time cap after {cpu_min:.1f} CPU-min (the cosine schedule follows whichever fraction"
                  f" is larger)" if by_wall else
                  f", stopped by its CPU-time budget of {s['budget_cpu_min']:g} min summed over all processes"
                  f" ({s['budget_cpu_min'] / 2:g} min on 2 cores; the cosine schedule follows the CPU time spent)")
    bar = ("" if ev["accuracy"] >= 0.95 and min(v["accuracy"] for v in ev["per_type"].values()) >= 0.90 else
           "\n**Below issue 18's bar** (>= 95% overall, >= 90% per question type): see the table.\n")
    return f"""# proof-video-llama: InstructBlipVideo proof model (Llama-style LLM)
{bar}
A small, real `InstructBlipVideoForConditionalGeneration` trained on the synthetic temporal
visual-QA task of `ib_edge.bench.proof_video` (issue 18), so that the effect of export and
quantization on *video* answers can be measured. It knows nothing beyond that task.

## Task

Clips of 4 frames, 224x224, uniform light background; one or two shapes (circle, square,
triangle; 56 px box; six jittered colours), each moving left or right by 24..36 px a frame or
standing still, present from frame 1, 2 or 3 on; two shapes sit one in the upper, one in the lower
half. Questions: "Which way is the {{shape}} moving?" (left / right / not moving), "Which shape
appears later?", "How many frames show the {{shape}}?" (two / three / four), "What color is the
{{shape}}?", "Describe this video." ("a red circle moving left and a blue square standing
still"). Exact match after `proof_task.normalize_answer`.

## Model

Each frame goes through the vision encoder and the instruction-aware Q-Former on its own; the
4 x {ispec.num_query_tokens} query outputs, in frame order, replace the `<video>` tokens in front of
the prompt (`InstructBlipVideoProcessor`'s layout: `<video>` x {ispec.num_query_tokens} x 4, then `<s>` and the question).

| part | shape |
|---|---|
| vision | frames {ispec.image_size}x{ispec.image_size} (the processor resizes), patch {ispec.patch_size}, hidden {ispec.vision_hidden}, {ispec.vision_layers} layers |
| Q-Former | {ispec.num_query_tokens} query tokens per frame, hidden {ispec.qformer_hidden}, {ispec.qformer_layers} layers |
| LLM | Llama-style decoder-only, hidden {ispec.text_hidden}, {ispec.text_layers} layers, {ispec.heads} heads |
| parameters | {info['parameters']:,} ({info['safetensors_bytes'] / 1e6:.1f} MB safetensors, float32) |

Tokenizers: byte-level BPE LLM tokenizer (`<video>` is id 4, where proof-llama has `<image>`)
and WordPiece Q-Former tokenizer from `ib_edge.export.reference_models`, trained on its corpus
plus both proof tasks' questions and answers. Processor files as
`reference_models.VideoProcessorFiles` writes them (`video_preprocessor_config.json`: the BLIP
resize and normalisation per frame).

## Training

    {info['command']}

Started from proof-llama's weights (embedding rows copied by token string, new tokens from
N(0, 0.02)). {s['steps']} steps of batch {s['batch_size']} clips per process x {info.get('workers', 1)} data-parallel
process(es) (gradients all-reduced){budget}, examples generated on the
fly from `proof_video.train_rng({info['seed']})` (never the evaluation streams; question types
weighted {dict(zip(pv.QUESTION_TYPES, s['type_weights']))}), AdamW (peak lr {s['lr']}, warm-up
then cosine, weight decay {s['weight_decay']}), gradient clipping 1.0, {info['threads']} CPU
thread(s) per process.{frozen} Training-only auxiliary heads, not part of the checkpoint:{patch} a per-frame
classifier/regressor on {frame_in} (for each shape kind: absent or its colour,
and {frame_what}; weight {s['frame_aux_weight']}){delta}{track}.

Wall time {info['train_wall_s'] / 60:.1f} min, CPU time {info['train_cpu_s'] / 60:.1f} min (all processes)
({info['train_s_per_step']} s/step wall, periodic validation included), on a 2-core AMD EPYC shared
with other work (load average {info.get('loadavg_start', ['?'])[0]} at the start,
{info['loadavg_end'][0]:.1f} at the end).
{info['note'] + chr(10) if info.get('note') else ''}Versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}.

## Held-out accuracy

{ev['n']} fresh examples, `proof_video.make_eval_examples({ev['n']}, seed={ev['seed']})` (types
balanced), greedy decoding of the saved checkpoint (inputs as `train_proof_video.predict_batch`
builds them, `max_new_tokens={MAX_NEW_TOKENS}`):

| type | n | exact match |
|---|---|---|
{rows}
| **overall** | {ev['n']} | **{100 * ev['accuracy']:.1f}%** |

Details (validation curve, failures): `eval_results.json`.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train proof-video-llama (InstructBlipVideo) on the temporal proof task.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help=f"default {VideoTrainSpec.steps}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--workers", type=int, default=1, help="data-parallel processes (gloo)")
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--val-n", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=EVAL_N)
    ap.add_argument("--set", dest="overrides", type=_parse_override, action="append", default=[],
                    metavar="FIELD=VALUE", help="override a VideoTrainSpec field (experiments)")
    ap.add_argument("--init", type=Path, default=INIT, help="proof model to start from (default proof-llama)")
    ap.add_argument("--no-init", dest="init", action="store_const", const=None, help="start from a fresh init")
    ap.add_argument("--score-only", action="store_true",
                    help="only rewrite the processor files of the saved model in --out and re-score it")
    args = ap.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.score_only:
        save_processor(args.out, *build_tokenizers())
        info = json.loads((args.out / "train_info.json").read_text())
        score(args.out, info, args.eval_n, log)
        return 0
    info = train(args.out, seed=args.seed, steps=args.steps, threads=args.threads, val_every=args.val_every,
                 log=log, overrides=dict(args.overrides), init=args.init, val_n=args.val_n, eval_n=args.eval_n,
                 workers=args.workers)
    print(json.dumps({k: info.get(k) for k in ("parameters", "safetensors_bytes", "train_wall_s", "train_cpu_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
