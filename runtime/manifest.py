"""The bundle manifest: the one contract between export and runtime.

The runtime reads only this file to find artifacts, their tensor names, shapes, dtypes,
precision and backend; it never guesses from file names. Every file an artifact consists of
is listed with its sha256, and ``verify`` checks them all before anything runs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REBUILD = "re-export the bundle with: ib-export MODEL --out DIR"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Manifest:
    def __init__(self, root: Path, data: dict):
        self.root, self.data = Path(root), data

    # --- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle_dir: str | Path) -> "Manifest":
        root = Path(bundle_dir)
        path = root / MANIFEST
        if not root.exists():
            raise BundleError(f"bundle not found: {root}", hint="export one with: ib-export MODEL --out DIR")
        if not root.is_dir():
            raise BundleError(f"bundle path is not a directory: {root}")
        if not path.is_file():
            raise BundleError(f"not a bundle (no {MANIFEST}): {root}", hint=REBUILD)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"corrupt manifest {path}: {e}", hint=REBUILD) from None
        if not isinstance(data, dict) or "schema_version" not in data:
            raise BundleError(f"corrupt manifest {path}: no schema_version", hint=REBUILD)
        if data["schema_version"] != SCHEMA_VERSION:
            raise BundleError(
                f"bundle schema {data['schema_version']} is not supported (this runtime reads {SCHEMA_VERSION})",
                hint=REBUILD)
        for key in ("model", "preprocess", "artifacts"):
            if key not in data:
                raise BundleError(f"corrupt manifest {path}: missing '{key}'", hint=REBUILD)
        return cls(root, data)

    # --- accessors -----------------------------------------------------------------------
    @property
    def model(self) -> dict:
        return self.data["model"]

    @property
    def preprocess(self) -> dict:
        return self.data["preprocess"]

    def artifact(self, name: str) -> dict:
        try:
            return self.data["artifacts"][name]
        except KeyError:
            raise BundleError(f"bundle has no '{name}' artifact", hint=REBUILD) from None

    def path(self, relpath: str) -> Path:
        p = (self.root / relpath).resolve()
        if self.root.resolve() not in p.parents and p != self.root.resolve():
            raise BundleError(f"manifest names a file outside the bundle: {relpath}", hint=REBUILD)
        return p

    # --- integrity -----------------------------------------------------------------------
    def verify(self, artifacts: list[str] | None = None) -> None:
        """Check every listed file exists and matches its sha256."""
        for name in artifacts or list(self.data["artifacts"]):
            art = self.artifact(name)
            for rel, digest in art.get("files", {}).items():
                p = self.path(rel)
                if not p.is_file():
                    raise BundleError(f"bundle file missing: {rel} (artifact '{name}')", hint=REBUILD)
                if sha256_file(p) != digest:
                    raise BundleError(f"bundle file corrupt: {rel} does not match its sha256 in the manifest",
                                      hint=REBUILD)
