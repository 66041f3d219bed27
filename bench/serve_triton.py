"""Triton (``python`` repository) and ib-serve on the same bundle, one after the other in one run.

    python -m ib_edge.bench.serve_triton --bundle DIR [--questions 40] [--concurrency 1,8]
           [--threads 1,0] [--max-batch 8] [--warmup 8] [--max-tokens 32] [--env DIR] [--json FILE]

For each ``--threads`` setting T (0: the libraries' defaults, all cores per process):
  1. ``ib-triton export DIR --variant python --max-batch B --threads T`` into a temporary folder,
     ``ib-triton serve`` on free ports, ``ib-triton client ask`` (tritonclient over HTTP) with C
     clients at once for each ``--concurrency`` level, then SIGTERM;
  2. ``ib-serve --bundle DIR --max-batch B --threads T`` (T = 0: no --threads) with the official
     ``openai`` client, the same questions at the same levels.
Every level asks a fresh set of proof-task questions (each about its own freshly drawn image, so
ib-serve's embedding cache cannot help), the same set for both servers; a warm-up set goes to
each server first. Latency is per request at the client; requests/s is questions / wall time of
the level; answers are checked against the proof task's truth. Prints one Markdown table with
the load average beside every row (the machine may be shared); --json writes the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import proof_task
from .serve_load import Served, cpu_model, serve_load, summary, with_load


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class TritonServed:
    """``ib-triton serve REPO`` on free ports, ready when constructed; its log goes to ``log_path``."""

    def __init__(self, repo: Path, env: Path, log_path: Path, timeout: float = 900):
        t0 = time.perf_counter()
        self.http, grpc, metrics = free_ports(3)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "ib_edge.triton.cli", "serve", str(repo), "--env", str(env),
                                      "--http-port", str(self.http), "--grpc-port", str(grpc),
                                      "--metrics-port", str(metrics)],
                                     stdout=subprocess.DEVNULL, stderr=self.log, stdin=subprocess.DEVNULL)
        while not _ready(self.http):
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                self.close()
                tail = "".join(Path(log_path).read_text(errors="replace").splitlines(True)[-20:])
                raise SystemExit(f"ib-triton serve did not become ready:\n{tail}")
            time.sleep(0.5)
        self.ready_s = time.perf_counter() - t0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ib-triton stops the server's whole process group
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def write_queries(examples: list[dict], folder: Path, max_tokens: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    queries = []
    for i, ex in enumerate(examples):
        p = folder / f"{i:04d}.png"
        ex["image"].save(p)
        queries.append({"image": str(p), "prompt": ex["question"], "max_new_tokens": max_tokens})
    path = folder / "queries.json"
    path.write_text(json.dumps(queries), encoding="utf-8")
    return path


def triton_ask(env: Path, code: Path, port: int, queries: Path, concurrency: int) -> dict:
    """``python -m ib_edge.triton.client ask`` in the models' environment (tritonclient lives there)."""
    p = subprocess.run([str(env / "bin" / "python"), "-m", "ib_edge.triton.client", "ask", "--url",
                        f"127.0.0.1:{port}", "--concurrency", str(concurrency), str(queries)],
                       capture_output=True, text=True, cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"ib-triton client failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout)


def triton_level(env, code, port, queries: Path, examples: list[dict], concurrency: int) -> dict:
    out = triton_ask(env, code, port, queries, concurrency)
    rs = out["results"]
    errors = [r["error"] for r in rs if "error" in r]
    correct = sum("text" in r and proof_task.is_correct(r["text"], ex["answer"]) for r, ex in zip(rs, examples))
    res = summary([r["seconds"] for r in rs], out["wall_seconds"], correct, len(rs))
    if errors:
        res["errors"] = len(errors)
        res["first_error"] = errors[0]
    return res


def run_triton(bundle: str, threads: int, max_batch: int, env: Path, sets: dict, warm: list, work: Path,
               max_tokens: int) -> dict:
    from ib_edge.triton.repository import ExportOptions, export_repository
    from ib_edge.triton.server import copy_code

    repo = export_repository(bundle, work / f"repo-t{threads}", ExportOptions(variant="python", max_batch=max_batch,
                                                                              threads=threads))
    code = copy_code(work / f"code-t{threads}")
    res = {"levels": {}}
    served = TritonServed(repo, env, work / f"triton-t{threads}.log")
    try:
        res["ready_s"] = round(served.ready_s, 1)
        triton_ask(env, code, served.http, warm[0], 1)  # warm-up, answers not counted
        for c, (examples, qpath) in sets.items():
            res["levels"][c] = with_load(triton_level, env, code, served.http, qpath, examples, c)
            print(f"triton, threads {threads}, {c} clients: {res['levels'][c]}", file=sys.stderr, flush=True)
    finally:
        served.close()
    return res


def run_serve(bundle: str, threads: int, max_batch: int, sets: dict, warm: list, max_tokens: int) -> dict:
    import openai

    extra = ["--max-batch", str(max_batch), "--max-tokens", str(max_tokens)]
    if threads:
        extra += ["--threads", str(threads)]
    served = Served(bundle, extra)
    res = {"ready_s": round(served.ready_s, 1), "levels": {}}
    try:
        client = openai.OpenAI(base_url=served.base, api_key="none", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        serve_load(client, model, warm[1], 1, max_tokens)  # warm-up, as for Triton
        for c, (examples, _) in sets.items():
            res["levels"][c] = with_load(serve_load, client, model, examples, c, max_tokens)
            print(f"ib-serve, threads {threads}, {c} clients: {res['levels'][c]}", file=sys.stderr, flush=True)
    finally:
        served.close()
    return res


def table(res: dict) -> str:
    L = [f"CPU: {res['cpu']}, {res['cores']} cores; bundle {res['bundle']}; max batch {res['max_batch']}, "
         f"{res['max_tokens']} new tokens at most; load average (1/5/15 min) at start {res['loadavg_start']}, "
         f"at end {res['loadavg_end']}", "",
         "| threads per process/model | system | clients | questions | requests/s | p50 ms | p99 ms | right | "
         "1-min load avg (start -> end) |", "|---|---|---|---|---|---|---|---|---|"]
    for t, pair in res["runs"].items():
        for name in ("triton", "ib-serve"):
            label = f"Triton python repo (ready in {pair[name]['ready_s']} s)" if name == "triton" else \
                f"ib-serve (ready in {pair[name]['ready_s']} s)"
            for c, r in pair[name]["levels"].items():
                right = f"{round(r['accuracy'] * r['n'])}/{r['n']}" + (f", {r['errors']} errors" if r.get("errors") else "")
                L.append(f"| {t if int(t) else '0 (libraries default)'} | {label} | {c} | {r['n']} | "
                         f"{r['requests_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {right} | {r['loadavg']} |")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ib_edge.bench.serve_triton", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--questions", type=int, default=40, help="questions per concurrency level")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--threads", default="1,0", help="thread settings to compare (0: the libraries' defaults)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=8, help="warm-up questions sent to each server first")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=7070)
    ap.add_argument("--env", default=None, help="the Triton models' environment (default: ib-triton's own)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    from ib_edge.triton.server import prepare_env

    levels = [int(c) for c in args.concurrency.split(",") if c]
    thread_settings = [int(t) for t in args.threads.split(",") if t]
    if not levels or min(levels) < 1 or not thread_settings or min(thread_settings) < 0 or args.questions < 1:
        ap.error("--concurrency needs levels >= 1, --threads settings >= 0, --questions >= 1")
    env = prepare_env(args.env, log=lambda m: print(m, file=sys.stderr, flush=True)).root
    res = {"cpu": cpu_model(), "cores": os.cpu_count(), "bundle": args.bundle, "max_batch": args.max_batch,
           "max_tokens": args.max_tokens, "loadavg_start": loadavg(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="ib-serve-triton-") as tmp:
        work = Path(tmp)
        warm_ex = proof_task.make_eval_examples(args.warmup, args.seed)
        warm = (write_queries(warm_ex, work / "warm", args.max_tokens), warm_ex)
        sets = {}
        for i, c in enumerate(levels):
            ex = proof_task.make_eval_examples(args.questions, args.seed + 1 + i)
            sets[c] = (ex, write_queries(ex, work / f"c{c}", args.max_tokens))
        for t in thread_settings:
            res["runs"][t] = {"triton": run_triton(args.bundle, t, args.max_batch, env, sets, warm, work, args.max_tokens),
                              "ib-serve": run_serve(args.bundle, t, args.max_batch, sets, warm, args.max_tokens)}
    res["loadavg_end"] = loadavg()
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
