"""Image inputs of a conv model: which images, how they are cropped and normalised.

An :class:`ImageInputs` is what a model source says about its input (the model spec
says how): a square side ``size`` and a per-channel ``mean``/``std`` in 0..255 pixel
units, so the tensor fed to the model is ``x = (pixels - mean) / std``
(EfficientNet-Lite: ``(pixels - 127) / 128``; torchvision: ImageNet's mean and std
times 255). Samples are drawn from a list of image files: sample ``i`` is image
``i mod n``; the first pass over the images takes each one's central crop (the short side
resized to ``size``), later passes take seeded random crops of 30-100 % of the short side,
flipped with probability 1/2, resized to ``size`` (bilinear) - the usual Inception-style
augmentation, so ``--calib-samples`` can exceed the number of images.

Calibration defaults to the test images that scikit-image (``skimage/data``) and
scikit-learn (``sklearn/datasets/images``) ship; evaluation defaults to matplotlib's
sample photos (``mpl-data/sample_data``), never a calibration image: the SHA-256 of every
calibration file is recorded in the output and ``ptq eval`` refuses any of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import nn

from ptq.errors import PtqInputError
from ptq.models.model_inputs import Calibration
from ptq.models.paths import package_dir

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageInputs",
    "default_calibration_images",
    "default_eval_images",
    "file_digest",
    "image_files",
    "load_image",
]

IMAGE_SUFFIXES: Final = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
IMAGENET_MEAN: Final = (123.675, 116.28, 103.53)
IMAGENET_STD: Final = (58.395, 57.12, 57.375)
MIN_CROP: Final = 0.3


def image_files(folder: Path) -> list[Path]:
    """Every image file directly in ``folder`` (sorted by name).

    Raises:
        PtqInputError: ``folder`` is not a folder or holds no image.
    """
    if not folder.is_dir():
        raise PtqInputError(f"image folder {folder} does not exist or is not a folder")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise PtqInputError(
            f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); give a folder of images"
        )
    return files


def default_calibration_images() -> list[Path]:
    """The test images of scikit-image and scikit-learn (never evaluation images)."""
    out: list[Path] = []
    for package, sub, hint in (
        ("skimage", "data", "pip install scikit-image"),
        ("sklearn", "datasets/images", "pip install scikit-learn"),
    ):
        out += image_files(package_dir(package, hint) / sub)
    return out


def default_eval_images() -> list[Path]:
    """matplotlib's sample photos: held-out images for ``ptq eval`` of an image model."""
    return image_files(package_dir("matplotlib", "pip install matplotlib") / "mpl-data/sample_data")


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (FIPS 180-4)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_image(path: Path) -> torch.Tensor:
    """An image as RGB floats ``[3, H, W]`` in 0..255 (grey and alpha images converted).

    Raises:
        PtqInputError: The file is not a readable image.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise PtqInputError(f"{path} is not a readable image ({exc})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _crop(img: torch.Tensor, size: int, gen: torch.Generator | None) -> torch.Tensor:
    """The central crop of ``img`` (``gen`` None) or a random one (see the module docstring),
    resized to ``size x size``."""
    h, w = img.shape[1:]
    short = min(h, w)
    if gen is None:
        side, y, x, flip = short, (h - short) // 2, (w - short) // 2, False
    else:
        side = max(
            1, int(short * (MIN_CROP + (1 - MIN_CROP) * float(torch.rand(1, generator=gen))))
        )
        y = int(torch.randint(h - side + 1, (1,), generator=gen))
        x = int(torch.randint(w - side + 1, (1,), generator=gen))
        flip = float(torch.rand(1, generator=gen)) < 0.5
    c = img[:, y : y + side, x : x + side]
    c = c.flip(-1) if flip else c
    return F.interpolate(c[None], size=(size, size), mode="bilinear", align_corners=False)[0]


@dataclass(frozen=True, kw_only=True)
class ImageInputs:
    """An image model's input (see the module docstring); a
    :class:`~ptq.models.model_inputs.ModelInputs` of kind ``image``.

    Attributes:
        size: Side of the square input.
        mean: Per-channel mean in pixel units (0..255), subtracted.
        std: Per-channel divisor in pixel units.
        input_name: The ``forward`` argument the image tensor is passed as (None: the
            first parameter of the model's ``forward``, bound by :meth:`bound_to`).
    """

    kind: str = field(default="image", init=False)
    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_name: str | None = None

    def __post_init__(self) -> None:
        if self.size < 8:
            raise PtqInputError(f"image size must be at least 8, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise PtqInputError(
                f"image mean and std need 3 values each, std positive; got {self.mean}, {self.std}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "input_name": self.input_name,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageInputs:
        mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
        if len(mean) != 3 or len(std) != 3:
            raise PtqInputError(f"image inputs need 3 means and stds, got {mean}, {std}")
        return cls(
            size=int(data["size"]),
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            input_name=data.get("input_name"),
        )

    def bound_to(self, model: nn.Module) -> ImageInputs:
        """These inputs with ``input_name`` set (the first parameter of ``model.forward``).

        Raises:
            PtqInputError: ``forward`` takes no argument.
        """
        if self.input_name is not None:
            return self
        import inspect

        params = list(inspect.signature(model.forward).parameters.values())
        if not params or params[0].kind in (params[0].VAR_POSITIONAL, params[0].VAR_KEYWORD):
            raise PtqInputError(
                f"{type(model).__name__}.forward has no named first argument to pass the "
                "image batch as"
            )
        return replace(self, input_name=params[0].name)

    def samples(self, files: Sequence[Path], n: int, seed: int) -> torch.Tensor:
        """``n`` normalised samples ``[n, 3, size, size]`` from ``files`` (module docstring)."""
        if n < 1:
            raise PtqInputError(f"the number of image samples must be at least 1, got {n}")
        images = [load_image(p) for p in files[:n]]
        gen = torch.Generator().manual_seed(seed)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        out = [
            (_crop(images[i % len(images)], self.size, None if i < len(images) else gen) - mean)
            / std
            for i in range(n)
        ]
        return torch.stack(out)

    def calibration(self, folder: Path | None, samples: int, seed: int) -> Calibration:
        """``samples`` crops of the images in ``folder`` (default:
        :func:`default_calibration_images`) as input dicts, with every file's SHA-256.

        Raises:
            PtqInputError: ``folder`` holds no images, or one is unreadable.
        """
        files = image_files(folder) if folder is not None else default_calibration_images()
        return Calibration(
            batches=self.batches(files, samples, seed),
            sha256=digests(files),
            summary=f"{samples} crops of {len(files)} images, {self.size}x{self.size}",
        )

    def batches(
        self, files: Sequence[Path], n: int, seed: int, batch_size: int = 8
    ) -> list[dict[str, torch.Tensor]]:
        """:meth:`samples` as the model's input dicts of ``batch_size`` samples."""
        if self.input_name is None:
            raise ValueError("ImageInputs.batches needs input_name: call bound_to(model) first")
        x = self.samples(files, n, seed)
        return [{self.input_name: b} for b in x.split(batch_size)]


def digests(files: Iterable[Path]) -> list[str]:
    """:func:`file_digest` of each file, sorted (what the output records)."""
    return sorted({file_digest(p) for p in files})
