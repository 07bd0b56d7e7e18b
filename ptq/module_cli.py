"""``ptq quantize MODEL`` for a model built by code: which options apply, and the run.

A built-in name (``efficientnet-lite0``) or a factory (``FILE.py:FUNCTION``,
``package.module:FUNCTION``, with ``--trust-remote-code``) is resolved by
:func:`ptq.models.module_source.resolve_module_source`; ``--image-size``,
``--image-mean`` and ``--image-std`` describe a factory's inputs; ``--diffusion-steps``,
``--diffusion-trajectories`` and ``--diffusion-scheduler`` make a factory's model a
diffusion denoiser calibrated on sampling trajectories (:mod:`ptq.models.diffusion`), or
change the built-in ``unet-small``'s sampling settings. The options of the
language-model path that do not apply to such a model (perplexity evaluation, the
block-wise runner's resume and offload, LM-structure passes, vLLM/ONNX targets, bit
allocation) are refused by name when given, as are the image options for a language
model; an image model is evaluated afterwards by ``ptq eval OUT``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import click

from ptq.errors import PtqUsageError

if TYPE_CHECKING:
    from ptq.models.module_source import ModuleSource

__all__ = [
    "DIFFUSION_OPTIONS",
    "IMAGE_OPTIONS",
    "diffusion_options",
    "image_options",
    "resolve_cli_module",
]

IMAGE_OPTIONS: Final = ("image_size", "image_mean", "image_std")
DIFFUSION_OPTIONS: Final = ("diffusion_steps", "diffusion_trajectories", "diffusion_scheduler")
FILE_CALIBRATION: Final[Mapping[str, str]] = {
    "calib": "--calib",
    "calib_samples": "--calib-samples",
}
LM_ONLY: Final[Mapping[str, str]] = {
    "do_eval": "--eval (evaluate the output with `ptq eval OUT`)",
    "eval_text": "--eval-text",
    "eval_tokens": "--eval-tokens",
    "seqlen": "--seqlen",
    "calib_seqlen": "--calib-seqlen",
    "restart": "--restart",
    "checkpoint_interval": "--checkpoint-interval",
    "compute_dtype": "--dtype",
    "offload_dir": "--offload-dir",
    "smoothquant": "--smoothquant",
    "rotate": "--rotate",
    "lorc": "--lorc",
    "kv_cache": "--kv-cache",
    "allow_pickle": "--allow-pickle",
    "parallel": "--distributed",
    "budget": "--budget",
    "budget_latency": "--budget-latency",
    "kernel_efficiency": "--kernel-efficiency",
    "candidates": "--candidates",
    "estimator": "--estimator",
}


def image_options(fn: Any) -> Any:
    """``--image-size``, ``--image-mean``, ``--image-std``: a factory model's inputs."""
    fn = click.option(
        "--image-std",
        default=None,
        metavar="R,G,B",
        help="Factory models: per-channel std in 0..255 pixel units, x = (pixels - mean) / "
        "std [default: ImageNet's, 58.395,57.12,57.375].",
    )(fn)
    fn = click.option(
        "--image-mean",
        default=None,
        metavar="R,G,B",
        help="Factory models: per-channel mean in 0..255 pixel units [default: ImageNet's, "
        "123.675,116.28,103.53].",
    )(fn)
    return click.option(
        "--image-size",
        type=int,
        default=None,
        help="Factory models: side of the square input image [default: 224].",
    )(fn)


def diffusion_options(fn: Any) -> Any:
    """``--diffusion-steps``, ``--diffusion-trajectories``, ``--diffusion-scheduler``."""
    from ptq.models.diffusion import SCHEDULERS

    fn = click.option(
        "--diffusion-scheduler",
        type=click.Choice(SCHEDULERS),
        default=None,
        help="Diffusion models: the sampler of the calibration trajectories [default: ddim].",
    )(fn)
    fn = click.option(
        "--diffusion-trajectories",
        type=int,
        default=None,
        help="Diffusion models: random latents denoised for calibration [default: 8].",
    )(fn)
    return click.option(
        "--diffusion-steps",
        type=int,
        default=None,
        help="Diffusion models: sampling steps per calibration trajectory [default: 10].",
    )(fn)


def _diffusion_inputs(options: Mapping[str, Any]) -> Any:
    from ptq.models.diffusion import DiffusionInputs

    default = DiffusionInputs()
    steps, trajectories, scheduler = (options.get(n) for n in DIFFUSION_OPTIONS)
    return DiffusionInputs(
        steps=default.steps if steps is None else steps,
        trajectories=default.trajectories if trajectories is None else trajectories,
        scheduler=default.scheduler if scheduler is None else scheduler,
    )


def _triple(flag: str, text: str) -> tuple[float, float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise PtqUsageError(f"{flag} takes one number or three, R,G,B; got {text!r}")
    return values[0], values[1], values[2]


def _given(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source is not click.core.ParameterSource.DEFAULT


def resolve_cli_module(model: str, options: Mapping[str, Any]) -> ModuleSource | None:
    """The model built by code that ``model`` names, after checking the options, or None
    for a language model (whose image options are then refused).

    Raises:
        PtqUsageError: An option that does not apply to the kind of model named.
    """
    from ptq.models.diffusion import DiffusionInputs
    from ptq.models.image_inputs import ImageInputs
    from ptq.models.module_source import resolve_module_source

    ctx = click.get_current_context()
    inputs: Any = None
    image, diffusion = (
        any(_given(ctx, n) for n in names) for names in (IMAGE_OPTIONS, DIFFUSION_OPTIONS)
    )
    if image and diffusion:
        raise PtqUsageError(
            "--image-* options describe an image model, --diffusion-* a denoiser; choose one"
        )
    if diffusion:
        inputs = _diffusion_inputs(options)
    if image:
        default = ImageInputs()
        size, mean, std = (options[n] for n in IMAGE_OPTIONS)
        inputs = ImageInputs(
            size=default.size if size is None else size,
            mean=default.mean if mean is None else _triple("--image-mean", mean),
            std=default.std if std is None else _triple("--image-std", std),
        )
    source = resolve_module_source(
        model, trust_remote_code=bool(options["trust_remote_code"]), inputs=inputs
    )
    if source is None:
        if inputs is not None:
            raise PtqUsageError(
                f"--{inputs.kind}-* options describe a model built by code "
                f"(FILE.py:FUNCTION); {model} is a language model"
            )
        return None
    if isinstance(source.inputs, DiffusionInputs):
        files = [flag for name, flag in FILE_CALIBRATION.items() if _given(ctx, name)]
        if files:
            raise PtqUsageError(
                f"{model} is a diffusion model calibrated on sampling trajectories of random "
                f"latents: drop {', '.join(files)} (use --diffusion-trajectories/-steps)"
            )
    given = [flag for name, flag in LM_ONLY.items() if _given(ctx, name)]
    if options.get("target") not in (None, "ptq"):
        given.append(f"--target {options['target']} (vLLM and ONNX export serve language models)")
    if given:
        raise PtqUsageError(
            f"{model} is a model built by code, quantized in memory; these options are for language "
            f"models: {', '.join(given)}"
        )
    return source
