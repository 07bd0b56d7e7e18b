import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from ptq.calibration.text import calibration_batches, read_text_file
from ptq.errors import PtqInputError


@pytest.fixture(scope="module")
def tok(tiny_llama: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_batches_are_deterministic_and_shaped(tok, text_file: Path) -> None:  # type: ignore[no-untyped-def]
    a = calibration_batches(tok, path=text_file, n_samples=4, seqlen=32, seed=3)
    b = calibration_batches(tok, path=text_file, n_samples=4, seqlen=32, seed=3)
    c = calibration_batches(tok, path=text_file, n_samples=4, seqlen=32, seed=4)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_jsonl_reads_text_fields(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert read_text_file(p) == "hello\n\nworld"
    p.write_text('{"txt": 1}\n')
    with pytest.raises(PtqInputError, match=r"c.jsonl:1.*'text'"):
        read_text_file(p)
    p.write_text("{not json\n")
    with pytest.raises(PtqInputError, match="c.jsonl:1"):
        read_text_file(p)


def test_empty_and_short_text_are_refused(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(PtqInputError, match="empty"):
        calibration_batches(tok, path=empty, n_samples=2, seqlen=16, seed=0)
    short = tmp_path / "s.txt"
    short.write_text("the king")
    with pytest.raises(PtqInputError, match="fewer than --calib-seqlen"):
        calibration_batches(tok, path=short, n_samples=2, seqlen=64, seed=0)
    with pytest.raises(PtqInputError, match="does not exist"):
        calibration_batches(tok, path=tmp_path / "nope.txt", n_samples=2, seqlen=16, seed=0)
