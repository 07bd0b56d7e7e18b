"""Element formats: the value grids a single quantized number can take.

Two families are modelled:

* :class:`IntFormat` -- two's-complement (or unsigned) integers of ``bits`` bits.
* :class:`FloatFormat` -- sign-magnitude minifloats ``ExMy`` with a chosen exponent
  bias and Inf/NaN convention (OCP OFP8 and MX v1.0 specifications; Micikevicius et al.,
  "FP8 Formats for Deep Learning", 2022).

Both are frozen dataclasses; the maths that rounds onto a grid lives in
:mod:`ptq.formats.minifloat` and :mod:`ptq.formats.rounding`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

InfNanStyle = Literal["ieee", "fn", "fnuz", "none"]
"""How a minifloat spends its top codes.

* ``ieee``: all-ones exponent encodes Inf (zero mantissa) and NaN (E5M2).
* ``fn``: finite-only; only S.1..1.1..1 is NaN (OCP E4M3, torch ``float8_e4m3fn``).
* ``fnuz``: finite-only, unsigned zero; 0x80 is the single NaN (``float8_e4m3fnuz``).
* ``none``: every code is a finite number (FP6, FP4).
"""

INF_NAN_STYLES: tuple[InfNanStyle, ...] = ("ieee", "fn", "fnuz", "none")


@dataclass(frozen=True)
class IntFormat:
    """An integer element format.

    Args:
        bits: Bit width, 2..8 (16 and 32 are accepted for accumulators).
        signed: Two's complement if True, unsigned otherwise.
        restricted: For signed formats, clip to the symmetric range
            ``[-(2^(b-1)-1), 2^(b-1)-1]`` instead of ``[-2^(b-1), 2^(b-1)-1]``.
    """

    bits: int
    signed: bool = True
    restricted: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 32:
            raise ValueError(f"IntFormat bits must be in 1..32, got {self.bits}")
        if self.restricted and not self.signed:
            raise ValueError("IntFormat restricted range only applies to signed integers")

    @property
    def name(self) -> str:
        base = f"{'int' if self.signed else 'uint'}{self.bits}"
        return base + ("_r" if self.restricted else "")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        low = -(2 ** (self.bits - 1))
        return low + 1 if self.restricted else low

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max_value(self) -> float:
        """Largest magnitude used to map ``amax`` onto the grid (symmetric scaling)."""
        return float(self.qmax)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive step of the grid (1 for integers)."""
        return 1.0


@dataclass(frozen=True)
class FloatFormat:
    """A sign-magnitude minifloat ``E{exp_bits}M{man_bits}`` with an optional sign bit.

    The value of a normal code is ``(-1)^s * 2^(e - bias) * (1 + m / 2^M)``; a subnormal
    (``e == 0``) is ``(-1)^s * 2^(1 - bias) * (m / 2^M)``. With ``M = 0`` there are no
    subnormals: code 0 is zero and the smallest positive value is ``2^(1 - bias)``.

    Args:
        exp_bits: Exponent bits (>= 1).
        man_bits: Mantissa bits (>= 0).
        bias: Exponent bias; defaults to ``2^(E-1) - 1``.
        inf_nan: Which codes are Inf/NaN (see :data:`InfNanStyle`).
        signed: Whether there is a sign bit (unsigned formats are used as scales).
        name_override: Display name (e.g. ``"fp8_e4m3"``).

    Raises:
        ValueError: More than 8 bits, or a bias that puts the grid outside fp32's normal
            range (every value must be exact in fp32 for exact emulation).
    """

    exp_bits: int
    man_bits: int
    bias: int | None = None
    inf_nan: InfNanStyle = "none"
    signed: bool = True
    name_override: str | None = None

    def __post_init__(self) -> None:
        total = self.exp_bits + self.man_bits + (1 if self.signed else 0)
        if self.exp_bits < 1 or self.man_bits < 0 or total > 8:
            raise ValueError(
                f"FloatFormat E{self.exp_bits}M{self.man_bits} is not a minifloat of <= 8 bits"
            )
        if self.inf_nan not in INF_NAN_STYLES:
            raise ValueError(
                f"FloatFormat inf_nan {self.inf_nan!r} is not one of {', '.join(INF_NAN_STYLES)}"
            )
        if self.inf_nan == "fnuz" and not self.signed:
            raise ValueError("inf_nan 'fnuz' needs a sign bit (its NaN is the negative zero)")
        if self.inf_nan == "ieee" and self.exp_bits < 2:
            raise ValueError("inf_nan 'ieee' needs at least 2 exponent bits")
        if self.emin - self.man_bits < -126 or self.emax > 127:
            raise ValueError(
                f"FloatFormat E{self.exp_bits}M{self.man_bits} bias {self.exp_bias} puts the "
                "grid outside fp32's normal range; choose a bias in "
                f"[{2**self.exp_bits - 128}, {127 - self.man_bits}]"
            )

    @property
    def bits(self) -> int:
        return self.exp_bits + self.man_bits + (1 if self.signed else 0)

    @property
    def exp_bias(self) -> int:
        return self.bias if self.bias is not None else 2 ** (self.exp_bits - 1) - 1

    @property
    def name(self) -> str:
        if self.name_override:
            return self.name_override
        prefix = "fp" if self.signed else "ufp"
        return f"{prefix}{self.bits}_e{self.exp_bits}m{self.man_bits}"

    @property
    def max_exp_code(self) -> int:
        """Largest exponent field value that encodes a finite normal."""
        top = 2**self.exp_bits - 1
        if self.inf_nan == "ieee" or (self.inf_nan == "fn" and self.man_bits == 0):
            return top - 1
        return top

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite normal."""
        return self.max_exp_code - self.exp_bias

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal."""
        return 1 - self.exp_bias

    @property
    def max_value(self) -> float:
        """Largest finite magnitude."""
        top_mantissa = 2**self.man_bits - 1
        if self.inf_nan == "fn" and self.man_bits > 0:
            top_mantissa -= 1  # S.1111.111 is NaN
        return math.ldexp(1.0 + top_mantissa / 2**self.man_bits, self.emax)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (the grid step near zero)."""
        return math.ldexp(1.0, self.emin - self.man_bits)

    @property
    def has_nan(self) -> bool:
        return self.inf_nan != "none"

    @property
    def has_inf(self) -> bool:
        return self.inf_nan == "ieee"


ElementFormat = IntFormat | FloatFormat

INT2 = IntFormat(2)
INT3 = IntFormat(3)
INT4 = IntFormat(4)
INT5 = IntFormat(5)
INT6 = IntFormat(6)
INT7 = IntFormat(7)
INT8 = IntFormat(8)
UINT4 = IntFormat(4, signed=False)
UINT8 = IntFormat(8, signed=False)
MXINT8 = IntFormat(8, restricted=True)
FP8_E4M3 = FloatFormat(4, 3, 7, "fn", name_override="fp8_e4m3")
FP8_E4M3FNUZ = FloatFormat(4, 3, 8, "fnuz", name_override="fp8_e4m3fnuz")
FP8_E5M2 = FloatFormat(5, 2, 15, "ieee", name_override="fp8_e5m2")
FP8_E5M2FNUZ = FloatFormat(5, 2, 16, "fnuz", name_override="fp8_e5m2fnuz")
FP6_E2M3 = FloatFormat(2, 3, 1, "none", name_override="fp6_e2m3")
FP6_E3M2 = FloatFormat(3, 2, 3, "none", name_override="fp6_e3m2")
FP4_E2M1 = FloatFormat(2, 1, 1, "none", name_override="fp4_e2m1")
FP4_E3M0 = FloatFormat(3, 0, 3, "none", name_override="fp4_e3m0")
FP4_E1M2 = FloatFormat(1, 2, 1, "none", name_override="fp4_e1m2")
