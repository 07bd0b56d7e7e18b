"""Memory-bounded, resumable block-wise quantization of decoder LMs.

The model skeleton is built on the meta device (no weights); the embedding, final norm
and head load from safetensors; then for each decoder block ``i``:

1. its weights load lazily from the safetensors shards (only this block is resident),
2. its planned layers are quantized stage by stage by the weight pass (GPTQ, AdaRound,
   AdaQuant or RTN) with statistics from the calibration activations,
3. the quantized block's outputs become block ``i + 1``'s inputs,
4. the block's output tensors are written to ``work/block-{i}.safetensors`` and the run's
   state (blocks done, the next block's input activations, a fingerprint of the command)
   to ``work/state.json``, then the block's weights are freed.

Re-running the same command after a crash continues after the last finished block and
produces the same bytes as an uninterrupted run; a changed command is refused unless
``restart`` is set. Peak memory is one block's weights plus the calibration activations.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ptq.calibration.blocks import BlockInput, capture_block_inputs, find_blocks, run_block
from ptq.calibration.runner import (
    LayerStats,
    StatsRequest,
    _block_forward,
    collect_stage,
    discover_stages,
)
from ptq.errors import PtqInputError, PtqUsageError
from ptq.io.safetensors_reader import SafetensorsIndex
from ptq.plan import QuantPlan

STATE_FILE = "state.json"
ACTS_FILE = "activations.safetensors"
STATE_VERSION = 1

QuantizeLayer = Callable[[nn.Module, str, LayerStats], None]


@dataclass(frozen=True)
class LazyResult:
    """Where the per-block shards are and which tensors each holds."""

    work_dir: Path
    block_files: list[str]
    outer_file: str
    resumed_from: int


def fingerprint(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines the output."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _skeleton(model_dir: Path, trust_remote_code: bool) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with init_empty_weights():  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=trust_remote_code, dtype=torch.float32
        )
    return model.eval()


def _load_into(
    root: nn.Module,
    index: SafetensorsIndex,
    prefix: str,
    names: list[str],
    later: tuple[str, ...] = (),
) -> None:
    """Assign tensors ``prefix + local`` from the index to ``root``'s parameters.

    Parameters under the ``later`` prefixes (blocks loaded one at a time) or tied to
    another parameter may stay on meta here.
    """
    state = {n[len(prefix) :]: index.get(n).float() for n in names}
    missing, unexpected = root.load_state_dict(state, strict=False, assign=True)
    tied = (
        {"lm_head.weight"}
        if getattr(getattr(root, "config", None), "tie_word_embeddings", False)
        else set()
    )
    still_meta = [
        k
        for k in missing
        if not k.startswith(later)
        and k not in tied
        and _param_or_buffer(root, k).device.type == "meta"
    ]
    if still_meta or unexpected:
        raise PtqInputError(
            f"{index.model_dir}: weights do not match the model under {prefix or 'the root'} "
            f"(missing {still_meta[:4]}, unexpected {unexpected[:4]})"
        )


def _free_outer(model: nn.Module) -> None:
    """Move the embedding and the head back to meta once block 0's inputs are captured."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):  # type: ignore[operator]
        if module is not None:
            module.to("meta")


def _param_or_buffer(root: nn.Module, name: str) -> torch.Tensor:
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    return getattr(mod, attr)


class LazyBlockRunner:
    """Quantize a decoder LM block by block from its safetensors, resumably.

    Args:
        model_dir: HF folder with config.json and safetensors.
        plan: Per-layer decisions (layer names as in the full model).
        request: Statistics the weight pass needs per layer.
        quantize_layer: ``quantize_layer(block_or_model, layer_name, stats)`` replaces the
            layer (relative to ``block_or_model`` using the full name minus its prefix).
        block_tensors: ``block_tensors(block, prefix) -> {full_name: tensor}`` to save.
        work_dir: Where shards and state go (kept for resume until the caller removes it).
        run_key: Everything that determines the output (command, plan, data, seed).
        restart: Discard a work folder whose fingerprint differs instead of refusing.
    """

    def __init__(
        self,
        *,
        model_dir: Path,
        plan: QuantPlan,
        request: StatsRequest,
        quantize_layer: Callable[[nn.Module, str, str, LayerStats], None],
        block_tensors: Callable[[nn.Module, str], dict[str, torch.Tensor]],
        work_dir: Path,
        run_key: dict[str, Any],
        restart: bool = False,
        batch_size: int = 8,
        progress: bool = True,
        trust_remote_code: bool = False,
        after_block: Callable[[int], None] | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.plan = plan
        self.request = request
        self.quantize_layer = quantize_layer
        self.block_tensors = block_tensors
        self.work_dir = work_dir
        self.key = fingerprint(run_key)
        self.restart = restart
        self.batch_size = batch_size
        self.progress = progress
        self.trust_remote_code = trust_remote_code
        self.after_block = after_block

    def _state(self) -> dict[str, Any] | None:
        path = self.work_dir / STATE_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if state.get("fingerprint") != self.key:
            if not self.restart:
                raise PtqUsageError(
                    f"{self.work_dir} holds an interrupted run of a different command or "
                    f"config; rerun the original command to resume, or pass --restart"
                )
            shutil.rmtree(self.work_dir)
            return None
        return state

    def _save_state(self, done: int, inputs: list[BlockInput], files: list[str]) -> None:
        acts = {f"batch{i}": x.hidden.contiguous() for i, x in enumerate(inputs)}
        tmp_acts = self.work_dir / (ACTS_FILE + ".tmp")
        save_file(acts, str(tmp_acts))
        tmp_acts.replace(self.work_dir / ACTS_FILE)
        state = {
            "version": STATE_VERSION,
            "fingerprint": self.key,
            "blocks_done": done,
            "files": files,
        }
        tmp = self.work_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.work_dir / STATE_FILE)  # atomic: the state never names a half-written file

    @torch.no_grad()
    def run(self, calibration: torch.Tensor) -> LazyResult:
        index = SafetensorsIndex(self.model_dir)
        model = _skeleton(self.model_dir, self.trust_remote_code)
        found = find_blocks(model)
        if found is None:
            raise PtqUsageError(
                "--low-memory needs a decoder LM with repeated blocks; drop the flag"
            )
        path, blocks = found
        block_prefix = path + "."
        outer = [n for n in index if not n.startswith(block_prefix)]
        _load_into(model, index, "", outer, later=(block_prefix,))
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()  # type: ignore[operator]
        state = self._state()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        start = int(state["blocks_done"]) if state else 0
        files: list[str] = list(state["files"]) if state else []
        batches = list(calibration.split(self.batch_size))
        inputs = capture_block_inputs(model, blocks[0], batches)
        _free_outer(model)  # embeddings/head are re-read from the source at export time
        if start:
            acts = load_file(str(self.work_dir / ACTS_FILE))
            inputs = [replace(x, hidden=acts[f"batch{i}"]) for i, x in enumerate(inputs)]
        layer_names = [lp.name for lp in self.plan]
        bar = tqdm(
            range(start, len(blocks)),
            desc="blocks",
            disable=not self.progress,
            unit="block",
            initial=start,
            total=len(blocks),
        )
        for i in bar:
            prefix = f"{path}.{i}."
            block = blocks[i]
            _load_into(block, index, prefix, index.names_with_prefix(prefix))
            names = [n for n in layer_names if n.startswith(prefix)]
            if names:
                for stage in discover_stages(block, prefix, names, inputs[0]):
                    if self.request.hessian or self.request.input_rows:
                        forwards = [functools.partial(_block_forward, block, x) for x in inputs]
                        stats = collect_stage(block, stage, prefix, self.request, forwards)
                    else:
                        stats = {n: LayerStats(max_rows=0) for n in stage}
                    for name in stage:
                        self.quantize_layer(block, prefix, name, stats[name])
            outputs = run_block(block, inputs)
            inputs = [replace(x, hidden=o) for x, o in zip(inputs, outputs, strict=True)]
            fname = f"block-{i:05d}.safetensors"
            save_file(
                self.block_tensors(block, prefix),
                str(self.work_dir / fname),
                metadata={"format": "pt"},
            )
            files.append(fname)
            self._save_state(i + 1, inputs, files)
            blocks[i] = nn.Identity()  # drop this block: weights, codes and scales are on disk
            del block
            if self.after_block is not None:
                self.after_block(i)
        return LazyResult(self.work_dir, files, "", start)

    def outer_tensors(self) -> dict[str, torch.Tensor]:
        """Non-block tensors, as stored in the source (read lazily)."""
        index = SafetensorsIndex(self.model_dir)
        model = _skeleton(self.model_dir, self.trust_remote_code)
        found = find_blocks(model)
        assert found is not None
        prefix = found[0] + "."
        return {n: index.get(n) for n in index if not n.startswith(prefix)}
