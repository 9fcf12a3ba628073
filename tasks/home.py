"""Where a2k keeps its state: everything lives under A2K_HOME (default ~/.a2k)."""

from __future__ import annotations

import os
from pathlib import Path


def a2k_home() -> Path:
    """The state folder: $A2K_HOME, or ~/.a2k when it is unset."""
    return Path(os.environ.get("A2K_HOME") or Path.home() / ".a2k").expanduser()


def models_dir() -> Path:
    """The local model registry folder."""
    return a2k_home() / "models"


def registry_url() -> str:
    """The default model registry: $A2K_REGISTRY (a folder or s3://bucket/prefix), else $A2K_HOME/models."""
    return os.environ.get("A2K_REGISTRY") or str(models_dir())


def demo_dir() -> Path:
    """Where `a2k demo` writes its dataset and predictions."""
    return a2k_home() / "demo"
