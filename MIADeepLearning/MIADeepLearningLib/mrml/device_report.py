"""The device report as a background job: the worker's "device" task, started and polled like a model run.

Why a worker job: the report needs torch (to ask CUDA), and torch stays out of Slicer's process; importing it takes
seconds to minutes on a cold disk or with a broken CUDA install. Run through the same runner as a model, the module
keeps responding, shows progress and can cancel it, and a hung CUDA driver cannot freeze Slicer.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from MIADeepLearningLib import jobs, runner
from MIADeepLearningLib.mrml.task_run import EventCallback, TaskRun

DEFAULT_TIMEOUT_S = 300.0
"""Generous: the first torch import after an install can take minutes; Cancel is there for the impatient."""


class DeviceReportRun(TaskRun):
    """A started device report (see TaskRun); finish() returns the report (a dict of plain values)."""

    def _import(self, result: dict[str, Any]) -> dict[str, Any]:
        return dict(result["report"])


def start_device_report(python_executable: str | None = None, jobs_root: str | Path | None = None,
                        timeout_s: float | None = DEFAULT_TIMEOUT_S,
                        on_event: EventCallback | None = None) -> DeviceReportRun:
    """Start the report in a worker process of its own and return at once (poll it, then finish())."""
    started_at = time.perf_counter()
    if jobs_root:
        Path(jobs_root).mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="miadl-job-", dir=jobs_root)
    try:
        job = jobs.Job(task="device", model="", inputs={}, folder=folder)
        worker = runner.start(job, python_executable=python_executable, on_event=on_event, timeout_s=timeout_s)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return DeviceReportRun(worker, None, None, started_at, 0.0)

