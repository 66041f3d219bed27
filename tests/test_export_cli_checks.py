"""ib-export checks model names and paths before importing torch/transformers (issue 15 item 9).
No network: hub ids are checked against a hand-made hub cache, offline."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ib_edge.export import checkpoint

PROBE = ("import sys\n"
         "from ib_edge.export import cli\n"
         "rc = cli.main([{ref!r}, '--out', {out!r}])\n"
         "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
         "print('HEAVY', heavy, 'RC', rc)\n")


@pytest.mark.parametrize("ref, needle", [
    ("proof-lama", "unknown model 'proof-lama' (did you mean proof-llama?)"),
    ("./no_such_dir", "directory not found: ./no_such_dir"),
    ("Salesforce/instructblip-vicuna-7b", "not in the local hub cache and the hub is off (HF_HUB_OFFLINE)"),
])
def test_bad_model_fails_before_torch(tmp_path, ref, needle):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(ref=ref, out=str(tmp_path / "x"))], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert "HEAVY [] RC 2" in proc.stdout, (proc.stdout, proc.stderr)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ib-export: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def _fake_hub_cache(root, repo_id):
    """The layout huggingface_hub reads: models--ORG--NAME/{refs/main, snapshots/REV/config.json}."""
    d = root / ("models--" + repo_id.replace("/", "--"))
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text("abc123")
    (d / "snapshots" / "abc123").mkdir(parents=True)
    (d / "snapshots" / "abc123" / "config.json").write_text("{}")


def test_hub_id_in_cache_resolves_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "org/cached-model")
    assert checkpoint.resolve("org/cached-model") == ("org/cached-model", "hub")
    with pytest.raises(checkpoint.ModelLoadError, match="not in the local hub cache"):
        checkpoint.resolve("org/other-model")


def test_paths(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(checkpoint.ModelLoadError, match="is a file"):
        checkpoint.resolve(str(f))
    with pytest.raises(checkpoint.ModelLoadError, match="directory not found"):
        checkpoint.resolve(str(tmp_path / "missing"))
    with pytest.raises(checkpoint.ModelLoadError, match="unknown model 'nonsense'$"):
        checkpoint.resolve("nonsense")
