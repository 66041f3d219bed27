"""ib-serve: a long-lived OpenAI-compatible server over a deploy bundle.

    ib-serve [--bundle DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--model-name NAME]
             [--max-queue N] [--max-batch N] [--cache-mb MB] [--allow-files DIR] [--max-body-mb MB]
             [--max-tokens N] [--threads N] [--providers tensorrt,cuda,cpu] [--llm-engine ort|torch]

POST /v1/chat/completions (OpenAI's chat completions, one image per request, streaming or not),
GET /v1/models, GET /health. The port answers at once; /health says 503 until the bundle is
loaded and warmed. Bad options or a bad bundle: one line on stderr, exit 2 or 3.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from ib_edge.runtime.cli import EXIT_BUNDLE, EXIT_CODES, EXIT_INPUT, _quiet_libraries
from ib_edge.runtime.errors import cli_failure

from .options import ServeOptions

D = ServeOptions()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ib-serve", description="Serve an ib-edge bundle over OpenAI's chat API.")
    ap.add_argument("--bundle", help="bundle directory (default: where ib-export writes without --out)")
    ap.add_argument("--host", default=D.host, help=f"address to bind (default {D.host}: this machine only)")
    ap.add_argument("--port", type=int, default=D.port, help=f"port (default {D.port}; 0: any free port)")
    ap.add_argument("--api-key", default=os.environ.get("IB_SERVE_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1 (default: $IB_SERVE_API_KEY, else none)")
    ap.add_argument("--model-name", default=None, help="the model id clients send (default: the bundle's source model)")
    ap.add_argument("--max-queue", type=int, default=D.max_queue,
                    help=f"requests in flight, waiting or generating, before 429 (default {D.max_queue})")
    ap.add_argument("--max-batch", type=int, default=D.max_batch,
                    help=f"images per vision/Q-Former call for requests waiting together (default {D.max_batch})")
    ap.add_argument("--cache-mb", type=float, default=D.cache_mb,
                    help=f"image-embedding cache size in MiB, 0 = off (default {D.cache_mb:g})")
    ap.add_argument("--allow-files", metavar="DIR", default=None,
                    help="serve file:// image URLs from below DIR (default: file:// refused)")
    ap.add_argument("--max-body-mb", type=float, default=D.max_body_mb,
                    help=f"request body limit in MiB, 413 beyond (default {D.max_body_mb:g})")
    ap.add_argument("--max-tokens", type=int, default=D.max_tokens,
                    help=f"max_tokens when a request gives none (default {D.max_tokens})")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime and torch")
    ap.add_argument("--providers", default=None, help="ONNX Runtime providers, as ib-run: tensorrt,cuda,cpu")
    ap.add_argument("--llm-engine", default=None, metavar="ort|torch", help="as ib-run --llm-engine")
    ap.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                    help="server log level (info: one access line per request)")
    return ap


def options_from_args(args) -> ServeOptions:
    from ib_edge.runtime.errors import InputError

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be between 0 and 65535, got {args.port}")
    for flag, v in (("--max-queue", args.max_queue), ("--max-batch", args.max_batch), ("--max-tokens", args.max_tokens)):
        if v < 1:
            raise InputError(f"{flag} must be at least 1, got {v}")
    if args.max_tokens > 4096:
        raise InputError("--max-tokens must be at most 4096")
    if args.cache_mb < 0:
        raise InputError("--cache-mb must be >= 0")
    if args.max_body_mb <= 0:
        raise InputError("--max-body-mb must be > 0")
    if args.llm_engine is not None and args.llm_engine not in ("ort", "torch"):
        raise InputError(f"--llm-engine must be ort or torch, not {args.llm_engine!r}")
    if args.allow_files is not None and not os.path.isdir(args.allow_files):
        raise InputError(f"--allow-files {args.allow_files}: not a directory")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("--api-key is empty")
    return ServeOptions(bundle=args.bundle, host=args.host, port=args.port, api_key=args.api_key,
                        model_name=args.model_name, max_queue=args.max_queue, max_batch=args.max_batch,
                        cache_mb=args.cache_mb, allow_files=args.allow_files, max_body_mb=args.max_body_mb,
                        max_tokens=args.max_tokens, threads=args.threads,
                        providers=tuple(p.strip() for p in args.providers.split(",")) if args.providers else None,
                        llm_engine=args.llm_engine, verify=not args.no_verify)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a taken port is one clear line (and port 0 works)."""
    from ib_edge.runtime.errors import InputError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}",
                         hint="pick another --port, or stop what holds it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    # Before torch loads: OpenMP threads that spin after each parallel region take the cores the
    # next stage needs (the server alternates ONNX Runtime and torch on the same cores). Measured
    # on proof-llama, 2 shared cores: 1 client 0.88 -> 6.55 requests/s, p50 1192 -> 114 ms.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from ib_edge.runtime.errors import BundleError, IbEdgeError
    from ib_edge.runtime.manifest import Manifest
    from ib_edge.runtime.pipeline import default_bundle_dir

    try:
        opts = options_from_args(args)
        try:
            import fastapi  # noqa: F401
            import uvicorn
        except ImportError as e:
            raise IbEdgeError(f"ib-serve needs the serve extra ({e.name} is missing)",
                              hint="pip install 'ib-edge[serve]'") from None
        Manifest.load(opts.bundle if opts.bundle is not None else default_bundle_dir())  # a missing bundle fails now
        sock = bind(opts.host, opts.port)
    except IbEdgeError as e:
        return cli_failure("ib-serve", e, codes=EXIT_CODES)
    from .app import create_app

    fatal: list[BaseException] = []
    server = None

    def on_fatal(e: BaseException) -> None:
        fatal.append(e)
        if server is not None:
            server.should_exit = True

    def on_ready(state) -> None:
        # library chatter at load time stays hidden (_quiet_libraries); from here on the
        # server's log (uvicorn's access lines, our errors) is shown
        if not os.environ.get("IB_EDGE_DEBUG"):
            logging.disable(logging.NOTSET)
            for name in ("torch", "torchao", "transformers"):
                logging.getLogger(name).setLevel(logging.ERROR)
        print(f"ib-serve: ready: {state.model_name} on http://{host}:{port}/v1 (loaded and warmed in "
              f"{state.load_s:.1f} s)", file=sys.stderr, flush=True)

    host, port = sock.getsockname()[:2]
    app = create_app(opts, on_fatal=on_fatal, on_ready=on_ready)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    if not opts.is_loopback():
        print(f"ib-serve: warning: listening on {host}, reachable from other machines"
              + ("" if opts.api_key else " and without --api-key"), file=sys.stderr)
    print(f"ib-serve: listening on http://{host}:{port}/v1 (loading the bundle; GET /health says when ready)",
          file=sys.stderr, flush=True)
    server.run(sockets=[sock])  # until SIGINT/SIGTERM (uvicorn shuts down gracefully) or on_fatal
    if fatal:
        e = fatal[0]
        print(f"ib-serve: error: {e.line() if isinstance(e, IbEdgeError) else f'{type(e).__name__}: {e}'}",
              file=sys.stderr)
        return EXIT_BUNDLE if isinstance(e, BundleError) else EXIT_INPUT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
