"""Golden round trips and one test per corruption of a safetensors file."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ptq.errors import PtqInputError
from ptq.io.safetensors_reader import SafetensorsFile


def _golden() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g) * 4
    out = {
        name: base.to(dtype)
        for name, dtype in [
            ("f64", torch.float64),
            ("f32", torch.float32),
            ("f16", torch.float16),
            ("bf16", torch.bfloat16),
            ("f8_e4m3", torch.float8_e4m3fn),
            ("f8_e5m2", torch.float8_e5m2),
            ("c64", torch.complex64),
        ]
    }
    ints = torch.randint(-100, 100, (2, 7), generator=g)
    for name, dtype in [("i64", torch.int64), ("i32", torch.int32), ("i16", torch.int16)]:
        out[name] = ints.to(dtype)
    out["i8"] = ints.to(torch.int8)
    out["u8"] = torch.randint(0, 256, (4, 4), generator=g).to(torch.uint8)
    out["u16"] = torch.randint(0, 60000, (5,), generator=g).to(torch.uint16)
    out["bool"] = torch.tensor([[True, False], [False, True]])
    out["e8m0"] = (
        torch.randint(0, 255, (6,), generator=g).to(torch.uint8).view(torch.float8_e8m0fnu)
    )
    out["fp4"] = (
        torch.randint(0, 256, (3, 4), generator=g).to(torch.uint8).view(torch.float4_e2m1fn_x2)
    )
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 3)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor, so NaN-free float8/bf16 compare bit for bit."""
    return t.contiguous().view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


def test_golden_dtypes_read_back_bit_exact(tmp_path: Path) -> None:
    tensors = _golden()
    path = tmp_path / "golden.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    f = SafetensorsFile(path)
    assert sorted(f.keys()) == sorted(tensors)
    assert dict(f.metadata) == {"format": "pt"}
    for name, want in tensors.items():
        got = f.get(name)
        assert got.dtype == want.dtype == f.dtype(name), name
        assert tuple(got.shape) == tuple(want.shape) == f.shape(name), name
        assert torch.equal(_bits(got), _bits(want)), name


def test_missing_tensor_names_file_and_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(2)}, str(path))
    with pytest.raises(PtqInputError, match=r"m\.safetensors.*'nope'"):
        SafetensorsFile(path).get("nope")


def _write(path: Path, header: Any, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _entry(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


GOOD = {"a": _entry(), "b": _entry("U8", (4,), (8, 12))}

CORRUPT: dict[str, tuple[Any, bytes, int | None, str]] = {
    "header_len_beyond_file": (GOOD, bytes(12), 10_000, "header length"),
    "header_len_absurd": (GOOD, bytes(12), 2**63, "header length"),
    "header_len_zero": (GOOD, bytes(12), 0, "header length"),
    "invalid_json": (b'{"a": {', bytes(12), None, "not valid JSON"),
    "invalid_utf8": (b'{"\xff": 1}', b"", None, "UTF-8"),
    "json_array": ([1, 2], b"", None, "not an object"),
    "json_string": ("hello", b"", None, "not an object"),
    "duplicate_key": (b'{"a": 1, "a": 2}', b"", None, "duplicate"),
    "entry_not_object": ({"a": 3}, b"", None, "not a JSON object"),
    "missing_dtype": ({"a": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4), None, "lacks"),
    "unknown_dtype": ({"a": _entry("F128")}, bytes(8), None, "unknown dtype"),
    "dtype_not_str": ({"a": _entry(7)}, bytes(8), None, "unknown dtype"),
    "negative_shape": ({"a": _entry(shape=(-2,))}, bytes(8), None, "shape"),
    "float_shape": ({"a": _entry(shape=(2.0,))}, bytes(8), None, "shape"),
    "bool_shape": ({"a": _entry(shape=(True,), offsets=(0, 4))}, bytes(8), None, "shape"),
    "shape_not_list": ({"a": {**_entry(), "shape": 2}}, bytes(8), None, "shape"),
    "offsets_out_of_range": ({"a": _entry(offsets=(8, 16))}, bytes(8), None, "outside"),
    "offsets_negative": ({"a": _entry(offsets=(-8, 0))}, bytes(8), None, "outside"),
    "offsets_reversed": ({"a": _entry(offsets=(8, 0))}, bytes(8), None, "outside"),
    "offsets_three": ({"a": _entry(offsets=(0, 4, 8))}, bytes(8), None, "two integers"),
    "overlapping": (
        {"a": _entry(), "b": _entry(offsets=(4, 12))},
        bytes(12),
        None,
        "overlap",
    ),
    "wrong_size": ({"a": _entry("F32", (3,), (0, 8))}, bytes(12), None, "needs 12"),
    "odd_fp4": ({"a": _entry("F4", (3,), (0, 2))}, bytes(2), None, "whole bytes"),
    "metadata_not_str": ({"__metadata__": {"k": 1}, **GOOD}, bytes(12), None, "__metadata__"),
    "metadata_not_dict": ({"__metadata__": ["k"], **GOOD}, bytes(12), None, "__metadata__"),
    "deep_json": (b"[" * 100_000 + b"]" * 100_000, b"", None, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corruption_raises_input_error_naming_file(tmp_path: Path, case: str) -> None:
    header, data, length, message = CORRUPT[case]
    path = _write(tmp_path / f"{case}.safetensors", header, data, length)
    with pytest.raises(PtqInputError, match=message) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)
    assert "re-download or re-convert" in str(info.value)


def test_entry_errors_name_the_tensor(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.safetensors", {"blk.0.w": _entry("F32", (3,))}, bytes(8))
    with pytest.raises(PtqInputError, match=r"tensor 'blk\.0\.w'"):
        SafetensorsFile(path)


def test_null_metadata_is_empty(tmp_path: Path) -> None:
    data = bytes(12)
    f = SafetensorsFile(_write(tmp_path / "n.safetensors", {"__metadata__": None, **GOOD}, data))
    assert dict(f.metadata) == {} and f.keys() == ["a", "b"]


def test_good_handmade_file_reads(tmp_path: Path) -> None:
    data = struct.pack("<2f", 1.5, -2.0) + bytes([1, 2, 3, 4])
    f = SafetensorsFile(_write(tmp_path / "ok.safetensors", GOOD, data))
    assert f.get("a").tolist() == [1.5, -2.0]
    assert f.get("b").tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("size", [0, 5, 8 + 30])
def test_truncated_file(tmp_path: Path, size: int) -> None:
    full = tmp_path / "full.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(full))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:size])
    with pytest.raises(PtqInputError, match=r"cut\.safetensors"):
        SafetensorsFile(cut)


def test_truncated_data_buffer(tmp_path: Path) -> None:
    full = tmp_path / "full.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(full))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:-1])
    with pytest.raises(PtqInputError, match=r"cut\.safetensors, tensor 'w'.*outside"):
        SafetensorsFile(cut)


def test_file_shrinking_after_open_is_caught_on_read(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    save_file({"w": torch.ones(16)}, str(path))
    f = SafetensorsFile(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-4])
    with pytest.raises(PtqInputError, match="truncated"):
        f.get("w")


def test_bool_tensor_with_bad_bytes(tmp_path: Path) -> None:
    path = _write(tmp_path / "b.safetensors", {"m": _entry("BOOL", (2,), (0, 2))}, bytes([1, 7]))
    with pytest.raises(PtqInputError, match="BOOL"):
        SafetensorsFile(path).get("m")


def test_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(PtqInputError, match="not a regular file"):
        SafetensorsFile(tmp_path)
    with pytest.raises(PtqInputError, match="cannot open"):
        SafetensorsFile(tmp_path / "absent.safetensors")


def test_f6_has_no_torch_dtype(tmp_path: Path) -> None:
    path = _write(tmp_path / "f6.safetensors", {"x": _entry("F6_E2M3", (4,), (0, 3))}, bytes(3))
    f = SafetensorsFile(path)
    with pytest.raises(PtqInputError, match="no torch dtype"):
        f.get("x")
