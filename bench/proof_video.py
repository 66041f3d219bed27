"""Synthetic temporal visual-QA task (the proof task for InstructBLIP *video*, issue 18).

Numpy and PIL only (no torch). Constants, shape drawing, palette, colour jitter, answer
normalisation and stream seeding all come from :mod:`ib_edge.bench.proof_task`.

Video: NUM_FRAMES = 4 frames of 224x224 RGB, one uniform background colour for the whole
clip (each channel 200..255, as in the image task). One or two shapes, drawn exactly as the
image task draws them (56x56 px box; circle / square inset 5 px / triangle), colour from the
six-colour palette with each channel jittered by +-15 and clipped, fixed for the clip.

- Motion: a shape either stands still or moves horizontally by a constant step of
  +-(24..36) px per frame, so it crosses at least 3 * 24 = 72 px over the 4 frames.
  Its box centre in frame ``t`` (0-based) is ``x0 + t * step``.
- Vertical position: fixed per shape, box centre y in 112 +-40. With two shapes one is in
  the upper half (centre y 72..83, box rows <= 110) and one in the lower half (centre y
  141..152, box rows >= 113): never touching.
- Appearance: a shape is present in all frames, or appears from frame 2 or 3 on (1-based)
  and stays. ``first`` below is 0-based (0, 1 or 2).
- Every shape lies fully inside the frame in all 4 frames (so in every frame it is shown).
- Two shapes in one video never share the shape, so "the {shape}" is unambiguous.

Five question types (answers lower-case):

    motion    "Which way is the {shape} moving?"   -> "left" | "right" | "not moving"
    later     "Which shape appears later?"         -> "{shape}"  (two shapes only: one
              present from frame 1, the other appearing from frame 2 or 3)
    frames    "How many frames show the {shape}?"  -> "two" | "three" | "four"
    color     "What color is the {shape}?"         -> "{color}"
    describe  "Describe this video."               -> per shape "a {color} {shape} moving
              {left|right}" or "a {color} {shape} standing still", two shapes joined by
              " and ", upper shape first

Answers are compared after ``proof_task.normalize_answer``.

Seeding as in the image task, under its own tags: evaluation example ``i`` of a set with
seed ``s`` is drawn from ``np.random.default_rng([VIDEO_EVAL_STREAM, s, i])``, training
streams use ``[VIDEO_TRAIN_STREAM, s]``.

    python -m ib_edge.bench.proof_video --out DIR --n 500 --seed 123
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .proof_task import (BACKGROUND_RANGE, eval_set_main, BOX, CENTER_Y, COLOR_JITTER, COLOR_NAMES, COLORS,
                         IMAGE_SIZE, SHAPES, Y_JITTER, Scene, SceneObject, draw_scene,
                         is_correct, normalize_answer)

__all__ = ["NUM_FRAMES", "QUESTION_TYPES", "TEMPLATES", "VideoShape", "VideoScene", "sample_video",
           "draw_frames", "make_example", "make_eval_examples", "write_eval_set", "read_eval_set",
           "normalize_answer", "is_correct", "eval_rng", "train_rng", "task_text", "main"]

NUM_FRAMES = 4
STEP_RANGE = (24, 36)           # inclusive, |px| per frame for a moving shape
MIN_TRAVEL = (NUM_FRAMES - 1) * STEP_RANGE[0]   # 72 px
HALF = BOX // 2
X_RANGE = (HALF, IMAGE_SIZE - HALF)   # inclusive box-centre x keeping the box inside
Y_RANGE = (CENTER_Y - Y_JITTER, CENTER_Y + Y_JITTER)   # 72..152: one shape
UPPER_Y = (CENTER_Y - Y_JITTER, CENTER_Y - HALF - 1)   # 72..83: box rows <= 110
LOWER_Y = (CENTER_Y + HALF + 1, CENTER_Y + Y_JITTER)   # 141..152: box rows >= 113
FIRST_FRAMES = (0, 1, 2)        # 0-based frame a shape appears in (frame 1, 2 or 3)

QUESTION_TYPES = ("motion", "later", "frames", "color", "describe")
FRAME_COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
TEMPLATES = {
    "motion": "Which way is the {shape} moving?",
    "later": "Which shape appears later?",
    "frames": "How many frames show the {shape}?",
    "color": "What color is the {shape}?",
    "describe": "Describe this video.",
}

VIDEO_EVAL_STREAM = 0x76657661   # "veva"
VIDEO_TRAIN_STREAM = 0x767472    # "vtr"


@dataclasses.dataclass(frozen=True)
class VideoShape:
    shape: str
    color: str
    rgb: tuple[int, int, int]   # the jittered colour actually drawn
    x0: int                     # box-centre x in frame 0 (also when not yet shown)
    cy: int                     # box-centre y, fixed
    step: int                   # px per frame: 0 (still) or +-(24..36)
    first: int                  # 0-based first frame shown: 0, 1 or 2

    def cx(self, t: int) -> int:
        """Box-centre x in frame ``t``: ``x0 + t * step``."""
        return self.x0 + t * self.step

    def shown(self, t: int) -> bool:
        return t >= self.first

    @property
    def direction(self) -> str:
        return "right" if self.step > 0 else "left" if self.step < 0 else "not moving"

    @property
    def frame_count(self) -> int:
        return NUM_FRAMES - self.first


@dataclasses.dataclass(frozen=True)
class VideoScene:
    background: tuple[int, int, int]
    shapes: tuple[VideoShape, ...]   # one or two; with two, the upper one first

    def to_dict(self) -> dict:
        return {"background": list(self.background),
                "shapes": [dataclasses.asdict(s) | {"rgb": list(s.rgb)} for s in self.shapes]}


def _randint(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi], both inclusive."""
    return int(rng.integers(lo, hi + 1))


def _jittered(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    """The image task's colour rule: palette colour + U(-15..15) per channel, clipped."""
    base = np.array(COLORS[color])
    rgb = np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255)
    return tuple(int(v) for v in rgb)


def _sample_track(rng: np.random.Generator) -> tuple[int, int]:
    """(x0, step): still (1/3) or moving left/right by 24..36 px a frame, x0 drawn so the
    box stays inside the frame in all NUM_FRAMES frames."""
    lo, hi = X_RANGE
    kind = int(rng.integers(3))   # 0 still, 1 right, 2 left
    if kind == 0:
        return _randint(rng, lo, hi), 0
    step = _randint(rng, *STEP_RANGE)
    travel = (NUM_FRAMES - 1) * step
    if kind == 1:
        return _randint(rng, lo, hi - travel), step
    return _randint(rng, lo + travel, hi), -step


def sample_video(rng: np.random.Generator) -> VideoScene:
    """Draws a video description (no pixels), following the module docstring's rules."""
    lo, hi = BACKGROUND_RANGE
    background = tuple(int(v) for v in rng.integers(lo, hi + 1, size=3))
    n = _randint(rng, 1, 2)
    kinds = [SHAPES[int(i)] for i in rng.choice(len(SHAPES), size=n, replace=False)]
    y_ranges = [Y_RANGE] if n == 1 else [UPPER_Y, LOWER_Y]
    shapes = []
    for shape, (ylo, yhi) in zip(kinds, y_ranges):
        color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        x0, step = _sample_track(rng)
        first = FIRST_FRAMES[int(rng.integers(len(FIRST_FRAMES)))]
        shapes.append(VideoShape(shape, color, _jittered(rng, color), x0, _randint(rng, ylo, yhi), step, first))
    return VideoScene(background, tuple(shapes))


def frame_scene(scene: VideoScene, t: int) -> Scene:
    """Frame ``t`` as an image-task Scene (shapes shown in that frame at their positions);
    ``column`` is meaningless here and set to -1."""
    objs = tuple(SceneObject(-1, s.shape, s.color, s.cx(t), s.cy, s.rgb) for s in scene.shapes if s.shown(t))
    return Scene(scene.background, objs)


def draw_frames(scene: VideoScene) -> list[Image.Image]:
    """The NUM_FRAMES RGB frames, each drawn by ``proof_task.draw_scene``."""
    return [draw_scene(frame_scene(scene, t)) for t in range(NUM_FRAMES)]


def describe(scene: VideoScene) -> str:
    """"a {color} {shape} moving {left|right}" / "... standing still", upper first, " and "."""
    parts = []
    for s in scene.shapes:
        motion = "standing still" if s.step == 0 else f"moving {s.direction}"
        parts.append(f"a {s.color} {s.shape} {motion}")
    return " and ".join(parts)


def askable_questions(scene: VideoScene, qtype: str) -> list[tuple[str, str]]:
    """Every (question, answer) of type ``qtype`` that is valid for ``scene``."""
    shapes = scene.shapes
    if qtype == "motion":
        return [(TEMPLATES["motion"].format(shape=s.shape), s.direction) for s in shapes]
    if qtype == "later":
        if len(shapes) != 2:
            return []
        a, b = shapes
        if a.first == 0 and b.first > 0:
            return [(TEMPLATES["later"], b.shape)]
        if b.first == 0 and a.first > 0:
            return [(TEMPLATES["later"], a.shape)]
        return []
    if qtype == "frames":
        return [(TEMPLATES["frames"].format(shape=s.shape), FRAME_COUNT_WORDS[s.frame_count]) for s in shapes]
    if qtype == "color":
        return [(TEMPLATES["color"].format(shape=s.shape), s.color) for s in shapes]
    if qtype == "describe":
        return [(TEMPLATES["describe"], describe(scene))]
    raise ValueError(f"unknown question type {qtype!r} (one of {QUESTION_TYPES})")


def make_example(rng: np.random.Generator, qtype: str | None = None, *, return_scene: bool = False) -> dict:
    """One example ``dict(frames, question, answer, type)`` (``frames``: NUM_FRAMES PIL images).

    ``qtype=None`` picks a type uniformly among QUESTION_TYPES, then (as for a given
    ``qtype``) draws videos until one admits a question of that type; so types come out
    balanced even though "later" is askable for few videos."""
    if qtype is not None and qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r} (one of {QUESTION_TYPES})")
    t = qtype if qtype is not None else QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    while True:
        scene = sample_video(rng)
        options = askable_questions(scene, t)
        if options:
            break
    question, answer = options[int(rng.integers(len(options)))]
    ex = {"frames": draw_frames(scene), "question": question, "answer": answer, "type": t}
    if return_scene:
        ex["scene"] = scene
    return ex


def eval_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([VIDEO_EVAL_STREAM, seed, index])


def train_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([VIDEO_TRAIN_STREAM, seed])


def make_eval_examples(n: int, seed: int) -> list[dict]:
    """``n`` examples, types cycling through QUESTION_TYPES (balanced), example ``i`` drawn
    from its own stream so a prefix of a larger set equals the smaller set."""
    return [make_example(eval_rng(seed, i), QUESTION_TYPES[i % len(QUESTION_TYPES)]) for i in range(n)]


def write_eval_set(out_dir, n: int, seed: int) -> Path:
    """Writes ``out_dir/frames/NNNNN_F.png`` (F = 0..3) and ``out_dir/eval.jsonl``; returns the
    jsonl path. One line per example: ``{"frames": [4 paths], "question", "answer", "type"}``,
    frame paths relative to the jsonl's folder (as ``proof_task.write_eval_set`` does for
    ``image``)."""
    out_dir = Path(out_dir)
    (out_dir / "frames").mkdir(parents=True, exist_ok=True)
    path = out_dir / "eval.jsonl"
    with open(path, "w") as f:
        for i, ex in enumerate(make_eval_examples(n, seed)):
            rels = [f"frames/{i:05d}_{t}.png" for t in range(len(ex["frames"]))]
            for rel, frame in zip(rels, ex["frames"]):
                frame.save(out_dir / rel)
            f.write(json.dumps({"frames": rels, "question": ex["question"],
                                "answer": ex["answer"], "type": ex["type"]}) + "\n")
    return path


def _text_field(n: int, key: str, v) -> str:
    """Non-empty text; a number is taken as its text. Otherwise ValueError naming the line."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and key in ("answer", "type"):
        return str(v)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"line {n}: {key} must be non-empty text, got {json.dumps(v)[:40]}")
    return v


def _frame_paths(n: int, v, base: Path) -> list[str]:
    """A non-empty list of non-empty strings, each resolved against ``base``."""
    if not isinstance(v, list) or not v or not all(isinstance(p, str) and p.strip() for p in v):
        raise ValueError(f"line {n}: frames must be a non-empty list of paths, got {json.dumps(v)[:40]}")
    out = []
    for p in v:
        p = Path(p)
        out.append(str((p if p.is_absolute() else base / p).resolve()))
    return out


def read_eval_set(path) -> list[dict]:
    """Rows of a video eval jsonl, validated as ``proof_task.read_eval_set`` does: each line an
    object with ``frames`` (a list of paths, resolved to absolute paths), text ``question`` and
    ``answer`` (numbers taken as their text), optional ``type`` (absent: "untyped"). A bad row
    raises ValueError naming the file's line. The frame count is not checked here (the
    runtime's ``load_frames`` does that)."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise ValueError(f"line {n}: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"line {n}: a row must be a JSON object, not {type(row).__name__}")
            missing = [k for k in ("frames", "question", "answer") if k not in row]
            if missing:
                raise ValueError(f"line {n}: lacks {', '.join(missing)}")
            row["frames"] = _frame_paths(n, row["frames"], path.parent)
            row["question"] = _text_field(n, "question", row["question"])
            row["answer"] = _text_field(n, "answer", row["answer"])
            row["type"] = "untyped" if row.get("type") is None else _text_field(n, "type", row["type"])
            rows.append(row)
    return rows


def task_text() -> list[str]:
    """Every question and answer word of the task, for tokenizer training."""
    lines = [TEMPLATES["later"], TEMPLATES["describe"], "left right not moving standing still",
             " ".join(FRAME_COUNT_WORDS.values())]
    for shape in SHAPES:
        for key in ("motion", "frames", "color"):
            lines.append(TEMPLATES[key].format(shape=shape))
    for color in COLOR_NAMES:
        lines.append(" and ".join(f"a {color} {shape} moving left" for shape in SHAPES))
    return lines


def main(argv: list[str] | None = None) -> int:
    return eval_set_main(write_eval_set, "Write a proof-video evaluation set (PNG frames + eval.jsonl).", argv)


if __name__ == "__main__":
    raise SystemExit(main())
