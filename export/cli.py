"""ib-export: turn an InstructBLIP checkpoint into a deploy bundle.

    ib-export [MODEL] [--out DIR] [--video] [--precision fp32|fp16|int8] [--calib DIR] [--recipe DIR]
              [--llm-quant rtn|gptq|awq|int8|mixed] [--llm-calib multimodal|text] [--llm-validation enforce|record] [--llm-plan PATH] [--llm-search auto|linear|block] [--revision REV] [--opset 18]

MODEL is a shipped proof model (proof-llama, the default; proof-t5), a local checkpoint
directory, or a hub id such as Salesforce/instructblip-vicuna-7b. An InstructBlipVideo checkpoint
makes a video bundle; --video loads an image InstructBLIP checkpoint as a video model.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import warnings


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``ExportOptions`` (and its ``TrtOptions`` as ``--trt-...``), in field order."""
    from .options import ExportOptions, TrtOptions

    ap = argparse.ArgumentParser(prog="ib-export", description="Export InstructBLIP into an ib-edge deploy bundle.")
    ap.add_argument("model", nargs="?", default=None,
                    help="proof-llama (default), proof-t5, a local checkpoint directory, or a hub id")
    ap.add_argument("--out", default=None, help="bundle directory (default: the location ib-run reads)")
    for f in dataclasses.fields(ExportOptions):
        if f.metadata["cli"] == "group":
            for t in dataclasses.fields(TrtOptions):
                if t.metadata["cli"]:
                    _add(ap, t, f"--{f.name}-{t.name.replace('_', '-')}", f"{f.name}_{t.name}")
        else:
            _add(ap, f, f.metadata["flag"] or f"--{f.name.replace('_', '-')}", f.name)
    ap.add_argument("--target", default=None, metavar="NAME",
                    help="refuse, before any work, a bundle the planner says cannot fit this device (agx-orin-64, "
                         "agx-orin-32, orin-nx-16, orin-nx-8, orin-nano-8, orin-nano-4, host); see ib-bench --plan")
    ap.add_argument("--context", type=int, default=None, metavar="N",
                    help="with --target: the LLM positions to plan for (default: its max, <= 2048)")
    return ap


def _add(ap: argparse.ArgumentParser, f: dataclasses.Field, flag: str, dest: str) -> None:
    m, default = f.metadata, f.default
    kw = {"help": m["help"]}
    if isinstance(default, bool):
        kw["action"] = "store_true"
    elif isinstance(default, tuple):  # MIN,OPT,MAX, parsed by _triple (one error line, not a usage error)
        kw["default"] = ",".join(map(str, default))
    else:
        kw.update(default=default, type=int if isinstance(default, int) else None)
    if m["choices"] is not None:
        kw["choices"] = list(m["choices"])
    if m["metavar"] is not None:
        kw["metavar"] = m["metavar"]
    ap.add_argument(flag, dest=dest, **kw)


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
    from .options import cancel  # already imported by build_parser: no import inside the handler

    cancel(signal.Signals(signum).name)   # the backstop, should this raise be swallowed (see cancel)
    raise Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _silence_libraries()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    default_unraisable = sys.unraisablehook

    def unraisable(u):  # a Terminated raised inside a finalizer: no traceback; the cancel flag acts
        if not isinstance(u.exc_value, KeyboardInterrupt):
            default_unraisable(u)

    sys.unraisablehook = unraisable
    from ib_edge.runtime.errors import IbEdgeError
    from ib_edge.runtime.pipeline import default_bundle_dir

    try:
        # the planner's refusal first (it knows the real checkpoints' configs without downloading them)
        if args.target is not None:  # the planner's refusal, before any work (bench/plan.py)
            from ib_edge.bench.plan import check_export_fits

            check_export_fits(args.model, args.target, precision=args.precision, llm_quant=args.llm_quant,
                              group_size=args.group_size, context=args.context)
        elif args.context is not None:
            raise IbEdgeError("--context plans for a device; use it with --target")
        from .checkpoint import resolve

        _, kind = resolve(args.model)  # a bad name or path fails here, before torch and transformers are imported
        if args.opset < 18:
            raise IbEdgeError("--opset must be 18 or newer (the dynamo exporter's minimum; older breaks FP16 later)")
        from .bundle import export_bundle
        from .onnx_export import ExportValidationError
        from .options import ExportOptions, TrtOptions

        out = args.out or default_bundle_dir()
        trt = TrtOptions(workspace_mb=args.trt_workspace_mb, batch=_triple(args.trt_batch, "--trt-batch"),
                         text_len=_triple(args.trt_text_len, "--trt-text-len"))
        opts = ExportOptions(**{f.name: trt if f.name == "trt" else getattr(args, f.name)
                                for f in dataclasses.fields(ExportOptions)})
        try:
            path = export_bundle(args.model, out, **opts.fields())
        except ExportValidationError as e:
            print(f"ib-export: error: {e}", file=sys.stderr)
            return 1
        if args.quiet:
            print(path)
        else:
            bundle_arg = "" if args.out is None else f" --bundle {path}"
            from ib_edge.runtime.manifest import Manifest

            try:  # the hint only: a bundle that cannot be read back here is ib-run's to report
                frames = Manifest.load(path).frames
            except IbEdgeError:
                frames = None
            note = ""
            if kind == "proof":
                task, maker = (("shapes task", "proof_task makes images") if frames is None else
                               ("moving-shapes video task", "proof_video makes clips"))
                note = (f"; note: the embedded proof model only knows the synthetic {task} (python -m "
                        f"ib_edge.bench.{maker}); for real photos export a real checkpoint: "
                        "ib-export Salesforce/instructblip-flan-t5-xl --out DIR (or a local checkpoint directory)")
            what = ("IMAGE \"Describe this image.\"" if frames is None else
                    " ".join(f"--frame F{i + 1}" for i in range(frames)) + " \"Describe this video.\" (or a GIF/mp4 "
                    "in place of the frames)")
            print(f"try: ib-run{bundle_arg} {what}{note}", file=sys.stderr)
        return 0
    except IbEdgeError as e:
        print(f"ib-export: error: {e.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from .options import ExportCancelled

        term = isinstance(e, (Terminated, ExportCancelled))
        what = f"terminated ({e})" if term else "interrupted"
        print(f"ib-export: {what}; no bundle was written", file=sys.stderr)
        return 143 if term else 130
    except Exception as e:
        if os.environ.get("IB_EDGE_DEBUG"):
            raise
        print(f"ib-export: internal error: {type(e).__name__}: {e} (set IB_EDGE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 4


if __name__ == "__main__":
    raise SystemExit(main())
