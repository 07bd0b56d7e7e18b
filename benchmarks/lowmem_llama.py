"""Peak memory of ``--low-memory`` quantization vs a load-everything run.

Writes a random-init Llama of about 3 GB fp32 (hidden 2048, 30 layers, GQA) as sharded
safetensors, then runs, each in its own process measured by the OS (``/usr/bin/time -v``
maximum resident set size):

* ``ptq quantize MODEL --w4a16 --low-memory --calib-samples 32 --calib-seqlen 256``
* the same without ``--low-memory`` (the whole model is loaded first)

and prints both peaks next to the model's size. Usage::

    python benchmarks/lowmem_llama.py [--workdir /tmp/ptq-lowmem] [--method rtn]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


def make_model(folder: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=2048,
        num_hidden_layers=30,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    model.model.rotary_emb.__init__(config=config)  # recompute inv_freq after to_empty
    model.save_pretrained(folder, max_shard_size="500MB")
    from transformers import AutoTokenizer

    tok_src = Path.home() / ".cache" / "ptq" / "models" / "SmolLM2-135M-Instruct"
    if tok_src.is_dir():
        AutoTokenizer.from_pretrained(tok_src).save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def peak_rss(cmd: list[str]) -> tuple[int, float, int]:
    start = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    if res.returncode != 0:
        print(res.stdout[-2000:], res.stderr[-3000:], file=sys.stderr)
    return (int(match.group(1)) * 1024 if match else -1), wall, res.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ptq-lowmem"))
    ap.add_argument("--method", default="rtn")
    args = ap.parse_args()
    model = args.workdir / "llama-3gb"
    model.mkdir(parents=True, exist_ok=True)
    size = make_model(model)
    ptq = str(Path(sys.executable).with_name("ptq"))
    common = [
        str(model),
        "--w4a16",
        "--method",
        args.method,
        "--calib-samples",
        "32",
        "--calib-seqlen",
        "256",
        "-q",
        "--overwrite",
    ]
    rows = []
    for label, extra, out in (
        ("ptq --low-memory", ["--low-memory"], "lowmem"),
        ("load everything", [], "full"),
    ):
        target = args.workdir / out
        rss, wall, rc = peak_rss([ptq, "quantize", *common, "-o", str(target), *extra])
        rows.append((label, rss, wall, rc))
        shutil.rmtree(target, ignore_errors=True)
    gib = 1024**3
    print(f"model: {size / gib:.2f} GiB fp32 safetensors ({model})")
    print(f"{'run':<20} {'peak RSS GiB':>13} {'% of model':>11} {'wall s':>8} {'exit':>5}")
    for label, rss, wall, rc in rows:
        print(f"{label:<20} {rss / gib:>13.2f} {100 * rss / size:>10.1f}% {wall:>8.0f} {rc:>5}")
    if rows[0][1] > 0 and rows[1][1] > 0:
        print(f"low-memory / load-everything peak: {rows[0][1] / rows[1][1]:.3f}")


if __name__ == "__main__":
    main()
