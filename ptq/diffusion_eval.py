"""``ptq eval OUT`` for a diffusion denoiser: per-timestep error against the FP model.

The quantized model is the output rebuilt (:mod:`ptq.models.module_loader`), the FP model
is built again from the recorded spec (its weights must hash to those quantized). Held-out
trajectories are recorded by the FP model with the output's sampling settings
(:class:`~ptq.models.diffusion.DiffusionInputs`) from seed ``calibration_seed + 1``, so no
calibration latent is reused; at every step both models get the FP trajectory's inputs
and :func:`~ptq.models.denoiser_error.timestep_errors` gives, per timestep bucket, the
SQNR ``10 log10(sum ||y||^2 / sum ||y - y_q||^2)`` and the mean relative error
``||y - y_q|| / ||y||`` of the denoiser output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptq.errors import PtqInputError
from ptq.models.denoiser_error import BucketError

__all__ = ["DiffusionEval", "evaluate_diffusion_output"]


@dataclass(frozen=True)
class DiffusionEval:
    """What :func:`evaluate_diffusion_output` measured."""

    trajectories: int
    steps: int
    seed: int
    buckets: list[BucketError]

    def lines(self) -> list[str]:
        out = [
            f"denoiser output vs FP on {self.trajectories} held-out trajectories x "
            f"{self.steps} steps (seed {self.seed}):"
        ]
        out += [
            f"  {e.label}: SQNR {e.sqnr_db:.2f} dB, relative error {e.rel_error:.4f} "
            f"({e.steps} steps)"
            for e in self.buckets
        ]
        return out


def evaluate_diffusion_output(
    path: Path, *, trajectories: int = 4, buckets: int = 4, trust_remote_code: bool = False
) -> DiffusionEval:
    """Evaluate output ``path`` of a diffusion denoiser (see the module docstring).

    Raises:
        PtqInputError: Not a diffusion model's output, or the factory's weights changed.
    """
    from ptq.image_eval import fp_model
    from ptq.models.denoiser_error import timestep_errors
    from ptq.models.diffusion import DiffusionInputs
    from ptq.models.module_loader import load_quantized_module

    loaded = load_quantized_module(path, trust_remote_code=trust_remote_code)
    inputs = loaded.source.inputs
    if not isinstance(inputs, DiffusionInputs):
        raise PtqInputError(f"{path} is the output of an {inputs.kind} model, not a diffusion one")
    fp = fp_model(loaded, path, trust_remote_code)
    seed = int(loaded.record.get("calibration_seed", 0)) + 1
    held_out = inputs.record(fp, n=trajectories, seed=seed)
    errors = timestep_errors(fp, loaded.model, held_out, buckets)
    return DiffusionEval(trajectories, inputs.steps, seed, errors)
