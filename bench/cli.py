"""ib-bench: latency, memory, drift and accuracy of ib-edge bundles, side by side, with baselines.

    ib-bench [--bundle DIR ...] [--eval FILE.jsonl] [--report DIR] [--json-out FILE] [--runs N]
             [--warmup N] [--n-eval N] [--max-new-tokens N] [--source CHECKPOINT] [--no-baselines]
    ib-bench --scale real [--scale-layers N] [--scale-dir DIR] [--report DIR]
    ib-bench --plan MODEL [--precision P] [--llm-quant Q] [--group-size G] [--context N] [--target NAME] [--json-out FILE]

The first fp32 bundle (by its manifest) is the drift reference. Without --eval a fresh
proof-task set is generated (its seed is printed and recorded). The report (markdown) goes to
stdout; --report DIR also writes report.md, report.json and PNG plots there.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from .bench import BenchConfig

    d = BenchConfig()
    ap = argparse.ArgumentParser(prog="ib-bench", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", action="append", default=[], metavar="DIR",
                    help="bundle to measure; repeat for several (default: where ib-export writes)")
    ap.add_argument("--eval", dest="eval_file", metavar="FILE.jsonl",
                    help='eval set: {"image","question","answer"[,"type"]} per line (default: a fresh proof-task set)')
    ap.add_argument("--n-eval", type=int, default=None,
                    help="eval examples (default: all rows of --eval, or 50 generated; 4 with --scale real)")
    ap.add_argument("--eval-seed", type=int, default=None, help="seed of the generated set (default: random, printed)")
    ap.add_argument("--report", metavar="DIR", help="write report.md, report.json and PNG plots here")
    ap.add_argument("--json-out", dest="json", metavar="FILE", help="write the result JSON to FILE (it is also in "
                    "--report DIR/report.json)")
    ap.add_argument("--json", dest="json_old", metavar="FILE",
                    help="deprecated spelling of --json-out FILE (ib-run's --json is a switch: JSON on stdout)")
    ap.add_argument("--runs", type=int, default=d.runs, help=f"timed runs per system (default {d.runs})")
    ap.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed warm-up runs (default {d.warmup})")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--source", default=None, metavar="CHECKPOINT",
                    help="checkpoint for the transformers baselines (default: the reference bundle's manifest source)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime and torch")
    ap.add_argument("--background-load", type=int, default=0, metavar="N",
                    help="run N CPU-bound processes (a busy Python loop each) for the whole run, to show how "
                         "every system fares on a loaded machine; the report says so (default 0)")
    ap.add_argument("--providers", default=None, help="ONNX Runtime providers, e.g. cuda,cpu (default cpu)")
    ap.add_argument("--bandwidth-mb", type=int, default=d.bandwidth_mb, help="array size of the bandwidth measurement")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--scale", choices=["real"], default=None,
                    help="real: random-weight models at InstructBLIP's real shapes instead of --bundle "
                         "(exports peak at ~11 GB RAM; many minutes at full depth)")
    ap.add_argument("--scale-layers", type=int, default=None, metavar="N",
                    help="with --scale real: at most N layers in vision, Q-Former and LLM (smoke tests)")
    ap.add_argument("--scale-dir", default=None, metavar="DIR",
                    help="with --scale real: keep (and reuse) the checkpoint and bundles here (default: a temp dir)")
    ap.add_argument("--scale-calib", type=int, default=8, metavar="N",
                    help="with --scale real: calibration images for the int8 export (default 8)")
    from . import plan

    plan.add_arguments(ap)
    return ap


def _config(args, **over):
    from .bench import BenchConfig

    return BenchConfig(
        bundles=tuple(args.bundle), eval_file=args.eval_file, n_eval=args.n_eval, eval_seed=args.eval_seed,
        runs=args.runs, warmup=args.warmup, max_new_tokens=args.max_new_tokens, baselines=not args.no_baselines,
        source=args.source, threads=args.threads,
        providers=tuple(p.strip() for p in args.providers.split(",")) if args.providers else None,
        bandwidth_mb=args.bandwidth_mb, progress=False if args.no_progress else None, **over)


def check_outputs(args) -> None:
    """--report and --json-out are checked before anything is measured (a run can take an hour;
    an unwritable path found at its end would lose it), and so is the eval file."""
    from .bench import BenchError, read_eval_file

    def writable_dir(d: Path, flag: str) -> None:
        probe = d
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise BenchError(f"{flag} {d}: {probe} is a file, not a directory")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise BenchError(f"{flag} {d}: {probe} is not writable")

    if args.report:
        rep = Path(args.report)
        if rep.exists() and not rep.is_dir():
            raise BenchError(f"--report {rep} is an existing file; --report takes a directory")
        writable_dir(rep, "--report")
    if args.json:
        js = Path(args.json)
        if js.is_dir():
            raise BenchError(f"--json-out {js} is a directory; --json-out takes a file path")
        if js.exists() and not os.access(js, os.W_OK):
            raise BenchError(f"--json-out {js} is not writable")
        writable_dir(js.parent, "--json-out")
    if args.eval_file:
        read_eval_file(Path(args.eval_file))


def run(args, log) -> dict:
    from .bench import BenchError, run_bench

    if args.scale is None:
        for flag in ("scale_layers", "scale_dir"):
            if getattr(args, flag) is not None:
                raise BenchError(f"--{flag.replace('_', '-')} needs --scale real")
        return run_bench(_config(args), log)
    from . import scale

    if args.bundle or args.source:
        raise BenchError("--scale real builds its own models; it takes no --bundle or --source")
    if args.scale_layers is not None and args.scale_layers < 1:
        raise BenchError("--scale-layers must be at least 1")
    spec = scale.ScaleSpec.with_layers(args.scale_layers)
    if spec.is_full:
        log("ib-bench: full real-shape run: its exports peak at ~11 GB RAM and it takes many minutes (use --scale-layers N to try it small)")
    with tempfile.TemporaryDirectory(prefix="ib-bench-scale-") as tmp:
        work = Path(args.scale_dir) if args.scale_dir else Path(tmp)
        ckpt, bundles, notes = scale.prepare(spec, work, calib_images=args.scale_calib, log=log)
        cfg = _config(args, accuracy_applicable=False)
        import dataclasses

        cfg = dataclasses.replace(cfg, bundles=tuple(str(b) for b in bundles), source=str(ckpt),
                                  n_eval=args.n_eval if args.n_eval is not None else 4)
        result = run_bench(cfg, log)
    result["mode"] = "scale-real"
    result["scale"] = {**scale.describe(spec), "notes": notes, "work_dir": str(work) if args.scale_dir else None}
    return result


@contextlib.contextmanager
def background_load(n: int):
    """N busy processes (``while 1: pass``) while the block runs; yields a record of them that is
    completed with the load average at the end."""
    rec = {"processes": n, "load_average_start": [round(v, 2) for v in os.getloadavg()]}
    procs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"], stdin=subprocess.DEVNULL)
             for _ in range(n)]
    try:
        yield rec
    finally:
        rec["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json_old is not None:
        if args.json is not None:
            print("ib-bench: error: --json is the old spelling of --json-out; give one of them", file=sys.stderr)
            return 2
        print("ib-bench: note: --json FILE is deprecated, use --json-out FILE", file=sys.stderr)
        args.json = args.json_old
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from ib_edge.runtime.errors import cli_failure
    from ib_edge.runtime.quiet import quiet_libraries
    from ib_edge.runtime.threads import before_torch_import

    before_torch_import()   # the baselines import torch: its OpenMP threads yield (runtime/threads.py)
    quiet_libraries()

    from . import report
    from .bench import BenchError

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        if args.plan is not None:  # the planner: no measurement, its own report
            from . import plan

            result = plan.run_cli(args)
            if args.json:
                plan.write_json(result, args.json)
            print(plan.render(result), end="")
            return 0
        check_outputs(args)
        if not 0 <= args.background_load <= 64:
            raise BenchError(f"--background-load must be between 0 and 64, not {args.background_load}")
        with background_load(args.background_load) as load:
            result = run(args, log)
        if args.background_load:
            result["background_load"] = load
        result["command"] = "ib-bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        # the JSON first: a failing plot or markdown render must not lose the run
        temp = not args.json and not args.report
        saved = (Path(args.json) if args.json else Path(args.report) / "report.json" if args.report
                 else Path(tempfile.gettempdir()) / f"ib-bench-{os.getpid()}.json")
        report.write_json(result, saved)
        try:
            if args.report:
                paths = report.write_report(result, args.report)
                log(f"ib-bench: wrote {paths['md']}, {paths['json']} and {len(paths['plots'])} plots")
            print(report.render_markdown(result))
        except Exception as e:
            raise BenchError(f"rendering the report failed ({type(e).__name__}: {e}); the results are saved in "
                             f"{saved}") from None
        if temp:
            saved.unlink(missing_ok=True)
        return 0
    except BaseException as e:
        return cli_failure("ib-bench", e)


if __name__ == "__main__":
    raise SystemExit(main())
