"""Run an exported decoder with ONNX Runtime on CPU: logits and greedy generation.

Generation uses the KV cache: one prefill call over the prompt with empty
``past_key_values`` (length 0), then one call per new token feeding back ``present.*``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ptq.errors import PtqInputError


def make_session(
    path: str | Path, threads: int | None = None, dq_accuracy_level: int | None = None
) -> Any:
    """A CPU ``InferenceSession`` with all graph optimizations.

    ORT fuses ``DequantizeLinear(int4) -> MatMul`` into ``MatMulNBits`` with its own
    accuracy level (default 4, int8 activations); ``dq_accuracy_level`` overrides it
    (0 keeps fp32 activations, i.e. exactly the emulation's numerics).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise PtqInputError(f"ONNX model {path} does not exist; create it with `ptq export`")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.log_severity_level = 3
    if dq_accuracy_level is not None:
        so.add_session_config_entry(
            "session.qdq_matmulnbits_accuracy_level", str(dq_accuracy_level)
        )
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def empty_past(session: Any, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length ``past_key_values.*`` feeds (shape [B, KV, 0, D])."""
    feeds = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            _, kv, _, d = inp.shape
            feeds[inp.name] = np.zeros((batch, int(kv), 0, int(d)), dtype=np.float32)
    return feeds


def has_kv_cache(session: Any) -> bool:
    return any(i.name.startswith("past_key_values.") for i in session.get_inputs())


def forward(
    session: Any, ids: np.ndarray, past: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits [B, S, V] for ``ids`` [B, S] and the new cache (empty without a cache)."""
    feeds: dict[str, np.ndarray] = {"input_ids": ids.astype(np.int64)}
    if has_kv_cache(session):
        feeds.update(past if past is not None else empty_past(session, ids.shape[0]))
    names = [o.name for o in session.get_outputs()]
    outs = session.run(names, feeds)
    present = {
        n.replace("present.", "past_key_values."): v
        for n, v in zip(names, outs, strict=True)
        if n.startswith("present.")
    }
    return outs[names.index("logits")], present


def greedy_generate(
    session: Any, prompt_ids: list[int], max_new_tokens: int, eos: int | None = None
) -> list[int]:
    """Greedy decoding; uses the KV cache when the graph has one, else re-runs the prefix."""
    ids = list(prompt_ids)
    new: list[int] = []
    kv = has_kv_cache(session)
    logits, past = forward(session, np.asarray([ids]))
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits[0, -1]))
        new.append(token)
        ids.append(token)
        if eos is not None and token == eos:
            break
        if len(new) == max_new_tokens:
            break
        if kv:
            logits, past = forward(session, np.asarray([[token]]), past)
        else:
            logits, _ = forward(session, np.asarray([ids]))
    return new


def run_onnx(
    onnx_path: str | Path, tokenizer_dir: str | Path, prompt: str, max_new_tokens: int = 32
) -> str:
    """Greedy-generate ``max_new_tokens`` after ``prompt``; returns the new text.

    Raises:
        PtqInputError: Missing model or tokenizer.
    """
    from transformers import AutoTokenizer

    if max_new_tokens < 1:
        raise PtqInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise PtqInputError(f"no tokenizer in {tokenizer_dir}: {exc}") from None
    session = make_session(onnx_path)
    ids = tok(prompt)["input_ids"]
    if not ids:
        raise PtqInputError("the prompt is empty after tokenization")
    new = greedy_generate(session, ids, max_new_tokens, tok.eos_token_id)
    return str(tok.decode(new, skip_special_tokens=True))
