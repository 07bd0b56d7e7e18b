"""SmolLM2-135M perplexity with exact multiplication vs L-Mul, FP and W4A16 weights.

L-Mul (Luo & Sun, "Addition is All You Need for Energy-efficient Language Models",
2024) replaces every product of every linear layer (LM head included) with one
integer addition of the operands' bit patterns (:mod:`ptq.lmul`), products accumulated
in fp32. Each row is evaluated in bf16 and fp16 (the model stored and run in that
dtype, as L-Mul's operands), exact and L-Mul, on the same held-out Britannica tokens;
the fp32 exact perplexity is given for reference. This is ``ptq eval MODEL --dtype D
--lmul`` (same code).

The W4A16 weights come from ``ptq quantize default --w4a16 --method rtn -o PATH``
(RTN for speed), made by this script when ``--w4a16 PATH`` does not exist yet.

    nice -n 5 .venv/bin/python benchmarks/lmul_smollm2.py \\
        [--w4a16 /tmp/smollm2-w4a16-rtn] [--eval-tokens 1024] [--threads 1] [--out ...]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ptq.evaluate import perplexity, tokenize_eval_text
from ptq.lmul import LMulModel
from ptq.models.paths import default_eval_file
from ptq.models.quantized_loader import load_quantized_model
from ptq.models.source import load_fp_model, resolve_model
from ptq.precision import EVAL_DTYPES, cast_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--w4a16", type=Path, default=Path("/tmp/smollm2-w4a16-rtn"))
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (1: the emulation's many small ops scale badly on a busy CPU)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lmul_smollm2.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if not args.w4a16.exists():
        cmd = ["ptq", "quantize", "default", "--w4a16", "--method", "rtn", "-o", str(args.w4a16)]
        print("running:", " ".join(cmd), flush=True)
        subprocess.run([sys.executable, "-m", "ptq.cli", *cmd[1:], "-q"], check=True)
    source = resolve_model("default", quiet=True)
    _, tokenizer = load_fp_model(source)
    ids = tokenize_eval_text(tokenizer, default_eval_file(), args.eval_tokens)
    models: dict[str, Callable[[], nn.Module]] = {
        "FP": lambda: load_fp_model(source)[0],
        "W4A16 INT4 RTN": lambda: load_quantized_model(args.w4a16)[0],
    }

    def ppl(net: nn.Module) -> float:
        return perplexity(net, ids, seqlen=args.seqlen, progress=False)

    lines = [
        "| weights | fp32 exact | bf16 exact | bf16 L-Mul | x | fp16 exact | fp16 L-Mul | x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    start = time.time()
    for name, load in models.items():
        cells = [f"{ppl(load()):.3f}"]
        for dtype in ("bf16", "fp16"):
            net = cast_model(load(), EVAL_DTYPES[dtype])
            exact = ppl(net)
            t0 = time.time()
            approx = ppl(LMulModel(net))
            print(
                f"{name} {dtype}: exact {exact:.4f}  L-Mul {approx:.4f} ({time.time() - t0:.0f} s)"
            )
            cells += [f"{exact:.3f}", f"{approx:.3f}", f"{approx / exact:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)

    text = (
        "# SmolLM2-135M: exact multiplication vs L-Mul in every linear layer\n\n"
        f"`benchmarks/lmul_smollm2.py`: {ids.numel()} held-out Britannica tokens, "
        f"seqlen {args.seqlen}. L-Mul replaces the products of every `nn.Linear` "
        "(LM head included) and ptq `QuantLinear` with the bit-level emulation of "
        "`ptq.lmul` (l(m) = 4 for both fp16 and bf16: offset 2^-4), products summed in "
        "fp32, output rounded to the dtype; attention score/value products, norms and "
        "activations stay exact. W4A16: `ptq quantize default --w4a16 --method rtn` "
        "(INT4 g64 symmetric, RTN for speed), dequantized weights stored in the dtype. "
        "`x`: L-Mul / exact.\n\n"
        f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), total {time.time() - start:.0f} s "
        "on a 2-core machine shared with other jobs.\n\n" + "\n".join(lines) + "\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
