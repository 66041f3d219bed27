"""The LLM steps of an export, run on the complete fp32-LLM bundle in the temporary directory:
the 4-bit Llama path (RTN, or GPTQ/AWQ through gptqmodel; validated through the runtime's
engines) and the weight-only path for any family (int8 or a searched int4/int8/fp32 mix).
Each returns the bundle's new ``llm`` artifact record."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import shutil
import sys
import time
from pathlib import Path

from .options import ExportError
from .records import hashed_files


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
    files = hashed_files(root, src)
    if "hf_checkpoint" in extra:
        files.update(hashed_files(root, root / extra["hf_checkpoint"]["dir"]))
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
    from ib_edge.quant import llm_quant, streamed
    from ib_edge.quant.budgets import INT4_VALIDATION_BUDGET
    from ib_edge.quant.logits_probe import LogitsProbe
    from ib_edge.runtime import engines

    heldout, held_rec = llm_quant.multimodal_examples(root, calib_set, heldout=True)
    # the fp32 reference streamed layer by layer from the stored LLM: whole, it is 27 GB at 7B
    t0 = time.perf_counter()
    log(f"      held-out validation: fp32 reference answers on {len(heldout)} example(s), the LLM streamed "
        "layer by layer from its stored weights (every forward re-reads all layers: minutes at 7B)")
    fp32 = streamed.load_streamed(src)
    probe = LogitsProbe(fp32, heldout, manifest["model"]["image_token_id"])
    del fp32
    gc.collect()
    log(f"      fp32 reference done in {time.perf_counter() - t0:.0f} s; the int4 LLM through the runtime")
    model = engines.load(q_dir)          # the engine ib-run picks by default
    d = probe.drift_stepwise(model)
    budget = INT4_VALIDATION_BUDGET
    bad = budget.violations(d, "int4 LLM validation (held-out)")
    if bad and enforce:
        raise ExportError("; ".join(bad), hint="try --llm-quant gptq, a smaller --group-size, or --llm-quant mixed")
    log(f"      held-out validation ({model.engine} engine): logits cosine mean {d.cosine_mean:.5f}, "
        f"top-1 agreement {d.top1:.4f} over {d.tokens} tokens (budget cosine >= {budget.min_cosine_mean}, "
        f"decided top-1 >= {budget.min_top1})" + (f"; MISSED, kept (validation recorded only): {'; '.join(bad)}"
                                                  if bad else ""))
    return {"reference": "fp32 LLM (layer-streamed)", "engine": model.engine, "inputs": held_rec, **d.to_json(),
            "budget": dataclasses.asdict(budget), "within_budget": not bad}


def weight_only_bundle_llm(root: Path, manifest: dict, mode: str, group_size: int, calib_set, log,
                           plan: dict | None = None, search: str = "auto") -> dict:
    """Weight-only LLM for any family: "int8" (every linear int8) or "mixed" (each linear int4,
    int8 or fp32 as the measured-drift search chose; ``plan`` re-applies a saved one). The probe
    runs on the bundle's own query embeddings + instructions (calibration split); the written
    checkpoint is then loaded through the runtime and checked on the held-out split."""
    from ib_edge.quant import llm_quant, weight_only
    from ib_edge.quant.budgets import VALIDATION_BUDGET
    from ib_edge.quant.logits_probe import LogitsProbe

    src, tmp_llm = root / "llm", root / ".llm-wo"
    image_id = manifest["model"]["image_token_id"]
    examples, calib_rec = llm_quant.multimodal_examples(root, calib_set)
    heldout, held_rec = llm_quant.multimodal_examples(root, calib_set, heldout=True)
    model = weight_only.load_fp32(src)
    if plan is None:
        probe = LogitsProbe(model, examples, image_id)
        log(f"      {mode}: measuring logits drift on {probe.tokens} calibration tokens "
            f"({len(examples)} multimodal examples, fp32 greedy answers teacher-forced)")
        plan = weight_only.make_plan(model, probe, mode, group_size, log, search)
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
    held_probe = LogitsProbe(model, heldout, image_id)
    del model           # the fp32 LLM (11 GB at T5-XL) goes before the written one is loaded
    gc.collect()
    try:
        v = weight_only.validate(tmp_llm, held_probe)
    except weight_only.WeightOnlyError as e:
        hint = ("export with --llm-quant int8, or calibrate on your own domain (--calib DIR)" if mode == "mixed"
                else "export without --llm-quant (fp32 LLM), or calibrate on your own domain (--calib DIR)")
        raise ExportError(str(e), hint=hint) from None
    log(f"      held-out validation: logits cosine mean {v.cosine_mean:.5f}, top-1 agreement {v.top1:.4f} "
        f"over {v.tokens} tokens, {v.top1_decided:.4f} over {v.decided} decided (budget cosine >= "
        f"{VALIDATION_BUDGET.min_cosine_mean}, decided top-1 >= {VALIDATION_BUDGET.min_top1})")
    rec["validation"] = {"reference": "fp32 LLM", "inputs": held_rec, **v.to_json(),
                         "budget": dataclasses.asdict(VALIDATION_BUDGET)}
    rec["calibration"] = plan.get("calibration", calib_rec)
    shutil.rmtree(src)
    os.replace(tmp_llm, src)
    return {"dir": "llm", "files": hashed_files(root, src), "format": rec["format"], "format_version": rec["format_version"],
            "backend": "transformers", "precision": mode, "dtype": "float32",
            "family": manifest["artifacts"]["llm"]["family"], "quantization": rec}
