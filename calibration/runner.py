"""The block-wise runner: the one way passes see a model, on CPU or a CUDA device.

A model is walked as units (:mod:`ptq.calibration.units`): ``prepare`` hooks run on
the module tree (which may be a weightless skeleton), then

1. **prologue**: the outer weights (embeddings, final norm, head) are loaded, passes'
   ``prologue`` hooks run (rotation rotates the embedding), and every calibration batch
   runs up to block 0, whose inputs start the activation streams
   (:mod:`ptq.calibration.streams`); the outer weights are released again;
2. **blocks**, one at a time: the source loads block ``i`` onto the device, every pass
   runs on it in pipeline order (``Pass.run_unit``), the streams advance through the
   finished block, its tensors go to the writer (:mod:`ptq.exporters.shard_writer`),
   the block is released, and a checkpoint may be taken
   (:mod:`ptq.calibration.checkpoint`);
3. **outer**: if evaluation, a pass or a planned layer needs it, the outer weights are
   loaded once more, the passes run on the outer unit (blocks replayed from the final
   stream), and the outer tensors are written; otherwise they are copied from the source.

So peak memory is the fixed overhead plus one block (or the outer part) plus the
streams, whatever the model's depth; weights come from an in-memory model or straight
from safetensors shards (:mod:`ptq.models.weight_source`). Streams kept:

* ``calib``: the quantized model's activations (what each block's passes calibrate on);
* ``fp``: the floating-point model's, as transformed by passes before the first one that
  observes it (only when a pass has ``observes_fp``: SmoothQuant);
* ``eval_fp`` / ``eval_q``: held-out windows through the original and the quantized model
  (with evaluation); their final hidden states give both perplexities.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq.calibration.blocks import block_output, capture_block_inputs, to_device
from ptq.calibration.checkpoint import Checkpointer
from ptq.calibration.stages import split_calibration
from ptq.calibration.streams import Stream
from ptq.calibration.units import Unit, block_forward, replayed_forward
from ptq.errors import PtqError, PtqPassError
from ptq.frontend.experts import all_tokens
from ptq.memory import release_freed
from ptq.models.weight_source import OVERLAY_FILE, WeightSource
from ptq.pipeline import Pass, PassContext, QuantState, check_contract


def flatten(passes: Sequence[Pass]) -> Iterator[Pass]:
    """Every pass, wrappers' inner passes included."""
    for p in passes:
        yield p
        yield from flatten(p.inner_passes())


@dataclass
class RunOutcome:
    """What a run measured and produced.

    Attributes:
        fp_nll, quant_nll: Summed next-token NLL of the held-out windows (with eval).
        eval_tokens: Predicted tokens those sums cover.
        quantized: Planned layers that ended quantized, in model order.
        resumed_from: Block the run started at (0 unless resumed).
    """

    fp_nll: float | None = None
    quant_nll: float | None = None
    eval_tokens: int = 0
    quantized: list[str] = field(default_factory=list)
    resumed_from: int = 0

    def perplexities(self) -> tuple[float | None, float | None]:
        if not self.eval_tokens:
            return None, None
        fp = None if self.fp_nll is None else math.exp(self.fp_nll / self.eval_tokens)
        q = None if self.quant_nll is None else math.exp(self.quant_nll / self.eval_tokens)
        return fp, q


class Writer:
    """Where finished tensors go (the API's output writer); the runner calls ``tensors``."""

    def tensors(self, module: nn.Module, prefix: str, skip: str | None = None) -> None:
        """A finished unit's tensors (names ``prefix + local``; none under ``skip``)."""

    def stored(self, name: str, tensor: torch.Tensor) -> None:
        """An outer tensor copied as stored."""

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Return to a checkpoint's state."""

    def close(self) -> None:
        """The sweep is complete (a writer of intermediate weights finishes its files)."""


@dataclass
class RunSettings:
    """How a run executes.

    Args:
        eval_windows: ``[n, seqlen]`` held-out token windows (None: no evaluation).
        offload: Folder for the activation streams (None: in memory on the device).
        checkpoint: The run's work folder (None: not resumable).
        writer: Receives finished tensors (None: nothing written).
        eval_fp, eval_q: Which perplexities this sweep measures (a run split in two
            sweeps measures the FP model in the first and the quantized in the last).
        work: The run's own folder (outer weights changed before the blocks are kept
            there while released: the rotated embedding of a lazily read model).
    """

    eval_windows: torch.Tensor | None = None
    offload: Path | None = None
    checkpoint: Checkpointer | None = None
    writer: Writer | None = None
    eval_fp: bool = True
    eval_q: bool = True
    work: Path | None = None


class TransformedStore(Protocol):
    """Where a run split in two sweeps keeps the transformed FP weights."""

    def writer(self, passes: Sequence[Pass]) -> Writer:
        """A fresh writer for the first sweep (what was there before is dropped)."""
        ...

    def open(self) -> WeightSource:
        """The written weights, as the second sweep's source."""
        ...


def _first_sweep(
    source: WeightSource,
    state: QuantState,
    before: list[Pass],
    ctx: PassContext,
    settings: RunSettings,
    store: TransformedStore | None,
) -> tuple[WeightSource, RunOutcome]:
    """Run the passes before a deciding pass; returns the source the rest reads."""
    ckpt = settings.checkpoint
    marker = None if ckpt is None or store is None else ckpt.work / "transformed.json"
    if marker is not None and store is not None and marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("fingerprint") == (ckpt.key if ckpt else None):
            ctx.records.update(done["records"])
            return store.open(), RunOutcome(fp_nll=done["fp_nll"])
    writer = None if store is None else store.writer(before)
    sweep = replace(settings, checkpoint=None, writer=writer, eval_q=False)
    first = UnitRunner(source, state, before, ctx, sweep).run()
    if writer is None or store is None:
        return source, first
    writer.close()
    if marker is not None and ckpt is not None and ckpt.enabled:
        record = {"fingerprint": ckpt.key, "records": ctx.records, "fp_nll": first.fp_nll}
        marker.write_text(json.dumps(record, default=str))
    return store.open(), first


def run_passes(
    source: WeightSource,
    state: QuantState,
    passes: Sequence[Pass],
    ctx: PassContext,
    settings: RunSettings | None = None,
    *,
    transformed: TransformedStore | None = None,
) -> RunOutcome:
    """Run ``passes`` over the model of ``source``: the pipeline's single entry point.

    The contract is checked and every pass prepared once; then one sweep of the units
    runs all passes. A pass that decides for the whole model at once (bit allocation:
    ``Pass.decide``) splits the run: the passes before it run in a first sweep (the
    FP transforms, e.g. rotation, SmoothQuant), it decides from the transformed model
    (reading blocks one at a time), and the passes after it run in a second sweep.
    ``transformed`` keeps the first sweep's output (a folder of the transformed FP
    weights) that the second sweep reads; None: the model is changed in place (an
    in-memory source). With a checkpoint, a finished first sweep is marked in the work
    folder (with its records) and a resumed run goes straight to the decision.
    """
    settings = settings or RunSettings()
    check_contract(passes, ctx.facts, ctx.history)
    for p in passes:
        try:
            p.prepare(state, ctx)
        except PtqError:
            raise
        except ValueError as exc:
            raise PtqPassError(f"{p.name}: {exc}") from exc
    k = next((i for i, p in enumerate(passes) if p.decides), None)
    if k is None:
        outcome = UnitRunner(source, state, passes, ctx, settings).run()
    else:
        before, step, after = list(passes[:k]), passes[k], list(passes[k + 1 :])
        first = RunOutcome()
        if before:
            source, first = _first_sweep(source, state, before, ctx, settings, transformed)
        step.decide(source, state, ctx)
        outcome = UnitRunner(
            source, state, after, ctx, replace(settings, eval_fp=settings.eval_fp and not before)
        ).run()
        if before:
            outcome.fp_nll = first.fp_nll
    for p in passes:
        ctx.history.append(p.name)
        ctx.facts.update(p.ensures)
    return outcome


class UnitRunner:
    """Run ``passes`` over the model of ``source``, unit by unit (module docstring)."""

    def __init__(
        self,
        source: WeightSource,
        state: QuantState,
        passes: Sequence[Pass],
        ctx: PassContext,
        settings: RunSettings | None = None,
    ) -> None:
        self.source = source
        self.state = state
        self.passes = list(passes)
        self.ctx = ctx
        self.settings = settings or RunSettings()
        self.outcome = RunOutcome()
        self.streams: dict[str, Stream] = {}
        self.as_tuple = False
        every = list(flatten(self.passes))
        self.wants_calib = any(p.needs_calibration for p in every)
        self.wants_fp = any(p.observes_fp for p in every)
        self.wants_outer = any(p.touches_outer for p in every)
        self.has_prologue = any(p.has_prologue for p in self.passes)

    # ----------------------------------------------------------------- driving
    @torch.no_grad()
    def run(self) -> RunOutcome:
        """One sweep of the units (the passes are already prepared: :func:`run_passes`)."""
        if self.source.blocks is None:
            self._run_model()
        else:
            self._run_blocks()
        return self.outcome

    def _run_passes(self, unit: Unit) -> None:
        """Every pass on ``unit``; MoE experts see every token while passes gather
        statistics (:func:`ptq.frontend.experts.all_tokens`), the routed mixture still
        being the unit's output."""
        state = QuantState(self.state.model, self.state.plan, self.state.tokenizer, unit)
        with all_tokens(unit.module):
            for p in self.passes:
                start = time.perf_counter()
                p.run_unit(state, self.ctx)
                self.ctx.timings[p.name] = self.ctx.timings.get(p.name, 0.0) + (
                    time.perf_counter() - start
                )

    def _batches(self) -> list[Any]:
        if self.ctx.calibration is None or not self.wants_calib:
            return []
        batches = split_calibration(self.ctx.calibration, self.ctx.batch_size)
        return [to_device(b, self.ctx.device) for b in batches]

    def _layers(self, prefix: str | None) -> list[str]:
        names = list(self.state.plan.layers)
        if prefix is None:
            inside = f"{self.source.block_path}." if self.source.block_path else None
            return [n for n in names if inside is None or not n.startswith(inside)]
        return [n for n in names if n.startswith(prefix)]

    def _quantized_in(self, module: nn.Module, prefix: str, skip: str | None = None) -> list[str]:
        return [
            prefix + n
            for n, m in module.named_modules()
            if n
            and prefix + n in self.state.plan.layers
            and hasattr(m, "qweight")
            and not (skip is not None and (prefix + n).startswith(skip))
        ]

    # ------------------------------------------------------- whole-model units
    def _run_model(self) -> None:
        """A model without repeated blocks: one unit, the whole model."""
        self.source.load_outer()
        model = self.source.model
        if self.settings.eval_windows is not None:
            raise ValueError("perplexity evaluation needs a decoder LM with repeated blocks")
        unit = Unit("model", 0, "", model, model, self._layers(None), batches=self._batches())
        self._run_passes(unit)
        self.outcome.quantized = self._quantized_in(model, "")
        if self.settings.writer is not None:
            self.settings.writer.tensors(model, "")
        self.source.release_outer()

    # --------------------------------------------------------------- blocks
    def _run_blocks(self) -> None:
        blocks = self.source.blocks
        assert blocks is not None
        ckpt = self.settings.checkpoint
        saved = ckpt.load() if ckpt is not None else None
        start = int(saved[0]["next_block"]) if saved is not None else 0
        self.outcome.resumed_from = start
        batches = self._batches()
        self._prologue(batches)
        if saved is not None:
            self._restore(*saved)
        bar = tqdm(
            range(start, len(blocks)),
            desc="blocks",
            unit="block",
            initial=start,
            total=len(blocks),
            disable=not self.ctx.progress,
        )
        for i in bar:
            self._block(i, batches)
            if ckpt is not None and ckpt.enabled and (ckpt.due() or i + 1 == len(blocks)):
                self._checkpoint(i + 1)
            if self.ctx.status:
                bar.set_postfix_str(self.ctx.status)
        self._outer(batches)

    def _capture(self, name: str, batches: list[Any]) -> Stream:
        blocks = self.source.blocks
        assert blocks is not None
        inputs = capture_block_inputs(self.source.model, blocks[0], batches)
        return Stream.create(name, inputs, self._offload())

    def _offload(self) -> Path | None:
        return self.settings.offload

    def _prologue(self, batches: list[Any]) -> None:
        windows = self._windows()
        if not (batches or windows or self.has_prologue):
            return
        with torch.no_grad(), self.source.outer_on_demand(original=self.source.lazy):
            if self._eval("eval_fp"):
                self.streams["eval_fp"] = self._capture("eval_fp", windows)
            needed = [m for p in self.passes for m in p.prologue_modules(self.state)]
            self.source.load_modules(needed, original=self.source.lazy)
            for p in self.passes:
                p.prologue(self.state, self.ctx)
            if batches:
                calib = self._capture("calib", batches)
                self.streams["calib"] = calib
                if self.wants_fp:
                    fp_inputs = [calib.input(i) for i in range(len(calib))]
                    self.streams["fp"] = Stream.create("fp", fp_inputs, self._offload())
            if self._eval("eval_q"):
                self.streams["eval_q"] = self._capture("eval_q", windows)
        if self.has_prologue and self.source.lazy:
            self._save_overlay()
        self.source.release_outer()
        if self.source.lazy:
            release_freed()

    def _windows(self) -> list[torch.Tensor]:
        w = self.settings.eval_windows
        return [] if w is None else [x.to(self.ctx.device) for x in w.split(1)]

    def _eval(self, which: str) -> bool:
        return bool(self._windows()) and (
            self.settings.eval_fp if which == "eval_fp" else self.settings.eval_q
        )

    def _save_overlay(self) -> None:
        from safetensors.torch import save_file

        work = self.settings.work
        if work is None:
            raise ValueError(
                "a pass changed outer weights before the blocks of a lazily read model, "
                "which needs a work folder to keep them (RunSettings.work)"
            )
        rank = self.ctx.distributed.rank if self.ctx.distributed is not None else 0
        work = work / f"overlay-rank{rank}"
        work.mkdir(parents=True, exist_ok=True)
        current = {n: self.source.current(n) for n in self.source.outer_names()}
        tensors = {n: t for n, t in current.items() if t.device.type != "meta"}
        tmp = work / (OVERLAY_FILE + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(work / OVERLAY_FILE)
        self.source.set_overlay(work)

    @torch.no_grad()
    def _advance(self, stream: Stream, block: nn.Module) -> None:
        for i in range(len(stream)):
            out = block_forward(block, stream, i)
            if i == 0:
                self.as_tuple = isinstance(out, tuple | list)
            stream.set_hidden(i, block_output(out))

    def _block(self, i: int, batches: list[Any]) -> None:
        block = self.source.load_block(i)
        prefix = self.source.block_prefix(i)
        if "eval_fp" in self.streams:
            self._advance(self.streams["eval_fp"], block)
        unit = Unit(
            "block",
            i,
            prefix,
            block,
            self.source.model,
            self._layers(prefix),
            calibration=self.streams.get("calib"),
            batches=batches,
            fp=self.streams.get("fp"),
        )
        self._run_passes(unit)
        fp = self.streams.get("fp")
        if fp is not None:
            if not unit.fp_staged:
                unit.run_fp()
            fp.commit()
        for name in ("calib", "eval_q"):
            if name in self.streams:
                self._advance(self.streams[name], block)
        self.outcome.quantized += self._quantized_in(block, prefix)
        if self.settings.writer is not None:
            self.settings.writer.tensors(block, prefix)
        del unit, block
        self.source.release_block(i)
        if self.source.lazy:
            release_freed()

    def _checkpoint(self, next_block: int) -> None:
        ckpt = self.settings.checkpoint
        assert ckpt is not None
        streams = itertools.chain.from_iterable(s.hiddens() for s in self.streams.values())
        writer = self.settings.writer
        ckpt.save(
            {
                "next_block": next_block,
                "as_tuple": self.as_tuple,
                "writer": writer.state() if writer is not None else {},
                "records": self.ctx.records,
                "quantized": self.outcome.quantized,
            },
            streams,
        )

    def _restore(self, state: dict[str, Any], streams: dict[str, torch.Tensor]) -> None:
        for s in self.streams.values():
            s.restore(streams)
        self.as_tuple = bool(state["as_tuple"])
        self.ctx.records.clear()
        self.ctx.records.update(state["records"])
        self.outcome.quantized = list(state["quantized"])
        if self.settings.writer is not None:
            self.settings.writer.restore(state["writer"])

    # ---------------------------------------------------------------- outer
    def _outer(self, batches: list[Any]) -> None:
        layers = self._layers(None)
        evaluate = "eval_fp" in self.streams or "eval_q" in self.streams
        writer = self.settings.writer
        if not (evaluate or layers or self.wants_outer):
            if writer is not None:
                for name in self.source.outer_names():
                    writer.stored(name, self.source.stored(name))
            return
        model = self.source.model
        blocks = self.source.blocks
        assert blocks is not None
        if "eval_fp" in self.streams:
            self.source.load_outer(original=self.source.lazy)
            self.outcome.fp_nll = self._nll(self.streams["eval_fp"])
            self.source.release_outer()
        self.source.load_outer()
        unit = Unit(
            "outer",
            len(blocks),
            "",
            model,
            model,
            layers,
            batches=batches,
            final=self.streams.get("calib"),
            blocks=blocks,
            as_tuple=self.as_tuple,
        )
        self._run_passes(unit)
        if "eval_q" in self.streams:
            self.outcome.quant_nll = self._nll(self.streams["eval_q"])
        inside = f"{self.source.block_path}."
        self.outcome.quantized += self._quantized_in(model, "", skip=inside)
        if writer is not None:
            writer.tensors(model, "", skip=inside)
        self.source.release_outer()

    @torch.no_grad()
    def _nll(self, stream: Stream) -> float:
        """Summed next-token NLL of the eval windows from their final hidden states."""
        blocks = self.source.blocks
        assert blocks is not None and self.settings.eval_windows is not None
        total = 0.0
        count = 0
        for i, window in enumerate(self._windows()):
            out = replayed_forward(
                self.source.model, blocks, stream.hidden(i), window, self.as_tuple
            )
            logits = out.logits.float()
            nll = nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
            total += float(nll)
            count += window.shape[1] - 1
        self.outcome.eval_tokens = count
        return total
