"""Where a2k keeps its state: everything lives under A2K_HOME (default ~/.a2k)."""

from __future__ import annotations

import os
from pathlib import Path


def a2k_home() -> Path:
    """The state folder: $A2K_HOME, or ~/.a2k when it is unset."""
    return Path(os.environ.get("A2K_HOME") or Path.home() / ".a2k").expanduser()


def models_dir() -> Path:
    """The default model store."""
    return a2k_home() / "models"


def demo_dir() -> Path:
    """Where `a2k demo` writes its dataset and predictions."""
    return a2k_home() / "demo"
