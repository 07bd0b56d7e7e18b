"""Load a ptq/compressed-tensors output folder back into an emulated PyTorch model.

Each quantized Linear is rebuilt as a :class:`~ptq.qlinear.QuantLinear` from its packed
tensors (so evaluation runs exactly the artifact's numerics); the other weights load as
stored. Formats come from ``ptq_plan.json`` when present (exact), else from the
``quantization_config`` arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq.errors import PtqInputError
from ptq.formats.ct_layout import ct_format_name, from_compressed_tensors
from ptq.formats.ptq_layout import from_ptq_layout
from ptq.frontend.experts import unfuse_experts
from ptq.frontend.structure import ModelStructure
from ptq.io.safetensors_reader import SafetensorsIndex
from ptq.models.checkpoint_names import CheckpointNames
from ptq.modules import replace_module
from ptq.plan import QuantPlan
from ptq.qlinear import QuantLinear

KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")


def load_quantized_model(path: Path, *, trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """Rebuild the emulated quantized model and its tokenizer from ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_data = json.loads((path / "config.json").read_text())
    if "quantization_config" not in config_data:
        raise PtqInputError(f"{path} is not a quantized output (no quantization_config)")
    plan_file = path / "ptq_plan.json"
    if not plan_file.is_file():
        raise PtqInputError(
            f"{path} has no ptq_plan.json; only ptq outputs can be loaded for emulation"
        )
    plan = QuantPlan.from_dict(json.loads(plan_file.read_text()))
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
        layer = QuantLinear(q, bias, lp.activation, input_scale, lorc)
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
