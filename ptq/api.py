"""The Python API: ``ptq.quantize(model, scheme, ...)`` and the run behind ``ptq quantize``.

Example:
    >>> import ptq
    >>> result = ptq.quantize("default", "w4a16", output="out", evaluate=True)
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ptq.errors import PtqInputError, PtqUsageError
from ptq.evaluate import perplexity, tokenize_eval_text
from ptq.models.paths import default_eval_file
from ptq.models.source import ModelSource, load_fp_model, resolve_model
from ptq.output import atomic_output_dir, check_output_dir
from ptq.pipeline import Pass, PassContext, Pipeline, QuantState
from ptq.plan import QuantPlan, build_plan
from ptq.scheme import Scheme, get_scheme

if TYPE_CHECKING:
    from ptq.calibration.distributed import DistributedContext


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


def default_pipeline(method: str = "rtn") -> Pipeline:
    from ptq.passes.registry import make_weight_pass

    return Pipeline([make_weight_pass(method)])


def _as_scheme(scheme: Scheme | str) -> Scheme:
    if isinstance(scheme, Scheme):
        return scheme
    try:
        return get_scheme(scheme)
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None


def quantize(
    model: str | Path | ModelSource,
    scheme: Scheme | str,
    *,
    output: str | Path | None = None,
    pipeline: Pipeline | list[Pass] | None = None,
    calibration: CalibrationConfig | None = None,
    evaluate: EvalConfig | bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    low_memory: bool = False,
    restart: bool = False,
    log: Any = print,
    distributed: DistributedContext | None = None,
) -> QuantizeResult:
    """Quantize ``model`` with ``scheme``; optionally evaluate and export.

    Args:
        model: ``"default"``, a Hugging Face folder, a ``.gguf`` file or a resolved source.
        scheme: A :class:`~ptq.scheme.Scheme` or a preset name (``w4a8`` ...).
        output: Folder for the compressed-tensors checkpoint (written atomically).
        pipeline: Passes to run (default: round-to-nearest).
        calibration: Calibration data settings (used when a pass needs data).
        evaluate: Print FP and quantized perplexity on held-out text.
        seed: Seed for calibration sampling and every pass.
        overwrite: Replace an existing ``output``.
        progress: Show progress bars.
        trust_remote_code: Allow code from the model folder to run.
        low_memory: Load and quantize one decoder block at a time (peak memory ~ one
            block); resumable: rerunning after a crash continues from the last block.
        restart: With ``low_memory``, discard an interrupted run of a different command.
        log: Where human-readable messages go.
        distributed: This process's place in a ``torchrun`` job; None reads torchrun's
            environment (``WORLD_SIZE > 1`` turns it on). With several processes the
            block-wise passes shard the calibration batches and the layers of each stage
            over the ranks (docs/distributed.md), the output equals a one-process run bit
            for bit, and only rank 0 logs, evaluates and writes ``output``; every rank
            returns once it is written.
    """
    from ptq.calibration.distributed import DistributedContext

    run = functools.partial(
        _quantize,
        model,
        scheme,
        output=output,
        pipeline=pipeline,
        calibration=calibration,
        evaluate=evaluate,
        seed=seed,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        low_memory=low_memory,
        restart=restart,
    )
    dctx = distributed if distributed is not None else DistributedContext.from_env()
    if dctx.world == 1:
        return run(progress=progress, log=log, dctx=None)
    if low_memory:
        raise PtqUsageError(
            "--low-memory cannot run under torchrun (its resumable work folder belongs to "
            "one process); run it without torchrun, or drop --low-memory"
        )
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


def _silent(*_args: Any, **_kwargs: Any) -> None:
    """``log`` of ranks other than 0."""


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
    low_memory: bool,
    restart: bool,
    log: Any,
    dctx: DistributedContext | None,
) -> QuantizeResult:
    """:func:`quantize` in this process; ``dctx`` set: one rank of a job (rank 0 writes)."""
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
        else Pipeline(pipeline or default_pipeline().passes)
    )
    if low_memory:
        if out is None:
            raise PtqUsageError("--low-memory streams blocks to the output: give -o/--output")
        return _quantize_low_memory(
            source,
            scheme,
            pipe,
            out,
            calibration=calibration,
            evaluate=evaluate,
            seed=seed,
            overwrite=overwrite,
            restart=restart,
            progress=progress,
            trust_remote_code=trust_remote_code,
            log=log,
            start=start,
        )
    fp_model, tokenizer = load_fp_model(source, trust_remote_code=trust_remote_code)
    try:
        plan = build_plan(fp_model, scheme)
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None
    for note in plan.notes:
        log(f"note: {note}")
    eval_cfg = EvalConfig() if evaluate is True else (evaluate or None)
    eval_ids = None
    result = QuantizeResult(model=fp_model, plan=plan, output=out)
    if eval_cfg is not None and main:
        if tokenizer is None:
            raise PtqInputError(f"{source.path} has no tokenizer; cannot evaluate perplexity")
        eval_ids = tokenize_eval_text(
            tokenizer, eval_cfg.text or default_eval_file(), eval_cfg.tokens
        )
        result.fp_ppl = perplexity(
            fp_model, eval_ids, seqlen=eval_cfg.seqlen, progress=progress, desc="eval fp"
        )
        log(f"FP perplexity: {result.fp_ppl:.4f} ({eval_ids.numel()} tokens)")
    ctx = PassContext(seed=seed, progress=progress, distributed=dctx)
    if pipe.needs_calibration or (scheme.activation is not None and not scheme.activation.dynamic):
        from ptq.calibration.text import calibration_batches

        cal = calibration or CalibrationConfig()
        if tokenizer is None:
            raise PtqInputError(f"{source.path} has no tokenizer; cannot tokenize calibration text")
        ctx.calibration = calibration_batches(
            tokenizer, path=cal.path, n_samples=cal.samples, seqlen=cal.seqlen, seed=seed
        )
    pipe.run(QuantState(model=fp_model, plan=plan, tokenizer=tokenizer), ctx)
    result.records = ctx.records
    if eval_ids is not None and eval_cfg is not None:
        result.quant_ppl = perplexity(
            fp_model, eval_ids, seqlen=eval_cfg.seqlen, progress=progress, desc="eval quant"
        )
        log(f"quantized perplexity: {result.quant_ppl:.4f} (scheme {scheme.name})")
    if out is not None and main:
        from ptq.exporters.safetensors_export import export_compressed_tensors

        with atomic_output_dir(out, overwrite) as tmp:
            export_compressed_tensors(
                fp_model, plan, source.path, source.config, tmp, records=ctx.records
            )
        log(f"wrote {out}")
    result.seconds = time.perf_counter() - start
    return result


def _quantize_low_memory(
    source: ModelSource,
    scheme: Scheme,
    pipe: Pipeline,
    out: Path,
    *,
    calibration: CalibrationConfig | None,
    evaluate: EvalConfig | bool,
    seed: int,
    overwrite: bool,
    restart: bool,
    progress: bool,
    trust_remote_code: bool,
    log: Any,
    start: float,
) -> QuantizeResult:
    from transformers import AutoTokenizer

    from ptq.calibration.lazy_runner import _skeleton
    from ptq.lowmem import quantize_low_memory
    from ptq.models.quantized_loader import load_quantized_model

    if len(pipe.passes) != 1:
        raise PtqUsageError(
            "--low-memory runs a single weight pass (rtn, gptq, adaround, adaquant)"
        )
    skeleton = _skeleton(source.path, trust_remote_code)
    try:
        plan = build_plan(skeleton, scheme)
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None
    del skeleton
    for note in plan.notes:
        log(f"note: {note}")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    ctx = PassContext(seed=seed, progress=progress)
    if pipe.needs_calibration:
        from ptq.calibration.text import calibration_batches

        cal = calibration or CalibrationConfig()
        ctx.calibration = calibration_batches(
            tokenizer, path=cal.path, n_samples=cal.samples, seqlen=cal.seqlen, seed=seed
        )
    run_key = {
        "model": str(source.path.resolve()),
        "plan": plan.to_dict(),
        "pipeline": repr(pipe),
        "seed": seed,
    }
    records = quantize_low_memory(
        source,
        plan,
        pipe.passes[0],
        ctx,
        out,
        overwrite=overwrite,
        restart=restart,
        run_key=run_key,
        trust_remote_code=trust_remote_code,
    )
    log(f"wrote {out}")
    model, _ = load_quantized_model(out) if evaluate else (None, None)
    result = QuantizeResult(model=model, plan=plan, output=out, records={"layers": records})
    eval_cfg = EvalConfig() if evaluate is True else (evaluate or None)
    if eval_cfg is not None and model is not None:
        ids = tokenize_eval_text(tokenizer, eval_cfg.text or default_eval_file(), eval_cfg.tokens)
        fp_model, _ = load_fp_model(source, trust_remote_code=trust_remote_code)
        result.fp_ppl = perplexity(
            fp_model, ids, seqlen=eval_cfg.seqlen, progress=progress, desc="eval fp"
        )
        del fp_model
        log(f"FP perplexity: {result.fp_ppl:.4f} ({ids.numel()} tokens)")
        result.quant_ppl = perplexity(
            model, ids, seqlen=eval_cfg.seqlen, progress=progress, desc="eval quant"
        )
        log(f"quantized perplexity: {result.quant_ppl:.4f} (scheme {scheme.name})")
    result.seconds = time.perf_counter() - start
    return result
