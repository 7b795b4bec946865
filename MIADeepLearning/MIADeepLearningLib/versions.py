"""The oldest Slicer and PyTorch the extension supports, and the one-sentence refusals for older ones. Stdlib only.

Why here: the Slicer side (Apply, before anything is installed or started), the worker (the torch it really finds in
its own process) and the documentation test must all use the same numbers. The Slicer-side API differences between
these versions are bridged in mrml/compat.py.
"""

from __future__ import annotations

import re

MINIMUM_SLICER_VERSION = (5, 8)
"""Slicer 5.8 (Python 3.9) is the oldest release whose APIs mrml/compat.py bridges and whose Python the code targets."""

MINIMUM_TORCH_VERSION = (2, 1)
"""The oldest PyTorch the engine is tested with (see README, "Supported versions")."""


def version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric parts of a version string: "2.8.0+cu126" -> (2, 8, 0), "2.10.0a0" -> (2, 10, 0)."""
    numbers = []
    for part in version.split("+")[0].split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
        if match.group() != part:  # "0a0", "0rc1": the rest is a pre-release tag
            break
    return tuple(numbers)


def dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def torch_requirement() -> str:
    """The requirement handed to the PyTorch extension's installer."""
    return f">={dotted(MINIMUM_TORCH_VERSION)}"


def torch_version_problem(installed: str) -> str | None:
    """One sentence when the installed PyTorch is older than the minimum (or unreadable), else None."""
    found = version_tuple(installed)
    if found and found >= MINIMUM_TORCH_VERSION:
        return None
    return (f"PyTorch {installed} is installed, but MIADeepLearning needs PyTorch {dotted(MINIMUM_TORCH_VERSION)} "
            "or newer. In Slicer, update it in the 'PyTorch Utils' module (uninstall, restart Slicer, install); "
            "elsewhere, install a newer torch in the Python that runs the worker.")


def slicer_version_problem(version: tuple[int, int] | None) -> str | None:
    """One sentence when the running Slicer is older than the minimum; None when it is new enough or unknown."""
    if version is None or tuple(version) >= MINIMUM_SLICER_VERSION:
        return None
    return (f"MIADeepLearning needs 3D Slicer {dotted(MINIMUM_SLICER_VERSION)} or newer; this is Slicer "
            f"{version[0]}.{version[1]}. Install a current Slicer and then the extension again from its Extensions "
            "Manager.")
