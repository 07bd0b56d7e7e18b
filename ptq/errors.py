"""Exception types that the CLI maps to exit codes.

``PtqError`` is the base of every error ptq raises on purpose. The CLI prints its
message (one line that names the file, layer or option and the fix) and exits with
code 2 instead of showing a traceback (docs/invariants.md, invariant 6).
"""

from __future__ import annotations

__all__ = ["PtqError", "PtqInputError", "PtqPassError", "PtqUsageError"]


class PtqError(Exception):
    """Base class of every deliberate ptq error."""


class PtqInputError(PtqError):
    """Bad user input: a missing, corrupt or hostile file, config or calibration set."""


class PtqUsageError(PtqError):
    """Bad options: an unknown flag value or a combination that cannot work."""


class PtqPassError(PtqError, ValueError):
    """A pass cannot work on this model (its message names the module or op); raised
    before any weight is loaded, from the pass's ``prepare``."""
