"""``ptq verify OUT``: re-read an output folder and check it is whole and decodable.

Checks, in order (the first failure ends with one message naming the file or tensor):

1. ``ptq_manifest.json`` (:mod:`ptq.exporters.manifest`): no file missing or extra,
   every size and SHA-256 equal to the manifest's.
2. Every safetensors header re-validated (:class:`ptq.io.SafetensorsIndex`); the set of
   tensors, their dtypes, shapes and files equal to the manifest's.
3. Every tensor read back: floating-point values finite; weights and scales (names
   ending in ``.weight`` or ``scale``) not all zero (biases, zero points, packed codes
   may be).
4. Every layer of ``ptq_plan.json`` decodes from its packed tensors
   (:func:`~ptq.formats.ct_layout.from_compressed_tensors` or
   :func:`~ptq.formats.ptq_layout.from_ptq_layout`) and dequantizes to a finite, not
   all-zero ``[out_features, in_features]`` weight.
5. ``config.json``'s ``quantization_config``: every config-group target exists in the
   weights, and every planned layer is targeted by exactly one group.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import click
import torch

from ptq.errors import PtqError, PtqInputError
from ptq.exporters.manifest import MANIFEST_FILE, read_manifest, sha256_file
from ptq.formats import dequantize
from ptq.formats.ct_layout import ct_format_name, from_compressed_tensors
from ptq.formats.ptq_layout import from_ptq_layout
from ptq.io.safetensors_reader import SafetensorsIndex
from ptq.plan import LayerPlan, QuantPlan

__all__ = ["VerifyReport", "verify", "verify_output"]

_CHUNK: Final = 1 << 22
_FIX: Final = "re-export the model"
_NON_WEIGHT: Final = ("bias", "input_scale", "weight_lorc_u", "weight_lorc_v")


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify_output`` checked."""

    folder: Path
    files: int
    total_bytes: int
    tensors: int
    layers: int
    groups: int

    def summary(self) -> str:
        return (
            f"ok: {self.folder}: {self.files} files ({self.total_bytes / 1e6:.1f} MB) match "
            f"{MANIFEST_FILE}; {self.tensors} tensors finite; {self.layers} quantized layers "
            f"dequantize; {self.groups} config groups target existing layers"
        )


def _fail(where: Path | str, what: str) -> PtqInputError:
    return PtqInputError(f"{where}: {what}; {_FIX}")


def check_files(folder: Path, manifest: dict[str, Any]) -> int:
    """Compare the folder's files with the manifest; return the total bytes."""
    listed: dict[str, dict[str, Any]] = manifest["files"]
    present = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE
    }
    missing = sorted(set(listed) - present)
    if missing:
        raise _fail(folder / missing[0], f"listed in {MANIFEST_FILE} but missing")
    extra = sorted(present - set(listed))
    if extra:
        raise _fail(folder / extra[0], f"not listed in {MANIFEST_FILE} (added after export)")
    for rel, info in sorted(listed.items()):
        path = folder / rel
        size = path.stat().st_size
        if size != info["size"]:
            raise _fail(path, f"size {size} bytes but {MANIFEST_FILE} says {info['size']}")
        if sha256_file(path) != info["sha256"]:
            raise _fail(path, f"sha256 checksum mismatch with {MANIFEST_FILE} (corrupted)")
    return sum(int(info["size"]) for info in listed.values())


def check_tensor_meta(index: SafetensorsIndex, manifest: dict[str, Any]) -> None:
    """Names, dtypes, shapes and files of the tensors equal the manifest's."""
    listed: dict[str, dict[str, Any]] = manifest["tensors"]
    names = set(index)
    for name in sorted(set(listed) - names):
        raise _fail(index.model_dir, f"tensor {name!r} is in {MANIFEST_FILE} but in no shard")
    for name in sorted(names - set(listed)):
        raise _fail(index.model_dir, f"tensor {name!r} is not in {MANIFEST_FILE}")
    for name in sorted(names):
        st = index.file_of(name)
        entry, want = st.entry(name), listed[name]
        got = {"dtype": entry.dtype_name, "shape": list(entry.shape), "file": st.path.name}
        for key in ("file", "dtype", "shape"):
            if got[key] != want[key]:
                raise _fail(
                    st.path, f"tensor {name!r} has {key} {got[key]} but manifest says {want[key]}"
                )


def _must_be_nonzero(name: str) -> bool:
    local = name.rsplit(".", 1)[-1]
    return local == "weight" or (local.endswith("scale") and local not in _NON_WEIGHT)


def _identity_norm_weights(folder: Path, names: list[str]) -> set[str]:
    """Those of ``names`` (all-zero 1-D weights) that are norms applying ``1 + w``
    (Gemma): zero is their identity scale. Decided on the model's module tree built
    from ``config.json`` without weights, by probing each norm (:mod:`ptq.frontend.norms`)."""
    import json

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ptq.frontend.norms import is_norm_module, norm_style
    from ptq.models.checkpoint_names import CheckpointNames

    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        plain = {k: v for k, v in data.items() if k != "quantization_config"}
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**plain))
    except Exception:  # not a transformers model we can build: no exemption
        return set()
    rename = CheckpointNames.of(model)
    out = set()
    for name in names:
        try:
            module = model.get_submodule(rename.to_memory(name).rpartition(".")[0])
        except AttributeError:
            continue
        if is_norm_module(module) and norm_style(module) == "rms_1p":
            out.add(name)
    return out


def _scan_values(t: torch.Tensor) -> tuple[int, int, int]:
    """``(non-finite, nonzero, total)`` element counts of ``t``, chunk by chunk."""
    flat = t.reshape(-1)
    bad = nonzero = 0
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        if chunk.is_floating_point():
            chunk = chunk.to(torch.float32)
            bad += int((~torch.isfinite(chunk)).sum())
        nonzero += int(torch.count_nonzero(chunk))
    return bad, nonzero, flat.numel()


def check_tensor_values(index: SafetensorsIndex) -> None:
    """Every floating tensor finite; weights and scales not all zero (chunked scan), except
    the weights of norms that apply ``1 + w`` (Gemma), for which zero is the identity."""
    zero: list[tuple[str, Path]] = []
    for name in index:
        where = index.file_of(name).path
        # a call, so that no name holds the tensor while the next one is read (an LM
        # head and an embedding in a row would otherwise be 0.8 GB at once)
        bad, nonzero, numel = _scan_values(index.get(name))
        if bad:
            raise _fail(where, f"tensor {name!r} holds {bad} NaN/Inf of {numel} values")
        if nonzero == 0 and _must_be_nonzero(name):
            zero.append((name, where))
    if not zero:
        return
    vectors = [n for n, _ in zero if len(index.shape(n)) == 1]
    allowed = _identity_norm_weights(index.model_dir, vectors) if vectors else set()
    for name, where in zero:
        if name not in allowed:
            raise _fail(where, f"tensor {name!r} is all zeros (a weight or scale must not be)")


def decode_layer(index: SafetensorsIndex, lp: LayerPlan) -> torch.Tensor:
    """Dequantize planned layer ``lp`` from its stored tensors (fp32 ``[out, in]``)."""
    prefix = lp.name + "."
    local = {
        k[len(prefix) :]: index.get(k)
        for k in index.names_with_prefix(prefix)
        if k[len(prefix) :] not in _NON_WEIGHT
    }
    if not local:
        raise _fail(index.model_dir, f"layer {lp.name} is in ptq_plan.json but has no tensors")
    try:
        q = from_compressed_tensors(local, lp.weight) if ct_format_name(lp.weight) else None
        q = q if q is not None else from_ptq_layout(local)
        w = dequantize(q)
    except (KeyError, ValueError, RuntimeError, IndexError) as exc:
        raise _fail(index.model_dir, f"layer {lp.name} cannot be decoded ({exc})") from None
    return w


def check_layers(index: SafetensorsIndex, plan: QuantPlan) -> int:
    """Every planned layer dequantizes to a finite, non-zero weight of the planned shape."""
    for lp in plan:
        w = decode_layer(index, lp)
        want = (lp.out_features, lp.in_features)
        if tuple(w.shape) != want:
            raise _fail(
                index.model_dir, f"layer {lp.name} dequantizes to {list(w.shape)}, not {list(want)}"
            )
        if not bool(torch.isfinite(w).all()):
            raise _fail(index.model_dir, f"layer {lp.name} dequantizes to NaN/Inf values")
        if not bool(w.any()):
            raise _fail(index.model_dir, f"layer {lp.name} dequantizes to all zeros")
    return len(plan.layers)


def check_config_targets(folder: Path, index: SafetensorsIndex, plan: QuantPlan) -> int:
    """Config-group targets exist; each planned layer is in exactly one group."""
    cfg_path = folder / "config.json"
    try:
        qcfg = json.loads(cfg_path.read_text(encoding="utf-8"))["quantization_config"]
        groups: dict[str, Any] = qcfg["config_groups"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _fail(cfg_path, f"no readable quantization_config.config_groups ({exc})") from None
    modules = {n.rsplit(".", 1)[0] for n in index}
    seen: dict[str, str] = {}
    for gname, group in groups.items():
        targets = group.get("targets") if isinstance(group, dict) else None
        if not isinstance(targets, list):
            raise _fail(cfg_path, f"config group {gname!r} has no 'targets' list")
        for target in targets:
            if str(target).startswith("re:"):
                pattern = re.compile(str(target)[3:])
                hits = [m for m in modules if pattern.fullmatch(m)]
            else:
                hits = [target] if target in modules else []
            if not hits:
                raise _fail(cfg_path, f"config group {gname!r} targets {target!r}: no such layer")
            for m in hits:
                if m in seen and seen[m] != gname:
                    raise _fail(cfg_path, f"layer {m} is targeted by {seen[m]!r} and {gname!r}")
                seen[m] = gname
    untargeted = sorted(set(plan.layers) - set(seen))
    if untargeted:
        raise _fail(cfg_path, f"layer {untargeted[0]} is quantized but in no config group")
    return len(groups)


def verify_output(folder: str | Path) -> VerifyReport:
    """Run every check on the output ``folder``.

    Raises:
        PtqInputError: The first failed check, naming the file or tensor.
    """
    path = Path(folder)
    if not path.is_dir():
        raise PtqInputError(f"{path}: not a folder; give a ptq output folder")
    manifest = read_manifest(path)
    total = check_files(path, manifest)
    index = SafetensorsIndex(path)
    check_tensor_meta(index, manifest)
    check_tensor_values(index)
    plan_path = path / "ptq_plan.json"
    try:
        plan = QuantPlan.from_dict(json.loads(plan_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _fail(plan_path, f"not a readable plan ({exc})") from None
    layers = check_layers(index, plan)
    groups = check_config_targets(path, index, plan)
    return VerifyReport(path, len(manifest["files"]), total, len(index), layers, groups)


@click.command("verify")
@click.argument("output", type=click.Path(path_type=Path))
def verify(output: Path) -> None:
    """Check that OUTPUT (a ptq output folder) is complete, uncorrupted and decodable."""
    try:
        report = verify_output(output)
    except PtqError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(report.summary())
