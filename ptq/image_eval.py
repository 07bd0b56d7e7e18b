"""``ptq eval OUT`` for an image model: the quantized model against its FP model.

On ``n`` held-out crops (:mod:`ptq.models.image_inputs`, never a calibration image: their
SHA-256 are in the output and any match is refused) both models are run; with ``y`` the
FP output and ``y_q`` the quantized one per sample:

* top-1 agreement: the fraction of samples with ``argmax y_q = argmax y``;
* relative output error: the mean over samples of ``||y_q - y||_2 / ||y||_2``.

The quantized model is the output rebuilt (:mod:`ptq.models.module_loader`), so the
figures are the artifact's; the FP model is built again from the recorded spec, and its
weights must hash to what was quantized (a factory that now builds other weights is
refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ptq.errors import PtqInputError

if TYPE_CHECKING:
    from ptq.models.module_loader import LoadedModule

__all__ = ["ImageEval", "compare_outputs", "evaluate_image_output", "fp_model"]

EVAL_SEED = 1
BATCH = 25


@dataclass(frozen=True)
class ImageEval:
    """What :func:`evaluate_image_output` measured."""

    samples: int
    images: int
    size: int
    agreement: float
    relative_error: float

    def lines(self) -> list[str]:
        where = f"{self.samples} crops of {self.images} held-out images, {self.size}x{self.size}"
        return [
            f"top-1 agreement with FP: {self.agreement:.4f} ({where})",
            f"relative output error ||y_q - y_fp|| / ||y_fp||: {self.relative_error:.5f} "
            "(mean over crops)",
        ]


@torch.no_grad()
def _outputs(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    outs = []
    for b in x.split(BATCH):
        y = model(**{name: b})
        if not isinstance(y, torch.Tensor):
            raise PtqInputError(
                f"{type(model).__name__} returns {type(y).__name__}; image evaluation needs a "
                "tensor of scores per sample"
            )
        outs.append(y.float().reshape(b.shape[0], -1))
    return torch.cat(outs)


def compare_outputs(fp: torch.Tensor, quant: torch.Tensor) -> tuple[float, float]:
    """``(top-1 agreement, mean relative output error)`` of ``[n, classes]`` outputs."""
    agree = float((quant.argmax(-1) == fp.argmax(-1)).float().mean())
    rel = (quant - fp).norm(dim=-1) / fp.norm(dim=-1).clamp_min(torch.finfo(fp.dtype).tiny)
    return agree, float(rel.mean())


def fp_model(loaded: LoadedModule, path: Path, trust_remote_code: bool) -> nn.Module:
    """The FP model of output ``path``, built again; its weights must hash to those quantized.

    Raises:
        PtqInputError: The factory now builds other weights.
    """
    from ptq.models.module_source import weights_digest

    fp = loaded.source.build(trust_remote_code=trust_remote_code)
    if weights_digest(fp) != loaded.record.get("weights_sha256"):
        raise PtqInputError(
            f"{loaded.source.spec} now builds other weights than those quantized into {path}; "
            "a factory must return the same weights on every call"
        )
    return fp


def evaluate_image_output(
    path: Path,
    *,
    images: Path | None = None,
    samples: int = 100,
    seed: int = EVAL_SEED,
    trust_remote_code: bool = False,
) -> ImageEval:
    """Evaluate output ``path`` of an image model (see the module docstring).

    Args:
        path: The output folder.
        images: A folder of held-out images (default: matplotlib's sample photos).
        samples: Crops to evaluate on.
        seed: Seed of the random crops.
        trust_remote_code: Allow a factory's code to run (to rebuild the model).

    Raises:
        PtqInputError: An evaluation image was a calibration image, the factory's
            weights changed, or the output is not an image model's.
    """
    from ptq.models.image_inputs import ImageInputs, default_eval_images, file_digest, image_files
    from ptq.models.module_loader import load_quantized_module

    loaded = load_quantized_module(path, trust_remote_code=trust_remote_code)
    files = image_files(images) if images is not None else default_eval_images()
    calibration = set(loaded.record.get("calibration_sha256", []))
    for f in files:
        if file_digest(f) in calibration:
            raise PtqInputError(
                f"{f} is a calibration image of {path}; evaluate on held-out images"
            )
    fp = fp_model(loaded, path, trust_remote_code)
    inputs = loaded.source.inputs
    if not isinstance(inputs, ImageInputs):
        raise PtqInputError(f"{path} is not an image model's output (inputs: {inputs.kind})")
    if inputs.input_name is None:
        raise PtqInputError(f"{path / 'config.json'}: ptq_module inputs have no input_name")
    x = inputs.samples(files, samples, seed)
    agree, rel = compare_outputs(
        _outputs(fp, inputs.input_name, x), _outputs(loaded.model, inputs.input_name, x)
    )
    return ImageEval(samples, min(samples, len(files)), inputs.size, agree, rel)
