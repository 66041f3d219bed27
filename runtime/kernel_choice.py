"""Which CPU kernel decodes a fast-path Llama fastest on the machine it runs on: measured once per
(CPU model + kernel flags, model shape, engine options) and cached as JSON under ``$IB_EDGE_HOME``
(default ``~/.cache/ib-edge``), ``llm-kernels.json``.

The candidates (every one passes the same logits gate against the dequantized fp32 model,
tests/test_ortllm.py; none changes the weights):

* ``ort-int8``: the ort engine, ``MatMulNBits`` with ``accuracy_level`` 4 (int8 activations);
* ``ort-fp32``: the ort engine, ``accuracy_level`` 1 (fp32 activations and accumulation);
* ``ort-q4x8``: the ort engine with ib-edge's own int4 x int8 op (``runtime/q4x8.py``: the same
  math as ``ort-int8``, the weights read as one stream per thread), where the CPU has AVX-512
  VNNI, the group size is a multiple of 128 and a C compiler built it (``q4x8.why_not``);
* ``torch``: the torch engine, ``_weight_int4pack_mm_for_cpu`` (bf16 activations).

Which wins depends on the CPU (MLAS' int8 path wants VNNI; torch's kernel uses AMX where there
is one) and the shape, so it is measured: each candidate is built on the model being loaded, a
prefill and 3 rounds of 8 greedy decode steps are timed (best round), and a candidate whose
prefill logits fall below cosine ``LOGITS_COSINE_FLOOR`` against the most exact candidate
(``ort-fp32``; ``torch`` where ORT cannot run the model) is excluded. The first load on a machine
pays it (seconds at 1.1 B); later loads read the cache.

Rule where nothing is measured (``IB_EDGE_LLM_KERNEL=rule``, or a single candidate): ``ort-int8``
for int4 decoder layers ORT can run, ``torch`` otherwise (``pick_engine``).
``IB_EDGE_LLM_KERNEL=ort-int8|ort-fp32|ort-q4x8|torch`` forces one; ``--llm-engine ort|torch`` picks an
engine at its default kernel (ort: ``ort-int8``). The cache is keyed by the CPU string, so a file
carried to another machine (or a VM showing other flags) measures again; an unreadable file is
ignored with one note and rewritten.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .cpuinfo import cpu_string
from .decode import as_numpy
from .errors import BundleError, InputError
from . import q4x8
from .ortllm import KERNEL_NAMES, Q4X8, int4_group_sizes, ort_cannot_run
from .paths import cache_home

ENV = "IB_EDGE_LLM_KERNEL"
CACHE_FILE = "llm-kernels.json"
CACHE_SCHEMA = 1
LOGITS_COSINE_FLOOR = 0.999          # the logits gate of tests/test_ortllm.py
# name -> (engine, the ort engine's matmul: MatMulNBits accuracy_level or "q4x8"); ordered most
# exact first (the accuracy reference)
KERNELS = {**{name: ("ort", arg) for arg, name in KERNEL_NAMES.items()}, "torch": ("torch", None)}
ENGINE_DEFAULT_KERNEL = {"ort": "ort-int8", "torch": "torch"}
# the rule's engine where it can run the model: ~1.5x the torch engine's decode rate on the
# TinyLlama-shaped bench (30.8-51.0 vs 23.2-27.4 tokens/s over 8 runs, README)
DEFAULT_ENGINE = "ort"
PROMPT, ROUNDS, STEPS = 16, 3, 8
_noted: set[str] = set()


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_path() -> Path:
    return cache_home() / CACHE_FILE


def cache_key(a, spec, threads: int, cands: list[str]) -> tuple[str, dict]:
    """(short hash, the fields it hashes): CPU string, model shape, int4 layout, engine options,
    the kernel libraries' versions and the candidates (a kernel that becomes available, e.g. q4x8
    once a compiler is installed, measures again)."""
    import onnxruntime

    layout = sorted({f"{s.kind}{'/g' + str(s.group_size) if s.kind == 'int4' else ''}"
                     for l in spec.layers for s in (l.qkv, l.o, l.gate_up, l.down, spec.head)})
    fields = {"cpu": cpu_string(), "shape": dataclasses.asdict(a), "linears": layout, "threads": threads,
              "onnxruntime": onnxruntime.__version__, "torch": _torch_version(), "q4x8": q4x8.source_key(),
              "candidates": cands}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16], fields


def read_cache(path: Path, log: Callable[[str], None] = _stderr) -> dict:
    """The cached entries ({} when absent); an unreadable or foreign file is noted once and ignored."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA or not isinstance(data.get("entries"), dict):
            raise ValueError(f"not an ib-edge kernel cache of schema {CACHE_SCHEMA}")
        return data["entries"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        if str(path) not in _noted:
            _noted.add(str(path))
            log(f"ib-edge: ignoring the LLM kernel cache {path} ({str(e).splitlines()[0]}); it is measured again "
                "and rewritten")
        return {}


def write_cache(path: Path, key: str, entry: dict, log: Callable[[str], None] = _stderr) -> None:
    entries = read_cache(path, log=lambda m: None)
    entries[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"schema": CACHE_SCHEMA, "entries": entries}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: the choice still holds for this process
        log(f"ib-edge: cannot write the LLM kernel cache {path} ({e.strerror or e}); measured again next load")


def _torch_version() -> str | None:
    """torch's version without importing it (None: not installed, as on a torch-free device image)."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def pick_engine(a, spec) -> str:
    """The engine by rule: ort for int4 decoder layers it can run; torch otherwise (fp32 weights:
    ORT kept a second copy of dense weights, 1181 vs 691 MB RSS on a 533 MB model)."""
    int4_layers = all(s.kind == "int4" for l in spec.layers for s in (l.qkv, l.o, l.gate_up, l.down))
    return DEFAULT_ENGINE if int4_layers and ort_cannot_run(a, spec) is None else "torch"


def candidates(a, spec) -> list[str]:
    """The kernels that can run this model, most exact first: the ORT ones only where
    ``pick_engine`` would pick ort, ``ort-q4x8`` only where ``q4x8.why_not`` is None."""
    return [k for k in KERNELS if cannot_run(k, a, spec) is None]


def cannot_run(kernel: str, a, spec) -> str | None:
    """Why ``kernel`` cannot run this model here (None: it can)."""
    eng, arg = KERNELS[kernel]
    if eng == "torch":
        return None if _torch_version() is not None else "torch is not installed"
    if pick_engine(a, spec) != "ort":
        return ort_cannot_run(a, spec) or "the ort engine is for int4 decoder layers (this model has float ones)"
    if arg == Q4X8:   # not compiled here: building the engine does that (and a failure excludes it)
        return q4x8.why_not(int4_group_sizes(spec), build=False)
    return None


def rule(a, spec) -> str:
    """The kernel where nothing is measured."""
    return ENGINE_DEFAULT_KERNEL[pick_engine(a, spec)]


def time_decode(model) -> tuple[float, np.ndarray]:
    """(best ms per decode step over ROUNDS rounds of STEPS greedy steps, prefill logits [V]) on a
    fixed pseudo-random prompt of PROMPT embedding rows (fewer where the model has few positions).
    Engine-neutral: the embedding table and logits may be numpy (ort) or torch (torch engine)."""
    positions = model.a.max_positions                 # a small model: a shorter prompt and fewer steps
    prompt = min(PROMPT, max(1, positions // 4))
    steps = max(1, min(STEPS, (positions - prompt - 2) // ROUNDS))
    table = model.embed.weight
    ids = np.random.default_rng(0).integers(0, table.shape[0], prompt).tolist()
    with _no_grad(model):
        model.setup_cache(prompt + 2 + ROUNDS * steps)
        logits = as_numpy(model(table[ids].reshape(1, prompt, -1), 0)[0]).copy()
        pos, tok = prompt, int(np.argmax(logits))

        def step():
            nonlocal pos, tok
            tok = int(np.argmax(as_numpy(model(table[tok].reshape(1, 1, -1), pos)[0])))
            pos += 1

        step(), step()  # warm-up
        best = float("inf")
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            best = min(best, (time.perf_counter() - t0) / steps)
    return best * 1e3, logits


def _no_grad(model):
    """torch.no_grad() for the torch engine; nothing for the ort engine (no torch import)."""
    if getattr(model, "engine", None) == "ort":
        import contextlib

        return contextlib.nullcontext()
    import torch

    return torch.no_grad()


def _cos(x, y) -> float:
    x, y = as_numpy(x).astype(np.float64).ravel(), as_numpy(y).astype(np.float64).ravel()
    return float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-30))


def choose(a, spec, threads: int, build: Callable[[str], object], *, timer=time_decode,
           log: Callable[[str], None] = _stderr):
    """-> (model, record): the model built on the chosen kernel and why it was chosen.
    ``build(kernel name)`` makes one engine; ``timer(model) -> (ms per token, prefill logits)``."""
    cands = candidates(a, spec)
    forced = os.environ.get(ENV, "").strip()
    if forced and forced != "rule":
        if forced not in KERNELS:
            raise InputError(f"{ENV}={forced!r} is not one of rule, {', '.join(KERNELS)}")
        if forced not in cands:
            raise InputError(f"{ENV}={forced}: that kernel cannot run this model here ({cannot_run(forced, a, spec)}; "
                             f"it can run: {', '.join(cands)})")
        return build(forced), {"kernel": forced, "how": f"forced by {ENV}"}
    if forced == "rule" or len(cands) == 1:
        k = rule(a, spec)
        return build(k), {"kernel": k, "how": f"rule ({ENV}=rule)" if forced else "rule (the only candidate)"}
    key, fields = cache_key(a, spec, threads, cands)
    path = cache_path()
    hit = read_cache(path, log).get(key)
    if isinstance(hit, dict) and hit.get("kernel") in cands and hit.get("key") == fields:
        return build(hit["kernel"]), {**hit, "how": f"cached ({path})"}
    log(f"ib-edge: measuring the LLM kernels on this CPU once ({', '.join(cands)}; cached in {path})")
    best = best_model = ref_logits = None
    timings, excluded = {}, {}
    for k in cands:
        try:
            model = build(k)
        except BundleError as e:   # e.g. q4x8 failed to compile or load here: not this kernel, not the load
            excluded[k] = f"cannot be built here: {e}"
            continue
        ms, logits = timer(model)
        if ref_logits is None:
            ref_logits = logits
        cos = _cos(logits, ref_logits)
        if cos < LOGITS_COSINE_FLOOR:
            excluded[k] = f"prefill logits cosine {cos:.5f} vs {cands[0]} < {LOGITS_COSINE_FLOOR}"
            del model
            continue
        timings[k] = round(ms, 3)
        if best is None or ms < timings[best]:
            best, best_model = k, model
        del model
    entry = {"kernel": best, "key": fields, "ms_per_token": timings, "excluded": excluded,
             "accuracy_reference": cands[0], "measured": datetime.datetime.now(datetime.timezone.utc)
             .isoformat(timespec="seconds"), "method": f"best of {ROUNDS} rounds x {STEPS} greedy steps after a "
                                                       f"{PROMPT}-position prefill"}
    write_cache(path, key, entry, log)
    log(f"ib-edge: LLM kernel {best} (" + ", ".join(f"{k} {v:.1f} ms/token" for k, v in timings.items()) + ")")
    return best_model, {**entry, "how": "measured now"}
