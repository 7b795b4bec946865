"""Start, stream, time out and cancel the worker process. Stdlib only: runs inside Slicer without torch.

Reader threads only move lines into a queue; events are handed to callbacks from `poll()`, in the caller's thread,
so a Qt widget can poll from a QTimer without touching Qt objects off the main thread. Cancel kills the worker's
whole process group (or tree on Windows) and removes every output the job had started to write.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from MIADeepLearningLib import jobs
from MIADeepLearningLib.paths import library_parent_dir

EventCallback = Callable[[jobs.Event], None]
LogCallback = Callable[[str], None]

STATE_RUNNING = "running"
STATE_DONE = "done"
STATE_ERROR = "error"
STATE_CANCELLED = "cancelled"
STATE_TIMEOUT = "timeout"
STATE_CRASHED = "crashed"


def worker_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: the library importable, output unbuffered so progress arrives live."""
    env = dict(os.environ)
    library = str(library_parent_dir())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [library, env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _pump(stream, kind: str, sink: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        sink.put((kind, line.rstrip("\r\n")))
    stream.close()
    sink.put((kind, None))


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill the worker and everything it started (data loaders, compilers), not only the launcher."""
    if os.name == "nt":
        if process.poll() is not None:
            return
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
    else:
        # The group outlives its leader: children of a worker that already exited are killed too.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # group already gone (or its pid reused by someone else)
            pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class WorkerProcess:
    """One running job. Create with `start()`; drive with `poll()` (non-blocking) or `wait()` (blocking)."""

    def __init__(self, job: jobs.Job, python_executable: str | None = None, on_event: EventCallback | None = None,
                 on_log: LogCallback | None = None, timeout_s: float | None = None,
                 env: dict[str, str] | None = None):
        self.job = job
        self.python_executable = python_executable or sys.executable
        self.on_event = on_event
        self.on_log = on_log
        self.timeout_s = timeout_s
        self.extra_env = env
        self.state = STATE_RUNNING
        self.final_event: jobs.Event | None = None
        self.log_lines: list[str] = []
        self.returncode: int | None = None
        self._queue: queue.Queue = queue.Queue()
        self._open_streams = 2
        self._process: subprocess.Popen | None = None
        self._started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> WorkerProcess:
        job_path = self.job.write()
        command = [self.python_executable, "-m", "MIADeepLearningLib.worker", str(job_path)]
        self._log(f"Starting worker: {' '.join(command)}")
        # Own process group (session): Cancel can then kill the worker and everything it started in one go.
        if os.name == "nt":
            kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            kwargs = {"start_new_session": True}
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            encoding="utf-8", errors="replace", bufsize=1, env=worker_environment(self.extra_env),
            cwd=self.job.folder, **kwargs,
        )
        self._started_at = time.monotonic()
        for stream, kind in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            threading.Thread(target=_pump, args=(stream, kind, self._queue), daemon=True).start()
        return self

    def is_running(self) -> bool:
        return self.state == STATE_RUNNING

    def poll(self) -> list[jobs.Event]:
        """Hand out what arrived since the last call; detect the end, a crash or the time limit."""
        events = []
        while True:
            try:
                kind, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._open_streams -= 1
                continue
            event = jobs.Event.from_line(line) if kind == "stdout" else None
            if event is None:
                self._log(line)
                continue
            if event.traceback:
                self._log(event.traceback.rstrip())
            events.append(event)
            if event.is_final and self.final_event is None:
                self.final_event = event
        for event in events:
            if self.on_event:
                self.on_event(event)
        if self.state == STATE_RUNNING:
            self._check_finished()
        return events

    def _check_finished(self) -> None:
        assert self._process is not None
        exited = self._process.poll() is not None
        if exited and self._open_streams > 0:
            # The worker is gone but something it started still holds its output pipes open: end that too.
            kill_process_tree(self._process)
        finished_in_time = exited and self.final_event is not None  # even if nobody polled before the deadline
        if not finished_in_time and self.timeout_s is not None and time.monotonic() - self._started_at > self.timeout_s:
            self._stop(STATE_TIMEOUT, "TimeoutError",
                       f"The run took longer than its time limit of {self.timeout_s:g} s and was stopped.")
            return
        if not exited or self._open_streams > 0:
            return
        self.returncode = self._process.returncode
        if self.final_event is not None and self.final_event.stage == jobs.STAGE_DONE and self.returncode == 0:
            self.state = STATE_DONE
        elif self.final_event is not None and self.final_event.stage == jobs.STAGE_ERROR:
            self.state = STATE_ERROR
            self._remove_outputs()
        else:
            self.state = STATE_CRASHED
            self._remove_outputs()
            self._finish_with(jobs.Event(
                stage=jobs.STAGE_ERROR, error_type="WorkerCrash",
                message=f"The worker stopped unexpectedly (exit code {self.returncode}) before finishing; "
                        "the log has the details."))

    def cancel(self) -> None:
        """Kill the worker tree now; the job leaves no output files behind."""
        if self.state == STATE_RUNNING:
            self._stop(STATE_CANCELLED, "CancelledError", "Cancelled by the user.")

    def wait(self, poll_interval_s: float = 0.05) -> jobs.Event:
        """Block until the job ends; returns the final event."""
        while self.is_running():
            self.poll()
            time.sleep(poll_interval_s)
        self.poll()
        assert self.final_event is not None
        return self.final_event

    def _stop(self, state: str, error_type: str, message: str) -> None:
        assert self._process is not None
        kill_process_tree(self._process)
        self.returncode = self._process.returncode
        self.state = state
        self._remove_outputs()
        self._log(message)
        self._finish_with(jobs.Event(stage=jobs.STAGE_ERROR, error_type=error_type, message=message))

    def _finish_with(self, event: jobs.Event) -> None:
        self.final_event = event
        if self.on_event:
            self.on_event(event)

    def _remove_outputs(self) -> None:
        for folder in (self.job.partial_dir, self.job.outputs_dir):
            shutil.rmtree(folder, ignore_errors=True)
        result_file = Path(self.job.folder) / jobs.RESULT_FILE_NAME
        if result_file.exists():
            result_file.unlink()

    def _log(self, line: str) -> None:
        self.log_lines.append(line)
        if self.on_log:
            self.on_log(line)


def start(job: jobs.Job, **kwargs) -> WorkerProcess:
    """Start a worker for the job (see WorkerProcess for the keyword arguments)."""
    return WorkerProcess(job, **kwargs).start()


def run(job: jobs.Job, **kwargs) -> WorkerProcess:
    """Start a worker and block until it ends (tests, demo, batch)."""
    worker = start(job, **kwargs)
    worker.wait()
    return worker
