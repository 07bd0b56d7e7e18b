"""The default method :func:`ptq.compose.default_method` picks for a scheme."""

from __future__ import annotations

import pytest

from ptq.compose import default_method
from ptq.scheme import get_scheme


@pytest.mark.parametrize(
    ("scheme", "calibration", "repeated_blocks", "method"),
    [
        ("w4a16", True, True, "awq+gptq"),
        ("w4a8", True, True, "awq+gptq"),
        ("w4a16", True, False, "gptq"),  # a CNN: AWQ's groups are a block's
        ("w4a16", False, True, "rtn"),  # no calibration text
        ("w8a8", True, True, "rtn"),
        ("fp8", True, True, "rtn"),
    ],
)
def test_default_method(scheme: str, calibration: bool, repeated_blocks: bool, method: str) -> None:
    chosen = default_method(get_scheme(scheme), calibration, repeated_blocks=repeated_blocks)
    assert chosen == method
