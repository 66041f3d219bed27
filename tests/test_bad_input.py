"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from ib_edge.runtime import BundleError, InputError, Pipeline


def _png_header_only(path, width, height):
    """A valid PNG that claims width x height pixels but holds almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ib_edge.runtime.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ib-run: error:"), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def good_image(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "ok.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(p)
    return p


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return bundle_dir("llama")


def test_missing_image(bundle, tmp_path):
    _assert_one_line_error(_run("--bundle", bundle, tmp_path / "nope.jpg", "hi"), "image not found")


def test_text_file_named_jpg(bundle, tmp_path):
    p = tmp_path / "fake.jpg"
    p.write_text("this is not a jpeg\n")
    _assert_one_line_error(_run("--bundle", bundle, p, "hi"), "not an image")


def test_truncated_jpeg(bundle, tmp_path):
    p = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)).save(p, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    _assert_one_line_error(_run("--bundle", bundle, cut, "hi"), "cannot decode image")


def test_decompression_bomb_png(bundle, tmp_path):
    p = tmp_path / "bomb.png"
    _png_header_only(p, 40_000, 40_000)
    assert p.stat().st_size < 1000
    _assert_one_line_error(_run("--bundle", bundle, p, "hi"), "image too large")


def test_empty_prompt(bundle, good_image):
    _assert_one_line_error(_run("--bundle", bundle, good_image, "   "), "prompt is empty")


def test_prompt_longer_than_model_limit(bundle, good_image):
    # The reference Llama has 256 positions; 300 words is past it but under the char cap.
    _assert_one_line_error(_run("--bundle", bundle, good_image, " ".join(["circle"] * 300)), "prompt too long")


def test_huge_prompt(bundle, good_image):
    _assert_one_line_error(_run("--bundle", bundle, good_image, "x" * 100_000), "prompt too long")


def test_missing_bundle(good_image, tmp_path):
    _assert_one_line_error(_run("--bundle", tmp_path / "no-bundle", good_image, "hi"), "bundle not found")


def test_flipped_byte_in_onnx(bundle, good_image, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    onnx_file = broken / "qformer.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx_file.write_bytes(bytes(data))
    proc = _run("--bundle", broken, good_image, "hi")
    _assert_one_line_error(proc, "qformer.onnx", "sha256")
    assert bundle.joinpath("qformer.onnx").read_bytes() != bytes(data)  # the original is untouched


def test_corrupt_manifest(bundle, good_image, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "manifest.json").write_text("{not json")
    _assert_one_line_error(_run("--bundle", broken, good_image, "hi"), "corrupt manifest")


def test_bad_options(bundle, good_image):
    _assert_one_line_error(_run("--bundle", bundle, good_image, "hi", "--max-new-tokens", "0"), "max-new-tokens")
    _assert_one_line_error(_run("--bundle", bundle, good_image, "hi", "--num-beams", "2", "--temperature", "1"),
                           "exclude")


def test_api_raises_typed_errors(bundle, tmp_path):
    pipe = Pipeline.load(bundle)
    with pytest.raises(InputError):
        pipe.generate(tmp_path / "missing.png", "hi")
    with pytest.raises(InputError):
        pipe.generate(Image.new("RGB", (8, 8)), "")
    with pytest.raises(BundleError):
        Pipeline.load(tmp_path / "nothing-here")
