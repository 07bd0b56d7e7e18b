"""End-to-end CLI on a tiny model, and one clear error (exit 2) for each bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

Run = Callable[..., object]


def test_quantize_then_eval(
    run_cli: Run, tiny_llama: Path, text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "q"
    r = run_cli(
        "quantize",
        str(tiny_llama),
        "--w4a16",
        "-o",
        str(out),
        "-q",
        "--eval",
        "--eval-text",
        str(text_file),
        "--eval-tokens",
        "600",
        "--seqlen",
        "100",
    )
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    assert "FP perplexity" in r.output and "quantized perplexity" in r.output  # type: ignore[attr-defined]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = {g["weights"]["group_size"] for g in qc["config_groups"].values()}
    assert groups == {64}
    r2 = run_cli(
        "eval", str(out), "--text", str(text_file), "--eval-tokens", "600", "--seqlen", "100", "-q"
    )
    assert r2.exit_code == 0, r2.output  # type: ignore[attr-defined]
    q_line = next(ln for ln in r.output.splitlines() if ln.startswith("quantized perplexity"))  # type: ignore[attr-defined]
    assert q_line.split()[2] == r2.output.split()[1]  # type: ignore[attr-defined]


def _fails(r: object, *needles: str) -> None:
    assert r.exit_code == 2, r.output  # type: ignore[attr-defined]
    assert "Traceback" not in r.output  # type: ignore[attr-defined]
    for n in needles:
        assert n in r.output, r.output  # type: ignore[attr-defined]


def test_missing_model_path(run_cli: Run, tmp_path: Path) -> None:
    _fails(
        run_cli("quantize", str(tmp_path / "nope"), "--w4a16", "-o", str(tmp_path / "o")),
        "does not exist",
    )
    assert not (tmp_path / "o").exists()


def test_folder_that_is_not_a_model(run_cli: Run, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    _fails(
        run_cli("quantize", str(tmp_path / "m"), "--w4a16", "-o", str(tmp_path / "o")),
        "config.json is missing",
    )


def test_corrupt_safetensors(run_cli: Run, tiny_llama: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(run_cli("quantize", str(bad), "--w4a16", "-o", str(tmp_path / "o")), "model.safetensors")
    assert not (tmp_path / "o").exists()


def test_unknown_scheme_and_method(run_cli: Run, tiny_llama: Path, tmp_path: Path) -> None:
    _fails(
        run_cli("quantize", str(tiny_llama), "--scheme", "w3a3", "-o", str(tmp_path / "o")),
        "unknown scheme",
        "w4a8",
    )
    _fails(
        run_cli(
            "quantize", str(tiny_llama), "--w4a16", "--method", "magic", "-o", str(tmp_path / "o")
        ),
        "unknown method",
    )
    _fails(run_cli("quantize", str(tiny_llama), "-o", str(tmp_path / "o")), "choose a scheme")


def test_bad_group_size_names_layers(run_cli: Run, tiny_llama: Path, tmp_path: Path) -> None:
    _fails(
        run_cli(
            "quantize", str(tiny_llama), "--w4a16", "--group-size", "128", "-o", str(tmp_path / "o")
        ),
        "q_proj",
        "group size 128",
    )


def test_existing_output_needs_overwrite(run_cli: Run, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    _fails(run_cli("quantize", str(tiny_llama), "--w4a16", "-o", str(out), "-q"), "--overwrite")
    assert (out / "keep.txt").exists()
    r = run_cli("quantize", str(tiny_llama), "--w4a16", "-o", str(out), "-q", "--overwrite")
    assert r.exit_code == 0 and not (out / "keep.txt").exists()  # type: ignore[attr-defined]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_midway_leaves_no_partial_output(
    run_cli: Run, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ptq.exporters.shard_writer import ShardFiles

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("crash while writing (injected)")

    monkeypatch.setattr(ShardFiles, "write_shard", boom)
    with pytest.raises(RuntimeError, match="injected"):
        run_cli("quantize", str(tiny_llama), "--w4a16", "-o", str(tmp_path / "o"), "-q")
    # no output, no half-written folder: only the hidden work folder a rerun resumes from
    assert [p.name for p in tmp_path.iterdir()] == [".o.work"]
    monkeypatch.undo()
    r = run_cli("quantize", str(tiny_llama), "--w4a16", "-o", str(tmp_path / "o"), "-q")
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_plan_command(run_cli: Run, tiny_llama: Path) -> None:
    r = run_cli("plan", str(tiny_llama), "--w4a8")
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    assert "model.layers.0.self_attn.q_proj" in r.output and "lm_head" in r.output  # type: ignore[attr-defined]
    assert "14 quantized, 2 skipped" in r.output  # type: ignore[attr-defined]


def test_quantize_with_lorc_kv_cache_smoothquant(
    run_cli: Run, tiny_llama: Path, text_file: Path, tmp_path: Path
) -> None:
    """The pass options of `ptq quantize` compose end to end: LoRC factors and KV-cache
    scales land in the safetensors (this command crashed before the options were tested)."""
    from safetensors import safe_open

    out = tmp_path / "q"
    r = run_cli(
        "quantize",
        str(tiny_llama),
        "--w4a8",
        "--smoothquant",
        "0.5",
        "--lorc",
        "4",
        "--kv-cache",
        "fp8_e4m3",
        "--target",  # LoRC is refused for vLLM (the default target); ptq applies it
        "ptq",
        "--calib",
        str(text_file),
        "--calib-samples",
        "4",
        "--calib-seqlen",
        "32",
        "-o",
        str(out),
        "-q",
    )
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.endswith("weight_lorc_u") for k in keys)
    assert any(k.endswith("weight_lorc_v") for k in keys)
    assert any(k.endswith("k_scale") for k in keys) and any(k.endswith("v_scale") for k in keys)


def test_quantize_with_budget_mixes_formats(
    run_cli: Run, tiny_llama: Path, text_file: Path, tmp_path: Path
) -> None:
    """`--budget` runs the allocation before the weight pass (it was once parsed and then
    ignored): the export holds more than one weight format, within the budget, and a size
    budget with a latency cap is solved as one program."""
    common = [
        "--candidates", "int8_channel,int4_g32,fp16", "--estimator", "hessian",
        "--calib", str(text_file), "--calib-samples", "2", "--calib-seqlen", "32", "-q",
    ]  # fmt: skip
    out = tmp_path / "q"
    r = run_cli("quantize", str(tiny_llama), "--budget", "6bits", *common, "-o", str(out))
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    assert "allocation (ilp, optimal)" in r.output  # type: ignore[attr-defined]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    kinds = {
        (g["weights"]["num_bits"], g["weights"]["strategy"]) for g in qc["config_groups"].values()
    }
    assert len(kinds) >= 2, kinds
    line = next(ln for ln in r.output.splitlines() if ln.startswith("allocation"))  # type: ignore[attr-defined]
    assert float(line.split("): ")[1].split()[0]) <= 6.0
    capped = tmp_path / "capped"
    r = run_cli(
        "quantize", str(tiny_llama), "--budget", "6bits", "--budget-latency", "1s",
        "--kernel-efficiency", "h200-ptq-fp16", *common, "-o", str(capped),
    )  # fmt: skip
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    assert "modelled" in r.output  # type: ignore[attr-defined]
    r = run_cli(
        "quantize", str(tiny_llama), "--budget", "6bits", "--budget-latency", "1e-12s",
        *common, "-o", str(tmp_path / "never"),
    )  # fmt: skip
    _fails(r, "infeasible")
    assert not (tmp_path / "never").exists()
    r = run_cli("quantize", str(tiny_llama), "--budget", "6bits", "--lorc", "4", *common,
                "-o", str(tmp_path / "lorc"))  # fmt: skip
    _fails(r, "+lorc")


def test_method_options_reach_the_pass(run_cli: Run, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    r = run_cli(
        "quantize", str(tiny_llama), "--w4a16", "--method", "adaquant", "--iterations", "3",
        "--method-option", "input_rows=32", "--method-option", "lr_weight=1e-4",
        "-o", str(out), "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    records = json.loads((out / "ptq_records.json").read_text())["layers"]
    assert records and all(rec["method"] == "adaquant" for rec in records.values())
    assert all("kept_start" in rec for rec in records.values())


def test_bad_method_options(run_cli: Run, tiny_llama: Path, tmp_path: Path) -> None:
    def quantize(*extra: str) -> object:
        return run_cli("quantize", str(tiny_llama), "--w4a16", *extra, "-o", str(tmp_path / "o"))

    _fails(
        quantize("--method", "adaquant", "--method-option", "lr=1"),
        "unknown option(s) ['lr']",
        "lr_weight",
    )
    _fails(quantize("--method", "gptq", "--method-option", "act_order=maybe"), "act_order")
    _fails(
        quantize("--method", "gptq", "--percdamp", "0.1", "--method-option", "percdamp=0.2"),
        "percdamp given both",
    )
    assert not (tmp_path / "o").exists()


def test_device_errors_are_one_line(run_cli: Run, tiny_llama: Path, tmp_path: Path) -> None:
    """--device cuda where there is none, or a misspelt device: an error line, exit 2."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error is for machines without it")
    for dev, msg in (("cuda", "no CUDA device"), ("tpu", "choose auto, cpu, cuda or cuda:N")):
        r = run_cli(
            "quantize", str(tiny_llama), "--w4a16", "--device", dev, "-o", str(tmp_path / "o")
        )
        assert r.exit_code == 2, r.output  # type: ignore[attr-defined]
        assert msg in r.output  # type: ignore[attr-defined]
    assert not (tmp_path / "o").exists()
