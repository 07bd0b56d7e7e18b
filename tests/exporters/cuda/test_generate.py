"""``ptq generate`` on CPU: the packed reference ops reproduce the emulated model."""

from __future__ import annotations

from pathlib import Path

import torch

from ptq.api import quantize
from ptq.exporters.cuda.generate import generate_text, to_packed_ops
from ptq.models.quantized_loader import load_quantized_model


def test_packed_ops_match_emulation_and_generate(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    quantize(tiny_llama, "w4a16", output=out, progress=False, log=lambda *_: None)
    emulated, _ = load_quantized_model(out)
    packed, _ = load_quantized_model(out)
    swapped, kept = to_packed_ops(packed)
    assert swapped == 14 and kept == 0
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = emulated(input_ids=ids).logits, packed(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert (a.argmax(-1) == b.argmax(-1)).all()
    text, n, _ = generate_text(out, "the king", max_new_tokens=5)
    assert n == 14 and isinstance(text, str)


def test_generate_cli_rejects_non_output(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = run_cli("generate", str(tmp_path), "--prompt", "x")
    assert r.exit_code == 2 and "not a ptq output" in r.output
