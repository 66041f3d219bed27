"""The one checkpoint reader: transformers' ``config.json`` and safetensors files with ib-edge format
metadata (``formats``), as torch tensors or numpy arrays. No torch import for numpy reads."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .errors import BundleError


def read_config(model_dir: str | Path) -> dict:
    """transformers' ``config.json`` of an LLM directory (a JSON object)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read the LLM's config.json: {e}") from None
    if not isinstance(cfg, dict):
        raise BundleError("the LLM's config.json is not a JSON object", hint="re-export the bundle")
    return cfg


def read_tensors(model_dir: str | Path, fmt: str, version: str, *, required: bool, strip_prefix: str = "",
                 files: list[Path] | None = None, framework: str = "pt") -> tuple[dict, int | None]:
    """(tensors, group size) of the safetensors ``files`` (a bundle passes what its manifest
    lists; None: every ``*.safetensors`` in ``model_dir``, for export-time use on a directory the
    exporter just wrote). A file whose metadata names ``fmt`` must carry ``version`` (its
    ``group_size`` is returned); with ``required`` every file must name ``fmt``, otherwise files
    without it are plain float checkpoints. Unreadable or truncated files are BundleErrors.
    ``framework``: "pt" (torch tensors) or "np" (numpy arrays, no torch import; a bfloat16
    tensor, which numpy cannot hold, is read through torch and widened to float32)."""
    from safetensors import SafetensorError, safe_open

    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors")) if files is None else list(files)
    if not files:
        raise BundleError(f"no safetensors in {d}")
    tensors: dict = {}
    group_size = None
    for f in files:
        try:
            if framework == "pt":
                meta, items = read_pt(f)
            else:
                with safe_open(str(f), framework=framework) as sf:
                    meta = sf.metadata() or {}
                    items = {k: _get(sf, f, k, framework) for k in sf.keys()}
            if required and meta.get("format") != fmt:
                raise BundleError(f"{f.name}: format {meta.get('format')!r}, expected {fmt!r}",
                                  hint="re-export the bundle")
            if meta.get("format") == fmt:
                if meta.get("format_version") != version:
                    raise BundleError(f"{f.name}: {fmt} version {meta.get('format_version')!r}, this runtime "
                                      f"reads {version}", hint="re-export the bundle")
                if meta.get("group_size"):
                    try:
                        group_size = int(meta["group_size"])
                    except ValueError:
                        raise BundleError(f"{f.name}: group_size {meta['group_size']!r} is not an integer",
                                          hint="re-export the bundle") from None
            for k, t in items.items():
                tensors[k.removeprefix(strip_prefix)] = t
        except (SafetensorError, OSError) as e:
            raise BundleError(f"cannot read LLM weights {f.name}: {str(e).splitlines()[0] if str(e) else e}",
                              hint="re-export the bundle") from None
    return tensors, group_size


# safetensors dtype codes -> torch dtype names (getattr on torch, imported only for "pt" reads)
_PT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_MAX_HEADER = 100 * 2**20


def read_pt(path: Path) -> tuple[dict, dict]:
    """(metadata, {name: torch tensor}) of one safetensors file, each tensor read with plain file
    reads into its own fresh (64-byte aligned) CPU tensor. Not through safetensors' mmap: a
    tensor viewing the mapping keeps the whole file mapped, so every page a loader copies from
    stays resident (RssFile) beside its copy, and a 3 GB int8 LLM peaked at twice its size."""
    import torch

    def bad(why: str):
        return BundleError(f"cannot read LLM weights {path.name}: {why}", hint="re-export the bundle")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise bad("file shorter than a safetensors header")
        n = int.from_bytes(raw, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise bad(f"header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise bad("header is not JSON") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise bad("__metadata__ is not a JSON object")
        base, out = 8 + n, {}
        for key, info in header.items():
            try:
                dtype = getattr(torch, _PT_DTYPES[info["dtype"]])
                shape = [int(v) for v in info["shape"]]
                begin, end = (int(v) for v in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise bad(f"tensor {key!r}: bad dtype, shape or data_offsets in the header") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if min(shape, default=0) < 0 or end - begin != nbytes or begin < 0 or base + end > size:
                raise bad(f"tensor {key!r}: data_offsets {begin}..{end} do not hold {info['dtype']} {shape} "
                          f"inside the file")
            t = torch.empty(shape, dtype=dtype)   # checked first: bounded by the file's size
            if nbytes:
                f.seek(base + begin)
                if f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) != nbytes:
                    raise bad(f"tensor {key!r}: file truncated")
            out[key] = t
    return meta, out


def _get(sf, path: Path, key: str, framework: str):
    try:
        return sf.get_tensor(key)
    except TypeError:   # numpy has no bfloat16
        if framework != "np":
            raise
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as pt:
        return pt.get_tensor(key).float().numpy()
