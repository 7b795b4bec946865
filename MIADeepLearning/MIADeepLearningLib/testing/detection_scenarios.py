"""Lesion detection scenarios, run both by pytest on a headless scene and by the Slicer self-test
(DLLesionDetectionTest).

Same contract as scenarios.py: no arguments, ``slicer.mrmlScene``, the DetectionLogic the DL Lesion Detection module
uses; AssertionError when the product misbehaves, ScenarioSkipped when a prerequisite is missing on this machine.

Two kinds: the "load results" and "slider" scenarios build a detection from synthetic anomaly and brain maps (three
blobs of known peak score on an oblique, anisotropic, flipped grid), so the outputs can be checked exactly whatever
the network would answer; the end-to-end ones run the real worker and the shipped brain-lesion model and check only
what holds for any weights (every output on the input's grid, and segments, boxes, points and table telling the
same candidates).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import slicer

from MIADeepLearningLib import runner
from MIADeepLearningLib.engine import candidates as lesion_candidates
from MIADeepLearningLib.engine import errors, registry
from MIADeepLearningLib.mrml import detection_logic as logic_module
from MIADeepLearningLib.mrml.compat import segment_terminology
from MIADeepLearningLib.mrml.detection_logic import DetectionLogic, DetectionResult
from MIADeepLearningLib.mrml.provenance import get_provenance
from MIADeepLearningLib.mrml.segmentations import label_array
from MIADeepLearningLib.mrml.volumes import ijk_to_ras, read_volume_file, same_grid
from MIADeepLearningLib.testing import sample_data
from MIADeepLearningLib.testing.classification_scenarios import oblique_matrix
from MIADeepLearningLib.testing.scenarios import (
    ScenarioSkipped,
    assert_fails_cleanly,
    scene_node_ids,
    volume_fingerprint,
    volume_from_array,
)
from MIADeepLearningLib.testing.scenarios import require_model as require_verified_model

__all__ = ["SCENARIOS", "ScenarioSkipped"]

MODEL_ID = logic_module.DEFAULT_MODEL_ID
JOBS_ROOT = Path(tempfile.gettempdir()) / "MIADeepLearning-scenarios"
LESION_CODE = "SCT^52988006"
SHAPE = (20, 40, 36)  # (k, j, i) of the synthetic case: small, so a scenario takes a fraction of a second
# Peak anomaly of the three synthetic blobs, by decreasing score: the candidates' order and count per threshold
BLOB_PEAKS = (0.95, 0.8, 0.62)
BLOB_CENTRES_KJI = ((10, 14, 12), (8, 27, 22), (12, 20, 26))
BLOB_SIGMA_KJI = (1.3, 2.6, 2.6)


# ---------------------------------------------------------------------------------------------------- helpers
def require_model() -> registry.ModelInfo:
    """The shipped lesion model with verified weights and a PyTorch for its worker, or skip."""
    model = require_verified_model(MODEL_ID)
    try:
        importlib.metadata.version("torch")  # metadata only: the scene's process must not load torch
    except importlib.metadata.PackageNotFoundError as error:
        raise ScenarioSkipped("PyTorch is not installed (install it with the PyTorch extension)") from error
    return model


def make_logic() -> DetectionLogic:
    """The logic as the module builds it; the worker runs with sys.executable (PythonSlicer inside Slicer)."""
    return DetectionLogic(jobs_root=JOBS_ROOT)


def job_folders() -> set[str]:
    return {path.name for path in JOBS_ROOT.glob("miadl-job-*")} if JOBS_ROOT.is_dir() else set()


def synthetic_maps(shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly, brain) in (k, j, i): three Gaussian blobs of BLOB_PEAKS on a faint background inside an ellipsoid
    brain (CSF rim, gray matter, white matter core), and one bright blob outside the brain that must never become a
    candidate."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    anomaly = np.full(shape, 0.03, np.float32)
    for peak, centre in zip(BLOB_PEAKS, BLOB_CENTRES_KJI):
        distance = sum(((axis - c) / s) ** 2 for axis, c, s in zip((k, j, i), centre, BLOB_SIGMA_KJI))
        anomaly = np.maximum(anomaly, peak * np.exp(-0.5 * distance).astype(np.float32))
    anomaly[0:2, 0:3, 0:3] = 0.99  # outside the brain
    radius = np.sqrt(((k - shape[0] / 2) / (shape[0] / 2)) ** 2 + ((j - shape[1] / 2) / (shape[1] / 2)) ** 2
                     + ((i - shape[2] / 2) / (shape[2] / 2)) ** 2)
    brain = np.select([radius < 0.55, radius < 0.8, radius < 0.95], [3, 2, 1], 0).astype(np.uint8)
    return anomaly, brain


def synthetic_input(name: str = "FLAIR phantom", matrix: np.ndarray | None = None) -> Any:
    """A small phantom head on an oblique, anisotropic, left-handed (flipped) grid."""
    voxels = sample_data.phantom_head(SHAPE)
    grid = oblique_matrix((1.2, 0.9, 2.5), (20.0, -10.0, 35.0), flip=True) if matrix is None else matrix
    return volume_from_array(voxels, grid, name)


@contextlib.contextmanager
def no_worker_may_start() -> Iterator[list]:
    """Any attempt to start a worker (a process of its own or a warm one) is recorded and fails."""
    attempts: list = []
    original_start, original_submit = runner.start, runner.WarmWorker.submit

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("a worker was started")

    runner.start = refuse
    runner.WarmWorker.submit = refuse
    try:
        yield attempts
    finally:
        runner.start = original_start
        runner.WarmWorker.submit = original_submit


def table_rows(table_node) -> list[dict[str, Any]]:
    """The table's rows as column -> str (text columns) or float."""
    table = table_node.GetTable()
    rows = []
    for row in range(table.GetNumberOfRows()):
        values = {}
        for index in range(table.GetNumberOfColumns()):
            column = table.GetColumn(index)
            value = table.GetValue(row, index)
            values[column.GetName()] = value.ToString() if column.GetName() in logic_module._TEXT_COLUMNS \
                else value.ToDouble()
        rows.append(values)
    return rows


def ras_of_voxels(node, mask: np.ndarray) -> np.ndarray:
    """(n, 3) RAS of the voxel centres where the (k, j, i) mask is set."""
    kji = np.argwhere(mask).astype(float)
    return (logic_module.kji_to_ras(node) @ np.c_[kji, np.ones(len(kji))].T).T[:, :3]


def assert_detection(result: DetectionResult, volume, expected_model: str | None = None) -> None:
    """Every output on the input's grid and beside it; segments, boxes, points and table tell the same candidates
    (names, terminology, voxels, volumes, centres, scores); case score, threshold and provenance recorded."""
    scene = slicer.mrmlScene
    name = volume.GetName()
    shape = tuple(reversed(volume.GetImageData().GetDimensions()))
    anomaly, brain = result.anomaly_node, result.brain_node
    for node in (anomaly, brain):
        assert node.GetScene() is scene and same_grid(node, volume), f"'{node.GetName()}' is not on the input grid"
    assert np.abs(ijk_to_ras(anomaly) - ijk_to_ras(volume)).max() < 1e-9
    assert anomaly.GetName().startswith(f"{name} anomaly map"), anomaly.GetName()
    assert brain.GetName().startswith(f"{name} brain map") and brain.IsA("vtkMRMLLabelMapVolumeNode")
    values = slicer.util.arrayFromVolume(anomaly)
    assert values.shape == shape and np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0
    assert set(np.unique(slicer.util.arrayFromVolume(brain)).tolist()) <= {0, 1, 2, 3}
    display = anomaly.GetDisplayNode()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0) and display.GetApplyThreshold()
    assert anomaly.GetAttribute(logic_module.ANOMALY_OF_ATTRIBUTE) == volume.GetID()

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    parent = sh.GetItemParent(sh.GetItemByDataNode(volume))
    for node in (anomaly, brain, result.segmentation_node, result.points_node, result.table_node):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == parent, f"'{node.GetName()}' is not beside the input"

    found = result.candidates
    assert len(found) == min(result.found, logic_module.MAX_SHOWN_CANDIDATES), (len(found), result.found)
    assert [item["label"] for item in found] == list(range(1, len(found) + 1))
    assert all(a["max_score"] >= b["max_score"] for a, b in zip(found, found[1:])), "not by decreasing score"
    assert all(item["max_score"] > result.threshold for item in found)
    segmentation = result.segmentation_node.GetSegmentation()
    assert [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())] == \
        [f"Candidate {item['label']}" for item in found]
    voxel_volume = logic_module.voxel_volume_mm3(volume)
    points = result.points_node
    assert points.GetNumberOfControlPoints() == len(found) == len(result.roi_nodes)
    rows = table_rows(result.table_node)
    assert [result.table_node.GetTable().GetColumn(index).GetName()
            for index in range(result.table_node.GetTable().GetNumberOfColumns())] == list(logic_module.COLUMNS)
    assert len(rows) == len(found)
    for index, item in enumerate(found):
        segment_id = f"Candidate {item['label']}"
        segment = segmentation.GetSegment(segment_id)
        assert LESION_CODE in segment_terminology(segment), segment_terminology(segment)
        mask = label_array(result.segmentation_node, segment_id, volume).astype(bool)
        assert mask.shape == shape and mask.sum() == item["voxels"], (segment_id, int(mask.sum()), item["voxels"])
        assert abs(mask.sum() * voxel_volume / 1000.0 - item["volume_ml"]) < 1e-3
        assert (slicer.util.arrayFromVolume(brain)[mask] > 0).all(), f"{segment_id} reaches outside the brain"
        assert (values[mask] > result.threshold).all(), f"{segment_id} holds voxels below the threshold"
        centroid = ras_of_voxels(volume, mask).mean(axis=0)
        assert np.allclose(centroid, item["center_ras"], atol=0.02), (centroid, item["center_ras"])
        position = [0.0, 0.0, 0.0]
        points.GetNthControlPointPosition(index, position)
        assert np.allclose(position, item["center_ras"], atol=1e-3), (position, item["center_ras"])
        assert points.GetNthControlPointLabel(index) == lesion_candidates.candidate_label(item)
        roi = result.roi_nodes[index]
        assert roi.IsA("vtkMRMLMarkupsROINode") and roi.GetName() == f"C{item['label']}"
        assert roi.IsPointInROIWorld(item["center_ras"]), f"box {roi.GetName()} misses its candidate's centre"
        corners = ras_of_voxels(volume, mask)
        assert all(roi.IsPointInROIWorld(list(point)) for point in corners[:: max(1, len(corners) // 200)]), \
            f"box {roi.GetName()} does not contain its candidate's voxels"
        row = rows[index]
        assert row[logic_module.CANDIDATE_COLUMN] == segment_id
        assert abs(row[logic_module.VOLUME_COLUMN] - item["volume_ml"]) < 1e-6
        assert np.allclose([row[logic_module.R_COLUMN], row[logic_module.A_COLUMN], row[logic_module.S_COLUMN]],
                           item["center_ras"])
        assert abs(row[logic_module.MAX_SCORE_COLUMN] - item["max_score"]) < 1e-6
        assert row[logic_module.TISSUE_COLUMN] == item["tissue"]
    boxes_parent = {sh.GetItemParent(sh.GetItemByDataNode(roi)) for roi in result.roi_nodes}
    assert len(boxes_parent) <= 1 and all(sh.GetItemName(item).endswith("candidate boxes") for item in boxes_parent)
    assert 0.0 <= result.case_score <= 1.0
    assert result.table_node.GetAttribute(logic_module.CASE_SCORE_ATTRIBUTE) == f"{result.case_score:.4f}"
    assert float(result.table_node.GetAttribute(logic_module.THRESHOLD_ATTRIBUTE)) == result.threshold
    for node in result.nodes:
        provenance = get_provenance(node)
        assert provenance and provenance.get("input_node") == name, (node.GetName(), provenance)
        if expected_model:
            assert provenance.get("model_id") == expected_model, (node.GetName(), provenance)
    for node in (result.segmentation_node, result.points_node, result.table_node, *result.roi_nodes):
        assert get_provenance(node)["threshold"] == result.threshold


def synthetic_detection(volume=None, threshold: float = 0.5) -> tuple[Any, DetectionResult]:
    """(input volume, detection) loaded from the synthetic maps without any worker."""
    volume = volume if volume is not None else synthetic_input()
    anomaly, brain = synthetic_maps(tuple(reversed(volume.GetImageData().GetDimensions())))
    result = logic_module.create_detection(volume, anomaly, brain, threshold,
                                           provenance={"model_id": "synthetic", "model_version": "0"})
    return volume, result


# -------------------------------------------------------------------------------------------------- scenarios
def scenario_load_results_on_an_oblique_flipped_grid() -> None:
    """Synthetic maps on an oblique, anisotropic, left-handed grid: three candidates by decreasing score (the blob
    outside the brain is none), each a coded segment, a box around its voxels, a labelled point at its centre and
    a table row; the input is untouched."""
    volume = synthetic_input()
    before = volume_fingerprint(volume)
    with no_worker_may_start() as attempts:
        _, result = synthetic_detection(volume)
    assert not attempts
    assert_detection(result, volume, expected_model="synthetic")
    assert [item["max_score"] for item in result.candidates] == [round(peak, 4) for peak in BLOB_PEAKS], \
        result.candidates
    assert all(item["tissue"] in lesion_candidates.TISSUE_NAMES.values() for item in result.candidates)
    assert volume_fingerprint(volume) == before, "the input volume changed"
    assert "3 lesion candidates at threshold 0.50" in result.summary(), result.summary()


def scenario_slider_rederives_without_running_the_model() -> None:
    """The sensitivity slider: candidates, segments, boxes, points and table follow the threshold (fewer as it
    rises), from the maps already in the scene, with no worker started and no job folder made; the anomaly and brain
    maps and the case score stay; the old boxes are removed; going back gives the first result again."""
    volume, first = synthetic_detection()
    anomaly_before = slicer.util.arrayFromVolume(first.anomaly_node).copy()
    brain_before = slicer.util.arrayFromVolume(first.brain_node).copy()
    folders = job_folders()
    counts = []
    with no_worker_may_start() as attempts:
        for threshold in (0.3, 0.5, 0.7, 0.85, 0.97):
            old_boxes = [roi.GetID() for roi in logic_module.detection_of(first.anomaly_node).roi_nodes]
            result = logic_module.rederive(first.anomaly_node, threshold)
            assert all(slicer.mrmlScene.GetNodeByID(node_id) is None for node_id in old_boxes), "old boxes kept"
            assert result.threshold == threshold and result.anomaly_node is first.anomaly_node
            assert result.segmentation_node is first.segmentation_node and result.table_node is first.table_node
            assert result.points_node is first.points_node and result.case_score == first.case_score
            assert_detection(result, volume)
            counts.append(result.found)
        again = logic_module.rederive(first.anomaly_node, 0.5)
    assert not attempts, "re-deriving started a worker"
    assert job_folders() <= folders, "re-deriving made a job folder"
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1] == 0, counts
    assert counts[1] == len(first.candidates) == 3, counts
    assert again.candidates == first.candidates
    assert np.array_equal(slicer.util.arrayFromVolume(first.anomaly_node), anomaly_before)
    assert np.array_equal(slicer.util.arrayFromVolume(first.brain_node), brain_before)
    assert logic_module.detection_of(first.anomaly_node).candidates == first.candidates
    assert_fails_cleanly(lambda: logic_module.rederive(first.anomaly_node, 1.5), errors.InputError, "between 0 and 1")
    assert_fails_cleanly(lambda: logic_module.rederive(volume, 0.5), errors.InputError, "not an anomaly map")


def scenario_detect_sample_head_with_an_extra_contrast() -> None:
    """The shipped model on the ROBEX head with a second, inverted contrast of the same visit: every output on the
    input's grid, consistent, with the model's provenance; the extra contrast is named in it; no job folder left."""
    require_model()
    try:
        head_path, _ = sample_data.robex_head_paths()
    except sample_data.SampleDataMissing as error:
        raise ScenarioSkipped(str(error)) from error
    head = read_volume_file(head_path, "ROBEX head")
    voxels = slicer.util.arrayFromVolume(head)
    inverted = volume_from_array((voxels.max() - voxels).astype(np.float32), ijk_to_ras(head), "ROBEX inverted")
    before = volume_fingerprint(head)
    folders = job_folders()
    result = make_logic().run(head, MODEL_ID, device="cpu", extra_volumes=[inverted])
    assert_detection(result, head, expected_model=MODEL_ID)
    model = registry.get_model(MODEL_ID)
    assert result.threshold == logic_module.default_threshold(model)
    provenance = get_provenance(result.anomaly_node)
    assert provenance["model_version"] == model.version and provenance["extra_input_nodes"] == ["ROBEX inverted"]
    assert result.segmentation_node.GetName().startswith(f"ROBEX head {model.slicer['output_name_suffix']}")
    assert volume_fingerprint(head) == before, "the input volume changed"
    assert job_folders() <= folders, "the run left its job folder"


def scenario_bad_inputs_fail_cleanly() -> None:
    """A label map, a 2D volume, an extra contrast that is the input, another one that is nowhere near it, an
    unknown model, a model of another task and a threshold outside 0-1: one clear sentence before anything starts;
    the scene is unchanged."""
    logic = make_logic()
    volume = synthetic_input()
    labels = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    labels.SetAndObserveImageData(volume.GetImageData())
    flat = volume_from_array(sample_data.phantom_head((1, 20, 20)), np.eye(4), "single slice")
    far = np.eye(4)
    far[:3, 3] = (900.0, 900.0, 900.0)
    elsewhere = volume_from_array(sample_data.phantom_head(SHAPE), far, "other patient")
    with no_worker_may_start() as attempts:
        assert_fails_cleanly(lambda: logic.run(labels, MODEL_ID), errors.InputError, "label map")
        assert_fails_cleanly(lambda: logic.run(flat, MODEL_ID), errors.InputError, "single slice", "3D")
        assert_fails_cleanly(lambda: logic.run(None, MODEL_ID), errors.InputError, "no input volume")
        assert_fails_cleanly(lambda: logic.run(volume, MODEL_ID, extra_volumes=[volume]), errors.InputError,
                             "selected twice", watched_volume=volume)
        assert_fails_cleanly(lambda: logic.run(volume, MODEL_ID, extra_volumes=[elsewhere]), errors.InputError,
                             "other patient", "co-registered", watched_volume=volume)
        assert_fails_cleanly(lambda: logic.run(volume, MODEL_ID, extra_volumes=[labels]), errors.InputError,
                             "label map", watched_volume=volume)
        assert_fails_cleanly(lambda: logic.run(volume, "no-such-model"), errors.ModelError, "unknown model",
                             watched_volume=volume)
        assert_fails_cleanly(lambda: logic.run(volume, "deepbet"), errors.ModelError, "not a detection model",
                             watched_volume=volume)
        assert_fails_cleanly(lambda: logic.run(volume, MODEL_ID, threshold=1.5), errors.InputError,
                             "between 0 and 1", watched_volume=volume)
    assert not attempts, "a worker was started for a refused input"


def scenario_cancel_leaves_the_scene_as_it_was() -> None:
    """Cancel at once: CancelledError, no new node, the input untouched, no job folder."""
    require_model()
    volume = synthetic_input()
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my candidates")
    segmentation.GetSegmentation().AddEmptySegment("kept", "kept")
    nodes_before, before = scene_node_ids(), volume_fingerprint(volume)
    run = make_logic().start(volume, MODEL_ID, device="cpu", output_segmentation=segmentation)
    folder = Path(run.worker.job.folder)
    run.cancel()
    assert not run.is_running()
    try:
        run.finish()
    except errors.CancelledError:
        pass
    else:
        raise AssertionError("finish() after cancel did not raise CancelledError")
    assert not folder.exists(), "the cancelled job left files behind"
    assert scene_node_ids() == nodes_before and volume_fingerprint(volume) == before
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1, "the chosen output segmentation changed"


SCENARIOS: list[tuple[str, Callable[[], None]]] = [
    ("load results on an oblique, flipped, anisotropic grid", scenario_load_results_on_an_oblique_flipped_grid),
    ("the sensitivity slider re-derives without running the model",
     scenario_slider_rederives_without_running_the_model),
    ("sample head with an extra contrast (real model)", scenario_detect_sample_head_with_an_extra_contrast),
    ("bad inputs fail cleanly", scenario_bad_inputs_fail_cleanly),
    ("cancel leaves the scene as it was", scenario_cancel_leaves_the_scene_as_it_was),
]
