"""The registration logic behind the DL Registration module (Qt-free: the headless tests and the demo run exactly it).

One Apply: check the nodes -> export the fixed and moving volumes, the optional masks (segmentations, all segments
together) and the optional segmentations (label values chosen here, value -> segment kept) into a job folder ->
worker (task "register") -> import: a grid transform node (moving -> fixed, from the worker's .h5), the moving
volume resampled onto the fixed grid, the moving segmentation propagated onto the fixed grid with the original
segments' IDs, names, colours and terminology, and a table of quality measures (Jacobian of the transform, Dice of
segments present on both sides) -> provenance on every output. Nothing touches the scene before the worker has
succeeded; the import runs inside a SceneGuard, so a failed or cancelled run leaves the scene exactly as it was.
The user's nodes are only read (segmentations through a copy outside the scene).

Fixed and moving segmentations are matched by segment name (case and surrounding spaces ignored): the names are
what a user sees, and two segmentations made by the same model, or drawn with the same terminology, share them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from MIADeepLearningLib.engine import errors, registry
from MIADeepLearningLib.mrml.compat import segment_terminology
from MIADeepLearningLib.mrml.provenance import set_provenance
from MIADeepLearningLib.mrml.scene_guard import SceneGuard
from MIADeepLearningLib.mrml.segmentations import segmentation_from_label_file, segments_label_array
from MIADeepLearningLib.mrml.source_files import verify_source_file
from MIADeepLearningLib.mrml.task_run import EventCallback, TaskLogic, TaskRun, launch
from MIADeepLearningLib.mrml.transforms import load_grid_transform
from MIADeepLearningLib.mrml.volumes import (
    check_input_volume,
    export_label_array,
    export_volume,
    place_beside,
    read_volume_file,
)

WORKER_TASK = "register"
OUTPUT_FILES = {"transform": "transform.h5", "warped": "warped.nrrd", "warped_labels": "warped_labels.nrrd",
                "report": "report.json"}
MAX_INSTANCE_STEPS = 1000

MEASURE_COLUMN = "Measure"
VALUE_COLUMN = "Value"
MEANING_COLUMN = "Meaning"


@dataclass(frozen=True)
class SegmentLabel:
    """One segment of the moving segmentation and the label value it travels under."""

    value: int
    segment_id: str
    name: str
    color: tuple[float, float, float]  # 0-1, as Slicer keeps it
    terminology: str


@dataclass(frozen=True)
class QualityRow:
    """One line of the quality report (shown in the module, stored in the table node)."""

    measure: str
    value: float
    meaning: str


@dataclass
class RegistrationResult:
    transform_node: Any  # vtkMRMLGridTransformNode, moving -> fixed: put the moving volume under it
    warped_volume_node: Any  # the moving volume resampled onto the fixed grid
    segmentation_node: Any | None  # the moving segmentation propagated onto the fixed grid, when one was given
    report_table_node: Any  # the quality rows as a vtkMRMLTableNode
    quality: list[QualityRow]
    report: dict[str, Any]  # the worker's report, as it came
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    model_cached: bool = False

    def summary(self) -> str:
        """One line for the status: folding, smoothness and, when there are segments on both sides, mean Dice."""
        rows = {row.measure: row.value for row in self.quality}
        parts = []
        if FOLDING in rows:
            parts.append(f"folding {rows[FOLDING]:.2f} % of voxels")
        if LOG_STD in rows:
            parts.append(f"SD log det J {rows[LOG_STD]:.3f}")
        if MEAN_DICE in rows:
            dice = f"mean Dice {rows[MEAN_DICE]:.3f}"
            if MEAN_DICE_BEFORE in rows:
                dice += f" (before {rows[MEAN_DICE_BEFORE]:.3f})"
            parts.append(dice)
        return ", ".join(parts)


FOLDING = "Folded voxels (det J <= 0), %"
LOG_STD = "SD of log det J"
MEAN_DICE = "Mean Dice"
MEAN_DICE_BEFORE = "Mean Dice before registration"
MEAN_DICE_AFFINE = "Mean Dice after affine only"
_JACOBIAN_ROWS = (
    ("jacobian_non_positive_percent", FOLDING, "share of voxels where the transform folds; 0 is ideal"),
    ("jacobian_log_std", LOG_STD, "spread of the local volume change; lower is smoother"),
    ("jacobian_mean", "Mean det J", "average local volume change; 1 keeps the volume"),
    ("jacobian_min", "Min det J", "strongest local shrinking (<= 0: folding)"),
    ("jacobian_max", "Max det J", "strongest local growth"),
)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def quality_rows(report: dict[str, Any], compared: list[SegmentLabel]) -> list[QualityRow]:
    """The rows of the quality table from the worker's report (Docs/Developers.md, task ``register``).

    Dice is shown only for segments present in both segmentations (`compared`): the worker scores every label of
    either map, and a segment the fixed side lacks would score 0 for a reason that is not the registration. So the
    means are taken here, over the compared segments, from the per-label scores after registration (``dice``),
    before it (``dice_before``) and after the affine step alone (``dice_affine``); a mean is shown only when every
    compared segment has its score.
    """
    rows = []
    region = report.get("jacobian_region")
    for key, measure, meaning in _JACOBIAN_ROWS:
        value = _number(report.get(key))
        if value is not None:
            if region:
                meaning = f"{meaning} (over the {region})"
            rows.append(QualityRow(measure, value, meaning))
    dice = report.get("dice") or {}
    stages = {"before": report.get("dice_before"), "affine": report.get("dice_affine")}
    per_label = {stage: scores for stage, scores in stages.items() if isinstance(scores, dict)}
    scores: dict[str, list[float]] = {"after": [], "before": [], "affine": []}
    for label in compared:
        value = _number(dice.get(str(label.value)))
        if value is None:
            continue
        scores["after"].append(value)
        meaning = "overlap of the carried-over and the fixed segment; 1 is identical"
        for stage, words in (("before", "before registration"), ("affine", "after the affine step")):
            earlier = _number(per_label[stage].get(str(label.value))) if stage in per_label else None
            if earlier is not None:
                scores[stage].append(earlier)
                meaning += f"; {words} {earlier:.3f}"
        rows.append(QualityRow(f"Dice: {label.name}", value, meaning))
    if scores["after"]:
        count = len(scores["after"])
        rows.append(QualityRow(MEAN_DICE, float(np.mean(scores["after"])),
                               f"over the {count} segment(s) present in both segmentations"))
        for stage, measure, meaning in (
            ("before", MEAN_DICE_BEFORE, "the same segments, the moving segmentation on the fixed grid as it was"),
            ("affine", MEAN_DICE_AFFINE, "the same segments after the affine pre-alignment alone"),
        ):
            if len(scores[stage]) == count:
                rows.append(QualityRow(measure, float(np.mean(scores[stage])), meaning))
    return rows


def quality_table(rows: list[QualityRow], name: str, reference_volume) -> Any:
    """A new, locked table node (name made unique) beside the reference volume: Measure, Value, Meaning."""
    measures, values, meanings = vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkStringArray()
    for array, column in ((measures, MEASURE_COLUMN), (values, VALUE_COLUMN), (meanings, MEANING_COLUMN)):
        array.SetName(column)
    for row in rows:
        measures.InsertNextValue(row.measure)
        values.InsertNextValue(row.value)
        meanings.InsertNextValue(row.meaning)
    scene = reference_volume.GetScene() or slicer.mrmlScene
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    for array in (measures, values, meanings):
        table_node.GetTable().AddColumn(array)
    table_node.SetColumnDescription(VALUE_COLUMN, "det J: Jacobian determinant of the transform on the fixed grid; "
                                                  "Dice: 2|A and B| / (|A| + |B|) on the fixed grid")
    table_node.SetLocked(True)  # measured values: not meant to be edited in the table view
    table_node.Modified()
    place_beside(table_node, reference_volume)
    return table_node


# ------------------------------------------------------------------------------------------------ input checks
def _name(node) -> str:
    return f"'{node.GetName()}'"


def _check_volume(node, role: str) -> None:
    """A usable 3D scalar volume with some contrast (a constant or NaN volume gives nothing to align)."""
    if node is None:
        raise errors.InputError(f"No {role} volume is selected; select a 3D scalar volume.")
    check_input_volume(node)
    verify_source_file(node, role)
    voxels = slicer.util.arrayFromVolume(node)
    finite = np.isfinite(voxels)
    if not finite.all():
        raise errors.InputError(f"The {role} volume {_name(node)} has {int(finite.size - np.count_nonzero(finite))} "
                                "voxels that are NaN or infinite.")
    low, high = float(voxels.min()), float(voxels.max())
    if low == high:
        raise errors.InputError(f"The {role} volume {_name(node)} is empty (every voxel is {low:g}); there is "
                                "nothing to align.")


def _check_segmentation(node, role: str) -> None:
    if node is None:
        return
    if not node.IsA("vtkMRMLSegmentationNode"):
        raise errors.InputError(f"The {role} {_name(node)} is a {node.GetClassName()}, not a segmentation.")
    parent = node.GetParentTransformNode()
    if parent is not None:
        raise errors.InputError(f"The {role} {_name(node)} is under the transform '{parent.GetName()}'; harden the "
                                "transform (Data module, right-click > Harden transform) first.")
    if node.GetSegmentation().GetNumberOfSegments() == 0:
        raise errors.InputError(f"The {role} {_name(node)} has no segments.")


def _segments(node) -> list[tuple[str, str]]:
    """(segment ID, name) in display order."""
    segmentation = node.GetSegmentation()
    return [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName())
            for i in range(segmentation.GetNumberOfSegments())]


def _key(name: str) -> str:
    return name.strip().casefold()


@dataclass
class _Prepared:
    """What the job exports, checked before anything is started: label arrays on their image's grid."""

    fixed_mask: np.ndarray | None = None
    moving_mask: np.ndarray | None = None
    moving_labels: np.ndarray | None = None
    fixed_labels: np.ndarray | None = None
    labels: list[SegmentLabel] = field(default_factory=list)  # value -> moving segment
    compared: list[SegmentLabel] = field(default_factory=list)  # those also in the fixed segmentation
    warnings: list[str] = field(default_factory=list)


def _mask(node, image, role: str) -> np.ndarray | None:
    if node is None:
        return None
    values = segments_label_array(node, image, [(segment_id, 1) for segment_id, _ in _segments(node)])
    if not values.any():
        raise errors.InputError(f"The {role} {_name(node)} has no voxels inside the volume {_name(image)}; draw it "
                                "on that volume or leave the mask empty.")
    return (values > 0).astype(np.uint8)


def _prepare(fixed, moving, fixed_mask, moving_mask, moving_segmentation, fixed_segmentation) -> _Prepared:
    prepared = _Prepared(fixed_mask=_mask(fixed_mask, fixed, "fixed mask"),
                         moving_mask=_mask(moving_mask, moving, "moving mask"))
    if moving_segmentation is not None:
        segmentation = moving_segmentation.GetSegmentation()
        for value, (segment_id, name) in enumerate(_segments(moving_segmentation), start=1):
            segment = segmentation.GetSegment(segment_id)
            prepared.labels.append(SegmentLabel(value, segment_id, name, tuple(segment.GetColor()),
                                                segment_terminology(segment)))
        prepared.moving_labels = segments_label_array(moving_segmentation, moving,
                                                      [(label.segment_id, label.value) for label in prepared.labels])
        present = set(np.unique(prepared.moving_labels).tolist())
        if not present - {0}:
            raise errors.InputError(f"The moving segmentation {_name(moving_segmentation)} has no voxels inside the "
                                    f"moving volume {_name(moving)}; it must be drawn on that volume.")
        for label in prepared.labels:
            if label.value not in present:
                prepared.warnings.append(f"Segment '{label.name}' of {_name(moving_segmentation)} is empty inside "
                                         "the moving volume (or hidden under a later segment); it stays empty.")
    if fixed_segmentation is not None:
        if moving_segmentation is None:
            prepared.warnings.append("Dice needs a moving segmentation as well as the fixed one; the report has "
                                     "no Dice.")
            return prepared
        by_name = {}
        for segment_id, name in _segments(fixed_segmentation):
            by_name.setdefault(_key(name), segment_id)
        pairs = []
        for label in prepared.labels:  # a fixed segment is compared with the first moving segment of its name
            segment_id = by_name.pop(_key(label.name), None)
            if segment_id is not None:
                pairs.append((segment_id, label))
        if not pairs:
            prepared.warnings.append(f"No segment of {_name(fixed_segmentation)} has the name of a segment of "
                                     f"{_name(moving_segmentation)}; Dice compares segments of the same name, so the "
                                     "report has no Dice.")
            return prepared
        prepared.compared = [label for _, label in pairs]
        prepared.fixed_labels = segments_label_array(fixed_segmentation, fixed,
                                                     [(segment_id, label.value) for segment_id, label in pairs])
    return prepared


def _exporter(fixed, moving, prepared: _Prepared):
    """The job's files: the volumes as they are, the label arrays on their image's grid (NRRD)."""

    def export(folder: Path) -> dict[str, str]:
        inputs = {"fixed": export_volume(fixed, folder / "fixed.nrrd"),
                  "moving": export_volume(moving, folder / "moving.nrrd")}
        for role, voxels, image in (("fixed_mask", prepared.fixed_mask, fixed),
                                    ("moving_mask", prepared.moving_mask, moving),
                                    ("moving_labels", prepared.moving_labels, moving),
                                    ("fixed_labels", prepared.fixed_labels, fixed)):
            if voxels is not None:
                inputs[role] = export_label_array(voxels, image, folder / f"{role}.nrrd")
        return {role: str(path) for role, path in inputs.items()}

    return export


# ---------------------------------------------------------------------------------------------------- the run
class RegistrationRun(TaskRun):
    """A started registration run (see TaskRun); `input_volume` is the fixed volume, where every output lies."""

    def __init__(self, worker, fixed_volume, moving_volume, model: registry.ModelInfo, prepared: _Prepared,
                 moving_segmentation, node_names: dict[str, str], instance_steps: int, started_at: float,
                 export_seconds: float):
        super().__init__(worker, fixed_volume, model, started_at, export_seconds)
        self.moving_volume = moving_volume
        self.moving_segmentation = moving_segmentation
        self._prepared = prepared
        self._node_names = node_names
        self._instance_steps = instance_steps

    def _import(self, result: dict[str, Any]) -> RegistrationResult:
        import_started = time.perf_counter()
        fixed, moving = self.input_volume, self.moving_volume
        files = result["outputs"]
        report = result.get("report")
        if report is None and "report" in files:
            report = json.loads(Path(files["report"]).read_text(encoding="utf-8"))
        report = dict(report or {})
        prepared = self._prepared
        rows = quality_rows(report, prepared.compared)
        scene = fixed.GetScene() or slicer.mrmlScene
        with SceneGuard(scene):
            transform = load_grid_transform(files["transform"],
                                            scene.GenerateUniqueName(f"{moving.GetName()} to {fixed.GetName()}"),
                                            scene)
            place_beside(transform, fixed)
            warped = read_volume_file(files["warped"], scene.GenerateUniqueName(f"{moving.GetName()} registered"),
                                      reference=fixed)
            self._copy_display(warped, like=moving)
            segmentation = None
            if prepared.labels:
                if "warped_labels" not in files:
                    raise RuntimeError("The worker returned no propagated labels for the moving segmentation.")
                segments = [{"value": label.value, "id": label.segment_id, "name": label.name,
                             "color": [255.0 * c for c in label.color], "terminology": label.terminology}
                            for label in prepared.labels]
                name = scene.GenerateUniqueName(f"{self.moving_segmentation.GetName()} registered")
                segmentation = segmentation_from_label_file(files["warped_labels"], fixed, segments, name)
            table = quality_table(rows, f"{moving.GetName()} to {fixed.GetName()} registration quality", fixed)
            timings = self._timings(result, import_started)
            provenance = dict(result.get("provenance") or {})
            provenance.update({
                "timings_s": timings,
                "input_node": fixed.GetName(),
                **self._node_names,
                "instance_steps": self._instance_steps,
                "segment_labels": {str(label.value): label.name for label in prepared.labels},
                "report": report,
            })
            for node in filter(None, [transform, warped, segmentation, table]):
                set_provenance(node, provenance)
        warnings = prepared.warnings + list(result.get("warnings", []))
        return RegistrationResult(transform, warped, segmentation, table, rows, report, provenance, warnings,
                                  timings, bool(result.get("model_cached", False)))


class RegistrationLogic(TaskLogic):
    """Starts registration runs. `python_executable` is PythonSlicer inside Slicer; with `warm_worker` runs go
    through that long-lived worker, which keeps the model loaded."""

    TASK = "registration"

    def start(self, fixed_volume, moving_volume, model_id: str, device: str = "auto", fixed_mask=None,
              moving_mask=None, moving_segmentation=None, fixed_segmentation=None, instance_steps: int = 0,
              timeout_s: float | None = None, on_event: EventCallback | None = None,
              worker_env: dict[str, str] | None = None) -> RegistrationRun:
        """Validate, export and launch; raises InputError/ModelError before anything is started or created.

        Masks are segmentation nodes (every segment counts as inside). `instance_steps` > 0 asks the worker to
        refine the network's field on this pair for that many optimisation steps.
        """
        started_at = time.perf_counter()
        _check_volume(fixed_volume, "fixed")
        _check_volume(moving_volume, "moving")
        if fixed_volume is moving_volume:
            raise errors.InputError(f"The fixed and the moving volume are the same volume {_name(fixed_volume)}; "
                                    "choose two different volumes.")
        for node, role in ((fixed_mask, "fixed mask"), (moving_mask, "moving mask"),
                           (moving_segmentation, "moving segmentation"),
                           (fixed_segmentation, "fixed segmentation")):
            _check_segmentation(node, role)
        if moving_segmentation is not None and moving_segmentation is fixed_segmentation:
            raise errors.InputError(f"The moving and the fixed segmentation are the same node "
                                    f"{_name(moving_segmentation)}; Dice needs one segmentation of each image.")
        if isinstance(instance_steps, bool) or not isinstance(instance_steps, int) \
                or not 0 <= instance_steps <= MAX_INSTANCE_STEPS:
            raise errors.InputError(f"The number of refinement steps must be a whole number from 0 (off) to "
                                    f"{MAX_INSTANCE_STEPS}, not {instance_steps!r}.")
        prepared = _prepare(fixed_volume, moving_volume, fixed_mask, moving_mask, moving_segmentation,
                            fixed_segmentation)
        model = self._checked_model(fixed_volume, model_id)
        outputs = {role: OUTPUT_FILES[role] for role in ("transform", "warped", "report")}
        if prepared.moving_labels is not None:
            outputs["warped_labels"] = OUTPUT_FILES["warped_labels"]
        node_names = {f"{role}_node": node.GetName() for role, node in (
            ("fixed", fixed_volume), ("moving", moving_volume), ("fixed_mask", fixed_mask),
            ("moving_mask", moving_mask), ("moving_segmentation", moving_segmentation),
            ("fixed_segmentation", fixed_segmentation)) if node is not None}
        input_names = {role[:-len("_node")]: name for role, name in node_names.items()}
        options = {"model_options": {"instance_steps": instance_steps}, "input_names": input_names}
        worker, export_seconds = launch(WORKER_TASK, fixed_volume, model, outputs, device, options, self.jobs_root,
                                        self.python_executable, self.warm_worker, timeout_s, on_event, worker_env,
                                        export_inputs=_exporter(fixed_volume, moving_volume, prepared),
                                        remote_server=self.remote_server)
        return RegistrationRun(worker, fixed_volume, moving_volume, model, prepared, moving_segmentation, node_names,
                               instance_steps, started_at, export_seconds)

    def run(self, fixed_volume, moving_volume, model_id: str, device: str = "auto", fixed_mask=None,
            moving_mask=None, moving_segmentation=None, fixed_segmentation=None, instance_steps: int = 0,
            timeout_s: float | None = None, on_event: EventCallback | None = None,
            worker_env: dict[str, str] | None = None) -> RegistrationResult:
        """Blocking variant for scripts, tests and the demo."""
        run = self.start(fixed_volume, moving_volume, model_id, device, fixed_mask, moving_mask, moving_segmentation,
                         fixed_segmentation, instance_steps, timeout_s, on_event, worker_env)
        run.wait()
        return run.finish()

