"""The ``export`` and ``run`` click commands, and their one-line errors (exit code 2)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from ptq.api import quantize
from ptq.exporters.onnx.cli import export_command, run_command


def test_export_then_run(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    quantize(tiny_llama, "w4a16", output=out, progress=False, log=lambda *_: None)
    runner = CliRunner()
    res = runner.invoke(export_command, [str(out), "--onnx", "--accuracy-level", "0"])
    assert res.exit_code == 0, res.output
    assert (out / "model.onnx").is_file()
    res = runner.invoke(
        run_command, [str(out / "model.onnx"), "--prompt", "the king", "--max-new-tokens", "4"]
    )
    assert res.exit_code == 0, res.output
    assert res.output.strip() != ""


def test_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(export_command, [str(tmp_path / "missing"), "--onnx"])
    assert res.exit_code == 2 and "error:" in res.output and "missing" in res.output
    res = runner.invoke(export_command, [str(tmp_path)])
    assert res.exit_code == 2 and "--onnx" in res.output
    res = runner.invoke(run_command, [str(tmp_path / "x.onnx"), "--prompt", "hi"])
    assert res.exit_code == 2 and "x.onnx" in res.output
