"""Classification scenarios, run both by pytest on a headless scene and by the Slicer self-test (DLClassificationTest).

Same contract as scenarios.py: no arguments, ``slicer.mrmlScene``, the same ClassificationLogic the DL Classification
module uses with a real worker process and the shipped sequence-type network; AssertionError when the product
misbehaves, ScenarioSkipped when a prerequisite is missing on this machine. Which type a phantom gets is not checked
(the scenarios hold for any weights): only that every volume gets one of the model's classes, consistently in the
table, the attributes and the provenance, and that the saliency map lies on the input's grid.
"""

from __future__ import annotations

import importlib.metadata
import math
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import slicer
import vtk

from MIADeepLearningLib.engine import errors, registry
from MIADeepLearningLib.mrml import classification_logic as logic_module
from MIADeepLearningLib.mrml.classification_logic import ClassificationLogic, ClassificationResult
from MIADeepLearningLib.mrml.provenance import get_provenance
from MIADeepLearningLib.mrml.volumes import same_grid
from MIADeepLearningLib.testing import sample_data
from MIADeepLearningLib.testing.scenarios import (
    ScenarioSkipped,
    assert_fails_cleanly,
    scene_node_ids,
    volume_fingerprint,
    volume_from_array,
)
from MIADeepLearningLib.testing.scenarios import require_model as require_verified_model

__all__ = ["SCENARIOS", "ScenarioSkipped"]

MODEL_ID = "sequence-type"
JOBS_ROOT = Path(tempfile.gettempdir()) / "MIADeepLearning-scenarios"
ATTRIBUTES = (logic_module.SEQUENCE_TYPE_ATTRIBUTE, logic_module.SEQUENCE_TYPE_PROBABILITY_ATTRIBUTE)


# ---------------------------------------------------------------------------------------------------- helpers
def require_model() -> registry.ModelInfo:
    """The shipped classification model with verified weights and a PyTorch for its worker, or skip."""
    model = require_verified_model(MODEL_ID)
    try:
        importlib.metadata.version("torch")  # metadata only: the scene's process must not load torch
    except importlib.metadata.PackageNotFoundError as error:
        raise ScenarioSkipped("PyTorch is not installed (install it with the PyTorch extension)") from error
    return model


def model_classes() -> list[str]:
    """The class names the shipped package declares (torch-free)."""
    return [str(name) for name in registry.get_model(MODEL_ID).slicer.get("classes", [])]


def make_logic() -> ClassificationLogic:
    """The logic as the module builds it; the worker runs with sys.executable (PythonSlicer inside Slicer)."""
    return ClassificationLogic(jobs_root=JOBS_ROOT)


def job_folders() -> set[str]:
    return {path.name for path in JOBS_ROOT.glob("miadl-job-*")} if JOBS_ROOT.is_dir() else set()


def oblique_matrix(spacing=(0.9, 1.1, 3.0), angles_deg=(15.0, -10.0, 25.0), flip: bool = False) -> np.ndarray:
    """IJK->RAS of an oblique, anisotropic acquisition (with flip, the first two axes reversed: left-handed)."""
    transform = vtk.vtkTransform()
    for axis, angle in enumerate(angles_deg):
        transform.RotateWXYZ(angle, *np.eye(3)[axis])
    rotation = np.array([[transform.GetMatrix().GetElement(r, c) for c in range(3)] for r in range(3)])
    axes = np.diag([-1.0, 1.0, 1.0]) if flip else np.eye(3)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ axes @ np.diag(spacing)
    matrix[:3, 3] = (12.0, -20.0, 8.0)
    return matrix


def sample_volume(name: str = "head phantom", matrix: np.ndarray | None = None, seed: int = 0) -> Any:
    """A small synthetic head (scalp shell around a textured brain) as a volume node."""
    voxels = sample_data.phantom_head((24, 56, 52), seed=seed)
    return volume_from_array(voxels, oblique_matrix() if matrix is None else matrix, name)


def flat_volume(name: str = "single slice") -> Any:
    return volume_from_array(sample_data.phantom_head((1, 40, 40)), np.eye(4), name)


def vector_volume(name: str = "colour volume") -> Any:
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 8)
    image.AllocateScalars(vtk.VTK_FLOAT, 3)
    node.SetAndObserveImageData(image)
    return node


def table_rows(table_node) -> list[dict[str, str]]:
    """The table's rows as column -> text."""
    table = table_node.GetTable()
    columns = [table.GetColumn(index).GetName() for index in range(table.GetNumberOfColumns())]
    return [{column: table.GetValueByName(row, column).ToString() for column in columns}
            for row in range(table.GetNumberOfRows())]


def assert_classified(result: ClassificationResult, volume, saliency: bool) -> dict[str, str]:
    """The volume's row, attributes, provenance and (with `saliency`) saliency map agree and are well formed."""
    classes = model_classes()
    (row,) = [row for row in result.rows if row.volume_node is volume]
    assert row.classified, f"'{volume.GetName()}' was not classified: {row.error}"
    assert row.label in classes, f"label {row.label!r} is none of {classes}"
    assert set(row.probabilities) == set(classes), row.probabilities
    assert all(0.0 <= value <= 1.0 for value in row.probabilities.values()), row.probabilities
    assert math.isclose(sum(row.probabilities.values()), 1.0, abs_tol=1e-3), row.probabilities
    assert row.runner_up is not None and row.runner_up[0] != row.label
    assert volume.GetAttribute(logic_module.SEQUENCE_TYPE_ATTRIBUTE) == row.label
    probability = volume.GetAttribute(logic_module.SEQUENCE_TYPE_PROBABILITY_ATTRIBUTE)
    assert probability == f"{row.probability:.2f}", probability
    (line,) = [line for line in table_rows(result.table_node) if line[logic_module.VOLUME_COLUMN] == volume.GetName()]
    assert line[logic_module.TYPE_COLUMN] == logic_module.class_title(row.label), line
    assert line[logic_module.PROBABILITY_COLUMN] == probability, line
    assert line[logic_module.RUNNER_UP_COLUMN] == logic_module.class_title(row.runner_up[0]), line
    assert line[logic_module.OOD_COLUMN] in ("yes", "no") and (line[logic_module.OOD_COLUMN] == "yes") == row.ood
    if saliency:
        node = row.saliency_node
        assert node is not None, f"no saliency map for '{volume.GetName()}' ({row.note_text()})"
        assert node.GetScene() is slicer.mrmlScene and node is not volume
        assert node.GetName() == f"{volume.GetName()} saliency", node.GetName()
        assert same_grid(node, volume), "the saliency map is not on the input's grid"
        voxels = slicer.util.arrayFromVolume(node)
        assert np.isfinite(voxels).all() and voxels.min() >= -1e-6 and voxels.max() <= 1.0 + 1e-6, \
            (float(voxels.min()), float(voxels.max()))
        assert node.GetAttribute(logic_module.SALIENCY_OF_ATTRIBUTE) == volume.GetID()
        provenance = get_provenance(node)
        assert provenance and provenance.get("model_id") == MODEL_ID, provenance
        assert provenance["classification"]["label"] == row.label, provenance
    else:
        assert row.saliency_node is None
    provenance = get_provenance(result.table_node)
    assert provenance and provenance.get("model_id") == MODEL_ID, provenance
    assert provenance.get("model_version") == registry.get_model(MODEL_ID).version, provenance
    return line


# -------------------------------------------------------------------------------------------------- scenarios
def scenario_classify_one_volume_with_saliency() -> None:
    """One oblique, anisotropic volume: one table row, the type on the volume as attributes, a saliency map on the
    input's grid shown in colour; the voxels, grid and name of the input are untouched."""
    require_model()
    volume = sample_volume()
    before = volume_fingerprint(volume)
    folders = job_folders()
    result = make_logic().run(volume, MODEL_ID, device="cpu", create_saliency=True)
    assert [row.volume_node for row in result.rows] == [volume]
    assert result.table_node.GetName().startswith(logic_module.TABLE_NAME), result.table_node.GetName()
    table = result.table_node.GetTable()
    assert [table.GetColumn(index).GetName() for index in range(table.GetNumberOfColumns())] == \
        list(logic_module.COLUMNS)
    assert table.GetNumberOfRows() == 1
    assert_classified(result, volume, saliency=True)
    after = volume_fingerprint(volume)
    assert set(after.pop("attributes")) - set(before.pop("attributes")) <= set(ATTRIBUTES)
    assert after == before, "the input volume's voxels, grid or name changed"
    display = result.rows[0].saliency_node.GetDisplayNode()
    assert display.GetColorNodeID() in logic_module.SALIENCY_COLOR_NODE_IDS, display.GetColorNodeID()
    assert job_folders() <= folders, "the run left its job folder"


def scenario_all_volumes_one_broken() -> None:
    """"All volumes in the scene" with a 2-D and a vector volume among them: their rows say why, the other two are
    classified and get the attributes; the label map is left out; nothing else changes."""
    require_model()
    first = sample_volume("first head")
    second = sample_volume("second head", oblique_matrix((1.2, 1.2, 1.2), (0.0, 0.0, 180.0), flip=True), seed=1)
    flat = flat_volume()
    vector = vector_volume()
    label_map = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    label_map.SetAndObserveImageData(flat.GetImageData())
    volumes = logic_module.scene_volumes()
    assert volumes == [first, second, flat, vector], [node.GetName() for node in volumes]
    result = make_logic().run(volumes, MODEL_ID, device="cpu")
    assert [row.name for row in result.rows] == ["first head", "second head", "single slice", "colour volume"]
    for volume in (first, second):
        assert_classified(result, volume, saliency=False)
    rows = {row.name: row for row in result.rows}
    lines = {line[logic_module.VOLUME_COLUMN]: line for line in table_rows(result.table_node)}
    for name, words in (("single slice", ("2D", "3D")), ("colour volume", ("components", "scalar"))):
        row = rows[name]
        assert not row.classified and all(word in row.error for word in words), row.error
        assert lines[name][logic_module.NOTES_COLUMN] == row.error and lines[name][logic_module.TYPE_COLUMN] == ""
        assert all(row.volume_node.GetAttribute(attribute) is None for attribute in ATTRIBUTES), name
    assert "2 of 4 volume(s) classified" in result.summary(), result.summary()


def scenario_bad_inputs_fail_cleanly() -> None:
    """One unusable volume, no volume, only unusable volumes, an unknown model or one of another task: one clear
    sentence before anything starts; the scene is unchanged."""
    require_model()
    logic = make_logic()
    flat = flat_volume()
    assert_fails_cleanly(lambda: logic.run(flat, MODEL_ID), errors.InputError, "single slice", "3D",
                         watched_volume=flat)
    assert_fails_cleanly(lambda: logic.run(None, MODEL_ID), errors.InputError, "no input volume")
    assert_fails_cleanly(lambda: logic.run([], MODEL_ID), errors.InputError, "no volume to classify")
    vector = vector_volume()
    assert_fails_cleanly(lambda: logic.run([flat, vector], MODEL_ID), errors.InputError, "none of the 2 volumes",
                         "single slice", "colour volume", watched_volume=flat)
    volume = sample_volume()
    assert_fails_cleanly(lambda: logic.run(volume, "no-such-model"), errors.ModelError, "unknown model",
                         watched_volume=volume)
    assert_fails_cleanly(lambda: logic.run(volume, "deepbet"), errors.ModelError, "not a classification model",
                         watched_volume=volume)
    assert all(volume.GetAttribute(attribute) is None for attribute in ATTRIBUTES)


def scenario_cancel_leaves_the_scene_as_it_was() -> None:
    """Cancel at once: CancelledError, no new node, no attribute, no job folder."""
    require_model()
    volume = sample_volume()
    volume.SetAttribute(logic_module.SEQUENCE_TYPE_ATTRIBUTE, "t2w")  # from an earlier run: stays as it was
    nodes_before, before = scene_node_ids(), volume_fingerprint(volume)
    run = make_logic().start([volume], MODEL_ID, device="cpu", create_saliency=True)
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
    assert volume.GetAttribute(logic_module.SEQUENCE_TYPE_ATTRIBUTE) == "t2w"


SCENARIOS: list[tuple[str, Callable[[], None]]] = [
    ("one volume with a saliency map (oblique, anisotropic)", scenario_classify_one_volume_with_saliency),
    ("all volumes in the scene, two of them unusable", scenario_all_volumes_one_broken),
    ("bad inputs fail cleanly", scenario_bad_inputs_fail_cleanly),
    ("cancel leaves the scene as it was", scenario_cancel_leaves_the_scene_as_it_was),
]
