"""Low-memory (block-streaming) runs equal whole-model runs bit for bit, and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ptq.api import CalibrationConfig, quantize
from ptq.errors import PtqUsageError
from ptq.io.safetensors_reader import SafetensorsIndex
from ptq.passes.gptq import GPTQPass

CAL = CalibrationConfig(samples=6, seqlen=32)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = SafetensorsIndex(folder)
    return {k: index.get(k) for k in index}


def _run(model: Path, out: Path, **kw: object) -> None:
    quantize(
        model,
        "w4a16",
        output=out,
        pipeline=[GPTQPass()],
        calibration=CAL,
        progress=False,
        log=lambda *_: None,
        **kw,
    )  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def whole(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("whole") / "o"
    _run(tiny_llama, out)
    return _tensors(out)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_low_memory_equals_whole_model(
    tiny_llama: Path, tmp_path: Path, whole: dict[str, torch.Tensor]
) -> None:
    out = tmp_path / "lazy"
    _run(tiny_llama, out, low_memory=True)
    _assert_same(_tensors(out), whole)
    assert not (
        tmp_path / ".lazy.work"
    ).exists()  # the work folder goes once the output is complete


def test_crash_then_resume_is_bit_identical(
    tiny_llama: Path,
    tmp_path: Path,
    whole: dict[str, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ptq.lowmem as lowmem

    out = tmp_path / "o"
    real = lowmem._save_records

    def crash_after_first_block(work: Path, block: int, records: dict[str, object]) -> None:
        real(work, block, records)
        if block == 0:
            raise KeyboardInterrupt("simulated kill after block 0")

    monkeypatch.setattr(lowmem, "_save_records", crash_after_first_block)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_llama, out, low_memory=True)
    assert not out.exists() and (tmp_path / ".o.work" / "state.json").is_file()
    monkeypatch.setattr(lowmem, "_save_records", real)
    calls: list[int] = []
    monkeypatch.setattr(lowmem, "_save_records", lambda w, b, r: (calls.append(b), real(w, b, r)))
    _run(tiny_llama, out, low_memory=True)
    assert calls == [1]  # only the second block ran again
    _assert_same(_tensors(out), whole)


def test_changed_command_is_refused(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ptq.lowmem as lowmem

    out = tmp_path / "o"
    real = lowmem._save_records

    def crash(work: Path, block: int, records: dict[str, object]) -> None:
        real(work, block, records)
        raise KeyboardInterrupt

    monkeypatch.setattr(lowmem, "_save_records", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_llama, out, low_memory=True)
    monkeypatch.setattr(lowmem, "_save_records", real)
    with pytest.raises(PtqUsageError, match="--restart"):
        quantize(
            tiny_llama,
            "w8a8",
            output=out,
            pipeline=[GPTQPass()],
            calibration=CAL,
            progress=False,
            log=lambda *_: None,
            low_memory=True,
        )
    quantize(
        tiny_llama,
        "w8a8",
        output=out,
        pipeline=[GPTQPass()],
        calibration=CAL,
        progress=False,
        log=lambda *_: None,
        low_memory=True,
        restart=True,
    )
    assert (out / "config.json").is_file()
