"""The oldest Slicer and PyTorch the extension supports, and the one-sentence refusals for older ones. Stdlib only.

Why here: the Slicer side (Apply, before anything is installed or started), the worker (the torch it really finds in
its own process) and the documentation test must all use the same numbers. The Slicer-side API differences between
these versions are bridged in mrml/compat.py.
"""

from __future__ import annotations

import re

MINIMUM_SLICER_VERSION = (5, 8)
"""Slicer 5.8 (Python 3.9) is the oldest release whose APIs mrml/compat.py bridges and whose Python the code targets."""

MINIMUM_TORCH_VERSION = (2, 2)
"""The oldest PyTorch the engine is tested with (README, "Supported versions"): 2.2.0 with Python 3.9, numpy 1.26.4
and SimpleITK 2.3.1 (Slicer 5.8's), all four shipped models identical to 2.13 voxel for voxel. torch 2.1.2 fails:
its CPU kernels cannot add float32 windows in place into the half-precision stitching buffer."""

MINIMUM_TORCH_VERSION_NUMPY_2 = (2, 3)
"""With numpy 2 (Slicer 5.10 and later ship 2.0.2) torch 2.2 cannot exchange arrays at all ("Numpy is not
available"); 2.3.1 is tested."""


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


def minimum_torch_version(numpy_version: str | None = None) -> tuple[int, ...]:
    """The oldest torch that works beside this numpy (None: numpy unknown, the general minimum)."""
    numpy_major = version_tuple(numpy_version or "")[:1]
    return MINIMUM_TORCH_VERSION_NUMPY_2 if numpy_major and numpy_major[0] >= 2 else MINIMUM_TORCH_VERSION


def torch_requirement(numpy_version: str | None = None) -> str:
    """The requirement handed to the PyTorch extension's installer."""
    return f">={dotted(minimum_torch_version(numpy_version))}"


def torch_version_problem(installed: str, numpy_version: str | None = None) -> str | None:
    """One sentence when the installed PyTorch is older than the minimum for this numpy (or unreadable), else None."""
    minimum = minimum_torch_version(numpy_version)
    found = version_tuple(installed)
    if found and found >= minimum:
        return None
    beside = f" beside numpy {numpy_version}" if minimum != MINIMUM_TORCH_VERSION else ""
    return (f"PyTorch {installed} is installed, but MIADeepLearning needs PyTorch {dotted(minimum)} or newer{beside}. "
            "In Slicer, update it in the 'PyTorch Utils' module (uninstall, restart Slicer, install); elsewhere, "
            "install a newer torch in the Python that runs the worker.")


def slicer_version_problem(version: tuple[int, int] | None) -> str | None:
    """One sentence when the running Slicer is older than the minimum; None when it is new enough or unknown."""
    if version is None or tuple(version) >= MINIMUM_SLICER_VERSION:
        return None
    return (f"MIADeepLearning needs 3D Slicer {dotted(MINIMUM_SLICER_VERSION)} or newer; this is Slicer "
            f"{version[0]}.{version[1]}. Install a current Slicer and then the extension again from its Extensions "
            "Manager.")
