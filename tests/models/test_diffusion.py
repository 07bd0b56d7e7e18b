"""Trajectory calibration of diffusers UNets, and ptq.quantize on them (FP8, FP4 E2M1:
NVFP4 and MXFP4; RTN, GPTQ, AdaRound) on tiny random-init configs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ptq
from ptq.compose import build_passes
from ptq.errors import PtqInputError, PtqUsageError
from ptq.formats.presets import preset
from ptq.frontend.qconv import QuantConv2d
from ptq.models.denoiser_error import timestep_errors
from ptq.models.diffusion import DiffusionInputs, Trajectories, denoise, random_unet
from ptq.passes.adaptive import AdaRoundPass, AdaRoundPassConfig
from ptq.qlinear import QuantLinear
from ptq.scheme import Scheme

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_cond_unet() -> nn.Module:
    return random_unet(sample_size=8, channels=(32, 32))


def tiny_uncond_unet() -> nn.Module:
    return random_unet(conditional=False, sample_size=8, channels=(32, 32), in_channels=3)


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return tiny_cond_unet()


@pytest.fixture(scope="module")
def cal(unet: nn.Module) -> Trajectories:
    return DiffusionInputs(steps=4).record(unet, n=4, seed=0)


@pytest.fixture(scope="module")
def held_out(unet: nn.Module) -> Trajectories:
    return DiffusionInputs(steps=4).record(unet, n=2, seed=1)


def test_record_follows_the_sampler(unet: nn.Module, cal: Trajectories) -> None:
    assert cal.latents.shape == (4, 4, 4, 8, 8)
    assert cal.timesteps.tolist() == [750, 500, 250, 0]
    assert cal.cond is not None and cal.cond.shape == (4, 8, 32)
    # step s + 1's latent is DDIM's update of step s's latent with the model's output
    sched = DiffusionInputs(steps=4).make_scheduler()
    with torch.no_grad():
        eps = denoise(unet, cal.step_inputs(1))
    nxt = sched.step(eps, cal.timesteps[1], cal.latents[1]).prev_sample
    torch.testing.assert_close(nxt, cal.latents[2])
    with torch.no_grad():
        eps = denoise(unet, cal.step_inputs(3))
    assert cal.final is not None
    torch.testing.assert_close(sched.step(eps, 0, cal.latents[3]).prev_sample, cal.final)
    again = DiffusionInputs(steps=4).record(unet, n=4, seed=0)
    assert torch.equal(again.latents, cal.latents)
    other = DiffusionInputs(steps=4).record(unet, n=4, seed=1)
    assert not torch.equal(other.latents[0], cal.latents[0])


def test_calibration_batches_span_timesteps_and_use_every_step_once(cal: Trajectories) -> None:
    batches = cal.calibration_batches()
    assert len(batches) == cal.steps
    seen: set[tuple[int, int]] = set()
    for b in batches:
        t = b["timestep"].tolist()
        assert len(set(t)) == cal.n  # every batch spans n different timesteps
        for i in range(cal.n):
            s = cal.timesteps.tolist().index(t[i])
            assert torch.equal(b["sample"][i], cal.latents[s, i])
            seen.add((i, s))
        assert torch.equal(b["encoder_hidden_states"], cal.cond)
    assert len(seen) == cal.n * cal.steps


def test_ddpm_is_seeded_and_unconditional_models_get_no_cond() -> None:
    unet = tiny_uncond_unet()
    a = DiffusionInputs(steps=3, scheduler="ddpm").record(unet, n=2, seed=3)
    b = DiffusionInputs(steps=3, scheduler="ddpm").record(unet, n=2, seed=3)
    assert a.cond is None and "encoder_hidden_states" not in a.step_inputs(0)
    assert torch.equal(a.latents, b.latents)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(PtqInputError, match="scheduler 'euler'"):
        DiffusionInputs(scheduler="euler")
    with pytest.raises(PtqInputError, match="steps"):
        DiffusionInputs(steps=0)
    with pytest.raises(PtqInputError, match="Linear has no diffusers config"):
        DiffusionInputs().record(nn.Linear(2, 2), n=1, seed=0)
    inputs = DiffusionInputs(steps=7, scheduler="ddpm", text_tokens=3)
    assert DiffusionInputs.from_dict(inputs.to_dict()) == inputs
    with pytest.raises(PtqUsageError, match="bound_to"):
        inputs.calibration(None, 1, 0)
    with pytest.raises(PtqUsageError, match="drop the calibration folder"):
        inputs.calibration(Path("images"), 1, 0)


def test_calibration_is_the_bound_models_trajectories(unet: nn.Module) -> None:
    bound = DiffusionInputs(steps=2, trajectories=3).bound_to(unet)
    assert bound == DiffusionInputs(steps=2, trajectories=3) and "model" not in bound.to_dict()
    drawn = bound.calibration(None, 128, seed=4)
    want = DiffusionInputs(steps=2).record(unet, n=3, seed=4).calibration_batches()
    assert len(drawn.batches) == 2 and drawn.sha256 == []
    assert all(
        torch.equal(a["sample"], b["sample"]) for a, b in zip(drawn.batches, want, strict=True)
    )
    assert drawn.summary == "3 DDIM trajectories x 2 steps of random latents (seed 4)"


def _scheme(fmt: str) -> Scheme:
    return Scheme(name=fmt, weight=preset(fmt), ignore=("conv_in",))


def _quantize(unet: nn.Module, fmt: str, method: str, cal: Trajectories, **kw: Any) -> nn.Module:
    scheme = _scheme(fmt)
    passes = kw.get("passes") or build_passes(scheme, method=method)
    result = ptq.quantize(
        copy.deepcopy(unet), scheme, calibration=cal.calibration_batches(), pipeline=passes,
        progress=False, log=lambda *_: None,
    )  # fmt: skip
    assert result.model is not None
    return result.model


def test_every_conv_and_linear_is_planned_and_replaced(unet: nn.Module, cal: Trajectories) -> None:
    q = _quantize(unet, "fp8_e4m3_channel", "rtn", cal)
    names = {n for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    replaced = {n for n, m in q.named_modules() if isinstance(m, QuantLinear | QuantConv2d)}
    assert replaced == names - {"conv_in"}
    for needed in (
        "time_embedding.linear_1",
        "time_embedding.linear_2",
        "down_blocks.0.resnets.0.time_emb_proj",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "mid_block.attentions.0.proj_in",
        "up_blocks.0.upsamplers.0.conv",
    ):
        assert needed in replaced


@pytest.mark.parametrize(
    "fmt",
    [
        pytest.param("fp8_e4m3_channel", marks=pytest.mark.slow),
        "nvfp4",
        "mxfp4",
    ],
)
def test_gptq_beats_rtn_on_held_out_trajectories(
    unet: nn.Module, cal: Trajectories, held_out: Trajectories, fmt: str
) -> None:
    rtn = timestep_errors(unet, _quantize(unet, fmt, "rtn", cal), held_out, buckets=2)
    gptq = timestep_errors(unet, _quantize(unet, fmt, "gptq", cal), held_out, buckets=2)
    assert [e.label for e in rtn] == ["t 0-499", "t 500-999"]
    floor = 20.0 if fmt.startswith("fp8") else 8.0
    for r, g in zip(rtn, gptq, strict=True):
        assert floor < r.sqnr_db < g.sqnr_db
        assert g.rel_error < r.rel_error


@pytest.mark.slow
def test_adaround_learns_fp4_rounding(
    unet: nn.Module, cal: Trajectories, held_out: Trajectories
) -> None:
    ada = AdaRoundPass(AdaRoundPassConfig(iterations=60, batch_size=128, input_rows=512))
    q = _quantize(unet, "nvfp4", "adaround", cal, passes=[ada])
    rtn = timestep_errors(unet, _quantize(unet, "nvfp4", "rtn", cal), held_out, buckets=1)
    got = timestep_errors(unet, q, held_out, buckets=1)
    assert got[0].sqnr_db > rtn[0].sqnr_db


def test_unconditional_unet_quantizes() -> None:
    model = tiny_uncond_unet()
    traj = DiffusionInputs(steps=3).record(model, n=2, seed=0)
    q = _quantize(model, "mxfp4", "rtn", traj)
    errs = timestep_errors(model, q, DiffusionInputs(steps=3).record(model, n=2, seed=1))
    assert all(8.0 < e.sqnr_db < 60.0 for e in errs)
    assert isinstance(q.get_submodule("down_blocks.0.attentions.0.to_q"), QuantLinear)


class RawConvHead(nn.Module):
    """A denoiser whose last op is ``F.conv2d`` on a bare parameter (no Conv2d module)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.head = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.1)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        y = denoise(self.unet, {"sample": sample, "timestep": timestep,
                                "encoder_hidden_states": encoder_hidden_states})  # fmt: skip
        return torch.nn.functional.conv2d(y, self.head, padding=1)


def test_a_weight_without_quantized_op_is_named(unet: nn.Module, cal: Trajectories) -> None:
    notes: list[str] = []
    scheme = _scheme("fp8_e4m3_channel")
    result = ptq.quantize(
        RawConvHead(copy.deepcopy(unet)), scheme, calibration=cal.calibration_batches(),
        pipeline=build_passes(scheme, method="rtn"), progress=False, log=notes.append,
    )  # fmt: skip
    assert "head" in result.plan.skipped and "head" not in result.plan.layers
    assert any(n.startswith("note: head: not quantized:") and "conv" in n for n in notes), notes
