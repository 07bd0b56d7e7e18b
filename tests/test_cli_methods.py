"""``--method awq+gptq``, the default method, ``--rounding`` and ``--act-observer`` end to end."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file

Run = Callable[..., object]
CALIB = ("--calib-samples", "4", "--calib-seqlen", "32", "-q")


def _quantize(run_cli: Run, model: Path, out: Path, *flags: str) -> dict:
    r = run_cli("quantize", str(model), *flags, "-o", str(out), *CALIB)
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    return json.loads((out / "ptq_plan.json").read_text())


def _keys(out: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    tensors = load_file(str(out / "model.safetensors"))
    return {k: (str(t.dtype), tuple(t.shape)) for k, t in tensors.items()}


def test_awq_gptq_keeps_the_layout_and_records_what_ran(
    run_cli: Run, tiny_llama: Path, tmp_path: Path
) -> None:
    awq = _quantize(run_cli, tiny_llama, tmp_path / "awq", "--w4a16", "--method", "awq+gptq")
    gptq = _quantize(run_cli, tiny_llama, tmp_path / "gptq", "--w4a16", "--method", "gptq")
    assert {lp["method"] for lp in awq["layers"].values()} == {"awq+gptq"}
    assert {lp["method"] for lp in gptq["layers"].values()} == {"gptq"}
    config = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("awq", "gptq")]
    assert config[0]["quantization_config"] == config[1]["quantization_config"]
    assert _keys(tmp_path / "awq") == _keys(tmp_path / "gptq")
    records = json.loads((tmp_path / "awq" / "ptq_records.json").read_text())
    assert len(records["awq"]["alpha"]) == 8
    r = run_cli("verify", str(tmp_path / "awq"))
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]


def test_defaults_awq_gptq_full_range_for_4_bits_rtn_for_8(
    run_cli: Run, tiny_llama: Path, tmp_path: Path
) -> None:
    w4 = _quantize(run_cli, tiny_llama, tmp_path / "w4", "--w4a16")
    assert {lp["method"] for lp in w4["layers"].values()} == {"awq+gptq"}
    assert {lp["weight"]["scale_rule"] for lp in w4["layers"].values()} == {"full_range"}
    w8 = _quantize(run_cli, tiny_llama, tmp_path / "w8", "--w8a16")
    assert {lp["method"] for lp in w8["layers"].values()} == {"rtn"}
    assert {lp["weight"]["scale_rule"] for lp in w8["layers"].values()} == {"amax"}
    amax = _quantize(run_cli, tiny_llama, tmp_path / "amax", "--w4a16", "--scale-rule", "amax")
    assert {lp["weight"]["scale_rule"] for lp in amax["layers"].values()} == {"amax"}


def test_stochastic_rounding_is_recorded_and_rtn_only(
    run_cli: Run, tiny_llama: Path, tmp_path: Path
) -> None:
    plan = _quantize(run_cli, tiny_llama, tmp_path / "sr", "--w4a16", "--rounding", "stochastic")
    assert {(lp["method"], lp["rounding"]) for lp in plan["layers"].values()} == {
        ("rtn", "stochastic")
    }
    again = _quantize(run_cli, tiny_llama, tmp_path / "sr2", "--w4a16", "--rounding", "stochastic")
    assert _keys(tmp_path / "sr") == _keys(tmp_path / "sr2")
    a = load_file(str(tmp_path / "sr" / "model.safetensors"))
    b = load_file(str(tmp_path / "sr2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert again == plan
    r = run_cli(
        "quantize", str(tiny_llama), "--w4a16", "--method", "gptq", "--rounding", "stochastic",
        "-o", str(tmp_path / "bad"), *CALIB,
    )  # fmt: skip
    assert r.exit_code == 2 and "applies to RTN" in r.output  # type: ignore[attr-defined]


def test_act_observer(run_cli: Run, tiny_llama: Path, tmp_path: Path) -> None:
    _quantize(
        run_cli, tiny_llama, tmp_path / "kl", "--w8a8", "--act-format", "int8_tensor_static",
        "--act-observer", "kl",
    )  # fmt: skip
    records = json.loads((tmp_path / "kl" / "ptq_records.json").read_text())
    assert records["act_calibration"]["observer"] == "kl"
    assert len(records["act_calibration"]["input_scale"]) == 14
    r = run_cli(
        "quantize", str(tiny_llama), "--w8a8", "--act-observer", "kl",
        "-o", str(tmp_path / "dyn"), *CALIB,
    )  # fmt: skip
    assert r.exit_code == 2 and "static activation" in r.output  # type: ignore[attr-defined]


def test_bad_method_is_one_error_line(run_cli: Run, tiny_llama: Path, tmp_path: Path) -> None:
    r = run_cli(
        "quantize", str(tiny_llama), "--w4a16", "--method", "gptq+awq",
        "-o", str(tmp_path / "x"), *CALIB,
    )  # fmt: skip
    lines = r.output.strip().splitlines()  # type: ignore[attr-defined]
    assert r.exit_code == 2 and len(lines) == 1  # type: ignore[attr-defined]
    assert lines[0].startswith("error:") and "awq+gptq" in lines[0]


def test_layerwise_methods_with_static_activations(
    run_cli: Run, tiny_llama: Path, tmp_path: Path
) -> None:
    """GPTQ's later stages run through layers whose static scales do not exist yet (FP
    activations there); act_calibration then gives every layer its scale and scheme."""
    plan = _quantize(
        run_cli, tiny_llama, tmp_path / "st", "--w8a8", "--act-format", "int8_tensor_static",
        "--method", "gptq",
    )  # fmt: skip
    records = json.loads((tmp_path / "st" / "ptq_records.json").read_text())
    assert records["act_calibration"]["input_scale"].keys() == plan["layers"].keys()
    tensors = load_file(str(tmp_path / "st" / "model.safetensors"))
    assert all(f"{name}.input_scale" in tensors for name in plan["layers"])
    from ptq.models.quantized_loader import load_quantized_model
    from ptq.qlinear import QuantLinear

    model, _ = load_quantized_model(tmp_path / "st")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.activation is not None and m.input_scale is not None for m in layers)
