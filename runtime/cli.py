"""ib-run: answer a question about an image from a deploy bundle.

    ib-run [--bundle DIR] IMAGE PROMPT [PROMPT ...] [--max-new-tokens N] [--num-beams N]
    ib-run --bundle VIDEO_BUNDLE (VIDEO | --frame F1 --frame F2 --frame F3 --frame F4) PROMPT [PROMPT ...]
           [--temperature T] [--top-p P] [--seed S] [--llm-engine ort|torch|cuda] [--device cuda|cpu] [--json]

Tokens stream to stdout as they are generated, one answer per line and prompt; with --json one
JSON object per prompt is printed instead (a line each). Several prompts are answered in turn
from one load, the image's vision-encoder output computed once. Any problem with the image, the
prompt or the bundle gets one line on stderr and a non-zero exit: 2 for bad input, 3 for a bad
bundle.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .errors import BundleError, IbEdgeError, cli_failure

EXIT_INPUT, EXIT_BUNDLE, EXIT_INTERNAL = 2, 3, 4
# BundleError before its base IbEdgeError (InputError and the rest are input problems).
EXIT_CODES = ((BundleError, EXIT_BUNDLE), (IbEdgeError, EXIT_INPUT))
PROOF_NOTE = ("ib-run: note: this bundle holds the embedded proof model, which only knows the synthetic shapes "
              "task (coloured circles, squares and triangles: colour, shape, count, side); for real photos export "
              "a real checkpoint: ib-export Salesforce/instructblip-flan-t5-xl --out DIR (or a local "
              "checkpoint directory), then ib-run --bundle DIR")
ORT_PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ib-run", description="Answer a question about an image from an ib-edge bundle.")
    ap.add_argument("image", nargs="?", help="image file (JPEG, PNG, ...); for a video bundle a video file (animated "
                                             "GIF; mp4/webm with the 'video' extra, PyAV), its frames sampled evenly")
    ap.add_argument("prompt", nargs="+", help="the question or instruction; several are answered in turn, "
                                             "from one load and one vision-encoder pass")
    ap.add_argument("--bundle", help="bundle directory (default: where ib-export writes without --out)")
    ap.add_argument("--frame", action="append", default=None, metavar="IMAGE",
                    help="a video bundle's frame, in order, once per frame (as many as the bundle takes: 4); "
                         "instead of IMAGE")
    ap.add_argument("--max-new-tokens", type=int, default=32,
                    help="stop after this many generated tokens (1-4096; default 32); an end-of-sequence token "
                         "stops earlier")
    ap.add_argument("--num-beams", type=int, default=1,
                    help="beam search with this many beams (1-16; default 1: greedy); the answer then comes at "
                         "the end instead of streaming")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0 samples; 0 is greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0, help="< 1 samples from the nucleus")
    ap.add_argument("--seed", type=int, default=None, help="seed for sampling")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime and torch")
    ap.add_argument("--providers", default=None,
                    help="ONNX Runtime providers in order of preference: tensorrt,cuda,cpu (default cpu); ones "
                         "this ONNX Runtime lacks are skipped with a note, and none available is an error; "
                         "for ONNX bundles, a TensorRT-engine bundle ignores it")
    ap.add_argument("--llm-engine", default=None, metavar="ort|torch|cuda",
                    help="engine of the fast 4-bit/fp32 Llama path: ort (the whole decoder step as one ONNX "
                         "Runtime graph, MatMulNBits), torch (our torch forward, torch's CPU int4 kernel) or cuda "
                         "(the GPU: torch's CUDA int4 kernel, one CUDA graph per step); default: cuda when a GPU "
                         "of compute capability >= 8.0 is present, else ort where it can run the model (int4 "
                         "layers), else torch; refused on bundles whose LLM runs on transformers (T5, OPT, an fp32 "
                         "export)")
    ap.add_argument("--device", default=None, metavar="cuda|cpu",
                    help="where the fast-path LLM runs: cuda (the cuda engine; an error without a usable GPU) or "
                         "cpu (ort/torch); default: cuda when available")
    ap.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    ap.add_argument("--json", action="store_true", help="print one JSON object: answer and timings_ms")
    return ap


def _available_providers(text: str) -> list[str]:
    """--providers in order of preference -> those this ONNX Runtime has, with one note on
    stderr for the ones skipped; an unknown name or none available is an InputError."""
    import onnxruntime as ort

    from .errors import InputError

    names = [p.strip() for p in text.split(",") if p.strip()]
    keys = [n.lower().replace("executionprovider", "") for n in names]
    bad = [n for n, k in zip(names, keys) if k not in ORT_PROVIDERS]
    if bad or not names:
        raise InputError(f"--providers: {', '.join(bad) or repr(text)} is not tensorrt, cuda or cpu")
    have = set(ort.get_available_providers())
    kept = [n for n, k in zip(names, keys) if ORT_PROVIDERS[k] in have]
    skipped = [n for n in names if n not in kept]
    if not kept:
        raise InputError(f"none of --providers {','.join(names)} is in this ONNX Runtime (it has "
                         f"{', '.join(sorted(have))})", hint="install onnxruntime-gpu for cuda/tensorrt, or add cpu")
    if skipped:
        print(f"ib-run: note: this ONNX Runtime lacks {', '.join(skipped)}; using {','.join(kept)}", file=sys.stderr)
    return kept


def _quiet_libraries() -> None:
    """Library chatter (torch/torchao/transformers warnings on import) must not bury the one
    line a user gets; IB_EDGE_DEBUG=1 keeps it."""
    if os.environ.get("IB_EDGE_DEBUG"):
        return
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def check_args(args) -> None:
    """What argparse's types let through: text that is not UTF-8 (argv is decoded with
    surrogate escapes), out-of-range threads and seeds."""
    from .errors import InputError

    for prompt in args.prompt:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError("the prompt is not valid UTF-8 text") from None
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise InputError(f"--threads must be between 1 and 1024, not {args.threads}")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise InputError(f"--seed must be between 0 and 2**63 - 1, not {args.seed}")


def _stdout_closed() -> None:
    """Later writes (and the interpreter's final flush) go nowhere instead of raising again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.frame and args.image is not None:  # with --frame every positional argument is a prompt
        args.prompt, args.image = [args.image, *args.prompt], None
    if sys.stdout is None:  # started with stdout closed (>&-): nowhere to answer
        print("ib-run: error: standard output is closed; nowhere to write the answer", file=sys.stderr)
        return EXIT_INPUT
    _quiet_libraries()
    from .errors import InputError

    try:
        from .pipeline import Pipeline, default_bundle_dir

        check_args(args)
        if args.max_new_tokens < 1 or args.max_new_tokens > 4096:
            raise InputError("--max-new-tokens must be between 1 and 4096")
        if not 1 <= args.num_beams <= 16:
            raise InputError("--num-beams must be between 1 and 16")
        if not 0.0 < args.top_p <= 1.0:
            raise InputError("--top-p must be in (0, 1]")
        if not math.isfinite(args.temperature) or args.temperature < 0:
            raise InputError("--temperature must be a finite number >= 0")
        if args.llm_engine is not None and args.llm_engine not in ("ort", "torch", "cuda"):
            raise InputError(f"--llm-engine must be ort, torch or cuda, not {args.llm_engine!r}")
        if args.device is not None and args.device not in ("cuda", "cpu"):
            raise InputError(f"--device must be cuda or cpu, not {args.device!r}")
        providers = _available_providers(args.providers) if args.providers else None
        # Check the cheap things (image, prompt) before loading the models.
        from .preprocess import load_image

        if args.frame:
            image, video = None, [load_image(f) for f in args.frame]
        elif args.image is None:
            raise InputError("give an IMAGE (or a video bundle's --frame F1 --frame F2 ...) and a PROMPT")
        else:
            from .video import load_frames
            from .manifest import Manifest

            frames = Manifest.load(args.bundle if args.bundle is not None else default_bundle_dir()).frames
            image, video = (load_image(args.image), None) if frames is None else (None, load_frames(args.image, frames))
        pipe = Pipeline.load(args.bundle, providers=providers, threads=args.threads, verify=not args.no_verify,
                             llm_engine=args.llm_engine, device=args.device)
        for prompt in args.prompt:
            pipe.prompts.encode(prompt, args.max_new_tokens)  # every prompt checked before the first answer
        if len(args.prompt) > 1:  # one entry holds this image's image_embeds for the other prompts
            from .embed_cache import EmbedCache

            pipe.embed_cache = EmbedCache(max_mb=256)
        llm_backend = pipe.manifest.artifact("llm").get("backend")
        if args.llm_engine is not None and llm_backend != "fastllm":
            raise InputError(f"--llm-engine {args.llm_engine} applies to the fast Llama path only; this bundle's "
                             f"LLM runs on {llm_backend} ({pipe.manifest.model.get('llm_family', 'its family')}): "
                             "drop the flag, or export with --llm-quant rtn|gptq|awq")

        def stream(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        for prompt in args.prompt:
            result = pipe.run(image, prompt, video=video, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                              on_text=None if args.json else stream)
            if args.json:
                print(json.dumps({"prompt": prompt, "answer": result.answer,
                                  "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()}}), flush=True)
            else:
                sys.stdout.write("\n")
                sys.stdout.flush()
        if (pipe.manifest.data.get("source") or {}).get("kind") == "proof":
            print(PROOF_NOTE, file=sys.stderr)
        return 0
    except BrokenPipeError:
        _stdout_closed()
        print("ib-run: error: standard output was closed before the answer was written", file=sys.stderr)
        return EXIT_INPUT
    except Exception as e:  # ours: one line and its code; a bug: one line unless IB_EDGE_DEBUG=1
        return cli_failure("ib-run", e, codes=EXIT_CODES)
    except KeyboardInterrupt as e:
        return cli_failure("ib-run", e)


if __name__ == "__main__":
    raise SystemExit(main())
