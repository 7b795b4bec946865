"""The classification logic behind the DL Classification module (Qt-free: the headless tests and the demo run exactly
it).

One Apply: check the volumes (one, or every volume of the scene) -> export those that can be classified into one job
folder -> worker (task "classify": every volume in one process, the model loaded once) -> import: a table node with
one row per volume (predicted type and its probability, the runner-up, an out-of-distribution flag, notes), optional
saliency maps (new volumes on each input's grid, 0-1, coloured), provenance on every new node, and last the
prediction as two attributes on each classified volume (``MIADeepLearning.SequenceType``,
``MIADeepLearning.SequenceTypeProbability``), so other modules and scripts can read it. Those attributes are the only
change to the user's nodes, and only after success.

Nothing touches the scene before the worker has succeeded; the import runs inside a SceneGuard, so a failed or
cancelled run leaves the scene exactly as it was. A run over several volumes keeps going when one of them cannot be
classified (a 2-D or vector volume, a damaged file, an error in the worker): its row says why.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import slicer
import vtk

from MIADeepLearningLib.engine import errors, registry
from MIADeepLearningLib.mrml.provenance import set_provenance
from MIADeepLearningLib.mrml.scene_guard import SceneGuard
from MIADeepLearningLib.mrml.source_files import verify_source_file
from MIADeepLearningLib.mrml.task_run import EventCallback, TaskLogic, TaskRun, launch
from MIADeepLearningLib.mrml.volumes import (
    OVERLAY_COLOR_NODE_IDS,
    check_input_volume,
    export_volume,
    place_beside,
    read_volume_file,
    style_overlay,
)

WORKER_TASK = "classify"
# What scripts and the other modules read on a classified volume (label: one of the model's classes, e.g. "flair")
SEQUENCE_TYPE_ATTRIBUTE = "MIADeepLearning.SequenceType"
SEQUENCE_TYPE_PROBABILITY_ATTRIBUTE = "MIADeepLearning.SequenceTypeProbability"
# On a saliency map: the ID of the volume it explains (such maps are left out of "all volumes in the scene")
SALIENCY_OF_ATTRIBUTE = "MIADeepLearning.SaliencyOf"
TABLE_NAME = "Sequence types"
SALIENCY_SUFFIX = "saliency"
# The first of these colour tables present in the scene colours a saliency map (the file tables are loaded by
# Slicer's Colors module; the last one exists in every scene, the headless one included).
SALIENCY_COLOR_NODE_IDS = OVERLAY_COLOR_NODE_IDS
SALIENCY_THRESHOLD = 0.1  # below this the overlay is transparent, so the scan shows through where nothing mattered

# The titles of engine.classification.CLASSES (that module imports torch, which the Slicer side never does; a test
# checks the two agree). A class a future model adds is shown by its name.
CLASS_TITLES = {"t1w": "T1-weighted", "t1c": "T1-weighted after contrast", "t2w": "T2-weighted",
                "flair": "FLAIR", "pdw": "proton density", "dwi": "diffusion (EPI)", "ct": "CT", "other": "other"}

VOLUME_COLUMN = "Volume"
TYPE_COLUMN = "Sequence type"
PROBABILITY_COLUMN = "Probability"
RUNNER_UP_COLUMN = "Runner-up"
RUNNER_UP_PROBABILITY_COLUMN = "Runner-up probability"
OOD_COLUMN = "Out of distribution"
NOTES_COLUMN = "Notes"
COLUMNS = (VOLUME_COLUMN, TYPE_COLUMN, PROBABILITY_COLUMN, RUNNER_UP_COLUMN, RUNNER_UP_PROBABILITY_COLUMN, OOD_COLUMN,
           NOTES_COLUMN)


def class_title(label: str) -> str:
    return CLASS_TITLES.get(label, label)


def probability_text(probability: float) -> str:
    """Two decimals, as the attribute and the table show it (e.g. "0.96")."""
    return f"{probability:.2f}"


@dataclass
class VolumeClassification:
    """One volume's row: its prediction, or why it has none (``error``)."""

    volume_node: Any
    name: str
    label: str | None = None  # one of the model's classes; None when the volume was not classified
    probabilities: dict[str, float] = field(default_factory=dict)
    ood: bool = False
    reasons: list[str] = field(default_factory=list)  # why it is out of distribution
    error: str | None = None  # one sentence: why this volume has no prediction
    saliency_node: Any | None = None
    notes: list[str] = field(default_factory=list)  # anything else worth a word (e.g. no saliency map came back)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def classified(self) -> bool:
        return self.error is None and self.label is not None

    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda item: -item[1])

    @property
    def probability(self) -> float | None:
        return self.probabilities.get(self.label) if self.label is not None else None

    @property
    def runner_up(self) -> tuple[str, float] | None:
        """The second most probable class and its probability."""
        ranked = [item for item in self.ranked() if item[0] != self.label]
        return ranked[0] if ranked else None

    @property
    def title(self) -> str:
        return class_title(self.label) if self.label is not None else ""

    def note_text(self) -> str:
        """The Notes cell: the error, else the out-of-distribution reasons and any other note."""
        if self.error:
            return self.error
        return "; ".join([*self.reasons, *self.notes])

    def record(self) -> dict[str, Any]:
        """What the provenance keeps of this row."""
        if not self.classified:
            return {"volume": self.name, "error": self.error}
        return {"volume": self.name, "label": self.label, "probability": self.probability, "ood": self.ood,
                "reasons": list(self.reasons)}

    def summary(self) -> str:
        """"FLAIR (p = 0.96; runner-up T2-weighted 0.02)", or "not classified: <why>"."""
        if not self.classified:
            return f"not classified: {self.error}"
        text = f"{self.title} (p = {probability_text(self.probability)}"
        if self.runner_up is not None:
            runner_up, probability = self.runner_up
            text += f"; runner-up {class_title(runner_up)} {probability_text(probability)}"
        text += ")"
        if self.ood:
            text += " - out of distribution"
        return text


@dataclass
class ClassificationResult:
    rows: list[VolumeClassification]
    table_node: Any
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    model_cached: bool = False

    @property
    def classified(self) -> list[VolumeClassification]:
        return [row for row in self.rows if row.classified]

    @property
    def failed(self) -> list[VolumeClassification]:
        return [row for row in self.rows if not row.classified]

    @property
    def saliency_nodes(self) -> list[Any]:
        return [row.saliency_node for row in self.rows if row.saliency_node is not None]

    def summary(self) -> str:
        """One line for the status: the type of a single volume, else how many volumes got one."""
        if len(self.rows) == 1:
            row = self.rows[0]
            return f"'{row.name}': {row.summary()}"
        text = f"{len(self.classified)} of {len(self.rows)} volume(s) classified"
        if self.failed:
            text += f", {len(self.failed)} could not be"
        return text


# ------------------------------------------------------------------------------------------------ which volumes
def is_saliency_map(node) -> bool:
    return bool(node.GetAttribute(SALIENCY_OF_ATTRIBUTE))


def scene_volumes(scene=None) -> list[Any]:
    """"All volumes in the scene": every volume node a user sees in the Data module, in scene order, except label
    maps (segmentations stored as volumes, not scans) and the saliency maps this module made."""
    scene = scene or slicer.mrmlScene
    volumes = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLVolumeNode")
        if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetHideFromEditors() or is_saliency_map(node):
            continue
        volumes.append(node)
    return volumes


def volume_problem(node) -> str | None:
    """Why this volume cannot be classified (one sentence), or None: the checks every model's input gets, and the
    file it came from is not damaged."""
    try:
        check_input_volume(node)
        verify_source_file(node)
    except errors.InputError as error:
        return str(error)
    return None


# ----------------------------------------------------------------------------------------------------- the table
def classification_table(rows: list[VolumeClassification], name: str, scene, reference=None) -> Any:
    """A new, locked table node (name made unique), one row per volume, COLUMNS as text: probabilities with two
    decimals, "yes"/"no" for the flag, empty cells where a volume has no prediction."""
    arrays = {}
    for column in COLUMNS:
        array = vtk.vtkStringArray()
        array.SetName(column)
        arrays[column] = array
    for row in rows:
        runner_up = row.runner_up if row.classified else None
        values = {
            VOLUME_COLUMN: row.name,
            TYPE_COLUMN: row.title if row.classified else "",
            PROBABILITY_COLUMN: probability_text(row.probability) if row.classified else "",
            RUNNER_UP_COLUMN: class_title(runner_up[0]) if runner_up else "",
            RUNNER_UP_PROBABILITY_COLUMN: probability_text(runner_up[1]) if runner_up else "",
            OOD_COLUMN: ("yes" if row.ood else "no") if row.classified else "",
            NOTES_COLUMN: row.note_text(),
        }
        for column in COLUMNS:
            arrays[column].InsertNextValue(values[column])
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    for column in COLUMNS:
        table_node.GetTable().AddColumn(arrays[column])
    table_node.SetColumnDescription(PROBABILITY_COLUMN, "the model's probability of the predicted type (0-1)")
    table_node.SetColumnDescription(RUNNER_UP_COLUMN, "the second most probable type")
    table_node.SetColumnDescription(OOD_COLUMN, "yes: the volume looks like nothing the model was made for (not a "
                                                "head MR or CT scan, a label map, ...); its type is 'other'")
    table_node.SetLocked(True)  # computed values: not meant to be edited in the table view
    table_node.Modified()
    if reference is not None and reference.GetScene() is scene:
        place_beside(table_node, reference)
    return table_node


def style_saliency(node) -> None:
    """0-1 in a colour table, transparent below SALIENCY_THRESHOLD: meant as the foreground over its scan."""
    style_overlay(node, SALIENCY_THRESHOLD, SALIENCY_COLOR_NODE_IDS)


# ----------------------------------------------------------------------------------------------------- the run
@dataclass
class _Entry:
    """One volume of the run: its job key (None when it was refused before the job) or the refusal."""

    node: Any
    name: str
    key: str | None = None
    refusal: str | None = None


class ClassificationRun(TaskRun):
    """A started classification run (see TaskRun); `input_volume` is the first volume sent to the worker."""

    def __init__(self, worker, entries: list[_Entry], model: registry.ModelInfo, saliency: bool, started_at: float,
                 export_seconds: float):
        sent = [entry.node for entry in entries if entry.key is not None]
        super().__init__(worker, sent[0], model, started_at, export_seconds)
        self.entries = entries
        self.saliency = saliency

    def _import(self, result: dict[str, Any]) -> ClassificationResult:
        import_started = time.perf_counter()
        classifications = result.get("classifications") or {}
        files = result.get("outputs") or {}
        scene = self.input_volume.GetScene() or slicer.mrmlScene
        provenance = dict(result.get("provenance") or {})
        rows = [self._row(entry, classifications, scene) for entry in self.entries]
        with SceneGuard(scene):
            for entry, row in zip(self.entries, rows):
                if row.classified and self.saliency:
                    row.saliency_node = self._saliency(entry, row, files.get(f"saliency_{entry.key}"), scene)
            table = classification_table(rows, TABLE_NAME, scene, reference=self.input_volume)
            timings = self._timings(result, import_started)
            records = [row.record() for row in rows]
            provenance.update({"timings_s": timings, "input_nodes": [entry.name for entry in self.entries],
                               "classifications": records})
            set_provenance(table, provenance)
            for row, record in zip(rows, records):
                if row.saliency_node is not None:
                    set_provenance(row.saliency_node, {**provenance, "input_node": row.name, "classification": record})
            # Last, when every new node is in place: the prediction on the user's volumes (the only change to them)
            _set_attributes([row for row in rows if row.classified])
        warnings = list(result.get("warnings", []))
        return ClassificationResult(rows, table, provenance, warnings, timings, bool(result.get("model_cached", False)))

    @staticmethod
    def _row(entry: _Entry, classifications: dict[str, Any], scene) -> VolumeClassification:
        row = VolumeClassification(entry.node, entry.name)
        if entry.refusal is not None:
            row.error = entry.refusal
            return row
        if not scene.IsNodePresent(entry.node):
            row.error = "The volume was removed from the scene while the model ran."
            return row
        found = classifications.get(entry.key)
        if not isinstance(found, dict):
            row.error = "The worker returned no result for this volume."
            return row
        if found.get("error"):
            row.error = str(found["error"])
            return row
        probabilities = {str(name): float(value) for name, value in (found.get("probabilities") or {}).items()}
        label = found.get("label")
        if not label or str(label) not in probabilities:
            row.error = "The worker returned no usable class for this volume."
            return row
        row.label, row.probabilities = str(label), probabilities
        row.ood = bool(found.get("ood", False))
        row.reasons = [str(reason) for reason in found.get("reasons") or []]
        row.timings = dict(found.get("timings") or {})
        return row

    @staticmethod
    def _saliency(entry: _Entry, row: VolumeClassification, path: str | None, scene) -> Any | None:
        """The saliency map as a new volume on the input's grid, or None with a note on the row (a missing map
        must not cost the other volumes their results)."""
        if not path or not Path(path).is_file():
            row.notes.append("no saliency map came back for this volume")
            return None
        try:
            node = read_volume_file(path, scene.GenerateUniqueName(f"{entry.name} {SALIENCY_SUFFIX}"),
                                    reference=entry.node)
        except RuntimeError as error:
            row.notes.append(f"the saliency map could not be shown ({error})")
            return None
        node.SetAttribute(SALIENCY_OF_ATTRIBUTE, entry.node.GetID())
        style_saliency(node)
        return node


def _set_attributes(rows: list[VolumeClassification]) -> None:
    """The prediction on each classified volume; on any failure the attributes are put back as they were."""
    before = [(row.volume_node, name, row.volume_node.GetAttribute(name)) for row in rows
              for name in (SEQUENCE_TYPE_ATTRIBUTE, SEQUENCE_TYPE_PROBABILITY_ATTRIBUTE)]
    try:
        for row in rows:
            row.volume_node.SetAttribute(SEQUENCE_TYPE_ATTRIBUTE, row.label)
            row.volume_node.SetAttribute(SEQUENCE_TYPE_PROBABILITY_ATTRIBUTE, probability_text(row.probability))
    except BaseException:
        for node, name, value in before:
            if value is None:
                node.RemoveAttribute(name)
            else:
                node.SetAttribute(name, value)
        raise


class ClassificationLogic(TaskLogic):
    """Starts classification runs. `python_executable` is PythonSlicer inside Slicer; with `warm_worker` runs go
    through that long-lived worker, which keeps the model loaded."""

    TASK = "classification"

    def start(self, volumes, model_id: str, device: str = "auto", create_saliency: bool = False,
              timeout_s: float | None = None, on_event: EventCallback | None = None,
              worker_env: dict[str, str] | None = None) -> ClassificationRun:
        """Validate, export and launch; raises InputError/ModelError before anything is started or created.

        `volumes`: one volume node, which must be usable (else InputError), or a sequence of them (e.g.
        scene_volumes()), of which those that cannot be classified get a row saying why; InputError only when none
        can be.
        """
        started_at = time.perf_counter()
        entries = self._entries(volumes)
        model = registry.get_model(model_id)
        if model.task != self.TASK:
            raise errors.ModelError(f"Model '{model.title}' is not a {self.TASK} model.")
        sent = [entry for entry in entries if entry.refusal is None]
        for index, entry in enumerate(sent, start=1):
            entry.key = f"volume{index}"
        outputs = {f"saliency_{entry.key}": f"saliency_{entry.key}.nrrd" for entry in sent} if create_saliency else {}
        options = {"input_names": {entry.key: entry.name for entry in sent}}

        def export(folder: Path) -> dict[str, str]:
            return {entry.key: str(export_volume(entry.node, folder / f"{entry.key}.nrrd")) for entry in sent}

        worker, export_seconds = launch(WORKER_TASK, sent[0].node, model, outputs, device, options, self.jobs_root,
                                        self.python_executable, self.warm_worker, timeout_s, on_event, worker_env,
                                        export_inputs=export, remote_server=self.remote_server)
        return ClassificationRun(worker, entries, model, create_saliency, started_at, export_seconds)

    @staticmethod
    def _entries(volumes) -> list[_Entry]:
        """One entry per distinct volume, in the given order; a single volume must be usable."""
        if volumes is None or not isinstance(volumes, Sequence):
            check_input_volume(volumes)
            verify_source_file(volumes)
            return [_Entry(volumes, volumes.GetName())]
        entries, seen = [], set()
        for node in volumes:
            if node is None or node.GetID() in seen:
                continue
            seen.add(node.GetID())
            entries.append(_Entry(node, node.GetName(), refusal=volume_problem(node)))
        if not entries:
            raise errors.InputError("There is no volume to classify; load or select a volume first.")
        if all(entry.refusal is not None for entry in entries):
            if len(entries) == 1:
                raise errors.InputError(entries[0].refusal)
            reasons = " ".join(f"'{entry.name}': {entry.refusal}" for entry in entries)
            raise errors.InputError(f"None of the {len(entries)} volumes can be classified. {reasons}")
        return entries

    def run(self, volumes, model_id: str, device: str = "auto", create_saliency: bool = False,
            timeout_s: float | None = None, on_event: EventCallback | None = None,
            worker_env: dict[str, str] | None = None) -> ClassificationResult:
        """Blocking variant for scripts, tests and the demo."""
        run = self.start(volumes, model_id, device, create_saliency, timeout_s, on_event, worker_env)
        run.wait()
        return run.finish()
