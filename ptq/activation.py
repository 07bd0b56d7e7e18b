"""Activation fake-quantization: dynamic per-token or per-tensor, static or dynamic.

Dynamic symmetric per-token quantization (as vLLM runs W8A8/W4A8-FP8) uses, per row
``t`` of the flattened input, ``s_t = amax(x_t) / q_max`` and
``x^_t = round_to_grid(x_t / s_t) * s_t``. Static scales come from calibration.
"""

from __future__ import annotations

import torch

from ptq.formats import FP8_E4M3, FP8_E5M2, FloatFormat, IntFormat
from ptq.formats.minifloat import round_to_float_grid
from ptq.scheme import ActivationScheme

_NATIVE_FP8 = {FP8_E4M3: torch.float8_e4m3fn, FP8_E5M2: torch.float8_e5m2}


def _round(y: torch.Tensor, element: FloatFormat | IntFormat) -> torch.Tensor:
    native = _NATIVE_FP8.get(element) if isinstance(element, FloatFormat) else None
    if native is not None:
        # torch's cast rounds to nearest-even; clamping first makes it saturate (tested
        # bit-equal to round_to_float_grid)
        return y.clamp(-element.max_value, element.max_value).to(native).float()
    if isinstance(element, FloatFormat):
        return round_to_float_grid(y, element)
    return torch.clamp(torch.round(y), element.qmin, element.qmax)


def dynamic_scale(x: torch.Tensor, act: ActivationScheme) -> torch.Tensor:
    """Per-token (``[..., 1]``) or per-tensor scale of ``x`` for symmetric quantization."""
    a = x.abs()
    amax = a.amax(dim=-1, keepdim=True) if act.granularity == "token" else a.amax()
    scale = amax.float() / act.element.max_value
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fake_quantize_activation(
    x: torch.Tensor, act: ActivationScheme, static_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize ``x`` per ``act``; returns the dtype of ``x``."""
    xf = x.float()
    if not act.symmetric:
        assert isinstance(act.element, IntFormat)
        el = act.element
        dims = -1 if act.granularity == "token" else tuple(range(xf.dim()))
        lo = torch.clamp(xf.amin(dim=dims, keepdim=True), max=0.0)
        hi = torch.clamp(xf.amax(dim=dims, keepdim=True), min=0.0)
        scale = (hi - lo) / (el.qmax - el.qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.clamp(torch.round(el.qmin - lo / scale), el.qmin, el.qmax)
        q = torch.clamp(torch.round(xf / scale) + zp, el.qmin, el.qmax)
        return ((q - zp) * scale).to(x.dtype)
    if act.dynamic:
        scale = dynamic_scale(xf, act)
    elif static_scale is None:
        raise ValueError("static activation quantization needs a calibrated scale")
    else:
        scale = static_scale.float()
    return (_round(xf / scale, act.element) * scale).to(x.dtype)
