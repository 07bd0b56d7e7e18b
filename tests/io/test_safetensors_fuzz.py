"""Fuzz the safetensors reader: any mutation gives PtqInputError or a correct read."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from ptq.errors import PtqInputError
from ptq.io.safetensors_reader import SafetensorsFile


def _valid_bytes() -> bytes:
    g = torch.Generator().manual_seed(1)
    tensors = {
        "model.embed.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "model.layers.0.w": torch.randn(2, 2, generator=g),
        "model.layers.0.q": torch.randint(0, 255, (5,), generator=g).to(torch.uint8),
        "fp8": torch.randn(3, generator=g).to(torch.float8_e4m3fn),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 2),
    }
    return save(tensors, metadata={"format": "pt"})


VALID = _valid_bytes()
HEADER_LEN = struct.unpack("<Q", VALID[:8])[0]
HEADER = json.loads(VALID[8 : 8 + HEADER_LEN])

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["F32", "BF16", "F8_E4M3", "F4", "BOOL", "U8", "F6_E2M3", "X"]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _with_header(obj: Any, data: bytes) -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["flip", "length", "truncate", "splice", "field", "grow"]))
    buf = bytearray(VALID)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 6))):
            pos = draw(st.integers(0, 8 + HEADER_LEN - 1))
            buf[pos] = draw(st.integers(0, 255))
        return bytes(buf)
    if kind == "length":
        n = draw(st.integers(0, 2**64 - 1) | st.integers(0, len(VALID)))
        return struct.pack("<Q", n) + bytes(buf[8:])
    if kind == "truncate":
        return bytes(buf[: draw(st.integers(0, len(VALID) - 1))])
    if kind == "splice":
        pos = draw(st.integers(8, 8 + HEADER_LEN))
        cut = draw(st.integers(0, 16))
        ins = draw(st.binary(max_size=16))
        return bytes(buf[:pos] + ins + buf[pos + cut :])
    data = VALID[8 + HEADER_LEN :]
    header = json.loads(json.dumps(HEADER))
    name = draw(st.sampled_from(sorted(header)))
    if kind == "grow":
        header[name + "_x"] = draw(json_value)
    elif name == "__metadata__" or draw(st.booleans()):
        header[name] = draw(json_value)
    else:
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][key] = draw(json_value)
    return _with_header(header, data)


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "m.safetensors"


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(blob=mutated_files())
def test_mutation_gives_input_error_or_consistent_read(fuzz_path: Path, blob: bytes) -> None:
    fuzz_path.write_bytes(blob)
    try:
        f = SafetensorsFile(fuzz_path)
        tensors = {name: f.get(name) for name in f}
    except PtqInputError as exc:
        assert str(fuzz_path) in str(exc)
        return
    size = len(blob)
    for name, t in tensors.items():
        entry = f.header.tensors[name]
        assert tuple(t.shape) == f.shape(name)
        assert t.dtype == f.dtype(name)
        assert t.numel() * t.element_size() == entry.nbytes
        assert f.header.data_start + entry.end <= size


def test_unmutated_file_reads(fuzz_path: Path) -> None:
    fuzz_path.write_bytes(VALID)
    f = SafetensorsFile(fuzz_path)
    assert f.get("mask").tolist() == [True, False, True]
    assert f.shape("model.embed.weight") == (4, 3)
