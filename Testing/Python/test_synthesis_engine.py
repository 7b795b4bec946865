"""The thick-slice synthesis pipeline (engine/synthesis.py): output geometry for any orientation and thick axis, an
exact data path (with a network that returns its input, the pipeline is plain linear resampling, so normalisation,
axis moves and the slice coordinates are checked to float precision), the optional outputs, warnings and refusals.

Most tests use a tiny freshly initialised ResidualUNet3D saved like a model package's weights; the shipped model
"thick-slice-sr" runs once on a small input (sanity only: its weights are still being trained)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import DIRECTIONS, physical_points

from MIADeepLearningLib.engine import registry, synthesis, tasks
from MIADeepLearningLib.engine.errors import InputError, ModelError
from MIADeepLearningLib.engine.networks import ResidualUNet3D

FEATURES = (4, 8, 16)
# (size, spacing) with the thick axis i, j or k: 28 x 26 voxels of 1.1 x 0.9 mm in-plane, 6 slices 5 mm apart
GRIDS = {
    "i": ((6, 28, 26), (5.0, 1.1, 0.9)),
    "j": ((28, 6, 26), (1.1, 5.0, 0.9)),
    "k": ((28, 26, 6), (1.1, 0.9, 5.0)),
}
ORIGIN = (12.5, -30.25, 7.0)


def _no_progress(stage: str, fraction: float, message: str) -> None:
    """Progress sink."""


def _weights(path: Path, zero_head: bool, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    network = ResidualUNet3D(in_channels=3, features=FEATURES)
    if zero_head:  # output == input channel 0: the network adds nothing to the interpolated image
        with torch.no_grad():
            network.head.weight.zero_()
            network.head.bias.zero_()
    torch.save({"state_dict": network.state_dict(), "features": list(FEATURES)}, path)
    return path


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    with torch.random.fork_rng():
        return {"identity": _weights(folder / "identity.pt", zero_head=True),
                "random": _weights(folder / "random.pt", zero_head=False)}


def _pipeline(weight_path: Path, **options) -> synthesis.ThickSliceSuperResolution:
    return synthesis.ThickSliceSuperResolution(SimpleNamespace(title="Test network"), {"network": weight_path},
                                               torch.device("cpu"), options)


def _continuous_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Continuous (i, j, k) index in `image` of physical points (..., 3), vectorised; checked against SimpleITK."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    index = (points - np.asarray(image.GetOrigin())) @ direction / np.asarray(image.GetSpacing())
    every = max(1, points.size // 3 // 7)  # about 7 points checked against SimpleITK
    expected = [image.TransformPhysicalPointToContinuousIndex(point) for point in points.reshape(-1, 3)[::every]]
    np.testing.assert_allclose(index.reshape(-1, 3)[::every], expected, rtol=0, atol=1e-9)
    return index


def _make_image(size, spacing, direction: np.ndarray, values: str = "blob") -> sitk.Image:
    image = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin(ORIGIN)
    points = physical_points(image)
    centre = points.reshape(-1, 3).mean(axis=0)
    if values == "linear":  # a linear function of physical position, positive everywhere
        array = 500.0 + (points - centre) @ np.array([3.0, -2.0, 1.5])
    else:  # smooth blobs of different brightness on a dark background, like a head
        offsets = points - centre
        array = 50.0 + 800.0 * np.exp(-(offsets**2).sum(axis=-1) / (2 * 9.0**2))
        array += 300.0 * np.exp(-((offsets - [6.0, -4.0, 3.0]) ** 2).sum(axis=-1) / (2 * 4.0**2))
    result = sitk.GetImageFromArray(array.astype(np.float32))
    result.CopyInformation(image)
    return result


def _corners(image: sitk.Image) -> np.ndarray:
    """(8, 3) physical positions of the outer voxel corners."""
    size = np.asarray(image.GetSize(), dtype=float)
    return np.array([image.TransformContinuousIndexToPhysicalPoint([(-0.5 if bit == 0 else n - 0.5)
                                                                    for bit, n in zip(bits, size)])
                     for bits in np.ndindex(2, 2, 2)])


def _extent_along(image: sitk.Image, axes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of the voxel-corner bounding box measured along the given (orthonormal) axes."""
    projected = _corners(image) @ axes
    return projected.min(axis=0), projected.max(axis=0)


def _reference_linear(image: sitk.Image, grid: sitk.Image) -> np.ndarray:
    resampled = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                              sitk.sitkFloat32, True)
    return sitk.GetArrayFromImage(resampled)


# ------------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("axis", list(GRIDS))
@pytest.mark.parametrize("orientation", list(DIRECTIONS))
def test_output_grid_and_exact_data_path(weight_files, orientation, axis):
    size, spacing = GRIDS[axis]
    direction = DIRECTIONS[orientation]
    image = _make_image(size, spacing, direction)
    thick = "ijk".index(axis)
    assert synthesis.thick_axis(image) == thick

    result = _pipeline(weight_files["identity"]).predict(image, _no_progress)
    output = result["image"]
    assert output.GetSpacing() == (1.0, 1.0, 1.0), f"output spacing {output.GetSpacing()}"
    assert output.GetDirection() == image.GetDirection(), "the output keeps the input's direction exactly"
    assert output.GetPixelID() == sitk.sitkFloat32 and output.GetNumberOfComponentsPerPixel() == 1
    low_in, high_in = _extent_along(image, direction)
    low_out, high_out = _extent_along(output, direction)
    assert np.all(np.abs(low_out - low_in) <= 0.5 + 1e-6) and np.all(np.abs(high_out - high_in) <= 0.5 + 1e-6), (
        f"the output must cover the input's extent to within half a voxel per side: input {low_in}..{high_in}, "
        f"output {low_out}..{high_out} (mm along the image axes)")
    np.testing.assert_allclose((low_out + high_out) / 2, (low_in + high_in) / 2, rtol=0, atol=1e-3,
                               err_msg="the output is centred on the input's extent")
    expected_size = np.round(np.asarray(size) * np.asarray(spacing)).astype(int)
    assert output.GetSize() == tuple(int(n) for n in expected_size)

    grid, offset = synthesis.isotropic_grid(image)
    assert grid.GetSize() == output.GetSize() and grid.GetOrigin() == output.GetOrigin()
    # the offset gives the continuous input index of every output voxel centre, as SimpleITK computes it
    for index in [(0, 0, 0), tuple(n - 1 for n in grid.GetSize()), tuple(n // 2 for n in grid.GetSize()), (3, 1, 2)]:
        point = grid.TransformIndexToPhysicalPoint([int(n) for n in index])
        continuous = np.asarray(image.TransformPhysicalPointToContinuousIndex(point))
        np.testing.assert_allclose(continuous, (offset + np.asarray(index)) / np.asarray(spacing), rtol=0,
                                   atol=1e-6, err_msg=f"slice coordinates of output voxel {index}")

    # a network that returns its input channel: the pipeline must be exactly linear resampling
    reference = _reference_linear(image, grid)
    actual = sitk.GetArrayFromImage(output)
    error = np.abs(actual - reference).max() / np.abs(reference).max()
    assert error < 1e-4, f"{orientation}, thick axis {axis}: relative difference to linear resampling {error:.2e}"
    provenance = result["provenance"]
    assert provenance["thick_axis"] == axis.upper() and provenance["slice_spacing_mm"] == 5.0
    assert provenance["output_size"] == list(output.GetSize()) and provenance["test_time_flips"] == 1
    assert result["warnings"] == [], f"a 5 mm scan with 0.9-1.1 mm in-plane voxels needs no warning: {result}"


def test_overlapping_windows_keep_the_data_path_exact(weight_files):
    """Many small windows (padding, Gaussian blending of overlaps) still give linear resampling exactly."""
    image = _make_image(*GRIDS["j"], DIRECTIONS["oblique"])
    result = _pipeline(weight_files["identity"], roi_size=16, overlap=0.25).predict(image, _no_progress)
    assert result["provenance"]["inference"][0]["windows"] >= 8, result["provenance"]["inference"]
    grid, _ = synthesis.isotropic_grid(image)
    reference = _reference_linear(image, grid)
    error = np.abs(sitk.GetArrayFromImage(result["image"]) - reference).max() / np.abs(reference).max()
    assert error < 1e-4, f"relative difference to linear resampling {error:.2e} with overlapping windows"


@pytest.mark.parametrize(("orientation", "axis"), [("oblique", "k"), ("permuted", "i"), ("flipped", "j")])
def test_a_linear_image_stays_linear(weight_files, orientation, axis):
    size, spacing = GRIDS[axis]
    image = _make_image(size, spacing, DIRECTIONS[orientation], values="linear")
    output = _pipeline(weight_files["identity"]).predict(image, _no_progress)["image"]
    points = physical_points(output)
    centre = physical_points(image).reshape(-1, 3).mean(axis=0)
    expected = 500.0 + (points - centre) @ np.array([3.0, -2.0, 1.5])
    # interior: output voxels inside the hull of the input's voxel centres, where linear interpolation is exact
    continuous = _continuous_index(image, points)
    inside = np.all((continuous >= 0) & (continuous <= np.asarray(size) - 1), axis=-1)
    assert inside.sum() > 0.5 * inside.size, "most output voxels should be interior"
    actual = sitk.GetArrayFromImage(output)
    error = np.abs(actual - expected)[inside].max()
    assert error < 1e-4 * np.abs(expected).max(), f"{orientation}/{axis}: largest deviation {error:.4f} inside"


def test_thick_axis_is_the_largest_spacing():
    for spacing, expected in [((1.0, 1.0, 5.0), 2), ((3.0, 0.5, 0.5), 0), ((0.9, 6.0, 1.2), 1), ((2.0, 1.0, 3.0), 2)]:
        image = sitk.Image([4, 4, 4], sitk.sitkFloat32)
        image.SetSpacing(spacing)
        assert synthesis.thick_axis(image) == expected, f"spacing {spacing}"


def test_isotropic_grid_other_output_spacing():
    image = _make_image((40, 36, 8), (1.1, 0.9, 5.0), DIRECTIONS["oblique"])
    grid, _ = synthesis.isotropic_grid(image, spacing_mm=0.5)
    assert grid.GetSpacing() == (0.5, 0.5, 0.5) and grid.GetSize() == (88, 65, 80)
    low_in, high_in = _extent_along(image, DIRECTIONS["oblique"])
    low_out, high_out = _extent_along(grid, DIRECTIONS["oblique"])
    np.testing.assert_allclose((low_out + high_out) / 2, (low_in + high_in) / 2, atol=1e-6)
    assert np.all(np.abs(high_out - low_out - (high_in - low_in)) <= 0.5 + 1e-6)


# ------------------------------------------------------------------------------------------ optional outputs


def test_uncertainty_and_difference_outputs(weight_files):
    image = _make_image((28, 26, 6), (1.1, 0.9, 5.0), DIRECTIONS["oblique"])
    stages = []
    pipeline = _pipeline(weight_files["random"], uncertainty=True, difference=True)
    result = pipeline.predict(image, lambda stage, fraction, message: stages.append((stage, fraction)))
    output, uncertainty, difference = result["image"], result["uncertainty"], result["difference"]
    for name, extra in (("uncertainty", uncertainty), ("difference", difference)):
        assert extra.GetSize() == output.GetSize() and extra.GetSpacing() == output.GetSpacing(), name
        assert extra.GetOrigin() == output.GetOrigin() and extra.GetDirection() == output.GetDirection(), name
    spread = sitk.GetArrayFromImage(uncertainty)
    assert np.all(np.isfinite(spread)) and spread.min() >= 0.0, "the uncertainty is a standard deviation"
    assert spread.max() > 0.0, "an untrained network does not give the same output for flipped inputs"
    assert result["provenance"]["test_time_flips"] == 4 and len(result["provenance"]["inference"]) == 4
    bspline = sitk.Resample(image, output, sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32, True)
    np.testing.assert_allclose(sitk.GetArrayFromImage(difference),
                               sitk.GetArrayFromImage(output) - sitk.GetArrayFromImage(bspline), rtol=0, atol=1e-3,
                               err_msg="difference = output - B-spline interpolation of the input")
    fractions = [fraction for _, fraction in stages]
    assert fractions == sorted(fractions) and 0.0 < fractions[0] and fractions[-1] < 1.0, stages
    assert {"resample", "inference", "difference"} <= {stage for stage, _ in stages}
    assert float(sitk.GetArrayViewFromImage(output).min()) >= float(sitk.GetArrayViewFromImage(image).min()), (
        "the output is clamped at the input's minimum")

    plain = _pipeline(weight_files["random"]).predict(image, _no_progress)
    assert set(plain) == {"image", "warnings", "provenance"}, "no optional outputs unless asked for"
    assert plain["image"].GetSize() == output.GetSize() and plain["provenance"]["test_time_flips"] == 1


def test_identity_network_has_zero_uncertainty(weight_files):
    image = _make_image((26, 28, 8), (0.9, 1.1, 4.0), DIRECTIONS["flipped"])
    result = _pipeline(weight_files["identity"], uncertainty=True).predict(image, _no_progress)
    assert float(sitk.GetArrayViewFromImage(result["uncertainty"]).max()) < 1e-3, (
        "flipping in-plane cannot change what a network that returns its input gives")


# ------------------------------------------------------------------------------------------ warnings, refusals


@pytest.mark.parametrize(("size", "spacing", "expected"), [
    ((20, 20, 20), (1.0, 1.0, 1.0), "not thick slices"),
    ((20, 7, 5), (1.0, 3.0, 5.0), "Two axes are coarse"),
    ((20, 20, 3), (1.0, 1.0, 9.0), "trained for 2-7 mm"),
])
def test_warnings(weight_files, size, spacing, expected):
    image = _make_image(size, spacing, np.eye(3))
    result = _pipeline(weight_files["identity"]).predict(image, _no_progress)
    assert len(result["warnings"]) == 1 and expected in result["warnings"][0], result["warnings"]
    warning = result["warnings"][0]
    assert warning.endswith(".") and "\n" not in warning
    assert result["image"].GetSpacing() == (1.0, 1.0, 1.0)


def test_bad_inputs_are_refused_in_one_sentence(weight_files):
    pipeline = _pipeline(weight_files["identity"])
    flat = sitk.Image([20, 20], sitk.sitkFloat32)
    vector = sitk.Image([10, 10, 10], sitk.sitkVectorFloat32, 2)
    for image in (flat, vector):
        with pytest.raises(InputError) as caught:
            pipeline.predict(image, _no_progress)
        message = str(caught.value)
        assert message.endswith(".") and "\n" not in message and ". " not in message[:-1], message


def test_weights_that_do_not_fit_the_network(tmp_path):
    network = ResidualUNet3D(in_channels=3, features=(4, 8))
    path = tmp_path / "wrong.pt"
    torch.save({"state_dict": network.state_dict(), "features": list(FEATURES)}, path)
    with pytest.raises(ModelError, match="The weights of model 'Test network' do not fit its network"):
        _pipeline(path)
    torch.save({"weights": network.state_dict()}, path)
    with pytest.raises(ModelError, match="do not fit its network"):
        _pipeline(path)


# ---------------------------------------------------------------------------------------------- shipped model


def test_shipped_model_runs_on_a_small_thick_slice_scan(tmp_path):
    model = registry.get_model("thick-slice-sr")
    assert model.task == "synthesis" and model.pipeline == synthesis.PIPELINE_NAME
    path = tmp_path / "thick.nrrd"
    sitk.WriteImage(_make_image((40, 36, 8), (1.1, 0.9, 5.0), DIRECTIONS["oblique"]), str(path))
    image = sitk.ReadImage(str(path))  # what the task reads (the NRRD round trip rounds the direction's last digit)
    result = tasks.synthesize_image(path, "thick-slice-sr", device="cpu", options={"difference": True})
    grid, _ = synthesis.isotropic_grid(image)
    output = result.image
    assert output.GetSize() == grid.GetSize() and output.GetOrigin() == grid.GetOrigin()
    assert output.GetDirection() == image.GetDirection() and output.GetSpacing() == (1.0, 1.0, 1.0)
    array = sitk.GetArrayFromImage(output)
    linear = _reference_linear(image, grid)
    assert np.all(np.isfinite(array)) and array.min() >= float(sitk.GetArrayViewFromImage(image).min())
    # sanity, not accuracy: the synthesized volume is still the same scene as its interpolation
    correlation = np.corrcoef(array.ravel(), linear.ravel())[0, 1]
    assert correlation > 0.8, f"output and linear interpolation correlate only {correlation:.2f}"
    assert result.uncertainty is None and result.difference is not None
    weights_file = Path(registry.verified_weight_paths(model)["network"])
    provenance = result.provenance
    assert provenance["model_id"] == "thick-slice-sr" and provenance["input"] == "thick.nrrd"
    assert provenance["weights_sha256"] == {"network": hashlib.sha256(weights_file.read_bytes()).hexdigest()}
    assert provenance["pipeline"]["thick_axis"] == "K" and provenance["pipeline"]["output_size"] == list(grid.GetSize())
    assert {"load_model", "read_input", "checks", "inference"} <= set(result.timings)


def test_normalisation_percentile_is_torch_quantile_exactly():
    """engine.encoding.quantile (two order statistics) replaces torch.quantile (a full sort) in the normalisation
    every model uses: it must give the same float, bit for bit, or shipped weights would see other inputs."""
    from MIADeepLearningLib.engine import encoding

    generator = torch.Generator().manual_seed(5)
    for count in (1, 2, 3, 1001, 99_999):
        for values in (torch.rand(count, generator=generator), torch.randn(count, generator=generator) * 100,
                       torch.randint(0, 5, (count,), generator=generator).float()):
            for q in (0.0, 0.3, 0.995, 1.0):
                assert encoding.quantile(values, q) == float(torch.quantile(values, q)), (count, q)
