"""Where the extension's resources and caches live (stdlib only: every layer may use it).

The source tree keeps ``Resources/`` at the repository root, beside ``MIADeepLearning/``; an installed Slicer
extension puts it beside the module scripts (``qt-scripted-modules/Resources``). Both are searched so the same
code finds the model registry in a checkout, in CI and inside Slicer.
"""

from __future__ import annotations

import os
from pathlib import Path

RESOURCES_ENV = "MIADL_RESOURCES_DIR"
CACHE_ENV = "MIADL_CACHE_DIR"

_LIB_DIR = Path(__file__).resolve().parent


def library_parent_dir() -> Path:
    """The folder that contains the MIADeepLearningLib package (what a worker needs on PYTHONPATH)."""
    return _LIB_DIR.parent


def resources_dir() -> Path:
    """The extension's Resources folder: $MIADL_RESOURCES_DIR, the installed layout, or the source tree."""
    override = os.environ.get(RESOURCES_ENV)
    candidates = [Path(override)] if override else []
    candidates += [_LIB_DIR.parent / "Resources", _LIB_DIR.parent.parent / "Resources"]
    for candidate in candidates:
        if (candidate / "Models").is_dir():
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"MIADeepLearning resources not found (searched {searched}).")


def models_dir() -> Path:
    """Built-in model packages and the registry (Resources/Models)."""
    return resources_dir() / "Models"


def cache_dir() -> Path:
    """User cache for downloaded models and job folders: $MIADL_CACHE_DIR or ~/.cache/MIADeepLearning."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "MIADeepLearning"


def models_cache_dir() -> Path:
    """Downloaded and imported model packages (<id>-<version>/) and partial downloads: <cache_dir()>/models."""
    return cache_dir() / "models"
