"""Where a ptq output runs: vLLM, ONNX Runtime (after ``ptq export``), ptq itself.

Three things, all computed from the plan, the scheme and the passes:

* :func:`check_target` refuses, before anything is written, what the requested runtime
  would not apply: LoRC factors, the online ``down_proj`` Hadamard, KV-cache scales it
  does not read (one ``PtqUsageError`` naming the option and the target that takes it);
* :func:`target_candidates` narrows ``--budget``'s candidate formats to those the target
  serves (ptq-only formats such as INT3 need ``--target ptq``);
* :func:`serving_summary` is the closing line of ``ptq quantize``: each runtime that
  serves the written output (and on which devices), and why vLLM cannot where it cannot.

Runtimes: ``vllm`` (compressed-tensors; rules in :mod:`ptq.exporters.vllm_support`),
``onnx`` (``ptq export --onnx``: INT2-8 and FP8 weights, LoRC as two MatMuls, no KV-cache
quantization, no online Hadamard, no mixture-of-experts blocks), ``ptq`` (the emulated model of ``ptq eval``: every
format and pass).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ptq.errors import PtqUsageError
from ptq.formats import FloatFormat, IntFormat
from ptq.formats.qformat import QuantFormat
from ptq.plan import LayerPlan, QuantPlan
from ptq.scheme import ActivationScheme, Scheme

TARGETS = ("vllm", "onnx", "ptq")
RUNTIME_NAMES = {"vllm": "vLLM", "onnx": "ONNX Runtime (after `ptq export --onnx`)", "ptq": "ptq"}
ONNX_FP8 = ("fp8_e4m3", "fp8_e5m2")
MOE_CPU = (
    "its CPU build has no quantized mixture-of-experts kernel (WNA16, INT8 and FP8 MoE "
    "are refused at load)"
)


@dataclass(frozen=True)
class PipelineFeatures:
    """What the passes add beyond per-layer formats."""

    lorc: bool = False
    online_hadamard: bool = False
    kv_cache: str | None = None


def _walk(passes: Sequence[Any]) -> Iterator[Any]:
    for p in passes:
        yield p
        inner = getattr(p, "inner", None)
        if inner is not None:
            yield from _walk(inner if isinstance(inner, list | tuple) else [inner])


def pipeline_features(passes: Sequence[Any]) -> PipelineFeatures:
    """LoRC, online rotation and KV-cache quantization among ``passes`` (wrappers too)."""
    lorc, online, kv = False, False, None
    for p in _walk(passes):
        name, config = getattr(p, "name", ""), getattr(p, "config", None)
        if name == "lorc" or (
            name == "bit_allocation" and "+lorc" in str(getattr(config, "candidates", ""))
        ):
            lorc = True
        elif name == "rotation" and getattr(config, "online_down_proj", False):
            online = True
        elif name == "kv_cache":
            kv = str(getattr(config, "dtype", "fp8_e4m3"))
    return PipelineFeatures(lorc, online, kv)


def _refusal(target: str, features: PipelineFeatures) -> str | None:
    if target == "ptq":
        return None
    runtime = "vLLM" if target == "vllm" else "ONNX Runtime"
    if features.lorc and target == "vllm":
        return (
            "LoRC factors (--lorc, '+lorc' candidates) are not applied by vLLM (it has no "
            "low-rank branch and refuses the weight_lorc_u/v tensors); use --target onnx or "
            "--target ptq"
        )
    if features.online_hadamard:
        return (
            f"the online down_proj Hadamard (rotation online_down_proj) is not applied by "
            f"{runtime}; drop it (offline --rotate is served) or use --target ptq"
        )
    if features.kv_cache is not None and target == "onnx":
        return "KV-cache scales (--kv-cache) are not applied by the ONNX export; use --target ptq"
    if features.kv_cache == "int8" and target == "vllm":
        return (
            "--kv-cache int8: vLLM reads FP8 KV-cache scales only; use --kv-cache fp8_e4m3 or "
            "--target ptq"
        )
    return None


def check_target(target: str, passes: Sequence[Any]) -> None:
    """Refuse what ``target`` would silently drop.

    Raises:
        PtqUsageError: Unknown target, or a pass whose effect the target does not apply.
    """
    if target not in TARGETS:
        raise PtqUsageError(f"unknown --target {target!r}; valid: {', '.join(TARGETS)}")
    why = _refusal(target, pipeline_features(passes))
    if why is not None:
        raise PtqUsageError(f"--target {target}: {why}")


def onnx_layer_problem(fmt: QuantFormat, act: ActivationScheme | None) -> str | None:
    """Why ``ptq export --onnx`` cannot write a layer, or None."""
    el = fmt.element
    if isinstance(el, FloatFormat) and el.name not in ONNX_FP8:
        return f"{el.name} weights have no ONNX encoding (INT2-8 and FP8 only)"
    if fmt.global_scale and not isinstance(el, IntFormat):
        return f"{fmt.name or el.name}: two-level scales have no ONNX encoding"
    if fmt.scale_format not in ("fp32", "fp16", "bf16"):
        return f"{fmt.name or el.name}: {fmt.scale_format} scales have no ONNX encoding"
    if isinstance(el, IntFormat) and el.bits > 8:
        return f"INT{el.bits} weights"
    if act is not None and not act.symmetric:
        return "asymmetric activations are not exported to ONNX"
    return None


def kernel_layer_ok(lp: LayerPlan) -> bool:
    """Whether ptq's CUDA kernels (:mod:`ptq.exporters.cuda`) run a layer."""
    from ptq.exporters.cuda.packing import bitstream_name
    from ptq.formats import FP4_E2M1, FP8_E4M3, INT4, INT8, PerChannel, PerGroup

    fmt, act, g = lp.weight, lp.activation, lp.weight.granularity
    el = fmt.element
    four_bit = (el == INT4 and isinstance(g, PerGroup)) or (
        el == FP4_E2M1
        and isinstance(g, PerGroup)
        and (fmt.scale_format, g.size) in (("e4m3", 16), ("e8m0", 32))
    )
    channel = isinstance(g, PerChannel) and fmt.symmetric and el in (INT8, FP8_E4M3)
    if act is None:
        return four_bit or channel or bitstream_name(fmt) is not None
    fp8_token = act.element == FP8_E4M3 and act.dynamic and act.granularity == "token"
    return fp8_token and (four_bit or (channel and el == FP8_E4M3))


def _vllm(layers: Sequence[LayerPlan]) -> tuple[frozenset[str], list[str]]:
    from ptq.exporters.vllm_support import CPU, CUDA, layer_verdict

    devices, reasons = frozenset({CPU, CUDA}), []
    for lp in layers:
        v = layer_verdict(lp.weight, lp.activation, lp.out_features, lp.in_features)
        devices &= v.devices
        if v.why_not and v.why_not not in reasons and v.devices != {CPU, CUDA}:
            reasons.append(v.why_not)
    return devices, reasons


def format_served(target: str, fmt: QuantFormat | None, act: ActivationScheme | None) -> bool:
    """Whether ``target`` serves a layer of this format (None: kept dense) on some device."""
    if fmt is None or target == "ptq":
        return True
    if target == "onnx":
        return onnx_layer_problem(fmt, act) is None
    from ptq.exporters.vllm_support import layer_verdict

    return bool(layer_verdict(fmt, act, 4096, 4096).devices)


def target_candidates(target: str, candidates: str, scheme: Scheme, explicit: bool) -> str:
    """``--candidates`` narrowed to what ``target`` serves (LoRC ones too, for vLLM).

    Raises:
        PtqUsageError: ``explicit`` candidates the target does not serve (the message
            names them), or none left.
    """
    from ptq.passes.allocation import parse_candidates

    try:
        cands = parse_candidates(candidates)
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None
    bad = [
        c.name
        for c in cands
        if not format_served(target, c.fmt, scheme.activation)
        or (c.lorc_rank and _refusal(target, PipelineFeatures(lorc=True)))
    ]
    if bad and explicit:
        raise PtqUsageError(
            f"--target {target} cannot serve candidate(s) {', '.join(bad)}; drop them or "
            "use --target ptq"
        )
    kept = [c.name for c in cands if c.name not in bad]
    if not kept:
        raise PtqUsageError(f"--target {target} serves none of the candidates {candidates}")
    return ",".join(kept)


def serving_summary(plan: QuantPlan, passes: Sequence[Any]) -> str:
    """One line: the runtimes that serve the output, and why vLLM does not where it does not."""
    layers = list(plan)
    features = pipeline_features(passes)
    served, not_served = [], []
    devices, reasons = _vllm(layers)
    moe = plan.structure is not None and bool(plan.structure.routers())
    if moe and devices:  # per-expert Linears: vLLM's fused-MoE kernels, none on CPU
        from ptq.exporters.vllm_support import CPU

        devices = devices - {CPU}
        reasons.insert(0, MOE_CPU)
    refusal = _refusal("vllm", features)
    if refusal is None and devices:
        where = "CPU and CUDA" if len(devices) == 2 else f"{next(iter(devices)).upper()} only"
        extra = f": {'; '.join(reasons)}" if len(devices) == 1 and reasons else ""
        served.append(f"vLLM ({where}{extra})")
    else:
        why = refusal.split(";")[0] if refusal else "; ".join(reasons[:3])
        not_served.append(f"not vLLM: {why}")
    onnx_problems = sorted(
        {p for lp in layers if (p := onnx_layer_problem(lp.weight, lp.activation))}
    )
    if _refusal("onnx", features) is None and not onnx_problems and not moe:
        served.append(RUNTIME_NAMES["onnx"])
    plain = features == PipelineFeatures()
    if plain and layers and all(kernel_layer_ok(lp) for lp in layers):
        served.append("ptq's CUDA kernels")
    served.append("ptq (`ptq eval`, emulated)")
    line = "runs on: " + ", ".join(served)
    return line + (f"; {'; '.join(not_served)}" if not_served else "")
