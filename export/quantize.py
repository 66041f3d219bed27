"""The InstructBLIP adapter for quantization: which stages, what their calibration feeds are,
and how the chain is checked. The algorithms themselves live in ib_edge.quant (model-agnostic).

Vision is calibrated on pixel_values of the calibration images; the Q-Former on the fp32
vision graph's image_embeds of those images paired with the calibration instructions (it is
instruction-aware, so its activations depend on the text too). Drift is measured on the
held-out split of the calibration set, never on images calibrated on, per stage and for the
chain (quantized vision -> quantized Q-Former) against the fp32 graphs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ib_edge.quant import budgets, fp16, int8
from ib_edge.quant.calibration import CalibrationError, CalibrationSet
from ib_edge.quant.drift import compare
from ib_edge.runtime.manifest import sha256_file
from ib_edge.runtime.preprocess import PromptEncoder, load_image, pixel_values

STAGE_OUTPUT = {"vision": "image_embeds", "qformer": "query_embeds"}
INSTRUCTIONS_PER_IMAGE = 2
MIN_IMAGES = 4


def _vision_feeds(images: list[Path], cfg: dict) -> list[dict[str, np.ndarray]]:
    return [{"pixel_values": pixel_values([load_image(p)], cfg)} for p in images]


def _qformer_feeds(embeds: list[np.ndarray], instructions, prompts: PromptEncoder, offset: int = 0):
    feeds = []
    for i, e in enumerate(embeds):
        for j in range(INSTRUCTIONS_PER_IMAGE):
            enc = prompts.encode(instructions[(offset + i * INSTRUCTIONS_PER_IMAGE + j) % len(instructions)])
            feeds.append({"image_embeds": e, "qformer_input_ids": enc["qformer_input_ids"],
                          "qformer_attention_mask": enc["qformer_attention_mask"]})
    return feeds


def quantize_stages(precision: str, fp32: dict[str, Path], out_dir: Path, *, preprocess: dict,
                    prompts: PromptEncoder, calib: CalibrationSet, method: str = "minmax",
                    recipes: dict[str, int8.Int8Recipe] | None = None,
                    log: Callable[[str], None] = print) -> dict:
    """Write ``out_dir/{stage}.onnx`` at ``precision`` for vision and qformer, check every
    drift budget, and return {"stages": {stage: record}, "chain": stats, "recipes": {...}}."""
    if len(calib.images) < MIN_IMAGES:
        raise CalibrationError(f"calibration set has {len(calib.images)} images; need at least {MIN_IMAGES} "
                               "(a quarter is held out to measure drift)")
    cal_imgs, held_imgs = calib.split()
    log(f"      calibration: {len(cal_imgs)} images + {len(calib.instructions)} instructions, "
        f"{len(held_imgs)} images held out (set {calib.sha256[:12]})")
    feeds = {"vision": (_vision_feeds(cal_imgs, preprocess), _vision_feeds(held_imgs, preprocess))}
    cal_emb = int8.run_graph(fp32["vision"], feeds["vision"][0], "image_embeds")
    held_emb = int8.run_graph(fp32["vision"], feeds["vision"][1], "image_embeds")
    feeds["qformer"] = (_qformer_feeds(cal_emb, calib.instructions, prompts),
                        _qformer_feeds(held_emb, calib.instructions, prompts, offset=7))
    records, used = {}, {}
    for stage in ("vision", "qformer"):
        out = out_dir / f"{stage}.onnx"
        tensor = STAGE_OUTPUT[stage]
        cal, held = feeds[stage]
        if precision == "fp16":
            fp16.convert(fp32[stage], out)
            drift = compare(int8.run_graph(fp32[stage], held, tensor), int8.run_graph(out, held, tensor))
            log(f"      {stage} fp16: {drift.line()}")
            budgets.check(tensor, precision, drift)
            records[stage] = {"drift": drift.to_json(), "quantization": {"scheme": "fp16 weights and activations, "
                              "fp32 inputs/outputs", "kept_fp32_ops": list(fp16.KEEP_FP32_OPS)}}
            continue
        graph_sha = sha256_file(fp32[stage])
        if recipes and stage in recipes:
            recipe = recipes[stage]
            if recipe.graph_sha256 not in (None, graph_sha):
                raise CalibrationError(f"the {stage} recipe was searched on another graph "
                                       f"({recipe.graph_sha256[:12]} vs {graph_sha[:12]})",
                                       hint="re-export without --recipe to search again")
            if recipe.calibration_sha256 not in (None, calib.sha256):
                raise CalibrationError(f"the {stage} recipe was calibrated on another set",
                                       hint="pass the same --calib as the recipe's export, or drop --recipe")
            int8.apply(fp32[stage], out, recipe, cal)
            drift = compare(int8.run_graph(fp32[stage], held, tensor), int8.run_graph(out, held, tensor))
            steps = []
            log(f"      {stage} int8 (recipe, {len(recipe.exclude)} excluded): {drift.line()}")
        else:
            base = int8.Int8Recipe(method=method, calibration_sha256=calib.sha256, graph_sha256=graph_sha)
            try:
                recipe, drift, steps = int8.search(
                    fp32[stage], out, tensor, cal, held,
                    lambda d: not budgets.violations(tensor, precision, d), base=base, name=stage, log=log)
            except RuntimeError as e:
                raise budgets.DriftBudgetError(f"{stage}: {e}", hint="calibrate on your own images (--calib DIR) "
                                               "or use --precision fp16") from None
        budgets.check(tensor, precision, drift)
        if recipe.exclude:
            log(f"      {stage}: kept in higher precision: {', '.join(recipe.exclude)}")
        used[stage] = recipe
        records[stage] = {"drift": drift.to_json(), "quantization": {
            "scheme": "QDQ int8, symmetric; activations per-tensor, weights per-channel",
            "op_types": list(recipe.op_types), "excluded_nodes": list(recipe.exclude),
            "method": recipe.method, "search": [s.to_json() for s in steps]}}
    # The chain the LLM sees: quantized vision feeding the quantized Q-Former.
    q_held = _qformer_feeds(int8.run_graph(out_dir / "vision.onnx", feeds["vision"][1], "image_embeds"),
                            calib.instructions, prompts, offset=7)
    chain = compare(int8.run_graph(fp32["qformer"], feeds["qformer"][1], "query_embeds"),
                    int8.run_graph(out_dir / "qformer.onnx", q_held, "query_embeds"))
    log(f"      chain query_embeds {precision}: {chain.line()}")
    budgets.check("query_embeds", precision, chain)
    return {"stages": records, "chain": chain.to_json(), "recipes": used}
