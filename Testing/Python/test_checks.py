"""Input checks before a run (engine.checks): every hard error and every warning triggered by a synthetic image,
no warning for normal inputs (a head-sized MR phantom, the ROBEX head), and the wiring into tasks.segment_image
(warnings in the output, the provenance and the progress log; hard errors stop the run before inference)."""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import rotation

from MIADeepLearningLib.engine import checks, imageio, registry, tasks
from MIADeepLearningLib.engine.errors import InputError


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message[:-1]


def _metadata(modality: str = "MR", channels: int = 1, channel_def: dict | None = None, **expected) -> dict:
    """Bundle metadata with only what the checks read."""
    image = {"modality": modality, "num_channels": channels, "channel_def": channel_def or {"0": "image"}}
    metadata = {"network_data_format": {"inputs": {"image": image}}, "slicer": {}}
    if expected:
        metadata["slicer"]["expected_input"] = expected
    return metadata


def _volume(voxels: np.ndarray, spacing=(1.0, 1.0, 1.0), direction: np.ndarray | None = None) -> sitk.Image:
    image = sitk.GetImageFromArray(voxels.astype(np.float32))
    image.SetSpacing(tuple(float(s) for s in spacing))
    if direction is not None:
        image.SetDirection(direction.flatten().tolist())
    return image


def _ellipsoid(shape_zyx, inside: float, outside: float, seed: int = 0, noise: float = 10.0) -> np.ndarray:
    """A centred ellipsoid filling ~half of the field, with noise inside."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    mask = i**2 + j**2 + k**2 < 0.8
    voxels = np.where(mask, inside, outside) + np.where(mask, np.random.default_rng(seed).normal(0, noise, mask.shape),
                                                         0.0)
    return voxels.astype(np.float32)


def mr_head(spacing=(1.5, 1.5, 1.5), size_mm=(170.0, 210.0, 200.0)) -> sitk.Image:
    """A head-sized MR-like volume (non-negative intensities)."""
    shape = tuple(round(extent / s) for extent, s in zip(size_mm[::-1], spacing[::-1]))
    return _volume(_ellipsoid(shape, 400.0, 5.0), spacing)


def ct_head(spacing=(1.5, 1.5, 1.5), size_mm=(170.0, 210.0, 200.0)) -> sitk.Image:
    """The same head as CT in Hounsfield units: soft tissue ~40 HU, air -1000 HU around it."""
    shape = tuple(round(extent / s) for extent, s in zip(size_mm[::-1], spacing[::-1]))
    return _volume(_ellipsoid(shape, 40.0, -1000.0), spacing)


DEEPBET = registry.get_model("deepbet").metadata


# ------------------------------------------------------------------------------------------------ metadata


def test_expected_input_from_deepbet_metadata():
    expected = checks.ExpectedInput.from_metadata(DEEPBET)
    assert expected.modality == "MR" and expected.num_channels == 1 and expected.channel_names == ("T1-weighted",)
    assert expected.spacing_mm == (0.5, 2.5) and expected.field_of_view_mm == (100.0, 400.0)
    assert expected.max_anisotropy == 3.0 and expected.intensity_range is None


def test_expected_input_defaults_without_a_slicer_section():
    expected = checks.ExpectedInput.from_metadata({"network_data_format": {"inputs": {"image": {
        "modality": "CT", "num_channels": 1}}}})
    assert expected.modality == "CT" and expected.spacing_mm is None and expected.field_of_view_mm is None
    assert expected.max_anisotropy == checks.DEFAULT_MAX_ANISOTROPY
    assert checks.ExpectedInput.from_metadata({}) == checks.ExpectedInput()


@pytest.mark.parametrize("text,modality", [("CT", "CT"), ("ct", "CT"), ("MRI", "MR"), ("MR T1", "MR"), ("mr", "MR"),
                                           ("", ""), ("PET", ""), (None, "")])
def test_modality_spellings(text, modality):
    assert checks.normalized_modality(text) == modality


# --------------------------------------------------------------------------------------------- hard errors


def _textured(shape_zyx, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(300, 50, shape_zyx).astype(np.float32)


HARD_ERRORS = {
    "2d": (lambda: _volume(_textured((1, 30, 30)))[:, :, 0], _metadata(), ["is 2D", "3D volume"]),
    "4d": (lambda: sitk.GetImageFromArray(_textured((3, 8, 8, 8)), isVector=False), _metadata(),
           ["is 4D", "3D volume"]),
    "single_slice": (lambda: _volume(_textured((1, 30, 40))), _metadata(), ["single slice", "40×30×1"]),
    "colour_for_one_channel": (lambda: sitk.GetImageFromArray(_textured((8, 8, 8, 3)), isVector=True), _metadata(),
                               ["3 components", "single scalar volume"]),
    "scalar_for_two_channels": (lambda: _volume(_textured((8, 8, 8))),
                                _metadata(channels=2, channel_def={"0": "T1", "1": "FLAIR"}),
                                ["1 component(s)", "needs 2 channels (T1, FLAIR)"]),
    "non_finite": (lambda: _volume(np.where(np.arange(512).reshape(8, 8, 8) % 100 == 0, np.nan,
                                            _textured((8, 8, 8)))), _metadata(),
                   ["6 voxels that are NaN or infinite"]),
    "infinite": (lambda: _volume(np.where(np.arange(512).reshape(8, 8, 8) == 7, np.inf, _textured((8, 8, 8)))),
                 _metadata(), ["1 voxels that are NaN or infinite"]),
    "constant": (lambda: _volume(np.full((8, 8, 8), 12.5)), _metadata(), ["constant", "every voxel is 12.5"]),
    "constant_channel": (lambda: sitk.GetImageFromArray(
        np.stack([_textured((8, 8, 8)), np.zeros((8, 8, 8), np.float32)], axis=-1), isVector=True),
        _metadata(channels=2), ["(channel 1) is constant"]),
}


@pytest.mark.parametrize("case", HARD_ERRORS)
def test_hard_errors_stop_the_run_in_one_sentence(case):
    make, metadata, phrases = HARD_ERRORS[case]
    with pytest.raises(InputError) as caught:
        checks.check_input(make(), metadata)
    message = str(caught.value)
    assert message.startswith("The input volume")
    for phrase in phrases:
        assert phrase in message, message
    assert _one_sentence(message), message


def test_two_channel_model_accepts_a_two_component_volume():
    image = sitk.GetImageFromArray(np.stack([_textured((8, 9, 10)), _textured((8, 9, 10), 1)], axis=-1),
                                   isVector=True)
    metadata = _metadata(channels=2)
    voxels = checks.check_structure(image, checks.ExpectedInput.from_metadata(metadata))
    assert voxels.shape == (8, 9, 10, 2) and voxels.dtype == np.float32
    assert checks.check_input(image, metadata) == []


# ------------------------------------------------------------------------------------------- soft warnings


def _only(warnings: list[str], *phrases: str) -> str:
    assert len(warnings) == 1, warnings
    [warning] = warnings
    for phrase in phrases:
        assert phrase in warning, warning
    assert _one_sentence(warning), warning
    return warning


def test_ct_for_an_mr_model():
    _only(checks.check_input(ct_head(), DEEPBET), "look like CT in Hounsfield units", "expects MR")


def test_mr_for_a_ct_model():
    _only(checks.check_input(mr_head(), _metadata("CT")), "do not look like CT in Hounsfield units", "expects CT")


def test_ct_without_rescale_for_a_ct_model():
    """Stored values (HU + 1024, air at 24) instead of Hounsfield units: not HU either."""
    unsigned = sitk.Cast(ct_head() + 1024.0, sitk.sitkUInt16)
    _only(checks.check_input(unsigned, _metadata("CT")), "do not look like CT in Hounsfield units")


def test_ct_for_a_ct_model_and_mr_for_an_mr_model_are_fine():
    assert checks.check_input(ct_head(), _metadata("CT")) == []
    assert checks.check_input(mr_head(), _metadata("MR")) == []
    assert checks.check_input(ct_head(), _metadata("")) == []  # no modality: no modality check


@pytest.mark.parametrize("spacing,shown", [((0.3, 0.3, 0.3), "0.3 × 0.3 × 0.3 mm"),
                                           ((3.0, 3.0, 3.0), "3 × 3 × 3 mm")])
def test_spacing_far_from_the_model(spacing, shown):
    image = _volume(_ellipsoid((20, 20, 20), 400.0, 5.0), spacing)
    warning = _only(checks.check_input(image, _metadata(spacing_mm=[0.5, 2.5])), "voxel spacing", shown,
                    "0.5 to 2.5 mm")
    assert "less accurate" in warning


@pytest.mark.parametrize("size_mm,shown", [((60.0, 60.0, 60.0), "60 × 60 × 60 mm"),
                                           ((600.0, 450.0, 450.0), "600 × 450 × 450 mm")])
def test_field_of_view_far_from_the_model(size_mm, shown):
    spacing = [extent / 30 for extent in size_mm]  # 30 voxels per axis; spacing unchecked here
    image = _volume(_ellipsoid((30, 30, 30), 400.0, 5.0), spacing)
    _only(checks.check_input(image, _metadata(field_of_view_mm=[100, 400])), "field of view", shown, "100 to 400 mm")


def test_thick_slices():
    image = _volume(_ellipsoid((20, 60, 60), 400.0, 5.0), (0.7, 0.7, 5.0))
    _only(checks.check_input(image, _metadata()), "very anisotropic", "0.7 × 0.7 × 5 mm", "ratio 7.1")
    assert checks.check_input(image, _metadata(max_anisotropy=8.0)) == []
    moderately = _volume(_ellipsoid((20, 60, 60), 400.0, 5.0), (1.0, 1.0, 3.5))
    assert checks.check_input(moderately, _metadata()) == []  # ratio 3.5 < the default 4


def test_intensities_outside_the_models_window():
    window = _metadata("CT", intensity_range=[-57, 164])
    bone_and_air = _volume(np.where(_ellipsoid((30, 30, 30), 1.0, 0.0, noise=0.0) > 0, 1200.0, -1000.0))
    _only(checks.check_input(bone_and_air, window), "0.0 % of the voxels", "-57 to 164")
    assert checks.check_input(ct_head(), window) == []


def test_oblique_head_sized_mr_gives_no_warning_for_deepbet():
    image = mr_head(spacing=(1.1, 0.9, 2.2))
    image.SetDirection((rotation(2, 20.0) @ rotation(0, 15.0)).flatten().tolist())
    assert checks.check_input(image, DEEPBET) == []


def test_several_warnings_at_once():
    image = _volume(_ellipsoid((10, 40, 40), 40.0, -1000.0), (0.5, 0.5, 4.0))
    found = checks.check_input(image, DEEPBET)
    assert len(found) == 4, found
    assert "look like CT" in found[0] and "voxel spacing" in found[1] and "field of view" in found[2]
    assert "anisotropic" in found[3] and all(_one_sentence(warning) for warning in found)


def test_robex_head_gives_no_warning_for_deepbet(robex):
    head, _ = robex
    image = imageio.read_image(head)
    assert image.GetSpacing() == (1.5, 1.5, 1.5)
    assert checks.check_input(image, DEEPBET) == []


# ---------------------------------------------------------------------------------- wiring into segment_image


class _RecordingPipeline:
    """Stands in for deepbet: thresholds the input, records whether it was asked to predict."""

    predicted: ClassVar[list] = []

    def __init__(self, model, weight_paths, device, options):
        pass

    def to(self, device):
        return self

    def predict(self, image, progress):
        _RecordingPipeline.predicted.append(image.GetSize())
        return {"label": sitk.Cast(image > 0, sitk.sitkUInt8)}


@pytest.fixture
def fake_deepbet(monkeypatch):
    _RecordingPipeline.predicted = []
    monkeypatch.setitem(tasks.PIPELINES, registry.get_model("deepbet").pipeline, _RecordingPipeline)
    return _RecordingPipeline


def test_warnings_reach_the_output_the_provenance_and_the_log(fake_deepbet, tmp_path):
    path = imageio.write_image(ct_head(), tmp_path / "ct.nrrd")
    seen = []
    output = tasks.segment_image(path, "deepbet", device="cpu",
                                 progress=lambda stage, fraction, message: seen.append((stage, message)))
    assert len(fake_deepbet.predicted) == 1  # a warning does not stop the run
    [warning] = output.warnings
    assert "look like CT" in warning
    assert output.provenance["warnings"] == [warning]
    assert ("checks", f"Warning: {warning}") in seen
    stages = [stage for stage, _ in seen]
    assert stages.index("read_input") < stages.index("checks")
    assert "checks" in output.timings


def test_normal_input_runs_without_warnings(fake_deepbet, tmp_path):
    path = imageio.write_image(mr_head(), tmp_path / "mr.nrrd")
    output = tasks.segment_image(path, "deepbet", device="cpu")
    assert output.warnings == [] and output.provenance["warnings"] == []


def test_hard_error_stops_before_inference(fake_deepbet, tmp_path):
    voxels = sitk.GetArrayFromImage(mr_head())
    voxels[10, 10, :4] = np.nan
    path = imageio.write_image(_volume(voxels, (1.5, 1.5, 1.5)), tmp_path / "nan.nrrd")
    with pytest.raises(InputError, match="4 voxels that are NaN or infinite"):
        tasks.segment_image(path, "deepbet", device="cpu")
    assert fake_deepbet.predicted == []


def test_deepbet_metadata_keeps_its_monai_fields():
    """expected_input is an addition: the MONAI fields and the rest of the slicer section are unchanged."""
    metadata = copy.deepcopy(DEEPBET)
    assert metadata["network_data_format"]["inputs"]["image"]["modality"] == "MR"
    assert set(metadata["slicer"]["expected_input"]) == {"modality", "spacing_mm", "field_of_view_mm",
                                                         "max_anisotropy"}
