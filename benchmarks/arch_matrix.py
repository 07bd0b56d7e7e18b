"""The architecture matrix and the MoE expert figures, in one run.

**Matrix.** Tiny random-init models (2 blocks, hidden 64, the test suite's configs:
``tests/tiny_archs.py``; norm scales drawn away from 1 so folding them matters) of
Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3, OPT, GPT-2, Mixtral and Qwen2-MoE,
each through ``ptq quantize --w4a8 --smoothquant --rotate --method gptq`` (Gemma 2/3:
without ``--rotate``, which they refuse: their post-norms write the residual stream)
and ``ptq quantize --w4a16 --method gptq``. A cell passes when the command succeeds,
``ptq verify`` accepts the output and the output reloads; its figure is the relative
logits error ``||y_q - y_fp|| / ||y_fp||`` of the reloaded model against the FP model
on one fixed random batch of token ids (2 x 24).

**MoE.** A Mixtral-style model (8 experts, top-2, 2 blocks) quantized ``--w4a16``
with GPTQ and with RTN on the same calibration: per expert of each block, the tokens
the router sends it, the calibration rows its GPTQ Hessians saw (from
``ptq_records.json``), and the fraction of its 4-bit codes that differ from RTN's.

Usage::

    python benchmarks/arch_matrix.py [--workdir /tmp/ptq-matrix] [--calib-samples 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the suite's tiny configs and tokenizer

ARCHS = [
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text",
    "phi3", "opt", "gpt2", "mixtral", "qwen2_moe",
]  # fmt: skip
NO_ROTATION = ("gemma2", "gemma3_text")
PIPELINES = {
    "w4a8 + SmoothQuant + rotate, GPTQ": ("--w4a8", "--smoothquant", "--rotate"),
    "w4a16, GPTQ": ("--w4a16",),
}


def cli(*args: str) -> None:
    """``ptq ARGS`` in this process (a ``PtqError`` or ``SystemExit`` is a failed cell)."""
    from ptq.cli import main

    main(list(args), standalone_mode=False)


def ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))


def fp_logits(folder: Path) -> torch.Tensor:
    from ptq.models.source import load_fp_model, resolve_model

    model, _ = load_fp_model(resolve_model(folder))
    with torch.no_grad():
        return model(input_ids=ids()).logits


def cell(folder: Path, flags: tuple[str, ...], calib: list[str], out: Path) -> str:
    """Run one cell; its table entry (``pass, err`` or ``FAIL: why``)."""
    from ptq.models.quantized_loader import load_quantized_model
    from ptq.verify import verify_output

    try:
        cli("quantize", str(folder), *flags, "--method", "gptq", *calib, "-o", str(out))
        verify_output(out)
        model, _ = load_quantized_model(out)
        with torch.no_grad():
            q = model(input_ids=ids()).logits
    except (Exception, SystemExit) as exc:  # a failed cell is a result, not a crash
        return f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    fp = fp_logits(folder)
    return f"pass, {float((q - fp).norm() / fp.norm()):.4f}"


def matrix(work: Path, calib: list[str]) -> list[str]:
    from tiny_archs import make_tiny_model, random_norms

    lines = [
        "| architecture | " + " | ".join(PIPELINES) + " |",
        "|---|" + "---|" * len(PIPELINES),
    ]
    for arch in ARCHS:
        folder = random_norms(make_tiny_model(work / arch, arch))
        row = []
        for label, flags in PIPELINES.items():
            if arch in NO_ROTATION:
                flags = tuple(f for f in flags if f != "--rotate")
            out = work / f"{arch}-{label.split(',')[0].split()[0]}"
            row.append(cell(folder, flags, calib, out))
        lines.append(f"| {arch} | " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    return lines


def codes(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of an int32 ``weight_packed`` (eight per word, low nibble first)."""
    b = packed.contiguous().view(torch.uint8)
    return torch.stack([b & 15, b >> 4], dim=-1).reshape(-1)


def routed_counts(folder: Path, tokens: torch.Tensor, experts: int) -> list[list[int]]:
    from ptq.models.source import load_fp_model, resolve_model

    model, _ = load_fp_model(resolve_model(folder))
    picked: dict[int, torch.Tensor] = {}
    for b in range(2):
        gate = model.get_submodule(f"model.layers.{b}.mlp.gate")
        gate.register_forward_hook(
            lambda _m, _a, out, b=b: picked.__setitem__(b, out[2].reshape(-1))
        )
    counts = [[0] * experts for _ in range(2)]
    with torch.no_grad():
        for row in tokens:
            model(input_ids=row[None])
            for b in range(2):
                for e, c in enumerate(torch.bincount(picked[b], minlength=experts).tolist()):
                    counts[b][e] += c
    return counts


def moe(work: Path, calib: list[str], text: Path, samples: int, seqlen: int) -> list[str]:
    from tiny_archs import make_tiny_model

    from ptq.calibration.text import calibration_batches
    from ptq.models.source import load_tokenizer, resolve_model

    experts = 8
    folder = make_tiny_model(work / "mixtral8", "mixtral", num_local_experts=experts)
    outs = {m: work / f"mixtral8-{m}" for m in ("gptq", "rtn")}
    for method, out in outs.items():
        cli("quantize", str(folder), "--w4a16", "--method", method, *calib, "-o", str(out))
    tokens = calibration_batches(
        load_tokenizer(resolve_model(folder)), path=text, n_samples=samples, seqlen=seqlen, seed=0
    )
    n = tokens.numel()
    routed = routed_counts(folder, tokens, experts)
    gptq = load_file(str(outs["gptq"] / "model.safetensors"))
    rtn = load_file(str(outs["rtn"] / "model.safetensors"))
    records: dict[str, Any] = json.loads((outs["gptq"] / "ptq_records.json").read_text())
    lines = [
        f"Mixtral-style, {experts} experts, top-2, 2 blocks; calibration {samples} x {seqlen} "
        f"= {n} tokens; W4A16 preset (INT4; group 64, as 128 divides no layer input here)",
        "",
        "| block | expert | tokens routed to it | GPTQ Hessian rows (w1 / w3 / w2) "
        "| codes differing from RTN (w1 / w3 / w2) |",
        "|---|---|---|---|---|",
    ]
    least = n
    for b in range(2):
        for e in range(experts):
            rows, diffs = [], []
            for leaf in ("w1", "w3", "w2"):
                memory = f"model.layers.{b}.mlp.experts.{e}.{leaf}"
                rec = records["layers"][memory]
                rows.append(str(rec["calibration_rows"]))
                least = min(least, int(rec["calibration_rows"]))
                disk = f"model.layers.{b}.block_sparse_moe.experts.{e}.{leaf}.weight_packed"
                diff = codes(gptq[disk]) != codes(rtn[disk])
                diffs.append(f"{100 * float(diff.float().mean()):.1f} %")
            lines.append(
                f"| {b} | {e} | {routed[b][e]} | {' / '.join(rows)} | {' / '.join(diffs)} |"
            )
            print(lines[-1], flush=True)
    lines += ["", f"Every expert's Hessians saw N = {least} calibration tokens (of {n})."]
    return lines


def main() -> None:
    from tiny_archs import synthetic_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ptq-arch-matrix"))
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/arch_matrix.md")
    a = ap.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    a.workdir.mkdir(parents=True)
    text = a.workdir / "calib.txt"
    text.write_text(synthetic_text(8000, seed=7))
    calib = ["--calib", str(text), "--calib-samples", str(a.calib_samples)]
    calib += ["--calib-seqlen", str(a.calib_seqlen), "-q"]
    torch.manual_seed(0)
    head = [
        f"# Architecture matrix ({datetime.date.today()}, `benchmarks/arch_matrix.py`)",
        "",
        f"Tiny random-init models; calibration {a.calib_samples} x {a.calib_seqlen} tokens of "
        "synthetic text; cell: pass/fail (quantize, `ptq verify`, reload) and the relative "
        "logits error against the FP model on one random batch of token ids (2 x 24). Gemma "
        "2/3 run the first pipeline without `--rotate` (refused: post-norms write the "
        "residual stream).",
        "",
    ]
    lines = head + matrix(a.workdir, calib) + ["", "## MoE experts", ""]
    lines += moe(a.workdir, calib, text, a.calib_samples, a.calib_seqlen)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
