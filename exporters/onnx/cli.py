"""Click commands ``export`` and ``run`` (wired into ``ptq`` by ``main.add_command``).

``ptq export OUT --onnx [--weight-op matmulnbits|dq] [--accuracy-level 0-4]
[--int8-matmul integer|qdq]`` writes
``OUT/model.onnx`` (or ``-o FILE.onnx``); ``ptq run FILE.onnx --prompt "..."`` greedy
generates with ONNX Runtime on CPU using the KV cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ptq.errors import PtqError, PtqInputError, PtqUsageError


def _fail(exc: PtqError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@click.command("export")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--onnx", "to_onnx", is_flag=True, help="Export to ONNX (the only target so far).")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Output .onnx file or folder (default: SOURCE/model.onnx).",
)
@click.option(
    "--weight-op",
    type=click.Choice(["matmulnbits", "dq"]),
    default="matmulnbits",
    show_default=True,
    help="Weight-only INT layers: MatMulNBits or DequantizeLinear.",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=4,
    show_default=True,
    help="MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8.",
)
@click.option(
    "--int8-matmul",
    type=click.Choice(["integer", "qdq"]),
    default="integer",
    show_default=True,
    help="W8A8 layers: MatMulInteger on int8 codes (fast) or QDQ + float MatMul (portable).",
)
@click.option("--no-kv-cache", is_flag=True, help="Export the plain full-sequence graph.")
def export_command(
    source: Path,
    to_onnx: bool,
    output: Path | None,
    weight_op: str,
    accuracy_level: int,
    int8_matmul: str,
    no_kv_cache: bool,
) -> None:
    """Export a ptq output folder (or an FP model) to ONNX."""
    from ptq.exporters.onnx.export import export_onnx

    try:
        if not to_onnx:
            raise PtqUsageError("choose an export target: --onnx")
        if not source.exists():
            raise PtqInputError(f"{source} does not exist; give a ptq output folder")
        if output is None:
            if not source.is_dir():
                raise PtqUsageError(f"{source} is not a folder; give -o FILE.onnx")
            output = source / "model.onnx"
        path = export_onnx(
            source,
            output,
            weight_op=weight_op,  # type: ignore[arg-type]  # click.Choice guarantees the literal
            accuracy_level=accuracy_level,
            kv_cache=not no_kv_cache,
            int8_matmul=int8_matmul,  # type: ignore[arg-type]  # click.Choice guarantees it
        )
    except PtqError as exc:
        _fail(exc)
        return
    click.echo(f"wrote {path}")


@click.command("run")
@click.argument("onnx_path", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option(
    "--tokenizer",
    type=click.Path(path_type=Path),
    default=None,
    help="Tokenizer folder (default: the .onnx file's folder).",
)
def run_command(onnx_path: Path, prompt: str, max_new_tokens: int, tokenizer: Path | None) -> None:
    """Greedy-generate from an exported ONNX model with ONNX Runtime (CPU)."""
    from ptq.exporters.onnx.runtime import run_onnx

    try:
        if onnx_path.suffix != ".onnx" or not onnx_path.is_file():
            raise PtqInputError(f"{onnx_path} is not an .onnx file; create it with ptq export")
        text = run_onnx(onnx_path, tokenizer or onnx_path.parent, prompt, max_new_tokens)
    except PtqError as exc:
        _fail(exc)
        return
    click.echo(text)
