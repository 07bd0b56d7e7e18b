"""Diffusion denoisers: calibration inputs recorded along sampling trajectories.

A denoiser ``eps_theta(x_t, t, c)`` (a diffusers ``UNet2DModel`` or
``UNet2DConditionModel``) is called once per sampling step on a latent whose statistics
change with the timestep, so its activations (and the layers' input rows that GPTQ and
AdaRound fit on) differ from step to step. Calibration therefore records the inputs it
really receives along whole trajectories (Q-Diffusion, Li et al., 2023: time-step-aware
calibration) rather than one timestep:

1. ``n`` latents ``x_T ~ N(0, I)`` (and, for a conditional UNet, ``n`` random encoder
   states ``c ~ N(0, I)`` of ``text_tokens x cross_attention_dim``, fixed per trajectory)
   are denoised together by the floating-point model with DDIM (Song et al., 2021,
   ``eta = 0``) or DDPM (Ho et al., 2020) over ``steps`` timesteps
   ``t_0 > ... > t_{S-1}``; step ``s`` records ``(x_{t_s}, t_s, c)``.
2. Calibration batches mix timesteps: batch ``j`` holds trajectory ``i`` at step
   ``(j + floor(i S / n)) mod S`` for every ``i`` (a Latin-square arrangement), each
   sample with its own timestep (a ``[n]`` timestep tensor). Every (trajectory, step)
   pair is used exactly once, and every batch spans the timesteps, so statistics cached
   from the first batches (the first input rows of a Linear) are not those of one step.

The scheduler is diffusers' with Stable Diffusion's noise schedule (1000 training steps,
``beta`` scaled-linear from 0.00085 to 0.012; DDIM's steps "leading"). Evaluation
(:mod:`ptq.models.denoiser_error`) feeds the FP trajectory's step inputs of *other*
latents (another seed) to both models, step by step.

Example:
    >>> unet = small_unet()
    >>> cal = DiffusionInputs(steps=10).record(unet, n=4, seed=0).calibration_batches()
    >>> q = ptq.quantize(unet, scheme, calibration=cal).model
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from ptq.errors import PtqInputError, PtqUsageError
from ptq.models.model_inputs import Calibration

__all__ = [
    "SCHEDULERS",
    "DiffusionInputs",
    "Trajectories",
    "denoise",
    "random_unet",
    "small_unet",
]

SCHEDULERS: Final = ("ddim", "ddpm")
TRAIN_STEPS: Final = 1000
BETA_START: Final = 0.00085
BETA_END: Final = 0.012
INSTALL_HINT: Final = "pip install 'ptq[diffusion]' (diffusers, installed with --no-deps)"


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise PtqInputError(
            f"diffusion models need the diffusers package: {INSTALL_HINT}"
        ) from None
    return diffusers


def random_unet(
    *,
    conditional: bool = True,
    sample_size: int = 32,
    channels: tuple[int, int] = (32, 64),
    in_channels: int = 4,
    seed: int = 0,
) -> nn.Module:
    """A random-init diffusers UNet with two resolution levels (the same weights for the
    same arguments; the global RNG is left as it was).

    ``conditional``: a ``UNet2DConditionModel`` (a cross-attention down and up block,
    attending to ``channels[0]``-wide encoder states), else an unconditional
    ``UNet2DModel`` (self-attention blocks). One ResNet per level, 8-channel attention
    heads, GroupNorm of 8 groups.
    """
    diffusers = _diffusers()
    common: dict[str, Any] = {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "block_out_channels": channels,
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if conditional:
            model: nn.Module = diffusers.UNet2DConditionModel(
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=channels[0],
                **common,
            )
        else:
            model = diffusers.UNet2DModel(
                down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                **common,
            )
    return model.eval()


def small_unet() -> nn.Module:
    """The benchmark's denoiser: :func:`random_unet` with its defaults (seed 0).

    A ``UNet2DConditionModel`` on 32x32 latents of 4 channels, levels of 32 and 64
    channels, cross-attention to 32-wide encoder states: 0.8 M parameters, 83
    convolutions and Linears (attention projections, GEGLU feed-forwards, the
    timestep-embedding MLP and each ResNet's timestep projection).
    """
    return random_unet()


def denoise(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The denoiser's output tensor for one input dict (``.sample`` of a diffusers output)."""
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise PtqInputError(
        f"{type(model).__name__} returned {type(out).__name__}: expected a tensor, a tuple "
        "starting with one, or an object with .sample"
    )


@dataclass
class Trajectories:
    """Denoiser inputs along ``S`` sampling steps of ``n`` latents.

    Attributes:
        latents: ``[S, n, C, H, W]``: ``x_{t_s}`` as fed at step ``s``.
        timesteps: ``[S]`` integer timesteps, decreasing.
        cond: ``[n, L, D]`` encoder states (None: an unconditional model).
        final: ``[n, C, H, W]``: the sample after the last step (None: not recorded).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    cond: torch.Tensor | None
    final: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def n(self) -> int:
        return int(self.latents.shape[1])

    def step_inputs(self, s: int) -> dict[str, torch.Tensor]:
        """The model's input dict at step ``s`` (all ``n`` latents at timestep ``t_s``)."""
        t = self.timesteps[s].expand(self.n).clone()
        return self._inputs(self.latents[s], t, self.cond)

    def calibration_batches(self) -> list[dict[str, torch.Tensor]]:
        """``S`` input dicts of ``n`` samples, each batch spanning the timesteps (module
        docstring, step 2)."""
        steps, n = self.steps, self.n
        batches = []
        for j in range(steps):
            which = torch.tensor([(j + i * steps // n) % steps for i in range(n)])
            x = self.latents[which, torch.arange(n)]
            batches.append(self._inputs(x, self.timesteps[which], self.cond))
        return batches

    @staticmethod
    def _inputs(
        x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        out = {"sample": x.contiguous(), "timestep": t}
        if cond is not None:
            out["encoder_hidden_states"] = cond
        return out


@dataclass(frozen=True, kw_only=True)
class DiffusionInputs:
    """How a denoiser's calibration (and evaluation) inputs are made (module docstring).

    Attributes:
        steps: Sampling steps per trajectory.
        scheduler: ``ddim`` (deterministic, ``eta = 0``) or ``ddpm`` (ancestral noise,
            seeded).
        text_tokens: Length ``L`` of the random encoder states of a conditional model.
        trajectories: How many latents ``ptq quantize`` calibrates on (:meth:`batches`).
        model: The denoiser :meth:`bound_to` bound (never serialised or compared).
    """

    kind: str = field(default="diffusion", init=False)
    steps: int = 10
    scheduler: str = "ddim"
    text_tokens: int = 8
    trajectories: int = 8
    model: nn.Module | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if min(self.steps, self.text_tokens, self.trajectories) < 1:
            raise PtqInputError(
                f"diffusion steps, text tokens and trajectories must be at least 1, got "
                f"{self.steps}, {self.text_tokens}, {self.trajectories}"
            )
        if self.scheduler not in SCHEDULERS:
            raise PtqInputError(
                f"unknown diffusion scheduler {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "steps": self.steps,
            "scheduler": self.scheduler,
            "text_tokens": self.text_tokens,
            "trajectories": self.trajectories,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiffusionInputs:
        return cls(
            steps=int(data["steps"]),
            scheduler=str(data["scheduler"]),
            text_tokens=int(data["text_tokens"]),
            trajectories=int(data["trajectories"]),
        )

    def bound_to(self, model: nn.Module) -> DiffusionInputs:
        """These inputs bound to the denoiser whose trajectories :meth:`calibration`
        records (:class:`~ptq.models.model_inputs.ModelInputs`; not serialised).

        Raises:
            PtqInputError: ``model`` is not a diffusers-style denoiser.
        """
        _latent_spec(model)
        return replace(self, model=model)

    def batches(self, model: nn.Module, seed: int) -> list[dict[str, torch.Tensor]]:
        """Calibration batches: :meth:`record` of ``trajectories`` latents (``seed``), as
        :meth:`Trajectories.calibration_batches`."""
        return self.record(model, n=self.trajectories, seed=seed).calibration_batches()

    def calibration(self, folder: Path | None, samples: int, seed: int) -> Calibration:
        """:meth:`batches` of the bound model (:class:`~ptq.models.model_inputs.ModelInputs`).

        ``samples`` is not read: the number of latents is ``trajectories`` (the command
        line refuses ``--calib-samples`` for a diffusion model). No file is read, so no
        SHA-256 is recorded; the output records the seed instead.

        Raises:
            PtqUsageError: A ``folder`` (a denoiser calibrates on its own trajectories),
                or inputs not bound to a model.
        """
        if folder is not None:
            raise PtqUsageError(
                "a diffusion model calibrates on sampling trajectories of random latents, "
                f"not on files; drop the calibration folder ({folder})"
            )
        if self.model is None:
            raise PtqUsageError("DiffusionInputs.calibration needs bound_to(model) first")
        return Calibration(
            batches=self.batches(self.model, seed),
            sha256=[],
            summary=f"{self.trajectories} {self.scheduler.upper()} trajectories x "
            f"{self.steps} steps of random latents (seed {seed})",
        )

    def make_scheduler(self) -> Any:
        """The diffusers scheduler (Stable Diffusion's schedule), set to ``steps`` steps."""
        diffusers = _diffusers()
        kwargs: dict[str, Any] = {
            "num_train_timesteps": TRAIN_STEPS,
            "beta_start": BETA_START,
            "beta_end": BETA_END,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
        }
        if self.scheduler == "ddim":
            sched = diffusers.DDIMScheduler(set_alpha_to_one=False, **kwargs)
        else:
            sched = diffusers.DDPMScheduler(**kwargs)
        sched.set_timesteps(self.steps)
        return sched

    @torch.no_grad()
    def record(self, model: nn.Module, n: int, seed: int) -> Trajectories:
        """Denoise ``n`` random latents (seeded) with ``model`` and record every step's inputs.

        Raises:
            PtqInputError: ``n < 1``, or the model has no diffusers-style ``config``
                (``in_channels``, ``sample_size``).
        """
        if n < 1:
            raise PtqInputError(f"the number of diffusion trajectories must be at least 1, got {n}")
        channels, size, cond_dim = _latent_spec(model)
        device = next(iter(model.parameters())).device
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, channels, *size, generator=gen)
        cond = (
            None
            if cond_dim is None
            else torch.randn(n, self.text_tokens, cond_dim, generator=gen).to(device)
        )
        sched = self.make_scheduler()
        x = (x * float(sched.init_noise_sigma)).to(device)
        latents = []
        timesteps = sched.timesteps.to(torch.int64).cpu()
        for t in timesteps:
            x_in = sched.scale_model_input(x, t)
            latents.append(x_in.cpu())
            eps = denoise(model, Trajectories._inputs(x_in, t.expand(n).to(device), cond))
            x = sched.step(eps, t, x, generator=gen).prev_sample
        return Trajectories(
            torch.stack(latents), timesteps, None if cond is None else cond.cpu(), x.cpu()
        )


def _latent_spec(model: nn.Module) -> tuple[int, tuple[int, int], int | None]:
    """``(channels, (H, W), cross_attention_dim or None)`` from a diffusers UNet's config."""
    config = getattr(model, "config", None)
    channels = getattr(config, "in_channels", None)
    size = getattr(config, "sample_size", None)
    if not isinstance(channels, int) or size is None:
        raise PtqInputError(
            f"{type(model).__name__} has no diffusers config (in_channels, sample_size): "
            "trajectory calibration needs a diffusers UNet2DModel or UNet2DConditionModel"
        )
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    cond_dim = getattr(config, "cross_attention_dim", None)
    takes_cond = "encoder_hidden_states" in inspect.signature(model.forward).parameters
    if not takes_cond:
        return channels, hw, None
    if isinstance(cond_dim, tuple | list):
        cond_dim = cond_dim[0]
    if not isinstance(cond_dim, int):
        raise PtqInputError(
            f"{type(model).__name__} takes encoder_hidden_states but its config has no "
            "integer cross_attention_dim"
        )
    return channels, hw, cond_dim
