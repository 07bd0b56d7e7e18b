"""Fuzz ptq's safetensors reader against the reference ``safetensors`` library.

Each case mutates a valid file (byte flips in the header, a random header length,
truncation, byte splices, and JSON-level replacement of a field with a random value),
then reads every tensor with both readers. A *crash* is any exception other than the
reader's documented error type (``PtqInputError`` for ptq, ``SafetensorError`` for
the reference). Prints cases, accepts/rejects/crashes, time and peak memory side by
side, and where the two readers disagree.

Usage::

    python benchmarks/fuzz_safetensors.py --cases 20000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import struct
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ptq.errors import PtqInputError
from ptq.io.safetensors_reader import SafetensorsFile


def _valid() -> bytes:
    g = torch.Generator().manual_seed(0)
    return save(
        {
            "model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
            "model.layers.0.q_proj.weight": torch.randn(8, 8, generator=g),
            "model.layers.0.q_proj.weight_scale": torch.rand(8, generator=g).to(torch.float16),
            "fp8": torch.randn(12, generator=g).to(torch.float8_e4m3fn),
            "codes": torch.randint(0, 255, (3, 4), generator=g).to(torch.uint8),
            "mask": torch.tensor([True, False]),
            "empty": torch.zeros(0, 4),
        },
        metadata={"format": "pt"},
    )


def _rand_json(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(9 if depth < 2 else 6)
    leaves: list[Callable[[], Any]] = [
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: rng.randint(-(2**66), 2**66) if rng.random() < 0.3 else rng.randint(-4, 300),
        lambda: rng.choice([0.5, float("nan"), float("inf"), -1e308]),
        lambda: rng.choice(["F32", "BF16", "F4", "F8_E4M3", "BOOL", "U8", "F6_E3M2", "", "x"]),
        lambda: "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(6))),
    ]
    if pick < len(leaves):
        return leaves[pick]()
    if pick == 6:
        return {str(rng.randrange(9)): _rand_json(rng, depth + 1) for _ in range(rng.randrange(3))}
    return [_rand_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def mutate(valid: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of ``valid``; returns (kind, bytes)."""
    n = struct.unpack("<Q", valid[:8])[0]
    kind = rng.choice(["flip", "length", "truncate", "splice", "field", "field", "entry"])
    buf = bytearray(valid)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(8 + n)] = rng.randrange(256)
    elif kind == "length":
        new = rng.choice(
            [rng.randrange(2**64), rng.randrange(len(valid) + 16), n + rng.randint(-9, 9)]
        )
        buf[:8] = struct.pack("<Q", max(new, 0))
    elif kind == "truncate":
        del buf[rng.randrange(len(valid)) :]
    elif kind == "splice":
        pos = rng.randrange(8, 8 + n)
        buf[pos : pos + rng.randrange(12)] = bytes(
            rng.randrange(256) for _ in range(rng.randrange(12))
        )
    else:
        header = json.loads(valid[8 : 8 + n])
        name = rng.choice(sorted(header))
        if kind == "entry" or name == "__metadata__":
            header[name] = _rand_json(rng)
        else:
            header[name][rng.choice(["dtype", "shape", "data_offsets"])] = _rand_json(rng)
        raw = json.dumps(header).encode()
        buf = bytearray(struct.pack("<Q", len(raw)) + raw + valid[8 + n :])
    return kind, bytes(buf)


def read_ours(path: Path) -> str:
    try:
        f = SafetensorsFile(path)
        for name in f:
            f.get(name)
    except PtqInputError:
        return "reject"
    return "accept"


def read_reference(path: Path) -> str:
    try:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                f.get_tensor(name)
    except SafetensorError:
        return "reject"
    return "accept"


def _run(reader: Callable[[Path], str], path: Path, crashes: Counter[str]) -> tuple[str, float]:
    start = time.perf_counter()
    try:
        outcome = reader(path)
    except BaseException as exc:  # a crash is what we count, Rust panics included
        if isinstance(exc, KeyboardInterrupt):
            raise
        crashes[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
        outcome = "crash"
    return outcome, time.perf_counter() - start


def main() -> None:
    """Run the fuzzing campaign and print the side-by-side table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng, valid = random.Random(args.seed), _valid()
    results: dict[str, Counter[str]] = {"ptq": Counter(), "safetensors": Counter()}
    crashes: dict[str, Counter[str]] = {"ptq": Counter(), "safetensors": Counter()}
    seconds = {"ptq": 0.0, "safetensors": 0.0}
    pairs: Counter[tuple[str, str]] = Counter()
    kinds: Counter[str] = Counter()
    tracemalloc.start()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.safetensors"
        for _ in range(args.cases):
            kind, blob = mutate(valid, rng)
            kinds[kind] += 1
            path.write_bytes(blob)
            ours, t_ours = _run(read_ours, path, crashes["ptq"])
            ref, t_ref = _run(read_reference, path, crashes["safetensors"])
            results["ptq"][ours] += 1
            results["safetensors"][ref] += 1
            seconds["ptq"] += t_ours
            seconds["safetensors"] += t_ref
            pairs[(ours, ref)] += 1
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"cases tried: {args.cases} (seed {args.seed}); mutation kinds: {dict(kinds)}")
    print(f"{'':22}{'ptq':>12}{'safetensors':>14}{'ratio':>8}")
    for row in ("accept", "reject", "crash"):
        a, b = results["ptq"][row], results["safetensors"][row]
        print(f"{row:22}{a:>12}{b:>14}{(a / b if b else float('nan')):>8.2f}")
    ms = {k: 1e3 * v / args.cases for k, v in seconds.items()}
    print(f"{'ms per case':22}{ms['ptq']:>12.3f}{ms['safetensors']:>14.3f}"
          f"{ms['ptq'] / ms['safetensors']:>8.2f}")  # fmt: skip
    print(f"peak Python heap (tracemalloc, both readers): {py_peak / 2**20:.1f} MiB; "
          f"peak RSS of the process: {rss_mib:.0f} MiB")  # fmt: skip
    print("outcome pairs (ptq, safetensors):", dict(pairs))
    for who, found in crashes.items():
        print(f"{who} crashes (non-documented exceptions): {sum(found.values())}")
        for msg, count in found.most_common(8):
            print(f"  {count:6d}  {msg}")


if __name__ == "__main__":
    main()
