"""``ptq generate OUT --prompt``: greedy generation from a ptq output with the packed ops.

The output folder is loaded with ptq's loader; every quantized Linear whose format has
a kernel (INT4 per-group, NVFP4, MXFP4, INT8/FP8 per-channel, INT3/5/6 and FP6 in
groups) becomes a
:class:`~ptq.exporters.cuda.linear.QLinear` calling ``torch.ops.ptq.*`` (CUDA kernels on
a GPU, the CPU reference elsewhere); other layers keep the emulated module.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch
from torch import nn

from ptq.errors import PtqError, PtqInputError
from ptq.modules import replace_module
from ptq.qlinear import QuantLinear


def to_packed_ops(model: nn.Module, scale_dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """Swap QuantLinears for kernel-backed QLinears; return (swapped, kept emulated)."""
    from ptq.exporters.cuda.linear import FP8_ACT_WEIGHTS, QLinear
    from ptq.exporters.cuda.packing import pack_qtensor

    swapped = kept = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear) or module.lorc_u is not None:
            kept += isinstance(module, QuantLinear)
            continue
        act = module.activation
        fp8_act = act is not None and act.element.name == "fp8_e4m3" and act.dynamic
        if act is not None and not fp8_act:
            kept += 1
            continue
        try:
            packed = pack_qtensor(module.qweight, scale_dtype=scale_dtype)
        except ValueError:
            kept += 1
            continue
        if fp8_act and packed.format not in FP8_ACT_WEIGHTS:
            kept += 1
            continue
        replace_module(model, name, QLinear(packed, module.bias, fp8_act=fp8_act))
        swapped += 1
    return swapped, kept


def generate_text(out: Path, prompt: str, max_new_tokens: int = 32) -> tuple[str, int, int]:
    """Greedy continuation of ``prompt`` and the (swapped, kept) layer counts."""
    from ptq.models.quantized_loader import load_quantized_model

    if not (out / "config.json").is_file():
        raise PtqInputError(f"{out} is not a ptq output folder (no config.json)")
    model, tokenizer = load_quantized_model(out)
    if tokenizer is None:
        raise PtqInputError(f"{out} has no tokenizer files")
    swapped, kept = to_packed_ops(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)  # type: ignore[operator]
    return tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True), swapped, kept


@click.command("generate")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
def generate_command(output: Path, prompt: str, max_new_tokens: int) -> None:
    """Greedy-generate from a ptq output using the packed-weight ops (CUDA or CPU reference)."""
    try:
        text, swapped, kept = generate_text(output, prompt, max_new_tokens)
    except PtqError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    where = "CUDA kernels" if torch.cuda.is_available() else "CPU reference ops"
    click.echo(f"[{swapped} layers on {where}, {kept} emulated]")
    click.echo(prompt + text)
