"""Write a quantized model as a compressed-tensors checkpoint (what vLLM loads).

The folder holds ``config.json`` with ``quantization_config``, the weights as safetensors
(quantized Linears in their packed layout, everything else as in the source), the
tokenizer and generation config copied from the source, and ``ptq_plan.json``. Every
quantized tensor is produced from the same :class:`~ptq.formats.QTensor` the emulation
uses, so decompressing it gives the emulated weight bit for bit.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ptq.errors import PtqError
from ptq.exporters.ct_config import build_quantization_config
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
MAX_SHARD_BYTES = 2 * 1024**3


def quantized_tensors(module: QuantLinear) -> dict[str, torch.Tensor]:
    """A QuantLinear's tensors in its compressed-tensors layout (local names)."""
    q = module.qweight
    out = dict(to_compressed_tensors(q) if ct_format_name(q.fmt) else to_ptq_layout(q))
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


def _check_tensor(name: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        raise PtqError(f"refusing to write {name}: it is on the meta device (never loaded)")


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path) -> list[str]:
    """Write tensors into <= 2 GiB shards plus an index when more than one; return files."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors:
        _check_tensor(name, t)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


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
    tied = bool(source_config.get("tie_word_embeddings", False)) and "lm_head" not in plan.layers
    write_shards(model_tensors(model, tied), out)
    layers = [plan.layers[n] for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    config = dict(source_config)
    config["quantization_config"] = build_quantization_config(layers, sorted(plan.skipped))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for fname in COPIED_FILES:
        if (source_dir / fname).is_file():
            shutil.copy2(source_dir / fname, out / fname)
    (out / "ptq_plan.json").write_text(plan.to_json())
    if records:
        (out / "ptq_records.json").write_text(json.dumps(records, indent=2, default=str))
