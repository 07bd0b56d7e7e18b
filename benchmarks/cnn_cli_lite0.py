"""EfficientNet-Lite0 through ``ptq quantize``: schemes x RTN/GPTQ, measured on the output.

One run. Every row is what a user gets from the command line: ``ptq quantize
efficientnet-lite0 FLAGS --method M --calib-samples N -o OUT`` (the same scheme flags
through :func:`ptq.cli.build_scheme`, the same passes through :func:`ptq.compose.build_passes`,
the same writer), then ``ptq eval OUT`` on the output reloaded from disk
(:func:`ptq.image_eval.evaluate_image_output`): top-1 agreement with the FP model and
relative output error ``||y_q - y_fp|| / ||y_fp||`` (mean over crops) on held-out
crops of matplotlib's sample photos. Calibration: the default images (scikit-image and
scikit-learn test images). W4A16 is INT4 per-channel weights (``--weight-format
int4_channel``: the g128 preset of ``--w4a16`` cannot group 3x3 convs). Each row also
gives GPTQ's relative error as a ratio to RTN's.

Usage::

    .venv/bin/python benchmarks/cnn_cli_lite0.py [--calib-samples 32] [--eval-samples 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ptq.api import CalibrationConfig, quantize
from ptq.cli import build_scheme
from ptq.compose import build_passes
from ptq.image_eval import evaluate_image_output
from ptq.models.module_source import resolve_module_source

ROOT = Path(__file__).resolve().parent
SCHEMES: dict[str, dict[str, str | None]] = {
    "W8A8 (--w8a8)": {"scheme_name": "w8a8", "weight_format": None},
    "W4A16 (--weight-format int4_channel)": {"scheme_name": None, "weight_format": "int4_channel"},
    "FP8 (--fp8)": {"scheme_name": "fp8", "weight_format": None},
}
METHODS = ("rtn", "gptq")


def row(name: str, flags: dict[str, str | None], method: str, a: argparse.Namespace) -> list[str]:
    source = resolve_module_source("efficientnet-lite0", trust_remote_code=False)
    assert source is not None
    scheme = build_scheme(
        scheme_flags=(),
        scheme_name=flags["scheme_name"],
        weight_format=flags["weight_format"],
        group_size=None,
        act_format=None,
        ignore=(),
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        start = time.perf_counter()
        quantize(
            source,
            scheme,
            output=out,
            pipeline=build_passes(scheme, method=method),
            calibration=CalibrationConfig(samples=a.calib_samples),
            progress=False,
            log=lambda *_: None,
        )
        seconds = time.perf_counter() - start
        result = evaluate_image_output(out, samples=a.eval_samples)
    return [name, method.upper(), f"{result.agreement:.3f}", f"{result.relative_error:.4f}",
            f"{seconds:.0f}"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=100)
    ap.add_argument("--only", default="", help="run only rows whose scheme contains this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "cnn_cli_lite0.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lines = [
        "# EfficientNet-Lite0 through `ptq quantize` (output written, reloaded, `ptq eval`)",
        "",
        f"Calibration: {a.calib_samples} crops of the default calibration images; evaluation: "
        f"{a.eval_samples} crops of the held-out images (matplotlib's sample photos); "
        f"{a.threads} threads.",
        "",
        "| scheme | method | top-1 agreement | relative output error | GPTQ / RTN error | "
        "quantize + write seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, flags in SCHEMES.items():
        if a.only and a.only not in name:
            continue
        rtn_error = None
        for method in METHODS:
            cells = row(name, flags, method, a)
            error = float(cells[3])
            rtn_error = error if method == "rtn" else rtn_error
            ratio = "1" if method == "rtn" or not rtn_error else f"{error / rtn_error:.3f}"
            lines.append("| " + " | ".join([*cells[:4], ratio, cells[4]]) + " |")
            print(lines[-1], flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
