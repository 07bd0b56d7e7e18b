"""Load a ptq/compressed-tensors output folder back into an emulated PyTorch model.

Each quantized Linear is rebuilt as a :class:`~ptq.qlinear.QuantLinear` from its packed
tensors (so evaluation runs exactly the artifact's numerics); the other weights load as
stored. Formats come from ``ptq_plan.json`` (exact). Outputs of models built by code
(CNNs) are rebuilt by :mod:`ptq.models.module_loader`, with the same layer decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq.errors import PtqInputError
from ptq.formats import QTensor
from ptq.formats.ct_layout import ct_format_name, from_compressed_tensors
from ptq.formats.ptq_layout import from_ptq_layout
from ptq.frontend.experts import unfuse_experts
from ptq.frontend.structure import ModelStructure
from ptq.io.safetensors_reader import SafetensorsIndex
from ptq.models.checkpoint_names import CheckpointNames
from ptq.modules import replace_module
from ptq.plan import LayerPlan, QuantPlan
from ptq.qlinear import QuantLinear

KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")


@dataclass(frozen=True)
class LayerParts:
    """A quantized layer's tensors decoded from an output."""

    qweight: QTensor
    bias: torch.Tensor | None
    input_scale: torch.Tensor | None
    lorc: tuple[torch.Tensor, torch.Tensor] | None


def layer_parts(index: SafetensorsIndex, lp: LayerPlan, path: Path) -> LayerParts:
    """Decode planned layer ``lp`` (its packed weight, bias, input scale, LoRC factors).

    Raises:
        PtqInputError: The tensors do not decode as the plan's format.
    """
    prefix = lp.name + "."
    local = {k[len(prefix) :]: index.get(k) for k in index.names_with_prefix(prefix)}
    bias = local.pop("bias", None)
    input_scale = local.pop("input_scale", None)
    lorc_u, lorc_v = local.pop("weight_lorc_u", None), local.pop("weight_lorc_v", None)
    lorc = (lorc_u, lorc_v) if lorc_u is not None and lorc_v is not None else None
    try:
        if ct_format_name(lp.weight):
            q = from_compressed_tensors(local, lp.weight)
        else:
            q = from_ptq_layout(local)
    except (KeyError, ValueError) as exc:
        raise PtqInputError(f"{path}: layer {lp.name} cannot be decoded: {exc}") from None
    return LayerParts(q, bias, input_scale, lorc)


def read_output(path: Path) -> tuple[dict[str, Any], QuantPlan]:
    """``config.json`` and ``ptq_plan.json`` of a ptq output.

    Raises:
        PtqInputError: Not a quantized ptq output.
    """
    config_data = json.loads((path / "config.json").read_text())
    if "quantization_config" not in config_data:
        raise PtqInputError(f"{path} is not a quantized output (no quantization_config)")
    plan_file = path / "ptq_plan.json"
    if not plan_file.is_file():
        raise PtqInputError(
            f"{path} has no ptq_plan.json; only ptq outputs can be loaded for emulation"
        )
    return config_data, QuantPlan.from_dict(json.loads(plan_file.read_text()))


def load_quantized_model(path: Path, *, trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """Rebuild the emulated quantized model and its tokenizer from ``path``.

    An output of a model built by code (``ptq_module`` in ``config.json``) is rebuilt by
    :func:`ptq.models.module_loader.load_quantized_module` (no tokenizer: None).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ptq.module_quantize import MODULE_KEY

    config_data, plan = read_output(path)
    if MODULE_KEY in config_data:
        from ptq.models.module_loader import load_quantized_module

        return load_quantized_module(path, trust_remote_code=trust_remote_code).model, None
    plain = {k: v for k, v in config_data.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**plain) if "model_type" in plain else None
    if config is None:
        raise PtqInputError(f"{path / 'config.json'} has no model_type")
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    model.eval()
    unfuse_experts(model)
    names = CheckpointNames.of(model)
    index = SafetensorsIndex(path)
    structure = _structure(model) if any(k.endswith(KV_SCALE_SUFFIXES) for k in index) else None
    for lp in plan:
        parts = layer_parts(index, lp, path)
        layer = QuantLinear(parts.qweight, parts.bias, lp.activation, parts.input_scale, parts.lorc)
        replace_module(model, names.module_to_memory(lp.name), layer)
    quantized = {lp.name + "." for lp in plan}
    state = {names.to_memory(k): index.get(k) for k in index if not k.startswith(tuple(quantized))}
    quantized = {names.module_to_memory(lp.name) + "." for lp in plan}
    _install_kv_cache(model, state, config_data["quantization_config"], path, structure)
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [
        k
        for k in missing
        if not k.startswith(tuple(quantized))
        and not (k == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if real_missing or unexpected:
        raise PtqInputError(
            f"{path}: weights do not match the config (missing {real_missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    if getattr(config, "tie_word_embeddings", False) and "lm_head" not in plan.layers:
        model.tie_weights()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:
        tokenizer = None
    return model, tokenizer


def _structure(model: nn.Module) -> ModelStructure:
    """The structure of the freshly built model (before its layers are replaced)."""
    from ptq.frontend.analyse import model_structure
    from ptq.frontend.capture import capture
    from ptq.frontend.experts import all_tokens

    with all_tokens(model):
        cap = capture(model)
    return model_structure(model, cap)


def _install_kv_cache(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    qconfig: dict[str, Any],
    path: Path,
    structure: ModelStructure | None,
) -> None:
    """Move ``*.k_scale``/``*.v_scale`` out of ``state`` into KV-cache fake quantization."""
    scales = {k: state.pop(k) for k in list(state) if k.endswith(KV_SCALE_SUFFIXES)}
    if not scales or structure is None:
        return
    scheme = qconfig.get("kv_cache_scheme") or {}
    kinds: dict[tuple[Any, Any], str] = {("float", 8): "fp8_e4m3", ("int", 8): "int8"}
    dtype = kinds.get((scheme.get("type"), scheme.get("num_bits")))
    if dtype is None:
        raise PtqInputError(
            f"{path}: k_scale/v_scale tensors but kv_cache_scheme {scheme or None} is not "
            "8-bit float or int"
        )
    from ptq.passes.kv_cache import install_kv_cache_scales

    try:
        install_kv_cache_scales(model, scales, dtype, structure)  # type: ignore[arg-type]
    except ValueError as exc:
        raise PtqInputError(f"{path}: {exc}") from None
