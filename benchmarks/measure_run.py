"""Run a command and measure it: wall time, peak resident memory, and its last lines.

One measuring helper for the scaling benchmarks (``scale_cpu.py``, ``gpu_quantize.sh``):
the command runs in its own process; its peak resident set size is the OS's, read for
that process alone (``os.wait4``'s resource usage, ``ru_maxrss``). As a script it
prints one JSON line::

    python benchmarks/measure_run.py -- ptq quantize MODEL --w4a16 -o OUT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measured:
    """What one run cost."""

    seconds: float
    peak_rss_bytes: int
    returncode: int
    tail: str


def measure(cmd: list[str]) -> Measured:
    """Run ``cmd`` to completion (output captured) and measure it.

    The command is started by a fresh interpreter running this file (a few MB), not by
    the caller: Linux starts a child by ``vfork`` + ``exec`` and carries the parent's
    memory high-water mark into the child's ``ru_maxrss`` at ``exec``, so a caller that
    once held gigabytes (``scale_cpu.py`` writing a 3 GB model) would be reported as the
    command's peak (it was: 2.70 GB reported for a run whose ``VmHWM`` was 1.06 GB).
    """
    done = subprocess.run(
        [sys.executable, "-S", str(Path(__file__).resolve()), "--", *cmd],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"measure_run.py failed ({done.returncode}): {done.stderr[-2000:]}")
    return Measured(**json.loads(done.stdout.strip().splitlines()[-1]))


def measure_here(cmd: list[str]) -> Measured:
    """Run ``cmd`` as a child of this process and measure it (this process must be small:
    see :func:`measure`)."""
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        tail = out.read()[-3000:].decode("utf-8", errors="replace")
    return Measured(wall, usage.ru_maxrss * 1024, proc.returncode, tail)  # ru_maxrss: KiB


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.exit("usage: measure_run.py -- COMMAND [ARGS...]")
    print(json.dumps(asdict(measure_here(args))))


if __name__ == "__main__":
    main()
