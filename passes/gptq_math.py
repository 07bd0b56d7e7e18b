"""GPTQ: column-by-column quantization with second-order error feedback.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023), Algorithm 1. For a linear layer with weight ``W`` [N, K] and
calibration inputs ``X`` [n, K], ``H = 2 X^T X / n`` is the Hessian of the layer-wise
loss ``||W X^T - Q X^T||^2``. With ``Hinv = (H + lambda I)^-1 = U^T U`` (``U`` upper
Cholesky, ``lambda = percdamp * mean(diag H)``), each column ``j`` is quantized and its
error pushed onto the columns not yet quantized::

    q_j   = quant(w_j)
    Err_j = (w_j - q_j) / U[j, j]
    W[:, j:] -= Err_j U[j, j:]

The updates are applied lazily per block of ``block_size`` columns (one matrix product
per block). Options: act-order (columns by ``diag(H)`` descending) with *static* groups
(scales fixed up front from the original ``W`` so groups stay contiguous and no
``g_idx`` is needed), and *dynamic* scales (a group's scale is computed from the current,
error-updated weights when the sweep reaches its first column; the paper's behaviour).
Any :class:`QuantFormat` works: INT at any granularity, FP8/FP4 minifloats, MXFP4
(E8M0 per 32), NVFP4 (E4M3 per 16 under a global scale from the whole ``W``).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from typing import BinaryIO, Literal

import torch

from ptq.calibration.hessian import OwnedHessian
from ptq.formats import QTensor, QuantFormat
from ptq.formats.rounding import all_finite, check_finite
from ptq.passes.quant_with_scales import (
    BlockScales,
    block_scales,
    build_qtensor,
    dequantize_with_scale,
    expand_blocks,
    round_with_scale,
    tensor_global_scale,
)

ScaleMode = Literal["static", "dynamic"]


class HessianError(ValueError):
    """The damped Hessian of a layer stayed non positive-definite after all retries."""


@dataclass(frozen=True, kw_only=True)
class GPTQConfig:
    """GPTQ options.

    Args:
        block_size: Columns per lazy batch update (paper: 128).
        percdamp: Damping ``lambda = percdamp * mean(diag H)`` (paper: 0.01).
        act_order: Quantize columns by decreasing ``diag(H)``.
        scale_mode: ``static`` (scales from the original ``W``) or ``dynamic``.
        max_damp_retries: On Cholesky failure multiply the damping by 10 and retry this
            many times before raising :class:`HessianError`.
        linalg_dtype: dtype of the Cholesky factorisations (the sweep runs in fp32);
            float32 as in the paper's implementation (float64 doubles the memory of
            the two ``K x K`` matrices the factorisation holds).
    """

    block_size: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    scale_mode: ScaleMode = "dynamic"
    max_damp_retries: int = 4
    linalg_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"GPTQConfig.block_size must be >= 1, got {self.block_size}")
        if not self.percdamp > 0:
            raise ValueError(f"GPTQConfig.percdamp must be > 0, got {self.percdamp}")
        if self.scale_mode not in ("static", "dynamic"):
            raise ValueError(
                f"GPTQConfig.scale_mode must be 'static' or 'dynamic', got {self.scale_mode!r}"
            )
        if self.max_damp_retries < 0:
            raise ValueError(
                f"GPTQConfig.max_damp_retries must be >= 0, got {self.max_damp_retries}"
            )


@dataclass(frozen=True)
class GPTQStats:
    """Per-layer figures: ``error = tr((W - Q) H (W - Q)^T)`` with the caller's ``H``
    (for a handed-over ``H``, from the sweep's own errors: see :func:`gptq_quantize`)."""

    layer_name: str
    error: float
    damp: float
    retries: int
    dead_columns: int
    time_s: float


@dataclass(frozen=True)
class GPTQResult:
    """The quantized weight, its fp32 dequantization (bit-equal to ``qtensor``) and stats."""

    qtensor: QTensor
    weight: torch.Tensor
    stats: GPTQStats


def inverse_hessian_cholesky(
    H: torch.Tensor,
    percdamp: float,
    max_retries: int,
    layer_name: str,
    *,
    perm: torch.Tensor | None = None,
    dead: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    consume: bool = False,
) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky ``U`` of ``Hinv = (H' + lambda I)^-1`` (``Hinv = U^T U``).

    ``H'`` is ``H`` with the diagonal of ``dead`` columns set to 1, its rows and columns
    taken in the order ``perm`` (act-order), in ``dtype`` (default ``H``'s). ``lambda``
    starts at ``percdamp * mean(diag H')`` and grows tenfold on each failure. ``H`` is
    not modified.

    One work matrix beside ``H`` holds ``H'`` (one gather), then ``H' + lambda I``, its
    Cholesky factor ``L``, ``Hinv``, then ``U``: it is kept in column-major order, the
    layout LAPACK factorises in, so each factorisation writes in place (on a row-major
    matrix torch would work on a column-major copy: one more ``K x K`` each); ``U`` is
    transposed into row-major order in place at the end (a retry gathers ``H'`` again).
    The peak is two ``K x K`` matrices: for a ``K = 14336`` down projection in float32,
    1.6 GB. With ``consume`` (the caller owns ``H`` and will not read it again) the work
    matrix is ``H``'s own storage: rows permuted by cycles, transposed and permuted again
    in place (:func:`_work_matrix_in_place`, the same values moved, never computed), and
    a retry restores ``H'`` from a copy spilled to a temporary file: one ``K x K``.

    Returns:
        ``(U, lambda, retries)``, ``U`` contiguous (row-major).

    Raises:
        HessianError: Still not positive definite after ``max_retries`` retries.
    """
    dtype = dtype or H.dtype
    in_place = consume and H.dtype == dtype and H.is_contiguous() and H.device.type == "cpu"
    work = _work_matrix_in_place(H, perm, dead) if in_place else _work_matrix(H, perm, dead, dtype)
    if consume:
        del H  # the caller's only other reference was released (OwnedHessian)
    base = float(torch.diag(work).mean())
    if not base > 0:
        raise HessianError(f"layer {layer_name!r}: Hessian diagonal has mean {base}; need > 0")
    info = torch.empty((), dtype=torch.int32, device=work.device)
    with tempfile.TemporaryFile() if consume else contextlib.nullcontext() as spill:
        if spill is not None:
            _spill(spill, work.T)
        for retry in range(max_retries + 1):
            damp = percdamp * base * 10.0**retry
            if retry:
                if spill is not None:
                    _restore(spill, work.T)
                else:
                    work = _work_matrix(H, perm, dead, dtype)
            work.diagonal().add_(damp)
            torch.linalg.cholesky_ex(work, out=(work, info))  # work = L
            if int(info) == 0:
                torch.cholesky_inverse(work, out=work)  # work = Hinv
                torch.linalg.cholesky_ex(work, upper=True, out=(work, info))  # work = U
                if int(info) == 0 and all_finite(work.T):
                    return transpose_in_place(work.T), damp, retry
            if spill is None:
                del work
    raise HessianError(
        f"layer {layer_name!r}: Hessian is not positive definite even with damping "
        f"{damp:.3g} after {max_retries} retries; collect more calibration samples or "
        f"raise percdamp"
    )


def _work_matrix(
    H: torch.Tensor, perm: torch.Tensor | None, dead: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``H`` in ``dtype``, dead diagonal entries set to 1, in the order ``perm``, as one new
    column-major ``K x K`` matrix (the transposed view of a row-major copy of its
    transpose: the values are ``H'``'s, whether or not ``H`` is exactly symmetric)."""
    t = H.T
    if perm is None:
        rows = torch.empty(t.shape, dtype=dtype, device=H.device).copy_(t)
    else:
        rows = t[perm[:, None], perm[None, :]].to(dtype)
    work = rows.T
    if dead is not None and bool(dead.any()):
        work.diagonal()[dead if perm is None else dead[perm]] = 1.0
    return work


def _work_matrix_in_place(
    H: torch.Tensor, perm: torch.Tensor | None, dead: torch.Tensor | None
) -> torch.Tensor:
    """:func:`_work_matrix`'s values in ``H``'s own storage (``H`` is overwritten).

    The storage ``S`` (row-major ``H``) must end holding ``H'^T`` row-major, i.e. the
    row-major copy ``_work_matrix`` makes: ``S[i, j] = H[perm j, perm i]``. Rows are
    permuted (``S[i] <- S[perm i]``), ``S`` transposed, rows permuted again: after the
    three steps ``S[i, j] = H[perm j, perm i]``. Values are moved, never computed.
    """
    if perm is not None:
        permute_rows_in_place(H, perm)
    transpose_in_place(H)
    if perm is not None:
        permute_rows_in_place(H, perm)
    work = H.T
    if dead is not None and bool(dead.any()):
        work.diagonal()[dead if perm is None else dead[perm]] = 1.0
    return work


def permute_rows_in_place(a: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``a[i] <- a[perm[i]]`` for every row, in ``a``'s storage, one row of scratch.

    Each cycle of ``perm`` is followed from its first row, which is saved; every other
    row of the cycle is read before it is overwritten.
    """
    order = perm.tolist()
    if sorted(order) != list(range(a.shape[0])):
        raise ValueError(f"permute_rows_in_place needs a permutation of {a.shape[0]} rows")
    done = [False] * len(order)
    for start, first in enumerate(order):
        if done[start] or first == start:
            done[start] = True
            continue
        saved = a[start].clone()
        i = start
        while True:
            done[i] = True
            j = order[i]
            if j == start:
                a[i] = saved
                break
            a[i] = a[j]
            i = j
    return a


def _spill(f: BinaryIO, a: torch.Tensor) -> None:
    """Write the contiguous ``a``'s bytes to ``f`` (read back by :func:`_restore`)."""
    host = a if a.device.type == "cpu" else a.cpu()
    f.write(host.numpy().data.cast("B"))


def _restore(f: BinaryIO, a: torch.Tensor) -> None:
    f.seek(0)
    if a.device.type == "cpu":
        f.readinto(a.numpy().data.cast("B"))  # type: ignore[attr-defined]
    else:
        host = torch.empty(a.shape, dtype=a.dtype)
        f.readinto(host.numpy().data.cast("B"))  # type: ignore[attr-defined]
        a.copy_(host)


def transpose_in_place(a: torch.Tensor, tile: int = 512) -> torch.Tensor:
    """Transpose the contiguous square matrix ``a`` in its own storage and return it.

    Tiles ``(i, j)`` and ``(j, i)`` are swapped through one tile of scratch, so the
    transpose costs ``tile^2`` elements instead of a second ``K x K`` matrix; values
    are moved, never computed.
    """
    n = a.shape[0]
    if a.dim() != 2 or a.shape[1] != n or not a.is_contiguous():
        raise ValueError(f"transpose_in_place needs a contiguous square matrix, got {a.shape}")
    for i in range(0, n, tile):
        i2 = min(i + tile, n)
        a[i:i2, i:i2] = a[i:i2, i:i2].T.clone()
        for j in range(i2, n, tile):
            j2 = min(j + tile, n)
            upper = a[i:i2, j:j2].clone()
            a[i:i2, j:j2] = a[j:j2, i:i2].T
            a[j:j2, i:i2] = upper.T
    return a


UPDATE_ROWS = 1024
"""Rows of ``Wt`` per product in the sweep's lazy update (:func:`_sweep`)."""


def _column_groups(cols: int, width: int) -> int:
    return max(1, -(-cols // width))


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor | OwnedHessian,
    fmt: QuantFormat,
    *,
    layer_name: str,
    config: GPTQConfig | None = None,
    global_scale: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize ``W`` [N, K] to ``fmt`` with GPTQ given ``H`` [K, K] (``2 X^T X / n``).

    Args:
        W: Weight, any float dtype (computed in fp32).
        H: Hessian of the layer inputs: not modified, or, handed over as an
            :class:`OwnedHessian`, factorised in its own storage (no second ``K x K``
            matrix) and freed before the codes are built. The reported error then comes
            from the sweep: with ``Hinv = U^T U`` the sweep leaves ``W' - Q = E U``
            (``E`` the scaled errors ``Err_j``, ``W'`` the weight with dead columns
            zeroed), so ``tr((W' - Q)(H' + lambda I)(W' - Q)^T) = ||E||^2`` and
            ``error = ||E||^2 - lambda ||W' - Q||^2`` (dead columns have zero rows and
            columns in ``H`` and zero codes), equal to the direct formula up to
            float32 rounding.
        fmt: Target format.
        layer_name: Named in errors and stats.
        config: Options (defaults: block 128, percdamp 0.01, dynamic scales).
        global_scale: Per-tensor second level to share (e.g. fused q/k/v under NVFP4);
            by default computed from the whole ``W`` before the sweep.

    Raises:
        ValueError: Bad shapes, non-finite input, or act-order with dynamic grouped scales.
        HessianError: The damped Hessian cannot be factorised.
    """
    cfg = config or GPTQConfig()
    start = time.perf_counter()
    owned = isinstance(H, OwnedHessian)
    if isinstance(H, OwnedHessian):
        H = H.release()
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"layer {layer_name!r}: GPTQ needs W [N, K] and H [K, K], got W {tuple(W.shape)} "
            f"and H {tuple(H.shape)}"
        )
    check_finite(W, f"weight of {layer_name!r}")
    check_finite(H, f"Hessian of {layer_name!r}")
    N, K = W.shape
    try:
        block = fmt.granularity.block_shape(N, K)
    except ValueError as err:
        raise ValueError(f"layer {layer_name!r} [{N}, {K}]: {err}") from err
    if fmt.channel_scale and cfg.scale_mode == "dynamic":
        raise ValueError(
            f"layer {layer_name!r}: a per-row channel scale (ZeroQuant-FP M2) comes from the "
            f"whole row; use scale_mode='static'"
        )
    if cfg.act_order and cfg.scale_mode == "dynamic" and _column_groups(K, block[1]) > 1:
        raise ValueError(
            f"layer {layer_name!r}: act-order with dynamic per-group scales would need a "
            f"g_idx; use scale_mode='static' (static groups) or drop act_order"
        )
    Wq = W.detach().float().clone()
    diag = torch.diag(H.detach()).to(cfg.linalg_dtype)
    dead = diag == 0
    diag[dead] = 1.0
    Wq[:, dead] = 0.0
    gs = global_scale if global_scale is not None else tensor_global_scale(Wq, fmt)

    perm = torch.arange(K, device=W.device)
    if cfg.act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
    if cfg.scale_mode == "static":
        scales = static_scales(Wq, fmt, gs)
    else:
        n_row_blocks = _column_groups(N, block[0])
        stored = torch.ones(n_row_blocks, _column_groups(K, block[1]), device=W.device)
        zp = None if fmt.symmetric else torch.zeros_like(stored)
        scales = BlockScales(stored, block, zp, gs)
    Wt = Wq.T[perm].contiguous()  # column-major work copy (see _sweep)
    del Wq  # before the factorisation's work matrix
    hessian: torch.Tensor | None = H.detach()
    del H
    assert hessian is not None
    U, damp, retries = inverse_hessian_cholesky(
        hessian,
        cfg.percdamp,
        cfg.max_damp_retries,
        layer_name,
        perm=perm if cfg.act_order else None,
        dead=dead,
        dtype=cfg.linalg_dtype,
        consume=owned,
    )
    if owned:
        hessian = None  # U may be its storage: freed with U
    U = U.float()
    err_sq = _sweep(Wt, U, scales, fmt, perm, cfg)
    del U  # before the codes get a matrix of their own
    codes = torch.empty(N, K, dtype=Wt.dtype, device=Wt.device)
    codes[:, perm] = Wt.T
    del Wt
    scale_full, zp_full = scales.expand((N, K))
    deq = dequantize_with_scale(codes, scale_full, zp_full)
    del scale_full, zp_full
    if hessian is None:
        error = err_sq - damp * _squared_error(W, deq, ~dead)
    else:
        D = W.detach().float() - deq  # the error metric is a report: float32 is enough
        error = float((D @ hessian.float()).mul_(D).sum())
        del D
    stats = GPTQStats(
        layer_name, error, damp, retries, int(dead.sum()), time.perf_counter() - start
    )
    return GPTQResult(build_qtensor(codes, scales, fmt), deq, stats)


SCALE_ROWS = 256
"""Rows of ``W`` per :func:`block_scales` call in :func:`static_scales` (rounded up to a
multiple of the format's row block)."""


def static_scales(W: torch.Tensor, fmt: QuantFormat, gs: torch.Tensor | None) -> BlockScales:
    """:func:`block_scales` of ``W`` under the tensor-wide second level ``gs``, computed on
    row slabs (whole row blocks) so that the rounding's temporaries are a slab's, not a
    ``N x K`` tensor's; every scale depends on its own block (and row, for a channel
    scale) only, so the values are the whole tensor's."""
    N, K = W.shape
    r = fmt.granularity.block_shape(N, K)[0]
    step = -(-SCALE_ROWS // r) * r
    if step >= N:
        return block_scales(W, fmt, global_scale=gs)
    parts = [block_scales(W[i : i + step], fmt, global_scale=gs) for i in range(0, N, step)]

    def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if ts[0] is None else torch.cat([t for t in ts if t is not None])

    return BlockScales(
        torch.cat([p.stored for p in parts]),
        fmt.granularity.block_shape(N, K),
        cat([p.zero_point for p in parts]),
        parts[0].global_scale,
        cat([p.channel_scale for p in parts]),
    )


def _squared_error(W: torch.Tensor, deq: torch.Tensor, live: torch.Tensor) -> float:
    """``||W[:, live] - deq[:, live]||^2``, 1024 rows at a time (no ``N x K`` temporary)."""
    total = 0.0
    for r1 in range(0, W.shape[0], UPDATE_ROWS):
        d = W[r1 : r1 + UPDATE_ROWS].detach().float() - deq[r1 : r1 + UPDATE_ROWS]
        total += float(d[:, live].square().sum())
    return total


def _sweep(
    Wt: torch.Tensor,
    U: torch.Tensor,
    scales: BlockScales,
    fmt: QuantFormat,
    perm: torch.Tensor,
    cfg: GPTQConfig,
) -> float:
    """Algorithm 1 on ``Wt = W.T[perm]`` (the columns of ``W`` as rows, in the order
    ``perm``), in place: row ``j`` of ``Wt`` ends holding column ``perm[j]``'s grid
    values ``q``. Returns ``||E||^2``, the sum of the squared scaled errors ``Err_j``.

    Once quantized, a row is never read again (its block works on a copy), so the codes
    need no matrix of their own during the sweep; the lazy update of the rows after a
    block runs ``UPDATE_ROWS`` rows at a time (the same products, without a
    ``(K - i2) x N`` temporary). In dynamic mode ``scales`` (in original column order,
    with identity ``perm`` or a single column group) is filled as groups start.
    """
    K, N = Wt.shape
    r, c = scales.block
    dynamic = cfg.scale_mode == "dynamic"
    # Column-major work: row j of Wt is column j of W, so the per-column steps below
    # read and write contiguous memory (several times faster than strided columns).
    # Scales per column group, one row of N per group ([G, N], not an [K, N] expansion):
    # permuted column j reads group perm[j] // c.
    groups = _column_groups(K, c)
    group_of = (perm // c).tolist()
    if dynamic:
        St = torch.ones(groups, N, device=Wt.device)
        Zt = None if scales.zero_point is None else torch.zeros(groups, N, device=Wt.device)
    else:
        St = expand_blocks(scales.effective(), (r, 1), (N, groups)).T.contiguous()
        Zt = None
        if scales.zero_point is not None:
            Zt = expand_blocks(scales.zero_point, (r, 1), (N, groups)).T.contiguous()
    err_sq = 0.0
    for i1 in range(0, K, cfg.block_size):
        i2 = min(i1 + cfg.block_size, K)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic and j % c == 0:
                end = min(j + c, K)
                current = _current_columns(Wt, W1, Err1, U, i1, i, i2, end)
                g = block_scales(current, fmt, block=(r, c), global_scale=scales.global_scale)
                scales.stored[:, j // c] = g.stored[:, 0]
                St[j // c] = expand_blocks(g.effective(), (r, 1), (N, 1))[:, 0]
                if Zt is not None and scales.zero_point is not None and g.zero_point is not None:
                    scales.zero_point[:, j // c] = g.zero_point[:, 0]
                    Zt[j // c] = expand_blocks(g.zero_point, (r, 1), (N, 1))[:, 0]
            w = W1[i]
            s_j = St[group_of[j]]
            z = None if Zt is None else Zt[group_of[j]]
            q = round_with_scale(w, s_j, fmt.element, z)
            Wt[j] = q
            err = (w - dequantize_with_scale(q, s_j, z)) / U1[i, i]
            W1[i:] -= U1[i, i:][:, None] * err[None, :]
            Err1[i] = err
        err_sq += float(Err1.double().square().sum())
        for r1 in range(i2, K, UPDATE_ROWS):  # the lazy update, a row slab at a time
            r2 = min(r1 + UPDATE_ROWS, K)
            Wt[r1:r2] -= U[i1:i2, r1:r2].T @ Err1
    return err_sq


def _current_columns(
    Wt: torch.Tensor,
    W1: torch.Tensor,
    Err1: torch.Tensor,
    U: torch.Tensor,
    i1: int,
    i: int,
    i2: int,
    end: int,
) -> torch.Tensor:
    """Error-updated values of columns ``[i1 + i, end)`` mid-sweep, as ``[N, cols]``.

    ``Wt``, ``W1`` and ``Err1`` hold columns as rows. Columns inside the current block are
    up to date in ``W1``; those after it still lack this block's pending lazy update
    ``Err1[:i]^T U[i1:i1+i, i2:end]``.
    """
    inside = W1[i : min(end, i2) - i1]
    if end <= i2:
        return inside.T
    pending = U[i1 : i1 + i, i2:end].T @ Err1[:i]
    return torch.cat([inside, Wt[i2:end] - pending], dim=0).T
