"""Decompress an llm-compressor output to a plain fp32 checkpoint (peer venv's python).

The peer's own transformers and compressed-tensors read the output (as llm-compressor's
users would); ``model.safetensors`` gets the decompressed fp32 weights and ``config.json``
loses its ``quantization_config``, so any transformers can load the copy. (The project
venv's newer transformers applies one group size to every layer of a checkpoint with
several config groups, e.g. group 64 with group 128 for ``down_proj``, and refuses it.)

Usage::

    /work/peers/llmc/bin/python benchmarks/peers/llmc_dequantize.py IN_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(
        a.src, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    quant_params = ("_scale", "_zero_point", "_g_idx", "_shape")  # left on the modules
    state = {
        k: v.detach().to(torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith(quant_params)
    }
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    a.out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(a.out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((a.src / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    (a.out / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (a.src / name).exists():
            shutil.copy(a.src / name, a.out / name)


if __name__ == "__main__":
    main()
