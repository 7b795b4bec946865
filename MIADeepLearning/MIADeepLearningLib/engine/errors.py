"""Errors a user can act on. Torch-free, so the Slicer side can tell them apart without the engine installed.

The message of each error is one sentence meant for the clinician; tracebacks go to the log, never to the dialog.
"""

from __future__ import annotations

from collections.abc import Sequence


class MIADLError(Exception):
    """Base of the errors whose message is shown to the user as is."""


class InputError(MIADLError):
    """The input image cannot be processed by the chosen model (wrong dimension, empty, non-finite, ...)."""


class ModelError(MIADLError):
    """The model cannot be used: unknown id, missing or tampered weight file, missing package."""


class MissingPackages(ModelError):
    """A model (a bundle's config or transform) needs Python packages that are not installed; `requirements` are
    the pip specs to offer installing (Slicer) or to name (CLI). Here, not in bundles.py, so the Slicer side can
    catch it from a worker's error event without importing torch."""

    def __init__(self, message: str, requirements: Sequence[str] = ()):
        super().__init__(message)
        self.requirements = list(requirements)


class CancelledError(MIADLError):
    """The user cancelled the run; nothing was written or added."""


class WorkerError(MIADLError):
    """The worker process failed (crashed, timed out or reported an error)."""
