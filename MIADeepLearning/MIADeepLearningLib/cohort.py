"""One runner for every folder (cohort) run of the command line: segment, synthesize and register pairs.

A cohort is a list of cases (inputs -> outputs). The runner skips a case that is already done (its outputs and a
provenance sidecar exist, and the sidecar's input and model-weight sha256 still match), runs the others on an
executor, retries a case that fails (or whose worker died) once, and writes the report row by row. Two executors:
``local`` runs the cases one after another in this process (the model loaded once, as before); ``ray`` runs them
on a pool of Ray actors, each of which loads the model once, on a local Ray instance (loopback only) or on any Ray
cluster (``--ray-address``), so scheduling, restarts and resource accounting (CPUs, GPUs) are Ray's, not ours.

Outputs are written into a staging folder and moved into place, and the sidecar
(``<output>/.miadl-cohort/<case>.json``) is written last, atomically: a run that is killed leaves no case counted as
done that is not. Ray and tqdm are imported only when used (neither is needed inside Slicer).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from MIADeepLearningLib.engine.errors import InputError, MIADLError, ModelError

STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = "ok", "failed", "skipped"
MAX_ATTEMPTS = 2  # a failing case (or a dead worker) is retried once
SIDECAR_DIR = ".miadl-cohort"  # in the output folder: <case>.json per finished case, partial/ while writing
SIDECAR_VERSION = 1
FAULT_ENV = "MIADL_COHORT_FAULT"  # tests: "CASE:raise" or "CASE:exit" (worker dies) on the case's first attempt
RAY_PIN = "2.60.0"  # pyproject.toml [project.optional-dependencies] dev
RAY_INSTALL_HINT = f"pip install ray=={RAY_PIN}"
ENGINES = ("local", "ray")


class CohortError(MIADLError):
    """A cohort run that cannot start (Ray missing or unreachable, resources that do not exist): exit code 2."""


@dataclass
class Case:
    """One case: the input files by role (image; fixed, moving) and the output files by role (output, masked ...)."""

    name: str
    inputs: dict[str, Path]
    outputs: dict[str, Path]


@dataclass
class TaskSpec:
    """What every case runs: sent once to each worker (plain data, so it pickles to a Ray actor)."""

    kind: str  # segment | synthesize | register
    model_id: str
    device: str = "auto"
    options: dict[str, Any] | None = None
    type_check: bool | None = None
    weights_sha256: dict[str, str] = field(default_factory=dict)


@dataclass
class EngineChoice:
    """--engine, --ray-address, --workers, --cpus-per-worker, --gpus-per-worker."""

    engine: str = "local"
    ray_address: str | None = None
    workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0.0


def sha256_of(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for chunk in iter(lambda: file.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(case: Case) -> Path:
    """The sidecar lives beside the case's first output, in the hidden cohort folder."""
    return next(iter(case.outputs.values())).parent / SIDECAR_DIR / f"{case.name}.json"


def _input_hashes(case: Case) -> dict[str, str | None]:
    hashes: dict[str, str | None] = {}
    for role, path in case.inputs.items():
        try:
            hashes[role] = sha256_of(path)
        except OSError:
            hashes[role] = None  # the run reports why the file cannot be read
    return hashes


def is_done(case: Case, spec: TaskSpec, input_sha256: dict[str, str | None]) -> dict[str, Any] | None:
    """The sidecar of a case that needs no rerun (same inputs, same weights, same outputs, all present), else None."""
    try:
        record = json.loads(sidecar_path(case).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = (record.get("version") == SIDECAR_VERSION and record.get("task") == spec.kind
            and record.get("model_id") == spec.model_id and record.get("weights_sha256") == spec.weights_sha256
            and record.get("options") == _jsonable(spec.options)
            and record.get("input_sha256") == input_sha256 and None not in input_sha256.values()
            and record.get("outputs") == {role: path.name for role, path in case.outputs.items()})
    if not same or not all(path.is_file() for path in case.outputs.values()):
        return None
    return record


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str)) if value is not None else None


# ------------------------------------------------------------------------------------------------ the worker


def _fault(case: str, attempt: int) -> str | None:
    """The fault a test injected for this case's first attempt (MIADL_COHORT_FAULT="a:raise,b:exit"), if any."""
    for item in os.environ.get(FAULT_ENV, "").split(","):
        name, _, action = item.strip().rpartition(":")
        if name == case and attempt == 1:
            return action
    return None


def _write_atomically(files: dict[Path, Any], staging: Path) -> None:
    """Write every file into `staging` (same folder tree, so a .mhd keeps its data file's name), then move them into
    place: a case killed while writing leaves only the staging folder, which nothing counts as output."""
    from MIADeepLearningLib.engine import imageio

    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for target, content in files.items():
            if callable(content):
                content(staging / target.name)
            else:
                imageio.write_image(content, staging / target.name)
        destination = next(iter(files)).parent
        for written in sorted(staging.iterdir()):
            os.replace(written, destination / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_json_atomically(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(content, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(partial, path)


def _no_progress(stage: str, fraction: float, message: str) -> None:
    """A Ray actor's stages are not streamed: the runner shows cases, not stages."""


class CaseWorker:
    """Runs cases of one TaskSpec with the model loaded once (the engine's pipeline_cache): in this process for
    the local engine, as a Ray actor for the ray engine."""

    def __init__(self, spec: TaskSpec, threads: int | None = None, worker_id: str | None = None,
                 in_ray: bool = False):
        self.spec = spec
        self.pipeline_cache: dict = {}
        self.in_ray = in_ray
        if threads:
            import torch

            torch.set_num_threads(max(1, int(threads)))
        self.worker_id = worker_id or str(os.getpid())
        if in_ray:
            import ray

            self.worker_id = f"{ray.get_runtime_context().get_actor_id()[:12]}/{os.getpid()}"

    def run(self, job: dict[str, Any], progress: Callable[[str, float, str], None] | None = None) -> dict[str, Any]:
        """One case: {"case", "inputs", "outputs", "input_sha256", "attempt"} in; a result dict out (never raises
        for a case that fails: the runner decides about retries)."""
        case = Case(job["case"], {k: Path(v) for k, v in job["inputs"].items()},
                    {k: Path(v) for k, v in job["outputs"].items()})
        started = time.perf_counter()
        result: dict[str, Any] = {"case": case.name, "worker": self.worker_id, "attempt": job["attempt"]}
        sidecar = sidecar_path(case)
        sidecar.unlink(missing_ok=True)  # from now on this case is not done until its outputs are in place
        cached_before = set(self.pipeline_cache)
        try:
            fault = _fault(case.name, job["attempt"])
            if fault == "exit" and self.in_ray:
                os._exit(17)  # a worker that dies mid-case (tests)
            if fault:
                raise RuntimeError(f"injected fault ({FAULT_ENV})")
            files, provenance, warnings, timings = self._compute(case, progress)
            _write_atomically(files, sidecar.parent / "partial" / f"{case.name}-{os.getpid()}")
            record = {"version": SIDECAR_VERSION, "case": case.name, "task": self.spec.kind,
                      "model_id": self.spec.model_id, "weights_sha256": self.spec.weights_sha256,
                      "options": _jsonable(self.spec.options), "input_sha256": job["input_sha256"],
                      "inputs": {role: str(path) for role, path in case.inputs.items()},
                      "outputs": {role: path.name for role, path in case.outputs.items()},
                      "provenance": provenance}
            _write_json_atomically(sidecar, record)
            result.update(status=STATUS_OK, warnings=warnings, provenance=provenance,
                          model_loaded_seconds=timings.get("load_model"))
        except MIADLError as error:
            result.update(status=STATUS_FAILED, error=str(error), model_error=isinstance(error, ModelError))
        except Exception as error:  # a bad case must not end the cohort
            result.update(status=STATUS_FAILED, error=f"Unexpected error ({type(error).__name__}: {error}).",
                          traceback=traceback.format_exc().rstrip())
        if result["status"] != STATUS_OK:
            for path in case.outputs.values():  # no older output of the same name that the report would contradict
                if path.is_file():
                    path.unlink()
        if not set(self.pipeline_cache) - cached_before:  # shows in the log that a worker loads the model once
            result.pop("model_loaded_seconds", None)
        else:
            result.setdefault("model_loaded_seconds", None)
        result["seconds"] = time.perf_counter() - started
        return result

    def _compute(self, case: Case, progress) -> tuple[dict[Path, Any], dict, list[str], dict[str, float]]:
        """(files to write, provenance, warnings, timings) of one case."""
        from MIADeepLearningLib.engine import tasks

        spec, out = self.spec, case.outputs
        common = {"device": spec.device, "progress": progress or _no_progress, "pipeline_cache": self.pipeline_cache,
                  "type_check": spec.type_check}
        if spec.kind == "segment":
            path = case.inputs["image"]
            result = tasks.segment_image(path, spec.model_id, options=spec.options,
                                         create_masked_volume="masked" in out, input_name=path.name, **common)
            images = {"output": result.label, "masked": result.masked, "uncertainty": result.uncertainty}
            provenance = {"segments": result.segments, **result.provenance}
        elif spec.kind == "synthesize":
            options = {**(spec.options or {}), "uncertainty": "uncertainty" in out, "difference": "difference" in out}
            result = tasks.synthesize_image(case.inputs["image"], spec.model_id, options=options, **common)
            images = {"output": result.image, "uncertainty": result.uncertainty, "difference": result.difference}
            provenance = result.provenance
        elif spec.kind == "register":
            from MIADeepLearningLib.engine import displacement

            result = tasks.register_images(case.inputs["fixed"], case.inputs["moving"], spec.model_id,
                                           options=spec.options, **common)
            report = result.report
            images = {"output": result.warped,
                      "transform": lambda path: displacement.write_field(result.field, path),
                      "report": lambda path: path.write_text(json.dumps(report, indent=2), encoding="utf-8")}
            provenance = result.provenance
        else:
            raise InputError(f"Unknown cohort task '{spec.kind}'.")
        return ({path: images[role] for role, path in out.items()}, provenance, list(result.warnings),
                dict(result.timings))

    def ping(self) -> str:
        return self.worker_id


# ------------------------------------------------------------------------------------------------ executors


class LocalExecutor:
    """One case at a time in this process (the engine as before --engine existed)."""

    def __init__(self, spec: TaskSpec, choice: EngineChoice, stage: Callable[[str, float, str], None] | None):
        self.slots = 1
        self.stage = stage
        self._threads_before: int | None = None
        if choice.cpus_per_worker:
            import torch

            self._threads_before = torch.get_num_threads()
        self.worker = CaseWorker(spec, threads=int(choice.cpus_per_worker or 0) or None)
        self._done: list[tuple[dict, dict]] = []
        self.description = "local (this process)"

    def busy(self) -> int:
        return len(self._done)

    def can_submit(self) -> bool:
        return not self._done

    def submit(self, job: dict[str, Any]) -> None:
        self._done.append((job, self.worker.run(job, self.stage)))

    def wait(self) -> list[tuple[dict, dict]]:
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        if self._threads_before is not None:
            import torch

            torch.set_num_threads(self._threads_before)


# Ray turns "127.0.0.1" into the machine's network address and its servers listen there, unless multi-node
# clustering is off for the instance (Ray's own switch, read when ray is imported and when the node starts): then
# every server of the local instance listens on 127.0.0.1 only.
_RAY_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _import_ray(local: bool = False):
    """Ray, imported on first use; `local`: set up for a loopback-only instance before the import."""
    if local:
        os.environ[_RAY_SINGLE_NODE_ENV] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
    try:
        import ray
    except ImportError:
        raise CohortError(f"--engine ray needs Ray, which is not installed here: {RAY_INSTALL_HINT}") from None
    return ray


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """A cluster that cannot be reached is named in one sentence within seconds (Ray itself retries for minutes)."""
    if address == "auto":
        return  # Ray finds the cluster started on this machine, or says there is none
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise CohortError(f"--ray-address {address} must be HOST:PORT, ray://HOST:PORT or auto.")
    import socket

    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise CohortError(f"Could not reach the Ray cluster at {address} ({error.strerror or error}).") from None


def start_local_ray(num_cpus: int | None = None, num_gpus: int | None = None):
    """A Ray instance on this machine: listening on loopback only (checked), no dashboard, no usage report, quiet
    logs. Returns the ray module."""
    ray = _import_ray(local=True)
    from ray._private import ray_constants  # already imported by ray itself; the switch above, if ray came first

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", _node_ip_address="127.0.0.1", configure_logging=True)
    addresses = {node.get("NodeManagerAddress") for node in ray.nodes()}
    if addresses != {"127.0.0.1"}:
        ray.shutdown()
        raise CohortError(f"The local Ray instance did not stay on loopback (it listens on {sorted(addresses)}).")
    return ray


def _worker_env() -> dict[str, str]:
    """What every actor needs from this process: the library on its path and the MIADL_* settings."""
    from MIADeepLearningLib.paths import library_parent_dir

    env = {key: value for key, value in os.environ.items() if key.startswith("MIADL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(library_parent_dir()), os.environ.get("PYTHONPATH")]))
    return env


class RayExecutor:
    """A pool of Ray actors, each a CaseWorker (the model loaded once per actor), one case in flight per actor.

    Ray restarts an actor whose process died; the case it was running comes back as a failure of kind "died" and
    the runner retries it like any other failed case.
    """

    def __init__(self, spec: TaskSpec, choice: EngineChoice, cases_to_run: int):
        ray = _import_ray(local=not choice.ray_address and "ray" not in sys.modules)
        self.ray = ray
        self.started_here = False
        if choice.ray_address:
            check_ray_address(choice.ray_address)
        if not ray.is_initialized():  # else: the caller's instance (tests, a notebook)
            try:
                if choice.ray_address:
                    ray.init(address=choice.ray_address, log_to_driver=False, logging_level="ERROR",
                             configure_logging=True)
                else:
                    start_local_ray()
            except CohortError:
                raise
            except Exception as error:
                where = f"the Ray cluster at {choice.ray_address}" if choice.ray_address else "a local Ray instance"
                text = " ".join(str(error).split())[:200]
                raise CohortError(f"Could not connect to {where} ({type(error).__name__}: {text}).") from None
            self.started_here = True
        try:
            self._start_actors(spec, choice, cases_to_run)
        except BaseException:
            self.close()
            raise

    def _start_actors(self, spec: TaskSpec, choice: EngineChoice, cases_to_run: int) -> None:
        ray = self.ray
        cpus = choice.cpus_per_worker or 1.0
        gpus = choice.gpus_per_worker or 0.0
        total = ray.cluster_resources()
        fit = int(total.get("CPU", 0) // cpus) if cpus else cases_to_run
        if gpus:
            fit = min(fit, int(total.get("GPU", 0) // gpus))
        workers = choice.workers or max(1, fit)
        if fit < workers and not choice.ray_address:
            have = f"{total.get('CPU', 0):g} CPUs" + (f" and {total.get('GPU', 0):g} GPUs" if gpus else "")
            raise CohortError(f"{workers} workers with {cpus:g} CPUs{f' and {gpus:g} GPUs' if gpus else ''} each do "
                              f"not fit on this Ray instance ({have}); use fewer --workers or less per worker.")
        workers = max(1, min(workers, cases_to_run))
        actor_class = ray.remote(CaseWorker).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=2 * workers + 1, max_task_retries=0,
            runtime_env={"env_vars": _worker_env()})
        threads = max(1, int(cpus))
        self.actors = [actor_class.remote(spec, threads=threads, in_ray=True) for _ in range(workers)]
        self.slots = workers
        self.idle = deque(self.actors)
        self.flight: dict[Any, tuple[Any, dict]] = {}
        self.pinging: dict[Any, Any] = {}  # actors Ray is restarting after their process died
        where = choice.ray_address or "local instance"
        self.description = f"ray ({where}): {workers} workers x {cpus:g} CPU{f' {gpus:g} GPU' if gpus else ''}"

    def busy(self) -> int:
        return len(self.flight)

    def can_submit(self) -> bool:
        return bool(self.idle)

    def submit(self, job: dict[str, Any]) -> None:
        actor = self.idle.popleft()
        self.flight[actor.run.remote(job)] = (actor, job)

    def wait(self) -> list[tuple[dict, dict]]:
        """The cases that finished (at least one, unless only restarting workers came back)."""
        ray = self.ray
        if not self.flight and not self.pinging:
            raise CohortError("Every Ray worker of this run died and none could be restarted; see the Ray logs.")
        ready, _ = ray.wait([*self.flight, *self.pinging], num_returns=1)
        done = []
        for ref in ready:
            if ref in self.pinging:
                self._pinged(ref)
                continue
            actor, job = self.flight.pop(ref)
            try:
                result = ray.get(ref)
                self.idle.append(actor)
            except ray.exceptions.RayActorError as error:
                detail = " ".join(str(error).split())[:160]
                result = {"case": job["case"], "status": STATUS_FAILED, "attempt": job["attempt"], "seconds": 0.0,
                          "worker": "", "died": True,
                          "error": f"The worker running this case died ({type(error).__name__}: {detail})."}
                self.pinging[actor.ping.remote()] = actor  # back in the pool once Ray has restarted it
            except Exception as error:
                self.idle.append(actor)
                result = {"case": job["case"], "status": STATUS_FAILED, "attempt": job["attempt"], "seconds": 0.0,
                          "worker": "", "error": f"Unexpected error ({type(error).__name__}: {error})."}
            done.append((job, result))
        return done

    def _pinged(self, ref: Any) -> None:
        ray = self.ray
        actor = self.pinging.pop(ref)
        try:
            ray.get(ref)
            self.idle.append(actor)
        except ray.exceptions.ActorDiedError:
            self.slots -= 1  # Ray gave up on it (restarts used up)
        except ray.exceptions.RayActorError:
            time.sleep(0.2)  # still restarting
            self.pinging[actor.ping.remote()] = actor

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            try:
                self.ray.kill(actor)
            except Exception:  # already gone
                pass
        if self.started_here:
            self.ray.shutdown()


# ------------------------------------------------------------------------------------------------ progress


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class CohortProgress:
    """A tqdm bar on a terminal (finished cases print above it); plain lines when stderr is a file or a pipe
    (logs, CI): one when a case starts, one when it ends; nothing with -q."""

    def __init__(self, total: int, quiet: bool = False, stream: TextIO | None = None):
        self.total, self.quiet = total, quiet
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self.finished = 0
        self.bar = None
        if not quiet and hasattr(self.stream, "isatty") and self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, file=self.stream, unit="case", dynamic_ncols=True, leave=True)

    def _times(self) -> str:
        elapsed = time.perf_counter() - self.started
        eta = format_duration(elapsed / self.finished * (self.total - self.finished)) if self.finished else "--"
        return f"elapsed {format_duration(elapsed)}, ETA {eta}"

    def case_started(self, index: int, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=True)
        elif not self.quiet:
            self.line(f"[{index}/{self.total}] {name} ...")

    def stage(self, stage: str, fraction: float, message: str) -> None:
        """The engine's progress callback (local engine): the current stage on the bar."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"{stage} {100 * fraction:3.0f}%", refresh=False)

    def case_finished(self, index: int, name: str, status: str, seconds: float, detail: str) -> None:
        self.finished += 1
        if self.quiet:
            return
        word = "ok" if status == STATUS_OK else status.upper()
        text = f"[{index}/{self.total}] {name}: {word}" + (f" in {seconds:.1f} s" if status != STATUS_SKIPPED else "")
        self.line(f"{text}{detail} | {self._times()}")
        if self.bar is not None:
            self.bar.update(1)

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------ the runner


@dataclass
class CohortOutcome:
    rows: list[dict[str, Any]]
    provenance: dict[str, Any]  # case -> provenance of every case done (ok or skipped)
    model_problem: MIADLError | None
    seconds: float
    engine: str


def run_cohort(cases: list[Case], spec: TaskSpec, choice: EngineChoice, report: Any, row_of: Callable[[Case],
               dict[str, Any]], columns_of: dict[str, str], quiet: bool = False, resume: bool = True
               ) -> CohortOutcome:
    """Run `cases` (skipping those already done) and add one report row per case, in the order they finish.

    `row_of(case)` gives a row's input columns; `columns_of` maps an output role to its report column.
    """
    progress = CohortProgress(len(cases), quiet=quiet)
    index_of = {case.name: index for index, case in enumerate(cases, start=1)}
    by_name = {case.name: case for case in cases}
    provenance: dict[str, Any] = {}
    jobs: deque[dict[str, Any]] = deque()
    for case in cases:
        hashes = _input_hashes(case)
        record = is_done(case, spec, hashes) if resume else None
        if record is not None:
            provenance[case.name] = record.get("provenance")
            _add_row(report, row_of(case), case, columns_of, STATUS_SKIPPED, attempts=0,
                     error="Already done (outputs and sidecar match the input and model sha256).")
            progress.case_finished(index_of[case.name], case.name, STATUS_SKIPPED, 0.0, " (already done)")
            continue
        jobs.append({"case": case.name, "inputs": {k: str(v) for k, v in case.inputs.items()},
                     "outputs": {k: str(v) for k, v in case.outputs.items()}, "input_sha256": hashes, "attempt": 1})
    executor: Any = None
    model_problem: MIADLError | None = None
    try:
        if jobs:
            if choice.engine == "ray":
                executor = RayExecutor(spec, choice, len(jobs))
            else:
                executor = LocalExecutor(spec, choice, progress.stage)
            if not quiet and choice.engine == "ray":
                progress.line(f"engine: {executor.description}")
        while jobs or (executor is not None and executor.busy()):
            while jobs and executor.can_submit() and model_problem is None:
                job = jobs.popleft()
                if job["attempt"] == 1:
                    progress.case_started(index_of[job["case"]], job["case"])
                executor.submit(job)
            if model_problem is not None and not executor.busy():
                for job in jobs:  # every later case would fail the same way
                    _add_row(report, row_of(by_name[job["case"]]), by_name[job["case"]], columns_of,
                             STATUS_SKIPPED, attempts=0, error=f"Not run: {model_problem}")
                jobs.clear()
                break
            for job, result in executor.wait():
                case = by_name[job["case"]]
                failed = result["status"] != STATUS_OK
                if failed and result.get("model_error") and model_problem is None:
                    model_problem = ModelError(result["error"])
                if failed and job["attempt"] < MAX_ATTEMPTS and not result.get("model_error"):
                    if not quiet and result.get("traceback"):
                        progress.line(result["traceback"])
                    progress.line(f"retrying {case.name} (attempt {job['attempt']} failed: {result['error']})")
                    retry = {**job, "attempt": job["attempt"] + 1}
                    if "model_loaded_seconds" in result:  # the log still says where the model was loaded
                        retry["model_loaded_seconds"] = result["model_loaded_seconds"]
                    jobs.appendleft(retry)
                    continue
                if "model_loaded_seconds" in job and "model_loaded_seconds" not in result:
                    result["model_loaded_seconds"] = job["model_loaded_seconds"]
                _finish(report, progress, row_of(case), case, columns_of, result, index_of[case.name],
                        spec.model_id, provenance)
    finally:
        if executor is not None:
            executor.close()
        progress.close()
        shutil.rmtree(_partial_root(cases), ignore_errors=True)
    return CohortOutcome(report.rows, provenance, model_problem, time.perf_counter() - progress.started,
                         choice.engine)


def _partial_root(cases: list[Case]) -> Path:
    return sidecar_path(cases[0]).parent / "partial"


def _add_row(report: Any, base: dict[str, Any], case: Case, columns_of: dict[str, str], status: str,
             attempts: int, error: str = "", seconds: float = 0.0, worker: str = "", warnings: Iterable[str] = ()
             ) -> None:
    row = {**base, "case": case.name, "status": status, "seconds": f"{seconds:.2f}", "worker": worker,
           "attempts": attempts, "warnings": "; ".join(warnings), "error": error}
    if status in (STATUS_OK, STATUS_SKIPPED) and not error.startswith("Not run"):
        row.update({columns_of[role]: path for role, path in case.outputs.items()})
    report.add(row)


def _finish(report, progress: CohortProgress, base: dict[str, Any], case: Case, columns_of: dict[str, str],
            result: dict[str, Any], index: int, model_id: str, provenance: dict[str, Any]) -> None:
    status = result["status"]
    if status == STATUS_OK:
        provenance[case.name] = result.get("provenance")
    _add_row(report, base, case, columns_of, status, attempts=result["attempt"], error=result.get("error", ""),
             seconds=result["seconds"], worker=result.get("worker", ""), warnings=result.get("warnings", ()))
    detail = ""
    if "model_loaded_seconds" in result:  # shows in the log that each worker loads the model once
        took = result["model_loaded_seconds"]
        detail = f" (model {model_id} loaded{f' in {took:.1f} s' if took is not None else ''})"
    if status != STATUS_OK:
        if result.get("traceback") and not progress.quiet:
            progress.line(result["traceback"])
        detail += f": {result['error']}"
    elif result.get("warnings"):
        detail += f" (warnings: {'; '.join(result['warnings'])})"
    progress.case_finished(index, case.name, status, result["seconds"], detail)
