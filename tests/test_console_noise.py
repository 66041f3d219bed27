"""Console noise (issue 15 item 7): library output goes to a log in a temporary directory, never
into the working directory, and the Python API prints no import chatter. IB_EDGE_DEBUG=1 keeps it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NOISE = ("Failed to load", "register_constant", "reduce_op", "pip install kernels", "gptq_log")


def test_gptq_export_keeps_the_working_directory_clean_and_stderr_short(reference_dir, tmp_path):
    """ib-export --llm-quant gptq with stderr not a terminal: before, 661 lines / 112 KB of
    gptqmodel progress bars and config dumps, and ./logs/gptq_log_*.log in the working directory."""
    pytest.importorskip("gptqmodel")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "IB_EDGE_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "ib_edge.export.cli", str(reference_dir("llama")), "--llm-quant",
                           "gptq", "--llm-validation", "record", "--out", str(tmp_path / "b")],
                          cwd=cwd, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in cwd.iterdir()) == []
    lines = proc.stderr.replace("\r", "\n").splitlines()
    assert len(lines) <= 40 and len(proc.stderr) <= 6000, proc.stderr[-3000:]
    assert not any(n in proc.stderr for n in NOISE), proc.stderr[-3000:]
    assert (tmp_path / "b" / "manifest.json").is_file()


def test_library_output_goes_to_the_log(tmp_path, capfd, monkeypatch):
    """What gptqmodel writes (file descriptors and its logs directory) lands in the temporary
    directory; on a failure its last lines are shown; IB_EDGE_DEBUG=1 redirects nothing."""
    pytest.importorskip("gptqmodel")
    from gptqmodel.looper import loop_processor

    from ib_edge.quant.llm_quant import library_output

    monkeypatch.delenv("IB_EDGE_DEBUG", raising=False)
    capfd.readouterr()   # gptqmodel's import banners (the export imports it inside library_output)
    with library_output(tmp_path):
        os.write(2, b"bar 1/3\rbar 2/3\r")
        print("config dump", file=sys.stderr)
        print("to stdout")
        log_dir = loop_processor._PROJECT_LOG_DIR
        log_dir.mkdir(parents=True, exist_ok=True)
    assert log_dir == tmp_path / "logs" and loop_processor._PROJECT_LOG_DIR == Path("logs")
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""
    assert "config dump" in (tmp_path / "gptqmodel.log").read_text() and "to stdout" in (tmp_path / "gptqmodel.log").read_text()
    with pytest.raises(RuntimeError):
        with library_output(tmp_path):
            print("the reason it failed", file=sys.stderr)
            raise RuntimeError("boom")
    assert "the reason it failed" in capfd.readouterr().err
    monkeypatch.setenv("IB_EDGE_DEBUG", "1")
    with library_output(tmp_path / "d"):
        print("shown", file=sys.stderr)
    assert "shown" in capfd.readouterr().err


def test_python_api_prints_no_import_chatter(bundle_dir, tmp_path):
    """Pipeline on a transformers-LLM bundle (torch, transformers and torchao imported): no
    torchao "Failed to load", pytree or reduce_op lines on stderr."""
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    code = ("from ib_edge.runtime import Pipeline\n"
            f"print(Pipeline.load({str(bundle_dir('llama'))!r}).generate({str(img)!r}, 'What is it?', max_new_tokens=3))\n")
    env = {k: v for k, v in os.environ.items() if k != "IB_EDGE_DEBUG"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(n in proc.stderr for n in NOISE), proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
