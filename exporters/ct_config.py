"""compressed-tensors ``quantization_config``: args per layer and config groups.

Maps ptq formats to compressed-tensors' ``QuantizationArgs`` fields (``num_bits``,
``type``, ``symmetric``, ``strategy``, ``group_size``, ``block_structure``, ``dynamic``)
and groups layers with identical settings into ``config_groups`` whose ``targets`` are
the layers' full module names (docs/layouts.md).
"""

from __future__ import annotations

from typing import Any

import torch

from ptq import __version__
from ptq.formats import FloatFormat, QuantFormat
from ptq.formats.ct_layout import ct_format_name
from ptq.formats.ct_layout import ct_weight_args as _ct_weight_args
from ptq.plan import LayerPlan
from ptq.scheme import ActivationScheme
from ptq.serialization import format_to_dict

PTQ_PACKED = "ptq-packed"


def producer() -> dict[str, str]:
    """The ``producer`` record: a mapping, as runtimes read it (vLLM calls ``.get`` on it)."""
    return {"name": "ptq", "version": __version__}


def ct_format(fmt: QuantFormat, quantized_activations: bool = False) -> str:
    """The compressed-tensors format for ``fmt``, or ``ptq-packed`` where it has none.

    ``quantized_activations``: the layer quantizes its input too (INT8 W8A8 weights are
    then ``int-quantized``, as llm-compressor writes them).
    """
    return ct_format_name(fmt, quantized_activations) or PTQ_PACKED


def ct_weight_args(fmt: QuantFormat) -> dict[str, Any]:
    """JSON-ready ``QuantizationArgs`` for the weights (ptq layout: our descriptor)."""
    if ct_format_name(fmt) is None:
        return {"num_bits": fmt.element.bits, "ptq_format": format_to_dict(fmt)}
    args = dict(_ct_weight_args(fmt))
    for key, value in args.items():
        if isinstance(value, torch.dtype):
            args[key] = str(value).removeprefix("torch.")
    args.setdefault("group_size", None)
    args.setdefault("block_structure", None)
    args["actorder"] = None
    args["observer"] = "mse" if fmt.clip == "mse" else "minmax"
    return args


def ct_activation_args(act: ActivationScheme | None) -> dict[str, Any] | None:
    if act is None:
        return None
    return {
        "num_bits": act.element.bits,
        "type": "float" if isinstance(act.element, FloatFormat) else "int",
        "symmetric": act.symmetric,
        "group_size": None,
        "strategy": act.granularity,
        "block_structure": None,
        "dynamic": act.dynamic,
        "actorder": None,
        "observer": None if act.dynamic else "minmax",
    }


def build_quantization_config(layers: list[LayerPlan], ignore: list[str]) -> dict[str, Any]:
    """``quantization_config`` with one config group per distinct (weights, activations)."""
    groups: dict[str, dict[str, Any]] = {}
    keyed: dict[str, str] = {}
    formats: set[str] = set()
    for lp in layers:
        w = ct_weight_args(lp.weight)
        a = ct_activation_args(lp.activation)
        fmt_name = ct_format(lp.weight, lp.activation is not None)
        formats.add(fmt_name)
        key = repr((sorted(w.items()), None if a is None else sorted(a.items()), fmt_name))
        if key not in keyed:
            keyed[key] = f"group_{len(keyed)}"
            groups[keyed[key]] = {
                "targets": [],
                "weights": w,
                "input_activations": a,
                "output_activations": None,
                "format": fmt_name,
            }
        groups[keyed[key]]["targets"].append(lp.name)
    overall = formats.pop() if len(formats) == 1 else "mixed-precision"
    return {
        "quant_method": "compressed-tensors",
        "format": overall,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "producer": producer(),
    }
