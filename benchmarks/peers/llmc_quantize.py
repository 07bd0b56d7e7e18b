"""Quantize a causal LM with llm-compressor (run with the peer venv's python).

Runs ``oneshot`` with GPTQModifier, QuantizationModifier (RTN) or AWQModifier followed by
QuantizationModifier (llm-compressor's AWQ: scales only, the RTN modifier rounds; CPU
needs ``torch.Tensor.pin_memory`` made a no-op) on the calibration token
ids saved by our benchmark (``torch.save`` of an ``[n, seqlen]`` tensor), writes the
compressed model to ``--out`` and a JSON line with the wall time of the ``oneshot`` call.
With ``--eval-ids`` it also computes perplexity with a copy of ``ptq.evaluate.perplexity``
(non-overlapping windows, sum of token NLL / count), as a cross-check of the reload.

Usage::

    /work/peers/llmc/bin/python benchmarks/peers/llmc_quantize.py --model DIR \
        --calib ids.pt --scheme int4_g64 --method gptq --out DIR [--eval-ids ids.pt]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

INT_SCHEMES = {
    "int4_g64": {"num_bits": 4, "strategy": "group", "group_size": 64},
    "int4_channel": {"num_bits": 4, "strategy": "channel"},
    "int3_g64": {"num_bits": 3, "strategy": "group", "group_size": 64},
}


ACT_SCHEMES = ("w8a8_sq_gptq", "w4a8_fp8_int4_g64")
# llm-compressor's W4A16 example recipe (GPTQ, preset W4A16 = INT4 symmetric group 128)
# verbatim, and the same with group 64 where 128 does not divide a layer's input (the
# group sizes ptq's --w4a16 preset rule picks: 64 for SmolLM2's 576-wide inputs, 128 for
# down_proj's 1536).
EXAMPLE_SCHEMES = ("w4a16_example", "w4a16_example_g64")


def _example(cls: type) -> object:
    g64 = QuantizationArgs(type="int", symmetric=True, num_bits=4, strategy="group", group_size=64)
    g128 = QuantizationArgs(
        type="int", symmetric=True, num_bits=4, strategy="group", group_size=128
    )
    narrow = [f"re:.*{n}_proj$" for n in ("q", "k", "v", "o", "gate", "up")]
    groups = {
        "group_0": QuantizationScheme(targets=narrow, weights=g64),
        "group_1": QuantizationScheme(targets=["re:.*down_proj$"], weights=g128),
    }
    return cls(config_groups=groups, ignore=["lm_head"])


def recipe(scheme: str, method: str) -> object:
    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        torch.Tensor.pin_memory = lambda self, *a, **k: self  # type: ignore[method-assign]
        return [AWQModifier(), recipe(scheme, "rtn")]
    cls = GPTQModifier if method == "gptq" else QuantizationModifier
    if scheme == "w4a16_example":
        return cls(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    if scheme == "w4a16_example_g64":
        return _example(cls)
    if scheme == "w8a8_sq_gptq":  # llm-compressor's W8A8 example: SmoothQuant 0.8 + GPTQ
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        return [
            SmoothQuantModifier(smoothing_strength=0.8),
            cls(scheme="W8A8", targets="Linear", ignore=["lm_head"]),
        ]
    if scheme == "w4a8_fp8_int4_g64":  # INT4 g64 symmetric weights x FP8 dynamic per token
        weights = QuantizationArgs(type="int", symmetric=True, **INT_SCHEMES["int4_g64"])
        acts = QuantizationArgs(
            num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True
        )
        scheme_ = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
        return cls(config_groups={"group_0": scheme_}, ignore=["lm_head"])
    if scheme == "nvfp4":
        return cls(scheme="NVFP4A16", targets="Linear", ignore=["lm_head"])
    args = QuantizationArgs(type="int", symmetric=True, **INT_SCHEMES[scheme])
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}
    return cls(config_groups=groups, ignore=["lm_head"])


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seqlen: int) -> float:
    total, count = 0.0, 0
    for w in range(ids.numel() // seqlen):
        window = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0)
        logits = model(input_ids=window).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total += float(nll)
        count += seqlen - 1
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument(
        "--scheme", required=True, choices=[*INT_SCHEMES, "nvfp4", *ACT_SCHEMES, *EXAMPLE_SCHEMES]
    )
    ap.add_argument("--method", required=True, choices=["gptq", "rtn", "awq"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval-ids", default=None)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ids = torch.load(a.calib)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    ds = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    start = time.perf_counter()
    oneshot(
        model=model,
        processor=tok,
        dataset=ds,
        recipe=recipe(a.scheme, a.method),
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
    )
    seconds = time.perf_counter() - start
    ppl = None
    if a.eval_ids:
        ppl = perplexity(model, torch.load(a.eval_ids), a.seqlen)
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    print("LLMC_RESULT " + json.dumps({"seconds": seconds, "ppl_in_peer": ppl}), flush=True)


if __name__ == "__main__":
    main()
