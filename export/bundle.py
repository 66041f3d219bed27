"""Build a deploy bundle: validated ONNX graphs + processor files + LLM + manifest.

Everything is written into a temporary sibling directory and renamed into place only when all
of it has been produced and validated: a failed or interrupted export leaves no half bundle
and never damages an existing one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import glob
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ib_edge.runtime.errors import IbEdgeError
from ib_edge.runtime.manifest import MANIFEST, SCHEMA_VERSION, sha256_file

from . import onnx_export, specs, wrappers
from .checkpoint import load_checkpoint

PROBE_PROMPTS = ("Describe this image.", "What color is the circle?", "how MANY shapes, exactly?!",
                 "Was ist auf dem Bild? 你好 ... émoji 🙂", "a\tb\nc  d")


class ExportError(IbEdgeError):
    pass


def tool_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("ib-edge", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def preprocess_record(image_processor, config) -> dict:
    ip = image_processor
    for flag in ("do_center_crop", "do_pad"):
        if getattr(ip, flag, False):
            raise ExportError(f"image processor uses {flag}, which the runtime does not implement")
    size = ip.size
    hw = [size["height"], size["width"]] if "height" in size else None
    if hw is None:
        raise ExportError(f"image processor size {dict(size)} is not a fixed height/width")
    vis = config.vision_config.image_size
    vis = [vis, vis] if isinstance(vis, int) else list(vis)
    if hw != vis:
        raise ExportError(f"processor resizes to {hw} but the vision model expects {vis}")
    return {
        "size": hw, "resample": int(ip.resample), "do_resize": bool(ip.do_resize),
        "do_rescale": bool(ip.do_rescale), "rescale_factor": float(ip.rescale_factor),
        "do_normalize": bool(ip.do_normalize), "image_mean": list(map(float, ip.image_mean)),
        "image_std": list(map(float, ip.image_std)), "do_convert_rgb": bool(getattr(ip, "do_convert_rgb", True)),
    }


def model_record(config, processor) -> dict:
    text = config.text_config
    return {
        "num_query_tokens": int(config.num_query_tokens),
        "image_token_id": int(config.image_token_index),
        "is_encoder_decoder": not config.use_decoder_only_language_model,
        "llm_family": text.model_type,
        "llm_hidden_size": specs.llm_hidden_size(text),
        "llm_max_positions": getattr(text, "max_position_embeddings", None),
        "qformer_max_text_len": int(config.qformer_config.max_position_embeddings),
        "qformer_pad_token_id": int(processor.qformer_tokenizer.pad_token_id or 0),
        "eos_token_id": text.eos_token_id,
    }


def _files(root: Path, sub: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(sub.rglob("*")) if p.is_file()}


def check_tokenizers(processor, manifest_model: dict, tok_paths: dict[str, Path]) -> None:
    """The runtime's tokenization (tokenizers library on the bundle's files) must equal the
    processor's on probe prompts; otherwise answers would silently differ."""
    from ib_edge.runtime.preprocess import PromptEncoder

    enc = PromptEncoder(tok_paths["llm"], tok_paths["qformer"], manifest_model)
    for prompt in PROBE_PROMPTS:
        ref = processor(text=[prompt], images=None)
        ours = enc.encode(prompt)
        ref_ids = [manifest_model["image_token_id"]] * manifest_model["num_query_tokens"] + list(ref["input_ids"][0])
        if list(ours["input_ids"][0]) != ref_ids:
            raise ExportError(f"runtime LLM tokenization differs from the processor's for {prompt!r}")
        if list(ours["qformer_input_ids"][0]) != list(ref["qformer_input_ids"][0]):
            raise ExportError(f"runtime Q-Former tokenization differs from the processor's for {prompt!r}")


PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = ("onnxruntime", "tensorrt")
LLM_QUANT = (None, "rtn", "gptq", "awq", "int8", "mixed")
WEIGHT_ONLY = ("int8", "mixed")     # any LLM family, transformers runtime with low-bit kernels
LLM_CALIB = ("multimodal", "text")  # GPTQ/AWQ calibration data: what the LLM sees, or the text-only baseline


def _graph_record(path: Path, root: Path, spec, precision: str, opset: int) -> dict:
    return {
        "file": path.name,
        "files": {str(p.relative_to(root)): sha256_file(p) for p in onnx_export.graph_files(path)},
        "precision": precision, "backend": "onnxruntime", "opset": opset,
        "inputs": [t.to_json() for t in spec.inputs],
        "outputs": [t.to_json() for t in spec.outputs],
    }


def export_bundle(model_ref: str | None, out: Path, *, precision: str = "fp32", revision: str | None = None,
                  opset: int = 18, seed: int = 0, calib: str | Path | None = None, calib_method: str = "minmax",
                  recipe_dir: str | Path | None = None, backend: str = "onnxruntime",
                  trt: dict | None = None, llm_quant: str | None = None, group_size: int = 128,
                  llm_plan: str | Path | None = None, llm_calib: str = "multimodal", int8_stages: str = "all",
                  llm_validation: str = "enforce", quiet: bool = False) -> Path:
    """Export ``model_ref`` into a bundle at ``out`` (replaced atomically if it exists).

    fp32: the validated graphs as exported. fp16/int8: the fp32 graphs are converted or
    quantized, every stage and the chain checked against the fp32 graphs (drift budgets).
    ``llm_validation="record"`` keeps a 4-bit LLM that misses its held-out budget (the figures
    still go into the manifest): for random-weight benchmark models only, whose RTN logits
    cosine is ~0.75 at 1.1 B parameters however correct the packing."""
    if llm_validation not in ("enforce", "record"):
        raise ExportError(f"llm_validation {llm_validation!r} is not enforce or record")
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not supported (choose {', '.join(PRECISIONS)})")
    if backend not in BACKENDS:
        raise ExportError(f"backend {backend!r} is not supported (choose {', '.join(BACKENDS)})")
    if backend == "tensorrt":
        import importlib.util

        if importlib.util.find_spec("tensorrt") is None:
            raise ExportError("TensorRT is not installed here",
                              hint="build engines on the GPU host (JetPack ships TensorRT), or export with "
                                   "--backend onnxruntime and run it with ib-run --providers tensorrt,cuda,cpu")
    log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(out)
    remove_stale_temp(out, log)
    if int8_stages != "all" and (precision != "int8" or backend != "onnxruntime"):
        raise ExportError("--int8-stages faster times stages on ONNX Runtime CPU; use it with --precision int8 "
                          "and --backend onnxruntime")
    if recipe_dir is not None and precision != "int8":
        raise ExportError("--recipe re-applies INT8 recipes; use it with --precision int8")
    if llm_quant not in LLM_QUANT:
        raise ExportError(f"--llm-quant {llm_quant!r} is not supported (choose {', '.join(map(str, LLM_QUANT))})")
    if llm_calib not in LLM_CALIB:
        raise ExportError(f"--llm-calib {llm_calib!r} is not one of {', '.join(LLM_CALIB)}")
    if llm_calib != "multimodal" and llm_quant not in ("gptq", "awq"):
        raise ExportError("--llm-calib chooses GPTQ/AWQ calibration data; use it with --llm-quant gptq or awq")
    plan = None
    if llm_plan is not None:
        if llm_quant != "mixed":
            raise ExportError("--llm-plan re-applies a weight-only LLM plan; use it with --llm-quant mixed")
        from ib_edge.quant.weight_only import load_plan

        plan = load_plan(llm_plan)
    if llm_quant in ("gptq", "awq"):
        import importlib.util

        if importlib.util.find_spec("gptqmodel") is None:
            raise ExportError(f"--llm-quant {llm_quant} needs gptqmodel",
                              hint='pip install -c constraints.txt "gptqmodel==7.6.0"')
    calib_set = recipes = None
    if precision != "fp32" or llm_quant:  # check calibration inputs first (rtn: its held-out validation)
        from ib_edge.quant.calibration import CalibrationSet
        from ib_edge.quant.int8 import Int8Recipe

        calib_set = CalibrationSet.load(calib)
        if recipe_dir is not None:
            rdir = Path(recipe_dir)
            rdir = rdir / "recipes" if (rdir / "recipes").is_dir() else rdir
            files = {st: rdir / f"{st}.int8.json" for st in specs.GRAPH_SPECS}
            missing = [str(f) for f in files.values() if not f.is_file()]
            if missing:
                raise ExportError(f"recipe files missing: {', '.join(missing)}")
            recipes = {st: Int8Recipe.load(f) for st, f in files.items()}
    n_steps = 5 + (precision != "fp32") + bool(llm_quant)
    tmp = _temp_path(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t_start = time.perf_counter()
    try:
        log(f"[1/{n_steps}] loading {model_ref or 'proof-llama'}")
        model, processor, source = load_checkpoint(model_ref, revision)
        if llm_quant and llm_quant not in WEIGHT_ONLY and source["llm_family"] != "llama":
            raise ExportError(f"the 4-bit LLM path runs Llama-family LLMs (Vicuna); this one is "
                              f"{source['llm_family']}",
                              hint="use --llm-quant int8 or mixed (weight-only, any family), or export without "
                                   "--llm-quant")
        artifacts: dict[str, dict] = {}
        graph_specs, fp32_paths = {}, {}
        fp32_dir = tmp if precision == "fp32" else tmp / ".fp32"
        fp32_dir.mkdir(exist_ok=True)
        rng = np.random.default_rng(seed)
        for i, (stage, make_spec) in enumerate(specs.GRAPH_SPECS.items(), start=2):
            spec = make_spec(model.config)
            spec = dataclasses.replace(spec, opset=opset)
            module = wrappers.WRAPPERS[stage](model).eval()
            t0 = time.perf_counter()
            log(f"[{i}/{n_steps}] exporting {stage} graph (opset {opset})")
            path = onnx_export.export_graph(module, spec, fp32_dir / f"{stage}.onnx", rng)
            t1 = time.perf_counter()
            parity = onnx_export.validate_graph(module, spec, path, rng)
            t2 = time.perf_counter()
            log(f"      {stage}: cosine {parity.cosine:.7f}, max-abs {parity.max_abs:.2e} "
                f"(export {t1 - t0:.1f} s, validate {t2 - t1:.1f} s)")
            graph_specs[stage], fp32_paths[stage] = spec, path
            artifacts[stage] = {"validation": {"reference": "pytorch-fp32", **parity.to_json()}}
        log(f"[4/{n_steps}] saving LLM and processor")
        model.language_model.save_pretrained(tmp / "llm", safe_serialization=True)
        processor.save_pretrained(tmp / "processor")
        artifacts["llm"] = {"dir": "llm", "files": _files(tmp, tmp / "llm"), "format": "safetensors",
                            "precision": source["llm_dtype"], "dtype": source["llm_dtype"],
                            "backend": "transformers", "family": source["llm_family"]}
        artifacts["processor"] = {"dir": "processor", "files": _files(tmp, tmp / "processor")}
        mrec = model_record(model.config, processor)
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

            log(f"[5/{n_steps}] {precision}: calibrating, quantizing and checking drift against fp32")
            prompts = PromptEncoder(tmp / tokenizers["llm"], tmp / tokenizers["qformer"], mrec)
            q = quantize_stages(precision, fp32_paths, tmp, preprocess=prep, prompts=prompts, calib=calib_set,
                                method=calib_method, recipes=recipes, int8_stages=int8_stages, log=log)
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
            artifacts[stage] = {**_graph_record(tmp / f"{stage}.onnx", tmp, spec, stage_precision.get(stage, precision),
                                                opset), **artifacts[stage]}
        if backend == "tensorrt":
            build_engines(artifacts, tmp, precision, source, trt or {}, log, int8_inputs=None if precision != "int8" else {
                "fp32": fp32_paths, "preprocess": prep, "prompts": prompts, "calib": calib_set})
        if fp32_dir != tmp:
            shutil.rmtree(fp32_dir)
        log(f"[{n_steps - bool(llm_quant)}/{n_steps}] checking tokenizers and writing manifest")
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
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if llm_quant in WEIGHT_ONLY:
            log(f"[{n_steps}/{n_steps}] weight-only LLM ({llm_quant}, int4 group size "
                f"{plan['group_size'] if plan else group_size})")
            manifest["artifacts"]["llm"] = weight_only_bundle_llm(tmp, manifest, llm_quant, group_size, calib_set,
                                                                  log, plan=plan)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        elif llm_quant:
            log(f"[{n_steps}/{n_steps}] 4-bit LLM ({llm_quant}, group size {group_size})")
            manifest["artifacts"]["llm"] = quantize_bundle_llm(tmp, manifest, llm_quant, group_size, calib_set, log,
                                                               calib_source=llm_calib,
                                                               enforce_validation=llm_validation == "enforce")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _normalize_modes(tmp)
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


def quantize_bundle_llm(root: Path, manifest: dict, method: str, group_size: int, calib_set, log,
                        calib_source: str = "multimodal", enforce_validation: bool = True) -> dict:
    """Turn the (complete, fp32-LLM) bundle at ``root`` into a 4-bit-LLM one; returns the new
    llm artifact. RTN packs the weights directly. GPTQ/AWQ run gptqmodel calibrated on the
    bundle's own query embeddings + instructions (``calib_source="text"``: the instructions
    alone, the baseline), keep its standard HF checkpoint in
    ``llm-{method}/`` (loadable by transformers + gptqmodel), and convert it, integers
    unchanged, to the fast runtime's int4 format in ``llm/``."""
    from ib_edge.quant import int4

    src, tmp_llm = root / "llm", root / ".llm-int4"
    extra = {}
    if method == "rtn":
        rec = int4.quantize_model_dir(src, tmp_llm, group_size=group_size)
    else:
        from ib_edge.quant import llm_quant

        if calib_source == "text":
            examples, calib_rec = llm_quant.text_examples(root, calib_set)
            log(f"      calibrating {method} on {len(examples)} text-only examples (instructions alone: the baseline)")
        else:
            examples, calib_rec = llm_quant.multimodal_examples(root, calib_set)
            log(f"      calibrating {method} on {len(examples)} multimodal examples (query embeds + instruction)")
        hf_dir = root / f"llm-{method}"
        with contextlib.redirect_stdout(sys.stderr):  # gptqmodel's progress output; stdout stays ours
            extra["llm_quant"] = llm_quant.quantize_llm(
                src, hf_dir, examples, method=method, bits=4, group_size=group_size,
                image_token_id=manifest["model"]["image_token_id"], tokenizer_dir=root / "processor",
                calib_record=calib_rec)
        rec = int4.convert_quantized_checkpoint(hf_dir, tmp_llm)
        extra["hf_checkpoint"] = {"dir": hf_dir.name}
    if (src / "generation_config.json").is_file():  # beam settings (length_penalty, ...) the runtime honours
        shutil.copy(src / "generation_config.json", tmp_llm / "generation_config.json")
    rec["validation"] = _validate_int4_llm(root, manifest, src, tmp_llm, calib_set, log, enforce_validation)
    shutil.rmtree(src)
    os.replace(tmp_llm, src)
    files = _files(root, src)
    if "hf_checkpoint" in extra:
        files.update(_files(root, root / extra["hf_checkpoint"]["dir"]))
    log(f"      LLM: {rec['quantized_linears']} linears in int4 ({rec['method']}, group {rec['group_size']}), "
        f"lm_head {rec['lm_head']}")
    return {"dir": "llm", "files": files, "format": rec["format"], "format_version": rec["format_version"],
            "backend": "fastllm", "precision": "int4", "dtype": "float32",
            "family": manifest["artifacts"]["llm"]["family"], "quantization": rec, **extra}


def _validate_int4_llm(root: Path, manifest: dict, src: Path, q_dir: Path, calib_set, log,
                       enforce: bool = True) -> dict:
    """The written int4 LLM, loaded through the runtime (default engine) exactly as ``ib-run``
    will, against the fp32 LLM on the held-out calibration images: teacher-forced logits on
    the fp32 greedy answers. Below ``INT4_VALIDATION_BUDGET``: ExportError, or with
    ``enforce=False`` a logged warning and ``within_budget: false`` in the record."""
    from ib_edge.quant import llm_quant, weight_only
    from ib_edge.runtime import fastllm

    heldout, held_rec = llm_quant.multimodal_examples(root, calib_set, heldout=True)
    fp32 = weight_only.load_fp32(src)
    probe = weight_only.LogitsProbe(fp32, heldout, manifest["model"]["image_token_id"])
    del fp32
    model = fastllm.load(q_dir)          # the engine ib-run picks by default
    d = probe.drift_stepwise(model)
    budget = weight_only.INT4_VALIDATION_BUDGET
    bad = budget.violations(d, "int4 LLM validation (held-out)")
    if bad and enforce:
        raise ExportError("; ".join(bad), hint="try --llm-quant gptq, a smaller --group-size, or --llm-quant mixed")
    log(f"      held-out validation ({model.engine} engine): logits cosine mean {d.cosine_mean:.5f}, "
        f"top-1 agreement {d.top1:.4f} over {d.tokens} tokens (budget cosine >= {budget.min_cosine_mean}, "
        f"decided top-1 >= {budget.min_top1})" + (f"; MISSED, kept (validation recorded only): {'; '.join(bad)}"
                                                  if bad else ""))
    return {"reference": "fp32 LLM", "engine": model.engine, "inputs": held_rec, **d.to_json(),
            "budget": dataclasses.asdict(budget), "within_budget": not bad}


def weight_only_bundle_llm(root: Path, manifest: dict, mode: str, group_size: int, calib_set, log,
                           plan: dict | None = None) -> dict:
    """Weight-only LLM for any family: "int8" (every linear int8) or "mixed" (each linear int4,
    int8 or fp32 as the measured-drift search chose; ``plan`` re-applies a saved one). The probe
    runs on the bundle's own query embeddings + instructions (calibration split); the written
    checkpoint is then loaded through the runtime and checked on the held-out split."""
    from ib_edge.quant import llm_quant, weight_only

    src, tmp_llm = root / "llm", root / ".llm-wo"
    image_id = manifest["model"]["image_token_id"]
    examples, calib_rec = llm_quant.multimodal_examples(root, calib_set)
    heldout, held_rec = llm_quant.multimodal_examples(root, calib_set, heldout=True)
    model = weight_only.load_fp32(src)
    if plan is None:
        probe = weight_only.LogitsProbe(model, examples, image_id)
        log(f"      {mode}: measuring logits drift on {probe.tokens} calibration tokens "
            f"({len(examples)} multimodal examples, fp32 greedy answers teacher-forced)")
        plan = weight_only.make_plan(model, probe, mode, group_size, log)
        plan["calibration"] = calib_rec
    else:
        log(f"      re-applying the saved plan ({plan['mode']}, group size {plan['group_size']})")
    rec = weight_only.save_weight_only(model, src, tmp_llm, plan)
    c = rec["counts"]
    log(f"      LLM: {c['int4']} linears int4 (RTN, group {rec['group_size']}), {c['int8']} int8, {c['fp32']} fp32; "
        f"lm_head {rec['lm_head']}")
    for p in rec["promoted"]:
        log(f"      promoted {p['name']} to {p['to']} (logits cosine then {p['logits_cosine_mean']:.5f}, "
            f"decided top-1 {p['top1_agreement_decided']:.4f})")
    d = rec["drift_calibration"]
    log(f"      calibration drift: logits cosine mean {d['logits_cosine_mean']:.5f}, top-1 agreement "
        f"{d['top1_agreement']:.4f} over {d['tokens']} tokens ({d['top1_agreement_decided']:.4f} over the "
        f"{d['decided_tokens']} decided ones)")
    held_probe = weight_only.LogitsProbe(model, heldout, image_id)
    try:
        v = weight_only.validate(tmp_llm, held_probe)
    except weight_only.WeightOnlyError as e:
        hint = ("export with --llm-quant int8, or calibrate on your own domain (--calib DIR)" if mode == "mixed"
                else "export without --llm-quant (fp32 LLM), or calibrate on your own domain (--calib DIR)")
        raise ExportError(str(e), hint=hint) from None
    log(f"      held-out validation: logits cosine mean {v.cosine_mean:.5f}, top-1 agreement {v.top1:.4f} "
        f"over {v.tokens} tokens, {v.top1_decided:.4f} over {v.decided} decided (budget cosine >= "
        f"{weight_only.VALIDATION_BUDGET.min_cosine_mean}, decided top-1 >= {weight_only.VALIDATION_BUDGET.min_top1})")
    rec["validation"] = {"reference": "fp32 LLM", "inputs": held_rec, **v.to_json(),
                         "budget": dataclasses.asdict(weight_only.VALIDATION_BUDGET)}
    rec["calibration"] = plan.get("calibration", calib_rec)
    del model
    shutil.rmtree(src)
    os.replace(tmp_llm, src)
    return {"dir": "llm", "files": _files(root, src), "format": rec["format"], "format_version": rec["format_version"],
            "backend": "transformers", "precision": mode, "dtype": "float32",
            "family": manifest["artifacts"]["llm"]["family"], "quantization": rec}


def build_engines(artifacts: dict, root: Path, precision: str, source: dict, opts: dict, log,
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
    cache = Path(opts.get("timing_cache") or (root.parent / ".ib-edge-timing.cache"))
    for stage in specs.GRAPH_SPECS:
        art = artifacts[stage]
        profiles = trt_build.profiles_from_manifest_inputs(
            art["inputs"], batch=tuple(opts.get("batch", trt_build.DEFAULT_BATCH)),
            text_len=tuple(opts.get("text_len", trt_build.DEFAULT_TEXT_LEN)))
        graph = made["stages"][stage] if made else {"file": art["file"], "precision": art["precision"]}
        engine = root / f"{stage}.engine"
        rec = trt_build.build_engine(root / graph["file"], engine, precision=precision, profiles=profiles,
                                     workspace_mb=int(opts.get("workspace_mb", trt_build.DEFAULT_WORKSPACE_MB)),
                                     timing_cache=cache, log=lambda m: log(f"      {m}"))
        rec["graph"] = graph
        if made and stage == "qformer":
            rec["graph"]["chain_drift"] = made["chain"]
        art.update({"onnx": graph["file"], "file": engine.name, "backend": "tensorrt", "engine": rec})
        for f in onnx_export.graph_files(root / graph["file"]):
            art["files"][str(f.relative_to(root))] = sha256_file(f)
        art["files"][engine.name] = sha256_file(engine)


def check_replaceable(out: Path) -> None:
    """``out`` may be replaced only when absent or an ib-edge bundle holding nothing its manifest
    does not list (a directory with a stray ``manifest.json`` and the user's files is not one)."""
    from ib_edge.runtime.errors import BundleError
    from ib_edge.runtime.manifest import Manifest

    if not out.exists() and not out.is_symlink():
        return
    hint = "choose another --out or remove it"
    if out.is_symlink() or not out.is_dir():
        raise ExportError(f"{out} exists and is not a bundle directory; refusing to replace it", hint=hint)
    try:
        manifest = Manifest.load(out)
    except BundleError as e:
        raise ExportError(f"{out} exists and is not a valid ib-edge bundle ({e}); refusing to replace it",
                          hint=hint) from None
    listed = manifest.listed()
    for p in sorted(out.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            continue
        rel = p.relative_to(out).as_posix()
        if rel not in listed:
            raise ExportError(f"{out} holds {rel}, which its manifest does not list; refusing to replace it",
                              hint=hint)


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
    old = None
    if out.exists():
        old = _temp_path(out, "old")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
