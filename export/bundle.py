"""Build a deploy bundle: validated ONNX graphs + processor files + LLM + manifest.

Everything is written into a temporary sibling directory and renamed into place only when all
of it has been produced and validated: a failed or interrupted export leaves no half bundle
and never damages an existing one.

``export_bundle`` runs the plan ``plan.plan_export`` makes from the options (``options``); the
records it writes come from ``records``, the LLM steps from ``llm_steps``.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ib_edge.runtime.manifest import MANIFEST, SCHEMA_VERSION, sha256_file

from . import onnx_export, specs, wrappers
from .checkpoint import load_checkpoint
from .llm_steps import quantize_bundle_llm, weight_only_bundle_llm
from .options import WEIGHT_ONLY, ExportError, ExportOptions, TrtOptions, check_cancelled
from .plan import check_replaceable, plan_export  # noqa: F401  (check_replaceable: re-exported)
from .records import check_tokenizers, graph_record, hashed_files, model_record, preprocess_record, tool_versions

__all__ = ["ExportError", "export_bundle"]


def export_bundle(model_ref: str | None, out: Path, **options) -> Path:
    """Export ``model_ref`` into a bundle at ``out`` (replaced atomically if it exists);
    ``options``: fields of ``ExportOptions`` (its defaults for the rest).

    fp32: the validated graphs as exported. fp16/int8: the fp32 graphs are converted or
    quantized, every stage and the chain checked against the fp32 graphs (drift budgets).
    ``llm_validation="record"`` keeps a 4-bit LLM that misses its held-out budget (the figures
    still go into the manifest): for random-weight benchmark models only, whose RTN logits
    cosine is ~0.75 at 1.1 B parameters however correct the packing."""
    o = ExportOptions(**options)
    plan = plan_export(model_ref, out, o)
    out, calib_set, recipes, llm_plan = plan.out, plan.calib_set, plan.recipes, plan.llm_plan
    precision, llm_quant, group_size = o.precision, o.llm_quant, o.group_size
    log = (lambda m: None) if o.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    next_step = plan.progress(log)

    def step(kind: str) -> None:
        check_cancelled()
        next_step(kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(out, log)
    tmp = _temp_path(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t_start = time.perf_counter()
    try:
        step("load")
        model, processor, source, llm = load_checkpoint(model_ref, o.revision, video=o.video)
        video = source.pop("video")
        if llm_quant and llm_quant not in WEIGHT_ONLY and source["llm_family"] != "llama":
            raise ExportError(f"the 4-bit LLM path runs Llama-family LLMs (Vicuna); this one is "
                              f"{source['llm_family']}",
                              hint="use --llm-quant int8 or mixed (weight-only, any family), or export without "
                                   "--llm-quant")
        artifacts: dict[str, dict] = {}
        graph_specs, fp32_paths = {}, {}
        fp32_dir = tmp if precision == "fp32" else tmp / ".fp32"
        fp32_dir.mkdir(exist_ok=True)
        rng = np.random.default_rng(o.seed)
        for stage, make_spec in specs.GRAPH_SPECS.items():
            spec = make_spec(model.config)
            spec = dataclasses.replace(spec, opset=o.opset)
            module = wrappers.WRAPPERS[stage](model).eval()
            t0 = time.perf_counter()
            step("graph")
            path = onnx_export.export_graph(module, spec, fp32_dir / f"{stage}.onnx", rng)
            t1 = time.perf_counter()
            parity = onnx_export.validate_graph(module, spec, path, rng)
            t2 = time.perf_counter()
            log(f"      {stage}: cosine {parity.cosine:.7f}, max-abs {parity.max_abs:.2e} "
                f"(export {t1 - t0:.1f} s, validate {t2 - t1:.1f} s)")
            graph_specs[stage], fp32_paths[stage] = spec, path
            artifacts[stage] = {"validation": {"reference": "pytorch-fp32", **parity.to_json()}}
        step("save")
        llm.save(tmp / "llm")     # in its own dtype; from a local checkpoint file to file, never loaded
        processor.save_pretrained(tmp / "processor")
        artifacts["llm"] = {"dir": "llm", "files": hashed_files(tmp, tmp / "llm"), "format": "safetensors",
                            "precision": source["llm_dtype"], "dtype": source["llm_dtype"],
                            "backend": "transformers", "family": source["llm_family"]}
        artifacts["processor"] = {"dir": "processor", "files": hashed_files(tmp, tmp / "processor")}
        mrec = model_record(model.config, processor, video)
        prep = preprocess_record(processor.image_processor, model.config)
        tokenizers = {"llm": "processor/tokenizer.json", "qformer": "processor/qformer_tokenizer/tokenizer.json"}
        for rel in tokenizers.values():
            if not (tmp / rel).is_file():
                raise ExportError(f"processor did not write {rel}; a fast (tokenizers) tokenizer is required")
        # Free the PyTorch model (ViT-g + LLM: ~9 GB at fp32 for the real shapes) before INT8
        # calibration, which needs the fp32 ONNX graph twice over (ORT's augmented copy + session).
        # The wrappers and torch.export's graphs keep references and may sit in reference cycles.
        del model, module
        gc.collect()
        _trim_heap()
        extra: dict = {}
        stage_precision: dict[str, str] = {}
        if precision != "fp32":
            from ib_edge.runtime.preprocess import PromptEncoder

            from .quantize import quantize_stages

            step("quantize")
            prompts = PromptEncoder(tmp / tokenizers["llm"], tmp / tokenizers["qformer"], mrec)
            q = quantize_stages(precision, fp32_paths, tmp, preprocess=prep, prompts=prompts, calib=calib_set,
                                method=o.calib_method, recipes=recipes, int8_stages=o.stage_choice(), log=log)
            for stage, rec in q["stages"].items():
                stage_precision[stage] = rec.pop("precision", precision)
                artifacts[stage].update(rec)
            if q["recipes"]:
                (tmp / "recipes").mkdir()
                for stage, recipe in q["recipes"].items():
                    recipe.save(tmp / "recipes" / f"{stage}.int8.json")
                    artifacts[stage]["quantization"]["recipe"] = f"recipes/{stage}.int8.json"
            extra = {"calibration": calib_set.record(), "drift": {"query_embeds_chain": q["chain"],
                     "reference": "fp32 graphs", "inputs": "held-out split of the calibration set"}}
        for stage, spec in graph_specs.items():
            artifacts[stage] = {**graph_record(tmp / f"{stage}.onnx", tmp, spec, stage_precision.get(stage, precision),
                                               o.opset), **artifacts[stage]}
        if o.backend == "tensorrt":
            build_engines(artifacts, tmp, precision, source, o.trt, log, int8_inputs=None if precision != "int8" else {
                "fp32": fp32_paths, "preprocess": prep, "prompts": prompts, "calib": calib_set})
        if fp32_dir != tmp:  # after the engines: the int8 TensorRT graphs are validated against these
            shutil.rmtree(fp32_dir)
        step("manifest")
        check_tokenizers(processor, mrec, {k: tmp / v for k, v in tokenizers.items()})
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "precision": precision,
            "source": source,
            "model": mrec,
            "preprocess": prep,
            "tokenizers": tokenizers,
            "artifacts": artifacts,
            **extra,
            "tools": tool_versions(),
        }
        # Written now, before the LLM step, because that step reads this half-built bundle back
        # through the runtime (quant.llm_quant.multimodal_examples: Pipeline.load(tmp) runs the
        # bundle's own vision and Q-Former for the query embeddings); written again with the new
        # llm artifact below.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if llm_quant in WEIGHT_ONLY:
            step("llm")
            manifest["artifacts"]["llm"] = weight_only_bundle_llm(tmp, manifest, llm_quant, group_size, calib_set,
                                                                  log, plan=llm_plan, search=o.llm_search)
        elif llm_quant:
            step("llm")
            manifest["artifacts"]["llm"] = quantize_bundle_llm(tmp, manifest, llm_quant, group_size, calib_set, log,
                                                               calib_source=o.llm_calib,
                                                               enforce_validation=o.llm_validation == "enforce")
        if llm_quant:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _normalize_modes(tmp)
        check_cancelled()
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"bundle written to {out} in {time.perf_counter() - t_start:.1f} s")
    return out


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps ~0.5 GB of a real-shape export's freed
    allocations otherwise, measured); a no-op where libc has no malloc_trim."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_engines(artifacts: dict, root: Path, precision: str, source: dict, opts: TrtOptions, log,
                  int8_inputs: dict | None = None) -> None:
    """Build a strongly typed TensorRT engine per graph; the artifact then points at the engine
    and keeps the ONNX files (listed and hashed too) for rebuilding on another device.

    fp32/fp16 engines build from the bundle's graph. int8 engines build from an INT8-over-FP16
    graph made from the searched fp32 Q/DQ graph and validated against the fp32 graphs first
    (``trt_graphs.int8_fp16_graphs``; ``int8_inputs``: the fp32 graph paths, preprocess record,
    prompt encoder and calibration set); a drift-budget miss stops the export. The engine record
    names the graph it was built from (``engine["graph"]``)."""
    from . import tensorrt as trt_build

    made = {}
    if precision == "int8":
        from .trt_graphs import int8_fp16_graphs

        if int8_inputs is None:
            raise ExportError("int8 engines need the fp32 graphs and the calibration set to validate their "
                              "INT8-over-FP16 graphs")
        from ib_edge.quant.int8 import Int8Recipe

        recipes = {st: Int8Recipe.load(root / artifacts[st]["quantization"]["recipe"]) for st in specs.GRAPH_SPECS}
        made = int8_fp16_graphs(int8_inputs["fp32"], {st: root / artifacts[st]["file"] for st in specs.GRAPH_SPECS},
                                preprocess=int8_inputs["preprocess"], prompts=int8_inputs["prompts"],
                                calib=int8_inputs["calib"], recipes=recipes, log=log)
    cache = Path(opts.timing_cache or (root.parent / ".ib-edge-timing.cache"))
    for stage in specs.GRAPH_SPECS:
        art = artifacts[stage]
        profiles = trt_build.profiles_from_manifest_inputs(
            art["inputs"], batch=tuple(opts.batch), text_len=tuple(opts.text_len))
        graph = made["stages"][stage] if made else {"file": art["file"], "precision": art["precision"]}
        engine = root / f"{stage}.engine"
        rec = trt_build.build_engine(root / graph["file"], engine, precision=precision, profiles=profiles,
                                     workspace_mb=int(opts.workspace_mb), timing_cache=cache,
                                     log=lambda m: log(f"      {m}"))
        rec["graph"] = graph
        if made and stage == "qformer":
            rec["graph"]["chain_drift"] = made["chain"]
        art.update({"onnx": graph["file"], "file": engine.name, "backend": "tensorrt", "engine": rec})
        for f in onnx_export.graph_files(root / graph["file"]):
            art["files"][str(f.relative_to(root))] = sha256_file(f)
        art["files"][engine.name] = sha256_file(engine)


def _temp_path(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_temp(out: Path, log=lambda m: None) -> list[Path]:
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` beside ``out`` left by exports that were
    killed (SIGKILL, power loss: no handler ran), when process PID is gone."""
    removed = []
    for kind in ("tmp", "old"):
        prefix = f".{out.name}.{kind}-"
        for p in out.parent.glob(f"{glob.escape(prefix)}*"):
            pid = p.name[len(prefix):]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
                log(f"removed {p.name}, left by an export (pid {pid}) that was killed")
    return removed


def _normalize_modes(root: Path) -> None:
    """Files as the process umask makes them (some writers create 0600 temp files and rename
    them: a copied bundle must be readable by a service user like any other file)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _replace(tmp: Path, out: Path) -> None:
    """Swap ``tmp`` into ``out``; an existing bundle is moved aside first and removed after."""
    from ib_edge.fsutil import replace_dir

    replace_dir(tmp, out, _temp_path(out, "old"))
