"""Compose the standard pipeline from CLI-style options (the same for the Python API).

Order: ``[rotation] [smoothquant] [bit_allocation] [awq] weight-pass (wrapped by LoRC /
bias correction) [act_calibration for static activations] [kv_cache]``: transforms that
reshape the FP model run first, the allocation measures sensitivities of the transformed
weights and sets each layer's format, AWQ scales and clips for those formats, the weight
pass quantizes, calibration of static scales follows.

The default method (:func:`default_method`) is the best one measured for the scheme:
AWQ + GPTQ for weights of 4 bits or fewer when calibration text is available (SmolLM2
INT4 g64: docs/rounding.md), GPTQ alone for a model without repeated blocks (AWQ's
producer -> readers groups are a block's), round-to-nearest otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from ptq.errors import PtqUsageError
from ptq.pipeline import Pass
from ptq.scheme import Scheme

if TYPE_CHECKING:
    from ptq.passes.act_calibration import ObserverName
    from ptq.passes.kv_cache import KVDtype
    from ptq.passes.lorc import FactorFormat


LOW_BITS = 4
BEST_LOW_BIT_METHOD = "awq+gptq"
BLOCKLESS_LOW_BIT_METHOD = "gptq"


def default_method(scheme: Scheme, calibration: bool, *, repeated_blocks: bool = True) -> str:
    """``--method`` when none is given: :data:`BEST_LOW_BIT_METHOD` for weights of
    :data:`LOW_BITS` bits or fewer if calibration text is available
    (:data:`BLOCKLESS_LOW_BIT_METHOD` for a model without repeated blocks, such as a CNN),
    else ``rtn``."""
    if not calibration or scheme.weight.bits > LOW_BITS:
        return "rtn"
    return BEST_LOW_BIT_METHOD if repeated_blocks else BLOCKLESS_LOW_BIT_METHOD


def build_passes(
    scheme: Scheme,
    *,
    method: str = "rtn",
    rounding: str = "nearest",
    act_observer: str | None = None,
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
        method: Weight method (``rtn``, ``gptq``, ``adaround``, ``adaquant``,
            ``zeroquant_fp``), optionally after ``awq+`` (``awq`` alone: AWQ + RTN).
        rounding: ``nearest`` or ``stochastic`` (RTN only).
        act_observer: Observer of static activation ranges (``minmax``, ``percentile``,
            ``mse``, ``kl``); only with a static activation scheme.
        knobs: Options of the method's passes (e.g. ``percdamp``), each routed to the
            pass whose config has it.
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
    from ptq.passes.registry import make_method_passes

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
        options = dict(knobs or {})
        if rounding != "nearest":
            if method.split("+")[-1] not in ("rtn", "awq"):
                raise ValueError(f"--rounding {rounding} applies to RTN (--method rtn or awq)")
            options["rounding"] = rounding
        *pre, weight = make_method_passes(method, **options)
        if allocation is not None:
            from ptq.passes.bit_allocation import AllocatedLoRCPass

            if lorc is not None:
                raise ValueError(
                    "--lorc with a budget: let the allocation choose LoRC per layer with "
                    "'+lorc' candidates (e.g. --candidates int4_g64,int4_g64+lorc16,fp16)"
                )
            passes.append(allocation)
            weight = AllocatedLoRCPass(weight)
        passes.extend(pre)
        if lorc is not None:
            from ptq.passes.lorc import LoRCConfig, LoRCPass

            weight = LoRCPass(
                weight, LoRCConfig(rank=lorc, factor_format=cast("FactorFormat", lorc_format))
            )
        static = scheme.activation is not None and not scheme.activation.dynamic
        inner: list[Pass] = [weight]
        if act_observer is not None and not static:
            raise ValueError(
                "--act-observer chooses static activation ranges: give a static activation "
                "format (e.g. --act-format int8_tensor_static)"
            )
        if static:
            from ptq.passes.act_calibration import ActCalibrationConfig, ActCalibrationPass

            calib = (
                ActCalibrationConfig()
                if act_observer is None
                else ActCalibrationConfig(observer=cast("ObserverName", act_observer))
            )
            inner.append(ActCalibrationPass(calib))
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
