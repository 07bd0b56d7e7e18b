"""The ``ptq`` command line: quantize, eval, plan, formats.

Every deliberate error (:class:`~ptq.errors.PtqError`) prints one line naming the
problem and the fix and exits with code 2; no traceback, no partial output.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from ptq.devices import DEVICE_HELP, DTYPE_HELP
from ptq.errors import PtqError, PtqUsageError
from ptq.module_cli import diffusion_options, image_options

SCHEME_FLAGS = ("w4a16", "w4a8", "w8a8", "fp8", "w8a16")
SCALE_RULE_NAMES = ("amax", "span", "full-range", "mx", "mx-round-up")
CLIP_NAMES = ("none", "mse")


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PtqError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; no output was written", err=True)
            sys.exit(130)

    return wrapper


def _quiet_libraries(quiet: bool) -> None:
    """Silence transformers' own progress bars and warnings when ``-q`` is given."""
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _budget_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    from ptq.passes.allocation.cli import budget_options

    return budget_options(fn)


def scheme_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The scheme flags shared by ``quantize`` and ``plan``."""
    for name in reversed(SCHEME_FLAGS):
        fn = click.option(
            f"--{name}",
            "scheme_flags",
            flag_value=name,
            multiple=True,
            help=f"Scheme preset {name}.",
        )(fn)
    fn = click.option("--scheme", "scheme_name", default=None, help="Scheme preset by name.")(fn)
    fn = click.option(
        "--weight-format",
        default=None,
        help="Override the weight format: a preset (`ptq formats`) or a descriptor such as "
        "int5_g64, int4_g32_asym, fp6_e3m2_g32, fp4_e2m1_g16_ue5m3 (grammar: "
        "`ptq formats --help`).",
    )(fn)
    fn = click.option(
        "--scale-rule",
        type=click.Choice(SCALE_RULE_NAMES),
        default=None,
        help="Weight scale rule: amax (s = amax / q_max), span (s = amax / ((q_max - q_min) / "
        "2), compressed-tensors' rule) or full-range (s = v* / -2^(b-1), v* the signed "
        "peak: all 2^b INT levels used, as ONNX Runtime's RTN). Default: full-range for "
        "symmetric INT weights of 4 bits or fewer (the best measured), else amax.",
    )(fn)
    fn = click.option(
        "--clip",
        type=click.Choice(CLIP_NAMES),
        default=None,
        help="Weight clipping: mse searches, per scale block, the clip ratio (1 down to 0.5) "
        "with the least squared weight error; none keeps the rule's peak; default: the "
        "format's own. Any --method uses the clipped scales.",
    )(fn)
    fn = click.option(
        "--group-size",
        type=int,
        default=None,
        help="Explicit group size (must divide every layer).",
    )(fn)
    fn = click.option(
        "--act-format", default=None, help="Override activations: none, fp8, int8, fp8_e5m2, ..."
    )(fn)
    fn = click.option(
        "--ignore",
        multiple=True,
        help="Module names or re:REGEX left unquantized (default: lm_head).",
    )(fn)
    return fn


def build_scheme(
    scheme_flags: tuple[str, ...],
    scheme_name: str | None,
    weight_format: str | None,
    group_size: int | None,
    act_format: str | None,
    ignore: tuple[str, ...],
    scale_rule: str | None = None,
    clip: str | None = None,
) -> Any:
    from ptq.scheme import get_activation, get_scheme

    chosen = list(dict.fromkeys(scheme_flags)) + ([scheme_name] if scheme_name else [])
    if len(chosen) > 1:
        raise PtqUsageError(f"choose one scheme, got {', '.join(chosen)}")
    if not chosen and weight_format is None:
        raise PtqUsageError("choose a scheme: --w4a16, --w4a8, --w8a8, --fp8 (or --scheme NAME)")
    try:
        scheme = get_scheme(chosen[0] if chosen else "w4a16")
        weight = None
        if weight_format is not None:
            from ptq.formats.names import parse_format
            from ptq.scheme import best_scale_rule

            weight = parse_format(weight_format)
            weight = weight if scale_rule is not None else best_scale_rule(weight)
        kwargs: dict[str, Any] = {"weight": weight, "group_size": group_size}
        if act_format is not None:
            kwargs["activation"] = get_activation(act_format)
        if ignore:
            kwargs["ignore"] = ignore
        return with_weight_rules(scheme.with_overrides(**kwargs), scale_rule, clip)
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None


def with_weight_rules(scheme: Any, scale_rule: str | None, clip: str | None = None) -> Any:
    """``scheme`` with its weight format's ``scale_rule`` and ``clip`` replaced.

    ``scale_rule`` comes in CLI spelling (``full-range``); None leaves a field as it is.

    Raises:
        PtqUsageError: A rule does not fit the weight format (e.g. full-range on FP8,
            mse clipping on an asymmetric format).
    """
    from dataclasses import replace

    weight = scheme.weight
    for flag, field, value in (
        ("--scale-rule", "scale_rule", scale_rule),
        ("--clip", "clip", clip),
    ):
        if value is None:
            continue
        try:
            weight = replace(weight, **{field: value.replace("-", "_")})
        except ValueError as exc:
            raise PtqUsageError(f"{flag} {value}: {exc}") from None
    return scheme if weight is scheme.weight else scheme.with_overrides(weight=weight)


@click.group()
@click.version_option(package_name="ptq")
def main() -> None:
    """ptq: post-training quantization compiler for PyTorch models."""


@main.command()
@click.argument("model", default="default")
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="Output folder."
)
@scheme_options
@click.option(
    "--method",
    default=None,
    help="Weight method: rtn, gptq, adaround, adaquant, zeroquant_fp, each optionally after "
    "awq+ (awq+gptq: AWQ scales and clipping, then GPTQ rounding; awq alone: awq+rtn). "
    "Default: awq+gptq for weights of 4 bits or fewer when calibration text is available "
    "(the best measured; gptq for a model without repeated blocks), rtn otherwise.",
)
@click.option(
    "--rounding",
    type=click.Choice(["nearest", "stochastic"]),
    default="nearest",
    show_default=True,
    help="RTN's rounding: to nearest (ties to even), or stochastic (floor(w/s + u), u ~ "
    "U[0,1), seeded per layer by --seed). stochastic without --method means rtn.",
)
@click.option(
    "--act-observer",
    type=click.Choice(["minmax", "percentile", "mse", "kl"]),
    default=None,
    help="Observer of static activation ranges (static --act-format only): minmax, "
    "percentile (99.99th of |x|), mse (least quantization error) or kl (TensorRT "
    "entropy). Default: mse (the best measured).",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    default=None,
    help="Calibration text (.txt or .jsonl with 'text'); for an image model, a folder of "
    "images [default: Shakespeare's plays; images: the test images of scikit-image and "
    "scikit-learn].",
)
@click.option(
    "--calib-samples",
    type=int,
    default=128,
    show_default=True,
    help="Calibration sequences; for an image model, crops (one central crop per image, "
    "then random crops).",
)
@click.option("--calib-seqlen", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--eval", "do_eval", is_flag=True, help="Print FP and quantized perplexity on held-out text."
)
@click.option(
    "--eval-text",
    type=click.Path(path_type=Path),
    default=None,
    help="Held-out text (default: 1911 Britannica prose).",
)
@click.option("--eval-tokens", type=int, default=4096, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True, help="Evaluation window.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--trust-remote-code", is_flag=True, help="Allow code from the model folder to run.")
@click.option(
    "--restart",
    is_flag=True,
    help="Discard an interrupted run of another command (the .OUT.work folder) and start over.",
)
@click.option(
    "--checkpoint-interval",
    type=float,
    default=60.0,
    show_default=True,
    help="Least seconds between resume checkpoints (0: after every block).",
)
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option(
    "--dtype",
    "compute_dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help=DTYPE_HELP,
)
@click.option(
    "--offload-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Keep the calibration activations in files under this folder instead of memory.",
)
@click.option(
    "--recipe",
    type=click.Path(path_type=Path),
    default=None,
    help="YAML/JSON recipe: scheme, calibration and passes.",
)
@click.option(
    "--percdamp",
    type=float,
    default=None,
    help="GPTQ: Hessian damping (fraction of mean diagonal).",
)
@click.option(
    "--act-order/--no-act-order",
    default=None,
    help="GPTQ: quantize columns by decreasing Hessian diagonal, with static groups (default on).",
)
@click.option(
    "--iterations", type=int, default=None, help="AdaRound/AdaQuant: optimisation steps per layer."
)
@click.option(
    "--method-option",
    "method_option",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any option of the method's config (repeatable), e.g. input_rows=4096, "
    "lr_weight=1e-4 (adaquant), reg_weight=0.01 (adaround); an unknown key lists them all.",
)
@click.option(
    "--smoothquant",
    is_flag=False,
    flag_value="search",
    default=None,
    help="SmoothQuant with ALPHA, or per-group search when given alone.",
)
@click.option(
    "--rotate", is_flag=True, help="Fuse randomised Hadamard rotations into the weights (QuaRot)."
)
@click.option(
    "--lorc",
    type=int,
    default=None,
    help="Low-rank compensation of the weight error with this rank.",
)
@click.option(
    "--bias-correction", is_flag=True, help="Re-estimate biases of activation-quantized layers."
)
@click.option(
    "--stats-tuning",
    is_flag=True,
    help="After the weight method, fit every quantized layer's per-channel output gain "
    "(folded into its scales) and mean (its bias) to the FP layer on the calibration data "
    "(Hubara et al.'s bias and batch-norm tuning).",
)
@click.option(
    "--kv-cache",
    type=click.Choice(["fp8_e4m3", "int8"]),
    default=None,
    help="Quantize the KV cache with calibrated scales.",
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Accept pytorch_model.bin (loaded with weights_only=True, converted once).",
)
@click.option(
    "--distributed",
    "parallel",
    type=click.Choice(["layer", "data"]),
    default="layer",
    show_default=True,
    help="Under torchrun (WORLD_SIZE > 1): 'layer' shards the calibration batches and "
    "spreads each stage's layers over the ranks; 'data' shards the batches only. "
    "Output is bit-identical to one process; rank 0 writes it. Ignored in one process.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--target",
    type=click.Choice(["vllm", "onnx", "ptq"]),
    default=None,
    help="Runtime the output is for: passes it would not apply are refused, and --budget "
    "chooses only among formats it serves (ptq: every format) [default: vllm; ptq for an "
    "image model].",
)
@image_options
@diffusion_options
@_budget_options
@_friendly
def quantize(
    model: str,
    output: Path,
    method: str | None,
    rounding: str,
    act_observer: str | None,
    calib: Path | None,
    calib_samples: int,
    calib_seqlen: int,
    seed: int,
    do_eval: bool,
    eval_text: Path | None,
    eval_tokens: int,
    seqlen: int,
    overwrite: bool,
    trust_remote_code: bool,
    restart: bool,
    checkpoint_interval: float,
    device: str,
    compute_dtype: str,
    offload_dir: Path | None,
    recipe: Path | None,
    percdamp: float | None,
    act_order: bool | None,
    iterations: int | None,
    method_option: tuple[str, ...],
    smoothquant: str | None,
    rotate: bool,
    lorc: int | None,
    bias_correction: bool,
    stats_tuning: bool,
    kv_cache: str | None,
    allow_pickle: bool,
    parallel: str,
    quiet: bool,
    target: str | None,
    image_size: int | None,
    image_mean: str | None,
    image_std: str | None,
    diffusion_steps: int | None,
    diffusion_trajectories: int | None,
    diffusion_scheduler: str | None,
    budget: str | None,
    budget_latency: str | None,
    kernel_efficiency: str | None,
    candidates: str,
    estimator: str,
    **scheme_kw: Any,
) -> None:
    """Quantize MODEL into OUTPUT.

    MODEL: 'default' (SmolLM2-135M), a Hugging Face folder, a .gguf file, a built-in
    image model (efficientnet-lite0) or diffusion UNet (unet-small), or
    FILE.py:FUNCTION / package.module:FUNCTION, a function returning a torch nn.Module
    (runs your code: needs --trust-remote-code; add a --diffusion-* option for a
    diffusers UNet).
    """
    from ptq.api import CalibrationConfig, EvalConfig
    from ptq.api import quantize as run
    from ptq.module_cli import resolve_cli_module

    _quiet_libraries(quiet)
    from ptq.passes.registry import make_method_passes, method_options

    module = resolve_cli_module(
        model,
        {
            "trust_remote_code": trust_remote_code,
            "target": target,
            "image_size": image_size,
            "image_mean": image_mean,
            "image_std": image_std,
            "diffusion_steps": diffusion_steps,
            "diffusion_trajectories": diffusion_trajectories,
            "diffusion_scheduler": diffusion_scheduler,
        },
    )
    target = target or ("ptq" if module is not None else "vllm")

    if recipe is not None and (method or rounding != "nearest" or act_observer):
        raise PtqUsageError(
            "--method/--rounding/--act-observer with --recipe: set them in the recipe"
        )
    method = method or _default_method(
        scheme_kw,
        module is not None or _calibration_available(calib),
        rounding,
        bool(budget or budget_latency),
        repeated_blocks=module is None,
    )
    knobs = {
        k: v
        for k, v in {"percdamp": percdamp, "act_order": act_order, "iterations": iterations}.items()
        if v is not None
    }
    if recipe is not None and method_option:
        raise PtqUsageError("--method-option with --recipe: set the options in the recipe")
    if recipe is not None and (bias_correction or stats_tuning):
        raise PtqUsageError(
            "--bias-correction/--stats-tuning with --recipe: add a bias_correction pass "
            "(options gain, activation_quantized_only) to the recipe"
        )
    try:
        extra = method_options(method, method_option)
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None
    if both := sorted(set(extra) & set(knobs)):
        raise PtqUsageError(f"{', '.join(both)} given both as a flag and as --method-option")
    knobs.update(extra)
    cal = CalibrationConfig(path=calib, samples=calib_samples, seqlen=calib_seqlen)
    if recipe is not None and (budget or budget_latency):
        raise PtqUsageError(
            "--budget/--budget-latency with --recipe: put a bit_allocation pass in the recipe"
        )
    if recipe is not None:
        from ptq.recipe import load_recipe

        parsed = load_recipe(recipe)
        has_flags = any(scheme_kw[k] for k in ("scheme_flags", "scheme_name", "weight_format"))
        scheme = (
            build_scheme(**scheme_kw)
            if has_flags or parsed.scheme is None
            else with_weight_rules(parsed.scheme, scheme_kw["scale_rule"], scheme_kw["clip"])
        )
        passes = parsed.pipeline.passes
        cal = CalibrationConfig(
            path=Path(parsed.calibration["path"]) if parsed.calibration.get("path") else calib,
            samples=int(parsed.calibration.get("samples", calib_samples)),
            seqlen=int(parsed.calibration.get("seqlen", calib_seqlen)),
        )
    else:
        from ptq.compose import build_passes
        from ptq.passes.allocation.cli import allocation_pass_from_cli
        from ptq.passes.bit_allocation import DEFAULT_CANDIDATES
        from ptq.targets import target_candidates

        has_scheme = any(scheme_kw[k] for k in ("scheme_flags", "scheme_name", "weight_format"))
        if (budget or budget_latency) and not has_scheme:
            scheme_kw["scheme_name"] = "w4a16"  # the allocation decides the formats
        scheme = build_scheme(**scheme_kw)
        if budget or budget_latency:
            explicit = candidates != DEFAULT_CANDIDATES
            candidates = target_candidates(target, candidates, scheme, explicit)
        allocation = allocation_pass_from_cli(
            budget, budget_latency, candidates, estimator, kernel_efficiency=kernel_efficiency
        )
        try:
            make_method_passes(method, **knobs)
        except (ValueError, TypeError) as exc:
            raise PtqUsageError(f"--method {method}: {exc}") from None
        passes = build_passes(
            scheme,
            method=method,
            rounding=rounding,
            act_observer=act_observer,
            knobs=knobs,
            smoothquant=smoothquant,
            rotate=rotate,
            lorc=lorc,
            bias_correction=bias_correction,
            stats_tuning=stats_tuning,
            kv_cache=kv_cache,
            allocation=allocation,
        )
    from ptq.calibration.distributed import DistributedContext
    from ptq.models.source import resolve_model
    from ptq.targets import check_target, serving_summary

    check_target(target, passes)
    if module is not None:
        result = run(
            module,
            scheme,
            output=output,
            pipeline=passes,
            calibration=cal,
            seed=seed,
            overwrite=overwrite,
            progress=not quiet,
            trust_remote_code=trust_remote_code,
            device=device,
            log=click.echo,
        )
        click.echo(
            f"{len(result.plan.layers)} layers quantized ({scheme.name}), "
            f"{len(result.records.get('fold_batch_norm', []))} batch-norms folded; "
            f"check it with `ptq verify {output}`, measure it with `ptq eval {output}`"
        )
        click.echo(f"done in {result.seconds:.1f} s")
        return

    source = resolve_model(model, quiet=quiet, allow_pickle=allow_pickle)
    result = run(
        source,
        scheme,
        output=output,
        pipeline=passes,
        calibration=cal,
        evaluate=EvalConfig(text=eval_text, tokens=eval_tokens, seqlen=seqlen)
        if do_eval
        else False,
        seed=seed,
        overwrite=overwrite,
        progress=not quiet,
        trust_remote_code=trust_remote_code,
        restart=restart,
        device=device,
        dtype=compute_dtype,
        offload_dir=offload_dir,
        checkpoint_interval_s=checkpoint_interval,
        log=click.echo,
        distributed=DistributedContext.from_env(layer_parallel=parallel == "layer"),
    )
    if result.rank != 0:
        return
    if result.fp_ppl is not None and result.quant_ppl is not None:
        click.echo(
            f"perplexity FP {result.fp_ppl:.4f} -> {scheme.name} {result.quant_ppl:.4f} "
            f"(x{result.quant_ppl / result.fp_ppl:.4f})"
        )
    click.echo(serving_summary(result.plan, passes))
    peak = ""
    if device != "cpu":
        import torch

        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    click.echo(f"done in {result.seconds:.1f} s{peak}")


def _default_method(
    scheme_kw: dict[str, Any],
    calibration: bool,
    rounding: str,
    budget: bool,
    *,
    repeated_blocks: bool = True,
) -> str:
    """``--method`` when none is given (:func:`ptq.compose.default_method`, ``calibration``:
    whether calibration data is available; ``repeated_blocks``: a decoder LM, not a model
    built by code); ``rtn`` for stochastic rounding and for a budget (the allocation
    measured its candidates so)."""
    from ptq.compose import default_method

    if rounding == "stochastic" or budget:
        return "rtn"
    has_scheme = any(scheme_kw[k] for k in ("scheme_flags", "scheme_name", "weight_format"))
    if not has_scheme:
        return "rtn"  # build_scheme reports the missing scheme (or --budget picks formats)
    return default_method(build_scheme(**scheme_kw), calibration, repeated_blocks=repeated_blocks)


def _calibration_available(calib: Path | None) -> bool:
    """A --calib file, or the default plays installed."""
    if calib is not None:
        return True
    from ptq.models.paths import default_calibration_files

    try:
        return bool(default_calibration_files())
    except PtqError:
        return False


@main.command("eval")
@click.argument("model")
@click.option(
    "--text",
    type=click.Path(path_type=Path),
    default=None,
    help="Held-out text (default: 1911 Britannica prose).",
)
@click.option(
    "--eval-tokens",
    type=int,
    default=None,
    help="Tokens of the text to use [default: 4096; 2048 with --reproducibility].",
)
@click.option(
    "--seqlen",
    type=int,
    default=None,
    help="Window length [default: 512; 128 with --reproducibility].",
)
@click.option(
    "--dtype",
    "dtype_name",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default=None,
    help="Store the weights and run the model in this dtype [default: fp32].",
)
@click.option(
    "--layercast",
    is_flag=True,
    help="LayerCast: weights stored in --dtype, every computation in fp32.",
)
@click.option(
    "--lmul",
    is_flag=True,
    help="Also evaluate with L-Mul products in every linear layer (needs --dtype bf16|fp16).",
)
@click.option(
    "--batch-size",
    type=int,
    default=1,
    show_default=True,
    help="Windows per forward pass.",
)
@click.option(
    "--reproducibility",
    is_flag=True,
    help="Run fp32/bf16/fp16 (with and without LayerCast) at batch sizes 1, 4, 16 and "
    "1 and 2 threads; report log-probability and perplexity differences.",
)
@click.option(
    "--images",
    type=click.Path(path_type=Path),
    default=None,
    help="Image models: a folder of held-out images, none of them a calibration image "
    "[default: matplotlib's sample photos].",
)
@click.option(
    "--samples",
    type=int,
    default=None,
    help="Image models: crops to evaluate on [default: 100]; diffusion models: held-out "
    "trajectories [default: 4].",
)
@click.option("--trust-remote-code", is_flag=True)
@click.option("-q", "--quiet", is_flag=True)
@_friendly
def eval_cmd(**options: Any) -> None:
    """Perplexity of MODEL (FP or a ptq output) on held-out text; for the output of an
    image model, its top-1 agreement with the FP model and relative output error on
    held-out images.

    With --dtype bf16|fp16 the weights are stored and the model runs in that dtype;
    --layercast computes in fp32 from the 16-bit weights; --lmul also evaluates with
    L-Mul products in every linear layer; --reproducibility reports how batch size and
    thread count change the result (docs/eval_precision.md).
    """
    from ptq.eval_cli import run_eval

    _quiet_libraries(options["quiet"])
    run_eval(**options)


@main.command()
@click.argument("model", default="default")
@scheme_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--trust-remote-code", is_flag=True)
@_friendly
def plan(model: str, as_json: bool, trust_remote_code: bool, **scheme_kw: Any) -> None:
    """Show what will (and will not) be quantized, layer by layer."""
    from ptq.models.source import load_fp_model, resolve_model
    from ptq.plan import build_plan

    scheme = build_scheme(**scheme_kw)
    source = resolve_model(model, quiet=True)
    net, _ = load_fp_model(source, trust_remote_code=trust_remote_code)
    try:
        the_plan = build_plan(net, scheme)
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None
    if as_json:
        click.echo(the_plan.to_json())
        return
    for note in the_plan.notes:
        click.echo(f"note: {note}")
    rows = the_plan.summary_rows()
    width = max(len(r[0]) for r in rows)
    for name, w, a, method in rows:
        click.echo(f"{name:<{width}}  {w:<16} {a:<24} {method}")
    click.echo(f"{len(the_plan.layers)} quantized, {len(the_plan.skipped)} skipped")


@main.command()
@click.argument("names", nargs=-1)
@_friendly
def formats(names: tuple[str, ...]) -> None:
    """List every element format and preset with bits/weight, range and smallest step;
    with NAMES, describe those formats (presets or descriptors).

    \b
    Anything --weight-format takes is a preset name or a descriptor:
      descriptor  := element [_granularity] {_modifier}
      element     := int{B}            signed integer, B in 2..8
                   | fp{N}_e{E}m{M}    minifloat ExMy, N = 1 + E + M <= 8
      granularity := g{G}              one scale per G inputs
                   | channel           one scale per output row (default)
                   | tensor            one scale for the tensor
                   | b{R}x{C}          one scale per R x C tile
      modifier    := asym              integers: a zero point per scale block
                   | global            an fp32 per-tensor second level (as NVFP4)
                   | fp16|bf16|fp32|e8m0|e4m3|ue5m3|pow2   scale storage (default fp16)
    Examples: int5_g64, int4_g32_asym, fp6_e3m2_g32, fp4_e2m1_g16_ue5m3,
    fp4_e2m1_g16_e4m3_global, int8_b128x128. Minifloats use the bias 2^(E-1)-1; FP8
    E4M3 is OCP's (no Inf), E5M2 IEEE-style, other ExMy all-finite.
    """
    from ptq.formats.table import format_table

    try:
        rows = format_table(names)
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None
    header = ("name", "bits/weight", "max", "smallest step", "description")
    cells = [header] + [
        tuple(f"{c:g}" if isinstance(c, float) else str(c) for c in _row_cells(r)) for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _row_cells(row: Any) -> tuple[Any, ...]:
    if isinstance(row, dict):
        return tuple(row.values())
    if isinstance(row, tuple):
        return row
    return tuple(vars(row).values())


def _register_commands() -> None:
    from ptq.exporters.onnx.cli import export_command, run_command
    from ptq.verify import verify

    main.add_command(export_command)
    main.add_command(run_command)
    main.add_command(verify)
    from ptq.passes.allocation.cli import allocate

    main.add_command(allocate)
    from ptq.exporters.cuda.generate import generate_command

    main.add_command(generate_command)


_register_commands()

if __name__ == "__main__":
    main()
