"""The serving benchmarks' bookkeeping (bench/serve_load.py, bench/serve_triton.py): answers are
scored against the proof task's truth, Triton errors are counted, never scored right, and a
random-weight run says its answers were not checked. The servers themselves are tested in
test_serve.py and test_triton.py."""
from __future__ import annotations

from ib_edge.bench import serve_load, serve_triton


def test_triton_level_scores_answers_and_counts_errors(monkeypatch):
    examples = [{"answer": "red"}, {"answer": "3"}, {"answer": "circle"}, {"answer": "blue"}]
    out = {"results": [{"text": "Red.", "seconds": 0.1}, {"text": "4", "seconds": 0.2},
                       {"error": "bad image", "status": "400", "seconds": 0.3}, {"text": "blue", "seconds": 0.4}],
           "wall_seconds": 2.0}
    monkeypatch.setattr(serve_triton, "triton_ask", lambda *a: out)
    r = serve_triton.triton_level("env", "code", 1, "q.json", examples, 2)
    assert r["n"] == 4 and r["accuracy"] == 0.5 and r["requests_per_s"] == 2.0
    assert r["errors"] == 1 and r["first_error"] == "bad image"
    assert r["p50_ms"] == 250.0


def test_with_load_keeps_figures_and_adds_load():
    r = serve_load.with_load(lambda a, b: {"n": a + b}, 1, 2)
    assert r["n"] == 3 and " -> " in r["loadavg"]


def test_random_weight_table_does_not_score():
    level = {"n": 4, "requests_per_s": 1.0, "p50_ms": 1.0, "p99_ms": 2.0, "accuracy": 0.0, "loadavg": "1.0 -> 2.0"}
    res = {"cpu": "x", "cores": 2, "loadavg_start": "1", "loadavg_end": "2", "bundle": "b", "serve_ready_s": 1.0,
           "serve": {1: level}, "ib_run": {1: level}, "ttft": {"n": 1, "miss_p50_ms": 2.0, "hit_p50_ms": 1.0},
           "random_weights": True}
    text = serve_load.table(res)
    assert "not checked (random weights)" in text and "0.0%" not in text
    res["random_weights"] = False
    assert "0.0%" in serve_load.table(res)


def test_ttft_counts_an_answer_without_text_at_its_finishing_chunk():
    from types import SimpleNamespace as NS

    def chunk(content=None, finish=None):
        return NS(choices=[NS(delta=NS(content=content), finish_reason=finish)])

    class Client:
        def __init__(self):
            self.chat = NS(completions=NS(create=self.create))

        def create(self, *, messages, **kw):  # the first question's answer has text, the second none
            text = messages[0]["content"][1]["text"] != "How many shapes are there?"
            return iter([chunk(""), chunk("red" if text else None), chunk(None, "stop")])

    from PIL import Image

    r = serve_load.ttft(Client(), "m", [{"image": Image.new("RGB", (4, 4)), "question": "What color?"}], 4)
    assert r["n"] == 1 and len(r["miss_ms"]) == 1 and len(r["hit_ms"]) == 1
    assert r["hit_p50_ms"] >= 0 and r["miss_p50_ms"] >= 0
