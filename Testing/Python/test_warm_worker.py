"""The warm worker (`worker --serve` + runner.WarmWorker), with real processes: the model stays loaded between jobs,
cancel / time-out / crash / unexpected errors end the server and the next job starts a new one, input errors keep it
warm, shutdown leaves no process, and SegmentationLogic gives the same segmentation through it as without it."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import process_gone, small_head, wait_until

from MIADeepLearningLib import jobs, runner, worker

posix_only = pytest.mark.skipif(os.name != "posix", reason="process groups and /proc are POSIX/Linux")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head_file(robex, tmp_path_factory):
    path = tmp_path_factory.mktemp("warm") / "small_head.nrrd"
    sitk.WriteImage(small_head(robex[0]), str(path))
    return path


@pytest.fixture
def warm():
    """A WarmWorker that is always shut down, whatever the test did to it."""
    warm_worker = runner.WarmWorker()
    yield warm_worker
    warm_worker.shutdown()


def _job(root: Path, name: str, image: Path) -> jobs.Job:
    return jobs.Job(task="segment", model="deepbet", inputs={"image": str(image)}, folder=str(root / name),
                    outputs={"label": "label.nrrd", "masked": "masked.nrrd"}, device="cpu",
                    options={"input_name": name})


def _poll_until_stage(handle, events: list, stage: str, timeout_s: float = 120) -> None:
    def reached():
        handle.poll()
        return any(event.stage == stage for event in events) or not handle.is_running()

    assert wait_until(reached, timeout_s), handle.log_lines
    assert handle.is_running(), (handle.final_event, handle.log_lines)


def _plant_leftovers(job: jobs.Job) -> None:
    job.partial_dir.mkdir(parents=True, exist_ok=True)
    (job.partial_dir / "label.nrrd").write_bytes(b"half written")
    job.outputs_dir.mkdir(exist_ok=True)
    (job.outputs_dir / "label.nrrd").write_bytes(b"stale")
    (Path(job.folder) / jobs.RESULT_FILE_NAME).write_text("{}", encoding="utf-8")


def _assert_nothing_left(job: jobs.Job) -> None:
    assert not job.partial_dir.exists() and not job.outputs_dir.exists()
    assert not (Path(job.folder) / jobs.RESULT_FILE_NAME).exists()


def _run_ok(warm: runner.WarmWorker, job: jobs.Job) -> tuple[runner.WarmJob, list]:
    events: list = []
    handle = warm.submit(job, on_event=events.append, timeout_s=300)
    final = handle.wait()
    assert handle.state == runner.STATE_DONE, (final, handle.log_lines)
    return handle, events


# ----------------------------------------------------------------------------------------------- warm runs


def test_two_jobs_in_a_row_reuse_the_loaded_model(warm, head_file, tmp_path):
    first, first_events = _run_ok(warm, _job(tmp_path, "first", head_file))
    pid = warm.pid
    second, second_events = _run_ok(warm, _job(tmp_path, "second", head_file))
    assert warm.pid == pid and warm.starts == 1 and warm.is_alive()

    one, two = first.final_event.result, second.final_event.result
    assert one["model_cached"] is False and two["model_cached"] is True
    print(f"load_model: first {one['timings']['load_model']} s, second {two['timings']['load_model']} s")
    for handle, events in ((first, first_events), (second, second_events)):
        key = str(Path(handle.job.folder) / jobs.JOB_FILE_NAME)
        assert {event.job for event in events} == {key}  # every event names its job
        stages = [event.stage for event in events]
        assert stages[0] == "start" and stages[-1] == "done" and stages.count("done") == 1
        assert set(handle.final_event.result["outputs"]) == {"label", "masked"}
    assert any("Warm worker ready" in line for line in first.log_lines)
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(result["outputs"]["label"])) for result in (one, two)]
    assert np.array_equal(*labels) and labels[0].any()


@posix_only
def test_input_error_keeps_the_server_warm_and_a_server_that_died_idle_is_restarted(warm, head_file, tmp_path):
    _run_ok(warm, _job(tmp_path, "first", head_file))
    pid = warm.pid
    bad = _job(tmp_path, "missing", tmp_path / "absent.nrrd")
    _plant_leftovers(bad)
    handle = warm.submit(bad)
    final = handle.wait()
    assert handle.state == runner.STATE_ERROR and final.error_type == "InputError"
    assert "absent.nrrd does not exist" in final.message
    _assert_nothing_left(bad)
    assert warm.is_alive() and warm.pid == pid
    after, _ = _run_ok(warm, _job(tmp_path, "after", head_file))
    assert after.final_event.result["model_cached"] is True and warm.starts == 1

    os.kill(pid, signal.SIGKILL)  # dies between jobs (out of memory killer, a user with `kill`)
    # not only a zombie leader (torch's threads may still be exiting) but reapable: the runner can see it is gone
    assert wait_until(lambda: not warm.is_alive(), 10)
    restarted, _ = _run_ok(warm, _job(tmp_path, "restarted", head_file))
    assert warm.starts == 2 and warm.pid != pid
    assert any("had stopped" in line for line in restarted.log_lines)


@posix_only
def test_cancel_and_time_out_kill_the_server_and_the_next_job_restarts_it(head_file, tmp_path):
    warm = runner.WarmWorker(env={worker.FAULT_ENV: "hang:inference"})
    try:
        events: list = []
        job = _job(tmp_path, "cancelled", head_file)
        handle = warm.submit(job, on_event=events.append)
        _poll_until_stage(handle, events, "inference")
        with pytest.raises(RuntimeError, match="still running another job"):
            warm.submit(_job(tmp_path, "too_early", head_file))
        _plant_leftovers(job)
        server_pid = warm.pid
        handle.cancel()
        assert handle.state == runner.STATE_CANCELLED and handle.final_event.error_type == "CancelledError"
        assert events[-1] is handle.final_event and handle.final_event.message == "Cancelled by the user."
        assert process_gone(server_pid) and not warm.is_alive()
        _assert_nothing_left(job)

        events = []
        timed = _job(tmp_path, "timed_out", head_file)
        started = time.monotonic()
        handle = warm.submit(timed, on_event=events.append, timeout_s=8)
        final = handle.wait()
        assert handle.state == runner.STATE_TIMEOUT and final.error_type == "TimeoutError", handle.log_lines
        assert "inference" in [event.stage for event in events], "the limit expired before the job reached the hang"
        assert 8 <= time.monotonic() - started < 30 and "time limit of 8 s" in final.message
        assert warm.starts == 2 and process_gone(handle.pid)
        _assert_nothing_left(timed)

        warm.env = {}  # the next start runs without the injected hang
        after, _ = _run_ok(warm, _job(tmp_path, "after", head_file))
        assert warm.starts == 3 and after.final_event.result["model_cached"] is False
        assert any("Started warm worker" in line for line in after.log_lines)
    finally:
        warm.shutdown()


def test_a_crashing_server_fails_its_job_and_the_next_job_restarts_it(head_file, tmp_path):
    warm = runner.WarmWorker(env={worker.FAULT_ENV: "crash:inference"})
    try:
        events: list = []
        job = _job(tmp_path, "crashed", head_file)
        _plant_leftovers(job)
        handle = warm.submit(job, on_event=events.append, timeout_s=120)
        final = handle.wait()
        assert handle.state == runner.STATE_CRASHED and handle.returncode == 139
        assert final is events[-1] and final.error_type == "WorkerCrash" and "exit code 139" in final.message
        assert "inference" in [event.stage for event in events]
        _assert_nothing_left(job)
        assert not warm.is_alive()
        warm.env = {}
        _run_ok(warm, _job(tmp_path, "after", head_file))
        assert warm.starts == 2
    finally:
        warm.shutdown()


def test_an_unexpected_error_restarts_the_server_for_the_next_job(head_file, tmp_path):
    warm = runner.WarmWorker(env={worker.FAULT_ENV: "raise:read_input"})
    try:
        job = _job(tmp_path, "raised", head_file)
        handle = warm.submit(job, timeout_s=120)
        final = handle.wait()
        assert handle.state == runner.STATE_ERROR and final.error_type == "RuntimeError"
        assert final.message == "The worker failed unexpectedly (RuntimeError: injected fault at stage read_input)."
        assert any("stops after this unexpected error" in line for line in handle.log_lines)
        _assert_nothing_left(job)
        warm.env = {}
        after, _ = _run_ok(warm, _job(tmp_path, "after", head_file))  # never sent to the server that is exiting
        assert warm.starts == 2 and after.final_event.result["model_cached"] is False
    finally:
        warm.shutdown()


@posix_only
def test_shutdown_leaves_no_process(head_file, tmp_path):
    warm = runner.WarmWorker().start()
    pid = warm.pid
    assert warm.is_alive() and not process_gone(pid)
    warm.shutdown()
    assert process_gone(pid) and not warm.is_alive() and warm.pid is None
    warm.shutdown()  # a second shutdown does nothing
    with runner.WarmWorker() as scoped:  # a context manager shuts down too, also mid-job
        handle = scoped.submit(_job(tmp_path, "scoped", head_file))
        pid = scoped.pid
    assert process_gone(pid) and handle.state == runner.STATE_CANCELLED


# ------------------------------------------------------------------------------------- the serve loop itself


def test_serve_loop_in_process(tmp_path, monkeypatch):
    """Jobs by path, events stamped with their job, input errors keep serving, `shutdown` and end of input stop."""
    monkeypatch.delenv(worker.FAULT_ENV, raising=False)
    unknown = jobs.Job(task="translate", model="deepbet", inputs={}, folder=str(tmp_path / "j1")).write()
    stream = io.StringIO()
    code = worker.serve(stdin=io.StringIO(f"{unknown}\n\n{unknown}\nshutdown\nnever read\n"),
                        reporter=worker.Reporter(stream))
    assert code == 0
    events = [jobs.Event.from_line(line) for line in stream.getvalue().splitlines()]
    assert [(event.stage, event.job) for event in events] == [
        ("ready", None), ("start", str(unknown)), ("error", str(unknown)), ("start", str(unknown)),
        ("error", str(unknown))]
    assert events[2].message == f"Unknown task 'translate' (known: {', '.join(worker.TASKS)})."

    stream = io.StringIO()
    assert worker.serve(stdin=io.StringIO(str(tmp_path / "absent.json") + "\n" + str(unknown) + "\n"),
                        reporter=worker.Reporter(stream)) == 1  # unexpected error: announce, report, stop
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["stage"] for line in lines] == ["ready", "stopping", "error"]
    assert "job" not in lines[1] and lines[2]["job"] == str(tmp_path / "absent.json")
    assert worker.serve(stdin=io.StringIO(""), reporter=worker.Reporter(io.StringIO())) == 0  # end of input


def test_trim_pipeline_cache_keeps_the_newest():
    cache = {"a": 1, "b": 2, "c": 3}
    worker.trim_pipeline_cache(cache, 1)
    assert cache == {"c": 3}
    worker.trim_pipeline_cache(cache, 0)
    assert cache == {}


# ---------------------------------------------------------------------------------- through SegmentationLogic


def test_segmentation_logic_with_a_warm_worker_gives_the_same_segmentation(scene, head_file, tmp_path):
    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic
    from MIADeepLearningLib.mrml.segmentations import label_array
    from MIADeepLearningLib.mrml.volumes import read_volume_file

    volume = read_volume_file(head_file, "Small head")
    cold = SegmentationLogic(jobs_root=tmp_path / "jobs").run(volume, "deepbet", device="cpu")
    reference = label_array(cold.segmentation_node, "Brain", volume)
    assert reference.any() and cold.model_cached is False

    warm_worker = runner.WarmWorker()
    try:
        logic = SegmentationLogic(jobs_root=tmp_path / "jobs", warm_worker=warm_worker)
        results = [logic.run(volume, "deepbet", device="cpu", create_masked_volume=True) for _ in range(2)]
        for result in results:
            assert np.array_equal(label_array(result.segmentation_node, "Brain", volume), reference)
            assert result.masked_volume_node is not None
            assert result.provenance["model_id"] == "deepbet" and result.timings["total"] > 0
        assert [result.model_cached for result in results] == [False, True]
        assert warm_worker.starts == 1
        assert list((tmp_path / "jobs").iterdir()) == []  # job folders are removed after the import
        with pytest.raises(ValueError, match="give the WarmWorker its env"):
            logic.start(volume, "deepbet", worker_env={worker.FAULT_ENV: "crash:inference"})
    finally:
        warm_worker.shutdown()
