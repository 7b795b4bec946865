"""Start, stream, time out and cancel the worker process. Stdlib only: runs inside Slicer without torch.

Reader threads only move lines into a queue; events are handed to callbacks from `poll()`, in the caller's thread,
so a Qt widget can poll from a QTimer without touching Qt objects off the main thread. Cancel kills the worker's
whole process group (or tree on Windows) and removes every output the job had started to write.

Two ways to run a job, with the same handle interface (poll, is_running, cancel, wait, state, final_event,
log_lines, job): `start()` launches one worker process per job (the default: each run starts clean and frees all
memory when it ends); a `WarmWorker` keeps one `worker --serve` process with the model loaded between jobs, and
restarts it after a cancel, a time-out or a crash.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
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


# Windows process creation flags (documented values; the subprocess module defines them only on Windows)
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000
STARTF_USESHOWWINDOW = 0x00000001
SW_HIDE = 0


def worker_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: the library importable, output unbuffered so progress arrives live.

    UTF-8 everywhere, whatever the user's locale: the runner decodes the worker's output as UTF-8 (on Windows the
    default would be the ANSI code page, which cannot encode e.g. a Japanese name), and in UTF-8 mode a worker started
    under a C or Latin-1 locale still opens files in folders named "Müller 山田". No bytecode is written: the library
    may sit in a read-only program folder (clinical installs), where nothing may be written, administrators included.
    """
    env = dict(os.environ)
    library = str(library_parent_dir())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [library, env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUTF8"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra or {})
    return env


def python_for_worker(python_executable: str | None) -> str:
    """The interpreter that runs the worker: the one given (PythonSlicer inside Slicer), else this process's own.

    Inside an embedding application ``sys.executable`` can be empty (Slicer sets it to PythonSlicer's path only when
    it finds PythonSlicer): then one sentence says so instead of an unreadable process-start error.
    """
    python = python_executable or sys.executable
    if not python:
        raise RuntimeError("No Python interpreter to run the worker was given, and this process does not know its own "
                           "(sys.executable is empty); inside Slicer, PythonSlicer was not found.")
    return python


def hidden_process_kwargs(new_process_group: bool = False) -> dict:
    """Popen/run keyword arguments for any process the Slicer side starts: on Windows no console window may open
    (PythonSlicer and taskkill are console programs, and Slicer is not), so CREATE_NO_WINDOW plus a hidden
    STARTUPINFO; `new_process_group`: its own process group (session on POSIX), so Cancel kills all it started."""
    if os.name != "nt":
        return {"start_new_session": True} if new_process_group else {}
    flags = getattr(subprocess, "CREATE_NO_WINDOW", CREATE_NO_WINDOW)
    if new_process_group:
        flags |= getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", CREATE_NEW_PROCESS_GROUP)
    kwargs: dict = {"creationflags": flags}
    startupinfo_class = getattr(subprocess, "STARTUPINFO", None)  # Windows only
    if startupinfo_class is not None:
        startupinfo = startupinfo_class()
        startupinfo.dwFlags |= getattr(subprocess, "STARTF_USESHOWWINDOW", STARTF_USESHOWWINDOW)
        startupinfo.wShowWindow = getattr(subprocess, "SW_HIDE", SW_HIDE)
        kwargs["startupinfo"] = startupinfo
    return kwargs


def _pump(stream, kind: str, sink: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        sink.put((kind, line.rstrip("\r\n")))
    stream.close()
    sink.put((kind, None))


def remove_job_outputs(job: jobs.Job) -> None:
    """Delete everything a job that did not succeed may have written, so nothing can pass for a result."""
    for folder in (job.partial_dir, job.outputs_dir):
        shutil.rmtree(folder, ignore_errors=True)
    result_file = Path(job.folder) / jobs.RESULT_FILE_NAME
    if result_file.exists():
        result_file.unlink()


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill the worker and everything it started (data loaders, compilers), not only the launcher."""
    if os.name == "nt":
        if process.poll() is not None:
            return
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False,
                       **hidden_process_kwargs())
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


class _JobHandle:
    """What every running job offers its caller (SegmentationRun drives either kind): state, events, cancel, wait.

    Subclasses read their process's output in `poll()` and end the job with `_stop()` (cancel, time limit),
    `_crashed()` (the process died without a final event) or by receiving the worker's own done/error event.
    """

    def __init__(self, job: jobs.Job, on_event: EventCallback | None, on_log: LogCallback | None,
                 timeout_s: float | None):
        self.job = job
        self.on_event = on_event
        self.on_log = on_log
        self.timeout_s = timeout_s
        self.state = STATE_RUNNING
        self.final_event: jobs.Event | None = None
        self.log_lines: list[str] = []
        self.returncode: int | None = None
        self._started_at = time.monotonic()

    def is_running(self) -> bool:
        return self.state == STATE_RUNNING

    def poll(self) -> list[jobs.Event]:
        raise NotImplementedError

    def cancel(self) -> None:
        """Kill the process running the job now; the job leaves no output files behind."""
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

    def _kill(self) -> int | None:
        """End the process that runs the job; returns its exit code."""
        raise NotImplementedError

    def _past_time_limit(self) -> bool:
        return self.timeout_s is not None and time.monotonic() - self._started_at > self.timeout_s

    def _stop_for_time_limit(self) -> None:
        self._stop(STATE_TIMEOUT, "TimeoutError",
                   f"The run took longer than its time limit of {self.timeout_s:g} s and was stopped.")

    def _stop(self, state: str, error_type: str, message: str) -> None:
        self.returncode = self._kill()
        self.state = state
        remove_job_outputs(self.job)
        self._log(message)
        self._finish_with(jobs.Event(stage=jobs.STAGE_ERROR, error_type=error_type, message=message))

    def _crashed(self, returncode: int | None) -> None:
        self.returncode = returncode
        self.state = STATE_CRASHED
        remove_job_outputs(self.job)
        self._finish_with(jobs.Event(
            stage=jobs.STAGE_ERROR, error_type="WorkerCrash",
            message=f"The worker stopped unexpectedly (exit code {returncode}) before finishing; "
                    "the log has the details."))

    def _protocol_event(self, event: jobs.Event, events: list[jobs.Event]) -> None:
        """Keep one of this job's events; its traceback (if any) goes to the log."""
        if event.traceback:
            self._log(event.traceback.rstrip())
        events.append(event)
        if event.is_final and self.final_event is None:
            self.final_event = event

    def _deliver(self, events: list[jobs.Event]) -> None:
        for event in events:
            if self.on_event:
                self.on_event(event)

    def _finish_with(self, event: jobs.Event) -> None:
        self.final_event = event
        if self.on_event:
            self.on_event(event)

    def _log(self, line: str) -> None:
        self.log_lines.append(line)
        if self.on_log:
            self.on_log(line)


class WorkerProcess(_JobHandle):
    """One running job in its own process. Create with `start()`; drive with `poll()` or `wait()`."""

    def __init__(self, job: jobs.Job, python_executable: str | None = None, on_event: EventCallback | None = None,
                 on_log: LogCallback | None = None, timeout_s: float | None = None,
                 env: dict[str, str] | None = None):
        super().__init__(job, on_event, on_log, timeout_s)
        self.python_executable = python_for_worker(python_executable)
        self.extra_env = env
        self._queue: queue.Queue = queue.Queue()
        self._open_streams = 2
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> WorkerProcess:
        job_path = self.job.write()
        command = [self.python_executable, "-m", "MIADeepLearningLib.worker", str(job_path)]
        self._log(f"Starting worker: {' '.join(command)}")
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            encoding="utf-8", errors="replace", bufsize=1, env=worker_environment(self.extra_env),
            cwd=self.job.folder, **hidden_process_kwargs(new_process_group=True),
        )
        self._started_at = time.monotonic()
        for stream, kind in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            threading.Thread(target=_pump, args=(stream, kind, self._queue), daemon=True).start()
        return self

    def poll(self) -> list[jobs.Event]:
        """Hand out what arrived since the last call; detect the end, a crash or the time limit."""
        events: list[jobs.Event] = []
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
            else:
                self._protocol_event(event, events)
        self._deliver(events)
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
        if not finished_in_time and self._past_time_limit():
            self._stop_for_time_limit()
            return
        if not exited or self._open_streams > 0:
            return
        self.returncode = self._process.returncode
        if self.final_event is not None and self.final_event.stage == jobs.STAGE_DONE and self.returncode == 0:
            self.state = STATE_DONE
        elif self.final_event is not None and self.final_event.stage == jobs.STAGE_ERROR:
            self.state = STATE_ERROR
            remove_job_outputs(self.job)
        else:
            self._crashed(self.returncode)

    def _kill(self) -> int | None:
        assert self._process is not None
        kill_process_tree(self._process)
        return self._process.returncode


class _ServerProcess:
    """One `worker --serve` process and the output lines its reader threads have queued."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.lines: queue.Queue = queue.Queue()
        self.open_streams = 2
        self.stopping = False  # it announced that it exits after the job that is ending
        for stream, kind in ((popen.stdout, "stdout"), (popen.stderr, "stderr")):
            threading.Thread(target=_pump, args=(stream, kind, self.lines), daemon=True).start()

    def next_line(self) -> tuple[str, str] | None:
        """The next queued (stream, line), or None when nothing is waiting; counts the streams that closed."""
        while True:
            try:
                kind, line = self.lines.get_nowait()
            except queue.Empty:
                return None
            if line is None:
                self.open_streams -= 1
                continue
            return kind, line

    def usable(self) -> bool:
        return not self.stopping and self.popen.poll() is None


class WarmJob(_JobHandle):
    """One job run by a `WarmWorker`: the interface of `WorkerProcess`, so `SegmentationRun` drives either.

    A job that ends with done or error leaves the server running (warm) for the next one; cancel and time-out kill
    the server, and a server that dies mid-job makes the job "crashed"; the next submit starts a new server.
    """

    def __init__(self, owner: WarmWorker, server: _ServerProcess, job: jobs.Job, key: str,
                 on_event: EventCallback | None, on_log: LogCallback | None, timeout_s: float | None,
                 notes: list[str]):
        super().__init__(job, on_event, on_log, timeout_s)  # returncode: the server's, when the job ended it
        self._owner = owner
        self._server = server
        self._key = key
        for note in notes:
            self._log(note)

    @property
    def pid(self) -> int | None:
        return self._server.popen.pid

    def poll(self) -> list[jobs.Event]:
        """Hand out this job's events that arrived since the last call; detect its end, a crash or the time limit."""
        if self.state != STATE_RUNNING:
            return []
        events: list[jobs.Event] = []
        while self.final_event is None:  # what comes after the final event belongs to the server or the next job
            item = self._server.next_line()
            if item is None:
                break
            kind, line = item
            event = jobs.Event.from_line(line) if kind == "stdout" else None
            if event is None:
                self._log(line)
            elif event.job != self._key:
                self._owner._server_event(self._server, event, self._log)
            else:
                self._protocol_event(event, events)
        self._deliver(events)
        if self.state == STATE_RUNNING:
            self._check_finished()
        return events

    def _check_finished(self) -> None:
        if self.final_event is not None:
            if self.final_event.stage == jobs.STAGE_DONE:
                self.state = STATE_DONE
            else:
                self.state = STATE_ERROR
                remove_job_outputs(self.job)
            return
        popen = self._server.popen
        exited = popen.poll() is not None
        if exited and self._server.open_streams > 0:
            kill_process_tree(popen)  # something the server started still holds its pipes: end that too
        if self._past_time_limit():
            self._stop_for_time_limit()
            return
        if not exited or self._server.open_streams > 0:
            return
        self._owner._end_server(self._server)
        self._crashed(popen.returncode)

    def _kill(self) -> int | None:
        """Kill the server: the only way to stop a model that is running."""
        self._owner._end_server(self._server)
        return self._server.popen.returncode


class WarmWorker:
    """One worker process kept between jobs (`python -m MIADeepLearningLib.worker --serve`), model kept loaded.

    The process starts lazily on the first `submit()` (or with `start()`, e.g. when a module opens), runs one job
    at a time and is restarted by the next submit after a cancel, a time-out, a crash or an unexpected error. `env`
    is read at every (re)start. `shutdown()` ends it cleanly; if the owner dies, the server sees the end of its
    stdin and exits by itself.
    """

    def __init__(self, python_executable: str | None = None, env: dict[str, str] | None = None,
                 on_log: LogCallback | None = None, cwd: str | Path | None = None, max_models: int = 1):
        self.python_executable = python_for_worker(python_executable)
        self.env: dict[str, str] = dict(env or {})
        self.on_log = on_log
        self.cwd = str(cwd) if cwd else tempfile.gettempdir()  # never a job folder: those are deleted after use
        self.max_models = max_models
        self.log_lines: list[str] = []  # what the server said outside any job
        self.starts = 0  # server processes started so far (1 + restarts)
        self._server: _ServerProcess | None = None
        self._current: WarmJob | None = None

    @property
    def pid(self) -> int | None:
        return self._server.popen.pid if self._server is not None else None

    def is_alive(self) -> bool:
        return self._server is not None and self._server.popen.poll() is None

    def is_busy(self) -> bool:
        if self._current is not None and self._current.is_running():
            self._current.poll()
        return self._current is not None and self._current.is_running()

    def start(self) -> WarmWorker:
        """Start the server now (optional: `submit()` does it when needed)."""
        for note in self._ensure_server():
            self._log(note)
        return self

    def submit(self, job: jobs.Job, on_event: EventCallback | None = None, on_log: LogCallback | None = None,
               timeout_s: float | None = None) -> WarmJob:
        """Send a job to the server (starting it if needed); raises RuntimeError while another job is running."""
        if self.is_busy():
            raise RuntimeError("The warm worker is still running another job; wait for it or cancel it first.")
        self._current = None
        key = str(job.write())
        if "\n" in key or "\r" in key:
            raise ValueError(f"A job folder for the warm worker cannot contain a line break: {key!r}")
        notes: list[str] = []
        for attempt in range(2):
            notes += self._ensure_server()
            server = self._server
            assert server is not None
            try:
                server.popen.stdin.write(key + "\n")
                server.popen.stdin.flush()
                break
            except (OSError, ValueError) as error:  # it died just now: one fresh start, then give up
                notes.append(f"The warm worker (pid {server.popen.pid}) could not take the job ({error}).")
                self._end_server(server)
                if attempt:
                    raise
        self._current = WarmJob(self, server, job, key, on_event, on_log, timeout_s, notes)
        return self._current

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """End the server cleanly (a running job is cancelled); a later submit starts a new one."""
        if self.is_busy():
            assert self._current is not None
            self._current.cancel()
        server = self._server
        if server is None:
            return
        self._drain(server)
        try:
            server.popen.stdin.write(jobs.SHUTDOWN_COMMAND + "\n")
            server.popen.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            server.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._log(f"The warm worker did not stop within {timeout_s:g} s and was killed.")
        self._end_server(server)
        self._drain(server)

    def __enter__(self) -> WarmWorker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # --------------------------------------------------------------------------------------------- internals

    def _ensure_server(self) -> list[str]:
        """A server that can take a job; returns what happened, for the job's log."""
        notes = []
        server = self._server
        if server is not None:
            self._drain(server)
            if not server.usable():
                if server.stopping:
                    try:
                        server.popen.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
                code = server.popen.poll()
                notes.append(f"The warm worker (pid {server.popen.pid}) had stopped (exit code {code}); "
                             "starting a new one.")
                self._end_server(server)
        if self._server is None:
            command = [self.python_executable, "-m", "MIADeepLearningLib.worker", "--serve",
                       "--max-models", str(self.max_models)]
            popen = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
                encoding="utf-8", errors="replace", bufsize=1, env=worker_environment(self.env), cwd=self.cwd,
                **hidden_process_kwargs(new_process_group=True),
            )
            self._server = _ServerProcess(popen)
            self.starts += 1
            notes.append(f"Started warm worker (pid {popen.pid}): {' '.join(command)}")
        return notes

    def _end_server(self, server: _ServerProcess) -> None:
        """Kill the server's process tree (if anything is left of it) and forget it."""
        kill_process_tree(server.popen)
        try:
            if server.popen.stdin is not None:
                server.popen.stdin.close()
        except (OSError, ValueError):
            pass
        if self._server is server:
            self._server = None

    def _drain(self, server: _ServerProcess) -> None:
        """Move what the server said between jobs into this worker's log."""
        while True:
            item = server.next_line()
            if item is None:
                return
            kind, line = item
            event = jobs.Event.from_line(line) if kind == "stdout" else None
            if event is None:
                self._log(line)
            else:
                self._server_event(server, event, self._log)

    def _server_event(self, server: _ServerProcess, event: jobs.Event, log: LogCallback) -> None:
        """An event that is not the current job's: `ready`, `stopping` (never send this server another job)."""
        if event.stage == jobs.STAGE_STOPPING:
            server.stopping = True
        log(event.message or event.to_line())

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
