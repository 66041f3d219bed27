"""Tests of the proof-task generator (numpy + PIL only, no torch).

Scenes are measured back from the rendered pixels with code written here (blob finding,
area ratios, nearest palette colour), and every question's answer is recomputed from that
measurement rather than from the generator's own scene description.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ib_edge.bench import proof_task as pt

# The spec, restated independently of the module under test.
SPEC_COLORS = {
    "red": (220, 20, 20), "green": (20, 160, 40), "blue": (30, 60, 220),
    "yellow": (230, 210, 30), "purple": (140, 40, 180), "orange": (245, 130, 20),
}
SPEC_COLUMNS = (40, 112, 184)
NUMBERS = {1: "one", 2: "two", 3: "three"}
QUESTION_PATTERNS = {
    "color": re.compile(r"^What color is the (circle|square|triangle)\?$"),
    "shape": re.compile(r"^What shape is the (red|green|blue|yellow|purple|orange) object\?$"),
    "count": re.compile(r"^How many shapes are there\?$"),
    "side": re.compile(r"^Is the (circle|square|triangle) on the left or the right\?$"),
    "describe": re.compile(r"^Describe this image\.$"),
}
TYPES = ("color", "shape", "count", "side", "describe")


def measure(image: Image.Image) -> dict:
    """Background colour and the shapes left to right, measured from pixels only."""
    a = np.asarray(image).astype(int)
    assert a.shape == (224, 224, 3)
    fg = a.min(axis=2) < 128          # background channels are >= 200, shapes have one <= 60
    bg_pixels = a[~fg]
    background = tuple(bg_pixels[0])
    assert (bg_pixels == background).all(), "background is not one uniform colour"
    cols = np.flatnonzero(fg.any(axis=0))
    runs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1) if cols.size else []
    objects = []
    for run in runs:
        x0, x1 = run[0], run[-1]
        sub = fg[:, x0:x1 + 1]
        rows = np.flatnonzero(sub.any(axis=1))
        y0, y1 = rows[0], rows[-1]
        assert (np.diff(rows) == 1).all(), "blob is not vertically contiguous"
        w, h = x1 - x0 + 1, y1 - y0 + 1
        area = sub.sum()
        ratio = area / (w * h)
        colours = np.unique(a[:, x0:x1 + 1][sub], axis=0)
        assert len(colours) == 1, "a shape is not one flat colour"
        rgb = tuple(int(v) for v in colours[0])
        dist = {n: max(abs(c - r) for c, r in zip(ref, rgb)) for n, ref in SPEC_COLORS.items()}
        color = min(dist, key=dist.get)
        top_width = sub[y0].sum()
        bottom_width = sub[y1].sum()
        if w == 46 and h == 46 and ratio == 1.0:
            shape = "square"
        elif w == 56 and h == 56 and abs(ratio - np.pi / 4) < 0.03 and top_width < 20:
            shape = "circle"
        elif w == 56 and h == 56 and abs(ratio - 0.5) < 0.05 and top_width <= 3 and bottom_width == 56:
            shape = "triangle"
        else:
            raise AssertionError(f"unrecognised blob {w}x{h} fill {ratio:.3f}")
        objects.append({
            "cx": (x0 + x1 + 1) / 2, "cy": (y0 + y1 + 1) / 2, "w": w, "h": h,
            "shape": shape, "color": color, "rgb": rgb, "color_dist": dist[color],
        })
    return {"background": background, "objects": objects}


def expected_answer(question: str, objects: list[dict]) -> tuple[str, str]:
    """(type, answer) worked out from the measured objects; fails if not askable."""
    shapes = [o["shape"] for o in objects]
    colors = [o["color"] for o in objects]
    for qtype, pat in QUESTION_PATTERNS.items():
        m = pat.match(question)
        if not m:
            continue
        if qtype == "color":
            assert shapes.count(m[1]) == 1, "asked the colour of a non-unique shape"
            return qtype, colors[shapes.index(m[1])]
        if qtype == "shape":
            assert colors.count(m[1]) == 1, "asked the shape of a non-unique colour"
            return qtype, shapes[colors.index(m[1])]
        if qtype == "count":
            return qtype, NUMBERS[len(objects)]
        if qtype == "side":
            assert len(objects) == 2 and shapes.count(m[1]) == 1
            return qtype, "left" if shapes.index(m[1]) == 0 else "right"
        parts = ["a %s %s" % (o["color"], o["shape"]) for o in objects]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return qtype, text
    raise AssertionError(f"question matches no template: {question!r}")


def check_scene_pixels(image: Image.Image) -> dict:
    assert image.size == (224, 224) and image.mode == "RGB"
    m = measure(image)
    assert all(200 <= c <= 255 for c in m["background"])
    objs = m["objects"]
    assert 1 <= len(objs) <= 3
    used_columns = []
    for o in objs:
        offsets = [abs(o["cx"] - c) for c in SPEC_COLUMNS]
        col = int(np.argmin(offsets))
        assert offsets[col] <= 4, f"shape centred at x={o['cx']}"
        assert 72 <= o["cy"] <= 152, f"shape centred at y={o['cy']}"
        assert o["color_dist"] <= 15, f"colour {o['rgb']} is not a jittered palette colour"
        used_columns.append(col)
    assert used_columns == sorted(set(used_columns)), "two shapes in one column"
    pairs = [(o["shape"], o["color"]) for o in objs]
    assert len(set(pairs)) == len(pairs), "two shapes share shape and colour"
    return m


@pytest.mark.parametrize("qtype", TYPES)
def test_examples_of_each_type_match_their_pixels(qtype):
    rng = np.random.default_rng(1000 + TYPES.index(qtype))
    for _ in range(40):
        ex = pt.make_example(rng, qtype)
        assert set(ex) >= {"image", "question", "answer", "type"}
        assert ex["type"] == qtype
        m = check_scene_pixels(ex["image"])
        t, answer = expected_answer(ex["question"], m["objects"])
        assert t == qtype
        assert ex["answer"] == answer
        assert ex["answer"] == ex["answer"].lower()


def test_untyped_examples_cover_all_types_and_are_consistent():
    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(150):
        ex = pt.make_example(rng)
        m = check_scene_pixels(ex["image"])
        t, answer = expected_answer(ex["question"], m["objects"])
        assert (t, answer) == (ex["type"], ex["answer"])
        seen.add(t)
    assert seen == set(TYPES)


def test_render_scene_description_matches_pixels():
    rng = np.random.default_rng(11)
    counts, columns, dx, dy, bgs = set(), set(), [], [], []
    for _ in range(150):
        image, scene = pt.render_scene(rng)
        m = check_scene_pixels(image)
        objs = scene.objects
        assert [(o.shape, o.color) for o in objs] == [(o["shape"], o["color"]) for o in m["objects"]]
        assert [SPEC_COLUMNS[o.column] for o in objs] == [
            SPEC_COLUMNS[int(np.argmin([abs(x["cx"] - c) for c in SPEC_COLUMNS]))] for x in m["objects"]]
        counts.add(len(objs))
        columns.update(o.column for o in objs)
        dx += [x["cx"] - SPEC_COLUMNS[o.column] for o, x in zip(objs, m["objects"])]
        dy += [x["cy"] - 112 for x in m["objects"]]
        bgs += list(m["background"])
        for x in m["objects"]:
            if x["shape"] == "square":
                assert (x["w"], x["h"]) == (46, 46)
            else:
                assert (x["w"], x["h"]) == (56, 56)
    # The jitter and randomness ranges are actually used.
    assert counts == {1, 2, 3} and columns == {0, 1, 2}
    assert min(dx) == -4 and max(dx) == 4
    assert min(dy) < -30 and max(dy) > 30
    assert min(bgs) < 205 and max(bgs) > 250


def test_palette_jitter_is_used_and_bounded():
    rng = np.random.default_rng(3)
    devs = []
    for _ in range(100):
        for o in measure(pt.render_scene(rng)[0])["objects"]:
            ref = SPEC_COLORS[o["color"]]
            devs += [c - r for c, r in zip(o["rgb"], ref)]
    assert max(devs) <= 15 and min(devs) >= -15
    assert max(devs) >= 12 and min(devs) <= -12


def test_side_questions_only_on_two_shape_images():
    rng = np.random.default_rng(21)
    answers = set()
    for _ in range(60):
        ex = pt.make_example(rng, "side")
        assert len(measure(ex["image"])["objects"]) == 2
        answers.add(ex["answer"])
    assert answers == {"left", "right"}


def test_count_answers_cover_one_two_three():
    rng = np.random.default_rng(22)
    assert {pt.make_example(rng, "count")["answer"] for _ in range(60)} == {"one", "two", "three"}


def test_describe_examples():
    rng = np.random.default_rng(23)
    forms = set()
    for _ in range(60):
        ans = pt.make_example(rng, "describe")["answer"]
        n = len(re.findall(r"\b(circle|square|triangle)\b", ans))
        forms.add(n)
        assert re.fullmatch(r"a \w+ \w+((, a \w+ \w+)* and a \w+ \w+)?", ans)
    assert forms == {1, 2, 3}


def test_unknown_type_rejected():
    with pytest.raises(ValueError):
        pt.make_example(np.random.default_rng(0), "size")


def test_determinism_by_seed():
    a = [pt.make_example(np.random.default_rng(42)) for _ in range(1)][0]
    b = pt.make_example(np.random.default_rng(42))
    c = pt.make_example(np.random.default_rng(43))
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert (a["question"], a["answer"], a["type"]) == (b["question"], b["answer"], b["type"])
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))
    e1 = pt.make_eval_examples(10, seed=5)
    e2 = pt.make_eval_examples(10, seed=5)
    e3 = pt.make_eval_examples(10, seed=6)
    assert [x["question"] + x["answer"] for x in e1] == [x["question"] + x["answer"] for x in e2]
    assert all(np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(e1, e2))
    assert not all(np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(e1, e3))


def test_training_stream_differs_from_eval_streams():
    train = pt.train_rng(123)
    images = [np.asarray(pt.make_example(train, t)["image"]) for t in TYPES * 2]
    evals = [np.asarray(x["image"]) for x in pt.make_eval_examples(10, seed=123)]
    assert not any(np.array_equal(a, b) for a in images for b in evals)


@pytest.mark.parametrize("text,expected", [
    ("  Red. ", "red"),
    ("RIGHT!", "right"),
    (" A red circle, a blue square and a green triangle.", "a red circle a blue square and a green triangle"),
    ("a red circle,a blue  square", "a red circlea blue square"),
    ("three", "three"),
])
def test_normalize_answer(text, expected):
    assert pt.normalize_answer(text) == expected


def test_normalized_describe_answers_compare_equal():
    assert pt.normalize_answer("a red circle, a blue square and a green triangle") == \
        pt.normalize_answer(" A red circle , a blue square and a green triangle. ")
    assert pt.normalize_answer("a red circle") != pt.normalize_answer("a red square")


def test_eval_set_round_trip(tmp_path):
    path = pt.write_eval_set(tmp_path / "set", n=20, seed=9)
    assert Path(path).name == "eval.jsonl"
    raw = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert len(raw) == 20
    assert all(not Path(r["image"]).is_absolute() for r in raw)
    rows = pt.read_eval_set(path)
    assert len(rows) == 20
    types = [r["type"] for r in rows]
    assert {t: types.count(t) for t in TYPES} == {t: 4 for t in TYPES}
    for r in rows:
        assert set(r) == {"image", "question", "answer", "type"}
        img_path = Path(r["image"])
        assert img_path.is_absolute() and img_path.exists()
        with Image.open(img_path) as im:
            im = im.convert("RGB")
            m = check_scene_pixels(im)
        assert expected_answer(r["question"], m["objects"]) == (r["type"], r["answer"])
    # Same examples as generated in memory (PNG is lossless).
    mem = pt.make_eval_examples(20, seed=9)
    for r, ex in zip(rows, mem):
        assert (r["question"], r["answer"], r["type"]) == (ex["question"], ex["answer"], ex["type"])
        with Image.open(r["image"]) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(ex["image"]))


def test_read_eval_set_accepts_absolute_paths(tmp_path):
    img = tmp_path / "elsewhere" / "x.png"
    img.parent.mkdir()
    Image.new("RGB", (224, 224), (210, 210, 210)).save(img)
    jl = tmp_path / "sets" / "eval.jsonl"
    jl.parent.mkdir()
    jl.write_text(json.dumps({"image": str(img), "question": "How many shapes are there?",
                              "answer": "one", "type": "count"}) + "\n\n")
    rows = pt.read_eval_set(jl)
    assert len(rows) == 1 and Path(rows[0]["image"]) == img.resolve()


def test_cli_writes_eval_set(tmp_path):
    assert pt.main(["--out", str(tmp_path / "cli"), "--n", "5", "--seed", "1"]) == 0
    rows = pt.read_eval_set(tmp_path / "cli" / "eval.jsonl")
    assert [r["type"] for r in rows] == list(TYPES)


def test_module_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, ib_edge.bench.proof_task; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
