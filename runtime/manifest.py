"""The bundle manifest: the one contract between export and runtime.

The runtime reads only this file to find artifacts, their tensor names, shapes, dtypes,
precision and backend; it never guesses from file names. Every file an artifact consists of
is listed with its sha256, and ``verify`` checks them all before anything runs.

A bundle is untrusted data (it is copied, downloaded, put on devices): ``load`` validates the
whole manifest against one schema (``_validate``: every field the runtime reads, its type and
range) and refuses a symlinked or oversized manifest; ``check_listed`` refuses files in an
artifact's directory that the manifest does not list (a loader that globbed them would run
weights nobody hashed); ``read_verified`` hashes the very bytes it returns.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path

from .errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REBUILD = "re-export the bundle with: ib-export MODEL --out DIR"
# A real manifest is a few KB (a sharded 13B LLM lists ~10 files): 16 MiB is generous, and a
# bigger one is refused before it is read (a 512 MB manifest was read whole, 1.08 GB RSS).
MAX_MANIFEST_BYTES = 16 << 20

# What the runtime accepts, in one place (defaults for optional fields are in the records below).
GRAPH_STAGES = {"vision": (("pixel_values",), ("image_embeds",)),
                "qformer": (("image_embeds", "qformer_input_ids", "qformer_attention_mask"), ("query_embeds",))}
GRAPH_PRECISIONS = ("fp32", "fp16", "int8")
GRAPH_BACKENDS = ("onnxruntime", "tensorrt")
TENSOR_DTYPES = ("float32", "float16", "int64", "int32")
LLM_FORMATS = ("safetensors", "ib-edge-int4", "ib-edge-weight-only")
LLM_BACKENDS = ("transformers", "fastllm")
LLM_DTYPES = ("float32", "float16", "bfloat16")
MODEL_KINDS = ("image", "video")   # model.kind; bundles written before it are image bundles
MAX_FRAMES = 64
RESAMPLE = (0, 1, 2, 3, 4, 5)   # PIL.Image.Resampling: NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING
MAX_IMAGE_SIDE = 8192
MAX_ID = 2 ** 31 - 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- typed records of what the runtime reads -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str
    shape: tuple            # ints are fixed dims, strings are dynamic axes


@dataclasses.dataclass(frozen=True)
class ArtifactRecord:
    """An artifact as the runtime reads it. ``file``: the graph or engine it runs (graph
    stages); ``dir``: the directory it loads (LLM, processor)."""
    name: str
    files: dict
    file: str | None = None
    dir: str | None = None
    precision: str = "fp32"
    backend: str = "onnxruntime"
    format: str | None = None
    format_version: str | None = None
    dtype: str = "float32"
    inputs: tuple = ()
    outputs: tuple = ()


class _Check:
    """Collects the first schema violation as one line naming the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, problem: str):
        raise BundleError(f"invalid manifest {self.path}: {field}: {problem}", hint=REBUILD)

    def get(self, d: dict, key: str, field: str, kind, *, optional: bool = False, default=None):
        if key not in d:
            if optional:
                return default
            self.fail(f"{field}.{key}" if field else key, "missing")
        v = d[key]
        name = f"{field}.{key}" if field else key
        if v is None and optional:
            return default
        if kind is int:
            if isinstance(v, bool) or not isinstance(v, int):
                self.fail(name, f"must be an integer, got {json.dumps(v)[:40]}")
        elif kind is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                self.fail(name, f"must be a finite number, got {json.dumps(v)[:40]}")
        elif not isinstance(v, kind):
            self.fail(name, f"must be {_kind_name(kind)}, got {type(v).__name__}")
        return v

    def int_in(self, d, key, field, lo, hi, *, optional=False, default=None):
        v = self.get(d, key, field, int, optional=optional, default=default)
        if v is not None and not lo <= v <= hi:
            self.fail(f"{field}.{key}", f"{v} is out of range [{lo}, {hi}]")
        return v

    def choice(self, d, key, field, choices, *, optional=False, default=None):
        v = self.get(d, key, field, str, optional=optional, default=default)
        if v is not None and v not in choices:
            self.fail(f"{field}.{key}", f"{v!r} is not one of {', '.join(map(str, choices))}")
        return v

    def relpath(self, v, field):
        if not isinstance(v, str) or not v:
            self.fail(field, "must be a relative path")
        p = Path(v)
        if p.is_absolute() or ".." in p.parts or "\\" in v or "\0" in v:
            self.fail(field, f"{v!r} is not a path inside the bundle")
        return v


def _kind_name(kind) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true or false"}.get(kind, str(kind))


def _validate(data, path: Path) -> dict[str, ArtifactRecord]:
    """The schema: every field the runtime reads, checked once at load. Returns typed records."""
    c = _Check(path)
    if not isinstance(data, dict):
        c.fail("(top level)", "must be an object")
    version = c.get(data, "schema_version", "", int)
    if version != SCHEMA_VERSION:
        raise BundleError(f"bundle schema {version} is not supported (this runtime reads {SCHEMA_VERSION})",
                          hint=REBUILD)
    m = c.get(data, "model", "", dict)
    c.int_in(m, "num_query_tokens", "model", 1, 4096)
    c.int_in(m, "image_token_id", "model", 0, MAX_ID)
    c.get(m, "is_encoder_decoder", "model", bool)
    c.int_in(m, "qformer_max_text_len", "model", 1, 1 << 20)
    c.int_in(m, "qformer_pad_token_id", "model", 0, MAX_ID, optional=True)
    c.int_in(m, "llm_max_positions", "model", 1, 1 << 24, optional=True)
    c.int_in(m, "llm_hidden_size", "model", 1, 1 << 20, optional=True)
    if c.choice(m, "kind", "model", MODEL_KINDS, optional=True, default="image") == "video":
        c.int_in(m, "frames", "model", 1, MAX_FRAMES)
        if c.int_in(m, "video_token_id", "model", 0, MAX_ID) != m["image_token_id"]:
            c.fail("model.video_token_id", f"{m['video_token_id']} differs from model.image_token_id "
                   f"{m['image_token_id']} (a video bundle's LLM fills the video token's positions)")
    eos = m.get("eos_token_id")
    if eos is not None:
        ids = eos if isinstance(eos, list) else [eos]
        if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= MAX_ID for i in ids):
            c.fail("model.eos_token_id", "must be a token id, a list of them, or null")
    p = c.get(data, "preprocess", "", dict)
    size = c.get(p, "size", "preprocess", list)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= MAX_IMAGE_SIDE
                             for s in size):
        c.fail("preprocess.size", f"must be [height, width] in 1..{MAX_IMAGE_SIDE}, got {json.dumps(size)[:40]}")
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        c.get(p, flag, "preprocess", bool, optional=True)
    if p.get("do_resize", True):
        v = c.int_in(p, "resample", "preprocess", 0, 99)
        if v not in RESAMPLE:
            c.fail("preprocess.resample", f"{v} is not a PIL resampling filter ({', '.join(map(str, RESAMPLE))})")
    if p.get("do_rescale", True):
        if not c.get(p, "rescale_factor", "preprocess", float) > 0:
            c.fail("preprocess.rescale_factor", "must be > 0")
    if p.get("do_normalize", True):
        for key in ("image_mean", "image_std"):
            v = c.get(p, key, "preprocess", list)
            if len(v) != 3 or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)
                                  for x in v):
                c.fail(f"preprocess.{key}", "must be 3 finite numbers")
        if any(x <= 0 for x in p["image_std"]):
            c.fail("preprocess.image_std", "must be > 0")
    tok = c.get(data, "tokenizers", "", dict)
    for key in ("llm", "qformer"):
        c.relpath(c.get(tok, key, "tokenizers", str), f"tokenizers.{key}")
    arts = c.get(data, "artifacts", "", dict)
    records = {}
    for name in ("vision", "qformer", "llm"):
        if name not in arts:
            c.fail(f"artifacts.{name}", "missing")
    for name, a in arts.items():
        field = f"artifacts.{name}"
        if not isinstance(a, dict):
            c.fail(field, "must be an object")
        files = c.get(a, "files", field, dict)
        for rel, digest in files.items():
            c.relpath(rel, f"{field}.files")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                c.fail(f"{field}.files[{rel!r}]", "must be a sha256 hex digest")
        if name in GRAPH_STAGES:
            records[name] = _graph_record(c, name, a, files)
        elif name == "llm":
            d = c.relpath(c.get(a, "dir", field, str), f"{field}.dir")
            fmt = c.choice(a, "format", field, LLM_FORMATS)
            ver = a.get("format_version")
            if ver is not None and not isinstance(ver, (str, int)):
                c.fail(f"{field}.format_version", "must be a string")
            records[name] = ArtifactRecord(
                name, files, dir=d, format=fmt, format_version=None if ver is None else str(ver),
                backend=c.choice(a, "backend", field, LLM_BACKENDS),
                dtype=c.choice(a, "dtype", field, LLM_DTYPES, optional=True, default="float32"),
                precision=c.get(a, "precision", field, str, optional=True, default="float32"))
            if not any(f.startswith(d.rstrip("/") + "/") for f in files):
                c.fail(f"{field}.files", f"lists no file in {d}/")
        else:
            d = a.get("dir")
            records[name] = ArtifactRecord(name, files, dir=None if d is None else c.relpath(d, f"{field}.dir"))
    listed = {f for r in records.values() for f in r.files}
    for key in ("llm", "qformer"):
        if tok[key] not in listed:
            c.fail(f"tokenizers.{key}", f"{tok[key]} is not listed (with its sha256) by any artifact")
    _cross_check(c, data, records)
    return records


def _graph_record(c: _Check, name: str, a: dict, files: dict) -> ArtifactRecord:
    field = f"artifacts.{name}"
    file = c.relpath(c.get(a, "file", field, str), f"{field}.file")
    if file not in files:
        c.fail(f"{field}.file", f"{file} is not listed in {field}.files")
    tensors = {}
    for side, want in zip(("inputs", "outputs"), GRAPH_STAGES[name]):
        lst = c.get(a, side, field, list)
        recs = []
        for i, t in enumerate(lst):
            tf = f"{field}.{side}[{i}]"
            if not isinstance(t, dict):
                c.fail(tf, "must be an object")
            shape = c.get(t, "shape", tf, list)
            if not shape or any(not (isinstance(s, str) and s) and
                                (isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 1 << 24)
                                for s in shape):
                c.fail(f"{tf}.shape", "must list dims (positive integers or axis names)")
            recs.append(TensorRecord(c.get(t, "name", tf, str), c.choice(t, "dtype", tf, TENSOR_DTYPES),
                                     tuple(shape)))
        if tuple(r.name for r in recs) != want:
            c.fail(f"{field}.{side}", f"names {[r.name for r in recs]}, the runtime runs {list(want)}")
        tensors[side] = tuple(recs)
    return ArtifactRecord(name, files, file=file,
                          precision=c.choice(a, "precision", field, GRAPH_PRECISIONS),
                          backend=c.choice(a, "backend", field, GRAPH_BACKENDS, optional=True,
                                           default="onnxruntime"),
                          inputs=tensors["inputs"], outputs=tensors["outputs"])


def _cross_check(c: _Check, data: dict, r: dict[str, ArtifactRecord]) -> None:
    """Facts two fields state twice must agree (fixed dims only; axis names are free)."""
    def same(a, b):
        return not (isinstance(a, int) and isinstance(b, int)) or a == b

    pix, img_out = r["vision"].inputs[0], r["vision"].outputs[0]
    img_in, ids, mask = r["qformer"].inputs
    q = r["qformer"].outputs[0]
    m, p = data["model"], data["preprocess"]
    checks = [
        (len(pix.shape) == 4, "artifacts.vision.inputs[0].shape", "must be [batch, 3, height, width]"),
        (len(pix.shape) != 4 or (same(pix.shape[1], 3) and same(pix.shape[2], p["size"][0])
                                 and same(pix.shape[3], p["size"][1])),
         "artifacts.vision.inputs[0].shape", f"{list(pix.shape)} disagrees with preprocess.size {p['size']}"),
        (len(img_out.shape) == 3, "artifacts.vision.outputs[0].shape", "must be [batch, tokens, width]"),
        (len(img_in.shape) == len(img_out.shape) and all(map(same, img_in.shape[1:], img_out.shape[1:])),
         "artifacts.qformer.inputs[0].shape", f"{list(img_in.shape)} disagrees with the vision output "
                                              f"{list(img_out.shape)}"),
        (len(ids.shape) == 2 and len(mask.shape) == 2, "artifacts.qformer.inputs", "ids and mask must be [batch, text]"),
        (len(q.shape) == 3 and same(q.shape[1], m["num_query_tokens"]), "artifacts.qformer.outputs[0].shape",
         f"{list(q.shape)} disagrees with model.num_query_tokens {m['num_query_tokens']}"),
        (len(q.shape) != 3 or m.get("llm_hidden_size") is None or same(q.shape[2], m["llm_hidden_size"]),
         "artifacts.qformer.outputs[0].shape", f"{list(q.shape)} disagrees with model.llm_hidden_size "
                                               f"{m.get('llm_hidden_size')}"),
    ]
    for ok, field, problem in checks:
        if not ok:
            c.fail(field, problem)


CODE_SUFFIXES = (".py", ".pyc", ".so", ".dll", ".dylib", ".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt",
                 ".joblib")
CODE_KEYS = ("auto_map", "custom_pipelines")


def _code_key(obj, depth: int = 0) -> str | None:
    """The first key naming custom code anywhere in a JSON value (sub-configs nest it)."""
    if depth > 32:
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in CODE_KEYS:
                return k
            found = _code_key(v, depth + 1)
            if found:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = _code_key(v, depth + 1)
            if found:
                return found
    return None


def _fingerprint(p: Path) -> tuple:
    st = p.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Manifest:
    def __init__(self, root: Path, data: dict, records: dict[str, ArtifactRecord] | None = None):
        self.root, self.data = Path(root), data
        self.records = records or {}
        self._verified: dict[str, tuple] = {}   # relpath -> stat fingerprint when its sha256 matched

    # --- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle_dir: str | os.PathLike) -> "Manifest":
        root = Path(bundle_dir)
        path = root / MANIFEST
        if not root.exists():
            raise BundleError(f"bundle not found: {root}", hint="export one with: ib-export MODEL --out DIR")
        if not root.is_dir():
            raise BundleError(f"bundle path is not a directory: {root}")
        if path.is_symlink():
            raise BundleError(f"{path} is a symbolic link; a bundle's manifest must be a plain file in it", hint=REBUILD)
        if not path.is_file():
            raise BundleError(f"not a bundle (no {MANIFEST}): {root}", hint=REBUILD)
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleError(f"manifest {path} is {size / 2**20:.0f} MiB (limit {MAX_MANIFEST_BYTES >> 20} MiB): "
                              "not an ib-edge manifest", hint=REBUILD)
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise BundleError(f"corrupt manifest {path}: {str(e)[:200]}", hint=REBUILD) from None
        except OSError as e:
            raise BundleError(f"cannot read manifest {path}: {e.strerror or e}") from None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise BundleError(f"manifest {path} grew past {MAX_MANIFEST_BYTES >> 20} MiB while read", hint=REBUILD)
        return cls(root, data, _validate(data, path))

    # --- accessors -----------------------------------------------------------------------
    @property
    def model(self) -> dict:
        return self.data["model"]

    @property
    def frames(self) -> int | None:
        """The frame count a video bundle takes; None for an image bundle."""
        return self.model["frames"] if self.model.get("kind", "image") == "video" else None

    @property
    def preprocess(self) -> dict:
        return self.data["preprocess"]

    def artifact(self, name: str) -> dict:
        try:
            return self.data["artifacts"][name]
        except KeyError:
            raise BundleError(f"bundle has no '{name}' artifact", hint=REBUILD) from None

    def record(self, name: str) -> ArtifactRecord:
        """The typed record of a validated artifact."""
        if name not in self.records:
            self.artifact(name)  # the missing-artifact message
            raise BundleError(f"artifact '{name}' was not validated", hint=REBUILD)
        return self.records[name]

    def path(self, relpath: str) -> Path:
        root = self.root.resolve()
        p = (self.root / relpath).resolve()
        if root not in p.parents and p != root:
            raise BundleError(f"manifest names a file outside the bundle: {relpath}", hint=REBUILD)
        return p

    def files(self, name: str, suffix: str = "") -> list[Path]:
        """The files artifact ``name`` lists in its ``dir`` (or all it lists, without a dir) that
        end in ``suffix``, in the manifest's order: what loaders read, never a directory glob."""
        art = self.artifact(name)
        d = art.get("dir")
        prefix = d.rstrip("/") + "/" if isinstance(d, str) else ""
        return [self.path(rel) for rel in art.get("files", {})
                if rel.endswith(suffix) and rel.startswith(prefix) and "/" not in rel[len(prefix):]]

    # --- integrity -----------------------------------------------------------------------
    def verify(self, artifacts: list[str] | None = None) -> None:
        """Check every listed file exists and matches its sha256, and that the artifacts'
        directories hold nothing the manifest does not list."""
        names = artifacts or list(self.data["artifacts"])
        for name in names:
            art = self.artifact(name)
            for rel, digest in art.get("files", {}).items():
                p = self.path(rel)
                if not p.is_file():
                    raise BundleError(f"bundle file missing: {rel} (artifact '{name}')", hint=REBUILD)
                before = _fingerprint(p)
                if sha256_file(p) != digest or _fingerprint(p) != before:
                    raise BundleError(f"bundle file corrupt: {rel} does not match its sha256 in the manifest",
                                      hint=REBUILD)
                self._verified[rel] = before
        self.check_listed(names)

    def reverify(self, name: str) -> None:
        """Just before artifact ``name`` is read (the LLM loads lazily, long after ``verify``):
        re-hash every file of it that was never verified or whose inode, size, mtime or ctime
        changed since (ctime cannot be set back from user space), and re-check its directory."""
        art = self.artifact(name)
        for rel, digest in art.get("files", {}).items():
            p = self.path(rel)
            if not p.is_file():
                raise BundleError(f"bundle file missing: {rel} (artifact '{name}')", hint=REBUILD)
            if self._verified.get(rel) != _fingerprint(p):
                self.verify([name])
                return
        self.check_listed([name])

    def listed(self) -> set[str]:
        """Every file the manifest accounts for (relative paths)."""
        out = {MANIFEST}
        for art in self.data["artifacts"].values():
            out.update(art.get("files", {}))
            recipe = (art.get("quantization") or {}).get("recipe") if isinstance(art.get("quantization"), dict) else None
            if isinstance(recipe, str):
                out.add(recipe)
        return out

    def check_listed(self, artifacts: list[str] | None = None) -> None:
        """Refuse files the manifest does not list inside an artifact's directories (the
        directory of ``dir`` and of every listed file below the bundle root)."""
        listed = self.listed()
        dirs = set()
        for name in artifacts or list(self.data["artifacts"]):
            art = self.artifact(name)
            if isinstance(art.get("dir"), str):
                dirs.add(art["dir"].rstrip("/"))
            for rel in art.get("files", {}):
                parts = Path(rel).parts
                if len(parts) > 1:
                    dirs.add(parts[0])
        root = self.root.resolve()
        for d in sorted(dirs):
            base = self.path(d)
            if not base.is_dir():
                continue
            for p in sorted(base.rglob("*")):
                if p.is_dir() and not p.is_symlink():
                    continue
                rel = p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)
                if rel not in listed:
                    raise BundleError(f"bundle directory {d}/ holds {rel}, which the manifest does not list; "
                                      "refusing to load unverified files", hint=f"remove it, or {REBUILD}")

    def refuse_code(self) -> None:
        """A bundle is data, never code: refuse one that lists code or pickle files, or whose JSON
        configs name custom code (transformers' ``auto_map``/``custom_pipelines``, which its
        trust-remote-code path would import from the bundle). Runs before anything is imported."""
        rels = [rel for art in self.data["artifacts"].values() for rel in art.get("files", {})]
        for rel in rels:
            if Path(rel).suffix.lower() in CODE_SUFFIXES:
                raise BundleError(f"bundle lists {rel}: code or pickle files are never loaded from a bundle",
                                  hint=REBUILD)
        for rel in rels:
            if not rel.endswith(".json") or Path(rel).name == "tokenizer.json":
                continue  # tokenizer.json is read by the tokenizers library, which runs no code
            p = self.path(rel)
            if not p.is_file() or p.stat().st_size > MAX_MANIFEST_BYTES:
                continue  # verify() names a missing file; a huge JSON config is no transformers config
            try:
                cfg = json.loads(p.read_bytes().decode("utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                continue  # not read as a config here; its loader refuses it with its own message
            key = _code_key(cfg)
            if key:
                raise BundleError(f"bundle file {rel} names custom code ({key}); ib-edge never runs code "
                                  "from a bundle", hint=REBUILD)

    def read_verified(self, name: str, rel: str) -> bytes:
        """The bytes of listed file ``rel`` of artifact ``name``, checked against its sha256
        (the bytes returned are the bytes hashed: nothing can change between check and use)."""
        digest = self.artifact(name).get("files", {}).get(rel)
        if digest is None:
            raise BundleError(f"{rel} is not listed by artifact '{name}'", hint=REBUILD)
        try:
            data = self.path(rel).read_bytes()
        except OSError as e:
            raise BundleError(f"cannot read bundle file {rel}: {e.strerror or e}", hint=REBUILD) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise BundleError(f"bundle file corrupt: {rel} does not match its sha256 in the manifest", hint=REBUILD)
        return data
