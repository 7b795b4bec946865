"""The client of the inference server (server.py), for Slicer: standard library only (http.client, ssl, json), so
it runs in Slicer's Python with no new package and no torch.

Why a handle like the runner's: `start_remote(job, server, on_event)` takes the same `jobs.Job` that
mrml/task_run.launch builds for a local worker and returns a `RemoteJob` with the worker handle's interface (poll,
is_running, cancel, wait, state, final_event, log_lines, job). On ``done`` it has already downloaded every result
file into ``job.outputs_dir`` (via ``.partial``, sha256 verified) and rewritten ``result["outputs"]`` to those local
paths, so TaskRun imports a remote result exactly like a local one.

Only voxels and geometry leave the workstation: each input NRRD is sent as a fresh header with the geometry fields
alone (no key/value pairs, comments or content field: no names, no DICOM fields) followed by its data bytes, and the
job options that name volumes (``input_name``, ``input_names``) stay here. The token goes in the Authorization header
only, never in a URL, a log line, the provenance or a result.

Every fault is one sentence (`RemoteError`, a `WorkerError`): raised by `RemoteServer.health()`, or the final error
event of a `RemoteJob` (so TaskRun.finish raises it like a worker's error).
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import queue
import shutil
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from MIADeepLearningLib import jobs, runner
from MIADeepLearningLib.engine.errors import WorkerError

EventCallback = Callable[[jobs.Event], None]
LogCallback = Callable[[str], None]

# The NRRD fields that describe voxels and geometry; every other line of an input's header stays on the workstation.
GEOMETRY_FIELDS = (
    "type", "dimension", "space", "space dimension", "sizes", "space directions", "kinds", "endian", "encoding",
    "space origin", "space units", "measurement frame", "spacings", "thicknesses", "axis mins", "axis maxs",
    "centerings", "centers",
)
LOCAL_OPTIONS = ("input_name", "input_names")  # names of volumes: never sent
CHUNK = 1 << 20
POLL_WAIT_S = 10.0
RETRIES = 3


class RemoteError(WorkerError):
    """A remote run could not be done; the message is one sentence for the user."""


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def clean_nrrd_header(path: str | os.PathLike) -> tuple[bytes, int]:
    """A new NRRD header with the geometry fields of `path` only, and the offset of its attached data."""
    with open(path, "rb") as stream:
        head = stream.read(1 << 20)
    end = head.find(b"\n\n")
    if not head.startswith(b"NRRD000") or end < 0:
        raise RemoteError(f"The input {Path(path).name} is not a NRRD file with attached data.")
    kept = [b"NRRD0004"]
    for line in head[:end].split(b"\n")[1:]:
        if line.startswith(b"#") or b":=" in line:
            continue  # comments and key/value pairs: names, DICOM fields, anything
        name, sep, value = line.partition(b":")
        field = name.strip().lower().decode("latin-1")
        if field in ("data file", "datafile"):
            raise RemoteError(f"The input {Path(path).name} keeps its voxels in another file; export it as one file.")
        if sep and field in GEOMETRY_FIELDS:
            kept.append(name.strip() + b": " + value.strip())
    return b"\n".join(kept) + b"\n\n", end + 2


class RemoteServer:
    """An inference server: its URL, the token and how its TLS certificate is checked.

    `ca_file` trusts that certificate (a self-signed server certificate or the hospital's CA); `verify=False` turns
    the check off (tests only). Plain http:// is accepted for a loopback address only.
    """

    def __init__(self, url: str, token: str, ca_file: str | None = None, verify: bool = True,
                 timeout_s: float = 30.0):
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError(f"The server address {url!r} is not an http(s) URL.")
        if parts.username or parts.password or parts.query:
            raise RemoteError("The server address must not carry a user, a password or a query; the token goes "
                              "in the token field.")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise RemoteError("The server address must start with https:// unless the server runs on this computer.")
        if not token:
            raise RemoteError("The server needs a token; enter it in the settings.")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base = parts.path.rstrip("/")
        self.url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, self.base, "", ""))
        self._token = token
        self.timeout_s = timeout_s
        self._context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._context = ssl.create_default_context(cafile=ca_file)
            if not verify:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE

    def __repr__(self) -> str:  # never the token
        return f"RemoteServer({self.url!r})"

    # --------------------------------------------------------------------------------------------- requests

    def connect(self, timeout_s: float | None = None) -> http.client.HTTPConnection:
        timeout = timeout_s or self.timeout_s
        if self._context is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self._context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}", **(extra or {})}

    def fault(self, error: BaseException) -> RemoteError:
        """One sentence for a connection-level failure."""
        if isinstance(error, ssl.SSLCertVerificationError):
            return RemoteError(f"The TLS certificate of {self.url} could not be verified "
                               f"({error.verify_message or error.reason}); check the address and the server's "
                               "certificate.")
        if isinstance(error, ssl.SSLError):
            return RemoteError(f"The TLS connection to {self.url} failed ({error.reason or error}).")
        if isinstance(error, (socket.timeout, TimeoutError)):
            return RemoteError(f"The server at {self.url} did not answer in time.")
        if isinstance(error, (http.client.RemoteDisconnected, http.client.IncompleteRead, ConnectionResetError,
                              BrokenPipeError)):
            return RemoteError(f"The connection to the server at {self.url} was lost.")
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        return RemoteError(f"The server at {self.url} cannot be reached ({reason}).")

    def refusal(self, status: int, body: bytes) -> RemoteError:
        """One sentence for an HTTP error answer."""
        try:
            detail = str(json.loads(body).get("detail") or "")
        except (ValueError, AttributeError):
            detail = ""
        if status == 401:
            return RemoteError(f"The server at {self.url} did not accept the token; check the token in the settings.")
        if status == 413:
            return RemoteError(detail or f"The volume is larger than the server at {self.url} accepts.")
        if status == 429:
            return RemoteError(detail or f"The server at {self.url} is busy with its limit of jobs; try again later.")
        if status == 404 and not detail:
            return RemoteError(f"{self.url} is not a MIADeepLearning inference server (or an older version).")
        return RemoteError(detail or f"The server at {self.url} answered with HTTP error {status}.")

    def request(self, method: str, path: str, payload: Any = None, timeout_s: float | None = None) -> Any:
        """One JSON request; the answer's JSON (None when empty); RemoteError (one sentence) otherwise."""
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        headers = self._headers({"Content-Type": "application/json"} if body is not None else None)
        connection = self.connect(timeout_s)
        try:
            connection.request(method, self.base + path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            raise self.fault(error) from None
        finally:
            connection.close()
        if response.status >= 400:
            raise self.refusal(response.status, data)
        try:
            return json.loads(data) if data else None
        except ValueError:
            raise RemoteError(f"{self.url} is not a MIADeepLearning inference server.") from None

    def upload(self, path: str, source: str | os.PathLike) -> None:
        """PUT a NRRD input with its geometry header only, streamed (the file is never copied)."""
        header, offset = clean_nrrd_header(source)
        length = len(header) + os.path.getsize(source) - offset
        connection = self.connect()
        try:
            connection.putrequest("PUT", self.base + path)
            for name, value in self._headers({"Content-Type": "application/octet-stream",
                                              "Content-Length": str(length)}).items():
                connection.putheader(name, value)
            connection.endheaders()
            try:
                connection.send(header)
                with open(source, "rb") as stream:
                    stream.seek(offset)
                    for chunk in iter(lambda: stream.read(CHUNK), b""):
                        connection.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server refused the body early (413): its answer says why
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            raise self.fault(error) from None
        finally:
            connection.close()
        if response.status >= 400:
            raise self.refusal(response.status, data)

    def download(self, path: str, target: Path, sha256: str) -> None:
        """GET a result into `target`, refused (one sentence) when its sha256 differs from the announced one."""
        digest = hashlib.sha256()
        connection = self.connect()
        try:
            connection.request("GET", self.base + path, headers=self._headers())
            response = connection.getresponse()
            if response.status >= 400:
                raise self.refusal(response.status, response.read())
            with open(target, "wb") as stream:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    digest.update(chunk)
                    stream.write(chunk)
        except (OSError, http.client.HTTPException) as error:
            raise self.fault(error) from None
        finally:
            connection.close()
        if digest.hexdigest() != sha256 or response.getheader("X-Content-SHA256", sha256) != sha256:
            target.unlink(missing_ok=True)
            raise RemoteError(f"The result {target.name} from {self.url} does not match its checksum; nothing was "
                              "imported.")

    # --------------------------------------------------------------------------------------------- API

    def health(self) -> dict[str, Any]:
        """The server's version, device and limits ("Test connection"); RemoteError when it cannot be used."""
        answer = self.request("GET", "/v1/health", timeout_s=min(self.timeout_s, 10.0))
        if not isinstance(answer, dict) or answer.get("api") != 1:
            raise RemoteError(f"{self.url} is not a MIADeepLearning inference server of a version this extension "
                              "understands.")
        return answer

    def describe(self, health: dict[str, Any]) -> str:
        """One line for "Test connection"."""
        device = (health.get("device") or {}).get("summary", "unknown device")
        return f"Connected to {self.url}: MIADeepLearning {health.get('version')}, {device}."

    def submit(self, task: str, model: str, inputs: dict[str, str], options: dict[str, Any] | None = None,
               device: str = "auto", outputs: dict[str, str] | None = None, folder: str | os.PathLike | None = None,
               on_event: EventCallback | None = None, on_log: LogCallback | None = None,
               timeout_s: float | None = None) -> RemoteJob:
        """Run one job on the server: inputs {role: NRRD path}; results land in `folder` (a new one if None)."""
        import tempfile

        job = jobs.Job(task=task, model=model, inputs=dict(inputs), outputs=dict(outputs or {}), device=device,
                       options=dict(options or {}), folder=str(folder or tempfile.mkdtemp(prefix="miadl-remote-")))
        return start_remote(job, self, on_event, on_log=on_log, timeout_s=timeout_s)


class RemoteJob(runner._JobHandle):
    """One job on the server, with the worker handle's interface (see runner._JobHandle).

    A background thread uploads, long-polls the events and downloads the results; `poll()` hands what it queued to
    the callbacks in the caller's thread (a QTimer in Slicer), exactly like the local runner.
    """

    def __init__(self, job: jobs.Job, server: RemoteServer, on_event: EventCallback | None,
                 on_log: LogCallback | None, timeout_s: float | None):
        super().__init__(job, on_event, on_log, timeout_s)
        self.server = server
        self.remote_id: str | None = None
        self.server_info: dict[str, Any] = {}
        self.pid = None
        self._queue: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="miadl-remote-job", daemon=True)

    def start(self) -> RemoteJob:
        self._log(f"Running on the inference server {self.server.url}")
        self._thread.start()
        return self

    def poll(self) -> list[jobs.Event]:
        events: list[jobs.Event] = []
        if self.state != runner.STATE_RUNNING:
            return events
        while True:
            try:
                kind, item = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "log":
                self._log(item)
            elif kind == "event":
                self._protocol_event(item, events)
            else:  # "end": the thread finished (final event already queued)
                self.state = item
        self._deliver(events)
        if self.state == runner.STATE_RUNNING and self.final_event is None and self._past_time_limit():
            self._stop_for_time_limit()
        elif self.state != runner.STATE_RUNNING and self.state != runner.STATE_DONE:
            runner.remove_job_outputs(self.job)
        return events

    def _release(self) -> None:
        try:
            self.server.request("DELETE", f"/v1/jobs/{self.remote_id}", timeout_s=5.0)
        except RemoteError:
            pass  # the server is gone, or removes the job after its time to live

    def _kill(self) -> int | None:
        """Cancel on the server (its worker is killed and its folder removed); the thread stops by itself."""
        self._cancelled.set()
        if self.remote_id is not None:
            try:
                self.server.request("DELETE", f"/v1/jobs/{self.remote_id}", timeout_s=10.0)
            except RemoteError as error:
                self._log(f"The server could not be told to cancel: {error}")
        return None

    # --------------------------------------------------------------------------------------------- thread

    def _emit(self, event: jobs.Event) -> None:
        if not self._cancelled.is_set():
            self._queue.put(("event", event))

    def _run(self) -> None:
        try:
            final, state = self._run_remote()
        except RemoteError as error:
            final, state = jobs.Event(stage=jobs.STAGE_ERROR, error_type="RemoteError", message=str(error)), \
                runner.STATE_ERROR
        except Exception as error:  # never a silent thread death: the run ends with one sentence
            final = jobs.Event(stage=jobs.STAGE_ERROR, error_type="RemoteError",
                               message=f"The remote run failed unexpectedly ({type(error).__name__}: {error}).")
            state = runner.STATE_ERROR
        if self._cancelled.is_set():
            return
        if state != runner.STATE_DONE and self.remote_id is not None:
            self._release()  # a job refused half way (an upload too large) must not hold a place on the server
        self._queue.put(("event", final))
        self._queue.put(("end", state))

    def _run_remote(self) -> tuple[jobs.Event, str]:
        job = self.job
        options = {key: value for key, value in job.options.items() if key not in LOCAL_OPTIONS}
        spec = {"task": job.task, "model": job.model, "device": job.device, "options": options,
                "inputs": list(job.inputs), "outputs": list(job.outputs)}
        created = self.server.request("POST", "/v1/jobs", spec)
        self.remote_id = created["job"]
        if self._cancelled.is_set():  # cancelled while the job was being created
            self._kill()
        self._emit(jobs.Event(stage="upload", progress=0.0, message="Sending the volumes to the server"))
        for role, path in job.inputs.items():
            if self._cancelled.is_set():
                return self._gone()
            self.server.upload(created["uploads"][role], path)
        self.server.request("POST", f"/v1/jobs/{self.remote_id}/start")
        after = log_after = 0
        failures = 0
        while not self._cancelled.is_set():
            try:
                answer = self.server.request(
                    "GET", f"/v1/jobs/{self.remote_id}/events?after={after}&log_after={log_after}&wait={POLL_WAIT_S:g}",
                    timeout_s=POLL_WAIT_S + 30.0)
                failures = 0
            except RemoteError as error:
                if self._cancelled.is_set():
                    break
                failures += 1
                self._queue.put(("log", f"Polling the server failed: {error}"))
                if failures >= RETRIES:
                    raise RemoteError(f"The connection to the server at {self.server.url} was lost while the job "
                                      "was running; the run was abandoned and nothing was imported.") from None
                time.sleep(0.5 * failures)
                continue
            for line in answer.get("log", []):
                self._queue.put(("log", f"[server] {line}"))
            log_after = answer.get("next_log", log_after)
            after = answer.get("next", after)
            for data in answer.get("events", []):
                known = {name: data[name] for name in jobs.Event.__dataclass_fields__ if name in data}
                event = jobs.Event(**known)
                if event.is_final:
                    return self._finish_remote(event)
                self._emit(event)
        return self._gone()

    def _gone(self) -> tuple[jobs.Event, str]:
        return jobs.Event(stage=jobs.STAGE_ERROR, error_type="CancelledError", message="Cancelled by the user."), \
            runner.STATE_CANCELLED

    def _finish_remote(self, event: jobs.Event) -> tuple[jobs.Event, str]:
        """Download and verify every result (all or nothing), then release the job on the server."""
        if event.stage != jobs.STAGE_DONE or event.result is None:
            return event, runner.STATE_ERROR
        result = dict(event.result)
        partial = self.job.partial_dir
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        local: dict[str, str] = {}
        self._emit(jobs.Event(stage="download", progress=0.97, message="Fetching the results from the server"))
        for role, entry in (result.get("outputs") or {}).items():
            if self._cancelled.is_set():
                return self._gone()
            name = _safe_name(self.job.outputs.get(role) or entry.get("name"), role)
            self.server.download(f"/v1/jobs/{self.remote_id}/results/{urllib.parse.quote(role)}", partial / name,
                                 str(entry.get("sha256")))
            local[role] = name
        shutil.rmtree(self.job.outputs_dir, ignore_errors=True)
        partial.rename(self.job.outputs_dir)
        result["outputs"] = {role: str(self.job.outputs_dir / name) for role, name in local.items()}
        server = dict(result.pop("server", None) or {})
        self.server_info = {"server": self.server.url, "version": server.get("version"), "device": server.get("device")}
        result["provenance"] = {**(result.get("provenance") or {}), "remote": self.server_info}
        (Path(self.job.folder) / jobs.RESULT_FILE_NAME).write_text(json.dumps(result, indent=2), encoding="utf-8")
        self._release()
        event.result = result
        return event, runner.STATE_DONE


def _safe_name(name: Any, role: str) -> str:
    """A plain file name for a result (never a path the server could choose)."""
    text = Path(str(name or "")).name
    if not text or text.startswith(".") or any(not (c.isalnum() or c in "._-") for c in text):
        return f"{role}.nrrd"
    return text


def start_remote(job: jobs.Job, server: RemoteServer, on_event: EventCallback | None = None,
                 on_log: LogCallback | None = None, timeout_s: float | None = None) -> RemoteJob:
    """Run `job` (built as mrml/task_run.launch builds it: inputs exported as NRRD into job.folder) on `server`;
    returns the handle TaskRun drives (the job folder is local and TaskRun removes it as usual)."""
    Path(job.folder).mkdir(parents=True, exist_ok=True)
    return RemoteJob(job, server, on_event, on_log, timeout_s).start()
