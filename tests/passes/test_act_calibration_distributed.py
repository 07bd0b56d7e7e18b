"""Static activation ranges reduced over 2 gloo ranks equal the one-process ranges bit for bit.

The test starts two plain worker processes (this file run as a script, with torchrun's
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set); rank 0 saves what it got.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from ptq.calibration.distributed import DistributedContext
from ptq.passes.act_calibration import ActCalibrationConfig, static_ranges

HERE = Path(__file__).resolve()
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, 97, (7, 12), generator=torch.Generator().manual_seed(1))


def _config(observer: str) -> ActCalibrationConfig:
    return ActCalibrationConfig(observer=observer, batch_size=2)  # type: ignore[arg-type]


def _worker(observer: str, out: Path) -> None:
    ctx = DistributedContext.from_env(timeout_s=60)
    ctx.init()
    got = static_ranges(_model(), NAMES, _tokens(), _config(observer), ctx)
    if ctx.rank == 0:
        torch.save(got, out)
    ctx.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("observer", ["minmax", pytest.param("percentile", marks=pytest.mark.slow)])
def test_two_ranks_match_one_process(observer: str, tmp_path: Path) -> None:
    want = static_ranges(_model(), NAMES, _tokens(), _config(observer))
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, str(HERE), observer, str(tmp_path / "ranges.pt")]
        procs.append(subprocess.Popen(cmd, env=env))
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    got = torch.load(tmp_path / "ranges.pt")
    assert sorted(got) == sorted(want)
    for name in NAMES:
        assert got[name].dtype == want[name].dtype == torch.float32
        assert torch.equal(got[name], want[name]), name


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
