"""ib-triton: a bundle as a Triton model repository, and a Triton server for it.

    ib-triton export BUNDLE --out REPO [--variant ngc|python] [--instances N] [--max-batch N] [--threads N]
    ib-triton serve REPO [--http-port N] [--grpc-port N] [--metrics-port N] [--env DIR]
    ib-triton env [--env DIR]      prepare the models' environment only (what serve does first)
    ib-triton client [--env DIR] configs REPO | ask --url HOST:PORT [--protocol grpc] QUERIES.json
                                   ib_edge.triton.client in that environment (tritonclient lives there)

Problems get one line on stderr and a non-zero exit: 2 for bad arguments or input, 3 for a bad
bundle or repository, 4 when the server fails.
"""
from __future__ import annotations

import argparse
import os
import sys

EXIT_INPUT, EXIT_BUNDLE, EXIT_SERVER = 2, 3, 4


def build_parser() -> argparse.ArgumentParser:
    from .repository import ExportOptions
    from .server import ServeOptions
    from .spec import VARIANTS

    e, s = ExportOptions(), ServeOptions()
    ap = argparse.ArgumentParser(prog="ib-triton", description="Serve an ib-edge bundle on Triton Inference Server.")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a Triton model repository from a bundle")
    ex.add_argument("bundle", help="bundle directory (ib-export --out)")
    ex.add_argument("--out", required=True, help="repository directory to write (replaced atomically)")
    ex.add_argument("--variant", choices=VARIANTS, default=e.variant,
                    help="ngc: vision/qformer on Triton's ONNX Runtime or TensorRT backend (NVIDIA's container); "
                         f"python: all four models on the Python backend (default {e.variant})")
    ex.add_argument("--instances", type=int, default=e.instances, help="model instances per model")
    ex.add_argument("--max-batch", type=int, default=e.max_batch, help="max batch of the dynamic batcher")
    ex.add_argument("--threads", type=int, default=e.threads,
                    help=f"CPU threads per Python-backend model instance, 0: all cores (default {e.threads})")
    ex.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    sv = sub.add_parser("serve", help="run a repository on PyTriton's tritonserver, bound to 127.0.0.1")
    sv.add_argument("repo", help="repository directory (ib-triton export --out)")
    sv.add_argument("--http-port", type=int, default=s.http_port)
    sv.add_argument("--grpc-port", type=int, default=s.grpc_port)
    sv.add_argument("--metrics-port", type=int, default=s.metrics_port)
    sv.add_argument("--env", default=s.env, help="the models' Python environment (numpy < 2; created there if "
                                                 "absent; default: one under $IB_EDGE_HOME/triton-env)")
    en = sub.add_parser("env", help="prepare the models' environment and print its path")
    en.add_argument("--env", default=s.env)
    cl = sub.add_parser("client", help="run ib_edge.triton.client (configs | ask) in the models' environment")
    cl.add_argument("--env", default=s.env)
    cl.add_argument("args", nargs=argparse.REMAINDER, help="arguments of python -m ib_edge.triton.client")
    return ap


def run_client(env_dir, args: list[str], log) -> int:
    import subprocess
    import tempfile
    from pathlib import Path

    from .server import copy_code, prepare_env

    env = prepare_env(env_dir, log)
    with tempfile.TemporaryDirectory(prefix="ib-triton-code-") as code:
        copy_code(Path(code))
        return subprocess.run([str(env.root / "bin" / "python"), "-m", "ib_edge.triton.client", *args], cwd=code,
                              env={**os.environ, "PYTHONPATH": code}).returncode


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ib_edge.runtime.errors import BundleError, IbEdgeError, InputError

    from .repository import ExportOptions, RepositoryError
    from .server import ServeError, ServeOptions

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.command == "export":
            from .repository import export_repository

            opts = ExportOptions(variant=args.variant, instances=args.instances, max_batch=args.max_batch,
                                 threads=args.threads)
            out = export_repository(args.bundle, args.out, opts, verify=not args.no_verify)
            print(out)
            return 0
        if args.command == "env":
            from .server import prepare_env

            print(prepare_env(args.env, log).root)
            return 0
        if args.command == "client":
            return run_client(args.env, args.args, log)
        from .server import serve

        return serve(args.repo, ServeOptions(http_port=args.http_port, grpc_port=args.grpc_port,
                                             metrics_port=args.metrics_port, env=args.env), log)
    except (BundleError, RepositoryError) as e:
        log(f"ib-triton: error: {e.line()}")
        return EXIT_BUNDLE
    except ServeError as e:
        log(f"ib-triton: error: {e.line()}")
        return EXIT_SERVER
    except (InputError, IbEdgeError) as e:
        log(f"ib-triton: error: {e.line()}")
        return EXIT_INPUT
    except KeyboardInterrupt:
        log("ib-triton: interrupted")
        return 130
    except Exception as e:  # a bug, not bad input: still one line unless debugging
        if os.environ.get("IB_EDGE_DEBUG"):
            raise
        log(f"ib-triton: internal error: {type(e).__name__}: {e} (set IB_EDGE_DEBUG=1 for the traceback)")
        return EXIT_SERVER


if __name__ == "__main__":
    raise SystemExit(main())
