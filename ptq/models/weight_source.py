"""Where the runner's weights come from: a model in memory, or safetensors read lazily.

The block-wise runner (:mod:`ptq.calibration.runner`) sees a model as its *outer* part
(embeddings, final norm, head: every parameter not inside the repeated blocks) and its
blocks, and asks a :class:`WeightSource` to make one of them real at a time:

* :class:`InMemorySource` wraps an ``nn.Module`` whose weights are already loaded (the
  Python API); loading only moves a part to the run's device and back.
* :class:`LazySource` builds the module tree on the ``meta`` device (no weights) and
  reads a part's tensors from the safetensors shards when it is loaded, in fp32, onto
  the device; releasing puts the part back on ``meta``. Peak memory is one part.

Tied parameters (an LM head sharing the embedding matrix) are read from whichever name
the checkpoint stores; a pass that unties them (rotation) keeps reading the stored
tensor for both. An *overlay* folder of safetensors, when set, takes precedence over the
checkpoint for the outer part: the runner keeps outer weights that a pass changed
before the blocks there (the rotated embedding), so they survive being released.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq.errors import PtqInputError
from ptq.frontend.blocks import find_blocks
from ptq.io.safetensors_reader import SafetensorsFile, SafetensorsIndex

OVERLAY_FILE = "outer.safetensors"


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    return (root.get_submodule(mod_name) if mod_name else root), attr


def move_module(module: nn.Module, device: torch.device) -> None:
    """``module.to(device)``, quantized weights (``qweight`` QTensors) included."""
    module.to(device)
    for m in module.modules():
        q = getattr(m, "qweight", None)
        if q is not None and dataclasses.is_dataclass(q) and not isinstance(q, type):
            moved = {
                f.name: getattr(q, f.name).to(device)
                for f in dataclasses.fields(q)
                if isinstance(getattr(q, f.name), torch.Tensor)
            }
            setattr(m, "qweight", dataclasses.replace(q, **moved))  # noqa: B010


class WeightSource:
    """Base: the module tree and the split into blocks and outer part.

    Attributes:
        model: The module tree passes see (real in memory, a meta skeleton when lazy).
        block_path: Dotted path of the blocks' ``ModuleList`` (None: no repeated blocks,
            the whole model is one unit).
        device: Where loaded parts live.
    """

    lazy: bool = False

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        found = find_blocks(model)
        self.block_path: str | None = found[0] if found is not None else None
        self.blocks: nn.ModuleList | None = found[1] if found is not None else None

    @property
    def n_blocks(self) -> int:
        return 0 if self.blocks is None else len(self.blocks)

    def block_prefix(self, i: int) -> str:
        assert self.block_path is not None
        return f"{self.block_path}.{i}."

    def outer_names(self) -> list[str]:
        """State-dict names outside the blocks (tied aliases once, under the first name)."""
        prefix = f"{self.block_path}." if self.block_path else None
        seen: set[int] = set()
        out = []
        for name, t in self.model.state_dict(keep_vars=True).items():
            if prefix is not None and name.startswith(prefix):
                continue
            if id(t) in seen:
                continue
            seen.add(id(t))
            out.append(name)
        return out

    def load_block(self, i: int) -> nn.Module:
        """Make block ``i`` real on the device and return it."""
        raise NotImplementedError

    def release_block(self, i: int) -> None:
        """Drop block ``i``'s weights (lazy) or move it back to the CPU (in memory)."""
        raise NotImplementedError

    def load_outer(self, *, original: bool = False) -> None:
        """Make the outer part real on the device (``original``: as stored, no overlay)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def outer_on_demand(self, *, original: bool = False, embeddings: bool = True) -> Iterator[None]:
        """The outer part, loaded as far as the code inside uses it (default: all of it).

        ``embeddings=False``: the input embeddings load only if the code inside runs them
        (a forward given ``inputs_embeds`` does not)."""
        self.load_outer(original=original)
        yield

    def load_modules(self, names: list[str], *, original: bool = False) -> None:
        """Make the outer modules ``names`` real now (inside :meth:`outer_on_demand`)."""

    def release_outer(self) -> None:
        """Drop the outer part's weights (lazy) or move it back to the CPU (in memory)."""
        raise NotImplementedError

    def set_overlay(self, folder: Path | None) -> None:
        """Outer tensors saved in ``folder/outer.safetensors`` override the checkpoint."""

    def stored(self, name: str) -> torch.Tensor:
        """Outer tensor ``name`` as it will be written: from the overlay or the source."""
        raise NotImplementedError

    def current(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as the module tree holds it now (must be loaded)."""
        owner, attr = _owner(self.model, name)
        t = getattr(owner, attr)
        assert isinstance(t, torch.Tensor)
        return t.detach()


def _named_tensors(model: nn.Module, recurse: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False, recurse=recurse)
    yield from model.named_buffers(remove_duplicate=False, recurse=recurse)


class InMemorySource(WeightSource):
    """A loaded model; parts move to the device while they are worked on."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu") -> None:
        super().__init__(model, torch.device(device))
        self._home = next((p.device for p in model.parameters()), torch.device("cpu"))

    def load_block(self, i: int) -> nn.Module:
        assert self.blocks is not None
        if self.device != self._home:
            move_module(self.blocks[i], self.device)
        return self.blocks[i]

    def release_block(self, i: int) -> None:
        assert self.blocks is not None
        if self.device != self._home:
            move_module(self.blocks[i], self._home)

    def load_outer(self, *, original: bool = False) -> None:
        if original:
            raise ValueError("an in-memory model keeps no copy of its original weights")
        if self.device != self._home:
            _move_outer(self.model, self.block_path, self.device)

    def release_outer(self) -> None:
        if self.device != self._home:
            _move_outer(self.model, self.block_path, self._home)

    def stored(self, name: str) -> torch.Tensor:
        return self.current(name)


def _move_outer(model: nn.Module, block_path: str | None, device: torch.device) -> None:
    prefix = f"{block_path}." if block_path else None
    for name, t in list(_named_tensors(model)):
        if prefix is not None and name.startswith(prefix):
            continue
        owner, attr = _owner(model, name)
        if t.device != device:
            _assign(owner, attr, t.detach().to(device), isinstance(t, nn.Parameter))


def _assign(owner: nn.Module, attr: str, value: torch.Tensor, parameter: bool) -> None:
    if parameter:
        setattr(owner, attr, nn.Parameter(value, requires_grad=False))
    else:
        owner._buffers[attr] = value


class LazySource(WeightSource):
    """A model folder read part by part from its safetensors shards.

    Args:
        path: The Hugging Face folder (config.json + safetensors).
        model: The meta skeleton (:func:`ptq.models.source.build_skeleton`).
        device: Where loaded parts live.
        dtype: What floating-point weights are cast to when loaded (None: as stored).
    """

    lazy = True

    def __init__(
        self,
        path: Path,
        model: nn.Module,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__(model, torch.device(device))
        self.dtype = dtype
        self.index = SafetensorsIndex(path)
        self.path = path
        self._overlay: SafetensorsFile | None = None
        self._stored_name = self._stored_names()
        self._pristine = [copy.deepcopy(b) for b in self.blocks] if self.blocks is not None else []
        missing = [n for n, s in self._stored_name.items() if s is None and _is_param(model, n)]
        if missing:
            raise PtqInputError(
                f"{path}: the checkpoint lacks {len(missing)} weight(s) the model needs, "
                f"e.g. {', '.join(missing[:3])}; re-download or re-convert it"
            )

    def _stored_names(self) -> dict[str, str | None]:
        """For every tensor name: the checkpoint name holding it (tied aliases share one;
        transformers' renamings applied, :mod:`ptq.models.checkpoint_names`)."""
        from ptq.models.checkpoint_names import CheckpointNames

        rename = CheckpointNames.of(self.model)
        on_disk = {rename.to_memory(k): k for k in self.index}
        groups: dict[int, list[str]] = {}
        for name, t in _named_tensors(self.model):
            groups.setdefault(id(t), []).append(name)
        out: dict[str, str | None] = {}
        for names in groups.values():
            stored = next((on_disk[n] for n in names if n in on_disk), None)
            for n in names:
                out[n] = stored
        return out

    def set_overlay(self, folder: Path | None) -> None:
        path = None if folder is None else folder / OVERLAY_FILE
        self._overlay = SafetensorsFile(path) if path is not None and path.is_file() else None

    def _read(self, name: str, *, original: bool = False) -> torch.Tensor | None:
        if not original and self._overlay is not None and name in self._overlay:
            return self._overlay.get(name)
        stored = self._stored_name.get(name)
        return None if stored is None else self.index.get(stored)

    def stored(self, name: str) -> torch.Tensor:
        t = self._read(name)
        if t is None:
            raise PtqInputError(f"{self.path}: no tensor {name!r} in the checkpoint")
        return t

    def stored_dtype(self) -> torch.dtype:
        """The checkpoint's floating-point dtype (its first floating tensor's)."""
        for name in self.index:
            dtype = self.index.dtype(name)
            if dtype.is_floating_point:
                return dtype
        return torch.float32

    def _groups(self, names: set[str]) -> list[list[str]]:
        """Alias groups (one tensor object, several names) touching ``names``."""
        by_id: dict[int, list[str]] = {}
        for name, t in _named_tensors(self.model):
            by_id.setdefault(id(t), []).append(name)
        return [g for g in by_id.values() if any(n in names for n in g)]

    def _outer_names(self) -> set[str]:
        inside = f"{self.block_path}." if self.block_path else None
        return {
            n for n, _ in _named_tensors(self.model) if inside is None or not n.startswith(inside)
        }

    def _load(self, names: set[str], *, original: bool = False) -> None:
        """Load the meta tensors among ``names`` (and their tied aliases) onto the device."""
        for group in self._groups(names):
            owner, attr = _owner(self.model, group[0])
            t = getattr(owner, attr)
            if t.device.type != "meta":
                continue
            value = next(
                (v for v in (self._read(n, original=original) for n in group) if v is not None),
                None,
            )
            if value is None:
                raise PtqInputError(f"{self.path}: no tensor for {group[0]} in the checkpoint")
            if tuple(value.shape) != tuple(t.shape):
                raise PtqInputError(
                    f"{self.path}: tensor {group[0]} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(t.shape)}"
                )
            if value.is_floating_point() and self.dtype is not None:
                value = value.to(self.dtype)
            self._assign_all(group, value.to(self.device), isinstance(t, nn.Parameter))

    def _assign_all(self, names: list[str], value: torch.Tensor, parameter: bool) -> None:
        shared = nn.Parameter(value, requires_grad=False) if parameter else value
        for name in names:
            owner, attr = _owner(self.model, name)
            if parameter:
                setattr(owner, attr, shared)
            else:
                owner._buffers[attr] = shared

    def load_block(self, i: int) -> nn.Module:
        assert self.blocks is not None
        prefix = self.block_prefix(i)
        self._load({prefix + n for n, _ in _named_tensors(self.blocks[i])})
        return self.blocks[i]

    def release_block(self, i: int) -> None:
        assert self.blocks is not None
        self.blocks[i] = copy.deepcopy(self._pristine[i])

    def load_outer(self, *, original: bool = False) -> None:
        self._load(self._outer_names(), original=original)

    @contextlib.contextmanager
    def outer_on_demand(self, *, original: bool = False, embeddings: bool = True) -> Iterator[None]:
        """Load the input embeddings now (``embeddings=False``: when they first run) and
        every other outer module when it first runs (the forward up to block 0 never
        touches the head, which stays unloaded)."""
        emb = getattr(self.model, "get_input_embeddings", None)
        module = emb() if callable(emb) else None
        names = {n for n, m in self.model.named_modules() if m is module}
        if module is None or not names:
            self.load_outer(original=original)
            yield
            return
        if embeddings:
            name = next(iter(names))
            self._load({f"{name}.{n}" for n, _ in _named_tensors(module)}, original=original)
        outer = self._outer_names()
        handles = []
        for mod_name, mod in self.model.named_modules():
            own = {f"{mod_name}.{n}" if mod_name else n for n, _ in _named_tensors(mod, False)}
            if own and own <= outer:

                def hook(_m: nn.Module, _a: Any, _own: set[str] = own) -> None:
                    self._load(_own, original=original)

                handles.append(mod.register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def load_modules(self, names: list[str], *, original: bool = False) -> None:
        wanted = set()
        for name in names:
            module = self.model.get_submodule(name)
            wanted |= {f"{name}.{n}" for n, _ in _named_tensors(module)}
        if wanted:
            self._load(wanted, original=original)

    def release_outer(self) -> None:
        outer = self._outer_names()
        for group in self._groups(outer):
            owner, attr = _owner(self.model, group[0])
            t = getattr(owner, attr)
            if t.device.type == "meta" or all(self._stored_name.get(n) is None for n in group):
                continue
            meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
            self._assign_all(group, meta, isinstance(t, nn.Parameter))


def _is_param(model: nn.Module, name: str) -> bool:
    owner, attr = _owner(model, name)
    return attr in owner._parameters
