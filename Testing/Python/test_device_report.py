"""The device report is a worker job (mrml/device_report.py): made in a process of its own, cancellable, and it says
which torch the worker sees and whether the extension supports it."""

from __future__ import annotations

import sys

import pytest

from MIADeepLearningLib import versions
from MIADeepLearningLib.engine.errors import CancelledError


def test_device_report_is_made_by_a_worker_process(headless, tmp_path) -> None:
    import numpy
    import torch

    from MIADeepLearningLib.mrml.device_report import start_device_report

    stages = []
    run = start_device_report(sys.executable, jobs_root=tmp_path, on_event=lambda event: stages.append(event.stage))
    assert run.is_running(), "start_device_report must return at once"
    run.wait()
    report = run.finish()
    assert report["torch"] == torch.__version__
    assert report["numpy"] == numpy.__version__
    assert report["torch_minimum"] == versions.dotted(versions.minimum_torch_version(numpy.__version__))
    assert report["torch_problem"] is None
    assert report["auto_choice"] and "cuda_usable" in report
    assert "device" in stages and stages[-1] == "done", stages
    assert list(tmp_path.iterdir()) == [], "the job folder was left behind"


def test_device_report_can_be_cancelled(headless, tmp_path) -> None:
    from MIADeepLearningLib.mrml.device_report import start_device_report

    run = start_device_report(sys.executable, jobs_root=tmp_path)
    run.cancel()
    run.wait()
    with pytest.raises(CancelledError):
        run.finish()
    assert list(tmp_path.iterdir()) == [], "the job folder was left behind"
