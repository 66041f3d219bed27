"""Bundle writing: atomic replace, no half bundle on failure, model name resolution, CLI errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ib_edge.export import bundle as bundle_mod
from ib_edge.export import checkpoint
from ib_edge.export.onnx_export import ExportValidationError


def test_failed_export_leaves_existing_bundle_intact(bundle_dir, reference_dir, tmp_path, monkeypatch):
    src = bundle_dir("opt")
    out = tmp_path / "b"
    import shutil
    shutil.copytree(src, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def boom(*a, **k):
        raise ExportValidationError("qformer", ["simulated failure"])

    monkeypatch.setattr(bundle_mod.onnx_export, "validate_graph", boom)
    with pytest.raises(ExportValidationError):
        bundle_mod.export_bundle(str(reference_dir("opt")), out, quiet=True)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"], "temporary directory left behind"


def test_failed_export_writes_nothing_new(reference_dir, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_mod.onnx_export, "export_graph", boom)
    with pytest.raises(KeyboardInterrupt):
        bundle_mod.export_bundle(str(reference_dir("opt")), tmp_path / "new", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_reexport_replaces_bundle(bundle_dir, reference_dir, tmp_path):
    out = tmp_path / "b"
    bundle_mod.export_bundle(str(reference_dir("opt")), out, quiet=True)
    first = json.loads((out / "manifest.json").read_text())["created"]
    bundle_mod.export_bundle(str(reference_dir("opt")), out, quiet=True, seed=1)
    assert (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert json.loads((out / "manifest.json").read_text())["created"] >= first


def test_refuses_to_replace_non_bundle(reference_dir, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "keep.txt").write_text("precious")
    with pytest.raises(bundle_mod.ExportError):
        bundle_mod.export_bundle(str(reference_dir("opt")), tmp_path / "docs", quiet=True)
    assert (tmp_path / "docs" / "keep.txt").read_text() == "precious"


def test_resolve_model_refs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline and not cached: refused at once (test_export_cli_checks)
    with pytest.raises(checkpoint.ModelLoadError, match="not in the local hub cache"):
        checkpoint.resolve("Salesforce/instructblip-vicuna-7b")
    with pytest.raises(checkpoint.ModelLoadError):
        checkpoint.resolve("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.ModelLoadError):
        checkpoint.resolve(str(tmp_path / "empty"))


def test_cli_unknown_model_and_offline_hub(tmp_path):
    for ref, needle in [("no-such-model", "unknown model"), ("Salesforce/instructblip-vicuna-7b", "not in the local hub cache")]:
        proc = subprocess.run([sys.executable, "-m", "ib_edge.export.cli", ref, "--out", str(tmp_path / "x")],
                              capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                                "HF_HUB_OFFLINE": "1"})
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ib-export: error:")]
        assert len(errors) == 1 and needle in errors[0], proc.stderr
        assert not (tmp_path / "x").exists()


def test_runtime_does_not_import_export_quant_bench():
    code = ("import sys, ib_edge.runtime, ib_edge.runtime.cli, ib_edge.runtime.llm; "
            "bad = [m for m in sys.modules if m.split('.')[:2] in (['ib_edge','export'],['ib_edge','quant'],['ib_edge','bench'])]; "
            "heavy = [m for m in ('torch', 'transformers', 'tensorrt') if m in sys.modules]; "
            "print(bad, heavy); assert not bad and not heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tensorrt_backend_records_engines_and_refuses_foreign_platform(reference_dir, tmp_path, monkeypatch):
    """ib-export --backend tensorrt against a stand-in TensorRT module (the real one cannot be
    installed here): one engine per graph, profiles from the manifest's dynamic axes, ONNX kept
    for rebuilding, and a runtime on another platform refuses with the rebuild command."""
    from ib_edge.export import tensorrt as trt_build
    from ib_edge.runtime import BundleError, Pipeline

    from .test_tensorrt import fake_tensorrt

    trt = fake_tensorrt(inputs="onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    ident = {"tensorrt": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "l4t": "R36.3.0"}
    monkeypatch.setattr(trt_build, "platform_identity", lambda **kw: dict(ident))
    out = bundle_mod.export_bundle(str(reference_dir("opt")), tmp_path / "trt", precision="int8", backend="tensorrt",
                                   trt={"batch": (1, 1, 2), "text_len": (1, 16, 64), "workspace_mb": 512}, quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    for stage in ("vision", "qformer"):
        art = m["artifacts"][stage]
        # built from the validated INT8-over-FP16 graph; the CPU's fp32 Q/DQ graph stays listed
        built = f"{stage}.trt-int8.onnx"
        assert art["backend"] == "tensorrt" and art["file"] == f"{stage}.engine" and art["onnx"] == built
        assert {f"{stage}.engine", f"{stage}.onnx", built} <= set(art["files"])
        assert art["engine"]["compute_capability"] == "8.7" and art["engine"]["precision"] == "int8"
        assert art["engine"]["workspace_mb"] == 512 and art["engine"]["strongly_typed"]
        graph = art["engine"]["graph"]
        assert (graph["file"], graph["precision"], graph["conversion"]["from"]) == (built, "int8+fp16", f"{stage}.onnx")
        assert graph["drift"]["cosine_mean"] >= 0.995 and graph["drift"]["cosine_min"] >= 0.98
    q = m["artifacts"]["qformer"]["engine"]["profiles"]["qformer_input_ids"]
    assert q == {"min": [1, 1], "opt": [1, 16], "max": [2, 64]}
    v = m["artifacts"]["vision"]["engine"]["profiles"]["pixel_values"]
    assert v["max"] == [2, 3, 96, 96]
    assert m["artifacts"]["qformer"]["engine"]["graph"]["chain_drift"]["cosine_min"] >= 0.98
    assert [c for c in trt.calls if c[0] == "set_flag"] == []  # strongly typed: no precision flags
    assert [c[1].rsplit("/", 1)[-1] for c in trt.calls if c[0] == "parse_from_file"] == [
        "vision.trt-int8.onnx", "qformer.trt-int8.onnx"]
    with pytest.raises(BundleError) as err:  # this machine has no GPU: not the engine's platform
        Pipeline.load(out)
    assert "ib-export" in err.value.line() and "--backend tensorrt" in err.value.line()


def test_external_data_graphs(reference_dir, tmp_path, monkeypatch):
    """Graphs past protobuf's 2 GB limit (real ViT-g is ~4 GB fp32) go to ONNX external data: the
    data file is listed and hashed in the manifest, validated and loaded by the runtime. The
    threshold is lowered so a tiny model takes that path."""
    from PIL import Image

    from ib_edge.export import onnx_export
    from ib_edge.runtime import BundleError, Pipeline

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    out = bundle_mod.export_bundle(str(reference_dir("opt")), tmp_path / "ext", quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    for stage in ("vision", "qformer"):
        files = m["artifacts"][stage]["files"]
        assert len(files) >= 2, files  # the graph and its external data
        graph = m["artifacts"][stage]["file"]
        data_size = sum((out / f).stat().st_size for f in files if f != graph)
        assert (out / graph).stat().st_size < data_size  # the weights live outside the graph
    pipe = Pipeline.load(out)
    emb = pipe.image_embeds(pipe.pixel_values([Image.new("RGB", (50, 50), (1, 2, 3))]))
    assert emb.shape[0] == 1
    data = next(f for f in m["artifacts"]["vision"]["files"] if f != "vision.onnx")
    blob = bytearray((out / data).read_bytes())
    blob[len(blob) // 3] ^= 0xFF
    (out / data).write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="sha256"):
        Pipeline.load(out)
