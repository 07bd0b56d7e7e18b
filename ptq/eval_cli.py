"""``ptq eval``: perplexity of a model in a chosen precision, with L-Mul, or its reproducibility.

* ``--dtype fp32|bf16|fp16 [--layercast]``: :mod:`ptq.precision`.
* ``--lmul``: the perplexity with exact multiplication and with L-Mul products in every
  linear layer (:mod:`ptq.lmul`), side by side, in the same 16-bit dtype.
* ``--reproducibility``: :mod:`ptq.reproducibility`.
* the output of an image model (``ptq_module``): top-1 agreement with the FP model and
  relative output error on held-out images (:mod:`ptq.image_eval`).

A ptq output is evaluated with its emulated layers (dequantized weights, activation
fake quantization), stored in the chosen dtype like any other weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from torch import nn

from ptq.errors import PtqInputError, PtqUsageError

__all__ = ["check_eval_options", "run_eval"]


def check_eval_options(
    *, dtype_name: str | None, layercast: bool, lmul: bool, batch_size: int, reproducibility: bool
) -> None:
    """Refuse option combinations that cannot work, before anything is loaded.

    Raises:
        PtqUsageError: With the option to change.
    """
    if batch_size < 1:
        raise PtqUsageError(f"--batch-size must be at least 1, got {batch_size}")
    if reproducibility:
        given = [
            flag
            for flag, on in (
                ("--dtype", dtype_name is not None),
                ("--layercast", layercast),
                ("--lmul", lmul),
                ("--batch-size", batch_size != 1),
            )
            if on
        ]
        if given:
            raise PtqUsageError(
                f"--reproducibility runs every dtype with and without LayerCast at batch "
                f"sizes 1, 4, 16 itself; drop {', '.join(given)}"
            )
    if lmul:
        if dtype_name not in ("bf16", "fp16"):
            raise PtqUsageError(
                f"--lmul needs --dtype bf16 or fp16 (got {dtype_name or 'fp32'}): L-Mul is "
                "emulated on the bit patterns of 16-bit operands"
            )
        if layercast:
            raise PtqUsageError(
                "--lmul and --layercast do not combine: LayerCast multiplies in fp32, "
                "L-Mul replaces the 16-bit multiplications"
            )


def _loader(model: str, *, trust_remote_code: bool, quiet: bool) -> tuple[Any, Any]:
    """``(load, tokenizer)``: ``load()`` returns a fresh float32 model each call."""
    from ptq.models.quantized_loader import load_quantized_model
    from ptq.models.source import load_fp_model, resolve_model

    source = resolve_model(model, quiet=quiet)

    def load() -> tuple[nn.Module, Any]:
        if source.is_quantized:
            return load_quantized_model(source.path, trust_remote_code=trust_remote_code)
        return load_fp_model(source, trust_remote_code=trust_remote_code)

    net, tokenizer = load()
    if tokenizer is None:
        raise PtqInputError(f"{source.path} has no tokenizer files")
    first: list[nn.Module] = [net]

    def fresh() -> nn.Module:
        # the model loaded for the tokenizer is handed out first, then reloads
        return first.pop() if first else load()[0]

    return fresh, tokenizer


def run_eval(
    model: str,
    *,
    text: Path | None,
    eval_tokens: int | None,
    seqlen: int | None,
    dtype_name: str | None,
    layercast: bool,
    lmul: bool,
    batch_size: int,
    reproducibility: bool,
    trust_remote_code: bool,
    quiet: bool,
    images: Path | None = None,
    samples: int | None = None,
) -> None:
    """Run ``ptq eval`` and print its result lines."""
    from ptq.evaluate import perplexity, tokenize_eval_text
    from ptq.models.paths import default_eval_file
    from ptq.precision import cast_model, eval_dtype

    text_options = {
        "--text": text is not None,
        "--eval-tokens": eval_tokens is not None,
        "--seqlen": seqlen is not None,
        "--dtype": dtype_name is not None,
        "--layercast": layercast,
        "--lmul": lmul,
        "--batch-size": batch_size != 1,
        "--reproducibility": reproducibility,
    }
    if is_module_output(model):
        _image_eval(model, images, samples, trust_remote_code, text_options)
        return
    if images is not None or samples is not None:
        raise PtqUsageError(
            f"--images/--samples evaluate the output of an image model; {model} is not one"
        )

    check_eval_options(
        dtype_name=dtype_name,
        layercast=layercast,
        lmul=lmul,
        batch_size=batch_size,
        reproducibility=reproducibility,
    )
    tokens = eval_tokens if eval_tokens is not None else (2048 if reproducibility else 4096)
    window = seqlen if seqlen is not None else (128 if reproducibility else 512)
    if tokens < 1 or window < 2:
        raise PtqUsageError("--eval-tokens must be >= 1 and --seqlen >= 2")
    load, tokenizer = _loader(model, trust_remote_code=trust_remote_code, quiet=quiet)
    ids = tokenize_eval_text(tokenizer, text or default_eval_file(), tokens)
    if reproducibility:
        _reproducibility(load, ids, window)
        return
    name = dtype_name or "fp32"
    net = cast_model(load(), eval_dtype(name), layercast=layercast)
    where = f"{ids.numel()} tokens, seqlen {window}"
    if name != "fp32" or layercast:
        where += f", {name}" + (", LayerCast" if layercast else "")
    if batch_size != 1:
        where += f", batch {batch_size}"
    ppl = perplexity(net, ids, seqlen=window, batch_size=batch_size, progress=not quiet)
    if not lmul:
        click.echo(f"perplexity: {ppl:.4f} ({where})")
        return
    from ptq.lmul import LMulModel

    approx = perplexity(
        LMulModel(net), ids, seqlen=window, batch_size=batch_size, progress=not quiet, desc="L-Mul"
    )
    click.echo(f"perplexity: {ppl:.4f} ({where}, exact multiplication)")
    click.echo(f"perplexity: {approx:.4f} ({where}, L-Mul in every linear layer)")
    click.echo(f"L-Mul / exact: x{approx / ppl:.4f}")


def is_module_output(model: str) -> bool:
    """Whether ``model`` is an output folder of a model built by code (``ptq_module``)."""
    return module_output_kind(model) is not None


def module_output_kind(model: str) -> str | None:
    """The input kind (``image``, ``diffusion``) recorded in an output folder of a model
    built by code (``ptq_module``), or None for anything else."""
    import json

    from ptq.module_quantize import MODULE_KEY

    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    try:
        record = json.loads(config.read_text(encoding="utf-8"))[MODULE_KEY]
        return str(record["inputs"]["kind"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _image_eval(
    model: str,
    images: Path | None,
    samples: int | None,
    trust_remote_code: bool,
    text_options: dict[str, bool],
) -> None:
    """``ptq eval OUT`` of an image model (:mod:`ptq.image_eval`), or of a diffusion
    denoiser (:mod:`ptq.diffusion_eval`: ``--samples`` held-out trajectories, no images)."""
    from ptq.diffusion_eval import evaluate_diffusion_output
    from ptq.image_eval import evaluate_image_output

    diffusion = module_output_kind(model) == "diffusion"
    if diffusion:
        text_options = {**text_options, "--images": images is not None}
    given = [flag for flag, on in text_options.items() if on]
    if given:
        kind, use = (
            ("a diffusion", "--samples") if diffusion else ("an image", "--images and --samples")
        )
        raise PtqUsageError(
            f"{model} is {kind} model's output: {', '.join(given)} apply to language "
            f"models; use {use}"
        )
    if samples is not None and samples < 1:
        raise PtqUsageError(f"--samples must be at least 1, got {samples}")
    result = (
        evaluate_diffusion_output(
            Path(model), trajectories=samples or 4, trust_remote_code=trust_remote_code
        )
        if diffusion
        else evaluate_image_output(
            Path(model), images=images, samples=samples or 100, trust_remote_code=trust_remote_code
        )
    )
    for line in result.lines():
        click.echo(line)


def _reproducibility(load: Any, ids: Any, window: int) -> None:
    from ptq.reproducibility import format_table, run_reproducibility

    n_windows = ids.numel() // window
    if n_windows == 0:
        raise PtqInputError(
            f"evaluation text has {ids.numel()} tokens, fewer than --seqlen {window}"
        )
    click.echo(
        f"{n_windows} windows of {window} tokens; settings: batch sizes 1, 4, 16 "
        f"(windows stacked into [B, {window}] inputs) x threads 1, 2 "
        "(torch.set_num_threads in this process)"
    )
    if n_windows < 16:
        click.echo(
            f"note: only {n_windows} windows, so batch sizes above {n_windows} run as "
            f"{n_windows}; use --eval-tokens {16 * window} for distinct batch shapes"
        )
    header, rule = format_table([]).splitlines()
    click.echo(header)
    click.echo(rule)
    run_reproducibility(
        load, ids, seqlen=window, on_row=lambda r: click.echo(format_table([r]).splitlines()[-1])
    )
