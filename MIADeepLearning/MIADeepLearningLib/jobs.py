"""The worker protocol, shared by the runner (Slicer side) and the worker (torch side). Stdlib only.

One job = one folder. The caller writes ``job.json`` there (a :class:`Job`), starts
``python -m MIADeepLearningLib.worker <folder>/job.json`` and reads the worker's stdout: each line that is a JSON
object with a ``"stage"`` key is an :class:`Event`; any other line is plain log text. The last event is either
``stage == "done"`` (with ``result``: output paths, label descriptions, provenance, timings, warnings) or
``stage == "error"`` (with a one-sentence ``message`` for the user and the ``traceback`` for the log).

Outputs are written under ``<folder>/.partial`` and moved into ``<folder>/outputs`` only when the whole job
succeeded, so a cancelled or crashed job never leaves a half-written result that could be mistaken for one.

Tasks (``Job.task``): ``segment`` (``inputs`` ``image``, and ``image2``, ``image3``, ... for the further input
channels of a multi-channel model), ``synthesize``, ``register`` (see Docs/Developers.md), ``device`` (the device
report) and ``classify``: ``inputs`` = {key: path} of any number of volumes, ``outputs`` = {"saliency_<key>":
file name} only for the saliency maps wanted (each on its input's grid), ``options`` = {"input_names": {key: node
name}}; ``result["classifications"]`` = {key: {"label": a class name or None, "probabilities": {class: p}, "ood":
bool, "reasons": [...], "error": None or one sentence, "timings": {...}}} and ``result["outputs"]`` the written
saliency maps under their ``saliency_<key>`` roles; a volume that fails is reported in its entry, the job still ends
``done``. ``options["type_check"] = False`` turns off the input type check of segment, synthesize and register (a
package's ``slicer.accepted_types`` checked by the sequence-type classifier, when installed: warnings only).

A warm worker (``python -m MIADeepLearningLib.worker --serve``) runs many jobs in one process, keeping models loaded:
it reads one ``job.json`` path per stdin line (``shutdown`` or end of input stops it) and stamps every event of a job
with ``job`` = that line, so a client never attributes an event to the wrong job. Events without ``job`` are about
the server itself: ``ready`` (engine imported, waiting for jobs) and ``stopping`` (sent *before* the final error of a
job that failed unexpectedly: the server exits after it, since torch or CUDA may be left in a bad state).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

JOB_FILE_NAME = "job.json"
RESULT_FILE_NAME = "result.json"
PARTIAL_DIR_NAME = ".partial"
OUTPUTS_DIR_NAME = "outputs"

STAGE_DONE = "done"
STAGE_ERROR = "error"
FINAL_STAGES = (STAGE_DONE, STAGE_ERROR)
STAGE_READY = "ready"  # warm worker only, no job: engine imported, reading jobs from stdin
STAGE_STOPPING = "stopping"  # warm worker only, no job: exits after the job that is ending now
SHUTDOWN_COMMAND = "shutdown"  # stdin line that ends a warm worker cleanly (so does the end of stdin)


@dataclass
class Job:
    """What the worker must do. Paths are absolute; ``outputs`` maps an output role to a file name."""

    task: str
    model: str
    inputs: dict[str, str]
    folder: str
    outputs: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)

    def write(self) -> Path:
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / JOB_FILE_NAME
        path.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: str | Path) -> Job:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)

    @property
    def partial_dir(self) -> Path:
        return Path(self.folder) / PARTIAL_DIR_NAME

    @property
    def outputs_dir(self) -> Path:
        return Path(self.folder) / OUTPUTS_DIR_NAME


@dataclass
class Event:
    """One progress line from the worker."""

    stage: str
    progress: float | None = None
    message: str = ""
    result: dict[str, Any] | None = None
    traceback: str | None = None
    error_type: str | None = None
    requirements: list[str] | None = None  # MissingPackages: the pip specs the model needs (offered for install)
    job: str | None = None  # warm worker: the job.json path the event belongs to, exactly as the client sent it

    @property
    def is_final(self) -> bool:
        return self.stage in FINAL_STAGES

    def to_line(self) -> str:
        data = {key: value for key, value in asdict(self).items() if value is not None}
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_line(cls, line: str) -> Event | None:
        """Parse one stdout line; None when it is plain log text rather than a protocol event."""
        text = line.strip()
        if not text.startswith("{"):
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict) or "stage" not in data:
            return None
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)
