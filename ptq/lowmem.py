"""``--low-memory``: quantize and export a decoder LM one block at a time, resumably.

Glue between :class:`~ptq.calibration.lazy_runner.LazyBlockRunner`, the weight pass
(RTN, GPTQ, AdaRound, AdaQuant) and the compressed-tensors exporter. The work folder
``.OUT.work`` beside the output keeps finished blocks until the output is complete.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ptq.calibration.lazy_runner import LazyBlockRunner
from ptq.calibration.runner import LayerStats, StatsRequest
from ptq.errors import PtqUsageError
from ptq.exporters.ct_config import build_quantization_config
from ptq.exporters.manifest import write_manifest
from ptq.exporters.safetensors_export import COPIED_FILES, quantized_tensors
from ptq.formats import quantize as rtn_quantize
from ptq.models.source import ModelSource
from ptq.modules import replace_module
from ptq.output import atomic_output_dir
from ptq.pipeline import Pass, PassContext
from ptq.plan import QuantPlan
from ptq.qlinear import QuantLinear

OUTER_FILE = "model-outer.safetensors"


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024


def return_freed_memory_to_os() -> None:
    """Pin glibc's mmap threshold so freed block-sized tensors go back to the OS.

    glibc raises its mmap threshold after large frees (up to 32 MiB), after which tensors
    of a few MiB come from the heap and their pages stay resident when freed: a
    block-by-block run's RSS would then grow with the number of blocks. Fixing the
    threshold (what ``MALLOC_MMAP_THRESHOLD_`` does) keeps peak RSS at about one block.
    A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def _block_tensors(block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    quantized = {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    for name, module in quantized.items():
        for local, t in quantized_tensors(module).items():
            out[f"{prefix}{name}.{local}"] = t.detach().contiguous()
    skip = tuple(f"{n}." for n in quantized)
    for key, t in block.state_dict().items():
        if not key.startswith(skip):
            out[prefix + key] = t.detach().contiguous()
    return out


def quantize_low_memory(
    source: ModelSource,
    plan: QuantPlan,
    weight_pass: Pass,
    ctx: PassContext,
    out: Path,
    *,
    overwrite: bool,
    restart: bool,
    run_key: dict[str, Any],
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Quantize block by block into ``out``; returns the per-layer records."""
    from ptq.passes.layerwise import LayerwisePass
    from ptq.passes.rtn import RTNPass

    if isinstance(weight_pass, LayerwisePass):
        request = weight_pass.stats_request()
    elif isinstance(weight_pass, RTNPass):
        request = StatsRequest()
    else:
        raise PtqUsageError(f"pass {weight_pass.name!r} needs the whole model; drop --low-memory")
    if (request.hessian or request.input_rows) and ctx.calibration is None:
        raise PtqUsageError(f"{weight_pass.name} needs calibration data")
    return_freed_memory_to_os()
    records: dict[str, Any] = {}

    def quantize_layer(block: nn.Module, prefix: str, name: str, stats: LayerStats) -> None:
        local = name[len(prefix) :]
        layer = block.get_submodule(local)
        assert isinstance(layer, nn.Linear)
        lp = plan.layers[name]
        if isinstance(weight_pass, LayerwisePass):
            with torch.enable_grad():
                qt, bias, record = weight_pass.quantize_layer(name, layer, lp, stats, ctx)
            record["method"] = weight_pass.name
            records[name] = record
        else:
            qt, bias = rtn_quantize(layer.weight.detach(), lp.weight), None
        new_bias = bias if bias is not None else layer.bias
        replace_module(block, local, QuantLinear(qt, new_bias, lp.activation))

    work = work_dir_for(out)
    key = dict(run_key)
    if ctx.calibration is not None:
        key["calibration_sha256"] = hashlib.sha256(ctx.calibration.numpy().tobytes()).hexdigest()
    runner = LazyBlockRunner(
        model_dir=source.path,
        plan=plan,
        request=request,
        quantize_layer=quantize_layer,
        block_tensors=_block_tensors,
        work_dir=work,
        run_key=key,
        restart=restart,
        progress=ctx.progress,
        trust_remote_code=trust_remote_code,
        after_block=lambda i: _save_records(work, i, records),
    )
    calibration = (
        ctx.calibration if ctx.calibration is not None else torch.zeros(1, 8, dtype=torch.long)
    )
    result = runner.run(calibration)
    all_records = _load_records(work)
    with atomic_output_dir(out, overwrite) as tmp:
        weight_map: dict[str, str] = {}
        for fname in result.block_files:
            shutil.copy2(work / fname, tmp / fname)
            from ptq.io.safetensors_reader import SafetensorsFile

            weight_map.update(dict.fromkeys(SafetensorsFile(tmp / fname).keys(), fname))
        outer = runner.outer_tensors()
        tied = (
            bool(source.config.get("tie_word_embeddings", False)) and "lm_head" not in plan.layers
        )
        if tied:
            outer.pop("lm_head.weight", None)
        save_file(
            {k: v.contiguous() for k, v in outer.items()},
            str(tmp / OUTER_FILE),
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(outer, OUTER_FILE))
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = dict(source.config)
        linear_skips = sorted(
            n for n, why in plan.skipped.items() if not why.startswith("not quantized")
        )
        config["quantization_config"] = build_quantization_config(list(plan), linear_skips)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for fname in COPIED_FILES:
            if (source.path / fname).is_file():
                shutil.copy2(source.path / fname, tmp / fname)
        (tmp / "ptq_plan.json").write_text(plan.to_json())
        if all_records:
            (tmp / "ptq_records.json").write_text(json.dumps({"layers": all_records}, indent=2))
        write_manifest(tmp)
    shutil.rmtree(work, ignore_errors=True)
    return all_records


def _save_records(work: Path, block: int, records: dict[str, Any]) -> None:
    path = work / f"records-{block:05d}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, default=str))
    tmp.replace(path)
    records.clear()


def _load_records(work: Path) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in sorted(work.glob("records-*.json")):
        merged.update(json.loads(path.read_text()))
    return merged
