"""The one place for Slicer calls whose availability differs between the oldest supported Slicer and today's.

Why one place: the pytest suite runs on one slicer-core (5.13), so a call that exists only in newer Slicers passes
there and fails for a clinician on Slicer 5.8 (``vtkSegment.GetTerminology`` did exactly that). Every function
here takes the newer path when the running Slicer has it and the older one otherwise;
Testing/Python/test_slicer_compat.py runs both paths, and test_static checks that the version-dependent names below
are used nowhere else in the extension. The minimum versions themselves are in versions.py.

What differs between Slicer 5.8 (Python 3.9) and today (read in Slicer's own source, tags v5.8.0 to main):

- ``vtkSegment.GetTerminology()`` / ``SetTerminology()`` / ``HasTerminology()``: added in 5.10; 5.8 has the
  "TerminologyEntry" tag only, which every version reads and writes (the extension sets terminology through it).
- ``slicer.packaging`` (``pip_ensure``, ``load_requirements``): added in 5.12; older Slicers have
  ``slicer.util.pip_install`` only (gui/dependencies.py asks the user itself there).
- ``slicer.app.majorVersion`` / ``minorVersion``: present in every version (used to refuse an older Slicer).

Imports slicer and vtk only (the mrml layer's rules), so the module files, gui/ and the self-test scenarios can use
it without torch.
"""

from __future__ import annotations

from typing import Any

import slicer
import vtk

from MIADeepLearningLib import versions


def slicer_version() -> tuple[int, int] | None:
    """(major, minor) of the running Slicer application; None without one (headless slicer-core, tests)."""
    app = getattr(slicer, "app", None)
    if app is None:
        return None
    try:
        return int(app.majorVersion), int(app.minorVersion)
    except (AttributeError, TypeError, ValueError):
        return None


def slicer_version_problem() -> str | None:
    """One sentence when the running Slicer is older than versions.MINIMUM_SLICER_VERSION, else None."""
    return versions.slicer_version_problem(slicer_version())


def segment_terminology(segment: Any) -> str:
    """The segment's terminology entry string ("" when it has none).

    ``GetTerminology()`` exists from Slicer 5.10; 5.8 keeps the same string in the "TerminologyEntry" tag, which
    every version still writes, so both paths return the same text.
    """
    if hasattr(segment, "GetTerminology"):
        return segment.GetTerminology() or ""
    value = vtk.reference("")
    if not segment.GetTag(segment.GetTerminologyEntryTagName(), value):
        return ""
    return str(value.get() or "")


def packaging_module() -> Any | None:
    """``slicer.packaging`` when this Slicer has it (5.12 and later: ``pip_ensure`` asks the user and installs only
    what is missing); None on older Slicers, where the caller asks and uses ``slicer.util.pip_install``."""
    try:
        import slicer.packaging as packaging
    except ImportError:
        return None
    if not (hasattr(packaging, "pip_ensure") and hasattr(packaging, "load_requirements")):
        return None
    return packaging
