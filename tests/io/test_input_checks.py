"""Config-vs-weights, finite weights, pickle refusal and safe output paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ptq.errors import PtqError, PtqInputError, PtqUsageError
from ptq.io.checks import (
    check_config_matches_weights,
    check_finite_weights,
    refuse_pickle,
    safe_output_path,
)
from ptq.io.safetensors_reader import SafetensorsIndex

CONFIG: dict[str, Any] = {
    "hidden_size": 8,
    "num_hidden_layers": 2,
    "vocab_size": 16,
    "tie_word_embeddings": True,
}


def _llama_dir(root: Path, layers: int = 2, hidden: int = 8, vocab: int = 16) -> SafetensorsIndex:
    tensors = {"model.embed_tokens.weight": torch.zeros(vocab, hidden)}
    for i in range(layers):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.zeros(hidden, hidden)
    save_file(tensors, str(root / "model.safetensors"))
    return SafetensorsIndex(root)


def test_errors_hierarchy() -> None:
    assert issubclass(PtqInputError, PtqError) and issubclass(PtqUsageError, PtqError)
    assert not issubclass(PtqInputError, PtqUsageError)


def test_matching_config_passes(tmp_path: Path) -> None:
    check_config_matches_weights(CONFIG, _llama_dir(tmp_path))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": 12}, r"'model\.embed_tokens\.weight'.*hidden_size=12"),
        ({"vocab_size": 17}, r"'model\.embed_tokens\.weight'.*vocab_size=17"),
        ({"num_hidden_layers": 3}, r"num_hidden_layers=3.*\[2\] are missing"),
        ({"num_hidden_layers": 1}, r"\[1\] are extra"),
        ({"tie_word_embeddings": False}, "no lm_head.weight"),
        ({"hidden_size": "8"}, "hidden_size = '8' is not a positive integer"),
    ],
)
def test_mismatching_config_names_tensor(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(PtqInputError, match=message):
        check_config_matches_weights({**CONFIG, **change}, _llama_dir(tmp_path))


def test_wrong_q_proj_and_lm_head(tmp_path: Path) -> None:
    save_file(
        {
            "model.embed_tokens.weight": torch.zeros(16, 8),
            "model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 6),
            "lm_head.weight": torch.zeros(16, 8),
        },
        str(tmp_path / "model.safetensors"),
    )
    cfg = {**CONFIG, "num_hidden_layers": 1, "tie_word_embeddings": False}
    with pytest.raises(PtqInputError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight'"):
        check_config_matches_weights(cfg, SafetensorsIndex(tmp_path))


def test_finite_weights() -> None:
    check_finite_weights("ok", torch.randn(10))
    check_finite_weights("ints", torch.arange(5))
    bad = torch.zeros(3, 4, dtype=torch.bfloat16)
    bad[0, 0], bad[1, 1], bad[2, 2] = float("nan"), float("inf"), -float("inf")
    with pytest.raises(PtqInputError, match=r"'layers\.0\.w': 1 NaN and 2 Inf of 12"):
        check_finite_weights("layers.0.w", bad)
    fp8 = torch.full((5,), float("nan")).to(torch.float8_e4m3fn)
    with pytest.raises(PtqInputError, match="5 NaN"):
        check_finite_weights("fp8", fp8)


def test_refuse_pickle(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    with pytest.raises(PtqInputError, match="--allow-pickle"):
        refuse_pickle(path, allow_pickle=False)
    loaded = refuse_pickle(path, allow_pickle=True)
    assert torch.equal(loaded["w"], state["w"])
    torch.save({"state_dict": state}, tmp_path / "wrapped.ckpt")
    assert torch.equal(refuse_pickle(tmp_path / "wrapped.ckpt", True)["w"], state["w"])
    with pytest.raises(PtqInputError, match="not a pickle checkpoint"):
        refuse_pickle(tmp_path / "model.safetensors", allow_pickle=True)


class _Evil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"w": _Evil()}, path)
    with pytest.raises(PtqInputError, match=r"evil\.pt: torch\.load\(weights_only=True\) refused"):
        refuse_pickle(path, allow_pickle=True)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip nor a pickle")
    with pytest.raises(PtqInputError, match=r"junk\.pth"):
        refuse_pickle(junk, allow_pickle=True)
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(PtqInputError, match="not a dict of name -> tensor"):
        refuse_pickle(tmp_path / "list.pt", allow_pickle=True)


def test_safe_output_path(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    assert safe_output_path(root, "a/b.safetensors") == root.resolve() / "a" / "b.safetensors"
    for bad in ["../x", "/etc/passwd", "a/../../x", "", "a\x00b", "C:\\x", "..\\x"]:
        with pytest.raises(PtqInputError):
            safe_output_path(root, bad)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(PtqInputError, match="outside"):
        safe_output_path(root, "link/x.bin")
    (root / "inner").mkdir()
    (root / "ok").symlink_to(root / "inner")
    assert safe_output_path(root, "ok/x") == (root / "inner" / "x").resolve()
