"""Synthesis scenarios, run both by pytest on a headless scene and by the Slicer self-test (DLSynthesisTest).

Same contract as scenarios.py: no arguments, ``slicer.mrmlScene``, the same SynthesisLogic the DL Synthesis module
uses with a real worker process and the shipped thick-slice-sr network; AssertionError when the product misbehaves,
ScenarioSkipped when a prerequisite is missing on this machine. The phantom is small (64x64x16 voxels) so that each
scenario takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import slicer
import vtk

from MIADeepLearningLib import jobs
from MIADeepLearningLib.engine import errors, registry
from MIADeepLearningLib.mrml.provenance import get_provenance
from MIADeepLearningLib.mrml.synthesis_logic import DESCRIPTION_ATTRIBUTE, DISCLAIMER, SynthesisLogic, SynthesisResult
from MIADeepLearningLib.mrml.volumes import ijk_to_ras, same_grid
from MIADeepLearningLib.testing.scenarios import (
    ScenarioSkipped,
    assert_fails_cleanly,
    scene_node_ids,
    volume_fingerprint,
    volume_from_array,
)
from MIADeepLearningLib.testing.scenarios import require_model as require_verified_model

__all__ = ["SCENARIOS", "ScenarioSkipped"]

MODEL_ID = "thick-slice-sr"
PHANTOM_SHAPE = (16, 64, 64)  # (k, j, i): 64x64 in-plane voxels, 16 thick slices
PHANTOM_SPACING = (1.0, 1.0, 5.0)  # (i, j, k) mm
PHANTOM_ROTATION_DEG = (12.0, -8.0, 20.0)  # about R, A, S: an oblique acquisition
MIN_CORRELATION_WITH_LINEAR = 0.9


# ---------------------------------------------------------------------------------------------------- helpers
def require_model() -> registry.ModelInfo:
    """The shipped synthesis model with verified weights and a PyTorch for its worker, or skip."""
    model = require_verified_model(MODEL_ID)
    try:
        importlib.metadata.version("torch")  # metadata only: the scene's process must not load torch
    except importlib.metadata.PackageNotFoundError as error:
        raise ScenarioSkipped("PyTorch is not installed (install it with the PyTorch extension)") from error
    return model


JOBS_ROOT = Path(tempfile.gettempdir()) / "MIADeepLearning-scenarios"


def make_logic() -> SynthesisLogic:
    """The logic as the module builds it; the worker runs with sys.executable (PythonSlicer inside Slicer)."""
    return SynthesisLogic(jobs_root=JOBS_ROOT)


def job_folders() -> set[str]:
    """Job folders under the scenarios' jobs root: every run, failed or not, must remove its own."""
    return {path.name for path in JOBS_ROOT.glob("miadl-job-*")} if JOBS_ROOT.is_dir() else set()


def rotation_matrix(angles_deg: tuple[float, float, float]) -> np.ndarray:
    transform = vtk.vtkTransform()
    for axis, angle in enumerate(angles_deg):
        transform.RotateWXYZ(angle, *np.eye(3)[axis])
    return np.array([[transform.GetMatrix().GetElement(r, c) for c in range(3)] for r in range(3)])


def thick_slice_phantom(name: str = "thick phantom") -> Any:
    """A smooth head-like image (ellipsoids with soft edges) acquired as 5 mm oblique slices, as a volume node."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in PHANTOM_SHAPE], indexing="ij")
    x = (i - 31.5) * PHANTOM_SPACING[0]  # mm from the centre, along the volume's own axes
    y = (j - 31.5) * PHANTOM_SPACING[1]
    z = (k - 7.5) * PHANTOM_SPACING[2]

    def blob(cx: float, cy: float, cz: float, rx: float, ry: float, rz: float) -> np.ndarray:
        radius = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2)
        return 1.0 / (1.0 + np.exp((radius - 1.0) * 12.0))  # ~1 inside, ~0 outside, a few mm of soft edge

    voxels = (300.0 * blob(0, 0, 0, 28, 26, 34) + 250.0 * blob(0, 0, 0, 22, 20, 28)
              - 150.0 * blob(-8, 4, 6, 6, 9, 14) - 150.0 * blob(8, 4, 6, 6, 9, 14) + 120.0 * blob(0, -10, -12, 5, 5, 8))
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_matrix(PHANTOM_ROTATION_DEG) @ np.diag(PHANTOM_SPACING)
    matrix[:3, 3] = (-20.0, 15.0, 5.0)
    return volume_from_array(voxels.astype(np.float32), matrix, name)


def directions(node) -> np.ndarray:
    """Unit IJK axis directions in RAS (columns)."""
    matrix = ijk_to_ras(node)[:3, :3]
    return matrix / np.linalg.norm(matrix, axis=0)


def extent_along_input_axes(node, reference) -> np.ndarray:
    """(3, 2): where the node's voxel-corner box starts and ends along each IJK axis of `reference`, in mm from the
    reference's first voxel centre (both must share axes)."""
    axes = directions(reference)
    origin = ijk_to_ras(reference)[:3, 3]
    spacing = np.array(node.GetSpacing())
    dims = np.array(node.GetImageData().GetDimensions())
    start = axes.T @ (ijk_to_ras(node)[:3, 3] - origin) - 0.5 * spacing
    return np.stack([start, start + dims * spacing], axis=1)


def correlation(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.corrcoef(first.ravel().astype(float), second.ravel().astype(float))[0, 1])


def linear_reference(input_volume, grid_volume) -> np.ndarray:
    """The input resampled linearly onto the output's grid (by Slicer), as a (k, j, i) array; no node is left."""
    reference = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(input_volume, grid_volume)
    try:
        return slicer.util.arrayFromVolume(reference).copy()
    finally:
        slicer.mrmlScene.RemoveNode(reference)


def assert_synthesized(node, input_volume, what: str) -> None:
    """A scalar volume in the scene, 1 mm, the input's axes, over the input's extent, provenance and the notice."""
    assert node is not None, f"no {what}"
    assert node is not input_volume, f"the {what} is the input node"
    assert node.GetScene() is slicer.mrmlScene, f"the {what} is not in the scene"
    assert node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode"), node.GetClassName()
    assert np.allclose(node.GetSpacing(), 1.0, atol=1e-4), f"{what} spacing {node.GetSpacing()}, not 1 mm"
    assert np.abs(directions(node) - directions(input_volume)).max() < 1e-6, f"the {what} has other axes"
    extent, input_extent = extent_along_input_axes(node, input_volume), extent_along_input_axes(input_volume,
                                                                                               input_volume)
    assert np.abs(extent - input_extent).max() <= 1.0 + 1e-6, (
        f"the {what} covers {extent.round(2).tolist()} mm, the input {input_extent.round(2).tolist()} mm")
    voxels = slicer.util.arrayFromVolume(node)
    assert np.isfinite(voxels).all(), f"the {what} has non-finite voxels"
    provenance = get_provenance(node)
    assert provenance is not None, f"the {what} has no provenance"
    model = registry.get_model(MODEL_ID)
    assert provenance.get("model_id") == MODEL_ID and provenance.get("model_version") == model.version, provenance
    for key in ("device", "created_utc", "extension_version", "timings_s"):
        assert key in provenance, f"the {what}'s provenance lacks {key}"
    assert provenance.get("input_node") == input_volume.GetName(), provenance.get("input_node")
    assert DISCLAIMER in (node.GetDescription() or ""), f"the {what}'s description lacks the disclaimer"
    assert node.GetAttribute(DESCRIPTION_ATTRIBUTE) == DISCLAIMER
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    parent = sh.GetItemParent(sh.GetItemByDataNode(input_volume))
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == parent, f"the {what} is not beside the input"


# ------------------------------------------------------------------------------------------------ scenarios
def scenario_thick_slices_to_1mm() -> None:
    """5 mm oblique slices -> a new 1 mm volume on the input's axes and extent, close to interpolation, with
    provenance and the disclaimer; progress goes forward; the input is untouched."""
    require_model()
    phantom = thick_slice_phantom()
    before, nodes_before, folders_before = volume_fingerprint(phantom), scene_node_ids(), job_folders()
    events: list[jobs.Event] = []
    result = make_logic().run(phantom, MODEL_ID, device="cpu", on_event=events.append)
    assert isinstance(result, SynthesisResult)
    volume = result.volume_node
    assert_synthesized(volume, phantom, "synthesized volume")
    assert volume.GetID() not in nodes_before, "no new node was created"
    assert volume.GetName() == "thick phantom 1mm synthesized", volume.GetName()
    assert result.uncertainty_node is None and result.difference_node is None, "maps made without being asked for"
    assert volume_fingerprint(phantom) == before, "the input volume was modified"
    assert job_folders() <= folders_before, "the run left its job folder behind"

    voxels = slicer.util.arrayFromVolume(volume)
    assert voxels.shape == (80, 64, 64), f"1 mm grid over 64x64x80 mm expected, got {voxels.shape[::-1]} (i, j, k)"
    score = correlation(voxels, linear_reference(phantom, volume))
    assert score >= MIN_CORRELATION_WITH_LINEAR, f"correlation with linear interpolation {score:.3f}"
    assert voxels.min() >= slicer.util.arrayFromVolume(phantom).min() - 1e-3, "output below the input's minimum"

    display, input_display = volume.GetDisplayNode(), phantom.GetDisplayNode()
    assert display is not None and not display.GetAutoWindowLevel(), "the output is not shown with a fixed window"
    assert abs(display.GetWindow() - input_display.GetWindow()) < 1e-3, "the output's window differs from the input's"

    stages = [event.stage for event in events]
    assert stages[0] == "start" and stages[-1] == jobs.STAGE_DONE and "inference" in stages, stages
    fractions = [event.progress for event in events if event.progress is not None]
    assert fractions == sorted(fractions), f"progress went backwards: {fractions}"
    assert result.timings.get("total", 0) > 0 and result.provenance.get("timings_s") == result.timings
    assert result.provenance.get("pipeline", {}).get("test_time_flips") == 1, "flips without an uncertainty map"
    assert isinstance(result.warnings, list)


def scenario_optional_maps_and_chosen_output() -> None:
    """Uncertainty (4 flips) and difference maps lie on the output's grid; a chosen output volume is refilled, not
    duplicated; nothing else is added."""
    require_model()
    phantom = thick_slice_phantom()
    before = volume_fingerprint(phantom)
    chosen = volume_from_array(np.zeros((4, 5, 6), np.float32), np.eye(4), "chosen output")
    volumes_before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    nodes_before = scene_node_ids()
    result = make_logic().run(phantom, MODEL_ID, device="cpu", output_volume=chosen, create_uncertainty=True,
                              create_difference=True)
    assert result.volume_node is chosen, "the chosen output volume was not used"
    assert chosen.GetName() == "chosen output", "the chosen output was renamed"
    assert_synthesized(chosen, phantom, "chosen output volume")
    for what, node in (("uncertainty map", result.uncertainty_node), ("difference map", result.difference_node)):
        assert_synthesized(node, phantom, what)
        assert node.GetID() not in nodes_before, f"the {what} is not a new node"
        assert same_grid(node, chosen), f"the {what} is not on the synthesized volume's grid"
    assert result.uncertainty_node.GetName() == "thick phantom 1mm synthesized uncertainty"
    assert result.difference_node.GetName() == "thick phantom 1mm synthesized minus B-spline"
    uncertainty = slicer.util.arrayFromVolume(result.uncertainty_node)
    assert uncertainty.min() >= 0 and uncertainty.max() > 0, "the uncertainty is not a non-negative spread"
    difference = slicer.util.arrayFromVolume(result.difference_node)
    assert np.abs(difference).max() > 0, "the difference map is empty"
    assert abs(result.difference_node.GetDisplayNode().GetLevel()) < 1e-6, "the difference map's window is not at 0"
    flips = result.provenance.get("pipeline", {}).get("test_time_flips")
    assert flips == 4, f"the uncertainty map needs 4 flips, the provenance says {flips}"
    volumes_after = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    assert volumes_after == volumes_before + 2, f"{volumes_after - volumes_before} volumes added, expected 2 maps"
    assert volume_fingerprint(phantom) == before, "the input volume was modified"


def scenario_bad_inputs_fail_cleanly() -> None:
    """No image data, a 2D image, NaN voxels, the input as output, a label map as output, a segmentation or unknown
    model: one clear sentence, nothing added to or changed in the scene."""
    require_model()
    logic = make_logic()
    folders_before = job_folders()

    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no voxels")
    assert_fails_cleanly(lambda: logic.run(empty, MODEL_ID), errors.InputError, "no voxels", "no image data")

    flat = volume_from_array(np.ones((1, 64, 64), np.float32), np.eye(4), "single slice")
    assert_fails_cleanly(lambda: logic.run(flat, MODEL_ID), errors.InputError, "single slice", "2D",
                         watched_volume=flat)

    phantom = thick_slice_phantom()
    assert_fails_cleanly(lambda: logic.run(phantom, MODEL_ID, output_volume=phantom), errors.InputError,
                         "must not be the input", watched_volume=phantom)
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "a label map")
    assert_fails_cleanly(lambda: logic.run(phantom, MODEL_ID, output_volume=labelmap), errors.InputError,
                         "a label map", "not a scalar volume", watched_volume=phantom)
    labels = slicer.util.addVolumeFromArray((slicer.util.arrayFromVolume(phantom) > 0).astype(np.uint8),
                                            ijkToRAS=ijk_to_ras(phantom), name="phantom labels",
                                            nodeClassName="vtkMRMLLabelMapVolumeNode")
    assert_fails_cleanly(lambda: logic.run(labels, MODEL_ID), errors.InputError, "'phantom labels' is a label map",
                         "not an image", "Convert to scalar volume", watched_volume=labels)
    assert_fails_cleanly(lambda: logic.run(phantom, "deepbet"), errors.ModelError, "not a synthesis model",
                         watched_volume=phantom)
    assert_fails_cleanly(lambda: logic.run(phantom, "no-such-model"), errors.ModelError, "unknown model")
    assert_fails_cleanly(lambda: logic.run(None, MODEL_ID), errors.InputError, "no input volume")

    with_nan = slicer.util.arrayFromVolume(phantom).copy()
    with_nan[3, 10, 10:13] = np.nan
    nan_volume = volume_from_array(with_nan, ijk_to_ras(phantom), "with NaN")
    assert_fails_cleanly(lambda: logic.run(nan_volume, MODEL_ID, device="cpu"), errors.InputError, "NaN",
                         watched_volume=nan_volume)
    assert job_folders() <= folders_before, "a failed run left its job folder behind"


SCENARIOS: list[tuple[str, Callable[[], None]]] = [
    ("thick slices to a new 1 mm volume", scenario_thick_slices_to_1mm),
    ("uncertainty and difference maps, chosen output volume", scenario_optional_maps_and_chosen_output),
    ("bad inputs fail cleanly", scenario_bad_inputs_fail_cleanly),
]
