"""The proof-video trainer's training-only targets and its CPU-time budget (issue 18)."""
from __future__ import annotations

import json

import pytest

from ib_edge.bench import proof_video as pv

torch = pytest.importorskip("torch")
tpv = pytest.importorskip("ib_edge.bench.train_proof_video")


def _shape(shape, step, first, cy=80):
    return pv.VideoShape(shape, "red", (220, 30, 30), 112, cy, step, first)


def test_delta_targets_name_motion_only_where_two_frames_show_it():
    Q = 2
    scene = pv.VideoScene((230, 230, 230), (_shape("circle", -30, 0), _shape("triangle", 0, 2, cy=150)))
    t = tpv.delta_targets([scene], Q)
    assert t.shape == (1, (pv.NUM_FRAMES - 1) * Q, 3)
    circle, square, triangle = (t[0, :, k].tolist() for k in range(3))
    # video tokens of frames 2, 3, 4 (Q each): the circle moves left (class 0) from frame 2 on
    assert circle == [0] * (3 * Q)
    assert square == [-100] * (3 * Q)                 # absent
    # the triangle appears in frame 3: only frame 4 shows it after an earlier frame; still = 2
    assert triangle == [-100] * (2 * Q) + [2] * Q


def test_frame_targets_y_and_absence():
    scene = pv.VideoScene((230, 230, 230), (_shape("square", 24, 1, cy=75),))
    cls, xs, ys = tpv.frame_targets([scene], with_y=True)
    k = 1  # square
    assert cls[0, k] == 0 and torch.isnan(xs[0, k]) and torch.isnan(ys[0, k])
    assert cls[1, k] == 1 + pv.COLOR_NAMES.index("red")
    assert xs[3, k] == pytest.approx((112 + 3 * 24) / 224) and ys[3, k] == pytest.approx(75 / 224)


def test_cpu_budget_stops_training(tmp_path):
    """budget_cpu_min stops a run whose step count would go on, once the process's CPU time
    reaches it (one process here: 0.1 CPU-minute)."""
    info = tpv.train(tmp_path / "m", steps=100000, threads=1, val_every=0, val_n=0, eval_n=0,
                     log=lambda m: None, init=None,
                     overrides={"budget_cpu_min": 0.1, "batch_size": 2, "aux_weight": 0.0,
                                "delta_aux_weight": 1.0, "frame_pool": 1, "frame_y": 1, "track_aux_weight": 1.0})
    assert 1 <= info["spec"]["steps"] < 100000
    assert 6.0 <= info["train_cpu_s"] < 6.0 + 10.0, info["train_cpu_s"]
    assert json.loads((tmp_path / "m" / "train_info.json").read_text())["spec"]["budget_cpu_min"] == 0.1
    assert "--set budget_cpu_min=0.1" in info["command"]
