"""Write a quantized model as a compressed-tensors checkpoint (what vLLM loads).

The folder holds ``config.json`` with ``quantization_config``, the weights as safetensors
(quantized Linears in their packed layout, everything else as in the source), the
tokenizer and generation config copied from the source, and ``ptq_plan.json``. Every
quantized tensor is produced from the same :class:`~ptq.formats.QTensor` the emulation
uses, so decompressing it gives the emulated weight bit for bit.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq.exporters.ct_config import build_quantization_config
from ptq.exporters.manifest import write_manifest
from ptq.exporters.safe_write import write_shards
from ptq.formats.ct_layout import ct_format_name, to_compressed_tensors
from ptq.formats.ptq_layout import to_ptq_layout
from ptq.plan import QuantPlan
from ptq.qlinear import QuantLinear

COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


def quantized_tensors(module: QuantLinear) -> dict[str, torch.Tensor]:
    """A QuantLinear's tensors in its compressed-tensors layout (local names)."""
    q = module.qweight
    w8a8 = module.activation is not None
    out = dict(to_compressed_tensors(q, w8a8) if ct_format_name(q.fmt) else to_ptq_layout(q))
    if module.bias is not None:
        out["bias"] = module.bias.detach()
    if module.lorc_u is not None and module.lorc_v is not None:
        out["weight_lorc_u"] = module.lorc_u.detach()
        out["weight_lorc_v"] = module.lorc_v.detach()
    if module.input_scale is not None:
        out["input_scale"] = module.input_scale.detach().float().reshape(1)
    return out


def model_tensors(model: nn.Module, tied_lm_head: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """All tensors to save: packed for QuantLinears, as-is for the rest."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, module in quantized.items():
        for local, t in quantized_tensors(module).items():
            yield f"{name}.{local}", t
    prefixes = tuple(f"{n}." for n in quantized)
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        if tied_lm_head and key == "lm_head.weight":
            continue
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        yield key, t


def export_compressed_tensors(
    model: nn.Module,
    plan: QuantPlan,
    source_dir: Path,
    source_config: dict[str, Any],
    out: Path,
    *,
    records: dict[str, Any] | None = None,
) -> None:
    """Write the checkpoint into ``out`` (an existing, empty, temporary folder)."""
    model_config = getattr(model, "config", None)
    tied = bool(
        getattr(
            model_config, "tie_word_embeddings", source_config.get("tie_word_embeddings", False)
        )
    )
    tied = tied and "lm_head" not in plan.layers
    kv_scales = _kv_scales(model)
    _zero_fill_biases(model)
    extra = sum((source_dir / f).stat().st_size for f in COPIED_FILES if (source_dir / f).is_file())
    tensors = model_tensors(model, tied)
    if kv_scales:
        tensors = itertools.chain(tensors, kv_scales.items())
    write_shards(tensors, out, extra_bytes=extra)
    layers = [plan.layers[n] for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    config = dict(source_config)
    ignore = sorted(n for n in plan.skipped if _is_linear(model, n))
    config["quantization_config"] = build_quantization_config(layers, ignore)
    if "tie_word_embeddings" in source_config or not tied:
        config["tie_word_embeddings"] = tied
    config.update(_bias_flags(model))
    if kv_scales:
        bits = 8
        config["quantization_config"]["kv_cache_scheme"] = {
            "num_bits": bits,
            "type": _kv_type(model),
            "symmetric": True,
            "strategy": "tensor",
            "dynamic": False,
        }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for fname in COPIED_FILES:
        if (source_dir / fname).is_file():
            shutil.copy2(source_dir / fname, out / fname)
    (out / "ptq_plan.json").write_text(plan.to_json())
    if records:
        (out / "ptq_records.json").write_text(json.dumps(records, indent=2, default=str))
    write_manifest(out)


def _kv_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """``k_scale``/``v_scale`` tensors when the KV-cache pass ran (else empty)."""
    from ptq.passes.kv_cache import kv_cache_scales

    return {k: v.float().reshape(1) for k, v in kv_cache_scales(model).items()}


def _kv_type(model: nn.Module) -> str:
    from ptq.passes.kv_cache import KVFakeQuant

    for m in model.modules():
        if isinstance(m, KVFakeQuant):
            return "int" if m.dtype == "int8" else "float"
    return "float"


def _bias_groups(model: nn.Module) -> dict[str, list[QuantLinear]]:
    groups: dict[str, list[QuantLinear]] = {"attention_bias": [], "mlp_bias": []}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            key = (
                "attention_bias"
                if ".self_attn." in name
                else "mlp_bias"
                if ".mlp." in name
                else None
            )
            if key:
                groups[key].append(m)
    return groups


def _zero_fill_biases(model: nn.Module) -> None:
    """Where bias correction gave some layers of a group a bias, give the rest zeros.

    Llama-family configs switch biases per group (``attention_bias``, ``mlp_bias``), so
    a checkpoint must have all of a group's biases or none.
    """
    for layers in _bias_groups(model).values():
        if any(m.bias is not None for m in layers):
            for m in layers:
                if m.bias is None:
                    m.bias = nn.Parameter(torch.zeros(m.out_features), requires_grad=False)


def _bias_flags(model: nn.Module) -> dict[str, bool]:
    return {
        k: True
        for k, layers in _bias_groups(model).items()
        if any(m.bias is not None for m in layers)
    }


def _is_linear(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is an (unquantized) Linear: what compressed-tensors' ``ignore`` lists."""
    try:
        return isinstance(model.get_submodule(name), nn.Linear)
    except AttributeError:
        return False
