"""``runtime.safetensors_io.read_pt``: the runtime's own safetensors reader for torch tensors
(plain file reads into fresh tensors, no mmap kept alive), checked against the safetensors
package on every dtype the bundles use, and on damaged files: one BundleError line each, and
never an allocation the file cannot back."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from ib_edge.runtime.errors import BundleError
from ib_edge.runtime.safetensors_io import read_pt, read_tensors


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "i8": torch.randint(-127, 128, (33, 17), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 256, (5, 3), generator=g, dtype=torch.uint8),
        "i32": torch.randint(-2**31, 2**31 - 1, (4,), generator=g, dtype=torch.int32),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def test_read_pt_equals_safetensors(tensors, tmp_path):
    f = tmp_path / "m.safetensors"
    save_file(tensors, str(f), metadata={"format": "x", "group_size": "128"})
    meta, got = read_pt(f)
    ref = load_file(str(f))
    assert meta == {"format": "x", "group_size": "128"}
    assert set(got) == set(ref) == set(tensors)
    for k, t in ref.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k], t), k
        if got[k].numel():
            assert got[k].data_ptr() % 64 == 0, k      # Int8Linear's kernel needs aligned weights


def test_read_tensors_pt_goes_through_read_pt(tensors, tmp_path):
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "fmt", "format_version": "1"})
    got, group = read_tensors(tmp_path, "fmt", "1", required=True)
    assert group is None and set(got) == set(tensors)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)


def _raw(header: dict, data: bytes = b"", header_len: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if header_len is None else header_len) + h + data


@pytest.mark.parametrize("content, needle", [
    (b"\x01\x02", "shorter than a safetensors header"),
    (_raw({}, header_len=10**12), "header length"),
    (struct.pack("<Q", 5) + b"{nope", "not JSON"),
    (_raw([1, 2]), "not a JSON object"),
    (_raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "inside the file"),
    (_raw({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "inside the file"),
    (_raw({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "inside the file"),
    (_raw({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "bad dtype"),
    (_raw({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "data_offsets"),
    # a header asking for 4 TiB: refused from the file size, nothing allocated
    (_raw({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, b"\0" * 8), "inside the file"),
])
def test_damaged_files_are_one_bundle_error(tmp_path, content, needle):
    f = tmp_path / "m.safetensors"
    f.write_bytes(content)
    with pytest.raises(BundleError) as e:
        read_pt(f)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    assert "m.safetensors" in msg


def test_truncated_real_file(tensors, tmp_path):
    f = tmp_path / "m.safetensors"
    save_file(tensors, str(f))
    f.write_bytes(f.read_bytes()[:-9])
    with pytest.raises(BundleError):
        read_pt(f)
