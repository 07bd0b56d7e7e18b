"""Keep paths named by input files or options inside the directory they belong to."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from ptq.errors import PtqInputError

__all__ = ["safe_output_path"]


def safe_output_path(root: str | os.PathLike[str], relative: str | os.PathLike[str]) -> Path:
    """Join ``relative`` onto ``root``, refusing any result outside ``root``.

    A path is refused if it is empty, absolute (POSIX or Windows style), contains a
    ``..`` component or a NUL byte, or if resolving symlinks (those that exist now)
    takes it outside ``root``.

    Args:
        root: The directory the path must stay in (it need not exist yet).
        relative: The path relative to ``root``, e.g. a shard name or an output name.

    Returns:
        The resolved path, inside the resolved ``root``.

    Raises:
        PtqInputError: If the path escapes ``root``.
    """
    rel = os.fspath(relative)
    fix = "use a plain relative path inside the output/model directory"
    if not rel or "\x00" in rel:
        raise PtqInputError(f"path {rel!r} is empty or holds a NUL byte; {fix}")
    if (
        PurePosixPath(rel).is_absolute()
        or PureWindowsPath(rel).is_absolute()
        or (PureWindowsPath(rel).drive)
    ):
        raise PtqInputError(f"path {rel!r} is absolute; {fix}")
    parts = set(PurePosixPath(rel).parts) | set(PureWindowsPath(rel).parts)
    if ".." in parts:
        raise PtqInputError(f"path {rel!r} climbs out with '..'; {fix}")
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise PtqInputError(
            f"path {rel!r} resolves to {target}, outside {base} (a symlink points out); {fix}"
        )
    return target
