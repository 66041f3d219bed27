"""GPTQ / AWQ 4-bit quantization of the bundle's LLM through gptqmodel 7.6.0, calibrated on what
the LLM really sees: the projected query embeddings (from the bundle's own ONNX vision and
Q-Former stages) in the prompt's <image> slots, followed by the instruction's token embeddings.

gptqmodel only takes token ids, so the adapter is one hook: calibration examples carry the
prompt's ids (image slots hold the <image> id), and the model's ``run_input_capture`` (the
forward that captures layer-0 inputs) is replaced by one that builds inputs_embeds with the
query embeddings scattered in, exactly as ``runtime.llm`` does at inference. Text-only
calibration (the instructions alone) is the baseline.

Output: a standard HF GPTQ / AWQ checkpoint directory (transformers + gptqmodel load it), and
``convert_quantized_checkpoint`` (quant/int4.py) turns it into the fast runtime's int4 format.

gptqmodel is imported lazily: it sets process environment variables on import. On a 2-core
machine it needs GPTQMODEL_CPU_WORKERS=2 (set here when absent).

Its console output (measured for proof-llama: 661 lines, 112 KB on stderr even when it is not a
terminal: carriage-return progress bars, whole config dumps) goes to ``gptqmodel.log`` in the
quantization's temporary directory, and its ``./logs/gptq_log_*.log`` files there too (it wrote
them into the working directory); the last lines of the log are shown when it fails.
``IB_EDGE_DEBUG=1`` leaves both as gptqmodel has them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from ib_edge.runtime.errors import IbEdgeError
from ib_edge.runtime.formats import DEFAULT_GROUP_SIZE
from ib_edge.runtime.llm import splice_image

METHODS = ("gptq", "awq")
GPTQMODEL_VERSION = "7.6.0"


class LlmQuantError(IbEdgeError):
    pass


@dataclasses.dataclass(frozen=True)
class Example:
    input_ids: np.ndarray                   # [T] int64, <image> slots included
    query_embeds: np.ndarray | None         # [Q, D] float32; None: text-only


def multimodal_examples(bundle_dir, calib, *, instructions_per_image: int = 2, max_images: int | None = None,
                        heldout: bool = False):
    """(examples, record): the calibration split of ``calib`` (a CalibrationSet; with
    ``heldout`` its held-out split, for validation) through the bundle's vision + Q-Former, each
    image paired with ``instructions_per_image`` instructions."""
    from ib_edge.runtime import Pipeline

    pipe = Pipeline.load(bundle_dir)
    images = calib.split()[1 if heldout else 0]
    images = images[:max_images] if max_images else images
    out = []
    for i, img in enumerate(images):
        emb = pipe.image_embeds(pipe.pixel_values([img]))
        for j in range(instructions_per_image):
            enc = pipe.prompts.encode(calib.instructions[(i * instructions_per_image + j) % len(calib.instructions)])
            q = pipe.query_embeds(emb, enc["qformer_input_ids"], enc["qformer_attention_mask"])
            out.append(Example(enc["input_ids"][0].astype(np.int64), q[0].astype(np.float32)))
    return out, {"source": "multimodal", "split": "heldout" if heldout else "calibration",
                 "calibration_sha256": calib.sha256, "images": len(images), "examples": len(out)}


def text_examples(bundle_dir, calib):
    """Baseline: the instructions alone (no image slots)."""
    from ib_edge.runtime import Pipeline

    pipe = Pipeline.load(bundle_dir)
    nq = int(pipe.manifest.model["num_query_tokens"])
    out = [Example(pipe.prompts.encode(t)["input_ids"][0, nq:].astype(np.int64), None) for t in calib.instructions]
    return out, {"source": "text-only", "calibration_sha256": calib.sha256, "examples": len(out)}


def _examples_hash(examples) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(e.input_ids.tobytes())
        if e.query_embeds is not None:
            h.update(e.query_embeds.tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def library_output(work: Path):
    """gptqmodel's stdout/stderr (file descriptors 1 and 2, so its progress bars and anything
    below Python too) into ``work/gptqmodel.log``, and its per-run log files into ``work/logs``
    instead of the working directory; on an exception the log's last lines go to stderr.
    IB_EDGE_DEBUG=1: nothing redirected."""
    if os.environ.get("IB_EDGE_DEBUG"):
        yield
        return
    log = work / "gptqmodel.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    failed = False
    loop_processor = old_dir = None
    try:
        with open(log, "ab") as f, open(log, "a", encoding="utf-8", errors="replace") as text:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:   # Python-level writes too, wherever sys.stdout/sys.stderr point (an embedding app's)
                with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                    from gptqmodel.looper import loop_processor   # its import prints banners

                    old_dir = loop_processor._PROJECT_LOG_DIR   # a relative Path("logs") in 7.6.0
                    loop_processor._PROJECT_LOG_DIR = work / "logs"
                    yield
            except BaseException:
                failed = True
                raise
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
        if loop_processor is not None:
            loop_processor._PROJECT_LOG_DIR = old_dir
        if failed and log.is_file():
            tail = log.read_bytes()[-4000:].decode("utf-8", "replace").replace("\r", "\n").splitlines()
            print("gptqmodel's last output:\n" + "\n".join(l for l in tail if l.strip())[-2000:], file=sys.stderr)


def _install_embeds_hook(gmodel, examples, image_token_id: int) -> dict:
    """Replace gptqmodel's layer-0 input capture forward with one that feeds inputs_embeds."""
    queues: dict[tuple, list] = defaultdict(list)
    for e in examples:
        queues[tuple(e.input_ids.tolist())].append(e.query_embeds)
    seen: dict[tuple, int] = defaultdict(int)
    model = gmodel.model

    def run_input_capture(example, use_cache, data_device):
        ids = example["input_ids"]
        if ids.shape[0] != 1:
            raise LlmQuantError("multimodal calibration runs with batch_size 1")
        key = tuple(ids[0].tolist())
        if key not in queues:
            raise LlmQuantError("gptqmodel passed a calibration example this adapter did not make")
        q = queues[key][seen[key] % len(queues[key])]
        seen[key] += 1
        seen["calls"] += 1
        emb = model.get_input_embeddings()(ids)
        if q is not None:
            emb = splice_image(emb, ids, q, image_token_id)
        return model(inputs_embeds=emb, attention_mask=example.get("attention_mask"), use_cache=use_cache)

    gmodel.run_input_capture = run_input_capture
    return seen


def quantize_llm(llm_dir, out_dir, examples, *, method: str = "gptq", bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE,
                 image_token_id: int, tokenizer_dir=None, sym: bool = False,
                 calib_record: dict | None = None) -> dict:
    """Quantize the transformers LLM in ``llm_dir`` with gptqmodel and save a standard HF
    checkpoint to ``out_dir``. gptqmodel loads a tokenizer beside the weights: a bundle keeps it
    in processor/, passed as ``tokenizer_dir`` (its files are linked in beside the LLM's). Returns the manifest record (method, bits, group size,
    calibration hash, tool version)."""
    import importlib.metadata as md

    if method not in METHODS:
        raise LlmQuantError(f"method {method!r} is not supported (choose {', '.join(METHODS)})")
    try:
        version = md.version("gptqmodel")
    except md.PackageNotFoundError:
        raise LlmQuantError("gptqmodel is not installed",
                            hint=f'pip install -c constraints.txt "gptqmodel=={GPTQMODEL_VERSION}"') from None
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    # gptqmodel's console output, from its import on (banners, bars, config dumps), goes to a log
    with tempfile.TemporaryDirectory(prefix="ib-edge-gptqmodel-") as logs, library_output(Path(logs)):
        import torch
        from gptqmodel import BACKEND, GPTQModel
        from gptqmodel import QuantizeConfig

        kw = dict(bits=bits, group_size=group_size, sym=sym, desc_act=False)
        if method == "awq":
            from gptqmodel.quantization import FORMAT, METHOD

            qcfg = QuantizeConfig(**kw, quant_method=METHOD.AWQ, format=FORMAT.GEMM)
            backend = BACKEND.AWQ_TORCH   # the default asks for CUDA ("AWQ: CUDA is not available")
        else:
            qcfg = QuantizeConfig(**kw)
            backend = BACKEND.AUTO
        torch.manual_seed(0)
        data = [{"input_ids": torch.from_numpy(e.input_ids).unsqueeze(0),
                 "attention_mask": torch.ones(1, len(e.input_ids), dtype=torch.long)} for e in examples]
        out = Path(out_dir)
        with tempfile.TemporaryDirectory() as work:   # gptqmodel reads the weights lazily: keep it alive
            src = Path(llm_dir)
            if tokenizer_dir is not None:
                for d in (Path(tokenizer_dir), src):
                    for f in d.iterdir():
                        if f.is_file():
                            (Path(work) / f.name).unlink(missing_ok=True)
                            (Path(work) / f.name).symlink_to(f.resolve())
                src = Path(work)
            gm = GPTQModel.load(str(src), qcfg, device="cpu", trust_remote_code=False)
            seen = _install_embeds_hook(gm, examples, image_token_id)
            # gptqmodel 7.6's quantize() takes calibration_data_min_length but never passes it on:
            # prepare_dataset keeps its default and drops every example of <= 10 tokens (measured: 6
            # of 20 text-only instructions). Bind the value on the instance, which quantize reads.
            gm.prepare_dataset = functools.partial(gm.prepare_dataset, calibration_data_min_length=0)
            gm.quantize(data, batch_size=1, backend=backend, calibration_data_min_length=0)
            if seen["calls"] < len(examples):  # a gptqmodel that bypasses the hook would calibrate on ids only
                raise LlmQuantError(f"gptqmodel captured {seen['calls']} of {len(examples)} calibration inputs "
                                    "through the inputs_embeds hook", hint=f"use gptqmodel {GPTQMODEL_VERSION}")
            gm.save(str(out))
    _fix_format_field(out)
    keep_generation_config(llm_dir, out)
    return {"method": method, "bits": bits, "group_size": group_size, "sym": sym, "desc_act": False,
            "tool": f"gptqmodel {version}", "examples_sha256": _examples_hash(examples),
            "calibration": calib_record or {}}


def keep_generation_config(src_dir, out_dir) -> None:
    """The quantized checkpoint generates as its source did: gptqmodel's save writes its own
    generation_config.json (``do_sample: true`` seen on a greedy source); the source's replaces it."""
    src = Path(src_dir) / "generation_config.json"
    if src.is_file():
        shutil.copyfile(src, Path(out_dir) / "generation_config.json")


def _fix_format_field(out: Path) -> None:
    """config.json's quantization_config and quantize_config.json must agree on the checkpoint
    format (notes §5: a "gptq_v2"/"gptq" mismatch reloads as garbage); refuse a disagreement."""
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    qfile = out / "quantize_config.json"
    if qfile.is_file():
        q2 = json.loads(qfile.read_text())
        a = qc.get("checkpoint_format", qc.get("format"))
        b = q2.get("checkpoint_format", q2.get("format"))
        if a and b and a != b:
            raise LlmQuantError(f"gptqmodel wrote checkpoint format {a!r} in config.json but {b!r} in "
                                "quantize_config.json")
