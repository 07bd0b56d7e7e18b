"""Compose the standard pipeline from CLI-style options (the same for the Python API).

Order: ``[rotation] [smoothquant] [bit_allocation] weight-pass (wrapped by LoRC / bias
correction) [act_calibration for static activations] [kv_cache]``: transforms that
reshape the FP model run first, the allocation measures sensitivities of the transformed
weights and sets each layer's format, the weight pass quantizes, calibration of static
scales follows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from ptq.errors import PtqUsageError
from ptq.pipeline import Pass
from ptq.scheme import Scheme

if TYPE_CHECKING:
    from ptq.passes.kv_cache import KVDtype
    from ptq.passes.lorc import FactorFormat


def build_passes(
    scheme: Scheme,
    *,
    method: str = "rtn",
    knobs: dict[str, Any] | None = None,
    smoothquant: str | None = None,
    rotate: bool = False,
    rotate_online: bool = False,
    lorc: int | None = None,
    lorc_format: str = "fp16",
    bias_correction: bool = False,
    stats_tuning: bool = False,
    kv_cache: str | None = None,
    allocation: Pass | None = None,
) -> list[Pass]:
    """Passes for a ``ptq quantize`` command line.

    Args:
        scheme: The scheme (static activations add an activation-calibration pass).
        method: Weight rounding method (``rtn``, ``gptq``, ``adaround``, ``adaquant``,
            ``zeroquant_fp``).
        knobs: Options of the method's config (e.g. ``percdamp``).
        smoothquant: ``"search"`` (per-group alpha search) or an alpha in [0, 1].
        rotate: Fuse randomised Hadamard rotations into the weights (QuaRot).
        rotate_online: Also rotate ``down_proj``'s input online (emulation only).
        lorc: Low-rank compensation rank, or None.
        lorc_format: Storage of the LoRC factors.
        bias_correction: Re-estimate biases for activation-quantized layers.
        stats_tuning: Fit every layer's per-channel output gain and bias (Hubara et al.).
        kv_cache: ``fp8_e4m3`` or ``int8`` KV-cache quantization, or None.
        allocation: A :class:`~ptq.passes.bit_allocation.BitAllocationPass` (mixed
            precision within a budget); the weight pass is then wrapped so that LoRC
            candidates the allocation picks get their factors.

    Raises:
        PtqUsageError: bad options, or ``lorc`` with ``allocation`` (the allocation
            chooses LoRC per layer through ``+lorc`` candidates).
    """
    from ptq.passes.registry import make_weight_pass

    passes: list[Pass] = []
    try:
        if rotate or rotate_online:
            from ptq.passes.rotation import RotationConfig, RotationPass

            passes.append(RotationPass(RotationConfig(online_down_proj=rotate_online)))
        if smoothquant is not None:
            from ptq.passes.smoothquant import SmoothQuantConfig, SmoothQuantPass

            cfg = (
                SmoothQuantConfig(search=True)
                if smoothquant == "search"
                else SmoothQuantConfig(alpha=float(smoothquant))
            )
            passes.append(SmoothQuantPass(cfg))
        weight = make_weight_pass(method, **(knobs or {}))
        if allocation is not None:
            from ptq.passes.bit_allocation import AllocatedLoRCPass

            if lorc is not None:
                raise ValueError(
                    "--lorc with a budget: let the allocation choose LoRC per layer with "
                    "'+lorc' candidates (e.g. --candidates int4_g64,int4_g64+lorc16,fp16)"
                )
            passes.append(allocation)
            weight = AllocatedLoRCPass(weight)
        if lorc is not None:
            from ptq.passes.lorc import LoRCConfig, LoRCPass

            weight = LoRCPass(
                weight, LoRCConfig(rank=lorc, factor_format=cast("FactorFormat", lorc_format))
            )
        static = scheme.activation is not None and not scheme.activation.dynamic
        inner: list[Pass] = [weight]
        if static:
            from ptq.passes.act_calibration import ActCalibrationPass

            inner.append(ActCalibrationPass())
        if bias_correction and stats_tuning:
            raise PtqUsageError("choose --bias-correction or --stats-tuning (it includes it)")
        if bias_correction or stats_tuning:
            from ptq.passes.bias_correction import BiasCorrectionConfig, BiasCorrectionPass

            config = BiasCorrectionConfig(activation_quantized_only=False, gain=True)
            passes.append(
                BiasCorrectionPass(
                    inner if len(inner) > 1 else inner[0], config if stats_tuning else None
                )
            )
        else:
            passes.extend(inner)
        if kv_cache is not None:
            from ptq.passes.kv_cache import KVCacheConfig, KVCachePass

            passes.append(KVCachePass(KVCacheConfig(dtype=cast("KVDtype", kv_cache))))
    except (ValueError, TypeError) as exc:
        raise PtqUsageError(str(exc)) from None
    return passes
