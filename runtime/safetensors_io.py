"""The one checkpoint reader: transformers' ``config.json`` and safetensors files with ib-edge format
metadata (``formats``), as torch tensors or numpy arrays. No torch import for numpy reads."""
from __future__ import annotations

import json
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
            with safe_open(str(f), framework=framework) as sf:
                meta = sf.metadata() or {}
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
                for k in sf.keys():
                    tensors[k.removeprefix(strip_prefix)] = _get(sf, f, k, framework)
        except (SafetensorError, OSError) as e:
            raise BundleError(f"cannot read LLM weights {f.name}: {str(e).splitlines()[0] if str(e) else e}",
                              hint="re-export the bundle") from None
    return tensors, group_size


def _get(sf, path: Path, key: str, framework: str):
    try:
        return sf.get_tensor(key)
    except TypeError:   # numpy has no bfloat16
        if framework != "np":
            raise
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as pt:
        return pt.get_tensor(key).float().numpy()
