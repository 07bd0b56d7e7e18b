"""Wall time and peak memory of ``ptq quantize`` as the model grows, on this CPU.

Random-init Llamas of one block shape (hidden 2048, intermediate 6144, 16 query / 8 KV
heads, vocabulary 49152 with tied embeddings; fp32) and 1, 3, 8 and 13 blocks (about
0.6, 1.0, 2.0 and 3.0 GB) are quantized with the same command and calibration,
``ptq quantize MODEL --w4a16 --method gptq --calib-samples 32 --calib-seqlen 256``,
each in its own process measured by the OS (``measure_run.py``: wall time, maximum
resident set size). A least-squares line through (blocks, seconds) gives the cost of
one block (slope) and of everything else (intercept); the cost per parameter follows.
The 8B and 70B figures are an extrapolation of that line to Llama-3-8B / 70B block
counts and sizes, assuming time grows with a block's parameter count: stated as such,
not measured (GPTQ's K^3 Hessian inverse makes wider layers cost more per parameter).

``--acceptance`` adds the issue's memory check: an untied 12-block model (3.2 GB)
with ``--w4a8 --smoothquant --method gptq`` and no memory flag. Usage::

    python benchmarks/scale_cpu.py [--workdir /tmp/ptq-scale] [--blocks 1,3,8,13] [--acceptance]

``--blocks ''`` runs the acceptance alone; ``--acceptance-blocks N`` sets its depth.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure_run import measure
from random_llama import llama_config, write_model

BLOCKS = (1, 3, 8, 13)
SHAPE = {"hidden": 2048, "intermediate": 6144, "heads": 16, "kv_heads": 8}
CALIB = ["--calib-samples", "32", "--calib-seqlen", "256"]
# Llama-3: (blocks, parameters per block)
EXTRAPOLATE = {"Llama-3-8B": (32, 218_112_000), "Llama-3-70B": (80, 855_654_400)}
RESULTS = Path(__file__).resolve().parent / "results" / "scale_cpu.md"


def _shape(blocks: int) -> dict[str, int]:
    return {
        "hidden": SHAPE["hidden"],
        "layers": blocks,
        "intermediate": SHAPE["intermediate"],
        "heads": SHAPE["heads"],
        "kv_heads": SHAPE["kv_heads"],
    }


def block_params() -> int:
    h, i = SHAPE["hidden"], SHAPE["intermediate"]
    kv = h // SHAPE["heads"] * SHAPE["kv_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return slope, my - slope * mx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ptq-scale"))
    ap.add_argument("--blocks", default=",".join(map(str, BLOCKS)))
    ap.add_argument("--acceptance", action="store_true")
    ap.add_argument(
        "--acceptance-blocks",
        type=int,
        default=12,
        help="blocks of the untied acceptance model (12: 3.2 GB; the peak is one block's, "
        "so a 2-block model measures it in a sixth of the time)",
    )
    ap.add_argument("--threads", type=int, default=0, help="OMP threads (0: all cores)")
    args = ap.parse_args()
    ptq = str(Path(sys.executable).with_name("ptq"))
    env_note = f"threads {args.threads or os.cpu_count()}"
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    rows: list[tuple[str, int, int, int, float, float]] = []
    for n in [int(b) for b in args.blocks.split(",") if b]:
        folder = args.workdir / f"llama-{n}b"
        size = write_model(
            folder,
            llama_config(**_shape(n), tied=True),
        )
        out = args.workdir / f"out-{n}b"
        cmd = [ptq, "quantize", str(folder), "--w4a16", "--method", "gptq", *CALIB]
        m = measure([*cmd, "-o", str(out), "-q", "--overwrite", "--restart"])
        if m.returncode != 0:
            print(m.tail, file=sys.stderr)
        rss, wall = m.peak_rss_bytes, m.seconds
        rows.append(("w4a16 gptq", n, size, rss, wall, float(m.returncode)))
        shutil.rmtree(out, ignore_errors=True)
        print(
            f"{n:>3} blocks {size / 1e9:6.2f} GB  peak RSS {rss / 1e9:5.2f} GB  {wall:7.0f} s",
            flush=True,
        )
    if args.acceptance:
        n = args.acceptance_blocks
        folder = args.workdir / f"llama-{n}b-untied"
        size = write_model(
            folder,
            llama_config(**_shape(n), tied=False),
        )
        out = args.workdir / "out-accept"
        cmd = [ptq, "quantize", str(folder), "--w4a8", "--smoothquant", "--method", "gptq", *CALIB]
        m = measure([*cmd, "-o", str(out), "-q", "--overwrite", "--restart"])
        if m.returncode != 0:
            print(m.tail, file=sys.stderr)
        rows.append(
            ("w4a8 sq+gptq untied", n, size, m.peak_rss_bytes, m.seconds, float(m.returncode))
        )
        shutil.rmtree(out, ignore_errors=True)
    report(rows, env_note)


def report(rows: list[tuple[str, int, int, int, float, float]], env_note: str) -> None:
    lines = [
        "# ptq quantize: wall time and peak RSS vs model size (this CPU)",
        "",
        f"{datetime.date.today()}, {env_note}, load average {os.getloadavg()[0]:.1f} at the end; "
        f"calibration {' '.join(CALIB)}; random Llamas, block = {block_params() / 1e6:.1f} M "
        "parameters (hidden 2048, intermediate 6144, 16/8 heads), fp32 safetensors.",
        "",
        "| command | blocks | model GB | peak RSS GB | RSS / model | wall s | exit |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, n, size, rss, wall, rc in rows:
        lines.append(
            f"| {label} | {n} | {size / 1e9:.2f} | {rss / 1e9:.2f} | {rss / size:.1%} | "
            f"{wall:.0f} | {int(rc)} |"
        )
    gptq = [(n, wall) for label, n, _, _, wall, rc in rows if label == "w4a16 gptq" and rc == 0]
    if len(gptq) >= 2:
        slope, intercept = fit([float(n) for n, _ in gptq], [w for _, w in gptq])
        per_param = slope / block_params()
        lines += [
            "",
            f"Least squares over the GPTQ rows: **{slope:.1f} s per block** "
            f"({per_param * 1e9:.0f} s per billion block parameters), {intercept:.0f} s "
            "for everything else (start-up, plan capture, calibration tokens, embeddings).",
            "",
            "Extrapolation (not measured; time taken to grow with a block's parameter count, "
            "which understates wider layers: GPTQ inverts a K x K Hessian per layer):",
            "",
            "| model | blocks | estimated hours on this CPU |",
            "|---|---|---|",
        ]
        for name, (blocks, params) in EXTRAPOLATE.items():
            hours = (intercept + blocks * params * per_param) / 3600
            lines.append(f"| {name} | {blocks} | {hours:.1f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
