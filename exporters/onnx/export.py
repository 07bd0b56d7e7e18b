"""``export_onnx``: a ptq output folder, an FP model folder or an in-memory model to ONNX.

The graph comes from :func:`ptq.exporters.onnx.decoder.build_decoder`; it is checked
with ``onnx.checker`` and ONNX shape inference, written to a temporary file and renamed
into place (nothing half-written). Models above ~1.8 GB keep their weights in
``<name>.onnx.data`` (ONNX external data). Tokenizer files of a source folder are copied
next to the ``.onnx`` file so that ``run_onnx`` finds them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import onnx
from torch import nn

from ptq.errors import PtqInputError, PtqUsageError
from ptq.exporters.onnx.decoder import build_decoder
from ptq.exporters.onnx.linear import Int8Matmul, LinearOptions, WeightOp

EXTERNAL_DATA_BYTES = 1_800_000_000
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


def load_for_export(source: str | Path) -> tuple[nn.Module, Path]:
    """Load a ptq output (emulated QuantLinears) or a floating-point model folder."""
    from ptq.models.quantized_loader import load_quantized_model
    from ptq.models.source import load_fp_model, resolve_model

    path = Path(source)
    if path.is_dir() and (path / "ptq_plan.json").is_file():
        model, _ = load_quantized_model(path)
        return model, path
    resolved = resolve_model(str(source), quiet=True)
    if resolved.is_quantized:
        raise PtqInputError(
            f"{resolved.path} is quantized but has no ptq_plan.json; only ptq outputs and "
            f"floating-point models can be exported to ONNX"
        )
    model, _ = load_fp_model(resolved)
    return model, resolved.path


def _out_file(out_path: Path) -> Path:
    return out_path if out_path.suffix == ".onnx" else out_path / "model.onnx"


def check_onnx(path: Path) -> None:
    """``onnx.checker`` (full) and strict shape inference; raises on any problem."""
    onnx.checker.check_model(str(path), full_check=True)


def save_model(model: onnx.ModelProto, target: Path) -> None:
    """Check and write ``model`` to ``target`` atomically (external data when large)."""
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    tmp = target.with_name(f".{target.name}.tmp")
    data_name = target.name + ".data"
    external = size > EXTERNAL_DATA_BYTES
    if external:
        onnx.save_model(
            model,
            str(tmp),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name + ".tmp",
        )
    else:
        onnx.save_model(model, str(tmp))
    check_onnx(tmp)
    if external:
        os.replace(tmp.parent / (data_name + ".tmp"), target.parent / data_name)
        # the location recorded in the graph must match the final name
        reloaded = onnx.load(str(tmp), load_external_data=False)
        for t in reloaded.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = data_name
        onnx.save_model(reloaded, str(tmp))
    os.replace(tmp, target)


def export_onnx(
    model_or_output_dir: nn.Module | str | Path,
    out_path: str | Path,
    *,
    weight_op: WeightOp = "matmulnbits",
    accuracy_level: int = 4,
    kv_cache: bool = True,
    int8_matmul: Int8Matmul = "integer",
) -> Path:
    """Export a decoder LM to ONNX and return the ``.onnx`` file written.

    Args:
        model_or_output_dir: A ptq output folder, an FP model (folder, ``.gguf``,
            ``default``) or a transformers model (FP or with ptq ``QuantLinear``).
        out_path: A ``.onnx`` file, or a folder that receives ``model.onnx``.
        weight_op: ``matmulnbits`` or ``dq`` for weight-only integer layers.
        accuracy_level: ``MatMulNBits`` compute type (4 = int8 activations, fastest).
        kv_cache: Export ``past_key_values``/``present`` inputs and outputs.
        int8_matmul: W8A8 layers as ``integer`` (``MatMulInteger``, fast in ORT) or
            ``qdq`` (QuantizeLinear/DequantizeLinear + ``MatMul``, portable).

    Raises:
        PtqUsageError: Bad options or an unsupported architecture/format.
        PtqInputError: The source cannot be loaded.
    """
    try:
        opts = LinearOptions(
            weight_op=weight_op, accuracy_level=accuracy_level, int8_matmul=int8_matmul
        )
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None
    source_dir: Path | None = None
    if isinstance(model_or_output_dir, nn.Module):
        model: Any = model_or_output_dir
    else:
        model, source_dir = load_for_export(model_or_output_dir)
    try:
        proto = build_decoder(model, opts, kv_cache=kv_cache)
    except ValueError as exc:
        raise PtqUsageError(f"cannot export to ONNX: {exc}") from None
    target = _out_file(Path(out_path))
    target.parent.mkdir(parents=True, exist_ok=True)
    save_model(proto, target)
    if source_dir is not None and source_dir.resolve() != target.parent.resolve():
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, target.parent / name)
    return target
