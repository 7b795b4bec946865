"""The lesion detection logic behind the DL Lesion Detection module (Qt-free: the headless tests and the demo run
exactly it).

One Apply: check the input volume, the optional extra contrasts of the same visit and the model -> export them into
one job folder (roles ``image``, ``image2``, ``image3``, ...) -> worker (task "detect") -> import, all on the input's
grid and beside it in the Data module:

- the anomaly map (a scalar volume, 0-1, coloured, meant as the foreground over the input);
- the brain map the model used (a label map: 1 CSF, 2 gray matter, 3 white matter, with its own colour table);
- a segmentation "<input> lesion candidates" with one segment per candidate ("Candidate 1", ... by decreasing
  score, coded with the generic lesion terminology, shown as 3D surfaces);
- one ROI box per candidate (in a subject hierarchy folder "<input> candidate boxes", aligned with the input's voxel
  axes, around the candidate's voxels) and one point list with a labelled control point at each centre
  ("C1 · 12.4 mL · 0.93");
- a table: Candidate, Volume (mL), R/A/S (mm) of the centre, Max score, Mean score, Tissue. The case-level
  abnormality score is stored on the table (and on the anomaly map) as the attribute ``MIADeepLearning.CaseScore``
  rather than as a row, so every row stays one candidate and the table exports as a clean CSV; the module shows it
  above the table.

Why the anomaly map carries the state (attributes and node references to every output): the sensitivity slider
re-derives candidates, segments, markups and table from the anomaly and brain maps already in the scene, with the
engine's own numpy-only `engine.candidates.find_candidates`, without running the network again — also after the
scene was saved and loaded again.

Nothing touches the scene before the worker has succeeded; the import runs inside a SceneGuard and computes
everything before it adds a node, so a failed or cancelled run leaves the scene exactly as it was (a segmentation
the user picked as the output is restored from a copy if filling it fails).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from MIADeepLearningLib.engine import candidates as lesion_candidates
from MIADeepLearningLib.engine import errors, registry
from MIADeepLearningLib.mrml.provenance import get_provenance, set_provenance
from MIADeepLearningLib.mrml.scene_guard import SceneGuard
from MIADeepLearningLib.mrml.source_files import verify_source_file
from MIADeepLearningLib.mrml.task_run import EventCallback, TaskLogic, TaskRun, launch
from MIADeepLearningLib.mrml.volumes import (
    OVERLAY_COLOR_NODE_IDS,
    array_from_image,
    check_input_volume,
    export_volume,
    ijk_to_ras,
    image_from_array,
    place_beside,
    put_on_grid,
    read_unattached_volume,
    same_grid,
    style_overlay,
)

WORKER_TASK = "detect"
DEFAULT_MODEL_ID = "brain-lesion"
OUTPUT_FILES = {"anomaly": "anomaly.nrrd", "label": "label.nrrd", "brain": "brain.nrrd"}
# The most candidates shown as segments, boxes, points and rows (the highest scores); a very low threshold on a noisy
# map could otherwise make thousands of nodes. The table's CandidatesFound attribute keeps the full count.
MAX_SHOWN_CANDIDATES = 50

# Copies of engine/detection.py's constants (that module imports SimpleITK, which the Slicer side never does; a test
# checks that they agree): Slicer's generic terminology "Morphologically Altered Structure" / "Lesion" (a finding,
# not a diagnosis) and the candidates' colours.
LESION_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^Morphologically Altered Structure"
    "~SCT^52988006^Lesion~^^~Anatomic codes - DICOM master list~^^~^^"
)
CANDIDATE_COLOURS = ([230, 41, 41], [255, 150, 0], [240, 220, 30], [200, 60, 200], [40, 160, 230], [60, 200, 120])
# The brain map's values (as engine.candidates.TISSUE_NAMES, capitalised like the tissue model's segments) and colours
BRAIN_LABELS = {1: ("CSF", (85, 188, 255)), 2: ("Gray matter", (200, 200, 235)), 3: ("White matter", (250, 250, 210))}

# On the anomaly map: what the re-derivation needs (attributes) and where the outputs are (node references)
ANOMALY_OF_ATTRIBUTE = "MIADeepLearning.AnomalyMapOf"  # ID of the input volume
DETECTION_NAME_ATTRIBUTE = "MIADeepLearning.DetectionName"  # the outputs' base name (the input's name)
THRESHOLD_ATTRIBUTE = "MIADeepLearning.Threshold"  # the threshold the shown candidates come from
MIN_VOLUME_ATTRIBUTE = "MIADeepLearning.MinVolumeMm3"
CASE_SCORE_ATTRIBUTE = "MIADeepLearning.CaseScore"  # also on the table
CANDIDATES_FOUND_ATTRIBUTE = "MIADeepLearning.CandidatesFound"  # also on the table; may exceed the rows shown
CANDIDATES_ATTRIBUTE = "MIADeepLearning.Candidates"  # JSON list of the shown candidates (engine.candidates fields)
TERMINOLOGY_ATTRIBUTE = "MIADeepLearning.CandidateTerminology"
BRAIN_COLORS_ATTRIBUTE = "MIADeepLearning.BrainMapColors"  # on the colour table of brain maps (one per scene)
INPUT_ROLE = "MIADeepLearningInput"
BRAIN_ROLE = "MIADeepLearningBrainMap"
SEGMENTATION_ROLE = "MIADeepLearningCandidateSegments"
POINTS_ROLE = "MIADeepLearningCandidateCentres"
TABLE_ROLE = "MIADeepLearningCandidateTable"
ROI_ROLE = "MIADeepLearningCandidateBox"

ANOMALY_SUFFIX = "anomaly map"
BRAIN_SUFFIX = "brain map"
POINTS_SUFFIX = "candidate centres"
BOXES_SUFFIX = "candidate boxes"
TABLE_SUFFIX = "lesion candidates table"
DEFAULT_SEGMENTATION_SUFFIX = "lesion candidates"
# The anomaly map is transparent below this, so the anatomy shows through where nothing departs from it
ANOMALY_DISPLAY_THRESHOLD = 0.1
ANOMALY_COLOR_NODE_IDS = OVERLAY_COLOR_NODE_IDS

CANDIDATE_COLUMN = "Candidate"
VOLUME_COLUMN = "Volume (mL)"
R_COLUMN, A_COLUMN, S_COLUMN = "R (mm)", "A (mm)", "S (mm)"
MAX_SCORE_COLUMN = "Max score"
MEAN_SCORE_COLUMN = "Mean score"
TISSUE_COLUMN = "Tissue"
COLUMNS = (CANDIDATE_COLUMN, VOLUME_COLUMN, R_COLUMN, A_COLUMN, S_COLUMN, MAX_SCORE_COLUMN, MEAN_SCORE_COLUMN,
           TISSUE_COLUMN)
_TEXT_COLUMNS = (CANDIDATE_COLUMN, TISSUE_COLUMN)


@dataclass
class DetectionResult:
    """The nodes of one detection and the candidates they show (at `threshold`)."""

    anomaly_node: Any
    brain_node: Any
    segmentation_node: Any
    points_node: Any
    roi_nodes: list[Any]
    table_node: Any
    candidates: list[dict[str, Any]]  # the shown ones, engine.candidates fields, by decreasing score
    found: int  # candidates above the threshold (MAX_SHOWN_CANDIDATES of them at most are shown)
    case_score: float
    threshold: float
    provenance: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    model_cached: bool = False

    @property
    def nodes(self) -> list[Any]:
        """Every output node (for provenance and tests)."""
        return [node for node in (self.anomaly_node, self.brain_node, self.segmentation_node, self.points_node,
                                  *self.roi_nodes, self.table_node) if node is not None]

    def summary(self) -> str:
        """'3 lesion candidates at threshold 0.50; case abnormality score 0.87'."""
        count = f"{self.found} lesion candidate{'' if self.found == 1 else 's'}"
        if self.found > len(self.candidates):
            count += f" (the {len(self.candidates)} highest shown)"
        return f"{count} at threshold {self.threshold:.2f}; case abnormality score {self.case_score:.2f}"


# ----------------------------------------------------------------------------------------------------- geometry
def kji_to_ras(node) -> np.ndarray:
    """4x4 from numpy (k, j, i, 1) voxel indices of the volume node to RAS mm: its IJKToRAS with the axes reversed."""
    return ijk_to_ras(node)[:, [2, 1, 0, 3]]


def voxel_volume_mm3(node) -> float:
    return float(abs(np.linalg.det(ijk_to_ras(node)[:3, :3])))


def grid_shape(node) -> tuple[int, int, int]:
    """(k, j, i) shape of the node's voxels."""
    return tuple(reversed(node.GetImageData().GetDimensions()))


def candidate_boxes(labels: np.ndarray, count: int, node) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per candidate 1..count: (centre RAS, 3x3 rotation whose columns are the box axes in RAS, size mm) of the box
    around its voxels (voxel edges, not centres), aligned with the node's voxel axes, so an oblique scan gets boxes
    along its own rows and columns."""
    matrix = ijk_to_ras(node)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)  # i, j, k
    axes = matrix[:3, :3] / spacing
    if np.linalg.det(axes) < 0:  # a flipped grid: the box is symmetric, so one axis can be reversed
        axes[:, 2] = -axes[:, 2]
    low = np.full((count + 1, 3), np.iinfo(np.int64).max, np.int64)
    high = np.full((count + 1, 3), -1, np.int64)
    inside = np.flatnonzero(labels)
    values = labels.ravel()[inside].astype(np.int64)
    kji = np.stack(np.unravel_index(inside, labels.shape), axis=1)
    ijk = kji[:, ::-1]
    for axis in range(3):
        np.minimum.at(low[:, axis], values, ijk[:, axis])
        np.maximum.at(high[:, axis], values, ijk[:, axis])
    boxes = []
    for label in range(1, count + 1):
        if high[label, 0] < 0:
            raise RuntimeError(f"Candidate {label} has no voxels in the candidate label map.")
        centre_ijk = (low[label] + high[label]) / 2.0
        centre = matrix @ np.append(centre_ijk, 1.0)
        size = (high[label] - low[label] + 1) * spacing
        boxes.append((centre[:3], axes.copy(), size))
    return boxes


# ----------------------------------------------------------------------------------------------------- display
def style_anomaly_map(node) -> None:
    """0-1 in a colour table, transparent below ANOMALY_DISPLAY_THRESHOLD: meant as the foreground over its scan."""
    style_overlay(node, ANOMALY_DISPLAY_THRESHOLD, ANOMALY_COLOR_NODE_IDS)


def brain_map_colors(scene) -> Any:
    """The scene's colour table of brain maps (names CSF / Gray matter / White matter on hover), made once."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLColorTableNode")
        if node.GetAttribute(BRAIN_COLORS_ATTRIBUTE):
            return node
    node = slicer.vtkMRMLColorTableNode()
    node.SetTypeToUser()
    node.SetNumberOfColors(max(BRAIN_LABELS) + 1)
    node.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
    for value, (name, colour) in BRAIN_LABELS.items():
        node.SetColor(value, name, *(channel / 255.0 for channel in colour), 1.0)
    node.SetName(scene.GenerateUniqueName("MIADeepLearning brain map colours"))
    node.SetAttribute(BRAIN_COLORS_ATTRIBUTE, "1")
    node.SetHideFromEditors(True)
    scene.AddNode(node)
    return node


# ----------------------------------------------------------------------------------------------------- outputs
def _volume_node(voxels: np.ndarray, reference, name: str, labelmap: bool) -> Any:
    """A new volume node in the reference's scene, on its grid, holding a copy of (k, j, i) voxels."""
    scene = reference.GetScene()
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    node.SetAndObserveImageData(image_from_array(voxels))
    matrix = vtk.vtkMatrix4x4()
    reference.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    node.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    return node


def _referenced(node, role: str) -> Any | None:
    return node.GetNodeReference(role) if node is not None else None


def _segment_specs(found: Sequence[dict[str, Any]], terminology: str) -> list[dict[str, Any]]:
    return [{"value": int(item["label"]), "id": f"Candidate {item['label']}", "name": f"Candidate {item['label']}",
             "color": [channel / 255.0 for channel in
                       CANDIDATE_COLOURS[(int(item["label"]) - 1) % len(CANDIDATE_COLOURS)]],
             "terminology": terminology} for item in found]


def _fill_segmentation(segmentation_node, labels: np.ndarray, reference, specs: list[dict[str, Any]]) -> None:
    """Replace the node's segments by one per spec (label value = candidate number), on the reference's grid.

    Why a backup: a segmentation the user picked as the output must come out of a failed fill as it went in."""
    backup = slicer.vtkSegmentation()
    backup.DeepCopy(segmentation_node.GetSegmentation())
    try:
        segmentation = segmentation_node.GetSegmentation()
        segmentation.RemoveAllSegments()
        segmentation.SetSourceRepresentationName(
            slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        if specs:
            segment_ids = vtk.vtkStringArray()
            for spec in specs:
                segment_id = segmentation.AddEmptySegment(spec["id"], spec["name"], spec["color"])
                if segment_id != spec["id"]:
                    raise RuntimeError(f"Slicer renamed segment {spec['id']!r} to {segment_id!r}.")
                segment = segmentation.GetSegment(segment_id)
                segment.SetTag(segment.GetTerminologyEntryTagName(), spec["terminology"])
                segment_ids.InsertNextValue(segment_id)
            import_node = slicer.vtkMRMLLabelMapVolumeNode()  # outside the scene: only its voxels and grid are read
            indexed = labels.astype(np.uint8 if len(specs) < 256 else np.uint16)
            import_node.SetAndObserveImageData(image_from_array(indexed))
            matrix = vtk.vtkMatrix4x4()
            reference.GetIJKToRASMatrix(matrix)
            import_node.SetIJKToRASMatrix(matrix)
            if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(
                    import_node, segmentation_node, segment_ids):
                raise RuntimeError("Slicer could not import the lesion candidates as segments.")
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.CreateClosedSurfaceRepresentation()
        segmentation_node.GetDisplayNode().SetVisibility3D(True)
    except BaseException:
        segmentation_node.GetSegmentation().DeepCopy(backup)
        raise


def _fill_points(points_node, found: Sequence[dict[str, Any]]) -> None:
    """One locked control point per candidate at its centre, labelled 'C1 · 12.4 mL · 0.93'."""
    points_node.RemoveAllControlPoints()
    for item in found:
        index = points_node.AddControlPoint(vtk.vtkVector3d(*item["center_ras"]),
                                            lesion_candidates.candidate_label(item))
        points_node.SetNthControlPointDescription(index, item.get("tissue") or "")
        points_node.SetNthControlPointLocked(index, True)
    points_node.CreateDefaultDisplayNodes()
    display = points_node.GetDisplayNode()
    if display is not None:
        display.SetPointLabelsVisibility(True)


def _new_box(scene, label: int, box: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Any:
    centre, axes, size = box
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"C{label}")
    matrix = vtk.vtkMatrix4x4()
    for row in range(3):
        for column in range(3):
            matrix.SetElement(row, column, float(axes[row, column]))
        matrix.SetElement(row, 3, float(centre[row]))
    roi.SetAndObserveObjectToNodeMatrix(matrix)
    roi.SetSize(*(float(value) for value in size))
    roi.SetLocked(True)  # a box marks where a candidate is; dragging it would only make it wrong
    roi.CreateDefaultDisplayNodes()
    colour = [channel / 255.0 for channel in CANDIDATE_COLOURS[(label - 1) % len(CANDIDATE_COLOURS)]]
    display = roi.GetDisplayNode()
    if display is not None:
        display.SetColor(*colour)
        display.SetSelectedColor(*colour)
    return roi


def _fill_table(table_node, found: Sequence[dict[str, Any]]) -> None:
    """COLUMNS, one row per candidate: text for name and tissue, numbers for the rest."""
    arrays = {}
    for column in COLUMNS:
        array = vtk.vtkStringArray() if column in _TEXT_COLUMNS else vtk.vtkDoubleArray()
        array.SetName(column)
        arrays[column] = array
    for item in found:
        values = {CANDIDATE_COLUMN: f"Candidate {item['label']}", VOLUME_COLUMN: float(item["volume_ml"]),
                  R_COLUMN: float(item["center_ras"][0]), A_COLUMN: float(item["center_ras"][1]),
                  S_COLUMN: float(item["center_ras"][2]), MAX_SCORE_COLUMN: float(item["max_score"]),
                  MEAN_SCORE_COLUMN: float(item["mean_score"]), TISSUE_COLUMN: item.get("tissue") or ""}
        for column in COLUMNS:
            arrays[column].InsertNextValue(values[column])
    table_node.SetLocked(False)
    table_node.RemoveAllColumns()
    for column in COLUMNS:
        table_node.GetTable().AddColumn(arrays[column])
    table_node.SetColumnDescription(VOLUME_COLUMN, "volume of the candidate's voxels above the threshold")
    table_node.SetColumnDescription(R_COLUMN, "centre of the candidate (centroid of its voxels), RAS")
    table_node.SetColumnDescription(MAX_SCORE_COLUMN, "highest anomaly score (0-1) in the candidate")
    table_node.SetColumnDescription(MEAN_SCORE_COLUMN, "mean anomaly score (0-1) over the candidate")
    table_node.SetColumnDescription(TISSUE_COLUMN, "the brain map's tissue under most of the candidate")
    table_node.SetLocked(True)  # computed values: not meant to be edited in the table view
    table_node.Modified()


def _boxes_folder(scene, old_rois: list[Any], anomaly_node, name: str) -> int:
    """The subject hierarchy folder of the candidate boxes: the old boxes' folder, else a new one beside the map."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for roi in old_rois:
        parent = sh.GetItemParent(sh.GetItemByDataNode(roi))
        if parent and sh.GetItemLevel(parent) == "Folder":
            return parent
    item = sh.GetItemByDataNode(anomaly_node)
    parent = sh.GetItemParent(item) if item else sh.GetSceneItemID()
    return sh.CreateFolderItem(parent, f"{name} {BOXES_SUFFIX}")


def _show_candidates(anomaly_node, labels: np.ndarray, found: list[dict[str, Any]], threshold: float,
                     base_provenance: dict[str, Any], output_segmentation=None,
                     segmentation_name: str | None = None) -> DetectionResult:
    """Make or update the threshold-dependent outputs of a detection (segments, points, boxes, table) from the
    candidate label map and the candidates, and record them on the anomaly map. Called inside a SceneGuard by the
    import and by the re-derivation; everything that can be refused is computed before the scene changes."""
    scene = anomaly_node.GetScene()
    name = anomaly_node.GetAttribute(DETECTION_NAME_ATTRIBUTE) or anomaly_node.GetName()
    total = len(found)
    shown = found[:MAX_SHOWN_CANDIDATES]
    if total > len(shown):
        labels = np.where(labels <= len(shown), labels, 0)
    boxes = candidate_boxes(labels, len(shown), anomaly_node)
    terminology = anomaly_node.GetAttribute(TERMINOLOGY_ATTRIBUTE) or LESION_TERMINOLOGY
    specs = _segment_specs(shown, terminology)
    case_score = float(anomaly_node.GetAttribute(CASE_SCORE_ATTRIBUTE) or 0.0)
    provenance = {**base_provenance, "threshold": threshold, "candidates": total,
                  "candidate_records": [{key: item[key] for key in lesion_candidates.CANDIDATE_FIELDS if key in item}
                                        for item in shown]}

    folder, new_folder, rois = None, False, []
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    old_rois = [anomaly_node.GetNthNodeReference(ROI_ROLE, index)
                for index in range(anomaly_node.GetNumberOfNodeReferences(ROI_ROLE))]
    old_rois = [roi for roi in old_rois if roi is not None]
    try:
        points = _referenced(anomaly_node, POINTS_ROLE)
        if points is None:
            points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                             scene.GenerateUniqueName(f"{name} {POINTS_SUFFIX}"))
            place_beside(points, anomaly_node)
        _fill_points(points, shown)
        points.SetLocked(True)

        table = _referenced(anomaly_node, TABLE_ROLE)
        if table is None:
            table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{name} {TABLE_SUFFIX}"))
            place_beside(table, anomaly_node)
        _fill_table(table, shown)

        folder = _boxes_folder(scene, old_rois, anomaly_node, name)
        new_folder = not any(sh.GetItemParent(sh.GetItemByDataNode(roi)) == folder for roi in old_rois)
        for item, box in zip(shown, boxes):
            roi = _new_box(scene, int(item["label"]), box)
            sh.SetItemParent(sh.GetItemByDataNode(roi) or sh.CreateItem(folder, roi), folder)
            rois.append(roi)

        # Last, the segmentation: it may be the user's own node (restored by _fill_segmentation if filling fails)
        segmentation = output_segmentation or _referenced(anomaly_node, SEGMENTATION_ROLE)
        if segmentation is None:
            segmentation = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode",
                scene.GenerateUniqueName(segmentation_name or f"{name} {DEFAULT_SEGMENTATION_SUFFIX}"))
            place_beside(segmentation, anomaly_node)
        _fill_segmentation(segmentation, labels, anomaly_node, specs)
        if output_segmentation is not None and segmentation_name:
            segmentation.SetName(segmentation_name)  # as DL Segmentation names a chosen output
    except BaseException:
        if folder and new_folder:  # a folder is no node, so the SceneGuard would leave it: remove it and its boxes
            for roi in rois:
                scene.RemoveNode(roi)
            if not sh.GetNumberOfItemChildren(folder):
                sh.RemoveItem(folder, False, False)
        raise

    for roi in old_rois:  # the new boxes are in place: the old ones go
        scene.RemoveNode(roi)
    if folder and not sh.GetNumberOfItemChildren(folder):
        sh.RemoveItem(folder, False, False)  # no candidates: no empty folder
    anomaly_node.RemoveNodeReferenceIDs(ROI_ROLE)
    for roi in rois:
        anomaly_node.AddNodeReferenceID(ROI_ROLE, roi.GetID())
    anomaly_node.SetNodeReferenceID(POINTS_ROLE, points.GetID())
    anomaly_node.SetNodeReferenceID(TABLE_ROLE, table.GetID())
    anomaly_node.SetNodeReferenceID(SEGMENTATION_ROLE, segmentation.GetID())
    anomaly_node.SetAttribute(THRESHOLD_ATTRIBUTE, f"{threshold:.6g}")
    anomaly_node.SetAttribute(CANDIDATES_FOUND_ATTRIBUTE, str(total))
    anomaly_node.SetAttribute(CANDIDATES_ATTRIBUTE, json.dumps(shown, separators=(",", ":")))
    table.SetAttribute(CASE_SCORE_ATTRIBUTE, f"{case_score:.4f}")
    table.SetAttribute(THRESHOLD_ATTRIBUTE, f"{threshold:.6g}")
    table.SetAttribute(CANDIDATES_FOUND_ATTRIBUTE, str(total))
    for node in (segmentation, points, table, *rois):
        set_provenance(node, provenance)
    return DetectionResult(anomaly_node, _referenced(anomaly_node, BRAIN_ROLE), segmentation, points, rois, table,
                           shown, total, case_score, threshold, provenance)


# ------------------------------------------------------------------------------------------- load and re-derive
def _checked_candidates(labels: np.ndarray | None, found: Any, shape: tuple[int, ...]) -> list[dict[str, Any]] | None:
    """The worker's candidates when they agree with its label map (numbered 1..n, every label described), else
    None (the candidates are then derived here from the anomaly map, with the same code)."""
    if labels is None or not isinstance(found, list) or labels.shape != shape:
        return None
    try:
        numbers = [int(item["label"]) for item in found]
        for item in found:
            for key in ("volume_ml", "max_score", "mean_score"):
                float(item[key])
            if len(item["center_ras"]) != 3:
                return None
    except (KeyError, TypeError, ValueError):
        return None
    if numbers != list(range(1, len(found) + 1)):
        return None
    values = np.unique(labels)
    if values.min() < 0 or values.max() > len(found) or len(values[values > 0]) != len(found):
        return None
    return [dict(item) for item in found]


def create_detection(input_volume, anomaly: np.ndarray, brain: np.ndarray, threshold: float,
                     min_volume_mm3: float = lesion_candidates.MIN_VOLUME_MM3, case_score: float | None = None,
                     labels: np.ndarray | None = None, found: list[dict[str, Any]] | None = None,
                     provenance: dict[str, Any] | None = None, segmentation_name: str | None = None,
                     output_segmentation=None, terminology: str | None = None,
                     warnings: list[str] | None = None) -> DetectionResult:
    """Load a detection into the scene from (k, j, i) arrays on the input volume's grid: the anomaly map (0-1), the
    brain map (0 outside, 1 CSF, 2 GM, 3 WM) and, when the worker gave them, its candidate label map and candidates
    (else they are derived here at `threshold`). Everything goes to new nodes except `output_segmentation`.
    Raises before the scene changes when an array is not on the input's grid; on any failure the scene is left as
    it was."""
    check_input_volume(input_volume)
    if output_segmentation is not None and not output_segmentation.IsA("vtkMRMLSegmentationNode"):
        raise errors.InputError(f"Output node '{output_segmentation.GetName()}' is not a segmentation node.")
    threshold = _checked_threshold(threshold)
    shape = grid_shape(input_volume)
    anomaly = np.asarray(anomaly, np.float32)
    brain = np.asarray(brain)
    for what, voxels in (("anomaly map", anomaly), ("brain map", brain)):
        if voxels.shape != shape:
            raise RuntimeError(f"The {what} {voxels.shape} is not on the grid of '{input_volume.GetName()}' "
                               f"{shape}.")
    if not np.isfinite(anomaly).all():
        raise RuntimeError("The anomaly map holds values that are not numbers.")
    anomaly = np.clip(anomaly, 0.0, 1.0)
    brain = brain.astype(np.uint8)
    voxel_volume = voxel_volume_mm3(input_volume)
    warnings = list(warnings or [])
    checked = _checked_candidates(None if labels is None else np.asarray(labels), found, shape)
    if checked is None:
        if found is not None:
            warnings.append("The worker's candidates did not match its label map; they were derived again from "
                            "the anomaly map.")
        labels, checked = lesion_candidates.find_candidates(anomaly, brain, kji_to_ras(input_volume), voxel_volume,
                                                            threshold, min_volume_mm3)
    labels = np.asarray(labels).astype(np.uint16)
    if case_score is None:
        case_score = lesion_candidates.case_score(anomaly, brain, voxel_volume)
    name = input_volume.GetName()
    base = {**(provenance or {}), "input_node": name, "min_volume_mm3": float(min_volume_mm3),
            "case_score": round(float(case_score), 4)}
    scene = input_volume.GetScene() or slicer.mrmlScene
    with SceneGuard(scene):
        anomaly_node = _volume_node(anomaly, input_volume, f"{name} {ANOMALY_SUFFIX}", labelmap=False)
        style_anomaly_map(anomaly_node)
        place_beside(anomaly_node, input_volume)
        anomaly_node.SetAttribute(ANOMALY_OF_ATTRIBUTE, input_volume.GetID())
        anomaly_node.SetAttribute(DETECTION_NAME_ATTRIBUTE, name)
        anomaly_node.SetAttribute(MIN_VOLUME_ATTRIBUTE, f"{float(min_volume_mm3):.6g}")
        anomaly_node.SetAttribute(CASE_SCORE_ATTRIBUTE, f"{float(case_score):.4f}")
        anomaly_node.SetAttribute(TERMINOLOGY_ATTRIBUTE, terminology or LESION_TERMINOLOGY)
        anomaly_node.SetNodeReferenceID(INPUT_ROLE, input_volume.GetID())
        brain_node = _volume_node(brain, input_volume, f"{name} {BRAIN_SUFFIX}", labelmap=True)
        brain_node.GetDisplayNode().SetAndObserveColorNodeID(brain_map_colors(scene).GetID())
        place_beside(brain_node, input_volume)
        anomaly_node.SetNodeReferenceID(BRAIN_ROLE, brain_node.GetID())
        set_provenance(anomaly_node, base)
        set_provenance(brain_node, base)
        result = _show_candidates(anomaly_node, labels, checked, threshold, base, output_segmentation,
                                  segmentation_name)
    result.provenance = base
    result.warnings = warnings
    return result


def _checked_threshold(threshold: float) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise errors.InputError(f"The threshold must be a number between 0 and 1, got {threshold!r}.") from None
    if not 0.0 < value < 1.0:
        raise errors.InputError(f"The threshold must lie between 0 and 1 (both excluded), got {value:g}.")
    return value


def is_anomaly_map(node) -> bool:
    return node is not None and bool(node.GetAttribute(ANOMALY_OF_ATTRIBUTE))


def _checked_anomaly_map(anomaly_node) -> Any:
    """The brain map of a detection's anomaly map; InputError (one sentence) when either is unusable."""
    if not is_anomaly_map(anomaly_node):
        label = f"'{anomaly_node.GetName()}'" if anomaly_node is not None else "No volume"
        raise errors.InputError(f"{label} is not an anomaly map made by DL Lesion Detection; run the detection "
                                "first.")
    if anomaly_node.GetScene() is None or anomaly_node.GetImageData() is None:
        raise errors.InputError(f"The anomaly map '{anomaly_node.GetName()}' has no voxels; run the detection again.")
    brain_node = _referenced(anomaly_node, BRAIN_ROLE)
    if brain_node is None or brain_node.GetImageData() is None:
        raise errors.InputError(f"The brain map of '{anomaly_node.GetName()}' was removed from the scene; run the "
                                "detection again to re-derive its candidates.")
    if not same_grid(brain_node, anomaly_node):
        raise errors.InputError(f"The brain map '{brain_node.GetName()}' is no longer on the grid of the anomaly map "
                                f"'{anomaly_node.GetName()}'; run the detection again.")
    return brain_node


def rederive(anomaly_node, threshold: float) -> DetectionResult:
    """Candidates, segments, points, boxes and table of a detection again at a new threshold, from the anomaly and
    brain maps already in the scene, with engine.candidates (numpy only): no worker, no network. The anomaly and
    brain maps and the case score do not change (they do not depend on the threshold)."""
    brain_node = _checked_anomaly_map(anomaly_node)
    threshold = _checked_threshold(threshold)
    anomaly = array_from_image(anomaly_node.GetImageData())
    brain = array_from_image(brain_node.GetImageData())
    min_volume = float(anomaly_node.GetAttribute(MIN_VOLUME_ATTRIBUTE) or lesion_candidates.MIN_VOLUME_MM3)
    labels, found = lesion_candidates.find_candidates(anomaly, brain, kji_to_ras(anomaly_node),
                                                      voxel_volume_mm3(anomaly_node), threshold, min_volume)
    base = dict(get_provenance(anomaly_node) or {})
    with SceneGuard(anomaly_node.GetScene()):
        result = _show_candidates(anomaly_node, labels, found, threshold, {**base, "rederived": True})
    result.provenance = base
    return result


def detection_of(anomaly_node) -> DetectionResult | None:
    """The detection an anomaly map belongs to, as it is in the scene now (e.g. after loading a saved scene);
    None when the node is no such map."""
    if not is_anomaly_map(anomaly_node):
        return None
    try:
        shown = json.loads(anomaly_node.GetAttribute(CANDIDATES_ATTRIBUTE) or "[]")
    except ValueError:
        shown = []
    rois = [anomaly_node.GetNthNodeReference(ROI_ROLE, index)
            for index in range(anomaly_node.GetNumberOfNodeReferences(ROI_ROLE))]
    return DetectionResult(
        anomaly_node, _referenced(anomaly_node, BRAIN_ROLE), _referenced(anomaly_node, SEGMENTATION_ROLE),
        _referenced(anomaly_node, POINTS_ROLE), [roi for roi in rois if roi is not None],
        _referenced(anomaly_node, TABLE_ROLE), shown if isinstance(shown, list) else [],
        int(anomaly_node.GetAttribute(CANDIDATES_FOUND_ATTRIBUTE) or len(shown)),
        float(anomaly_node.GetAttribute(CASE_SCORE_ATTRIBUTE) or 0.0),
        float(anomaly_node.GetAttribute(THRESHOLD_ATTRIBUTE) or lesion_candidates.DEFAULT_THRESHOLD),
        dict(get_provenance(anomaly_node) or {}))


def default_threshold(model: registry.ModelInfo) -> float:
    """The model's calibrated threshold (slicer.options.threshold of its package), else the engine's default."""
    value = (model.slicer.get("options") or {}).get("threshold", lesion_candidates.DEFAULT_THRESHOLD)
    return float(value)


# ----------------------------------------------------------------------------------------------------- the run
def _read_on_grid(path: str | None, reference, labelmap: bool, what: str) -> np.ndarray:
    """A result file's (k, j, i) voxels on the reference's grid (re-indexed if Slicer's reader flipped axes)."""
    if not path or not Path(path).is_file():
        raise RuntimeError(f"The worker returned no {what}.")
    node = read_unattached_volume(path, labelmap)
    put_on_grid(node, reference, Path(path).name)
    return array_from_image(node.GetImageData()).copy()


class DetectionRun(TaskRun):
    """A started detection run (see TaskRun); the import makes every output (create_detection)."""

    def __init__(self, worker, input_volume, extra_volumes: list[Any], model: registry.ModelInfo, threshold: float,
                 output_segmentation, started_at: float, export_seconds: float):
        super().__init__(worker, input_volume, model, started_at, export_seconds)
        self.extra_volumes = extra_volumes
        self.threshold = threshold
        self.output_segmentation = output_segmentation

    def _import(self, result: dict[str, Any]) -> DetectionResult:
        import_started = time.perf_counter()
        scene = self.input_volume.GetScene()
        if scene is None or not scene.IsNodePresent(self.input_volume):
            raise errors.InputError("The input volume was removed from the scene while the model ran.")
        if self.output_segmentation is not None and not scene.IsNodePresent(self.output_segmentation):
            raise errors.InputError("The output segmentation was removed from the scene while the model ran.")
        files = result.get("outputs") or {}
        anomaly = _read_on_grid(files.get("anomaly"), self.input_volume, False, "anomaly map")
        brain = _read_on_grid(files.get("brain"), self.input_volume, True, "brain map")
        labels = _read_on_grid(files["label"], self.input_volume, True, "candidate label map") \
            if files.get("label") else None
        provenance = dict(result.get("provenance") or {})
        options = self.model.slicer.get("options") or {}
        min_volume = float(provenance.get("min_volume_mm3", options.get("min_volume_mm3",
                                                                         lesion_candidates.MIN_VOLUME_MM3)))
        segments = result.get("segments") or []
        terminology = next((str(item["terminology"]) for item in segments
                            if isinstance(item, dict) and item.get("terminology")), None)
        case_score = result.get("case_score")
        provenance["extra_input_nodes"] = [node.GetName() for node in self.extra_volumes]
        suffix = self.model.slicer.get("output_name_suffix") or DEFAULT_SEGMENTATION_SUFFIX
        detection = create_detection(
            self.input_volume, anomaly, brain, float(result.get("threshold", self.threshold)), min_volume,
            None if case_score is None else float(case_score), labels, result.get("candidates"), provenance,
            f"{self.input_volume.GetName()} {suffix}", self.output_segmentation, terminology,
            list(result.get("warnings") or []))
        detection.timings = self._timings(result, import_started)
        detection.provenance["timings_s"] = detection.timings
        for node in detection.nodes:  # the same record everywhere, now with the import's own time
            set_provenance(node, {**(get_provenance(node) or {}), "timings_s": detection.timings})
        detection.model_cached = bool(result.get("model_cached", False))
        return detection


def _bounds_overlap(first, second) -> bool:
    a, b = [0.0] * 6, [0.0] * 6
    first.GetRASBounds(a)
    second.GetRASBounds(b)
    return all(a[2 * axis] < b[2 * axis + 1] and b[2 * axis] < a[2 * axis + 1] for axis in range(3))


class DetectionLogic(TaskLogic):
    """Starts lesion detection runs. `python_executable` is PythonSlicer inside Slicer; with `warm_worker` runs go
    through that long-lived worker, which keeps the model loaded."""

    TASK = "detection"

    @staticmethod
    def _checked_extras(input_volume, extra_volumes: Sequence[Any] | None) -> list[Any]:
        """The extra contrasts as sent (None entries dropped); InputError for one that is the input itself, given
        twice, unusable or nowhere near the input in space (not co-registered)."""
        extras: list[Any] = []
        for node in extra_volumes or ():
            if node is None:
                continue
            if node is input_volume or any(node is other for other in extras):
                raise errors.InputError(f"'{node.GetName()}' is selected twice; each extra contrast must be another "
                                        "volume than the input and the other extra contrast.")
            check_input_volume(node)
            verify_source_file(node, role="extra contrast")
            if not _bounds_overlap(node, input_volume):
                raise errors.InputError(
                    f"The extra contrast '{node.GetName()}' does not overlap '{input_volume.GetName()}' in space; "
                    "contrasts of the same visit must be co-registered (register them first, e.g. with DL "
                    "Registration).")
            extras.append(node)
        return extras

    def start(self, input_volume, model_id: str = DEFAULT_MODEL_ID, device: str = "auto",
              extra_volumes: Sequence[Any] | None = None, threshold: float | None = None,
              output_segmentation=None, timeout_s: float | None = None, on_event: EventCallback | None = None,
              worker_env: dict[str, str] | None = None) -> DetectionRun:
        """Validate, export and launch; raises InputError/ModelError before anything is started or created.

        `extra_volumes`: more co-registered contrasts of the same visit (the engine resamples them onto the input's
        grid and averages the anomaly over all). `threshold`: the candidates' threshold on the anomaly map (default:
        the model's own); the slider changes it later without running the model (rederive)."""
        started_at = time.perf_counter()
        model = self._checked_model(input_volume, model_id)
        extras = self._checked_extras(input_volume, extra_volumes)
        if output_segmentation is not None and not output_segmentation.IsA("vtkMRMLSegmentationNode"):
            raise errors.InputError(f"Output node '{output_segmentation.GetName()}' is not a segmentation node.")
        threshold = _checked_threshold(default_threshold(model) if threshold is None else threshold)
        roles = {"image": input_volume, **{f"image{index}": node for index, node in enumerate(extras, start=2)}}
        options = {"input_names": {role: node.GetName() for role, node in roles.items()},
                   "model_options": {"threshold": threshold}}

        def export(folder: Path) -> dict[str, str]:
            return {role: str(export_volume(node, folder / f"{role}.nrrd")) for role, node in roles.items()}

        worker, export_seconds = launch(WORKER_TASK, input_volume, model, dict(OUTPUT_FILES), device, options,
                                        self.jobs_root, self.python_executable, self.warm_worker, timeout_s,
                                        on_event, worker_env, export_inputs=export, remote_server=self.remote_server)
        return DetectionRun(worker, input_volume, extras, model, threshold, output_segmentation, started_at,
                            export_seconds)

    def run(self, input_volume, model_id: str = DEFAULT_MODEL_ID, device: str = "auto",
            extra_volumes: Sequence[Any] | None = None, threshold: float | None = None, output_segmentation=None,
            timeout_s: float | None = None, on_event: EventCallback | None = None,
            worker_env: dict[str, str] | None = None) -> DetectionResult:
        """Blocking variant for scripts, tests and the demo."""
        run = self.start(input_volume, model_id, device, extra_volumes, threshold, output_segmentation, timeout_s,
                         on_event, worker_env)
        run.wait()
        return run.finish()

    @staticmethod
    def rederive(anomaly_node, threshold: float) -> DetectionResult:
        return rederive(anomaly_node, threshold)
