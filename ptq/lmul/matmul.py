"""``y = x W^T + b`` with every product an L-Mul, accumulated in float32, in bounded memory.

``y[i, j] = fl32( sum_k L-Mul(x[i, k], W[j, k]) ) + b[j]`` (then rounded to ``x``'s
dtype), with ``L-Mul`` as defined in :mod:`ptq.lmul.bits` (Luo & Sun, 2024). The
products of a block of rows ``i`` and reduction indices ``k`` are materialised as a
``[rows, k_chunk, N]`` float32 tensor of at most ``budget`` elements (chunking over the
reduction dimension, and over rows for wide layers such as an LM head), summed over
``k`` in float32, and added in order into a float32 accumulator.

Fast path (bit-exactly the products of :func:`ptq.lmul.bits.lmul`): with float32
patterns ``X = bits(x)`` and ``W' = bits(W) - bits(1.0) + 2^(23 - l)``, one wrapping
32-bit integer addition ``X + W'`` is the product's pattern. The sign bits add modulo 2
(their carry leaves the 32-bit word: that is the xor), the fields add with the carry
from mantissa to exponent. It applies when every operand is finite and every product
exponent stays in float32's normal range (always for fp16; checked from the
operands' exponent extremes for bf16); zero and subnormal operands are replaced by
1.0 and their products masked to zero. Otherwise each block of products comes from
:func:`~ptq.lmul.bits.lmul` (exact 64-bit emulation with the special cases).
"""

from __future__ import annotations

import torch

from ptq.lmul.bits import FieldLayout, classify, field_layout, lmul

__all__ = ["lmul_linear"]

#: Elements of the largest product block (float32): 2^18 = 1 MiB, cache-sized.
DEFAULT_BUDGET = 1 << 18


def _wrap_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 -> int32 modulo 2^32 (two's complement)."""
    v = v & ((1 << 32) - 1)
    return torch.where(v >= (1 << 31), v - (1 << 32), v).to(torch.int32)


def _exponents(t: torch.Tensor, nonzero: torch.Tensor) -> tuple[int, int]:
    """Exponent range ``[min(0, lo), max(0, hi)]`` of the nonzero finite entries."""
    e = (t.float().view(torch.int32) >> 23) & 0xFF
    e = e[nonzero]
    if e.numel() == 0:
        return 0, 0
    # 0 is included: zero operands are computed as 1.0 (exponent 0) before masking
    return min(0, int(e.min()) - 127), max(0, int(e.max()) - 127)


def _fast_path_ok(
    x: torch.Tensor, w: torch.Tensor, layout: FieldLayout
) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """Whether the wrapping-add path is exact here; also the nonzero masks of x and w."""
    x_zero, x_special = classify(x, layout)
    w_zero, w_special = classify(w, layout)
    if bool(x_special.any()) or bool(w_special.any()):
        return False, ~x_zero, ~w_zero
    if layout.dtype == torch.float16:
        return True, ~x_zero, ~w_zero  # exponents in [-14, 15]: sums always in range
    x_lo, x_hi = _exponents(x, ~x_zero)
    w_lo, w_hi = _exponents(w, ~w_zero)
    # the product's biased exponent is ex + ew + 127 (+1 on a mantissa carry)
    return (x_lo + w_lo >= -126 and x_hi + w_hi + 1 <= 127), ~x_zero, ~w_zero


def lmul_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    budget: int = DEFAULT_BUDGET,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with L-Mul products and float32 accumulation.

    Args:
        x: ``[..., K]`` float16 or bfloat16.
        weight: ``[N, K]``, cast to ``x``'s dtype first (its stored value in that dtype).
        bias: Optional ``[N]``, added in float32 after the accumulation.
        budget: Largest number of products held at once (memory is ``4 * budget`` bytes
            plus the operands).

    Returns:
        ``[..., N]`` in ``x``'s dtype.
    """
    layout = field_layout(x.dtype)
    w = weight.to(x.dtype)
    n_out, k_in = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_in)
    rows = x2.shape[0]
    acc = torch.zeros(rows, n_out, dtype=torch.float32)
    fast, x_nz, w_nz = _fast_path_ok(x2, w, layout)
    row_block = max(1, min(rows, 128, budget // max(1, n_out)))
    k_block = max(1, min(k_in, 32, budget // max(1, row_block * n_out)))
    if fast:
        one = torch.ones((), dtype=x.dtype)
        xb = torch.where(x_nz, x2, one).float().view(torch.int32)
        wb = torch.where(w_nz, w, one).float().view(torch.int32).to(torch.int64)
        wt = _wrap_int32(wb + layout.add).t().contiguous()  # [K, N]
        w_mask = None if bool(w_nz.all()) else w_nz.t().float().contiguous()
        x_mask = None if bool(x_nz.all()) else x_nz.float()
    else:
        wt16 = w.t().contiguous()
    for r0 in range(0, rows, row_block):
        r1 = min(rows, r0 + row_block)
        out = acc[r0:r1]
        for k0 in range(0, k_in, k_block):
            k1 = min(k_in, k0 + k_block)
            if fast:
                p = (xb[r0:r1, k0:k1, None] + wt[None, k0:k1, :]).view(torch.float32)
                if w_mask is not None:
                    p.mul_(w_mask[None, k0:k1, :])
                if x_mask is not None:
                    out += torch.bmm(x_mask[r0:r1, None, k0:k1], p)[:, 0]
                    continue
            else:
                p = lmul(x2[r0:r1, k0:k1, None], wt16[None, k0:k1, :])
            out += p.sum(dim=1)
    if bias is not None:
        acc += bias.float()
    return acc.to(x.dtype).reshape(*lead, n_out)
