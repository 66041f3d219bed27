"""ib-triton: the bundle as a Triton model repository, run on a real tritonserver.

The repository tests need nothing but the project. The rest needs the models' environment
(numpy < 2, nvidia-pytriton 0.7.0 and its tritonclient), which ``prepare_env`` creates once
under $IB_EDGE_HOME/triton-env (minutes the first time: it pip-installs torch & co; reused
after); the fixture prints how long it took. Triton's own client and ``model_config_pb2`` run
in that environment (``python -m ib_edge.triton.client``): tritonclient[grpc] needs
protobuf < 7 and the project's gptqmodel 7.6 needs >= 7.34, so they cannot share one.
"""
from __future__ import annotations

import inspect
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ib_edge.runtime import InputError, Manifest, Pipeline
from ib_edge.triton import repository, spec
from ib_edge.triton.models import decode_image, make_llm
from ib_edge.triton.repository import ExportOptions, RepositoryError, export_repository


@pytest.fixture(scope="session")
def proof_bundle(tmp_path_factory):
    from ib_edge.export.bundle import export_bundle

    return export_bundle(None, tmp_path_factory.mktemp("triton") / "proof-llama", quiet=True)


@pytest.fixture(scope="session")
def repos(proof_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    return {v: export_repository(proof_bundle, root / v, ExportOptions(variant=v)) for v in spec.VARIANTS}


# --- the repository -----------------------------------------------------------------------
def test_layout_and_per_model_manifests(repos, proof_bundle):
    for variant, repo in repos.items():
        assert json.loads((repo / repository.REPOSITORY_RECORD).read_text())["variant"] == variant
        for model in spec.MODELS:
            vdir = repo / model / "1"
            assert (repo / model / "config.pbtxt").is_file()
            m = Manifest.load(vdir)  # the whole bundle described (the manifest schema), ...
            own = repository.MODEL_ARTIFACTS[model]
            m.verify(list(own))      # ... this model's files copied, each matching the bundle's sha256
            others = [rel for name, a in m.data["artifacts"].items() if name not in own for rel in a["files"]
                      if not any(rel in m.data["artifacts"][o]["files"] for o in own)]
            assert not any((vdir / rel).exists() for rel in others), (variant, model)
            python_model = variant == "python" or model in ("llm", "instructblip")
            assert (vdir / "model.py").is_file() == python_model, (variant, model)
        assert (repo / "vision" / "1" / "model.onnx").read_bytes() == (proof_bundle / "vision.onnx").read_bytes()


def test_engine_bundle_maps_to_tensorrt_plan(proof_bundle):
    data = json.loads((proof_bundle / "manifest.json").read_text())
    art = data["artifacts"]["vision"]
    art.update(backend="tensorrt", file="vision.engine",
               engine={"profiles": {"pixel_values": {"min": [1, 3, 112, 112], "opt": [2, 3, 112, 112],
                                                     "max": [4, 3, 112, 112]}}})
    m = repository.graph_spec(Manifest(proof_bundle, data), "vision", ExportOptions(max_batch=8))
    assert (m.platform, m.default_model_filename, m.max_batch_size, m.kind) == ("tensorrt_plan", "model.plan", 4,
                                                                                 "KIND_GPU")


def test_refuses_to_replace_other_dirs_and_is_atomic(proof_bundle, tmp_path, monkeypatch):
    other = tmp_path / "not-a-repo"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(RepositoryError, match="not an ib-triton repository"):
        export_repository(proof_bundle, other)
    assert (other / "keep.txt").read_text() == "x"
    repo = export_repository(proof_bundle, tmp_path / "repo", ExportOptions(variant="python"))
    before = (repo / "vision" / "config.pbtxt").read_text()
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(*a, **k)

    real = repository._write_version_dir
    monkeypatch.setattr(repository, "_write_version_dir", failing)
    with pytest.raises(OSError, match="simulated"):
        export_repository(proof_bundle, repo, ExportOptions(variant="python", max_batch=2))
    assert (repo / "vision" / "config.pbtxt").read_text() == before  # the old repository is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_generation_defaults_are_ib_runs():
    run = inspect.signature(Pipeline.run).parameters
    for name, value in spec.Generation().as_kwargs().items():
        assert run[name].default == value, name
    from ib_edge.runtime.cli import build_parser

    args = build_parser().parse_args(["img", "prompt"])
    assert spec.Generation(args.max_new_tokens, args.num_beams, args.temperature, args.top_p, args.seed) == \
        spec.Generation()
    for bad in (dict(max_new_tokens=0), dict(num_beams=17), dict(top_p=0.0), dict(temperature=-1.0),
                dict(num_beams=2, temperature=0.7)):
        with pytest.raises(InputError):
            spec.Generation(**bad).check()


def test_make_llm_is_pipelines_choice(proof_bundle):
    manifest = Manifest.load(proof_bundle)
    assert type(make_llm(manifest)) is type(Pipeline.load(proof_bundle).llm)


def test_decode_image_like_load_image(tmp_path):
    from ib_edge.bench.proof_task import make_example, eval_rng
    from ib_edge.runtime.preprocess import load_image

    path = tmp_path / "a.png"
    make_example(eval_rng(3, 0))["image"].save(path)
    assert np.array_equal(np.asarray(decode_image(path.read_bytes())), np.asarray(load_image(path)))
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    assert np.array_equal(np.asarray(decode_image((tmp_path / "t.png").read_bytes())),
                          np.asarray(load_image(tmp_path / "t.png")))
    for data, needle in ((b"", "empty"), (b"not an image", "unrecognised"), (path.read_bytes()[:200], "decode")):
        with pytest.raises(InputError, match=needle):
            decode_image(data)


@pytest.mark.parametrize("argv,code,needle", [
    (["export", "{bundle}", "--out", "{tmp}/r", "--variant", "docker"], 2, "invalid choice"),
    (["export", "{bundle}", "--out", "{tmp}/r", "--instances", "0"], 2, "--instances must be"),
    (["export", "{tmp}/missing", "--out", "{tmp}/r"], 3, "bundle not found"),
    (["serve", "{tmp}"], 3, "not an ib-triton repository"),
    (["serve", "{tmp}", "--http-port", "8000", "--grpc-port", "8000"], 2, "must differ"),
])
def test_cli_errors_are_one_line(argv, code, needle, proof_bundle, tmp_path):
    argv = [a.format(bundle=proof_bundle, tmp=tmp_path) for a in argv]
    p = subprocess.run([sys.executable, "-m", "ib_edge.triton.cli", *argv], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == code, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr
    assert needle in lines[-1] and "error:" in lines[-1], p.stderr
    if not lines[0].startswith("usage:"):  # argparse's own errors come after its usage
        assert len(lines) == 1 and lines[0].startswith("ib-triton: error:"), p.stderr


# --- with the models' environment ----------------------------------------------------------
@pytest.fixture(scope="session")
def triton_env():
    from ib_edge.triton.server import ENV_MARKER, prepare_env

    t0 = time.perf_counter()
    env = prepare_env(log=lambda m: print(m, file=sys.stderr))
    print(f"\n[triton env] {env.root}: ready in {time.perf_counter() - t0:.1f} s "
          f"(created once: {json.loads((env.root / ENV_MARKER).read_text()).get('seconds')} s)", file=sys.stderr)
    if not env.server.is_file():
        pytest.fail(f"no tritonserver in {env.dist}")
    return env


@pytest.fixture(scope="session")
def env_python(triton_env, tmp_path_factory):
    """Run ``python -m ib_edge.triton.client ...`` in the models' environment."""
    from ib_edge.triton.server import copy_code

    code = copy_code(tmp_path_factory.mktemp("code"))

    def run(*args, timeout=300) -> dict:
        p = subprocess.run([str(triton_env.root / "bin" / "python"), "-m", "ib_edge.triton.client", *map(str, args)],
                           capture_output=True, text=True, timeout=timeout, cwd=code,
                           env={**os.environ, "PYTHONPATH": str(code)})
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout)

    return run


def test_configs_parse_with_tritons_schema(repos, proof_bundle, env_python):
    manifest = Manifest.load(proof_bundle)
    for variant, repo in repos.items():
        cfg = env_python("configs", repo)
        for stage in ("vision", "qformer"):
            art, c = manifest.artifact(stage), cfg[stage]
            assert c["max_batch_size"] == 8 and "dynamic_batching" in c
            assert [(i["name"], i["data_type"], [int(d) for d in i["dims"]]) for i in c["input"]] == \
                [(t["name"], spec.TRITON_DTYPES[t["dtype"]], [d if isinstance(d, int) else -1 for d in t["shape"][1:]])
                 for t in art["inputs"]]
            assert [o["name"] for o in c["output"]] == [t["name"] for t in art["outputs"]]
            if variant == "ngc":
                assert c["platform"] == "onnxruntime_onnx" and c["instance_group"][0]["kind"] == "KIND_GPU"
            else:
                assert c["backend"] == "python" and c["instance_group"][0]["kind"] == "KIND_CPU"
                assert c["parameters"]["threads"] == {"string_value": str(ExportOptions().threads)}
        q = manifest.artifact("qformer")["outputs"][0]["shape"]
        assert [int(d) for d in cfg["llm"]["input"][0]["dims"]] == [1, q[1], q[2]]
        assert cfg["llm"].get("max_batch_size", 0) == 0
        ib = cfg["instructblip"]
        assert ib["backend"] == "python" and "dynamic_batching" in ib
        assert [(i["name"], i.get("optional", False)) for i in ib["input"]] == \
            [("image", False), ("prompt", False)] + [(n, True) for n in spec.GENERATION_INPUTS]
        assert ib["output"][0] == {"name": "text", "data_type": "TYPE_STRING", "dims": ["1"]}


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _listen_addresses(port: int) -> set[str]:
    """Local addresses of the LISTEN sockets on ``port`` (from /proc/net/tcp, tcp6)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state != "0A" or int(p, 16) != port:
                continue
            raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))  # host-order words
            ip = ipaddress.ip_address(raw)
            out.add(str(getattr(ip, "ipv4_mapped", None) or ip))
    return out


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_real_server_answers_like_ib_run(repos, proof_bundle, triton_env, env_python, tmp_path):
    """`ib-triton serve` on the python repository; instructblip over HTTP and gRPC: the answers
    are Pipeline's (ib-run's) on 10 proof questions, 8 concurrent requests are all right, a bad
    image is that request's Triton error and the server stays up, SIGTERM stops it all."""
    from ib_edge.bench.proof_task import is_correct, make_eval_examples

    queries = []
    for i, ex in enumerate(make_eval_examples(10, seed=2041)):
        path = tmp_path / f"{i}.png"
        ex["image"].save(path)
        queries.append({"image": str(path), "prompt": ex["question"], "answer": ex["answer"]})
    pipe = Pipeline.load(proof_bundle)
    expected = [pipe.generate(q["image"], q["prompt"]) for q in queries]
    assert all(is_correct(e, q["answer"]) for e, q in zip(expected, queries))  # the yardstick itself
    (tmp_path / "q.json").write_text(json.dumps(queries))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    (tmp_path / "bad.json").write_text(json.dumps([{"image": str(tmp_path / "bad.png"), "prompt": "Describe this image."}]))
    (tmp_path / "eight.json").write_text(json.dumps(queries[:8]))

    http, grpc, metrics = _free_ports(3)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ib_edge.triton.cli", "serve", str(repos["python"]),
                             "--env", str(triton_env.root), "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(metrics)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "ib-triton: ready" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "not ready in 240 s"
            time.sleep(0.5)
        server_pid = int((tmp_path / "serve.log").read_text().split("(pid ")[1].split(")")[0])
        for port in (http, grpc, metrics):
            assert _listen_addresses(port) == {"127.0.0.1"}, port
        url = {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}"}
        for protocol in ("http", "grpc"):
            got = env_python("ask", tmp_path / "q.json", "--url", url[protocol], "--protocol", protocol)
            assert [r.get("text") for r in got["results"]] == expected, (protocol, got)
        got = env_python("ask", tmp_path / "eight.json", "--url", url["http"], "--concurrency", "8")
        assert [r.get("text") for r in got["results"]] == expected[:8]
        bad = env_python("ask", tmp_path / "bad.json", "--url", url["grpc"], "--protocol", "grpc")["results"][0]
        assert "text" not in bad and "not an image" in bad["error"] and "INVALID_ARGUMENT" in bad["status"]
        bad = env_python("ask", tmp_path / "bad.json", "--url", url["http"])["results"][0]
        assert bad["status"] == "400"
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5) as r:
            assert r.status == 200  # still up
        again = env_python("ask", tmp_path / "q.json", "--url", url["http"])["results"][0]
        assert again.get("text") == expected[0]
        assert _group_alive(server_pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert "ib-triton: stopped" in (tmp_path / "serve.log").read_text()
    assert not _group_alive(server_pid)  # tritonserver and its stubs are gone
