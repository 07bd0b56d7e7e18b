"""``ptq eval`` with --dtype, --layercast, --lmul, --batch-size and --reproducibility."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

Run = Callable[..., object]
FEW = ("--eval-tokens", "200", "--seqlen", "25", "-q")


def _ok(r: object) -> str:
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    return r.output  # type: ignore[attr-defined,no-any-return]


def _ppl(line: str) -> float:
    return float(line.split()[1])


def test_dtypes_and_layercast(run_cli: Run, tiny_llama: Path, text_file: Path) -> None:
    base = ("eval", str(tiny_llama), "--text", str(text_file), *FEW)
    fp32 = _ppl(_ok(run_cli(*base)))
    bf16 = _ok(run_cli(*base, "--dtype", "bf16"))
    assert "bf16" in bf16 and _ppl(bf16) != fp32
    lc = _ok(run_cli(*base, "--dtype", "bf16", "--layercast"))
    assert "LayerCast" in lc
    assert abs(_ppl(lc) - fp32) / fp32 < 0.01
    batched = _ok(run_cli(*base, "--batch-size", "3"))
    assert abs(_ppl(batched) - fp32) / fp32 < 1e-5


def test_lmul_on_a_quantized_output(
    run_cli: Run, tiny_llama: Path, text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "w4a16"
    _ok(run_cli("quantize", str(tiny_llama), "--w4a16", "-o", str(out), "-q"))
    r = _ok(run_cli("eval", str(out), "--text", str(text_file), "--dtype", "fp16", "--lmul", *FEW))
    exact, approx, ratio = r.strip().splitlines()
    assert "exact multiplication" in exact and "L-Mul" in approx
    assert _ppl(exact) != _ppl(approx)
    assert ratio.startswith("L-Mul / exact: x")


def test_reproducibility_table(run_cli: Run, tiny_llama: Path, text_file: Path) -> None:
    r = _ok(run_cli("eval", str(tiny_llama), "--text", str(text_file), "--reproducibility", *FEW))
    lines = r.splitlines()
    assert lines[0].startswith("8 windows of 25 tokens")
    assert any(ln.startswith("note: only 8 windows") for ln in lines)
    rows = [ln for ln in lines if ln.startswith("| ")][1:]
    assert [tuple(c.strip() for c in ln.split("|")[1:3]) for ln in rows] == [
        ("fp32", "no"),
        ("bf16", "no"),
        ("bf16", "yes"),
        ("fp16", "no"),
        ("fp16", "yes"),
    ]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--lmul",), "--lmul needs --dtype bf16 or fp16 (got fp32)"),
        (("--lmul", "--dtype", "fp32"), "--lmul needs --dtype bf16 or fp16"),
        (("--lmul", "--dtype", "bf16", "--layercast"), "--lmul and --layercast do not combine"),
        (("--reproducibility", "--dtype", "bf16"), "--reproducibility runs every dtype"),
        (("--batch-size", "0"), "--batch-size must be at least 1"),
    ],
)
def test_bad_options_fail_with_one_error_line(
    run_cli: Run, tiny_llama: Path, args: tuple[str, ...], needle: str
) -> None:
    r = run_cli("eval", str(tiny_llama), *args)
    assert r.exit_code == 2, r.output  # type: ignore[attr-defined]
    assert "Traceback" not in r.output  # type: ignore[attr-defined]
    assert f"error: {needle}" in r.output  # type: ignore[attr-defined]


def test_unknown_dtype_is_refused(run_cli: Run, tiny_llama: Path) -> None:
    r = run_cli("eval", str(tiny_llama), "--dtype", "fp8")
    assert r.exit_code == 2 and "fp8" in r.output  # type: ignore[attr-defined]
