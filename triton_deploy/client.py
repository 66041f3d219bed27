"""Client side of the Triton repository, run with the models' environment's Python.

tritonclient cannot live in the project's environment (its gRPC part needs protobuf < 7,
gptqmodel 7.6 needs protobuf >= 7.34); the environment ``ib-triton serve`` prepares has it
(nvidia-pytriton depends on it). The tests and the throughput measurement call:

    ENV/bin/python -m ib_edge.triton.client configs REPO
        every config.pbtxt parsed with Triton's own schema (model_config_pb2), as JSON
    ENV/bin/python -m ib_edge.triton.client ask --url 127.0.0.1:8000 --protocol http|grpc
                   [--concurrency N] [--repeat N] QUERIES.json
        QUERIES.json: [{"image": PATH, "prompt": TEXT, ...generation inputs}]; prints one JSON
        list: per query {"text" or "error", "seconds"}, plus wall time
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .spec import GENERATION_INPUTS, MODELS

MODEL = "instructblip"


def parse_configs(repo) -> dict:
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    out = {}
    for name in MODELS:
        cfg = model_config_pb2.ModelConfig()
        text_format.Parse((Path(repo) / name / "config.pbtxt").read_text(encoding="utf-8"), cfg)
        out[name] = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
    return out


def _inputs(mod, query: dict) -> list:
    image = np.array([[Path(query["image"]).read_bytes()]], dtype=np.object_)
    prompt = np.array([[query["prompt"].encode("utf-8")]], dtype=np.object_)
    arrays = {"image": image, "prompt": prompt}
    for name, (_, dtype) in GENERATION_INPUTS.items():
        if query.get(name) is not None:
            arrays[name] = np.array([[query[name]]], dtype=dtype)
    out = []
    for name, a in arrays.items():
        t = mod.InferInput(name, list(a.shape), "BYTES" if a.dtype == np.object_ else
                           {"int32": "INT32", "int64": "INT64", "float32": "FP32"}[str(a.dtype)])
        t.set_data_from_numpy(a)
        out.append(t)
    return out


def ask(url: str, protocol: str, queries: list[dict], concurrency: int = 1, repeat: int = 1) -> dict:
    """Send ``queries`` (``repeat`` times each) with ``concurrency`` clients; one client object per
    thread, as tritonclient wants."""
    if protocol == "http":
        import tritonclient.http as mod
    else:
        import tritonclient.grpc as mod
    from tritonclient.utils import InferenceServerException

    local = threading.local()

    def client():
        if not hasattr(local, "c"):
            local.c = mod.InferenceServerClient(url=url)
        return local.c

    def one(q: dict) -> dict:
        t0 = time.perf_counter()
        try:
            res = client().infer(MODEL, _inputs(mod, q), outputs=[mod.InferRequestedOutput("text")])
            text = res.as_numpy("text").reshape(-1)[0]
            return {"text": text.decode("utf-8") if isinstance(text, bytes) else str(text),
                    "seconds": time.perf_counter() - t0}
        except InferenceServerException as e:
            return {"error": e.message(), "status": str(e.status()), "seconds": time.perf_counter() - t0}

    work = [q for q in queries for _ in range(repeat)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, work))
    return {"results": results, "wall_seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ib_edge.triton.client")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("configs")
    c.add_argument("repo")
    a = sub.add_parser("ask")
    a.add_argument("queries")
    a.add_argument("--url", required=True)
    a.add_argument("--protocol", choices=("http", "grpc"), default="http")
    a.add_argument("--concurrency", type=int, default=1)
    a.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    if args.command == "configs":
        json.dump(parse_configs(args.repo), sys.stdout)
    else:
        queries = json.loads(Path(args.queries).read_text(encoding="utf-8"))
        json.dump(ask(args.url, args.protocol, queries, args.concurrency, args.repeat), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
