"""Write a quantized model as a compressed-tensors checkpoint (what vLLM loads), streamed.

The block-wise runner hands every finished unit to :class:`CompressedTensorsOutput`:
quantized Linears go to the shard writer (:mod:`ptq.exporters.shard_writer`) in their
packed layout, every other tensor as the model holds it (fp32), KV-cache scales as
``k_scale``/``v_scale``; outer tensors no pass touched are copied as stored.
:meth:`CompressedTensorsOutput.finish` then writes the shards and ``config.json`` with
``quantization_config``, copies the tokenizer and generation config, and writes
``ptq_plan.json``, ``ptq_records.json`` and the manifest. Every quantized tensor is
produced from the same :class:`~ptq.formats.QTensor` the emulation uses, so
decompressing it gives the emulated weight bit for bit.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq.calibration.runner import Writer
from ptq.exporters.ct_config import build_quantization_config
from ptq.exporters.manifest import write_manifest
from ptq.exporters.shard_writer import ShardWriter
from ptq.formats.ct_layout import ct_format_name, to_compressed_tensors
from ptq.formats.ptq_layout import to_ptq_layout
from ptq.frontend.qconv import QuantConv2d
from ptq.models.checkpoint_names import CheckpointNames
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
BIAS_GROUPS = {"attention_bias": ".self_attn.", "mlp_bias": ".mlp."}


QUANTIZED_MODULES = (QuantLinear, QuantConv2d)
"""What is written packed: a conv's weight as its flattened ``[O, I/g * prod(kernel)]``
matrix, as a Linear's (:mod:`ptq.frontend.qconv`)."""


def quantized_tensors(module: QuantLinear | QuantConv2d) -> dict[str, torch.Tensor]:
    """A quantized layer's tensors in its compressed-tensors layout (local names)."""
    q = module.qweight
    w8a8 = module.activation is not None
    out = dict(to_compressed_tensors(q, w8a8) if ct_format_name(q.fmt) else to_ptq_layout(q))
    if module.bias is not None:
        out["bias"] = module.bias.detach()
    if isinstance(module, QuantLinear) and module.lorc_u is not None and module.lorc_v is not None:
        out["weight_lorc_u"] = module.lorc_u.detach()
        out["weight_lorc_v"] = module.lorc_v.detach()
    if module.input_scale is not None:
        out["input_scale"] = module.input_scale.detach().float().reshape(1)
    return out


def unit_tensors(
    module: nn.Module, prefix: str, skip: str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of ``module`` to save (names ``prefix + local``), none under ``skip``.

    Quantized Linears give their packed tensors, the rest its state dict (a tensor
    shared by two names, a tied LM head, once: under its first name), plus KV-cache
    scales when the KV-cache pass ran.
    """
    from ptq.passes.kv_cache import kv_cache_scales

    def wanted(name: str) -> bool:
        return skip is None or not name.startswith(skip)

    quantized = {
        n: m
        for n, m in module.named_modules()
        if isinstance(m, QUANTIZED_MODULES) and wanted(prefix + n)
    }
    for name, qmod in quantized.items():
        for local, t in quantized_tensors(qmod).items():
            yield f"{prefix}{name}.{local}", t
    inside = tuple(f"{n}." for n in quantized)
    seen: set[int] = set()
    for key, t in module.state_dict(keep_vars=True).items():
        if key.startswith(inside) or not wanted(prefix + key):
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        yield prefix + key, t.detach()
    for key, t in kv_cache_scales(module).items():
        if wanted(prefix + key):
            yield prefix + key, t.float().reshape(1)


class TensorsWriter(Writer):
    """Every finished tensor into a shard writer; :meth:`close` writes the shards into
    ``folder`` (the intermediate FP weights of a run split in two sweeps)."""

    def __init__(self, shards: ShardWriter, folder: Path | None = None) -> None:
        self.shards = shards
        self.folder = folder

    def tensors(self, module: nn.Module, prefix: str, skip: str | None = None) -> None:
        for name, t in unit_tensors(module, prefix, skip):
            if name not in self.shards:
                self.shards.add(name, t)

    def stored(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.shards:
            self.shards.add(name, tensor)

    def close(self) -> None:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.shards.finish(self.folder)


class CompressedTensorsOutput(Writer):
    """The runner's writer for a compressed-tensors folder (see the module docstring).

    Args:
        shards: The streaming shard writer (spools in the run's work folder).
        plan: The plan (config groups, ``ptq_plan.json``).
        model: The module tree (its config after the passes' ``prepare``; which skipped
            layers are Linears).
        source_dir: The source model folder (tokenizer files are copied from it); None
            for a model built by code (:mod:`ptq.models.module_source`).
        source_config: The source ``config.json`` (for a model built by code: what
            rebuilds it, ``ptq_module``).
    """

    def __init__(
        self,
        shards: ShardWriter,
        plan: QuantPlan,
        model: nn.Module,
        source_dir: Path | None,
        source_config: dict[str, Any],
    ) -> None:
        self.shards = shards
        self.plan = plan
        self.model = model
        self.source_dir = source_dir
        self.source_config = source_config
        self.names = CheckpointNames.of(model)

    def _tied(self) -> bool:
        cfg = getattr(self.model, "config", None)
        tied = bool(
            getattr(cfg, "tie_word_embeddings", self.source_config.get("tie_word_embeddings"))
        )
        return tied and "lm_head" not in self.plan.layers

    def tensors(self, module: nn.Module, prefix: str, skip: str | None = None) -> None:
        for name, t in unit_tensors(module, prefix, skip):
            self.stored(name, t)

    def stored(self, name: str, tensor: torch.Tensor) -> None:
        if self._tied() and name == "lm_head.weight":
            return
        name = self.names.to_disk(name)
        if name not in self.shards:
            self.shards.add(name, tensor)

    def state(self) -> dict[str, Any]:
        return self.shards.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.shards.restore(state)

    def _fill_group_biases(self, quantized: list[str]) -> dict[str, bool]:
        """Where some layers of a bias group (``attention_bias``, ``mlp_bias``) have a
        bias (bias correction), give the group's other quantized layers zeros: a
        Llama-family config switches biases per group, all or none."""
        flags: dict[str, bool] = {}
        for flag, part in BIAS_GROUPS.items():
            members = [self.names.module_to_disk(n) for n in quantized if part in n]
            if not any(f"{n}.bias" in self.shards for n in members):
                continue
            flags[flag] = True
            for n in members:
                if f"{n}.bias" not in self.shards:
                    out_features = self.plan.layers[self.names.module_to_memory(n)].out_features
                    self.shards.add(f"{n}.bias", torch.zeros(out_features))
        return flags

    def finish(self, out: Path, quantized: list[str], records: dict[str, Any] | None) -> None:
        """Write the shards and every other file of the output into ``out``."""
        from ptq.passes.kv_cache import KV_SCALE_SUFFIXES

        flags = self._fill_group_biases(quantized)
        copied = [
            self.source_dir / f
            for f in COPIED_FILES
            if self.source_dir is not None and (self.source_dir / f).is_file()
        ]
        extra = sum(p.stat().st_size for p in copied)
        self.shards.finish(out, extra_bytes=extra)
        config = dict(self.source_config)
        disk = self.plan.renamed(self.names.module_to_disk)
        rename = self.names.module_to_disk
        ignore = sorted(rename(n) for n in self.plan.skipped if _is_linear(self.model, n))
        config["quantization_config"] = build_quantization_config(
            [disk.layers[rename(n)] for n in quantized], ignore
        )
        tied = self._tied()
        if "tie_word_embeddings" in self.source_config or not tied:
            config["tie_word_embeddings"] = tied
        config.update(flags)
        if any(n.endswith(KV_SCALE_SUFFIXES) for n in self.shards.names):
            kv = (records or {}).get("kv_cache", {})
            config["quantization_config"]["kv_cache_scheme"] = {
                "num_bits": 8,
                "type": "int" if kv.get("dtype") == "int8" else "float",
                "symmetric": True,
                "strategy": "tensor",
                "dynamic": False,
            }
        (out / "config.json").write_text(json.dumps(config, indent=2))
        for path in copied:
            shutil.copy2(path, out / path.name)
        (out / "ptq_plan.json").write_text(disk.to_json())
        if records:
            (out / "ptq_records.json").write_text(json.dumps(records, indent=2, default=str))
        write_manifest(out)


def _is_linear(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is an (unquantized) Linear: what compressed-tensors' ``ignore`` lists."""
    try:
        return isinstance(model.get_submodule(name), nn.Linear)
    except AttributeError:
        return False
