"""ptq: a post-training quantization compiler for PyTorch models.

``ptq.quantize(model, scheme, output=...)`` is the Python API (:func:`ptq.api.quantize`);
it is imported on first use, so ``import ptq`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["quantize"]


def __getattr__(name: str) -> Any:
    if name == "quantize":
        from ptq.api import quantize

        return quantize
    raise AttributeError(f"module 'ptq' has no attribute {name!r}")
