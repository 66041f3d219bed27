"""An export's plan: its options checked (in the order ib-export has always checked them, so the
same first error wins), the saved inputs it re-applies loaded, and the list of steps that
``export_bundle`` runs and numbers ``[i/n]`` in its progress lines."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Callable

from ib_edge.runtime.manifest import MANIFEST
from ib_edge.runtime.stages import PRECISIONS

from . import specs
from .options import BACKENDS, LLM_CALIB, LLM_QUANT, LLM_VALIDATION, WEIGHT_ONLY, ExportError, ExportOptions


@dataclasses.dataclass(frozen=True)
class Step:
    kind: str        # "load" | "graph" | "save" | "quantize" | "manifest" | "llm"
    text: str        # the progress line after "[i/n] "


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    model_ref: str | None
    out: Path                      # resolved
    options: ExportOptions
    steps: tuple[Step, ...]
    calib_set: object = None       # quant.calibration.CalibrationSet, when anything is quantized
    recipes: dict | None = None    # stage -> quant.int8.Int8Recipe, with --recipe
    llm_plan: dict | None = None   # the saved weight-only plan, with --llm-plan

    def progress(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``step(kind)`` logs the next step's ``[i/n]`` line; its kind must be the plan's next."""
        todo = iter(enumerate(self.steps, start=1))

        def step(kind: str) -> None:
            i, s = next(todo)
            if s.kind != kind:
                raise ExportError(f"export step {i} is {s.kind!r} in the plan but {kind!r} ran (a bug)")
            log(f"[{i}/{len(self.steps)}] {s.text}")
        return step


def plan_export(model_ref: str | None, out: str | Path, opts: ExportOptions) -> ExportPlan:
    """Check ``opts`` and load what they name (the calibration set, saved recipes or LLM plan);
    raises ExportError (or the loader's typed error) for the first problem."""
    o = opts
    if o.llm_validation not in LLM_VALIDATION:
        raise ExportError(f"llm_validation {o.llm_validation!r} is not enforce or record")
    if o.precision not in PRECISIONS:
        raise ExportError(f"precision {o.precision!r} is not supported (choose {', '.join(PRECISIONS)})")
    if o.backend not in BACKENDS:
        raise ExportError(f"backend {o.backend!r} is not supported (choose {', '.join(BACKENDS)})")
    if o.backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        raise ExportError("TensorRT is not installed here",
                          hint="build engines on the GPU host (JetPack ships TensorRT), or export with "
                               "--backend onnxruntime and run it with ib-run --providers tensorrt,cuda,cpu")
    out = Path(out).expanduser().resolve()
    check_replaceable(out)
    if o.int8_stages == "faster" and (o.precision != "int8" or o.backend != "onnxruntime"):
        raise ExportError("--int8-stages faster times stages on ONNX Runtime CPU; use it with --precision int8 "
                          "and --backend onnxruntime")
    o.stage_choice()  # a bad $IB_EDGE_INT8_STAGES fails here, before any work
    if o.recipe_dir is not None and o.precision != "int8":
        raise ExportError("--recipe re-applies INT8 recipes; use it with --precision int8")
    if o.llm_quant not in LLM_QUANT:
        raise ExportError(f"--llm-quant {o.llm_quant!r} is not supported (choose {', '.join(map(str, LLM_QUANT))})")
    if o.llm_calib not in LLM_CALIB:
        raise ExportError(f"--llm-calib {o.llm_calib!r} is not one of {', '.join(LLM_CALIB)}")
    if o.llm_calib != "multimodal" and o.llm_quant not in ("gptq", "awq"):
        raise ExportError("--llm-calib chooses GPTQ/AWQ calibration data; use it with --llm-quant gptq or awq")
    if o.llm_search != "auto" and (o.llm_quant != "mixed" or o.llm_plan is not None):
        raise ExportError("--llm-search sets the unit of the mixed 4/8-bit search; use it with --llm-quant mixed "
                          "and without --llm-plan")
    llm_plan = None
    if o.llm_plan is not None:
        if o.llm_quant != "mixed":
            raise ExportError("--llm-plan re-applies a weight-only LLM plan; use it with --llm-quant mixed")
        from ib_edge.quant.weight_only import load_plan

        llm_plan = load_plan(o.llm_plan)
    if o.llm_quant in ("gptq", "awq") and importlib.util.find_spec("gptqmodel") is None:
        raise ExportError(f"--llm-quant {o.llm_quant} needs gptqmodel",
                          hint='pip install -c constraints.txt "gptqmodel==7.6.0"')
    calib_set = recipes = None
    if o.precision != "fp32" or o.llm_quant:  # check calibration inputs first (rtn: its held-out validation)
        from ib_edge.quant.calibration import CalibrationSet
        from ib_edge.quant.int8 import Int8Recipe

        calib_set = CalibrationSet.load(o.calib)
        if o.recipe_dir is not None:
            rdir = Path(o.recipe_dir)
            rdir = rdir / "recipes" if (rdir / "recipes").is_dir() else rdir
            files = {st: rdir / f"{st}.int8.json" for st in specs.GRAPH_SPECS}
            missing = [str(f) for f in files.values() if not f.is_file()]
            if missing:
                raise ExportError(f"recipe files missing: {', '.join(missing)}")
            recipes = {st: Int8Recipe.load(f) for st, f in files.items()}
    steps = [Step("load", f"loading {model_ref or 'proof-llama'}")]
    steps += [Step("graph", f"exporting {stage} graph (opset {o.opset})") for stage in specs.GRAPH_SPECS]
    steps.append(Step("save", "saving LLM and processor"))
    if o.precision != "fp32":
        steps.append(Step("quantize", f"{o.precision}: calibrating, quantizing and checking drift against fp32"))
    steps.append(Step("manifest", "checking tokenizers and writing manifest"))
    if o.llm_quant in WEIGHT_ONLY:
        steps.append(Step("llm", f"weight-only LLM ({o.llm_quant}, int4 group size "
                                 f"{llm_plan['group_size'] if llm_plan else o.group_size})"))
    elif o.llm_quant:
        steps.append(Step("llm", f"4-bit LLM ({o.llm_quant}, group size {o.group_size})"))
    return ExportPlan(model_ref, out, opts, tuple(steps), calib_set, recipes, llm_plan)


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
