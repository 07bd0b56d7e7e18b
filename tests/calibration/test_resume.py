"""Every pipeline resumes: an interrupted run continues to byte-identical output."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptq.api import CalibrationConfig, quantize
from ptq.calibration.checkpoint import Checkpointer
from ptq.compose import build_passes
from ptq.errors import PtqUsageError
from ptq.scheme import get_scheme

CAL = CalibrationConfig(samples=6, seqlen=32)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _passes() -> list:  # type: ignore[type-arg]
    """SmoothQuant (alpha searched) + GPTQ + LoRC: the pipeline the issue names."""
    return build_passes(get_scheme("w4a8"), method="gptq", smoothquant="search", lorc=4)


def _run(model: Path, out: Path, **kw: object) -> None:
    quantize(
        model,
        "w4a8",
        output=out,
        pipeline=_passes(),
        calibration=CAL,
        progress=False,
        log=lambda *_: None,
        checkpoint_interval_s=0.0,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def reference(deep_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("ref") / "o"
    _run(deep_llama, out)
    return _digests(out)


def test_interrupted_run_resumes_to_identical_bytes(
    deep_llama: Path, tmp_path: Path, reference: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o"
    real = Checkpointer.save
    saved: list[int] = []

    def crash_after_two(self: Checkpointer, state: dict, streams: dict) -> None:  # type: ignore[type-arg]
        real(self, state, streams)
        saved.append(int(state["next_block"]))
        if len(saved) == 2:
            raise KeyboardInterrupt("simulated kill after block 1")

    monkeypatch.setattr(Checkpointer, "save", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        _run(deep_llama, out)
    assert not out.exists() and (tmp_path / ".o.work" / "state.json").is_file()
    monkeypatch.setattr(Checkpointer, "save", real)
    ran: list[int] = []
    import ptq.calibration.runner as runner

    real_block = runner.UnitRunner._block
    monkeypatch.setattr(
        runner.UnitRunner, "_block", lambda self, i, b: (ran.append(i), real_block(self, i, b))
    )
    _run(deep_llama, out)
    assert ran == [2, 3]  # only the blocks after the checkpoint ran again
    assert _digests(out) == reference
    assert not (tmp_path / ".o.work").exists()


def test_changed_command_is_refused_then_restarted(
    deep_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o"
    real = Checkpointer.save

    def crash(self: Checkpointer, state: dict, streams: dict) -> None:  # type: ignore[type-arg]
        real(self, state, streams)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(deep_llama, out)
    monkeypatch.setattr(Checkpointer, "save", real)
    kw = {"calibration": CAL, "progress": False, "log": lambda *_: None}
    with pytest.raises(PtqUsageError, match="--restart"):
        quantize(deep_llama, "w8a16", output=out, **kw)  # type: ignore[arg-type]
    quantize(deep_llama, "w8a16", output=out, restart=True, **kw)  # type: ignore[arg-type]
    assert (out / "model.safetensors").is_file()


def _kill_9_at_block_2(cmd: list[str], work: Path) -> None:
    """Start ``cmd`` and ``kill -9`` it once its checkpoint says block 2 is next."""
    state = work / "state.json"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and '"next_block": 2' in state.read_text():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    if proc.returncode == 0:
        pytest.fail("the run finished before it could be killed; the test model is too small")
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_then_rerun_is_byte_identical(
    deep_llama: Path, tmp_path: Path, reference: dict[str, str]
) -> None:
    """A real ``kill -9`` of ``ptq quantize`` while it works on block 2, then the same
    command again: the output equals an uninterrupted run's, file for file."""
    out = tmp_path / "o"
    cmd = [
        sys.executable, "-m", "ptq.cli", "quantize", str(deep_llama), "--w4a8",
        "--method", "gptq", "--smoothquant", "--lorc", "4", "--target", "ptq",
        "--calib-samples", "6", "--calib-seqlen", "32", "--checkpoint-interval", "0",
        "-o", str(out), "-q",
    ]  # fmt: skip
    _kill_9_at_block_2(cmd, tmp_path / ".o.work")
    assert not out.exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert _digests(out) == reference


def test_kill_9_awq_gptq_then_rerun_is_byte_identical(deep_llama: Path, tmp_path: Path) -> None:
    """The same for ``--method awq+gptq`` (AWQ's row samples are seeded per block), against
    an uninterrupted run of the same command; the plan still records what ran."""
    import json

    def cmd(out: Path) -> list[str]:
        return [
            sys.executable, "-m", "ptq.cli", "quantize", str(deep_llama), "--w4a16",
            "--method", "awq+gptq", "--calib-samples", "6", "--calib-seqlen", "32",
            "--checkpoint-interval", "0", "-o", str(out), "-q",
        ]  # fmt: skip

    ref = subprocess.run(cmd(tmp_path / "ref"), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    _kill_9_at_block_2(cmd(tmp_path / "o"), tmp_path / ".o.work")
    assert not (tmp_path / "o").exists()
    done = subprocess.run(cmd(tmp_path / "o"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert _digests(tmp_path / "o") == _digests(tmp_path / "ref")
    plan = json.loads((tmp_path / "o" / "ptq_plan.json").read_text())
    assert {lp["method"] for lp in plan["layers"].values()} == {"awq+gptq"}


def test_offloaded_activations_give_the_same_bytes(
    deep_llama: Path, tmp_path: Path, reference: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--offload-dir``: the streams (and the inputs stages resume from) live in files
    there, removed at the end; the output does not change."""
    from ptq.calibration.streams import Spill

    out, spill = tmp_path / "o", tmp_path / "spill"
    written: set[str] = set()
    real = Spill.put

    def put(self: Spill, key: str, t: object) -> None:
        assert self.folder is not None and self.folder.is_relative_to(spill)
        written.add(self.prefix + key.split("-")[0])
        real(self, key, t)  # type: ignore[arg-type]

    monkeypatch.setattr(Spill, "put", put)
    _run(deep_llama, out, offload_dir=spill)
    assert _digests(out) == reference
    assert {"calib", "fp", "resume-a-00000"} <= written
    assert list(spill.iterdir()) == []
