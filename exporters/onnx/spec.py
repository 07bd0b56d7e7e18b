"""The decoder-LM shape facts an ONNX export needs, read from a Hugging Face config.

Which blocks can be written is decided on the model's structure
(:mod:`ptq.exporters.onnx.block_names`): pre-norm RMSNorm blocks, rotary position
embeddings (any static RoPE type, taken from the model's own rotary module),
grouped-query attention, SwiGLU MLP, optional q/k/v bias, optional sliding window, tied
or untied LM head (the Llama family: ``llama``, ``mistral``, ``qwen2`` and any model
built the same way). The config gives the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


@dataclass(frozen=True, kw_only=True)
class DecoderSpec:
    """Shapes and constants of a Llama-family decoder.

    Args:
        model_type: The config's ``model_type``.
        num_layers: Decoder blocks.
        hidden_size: Model width ``H``.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (GQA when fewer than ``num_heads``).
        head_dim: Per-head size ``D``.
        vocab_size: Output vocabulary.
        rms_norm_eps: RMSNorm epsilon.
        max_positions: Length of the exported cos/sin caches.
        sliding_window: Attention window or None.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_positions: int
    sliding_window: int | None = None

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def _rope_type(config: Any) -> str:
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if isinstance(params, dict):
            return str(params.get("rope_type", params.get("type", "default")))
    return "default"


def decoder_spec(config: Any) -> DecoderSpec:
    """Read a :class:`DecoderSpec` from a transformers config.

    Raises:
        ValueError: The architecture, activation or RoPE type is not supported.
    """
    model_type = str(getattr(config, "model_type", "?"))
    if getattr(config, "rms_norm_eps", None) is None:
        raise ValueError(
            f"ONNX export does not support architecture {model_type!r}: its config has no "
            "rms_norm_eps (the exporter writes RMSNorm blocks)"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"ONNX export supports SwiGLU (silu) MLPs, not hidden_act={act!r}")
    rope = _rope_type(config)
    if rope in DYNAMIC_ROPE_TYPES:
        raise ValueError(f"ONNX export supports static RoPE only, not rope_type={rope!r}")
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    if heads % kv:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of KV heads {kv}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = getattr(config, "sliding_window", None)
    if model_type == "qwen2":
        if getattr(config, "use_sliding_window", False):
            raise ValueError("ONNX export does not support Qwen2 per-layer sliding windows")
        window = None
    return DecoderSpec(
        model_type=model_type,
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=int(head_dim),
        vocab_size=int(config.vocab_size),
        rms_norm_eps=float(config.rms_norm_eps),
        max_positions=int(config.max_position_embeddings),
        sliding_window=None if window is None else int(window),
    )
