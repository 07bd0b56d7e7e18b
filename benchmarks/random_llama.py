"""Write a random-init Llama of a given shape as sharded safetensors, one shard in memory.

Used by the scaling benchmarks (``scale_cpu.py``, ``gpu_quantize.sh``): the model is
built on the meta device, each tensor is drawn (normal, std 0.02; norms 1) from a
seeded generator (on a GPU when ``--device cuda``: an 8B model in seconds) and written
shard by shard, so writing an 8B model needs one shard of memory, not the model. The
SmolLM2 tokenizer (vocabulary 49152) is copied in when the cache has it, or with
``--train-tokenizer TEXT`` a byte-level BPE tokenizer is trained on ``TEXT`` (a machine
without the cache), so ``ptq quantize`` can tokenize calibration text. Usage::

    python benchmarks/random_llama.py OUT --hidden 2048 --layers 12 --intermediate 6144
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

SHARD_BYTES = 2 * 1024**3


def llama_config(
    hidden: int,
    layers: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    vocab: int = 49152,
    tied: bool = False,
    dtype: str = "float32",
) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def train_tokenizer(text: Path, folder: Path, vocab: int = 16000) -> None:
    """A byte-level BPE tokenizer trained on ``text``, saved into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(text)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)


def write_model(folder: Path, config: dict[str, object], seed: int = 0, device: str = "cpu") -> int:
    """Write ``config.json`` and random weights into ``folder``; returns the weight bytes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "model.safetensors.index.json"
    if done.is_file():
        return int(json.loads(done.read_text())["metadata"]["total_size"])
    cfg = AutoConfig.for_model(**config)
    dtype = getattr(torch, str(config["torch_dtype"]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    names: list[str] = []
    weight_map: dict[str, str] = {}
    tmp_names: list[str] = []

    def flush() -> None:
        nonlocal size
        if not shards[-1]:
            return
        name = f"part-{len(tmp_names):05d}.safetensors"
        save_file(shards[-1], str(folder / name), metadata={"format": "pt"})
        tmp_names.append(name)
        for t in shards[-1]:
            weight_map[t] = name
        shards[-1] = {}
        size = 0

    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue
        if "norm" in name:
            t = torch.ones(p.shape, dtype=dtype)
        else:
            t = (torch.randn(p.shape, generator=gen, device=device) * 0.02).to(dtype).cpu()
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > SHARD_BYTES:
            flush()
        shards[-1][name] = t
        names.append(name)
        size += nbytes
        total += nbytes
    flush()
    n = len(tmp_names)
    final = {t: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, t in enumerate(tmp_names)}
    for old, new in final.items():
        (folder / old).rename(folder / new)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: final[v] for k, v in sorted(weight_map.items())},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tok = Path.home() / ".cache" / "ptq" / "models" / "SmolLM2-135M-Instruct"
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok / f).is_file():
            shutil.copy2(tok / f, folder / f)
    done.write_text(json.dumps(index, indent=2))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=6144)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--device", default="cpu", help="where the random numbers are drawn")
    ap.add_argument("--train-tokenizer", type=Path, default=None, metavar="TEXT")
    args = ap.parse_args()
    cfg = llama_config(
        args.hidden,
        args.layers,
        args.intermediate,
        args.heads,
        args.kv_heads,
        args.vocab,
        args.tied,
        args.dtype,
    )
    size = write_model(args.out, cfg, device=args.device)
    if args.train_tokenizer is not None:
        train_tokenizer(args.train_tokenizer, args.out)
    print(f"wrote {args.out}: {size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
