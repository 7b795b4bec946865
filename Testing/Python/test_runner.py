"""The worker protocol and the runner, with real worker subprocesses: events, results, errors, crashes, time
limits and cancel (the whole process tree dies and no output is left behind)."""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import SHIPPED_IDS, process_gone, wait_until

from MIADeepLearningLib import jobs, runner, worker
from MIADeepLearningLib.testing import sample_data

posix_only = pytest.mark.skipif(os.name != "posix", reason="process groups and /proc are POSIX/Linux")
STAGE_ORDER = ["start", "load_model", "read_input", "inference", "postprocess", "write", "done"]


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message[:-1]


@pytest.fixture
def phantom_file(tmp_path):
    """A small synthetic head: enough for the worker to reach its inference stage quickly."""
    image = sitk.GetImageFromArray(sample_data.phantom_head((40, 48, 44)))
    image.SetSpacing((1.2, 1.2, 1.2))
    path = tmp_path / "phantom.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def _job(tmp_path: Path, image: Path, model: str = "deepbet", task: str = "segment") -> jobs.Job:
    return jobs.Job(task=task, model=model, inputs={"image": str(image)}, folder=str(tmp_path / "job"),
                    outputs={"label": "label.nrrd", "masked": "masked.nrrd"}, device="cpu",
                    options={"input_name": "Test head"})


def _plant_leftovers(job: jobs.Job) -> None:
    """What a half-finished earlier attempt could have left: the runner must not let any of it survive a failure."""
    job.partial_dir.mkdir(parents=True)
    (job.partial_dir / "label.nrrd").write_bytes(b"half written")
    job.outputs_dir.mkdir()
    (job.outputs_dir / "label.nrrd").write_bytes(b"stale")
    (Path(job.folder) / jobs.RESULT_FILE_NAME).write_text("{}", encoding="utf-8")


def _assert_nothing_left(job: jobs.Job) -> None:
    assert not job.partial_dir.exists()
    assert not job.outputs_dir.exists()
    assert not (Path(job.folder) / jobs.RESULT_FILE_NAME).exists()


def _poll_until(process: runner.WorkerProcess, condition, timeout_s: float) -> bool:
    """Drive the job with poll() (as the Slicer module's timer does) until the condition holds."""

    def check():
        process.poll()
        return condition()

    return wait_until(check, timeout_s)


def _wrapper_with_child(tmp_path: Path) -> tuple[Path, Path]:
    """A "python" that first starts a long-lived child (like a data loader) and then becomes the worker."""
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "python-with-child.sh"
    script.write_text(f'#!/bin/sh\nsleep 300 &\necho $! > "$CHILD_PID_FILE"\nexec "{sys.executable}" "$@"\n')
    script.chmod(0o755)
    return script, pid_file


# ----------------------------------------------------------------------------------------------- protocol


def test_event_round_trip_and_plain_lines():
    event = jobs.Event(stage="done", progress=1.0, message="Finished", result={"outputs": {"label": "/x/l.nrrd"}})
    line = event.to_line()
    assert "\n" not in line and json.loads(line) == {"stage": "done", "progress": 1.0, "message": "Finished",
                                                    "result": {"outputs": {"label": "/x/l.nrrd"}}}
    assert jobs.Event.from_line(line + "\r\n") == event and event.is_final
    error = jobs.Event(stage="error", message="Bad input.", error_type="InputError", traceback="Traceback ...\n")
    assert jobs.Event.from_line(error.to_line()) == error and error.is_final
    assert not jobs.Event(stage="inference", progress=0.2).is_final
    assert jobs.Event.from_line('{"stage": "write", "progress": 0.95, "future_field": 3}') == jobs.Event(
        stage="write", progress=0.95)
    for text in ["Loading weights...", "", "   ", "{not json", '{"progress": 0.5, "message": "no stage"}',
                 '["stage", "done"]', "[1, 2]", 'warning: {"stage": "done"}']:
        assert jobs.Event.from_line(text) is None, text


def test_job_write_read_round_trip(tmp_path):
    job = jobs.Job(task="segment", model="deepbet", inputs={"image": "/data/head.nrrd"}, folder=str(tmp_path / "j"),
                   outputs={"label": "label.nrrd"}, device="cuda:1", options={"model_options": {"threshold": 0.4}})
    path = job.write()
    assert path == tmp_path / "j" / jobs.JOB_FILE_NAME
    assert jobs.Job.read(path) == job
    data = json.loads(path.read_text(encoding="utf-8"))
    data["added_by_a_newer_version"] = True
    path.write_text(json.dumps(data), encoding="utf-8")
    assert jobs.Job.read(path) == job
    assert job.partial_dir == tmp_path / "j" / ".partial" and job.outputs_dir == tmp_path / "j" / "outputs"


def test_worker_main_usage_and_unknown_task(tmp_path, capsys, monkeypatch):
    assert worker.main([]) == 64
    assert worker.main(["a.json", "b.json"]) == 64
    assert capsys.readouterr().err.count("usage: python -m MIADeepLearningLib.worker <job.json>") == 2
    monkeypatch.delenv(worker.FAULT_ENV, raising=False)
    path = _job(tmp_path, tmp_path / "unused.nrrd", task="translate").write()
    stream = io.StringIO()
    assert worker.run(path, worker.Reporter(stream)) == 2
    events = [jobs.Event.from_line(line) for line in stream.getvalue().splitlines()]
    assert [event.stage for event in events] == ["start", "error"]
    assert events[-1].error_type == "MIADLError"
    assert events[-1].message == f"Unknown task 'translate' (known: {', '.join(worker.TASKS)})."
    assert "Traceback" in events[-1].traceback


# ------------------------------------------------------------------------------------------- real workers


@pytest.mark.slow
def test_real_deepbet_job(tmp_path):
    try:
        head, reference_mask = sample_data.robex_head_paths()
    except sample_data.SampleDataMissing as reason:
        pytest.skip(str(reason))
    job = _job(tmp_path, head)
    events = []
    run = runner.run(job, on_event=events.append, timeout_s=300)
    assert run.state == runner.STATE_DONE, run.log_lines
    assert run.returncode == 0
    stages = [event.stage for event in events]
    assert stages[0] == "start" and stages[-1] == "done" and stages.count("done") == 1
    positions = [stages.index(stage) for stage in STAGE_ORDER]
    assert positions == sorted(positions), stages
    progress = [event.progress for event in events if event.progress is not None]
    assert progress[0] == 0.0 and progress[-1] == 1.0
    assert all(later >= earlier for earlier, later in zip(progress, progress[1:])), progress
    assert run.final_event is events[-1]

    result = run.final_event.result
    assert set(result["outputs"]) == {"label", "masked"}
    for role, path in result["outputs"].items():
        assert Path(path) == job.outputs_dir / job.outputs[role] and Path(path).is_file()
    assert not job.partial_dir.exists()
    stored = json.loads((Path(job.folder) / jobs.RESULT_FILE_NAME).read_text(encoding="utf-8"))
    assert stored["outputs"] == result["outputs"] and stored["provenance"] == result["provenance"]
    assert result["provenance"]["model_id"] == "deepbet" and result["provenance"]["device"] == "cpu"
    assert result["provenance"]["input"] == "Test head"
    assert result["segments"][0]["name"] == "Brain" and result["warnings"] == []
    assert result["timings"]["worker_total"] >= result["timings"]["inference"] > 0

    label = sitk.ReadImage(result["outputs"]["label"])
    image = sitk.ReadImage(str(head))
    assert label.GetSize() == image.GetSize()
    assert np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-6)
    assert np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)
    voxels = sitk.GetArrayFromImage(label) > 0
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_mask))) > 0
    assert 2 * np.count_nonzero(voxels & reference) / (voxels.sum() + reference.sum()) >= 0.95


def test_unknown_model_is_an_error_event(tmp_path, phantom_file):
    job = _job(tmp_path, phantom_file, model="nope")
    _plant_leftovers(job)
    run = runner.run(job, timeout_s=120)
    assert run.state == runner.STATE_ERROR and run.returncode == 2
    final = run.final_event
    assert final.stage == "error" and final.error_type == "ModelError"
    assert final.message == f"Unknown model 'nope' (available: {', '.join(SHIPPED_IDS)})."
    assert _one_sentence(final.message)
    assert any("Traceback (most recent call last)" in line for line in run.log_lines)
    assert any("ModelError: Unknown model 'nope'" in line for line in run.log_lines)
    _assert_nothing_left(job)


def test_unexpected_exception_is_an_error_event(tmp_path, phantom_file):
    job = _job(tmp_path, phantom_file)
    run = runner.run(job, timeout_s=120, env={worker.FAULT_ENV: "raise:read_input"})
    assert run.state == runner.STATE_ERROR and run.returncode == 1
    assert run.final_event.error_type == "RuntimeError"
    assert run.final_event.message == (
        "The worker failed unexpectedly (RuntimeError: injected fault at stage read_input).")
    _assert_nothing_left(job)


def test_crash_without_a_final_event(tmp_path, phantom_file):
    job = _job(tmp_path, phantom_file)
    _plant_leftovers(job)
    events = []
    run = runner.run(job, on_event=events.append, timeout_s=120, env={worker.FAULT_ENV: "crash:inference"})
    assert run.state == runner.STATE_CRASHED
    assert run.returncode == 139
    assert "inference" in [event.stage for event in events]
    final = run.final_event
    assert final is events[-1] and final.stage == "error" and final.error_type == "WorkerCrash"
    assert "stopped unexpectedly" in final.message and "exit code 139" in final.message
    _assert_nothing_left(job)


@posix_only
def test_time_limit_stops_a_hanging_worker(tmp_path, phantom_file):
    job = _job(tmp_path, phantom_file)
    _plant_leftovers(job)
    events = []
    started = time.monotonic()
    # start-up (~1.5 s) and model loading reach "inference" after ~2 s; the limit lands in the hour-long hang
    run = runner.run(job, on_event=events.append, timeout_s=5, env={worker.FAULT_ENV: "hang:inference"})
    elapsed = time.monotonic() - started
    assert run.state == runner.STATE_TIMEOUT
    assert "inference" in [event.stage for event in events], "the limit expired before the worker reached the hang"
    assert 5 <= elapsed < 20
    assert process_gone(run.pid) and run.returncode == -9
    final = run.final_event
    assert final.error_type == "TimeoutError" and "time limit of 5 s" in final.message and _one_sentence(final.message)
    _assert_nothing_left(job)


@posix_only
def test_cancel_kills_the_whole_process_tree(tmp_path, phantom_file):
    wrapper, pid_file = _wrapper_with_child(tmp_path)
    job = _job(tmp_path, phantom_file)
    threads, events = set(), []

    def on_event(event):
        threads.add(threading.get_ident())
        events.append(event)

    process = runner.start(job, python_executable=str(wrapper), on_event=on_event,
                           env={worker.FAULT_ENV: "hang:inference", "CHILD_PID_FILE": str(pid_file)})
    assert _poll_until(process, lambda: any(e.stage == "inference" for e in events), 120), process.log_lines
    _plant_leftovers(job)  # as if the worker had started writing
    child_pid = int(pid_file.read_text())
    assert not process_gone(process.pid) and not process_gone(child_pid)
    process.cancel()
    assert process.state == runner.STATE_CANCELLED
    assert process_gone(process.pid)
    assert wait_until(lambda: process_gone(child_pid), 5), "the worker's child survived the cancel"
    assert process.final_event.message == "Cancelled by the user."
    assert process.final_event.error_type == "CancelledError"
    assert events[-1] is process.final_event
    assert threads == {threading.get_ident()}  # callbacks ran in the thread that called poll()/cancel()
    _assert_nothing_left(job)
    process.cancel()  # a second cancel does nothing
    assert process.state == runner.STATE_CANCELLED and events[-1] is process.final_event and len(
        [e for e in events if e.error_type == "CancelledError"]) == 1


@posix_only
def test_crashed_worker_does_not_leave_its_children_or_hang_the_job(tmp_path, phantom_file):
    """A child that outlives a crashed worker holds its output pipes: the runner must still end the job."""
    wrapper, pid_file = _wrapper_with_child(tmp_path)
    job = _job(tmp_path, phantom_file)
    process = runner.start(job, python_executable=str(wrapper),
                           env={worker.FAULT_ENV: "crash:inference", "CHILD_PID_FILE": str(pid_file)})
    finished = _poll_until(process, lambda: not process.is_running(), 20)
    child_pid = int(pid_file.read_text())
    try:
        assert finished, "the job never ended after its worker crashed"
        assert process.state == runner.STATE_CRASHED and process.returncode == 139
        assert wait_until(lambda: process_gone(child_pid), 5), "the crashed worker's child is still running"
    finally:
        process.cancel()
        if not process_gone(child_pid):
            os.kill(child_pid, 9)


@posix_only
def test_a_job_that_ended_in_time_is_not_reported_as_timed_out(tmp_path):
    """Nobody polled until after the deadline (a busy UI), but the worker had already finished."""
    job = _job(tmp_path, tmp_path / "unused.nrrd", task="translate")
    process = runner.start(job, timeout_s=600)
    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
    process.timeout_s = 0.001
    final = process.wait()
    assert process.state == runner.STATE_ERROR, process.log_lines
    assert final.error_type == "MIADLError"
    assert final.message == f"Unknown task 'translate' (known: {', '.join(worker.TASKS)})."
    assert process.returncode == 2


def test_worker_python_is_named_or_refused_in_one_sentence(monkeypatch, tmp_path) -> None:
    """Inside Slicer sys.executable is empty when PythonSlicer is not found: a clear sentence, no process started,
    instead of an unreadable process-start error."""
    assert runner.python_for_worker("/opt/Slicer/bin/PythonSlicer") == "/opt/Slicer/bin/PythonSlicer"
    assert runner.python_for_worker(None) == sys.executable
    monkeypatch.setattr(sys, "executable", "")
    with pytest.raises(RuntimeError, match=r"sys\.executable is empty\); inside Slicer, PythonSlicer was not found"):
        runner.python_for_worker(None)
    job = jobs.Job(task="segment", model="deepbet", inputs={}, folder=str(tmp_path / "job"))
    with pytest.raises(RuntimeError, match="PythonSlicer was not found"):
        runner.start(job)
    with pytest.raises(RuntimeError, match="PythonSlicer was not found"):
        runner.WarmWorker()
