"""Stages inside a unit: statistics, early-stopped stage forwards, shared Hessians."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from ptq.calibration.ordered_hessian import OrderedHessian
from ptq.calibration.stages import LayerStats, StatsRequest, run_stages
from ptq.pipeline import Pass, PassContext, Pipeline, QuantState
from ptq.plan import LayerPlan, QuantPlan
from ptq.scheme import get_scheme

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _names(model: nn.Module) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]


def _reference_hessians(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict:
    """``2 X^T X / n`` of each layer's input over a plain forward (float64)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for batch in ids.split(2):
            model(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()
    return {n: 2.0 * sums[n] / counts[n] for n in names}


class _Recorder(Pass):
    """Runs the stages with a quantizer that only records statistics (weights untouched)."""

    needs_calibration = True

    def __init__(self, seen: dict[str, LayerStats]) -> None:
        self.seen = seen

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        assert state.unit is not None
        request = StatsRequest(hessian=True, input_rows=16)
        run_stages(state.unit, request, lambda name, stats: self.seen.__setitem__(name, stats))


def _run(model: nn.Module, ids: torch.Tensor) -> dict[str, LayerStats]:
    seen: dict[str, LayerStats] = {}
    scheme = get_scheme("w8a16")
    plan = QuantPlan(scheme=scheme)
    for n in _names(model):
        lin = model.get_submodule(n)
        plan.layers[n] = LayerPlan(
            name=n,
            in_features=lin.in_features,
            out_features=lin.out_features,
            weight=scheme.weight,
            activation=None,
        )
    ctx = PassContext(calibration=ids, progress=False, batch_size=2)
    Pipeline([_Recorder(seen)]).run(QuantState(model=model, plan=plan), ctx)
    return seen


def test_stage_hessians_equal_a_plain_forward(tiny_lm: Callable[[], nn.Module]) -> None:
    model = tiny_lm()
    ids = torch.randint(0, 320, (6, 12), generator=torch.Generator().manual_seed(1))
    seen = _run(model, ids)
    ref = _reference_hessians(model, _names(model), ids)
    assert set(seen) == set(ref)
    for name, stats in seen.items():
        assert stats.hessian is not None
        h = stats.hessian.hessian()
        assert h.dtype == torch.float32  # Hessians are float32 on every device
        torch.testing.assert_close(h.double(), ref[name], rtol=1e-5, atol=1e-6)
        assert stats.input_rows().shape == (16, ref[name].shape[0])


def test_layers_fed_one_tensor_share_one_hessian(tiny_lm: Callable[[], nn.Module]) -> None:
    model = tiny_lm()
    ids = torch.randint(0, 320, (4, 8), generator=torch.Generator().manual_seed(2))
    seen = _run(model, ids)
    for i in range(2):
        p = f"model.layers.{i}."
        q, k, v = (seen[p + f"self_attn.{n}_proj"] for n in "qkv")
        assert q.hessian is k.hessian is v.hessian
        assert (q.owns_hessian, k.owns_hessian, v.owns_hessian) == (True, False, False)
        assert isinstance(q.hessian, OrderedHessian) and q.hessian.readers == 3
        assert q.hessian is not None and q.hessian.nsamples == ids.numel()  # counted once
        gate, up = seen[p + "mlp.gate_proj"], seen[p + "mlp.up_proj"]
        assert gate.hessian is up.hessian
        assert seen[p + "self_attn.o_proj"].hessian is not q.hessian
        # cached rows stay per layer
        assert torch.equal(q.input_rows(), k.input_rows())


def test_stage_forwards_stop_before_the_stage(tiny_lm: Callable[[], nn.Module]) -> None:
    """Each stage's forward ends as soon as its layers' shared input is known (before
    any of them multiplies) and starts at the smallest module holding it and the stage
    before (inputs cached there): down_proj runs only in the pass that makes the block's
    outputs; the down_proj stage starts at the MLP, so the attention runs in 3 forwards
    per batch, not 5. Plus one one-row forward that discovers the stages."""
    model = tiny_lm()
    ids = torch.randint(0, 320, (4, 8), generator=torch.Generator().manual_seed(3))
    calls = {"down": 0, "o": 0, "q": 0, "gate": 0}
    layer = model.model.layers[0]
    for key, mod in (
        ("down", layer.mlp.down_proj),
        ("o", layer.self_attn.o_proj),
        ("q", layer.self_attn.q_proj),
        ("gate", layer.mlp.gate_proj),
    ):
        mod.register_forward_hook(lambda *_, _k=key: calls.__setitem__(_k, calls[_k] + 1))
    _run(model, ids)
    batches = 2
    assert calls["down"] == 1 * batches + 1  # the block outputs only
    # o_proj: the gate/up stage (which stops before gate/up) and the block outputs
    assert calls["o"] == 2 * batches + 1
    # q_proj: the o stage (resumed at self_attn), the gate/up stage, the block outputs
    assert calls["q"] == 3 * batches + 1
    # gate_proj: the down_proj stage (resumed at the MLP) and the block outputs
    assert calls["gate"] == 2 * batches + 1


def test_resumed_stages_quantize_like_full_forwards(
    tiny_lm: Callable[[], nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPTQ through the runner gives bit-identical weights whether each stage's forwards
    start at the block or resume from the cached inputs of a submodule."""
    import ptq.calibration.stages as stages
    from ptq.formats import INT4, PerGroup, QuantFormat
    from ptq.passes.gptq import GPTQPass
    from ptq.pipeline import PassContext, Pipeline, QuantState
    from ptq.plan import build_plan
    from ptq.scheme import Scheme

    scheme = Scheme(name="w4", weight=QuantFormat(INT4, PerGroup(32)), activation=None)
    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(4))

    def quantized() -> dict[str, torch.Tensor]:
        model = tiny_lm()
        plan = build_plan(model, scheme)
        ctx = PassContext(calibration=ids, progress=False)
        Pipeline([GPTQPass()]).run(QuantState(model=model, plan=plan, tokenizer=None), ctx)
        return {k: v.clone() for k, v in model.state_dict().items()}

    resumed = quantized()
    monkeypatch.setattr(stages, "_common_parent", lambda *_a: None)
    full = quantized()
    assert resumed.keys() == full.keys()
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
