"""Hadamard matrices and the fast Walsh-Hadamard transform (QuaRot's rotations).

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H H^T = n I``; ``H / sqrt(n)``
is orthogonal. Orders used here (Ashkboos et al., "QuaRot", 2024, section 3):

* Sylvester: ``H_{2n} = [[H_n, H_n], [H_n, -H_n]]``, ``H_1 = [1]``.
* Paley construction I, prime ``q = 3 (mod 4)``: with the Jacobsthal matrix
  ``Q_ij = chi(j - i)`` (``chi`` the quadratic character mod ``q``) and the all-ones
  column ``1``, ``H = I + [[0, 1^T], [-1, Q]]`` has order ``q + 1`` (q = 11 gives 12).
* Paley construction II, prime ``q = 1 (mod 4)``: with the symmetric conference matrix
  ``C = [[0, 1^T], [1, Q]]``, ``H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]``
  has order ``2 (q + 1)`` (q = 17 gives 36).
* Kronecker products ``H_m (x) H_{2^k}``: any ``n = m 2^k`` with a known ``H_m``
  (SmolLM2: 576 = 36 * 16, 1536 = 12 * 128).

:func:`hadamard_transform` computes ``x H^T / sqrt(n)`` for rows ``x`` in
``O(n log n)`` (butterflies over the ``2^k`` factor, one small ``m x m`` matmul).
"""

from __future__ import annotations

import math

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q_ij = chi(j - i)`` over GF(q), ``chi`` = +1 on non-zero squares, -1 else, 0 at 0."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)])
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley1(q: int) -> torch.Tensor:
    """Paley construction I: Hadamard matrix of order ``q + 1`` for prime ``q = 3 mod 4``."""
    if not _is_prime(q) or q % 4 != 3:
        raise ValueError(f"Paley I needs a prime q = 3 (mod 4), got {q}")
    n = q + 1
    s = torch.zeros(n, n)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(n) + s


def paley2(q: int) -> torch.Tensor:
    """Paley construction II: Hadamard matrix of order ``2 (q + 1)`` for prime ``q = 1 mod 4``."""
    if not _is_prime(q) or q % 4 != 1:
        raise ValueError(f"Paley II needs a prime q = 1 (mod 4), got {q}")
    n = q + 1
    c = torch.zeros(n, n)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
    return torch.kron(c, a) + torch.kron(torch.eye(n), b)


def sylvester(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order ``n``, a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester construction needs a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def base_hadamard(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``m`` from Paley I/II (or 1, 2), else None."""
    if m in (1, 2):
        return sylvester(m)
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return paley2(m // 2 - 1)
    return None


def factorize(n: int) -> tuple[torch.Tensor, int]:
    """``(H_m, p)`` with ``n = m * p``, ``p`` a power of two and ``H_m`` a known Hadamard.

    Raises:
        ValueError: No ``m = n / 2^j`` has a Paley construction (e.g. n = 4 * 23).
    """
    if n < 1:
        raise ValueError(f"Hadamard order must be >= 1, got {n}")
    p = n & -n
    m = n // p
    while True:
        h = base_hadamard(m)
        if h is not None:
            return h, p
        if p == 1:
            raise ValueError(
                f"no Hadamard matrix of order {n} from Sylvester x Paley I/II; "
                "use a layer size m * 2^k with m in 12, 20, 28, 36, 44, 60, ..."
            )
        m, p = m * 2, p // 2


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalised (orthogonal) Hadamard matrix ``(H_m (x) H_p) / sqrt(n)`` of order n."""
    h, p = factorize(n)
    return (torch.kron(h.to(dtype), sylvester(p).to(dtype))) / math.sqrt(n)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform over the last dim (a power of two)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two size, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, n)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x H^T / sqrt(n)`` over the last dim, ``H = H_m (x) H_p``, in ``O(n log n + n m)``.

    Viewing a row as ``X`` [m, p] (index ``a * p + b``), ``(H_m (x) H_p) vec(X) =
    vec(H_m X H_p^T)``: butterflies along ``p``, then one ``m x m`` product along ``m``.
    """
    n = x.shape[-1]
    h, p = factorize(n)
    y = fwht(x.reshape(*x.shape[:-1], n // p, p))
    if h.shape[0] > 1:
        y = torch.matmul(h.to(dtype=x.dtype, device=x.device), y)
    return y.reshape(x.shape) / math.sqrt(n)


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """QuaRot's randomised Hadamard ``Q = diag(d) H / sqrt(n)``, ``d`` seeded random signs.

    ``Q`` is orthogonal (float64); rows of activations rotate as ``x' = x Q``.
    """
    d = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2.0 - 1.0
    return d[:, None] * hadamard_matrix(n)
