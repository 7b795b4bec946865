"""`python -m MIADeepLearningLib.worker <job.json>`: run one job, report progress as JSON lines, write files.

Tasks: segment, synthesize, register, classify (several volumes, one model load; saliency maps on request), detect
(lesion candidates in one scan, optionally with more co-registered contrasts) and device (see jobs.py). Runs in
its own process (PythonSlicer inside Slicer) so that Slicer stays responsive, Cancel can kill it, and a CUDA crash
or out-of-memory cannot take the application down. Protocol: see jobs.py and Docs/Developers.md.

`python -m MIADeepLearningLib.worker --serve [--max-models N]` is the warm worker: the same jobs and events, many
jobs per process, one job.json path per stdin line, loaded models kept between jobs (the N most recent, default 1,
so GPU memory holds one model at a time). Each event carries ``job``; see jobs.py for the server events.

For the tests only, ``MIADL_WORKER_FAULT=<kind>:<stage>`` makes the worker misbehave when it reaches a stage:
``crash`` (hard exit without a word, like a segfault), ``raise`` (an unexpected exception) or ``hang`` (sleep).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from MIADeepLearningLib import jobs, versions
from MIADeepLearningLib.engine.errors import MIADLError

FAULT_ENV = "MIADL_WORKER_FAULT"
DEFAULT_MAX_MODELS = 1


class Reporter:
    """Writes protocol events to stdout (one JSON object per line, flushed at once).

    `job` (warm worker) is stamped on every event emitted while it is set, so the client can match events to jobs.
    """

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.fault_kind, _, self.fault_stage = os.environ.get(FAULT_ENV, "").partition(":")
        self.job: str | None = None

    def emit(self, event: jobs.Event) -> None:
        if self.job is not None and event.job is None:
            event.job = self.job
        self.stream.write(event.to_line() + "\n")
        self.stream.flush()

    def progress(self, stage: str, fraction: float, message: str) -> None:
        self.emit(jobs.Event(stage=stage, progress=round(float(fraction), 4), message=message))
        self._maybe_fault(stage)

    def _maybe_fault(self, stage: str) -> None:
        if not self.fault_kind or stage != self.fault_stage:
            return
        if self.fault_kind == "crash":
            os._exit(139)  # what a segfault looks like to the parent: no final event, non-zero exit
        if self.fault_kind == "hang":
            time.sleep(3600)
        if self.fault_kind == "raise":
            raise RuntimeError(f"injected fault at stage {stage}")


def check_torch_version() -> None:
    """Refuse a PyTorch older than the extension supports in one sentence that names the minimum, before the engine
    meets an API that torch lacks (which would end in a traceback nobody can act on)."""
    import numpy
    import torch

    problem = versions.torch_version_problem(torch.__version__, numpy.__version__)
    if problem:
        raise MIADLError(problem)


def import_engine() -> float:
    """Check torch, then import SimpleITK and the engine (most of a worker's start-up); returns the seconds it took."""
    started = time.perf_counter()
    check_torch_version()
    from MIADeepLearningLib.engine import imageio, tasks  # noqa: F401

    return time.perf_counter() - started


def _write_outputs(job: jobs.Job, reporter: Reporter, images: dict[str, Any], defaults: dict[str, str]) -> dict:
    """Write the outputs into job.partial_dir, then rename it to job.outputs_dir (all or nothing). An output is an
    image (written by imageio) or a function that writes its file at the path it is given and returns it."""
    from MIADeepLearningLib.engine import imageio

    reporter.progress("write", 0.95, "Writing results")
    partial = job.partial_dir
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    written = {}
    for role, image in images.items():
        if image is None:
            continue
        path = partial / job.outputs.get(role, defaults.get(role, f"{role}.nrrd"))
        written[role] = image(path) if callable(image) else imageio.write_image(image, path)
    shutil.rmtree(job.outputs_dir, ignore_errors=True)
    partial.rename(job.outputs_dir)
    return {role: str(job.outputs_dir / path.name) for role, path in written.items()}


def _finish_result(job: jobs.Job, output: Any, outputs: dict[str, str], engine_import_s: float,
                   model_cached: bool, **extra: Any) -> dict[str, Any]:
    result = {
        "outputs": outputs,
        **extra,
        "provenance": output.provenance,
        "timings": {"engine_import": round(engine_import_s, 3),
                    **{stage: round(seconds, 3) for stage, seconds in output.timings.items()}},
        "warnings": output.warnings,
        "model_cached": model_cached,
    }
    (Path(job.folder) / jobs.RESULT_FILE_NAME).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def _is_auxiliary(key: Any) -> bool:
    """A pipeline cache entry of a helper model (the input type check's classifier), not a job's own model."""
    tasks = sys.modules.get("MIADeepLearningLib.engine.tasks")  # no such entry before the engine is imported
    return tasks is not None and tasks.is_auxiliary_cache_key(key)


def _model_was_cached(pipeline_cache: dict | None, cached_before: set) -> bool:
    """No new cache entry although the cache had one: the task found this model already loaded (helper models such
    as the type check's classifier do not count)."""
    if pipeline_cache is None:
        return False
    before = {key for key in cached_before if not _is_auxiliary(key)}
    return bool(before) and {key for key in pipeline_cache if not _is_auxiliary(key)} <= before


def _type_check(job: jobs.Job) -> bool | None:
    """job.options["type_check"]: False skips the input type check; absent: on unless MIADL_TYPE_CHECK=0."""
    value = job.options.get("type_check")
    return None if value is None else bool(value)


def run_segment_job(job: jobs.Job, reporter: Reporter, pipeline_cache: dict | None = None) -> dict[str, Any]:
    """Segment ``job.inputs['image']`` (with ``image2``, ``image3``, ...: the further input channels of a
    multi-channel model, on the first one's grid); write the label (and, when job.outputs asks for them, the masked
    volume and the uncertainty map) via .partial -> outputs.

    With a `pipeline_cache` (warm worker) a model loaded by an earlier job is reused; ``model_cached`` in the
    result says whether that happened.
    """
    engine_import_s = import_engine()
    from MIADeepLearningLib.engine.tasks import segment_image

    cached_before = set(pipeline_cache) if pipeline_cache is not None else set()
    options = dict(job.options.get("model_options") or {})
    if "uncertainty" in job.outputs:
        options["uncertainty"] = True
    keys = detect_input_keys(job.inputs)  # image, then image2, image3, ...: the channels of a multi-channel model
    output = segment_image(
        job.inputs["image"], job.model, device=job.device, options=options or None,
        create_masked_volume="masked" in job.outputs, progress=reporter.progress,
        input_name=job.options.get("input_name"), pipeline_cache=pipeline_cache, type_check=_type_check(job),
        extra_image_paths=[job.inputs[key] for key in keys[1:]] or None,
    )
    images = {"label": output.label, "masked": output.masked, "uncertainty": output.uncertainty}
    outputs = _write_outputs(job, reporter, images, {"label": "label.nrrd"})
    return _finish_result(job, output, outputs, engine_import_s, _model_was_cached(pipeline_cache, cached_before),
                          segments=output.segments)


def run_synthesize_job(job: jobs.Job, reporter: Reporter, pipeline_cache: dict | None = None) -> dict[str, Any]:
    """Synthesize from ``job.inputs['image']``; writes ``image`` and, when job.outputs asks for them, the
    ``uncertainty`` and ``difference`` volumes."""
    engine_import_s = import_engine()
    from MIADeepLearningLib.engine.tasks import synthesize_image

    cached_before = set(pipeline_cache) if pipeline_cache is not None else set()
    options = {**job.options.get("model_options", {}), "uncertainty": "uncertainty" in job.outputs,
               "difference": "difference" in job.outputs}
    output = synthesize_image(job.inputs["image"], job.model, device=job.device, options=options,
                              progress=reporter.progress, input_name=job.options.get("input_name"),
                              pipeline_cache=pipeline_cache, type_check=_type_check(job))
    images = {"image": output.image, "uncertainty": output.uncertainty, "difference": output.difference}
    outputs = _write_outputs(job, reporter, images, {"image": "synthesized.nrrd"})
    return _finish_result(job, output, outputs, engine_import_s, _model_was_cached(pipeline_cache, cached_before))


REGISTER_INPUTS = ("fixed", "moving", "fixed_mask", "moving_mask", "moving_labels", "fixed_labels")
REGISTER_OUTPUTS = {"transform": "transform.h5", "warped": "warped.nrrd", "warped_labels": "warped_labels.nrrd",
                    "report": "report.json"}


def run_register_job(job: jobs.Job, reporter: Reporter, pipeline_cache: dict | None = None) -> dict[str, Any]:
    """Register ``job.inputs['moving']`` to ``job.inputs['fixed']`` (optional inputs: fixed_mask, moving_mask,
    moving_labels, fixed_labels); writes the displacement field (``transform``, .h5 on the fixed grid), the warped
    moving image (``warped``), the propagated moving labels (``warped_labels``, only with moving_labels) and the
    report (``report``, JSON: Jacobian statistics, Dice with both label maps); the result carries ``report`` too."""
    engine_import_s = import_engine()
    from MIADeepLearningLib.engine import displacement
    from MIADeepLearningLib.engine.tasks import register_images

    unknown = sorted(set(job.inputs) - set(REGISTER_INPUTS))
    if unknown:
        raise MIADLError(f"Unknown registration input(s) {', '.join(unknown)} (known: {', '.join(REGISTER_INPUTS)}).")
    missing = [role for role in ("fixed", "moving") if not job.inputs.get(role)]
    if missing:
        raise MIADLError(f"A registration job needs a {' and a '.join(missing)} image.")
    cached_before = set(pipeline_cache) if pipeline_cache is not None else set()
    output = register_images(
        job.inputs["fixed"], job.inputs["moving"], job.model, device=job.device,
        options=dict(job.options.get("model_options") or {}) or None,
        fixed_mask_path=job.inputs.get("fixed_mask"), moving_mask_path=job.inputs.get("moving_mask"),
        moving_labels_path=job.inputs.get("moving_labels"), fixed_labels_path=job.inputs.get("fixed_labels"),
        progress=reporter.progress, input_names=job.options.get("input_names"), pipeline_cache=pipeline_cache,
        type_check=_type_check(job),
    )

    def write_transform(path: Path) -> Path:
        return displacement.write_field(output.field, path)

    def write_report(path: Path) -> Path:
        path.write_text(json.dumps(output.report, indent=2), encoding="utf-8")
        return path

    files = {"transform": write_transform, "warped": output.warped, "warped_labels": output.warped_labels,
             "report": write_report}
    outputs = _write_outputs(job, reporter, files, REGISTER_OUTPUTS)
    return _finish_result(job, output, outputs, engine_import_s, _model_was_cached(pipeline_cache, cached_before),
                          report=output.report)


SALIENCY_PREFIX = "saliency_"
CLASSIFICATION_FIELDS = ("label", "probabilities", "ood", "reasons", "error", "timings")


def run_classify_job(job: jobs.Job, reporter: Reporter, pipeline_cache: dict | None = None) -> dict[str, Any]:
    """Classify every volume of ``job.inputs`` (key -> path, any number) with a classification model loaded once.

    ``job.outputs`` asks for saliency maps: ``saliency_<key>`` -> file name, written on that input's grid.
    ``job.options["input_names"]`` (key -> name) names the inputs in the provenance. A volume that cannot be
    classified does not fail the job: its entry in ``result["classifications"]`` (key -> {label, probabilities,
    ood, reasons, error, timings}) has ``label`` None and ``error`` one sentence; the model or device failing does.
    """
    engine_import_s = import_engine()
    from MIADeepLearningLib.engine.tasks import classify_images

    keys = list(job.inputs)
    if not keys:
        raise MIADLError("A classify job needs at least one input volume.")
    unknown = sorted(role for role in job.outputs if not (role.startswith(SALIENCY_PREFIX) and
                                                          role[len(SALIENCY_PREFIX):] in job.inputs))
    if unknown:
        raise MIADLError(f"Unknown classify output(s) {', '.join(unknown)} (known: saliency_<input key>).")
    names = dict(job.options.get("input_names") or {})
    cached_before = set(pipeline_cache) if pipeline_cache is not None else set()
    output = classify_images([job.inputs[key] for key in keys], job.model, device=job.device,
                             saliency=[f"{SALIENCY_PREFIX}{key}" in job.outputs for key in keys],
                             progress=reporter.progress, pipeline_cache=pipeline_cache,
                             input_names=[str(names.get(key) or Path(job.inputs[key]).name) for key in keys])
    for key, entry in zip(keys, output.results):
        if entry["error"] is not None:
            reporter.progress("classify", 0.95, f"{names.get(key) or key}: not classified: {entry['error']}")
    images = {f"{SALIENCY_PREFIX}{key}": entry["saliency"] for key, entry in zip(keys, output.results)}
    outputs = _write_outputs(job, reporter, images, {})
    classifications = {key: {name: entry[name] for name in CLASSIFICATION_FIELDS}
                       for key, entry in zip(keys, output.results)}
    return _finish_result(job, output, outputs, engine_import_s, _model_was_cached(pipeline_cache, cached_before),
                          classifications=classifications)


DETECT_OUTPUTS = {"anomaly": "anomaly.nrrd", "label": "label.nrrd", "brain": "brain.nrrd"}
DETECT_FIRST_INPUT = "image"
DETECT_RESULT_FIELDS = ("candidates", "case_score", "threshold", "segments")


def detect_input_keys(inputs: dict[str, str]) -> list[str]:
    """The job's input keys in run order: ``image`` (the reference grid), then ``image2``, ``image3``, ... by number;
    any other key is refused (one sentence)."""
    if not inputs.get(DETECT_FIRST_INPUT):
        raise MIADLError(f"A detect job needs an input '{DETECT_FIRST_INPUT}' (the scan whose grid the results use).")
    extra = {}
    for key in inputs:
        number = key[len(DETECT_FIRST_INPUT):]
        if key != DETECT_FIRST_INPUT:
            if not (key.startswith(DETECT_FIRST_INPUT) and number.isdigit() and int(number) >= 2):
                raise MIADLError(f"Unknown detect input '{key}' (known: image, image2, image3, ...).")
            extra[int(number)] = key
    return [DETECT_FIRST_INPUT, *(extra[number] for number in sorted(extra))]


def run_detect_job(job: jobs.Job, reporter: Reporter, pipeline_cache: dict | None = None) -> dict[str, Any]:
    """Detect lesions in ``job.inputs['image']`` (with ``image2``, ``image3``, ...: more co-registered contrasts of
    the same visit); writes the anomaly map (``anomaly``), the candidate label map (``label``) and the brain map
    (``brain``), all on the first input's grid; the result carries candidates, case_score, threshold and segments.
    ``job.options``: ``model_options`` (threshold, min_volume_mm3, ...), ``input_names`` (key -> name)."""
    engine_import_s = import_engine()
    from MIADeepLearningLib.engine.tasks import detect_lesions

    keys = detect_input_keys(job.inputs)
    unknown = sorted(set(job.outputs) - set(DETECT_OUTPUTS))
    if unknown:
        raise MIADLError(f"Unknown detect output(s) {', '.join(unknown)} (known: {', '.join(DETECT_OUTPUTS)}).")
    names = dict(job.options.get("input_names") or {})
    cached_before = set(pipeline_cache) if pipeline_cache is not None else set()
    output = detect_lesions([job.inputs[key] for key in keys], job.model, device=job.device,
                            options=dict(job.options.get("model_options") or {}) or None, progress=reporter.progress,
                            pipeline_cache=pipeline_cache, type_check=_type_check(job),
                            input_names=[str(names.get(key) or Path(job.inputs[key]).name) for key in keys])
    images = {"anomaly": output.anomaly, "label": output.label, "brain": output.brain}
    outputs = _write_outputs(job, reporter, images, DETECT_OUTPUTS)
    return _finish_result(job, output, outputs, engine_import_s, _model_was_cached(pipeline_cache, cached_before),
                          **{name: getattr(output, name) for name in DETECT_RESULT_FIELDS})


def run_device_job(job: jobs.Job, reporter: Reporter, pipeline_cache: dict | None = None) -> dict[str, Any]:
    """The device report (PyTorch build, GPUs, free memory, why CUDA is or is not used) as the job's result, so the
    module makes it in the background like a run. An unsupported torch is reported, not refused: this is where the
    user finds out which torch the worker sees."""
    started = time.perf_counter()
    reporter.progress("device", 0.2, "Importing PyTorch")
    from MIADeepLearningLib.engine.devices import device_report

    import_s = time.perf_counter() - started
    reporter.progress("device", 0.6, "Checking the CUDA devices")
    report = device_report()
    import numpy

    report["numpy"] = numpy.__version__
    report["torch_minimum"] = versions.dotted(versions.minimum_torch_version(numpy.__version__))
    report["torch_problem"] = versions.torch_version_problem(report["torch"], numpy.__version__)
    result = {"outputs": {}, "report": report, "provenance": {}, "warnings": [],
              "timings": {"engine_import": round(import_s, 3), "report": round(time.perf_counter() - started, 3)}}
    (Path(job.folder) / jobs.RESULT_FILE_NAME).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def run_import_job(job: jobs.Job, reporter: Reporter, pipeline_cache: dict | None = None) -> dict[str, Any]:
    """Check and import a model package (inputs["package"]: a .zip or folder) into the user's model cache, for the
    Slicer module: a MONAI bundle's check builds its configs and network and loads its weights, which needs torch
    and MONAI, so it runs here and not in Slicer. options["trust_code"] is the user's confirmation that the
    package's code may run (asked by the module before the job starts); options["replace"] swaps an imported model
    of the same id."""
    started = time.perf_counter()
    package = job.inputs.get("package")
    if not package:
        raise MIADLError("An import job needs an input 'package' (a .zip or a folder).")
    from MIADeepLearningLib.engine import model_store

    reporter.progress("import", 0.1, f"Checking the model package {Path(package).name}")
    model = model_store.import_model(package, trust_code=bool(job.options.get("trust_code")),
                                     replace=bool(job.options.get("replace")))
    if pipeline_cache is not None:  # a replaced model must not run from a pipeline built from its old copy
        for key in [key for key in pipeline_cache if isinstance(key, tuple) and key and key[0] == model.id]:
            pipeline_cache.pop(key)
    reporter.progress("import", 1.0, f"Imported model '{model.title}' (version {model.version})")
    result = {"outputs": {}, "model": model.summary(), "provenance": {}, "warnings": [],
              "timings": {"import": round(time.perf_counter() - started, 3)}}
    (Path(job.folder) / jobs.RESULT_FILE_NAME).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


TASKS = {"segment": run_segment_job, "synthesize": run_synthesize_job, "register": run_register_job,
         "classify": run_classify_job, "detect": run_detect_job, "device": run_device_job,
         "import": run_import_job}


def run(job_path: str | Path, reporter: Reporter | None = None, pipeline_cache: dict | None = None,
        serving: bool = False) -> int:
    """Run the job; returns the process exit code (0 done, 2 user-facing error, 1 unexpected error).

    `serving` (warm worker): an unexpected error is announced with a ``stopping`` event before its final event,
    because the server exits after it rather than run the next job in a possibly broken torch/CUDA state.
    """
    reporter = reporter or Reporter()
    started = time.perf_counter()
    job = None
    try:
        job = jobs.Job.read(job_path)
        who = "Warm worker took the job" if serving else "Worker started"
        reporter.progress("start", 0.0, f"{who} (Python {sys.version.split()[0]}, pid {os.getpid()})")
        task = TASKS.get(job.task)
        if task is None:
            raise MIADLError(f"Unknown task '{job.task}' (known: {', '.join(TASKS)}).")
        result = task(job, reporter, pipeline_cache=pipeline_cache)
        result["timings"]["worker_total"] = round(time.perf_counter() - started, 3)
        reporter.emit(jobs.Event(stage=jobs.STAGE_DONE, progress=1.0, message="Finished", result=result))
        return 0
    except BaseException as error:
        if job is not None:
            shutil.rmtree(job.partial_dir, ignore_errors=True)
        user_facing = isinstance(error, MIADLError)
        message = str(error) if user_facing else f"The worker failed unexpectedly ({type(error).__name__}: {error})."
        if serving and not user_facing:
            announce_stopping(reporter, "The warm worker stops after this unexpected error; the next job starts a "
                                        "new one.")
        reporter.emit(jobs.Event(stage=jobs.STAGE_ERROR, message=message, error_type=type(error).__name__,
                                 traceback=traceback.format_exc(),
                                 requirements=list(getattr(error, "requirements", None) or []) or None))
        return 2 if user_facing else 1


def announce_stopping(reporter: Reporter, message: str) -> None:
    """A server event (no job): the client must not send this process another job."""
    job, reporter.job = reporter.job, None
    reporter.emit(jobs.Event(stage=jobs.STAGE_STOPPING, message=message))
    reporter.job = job


def trim_pipeline_cache(pipeline_cache: dict, max_models: int) -> None:
    """After a warm job: keep only the most recently loaded pipelines (never more models than asked for) and give
    the GPU memory of the job's activations back, so a warm worker holds its weights and nothing else. Helper
    models (the input type check's small classifier) are kept besides them, and do not count, unless no model is
    to be kept at all."""
    evicted = False
    models = [key for key in pipeline_cache if max_models <= 0 or not _is_auxiliary(key)]
    while len(models) > max(0, max_models):
        pipeline_cache.pop(models.pop(0))
        evicted = True
    if evicted:
        gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def serve(stdin=None, reporter: Reporter | None = None, max_models: int = DEFAULT_MAX_MODELS) -> int:
    """The warm worker loop: one job.json path per stdin line until ``shutdown`` or end of input.

    The engine is imported before ``ready`` so that a server started ahead of time (when a module opens) takes its
    first job without the torch import. Returns 0 after a clean stop, 1 after an unexpected job error.
    """
    if stdin is None:
        stdin = sys.stdin
        if hasattr(stdin, "reconfigure"):
            stdin.reconfigure(encoding="utf-8")  # the runner writes UTF-8 paths, whatever this system's locale
    reporter = reporter or Reporter()
    try:
        import_s = import_engine()
        ready = f"Warm worker ready (pid {os.getpid()}, engine imported in {import_s:.1f} s)"
    except Exception:  # the first job reports the same error as an error event, with its traceback
        traceback.print_exc()
        ready = f"Warm worker ready (pid {os.getpid()}); the engine could not be imported"
    reporter.emit(jobs.Event(stage=jobs.STAGE_READY, message=ready))
    pipeline_cache: dict = {}
    while True:
        line = stdin.readline()
        if not line:
            return 0  # the client went away (or closed our stdin): nobody is left to send jobs
        request = line.rstrip("\r\n")  # exactly what the client sent: events echo it as their "job"
        if not request.strip():
            continue
        if request.strip() == jobs.SHUTDOWN_COMMAND:
            return 0
        reporter.job = request
        try:
            code = run(request, reporter, pipeline_cache=pipeline_cache, serving=True)
        finally:
            reporter.job = None
        if code == 1:
            return 1
        trim_pipeline_cache(pipeline_cache, max_models)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--serve" in argv:
        parser = argparse.ArgumentParser(prog="python -m MIADeepLearningLib.worker --serve")
        parser.add_argument("--serve", action="store_true")
        parser.add_argument("--max-models", type=int, default=DEFAULT_MAX_MODELS,
                            help="loaded models kept between jobs (default %(default)s)")
        args = parser.parse_args(argv)
        return serve(max_models=args.max_models)
    if len(argv) != 1 or argv[0].startswith("-"):
        sys.stderr.write("usage: python -m MIADeepLearningLib.worker <job.json>\n")
        return 64
    return run(argv[0])


if __name__ == "__main__":
    sys.exit(main())
