"""Registration scenarios, run both by pytest on a headless scene and by the Slicer self-test (DLRegistrationTest).

Same contract as scenarios.py: no arguments, ``slicer.mrmlScene``, the same RegistrationLogic the DL Registration
module uses with a real worker process and the shipped registration network; AssertionError when the product
misbehaves, ScenarioSkipped when a prerequisite is missing on this machine.

The pair is a small synthetic head: nested ellipsoids (scalp, brain, two ventricles, a lesion) rendered in two
contrasts (T1-like fixed, T2-like moving: ventricles dark in one and bright in the other). The moving copy is shifted
by SHIFT_RAS_MM and smoothly deformed by up to about 1.5 mm; the fixed grid is oblique, anisotropic and left-handed,
the moving one axis-aligned. Because the anatomy is a formula, the truth is known everywhere: where each fixed point
is in the moving image, what the moving image should look like on the fixed grid, and each structure's label.
About 40,000 fixed and 80,000 moving voxels, so a run takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import slicer
import vtk

from MIADeepLearningLib import jobs, runner
from MIADeepLearningLib.engine import errors, registry
from MIADeepLearningLib.mrml.compat import segment_terminology
from MIADeepLearningLib.mrml.provenance import get_provenance
from MIADeepLearningLib.mrml.registration_logic import (
    FOLDING,
    MEAN_DICE,
    MEAN_DICE_BEFORE,
    RegistrationLogic,
    RegistrationResult,
)
from MIADeepLearningLib.mrml.segmentations import label_array, segments_label_array
from MIADeepLearningLib.mrml.volumes import ijk_to_ras, same_grid
from MIADeepLearningLib.testing.scenarios import (
    ScenarioSkipped,
    assert_fails_cleanly,
    dice,
    scene_node_ids,
    volume_fingerprint,
    volume_from_array,
)
from MIADeepLearningLib.testing.scenarios import require_model as require_verified_model

__all__ = ["SCENARIOS", "ScenarioSkipped", "phantom_pair"]

MODEL_ID = "brain-registration"
SHIFT_RAS_MM = np.array([5.0, -4.0, 3.0])  # content of the moving image sits this far from the fixed one's
DEFORMATION_MM = 1.5

_ANATOMIC = "~Anatomic codes - DICOM master list~^^~^^"
_STRUCTURE = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~"
# name -> (label, RGB 0-1, terminology); the fixed segmentation lists them in another order and case.
SEGMENTS = {
    "Brain": (1, (0.95, 0.85, 0.7), _STRUCTURE + "SCT^12738006^Brain~^^" + _ANATOMIC),
    "Left ventricle": (2, (0.3, 0.6, 1.0), _STRUCTURE + "SCT^66720007^Lateral ventricle~SCT^7771000^Left" + _ANATOMIC),
    "Right ventricle": (3, (0.1, 0.3, 0.9),
                        _STRUCTURE + "SCT^66720007^Lateral ventricle~SCT^24028007^Right" + _ANATOMIC),
    "Lesion": (4, (0.9, 0.2, 0.2), "Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^"
                                   "Morphologically Altered Structure~SCT^52988006^Lesion~^^" + _ANATOMIC),
}
# (centre RAS mm, radii mm) of the nested ellipsoids
_HEAD = ((0.0, 0.0, 0.0), (34.0, 40.0, 32.0))
_STRUCTURES = {
    "Brain": ((0.0, 2.0, 2.0), (28.0, 34.0, 26.0)),
    "Left ventricle": ((-9.0, 4.0, 6.0), (5.0, 12.0, 7.0)),
    "Right ventricle": ((9.0, 4.0, 6.0), (5.0, 12.0, 7.0)),
    "Lesion": ((12.0, -14.0, -6.0), (6.0, 7.0, 6.0)),
}
# intensity of background, scalp, brain, ventricles, lesion
T1_LIKE = (0.0, 400.0, 600.0, 150.0, 900.0)
T2_LIKE = (0.0, 250.0, 350.0, 900.0, 150.0)

MIN_DICE_GAIN = 0.1  # mean Dice over the segments must rise at least this much
MIN_CORRELATION_GAIN = 0.1  # correlation with the ideal warped image, likewise
MAX_HARDEN_DIFFERENCE = 0.05  # correlation of the hardened copy vs the warped volume
MAX_MAPPING_ERROR_SHARE = 0.5  # median point error after / before (identity) inside the head


# ---------------------------------------------------------------------------------------------------- helpers
def require_model() -> registry.ModelInfo:
    """The shipped registration model with verified weights and a PyTorch for its worker, or skip."""
    try:
        model = require_verified_model(MODEL_ID)
    except errors.ModelError as error:  # not in the registry (yet) on this machine
        raise ScenarioSkipped(str(error)) from error
    try:
        importlib.metadata.version("torch")  # metadata only: the scene's process must not load torch
    except importlib.metadata.PackageNotFoundError as error:
        raise ScenarioSkipped("PyTorch is not installed (install it with the PyTorch extension)") from error
    return model


JOBS_ROOT = Path(tempfile.gettempdir()) / "MIADeepLearning-scenarios"


def make_logic(warm_worker: runner.WarmWorker | None = None) -> RegistrationLogic:
    """The logic as the module builds it; the worker runs with sys.executable (PythonSlicer inside Slicer)."""
    return RegistrationLogic(jobs_root=JOBS_ROOT, warm_worker=warm_worker)


def job_folders() -> set[str]:
    return {path.name for path in JOBS_ROOT.glob("miadl-job-*")} if JOBS_ROOT.is_dir() else set()


def rotation_matrix(angles_deg: tuple[float, float, float]) -> np.ndarray:
    transform = vtk.vtkTransform()
    for axis, angle in enumerate(angles_deg):
        transform.RotateWXYZ(angle, *np.eye(3)[axis])
    return np.array([[transform.GetMatrix().GetElement(r, c) for c in range(3)] for r in range(3)])


def voxel_centres(node) -> np.ndarray:
    """(k, j, i, 3) RAS coordinates of every voxel centre of a volume node."""
    shape = slicer.util.arrayFromVolume(node).shape
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    matrix = ijk_to_ras(node)
    return np.stack([i, j, k], axis=-1) @ matrix[:3, :3].T + matrix[:3, 3]


def _radius(points: np.ndarray, centre, radii) -> np.ndarray:
    return np.linalg.norm((points - np.asarray(centre)) / np.asarray(radii), axis=-1)


def anatomy_labels(points: np.ndarray) -> np.ndarray:
    """The label (SEGMENTS values, 0 outside the brain) of the anatomy at RAS points."""
    labels = np.zeros(points.shape[:-1], np.uint8)
    for name, (centre, radii) in _STRUCTURES.items():
        labels[_radius(points, centre, radii) < 1.0] = SEGMENTS[name][0]
    return labels


def render(points: np.ndarray, contrast: tuple[float, ...], seed: int) -> np.ndarray:
    """The anatomy at RAS points in a contrast (soft edges about a millimetre wide, a little noise)."""

    def inside(centre, radii) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(np.clip((_radius(points, centre, radii) - 1.0) * 25.0, -50, 50)))

    background, scalp, brain, ventricle, lesion = contrast
    values = background + (scalp - background) * inside(*_HEAD)
    values += (brain - scalp) * inside(*_STRUCTURES["Brain"])
    for name in ("Left ventricle", "Right ventricle"):
        values += (ventricle - brain) * inside(*_STRUCTURES[name])
    values += (lesion - brain) * inside(*_STRUCTURES["Lesion"])
    values += np.random.default_rng(seed).normal(0.0, 5.0, values.shape)
    return values.astype(np.float32)


def _deformation(points: np.ndarray) -> np.ndarray:
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return DEFORMATION_MM * np.stack([np.sin(y / 15.0), np.cos(z / 13.0), np.sin(x / 17.0)], axis=-1)


def moving_to_anatomy(points: np.ndarray) -> np.ndarray:
    """Where the anatomy shown at moving-image points q lies in the fixed image: q - shift + d(q)."""
    return points - SHIFT_RAS_MM + _deformation(points)


def true_moving_points(fixed_points: np.ndarray) -> np.ndarray:
    """Where fixed points are in the moving image: q with q - shift + d(q) = p (fixed-point iteration)."""
    q = fixed_points + SHIFT_RAS_MM
    for _ in range(20):
        q = fixed_points + SHIFT_RAS_MM - _deformation(q)
    return q


def _grid(direction: np.ndarray, spacing, dims, centre_ras) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(spacing)
    matrix[:3, 3] = np.asarray(centre_ras) - matrix[:3, :3] @ ((np.asarray(dims) - 1) / 2.0)
    return matrix


def _empty_volume(matrix: np.ndarray, dims, name: str):
    return volume_from_array(np.zeros(tuple(reversed(dims)), np.float32), matrix, name)


def add_segmentation(reference, labels: np.ndarray, name: str, order: list[str], rename=None):
    """A segmentation node of `labels` (SEGMENTS values) on the reference's grid, segments in `order`."""
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    for segment_name in order:
        value, color, terminology = SEGMENTS[segment_name]
        shown = rename(segment_name) if rename else segment_name
        segment_id = node.GetSegmentation().AddEmptySegment(shown.replace(" ", "_"), shown, color)
        segment = node.GetSegmentation().GetSegment(segment_id)
        segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)
        slicer.util.updateSegmentBinaryLabelmapFromArray((labels == value).astype(np.uint8), node, segment_id,
                                                         reference)
    return node


def phantom_pair(with_segmentations: bool = True) -> dict[str, Any]:
    """fixed (T1-like, oblique, anisotropic, left-handed grid), moving (T2-like, shifted and deformed, axis-aligned)
    and, with_segmentations, their segmentations (the fixed one in another order, one name in another case, one extra
    segment the moving one lacks)."""
    fixed_direction = rotation_matrix((15.0, -10.0, 20.0)) @ np.diag([1.0, -1.0, 1.0])
    fixed = _empty_volume(_grid(fixed_direction, (2.0, 2.6, 3.0), (44, 34, 28), (1.0, -2.0, 3.0)), (44, 34, 28),
                          "fixed phantom")
    fixed_points = voxel_centres(fixed)
    slicer.util.updateVolumeFromArray(fixed, render(fixed_points, T1_LIKE, seed=1))
    moving = _empty_volume(_grid(np.eye(3), (2.2, 2.2, 2.2), (44, 46, 40), SHIFT_RAS_MM), (44, 46, 40),
                           "moving phantom")
    moving_points = voxel_centres(moving)
    slicer.util.updateVolumeFromArray(moving, render(moving_to_anatomy(moving_points), T2_LIKE, seed=2))
    pair = {"fixed": fixed, "moving": moving}
    if with_segmentations:
        pair["moving_segmentation"] = add_segmentation(moving, anatomy_labels(moving_to_anatomy(moving_points)),
                                                       "moving structures", list(SEGMENTS))
        fixed_labels = anatomy_labels(fixed_points)
        scalp = (_radius(fixed_points, *_HEAD) < 1.0) & (fixed_labels == 0)
        fixed_segmentation = add_segmentation(fixed, fixed_labels, "fixed structures",
                                              ["Lesion", "Right ventricle", "Brain", "Left ventricle"],
                                              rename=lambda name: "brain " if name == "Brain" else name)
        segment_id = fixed_segmentation.GetSegmentation().AddEmptySegment("Scalp", "Scalp", (0.8, 0.6, 0.5))
        slicer.util.updateSegmentBinaryLabelmapFromArray(scalp.astype(np.uint8), fixed_segmentation, segment_id,
                                                         fixed)
        pair["fixed_segmentation"] = fixed_segmentation
    return pair


def brain_mask(reference, name: str, moving: bool):
    """A segmentation with one 'Head' segment covering the head (as a brain-extraction result would)."""
    points = voxel_centres(reference)
    if moving:
        points = moving_to_anatomy(points)
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    segment_id = node.GetSegmentation().AddEmptySegment("Head", "Head", (1.0, 1.0, 0.0))
    slicer.util.updateSegmentBinaryLabelmapFromArray((_radius(points, *_HEAD) < 1.05).astype(np.uint8), node,
                                                     segment_id, reference)
    return node


def segmentation_fingerprint(node) -> dict[str, Any]:
    """Everything about a segmentation node a run must not change (its internal labelmaps read in place)."""
    segmentation = node.GetSegmentation()
    segments = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        voxels = slicer.util.arrayFromSegmentInternalBinaryLabelmap(node, segment_id)
        segments.append((segment_id, segment.GetName(), tuple(round(c, 6) for c in segment.GetColor()),
                         segment_terminology(segment), segment.GetLabelValue(),
                         hashlib.sha256(np.ascontiguousarray(voxels).tobytes()).hexdigest()))
    representations = [name for name in ("Binary labelmap", "Closed surface", "Fractional labelmap", "Planar contour")
                       if segmentation.ContainsRepresentation(name)]
    return {"name": node.GetName(), "segments": segments, "transform": node.GetTransformNodeID(),
            "representations": representations, "attributes": sorted(node.GetAttributeNames())}


def correlation(first: np.ndarray, second: np.ndarray, where: np.ndarray) -> float:
    return float(np.corrcoef(first[where].astype(float), second[where].astype(float))[0, 1])


def resampled_onto(volume, reference) -> np.ndarray:
    """The volume resampled linearly onto the reference's grid by Slicer, as it stands (parent transform applied);
    no node is left behind."""
    resampled = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(volume, reference)
    try:
        return slicer.util.arrayFromVolume(resampled).copy()
    finally:
        slicer.mrmlScene.RemoveNode(resampled)


def _table_rows(table_node) -> dict[str, float]:
    table = table_node.GetTable()
    return {table.GetValue(row, 0).ToString(): table.GetValue(row, 1).ToDouble()
            for row in range(table.GetNumberOfRows())}


def _assert_provenance(node, model: registry.ModelInfo, pair: dict[str, Any]) -> None:
    provenance = get_provenance(node)
    assert provenance is not None, f"'{node.GetName()}' has no provenance"
    assert provenance.get("model_id") == model.id and provenance.get("model_version") == model.version, provenance
    for key in ("device", "created_utc", "extension_version", "timings_s", "report"):
        assert key in provenance, f"the provenance of '{node.GetName()}' lacks {key}"
    assert provenance.get("fixed_node") == pair["fixed"].GetName(), provenance.get("fixed_node")
    assert provenance.get("moving_node") == pair["moving"].GetName(), provenance.get("moving_node")


# ------------------------------------------------------------------------------------------------ scenarios
def scenario_register_phantom_pair() -> None:
    """Moving T2-like phantom onto the oblique, left-handed T1-like one, with masks and both segmentations: a grid
    transform that maps fixed points to where the anatomy is in the moving image (direction conventions included),
    hardening a copy under it lands on the fixed image, the warped volume is on the fixed grid and close to the ideal,
    the propagated segments keep IDs, names, colours and terminology and overlap the fixed ones better than before,
    a quality table with sane values that agrees with the segments, provenance on every output, inputs untouched."""
    model = require_model()
    pair = phantom_pair()
    fixed, moving = pair["fixed"], pair["moving"]
    fixed_mask, moving_mask = brain_mask(fixed, "fixed head", False), brain_mask(moving, "moving head", True)
    watched = {"fixed": fixed, "moving": moving}
    before = {name: volume_fingerprint(node) for name, node in watched.items()}
    segmentations = {name: pair[name] for name in ("moving_segmentation", "fixed_segmentation")}
    segmentations.update(fixed_mask=fixed_mask, moving_mask=moving_mask)
    segmentations_before = {name: segmentation_fingerprint(node) for name, node in segmentations.items()}
    nodes_before, folders_before = scene_node_ids(), job_folders()
    events: list[jobs.Event] = []

    result = make_logic().run(fixed, moving, MODEL_ID, device="cpu", fixed_mask=fixed_mask, moving_mask=moving_mask,
                              moving_segmentation=pair["moving_segmentation"],
                              fixed_segmentation=pair["fixed_segmentation"], on_event=events.append)
    assert isinstance(result, RegistrationResult)
    assert {name: volume_fingerprint(node) for name, node in watched.items()} == before, "an input volume changed"
    assert {name: segmentation_fingerprint(node) for name, node in segmentations.items()} == segmentations_before, \
        "an input segmentation changed"
    assert job_folders() <= folders_before, "the run left its job folder behind"
    outputs = [result.transform_node, result.warped_volume_node, result.segmentation_node, result.report_table_node]
    for node in outputs:
        assert node is not None and node.GetID() not in nodes_before, "an output is missing or not a new node"
        assert node.GetScene() is slicer.mrmlScene
        _assert_provenance(node, model, pair)
    assert moving.GetParentTransformNode() is None, "the moving volume was put under the transform"
    stages = [event.stage for event in events]
    assert stages[0] == "start" and stages[-1] == jobs.STAGE_DONE, stages

    # The transform: a grid transform, fixed -> moving, that finds the anatomy (the sign conventions matter here).
    transform = result.transform_node
    assert transform.IsA("vtkMRMLGridTransformNode"), transform.GetClassName()
    assert transform.GetName() == "moving phantom to fixed phantom", transform.GetName()
    fixed_points = voxel_centres(fixed)
    head = _radius(fixed_points, *_HEAD) < 0.9
    sample = fixed_points[head][::37]
    from_parent = transform.GetTransformFromParent()
    mapped = np.array([from_parent.TransformPoint(tuple(float(v) for v in point)) for point in sample])
    truth = true_moving_points(sample)
    error_after = float(np.median(np.linalg.norm(mapped - truth, axis=1)))
    error_before = float(np.median(np.linalg.norm(sample - truth, axis=1)))
    assert error_after <= MAX_MAPPING_ERROR_SHARE * error_before, (
        f"fixed points map {error_after:.2f} mm (median) from the truth; identity: {error_before:.2f} mm")

    # The warped volume: on the fixed grid, shown like the moving one, close to the ideal warped image.
    warped = result.warped_volume_node
    assert warped.GetName() == "moving phantom registered", warped.GetName()
    assert same_grid(warped, fixed), "the warped volume is not on the fixed grid"
    ideal = render(fixed_points, T2_LIKE, seed=3)
    as_it_was = resampled_onto(moving, fixed)
    score_before = correlation(as_it_was, ideal, head)
    score_after = correlation(slicer.util.arrayFromVolume(warped), ideal, head)
    assert score_after >= score_before + MIN_CORRELATION_GAIN, (
        f"correlation with the ideal warped image {score_after:.3f}, before {score_before:.3f}")
    assert abs(warped.GetDisplayNode().GetWindow() - moving.GetDisplayNode().GetWindow()) < 1e-3

    # "Apply transform" + harden on a copy of the moving volume lands it on the fixed image as well.
    copy = volume_from_array(slicer.util.arrayFromVolume(moving).copy(), ijk_to_ras(moving), "moving copy")
    copy.SetAndObserveTransformNodeID(transform.GetID())
    score_applied = correlation(resampled_onto(copy, fixed), ideal, head)
    assert slicer.vtkSlicerTransformLogic.hardenTransform(copy) and copy.GetParentTransformNode() is None
    score_hardened = correlation(resampled_onto(copy, fixed), ideal, head)
    for what, score in (("under the transform", score_applied), ("hardened", score_hardened)):
        assert abs(score - score_after) <= MAX_HARDEN_DIFFERENCE, (
            f"the moving copy {what} correlates {score:.3f} with the ideal, the warped volume {score_after:.3f}")
    slicer.mrmlScene.RemoveNode(copy)

    # The propagated segmentation: same segments, on the fixed grid, better overlap than before.
    propagated, original = result.segmentation_node, pair["moving_segmentation"]
    assert propagated.GetName() == "moving structures registered", propagated.GetName()
    for index in range(original.GetSegmentation().GetNumberOfSegments()):
        source = original.GetSegmentation().GetNthSegment(index)
        segment_id = original.GetSegmentation().GetNthSegmentID(index)
        copied = propagated.GetSegmentation().GetSegment(segment_id)
        assert copied is not None, f"segment {segment_id} was not propagated"
        assert propagated.GetSegmentation().GetNthSegmentID(index) == segment_id, "the segment order changed"
        assert copied.GetName() == source.GetName(), (copied.GetName(), source.GetName())
        assert np.allclose(copied.GetColor(), source.GetColor(), atol=1e-6), (copied.GetColor(), source.GetColor())
        assert segment_terminology(copied) == segment_terminology(source), segment_terminology(copied)
    fixed_segmentation = pair["fixed_segmentation"].GetSegmentation()
    rows = _table_rows(result.report_table_node)
    scores_after, scores_before = {}, {}
    for name in SEGMENTS:
        segment_id = original.GetSegmentation().GetSegmentIdBySegmentName(name)
        fixed_id = fixed_segmentation.GetSegmentIdBySegmentName("brain " if name == "Brain" else name)
        target = label_array(pair["fixed_segmentation"], fixed_id, fixed)
        scores_after[name] = dice(label_array(propagated, segment_id, fixed), target)
        scores_before[name] = dice(segments_label_array(original, fixed, [(segment_id, 1)]), target)
        assert abs(rows[f"Dice: {name}"] - scores_after[name]) < 1e-6, (
            f"{name}: the table says Dice {rows[f'Dice: {name}']:.4f}, the segments {scores_after[name]:.4f}")
        assert scores_after[name] > scores_before[name], (
            f"{name}: Dice {scores_after[name]:.3f} after, {scores_before[name]:.3f} before")
    mean_after, mean_before = np.mean(list(scores_after.values())), np.mean(list(scores_before.values()))
    assert mean_after >= mean_before + MIN_DICE_GAIN, f"mean Dice {mean_after:.3f}, before {mean_before:.3f}"
    assert abs(rows[MEAN_DICE] - mean_after) < 1e-6, (rows[MEAN_DICE], mean_after)
    if MEAN_DICE_BEFORE in rows:
        assert abs(rows[MEAN_DICE_BEFORE] - mean_before) < 0.02, (rows[MEAN_DICE_BEFORE], mean_before)

    # The quality report: the engine's numbers, sane for a smooth transform; the table is the result's rows.
    assert 0.0 <= rows[FOLDING] < 1.0, f"{rows[FOLDING]:.3f} % of the voxels fold"
    assert 0.5 < rows["Mean det J"] < 2.0, rows["Mean det J"]
    assert 0.0 <= rows["SD of log det J"] < 1.0, rows["SD of log det J"]
    assert rows == {row.measure: row.value for row in result.quality}
    assert "Scalp" not in " ".join(rows), "a segment only the fixed side has got a Dice"
    assert result.report_table_node.GetName() == "moving phantom to fixed phantom registration quality"
    assert "folding" in result.summary() and "mean Dice" in result.summary(), result.summary()

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    parent = sh.GetItemParent(sh.GetItemByDataNode(fixed))
    for node in outputs:
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == parent, f"'{node.GetName()}' is not beside the fixed"


def scenario_volumes_only_with_warm_worker() -> None:
    """No masks and no segmentations, through a kept-alive worker twice: a transform, a warped volume and a table
    with the Jacobian rows only (no segmentation, no Dice); the second run reuses the loaded model."""
    require_model()
    pair = phantom_pair(with_segmentations=False)
    nodes_before = scene_node_ids()
    with runner.WarmWorker() as warm:
        logic = make_logic(warm)
        first = logic.run(pair["fixed"], pair["moving"], MODEL_ID, device="cpu")
        second = logic.run(pair["fixed"], pair["moving"], MODEL_ID, device="cpu")
    assert second.model_cached, "the kept-alive worker loaded the model again"
    for result in (first, second):
        assert result.segmentation_node is None
        assert result.transform_node.IsA("vtkMRMLGridTransformNode")
        assert same_grid(result.warped_volume_node, pair["fixed"])
        rows = _table_rows(result.report_table_node)
        assert FOLDING in rows and not any(measure.startswith("Dice") or "Dice" in measure for measure in rows), rows
    assert first.transform_node.GetName() != second.transform_node.GetName(), "a re-run reused an output name"
    added = [slicer.mrmlScene.GetNodeByID(node_id) for node_id in set(scene_node_ids()) - set(nodes_before)]
    kinds = sorted(node.GetClassName() for node in added if not node.IsA("vtkMRMLDisplayNode"))
    assert kinds == sorted(["vtkMRMLGridTransformNode", "vtkMRMLScalarVolumeNode", "vtkMRMLTableNode"] * 2), kinds


def scenario_bad_inputs_fail_cleanly() -> None:
    """Missing, identical, 2D, voxel-less, constant and NaN volumes, a mask outside its volume, a segmentation
    under a transform or without segments, a label map as segmentation, one segmentation for both sides, negative
    refinement steps, a model of another task or none: one clear sentence before anything runs, no change."""
    logic = make_logic()
    pair = phantom_pair()
    fixed, moving = pair["fixed"], pair["moving"]
    folders_before = job_folders()

    def fails(error_class, *words, **kwargs):
        arguments = {"fixed_volume": fixed, "moving_volume": moving, "model_id": MODEL_ID, **kwargs}
        for watched in (fixed, moving):
            assert_fails_cleanly(lambda: logic.run(**arguments), error_class, *words, watched_volume=watched)
        return arguments

    fails(errors.InputError, "no fixed volume", fixed_volume=None)
    fails(errors.InputError, "no moving volume", moving_volume=None)
    fails(errors.InputError, "same volume", "fixed phantom", moving_volume=fixed)
    flat = volume_from_array(np.ones((1, 30, 30), np.float32), np.eye(4), "single slice")
    fails(errors.InputError, "single slice", "2D", moving_volume=flat)
    voxel_less = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no voxels")
    fails(errors.InputError, "no voxels", "no image data", fixed_volume=voxel_less)
    zeros = volume_from_array(np.zeros((20, 20, 20), np.float32), np.eye(4), "all zero")
    fails(errors.InputError, "fixed volume", "all zero", "empty", fixed_volume=zeros)
    with_nan = slicer.util.arrayFromVolume(moving).copy()
    with_nan[5, 6, 7:10] = np.nan
    fails(errors.InputError, "moving volume", "3 voxels", "NaN",
          moving_volume=volume_from_array(with_nan, ijk_to_ras(moving), "with NaN"))

    outside = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "far away")
    far = volume_from_array(np.ones((4, 4, 4), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]) + np.array(
        [[0, 0, 0, 500.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]), "far grid")
    outside.SetReferenceImageGeometryParameterFromVolumeNode(far)
    segment_id = outside.GetSegmentation().AddEmptySegment("Far", "Far", (1.0, 0.0, 0.0))
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.ones((4, 4, 4), np.uint8), outside, segment_id, far)
    fails(errors.InputError, "moving mask", "far away", "no voxels inside", moving_mask=outside)
    fails(errors.InputError, "moving segmentation", "far away", "no voxels inside", moving_segmentation=outside)
    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "no segments")
    fails(errors.InputError, "fixed mask", "no segments", fixed_mask=empty)
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "a label map")
    fails(errors.InputError, "a label map", "not a segmentation", moving_segmentation=labelmap)
    shifted = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    pair["moving_segmentation"].SetAndObserveTransformNodeID(shifted.GetID())
    fails(errors.InputError, "moving structures", "shift", "harden", moving_segmentation=pair["moving_segmentation"])
    pair["moving_segmentation"].SetAndObserveTransformNodeID(None)
    fails(errors.InputError, "same node", moving_segmentation=pair["fixed_segmentation"],
          fixed_segmentation=pair["fixed_segmentation"])
    fails(errors.InputError, "refinement steps", "-1", instance_steps=-1)
    fails(errors.InputError, "refinement steps", instance_steps=2.5)
    fails(errors.ModelError, "not a registration model", model_id="deepbet")
    fails(errors.ModelError, "unknown model", model_id="no-such-model")
    assert job_folders() <= folders_before, "a refused run left a job folder behind"


def scenario_failed_and_cancelled_runs_leave_no_trace() -> None:
    """A worker that crashes, one that fails, and a run cancelled while it runs: one clear sentence (or
    CancelledError), no node added, inputs and segmentations untouched, no job folder left."""
    require_model()
    pair = phantom_pair()
    fixed, moving = pair["fixed"], pair["moving"]
    logic = make_logic()
    segmentations = {name: segmentation_fingerprint(pair[name]) for name in ("moving_segmentation",
                                                                             "fixed_segmentation")}
    folders_before = job_folders()
    arguments = {"device": "cpu", "moving_segmentation": pair["moving_segmentation"],
                 "fixed_segmentation": pair["fixed_segmentation"]}
    assert_fails_cleanly(lambda: logic.run(fixed, moving, MODEL_ID, worker_env={"MIADL_WORKER_FAULT": "crash:start"},
                                           **arguments), errors.WorkerError, "stopped unexpectedly",
                         watched_volume=moving)
    message = assert_fails_cleanly(
        lambda: logic.run(fixed, moving, MODEL_ID, worker_env={"MIADL_WORKER_FAULT": "raise:start"}, **arguments),
        errors.WorkerError, "unexpectedly", watched_volume=fixed)
    assert "injected fault" in message, message

    nodes_before = scene_node_ids()
    run = logic.start(fixed, moving, MODEL_ID, **arguments)
    deadline = time.monotonic() + 60
    while run.is_running() and time.monotonic() < deadline and not run.poll():
        time.sleep(0.02)
    run.cancel()
    assert not run.is_running() and run.worker.state == runner.STATE_CANCELLED, run.worker.state
    try:
        run.finish()
    except errors.CancelledError:
        pass
    else:
        raise AssertionError("finish() after cancel did not raise CancelledError")
    assert scene_node_ids() == nodes_before, "a cancelled run added nodes"
    assert {name: segmentation_fingerprint(pair[name]) for name in segmentations} == segmentations
    assert job_folders() <= folders_before, "a failed or cancelled run left its job folder behind"


SCENARIOS: list[tuple[str, Callable[[], None]]] = [
    ("phantom pair with masks and segmentations", scenario_register_phantom_pair),
    ("volumes only, kept-alive worker", scenario_volumes_only_with_warm_worker),
    ("bad inputs fail cleanly", scenario_bad_inputs_fail_cleanly),
    ("failed and cancelled runs leave no trace", scenario_failed_and_cancelled_runs_leave_no_trace),
]
