"""What every module's logic shares: export the input volume into a job folder, start the worker (a process of its
own or the warm worker), poll it, and on success hand the result to the task's import; the job folder is removed
whatever happens. Qt-free so the headless tests and the demo run exactly what the modules run."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from MIADeepLearningLib import jobs, runner
from MIADeepLearningLib.engine import errors, registry
from MIADeepLearningLib.mrml.source_files import verify_source_file
from MIADeepLearningLib.mrml.volumes import check_input_volume, export_volume

EventCallback = Callable[[jobs.Event], None]
REMOTE_DEVICE = "remote"  # the modules' device choice that sends jobs to the inference server
ExportInputs = Callable[[Path], dict[str, str]]

_ERRORS_BY_TYPE = {
    "InputError": errors.InputError,
    "ModelError": errors.ModelError,
    "MissingPackages": errors.MissingPackages,
    "CancelledError": errors.CancelledError,
}


class TaskRun:
    """A started run: poll it (non-blocking) until it stops, then `finish()` imports the results.

    Subclasses implement `_import(result)`, which runs only after the worker succeeded.
    """

    def __init__(self, worker: runner.WorkerProcess | runner.WarmJob, input_volume, model: registry.ModelInfo,
                 started_at: float, export_seconds: float):
        self.worker = worker
        self.input_volume = input_volume
        self.model = model
        self._started_at = started_at
        self._export_seconds = export_seconds
        self._finished = False

    @property
    def log_lines(self) -> list[str]:
        return self.worker.log_lines

    def poll(self) -> list[jobs.Event]:
        return self.worker.poll()

    def is_running(self) -> bool:
        return self.worker.is_running()

    def cancel(self) -> None:
        self.worker.cancel()

    def wait(self) -> None:
        self.worker.wait()

    def finish(self) -> Any:
        """Import the outputs of a successful run; raise the worker's error (one sentence) otherwise."""
        if self.is_running():
            raise RuntimeError("finish() called while the worker is still running")
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        try:
            final = self.worker.final_event
            if self.worker.state != runner.STATE_DONE or final is None or final.result is None:
                message = final.message if final else "The worker ended without a result."
                error_class = _ERRORS_BY_TYPE.get(final.error_type if final else "", errors.WorkerError)
                if error_class is errors.MissingPackages:
                    raise errors.MissingPackages(message, final.requirements or [])
                raise error_class(message)
            return self._import(final.result)
        finally:
            shutil.rmtree(self.worker.job.folder, ignore_errors=True)

    def _import(self, result: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _timings(self, result: dict[str, Any], import_started: float) -> dict[str, float]:
        timings = dict(result.get("timings", {}))
        timings["export"] = round(self._export_seconds, 3)
        timings["import"] = round(time.perf_counter() - import_started, 3)
        timings["total"] = round(time.perf_counter() - self._started_at, 3)
        return timings

    def _copy_display(self, volume_node, like=None) -> None:
        """Show an output volume like its input (same colours and window/level), not with an automatic window;
        `like` is another volume to copy the display from (a registration shows the moving image)."""
        source = (like if like is not None else self.input_volume).GetDisplayNode()
        volume_node.CreateDefaultDisplayNodes()
        target = volume_node.GetDisplayNode()
        if source is not None and target is not None:
            target.SetAndObserveColorNodeID(source.GetColorNodeID())
            target.SetAutoWindowLevel(False)
            target.SetWindowLevel(source.GetWindow(), source.GetLevel())


class TaskLogic:
    """What the Qt-free logics share: where the worker runs (a process per run, or `warm_worker`), and checking the
    input volume and the model before anything is started. Subclasses set TASK (registry task name)."""

    TASK = ""

    def __init__(self, python_executable: str | None = None, jobs_root: str | Path | None = None,
                 warm_worker: runner.WarmWorker | None = None, remote_server: Any = None):
        self.python_executable = python_executable
        self.jobs_root = Path(jobs_root) if jobs_root else None
        self.warm_worker = warm_worker
        self.remote_server = remote_server  # a remote.RemoteServer: jobs run there (device "remote")

    @classmethod
    def models(cls) -> list[registry.ModelInfo]:
        return registry.list_models(task=cls.TASK)

    def _checked_model(self, input_volume, model_id: str) -> registry.ModelInfo:
        """InputError/ModelError (one sentence) before anything is created: a usable input whose file (when it comes
        unchanged from one) is not damaged or cut short, and a model of this task."""
        check_input_volume(input_volume)
        verify_source_file(input_volume)
        model = registry.get_model(model_id)
        if model.task != self.TASK:
            raise errors.ModelError(f"Model '{model.title}' is not a {self.TASK} model.")
        return model

    def _launch(self, worker_task: str, input_volume, model: registry.ModelInfo, outputs: dict[str, str],
                device: str, timeout_s: float | None, on_event: EventCallback | None,
                worker_env: dict[str, str] | None) -> tuple[runner.WorkerProcess | runner.WarmJob, float]:
        return launch(worker_task, input_volume, model, outputs, device, {}, self.jobs_root, self.python_executable,
                      self.warm_worker, timeout_s, on_event, worker_env, remote_server=self.remote_server)


def launch(task: str, input_volume, model: registry.ModelInfo, outputs: dict[str, str], device: str,
           options: dict[str, Any], jobs_root: Path | None, python_executable: str | None,
           warm_worker: runner.WarmWorker | None, timeout_s: float | None, on_event: EventCallback | None,
           worker_env: dict[str, str] | None, export_inputs: ExportInputs | None = None,
           remote_server: Any = None) -> tuple[runner.WorkerProcess | runner.WarmJob, float]:
    """Export the input and start the job; (worker handle, export seconds). Nothing is left behind on failure.

    By default `input_volume` is the job's only input (role "image"); a task with several inputs (registration)
    passes `export_inputs`, which writes them into the job folder it is given and returns role -> absolute path.
    `worker_env` (tests: fault injection) needs a worker process of its own, so it cannot go with a warm worker.
    With `remote_server` (a remote.RemoteServer) the job runs on that server instead (device "remote" lets the
    server choose its own device); only the exported voxels and geometry are sent.
    """
    started_at = time.perf_counter()
    if remote_server is not None and (warm_worker is not None or worker_env):
        raise ValueError("A remote run goes to the server; it takes no warm worker and no worker_env.")
    if worker_env and warm_worker is not None:
        raise ValueError("worker_env applies to a new worker process; give the WarmWorker its env instead.")
    if jobs_root:
        jobs_root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="miadl-job-", dir=jobs_root))
    try:
        if export_inputs is None:
            inputs = {"image": str(export_volume(input_volume, folder / "input.nrrd"))}
        else:
            inputs = export_inputs(folder)
        job = jobs.Job(task=task, model=model.id, inputs=inputs, folder=str(folder),
                       outputs=outputs, device=device, options={"input_name": input_volume.GetName(), **options})
        export_seconds = time.perf_counter() - started_at
        if remote_server is not None:
            from MIADeepLearningLib import remote

            if job.device == REMOTE_DEVICE:
                job.device = "auto"
            worker = remote.start_remote(job, remote_server, on_event, timeout_s=timeout_s)
        elif warm_worker is not None:
            worker = warm_worker.submit(job, on_event=on_event, timeout_s=timeout_s)
        else:
            worker = runner.start(job, python_executable=python_executable, on_event=on_event, timeout_s=timeout_s,
                                  env=worker_env)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return worker, export_seconds
