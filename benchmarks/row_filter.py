"""``--only`` row selection shared by the benchmark scripts."""

from __future__ import annotations


def selected(only: str, label: str) -> bool:
    """Whether ``label`` matches one of the comma-separated patterns of ``only``.

    A pattern matches as a substring, or, when it ends in ``$``, as the whole label; an
    empty ``only`` selects every row.
    """
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    return not wanted or any(w[:-1] == label if w.endswith("$") else w in label for w in wanted)
