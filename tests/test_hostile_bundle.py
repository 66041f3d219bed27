"""A bundle is data, never code (issue 12): tampered, malformed and hostile bundles, killed
exports and odd inputs each get one clear line and the right exit code, and nothing from a
bundle runs. Every hostile case is built here from a good bundle; nothing binary is committed."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ib_edge.runtime import BundleError, InputError, Pipeline
from ib_edge.runtime import cli as run_cli

PROMPT = "What color is the circle?"


@pytest.fixture(scope="module")
def fp32(bundle_dir):
    return bundle_dir("llama")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "ok.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(p)
    return p


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rehash(bundle: Path, *rels: str, add_to: str | None = None) -> None:
    """Update the manifest's sha256 of ``rels`` (as an attacker who controls the bundle would);
    ``add_to``: also list them under that artifact."""
    m = json.loads((bundle / "manifest.json").read_text())
    for rel in rels:
        digest = hashlib.sha256((bundle / rel).read_bytes()).hexdigest()
        owners = [a for a in m["artifacts"].values() if rel in a.get("files", {})]
        if add_to:
            owners.append(m["artifacts"][add_to])
        for a in owners:
            a["files"][rel] = digest
    (bundle / "manifest.json").write_text(json.dumps(m))


def _edit_manifest(bundle: Path, fn) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    fn(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def _ib_run(capsys, *args) -> tuple[int, str, str]:
    rc = run_cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ib-run: error:"), lines[0]
    assert "Traceback" not in err and "internal error" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --- 1. code from the bundle never runs ------------------------------------------------------
def test_auto_map_config_is_refused_and_its_code_never_runs(fp32, image, tmp_path):
    b = _copy(fp32, tmp_path / "evil")
    marker = tmp_path / "pwned"
    (b / "llm" / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((b / "llm" / "config.json").read_text())
    cfg.update(model_type="evil-llama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                  "AutoModelForCausalLM": "evil.EvilModel"})
    (b / "llm" / "config.json").write_text(json.dumps(cfg))
    _rehash(b, "llm/config.json")
    _rehash(b, "llm/evil.py", add_to="llm")
    # as the attack was tried: a subprocess whose stdin answers "y" to any trust-remote-code prompt
    proc = subprocess.run([sys.executable, "-m", "ib_edge.runtime.cli", "--bundle", str(b), str(image), PROMPT,
                           "--json"], input="y\ny\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    line = _one_line(proc.stderr)
    assert "evil.py" in line and "code" in line
    assert not marker.exists()


def test_auto_map_alone_is_refused_before_anything_loads(fp32, image, tmp_path, capsys):
    b = _copy(fp32, tmp_path / "evil")
    cfg = json.loads((b / "llm" / "config.json").read_text())
    cfg["text_config"] = {"auto_map": {"AutoModelForCausalLM": "somewhere.Model"}}  # nested counts too
    (b / "llm" / "config.json").write_text(json.dumps(cfg))
    _rehash(b, "llm/config.json")
    rc, out, err = _ib_run(capsys, "--bundle", b, image, PROMPT)
    assert rc == 3 and out == ""
    _one_line(err, "llm/config.json", "auto_map")
    with pytest.raises(BundleError, match="auto_map"):
        Pipeline.load(b, verify=False)  # --no-verify does not skip it


def test_every_from_pretrained_passes_trust_remote_code_false():
    """Source scan: each transformers/gptqmodel loading call in runtime, export, quant and bench
    says trust_remote_code=False (a default can change; the bundle must never decide)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    missing = []
    for pkg in ("runtime", "export", "quant", "bench"):
        for f in (root / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                owner = ast.unparse(node.func.value)
                if node.func.attr not in ("from_pretrained", "load") or owner in ("nn.Embedding",):
                    continue
                if node.func.attr == "load" and owner != "GPTQModel":
                    continue
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("trust_remote_code"), ast.Constant) and kw["trust_remote_code"].value is False):
                    missing.append(f"{f.relative_to(root)}:{node.lineno} {owner}.{node.func.attr}")
    assert not missing, missing


# --- 2. only listed files are loaded --------------------------------------------------------
def test_unlisted_safetensors_in_llm_dir_is_refused(rtn_bundle, image, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    b = _copy(rtn_bundle, tmp_path / "extra")
    rc, out, err = _ib_run(capsys, "--bundle", b, image, PROMPT)
    assert rc == 0 and out.strip(), err
    cfg = json.loads((b / "llm" / "config.json").read_text())
    save_file({"model.norm.weight": torch.zeros(cfg["hidden_size"])}, str(b / "llm" / "zz.safetensors"),
              metadata={"format": "ib-edge-int4", "format_version": "1", "group_size": "32"})
    for flags in ((), ("--no-verify",)):
        rc, out, err = _ib_run(capsys, "--bundle", b, image, PROMPT, *flags)
        assert rc == 3 and out == ""
        _one_line(err, "llm/zz.safetensors", "does not list")


def test_fast_loader_reads_only_the_files_it_is_given(rtn_bundle, tmp_path):
    """engines.load with the manifest's list ignores a stray file; without a list (export-time
    use on a directory the exporter wrote) it would read it."""
    import torch
    from safetensors.torch import save_file

    from ib_edge.runtime import engines

    d = _copy(rtn_bundle / "llm", tmp_path / "llm")
    listed = sorted(d.glob("*.safetensors"))
    hidden = json.loads((d / "config.json").read_text())["hidden_size"]
    save_file({"model.norm.weight": torch.zeros(hidden)}, str(d / "zz.safetensors"))
    good = engines.load(d, "torch", files=listed)
    assert float(good.norm.abs().sum()) > 0
    globbed = engines.load(d, "torch")
    assert float(globbed.norm.abs().sum()) == 0  # what the manifest list protects against


# --- 3. what is read is what was verified --------------------------------------------------
@pytest.mark.parametrize("restore_mtime", [False, True])
def test_llm_changed_after_load_is_refused(rtn_bundle, image, tmp_path, restore_mtime):
    from safetensors.torch import load_file, save_file

    b = _copy(rtn_bundle, tmp_path / "b")
    pipe = Pipeline.load(b)
    f = next((b / "llm").glob("*.safetensors"))
    st = f.stat()
    tensors = load_file(str(f))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 0
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as sf:
        meta = sf.metadata()
    save_file(tensors, str(f), metadata=meta)
    if restore_mtime:  # an attacker can set mtime back, not ctime
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(BundleError, match="sha256"):
        pipe.generate(image, PROMPT)


def test_unchanged_llm_is_not_rehashed_at_first_answer(rtn_bundle, image, monkeypatch):
    from ib_edge.runtime import manifest as mf

    pipe = Pipeline.load(rtn_bundle)
    calls = []
    monkeypatch.setattr(mf, "sha256_file", lambda p, *a: calls.append(p) or "0" * 64)
    pipe.generate(image, PROMPT, max_new_tokens=2)
    assert calls == []


# --- 4. ib-export replaces only its own bundles -------------------------------------------------
def _export(out: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ib_edge.export.cli", "proof-llama", "--out", str(out), "--quiet",
                           *extra], capture_output=True, text=True, timeout=600)


def test_export_refuses_a_directory_that_only_looks_like_a_bundle(tmp_path):
    from ib_edge.export.bundle import ExportError, check_replaceable

    w = tmp_path / "w"
    (w / "src").mkdir(parents=True)
    (w / "manifest.json").write_text("{}")
    (w / "src" / "app.js").write_text("x")
    proc = _export(w)
    assert proc.returncode == 2
    assert "refusing to replace" in proc.stderr and "Traceback" not in proc.stderr
    assert (w / "src" / "app.js").read_text() == "x"
    with pytest.raises(ExportError, match="not a valid ib-edge bundle"):
        check_replaceable(w)


def test_export_refuses_a_bundle_holding_unlisted_files(fp32, tmp_path):
    from ib_edge.export.bundle import ExportError, check_replaceable

    b = _copy(fp32, tmp_path / "b")
    check_replaceable(b)  # a pristine bundle may be replaced
    (b / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="notes.txt"):
        check_replaceable(b)


# --- 5. killed exports leave nothing behind for long ------------------------------------------
def test_sigterm_mid_export_removes_its_temp_dir(tmp_path):
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "ib_edge.export.cli", "proof-llama", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = tmp_path / f".b.tmp-{proc.pid}"
    deadline = time.time() + 300
    while not tmp.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert tmp.exists(), "the export never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert not tmp.exists() and not out.exists()


def test_a_swallowed_sigterm_still_stops_the_export(tmp_path, monkeypatch):
    """Python drops an exception raised in a finalizer (measured: a SIGTERM that landed in a
    regex object's __del__ let the export finish); the handler's cancel() flag stops the export
    at its next step boundary all the same, before anything is renamed into place."""
    from ib_edge.export import options
    from ib_edge.export.bundle import export_bundle

    monkeypatch.setattr(options, "_cancel_reason", ["SIGTERM"])
    out = tmp_path / "b"
    with pytest.raises(options.ExportCancelled, match="SIGTERM"):
        export_bundle(None, out, quiet=True)
    assert not out.exists() and not list(tmp_path.glob(".b.*"))


def test_next_export_removes_stale_temp_dirs_of_dead_processes(tmp_path):
    from ib_edge.export.bundle import remove_stale_temp

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "b"
    stale = [tmp_path / f".b.tmp-{dead.pid}", tmp_path / f".b.old-{dead.pid}"]
    live = tmp_path / f".b.tmp-{os.getppid()}"       # a live process's: kept
    other = tmp_path / f".c.tmp-{dead.pid}"            # another --out's: kept
    for d in (*stale, live, other):
        d.mkdir()
        (d / "blob").write_bytes(b"x" * 1000)
    removed = remove_stale_temp(out)
    assert sorted(removed) == sorted(stale)
    assert not any(d.exists() for d in stale) and live.exists() and other.exists()


# --- 6. malformed manifests: one line naming the field, exit 3 ----------------------------------
def _set(path, value):
    def fn(m):
        *head, last = path
        d = m
        for k in head:
            d = d[k]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
    return fn


MALFORMED = {
    "no tokenizers": (_set(["tokenizers"], KeyError), "tokenizers: missing"),
    "no vision inputs": (_set(["artifacts", "vision", "inputs"], KeyError), "artifacts.vision.inputs: missing"),
    "no num_query_tokens": (_set(["model", "num_query_tokens"], KeyError), "model.num_query_tokens: missing"),
    "artifacts a list": (_set(["artifacts"], []), "artifacts: must be an object"),
    "files a list": (_set(["artifacts", "vision", "files"], ["vision.onnx"]), "artifacts.vision.files: must be an object"),
    "size 0": (_set(["preprocess", "size"], [0, 0]), "preprocess.size"),
    "resample 99": (_set(["preprocess", "resample"], 99), "preprocess.resample"),
    "dtype os": (_set(["artifacts", "llm", "dtype"], "os"), "artifacts.llm.dtype"),
    "image token 1e9 float": (_set(["model", "image_token_id"], 1e9), "model.image_token_id"),
    "image token past vocab": (_set(["model", "image_token_id"], 10 ** 9), "image_token_id 1000000000"),
    "schema as text": (_set(["schema_version"], "1"), "schema_version: must be an integer"),
    "file outside": (_set(["artifacts", "vision", "file"], "../vision.onnx"), "artifacts.vision.file"),
    "names swapped": (lambda m: m["artifacts"]["vision"]["outputs"][0].update(name="x"), "artifacts.vision.outputs"),
    "qformer width": (lambda m: m["artifacts"]["qformer"]["inputs"][0]["shape"].__setitem__(2, 7),
                      "artifacts.qformer.inputs[0].shape"),
    "bad digest": (lambda m: m["artifacts"]["vision"]["files"].update({"vision.onnx": "abc"}), "sha256 hex"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest(fp32, image, tmp_path, capsys, case):
    fn, needle = MALFORMED[case]
    b = _copy(fp32, tmp_path / "b")
    _edit_manifest(b, fn)
    rc, out, err = _ib_run(capsys, "--bundle", b, image, PROMPT)
    assert rc == 3 and out == "", err
    _one_line(err, needle)


def test_malformed_tokenizer_rehashed(fp32, image, tmp_path, capsys):
    b = _copy(fp32, tmp_path / "b")
    (b / "processor" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nope"}}')
    _rehash(b, "processor/tokenizer.json")
    rc, out, err = _ib_run(capsys, "--bundle", b, image, PROMPT)
    assert rc == 3
    _one_line(err, "tokenizer")


@pytest.mark.parametrize("which", ["fp32", "rtn"])
def test_truncated_safetensors_rehashed(fp32, rtn_bundle, image, tmp_path, capsys, which):
    b = _copy(fp32 if which == "fp32" else rtn_bundle, tmp_path / "b")
    f = next((b / "llm").glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _rehash(b, f.relative_to(b).as_posix())
    rc, out, err = _ib_run(capsys, "--bundle", b, image, PROMPT)
    assert rc == 3 and out == ""
    _one_line(err, "LLM")


@pytest.mark.parametrize("which", ["fp32", "rtn"])
def test_llm_config_disagreeing_with_weights(fp32, rtn_bundle, image, tmp_path, capsys, which):
    b = _copy(fp32 if which == "fp32" else rtn_bundle, tmp_path / "b")
    cfg = json.loads((b / "llm" / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (b / "llm" / "config.json").write_text(json.dumps(cfg))
    _rehash(b, "llm/config.json")
    rc, out, err = _ib_run(capsys, "--bundle", b, image, PROMPT)
    assert rc == 3 and out == "", err
    _one_line(err)


# --- 7. graph signatures are checked at load ----------------------------------------------------
def _const_graph(path: Path, in_shape, out_shape, in_name="pixel_values", out_name="image_embeds"):
    import onnx
    from onnx import TensorProto, helper

    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)
    inp = helper.make_tensor_value_info(in_name, TensorProto.FLOAT, in_shape)
    value = helper.make_tensor("v", TensorProto.FLOAT, [int(d) if isinstance(d, int) else 1 for d in out_shape],
                               np.zeros(int(np.prod([d if isinstance(d, int) else 1 for d in out_shape])),
                                        np.float32).tolist())
    node = helper.make_node("Constant", [], [out_name], value=value)
    g = helper.make_graph([node], "g", [inp], [out])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))


@pytest.mark.parametrize("case", ["input size", "output width", "output rank"])
def test_rehashed_graph_of_another_shape(fp32, image, tmp_path, capsys, case):
    b = _copy(fp32, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    ins = list(m["artifacts"]["vision"]["inputs"][0]["shape"])
    outs = list(m["artifacts"]["vision"]["outputs"][0]["shape"])
    if case == "input size":
        ins[2] = ins[3] = 50
    elif case == "output width":
        outs[2] += 1
    else:
        outs = outs[:2]
    _const_graph(b / "vision.onnx", ins, outs)
    _rehash(b, "vision.onnx")
    rc, out, err = _ib_run(capsys, "--bundle", b, image, PROMPT)
    assert rc == 3 and out == ""
    _one_line(err, "vision.onnx", "manifest says")


# --- 8. the manifest file itself ---------------------------------------------------------------
def test_symlinked_manifest_is_refused(fp32, image, tmp_path, capsys):
    b = _copy(fp32, tmp_path / "b")
    real = tmp_path / "elsewhere.json"
    (b / "manifest.json").rename(real)
    (b / "manifest.json").symlink_to(real)
    rc, out, err = _ib_run(capsys, "--bundle", b, image, PROMPT)
    assert rc == 3
    _one_line(err, "symbolic link")


def test_huge_manifest_is_refused_unread(fp32, image, tmp_path, capsys, monkeypatch):
    from ib_edge.runtime import manifest as mf

    b = _copy(fp32, tmp_path / "b")
    with open(b / "manifest.json", "r+b") as f:  # sparse: the size is there, the bytes are not
        f.truncate(mf.MAX_MANIFEST_BYTES + 1)
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("a huge manifest was parsed"))
    rc, out, err = _ib_run(capsys, "--bundle", b, image, PROMPT)
    assert rc == 3
    _one_line(err, "limit")


# --- should-fix: images as transformers sees them ----------------------------------------------
@pytest.fixture(scope="module")
def processor(reference_dir):
    from transformers import InstructBlipProcessor

    return InstructBlipProcessor.from_pretrained(str(reference_dir("llama")))


def _hf(processor, img):
    return np.asarray(processor(images=img, text="hi", return_tensors="np")["pixel_values"])


def test_exif_orientation_matches_transformers_for_path_and_pil(fp32, processor, tmp_path):
    pipe = Pipeline.load(fp32)
    a = np.zeros((60, 90, 3), np.uint8)
    a[:20, :30] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    p = tmp_path / "exif.jpg"
    Image.fromarray(a).save(p, exif=exif, quality=95)
    by_path, by_pil = pipe.pixel_values([p]), pipe.pixel_values([Image.open(p)])
    assert np.abs(by_path - by_pil).max() > 0.5  # the two inputs really differ
    np.testing.assert_allclose(by_path, _hf(processor, str(p)), atol=1e-5)
    np.testing.assert_allclose(by_pil, _hf(processor, Image.open(p)), atol=1e-5)
    np.testing.assert_allclose(pipe.pixel_values([p.read_bytes()]), by_path, atol=0)  # bytes as a file


def test_alpha_matches_transformers_for_path_and_pil(fp32, processor, tmp_path):
    pipe = Pipeline.load(fp32)
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 100
    p = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(p)
    by_path, by_pil = pipe.pixel_values([p]), pipe.pixel_values([Image.open(p)])
    assert np.abs(by_path - by_pil).max() > 0.5
    np.testing.assert_allclose(by_path, _hf(processor, str(p)), atol=1e-5)
    np.testing.assert_allclose(by_pil, _hf(processor, Image.open(p)), atol=1e-5)


def test_api_takes_arrays_and_bytes_and_refuses_the_rest(fp32, image):
    pipe = Pipeline.load(fp32)
    arr = np.asarray(Image.open(image).convert("RGB"))
    want = pipe.generate(image, PROMPT, max_new_tokens=3)
    assert pipe.generate(arr, PROMPT, max_new_tokens=3) == want
    assert pipe.generate(image.read_bytes(), PROMPT, max_new_tokens=3) == want
    for bad in (3, None, ["a.png"], arr.astype(np.float32), np.zeros((4, 4, 5), np.uint8), b"not an image"):
        with pytest.raises(InputError):
            pipe.generate(bad, PROMPT)
    big = Image.new("L", (9000, 8000))  # 72 MP > the 64 MP limit, also for decoded images
    with pytest.raises(InputError, match="too large"):
        pipe.generate(big, PROMPT)


# --- should-fix: exit codes ---------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["<image> What is this?"], "image token"),
    (["hi", "--threads", "-1"], "--threads"),
    (["hi", "--seed", str(10 ** 30)], "--seed"),
    (["hi", "--temperature", "nan"], "--temperature"),
    (["hi\udcff"], "UTF-8"),
])
def test_bad_arguments_are_input_errors(fp32, image, capsys, args, needle):
    rc, out, err = _ib_run(capsys, "--bundle", fp32, image, *args)
    assert rc == 2 and out == ""
    _one_line(err, needle)


def test_closed_stdout_gets_one_line(fp32, image):
    cmd = [sys.executable, "-m", "ib_edge.runtime.cli", "--bundle", str(fp32), str(image), PROMPT]
    proc = subprocess.run(" ".join(map(repr, cmd)) + " >&-", shell=True, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    _one_line(proc.stderr, "standard output")
    r, w = os.pipe()
    os.close(r)  # a reader that went away: EPIPE on the first write
    proc = subprocess.run(cmd, stdout=w, stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(w)
    assert proc.returncode == 2
    _one_line(proc.stderr, "standard output")


# --- should-fix: ib-bench checks its inputs before measuring -------------------------------------
@pytest.mark.parametrize("rows,needle", [
    (['{"image": "a.png", "question": "q", "answer": "a"}', "[1, 2]"], "line 2"),
    (['{"image": "a.png", "question": 5, "answer": "a"}'], "question must be"),
    (['{"image": "a.png", "question": "q"}'], "lacks answer"),
    (['{"image": "a.png", "question": "q", "answer": "a"}', "", "{oops"], "line 3"),
])
def test_bench_refuses_a_bad_eval_file_before_measuring(tmp_path, capsys, monkeypatch, rows, needle):
    from ib_edge.bench import bench, cli as bench_cli

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("measured before checking"))
    f = tmp_path / "eval.jsonl"
    f.write_text("\n".join(rows) + "\n")
    rc = bench_cli.main(["--eval", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err


def test_bench_coerces_numeric_fields(tmp_path):
    from ib_edge.bench import proof_task

    f = tmp_path / "eval.jsonl"
    f.write_text('{"image": "a.png", "question": "q", "answer": 3, "type": 7}\n'
                 '{"image": "a.png", "question": "q", "answer": "x"}\n')
    rows = proof_task.read_eval_set(f)
    assert [(r["answer"], r["type"]) for r in rows] == [("3", "7"), ("x", "untyped")]


def test_bench_refuses_bad_outputs_before_measuring(tmp_path, capsys, monkeypatch):
    from ib_edge.bench import bench, cli as bench_cli

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("measured before checking"))
    existing = tmp_path / "file"
    existing.write_text("x")
    for args, needle in ((["--report", str(existing)], "existing file"), (["--json", str(tmp_path)], "directory"),
                         (["--json", str(existing / "r.json")], "not a directory")):
        assert bench_cli.main(args) == 2
        assert needle in capsys.readouterr().err


def test_bench_saves_the_json_when_rendering_fails(tmp_path, capsys, monkeypatch):
    from ib_edge.bench import cli as bench_cli, report

    monkeypatch.setattr(bench_cli, "run", lambda args, log: {"fake": "result"})
    monkeypatch.setattr(report, "render_markdown", lambda r: 1 / 0)
    out = tmp_path / "r.json"
    assert bench_cli.main(["--json", str(out)]) == 2
    assert "saved in" in capsys.readouterr().err
    assert json.loads(out.read_text())["fake"] == "result"


# --- should-fix: modes ----------------------------------------------------------------------------
def test_bundle_files_follow_the_umask(fp32):
    mask = os.umask(0)
    os.umask(mask)
    for p in fp32.rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, p
