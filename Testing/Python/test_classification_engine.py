"""The scan type classifier (engine/classification.py) and its place in the tasks (engine/tasks.py): properties that
hold for any weights (the shipped package's weights may be replaced at any time, so no test asserts which class a
real scan gets): probabilities over the fixed vocabulary that sum to 1, a saliency map exactly on the input's grid
whatever its orientation and voxels, label maps named `other`, the same input refusals as segmentation, weights that
do not fit named in one sentence; and the input type check of the other tasks (a warning and provenance entry on a
mismatch, silence when the classifier is missing or fails, off on request)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import DIRECTIONS, small_head, thick_blob_voxels, write_tissue_package

from MIADeepLearningLib import worker
from MIADeepLearningLib.engine import checks, classification, imageio, registry, tasks
from MIADeepLearningLib.engine.classification import CLASSES, Classification, SequenceClassifier
from MIADeepLearningLib.engine.errors import InputError, ModelError
from MIADeepLearningLib.engine.networks import SequenceClassifierNet
from MIADeepLearningLib.testing import sample_data

MODEL_ID = "sequence-type"


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message[:-1]


@pytest.fixture(scope="module")
def classifier() -> SequenceClassifier:
    """The shipped package's classifier (whatever weights it has), on the CPU."""
    model = registry.get_model(MODEL_ID)
    return SequenceClassifier(model, registry.verified_weight_paths(model), torch.device("cpu"),
                              model.slicer.get("options", {}))


def _volume(voxels: np.ndarray, spacing=(1.0, 1.0, 1.0), direction=None, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(voxels, dtype=np.float32))
    image.SetSpacing([float(value) for value in spacing])
    image.SetOrigin([float(value) for value in origin])
    if direction is not None:
        image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    return image


def _phantom(spacing=(1.2, 1.2, 1.2), direction=None) -> sitk.Image:
    return _volume(sample_data.phantom_head((40, 48, 44)), spacing, direction, origin=(-20.0, 12.5, 30.0))


def _assert_on_grid(image: sitk.Image, reference: sitk.Image, atol: float = 1e-9) -> None:
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=0, atol=atol)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=atol)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------------- the package


def test_package_is_a_classifier_with_saliency():
    model = registry.get_model(MODEL_ID)
    assert model.task == "classification" and model.pipeline == classification.PIPELINE_NAME
    assert model.optional_outputs == ["saliency"]
    assert tasks.PIPELINES[model.pipeline] is SequenceClassifier
    assert model.slicer["classes"] == list(CLASSES)


def test_shipped_packages_state_their_accepted_types():
    expected = {"deepbet": ["t1w"], "brain-tissue": ["t1w", "t1c", "t2w", "flair", "pdw"],
                "brain-registration": ["t1w", "t1c", "t2w", "flair", "pdw"],
                "thick-slice-sr": ["t1w", "t1c", "t2w", "flair", "pdw", "dwi"]}
    for model_id, accepted in expected.items():
        model = registry.get_model(model_id)
        assert model.accepted_types == accepted and set(accepted) <= set(CLASSES)
        assert model.summary()["accepted_types"] == accepted
    assert registry.get_model(MODEL_ID).accepted_types == []


def test_schema_refuses_an_unknown_accepted_type():
    metadata = {"version": "1", "slicer": {"files": [], "accepted_types": ["t1w", "T2"]}}
    with pytest.raises(ModelError, match=r"accepted_types\[1\]"):
        registry.validate(metadata, "packageMetadata", "The test metadata")
    registry.validate({"version": "1", "slicer": {"files": [], "accepted_types": list(CLASSES)}}, "packageMetadata",
                      "The test metadata")


# ------------------------------------------------------------------------------------------------ the engine


def test_probabilities_cover_the_vocabulary_and_sum_to_one(classifier):
    result = classifier.classify(_phantom())
    assert isinstance(result, Classification)
    assert tuple(result.probabilities) == CLASSES
    assert all(0.0 <= value <= 1.0 for value in result.probabilities.values())
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.label in CLASSES and result.saliency is None
    assert {"prepare_seconds", "network_seconds", "total_seconds"} <= set(result.timings)


CASES = {name: (direction, spacing) for name, direction, spacing in [
    ("identity", DIRECTIONS["identity"], (1.2, 1.2, 1.2)),
    ("flipped_anisotropic", DIRECTIONS["flipped"], (0.9, 1.1, 3.0)),
    ("permuted", DIRECTIONS["permuted"], (1.0, 1.4, 1.2)),
    ("oblique_anisotropic", DIRECTIONS["oblique"], (1.1, 0.9, 2.2)),
]}


@pytest.mark.parametrize("case", CASES)
def test_saliency_lies_exactly_on_the_input_grid(classifier, case):
    direction, spacing = CASES[case]
    image = _phantom(spacing, direction)
    result = classifier.classify(image, saliency=True)
    _assert_on_grid(result.saliency, image)
    values = sitk.GetArrayViewFromImage(result.saliency)
    assert result.saliency.GetPixelID() == sitk.sitkFloat32 and np.all(np.isfinite(values))
    assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6
    assert "saliency_seconds" in result.timings


def test_saliency_on_a_thick_slice_volume(classifier):
    """5 mm slices, 1 mm in-plane, the flipped-axes orientation a scanner's NIfTI often has."""
    image = _volume(thick_blob_voxels(12, 5.0), (1.0, 1.0, 5.0), DIRECTIONS["flipped"], (20.0, -15.5, -27.5))
    result = classifier.classify(image, saliency=True)
    _assert_on_grid(result.saliency, image)
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_saliency_on_a_real_head_on_an_oblique_grid(classifier, robex):
    head = small_head(robex[0], 3.0)
    resampled = sitk.Resample(head, _oblique_grid(head), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    result = classifier.classify(resampled, saliency=True)
    _assert_on_grid(result.saliency, resampled)
    assert float(sitk.GetArrayViewFromImage(result.saliency).max()) > 0.0


def _oblique_grid(image: sitk.Image) -> sitk.Image:
    """A grid rotated about two axes with 2.6 x 3.1 x 4.2 mm voxels, over the image's field of view."""
    direction = DIRECTIONS["oblique"]
    spacing = np.array([2.6, 3.1, 4.2])
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    size = np.ceil(np.array(image.GetSize()) * np.array(image.GetSpacing()) / spacing).astype(int)
    grid = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin((centre - direction @ (spacing * (size - 1) / 2)).tolist())
    return grid


def test_a_label_map_is_other_and_out_of_distribution(classifier):
    labels = (sample_data.phantom_head((40, 48, 44)) > 250).astype(np.uint8) * 3
    labels[15:25, 20:30, 18:26] = 7
    result = classifier.classify(sitk.GetImageFromArray(labels))
    assert result.label == "other" and result.ood is True
    assert any("label map" in reason for reason in result.reasons)
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    warning = classification.mismatch_warning(result, ["t1w"], "Brain extraction (deepbet)")
    assert warning.startswith("Brain extraction (deepbet) expects T1-weighted; this does not look like a head MR or "
                              "CT scan (it holds a few integer values only") and _one_sentence(warning)


def test_mismatch_sentences():
    flair = Classification("flair", {name: (0.96 if name == "flair" else 0.04 / 7) for name in CLASSES}, False)
    assert (classification.mismatch_warning(flair, ["t1w"], "Brain extraction (deepbet)")
            == "Brain extraction (deepbet) expects T1-weighted; this looks like FLAIR (p = 0.96).")
    assert classification.mismatch_warning(flair, ["t1w", "flair"], "M") is None
    assert classification.mismatch_warning(flair, [], "M") is None  # a package that does not say
    assert (classification.mismatch_warning(flair, ["t1w", "t2w", "pdw"], "M", subject="the moving image")
            == "M expects T1-weighted, T2-weighted or proton density; the moving image looks like FLAIR (p = 0.96).")
    unsure = Classification("ct", {name: (0.4 if name == "ct" else 0.6 / 7) for name in CLASSES}, False)
    assert classification.mismatch_warning(unsure, ["t1w"], "M") is None
    # a stricter package threshold silences a 0.96 answer; a rule (label map) is never silenced
    assert classification.mismatch_warning(flair, ["t1w"], "M", min_probability=0.97) is None
    unsure_other = Classification("other", {name: (0.4 if name == "other" else 0.6 / 7) for name in CLASSES}, True,
                                  [classification.NETWORK_OTHER_REASON])
    assert classification.mismatch_warning(unsure_other, ["t1w"], "M") is None
    label_map = Classification("other", dict(unsure_other.probabilities), True,
                               ["it holds a few integer values only, like a label map or segmentation"])
    assert "does not look like a head MR or CT scan" in classification.mismatch_warning(label_map, ["t1w"], "M",
                                                                                       min_probability=0.99)


# --------------------------------------------------------------------------------- input refusals (as segment)


def _textured(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(300, 50, shape).astype(np.float32)


def _nan_volume() -> sitk.Image:
    voxels = _textured((12, 12, 12))
    voxels[3, 4, 2:7] = np.nan
    return _volume(voxels)


BAD_VOLUMES = {  # NRRD: SimpleITK's NIfTI reader turns NaN into 0
    "2d": lambda: _volume(_textured((1, 30, 30)))[:, :, 0],
    "4d": lambda: sitk.GetImageFromArray(_textured((3, 8, 8, 8)), isVector=False),
    "vector": lambda: sitk.GetImageFromArray(_textured((8, 8, 8, 3)), isVector=True),
    "single_slice": lambda: _volume(_textured((1, 30, 40))),
    "nan": _nan_volume,
    "empty": lambda: _volume(np.zeros((10, 10, 10))),
    "constant": lambda: _volume(np.full((8, 8, 8), 12.5)),
}


def _segmentation_refusal(path: Path) -> str:
    """What segmentation's input checks say about the file (deepbet's metadata: one scalar channel)."""
    with pytest.raises(InputError) as caught:
        checks.check_input(imageio.read_image(path), registry.get_model("deepbet").metadata)
    return str(caught.value)


def test_bad_volumes_get_the_segmentation_sentences_and_the_others_go_on(tmp_path):
    good = imageio.write_image(_phantom(), tmp_path / "good.nrrd")
    paths = [good]
    for name, make in BAD_VOLUMES.items():
        paths.append(imageio.write_image(make(), tmp_path / f"{name}.nrrd"))
    paths.append(tmp_path / "absent.nrrd")
    paths.append(imageio.write_image(_phantom((1.0, 1.0, 3.0), DIRECTIONS["oblique"]), tmp_path / "good2.nrrd"))
    seen = []
    output = tasks.classify_images(paths, MODEL_ID, device="cpu",
                                   progress=lambda stage, fraction, message: seen.append((stage, fraction)))
    assert [entry["input"] for entry in output.results] == [str(path) for path in paths]
    for entry in (output.results[0], output.results[-1]):
        assert entry["error"] is None and entry["label"] in CLASSES
        assert sum(entry["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    for path, entry in zip(paths[1:-2], output.results[1:-2]):
        assert entry["label"] is None and entry["probabilities"] == {}
        assert entry["error"] == _segmentation_refusal(path), path.name
        assert _one_sentence(entry["error"])
    assert output.results[-2]["error"] == f"Input image {paths[-2]} does not exist."
    assert len(output.failed) == len(BAD_VOLUMES) + 1
    fractions = [fraction for _, fraction in seen]
    assert fractions == sorted(fractions) and 0.0 <= fractions[0] and fractions[-1] <= 1.0
    provenance = output.provenance
    assert provenance["model_id"] == MODEL_ID and provenance["device"] == "cpu"
    assert provenance["weights_sha256"] == {"network": registry.get_model(MODEL_ID).weights[0].sha256}
    assert provenance["inputs"] == [path.name for path in paths]
    assert {"torch_version", "python_version", "extension_version", "created_utc"} <= set(provenance)


def test_saliency_per_input_and_the_callback_takes_the_maps(tmp_path):
    first = imageio.write_image(_phantom(), tmp_path / "first.nrrd")
    second = imageio.write_image(_phantom((1.0, 1.0, 2.5), DIRECTIONS["permuted"]), tmp_path / "second.nii.gz")
    handed = {}
    output = tasks.classify_images([first, second], MODEL_ID, device="cpu", saliency=[False, True],
                                   on_result=lambda index, entry: handed.update({index: entry["saliency"]}))
    assert handed[0] is None and handed[1] is not None
    _assert_on_grid(handed[1], sitk.ReadImage(str(second)))
    assert all(entry["saliency"] is None for entry in output.results)  # not kept: the callback had them


def test_a_segmentation_model_is_no_classifier(tmp_path):
    with pytest.raises(ModelError, match="is a segmentation model, not a classification model"):
        tasks.classify_images([tmp_path / "x.nrrd"], "deepbet", device="cpu")


# -------------------------------------------------------------------------------------------------- weights


def _weights(path: Path, features, classes=CLASSES, claimed_features=None) -> Path:
    network = SequenceClassifierNet(in_channels=3, classes=len(classes), features=features)
    torch.save({"state_dict": network.state_dict(), "features": list(claimed_features or features),
                "classes": list(classes)}, path)
    return path


@pytest.mark.parametrize("kind", ["wrong_shape", "wrong_classes", "not_weights"])
def test_weights_that_do_not_fit_are_a_model_error_naming_the_model(tmp_path, kind):
    path = tmp_path / "model.pt"
    if kind == "wrong_shape":
        _weights(path, (8, 16, 32, 64, 80), claimed_features=(16, 32, 64, 128, 160))
    elif kind == "wrong_classes":
        _weights(path, (8, 16, 32, 64, 80), classes=("t1w", "t2w"))
    else:
        path.write_bytes(b"not a weights file at all")
    model = types.SimpleNamespace(title="Sequence test model")
    with pytest.raises(ModelError) as caught:
        SequenceClassifier(model, {"network": path}, torch.device("cpu"))
    message = str(caught.value)
    assert "'Sequence test model'" in message and _one_sentence(message), message


def test_small_valid_weights_load():
    path = Path(registry.verified_weight_paths(registry.get_model(MODEL_ID))["network"])
    network, classes = classification.load_network(path, "x")
    assert classes == list(CLASSES) and isinstance(network, SequenceClassifierNet)


# ---------------------------------------------------------------------------------------- the input type check


class _FakeClassifier:
    """Stands in for the sequence-type pipeline: answers the given labels in turn, records what it saw."""

    model = types.SimpleNamespace(id="sequence-type", version="0.1.0", title="MRI sequence type")
    options: ClassVar[dict] = {}  # the package options (warning_min_probability: the default)
    seen: ClassVar[list] = []

    def __init__(self, *answers: tuple[str, float]):
        self.answers = list(answers)

    def classify(self, image, saliency=False, progress=None):
        _FakeClassifier.seen.append((image.GetSize(), saliency))
        label, probability = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        rest = (1.0 - probability) / (len(CLASSES) - 1)
        return Classification(label, {name: (probability if name == label else rest) for name in CLASSES}, False)


class _ThresholdPipeline:
    """Stands in for a segmentation or synthesis model: thresholds (or copies) the input."""

    def __init__(self, model, weight_paths, device, options):
        pass

    def to(self, device):
        return self

    def predict(self, image, progress):
        return {"label": sitk.Cast(image > 100, sitk.sitkUInt8), "image": sitk.Cast(image, sitk.sitkFloat32)}


class _IdentityRegistration(_ThresholdPipeline):
    def register(self, fixed, moving, fixed_mask, moving_mask, progress):
        field = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, 3)
        field.CopyInformation(fixed)
        return {"field": field, "affine": None}


@pytest.fixture
def fake_models(monkeypatch):
    """Every shipped model's pipeline replaced by a fast stand-in; the type check switched on."""
    for model_id in ("deepbet", "brain-tissue", "thick-slice-sr"):
        monkeypatch.setitem(tasks.PIPELINES, registry.get_model(model_id).pipeline, _ThresholdPipeline)
    monkeypatch.setitem(tasks.PIPELINES, registry.get_model("brain-registration").pipeline, _IdentityRegistration)
    monkeypatch.setenv(tasks.TYPE_CHECK_ENV, "1")
    _FakeClassifier.seen = []


def _use_classifier(monkeypatch, *answers):
    fake = _FakeClassifier(*answers)
    monkeypatch.setattr(tasks, "_type_classifier", lambda device, cache: fake)
    return fake


def _type_warnings(output) -> list[str]:
    """The input type check's sentences among a run's warnings (they start with the model's title)."""
    title = output.provenance["model_title"]
    return [warning for warning in output.warnings if warning.startswith(f"{title} expects ")]


@pytest.fixture
def head_file(tmp_path) -> Path:
    return imageio.write_image(_phantom(), tmp_path / "head.nrrd")


def test_a_flair_given_to_deepbet_warns_and_is_recorded(fake_models, monkeypatch, head_file):
    _use_classifier(monkeypatch, ("flair", 0.96))
    seen = []
    output = tasks.segment_image(head_file, "deepbet", device="cpu",
                                 progress=lambda stage, fraction, message: seen.append((stage, message)))
    expected = "Brain extraction (deepbet) expects T1-weighted; this looks like FLAIR (p = 0.96)."
    assert expected in output.warnings and expected in output.provenance["warnings"]
    assert ("checks", f"Warning: {expected}") in seen
    assert output.provenance["input_type"] == {"label": "flair", "probability": 0.96, "model": "sequence-type",
                                               "version": "0.1.0"}
    assert _FakeClassifier.seen == [(sitk.ReadImage(str(head_file)).GetSize(), False)]  # no saliency
    assert "type_check" in output.timings


def test_brain_tissue_warns_for_diffusion_and_not_for_flair(fake_models, monkeypatch, head_file):
    _use_classifier(monkeypatch, ("dwi", 0.9))
    output = tasks.segment_image(head_file, "brain-tissue", device="cpu")
    assert ("Brain tissue (any MRI contrast) expects T1-weighted, T1-weighted after contrast, T2-weighted, FLAIR or "
            "proton density; this looks like diffusion (EPI) (p = 0.90).") in output.warnings
    assert output.provenance["input_type"]["label"] == "dwi"
    _use_classifier(monkeypatch, ("flair", 0.99))
    output = tasks.segment_image(head_file, "brain-tissue", device="cpu")
    assert _type_warnings(output) == []
    assert output.provenance["input_type"]["label"] == "flair"  # recorded when it fits too


def test_synthesis_checks_its_input_type(fake_models, monkeypatch, head_file):
    _use_classifier(monkeypatch, ("ct", 0.97))
    output = tasks.synthesize_image(head_file, "thick-slice-sr", device="cpu")
    assert any("this looks like CT (p = 0.97)" in warning for warning in output.warnings)
    assert output.provenance["input_type"]["label"] == "ct"


def test_registration_checks_both_images(fake_models, monkeypatch, tmp_path, head_file):
    moving = imageio.write_image(_phantom((1.0, 1.1, 1.3)), tmp_path / "moving.nrrd")
    _use_classifier(monkeypatch, ("t1w", 0.9), ("ct", 0.8))
    output = tasks.register_images(head_file, moving, "brain-registration", device="cpu")
    assert _type_warnings(output) == ["Brain registration (any MRI contrast) expects T1-weighted, T1-weighted after "
                                      "contrast, T2-weighted, FLAIR or proton density; the moving image looks like CT "
                                      "(p = 0.80)."]
    assert output.provenance["input_type"] == {
        "fixed": {"label": "t1w", "probability": 0.9, "model": "sequence-type", "version": "0.1.0"},
        "moving": {"label": "ct", "probability": 0.8, "model": "sequence-type", "version": "0.1.0"}}


def test_a_missing_classifier_skips_the_check_silently(fake_models, monkeypatch, head_file):
    monkeypatch.setattr(tasks, "TYPE_CHECK_MODEL", "not-installed")
    output = tasks.segment_image(head_file, "deepbet", device="cpu")
    assert _type_warnings(output) == [] and "input_type" not in output.provenance


def test_a_classifier_that_fails_skips_the_check_silently(fake_models, monkeypatch, head_file):
    class Broken(_FakeClassifier):
        def classify(self, image, saliency=False, progress=None):
            raise RuntimeError("broken classifier")

    monkeypatch.setattr(tasks, "_type_classifier", lambda device, cache: Broken(("t1w", 1.0)))
    output = tasks.segment_image(head_file, "deepbet", device="cpu")
    assert "input_type" not in output.provenance and _type_warnings(output) == []


def test_weights_that_do_not_verify_skip_the_check(fake_models, monkeypatch, head_file):
    def unverified(model):
        raise ModelError("Weight file model.pt does not match its registered sha256.")

    monkeypatch.setattr(registry, "verified_weight_paths",
                        lambda model, real=registry.verified_weight_paths: unverified(model)
                        if model.id == MODEL_ID else real(model))
    output = tasks.segment_image(head_file, "deepbet", device="cpu")
    assert "input_type" not in output.provenance


@pytest.mark.parametrize("how", ["environment", "argument"])
def test_the_check_can_be_turned_off(fake_models, monkeypatch, head_file, how):
    _use_classifier(monkeypatch, ("flair", 0.96))
    if how == "environment":
        monkeypatch.setenv(tasks.TYPE_CHECK_ENV, "0")
        output = tasks.segment_image(head_file, "deepbet", device="cpu")
    else:
        output = tasks.segment_image(head_file, "deepbet", device="cpu", type_check=False)
    assert _FakeClassifier.seen == [] and "input_type" not in output.provenance and _type_warnings(output) == []


def test_a_package_without_accepted_types_is_not_checked(monkeypatch, tmp_path, head_file):
    root = tmp_path / "models"
    write_tissue_package(root)
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(root))
    monkeypatch.setenv(tasks.TYPE_CHECK_ENV, "1")
    monkeypatch.setitem(tasks.PIPELINES, registry.get_model("tiny-tissue").pipeline, _ThresholdPipeline)
    _FakeClassifier.seen = []
    _use_classifier(monkeypatch, ("ct", 1.0))
    output = tasks.segment_image(head_file, "tiny-tissue", device="cpu")
    assert _FakeClassifier.seen == [] and "input_type" not in output.provenance


def test_the_real_classifier_runs_in_the_check_and_stays_cached(fake_models, head_file):
    """Whatever the shipped weights say: the check runs, records a class of the vocabulary, and a warm worker's
    cache keeps the small classifier besides the job's model without counting it."""
    cache: dict = {}
    output = tasks.segment_image(head_file, "deepbet", device="cpu", pipeline_cache=cache)
    found = output.provenance["input_type"]
    assert found["label"] in CLASSES and found["model"] == MODEL_ID and 0.0 < found["probability"] <= 1.0
    assert found["version"] == registry.get_model(MODEL_ID).version
    helper = [key for key in cache if tasks.is_auxiliary_cache_key(key)]
    assert len(helper) == 1 and len(cache) == 2
    before = set(cache)
    tasks.segment_image(head_file, "deepbet", device="cpu", pipeline_cache=cache)
    assert set(cache) == before  # both reused
    worker.trim_pipeline_cache(cache, 1)
    assert set(cache) == before  # one model and the helper
    assert worker._model_was_cached(cache, before)
    worker.trim_pipeline_cache(cache, 0)
    assert cache == {}
