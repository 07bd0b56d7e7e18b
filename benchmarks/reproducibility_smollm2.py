"""Reproducibility of SmolLM2-135M evaluation across batch sizes and thread counts.

For fp32, bf16 and fp16, each with and without LayerCast (16-bit weights, fp32
computation), the same held-out Britannica windows are evaluated at batch sizes 1, 4
and 16 (windows stacked into ``[B, seqlen]`` inputs) and with 1 and 2 intra-op threads
(``torch.set_num_threads`` in this process); the table gives the largest per-token
log-probability difference between settings and the perplexity spread. This is
``ptq eval MODEL --reproducibility`` (same code, :mod:`ptq.reproducibility`), run on
the FP model and, with ``--quantized PATH``, on a ptq output too.

    nice -n 5 .venv/bin/python benchmarks/reproducibility_smollm2.py \\
        [--quantized /tmp/smollm2-w4a16] [--out benchmarks/results/reproducibility_smollm2.md]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from ptq.evaluate import tokenize_eval_text
from ptq.models.paths import default_eval_file
from ptq.models.quantized_loader import load_quantized_model
from ptq.models.source import load_fp_model, resolve_model
from ptq.reproducibility import ReproRow, format_table, run_reproducibility

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantized", type=Path, default=None, help="a ptq output to add")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/reproducibility_smollm2.md"
    )
    args = ap.parse_args()

    source = resolve_model("default", quiet=True)
    _, tokenizer = load_fp_model(source)
    ids = tokenize_eval_text(tokenizer, default_eval_file(), args.eval_tokens)
    models = {"SmolLM2-135M FP": lambda: load_fp_model(source)[0]}
    if args.quantized is not None:
        path = args.quantized
        models[f"SmolLM2-135M {path.name} (ptq output)"] = lambda: load_quantized_model(path)[0]

    n_windows = ids.numel() // args.seqlen
    head = (
        "# Reproducibility of evaluation: batch size x thread count, per dtype and LayerCast\n\n"
        f"`benchmarks/reproducibility_smollm2.py`: {n_windows} windows of {args.seqlen} "
        f"held-out Britannica tokens; each configuration evaluated at batch sizes 1, 4, 16 "
        "(windows stacked into `[B, seqlen]`: every linear layer multiplies B x seqlen rows, "
        "attention runs B sequences per call) x 1 and 2 intra-op threads "
        "(`torch.set_num_threads` in-process). `max abs dlogp`: largest difference of one "
        "token's log-probability between any two of the 6 settings; `across batch sizes` / "
        "`across threads`: the same with only that factor varying; `tokens changed`: share "
        "of tokens whose log-probability is not bit-identical in all settings; `ppl spread`: "
        "max - min perplexity over the settings.\n\n"
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.backends.cpu.get_cpu_capability()}, machine shared with other jobs.\n\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    for name, load in models.items():
        start = time.time()

        def show(row: ReproRow) -> None:
            print(format_table([row]).splitlines()[-1], flush=True)

        print(f"## {name}", flush=True)
        rows = run_reproducibility(load, ids, seqlen=args.seqlen, on_row=show)
        sections.append(f"## {name}\n\n{format_table(rows)}\n\n({time.time() - start:.0f} s)\n")
        args.out.write_text(head + "\n".join(sections))  # each model as soon as it is done
        print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
