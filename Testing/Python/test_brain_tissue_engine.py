"""The brain tissue pipeline (engine/brain_tissue.py): labels and uncertainty land exactly on the input grid for any
orientation and voxel size (thick slices included); the working grid is the training orientation over the input's
extent; a network with known logits segments a phantom correctly and test-time flips are undone; tiny random UNet3D
weights run through the task like a real package; weights or metadata that do not fit are refused clearly.

The "known logits" network is a stand-in for a trained one: class = the intensity band of the normalised input
(background 0, CSF 1/3, GM 2/3, WM 1), decided voxel by voxel, so the right answer on a phantom is known exactly and
any geometric slip (a transposed axis, an unflipped copy, a shifted grid) shows up as misplaced tissue.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import (
    DIRECTIONS,
    TISSUE_MODEL_ID,
    IntensityBands,
    dice,
    physical_points,
    write_tissue_package,
    write_tissue_weights,
)

from MIADeepLearningLib.engine import brain_tissue, geometry, registry, tasks
from MIADeepLearningLib.engine.errors import InputError, ModelError

# (size, spacing): about 60 mm of extent each way
GRIDS = {
    "isotropic": ((40, 40, 40), (1.5, 1.5, 1.5)),
    "anisotropic": ((64, 52, 24), (0.95, 1.15, 2.5)),
    "thick_k": ((60, 60, 12), (1.0, 1.0, 5.0)),
    "thick_i": ((12, 60, 60), (5.0, 1.0, 1.0)),
}
ORIGIN = (12.5, -30.25, 7.0)
# The phantom: nested spheres (WM core, GM shell, CSF shell; intensities 300/200/100 on a 0 background) whose centre
# is off the image centre, plus a small WM ball, so that no flip maps the phantom onto itself.
CENTRE_OFFSET = np.array([4.0, -3.0, 2.5])
RADII = (11.0, 17.0, 23.0)  # WM, GM, CSF outer radii in mm
SMALL_BALL = (np.array([-14.0, 15.0, -10.0]), 5.0)
INTENSITY = {3: 300.0, 2: 200.0, 1: 100.0, 0: 0.0}


def _no_progress(stage: str, fraction: float, message: str) -> None:
    """Progress sink."""


def _phantom(size, spacing, direction: np.ndarray) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """(image, true labels, distance in mm of each voxel centre to the nearest tissue boundary), (z, y, x) arrays."""
    image = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin(ORIGIN)
    points = physical_points(image)
    centre = points.reshape(-1, 3).mean(axis=0) + CENTRE_OFFSET
    radius = np.linalg.norm(points - centre, axis=-1)
    labels = np.zeros(radius.shape, np.uint8)
    for value, outer in zip((1, 2, 3), reversed(RADII)):
        labels[radius < outer] = value
    ball = np.linalg.norm(points - (centre + SMALL_BALL[0]), axis=-1)
    labels[ball < SMALL_BALL[1]] = 3
    boundary = np.min([np.abs(radius - outer) for outer in RADII] + [np.abs(ball - SMALL_BALL[1])], axis=0)
    voxels = np.vectorize(INTENSITY.get)(labels).astype(np.float32)
    result = sitk.GetImageFromArray(voxels)
    result.CopyInformation(image)
    return result, labels, boundary


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_tissue_weights(tmp_path_factory.mktemp("tissue") / "model.pt")


def _pipeline(weight_path: Path, segments: list | None = None, **options) -> brain_tissue.BrainTissueSegmentation:
    model = SimpleNamespace(title="Test tissue network", segments=segments or [])
    return brain_tissue.BrainTissueSegmentation(model, {"network": weight_path}, torch.device("cpu"), options)


def _banded(weight_path: Path, **options) -> brain_tissue.BrainTissueSegmentation:
    pipeline = _pipeline(weight_path, **options)
    pipeline.network = IntensityBands()
    return pipeline


def _assert_on_grid(output: sitk.Image, image: sitk.Image, what: str) -> None:
    """Exactly the input's grid: same size, spacing, origin and direction (no rounding)."""
    assert output.GetSize() == image.GetSize(), f"{what}: size {output.GetSize()} instead of {image.GetSize()}"
    assert output.GetSpacing() == image.GetSpacing(), f"{what}: spacing {output.GetSpacing()}"
    assert output.GetOrigin() == image.GetOrigin(), f"{what}: origin {output.GetOrigin()}"
    assert output.GetDirection() == image.GetDirection(), f"{what}: direction {output.GetDirection()}"


# ------------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("orientation", list(DIRECTIONS))
def test_labels_land_on_the_input_grid_and_match_the_phantom(weights, orientation, grid):
    size, spacing = GRIDS[grid]
    image, truth, boundary = _phantom(size, spacing, DIRECTIONS[orientation])
    result = _banded(weights).predict(image, _no_progress)
    label = result["label"]
    _assert_on_grid(label, image, "label")
    assert label.GetPixelID() == sitk.sitkUInt8 and "uncertainty" not in result
    labels = sitk.GetArrayFromImage(label)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    # away from the boundaries (an input voxel plus a working voxel, along the coarsest axis) every voxel is right
    interior = boundary > max(spacing) + 2.0
    wrong = np.count_nonzero(labels[interior] != truth[interior])
    assert wrong == 0, f"{orientation}/{grid}: {wrong} of {interior.sum()} voxels away from the boundaries are wrong"
    for value in (1, 2, 3):
        overlap = dice(labels == value, truth == value)
        assert overlap > 0.85, f"{orientation}/{grid}: Dice {overlap:.3f} for class {value}"
    assert np.mean(labels == truth) > 0.9, f"{orientation}/{grid}: agreement {np.mean(labels == truth):.3f}"


@pytest.mark.parametrize("orientation", list(DIRECTIONS))
def test_working_grid_is_the_training_orientation_over_the_input_extent(weights, orientation):
    image, _, _ = _phantom(*GRIDS["thick_k"], DIRECTIONS[orientation])
    grid = _pipeline(weights).working_grid(image)
    assert grid.GetSpacing() == (2.0, 2.0, 2.0)
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(grid.GetDirection()) == "LIA"
    information = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    information.CopyInformation(image)
    np.testing.assert_allclose(grid.GetDirection(), sitk.DICOMOrient(information, "LIA").GetDirection(), atol=1e-12,
                               err_msg="the input's axes permuted and flipped the way sitk.DICOMOrient does it")

    def centre(volume: sitk.Image) -> np.ndarray:
        return np.asarray(volume.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in volume.GetSize()]))

    np.testing.assert_allclose(centre(grid), centre(image), atol=1e-6, err_msg="centred on the input's extent")
    extents_in = sorted(n * s for n, s in zip(image.GetSize(), image.GetSpacing()))
    extents_out = sorted(n * s for n, s in zip(grid.GetSize(), grid.GetSpacing()))
    np.testing.assert_allclose(extents_out, extents_in, atol=1.0 + 1e-9, err_msg="covers the extent to a voxel")

    kept = _pipeline(weights, orientation="input").working_grid(image)
    assert kept.GetDirection() == image.GetDirection(), "orientation 'input' keeps the input's own axes"
    np.testing.assert_allclose(centre(kept), centre(image), atol=1e-6)


def test_isotropic_grid_with_an_orientation_keeps_the_extent():
    """Reorienting permutes and flips the axes of the same box: per axis the offsets and sizes of the plain grid."""
    image, _, _ = _phantom(*GRIDS["anisotropic"], DIRECTIONS["oblique"] @ DIRECTIONS["permuted"])
    plain, plain_offset = geometry.isotropic_grid(image, 2.0)
    reoriented, offset = geometry.isotropic_grid(image, 2.0, "LIA")
    permutation, signs = geometry.axes_towards(image.GetDirection(), "LIA")
    assert reoriented.GetSize() == tuple(plain.GetSize()[axis] for axis in permutation)
    columns = np.asarray(image.GetDirection()).reshape(3, 3)[:, list(permutation)] * np.asarray(signs)
    np.testing.assert_allclose(np.asarray(reoriented.GetDirection()).reshape(3, 3), columns, atol=1e-12)
    np.testing.assert_allclose(offset, plain_offset[list(permutation)], atol=1e-9)
    corners = [reoriented.TransformContinuousIndexToPhysicalPoint([-0.5 if bit == 0 else n - 0.5 for bit, n in
                                                                   zip(bits, reoriented.GetSize())])
               for bits in np.ndindex(2, 2, 2)]
    expected = [plain.TransformContinuousIndexToPhysicalPoint([-0.5 if bit == 0 else n - 0.5 for bit, n in
                                                               zip(bits, plain.GetSize())])
                for bits in np.ndindex(2, 2, 2)]
    np.testing.assert_allclose(sorted(map(tuple, corners)), sorted(map(tuple, expected)), atol=1e-9,
                               err_msg="the same box of voxel corners, only the axes renamed")
    with pytest.raises(ValueError, match="orientation code"):
        geometry.axes_towards(image.GetDirection(), "LLA")


def test_flip_dims_follow_the_anatomy(weights):
    image, _, _ = _phantom(*GRIDS["thick_i"], DIRECTIONS["permuted"])
    pipeline = _pipeline(weights, orientation="input", flip_axes=["LR", "AP", "SI"])
    grid = pipeline.working_grid(image)
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    dims = pipeline.flip_dims(grid)
    assert list(dims) == ["LR", "AP", "SI"] and sorted(dims.values()) == [0, 1, 2]
    for name, physical in brain_tissue.FLIP_AXES.items():  # the array axis flipped for LR runs along LPS x, ...
        assert abs(direction[physical, 2 - dims[name]]) > 0.99, (name, dims, direction)
    assert _pipeline(weights).flip_dims(_pipeline(weights).working_grid(image)) == {"LR": 2}, "LIA: left-right is x"


# ------------------------------------------------------------------------------------------------ uncertainty


@pytest.mark.parametrize("orientation", ["oblique", "permuted"])
def test_flips_are_undone_and_uncertainty_lies_in_0_1_on_the_input_grid(weights, orientation):
    image, _, boundary = _phantom(*GRIDS["anisotropic"], DIRECTIONS[orientation])
    plain = _banded(weights).predict(image, _no_progress)
    stages: list[tuple[str, float]] = []
    result = _banded(weights, uncertainty=True, flip_axes=["LR", "AP", "SI"]).predict(
        image, lambda stage, fraction, message: stages.append((stage, fraction)))
    assert result["provenance"]["test_time_flips"] == ["none", "LR", "AP", "SI"]
    assert len(result["provenance"]["inference"]) == 4
    labels, reference = sitk.GetArrayFromImage(result["label"]), sitk.GetArrayFromImage(plain["label"])
    # the network is voxel-wise, so each flipped copy, flipped back, predicts the same: a copy left flipped would
    # put the off-centre phantom somewhere else
    assert np.count_nonzero(labels != reference) <= 0.001 * labels.size, np.count_nonzero(labels != reference)
    uncertainty = result["uncertainty"]
    _assert_on_grid(uncertainty, image, "uncertainty")
    assert uncertainty.GetPixelID() == sitk.sitkFloat32
    values = sitk.GetArrayFromImage(uncertainty)
    assert np.all(np.isfinite(values)) and values.min() >= 0.0 and values.max() <= 1.0
    interior, edge = boundary > 5.0, boundary < 1.0
    assert values[interior].max() < 0.05, "the class is certain far from every boundary"
    assert values[edge].mean() > 5 * values[interior].mean() + 0.05, "uncertain where the tissue changes"
    fractions = [fraction for _, fraction in stages]
    assert fractions == sorted(fractions) and fractions[-1] < 1.0


def test_flip_average_gives_the_labels_of_the_uncertainty_run_without_the_map(weights):
    """With flip_average (a package default) the labels come from the mean over the mirrored copies whether or not
    the uncertainty map is asked for, so asking for it does not change the segmentation."""
    image, _, _ = _phantom(*GRIDS["thick_k"], DIRECTIONS["oblique"])
    averaged = _pipeline(weights, flip_average=True).predict(image, _no_progress)
    with_map = _pipeline(weights, flip_average=True, uncertainty=True).predict(image, _no_progress)
    assert averaged["provenance"]["test_time_flips"] == ["none", "LR"] and "uncertainty" not in averaged
    assert "uncertainty" in with_map
    assert np.array_equal(sitk.GetArrayFromImage(averaged["label"]), sitk.GetArrayFromImage(with_map["label"]))
    plain = _pipeline(weights).predict(image, _no_progress)
    assert plain["provenance"]["test_time_flips"] == ["none"], "without either option the input runs once"


def test_shifted_working_grids_are_averaged_on_the_input_grid(weights):
    """grid_shifts_mm: the pipeline runs again on copies of the working grid moved by part of a voxel along its own
    axes, and the labels come from the mean of all copies on the input grid."""
    image, truth, _ = _phantom(*GRIDS["anisotropic"], DIRECTIONS["oblique"])
    plain = _banded(weights, flip_average=True).predict(image, _no_progress)
    assert plain["provenance"]["grid_shifts_mm"] == [[0.0, 0.0, 0.0]], "one unshifted grid unless asked"
    stages: list[float] = []
    shifted = _banded(weights, flip_average=True, grid_shifts_mm=[[0, 0, 0], [1, 1, 1]]).predict(
        image, lambda stage, fraction, message: stages.append(fraction))
    _assert_on_grid(shifted["label"], image, "label")
    assert shifted["provenance"]["grid_shifts_mm"] == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert len(shifted["provenance"]["inference"]) == 4, "two grids, each with its mirrored copy"
    assert stages == sorted(stages) and stages[-1] < 1.0
    labels, reference = sitk.GetArrayFromImage(shifted["label"]), sitk.GetArrayFromImage(plain["label"])
    assert np.count_nonzero(labels != reference) <= 0.02 * labels.size, "a voxel-wise network: nearly the same"
    for value in (1, 2, 3):
        assert dice(labels == value, truth == value) >= dice(reference == value, truth == value) - 0.01
    twice = _banded(weights, flip_average=True, grid_shifts_mm=[[0, 0, 0], [0, 0, 0]]).predict(image, _no_progress)
    assert np.array_equal(sitk.GetArrayFromImage(twice["label"]), reference), "the mean of two equal copies"
    # the shifted copy really samples other points: the final probabilities (seen through the entropy map) change
    maps = {name: sitk.GetArrayFromImage(_banded(weights, uncertainty=True, grid_shifts_mm=shifts).predict(
        image, _no_progress)["uncertainty"]) for name, shifts in (("plain", [[0, 0, 0]]), ("same", [[0, 0, 0]] * 2),
                                                                 ("shifted", [[0, 0, 0], [1, 1, 1]]))}
    assert np.allclose(maps["same"], maps["plain"], atol=1e-6)
    assert np.abs(maps["shifted"] - maps["plain"]).max() > 0.01, "the shifted grid was not used"

    grid = brain_tissue.BrainTissueSegmentation.working_grid(_pipeline(weights), image)
    moved = brain_tissue.shifted_grid(grid, (1.0, 0.0, -0.5))
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    expected = np.asarray(grid.GetOrigin()) + direction[:, 0] - 0.5 * direction[:, 2]
    assert np.allclose(moved.GetOrigin(), expected) and moved.GetDirection() == grid.GetDirection()
    assert moved.GetSize() == grid.GetSize() and moved.GetSpacing() == grid.GetSpacing()
    assert grid.GetOrigin() != moved.GetOrigin(), "the original grid is left as it was"


def _blurred_prior(labels: np.ndarray, shift: int, classes: int = 4) -> np.ndarray:
    """What a coarse network gives: one-hot labels moved by `shift` voxels along the last axis and smoothed."""
    one_hot = np.eye(classes, dtype=np.float32)[np.roll(labels, shift, axis=-1)].transpose(3, 0, 1, 2)
    kernel = np.array([1.0, 2.0, 3.0, 2.0, 1.0]) / 9.0
    blurred = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="same"), -1, one_hot)
    edge = one_hot.copy()
    edge[..., 2:-2] = blurred[..., 2:-2]
    return edge / edge.sum(axis=0, keepdims=True)


def test_intensity_refinement_puts_boundaries_where_the_scan_shows_them():
    """A prior that puts every tissue boundary 2 voxels off (a 2 mm network interpolated onto a 1 mm scan) is pulled
    back by the scan's own intensities, whatever their order (T1-like or T2-like): Gaussian models fitted to this
    scan with the prior as weights."""
    labels = np.zeros((4, 4, 60), np.int64)
    labels[..., 5:20], labels[..., 20:35], labels[..., 35:55] = 1, 2, 3  # CSF | GM | WM, background at the ends
    prior = _blurred_prior(labels, shift=2)
    assert np.count_nonzero(prior.argmax(axis=0) != labels) >= 4 * 4 * 6, "the prior is off by 2 voxels per boundary"
    rng = np.random.default_rng(0)
    for means in ({0: 0.0, 1: 0.15, 2: 0.5, 3: 0.8}, {0: 0.0, 1: 0.9, 2: 0.55, 3: 0.35}):  # T1-like, T2-like
        image = np.vectorize(means.get)(labels).astype(np.float64) + rng.normal(0.0, 0.02, labels.shape)
        refined = brain_tissue.refine_with_intensities(prior, image, iterations=2)
        assert refined.shape == prior.shape and np.allclose(refined.sum(axis=0), 1.0, atol=1e-5)
        assert np.allclose(refined[0], prior[0]), "the background probability is the network's"
        inside = (labels > 0) & (np.roll(labels, 2, axis=-1) > 0)  # where the prior knows it is inside the head
        before = np.count_nonzero((prior.argmax(axis=0) != labels) & inside)
        wrong = np.count_nonzero((refined.argmax(axis=0) != labels) & inside)
        # each class's two-Gaussian model may keep a little of the neighbour it was mixed with: a few voxels, not 96
        assert wrong <= 0.05 * before, f"{wrong} of {before} voxels still on the wrong side ({means})"


def test_intensity_refinement_without_intensity_contrast_keeps_the_network_labels():
    labels = np.zeros((3, 3, 40), np.int64)
    labels[..., 5:15], labels[..., 15:25], labels[..., 25:35] = 1, 2, 3
    prior = _blurred_prior(labels, shift=1)
    flat = np.full(labels.shape, 7.0)
    refined = brain_tissue.refine_with_intensities(prior, flat, iterations=2)
    assert np.array_equal(refined.argmax(axis=0), prior.argmax(axis=0))
    no_wm = prior.copy()
    no_wm[3] = 0.0  # a class the network never predicts: nothing to fit, nothing breaks
    refined = brain_tissue.refine_with_intensities(no_wm, flat, iterations=2)
    assert np.isfinite(refined).all() and not (refined.argmax(axis=0) == 3).any()
    assert np.array_equal(brain_tissue.refine_with_intensities(prior, flat, iterations=0), prior.astype(np.float32))


def test_pipeline_with_intensity_refinement_stays_on_the_input_grid(weights):
    image, _, _ = _phantom(*GRIDS["thick_k"], DIRECTIONS["oblique"])
    result = _banded(weights, intensity_refinement_iterations=2, uncertainty=True).predict(image, _no_progress)
    _assert_on_grid(result["label"], image, "label")
    _assert_on_grid(result["uncertainty"], image, "uncertainty")
    assert result["provenance"]["intensity_refinement_iterations"] == 2
    plain = _banded(weights).predict(image, _no_progress)
    labels, reference = sitk.GetArrayFromImage(result["label"]), sitk.GetArrayFromImage(plain["label"])
    assert np.count_nonzero(labels != reference) <= 0.02 * labels.size, "a banded phantom is already right"


def test_random_network_copies_disagree_but_stay_in_range(weights):
    image, _, _ = _phantom(*GRIDS["thick_k"], DIRECTIONS["oblique"])
    result = _pipeline(weights, uncertainty=True).predict(image, _no_progress)
    assert result["provenance"]["test_time_flips"] == ["none", "LR"]
    values = sitk.GetArrayFromImage(result["uncertainty"])
    assert 0.0 <= values.min() and values.max() <= 1.0 and values.max() > 0.0
    _assert_on_grid(result["label"], image, "label")
    assert set(np.unique(sitk.GetArrayFromImage(result["label"]))) <= {0, 1, 2, 3}


# ---------------------------------------------------------------------------------------- as a model package


def test_package_runs_through_the_task_with_its_segments_and_uncertainty(tmp_path, monkeypatch):
    root = tmp_path / "models"
    package = write_tissue_package(root)
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(root))
    model = registry.get_model(TISSUE_MODEL_ID)
    assert model.pipeline == brain_tissue.PIPELINE_NAME and model.optional_outputs == ["uncertainty"]
    image, _, _ = _phantom(*GRIDS["thick_k"], DIRECTIONS["oblique"])
    path = tmp_path / "head.nrrd"
    sitk.WriteImage(image, str(path))
    written = sitk.ReadImage(str(path))

    output = tasks.segment_image(path, TISSUE_MODEL_ID, device="cpu", options={"uncertainty": True})
    _assert_on_grid(output.label, written, "label")
    _assert_on_grid(output.uncertainty, written, "uncertainty")
    assert [(s["value"], s["name"]) for s in output.segments] == [(1, "CSF"), (2, "Gray matter"), (3, "White matter")]
    assert output.segments[1]["terminology"].split("~")[2] == "SCT^389081007^Gray Matter"
    pipeline = output.provenance["pipeline"]
    assert pipeline["working_grid"]["orientation"] == "LIA" and pipeline["working_grid"]["spacing_mm"] == 2.0
    assert pipeline["classes"] == ["background", "csf", "gm", "wm"] and len(pipeline["test_time_flips"]) == 2
    sha256 = hashlib.sha256((package / "models" / "model.pt").read_bytes()).hexdigest()
    assert output.provenance["weights_sha256"] == {"network": sha256}
    assert output.provenance["parameters"]["uncertainty"] is True
    assert output.warnings == [], "1 x 1 x 5 mm is within the package's expected input"

    plain = tasks.segment_image(path, TISSUE_MODEL_ID, device="cpu")
    assert plain.uncertainty is None and "uncertainty" not in plain.provenance["parameters"]
    with pytest.raises(ModelError, match="makes no uncertainty map"):
        tasks.segment_image(path, "deepbet", device="cpu", options={"uncertainty": True})


def test_a_package_that_promises_an_uncertainty_map_its_pipeline_does_not_make(tmp_path, monkeypatch):
    root = tmp_path / "models"
    write_tissue_package(root)
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(root))

    class WithoutMap(brain_tissue.BrainTissueSegmentation):
        def predict(self, image, progress):
            result = super().predict(image, progress)
            result.pop("uncertainty")
            return result

    monkeypatch.setitem(tasks.PIPELINES, brain_tissue.PIPELINE_NAME, WithoutMap)
    path = tmp_path / "head.nrrd"
    sitk.WriteImage(_phantom(*GRIDS["isotropic"], DIRECTIONS["identity"])[0], str(path))
    with pytest.raises(ModelError, match="lists an uncertainty map, but its pipeline made none"):
        tasks.segment_image(path, TISSUE_MODEL_ID, device="cpu", options={"uncertainty": True})


def test_segments_default_to_the_standard_tissue_descriptions(weights):
    pipeline = _pipeline(weights)
    assert [segment["name"] for segment in pipeline.segments] == ["CSF", "Gray matter", "White matter"]
    assert pipeline.segments == [{"value": value, **brain_tissue.TISSUE_SEGMENTS[key]}
                                 for value, key in enumerate(("csf", "gm", "wm"), 1)]
    renamed = _pipeline(weights, segments=[{"value": 2, "name": "Cortex and deep gray", "color": [1, 2, 3]}]).segments
    assert renamed[1] == {"value": 2, "name": "Cortex and deep gray", "color": [1, 2, 3],
                          "terminology": brain_tissue.TISSUE_SEGMENTS["gm"]["terminology"]}
    assert renamed[0] == pipeline.segments[0] and renamed[2] == pipeline.segments[2]


def test_tissue_terminology_entries():
    codes = {key: segment["terminology"].split("~") for key, segment in brain_tissue.TISSUE_SEGMENTS.items()}
    for parts in codes.values():
        assert len(parts) == 7 and parts[0] == brain_tissue.SLICER_ANATOMY_CONTEXT
        assert parts[4] == brain_tissue.ANATOMIC_REGION_CONTEXT and parts[3] == parts[5] == parts[6] == "^^"
    assert codes["csf"][1:3] == ["SCT^91720002^Body Substance", "SCT^65216001^Cerebrospinal fluid"]
    assert codes["gm"][1:3] == ["SCT^123037004^Anatomical Structure", "SCT^389081007^Gray Matter"]
    assert codes["wm"][1:3] == ["SCT^123037004^Anatomical Structure", "SCT^389080008^White Matter"]


# ------------------------------------------------------------------------------------------------- refusals


def test_weights_that_do_not_fit_the_network(tmp_path):
    path = write_tissue_weights(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    cases = {
        "features": {**payload, "features": [4, 8, 16]},
        "classes": {**payload, "classes": ["background", "csf", "gm"]},
        "background": {**payload, "classes": ["csf", "gm", "wm", "background"]},
        "spacing": {key: value for key, value in payload.items() if key != "working_spacing"},
        "state": {"weights": payload["state_dict"]},
    }
    for name, broken in cases.items():
        torch.save(broken, tmp_path / f"{name}.pt")
        with pytest.raises(ModelError) as caught:
            _pipeline(tmp_path / f"{name}.pt")
        message = str(caught.value)
        assert message.startswith("The weights of model 'Test tissue network' do not fit its network"), (name, message)


def test_metadata_and_options_that_do_not_fit(weights):
    with pytest.raises(ModelError, match=r"describes labels \[4\].*only labels 1 to 3"):
        _pipeline(weights, segments=[{"value": 4, "name": "Lesion"}])
    with pytest.raises(ModelError, match="orientation"):
        _pipeline(weights, orientation="XYZ")
    with pytest.raises(ModelError, match="flip_axes"):
        _pipeline(weights, flip_axes=["LR", "up"])
    for shifts in ([], [[1, 1]], [[2.0, 0, 0]], [[0, float("nan"), 0]], "1,1,1", [["a", 0, 0]]):
        with pytest.raises(ModelError, match=r"grid_shifts_mm must be a list of \[i, j, k\] shifts in mm"):
            _pipeline(weights, grid_shifts_mm=shifts)


def test_a_2d_or_colour_image_is_refused(weights):
    pipeline = _pipeline(weights)
    for image in (sitk.Image([20, 20], sitk.sitkFloat32), sitk.Image([10, 10, 10], sitk.sitkVectorFloat32, 2)):
        with pytest.raises(InputError, match="3D single-channel"):
            pipeline.predict(image, _no_progress)


@pytest.mark.parametrize("copies, flips, shifts", [
    (1, ["none"], [[0.0, 0.0, 0.0]]),
    (2, ["none", "LR"], [[0.0, 0.0, 0.0]]),
    (4, ["none", "LR"], [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]),
])
def test_test_time_copies_choose_flips_and_shifts(weights, copies, flips, shifts):
    """One number for the speed / accuracy choice: each copy is one network run, and the provenance lists them."""
    image, _, _ = _phantom(*GRIDS["anisotropic"], DIRECTIONS["oblique"])
    pipeline = _banded(weights, flip_average=True, grid_shifts_mm=[[0, 0, 0], [1, 1, 1]], test_time_copies=copies)
    result = pipeline.predict(image, _no_progress)
    _assert_on_grid(result["label"], image, "label")
    assert result["provenance"]["test_time_flips"] == flips
    assert result["provenance"]["grid_shifts_mm"] == shifts
    assert len(result["provenance"]["inference"]) == copies
    # without a second shift in the model's options, 4 copies shift by half a working voxel
    assert _pipeline(weights, test_time_copies=4).grid_shifts[1] == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("value", [0, 3, 8, "2", True, 2.5])
def test_test_time_copies_refuses_other_values(weights, value):
    with pytest.raises(ModelError, match="test_time_copies must be one of 1, 2, 4"):
        _pipeline(weights, test_time_copies=value)
