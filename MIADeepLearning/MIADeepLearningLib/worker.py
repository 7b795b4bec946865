"""`python -m MIADeepLearningLib.worker <job.json>`: run one job, report progress as JSON lines, write files.

Runs in its own process (PythonSlicer inside Slicer) so that Slicer stays responsive, Cancel can kill it, and a
CUDA crash or out-of-memory cannot take the application down. Protocol: see jobs.py and Docs/Developers.md.

For the tests only, ``MIADL_WORKER_FAULT=<kind>:<stage>`` makes the worker misbehave when it reaches a stage:
``crash`` (hard exit without a word, like a segfault), ``raise`` (an unexpected exception) or ``hang`` (sleep).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from MIADeepLearningLib import jobs
from MIADeepLearningLib.engine.errors import MIADLError

FAULT_ENV = "MIADL_WORKER_FAULT"


class Reporter:
    """Writes protocol events to stdout (one JSON object per line, flushed at once)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.fault_kind, _, self.fault_stage = os.environ.get(FAULT_ENV, "").partition(":")

    def emit(self, event: jobs.Event) -> None:
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


def run_segment_job(job: jobs.Job, reporter: Reporter) -> dict[str, Any]:
    """Segment ``job.inputs['image']``; write the label (and masked volume) via .partial -> outputs."""
    started = time.perf_counter()
    from MIADeepLearningLib.engine import imageio
    from MIADeepLearningLib.engine.tasks import segment_image

    engine_import_s = time.perf_counter() - started  # torch, SimpleITK: most of a worker's start-up
    output = segment_image(
        job.inputs["image"], job.model, device=job.device, options=job.options.get("model_options"),
        create_masked_volume="masked" in job.outputs, progress=reporter.progress,
        input_name=job.options.get("input_name"),
    )
    reporter.progress("write", 0.95, "Writing results")
    partial = job.partial_dir
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    written = {"label": imageio.write_image(output.label, partial / job.outputs.get("label", "label.nrrd"))}
    if output.masked is not None:
        written["masked"] = imageio.write_image(output.masked, partial / job.outputs["masked"])
    shutil.rmtree(job.outputs_dir, ignore_errors=True)
    partial.rename(job.outputs_dir)
    result = {
        "outputs": {role: str(job.outputs_dir / path.name) for role, path in written.items()},
        "segments": output.segments,
        "provenance": output.provenance,
        "timings": {"engine_import": round(engine_import_s, 3),
                    **{stage: round(seconds, 3) for stage, seconds in output.timings.items()}},
        "warnings": output.warnings,
    }
    (Path(job.folder) / jobs.RESULT_FILE_NAME).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


TASKS = {"segment": run_segment_job}


def run(job_path: str | Path, reporter: Reporter | None = None) -> int:
    """Run the job; returns the process exit code (0 done, 2 user-facing error, 1 unexpected error)."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    job = None
    try:
        job = jobs.Job.read(job_path)
        reporter.progress("start", 0.0, f"Worker started (Python {sys.version.split()[0]}, pid {os.getpid()})")
        task = TASKS.get(job.task)
        if task is None:
            raise MIADLError(f"Unknown task '{job.task}' (known: {', '.join(TASKS)}).")
        result = task(job, reporter)
        result["timings"]["worker_total"] = round(time.perf_counter() - started, 3)
        reporter.emit(jobs.Event(stage=jobs.STAGE_DONE, progress=1.0, message="Finished", result=result))
        return 0
    except BaseException as error:
        if job is not None:
            shutil.rmtree(job.partial_dir, ignore_errors=True)
        user_facing = isinstance(error, MIADLError)
        message = str(error) if user_facing else f"The worker failed unexpectedly ({type(error).__name__}: {error})."
        reporter.emit(jobs.Event(stage=jobs.STAGE_ERROR, message=message, error_type=type(error).__name__,
                                 traceback=traceback.format_exc()))
        return 2 if user_facing else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python -m MIADeepLearningLib.worker <job.json>\n")
        return 64
    return run(argv[0])


if __name__ == "__main__":
    sys.exit(main())
