"""Quantizing a model built by code (a CNN, any ``nn.Module``): in memory, and into an output.

:func:`quantize_module` runs the passes on a module held in memory: the plan covers its
Linears and convolutions (:data:`ptq.plan.IN_MEMORY_KINDS`), the batch-norms are folded
into their convolutions first (:class:`~ptq.passes.fold_batch_norm.FoldBatchNormPass`:
``W' = W gamma / sqrt(var + eps)``, Jacob et al. 2018), and the weight method
quantizes the folded weights layer by layer from the calibration batches.

:func:`quantize_module_source` is ``ptq quantize MODEL`` for a built-in name or a factory
(:mod:`ptq.models.module_source`): it builds the model, draws the calibration images
(:mod:`ptq.models.image_inputs`), runs :func:`quantize_module`, and writes the result with
the one checkpoint writer (:class:`~ptq.exporters.safetensors_export.CompressedTensorsOutput`
over :class:`~ptq.exporters.shard_writer.ShardWriter`, the manifest last) into a temporary
folder renamed into place only once its values are checked. ``config.json`` holds
``quantization_config`` and ``ptq_module``: the model's spec and inputs, the folded
pairs, the FP weights' SHA-256 and the calibration images' SHA-256 (what
:mod:`ptq.models.module_loader` and ``ptq eval`` need).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ptq.errors import PtqUsageError
from ptq.pipeline import Pass, Pipeline, QuantState

if TYPE_CHECKING:
    from ptq.api import CalibrationConfig, QuantizeResult
    from ptq.models.module_source import ModuleSource
    from ptq.scheme import Scheme

MODULE_KEY = "ptq_module"
"""The ``config.json`` key of an output built by code."""


def quantize_module(
    model: nn.Module,
    scheme: Scheme,
    pipeline: Pipeline | list[Pass] | None,
    calibration: Sequence[Mapping[str, Any]],
    seed: int,
    progress: bool,
    device: str,
    log: Any,
) -> QuantizeResult:
    """Quantize ``model`` in place (see the module docstring); ``calibration`` is its list
    of input dicts, the first one also the capture's example."""
    from ptq.api import QuantizeResult
    from ptq.devices import resolve_device
    from ptq.passes.fold_batch_norm import FoldBatchNormPass
    from ptq.pipeline import PassContext
    from ptq.plan import IN_MEMORY_KINDS, build_plan
    from ptq.steps import apply_steps

    start = time.perf_counter()
    batches = list(calibration)
    if not batches:
        raise PtqUsageError(
            "quantizing an nn.Module needs calibration: a list of its input dicts, e.g. "
            "[{'x': batch}, ...] (the first is also the capture's example)"
        )
    model.eval()
    try:
        plan = build_plan(model, scheme, supported_kinds=IN_MEMORY_KINDS, example_inputs=batches[0])
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None
    for note in plan.notes:
        log(f"note: {note}")
    for name, why in plan.skipped.items():  # weights no pass can replace, named with why
        if why != "ignored":
            log(f"note: {name}: {why}")
    passes = list(pipeline.passes if isinstance(pipeline, Pipeline) else pipeline or [])
    if not passes:  # the module's own calibration batches are given: the calibrated default
        from ptq.compose import build_passes, default_method

        passes = build_passes(scheme, method=default_method(scheme, True, repeated_blocks=False))
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        passes.insert(0, FoldBatchNormPass())
    ctx = PassContext(seed=seed, progress=progress, device=resolve_device(device, None))
    ctx.calibration = batches
    Pipeline(passes).run(QuantState(model=model, plan=plan), ctx)
    apply_steps(plan, ctx.records)
    result = QuantizeResult(model=model, plan=plan, output=None, records=ctx.records)
    result.seconds = time.perf_counter() - start
    return result


def quantize_module_source(
    source: ModuleSource,
    scheme: Scheme,
    *,
    output: Path,
    pipeline: Pipeline | list[Pass] | None,
    calibration: CalibrationConfig | None,
    seed: int,
    overwrite: bool,
    progress: bool,
    trust_remote_code: bool,
    device: str,
    log: Any,
) -> QuantizeResult:
    """Build, calibrate, quantize and write ``source`` into ``output`` (module docstring).

    ``calibration.path`` and ``calibration.samples`` are read by the model's inputs
    (:meth:`ptq.models.image_inputs.ImageInputs.calibration`: a folder of images,
    default scikit-image's and scikit-learn's test images, and the number of crops; a
    diffusion denoiser's :meth:`ptq.models.diffusion.DiffusionInputs.calibration`:
    sampling trajectories of random latents, no folder). The output records the seed
    (``calibration_seed``: evaluation draws from another).

    Raises:
        PtqUsageError: ``output`` exists without ``overwrite``; a factory without
            ``trust_remote_code``; a folder of images for a diffusion model.
        PtqInputError: A calibration folder without images, a factory that fails.
    """
    from ptq.api import CalibrationConfig
    from ptq.models.module_source import weights_digest
    from ptq.output import check_output_dir

    start = time.perf_counter()
    check_output_dir(output, overwrite)
    cal = calibration or CalibrationConfig()
    model = source.build(trust_remote_code=trust_remote_code)
    inputs = source.inputs.bound_to(model)
    fp_digest = weights_digest(model)
    drawn = inputs.calibration(cal.path, cal.samples, seed)
    log(f"calibration: {drawn.summary}")
    result = quantize_module(model, scheme, pipeline, drawn.batches, seed, progress, device, log)
    record = {
        **replace(source, inputs=inputs).to_dict(),
        "folded": result.records.get("fold_batch_norm", []),
        "weights_sha256": fp_digest,
        "calibration_sha256": drawn.sha256,
        "calibration_seed": seed,
    }
    write_module_output(model, result, {MODULE_KEY: record}, output, overwrite)
    log(f"wrote {output}")
    result.output = output
    result.model = None
    result.seconds = time.perf_counter() - start
    return result


def write_module_output(
    model: nn.Module, result: QuantizeResult, config: dict[str, Any], out: Path, overwrite: bool
) -> None:
    """Write the quantized ``model`` with ptq's checkpoint writer into ``out``, atomically."""
    from ptq.api import check_written, work_dir_for
    from ptq.exporters.safetensors_export import CompressedTensorsOutput
    from ptq.exporters.shard_writer import ShardWriter
    from ptq.output import atomic_output_dir

    spool = work_dir_for(out)
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir(parents=True)
    try:
        writer = CompressedTensorsOutput(ShardWriter(spool), result.plan, model, None, config)
        writer.tensors(model, "")
        with atomic_output_dir(out, overwrite) as tmp:
            writer.finish(tmp, list(result.plan.layers), result.records)
            check_written(tmp)
    finally:
        shutil.rmtree(spool, ignore_errors=True)
