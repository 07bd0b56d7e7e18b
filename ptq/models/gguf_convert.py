"""Convert a GGUF file once into a cached Hugging Face folder (config + safetensors).

transformers dequantizes GGUF tensors to fp32 on load; the result is saved with a clean
config (no ``quantization_config``), the tokenizer and the generation config, written to
a temporary folder and renamed into place so an interrupted conversion leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ptq.errors import PtqInputError
from ptq.models.paths import cache_dir


def gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode())
    return cache_dir() / "models" / f"{gguf.stem}-{key.hexdigest()[:12]}"


def convert_gguf(gguf: Path, target: Path | None = None, *, quiet: bool = False) -> Path:
    """Return an HF folder for ``gguf``, converting it on first use."""
    target = target or gguf_cache_folder(gguf)
    if (target / "config.json").is_file():
        return target
    from ptq.io.gguf_checks import check_gguf_file

    check_gguf_file(gguf, deep=False)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except PtqInputError:
        raise
    except Exception as exc:  # transformers raises many types on bad GGUF content
        raise PtqInputError(f"cannot read GGUF file {gguf}: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        config["dtype"] = "float32"
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
