"""Load benchmark of ib-serve against one ib-run process per question.

    python -m ib_edge.bench.serve_load --bundle DIR [--questions 32] [--concurrency 1,4,16]
           [--ib-run-questions 8] [--ib-run-concurrency 1,4] [--ttft-images 8] [--json FILE]

Starts ``ib-serve`` (port 0, default options) on the bundle, then with the official ``openai``
client asks proof-task questions (each about its own freshly drawn image, so the embedding
cache cannot help; a fresh set per concurrency level) with 1, 4 and 16 clients at once:
requests/s, p50/p99 latency, accuracy. Time to first token (streaming) is measured on a cache
miss (first question about a new image) and a hit (a second question about it). The baseline
answers questions the way a shell script would without the server: one ``ib-run --json``
process per question, started N at a time. Prints a Markdown table; --json writes the figures.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import proof_task


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(prompt: str, url: str) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": prompt}]}]


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, float), q)) if xs else float("nan")


def summary(lat_s: list[float], wall_s: float, correct: int, n: int) -> dict:
    return {"n": n, "wall_s": round(wall_s, 3), "requests_per_s": round(n / wall_s, 3),
            "p50_ms": round(pct(lat_s, 50) * 1e3, 1), "p99_ms": round(pct(lat_s, 99) * 1e3, 1),
            "accuracy": round(correct / n, 4)}


class Served:
    """An ib-serve subprocess on a free port, ready when constructed."""

    def __init__(self, bundle: str, extra: list[str], timeout: float = 600):
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "ib_edge.serve.cli", "--bundle", bundle, "--port", "0",
                                      "--log-level", "warning", *extra],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     # a session of its own, as ib-triton serve gives tritonserver: with the
                                     # kernel's autogroup scheduling a session is one CPU share, so a server
                                     # left in the caller's session shares it with whatever else runs there
                                     start_new_session=True)
        line = self.proc.stderr.readline()
        m = re.search(r"listening on (http://\S+/v1)", line)
        if not m:
            raise SystemExit(f"ib-serve did not start: {line}{self.proc.stderr.read()}")
        self.base = m.group(1)
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise SystemExit("ib-serve exited while loading")
            if "ready" in line:
                break
            if time.perf_counter() - t0 > timeout:
                raise SystemExit("ib-serve did not become ready")
        self.ready_s = time.perf_counter() - t0

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def with_load(fn, *args) -> dict:
    """``fn(*args)`` (a dict of figures) with the 1-min load average before and after it beside them."""
    before = os.getloadavg()[0]
    out = fn(*args)
    return {**out, "loadavg": f"{before:.1f} -> {os.getloadavg()[0]:.1f}"}


def run_concurrent(one, examples: list[dict], concurrency: int) -> dict:
    """``one(i) -> (seconds, answer)`` for every example on ``concurrency`` threads: latency,
    throughput and how many answers were right."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(len(examples))))
    wall = time.perf_counter() - t0
    correct = sum(proof_task.is_correct(a, ex["answer"]) for (_, a), ex in zip(results, examples))
    return summary([lat for lat, _ in results], wall, correct, len(examples))


def serve_load(client, model: str, examples: list[dict], concurrency: int, max_tokens: int) -> dict:
    urls = [data_url(ex["image"]) for ex in examples]  # encoded before the clock starts

    def one(i):
        t = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=messages(examples[i]["question"], urls[i]),
                                           max_tokens=max_tokens)
        return time.perf_counter() - t, r.choices[0].message.content

    return run_concurrent(one, examples, concurrency)


def ttft(client, model: str, examples: list[dict], max_tokens: int) -> dict:
    """Streaming, one client: first content chunk after a new image (miss) and after a second
    question about the same image (hit)."""
    def first_token(url, prompt):
        t = time.perf_counter()
        stream = client.chat.completions.create(model=model, messages=messages(prompt, url), stream=True,
                                                max_tokens=max_tokens)
        got = end = None
        for ch in stream:
            if got is None and ch.choices and ch.choices[0].delta.content:
                got = time.perf_counter() - t
            if ch.choices and ch.choices[0].finish_reason:
                end = time.perf_counter() - t
        # a generation whose tokens decode to no text (random weights) sends none: its first
        # token then shows only as the finishing chunk, an upper bound
        return got if got is not None else end

    miss, hit = [], []
    for ex in examples:
        url = data_url(ex["image"])
        miss.append(first_token(url, ex["question"]))
        hit.append(first_token(url, "How many shapes are there?"))
    return {"n": len(examples), "miss_p50_ms": round(pct(miss, 50) * 1e3, 1),
            "hit_p50_ms": round(pct(hit, 50) * 1e3, 1),
            "miss_ms": [round(x * 1e3, 1) for x in miss], "hit_ms": [round(x * 1e3, 1) for x in hit]}


def ib_run_load(bundle: str, examples: list[dict], concurrency: int, max_tokens: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i, ex in enumerate(examples):
            p = Path(d) / f"{i}.png"
            ex["image"].save(p)
            paths.append(p)

        def one(i):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "ib_edge.runtime.cli", "--bundle", bundle, str(paths[i]),
                                  examples[i]["question"], "--max-new-tokens", str(max_tokens), "--json", *extra],
                                 capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                raise SystemExit(f"ib-run failed: {out.stderr}")
            return time.perf_counter() - t, json.loads(out.stdout)["answer"]

        return run_concurrent(one, examples, concurrency)


def table(res: dict) -> str:
    unchecked = res.get("random_weights")
    L = [f"CPU: {res['cpu']}, {res['cores']} cores; load average at start {res['loadavg_start']}, "
         f"at end {res['loadavg_end']}; bundle {res['bundle']}; ib-serve ready in {res['serve_ready_s']:.1f} s",
         "", "| system | clients | questions | requests/s | p50 ms | p99 ms | accuracy | 1-min load (start -> end) |",
         "|---|---|---|---|---|---|---|---|"]
    for name, key in (("ib-serve", "serve"), ("ib-run, one process per question", "ib_run")):
        for c, r in res[key].items():
            acc = "not checked (random weights)" if unchecked else f"{100 * r['accuracy']:.1f}%"
            L.append(f"| {name} | {c} | {r['n']} | {r['requests_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{acc} | {r.get('loadavg', '')} |")
    t = res["ttft"]
    L += ["", f"Time to first token (streaming, 1 client, {t['n']} images, p50): cache miss {t['miss_p50_ms']:.1f} ms, "
              f"cache hit {t['hit_p50_ms']:.1f} ms (1-min load {t.get('loadavg', '?')})"]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ib_edge.bench.serve_load", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--questions", type=int, default=32, help="questions per concurrency level (ib-serve)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--ib-run-questions", type=int, default=8, help="questions per level for the ib-run baseline")
    ap.add_argument("--ib-run-concurrency", default="1,4")
    ap.add_argument("--ttft-images", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=9090)
    ap.add_argument("--serve-args", default="", help="extra ib-serve options, e.g. '--threads 2'")
    ap.add_argument("--run-args", default="", help="extra ib-run options, e.g. '--threads 2'")
    ap.add_argument("--random-weights", action="store_true",
                    help="a random-weight bundle (ib-bench --scale real): answers are not checked")
    ap.add_argument("--ready-timeout", type=float, default=600, help="seconds for ib-serve to load and warm up")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    import openai

    levels = [int(c) for c in args.concurrency.split(",") if c]
    run_levels = [int(c) for c in args.ib_run_concurrency.split(",") if c]
    res = {"cpu": cpu_model(), "cores": os.cpu_count(), "bundle": args.bundle,
           "loadavg_start": " ".join(f"{x:.1f}" for x in os.getloadavg()), "serve": {}, "ib_run": {},
           "random_weights": args.random_weights}
    served = Served(args.bundle, args.serve_args.split(), timeout=args.ready_timeout)
    res["serve_ready_s"] = served.ready_s
    try:
        client = openai.OpenAI(base_url=served.base, api_key="none", max_retries=0, timeout=900)
        model = client.models.list().data[0].id
        seed = args.seed
        for c in levels:
            seed += 1
            res["serve"][c] = with_load(serve_load, client, model, proof_task.make_eval_examples(args.questions, seed),
                                        c, args.max_tokens)
            print(f"ib-serve, {c} clients: {res['serve'][c]}", file=sys.stderr, flush=True)
        seed += 1
        res["ttft"] = with_load(ttft, client, model, proof_task.make_eval_examples(args.ttft_images, seed), args.max_tokens)
        print(f"ttft: {res['ttft']}", file=sys.stderr, flush=True)
        import urllib.request

        with urllib.request.urlopen(served.base.removesuffix("/v1") + "/health", timeout=30) as r:
            res["health_end"] = json.loads(r.read())
    finally:
        served.close()
    for c in run_levels:
        seed += 1
        res["ib_run"][c] = with_load(ib_run_load, args.bundle, proof_task.make_eval_examples(args.ib_run_questions, seed),
                                     c, args.max_tokens, args.run_args.split())
        print(f"ib-run, {c} at once: {res['ib_run'][c]}", file=sys.stderr, flush=True)
    res["loadavg_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
