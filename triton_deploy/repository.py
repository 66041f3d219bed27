"""Bundle -> Triton model repository (``ib-triton export``).

Layout (``python`` variant; ``ngc`` differs only in vision/ and qformer/, see ``MODEL_FILES``):

    REPO/
      ib-triton.json                 what was exported from which bundle (Triton ignores files here)
      vision/config.pbtxt            max_batch_size + dynamic_batching, tensors from the manifest
      vision/1/model.onnx            the bundle's graph (ngc: onnxruntime_onnx; engine bundles: model.plan)
      vision/1/model.py, manifest.json       python variant: ONNX Runtime inside the Python backend
      qformer/...                    the same
      llm/config.pbtxt, llm/1/model.py, llm/1/manifest.json, llm/1/llm/...          the LLM runtime
      instructblip/config.pbtxt, instructblip/1/model.py, manifest.json, processor/  BLS: image + prompt -> text

Each version directory's ``manifest.json`` is the bundle's manifest with only that model's
artifacts (file names as copied), so the runtime verifies every file's sha256 there. Written
into a temporary sibling and renamed into place, like bundles.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

from ib_edge.runtime.errors import BundleError, IbEdgeError, InputError
from ib_edge.runtime.manifest import MANIFEST, Manifest, sha256_file

from . import spec
from .spec import ModelSpec, Tensor

REPOSITORY_RECORD = "ib-triton.json"
RECORD_VERSION = 1
ENGINE_FILE = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}
MODEL_PY = '''\
# Written by ib-triton export: the {name} model of ib-edge on Triton's Python backend.
import os
import sys

# `ib-triton serve` passes where the ib-edge package is; in NVIDIA's container it is installed.
if os.environ.get("IB_EDGE_TRITON_PYTHONPATH"):
    sys.path.insert(0, os.environ["IB_EDGE_TRITON_PYTHONPATH"])

from ib_edge.triton.models import {cls} as TritonPythonModel  # noqa: E402,F401
'''
MODEL_CLASSES = {"vision": "VisionModel", "qformer": "QFormerModel", "llm": "LLMModel",
                 "instructblip": "InstructBlipModel"}
# which bundle artifacts each model's version directory carries
MODEL_ARTIFACTS = {"vision": ("vision",), "qformer": ("qformer",), "llm": ("llm",), "instructblip": ("processor",)}


class RepositoryError(IbEdgeError):
    pass


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    variant: str = "ngc"
    instances: int = 1
    max_batch: int = 8
    # CPU threads per Python-backend model instance (ORT intra-op / torch; 0: the libraries' default,
    # all cores each). 1 because four model processes share the cores: on the 2-core test machine
    # (loaded) the python variant answered 11.2 requests/s with 1 thread against 1.07 with the default.
    threads: int = 1

    def check(self) -> "ExportOptions":
        if self.variant not in spec.VARIANTS:
            raise InputError(f"--variant {self.variant!r} is not one of {', '.join(spec.VARIANTS)}")
        if not 1 <= self.instances <= 64:
            raise InputError("--instances must be between 1 and 64")
        if not 1 <= self.max_batch <= 1024:
            raise InputError("--max-batch must be between 1 and 1024")
        if not 0 <= self.threads <= 1024:
            raise InputError("--threads must be between 0 and 1024")
        return self


# --- the model specs ---------------------------------------------------------------------
def graph_spec(manifest: Manifest, stage: str, opts: ExportOptions) -> ModelSpec:
    """vision / qformer: the manifest's tensors, batched by Triton."""
    art = manifest.artifact(stage)
    backend = art.get("backend", "onnxruntime")
    if backend not in ENGINE_FILE:
        raise BundleError(f"artifact '{stage}' has backend {backend!r}; ib-triton exports onnxruntime or tensorrt")
    max_batch = opts.max_batch
    if backend == "tensorrt":  # an engine takes at most its profile's batch
        first = art["inputs"][0]["name"]
        max_batch = min(max_batch, int(art["engine"]["profiles"][first]["max"][0]))
    inputs = tuple(spec.manifest_tensor(t, batched=True) for t in art["inputs"])
    outputs = tuple(spec.manifest_tensor(t, batched=True) for t in art["outputs"])
    common = dict(name=stage, inputs=inputs, outputs=outputs, max_batch_size=max_batch, instances=opts.instances,
                  dynamic_batching=True)
    if opts.variant == "python":
        return ModelSpec(**common, backend="python", parameters=(("threads", str(opts.threads)),))
    platform = "tensorrt_plan" if backend == "tensorrt" else "onnxruntime_onnx"
    return ModelSpec(**common, kind="KIND_GPU", backend=None, platform=platform,
                     default_model_filename=ENGINE_FILE[backend])


def llm_spec(manifest: Manifest, opts: ExportOptions) -> ModelSpec:
    """One generation per request (the runtime generates batch 1): query embeddings + prompt ids."""
    q = manifest.artifact("qformer")["outputs"][0]
    queries, width = q["shape"][1], q["shape"][2]
    inputs = (Tensor("query_embeds", "TYPE_FP32", (1, queries, width)), Tensor("input_ids", "TYPE_INT64", (1, -1)),
              Tensor("attention_mask", "TYPE_INT64", (1, -1))) + spec.generation_inputs()
    return ModelSpec("llm", inputs, (Tensor("token_ids", "TYPE_INT64", (-1,)),), max_batch_size=0,
                     instances=opts.instances, parameters=(("threads", str(opts.threads)), ("llm_engine", "")))


def instructblip_spec(opts: ExportOptions) -> ModelSpec:
    """The entry point: encoded image bytes + prompt (+ generation parameters) -> text.
    Batched so that concurrent requests reach one ``execute``, which sends their stages on together."""
    inputs = (Tensor("image", "TYPE_STRING", (1,)), Tensor("prompt", "TYPE_STRING", (1,))) + spec.generation_inputs()
    return ModelSpec("instructblip", inputs, (Tensor("text", "TYPE_STRING", (1,)),), max_batch_size=opts.max_batch,
                     instances=opts.instances, dynamic_batching=True,
                     parameters=(("vision_model", "vision"), ("qformer_model", "qformer"), ("llm_model", "llm")))


def model_specs(manifest: Manifest, opts: ExportOptions) -> dict[str, ModelSpec]:
    return {"vision": graph_spec(manifest, "vision", opts), "qformer": graph_spec(manifest, "qformer", opts),
            "llm": llm_spec(manifest, opts), "instructblip": instructblip_spec(opts)}


# --- writing -----------------------------------------------------------------------------
def _copy_artifact(manifest: Manifest, name: str, dest: Path, rename_main: str | None) -> dict:
    """Copy one artifact's files into ``dest``; returns its manifest record with the new names."""
    art = json.loads(json.dumps(manifest.artifact(name)))
    files = {}
    for rel, digest in art.get("files", {}).items():
        new = rel
        if rename_main is not None and rel == art.get("file"):
            new = rename_main
        elif rename_main is not None:  # ONNX external data / the kept .onnx of an engine: beside it
            new = Path(rel).name
        (dest / new).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.path(rel), dest / new)
        if sha256_file(dest / new) != digest:
            raise RepositoryError(f"copy of {rel} does not match its sha256", hint="check the disk and retry")
        files[new] = digest
    art["files"] = files
    if rename_main is not None:
        art["file"] = rename_main
    return art


def _write_version_dir(manifest: Manifest, model: str, vdir: Path, variant: str) -> None:
    vdir.mkdir(parents=True)
    arts = {}
    for name in MODEL_ARTIFACTS[model]:
        rename = None
        if name in ("vision", "qformer"):
            rename = ENGINE_FILE[manifest.artifact(name).get("backend", "onnxruntime")]
        arts[name] = _copy_artifact(manifest, name, vdir, rename)
    # the other artifacts' records stay (the manifest schema wants the whole bundle described);
    # this model verifies and reads only its own, whose files are here
    sub = {**manifest.data, "artifacts": {**manifest.data["artifacts"], **arts}}
    (vdir / MANIFEST).write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
    if variant == "python" or model in ("llm", "instructblip"):
        (vdir / "model.py").write_text(MODEL_PY.format(name=model, cls=MODEL_CLASSES[model]), encoding="utf-8")


def export_repository(bundle_dir, out, options: ExportOptions = ExportOptions(), *, verify: bool = True) -> Path:
    """Write the Triton model repository for ``bundle_dir`` at ``out`` (replaced atomically if it
    is an ib-triton repository; anything else there is refused)."""
    opts = options.check()
    manifest = Manifest.load(bundle_dir)
    if verify:
        manifest.verify()
    if opts.variant == "python" and any(manifest.artifact(s).get("backend") == "tensorrt" for s in ("vision", "qformer")):
        raise RepositoryError("a TensorRT-engine bundle runs on Triton's tensorrt_plan backend",
                              hint="export it with --variant ngc, or export an ONNX bundle for --variant python")
    specs = model_specs(manifest, opts)
    out = Path(out).expanduser().resolve()
    if out.exists() and not (out / REPOSITORY_RECORD).is_file():
        raise RepositoryError(f"{out} exists and is not an ib-triton repository; refusing to replace it",
                              hint="choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, m in specs.items():
            (tmp / name).mkdir()
            (tmp / name / "config.pbtxt").write_text(spec.render(m), encoding="utf-8")
            _write_version_dir(manifest, name, tmp / name / "1", opts.variant)
        record = {"version": RECORD_VERSION, "variant": opts.variant, "instances": opts.instances,
                  "max_batch": opts.max_batch, "models": list(specs),
                  "bundle": {"path": str(manifest.root.resolve()), "source": manifest.data.get("source"),
                             "manifest_sha256": hashlib.sha256((manifest.root / MANIFEST).read_bytes()).hexdigest()}}
        (tmp / REPOSITORY_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_record(repo) -> dict:
    path = Path(repo) / REPOSITORY_RECORD
    if not Path(repo).is_dir():
        raise RepositoryError(f"repository not found: {repo}", hint="write one with: ib-triton export BUNDLE --out REPO")
    if not path.is_file():
        raise RepositoryError(f"not an ib-triton repository (no {REPOSITORY_RECORD}): {repo}",
                              hint="write one with: ib-triton export BUNDLE --out REPO")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RepositoryError(f"corrupt {path}: {e}", hint="export the repository again") from None


def _replace(tmp: Path, out: Path) -> None:
    """Swap ``tmp`` into ``out``; an existing repository is moved aside first and removed after."""
    from ib_edge.fsutil import replace_dir

    replace_dir(tmp, out, out.parent / f".{out.name}.old-{os.getpid()}")
