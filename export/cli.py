"""ib-export: turn an InstructBLIP checkpoint into a deploy bundle.

    ib-export [MODEL] [--out DIR] [--precision fp32|fp16|int8] [--calib DIR] [--recipe DIR]
              [--llm-quant rtn|gptq|awq|int8|mixed] [--llm-calib multimodal|text] [--llm-validation enforce|record] [--llm-plan PATH] [--revision REV] [--opset 18]

MODEL is a shipped proof model (proof-llama, the default; proof-t5), a local checkpoint
directory, or a hub id such as Salesforce/instructblip-vicuna-7b.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ib-export", description="Export InstructBLIP into an ib-edge deploy bundle.")
    ap.add_argument("model", nargs="?", default=None,
                    help="proof-llama (default), proof-t5, a local checkpoint directory, or a hub id")
    ap.add_argument("--out", default=None, help="bundle directory (default: the location ib-run reads)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                    help="precision of the vision and Q-Former graphs (int8: calibrated Q/DQ; every stage is "
                         "checked against fp32 drift budgets)")
    ap.add_argument("--calib", default=None, metavar="DIR",
                    help="calibration images (+ optional instructions.txt) for int8/fp16; default: the shipped "
                         "set. Calibrating on your own domain is recommended")
    ap.add_argument("--calib-method", default="minmax", choices=["minmax", "percentile"],
                    help="activation range calibration for int8")
    ap.add_argument("--int8-stages", default="all", choices=["all", "faster"],
                    help="with --precision int8: all (every stage int8, as TensorRT wants) or faster (time each "
                         "stage's int8 and fp32 graphs on this machine's ONNX Runtime CPU and keep fp32 where int8 "
                         "is not faster: on x86 CPUs the int8 Q-Former is)")
    ap.add_argument("--recipe", default=None, metavar="DIR",
                    help="re-apply the int8 recipes saved in a bundle (DIR or DIR/recipes) instead of searching")
    ap.add_argument("--llm-quant", default=None, choices=["rtn", "gptq", "awq", "int8", "mixed"],
                    help="low-bit LLM. Llama family, fast int4 runtime: rtn (round to nearest), gptq or awq "
                         "(gptqmodel, calibrated on the bundle's own query embeddings + the calibration "
                         "instructions). Any family (T5, OPT, Llama), transformers runtime with low-bit kernels: "
                         "int8 (weight-only, per channel) or mixed (each linear int4/int8/fp32, the most "
                         "drift-sensitive kept in higher precision, chosen by measured logits drift)")
    ap.add_argument("--llm-validation", default="enforce", choices=["enforce", "record"],
                    help="4-bit Llama (--llm-quant rtn|gptq|awq): the held-out check through the runtime against "
                         "fp32 refuses a bundle below its floor (enforce, default) or only records the figures "
                         "in the manifest (record: for random-weight benchmark models)")
    ap.add_argument("--llm-calib", default="multimodal", choices=["multimodal", "text"],
                    help="with --llm-quant gptq|awq: multimodal (the bundle's query embeddings in the <image> slots "
                         "+ each instruction: what the LLM sees in InstructBLIP) or text (the instructions alone: "
                         "the baseline)")
    ap.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256], help="4-bit group size")
    ap.add_argument("--llm-plan", default=None, metavar="PATH",
                    help="with --llm-quant mixed: re-apply a saved plan (a bundle, or its llm/quant_plan.json) "
                         "instead of searching")
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                    help="onnxruntime: ONNX graphs (CPU, or CUDA/TensorRT through ORT providers); tensorrt: build "
                         "TensorRT engines for THIS machine's GPU (needs TensorRT; run it on the Jetson)")
    ap.add_argument("--trt-workspace-mb", type=int, default=1024, help="TensorRT builder workspace (Jetson: keep small)")
    ap.add_argument("--trt-batch", default="1,1,4", help="TensorRT profile min,opt,max batch size")
    ap.add_argument("--trt-text-len", default="1,32,128", help="TensorRT profile min,opt,max instruction tokens")
    ap.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    ap.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the validation inputs")
    ap.add_argument("--target", default=None, metavar="NAME",
                    help="refuse, before any work, a bundle the planner says cannot fit this device (agx-orin-64, "
                         "agx-orin-32, orin-nx-16, orin-nx-8, orin-nano-8, orin-nano-4, host); see ib-bench --plan")
    ap.add_argument("--context", type=int, default=None, metavar="N",
                    help="with --target: the LLM positions to plan for (default: its max, <= 2048)")
    ap.add_argument("--quiet", action="store_true", help="print only the bundle path")
    return ap


def _silence_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    if not os.environ.get("IB_EDGE_DEBUG"):
        logging.disable(logging.WARNING)  # torch/torchao/onnxscript import chatter; progress is printed


def _triple(text: str, flag: str) -> tuple[int, int, int]:
    from ib_edge.runtime.errors import IbEdgeError

    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or not 1 <= vals[0] <= vals[1] <= vals[2]:
        raise IbEdgeError(f"{flag} must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
    return vals


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP, handled like Ctrl-C: the export's temp directory is removed on the way out."""


def _terminate(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _silence_libraries()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    from ib_edge.runtime.errors import IbEdgeError
    from ib_edge.runtime.pipeline import default_bundle_dir

    try:
        if args.opset < 18:
            raise IbEdgeError("--opset must be 18 or newer (the dynamo exporter's minimum; older breaks FP16 later)")
        from .bundle import export_bundle
        from .onnx_export import ExportValidationError

        if args.target is not None:  # the planner's refusal, before any work (bench/plan.py)
            from ib_edge.bench.plan import check_export_fits

            check_export_fits(args.model, args.target, precision=args.precision, llm_quant=args.llm_quant,
                              group_size=args.group_size, context=args.context)
        elif args.context is not None:
            raise IbEdgeError("--context plans for a device; use it with --target")
        out = args.out or default_bundle_dir()
        trt = {"workspace_mb": args.trt_workspace_mb, "batch": _triple(args.trt_batch, "--trt-batch"),
               "text_len": _triple(args.trt_text_len, "--trt-text-len")}
        try:
            path = export_bundle(args.model, out, precision=args.precision, revision=args.revision,
                                 opset=args.opset, seed=args.seed, calib=args.calib, calib_method=args.calib_method,
                                 recipe_dir=args.recipe, backend=args.backend, trt=trt, llm_quant=args.llm_quant,
                                 group_size=args.group_size, llm_plan=args.llm_plan, llm_calib=args.llm_calib,
                                 llm_validation=args.llm_validation,
                                 int8_stages=args.int8_stages, quiet=args.quiet)
        except ExportValidationError as e:
            print(f"ib-export: error: {e}", file=sys.stderr)
            return 1
        if args.quiet:
            print(path)
        else:
            bundle_arg = "" if args.out is None else f" --bundle {path}"
            print(f"try: ib-run{bundle_arg} IMAGE \"Describe this image.\"", file=sys.stderr)
        return 0
    except IbEdgeError as e:
        print(f"ib-export: error: {e.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = f"terminated ({e})" if isinstance(e, Terminated) else "interrupted"
        print(f"ib-export: {what}; no bundle was written", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:
        if os.environ.get("IB_EDGE_DEBUG"):
            raise
        print(f"ib-export: internal error: {type(e).__name__}: {e} (set IB_EDGE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 4


if __name__ == "__main__":
    raise SystemExit(main())
