"""Importing a model package as a background job: the worker's "import" task, started and polled like a model run.

Why a worker job: checking a MONAI bundle at import (its configs build, its network is made and its weights load
into it, its segment names are found by running its postprocessing) needs torch and MONAI, which stay out of
Slicer's process; a large bundle also takes seconds to check, and Slicer keeps responding meanwhile. The user has
already confirmed (in the module, after seeing `model_store.describe_package`) that the package's code may run.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from MIADeepLearningLib import jobs, runner
from MIADeepLearningLib.mrml.task_run import EventCallback, TaskRun

DEFAULT_TIMEOUT_S = 600.0
"""A large bundle (80 M parameters) takes tens of seconds to build on a CPU, plus the first torch import."""


class ModelImportRun(TaskRun):
    """A started import (see TaskRun); finish() returns the imported model's summary (a dict of plain values)."""

    def _import(self, result: dict[str, Any]) -> dict[str, Any]:
        return dict(result["model"])


def start_model_import(package: str | Path, replace: bool = False, python_executable: str | None = None,
                       jobs_root: str | Path | None = None, timeout_s: float | None = DEFAULT_TIMEOUT_S,
                       on_event: EventCallback | None = None) -> ModelImportRun:
    """Start checking and importing `package` (a .zip or a folder) in a worker process of its own; the code of the
    package may run there (the caller asked the user first). `replace` swaps an imported model of the same id."""
    started_at = time.perf_counter()
    if jobs_root:
        Path(jobs_root).mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="miadl-job-", dir=jobs_root)
    try:
        job = jobs.Job(task="import", model="", inputs={"package": str(Path(package).expanduser())}, folder=folder,
                       options={"trust_code": True, "replace": bool(replace)})
        worker = runner.start(job, python_executable=python_executable, on_event=on_event, timeout_s=timeout_s)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return ModelImportRun(worker, None, None, started_at, 0.0)
