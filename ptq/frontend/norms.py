"""Normalisation layers: which modules are norms, and how each applies its weight.

Passes that fold a per-channel scale into a norm (SmoothQuant) or fold the norm into
the linears reading it (rotation) need the norm's *style*, found by running the module
on a probe rather than from its class name:

* ``rms``: ``y = w * x / sqrt(mean(x^2) + eps)`` (Llama, Qwen, Mistral, Phi-3, Mixtral);
* ``rms_1p``: ``y = (1 + w) * x / sqrt(mean(x^2) + eps)`` (Gemma: a zero weight is the
  identity scale);
* ``layer``: ``y = w * (x - mean(x)) / sqrt(var(x) + eps) + b`` (LayerNorm: OPT, GPT-2).

:func:`norm_scale` and :func:`set_norm_scale` read and write the effective scale
``w`` (or ``1 + w``) whatever the style.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ptq.frontend.structure import NormStyle

NORM_EXCLUDE = ("BatchNorm", "GroupNorm", "InstanceNorm")


def is_norm_module(module: nn.Module) -> bool:
    """LayerNorm/RMSNorm modules, including transformers' ``LlamaRMSNorm`` and friends."""
    if isinstance(module, nn.LayerNorm | nn.RMSNorm):
        return True
    name = type(module).__name__
    return "Norm" in name and not any(x in name for x in NORM_EXCLUDE)


def _vector(module: nn.Module, name: str) -> torch.Tensor | None:
    t = getattr(module, name, None)
    return t if isinstance(t, torch.Tensor) and t.dim() == 1 else None


@torch.no_grad()
def norm_style(module: nn.Module, name: str = "") -> NormStyle:
    """The style of norm ``module`` (see the module docstring), found by probing a copy.

    Raises:
        ValueError: ``module`` has no 1-D ``weight`` or behaves like none of the styles
            (the message names it).
    """
    weight = _vector(module, "weight")
    where = f"{name} ({type(module).__name__})" if name else type(module).__name__
    if weight is None:
        raise ValueError(f"norm {where} has no 1-D weight to fold")
    probe = copy.deepcopy(module)
    probe._forward_hooks.clear()
    probe._forward_pre_hooks.clear()
    if any(t.is_meta for t in probe.parameters()):
        probe = probe.to_empty(device="cpu")
    probe = probe.float().cpu()
    width = weight.shape[0]
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0)) * 2.0 + 3.0
    bias = _vector(probe, "bias")
    if bias is not None:
        bias.zero_()
    w = _vector(probe, "weight")
    assert w is not None
    w.zero_()
    zero = probe(x)
    one_plus = bool(zero.abs().max() > 1e-3)
    if not one_plus:
        w.fill_(1.0)
    y = probe(x)
    rms = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    centred = x - x.mean(-1, keepdim=True)
    ln = centred / centred.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    if torch.allclose(y, rms, atol=1e-3):
        return "rms_1p" if one_plus else "rms"
    if torch.allclose(y, ln, atol=1e-3) and not one_plus:
        return "layer"
    raise ValueError(
        f"norm {where} is neither an RMSNorm (w or 1 + w) nor a LayerNorm: ptq cannot fold "
        "a scale into it"
    )


def norm_scale(module: nn.Module, style: NormStyle) -> torch.Tensor:
    """The effective per-channel scale of a norm (float64 copy): ``w`` or ``1 + w``."""
    w = _vector(module, "weight")
    assert w is not None
    s = w.detach().double()
    return s + 1.0 if style == "rms_1p" else s


def set_norm_scale(module: nn.Module, style: NormStyle, scale: torch.Tensor) -> None:
    """Set a norm's effective scale (``w = scale``, or ``w = scale - 1`` for ``rms_1p``)."""
    w = _vector(module, "weight")
    assert w is not None
    value = scale - 1.0 if style == "rms_1p" else scale
    with torch.no_grad():
        w.copy_(value.to(w.dtype))


def norm_bias(module: nn.Module) -> torch.Tensor | None:
    """A LayerNorm's bias (None when it has none)."""
    return _vector(module, "bias")
