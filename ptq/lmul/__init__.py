"""L-Mul: floating-point multiplication approximated by one integer addition.

Luo & Sun, "Addition is All You Need for Energy-efficient Language Models" (2024).
:mod:`ptq.lmul.bits` defines the product on 16-bit bit patterns, :mod:`ptq.lmul.matmul`
the memory-bounded matmul built from it, :mod:`ptq.lmul.mode` its use in a model's
linear layers (``ptq eval --lmul``).
"""

from ptq.lmul.bits import LMUL_DTYPES, lmul, offset_exponent
from ptq.lmul.matmul import lmul_linear
from ptq.lmul.mode import LMulModel

__all__ = ["LMUL_DTYPES", "LMulModel", "lmul", "lmul_linear", "offset_exponent"]
