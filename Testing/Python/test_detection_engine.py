"""Lesion detection in the engine (engine/candidates.py, engine/detection.py, tasks.detect_lesions): properties that
hold for any weights, since the shipped package's weights are replaced as training goes on and no test may depend on
what the network finds: connected components as SimpleITK finds them, candidates ranked, sized, filtered and placed
in RAS exactly as SimpleITK's index -> physical map says on oblique, anisotropic and mirrored grids, the case score;
the pipeline's maps exactly on the input grid, extra contrasts resampled onto it or refused when they do not overlap,
non-brain volumes and bad options refused in one sentence, the same answer twice; and the task's input checks,
input type check, memory check and provenance."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import DIRECTIONS, physical_points, rotation, write_tissue_package

from MIADeepLearningLib.engine import candidates, detection, imageio, registry, tasks
from MIADeepLearningLib.engine.classification import CLASSES, Classification
from MIADeepLearningLib.engine.detection import LesionDetection
from MIADeepLearningLib.engine.errors import InputError, ModelError
from MIADeepLearningLib.paths import models_dir
from MIADeepLearningLib.testing import sample_data

MODEL_ID = "brain-lesion"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# Grids a candidate's centre must survive: (direction, spacing); det < 0 for the mirrored ones
GRIDS = {
    "oblique_anisotropic": (DIRECTIONS["oblique"], (1.3, 0.8, 2.6)),
    "flipped": (DIRECTIONS["flipped"], (1.0, 1.7, 1.2)),
    "mirrored_permuted": (np.diag([-1.0, 1.0, 1.0]) @ DIRECTIONS["permuted"], (2.2, 1.4, 0.9)),
    "mirrored_oblique": (np.diag([1.0, -1.0, 1.0]) @ rotation(2, 25.0) @ rotation(0, -12.0), (0.9, 2.1, 1.6)),
}


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message[:-1]


def _image(voxels: np.ndarray, direction=None, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(voxels))
    image.SetSpacing([float(value) for value in spacing])
    image.SetOrigin([float(value) for value in origin])
    if direction is not None:
        image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    return image


def _head(direction=None, spacing=(3.6, 3.1, 4.0), shape=(36, 44, 40), origin=(-70.0, 85.0, -60.0)) -> sitk.Image:
    """A phantom head of adult size (about 140 mm across, 0.7 L of "brain") on coarse voxels, so a run is quick."""
    return _image(sample_data.phantom_head(shape), direction, spacing, origin)


def _ras(image: sitk.Image, index_ijk) -> np.ndarray:
    """SimpleITK's own map from a continuous (i, j, k) index to RAS millimetres."""
    return LPS_TO_RAS @ np.asarray(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index_ijk]))


def _assert_on_grid(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    assert image.GetSpacing() == reference.GetSpacing()
    assert image.GetOrigin() == reference.GetOrigin()
    assert image.GetDirection() == reference.GetDirection()


@pytest.fixture(scope="module")
def model() -> registry.ModelInfo:
    return registry.get_model(MODEL_ID)


@pytest.fixture(scope="module")
def pipeline(model) -> LesionDetection:
    """The shipped package (whatever its weights) on the CPU, without the mirrored copy: half the time a run."""
    return LesionDetection(model, registry.verified_weight_paths(model), torch.device("cpu"),
                           {**model.slicer.get("options", {}), "flip_average": False})


def _no_progress(stage: str, fraction: float, message: str) -> None:
    pass


# ------------------------------------------------------------------------------------------ connected components


@pytest.mark.parametrize("shape, density, seed", [((17, 23, 19), 0.05, 0), ((17, 23, 19), 0.3, 1),
                                                  ((20, 16, 18), 0.55, 2), ((1, 30, 30), 0.4, 3),
                                                  ((12, 1, 9), 0.5, 4), ((9, 11, 1), 0.35, 5)])
def test_connected_components_agree_with_simpleitk(shape, density, seed):
    mask = np.random.default_rng(seed).random(shape) < density
    labels, count = candidates.connected_components(mask)
    reference = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)),
                                                               False))  # fully connected: no (6-connected, as ours)
    assert labels.dtype == np.int32 and labels.shape == mask.shape
    assert count == int(reference.max()) > 0
    np.testing.assert_array_equal(labels > 0, mask)
    pairs = np.unique(np.stack([labels[mask], reference[mask]], axis=1), axis=0)
    assert len(pairs) == count  # one SimpleITK component for each of ours and back: the same partition
    assert sorted(np.unique(labels[mask])) == list(range(1, count + 1))
    _, first_voxel = np.unique(labels.ravel(), return_index=True)
    assert np.all(np.diff(first_voxel[1:]) > 0)  # numbered in order of their first voxel


def test_connected_components_edge_cases():
    empty, count = candidates.connected_components(np.zeros((4, 5, 6), bool))
    assert count == 0 and not empty.any()
    full, count = candidates.connected_components(np.ones((4, 5, 6), bool))
    assert count == 1 and (full == 1).all()
    touching = np.zeros((3, 3, 3), bool)
    touching[0, 0, 0] = touching[1, 1, 1] = True  # corners only: two components under 6-connectivity
    assert candidates.connected_components(touching)[1] == 2
    with pytest.raises(ValueError, match="3D mask"):
        candidates.connected_components(np.ones((4, 4), bool))


# ------------------------------------------------------------------------------------------------ candidates


def _scene():
    """(anomaly, brain, expected voxels per blob) on a (20, 24, 22) grid: blobs with known sizes and scores."""
    anomaly = np.zeros((20, 24, 22), np.float32)
    brain = np.full(anomaly.shape, 2, np.uint8)  # gray matter everywhere ...
    brain[:, :, 14:] = 3  # ... white matter on the right
    brain[:2] = 0  # two slices outside the brain
    anomaly[3:6, 3:6, 3:6] = 0.7  # A: 27 voxels, max 0.7
    anomaly[10:12, 3:5, 3:5] = 0.6  # B: 8 voxels, max 0.95
    anomaly[10, 3, 3] = 0.95
    anomaly[15, 20, 8] = 0.99  # C: one voxel (7.5 mm³ on the grid below)
    anomaly[3:7, 10:13, 15:18] = 0.7  # D: 36 voxels, max 0.7 like A but larger: ranked before A; white matter
    anomaly[0:4, 18:21, 3:6] = 0.8  # E: 4 x 3 x 3, half of it in the slices outside the brain: 18 voxels count
    anomaly[8, 8, 8] = 0.5  # exactly the threshold: not above it
    return anomaly, brain


def test_candidates_are_ranked_sized_and_filtered():
    anomaly, brain = _scene()
    spacing = (2.5, 2.0, 1.5)  # (i, j, k) mm: 7.5 mm³ voxels
    image = _image(anomaly, spacing=spacing)
    labels, found = candidates.find_candidates(anomaly, brain, detection.kji_to_ras(image),
                                               detection.voxel_volume_mm3(image), 0.5, 10.0)
    assert labels.dtype == np.uint16 and labels.shape == anomaly.shape
    assert [item["label"] for item in found] == [1, 2, 3, 4]
    assert [item["voxels"] for item in found] == [8, 18, 36, 27]  # B 0.95, E 0.8, D 0.7 (36), A 0.7 (27); no C
    assert [item["max_score"] for item in found] == [0.95, 0.8, 0.7, 0.7]
    assert found[0]["mean_score"] == pytest.approx((7 * 0.6 + 0.95) / 8, abs=1e-4)
    assert [item["volume_ml"] for item in found] == [pytest.approx(n * 7.5 / 1000.0) for n in (8, 18, 36, 27)]
    assert [item["tissue"] for item in found] == ["gray matter", "gray matter", "white matter", "gray matter"]
    assert all(set(item) == set(candidates.CANDIDATE_FIELDS) for item in found)
    for item in found:
        assert int((labels == item["label"]).sum()) == item["voxels"]
    expected = (anomaly > 0.5) & (brain > 0)  # above the threshold (not at it), in the brain ...
    expected[15, 20, 8] = False  # ... and not in the candidate below the minimum volume
    np.testing.assert_array_equal(labels > 0, expected)
    json.dumps(found)  # plain Python numbers, ready for JSON

    _, everything = candidates.find_candidates(anomaly, None, np.eye(4), 7.5, 0.5, 0.0)
    assert [item["voxels"] for item in everything] == [1, 8, 36, 36, 27]  # C kept; E whole without a brain map
    assert all(item["tissue"] == "" for item in everything)
    _, strict = candidates.find_candidates(anomaly, brain, np.eye(4), 7.5, 0.75, 0.0)
    assert [(item["max_score"], item["voxels"]) for item in strict] == [(0.99, 1), (0.95, 1), (0.8, 18)]
    assert strict[1]["volume_ml"] == pytest.approx(0.0075)


def test_min_volume_drops_small_candidates():
    anomaly, brain = _scene()
    _, found = candidates.find_candidates(anomaly, brain, np.eye(4), 7.5, 0.5, 8 * 7.5 + 1)
    assert [item["voxels"] for item in found] == [18, 36, 27]  # B (8 voxels) is 1 mm³ short
    assert [item["label"] for item in found] == [1, 2, 3]  # renumbered without gaps


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5, -0.2])
def test_candidates_refuse_a_threshold_outside_0_1(threshold):
    with pytest.raises(ValueError, match="between 0 and 1"):
        candidates.find_candidates(np.zeros((3, 3, 3)), None, np.eye(4), 1.0, threshold)


def test_candidates_refuse_a_brain_map_on_another_grid():
    with pytest.raises(ValueError, match="not on the anomaly map's grid"):
        candidates.find_candidates(np.zeros((3, 3, 3)), np.ones((3, 3, 4)), np.eye(4), 1.0)


@pytest.mark.parametrize("grid", list(GRIDS))
def test_candidate_centres_are_where_simpleitk_puts_them(grid):
    direction, spacing = GRIDS[grid]
    anomaly = np.zeros((14, 17, 15), np.float32)
    anomaly[3:9, 4, 5] = 0.9  # an L-shaped candidate: its centroid is no voxel centre
    anomaly[8, 4:12, 5] = 0.9
    anomaly[8, 11, 5:10] = 0.9
    anomaly[11:13, 14:16, 11:14] = 0.8  # a second one
    image = _image(anomaly, direction, spacing, origin=(31.5, -12.25, 7.0))
    labels, found = candidates.find_candidates(anomaly, None, detection.kji_to_ras(image),
                                               detection.voxel_volume_mm3(image), 0.5, 0.0)
    assert len(found) == 2
    for item in found:
        k, j, i = np.nonzero(labels == item["label"])
        expected = _ras(image, (i.mean(), j.mean(), k.mean()))
        np.testing.assert_allclose(item["center_ras"], expected, rtol=0, atol=0.006)  # rounded to 0.01 mm
    assert detection.voxel_volume_mm3(image) == pytest.approx(np.prod(spacing))


@pytest.mark.parametrize("grid", list(GRIDS))
def test_kji_to_ras_is_simpleitks_index_map(grid):
    direction, spacing = GRIDS[grid]
    image = _image(np.zeros((5, 6, 7), np.float32), direction, spacing, origin=(-3.5, 40.0, 12.0))
    matrix = detection.kji_to_ras(image)
    for kji in np.random.default_rng(0).uniform(-2, 9, (10, 3)):
        np.testing.assert_allclose((matrix @ np.append(kji, 1.0))[:3], _ras(image, kji[::-1]), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(matrix[3], [0, 0, 0, 1])


def test_case_score_is_the_mean_of_the_most_anomalous_millilitre():
    brain = np.ones((20, 20, 20), np.uint8)
    assert candidates.case_score(np.full(brain.shape, 0.3), brain, 1.0) == pytest.approx(0.3)
    anomaly = np.zeros(brain.shape, np.float32)
    anomaly[0, 0, 0] = 1.0  # one voxel of 1 mm³ among 1000 counted (1 mL): one noisy voxel does not make a case
    assert candidates.case_score(anomaly, brain, 1.0) == pytest.approx(0.001)
    anomaly[2:12, 2:12, 2:12] = 0.9  # a 1 mL lesion: the case scores as the lesion (and the noisy voxel)
    assert candidates.case_score(anomaly, brain, 1.0) == pytest.approx((999 * 0.9 + 1.0) / 1000, abs=1e-6)
    assert candidates.case_score(anomaly, brain, 8.0) == pytest.approx((124 * 0.9 + 1.0) / 125, abs=1e-6)
    anomaly[0, 0, 0] = 0.0
    outside = brain.copy()
    outside[2:12, 2:12, 2:12] = 0  # the same lesion outside the brain does not count
    assert candidates.case_score(anomaly, outside, 1.0) == pytest.approx(0.0, abs=1e-6)
    assert candidates.case_score(anomaly, np.zeros_like(brain), 1.0) == 0.0
    assert candidates.case_score(anomaly, None, 1.0) == pytest.approx(0.9, abs=1e-6)
    assert candidates.case_score(np.full((2, 2, 2), 0.4), None, 1.0) == pytest.approx(0.4)  # smaller than 1 mL


def test_candidate_segments_and_markup_labels():
    found = [{"label": k, "volume_ml": 12.44, "max_score": 0.931} for k in range(1, 9)]
    segments = detection.candidate_segments(found)
    assert [segment["value"] for segment in segments] == list(range(1, 9))
    assert [segment["name"] for segment in segments][:2] == ["Candidate 1", "Candidate 2"]
    assert segments[6]["color"] == segments[0]["color"] and segments[0]["color"] != segments[1]["color"]
    assert all(segment["terminology"] == detection.LESION_TERMINOLOGY for segment in segments)
    assert "SCT^52988006^Lesion" in detection.LESION_TERMINOLOGY
    assert candidates.candidate_label(found[0]) == "C1 · 12.4 mL · 0.93"


# -------------------------------------------------------------------------- the pipeline with known probabilities


def _fake_probabilities(lesion_for: set[int], lesion_centre_lps=(0.0, 30.0, 0.0), brain_radius=60.0,
                        lesion_radius=9.0, score=0.9):
    """probabilities_on_input's stand-in: background outside a ball of `brain_radius` mm around the head centre,
    white matter inside, and a ball of lesion (probability `score`) for the inputs (by call number) in
    `lesion_for`; as the real one, on the grid of the volume it is given."""
    calls = []

    def probabilities(volume, progress, low=0.15, high=0.85, flip_average=False):
        calls.append(volume)
        points = physical_points(volume)
        centre = np.asarray(volume.TransformContinuousIndexToPhysicalPoint(
            [(n - 1) / 2.0 for n in volume.GetSize()]))
        inside = np.linalg.norm(points - centre, axis=-1) < brain_radius
        result = np.zeros((5, *inside.shape), np.float32)
        result[0] = ~inside
        result[3] = inside
        if len(calls) - 1 in lesion_for:
            lesion = inside & (np.linalg.norm(points - centre - np.asarray(lesion_centre_lps), axis=-1)
                               < lesion_radius)
            result[4][lesion] = score
            result[3][lesion] = 1.0 - score
        progress("inference", high, "fake")
        return result, {"fake": True}

    return probabilities, calls


def test_predict_puts_candidates_where_the_lesion_is(pipeline, monkeypatch):
    direction = np.diag([-1.0, 1.0, 1.0]) @ DIRECTIONS["oblique"]  # mirrored and oblique
    image = _head(direction, spacing=(3.3, 2.7, 3.9))
    fake, calls = _fake_probabilities({0})
    monkeypatch.setattr(pipeline, "probabilities_on_input", fake)
    seen = []
    result = pipeline.predict(image, lambda stage, fraction, message: seen.append(fraction))
    assert seen == sorted(seen)
    for key in ("anomaly", "label", "brain"):
        _assert_on_grid(result[key], image)
    anomaly = sitk.GetArrayFromImage(result["anomaly"])
    labels = sitk.GetArrayFromImage(result["label"])
    brain = sitk.GetArrayFromImage(result["brain"])
    assert result["anomaly"].GetPixelID() == sitk.sitkFloat32 and result["label"].GetPixelID() == sitk.sitkUInt16
    assert result["brain"].GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(brain)) == {0, 3}
    np.testing.assert_allclose(np.unique(anomaly), [0.0, 0.9], atol=1e-6)
    [candidate] = result["candidates"]
    np.testing.assert_array_equal(labels == 1, anomaly > 0.5)
    k, j, i = np.nonzero(labels == 1)
    np.testing.assert_allclose(candidate["center_ras"], _ras(image, (i.mean(), j.mean(), k.mean())), atol=0.006)
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()]))
    np.testing.assert_allclose(candidate["center_ras"], LPS_TO_RAS @ (centre + np.array([0.0, 30.0, 0.0])),
                               atol=2.0)
    assert candidate["tissue"] == "white matter" and candidate["max_score"] == pytest.approx(0.9)
    assert candidate["volume_ml"] == pytest.approx(4 / 3 * np.pi * 9.0**3 / 1000, rel=0.25)
    assert result["case_score"] == pytest.approx(0.9, abs=1e-4) and result["threshold"] == 0.5
    assert result["segments"] == detection.candidate_segments(result["candidates"])
    assert result["provenance"]["candidates"] == 1 and result["provenance"]["inputs"] == 1
    assert result["provenance"]["fake"] is True and len(calls) == 1


@pytest.mark.parametrize("combine, threshold, expected_max", [("mean", 0.5, None), ("mean", 0.4, 0.45),
                                                              ("max", 0.5, 0.9)])
def test_extra_inputs_combine_by_mean_or_max(model, monkeypatch, combine, threshold, expected_max):
    detector = LesionDetection(model, registry.verified_weight_paths(model), torch.device("cpu"),
                               {**model.slicer["options"], "combine": combine, "threshold": threshold})
    fake, calls = _fake_probabilities({1})  # only the second contrast shows the lesion
    monkeypatch.setattr(detector, "probabilities_on_input", fake)
    image = _head()
    other = _head(spacing=(3.9, 3.4, 4.3), origin=(-75.0, 80.0, -65.0))  # another grid over the same head
    result = detector.predict(image, _no_progress, extra_images=[("t2", other)])
    assert len(calls) == 2 and all(volume.GetSize() == image.GetSize() for volume in calls)  # resampled first
    assert [item["max_score"] for item in result["candidates"]] == ([expected_max] if expected_max else [])
    assert float(sitk.GetArrayViewFromImage(result["anomaly"]).max()) == pytest.approx(
        0.9 if combine == "max" else 0.45)
    assert result["provenance"]["inputs"] == 2 and result["provenance"]["combine"] == combine


def test_too_little_brain_is_no_brain_mri(pipeline, monkeypatch):
    fake, _ = _fake_probabilities({0}, brain_radius=35.0)  # 180 mL
    monkeypatch.setattr(pipeline, "probabilities_on_input", fake)
    with pytest.raises(InputError, match="does not look like a brain MRI") as error:
        pipeline.predict(_head(), _no_progress)
    assert _one_sentence(str(error.value))


# ------------------------------------------------------------------------------- the pipeline with the network


def test_outputs_lie_exactly_on_an_oblique_anisotropic_mirrored_grid_and_repeat(pipeline):
    direction = np.diag([1.0, -1.0, 1.0]) @ DIRECTIONS["oblique"]
    image = _head(direction)
    first = pipeline.predict(image, _no_progress)
    for key in ("anomaly", "label", "brain"):
        _assert_on_grid(first[key], image)
    anomaly = sitk.GetArrayFromImage(first["anomaly"])
    labels = sitk.GetArrayFromImage(first["label"])
    brain = sitk.GetArrayFromImage(first["brain"])
    assert anomaly.dtype == np.float32 and anomaly.min() >= 0.0 and anomaly.max() <= 1.0 + 1e-6
    assert set(np.unique(brain)) <= {0, 1, 2, 3} and (brain > 0).sum() * np.prod(image.GetSpacing()) > 250e3
    assert not labels[brain == 0].any()  # candidates lie in the brain
    assert sorted(set(np.unique(labels)) - {0}) == [item["label"] for item in first["candidates"]]
    assert first["provenance"]["brain_volume_ml"] > detection.MIN_BRAIN_ML
    assert first["provenance"]["working_grid"]["spacing_mm"] == 2.0
    second = pipeline.predict(image, _no_progress)
    for key in ("anomaly", "label", "brain"):
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(second[key]), sitk.GetArrayViewFromImage(first[key]))
    assert second["candidates"] == first["candidates"] and second["case_score"] == first["case_score"]


def _covering_grid(image: sitk.Image, spacing: float) -> sitk.Image:
    """An axis-aligned grid of `spacing` mm around the whole of `image` (whatever its direction)."""
    corners = np.array([image.TransformIndexToPhysicalPoint([int(c) for c in corner]) for corner in
                        np.ndindex(2, 2, 2) for corner in [np.asarray(corner) * (np.asarray(image.GetSize()) - 1)]])
    low, high = corners.min(axis=0) - spacing, corners.max(axis=0) + spacing
    size = [int(n) for n in np.ceil((high - low) / spacing) + 1]
    return _image(np.zeros(size[::-1], np.float32), spacing=(spacing,) * 3, origin=low)


def test_an_extra_contrast_on_another_grid_is_resampled(pipeline):
    image = _head(DIRECTIONS["flipped"])
    extra = sitk.Resample(image, _covering_grid(image, 2.5), sitk.Transform(), sitk.sitkLinear, 0.0,
                          sitk.sitkFloat32)  # identity direction, 2.5 mm voxels
    resampled = detection.resample_onto(extra, image, "t2")
    _assert_on_grid(resampled, image)
    result = pipeline.predict(image, _no_progress, extra_images=[("t2", extra)])
    for key in ("anomaly", "label", "brain"):
        _assert_on_grid(result[key], image)
    assert result["provenance"]["inputs"] == 2


def test_an_extra_contrast_that_does_not_overlap_is_refused(pipeline):
    image = _head()
    far = _head(origin=(400.0, 85.0, -60.0))
    with pytest.raises(InputError) as error:
        pipeline.predict(image, _no_progress, extra_images=[("flair.nrrd", far)])
    message = str(error.value)
    assert message.startswith("The extra input flair.nrrd covers only 0% of the first input's head")
    assert "co-registered" in message and _one_sentence(message)
    part = _head(origin=(30.0, 85.0, -60.0))  # shifted by 100 mm along i: a small part of the head left
    with pytest.raises(InputError, match=r"covers only [1-4]\d% of the first input's head"):
        pipeline.predict(image, _no_progress, extra_images=[("part", part)])


@pytest.mark.parametrize("case", ["noise", "tiny_box"])
def test_a_volume_that_is_no_brain_is_refused(pipeline, case):
    rng = np.random.default_rng(3)
    if case == "noise":  # 216 mL of noise: less than any brain, whatever the network thinks of it
        image = _image(rng.normal(100, 30, (40, 40, 40)).astype(np.float32), spacing=(1.5, 1.5, 1.5))
    else:
        voxels = np.zeros((24, 24, 24), np.float32)
        voxels[6:18, 6:18, 6:18] = 500 + rng.normal(0, 5, (12, 12, 12))
        image = _image(voxels)
    with pytest.raises(InputError) as error:
        pipeline.predict(image, _no_progress)
    assert str(error.value).startswith("This does not look like a brain MRI: the brain found covers only ")
    assert _one_sentence(str(error.value))


@pytest.mark.parametrize("options, expected", [({"threshold": 0}, "threshold must lie between 0 and 1, got 0.0"),
                                               ({"threshold": 1.5}, "threshold must lie between 0 and 1, got 1.5"),
                                               ({"combine": "median"}, "combine must be one of")])
def test_bad_options_are_refused(model, options, expected):
    with pytest.raises(ModelError, match=expected) as error:
        LesionDetection(model, registry.verified_weight_paths(model), torch.device("cpu"),
                        {**model.slicer["options"], **options})
    assert _one_sentence(str(error.value))


def test_a_network_without_a_lesion_class_is_refused(tmp_path):
    tissue = registry.load_package(write_tissue_package(tmp_path))
    with pytest.raises(ModelError, match="has no 'lesion' output"):
        LesionDetection(tissue, registry.verified_weight_paths(tissue), torch.device("cpu"),
                        dict(tissue.slicer["options"]))


# ------------------------------------------------------------------------------------- the task: detect_lesions


def test_detect_lesions_end_to_end(tmp_path, model):
    image = _head(DIRECTIONS["oblique"], spacing=(3.4, 3.0, 4.1))
    path = imageio.write_image(image, tmp_path / "flair.nrrd")
    stages = []
    output = tasks.detect_lesions([path], device="cpu", progress=lambda s, f, m: stages.append((s, f)))
    reference = sitk.ReadImage(str(path))
    for item in (output.anomaly, output.label, output.brain):
        _assert_on_grid(item, reference)
    fractions = [fraction for _, fraction in stages]
    assert fractions == sorted(fractions) and {"load_model", "read_input", "checks", "inference"} <= {
        stage for stage, _ in stages}
    assert len(output.segments) == len(output.candidates)
    assert output.threshold == 0.5 and 0.0 <= output.case_score <= 1.0
    provenance = output.provenance
    assert provenance["model_id"] == MODEL_ID and provenance["model_version"] == model.version
    assert provenance["weights_sha256"] == {weight.role: weight.sha256 for weight in model.weights}
    assert provenance["device"] == "cpu" and provenance["input"] == "flair.nrrd"
    assert provenance["inputs"] == ["flair.nrrd"]
    assert provenance["parameters"]["threshold"] == 0.5 and provenance["parameters"]["flip_average"] is True
    assert provenance["candidates"] == len(output.candidates) and provenance["case_score"] == output.case_score
    assert provenance["threshold"] == 0.5 and provenance["min_volume_mm3"] == 10.0
    assert provenance["pipeline"]["test_time_flips"] == ["none", "LR"]  # the shipped options: mirrored copy on
    assert {"load_model", "read_input", "checks", "inference"} <= set(output.timings)
    json.dumps(provenance)


class _StandIn:
    """Stands in for the detection pipeline in task-level tests: records what it was given, answers at once."""

    seen: ClassVar[list] = []

    def __init__(self, model, weight_paths, device, options):
        self.options = options

    def to(self, device):
        return self

    def predict(self, image, progress, extra_images=()):
        _StandIn.seen.append((image.GetSize(), [(name, extra.GetSize()) for name, extra in extra_images]))
        empty = sitk.Image(image.GetSize(), sitk.sitkUInt16)
        empty.CopyInformation(image)
        return {"anomaly": sitk.Cast(empty, sitk.sitkFloat32), "label": empty,
                "brain": sitk.Cast(empty, sitk.sitkUInt8),
                "candidates": [], "case_score": 0.0, "threshold": float(self.options["threshold"]), "segments": [],
                "warnings": ["stand-in warning."], "provenance": {"stand_in": True}}


@pytest.fixture
def stand_in(monkeypatch, model):
    monkeypatch.setitem(tasks.PIPELINES, model.pipeline, _StandIn)
    _StandIn.seen = []


def test_every_input_is_read_and_named(stand_in, tmp_path):
    first = imageio.write_image(_head(), tmp_path / "t1.nrrd")
    second = imageio.write_image(_head(spacing=(2.0, 2.0, 2.0)), tmp_path / "t2.nii.gz")
    output = tasks.detect_lesions([first, second], device="cpu", options={"threshold": 0.3},
                                  input_names=["T1 volume", "T2 volume"])
    assert _StandIn.seen == [((40, 44, 36), [("T2 volume", (40, 44, 36))])]
    assert output.provenance["inputs"] == ["T1 volume", "T2 volume"] and output.provenance["input"] == "T1 volume"
    assert output.threshold == 0.3 and output.provenance["parameters"]["threshold"] == 0.3
    assert output.warnings == ["stand-in warning."] and output.provenance["pipeline"] == {"stand_in": True}
    assert tasks.detect_lesions([first], device="cpu").provenance["inputs"] == ["t1.nrrd"]


def _two_d(path: Path) -> Path:
    return imageio.write_image(_image(np.random.default_rng(0).normal(300, 50, (30, 30)).astype(np.float32)), path)


def _with_nan(path: Path) -> Path:
    voxels = sample_data.phantom_head((36, 44, 40))
    voxels[5, 6, 7] = np.nan
    return imageio.write_image(_image(voxels, spacing=(3.6, 3.1, 4.0)), path)


def _constant(path: Path) -> Path:
    return imageio.write_image(_image(np.full((20, 20, 20), 7.0, np.float32)), path)


def _vector(path: Path) -> Path:
    image = sitk.Compose([_head(), _head()])
    return imageio.write_image(image, path)


BAD_INPUTS = {  # maker, sentence the first input gets ("The input volume ...")
    "two_d": (_two_d, "is 2D; the model needs a 3D volume."),
    "nan": (_with_nan, "has 1 voxels that are NaN or infinite; fix or mask them first."),
    "constant": (_constant, "is constant (every voxel is 7); there is nothing to segment."),
    "vector": (_vector, "has 2 components per voxel"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("position", ["first", "extra"])
def test_every_input_gets_the_structure_checks_of_the_other_tasks(stand_in, tmp_path, case, position):
    make, sentence = BAD_INPUTS[case]
    bad = make(tmp_path / "bad.nrrd")
    good = imageio.write_image(_head(), tmp_path / "good.nrrd")
    paths = [bad, good] if position == "first" else [good, bad]
    with pytest.raises(InputError) as error:
        tasks.detect_lesions(paths, device="cpu")
    subject = "The input volume" if position == "first" else "The extra input bad.nrrd"
    assert str(error.value).startswith(f"{subject} {sentence}")
    assert _one_sentence(str(error.value)) and _StandIn.seen == []
    if position == "first" and case != "vector":  # the same sentence as segmentation gives
        with pytest.raises(InputError) as segmentation:
            tasks.segment_image(bad, "brain-tissue", device="cpu")
        assert str(segmentation.value) == str(error.value)


def test_missing_files_and_wrong_models_are_refused(stand_in, tmp_path):
    good = imageio.write_image(_head(), tmp_path / "good.nrrd")
    with pytest.raises(InputError, match="does not exist"):
        tasks.detect_lesions([good, tmp_path / "absent.nii.gz"], device="cpu")
    with pytest.raises(InputError, match="at least one input"):
        tasks.detect_lesions([], device="cpu")
    with pytest.raises(ModelError, match="is a segmentation model, not a detection model"):
        tasks.detect_lesions([good], "brain-tissue", device="cpu")
    with pytest.raises(ModelError, match="Unknown model 'nope'"):
        tasks.detect_lesions([good], "nope", device="cpu")


def test_a_volume_that_is_no_brain_is_refused_by_the_task(tmp_path):
    box = np.zeros((24, 24, 24), np.float32)
    box[6:18, 6:18, 6:18] = 400.0 + np.random.default_rng(0).normal(0, 4, (12, 12, 12))
    path = imageio.write_image(_image(box), tmp_path / "box.nrrd")
    with pytest.raises(InputError, match="does not look like a brain MRI"):
        tasks.detect_lesions([path], device="cpu")


@pytest.mark.parametrize("threshold", [0, 1.5])
def test_the_task_refuses_bad_options(tmp_path, threshold):
    path = imageio.write_image(_head(), tmp_path / "head.nrrd")
    with pytest.raises(ModelError, match="threshold must lie between 0 and 1"):
        tasks.detect_lesions([path], device="cpu", options={"threshold": threshold})


def test_the_memory_check_covers_detection(stand_in, tmp_path, monkeypatch):
    big = sitk.Image([400, 400, 400], sitk.sitkUInt8)  # 64 M voxels: several GB for any tissue-like pipeline
    path = imageio.write_image(big, tmp_path / "big.nrrd")
    monkeypatch.setenv("MIADL_AVAILABLE_MEMORY_GB", "0.5")
    with pytest.raises(InputError, match=r"This run on a 400×400×400-voxel volume needs about .* more memory"):
        tasks.detect_lesions([path], device="cpu")
    assert _StandIn.seen == []


class _FakeClassifier:
    model = types.SimpleNamespace(id="sequence-type", version="0.1.0", title="MRI sequence type")
    options: ClassVar[dict] = {}
    seen: ClassVar[list] = []

    def classify(self, image, saliency=False, progress=None):
        _FakeClassifier.seen.append(image.GetSize())
        rest = 0.1 / (len(CLASSES) - 1)
        return Classification("ct", {name: (0.9 if name == "ct" else rest) for name in CLASSES}, False)


def test_the_input_type_check_looks_at_the_first_input(stand_in, tmp_path, monkeypatch):
    monkeypatch.setenv(tasks.TYPE_CHECK_ENV, "1")
    monkeypatch.setattr(tasks, "_type_classifier", lambda device, cache: _FakeClassifier())
    _FakeClassifier.seen = []
    first = imageio.write_image(_head(), tmp_path / "first.nrrd")
    second = imageio.write_image(_head(shape=(30, 30, 30)), tmp_path / "second.nrrd")
    output = tasks.detect_lesions([first, second], device="cpu")
    expected = ("Brain lesion detection (any MRI contrast) expects T1-weighted, T1-weighted after contrast, "
                "T2-weighted, FLAIR or proton density; this looks like CT (p = 0.90).")
    assert expected in output.warnings and expected in output.provenance["warnings"]
    assert output.provenance["input_type"] == {"label": "ct", "probability": 0.9, "model": "sequence-type",
                                               "version": "0.1.0"}
    assert _FakeClassifier.seen == [(40, 44, 36)]
    off = tasks.detect_lesions([first], device="cpu", type_check=False)
    assert "input_type" not in off.provenance and expected not in off.warnings


# ---------------------------------------------------------------------------------------------- the registry


def test_detection_is_a_model_task_everywhere(model):
    schema = json.loads((models_dir() / registry.SCHEMA_FILE_NAME).read_text(encoding="utf-8"))
    assert list(registry.MODEL_TASKS) == schema["$defs"]["task"]["enum"]
    assert [item.id for item in registry.list_models(task="detection")] == [MODEL_ID]
    assert model.task == "detection" and tasks.PIPELINES[model.pipeline] is LesionDetection
    assert registry.registry_entry(MODEL_ID)["task"] == "detection"
    with pytest.raises(ModelError, match="Unknown model task 'detections'"):
        registry.list_models(task="detections")
