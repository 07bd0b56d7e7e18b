"""The Python API: ``ptq.quantize(model, scheme, ...)`` and the run behind ``ptq quantize``.

With an ``output`` folder the model is never loaded whole: the block-wise runner
(:mod:`ptq.calibration.runner`) reads one block at a time from the safetensors shards,
runs every pass on it, and streams the result into the output; peak memory is one
block plus the calibration activations, and an interrupted run continues from its last
checkpoint when the same call is made again. Without ``output`` the model is loaded
into memory, quantized the same way (block by block) and returned.

An ``nn.Module`` (a CNN) is quantized in memory with its convolutions; batch-norms are
folded into them first. A model named by what builds it (a
:class:`~ptq.models.module_source.ModuleSource`: ``efficientnet-lite0``, a factory) is
quantized the same way and written to ``output`` (:mod:`ptq.module_quantize`).

Example:
    >>> import ptq
    >>> result = ptq.quantize("default", "w4a16", output="out", evaluate=True)
    >>> cnn = ptq.quantize(net.eval(), "w8a16", calibration=[{"inputs": images}]).model
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ptq.errors import PtqInputError, PtqUsageError
from ptq.evaluate import perplexity, tokenize_eval_text
from ptq.models.paths import default_eval_file
from ptq.models.source import (
    ModelSource,
    build_skeleton,
    load_fp_model,
    load_tokenizer,
    resolve_model,
)
from ptq.output import atomic_output_dir, check_output_dir
from ptq.pipeline import Pass, PassContext, Pipeline, QuantState
from ptq.plan import QuantPlan, build_plan
from ptq.scheme import Scheme, get_scheme
from ptq.steps import apply_steps

if TYPE_CHECKING:
    from ptq.calibration.distributed import DistributedContext
    from ptq.calibration.runner import Writer
    from ptq.models.module_source import ModuleSource
    from ptq.models.weight_source import WeightSource


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """Where calibration tokens come from."""

    path: Path | None = None
    samples: int = 128
    seqlen: int = 512


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Perplexity evaluation on held-out text."""

    text: Path | None = None
    tokens: int = 4096
    seqlen: int = 512


@dataclass
class QuantizeResult:
    """What a run produced."""

    model: nn.Module | None
    plan: QuantPlan
    output: Path | None
    fp_ppl: float | None = None
    quant_ppl: float | None = None
    seconds: float = 0.0
    records: dict[str, Any] = field(default_factory=dict)
    rank: int = 0


def default_pipeline(scheme: Scheme, calibration: CalibrationConfig | None = None) -> Pipeline:
    """What ``ptq quantize`` runs without ``--method``: the best measured method for the
    scheme (:func:`ptq.compose.default_method`), plus static activation calibration."""
    from ptq.compose import build_passes, default_method
    from ptq.models.paths import default_calibration_files

    available = calibration is not None and calibration.path is not None
    if not available:
        try:
            available = bool(default_calibration_files())
        except PtqInputError:
            available = False
    return Pipeline(build_passes(scheme, method=default_method(scheme, available)))


def _as_scheme(scheme: Scheme | str) -> Scheme:
    if isinstance(scheme, Scheme):
        return scheme
    try:
        return get_scheme(scheme)
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None


def quantize(
    model: str | Path | ModelSource | ModuleSource | nn.Module,
    scheme: Scheme | str,
    *,
    output: str | Path | None = None,
    pipeline: Pipeline | list[Pass] | None = None,
    calibration: CalibrationConfig | Sequence[Mapping[str, Any]] | None = None,
    evaluate: EvalConfig | bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    restart: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    offload_dir: str | Path | None = None,
    checkpoint_interval_s: float = 60.0,
    log: Any = print,
    distributed: DistributedContext | None = None,
) -> QuantizeResult:
    """Quantize ``model`` with ``scheme``; optionally evaluate and export.

    Args:
        model: ``"default"``, a Hugging Face folder, a ``.gguf`` file or a resolved source;
            or an ``nn.Module`` (a CNN, an encoder), quantized in memory and returned:
            ``calibration`` is then its list of input dicts (the first one is the capture's
            example), convolutions are planned, and batch-norms are folded into the
            convolutions first (:mod:`ptq.passes.fold_batch_norm`). A
            :class:`~ptq.models.module_source.ModuleSource` (a built-in name such as
            ``efficientnet-lite0`` or a factory) is built, calibrated on images
            (``calibration.path``: a folder) and written to ``output``
            (:mod:`ptq.module_quantize`).
        scheme: A :class:`~ptq.scheme.Scheme` or a preset name (``w4a8`` ...).
        output: Folder for the compressed-tensors checkpoint (written atomically). Given,
            the model is read block by block and never loaded whole.
        pipeline: Passes to run (default: :func:`default_pipeline`, GPTQ for weights
            of 4 bits or fewer, else round-to-nearest).
        calibration: Calibration data settings (used when a pass needs data).
        evaluate: FP and quantized perplexity on held-out text (in the same block-wise
            run when ``output`` is given).
        seed: Seed for calibration sampling and every pass.
        overwrite: Replace an existing ``output``.
        progress: Show progress bars.
        trust_remote_code: Allow code from the model folder to run.
        restart: Discard an interrupted run of a different command (``.OUT.work``).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``: where the
            current block and its activations live.
        dtype: What blocks are loaded and run in: ``auto`` (float32 on the CPU, the
            checkpoint's own dtype on CUDA), ``float32``, ``bfloat16``, ``float16``
            (streamed runs; Hessians and rounding maths stay float32).
        offload_dir: Keep the calibration activations in files here instead of memory.
        checkpoint_interval_s: Least seconds between resume checkpoints (0: every block).
        log: Where human-readable messages go.
        distributed: This process's place in a ``torchrun`` job; None reads torchrun's
            environment (``WORLD_SIZE > 1`` turns it on). With several processes the
            block-wise passes shard the calibration batches and the layers of each stage
            over the ranks (docs/distributed.md), the output equals a one-process run bit
            for bit, and only rank 0 logs, evaluates and writes ``output``; every rank
            returns once it is written.
    """
    from ptq.calibration.distributed import DistributedContext
    from ptq.models.module_source import ModuleSource

    if isinstance(model, nn.Module):
        from ptq.module_quantize import quantize_module

        if output is not None:
            raise PtqUsageError(
                "an nn.Module is quantized in memory and returned (result.model); to write "
                "an output, name the model by what builds it (a built-in name or "
                "FILE.py:FUNCTION, ptq.models.module_source); or drop output"
            )
        if calibration is None or isinstance(calibration, CalibrationConfig):
            raise PtqUsageError(
                "quantizing an nn.Module needs calibration: a list of its input dicts, e.g. "
                "[{'x': batch}, ...] (the first is also the capture's example)"
            )
        return quantize_module(
            model, _as_scheme(scheme), pipeline, calibration, seed, progress, device, log
        )
    if isinstance(model, ModuleSource):
        from ptq.module_quantize import quantize_module_source

        if output is None:
            raise PtqUsageError(
                f"{model.spec}: give output (or build the model yourself and pass the nn.Module)"
            )
        if calibration is not None and not isinstance(calibration, CalibrationConfig):
            raise PtqUsageError("give a CalibrationConfig (path: a folder of images)")
        return quantize_module_source(
            model,
            _as_scheme(scheme),
            output=Path(output),
            pipeline=pipeline,
            calibration=calibration,
            seed=seed,
            overwrite=overwrite,
            progress=progress,
            trust_remote_code=trust_remote_code,
            device=device,
            log=log,
        )
    if calibration is not None and not isinstance(calibration, CalibrationConfig):
        raise PtqUsageError(
            "calibration input dicts are for an nn.Module; give a CalibrationConfig"
        )
    text_calibration = calibration
    run = functools.partial(
        _quantize,
        model,
        scheme,
        output=output,
        pipeline=pipeline,
        calibration=text_calibration,
        evaluate=evaluate,
        seed=seed,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        restart=restart,
        device=device,
        dtype=dtype,
        offload_dir=None if offload_dir is None else Path(offload_dir),
        checkpoint_interval_s=checkpoint_interval_s,
    )
    dctx = distributed if distributed is not None else DistributedContext.from_env()
    if dctx.world == 1:
        return run(progress=progress, log=log, dctx=None)
    from ptq.devices import resolve_device

    if resolve_device(device, dctx.local_rank).type == "cuda" and dctx.backend != "nccl":
        dctx = dataclasses.replace(dctx, backend="nccl")  # one GPU per rank: NCCL collectives
    joined = dctx.init()
    try:
        if dctx.is_main:
            mode = "data and layer" if dctx.layer_parallel else "data"
            log(f"distributed: {dctx.world} processes ({dctx.backend}), {mode} parallel")
        result = run(
            progress=progress and dctx.is_main, log=log if dctx.is_main else _silent, dctx=dctx
        )
        dctx.barrier("waiting for rank 0 to evaluate and write the output")
        result.rank = dctx.rank
        return result
    finally:
        if joined:
            dctx.close()


def check_written(folder: Path) -> None:
    """The values check of ``ptq verify`` (:func:`ptq.verify.check_tensor_values`) on the
    output before it is renamed into place: no NaN/Inf, no all-zero weight or scale (a tied
    head written from an unloaded embedding, say) ever reaches the user's folder.

    Raises:
        PtqPassError: A tensor failed the check (named); nothing is written.
    """
    from ptq.errors import PtqPassError
    from ptq.io.safetensors_reader import SafetensorsIndex
    from ptq.verify import check_tensor_values

    try:
        check_tensor_values(SafetensorsIndex(folder))
    except PtqInputError as exc:
        raise PtqPassError(f"the output failed its own check, nothing was written: {exc}") from None


def _silent(*_args: Any, **_kwargs: Any) -> None:
    """``log`` of ranks other than 0."""


def work_dir_for(out: Path) -> Path:
    """The resumable work folder of output ``out``: ``.OUT.work`` beside it."""
    return out.parent / f".{out.name}.work"


def _quantize(
    model: str | Path | ModelSource,
    scheme: Scheme | str,
    *,
    output: str | Path | None,
    pipeline: Pipeline | list[Pass] | None,
    calibration: CalibrationConfig | None,
    evaluate: EvalConfig | bool,
    seed: int,
    overwrite: bool,
    progress: bool,
    trust_remote_code: bool,
    restart: bool,
    device: str,
    dtype: str,
    offload_dir: Path | None,
    checkpoint_interval_s: float,
    log: Any,
    dctx: DistributedContext | None,
) -> QuantizeResult:
    """:func:`quantize` in this process; ``dctx`` set: one rank of a job (rank 0 writes)."""
    from ptq.devices import resolve_device, resolve_dtype

    main = dctx is None or dctx.is_main
    start = time.perf_counter()
    out = Path(output) if output is not None else None
    if out is not None and main:
        check_output_dir(out, overwrite)
    scheme = _as_scheme(scheme)
    source = model if isinstance(model, ModelSource) else resolve_model(model, quiet=not progress)
    if source.is_quantized:
        raise PtqInputError(f"{source.path} is already quantized; give the floating-point model")
    pipe = (
        pipeline
        if isinstance(pipeline, Pipeline)
        else Pipeline(pipeline or default_pipeline(scheme, calibration).passes)
    )
    dev = resolve_device(device, None if dctx is None else dctx.local_rank)
    if out is None:
        return _quantize_in_memory(
            source, scheme, pipe, calibration, evaluate, seed, progress, trust_remote_code,
            dev, log, dctx, start,
        )  # fmt: skip
    from ptq.calibration.checkpoint import Checkpointer, fingerprint, tensor_digest
    from ptq.calibration.runner import RunSettings, run_passes
    from ptq.exporters.safetensors_export import CompressedTensorsOutput
    from ptq.exporters.shard_writer import ShardWriter
    from ptq.memory import return_freed_memory_to_os
    from ptq.models.weight_source import LazySource

    return_freed_memory_to_os()
    skeleton = build_skeleton(source, trust_remote_code=trust_remote_code)
    lazy = LazySource(source.path, skeleton, dev)
    lazy.dtype = resolve_dtype(dtype, dev, lazy.stored_dtype())
    plan = _plan_lazily(lazy, scheme, log)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    ctx = PassContext(seed=seed, progress=progress, distributed=dctx, device=dev)
    ctx.calibration = _calibration(pipe, scheme, calibration, tokenizer, source, seed)
    eval_cfg = EvalConfig() if evaluate is True else (evaluate or None)
    windows = _eval_windows(eval_cfg, tokenizer, source) if eval_cfg is not None else None
    work = work_dir_for(out)
    key = {
        "model": str(source.path.resolve()),
        "plan": plan.to_dict(),
        "pipeline": repr(pipe),
        "seed": seed,
        "device": str(dev),
        "dtype": str(lazy.dtype),
        "calibration": tensor_digest(ctx.calibration)
        if isinstance(ctx.calibration, torch.Tensor)
        else None,
        "eval": None if windows is None else tensor_digest(windows),
    }
    ckpt = Checkpointer(
        work, fingerprint(key), restart=restart, interval_s=checkpoint_interval_s, enabled=main
    )
    if main and ckpt.open():
        log(f"resuming the interrupted run in {work}")
    if dctx is not None:
        dctx.barrier("waiting for rank 0 to open the work folder")  # ranks resume alike
    writer = (
        CompressedTensorsOutput(ShardWriter(work), plan, skeleton, source.path, source.config)
        if main
        else None
    )
    offload = _offload_folder(offload_dir, dev, work, dctx)
    outcome = run_passes(
        lazy,
        QuantState(model=skeleton, plan=plan, tokenizer=tokenizer),
        pipe.passes,
        ctx,
        RunSettings(
            eval_windows=windows,
            offload=offload,
            checkpoint=ckpt,
            writer=writer,
            work=work,
        ),
        transformed=_TransformedFolder(work, skeleton, dev, lazy.dtype),
    )
    apply_steps(plan, ctx.records)
    result = QuantizeResult(model=None, plan=plan, output=out, records=ctx.records)
    result.fp_ppl, result.quant_ppl = outcome.perplexities()
    if main and result.fp_ppl is not None and result.quant_ppl is not None:
        log(f"FP perplexity: {result.fp_ppl:.4f} ({outcome.eval_tokens} predicted tokens)")
        log(f"quantized perplexity: {result.quant_ppl:.4f} (scheme {scheme.name})")
    if main and writer is not None:
        with atomic_output_dir(out, overwrite) as tmp:
            writer.finish(tmp, outcome.quantized, ctx.records)
            check_written(tmp)
        shutil.rmtree(work, ignore_errors=True)
        log(f"wrote {out}")
    if offload is not None:
        shutil.rmtree(offload, ignore_errors=True)
    result.seconds = time.perf_counter() - start
    return result


def _plan(
    model: nn.Module, scheme: Scheme, log: Any, example_inputs: dict[str, Any] | None = None
) -> QuantPlan:
    try:
        plan = build_plan(model, scheme, example_inputs=example_inputs)
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None
    for note in plan.notes:
        log(f"note: {note}")
    return plan


def _offload_folder(
    given: Path | None, device: torch.device, work: Path, dctx: DistributedContext | None
) -> Path | None:
    """Where the activation streams go: ``--offload-dir`` when given; on the CPU, the work
    folder (page-cached files cost a copy per batch and keep them out of the process's
    memory); on CUDA, nowhere (they stay on the device)."""
    rank = "" if dctx is None else f"rank{dctx.rank}-"
    if given is not None:
        return given / f"{rank}{work.name.lstrip('.')}"
    if device.type == "cpu":
        return work / f"{rank}streams"
    return None


@dataclass
class _TransformedFolder:
    """``work/transformed``: the FP weights after the passes before a bit allocation,
    read back block by block by the second sweep."""

    work: Path
    skeleton: nn.Module
    device: torch.device
    dtype: torch.dtype | None

    def writer(self, passes: Sequence[Pass]) -> Writer:
        from ptq.calibration.runner import flatten
        from ptq.exporters.safetensors_export import TensorsWriter
        from ptq.exporters.shard_writer import ShardWriter

        for p in flatten(passes):
            if getattr(getattr(p, "config", None), "online_down_proj", False):
                raise PtqUsageError(
                    "an online down_proj Hadamard changes the blocks' structure, which the "
                    "transformed weights before a bit allocation cannot keep; drop one of them"
                )
        folder, spool = self.work / "transformed", self.work / "transformed-spool"
        for d in (folder, spool):
            shutil.rmtree(d, ignore_errors=True)
        spool.mkdir(parents=True)
        return TensorsWriter(ShardWriter(spool), folder)

    def open(self) -> WeightSource:
        from ptq.models.weight_source import LazySource

        return LazySource(self.work / "transformed", self.skeleton, self.device, self.dtype)


def _plan_lazily(source: WeightSource, scheme: Scheme, log: Any) -> QuantPlan:
    """The plan, captured with one block of each structure loaded and of the outer part
    only what the forward up to those blocks runs: given ``inputs_embeds``
    (:func:`~ptq.frontend.capture.embedded_example_inputs`) neither the embedding matrix
    nor the head is read, so planning costs one block of memory, not the outer part."""
    from ptq.frontend.blocks import block_signature
    from ptq.frontend.capture import embedded_example_inputs
    from ptq.memory import release_freed

    first: dict[Any, int] = {}
    for i, block in enumerate(source.blocks or []):
        first.setdefault(block_signature(block), i)
    reps = sorted(first.values())
    real = [p for i in reps for p in source.load_block(i).parameters() if p.is_floating_point()]
    example = embedded_example_inputs(source.model, real[0].dtype, source.device) if real else None
    try:
        with source.outer_on_demand(embeddings=example is None):
            return _plan(source.model, scheme, log, example)
    finally:
        for i in reps:
            source.release_block(i)
        source.release_outer()
        release_freed()  # the exported graph's reference cycles hold the block's weights


def _calibration(
    pipe: Pipeline,
    scheme: Scheme,
    calibration: CalibrationConfig | None,
    tokenizer: Any,
    source: ModelSource,
    seed: int,
) -> torch.Tensor | None:
    """Calibration token ids when a pass (or static activation scales) needs them."""
    if not (
        pipe.needs_calibration or (scheme.activation is not None and not scheme.activation.dynamic)
    ):
        return None
    from ptq.calibration.text import calibration_batches

    cal = calibration or CalibrationConfig()
    if tokenizer is None:
        raise PtqInputError(f"{source.path} has no tokenizer; cannot tokenize calibration text")
    return calibration_batches(
        tokenizer, path=cal.path, n_samples=cal.samples, seqlen=cal.seqlen, seed=seed
    )


def _eval_ids(cfg: EvalConfig, tokenizer: Any, source: ModelSource) -> torch.Tensor:
    if tokenizer is None:
        raise PtqInputError(f"{source.path} has no tokenizer; cannot evaluate perplexity")
    return tokenize_eval_text(tokenizer, cfg.text or default_eval_file(), cfg.tokens)


def _eval_windows(cfg: EvalConfig, tokenizer: Any, source: ModelSource) -> torch.Tensor:
    """Held-out ids as ``[n, seqlen]`` non-overlapping windows (the perplexity protocol)."""
    ids = _eval_ids(cfg, tokenizer, source)
    n = ids.numel() // cfg.seqlen
    if n == 0:
        raise PtqInputError(
            f"evaluation text has {ids.numel()} tokens, fewer than --seqlen {cfg.seqlen}"
        )
    return ids[: n * cfg.seqlen].reshape(n, cfg.seqlen)


def _quantize_in_memory(
    source: ModelSource,
    scheme: Scheme,
    pipe: Pipeline,
    calibration: CalibrationConfig | None,
    evaluate: EvalConfig | bool,
    seed: int,
    progress: bool,
    trust_remote_code: bool,
    device: torch.device,
    log: Any,
    dctx: DistributedContext | None,
    start: float,
) -> QuantizeResult:
    """No output folder: load the model, run the passes block by block, return it."""
    fp_model, tokenizer = load_fp_model(source, trust_remote_code=trust_remote_code)
    plan = _plan(fp_model, scheme, log)
    main = dctx is None or dctx.is_main
    result = QuantizeResult(model=fp_model, plan=plan, output=None)
    eval_cfg = EvalConfig() if evaluate is True else (evaluate or None)
    eval_ids = _eval_ids(eval_cfg, tokenizer, source) if eval_cfg is not None and main else None
    if eval_ids is not None and eval_cfg is not None:
        result.fp_ppl = perplexity(
            fp_model, eval_ids, seqlen=eval_cfg.seqlen, progress=progress, desc="eval fp"
        )
        log(f"FP perplexity: {result.fp_ppl:.4f} ({eval_ids.numel()} tokens)")
    ctx = PassContext(seed=seed, progress=progress, distributed=dctx, device=device)
    ctx.calibration = _calibration(pipe, scheme, calibration, tokenizer, source, seed)
    pipe.run(QuantState(model=fp_model, plan=plan, tokenizer=tokenizer), ctx)
    apply_steps(plan, ctx.records)
    result.records = ctx.records
    if eval_ids is not None and eval_cfg is not None:
        result.quant_ppl = perplexity(
            fp_model, eval_ids, seqlen=eval_cfg.seqlen, progress=progress, desc="eval quant"
        )
        log(f"quantized perplexity: {result.quant_ppl:.4f} (scheme {scheme.name})")
    result.seconds = time.perf_counter() - start
    return result
