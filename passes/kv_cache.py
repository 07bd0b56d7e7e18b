"""KV-cache quantization with calibrated per-layer scales (FP8 E4M3 or INT8).

Runtimes such as vLLM store keys and values in 8 bits with one scale per layer,
``k_scale = r_k / q_max`` and ``v_scale = r_v / q_max``, where ``r`` is the calibrated
range. The runtime quantizes keys *after* RoPE; RoPE rotates pairs of channels
``(k_i, k_{i + d/2})`` within a head, so ``|RoPE(k)_i| <= sqrt(k_i^2 + k_{i+d/2}^2)``
for every position. Taking ``r_k`` as the maximum of that pair norm (``rope_safe``)
gives a scale that never clips post-RoPE keys, although it is observed on ``k_proj``.

The scales of block ``i`` are calibrated on the calibration stream entering it (the
already quantized earlier blocks, KV quantization included), one block at a time.

Where keys and values leave for the cache comes from the captured graph
(:class:`~ptq.frontend.structure.Attention`): ``k_proj``/``v_proj``, the k and v rows of
a fused ``qkv_proj`` (Phi-3, GPT-2), or a key norm (Qwen3, Gemma 3: keys are cached
after it). The RoPE bound is used only where the graph shows RoPE on the keys.

Emulation: a :class:`KVFakeQuant` child (``<attention>.k_quant`` / ``v_quant``) is
applied to those outputs (their rows) by a forward hook (before RoPE for keys: an
approximation of the runtime's post-RoPE rounding with the same scale).
:func:`kv_cache_scales` returns the tensors to export.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ptq.activation import fake_quantize_activation
from ptq.formats import FP8_E4M3, INT8, ElementFormat
from ptq.frontend.structure import Attention, CachePoint, ModelStructure
from ptq.passes._groups import block_structure, structure_of, tensor_attr
from ptq.pipeline import Pass, PassContext, QuantState
from ptq.scheme import ActivationScheme

KVDtype = Literal["fp8_e4m3", "int8"]
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")
_ELEMENTS: dict[str, ElementFormat] = {"fp8_e4m3": FP8_E4M3, "int8": INT8}


class KVFakeQuant(nn.Module):
    """Per-tensor static fake-quantization of a key or value projection's output."""

    def __init__(self, dtype: KVDtype, scale: torch.Tensor) -> None:
        super().__init__()
        self.dtype = dtype
        self.scheme = ActivationScheme(
            element=_ELEMENTS[dtype], granularity="tensor", dynamic=False
        )
        self.register_buffer("scale", scale.reshape(1).float(), persistent=False)
        self.handle: Any = None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activation(y, self.scheme, tensor_attr(self, "scale"))

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, scale={float(tensor_attr(self, 'scale')):.4g}"


def rope_pair_absmax(k: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``max sqrt(k_i^2 + k_{i+d/2}^2)`` over heads, positions and pairs (RoPE-invariant)."""
    pairs = k.float().reshape(-1, k.shape[-1] // head_dim, 2, head_dim // 2)
    return pairs.pow(2).sum(dim=2).sqrt().amax()


@dataclass(frozen=True, kw_only=True)
class KVCacheConfig:
    """Args:
    dtype: ``fp8_e4m3`` or ``int8`` cache elements.
    rope_safe: Key range from the RoPE pair-norm bound (else plain ``max |k|``).
    """

    dtype: KVDtype = "fp8_e4m3"
    rope_safe: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in _ELEMENTS:
            raise ValueError(
                f"KV-cache dtype must be one of {sorted(_ELEMENTS)}, not {self.dtype!r}"
            )


def _rows(y: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return y if rows is None else y[..., rows[0] : rows[1]]


def _install(
    attn: nn.Module, which: str, module: nn.Module, point: CachePoint, quant: KVFakeQuant
) -> None:
    """Make ``quant`` the ``{which}_quant`` child of ``attn``, applied to ``point``'s output."""
    setattr(attn, f"{which}_quant", quant)
    rows = point.rows

    def hook(_m: nn.Module, _args: tuple[Any, ...], y: torch.Tensor) -> torch.Tensor:
        if rows is None:
            return quant(y)
        out = y.clone()
        out[..., rows[0] : rows[1]] = quant(y[..., rows[0] : rows[1]])
        return out

    quant.handle = module.register_forward_hook(hook)


class KVCachePass(Pass):
    """Calibrate per-layer ``k_scale``/``v_scale`` and fake-quantize the cached k/v."""

    name: ClassVar[str] = "kv_cache"
    requires: ClassVar[tuple[str, ...]] = ("weights_quantized",)
    ensures: ClassVar[tuple[str, ...]] = ("kv_cache_quantized",)
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: KVCacheConfig | None = None) -> None:
        self.config = config or KVCacheConfig()

    def prepare(self, state: QuantState, ctx: PassContext) -> None:
        s = structure_of(state)
        if s.block_path is None or not any(b.attention for b in s.blocks.values()):
            raise ValueError("kv_cache: the captured graph shows no attention in the blocks")

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        unit = state.unit
        assert unit is not None
        if unit.kind != "block":
            return
        if ctx.calibration is None:
            raise ValueError("kv_cache needs calibration tokens (ctx.calibration is None)")
        model = state.model
        for attn in block_structure(state).attention:
            self._calibrate(model, attn, unit.forwards(), ctx)

    def _calibrate(
        self, model: nn.Module, attn: Attention, forwards: list[Callable[[], Any]], ctx: PassContext
    ) -> None:
        module = model.get_submodule(attn.module)
        if hasattr(module, "k_quant"):
            raise ValueError(f"{attn.module} already has KV-cache quantization")
        ranges: dict[str, torch.Tensor] = {}
        handles = []
        points = {"k": attn.key, "v": attn.value}
        for which, point in points.items():
            rope = which == "k" and self.config.rope_safe and attn.rotary

            def hook(
                _m: nn.Module,
                _a: tuple[Any, ...],
                y: torch.Tensor,
                key: str = which,
                rope: bool = rope,
                rows: tuple[int, int] | None = point.rows,
            ) -> None:
                t = _rows(y.detach(), rows)
                r = rope_pair_absmax(t, attn.head_dim) if rope else t.abs().amax()
                ranges[key] = torch.maximum(ranges[key], r) if key in ranges else r.float()

            handles.append(model.get_submodule(point.module).register_forward_hook(hook))
        try:
            with torch.no_grad():
                for forward in forwards:
                    forward()
        finally:
            for h in handles:
                h.remove()
        qmax = _ELEMENTS[self.config.dtype].max_value
        record = ctx.records.setdefault("kv_cache", {"dtype": self.config.dtype, "scales": {}})
        for which, point in points.items():
            r = ranges[which]
            scale = torch.where(r > 0, r / qmax, torch.ones_like(r))
            target = model.get_submodule(point.module)
            _install(module, which, target, point, KVFakeQuant(self.config.dtype, scale))
            record["scales"][f"{attn.module}.{which}_scale"] = float(scale)


def kv_cache_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"model.layers.i.self_attn.k_scale": [1] fp32, ... v_scale ...}`` to export."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, KVFakeQuant):
            prefix, _, leaf = name.rpartition(".")
            out[f"{prefix}.{leaf[0]}_scale"] = tensor_attr(m, "scale").detach().clone()
    return out


def install_kv_cache_scales(
    model: nn.Module, scales: dict[str, torch.Tensor], dtype: KVDtype, structure: ModelStructure
) -> None:
    """Re-install KV-cache fake quantization from exported scales (reloading an output).

    Args:
        model: The model the scales were exported from (same module names).
        scales: :func:`kv_cache_scales`' mapping, e.g. from the checkpoint.
        dtype: The cache element (``kv_cache_scheme`` of the config).
        structure: ``model``'s structure (where keys and values are cached).

    Raises:
        ValueError: A scale names no attention module of ``model``.
    """
    attentions = {a.module: a for b in structure.all_blocks() for a in b.attention}
    for key, scale in scales.items():
        attn_name, _, leaf = key.rpartition(".")
        attn = attentions.get(attn_name)
        which = {"k_scale": "k", "v_scale": "v"}.get(leaf)
        if which is None or attn is None:
            raise ValueError(f"KV-cache scale {key} names no attention of the model")
        point = attn.key if which == "k" else attn.value
        _install(
            model.get_submodule(attn_name),
            which,
            model.get_submodule(point.module),
            point,
            KVFakeQuant(dtype, scale.float()),
        )
