"""Tests of the temporal proof-task generator (issue 18; numpy + PIL only, no torch).

Every clip is measured back from its rendered frames with code written here (blobs, their
boxes and fill, nearest palette colour), tracks are rebuilt across frames from those
measurements, and every answer is recomputed from the tracks, never from the generator's own
scene description: so each answer is shown to be determined by the frames alone.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ib_edge.bench import proof_video as pv

from .test_proof_task import SPEC_COLORS

# The spec, restated independently of the module under test.
FRAMES = 4
WORDS = {2: "two", 3: "three", 4: "four"}
QUESTION_PATTERNS = {
    "motion": re.compile(r"^Which way is the (circle|square|triangle) moving\?$"),
    "later": re.compile(r"^Which shape appears later\?$"),
    "frames": re.compile(r"^How many frames show the (circle|square|triangle)\?$"),
    "color": re.compile(r"^What color is the (circle|square|triangle)\?$"),
    "describe": re.compile(r"^Describe this video\.$"),
}
TYPES = ("motion", "later", "frames", "color", "describe")


def measure_frame(image: Image.Image) -> dict:
    """Background colour and the blobs top to bottom (shape, colour, box), from pixels only."""
    assert image.size == (224, 224) and image.mode == "RGB"
    a = np.asarray(image).astype(int)
    fg = a.min(axis=2) < 128          # background channels are >= 200, shapes have one <= 60
    background = tuple(a[~fg][0])
    assert (a[~fg] == background).all(), "background is not one uniform colour"
    assert all(200 <= c <= 255 for c in background)
    rows = np.flatnonzero(fg.any(axis=1))
    runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1) if rows.size else []
    blobs = []
    for run in runs:
        y0, y1 = run[0], run[-1]
        band = fg[y0:y1 + 1]
        cols = np.flatnonzero(band.any(axis=0))
        assert (np.diff(cols) == 1).all(), "two blobs side by side in one row band"
        x0, x1 = cols[0], cols[-1]
        sub = band[:, x0:x1 + 1]
        w, h = x1 - x0 + 1, y1 - y0 + 1
        ratio = sub.sum() / (w * h)
        colours = np.unique(a[y0:y1 + 1, x0:x1 + 1][sub], axis=0)
        assert len(colours) == 1, "a shape is not one flat colour"
        rgb = tuple(int(v) for v in colours[0])
        dist = {n: max(abs(c - r) for c, r in zip(ref, rgb)) for n, ref in SPEC_COLORS.items()}
        color = min(dist, key=dist.get)
        assert dist[color] <= 15, f"colour {rgb} is not a jittered palette colour"
        if (w, h) == (46, 46) and ratio == 1.0:
            shape, cx, cy = "square", (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
        elif (w, h) == (56, 56) and abs(ratio - np.pi / 4) < 0.03 and sub[0].sum() < 20:
            shape, cx, cy = "circle", (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
        elif (w, h) == (56, 56) and abs(ratio - 0.5) < 0.05 and sub[0].sum() <= 3 and sub[-1].sum() == 56:
            shape, cx, cy = "triangle", (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
        else:
            raise AssertionError(f"unrecognised blob {w}x{h} fill {ratio:.3f}")
        # Box of the 56 px shape (the square is drawn inset by 5 px).
        pad = 5 if shape == "square" else 0
        blobs.append({"shape": shape, "color": color, "rgb": rgb, "cx": cx, "cy": cy,
                      "rows": (y0 - pad, y1 + pad)})
    return {"background": background, "blobs": blobs}


def measure_clip(frames) -> list[dict]:
    """Tracks rebuilt from the frames, top to bottom: shape, colour, first frame shown
    (0-based), per-frame x, fixed y, step, and the spec's checks on each."""
    assert len(frames) == FRAMES
    ms = [measure_frame(f) for f in frames]
    assert len({m["background"] for m in ms}) == 1, "background changes between frames"
    tracks: dict[str, dict] = {}
    for t, m in enumerate(ms):
        for b in m["blobs"]:
            tr = tracks.setdefault(b["shape"], {"shape": b["shape"], "color": b["color"], "rgb": b["rgb"],
                                                "cy": b["cy"], "rows": b["rows"], "xs": {}})
            assert (tr["color"], tr["rgb"], tr["cy"]) == (b["color"], b["rgb"], b["cy"]), "a shape changed"
            tr["xs"][t] = b["cx"]
    out = []
    for tr in sorted(tracks.values(), key=lambda tr: tr["cy"]):
        shown = sorted(tr["xs"])
        first = shown[0]
        assert shown == list(range(first, FRAMES)), f"shape shown in frames {shown}"
        assert first in (0, 1, 2), "a shape must show in at least two frames, from frame 1, 2 or 3"
        steps = {tr["xs"][t + 1] - tr["xs"][t] for t in shown[:-1]}
        assert len(steps) == 1, f"step not constant: {steps}"
        step = steps.pop()
        assert step == 0 or 24 <= abs(step) <= 36, f"step {step}"
        assert 72 <= tr["cy"] <= 152, f"y {tr['cy']}"
        out.append(dict(tr, first=first, step=step, count=FRAMES - first))
    assert 1 <= len(out) <= 2
    if len(out) == 2:
        upper, lower = out
        assert upper["rows"][1] <= 111 and lower["rows"][0] >= 112, "not one shape per half"
        assert lower["rows"][0] - upper["rows"][1] >= 2, "shapes touch"
    return out


def direction(tr) -> str:
    return "not moving" if tr["step"] == 0 else ("right" if tr["step"] > 0 else "left")


def expected_answer(question: str, tracks: list[dict]) -> tuple[str, str]:
    """(type, answer) worked out from the measured tracks; fails if not askable."""
    by_shape = {tr["shape"]: tr for tr in tracks}
    for qtype, pat in QUESTION_PATTERNS.items():
        m = pat.match(question)
        if not m:
            continue
        if qtype == "later":
            assert len(tracks) == 2
            early = [tr for tr in tracks if tr["first"] == 0]
            late = [tr for tr in tracks if tr["first"] > 0]
            assert len(early) == 1 and len(late) == 1, "'later' asked without one early and one late shape"
            return qtype, late[0]["shape"]
        if qtype == "describe":
            return qtype, " and ".join(
                f"a {tr['color']} {tr['shape']} " + ("standing still" if tr["step"] == 0 else f"moving {direction(tr)}")
                for tr in tracks)
        tr = by_shape[m[1]]   # KeyError: asked about a shape that is not in the clip
        return qtype, {"motion": direction(tr), "frames": WORDS[tr["count"]], "color": tr["color"]}[qtype]
    raise AssertionError(f"question matches no template: {question!r}")


@pytest.mark.parametrize("qtype", TYPES)
def test_examples_of_each_type_match_their_frames(qtype):
    rng = np.random.default_rng(2000 + TYPES.index(qtype))
    for _ in range(40):
        ex = pv.make_example(rng, qtype)
        assert set(ex) == {"frames", "question", "answer", "type"} and ex["type"] == qtype
        assert ex["answer"] == ex["answer"].lower()
        assert expected_answer(ex["question"], measure_clip(ex["frames"])) == (qtype, ex["answer"])


def test_untyped_examples_cover_all_types_and_are_consistent():
    rng = np.random.default_rng(6)
    seen = set()
    for _ in range(100):
        ex = pv.make_example(rng)
        assert expected_answer(ex["question"], measure_clip(ex["frames"])) == (ex["type"], ex["answer"])
        seen.add(ex["type"])
    assert seen == set(TYPES)


def test_scene_description_matches_frames_and_ranges_are_used():
    rng = np.random.default_rng(12)
    steps, firsts, counts, ys, xs, bgs = set(), set(), set(), [], [], []
    for _ in range(300):
        ex = pv.make_example(rng, return_scene=True)
        scene, tracks = ex["scene"], measure_clip(ex["frames"])
        assert [(s.shape, s.color, s.step, s.first, s.cy) for s in scene.shapes] == \
            [(tr["shape"], tr["color"], tr["step"], tr["first"], tr["cy"]) for tr in tracks]
        assert len({s.shape for s in scene.shapes}) == len(scene.shapes)
        for s, tr in zip(scene.shapes, tracks):
            assert all(tr["xs"][t] == s.cx(t) for t in tr["xs"])
            xs += [s.cx(t) for t in range(FRAMES)]
        steps |= {s.step for s in scene.shapes}
        firsts |= {s.first for s in scene.shapes}
        counts.add(len(scene.shapes))
        ys += [s.cy for s in scene.shapes]
        bgs += list(scene.background)
    assert 0 in steps and {24, 36, -24, -36} <= steps and max(map(abs, steps)) == 36
    assert firsts == {0, 1, 2} and counts == {1, 2}
    assert min(ys) == 72 and max(ys) == 152
    assert min(xs) == 28 and max(xs) == 196       # every frame keeps the 56 px box inside 224
    assert min(bgs) < 205 and max(bgs) > 250


def test_answer_values_cover_the_spec():
    rng = np.random.default_rng(24)
    values = {t: {pv.make_example(rng, t)["answer"] for _ in range(80)} for t in ("motion", "later", "frames", "color")}
    assert values["motion"] == {"left", "right", "not moving"}
    assert values["later"] == {"circle", "square", "triangle"}
    assert values["frames"] == {"two", "three", "four"}
    assert values["color"] == set(SPEC_COLORS)
    forms = {re.sub(r"(red|green|blue|yellow|purple|orange) (circle|square|triangle)", "C S",
                    pv.make_example(rng, "describe")["answer"]) for _ in range(80)}
    assert forms == {"a C S moving left", "a C S moving right", "a C S standing still"} | {
        f"a C S {a} and a C S {b}" for a in ("moving left", "moving right", "standing still")
        for b in ("moving left", "moving right", "standing still")}


def test_later_is_asked_only_with_one_shape_from_frame_1():
    rng = np.random.default_rng(25)
    for _ in range(40):
        tracks = measure_clip(pv.make_example(rng, "later")["frames"])
        assert sorted(tr["first"] == 0 for tr in tracks) == [False, True]


def test_unknown_type_rejected():
    with pytest.raises(ValueError):
        pv.make_example(np.random.default_rng(0), "size")


def test_determinism_by_seed_and_streams():
    same = [pv.make_example(np.random.default_rng(42)) for _ in range(2)]
    other = pv.make_example(np.random.default_rng(43))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(same[0]["frames"], same[1]["frames"]))
    assert (same[0]["question"], same[0]["answer"]) == (same[1]["question"], same[1]["answer"])
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(same[0]["frames"], other["frames"]))
    e1, e2, e3 = pv.make_eval_examples(10, 5), pv.make_eval_examples(12, 5), pv.make_eval_examples(10, 6)
    assert [x["type"] for x in e1] == list(TYPES) * 2
    for x, y in zip(e1, e2):   # a prefix of a larger set is the smaller set
        assert (x["question"], x["answer"]) == (y["question"], y["answer"])
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(x["frames"], y["frames"]))
    assert not all(np.array_equal(np.asarray(x["frames"][0]), np.asarray(y["frames"][0])) for x, y in zip(e1, e3))
    train = pv.train_rng(5)
    seen = [np.asarray(pv.make_example(train, t)["frames"][-1]) for t in TYPES * 2]
    assert not any(np.array_equal(a, np.asarray(x["frames"][-1])) for a in seen for x in e1)
    # The video streams are not the image task's.
    from ib_edge.bench import proof_task
    assert proof_task.eval_rng(5, 0).integers(1 << 30) != pv.eval_rng(5, 0).integers(1 << 30)


def test_eval_set_round_trip(tmp_path):
    path = pv.write_eval_set(tmp_path / "set", n=10, seed=9)
    raw = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert len(raw) == 10 and all(len(r["frames"]) == FRAMES for r in raw)
    assert all(not Path(p).is_absolute() for r in raw for p in r["frames"])
    rows = pv.read_eval_set(path)
    mem = pv.make_eval_examples(10, seed=9)
    for r, ex in zip(rows, mem):
        assert set(r) == {"frames", "question", "answer", "type"}
        assert (r["question"], r["answer"], r["type"]) == (ex["question"], ex["answer"], ex["type"])
        frames = []
        for p, f in zip(r["frames"], ex["frames"]):
            assert Path(p).is_absolute()
            with Image.open(p) as im:
                frames.append(im.convert("RGB"))
            assert np.array_equal(np.asarray(frames[-1]), np.asarray(f))   # PNG is lossless
        assert expected_answer(r["question"], measure_clip(frames)) == (r["type"], r["answer"])


@pytest.mark.parametrize("line,message", [
    ('{"frames": "a.png", "question": "q", "answer": "a"}', "frames must be a non-empty list"),
    ('{"frames": [], "question": "q", "answer": "a"}', "frames must be a non-empty list"),
    ('{"frames": ["a.png"], "answer": "a"}', "lacks question"),
    ('[1]', "a row must be a JSON object"),
    ('{"frames": ["a.png"], "question": " ", "answer": "a"}', "question must be non-empty text"),
])
def test_read_eval_set_rejects_bad_rows(tmp_path, line, message):
    jl = tmp_path / "eval.jsonl"
    jl.write_text('{"frames": ["a.png"], "question": "q", "answer": 4}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"line 2: {message}"):
        pv.read_eval_set(jl)


def test_cli_writes_eval_set(tmp_path):
    assert pv.main(["--out", str(tmp_path / "cli"), "--n", "5", "--seed", "1"]) == 0
    rows = pv.read_eval_set(tmp_path / "cli" / "eval.jsonl")
    assert [r["type"] for r in rows] == list(TYPES)
    assert len(list((tmp_path / "cli" / "frames").glob("*.png"))) == 5 * FRAMES


def test_module_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, ib_edge.bench.proof_video; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
