"""ib-export's options: one frozen dataclass holding the one set of defaults and choices.

``ib-export`` builds its argparse from these fields (flag, help, choices in the field metadata);
``export_bundle`` takes them as keyword arguments; ``plan.plan_export`` checks them.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from ib_edge.runtime.errors import IbEdgeError
from ib_edge.runtime.formats import DEFAULT_GROUP_SIZE, KERNEL_GROUP_SIZES
from ib_edge.runtime.stages import PRECISIONS

from .tensorrt import DEFAULT_BATCH, DEFAULT_TEXT_LEN, DEFAULT_WORKSPACE_MB

BACKENDS = ("onnxruntime", "tensorrt")
CALIB_METHODS = ("minmax", "percentile")
INT8_STAGES = ("auto", "faster", "all")
INT8_STAGES_ENV = "IB_EDGE_INT8_STAGES"   # what --int8-stages auto means when set
LLM_QUANT = (None, "rtn", "gptq", "awq", "int8", "mixed")
WEIGHT_ONLY = ("int8", "mixed")     # any LLM family, transformers runtime with low-bit kernels
LLM_CALIB = ("multimodal", "text")  # GPTQ/AWQ calibration data: what the LLM sees, or the text-only baseline
LLM_VALIDATION = ("enforce", "record")
LLM_SEARCH = ("auto", "linear", "block")  # = quant.weight_only.SEARCH_UNITS (checked in tests)


class ExportError(IbEdgeError):
    pass


def _opt(default, help: str, *, flag: str | None = None, choices=None, metavar: str | None = None,
         cli: bool = True):
    """A field with its command-line form: ``--field-name`` unless ``flag`` says otherwise."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices,
                                                        "metavar": metavar, "cli": cli})


Triple = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class TrtOptions:
    """TensorRT engine building (``--backend tensorrt``); flags ``--trt-...``."""
    workspace_mb: int = _opt(DEFAULT_WORKSPACE_MB, "TensorRT builder workspace (Jetson: keep small)")
    batch: Triple = _opt(DEFAULT_BATCH, "TensorRT profile min,opt,max batch size")
    text_len: Triple = _opt(DEFAULT_TEXT_LEN, "TensorRT profile min,opt,max instruction tokens")
    timing_cache: str | Path | None = _opt(None, "", cli=False)  # default: .ib-edge-timing.cache beside the bundle


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    precision: str = _opt("fp32", "precision of the vision and Q-Former graphs (int8: calibrated Q/DQ; every stage "
                          "is checked against fp32 drift budgets)", choices=PRECISIONS)
    calib: str | Path | None = _opt(None, "calibration images (+ optional instructions.txt) for int8/fp16; default: "
                                    "the shipped set. Calibrating on your own domain is recommended", metavar="DIR")
    calib_method: str = _opt("minmax", "activation range calibration for int8", choices=CALIB_METHODS)
    int8_stages: str = _opt("auto", "with --precision int8: faster (time each stage's int8 and fp32 graphs on this "
                            "machine's ONNX Runtime CPU; where int8 is not faster, try int8 on the matmuls reading the "
                            "stage's inputs only (the Q-Former's image key/value projections), else keep fp32: int8 "
                            "speed depends on the CPU's VNNI/AMX), all (every stage int8, as TensorRT and GPUs want, or for another "
                            "target than this machine) or auto (default: faster with --backend onnxruntime, all with "
                            "tensorrt)", choices=INT8_STAGES)
    recipe_dir: str | Path | None = _opt(None, "re-apply the int8 recipes saved in a bundle (DIR or DIR/recipes) "
                                         "instead of searching", flag="--recipe", metavar="DIR")
    llm_quant: str | None = _opt(None, "low-bit LLM. Llama family, fast int4 runtime: rtn (round to nearest), gptq "
                                 "or awq (gptqmodel, calibrated on the bundle's own query embeddings + the "
                                 "calibration instructions). Any family (T5, OPT, Llama), transformers runtime with "
                                 "low-bit kernels: int8 (weight-only, per channel) or mixed (each linear int4/int8/"
                                 "fp32, the most drift-sensitive kept in higher precision, chosen by measured logits "
                                 "drift)", choices=LLM_QUANT[1:])
    llm_validation: str = _opt("enforce", "4-bit Llama (--llm-quant rtn|gptq|awq): the held-out check through the "
                               "runtime against fp32 refuses a bundle below its floor (enforce, default) or only "
                               "records the figures in the manifest (record: for random-weight benchmark models)",
                               choices=LLM_VALIDATION)
    llm_calib: str = _opt("multimodal", "with --llm-quant gptq|awq: multimodal (the bundle's query embeddings in the "
                          "<image> slots + each instruction: what the LLM sees in InstructBLIP) or text (the "
                          "instructions alone: the baseline)", choices=LLM_CALIB)
    group_size: int = _opt(DEFAULT_GROUP_SIZE, "4-bit group size", choices=KERNEL_GROUP_SIZES)
    llm_plan: str | Path | None = _opt(None, "with --llm-quant mixed: re-apply a saved plan (a bundle, or its "
                                       "llm/quant_plan.json) instead of searching", metavar="PATH")
    llm_search: str = _opt("auto", "with --llm-quant mixed: the search unit. linear (each linear's int4 drift "
                           "measured alone, promoted one at a time), block (each transformer block's linears "
                           "together: ~9x fewer measured forwards on T5/Llama) or auto (default: linear when that "
                           "pass, timed from one measured forward, takes <= 10 min, else block: Flan-T5-XL on 2 AMD "
                           "Zen 4 cores is 13-17 s a forward, 433 linears, 49 blocks)", choices=LLM_SEARCH)
    backend: str = _opt("onnxruntime", "onnxruntime: ONNX graphs (CPU, or CUDA/TensorRT through ORT providers); "
                        "tensorrt: build TensorRT engines for THIS machine's GPU (needs TensorRT; run it on the "
                        "Jetson)", choices=BACKENDS)
    trt: TrtOptions = dataclasses.field(default_factory=TrtOptions, metadata={"cli": "group"})
    video: bool = _opt(False, "load an image InstructBLIP checkpoint as a video model (as transformers' docs do: "
                       "InstructBlipVideoForConditionalGeneration.from_pretrained): the bundle answers about 4 frames, "
                       "the <image> token standing for the video token; InstructBlipVideo checkpoints are video "
                       "bundles without it")
    revision: str | None = _opt(None, "hub revision (branch, tag or commit)")
    opset: int = _opt(18, "ONNX opset (>= 18)")
    seed: int = _opt(0, "seed for the validation inputs")
    quiet: bool = _opt(False, "print only the bundle path")

    def __post_init__(self):
        if isinstance(self.trt, Mapping):  # callers may give the TensorRT options as a dict of its fields
            object.__setattr__(self, "trt", TrtOptions(**self.trt))

    def stage_choice(self) -> str:
        """--int8-stages as the export applies it ("faster" or "all"): "auto" is $IB_EDGE_INT8_STAGES
        when set (the test suite pins "all"), else faster, for int8 on --backend onnxruntime; all otherwise."""
        if self.int8_stages != "auto":
            return self.int8_stages
        if self.precision != "int8" or self.backend != "onnxruntime":
            return "all"
        env = os.environ.get(INT8_STAGES_ENV, "").strip()
        if env:
            if env not in INT8_STAGES[1:]:
                raise ExportError(f"{INT8_STAGES_ENV}={env!r} is not one of {', '.join(INT8_STAGES[1:])}")
            return env
        return "faster"

    def fields(self) -> dict:
        """The options as ``export_bundle`` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class ExportCancelled(KeyboardInterrupt):
    """The export was asked to stop (``cancel``, e.g. from a SIGTERM handler)."""


_cancel_reason: list[str] = []   # set by cancel(); read at every step boundary


def cancel(reason: str) -> None:
    """Ask a running export to stop at its next step boundary (and before its final rename).
    A signal handler also raises at once, but an exception raised inside a finalizer
    (``__del__``) is printed and dropped by Python: measured, an export SIGTERMed while a
    ``regex`` object was collected went on to write its bundle. This is the backstop."""
    _cancel_reason.append(reason)


def check_cancelled() -> None:
    if _cancel_reason:
        raise ExportCancelled(_cancel_reason[0])
