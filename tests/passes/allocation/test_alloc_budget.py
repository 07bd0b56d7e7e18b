"""Budget strings: bits per weight, bytes with decimal/binary prefixes, latency."""

from __future__ import annotations

from typing import Any

import pytest

from ptq.passes.allocation import Budget, parse_budget


@pytest.mark.parametrize(
    ("text", "value", "kind"),
    [
        ("4.5bits", 4.5, "bits"),
        ("4.5 bpw", 4.5, "bits"),
        ("3bit", 3.0, "bits"),
        ("70MB", 70e6, "bytes"),
        ("70MiB", 70 * 2**20, "bytes"),
        ("500KB", 500_000, "bytes"),
        ("500kB", 500_000, "bytes"),
        ("64KiB", 65_536, "bytes"),
        ("1.5GB", 1.5e9, "bytes"),
        ("2GiB", 2 * 2**30, "bytes"),
        ("123456", 123_456, "bytes"),
        ("123456B", 123_456, "bytes"),
        (" 2.5ms ", 2.5e-3, "seconds"),
        ("800us", 800e-6, "seconds"),
        ("0.01s", 0.01, "seconds"),
        ("1e3KB", 1e6, "bytes"),
    ],
)
def test_parse(text: str, value: float, kind: str) -> None:
    b = parse_budget(text)
    assert b.kind == kind
    assert b.value == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "malformed"),
        ("bits", "malformed"),
        ("4.5 b its", "malformed"),
        ("-3bits", "malformed"),
        ("0bits", "positive"),
        ("70mb", "unknown unit 'mb'"),
        ("70 furlongs", "unknown unit"),
        ("4.5.1bits", "malformed"),
        ("nanbits", "malformed"),
    ],
)
def test_malformed(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_budget(text)


def test_resolve_to_cost_units() -> None:
    bad_kind: Any = "furlongs"
    # 4.125 bits/weight over a 4096 x 4096 weight is exactly INT4 g128's 8_650_752 bytes
    assert parse_budget("4.125bits").resolve("bytes", 4096 * 4096) == 8_650_752
    assert parse_budget("1MiB").resolve("bytes", 10) == 2**20
    assert parse_budget("3ms").resolve("seconds", 10) == pytest.approx(3e-3)
    with pytest.raises(ValueError, match="cannot constrain a cost measured in seconds"):
        parse_budget("4bits").resolve("seconds", 10)
    with pytest.raises(ValueError, match="cannot constrain a cost measured in bytes"):
        parse_budget("4ms").resolve("bytes", 10)
    with pytest.raises(ValueError, match="kind"):
        Budget(1.0, bad_kind)
    with pytest.raises(ValueError, match="positive"):
        Budget(float("inf"), "bytes")
