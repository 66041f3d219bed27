"""Synthetic visual-QA task the proof models are trained and scored on.

Numpy and PIL only (no torch), so tests and benchmarks can generate data cheaply.

Scene: a 224x224 RGB image on one uniform background colour (each channel 200..255) with 1
to 3 shapes, one per column. Column x-centres are 40, 112 and 184 (+-4 px jitter), the
y-centre is 112 (+-40 px); which columns are used is random. Every shape has a fixed 56x56
px bounding box: a circle is the ellipse filling the box, a square is the box inset by 5 px,
a triangle has its apex at the top-centre of the box and its base along the bottom edge.
Colours come from a six-colour palette, each channel jittered by +-15 and clipped. No two
shapes in one image share both shape and colour.

Five question types (answers lower-case):

    color     "What color is the {shape}?"                 -> "{color}"  (that shape occurs once)
    shape     "What shape is the {color} object?"          -> "{shape}"  (that colour occurs once)
    count     "How many shapes are there?"                 -> "one" | "two" | "three"
    side      "Is the {shape} on the left or the right?"   -> "left" | "right"
              (two-shape images only, asked of a shape that occurs once)
    describe  "Describe this image."                       -> shapes left to right, e.g.
              "a red circle", "a red circle and a blue square",
              "a red circle, a blue square and a green triangle"

Answers are compared after :func:`normalize_answer`.

Seeding: evaluation example ``i`` of a set with seed ``s`` is drawn from
``np.random.default_rng([EVAL_STREAM, s, i])``; training streams (see ``train_rng``) use
``[TRAIN_STREAM, s]``. The two tags differ, so training never sees an evaluation stream.

    python -m ib_edge.bench.proof_task --out DIR --n 500 --seed 123
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
BOX = 56                      # every shape's bounding box is BOX x BOX pixels
SQUARE_INSET = 5
COLUMN_X = (40, 112, 184)
X_JITTER = 4
CENTER_Y = 112
Y_JITTER = 40
BACKGROUND_RANGE = (200, 255)  # inclusive, per channel
COLOR_JITTER = 15

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 30),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
COLOR_NAMES = tuple(COLORS)
QUESTION_TYPES = ("color", "shape", "count", "side", "describe")
COUNT_WORDS = ("one", "two", "three")
TEMPLATES = {
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "count": "How many shapes are there?",
    "side": "Is the {shape} on the left or the right?",
    "describe": "Describe this image.",
}

EVAL_STREAM = 0x6576616C   # "eval"
TRAIN_STREAM = 0x74726E    # "trn"


@dataclasses.dataclass(frozen=True)
class SceneObject:
    column: int               # 0, 1, 2 (left to right)
    shape: str
    color: str
    cx: int                   # box centre, pixels
    cy: int
    rgb: tuple[int, int, int]  # the jittered colour actually drawn

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1/y1 exclusive: BOX pixels wide and high."""
        h = BOX // 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclasses.dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]  # sorted left to right

    def to_dict(self) -> dict:
        return {"background": list(self.background),
                "objects": [dataclasses.asdict(o) | {"rgb": list(o.rgb)} for o in self.objects]}


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draws a scene description (no pixels)."""
    lo, hi = BACKGROUND_RANGE
    background = tuple(int(v) for v in rng.integers(lo, hi + 1, size=3))
    n = int(rng.integers(1, 4))
    columns = sorted(int(c) for c in rng.choice(3, size=n, replace=False))
    used: set[tuple[str, str]] = set()
    objects = []
    for col in columns:
        while True:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
            if (shape, color) not in used:
                break
        used.add((shape, color))
        cx = COLUMN_X[col] + int(rng.integers(-X_JITTER, X_JITTER + 1))
        cy = CENTER_Y + int(rng.integers(-Y_JITTER, Y_JITTER + 1))
        base = np.array(COLORS[color])
        rgb = np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255)
        objects.append(SceneObject(col, shape, color, cx, cy, tuple(int(v) for v in rgb)))
    return Scene(background, tuple(objects))


def draw_scene(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        # PIL's coordinates are inclusive: [x0, x1 - 1] covers exactly BOX pixels.
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=o.rgb)
        elif o.shape == "square":
            s = SQUARE_INSET
            draw.rectangle([x0 + s, y0 + s, x1 - 1 - s, y1 - 1 - s], fill=o.rgb)
        elif o.shape == "triangle":
            draw.polygon([(o.cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=o.rgb)
        else:
            raise ValueError(o.shape)
    return img


def render_scene(rng: np.random.Generator) -> tuple[Image.Image, Scene]:
    scene = sample_scene(rng)
    return draw_scene(scene), scene


def describe(scene: Scene) -> str:
    parts = [f"a {o.color} {o.shape}" for o in scene.objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def askable_questions(scene: Scene, qtype: str) -> list[tuple[str, str]]:
    """Every (question, answer) of type ``qtype`` that is valid for ``scene``."""
    objs = scene.objects
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    if qtype == "color":
        return [(TEMPLATES["color"].format(shape=o.shape), o.color)
                for o in objs if shapes.count(o.shape) == 1]
    if qtype == "shape":
        return [(TEMPLATES["shape"].format(color=o.color), o.shape)
                for o in objs if colors.count(o.color) == 1]
    if qtype == "count":
        return [(TEMPLATES["count"], COUNT_WORDS[len(objs) - 1])]
    if qtype == "side":
        if len(objs) != 2:
            return []
        return [(TEMPLATES["side"].format(shape=o.shape), side)
                for o, side in zip(objs, ("left", "right")) if shapes.count(o.shape) == 1]
    if qtype == "describe":
        return [(TEMPLATES["describe"], describe(scene))]
    raise ValueError(f"unknown question type {qtype!r} (one of {QUESTION_TYPES})")


def make_example(rng: np.random.Generator, qtype: str | None = None, *, return_scene: bool = False) -> dict:
    """One example ``dict(image, question, answer, type)``.

    ``qtype=None`` draws a scene and picks a type uniformly among those askable for it;
    otherwise scenes are drawn until one admits a ``qtype`` question."""
    if qtype is not None and qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r} (one of {QUESTION_TYPES})")
    while True:
        scene = sample_scene(rng)
        if qtype is None:
            types = [t for t in QUESTION_TYPES if askable_questions(scene, t)]
            t = types[int(rng.integers(len(types)))]
        else:
            t = qtype
        options = askable_questions(scene, t)
        if options:
            break
    question, answer = options[int(rng.integers(len(options)))]
    ex = {"image": draw_scene(scene), "question": question, "answer": answer, "type": t}
    if return_scene:
        ex["scene"] = scene
    return ex


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed and stripped."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def is_correct(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def correct_by_type(predictions, examples) -> dict[str, list[bool]]:
    """{question type: [is_correct per example]} of predictions against their examples."""
    per_type: dict[str, list[bool]] = {}
    for p, ex in zip(predictions, examples):
        per_type.setdefault(ex["type"], []).append(is_correct(p, ex["answer"]))
    return per_type


def accuracy_percent(predictions, examples) -> float:
    return 100.0 * sum(sum(v) for v in correct_by_type(predictions, examples).values()) / len(examples)


def eval_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([EVAL_STREAM, seed, index])


def train_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([TRAIN_STREAM, seed])


def make_eval_examples(n: int, seed: int) -> list[dict]:
    """``n`` examples, types cycling through QUESTION_TYPES (balanced), example ``i`` drawn
    from its own stream so a prefix of a larger set equals the smaller set."""
    return [make_example(eval_rng(seed, i), QUESTION_TYPES[i % len(QUESTION_TYPES)])
            for i in range(n)]


def write_eval_set(out_dir, n: int, seed: int) -> Path:
    """Writes ``out_dir/images/NNNNN.png`` and ``out_dir/eval.jsonl``; returns the jsonl path.
    Image paths in the jsonl are relative to its folder."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / "eval.jsonl"
    with open(path, "w") as f:
        for i, ex in enumerate(make_eval_examples(n, seed)):
            rel = f"images/{i:05d}.png"
            ex["image"].save(out_dir / rel)
            f.write(json.dumps({"image": rel, "question": ex["question"],
                                "answer": ex["answer"], "type": ex["type"]}) + "\n")
    return path


def read_eval_set(path) -> list[dict]:
    """Rows of an eval jsonl, validated: each line an object with string ``image`` (resolved to
    an absolute path; a video entry has ``frames``, a list of paths, instead), ``question`` and ``answer`` (numbers are taken as their text), and an
    optional ``type`` (likewise; absent: "untyped"). A bad row raises ValueError naming the
    file's line."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # the error column is then within the file's line
            except json.JSONDecodeError as e:
                raise ValueError(f"line {n}: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"line {n}: a row must be a JSON object, not {type(row).__name__}")
            frames = row.get("frames")  # a video entry: "frames": [paths] instead of "image"
            if frames is not None:
                if "image" in row:
                    raise ValueError(f"line {n}: has both image and frames (a video entry lists its frames only)")
                if (not isinstance(frames, list) or not frames
                        or any(not isinstance(f, str) or not f.strip() for f in frames)):
                    raise ValueError(f"line {n}: frames must be a non-empty list of image paths, "
                                     f"got {json.dumps(frames)[:40]}")
                row["frames"] = [str((Path(f) if Path(f).is_absolute() else path.parent / f).resolve())
                                 for f in frames]
            missing = [k for k in ("image", "question", "answer") if k not in row and not (k == "image" and frames)]
            if missing:
                raise ValueError(f"line {n}: lacks {', '.join(missing)}")
            for key in ("question", "answer", "type") if frames is not None else ("image", "question", "answer", "type"):
                v = row.get(key)
                if key == "type" and v is None:
                    row[key] = "untyped"
                elif key in ("answer", "type") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    row[key] = str(v)
                elif not isinstance(v, str) or not v.strip():
                    raise ValueError(f"line {n}: {key} must be non-empty text, got {json.dumps(v)[:40]}")
            if frames is None:
                img = Path(row["image"])
                if not img.is_absolute():
                    img = path.parent / img
                row["image"] = str(img.resolve())
            rows.append(row)
    return rows


def task_text() -> list[str]:
    """Every question and answer word of the task, for tokenizer training."""
    lines = [TEMPLATES["count"], TEMPLATES["describe"], " ".join(COUNT_WORDS), "left right"]
    for shape in SHAPES:
        lines.append(TEMPLATES["color"].format(shape=shape))
        lines.append(TEMPLATES["side"].format(shape=shape))
    for color in COLOR_NAMES:
        lines.append(TEMPLATES["shape"].format(color=color))
        lines.append(", ".join(f"a {color} {shape}" for shape in SHAPES) + " and a " + color)
    return lines


def eval_set_main(write, description: str, argv: list[str] | None = None) -> int:
    """The eval-set writers' command line (this task's and proof_video's): --out, --n, --seed."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args(argv)
    print(write(args.out, args.n, args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    return eval_set_main(write_eval_set, "Write a proof-task evaluation set (PNG + eval.jsonl).", argv)


if __name__ == "__main__":
    raise SystemExit(main())
