"""Running the networks only over the head's box (engine/crop.py, option crop_to_head).

foreground_box on synthetic volumes (noisy air around objects, constant and full volumes, edges, a hot voxel), the
window arithmetic that decides whether a crop saves anything, the option's check, and both pipelines that crop:
outside the box they give exactly their fill (the interpolated input for synthesis, background for tissue), inside
it what they give without the crop (to float precision for networks that look at a voxel's neighbourhood only).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import DIRECTIONS, IntensityBands, physical_points, write_tissue_weights

from MIADeepLearningLib.engine import brain_tissue, crop, synthesis
from MIADeepLearningLib.engine.errors import ModelError
from MIADeepLearningLib.engine.inference import grid_windows
from MIADeepLearningLib.engine.networks import ResidualUNet3D


def _no_progress(stage: str, fraction: float, message: str) -> None:
    """Progress sink."""


def _air(shape: tuple[int, int, int], seed: int = 0, level: float = 5.0) -> np.ndarray:
    """Rician-like noise: the magnitude of complex Gaussian noise, as air in an MRI."""
    generator = np.random.default_rng(seed)
    return np.hypot(generator.normal(0, level, shape), generator.normal(0, level, shape)).astype(np.float32)


def _spans(box: tuple[slice, ...]) -> list[tuple[int, int]]:
    return [(s.start, s.stop) for s in box]


# ------------------------------------------------------------------------------------------------ foreground_box


def test_box_around_an_object_in_noisy_air():
    volume = _air((96, 100, 104))
    volume[30:50, 20:61, 40:70] += 400.0
    box = crop.foreground_box(volume, margin=6, multiple=1)
    assert box is not None
    for (start, stop), (low, high) in zip(_spans(box), [(30, 50), (20, 61), (40, 70)]):
        # the object's blocks (4 voxels) plus the margin: never less, at most a block more on each side
        assert low - 6 - 3 <= start <= low - 6 and high + 6 <= stop <= high + 6 + 3, (start, stop, low, high)
    share = crop.box_volume_share(box, volume.shape)
    assert 0.0 < share < 0.3
    assert crop.describe_box(box, volume.shape).startswith("network over ")
    assert crop.describe_box(None, volume.shape) == "network over the whole volume"


def test_two_objects_give_one_box_around_both():
    volume = _air((80, 120, 80), seed=1)
    volume[10:22, 10:24, 30:44] += 300.0
    volume[50:64, 90:104, 30:44] += 300.0
    box = crop.foreground_box(volume, margin=0, multiple=1)
    assert box is not None
    (z0, z1), (y0, y1), (x0, x1) = _spans(box)
    assert z0 <= 10 and z1 >= 64 and y0 <= 10 and y1 >= 104 and x0 <= 30 and x1 >= 44, _spans(box)


def test_nothing_to_gain_gives_none():
    assert crop.foreground_box(np.full((40, 40, 40), 7.0, np.float32), 4) is None, "a constant volume"
    assert crop.foreground_box(np.zeros((40, 40, 40), np.float32), 4) is None, "all air, no noise"
    full = _air((40, 40, 40), seed=2)
    full[2:38, 2:38, 2:38] += 500.0
    assert crop.foreground_box(full, 4) is None, "an object that fills the volume"
    with pytest.raises(ValueError, match="3D volume"):
        crop.foreground_box(np.zeros((10, 10), np.float32), 2)


@pytest.mark.parametrize("multiple", [1, 4, 8])
def test_margin_multiple_and_clipping_at_the_edges(multiple):
    shape = (90, 101, 77)
    volume = _air(shape, seed=3)
    volume[0:20, 40:60, 60:77] += 300.0  # touches the start of axis 0 and the end of axis 2
    box = crop.foreground_box(volume, margin=10, multiple=multiple)
    assert box is not None
    (z0, z1), (y0, y1), (x0, x1) = _spans(box)
    assert z0 == 0, "clipped at the start of the axis"
    assert x1 == shape[2], "clipped at the end of the axis"
    assert y0 <= 30 and y1 >= 70 and z1 >= 30 and x0 <= 50, "the margin on both sides"
    for (start, stop), size in zip(_spans(box), shape):
        assert 0 <= start < stop <= size
        assert start % multiple == 0, "starts on the network's downsampling grid"
        assert (stop - start) % multiple == 0 or stop == size, "a whole number of multiples, or up to the end"


def test_a_hot_voxel_far_away_does_not_stretch_the_box():
    volume = _air((96, 96, 96), seed=4)
    volume[40:60, 40:60, 40:60] += 300.0
    expected = crop.foreground_box(volume, 8, 4)
    hot = volume.copy()
    hot[2, 90, 5] = 1e5  # a spike 300x the object's brightness, in a far corner
    assert crop.foreground_box(hot, 8, 4) == expected
    speck = volume.copy()
    speck[2:8, 86:92, 2:8] += 300.0  # but an object of a few blocks counts, however small
    box = crop.foreground_box(speck, 8, 4)
    assert box is not None and box[0].start == 0 and box[1].stop == 96 and box[2].start == 0


def test_windowed_work_counts_the_windows_of_the_inference():
    for shape, roi, overlap in (((128, 128, 128), 96, 0.5), ((255, 256, 256), 96, 0.25), ((40, 100, 7), 32, 0.25)):
        rois = [min(roi, n) for n in shape]
        windows = grid_windows(shape, rois, overlap)
        assert crop.windowed_work(shape, roi, overlap) == len(windows) * int(np.prod(rois)), shape
    # a head box at 2 mm that still needs two 96-voxel windows per axis saves nothing; one that fits in one does
    assert not crop.worth_it((slice(0, 120), slice(4, 124), slice(8, 112)), (128, 128, 128), 96, 0.5, 8)
    assert crop.worth_it((slice(0, 96), slice(4, 100), slice(8, 104)), (128, 128, 128), 96, 0.5, 8)
    assert not crop.worth_it(None, (128, 128, 128), 96, 0.5, 8)


def test_unet_reach_is_what_the_networks_see():
    """The margin formula against gradients of a real 3-level network: nothing farther than the reach matters."""
    torch.manual_seed(0)
    network = ResidualUNet3D(in_channels=1, features=(2, 4, 4)).eval()
    torch.nn.init.normal_(network.head.weight)
    reach = crop.unet_reach(network.size_multiple)
    inputs = torch.zeros(1, 1, 48, 48, 48, requires_grad=True)
    for centre in (22, 23, 24, 25):
        inputs.grad = None
        network.head(network._head_input(inputs))[0, 0, centre, centre, centre].backward()
        seen = torch.nonzero(inputs.grad[0, 0].abs().sum(dim=(1, 2)))[:, 0] - centre
        assert int(seen.abs().max()) <= reach, (centre, seen.min(), seen.max(), reach)
    assert [crop.unet_reach(m) for m in (1, 2, 4, 8)] == [2, 8, 20, 44]


def test_the_option_is_checked():
    assert crop.crop_option({}, "m") is True
    assert crop.crop_option({"crop_to_head": False}, "m") is False
    for value in ("no", 0, None, "false"):
        with pytest.raises(ModelError, match="crop_to_head must be true or false"):
            crop.crop_option({"crop_to_head": value}, "m")


# ------------------------------------------------------------------------------------------------ synthesis


def _synthesis(weights: Path, **options) -> synthesis.ThickSliceSuperResolution:
    return synthesis.ThickSliceSuperResolution(SimpleNamespace(title="Test network"), {"network": weights},
                                               torch.device("cpu"), {"roi_size": 48, **options})


def _thick_head(direction: np.ndarray, radius: float = 22.0) -> sitk.Image:
    """A 5 mm axial scan of a head-like blob (radius 22 mm) in an 88 mm field of view of noisy air."""
    image = sitk.Image([88, 88, 17], sitk.sitkFloat32)
    image.SetSpacing((1.0, 1.0, 5.0))
    image.SetDirection([float(v) for v in direction.ravel()])
    points = physical_points(image)
    centre = points.reshape(-1, 3).mean(axis=0) + np.array([3.0, -2.0, 0.0])
    distance = np.linalg.norm(points - centre, axis=-1)
    values = 600.0 * (distance < radius) + 250.0 * np.exp(-(distance / 9.0) ** 2) + _air(distance.shape, seed=5)
    result = sitk.GetImageFromArray(values.astype(np.float32))
    result.CopyInformation(image)
    return result


@pytest.fixture(scope="module")
def synthesis_weights(tmp_path_factory) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        network = ResidualUNet3D(in_channels=3, features=(4, 8))  # reach 8 voxels: a small box in a small volume
        torch.nn.init.normal_(network.head.weight, std=2.0)  # a correction that is not zero: a visible network
    path = tmp_path_factory.mktemp("synthesis") / "random.pt"
    torch.save({"state_dict": network.state_dict(), "features": [4, 8]}, path)
    return path


def _recording_boxes(pipeline) -> list:
    boxes: list = []
    original = pipeline.head_box

    def record(inputs):
        boxes.append(original(inputs))
        return boxes[-1]

    pipeline.head_box = record
    return boxes


def test_synthesis_fills_the_interpolated_input_outside_the_box(synthesis_weights):
    image = _thick_head(DIRECTIONS["oblique"])  # thick axis k: the network's axes are the array's (z, y, x)
    options = {"uncertainty": True, "difference": True}
    cropped_pipeline = _synthesis(synthesis_weights, **options)
    boxes = _recording_boxes(cropped_pipeline)
    cropped = cropped_pipeline.predict(image, _no_progress)
    whole = _synthesis(synthesis_weights, crop_to_head=False, **options).predict(image, _no_progress)
    box = boxes[0]
    assert box is not None, "a 44 mm head in an 88 mm field of view is worth cropping to"
    provenance = cropped["provenance"]
    assert provenance["crop"].endswith("the head's box") and whole["provenance"]["crop"] == (
        "network over the whole volume")
    assert sum(r["windows"] for r in provenance["inference"]) < sum(
        r["windows"] for r in whole["provenance"]["inference"])
    for name in ("image", "difference", "uncertainty"):
        a, b = cropped[name], whole[name]
        assert (a.GetSize(), a.GetOrigin(), a.GetSpacing(), a.GetDirection()) == (
            b.GetSize(), b.GetOrigin(), b.GetSpacing(), b.GetDirection()), name
    output = sitk.GetArrayFromImage(cropped["image"])
    grid, _ = synthesis.isotropic_grid(image)
    linear = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                  sitk.sitkFloat32, True))
    outside = np.ones(output.shape, bool)
    outside[box] = False
    np.testing.assert_allclose(output[outside], np.maximum(linear[outside], float(
        sitk.GetArrayViewFromImage(image).min())), rtol=0, atol=1e-3, err_msg="outside the box: the interpolation")
    assert float(np.abs(sitk.GetArrayFromImage(cropped["uncertainty"])[outside]).max()) == 0.0, (
        "every flip gives the same fill: no spread outside the box")
    assert float(sitk.GetArrayViewFromImage(cropped["uncertainty"]).max()) > 0.0


def test_synthesis_inside_the_box_is_what_the_whole_volume_gives(synthesis_weights):
    """One window each (roi 128): no blending of other windows, so inside the head only the box's edge could
    matter, and it lies beyond the network's reach: the same output to float precision. (A box that did not start
    on the network's downsampling grid would change every voxel.)"""
    image = _thick_head(DIRECTIONS["permuted"])
    pipeline = _synthesis(synthesis_weights, roi_size=128)
    boxes = _recording_boxes(pipeline)
    cropped = sitk.GetArrayFromImage(pipeline.predict(image, _no_progress)["image"])
    whole = sitk.GetArrayFromImage(_synthesis(synthesis_weights, roi_size=128, crop_to_head=False).predict(
        image, _no_progress)["image"])
    assert boxes[0] is not None
    grid, _ = synthesis.isotropic_grid(image)
    linear = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                  sitk.sitkFloat32, True))
    head = linear > 300.0
    assert np.abs(whole[head] - linear[head]).max() > 5.0, "the network changes the head"
    difference = float(np.abs(cropped - whole)[head].max())
    assert difference < 1e-4 * float(np.ptp(whole[head])), f"inside the head the crop changes {difference:.2e}"


def test_synthesis_option_off_and_not_worth_it(synthesis_weights):
    image = _thick_head(np.eye(3))
    with pytest.raises(ModelError, match="crop_to_head"):
        _synthesis(synthesis_weights, crop_to_head="yes")
    filling = _thick_head(np.eye(3), radius=60.0)  # a head that fills the field of view: nothing to crop
    assert _synthesis(synthesis_weights).predict(filling, _no_progress)["provenance"]["crop"] == (
        "network over the whole volume")
    off = _synthesis(synthesis_weights, crop_to_head=False).predict(image, _no_progress)
    assert off["provenance"]["crop"] == "network over the whole volume"


# ------------------------------------------------------------------------------------------------ tissue


class EverywhereGrayMatter(torch.nn.Module):
    """Logits that say gray matter at every voxel, air included: shows where the network did not run."""

    size_multiple = 2

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(inputs.shape[0], 4, *inputs.shape[2:])
        logits[:, 2] = 5.0
        return logits


def _tissue_head(direction: np.ndarray, spacing=(1.3, 1.1, 2.5), size=(120, 140, 60)) -> sitk.Image:
    """Nested spheres (WM 300, GM 200, CSF 100; radius 30 mm) off-centre in a ~150 mm field of view of noisy air."""
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin((12.5, -30.25, 7.0))
    points = physical_points(image)
    radius = np.linalg.norm(points - points.reshape(-1, 3).mean(axis=0) - np.array([10.0, -8.0, 6.0]), axis=-1)
    values = np.select([radius < 14, radius < 22, radius < 30], [300.0, 200.0, 100.0], 0.0)
    result = sitk.GetImageFromArray((values + _air(radius.shape, seed=6, level=3.0)).astype(np.float32))
    result.CopyInformation(image)
    return result


@pytest.fixture(scope="module")
def tissue_weights(tmp_path_factory) -> Path:
    return write_tissue_weights(tmp_path_factory.mktemp("tissue") / "model.pt")


def _tissue(weights: Path, network: torch.nn.Module, **options) -> brain_tissue.BrainTissueSegmentation:
    pipeline = brain_tissue.BrainTissueSegmentation(SimpleNamespace(title="Test tissue network", segments=[]),
                                                    {"network": weights}, torch.device("cpu"),
                                                    {"roi_size": 16, **options})
    pipeline.network = network
    return pipeline


@pytest.mark.parametrize("orientation", ["oblique", "flipped", "permuted"])
def test_tissue_outside_the_box_is_background_and_inside_unchanged(tissue_weights, orientation):
    image = _tissue_head(DIRECTIONS[orientation])
    options = {"flip_average": True, "grid_shifts_mm": [[0, 0, 0], [1, 1, 1]], "uncertainty": True}
    everywhere = _tissue(tissue_weights, EverywhereGrayMatter(), **options)
    boxes = _recording_boxes(everywhere)
    result = everywhere.predict(image, _no_progress)
    assert all(box is not None for box in boxes) and len(boxes) == 2, boxes
    labels = sitk.GetArrayFromImage(result["label"])
    assert result["label"].GetSize() == image.GetSize() and result["label"].GetDirection() == image.GetDirection()
    points = physical_points(image)
    radius = np.linalg.norm(points - points.reshape(-1, 3).mean(axis=0) - np.array([10.0, -8.0, 6.0]), axis=-1)
    assert np.all(labels[radius < 32] == 2), "the head and its edge: the network ran there"
    assert 0.2 < np.mean(labels == 0) < 0.9, "air far from the head: background, as filled"
    assert len(result["provenance"]["crop"]) == 2, "one description per working grid (two shifts)"
    assert all(text.endswith("the head's box") for text in result["provenance"]["crop"])
    whole = _tissue(tissue_weights, EverywhereGrayMatter(), crop_to_head=False, **options).predict(image,
                                                                                                  _no_progress)
    assert np.all(sitk.GetArrayFromImage(whole["label"]) == 2)
    assert whole["provenance"]["crop"] == ["network over the whole volume"] * 2
    windows = [sum(r["windows"] for r in run["provenance"]["inference"]) for run in (result, whole)]
    assert windows[0] < windows[1], windows

    # a network that decides voxel by voxel gives the same labels with and without the crop, but for ties: the
    # windows are blended in another order (and stitched in fp16), which can flip a voxel at a class boundary
    banded = _tissue(tissue_weights, IntensityBands(), **options).predict(image, _no_progress)
    banded_whole = _tissue(tissue_weights, IntensityBands(), crop_to_head=False, **options).predict(
        image, _no_progress)
    agreement = np.mean(sitk.GetArrayFromImage(banded["label"]) == sitk.GetArrayFromImage(banded_whole["label"]))
    assert agreement > 0.9999, f"labels agree on {agreement:.6f} of the voxels"
    spread = np.abs(sitk.GetArrayFromImage(banded["uncertainty"]) - sitk.GetArrayFromImage(
        banded_whole["uncertainty"]))
    assert spread.mean() < 1e-4, f"uncertainty differs by {spread.mean():.2e} on average"


def test_tissue_option_is_checked_and_a_real_unet_still_runs(tissue_weights):
    with pytest.raises(ModelError, match="crop_to_head must be true or false"):
        brain_tissue.BrainTissueSegmentation(SimpleNamespace(title="t", segments=[]), {"network": tissue_weights},
                                             torch.device("cpu"), {"crop_to_head": 1})
    pipeline = brain_tissue.BrainTissueSegmentation(SimpleNamespace(title="t", segments=[]),
                                                    {"network": tissue_weights}, torch.device("cpu"),
                                                    {"roi_size": 16})
    image = _tissue_head(DIRECTIONS["oblique"])
    result = pipeline.predict(image, _no_progress)  # the UNet3D's size multiple (2 levels: 2) and InstanceNorm
    assert result["label"].GetSize() == image.GetSize()
    assert result["provenance"]["crop"][0].endswith("the head's box")
