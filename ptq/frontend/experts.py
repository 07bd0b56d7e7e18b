"""Mixture-of-experts layers as one ``nn.Linear`` per expert projection.

transformers 5 keeps a sparse MoE block's experts fused: one module with parameters
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` whose forward runs, for each
routed expert ``e``, ``down_e(act(gate_e(x)) * up_e(x))`` weighted by the router
(gate rows first in ``gate_up_proj``), while checkpoints (and vLLM) store every expert's
``gate``/``up``/``down`` as its own 2-D weight. :func:`unfuse_experts` replaces each
fused module by :class:`ExpertMLPs`, a ``ModuleList`` of :class:`ExpertMLP` whose
``nn.Linear`` children carry the checkpoint's names (``experts.3.w1`` for Mixtral,
``experts.3.gate_proj`` for Qwen-MoE), with the same forward signature
``(hidden_states, top_k_index, top_k_weights)``. Every pass then sees expert
projections as ordinary Linears: quantized, smoothed and rotated like any other, and
exported under the names vLLM loads. The router stays as it is (high precision).

Calibration: with top-k routing an expert only sees the tokens routed to it, so a
rarely picked expert gets few calibration rows (a rank-deficient GPTQ Hessian). While
:func:`all_tokens` is active (the runner turns it on while passes gather statistics,
and capture uses it), every expert runs on *every* token, so each one's statistics
cover the whole calibration set, and the block's output is still the routed mixture:
expert ``e``'s output on token ``t`` enters the sum weighted by the router's weight,
which is zero where ``t`` was not routed to ``e``. Outside it (advancing the
calibration stream, evaluation) only routed tokens are computed.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ptq.errors import PtqInputError

DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")


class ExpertMLP(nn.Module):
    """One expert ``down(act(gate(x)) * up(x))``; its Linears named as the checkpoint.

    Args:
        gate, up, down: The expert's projections.
        act_fn: The activation (shared by the experts of one block).
        names: Attribute names of gate, up and down (``w1, w3, w2`` for Mixtral).
    """

    def __init__(
        self,
        gate: nn.Module,
        up: nn.Module,
        down: nn.Module,
        act_fn: nn.Module,
        names: tuple[str, str, str] = DEFAULT_NAMES,
    ) -> None:
        super().__init__()
        self.names = names
        for name, mod in zip(names, (gate, up, down), strict=True):
            self.add_module(name, mod)
        self.act_fn = act_fn

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """``(gate, up, down)``, whatever they are now (Linears, or quantized ones)."""
        gate, up, down = (self.get_submodule(n) for n in self.names)
        return gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.projections()
        y: torch.Tensor = down(self.act_fn(gate(x)) * up(x))
        return y


class ExpertMLPs(nn.ModuleList):
    """The unfused experts of one MoE block (children ``0 .. E-1``).

    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` returns
    the routed mixture ``sum_k w_tk expert_{i_tk}(x_t)`` (see the module docstring for
    the all-tokens mode).
    """

    def __init__(self, experts: list[ExpertMLP], fused: nn.Module | None = None) -> None:
        super().__init__(experts)
        self.all_tokens = False
        # the fused original (on meta), to check the unfused forward against it
        object.__setattr__(self, "fused_reference", fused)

    @property
    def num_experts(self) -> int:
        return len(self)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        if self.all_tokens or torch.compiler.is_compiling():
            for e, expert in enumerate(self):
                w = (top_k_weights * (top_k_index == e).to(top_k_weights.dtype)).sum(-1)
                out = out + expert(hidden_states) * w[:, None].to(out.dtype)
            return out
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


@contextlib.contextmanager
def all_tokens(module: nn.Module) -> Iterator[None]:
    """Run every :class:`ExpertMLPs` under ``module`` on every token (statistics mode)."""
    found = [m for m in module.modules() if isinstance(m, ExpertMLPs)]
    before = [m.all_tokens for m in found]
    for m in found:
        m.all_tokens = True
    try:
        yield
    finally:
        for m, b in zip(found, before, strict=True):
            m.all_tokens = b


def _converter_names(model: nn.Module) -> tuple[str, str, str] | None:
    """Checkpoint names of gate/up/down from transformers' conversion mapping, if any."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:
        return None
    try:
        conversions = get_model_conversion_mapping(model, add_legacy=False)  # type: ignore[arg-type]
    except Exception:  # not a transformers model, or no mapping
        return None
    gate_up: list[str] = []
    down: list[str] = []
    for c in conversions:
        if not isinstance(c, WeightConverter):
            continue
        targets = " ".join(c.target_patterns)
        leaves = [m.group(1) for p in c.source_patterns if (m := re.search(r"\*\.(\w+)\.", p))]
        if targets.endswith("experts.gate_up_proj"):
            gate_up = leaves
        elif targets.endswith("experts.down_proj"):
            down = leaves
    if len(gate_up) == 2 and len(down) == 1:
        return gate_up[0], gate_up[1], down[0]
    return None


CONV_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _fused_layout(name: str, module: nn.Module) -> tuple[int, int, int] | None:
    """``(E, I, H)`` of a fused experts module, None if ``module`` is not one.

    Raises:
        PtqInputError: 3-D expert weights in a layout ptq does not know (the module named).
    """
    if isinstance(module, CONV_MODULES):  # a 1-D convolution's weight is 3-D too
        return None
    params = dict(module.named_parameters(recurse=False))
    three_d = {n: p for n, p in params.items() if p.dim() == 3}
    if not three_d:
        return None
    gu, dn = params.get("gate_up_proj"), params.get("down_proj")
    ok = (
        set(params) == {"gate_up_proj", "down_proj"}
        and gu is not None
        and dn is not None
        and gu.dim() == 3
        and dn.dim() == 3
        and gu.shape[0] == dn.shape[0]
        and gu.shape[1] == 2 * dn.shape[2]
        and gu.shape[2] == dn.shape[1]
        and isinstance(getattr(module, "act_fn", None), nn.Module)
    )
    if not ok:
        shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in params.items())
        raise PtqInputError(
            f"{name} ({type(module).__name__}) holds 3-D expert weights ({shapes}) in a layout "
            "ptq cannot split into per-expert Linears (it knows gate_up_proj [E, 2I, H] + "
            "down_proj [E, H, I] with an act_fn, no biases)"
        )
    assert gu is not None and dn is not None
    return int(gu.shape[0]), int(dn.shape[2]), int(gu.shape[2])


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    return lin


def unfused(
    module: nn.Module, names: tuple[str, str, str], layout: tuple[int, int, int]
) -> ExpertMLPs:
    """The :class:`ExpertMLPs` equal to fused ``module`` (its weights copied, or meta)."""
    n_exp, inter, _hidden = layout
    gu = module.get_parameter("gate_up_proj").detach()
    dn = module.get_parameter("down_proj").detach()
    act = module.get_submodule("act_fn")
    experts = [
        ExpertMLP(_linear(gu[e, :inter]), _linear(gu[e, inter:]), _linear(dn[e]), act, names)
        for e in range(n_exp)
    ]
    reference = copy.deepcopy(module).to("meta")
    return ExpertMLPs(experts, reference)


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` by :class:`ExpertMLPs` (in place).

    Works on a weightless ``meta`` skeleton (shapes only) and on a loaded model (the
    weights are copied). Returns the names of the replaced modules.

    Raises:
        PtqInputError: A module holds 3-D weights in an unknown layout (named).
    """
    from ptq.modules import replace_module

    names = _converter_names(model) or DEFAULT_NAMES
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(module, ExpertMLPs):
            continue
        layout = _fused_layout(name, module)
        if layout is None:
            continue
        replace_module(model, name, unfused(module, names, layout))
        done.append(name)
    return done


def _weight(module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    assert isinstance(w, torch.Tensor)
    return w.detach()


@torch.no_grad()
def check_unfused(name: str, experts: ExpertMLPs, seed: int = 0) -> None:
    """Compare ``experts`` with the fused module it replaced on random routed tokens.

    Raises:
        PtqInputError: The outputs differ (the fused forward is not the gated MLP
            ptq assumed), naming the module.
    """
    fused = experts.fused_reference
    if not isinstance(fused, nn.Module) or any(p.is_meta for p in experts.parameters()):
        return
    projs = [e.projections() for e in experts if isinstance(e, ExpertMLP)]
    w0 = _weight(projs[0][0])
    ref = copy.deepcopy(fused).to_empty(device=w0.device).to(w0.dtype)
    ref.get_parameter("gate_up_proj").copy_(
        torch.stack([torch.cat([_weight(g), _weight(u)]) for g, u, _ in projs])
    )
    ref.get_parameter("down_proj").copy_(torch.stack([_weight(d) for _, _, d in projs]))
    gen = torch.Generator().manual_seed(seed)
    tokens, k = 16, min(2, len(projs))
    x = torch.randn(tokens, w0.shape[1], generator=gen).to(w0)
    index = torch.stack([torch.randperm(len(projs), generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen).to(w0)
    args: tuple[Any, ...] = (x, index.to(w0.device), weights)
    want = ref(*args)
    got = experts(*args)
    scale = float(want.abs().max()) or 1.0
    if float((want - got).abs().max()) > 1e-4 * scale:
        raise PtqInputError(
            f"{name} ({type(fused).__name__}): its forward is not down(act(gate(x)) * up(x)) "
            "over gate_up_proj's [gate; up] rows, so ptq cannot split it into per-expert Linears"
        )
