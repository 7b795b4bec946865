"""`python -m MIADeepLearningLib serve`: the inference server, so Slicer workstations without a GPU use a GPU server.

Why a server of our own at all: the unit of work is the worker task (jobs.py), and the server only moves it over
HTTP. Every job runs through the same worker as a local run (`runner.start`, or a warm worker with
``--warm-workers``), in a folder the server creates under its own root; the client never names a path on the server.
FastAPI and uvicorn are imported only when the server is built (`create_app`, `main`), so nothing else in the library
needs them and Slicer never does.

HTTP API (version 1; every request needs ``Authorization: Bearer <token>``; errors are JSON ``{"detail": one
sentence}``):

- ``GET /v1/health`` -> ``{"service", "api": 1, "version", "device": {summary}, "tasks", "max_upload_mb",
  "max_concurrent", "active"}``: for "Test connection" and the provenance.
- ``POST /v1/jobs`` with JSON ``{"task", "model", "device", "options", "inputs": [role, ...], "outputs": [role,
  ...]}`` -> 201 ``{"job": id, "uploads": {role: path}, "max_upload_bytes"}``; 400 for an unknown task, model, role,
  device or option; 429 when ``--max-concurrent`` jobs are already active (created or running).
- ``PUT /v1/jobs/{id}/inputs/{role}`` with the NRRD file as the raw body (attached data, raw or gzip encoding) ->
  204; 413 beyond ``--max-upload-mb`` (checked on Content-Length and while streaming), 400 for a file that is not a
  readable NRRD volume.
- ``POST /v1/jobs/{id}/start`` -> 202 once every input is uploaded (409 otherwise).
- ``GET /v1/jobs/{id}/events?after=N&wait=S`` -> ``{"events": [jobs.Event as dict], "log": [lines], "next": M,
  "next_log": L, "state"}``: long poll, answers as soon as there is something new or the job ended (at most S s).
  The final ``done`` event's ``result["outputs"]`` is ``{role: {"name", "size", "sha256"}}`` and ``result["server"]``
  ``{"version", "device"}``.
- ``GET /v1/jobs/{id}/results/{role}`` -> the file, with header ``X-Content-SHA256``; once every result was fetched
  the job folder is removed.
- ``DELETE /v1/jobs/{id}`` -> cancels a running job and removes its folder (the client calls it after the download).
Finished jobs whose results nobody fetched, and created jobs never started, are removed after ``--result-ttl-s``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from MIADeepLearningLib import __version__, jobs, runner
from MIADeepLearningLib.engine.errors import MIADLError

API_VERSION = 1
LOGGER = logging.getLogger("miadl.server")
ROLE_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,40}$")
MODEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:[0-9]{1,2})?)$")
JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
REGISTRY_TASKS = {"segment": "segmentation", "synthesize": "synthesis", "register": "registration",
                  "classify": "classification", "detect": "detection"}
SERVER_TASKS = (*REGISTRY_TASKS, "device")  # "import" writes into the server's model cache: never remote
OPTION_KEYS = {"model_options": dict, "type_check": bool}
MAX_OPTIONS_BYTES = 16 << 10
MAX_OPTION_DEPTH = 4
MAX_STRING = 200
DEFAULT_MAX_UPLOAD_MB = 1024
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_RESULT_TTL_S = 900.0
MAX_HEADER_BYTES = 64 << 10
NRRD_TYPE_BYTES = {
    "int8": 1, "signed char": 1, "uint8": 1, "unsigned char": 1, "uchar": 1, "int16": 2, "short": 2, "short int": 2,
    "signed short": 2, "signed short int": 2, "uint16": 2, "ushort": 2, "unsigned short": 2,
    "unsigned short int": 2, "int32": 4, "int": 4, "signed int": 4, "uint32": 4, "uint": 4, "unsigned int": 4,
    "int64": 8, "longlong": 8, "long long": 8, "long long int": 8, "signed long long": 8,
    "signed long long int": 8, "uint64": 8, "ulonglong": 8, "unsigned long long": 8, "unsigned long long int": 8,
    "float": 4, "double": 8,
}
MAX_VOXEL_BYTES = 16 << 30  # a header that promises more is refused before anything allocates it
CHUNK = 1 << 20


class RequestRefused(MIADLError):
    """A request the server answers with an HTTP error and one sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """Whether a --host value binds this computer only (then TLS may be left out)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------ validation


def _check_json_value(value: Any, where: str, depth: int = 0) -> None:
    """JSON types only, bounded, and no string that could be a path: the server chooses every path."""
    if depth > MAX_OPTION_DEPTH:
        raise RequestRefused(400, f"The option {where} is nested too deeply.")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestRefused(400, f"The option {where} is not a finite number.")
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING or any(mark in value for mark in ("/", "\\", "..", "\x00", "~")):
            raise RequestRefused(400, f"The option {where} is not accepted (no paths, at most {MAX_STRING} "
                                      "characters).")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_value(item, f"{where}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_#@.$-]{1,100}", key) or ".." in key:
                raise RequestRefused(400, f"The option name {str(key)[:40]!r} in {where} is not accepted.")
            _check_json_value(item, f"{where}.{key}", depth + 1)
        return
    raise RequestRefused(400, f"The option {where} is not a JSON value.")


def check_options(options: Any) -> dict[str, Any]:
    """The run options a remote job may set (model_options, type_check); names of volumes and paths never."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise RequestRefused(400, "The job options must be a JSON object.")
    if len(json.dumps(options)) > MAX_OPTIONS_BYTES:
        raise RequestRefused(400, f"The job options are larger than {MAX_OPTIONS_BYTES // 1024} KB.")
    for key, value in options.items():
        kind = OPTION_KEYS.get(key)
        if kind is None:
            raise RequestRefused(400, f"The job option {str(key)[:40]!r} is not accepted by the server (accepted: "
                                      f"{', '.join(OPTION_KEYS)}).")
        if not isinstance(value, kind):
            raise RequestRefused(400, f"The job option {key!r} must be a {kind.__name__}.")
        _check_json_value(value, key)
    return dict(options)


def _numbered_images(roles: list[str]) -> bool:
    return "image" in roles and all(role == "image" or re.fullmatch(r"image([2-9]|[1-9][0-9])", role)
                                    for role in roles)


def check_roles(task: str, inputs: Any, outputs: Any) -> tuple[list[str], dict[str, str]]:
    """The input roles (each becomes <role>.nrrd in the job folder) and role -> server file name of the outputs."""
    from MIADeepLearningLib.worker import DETECT_OUTPUTS, REGISTER_INPUTS, REGISTER_OUTPUTS, SALIENCY_PREFIX

    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) > 16 or len(outputs) > 32:
        raise RequestRefused(400, "The job's inputs and outputs must be lists of role names.")
    for role in [*inputs, *outputs]:
        if not isinstance(role, str) or not ROLE_PATTERN.match(role):
            raise RequestRefused(400, f"The role name {str(role)[:40]!r} is not accepted.")
    if len(set(inputs)) != len(inputs):
        raise RequestRefused(400, "An input role is given twice.")
    valid = {
        "segment": (_numbered_images(inputs), {"label", "masked", "uncertainty"}),
        "synthesize": (inputs == ["image"], {"image", "uncertainty", "difference"}),
        "register": ({"fixed", "moving"} <= set(inputs) <= set(REGISTER_INPUTS), set(REGISTER_OUTPUTS)),
        "classify": (bool(inputs), {f"{SALIENCY_PREFIX}{role}" for role in inputs}),
        "detect": (_numbered_images(inputs), set(DETECT_OUTPUTS)),
        "device": (not inputs, set()),
    }[task]
    if not valid[0]:
        raise RequestRefused(400, f"The inputs {', '.join(inputs) or '(none)'} do not fit a {task} job.")
    unknown = sorted(set(outputs) - valid[1])
    if unknown:
        raise RequestRefused(400, f"Unknown {task} output(s) {', '.join(unknown)}.")
    names = {**REGISTER_OUTPUTS, **DETECT_OUTPUTS} if task in ("register", "detect") else {}
    return list(inputs), {role: names.get(role, f"{role}.nrrd") for role in outputs}


def check_model(task: str, model_id: Any) -> str:
    """A model id of the server's registry, of the task's kind (the device report needs none)."""
    if task == "device":
        return ""
    if not isinstance(model_id, str) or not MODEL_PATTERN.match(model_id):
        raise RequestRefused(400, "The model id is not accepted.")
    from MIADeepLearningLib.engine import registry

    try:
        model = registry.get_model(model_id)
    except MIADLError:
        raise RequestRefused(400, f"The server has no model '{model_id}'.") from None
    if model.task != REGISTRY_TASKS[task]:
        raise RequestRefused(400, f"Model '{model_id}' is not a {REGISTRY_TASKS[task]} model.")
    return model_id


def _nrrd_header(path: Path) -> tuple[dict[str, str], int]:
    """The NRRD header's fields (lower-case names) and the byte offset of the data; RequestRefused when it is none."""
    with open(path, "rb") as stream:
        head = stream.read(MAX_HEADER_BYTES)
    if not head.startswith(b"NRRD000"):
        raise RequestRefused(400, "The upload is not a NRRD file.")
    end = head.find(b"\n\n")
    if end < 0:
        raise RequestRefused(400, "The NRRD header is cut short or longer than the server reads.")
    fields: dict[str, str] = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":=" in line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise RequestRefused(400, "The NRRD header has a line that is not a field.")
        fields[name.strip().lower()] = value.strip()
    return fields, end + 2


def check_nrrd(path: Path) -> str | None:
    """None when `path` (written by the server) is a NRRD volume SimpleITK reads whole; else one sentence.

    Detached data ("data file") would make the server read a file the client names, so it is refused before anything
    opens it; the data size is checked against the header before SimpleITK allocates what the header promises.
    """
    try:
        fields, offset = _nrrd_header(path)
        if "data file" in fields or "datafile" in fields:
            return "NRRD files with detached data are not accepted; send the data in the file."
        encoding = fields.get("encoding", "").lower()
        if encoding not in ("raw", "gzip", "gz"):
            return f"The NRRD encoding '{encoding[:20]}' is not accepted (raw or gzip)."
        item = NRRD_TYPE_BYTES.get(fields.get("type", "").lower())
        try:
            sizes = [int(value) for value in fields.get("sizes", "").split()]
            dimension = int(fields.get("dimension", "0"))
        except ValueError:
            return "The NRRD sizes or dimension are not whole numbers."
        if item is None or not 2 <= dimension <= 4 or len(sizes) != dimension or min(sizes) < 1:
            return "The NRRD header does not describe a volume (type, dimension and sizes)."
        needed = math.prod(sizes) * item
        if needed > MAX_VOXEL_BYTES:
            return "The NRRD volume is larger than the server accepts."
        have = path.stat().st_size - offset
        if encoding == "raw" and have < needed:
            return f"The NRRD file is cut short: {have} of {needed} data bytes."
        if encoding != "raw":
            total = 0
            with open(path, "rb") as raw:
                raw.seek(offset)
                with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    while total <= needed:
                        chunk = stream.read(CHUNK)
                        if not chunk:
                            break
                        total += len(chunk)
            if total < needed:
                return f"The NRRD file is cut short: {total} of {needed} data bytes."
    except RequestRefused as refusal:
        return str(refusal)
    except (OSError, EOFError, ValueError) as error:  # gzip.BadGzipFile is an OSError
        return f"The NRRD data cannot be read ({type(error).__name__})."
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("NrrdImageIO")
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError:
        return "The NRRD file cannot be read as a volume."
    if math.prod(image.GetSize()) * image.GetNumberOfComponentsPerPixel() != math.prod(sizes):
        return "The NRRD volume's size does not match its header."
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ jobs


@dataclass
class ServerJob:
    """One remote job: its folder under the server's root, its worker handle and what the client may fetch."""

    id: str
    task: str
    model: str
    device: str
    options: dict[str, Any]
    input_roles: list[str]
    outputs: dict[str, str]
    folder: Path
    state: str = "created"
    handle: Any = None
    uploaded: set[str] = field(default_factory=set)
    events: list[dict[str, Any]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> name, size, sha256, path
    fetched: set[str] = field(default_factory=set)
    created_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ("created", "running")


class JobStore:
    """The server's jobs, its worker processes and their clean-up; a poller thread moves worker events into jobs."""

    def __init__(self, root: Path, max_concurrent: int, max_upload_bytes: int, result_ttl_s: float,
                 job_timeout_s: float | None, warm_workers: int = 0, python_executable: str | None = None):
        self.root = root
        self.max_concurrent = max_concurrent
        self.max_upload_bytes = max_upload_bytes
        self.result_ttl_s = result_ttl_s
        self.job_timeout_s = job_timeout_s
        self.python_executable = python_executable or sys.executable
        self.jobs: dict[str, ServerJob] = {}
        self.lock = threading.RLock()
        self.device: dict[str, Any] = {"summary": "unknown"}
        self.warm = [runner.WarmWorker(self.python_executable, cwd=root) for _ in range(warm_workers)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="miadl-server-poller", daemon=True)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancel what runs, stop the warm workers and remove every job folder."""
        self._stop.set()
        with self.lock:
            for job in list(self.jobs.values()):
                self._remove(job)
            for worker in self.warm:
                worker.shutdown(timeout_s=5)

    def get(self, job_id: str) -> ServerJob:
        job = self.jobs.get(job_id) if JOB_ID_PATTERN.match(job_id) else None
        if job is None:
            raise RequestRefused(404, "The server has no such job (it finished, was cancelled or expired).")
        return job

    def create(self, spec: Any) -> ServerJob:
        if not isinstance(spec, dict):
            raise RequestRefused(400, "The job description must be a JSON object.")
        task = spec.get("task")
        if task not in SERVER_TASKS:
            raise RequestRefused(400, f"The task {str(task)[:40]!r} is not offered by the server (offered: "
                                      f"{', '.join(SERVER_TASKS)}).")
        device = spec.get("device", "auto")
        if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
            raise RequestRefused(400, "The device must be auto, cpu, cuda or cuda:N.")
        model = check_model(task, spec.get("model"))
        inputs, outputs = check_roles(task, spec.get("inputs", []), spec.get("outputs", []))
        options = check_options(spec.get("options"))
        with self.lock:
            active = sum(job.active for job in self.jobs.values())
            if active >= self.max_concurrent:
                raise RequestRefused(429, f"The server is already running its limit of {self.max_concurrent} "
                                          "job(s); try again when one has finished.")
            job_id = uuid.uuid4().hex
            folder = Path(tempfile.mkdtemp(prefix=f"job-{job_id[:8]}-", dir=self.root))
            job = ServerJob(job_id, task, model, device, options, inputs, outputs, folder)
            self.jobs[job_id] = job
        LOGGER.info("job %s created: task %s, model %s, device %s", job_id, task, model or "-", device)
        return job

    def input_path(self, job: ServerJob, role: str) -> Path:
        if role not in job.input_roles:
            raise RequestRefused(404, f"The job has no input '{role[:40]}'.")
        if job.state != "created":
            raise RequestRefused(409, "The job has already started; its inputs cannot change.")
        return job.folder / f"input_{role}.nrrd"  # role matched ROLE_PATTERN: never a path

    def launch(self, job: ServerJob) -> None:
        with self.lock:
            if job.state != "created":
                raise RequestRefused(409, "The job has already started.")
            missing = [role for role in job.input_roles if role not in job.uploaded]
            if missing:
                raise RequestRefused(409, f"The input(s) {', '.join(missing)} are not uploaded yet.")
            work = jobs.Job(task=job.task, model=job.model, device=job.device, options=job.options,
                            inputs={role: str(job.folder / f"input_{role}.nrrd") for role in job.input_roles},
                            outputs=dict(job.outputs), folder=str(job.folder))
            on_event = self._collector(job)
            idle = next((worker for worker in self.warm if not worker.is_busy()), None)
            if idle is not None:
                job.handle = idle.submit(work, on_event=on_event, timeout_s=self.job_timeout_s)
            else:
                job.handle = runner.start(work, python_executable=self.python_executable, on_event=on_event,
                                          timeout_s=self.job_timeout_s)
            job.state = "running"
        LOGGER.info("job %s started (%s)", job.id, "warm worker" if idle is not None else "new worker process")

    @staticmethod
    def _collector(job: ServerJob):
        def collect(event: jobs.Event) -> None:
            if not event.is_final:  # the final event is published once the handle has ended (see _loop)
                event.job = None
                job.events.append(json.loads(event.to_line()))

        return collect

    def cancel(self, job: ServerJob) -> None:
        with self.lock:
            if job.state == "running" and job.handle is not None and job.handle.is_running():
                job.handle.cancel()
                LOGGER.info("job %s cancelled by the client", job.id)
            self._remove(job)

    def fetched(self, job: ServerJob, role: str) -> None:
        with self.lock:
            job.fetched.add(role)
            if job.results and set(job.results) <= job.fetched:
                self._remove(job)

    def _remove(self, job: ServerJob) -> None:
        if job.handle is not None and job.handle.is_running():
            job.handle.cancel()
        if job.state in ("created", "running"):
            job.state = "cancelled"
            job.finished_at = time.monotonic()
        self.jobs.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)

    def _finish(self, job: ServerJob) -> None:
        """Publish the final event: outputs become name/size/sha256 (the client never sees a server path)."""
        handle = job.handle
        final = handle.final_event or jobs.Event(stage=jobs.STAGE_ERROR, error_type="WorkerError",
                                                 message="The worker ended without a result.")
        event = json.loads(final.to_line())
        event.pop("job", None)
        if final.stage == jobs.STAGE_DONE and handle.state == runner.STATE_DONE:
            result = dict(event.get("result") or {})
            outputs = {}
            for role, path in (result.get("outputs") or {}).items():
                file = Path(path)
                job.results[role] = {"name": file.name, "size": file.stat().st_size, "sha256": file_sha256(file),
                                     "path": file}
                outputs[role] = {key: value for key, value in job.results[role].items() if key != "path"}
            result["outputs"] = outputs
            result["server"] = {"version": __version__, "device": self.device.get("summary")}
            event["result"] = result
        job.log.extend(handle.log_lines)
        job.events.append(event)
        job.state = handle.state
        job.finished_at = time.monotonic()
        LOGGER.info("job %s ended: %s", job.id, job.state)

    def _loop(self) -> None:
        last_sweep = 0.0
        while not self._stop.wait(0.02):
            with self.lock:
                for job in list(self.jobs.values()):
                    if job.state == "running" and job.handle is not None:
                        try:
                            job.handle.poll()
                            if not job.handle.is_running():
                                self._finish(job)
                        except Exception:  # one job's fault must not stop the server
                            LOGGER.exception("job %s: polling failed", job.id)
                            job.handle.cancel()
                            job.state = runner.STATE_CRASHED
                            job.finished_at = time.monotonic()
                if time.monotonic() - last_sweep > 1.0:
                    last_sweep = time.monotonic()
                    self._sweep()

    def _sweep(self) -> None:
        """Remove jobs whose results nobody fetched, and jobs created but never started, after the time to live."""
        now = time.monotonic()
        for job in list(self.jobs.values()):
            since = job.finished_at if job.finished_at is not None else job.created_at
            if job.state != "running" and now - since > self.result_ttl_s:
                LOGGER.info("job %s expired", job.id)
                self._remove(job)

    def measure_device(self) -> None:
        """The device report of the worker's Python, once at start: /health and the provenance name the device."""
        folder = Path(tempfile.mkdtemp(prefix="device-", dir=self.root))
        try:
            handle = runner.run(jobs.Job(task="device", model="", inputs={}, folder=str(folder)),
                                python_executable=self.python_executable, timeout_s=300)
            report = (handle.final_event.result or {}).get("report", {}) if handle.state == runner.STATE_DONE else {}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        gpus = [gpu.get("name", "GPU") for gpu in report.get("gpus", [])]
        summary = (f"CUDA: {', '.join(gpus)}" if report.get("cuda_usable") and gpus
                   else f"CPU ({report.get('cpu_threads', '?')} threads)" if report else "unknown")
        self.device = {"summary": summary, "torch": report.get("torch"), "cuda_usable": report.get("cuda_usable"),
                       "gpus": gpus, "auto_choice": report.get("auto_choice")}


# ------------------------------------------------------------------------------------------------ HTTP


def create_app(store: JobStore, token: str):
    """The FastAPI application (imported here, so only the server needs FastAPI)."""
    import asyncio
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, JSONResponse, Response
    from starlette.background import BackgroundTask

    expected = token.encode("utf-8")

    def typed(function):
        """FastAPI reads parameter types from annotations; this module's are strings (postponed evaluation) naming
        classes imported here, inside the function, so they are given as the classes themselves."""
        function.__annotations__.update({name: Request for name, kind in function.__annotations__.items()
                                         if kind == "Request"})
        return function

    @typed
    def authorised(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), expected):
            raise RequestRefused(401, "The server did not accept the token.")

    @asynccontextmanager
    async def lifespan(app):
        store.start()
        yield
        await run_in_threadpool(store.stop)

    app = FastAPI(title="MIADeepLearning inference server", version=__version__, lifespan=lifespan,
                  dependencies=[Depends(authorised)], docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestRefused)
    @typed
    async def refused(request: Request, error: RequestRefused):
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.get("/v1/health")
    async def health():
        with store.lock:
            active = sum(job.active for job in store.jobs.values())
        return {"service": "MIADeepLearning inference server", "api": API_VERSION, "version": __version__,
                "device": store.device, "tasks": list(SERVER_TASKS), "max_concurrent": store.max_concurrent,
                "max_upload_mb": store.max_upload_bytes / 2**20, "active": active}

    @app.post("/v1/jobs", status_code=201)
    @typed
    async def create(request: Request):
        body = await _read_small(request, MAX_OPTIONS_BYTES * 4)
        try:
            spec = json.loads(body)
        except ValueError:
            raise RequestRefused(400, "The job description is not JSON.") from None
        job = await run_in_threadpool(store.create, spec)
        return {"job": job.id, "uploads": {role: f"/v1/jobs/{job.id}/inputs/{role}" for role in job.input_roles},
                "max_upload_bytes": store.max_upload_bytes}

    @app.put("/v1/jobs/{job_id}/inputs/{role}", status_code=204)
    @typed
    async def upload(job_id: str, role: str, request: Request):
        job = store.get(job_id)
        path = store.input_path(job, role)
        limit = store.max_upload_bytes
        too_large = RequestRefused(413, f"The volume is larger than the server accepts ({limit / 2**20:g} MB).")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_large
        total = 0
        try:
            with open(path, "wb") as stream:
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > limit:
                        raise too_large
                    stream.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        problem = await run_in_threadpool(check_nrrd, path)
        if problem:
            path.unlink(missing_ok=True)
            raise RequestRefused(400, problem)
        job.uploaded.add(role)
        return Response(status_code=204)

    @app.post("/v1/jobs/{job_id}/start", status_code=202)
    async def start(job_id: str):
        job = store.get(job_id)
        await run_in_threadpool(store.launch, job)
        return {"job": job.id, "state": job.state}

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, after: int = 0, log_after: int = 0, wait: float = 10.0):
        job = store.get(job_id)
        deadline = time.monotonic() + max(0.0, min(wait, 30.0))
        while (len(job.events) <= after and len(job.log) <= log_after and job.state == "running"
               and time.monotonic() < deadline and job.id in store.jobs):
            await asyncio.sleep(0.02)
        return {"events": job.events[max(0, after):], "log": job.log[max(0, log_after):], "next": len(job.events),
                "next_log": len(job.log), "state": job.state}

    @app.get("/v1/jobs/{job_id}/results/{role}")
    async def result(job_id: str, role: str):
        job = store.get(job_id)
        entry = job.results.get(role)
        if entry is None:
            raise RequestRefused(404, f"The job has no result '{role[:40]}'.")
        return FileResponse(entry["path"], media_type="application/octet-stream",
                            headers={"X-Content-SHA256": entry["sha256"]},
                            background=BackgroundTask(store.fetched, job, role))

    @app.delete("/v1/jobs/{job_id}")
    async def delete(job_id: str):
        job = store.get(job_id)
        await run_in_threadpool(store.cancel, job)
        return {"job": job.id, "state": job.state}

    return app


async def _read_small(request, limit: int) -> bytes:
    """A JSON body, refused with 413 past `limit` bytes (read in chunks, never all at once first)."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise RequestRefused(413, "The job description is too large.")
    return bytes(data)


# ------------------------------------------------------------------------------------------------ command line


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m MIADeepLearningLib serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; any other "
                                                            "than a loopback address needs --tls-cert/--tls-key)")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--token-file", required=True, help="file holding the token every request must carry")
    parser.add_argument("--tls-cert", help="the server's certificate (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help="largest input volume accepted, in MB (default %(default)s)")
    parser.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT,
                        help="jobs active at once; one more is refused with 429 (default %(default)s)")
    parser.add_argument("--warm-workers", type=int, default=0,
                        help="worker processes kept with their model loaded between jobs (default 0: a new worker "
                             "process per job)")
    parser.add_argument("--result-ttl-s", type=float, default=DEFAULT_RESULT_TTL_S,
                        help="results nobody fetched are removed after this many seconds (default %(default)s)")
    parser.add_argument("--job-timeout-s", type=float, default=None, help="stop a job that runs longer")
    parser.add_argument("--root", help="folder for the job folders (default: a new temporary folder)")
    return parser


class _NoQueryInAccessLog(logging.Filter):
    """uvicorn's access log prints each request line; a client that wrongly put the token in a URL must not get it
    written to the log, so the query string is dropped (the API's queries are only counters and waits)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            record.args = (*record.args[:2], record.args[2].split("?", 1)[0], *record.args[3:])
        return True


def read_token(path: str) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as error:
        raise MIADLError(f"The token file {path} cannot be read ({error.strerror}).") from None
    if len(token) < 16 or any(character.isspace() for character in token):
        raise MIADLError("The token must be at least 16 characters without spaces.")
    return token


def serve(args: argparse.Namespace) -> int:
    """Start the server; refuses plain HTTP beyond loopback in one sentence."""
    if not is_loopback(args.host) and not (args.tls_cert and args.tls_key):
        raise MIADLError(f"The server listens on {args.host}, which is not a loopback address, so it needs "
                         "--tls-cert and --tls-key (TLS is required off this computer).")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise MIADLError("--tls-cert and --tls-key go together.")
    if args.max_concurrent < 1 or args.max_upload_mb <= 0:
        raise MIADLError("--max-concurrent must be at least 1 and --max-upload-mb above 0.")
    token = read_token(args.token_file)
    import uvicorn

    owned = not args.root
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="miadl-server-"))
    store = JobStore(root, args.max_concurrent, int(args.max_upload_mb * 2**20), args.result_ttl_s,
                     args.job_timeout_s, warm_workers=max(0, args.warm_workers))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    root.mkdir(parents=True, exist_ok=True)
    store.measure_device()
    LOGGER.info("MIADeepLearning %s server on %s:%s (%s), device %s, jobs under %s", __version__, args.host,
                args.port, "TLS" if args.tls_cert else "plain HTTP, loopback only", store.device["summary"], root)
    logging.getLogger("uvicorn.access").addFilter(_NoQueryInAccessLog())
    try:
        uvicorn.run(create_app(store, token), host=args.host, port=args.port, ssl_certfile=args.tls_cert,
                    ssl_keyfile=args.tls_key, log_level="info", server_header=False, proxy_headers=False)
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return serve(args)
    except MIADLError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
