"""Measure per-layer sensitivities ``dL[l, c]`` on a real model, one block in memory.

Four estimators of the loss increase caused by quantizing layer ``l`` *alone* to
candidate ``c`` (``W -> Q_c(W)``, ``dW = W - Q_c(W)``), on calibration tokens:

``loss``
    Measured increase of the mean next-token NLL (Hubara et al., "Improving Post
    Training Neural Quantization: Layer-wise Calibration and Integer Programming",
    2020): ``dL = NLL(Q_c at l) - NLL(FP)``. The inputs of block ``b`` are cached, so
    each (layer, candidate) reruns only blocks ``b..end`` and the head.
``kl``
    ``dL = mean_t KL(p_FP(.|t) || p_q(.|t))`` of the final next-token distributions,
    same block-cached reruns.
``hessian``
    Layer output error ``tr(dW H dW^T)`` with ``H = X^T X / n`` from the layer's FP
    inputs ``X`` (the GPTQ / OBQ proxy, Frantar et al. 2022): one pass over the data.
``fisher``
    Fisher-weighted output error (Li et al., "BRECQ", 2021, eq. 10; diagonal empirical
    Fisher of the layer output): ``dL = (n / 2) sum_{t, j} g_{tj}^2 (x_t dW^T)_j^2`` with
    ``g_t = dNLL / dy_t`` of the mean NLL. One forward and one block-by-block backward
    (each block recomputed from its cached input, i.e. per-block checkpointing).

Negative measured deltas (noise on a small set) are clamped to 0; ``fp16``/dense
candidates have ``dL = 0``; a candidate that does not fit a layer's shape is NaN.
:func:`cached_sensitivity` caches the table as JSON keyed by a hash of the model's
weights, the candidate definitions, the estimator and the calibration tokens, so a new
budget re-solves in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ptq.calibration.blocks import (
    BlockInput,
    block_output,
    capture_block_inputs,
    run_block,
)
from ptq.calibration.hessian import HessianAccumulator
from ptq.formats import INT8, PerChannel, fake_quantize
from ptq.models.weight_source import WeightSource
from ptq.passes.allocation.candidates import Candidate, candidate_bytes
from ptq.passes.allocation.sensitivity import SensitivityTable

Estimator = Literal["loss", "kl", "hessian", "fisher"]
FactorFormat = Literal["fp16", "int8"]
ESTIMATORS: tuple[Estimator, ...] = ("loss", "kl", "hessian", "fisher")
METRICS = {"loss": "nll_delta", "kl": "kl", "hessian": "hessian_trace", "fisher": "fisher_nll"}


@dataclass(frozen=True, kw_only=True)
class MeasureConfig:
    """How sensitivities are measured.

    Args:
        estimator: ``loss``, ``kl``, ``hessian`` or ``fisher`` (see the module).
        samples: Calibration sequences used (the first ``samples`` rows).
        seqlen: Tokens per sequence used (the first ``seqlen`` columns).
        batch_size: Sequences per forward.
    """

    estimator: Estimator = "fisher"
    samples: int = 8
    seqlen: int = 256
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; valid: {ESTIMATORS}")
        if self.samples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise ValueError(
                f"samples, batch_size must be >= 1 and seqlen >= 2, got "
                f"{self.samples}, {self.batch_size}, {self.seqlen}"
            )

    def subset(self, calibration: torch.Tensor) -> torch.Tensor:
        """The calibration tokens actually used, ``[<= samples, <= seqlen]``."""
        if calibration.dim() != 2 or calibration.shape[1] < 2:
            raise ValueError(
                f"calibration must be [n, seqlen >= 2], got {tuple(calibration.shape)}"
            )
        return calibration[: self.samples, : self.seqlen]


def lorc_factor_format(cand: Candidate) -> FactorFormat | None:
    """The :mod:`ptq.passes.lorc` factor format storing ``cand``'s factors, or None when
    that module cannot store them (only dense 16-bit or INT8 per-row factors exist)."""
    if cand.lorc_format is None:
        return "fp16"
    f = cand.lorc_format
    if f.element == INT8 and isinstance(f.granularity, PerChannel) and f.symmetric:
        return "int8"
    return None


def supported(candidates: Sequence[Candidate]) -> tuple[list[Candidate], list[str]]:
    """Split ``candidates`` into those we can measure and apply, and messages for the rest."""
    try:
        import ptq.passes.lorc  # noqa: F401
    except ImportError:
        has_lorc = False
    else:
        has_lorc = True
    kept, why = [], []
    for c in candidates:
        if c.lorc_rank and not has_lorc:
            why.append(f"candidate {c.name!r} excluded: LoRC (ptq.passes.lorc) is not available")
        elif c.lorc_rank and lorc_factor_format(c) is None:
            why.append(
                f"candidate {c.name!r} excluded: LoRC factors can be stored dense (fp16) or "
                f"INT8 per channel ('@int8_channel'), not {c.lorc_format!r}"
            )
        else:
            kept.append(c)
    return kept, why


def candidate_weight(w: torch.Tensor, cand: Candidate) -> torch.Tensor:
    """The weight the model computes with under ``cand``: ``Q(W) [+ U_r V_r]``."""
    if cand.fmt is None:
        return w
    q = fake_quantize(w.float(), cand.fmt)
    if cand.lorc_rank:
        from ptq.passes.lorc import lorc_factors

        fmt = lorc_factor_format(cand)
        if fmt is None:
            raise ValueError(f"candidate {cand.name!r}: unsupported LoRC factor format")
        e = w.float() - q
        u, v = lorc_factors(e, min(cand.lorc_rank, *e.shape), fmt)
        q = q + (u @ v).float()
    return q.to(w.dtype)


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    """The (detached) weight of the Linear ``name``.

    Raises:
        ValueError: ``name`` has no 2-D weight tensor.
    """
    w = getattr(model.get_submodule(name), "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"layer {name!r} has no 2-D weight; only Linear layers can be allocated")
    return w.detach()


def _fits(cand: Candidate, w: torch.Tensor) -> bool:
    try:
        candidate_bytes(cand, w.shape[0], w.shape[1])
    except ValueError:
        return False
    return True


class _Head:
    """Final norm + output embedding of a decoder model (the part after the blocks, as
    :func:`ptq.frontend.analyse.outer_part` finds it)."""

    def __init__(self, model: nn.Module, path: str) -> None:
        from ptq.frontend.analyse import outer_part

        outer = outer_part(model, path)
        if outer.final_norm is None or outer.head is None:
            raise ValueError(
                f"cannot find the one final norm outside {path!r} or the output embeddings; "
                "the loss/kl/fisher estimators need a decoder LM head"
            )
        self.norm = model.get_submodule(outer.final_norm)
        self.head = model.get_submodule(outer.head)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden)).float()


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )


@dataclass
class _Walk:
    """The model as the weight source gives it: outer part loaded, blocks on demand.

    ``keep``: blocks stay loaded once read (the loss/kl estimators rerun the model's
    tail for every trial); otherwise each is released after use, one block in memory.
    """

    source: WeightSource
    batches: list[torch.Tensor]
    head: _Head
    keep: bool
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    _loaded: set[int] = field(default_factory=set)

    @property
    def model(self) -> nn.Module:
        return self.source.model

    @property
    def n_blocks(self) -> int:
        return self.source.n_blocks

    @property
    def n_tokens(self) -> int:
        return sum(b.shape[0] * (b.shape[1] - 1) for b in self.batches)

    def block(self, b: int) -> nn.Module:
        if b not in self._loaded:
            self.source.load_block(b)
            self._loaded.add(b)
        assert self.source.blocks is not None
        return self.source.blocks[b]

    def done(self, b: int) -> None:
        if not self.keep and b in self._loaded:
            self.source.release_block(b)
            self._loaded.discard(b)

    def close(self) -> None:
        for b in sorted(self._loaded):
            self.source.release_block(b)
        self._loaded.clear()

    def by_block(self, layers: Sequence[str]) -> list[list[str]]:
        return [
            [n for n in layers if n.startswith(self.source.block_prefix(i))]
            for i in range(self.n_blocks)
        ]

    @torch.no_grad()
    def tail(self, start: int, inputs: list[BlockInput]) -> list[torch.Tensor]:
        """Logits after running blocks ``start..end`` from ``inputs`` (one per batch)."""
        hidden = [x.hidden for x in inputs]
        for j in range(start, self.n_blocks):
            block = self.block(j)
            hidden = [
                block_output(block(h, *x.args, **x.kwargs))
                for h, x in zip(hidden, inputs, strict=True)
            ]
            self.done(j)
        return [self.head.logits(h) for h in hidden]


def _walk(
    source: WeightSource, calibration: torch.Tensor, batch_size: int, keep: bool
) -> tuple[_Walk, list[BlockInput]]:
    if source.blocks is None or source.block_path is None:
        raise ValueError(
            "sensitivity measurement needs a model with repeated blocks (model.layers)"
        )
    device = source.device
    batches = [b.to(device) for b in calibration.split(batch_size)]
    inputs = capture_block_inputs(source.model, source.blocks[0], batches)
    head = _Head(source.model, source.block_path)
    return _Walk(source, batches, head, keep), inputs


def _advance(block: nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    return [replace(x, hidden=o) for x, o in zip(inputs, run_block(block, inputs), strict=True)]


DeltaFn = Callable[[str, torch.Tensor, torch.Tensor], float]
"""``(layer, W, W_q) -> dL``."""


def _fill(
    walk: _Walk,
    names: Sequence[str],
    cands: Sequence[Candidate],
    out: dict[str, list[float]],
    delta: DeltaFn,
) -> None:
    for name in names:
        w = weight_of(walk.model, name)
        walk.shapes[name] = (int(w.shape[0]), int(w.shape[1]))
        row = []
        for c in cands:
            if not _fits(c, w):
                row.append(math.nan)
            elif c.fmt is None:
                row.append(0.0)
            else:
                row.append(max(0.0, float(delta(name, w, candidate_weight(w, c)))))
        out[name] = row


@torch.no_grad()
def _rerun(
    walk: _Walk,
    layers: Sequence[str],
    cands: Sequence[Candidate],
    inputs: list[BlockInput],
    kl: bool,
    bar: Any,
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    n = walk.n_tokens
    base = walk.tail(0, inputs)
    base_nll = sum(float(_nll_sum(lg, ids)) for lg, ids in zip(base, walk.batches, strict=True)) / n
    base_lp = [torch.log_softmax(lg[:, :-1], -1) for lg in base] if kl else []
    del base
    for b, names in enumerate(walk.by_block(layers)):

        def delta(
            name: str, w: torch.Tensor, wq: torch.Tensor, _b: int = b, _x: list[BlockInput] = inputs
        ) -> float:
            mod = walk.model.get_submodule(name)
            saved = mod.weight.data
            mod.weight.data = wq
            try:
                logits = walk.tail(_b, _x)
            finally:
                mod.weight.data = saved
            if kl:
                total = 0.0
                for lp, lg in zip(base_lp, logits, strict=True):
                    lq = torch.log_softmax(lg[:, :-1], -1)
                    total += float((lp.exp() * (lp - lq)).sum())
                return total / n
            nll = sum(
                float(_nll_sum(lg, ids)) for lg, ids in zip(logits, walk.batches, strict=True)
            )
            return nll / n - base_nll

        walk.block(b)
        _fill(walk, names, cands, out, delta)
        bar.update(len(names))
        inputs = _advance(walk.block(b), inputs)
    return out


@torch.no_grad()
def _hessian(
    walk: _Walk,
    layers: Sequence[str],
    cands: Sequence[Candidate],
    inputs: list[BlockInput],
    bar: Any,
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for b, names in enumerate(walk.by_block(layers)):
        block = walk.block(b)
        acc = {n: HessianAccumulator(weight_of(walk.model, n).shape[1]) for n in names}
        hooks = [
            walk.model.get_submodule(n).register_forward_pre_hook(
                lambda _m, a, _acc=acc[n]: _acc.update(a[0].float())
            )
            for n in names
        ]
        try:
            nxt = _advance(block, inputs)
        finally:
            for h in hooks:
                h.remove()
        hess = {n: (a.hessian() / 2).float() for n, a in acc.items() if a.nsamples}

        def delta(
            name: str, w: torch.Tensor, wq: torch.Tensor, _h: dict[str, torch.Tensor] = hess
        ) -> float:
            dw = w.float() - wq.float()
            return float(((dw @ _h[name]) * dw).sum())

        _fill(walk, [n for n in names if n in hess], cands, out, delta)
        walk.done(b)
        bar.update(len(names))
        inputs = nxt
    return out


def _capture(xs: list[torch.Tensor], gs: list[torch.Tensor]) -> Callable[..., None]:
    """Forward hook storing a linear's input rows and, on backward, its output gradient."""

    def hook(_m: nn.Module, a: tuple[Any, ...], y: torch.Tensor) -> None:
        xs.append(a[0].detach().reshape(-1, a[0].shape[-1]).float())
        y.register_hook(lambda g: gs.append(g.detach().reshape(-1, g.shape[-1]).float()))

    return hook


def _fisher(
    walk: _Walk,
    layers: Sequence[str],
    cands: Sequence[Candidate],
    inputs: list[BlockInput],
    bar: Any,
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    cached = [inputs]
    with torch.no_grad():
        for b in range(walk.n_blocks):
            cached.append(_advance(walk.block(b), cached[-1]))
            walk.done(b)
    n = walk.n_tokens
    grads = []
    for x, ids in zip(cached[-1], walk.batches, strict=True):
        h = x.hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = _nll_sum(walk.head.logits(h), ids) / n
            grads.append(torch.autograd.grad(loss, [h])[0])
    groups = walk.by_block(layers)
    for b in reversed(range(walk.n_blocks)):
        names = groups[b]
        block = walk.block(b)
        xs: dict[str, list[torch.Tensor]] = {m: [] for m in names}
        gs: dict[str, list[torch.Tensor]] = {m: [] for m in names}

        hooks = [
            walk.model.get_submodule(m).register_forward_hook(_capture(xs[m], gs[m])) for m in names
        ]
        try:
            for i, x in enumerate(cached[b]):
                h = x.hidden.detach().requires_grad_(True)
                with torch.enable_grad():
                    y = block_output(block(h, *x.args, **x.kwargs))
                    grads[i] = torch.autograd.grad(y, [h], grads[i])[0]
        finally:
            for hk in hooks:
                hk.remove()
        feats = {m: (torch.cat(xs[m]), torch.cat(gs[m]).pow(2)) for m in names}

        def delta(
            name: str,
            w: torch.Tensor,
            wq: torch.Tensor,
            _f: dict[str, tuple[torch.Tensor, torch.Tensor]] = feats,
        ) -> float:
            x_rows, g2 = _f[name]
            dy = x_rows @ (w.float() - wq.float()).T
            return float((g2 * dy.pow(2)).sum()) * n / 2

        with torch.no_grad():
            _fill(walk, names, cands, out, delta)
        walk.done(b)
        bar.update(len(names))
        cached.pop()
    return out


def as_source(model: nn.Module | WeightSource) -> WeightSource:
    """A weight source for ``model`` (an in-memory module is wrapped)."""
    if isinstance(model, WeightSource):
        return model
    from ptq.models.weight_source import InMemorySource

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return InMemorySource(model, device)


def measure_sensitivity(
    model: nn.Module | WeightSource,
    layers: Sequence[str],
    candidates: Sequence[Candidate],
    calibration: torch.Tensor,
    config: MeasureConfig = MeasureConfig(),
    *,
    progress: bool = False,
    source: str = "",
) -> SensitivityTable:
    """``dL[layer, candidate]`` with ``config.estimator`` (see the module docstring).

    Args:
        model: A floating-point decoder LM, in memory or as a weight source whose blocks
            are loaded one at a time (weights are restored after each trial). ``hessian``
            and ``fisher`` hold one block at a time; ``loss`` and ``kl`` rerun the tail
            of the model for every trial and keep every block they have read.
        layers: Linear layers to measure (inside the repeated blocks), model order.
        candidates: Candidates (LoRC ones must pass :func:`supported`).
        calibration: ``[n, seqlen]`` token ids (``config.subset`` of it is used).
        config: Estimator and calibration subset.
        progress: Show a progress bar over layers.
        source: Free text stored in the table (the cache key, typically).

    Raises:
        ValueError: no repeated blocks / LM head, or layers outside the blocks.
    """
    weights = as_source(model)
    ids = config.subset(calibration)
    was_training = weights.model.training
    weights.model.eval()
    weights.load_outer()
    walk: _Walk | None = None
    bar = tqdm(
        total=len(layers),
        desc=f"sensitivity ({config.estimator})",
        disable=not progress,
        unit="layer",
    )
    try:
        walk, inputs = _walk(weights, ids, config.batch_size, config.estimator in ("loss", "kl"))
        outside = [n for n in layers if not n.startswith(f"{weights.block_path}.")]
        if outside:
            raise ValueError(
                f"layers outside the repeated blocks {weights.block_path!r} cannot be "
                f"measured: {outside}"
            )
        if config.estimator == "hessian":
            rows = _hessian(walk, layers, candidates, inputs, bar)
        elif config.estimator == "fisher":
            rows = _fisher(walk, layers, candidates, inputs, bar)
        else:
            rows = _rerun(walk, layers, candidates, inputs, config.estimator == "kl", bar)
        shapes = dict(walk.shapes)
    finally:
        bar.close()
        if walk is not None:
            walk.close()
        weights.release_outer()
        weights.model.train(was_training)
    names = [c.name for c in candidates]
    loss = np.array([rows.get(n, [math.nan] * len(names)) for n in layers], dtype=np.float64)
    return SensitivityTable(
        tuple(layers),
        tuple(names),
        tuple(shapes[n] for n in layers),
        loss,
        metric=METRICS[config.estimator],
        source=source,
    )


def model_fingerprint(model: nn.Module | WeightSource, layers: Sequence[str]) -> str:
    """BLAKE2b of the named layers' names, shapes and weight bytes (hex, 32 chars).

    Blocks are loaded one at a time from a weight source."""
    weights = as_source(model)
    h = hashlib.blake2b(digest_size=16)
    by_block: dict[int, list[str]] = {}
    for n in layers:
        idx = next(
            (i for i in range(weights.n_blocks) if n.startswith(weights.block_prefix(i))), -1
        )
        by_block.setdefault(idx, []).append(n)
    digests: dict[str, bytes] = {}
    for b, names in by_block.items():
        if b >= 0:
            weights.load_block(b)
        try:
            for n in names:
                w = weight_of(weights.model, n).cpu().contiguous()
                part = hashlib.blake2b(digest_size=16)
                part.update(f"{n}:{tuple(w.shape)}:{w.dtype};".encode())
                part.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
                digests[n] = part.digest()
        finally:
            if b >= 0:
                weights.release_block(b)
    for n in layers:
        h.update(digests[n])
    return h.hexdigest()


def cache_key(
    fingerprint: str,
    candidates: Sequence[Candidate],
    config: MeasureConfig,
    calibration: torch.Tensor,
) -> str:
    """Key of a measurement: model, candidate definitions, estimator, calibration tokens."""
    ids = config.subset(calibration).to(torch.int64).contiguous()
    desc = {
        "model": fingerprint,
        "candidates": [repr(c) for c in candidates],
        "estimator": config.estimator,
        "samples": config.samples,
        "seqlen": config.seqlen,
        "batch_size": config.batch_size,
        "calibration": hashlib.blake2b(ids.numpy().tobytes(), digest_size=16).hexdigest(),
        "shape": list(ids.shape),
    }
    return hashlib.blake2b(json.dumps(desc, sort_keys=True).encode(), digest_size=12).hexdigest()


def cached_sensitivity(
    model: nn.Module | WeightSource,
    layers: Sequence[str],
    candidates: Sequence[Candidate],
    calibration: torch.Tensor,
    config: MeasureConfig,
    cache_dir: Path | None,
    *,
    progress: bool = False,
) -> tuple[SensitivityTable, Path | None, bool]:
    """Load ``sensitivity-{estimator}-{key}.json`` from ``cache_dir`` or measure and save it.

    Returns:
        ``(table, cache file or None, True if it came from the cache)``. A cache file
        whose content does not match the key, layers or candidates is re-measured.
    """
    key = cache_key(model_fingerprint(model, layers), candidates, config, calibration)
    source = f"ptq sensitivity key={key} estimator={config.estimator}"
    path = (
        None
        if cache_dir is None
        else Path(cache_dir) / f"sensitivity-{config.estimator}-{key}.json"
    )
    if path is not None and path.is_file():
        try:
            table = SensitivityTable.load(path)
        except ValueError:
            table = None
        names = tuple(c.name for c in candidates)
        if (
            table is not None
            and table.source == source
            and table.layers == tuple(layers)
            and table.candidates == names
        ):
            return table, path, True
    table = measure_sensitivity(
        model, layers, candidates, calibration, config, progress=progress, source=source
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
    return table, path, False
