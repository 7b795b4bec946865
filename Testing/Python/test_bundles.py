"""MONAI bundles in the Model Zoo layout, end to end: a package laid out like ``spleen_ct_segmentation`` (its
inference.json structure, its metadata fields plus our ``slicer`` section, docs/README.md, LICENSE, models/model.pt)
is generated here with the same UNet, whose weights are set so that the label follows a simple intensity rule
(spleen where the CT is above 70 HU). It is registered through $MIADL_EXTRA_MODELS_DIRS and run on a CT phantom on
oblique, anisotropic and flipped grids, in-process and through the CLI: the label lies exactly on the input grid,
is named from the metadata, and is where the rule says in physical space. Also: the weights are loaded with
``weights_only=True`` (a pickle with arbitrary objects is refused), a sha256 mismatch is refused, TorchScript is only
loaded when listed (and so verified), and our in-memory loader hands MONAI the same array and affine as its own
reader."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import dice, rotation

from MIADeepLearningLib.engine import bundles, imageio, registry, tasks
from MIADeepLearningLib.engine.errors import ModelError
from MIADeepLearningLib.paths import library_parent_dir

monai = pytest.importorskip("monai")

MODEL_ID = "spleen_ct_segmentation"
A_MIN, A_MAX = -57.0, 164.0  # the bundle's ScaleIntensityRanged window (HU -> [0, 1])
RULE_THRESHOLD_HU = 70.0  # the rule the generated weights implement: spleen where the CT is above 70 HU
RULE_GAIN = 40.0
AIR_HU, BODY_HU, SPLEEN_HU = -1000.0, 40.0, 100.0
BODY_CENTRE_LPS = np.array([12.0, -30.0, 140.0])
BODY_SEMI_AXES = np.array([62.0, 50.0, 66.0])
SPLEEN_CENTRE_LPS = BODY_CENTRE_LPS + np.array([24.0, 12.0, -6.0])  # on the patient's left (+x in LPS)
SPLEEN_SEMI_AXES = np.array([20.0, 15.0, 26.0])


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message[:-1]


# ------------------------------------------------------------------------------------------- the bundle


def spleen_inference_config() -> dict:
    """configs/inference.json with the structure of the Model Zoo's spleen_ct_segmentation (MONAI config syntax)."""
    return {
        "imports": ["$import glob", "$import numpy", "$import os"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.float32",
        "output_postfix": "trans",
        "separate_folder": True,
        "load_pretrain": True,
        "dataset_dir": "/workspace/data/Task09_Spleen",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {
            "_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
            "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch",
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key"},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
                {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": A_MIN, "a_max": A_MAX,
                 "b_min": 0, "b_max": 1, "clip": True},
                {"_target_": "EnsureTyped", "keys": "@image_key"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 4},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96], "sw_batch_size": 4, "overlap": 0.5},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
                 "nearest_interp": False, "to_tensor": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": "@output_ext",
                 "output_dtype": "@output_dtype", "output_postfix": "@output_postfix",
                 "separate_folder": "@separate_folder"},
            ],
        },
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {
            "_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
            "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
            "val_handlers": "@handlers", "amp": True,
        },
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}},
        "initialize": ["$monai.utils.set_determinism(seed=123)",
                       "$@checkpointloader(@evaluator) if @load_pretrain else None"],
        "run": ["$@evaluator.run()"],
    }


def spleen_metadata() -> dict:
    """configs/metadata.json with the Model Zoo's fields (our ``slicer`` section is added by `write_bundle`)."""
    tensor = {"type": "image", "num_channels": 1, "spatial_shape": [96, 96, 96], "dtype": "float32",
              "value_range": [0, 1], "is_patch_data": True}
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": "0.5.9",
        "changelog": {"0.5.9": "generated by the MIADeepLearning tests: same layout, rule-based weights"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {"nibabel": "5.4.2"},
        "name": "Spleen CT segmentation (test bundle)",
        "task": "Decathlon spleen segmentation",
        "description": "A UNet in the layout of the Model Zoo's spleen bundle; its weights label voxels above 70 HU.",
        "authors": "MIADeepLearning tests",
        "copyright": "Copyright (c) MIADeepLearning contributors",
        "data_source": "generated",
        "data_type": "nibabel",
        "image_classes": "single channel data, intensity scaled to [0, 1]",
        "label_classes": "single channel data, 1 is spleen, 0 is everything else",
        "pred_classes": "2 channels OneHot data, channel 1 is spleen, channel 0 is background",
        "eval_metrics": {"mean_dice": 0.0},
        "intended_use": "Tests only",
        "references": ["MIADeepLearning test suite"],
        "network_data_format": {
            "inputs": {"image": {**tensor, "format": "hounsfield", "modality": "CT", "channel_def": {"0": "image"}}},
            "outputs": {"pred": {**tensor, "format": "segmentation", "num_channels": 2,
                                 "channel_def": {"0": "background", "1": "spleen"}}},
        },
    }


def rule_network(rule: str = "intensity") -> torch.nn.Module:
    """The bundle's UNet with weights that make logit(spleen) - logit(background) = gain · (f - threshold).

    Everything is zero except one path: the first down block's residual convolution computes f from the scaled
    intensity x (stride 2), the top up block's transposed convolution upsamples it (linear taps 0.5, 1, 0.5) into
    channel 1, batch norms are identities and PReLUs have slope 1; deeper blocks output zeros. ``intensity``:
    f = x (centre tap), spleen where the CT is above 70 HU. ``right_gradient``: f = x one voxel towards the first
    array axis minus x one voxel back, which after the bundle's Orientationd("RAS") points to the patient's Right:
    the label marks where the intensity rises towards the Right, i.e. the patient-left faces of the body and the
    spleen, and would mark their right faces if Left and Right were swapped anywhere on the way.
    """
    from monai.networks.nets import UNet

    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=[16, 32, 64, 128, 256],
                   strides=[2, 2, 2, 2], num_res_units=2, norm="batch")
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            parameter.zero_()
            if name.endswith("adn.A.weight"):  # PReLU slope 1: identity
                parameter.fill_(1.0)
            elif name.endswith("adn.N.weight"):  # batch norm scale 1
                parameter.fill_(1.0)
        for name, buffer in network.named_buffers():
            if name.endswith("running_var"):
                buffer.fill_(1.0)
            elif name.endswith("running_mean"):
                buffer.zero_()
        if rule == "intensity":
            network.model[0].residual.weight[0, 0, 1, 1, 1] = 1.0
            threshold = (RULE_THRESHOLD_HU - A_MIN) / (A_MAX - A_MIN)
        else:
            network.model[0].residual.weight[0, 0, 2, 1, 1] = 1.0
            network.model[0].residual.weight[0, 0, 0, 1, 1] = -1.0
            threshold = 0.15  # the spleen's edge is a step of 0.27 in scaled units, the body's 0.44
        taps = torch.tensor([0.5, 1.0, 0.5])
        up = network.model[2][0].conv
        up.weight[0, 1] = RULE_GAIN * taps[:, None, None] * taps[None, :, None] * taps[None, None, :]
        up.bias[1] = -RULE_GAIN * threshold
    return network.eval()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_bundle(root: Path, name: str = MODEL_ID, weights: str = "pt", segments: list | None = None,
                 config: dict | None = None, rule: str = "intensity") -> Path:
    """A bundle folder in the Model Zoo layout; ``weights``: "pt" (state dict), "ts" (TorchScript), "ts_unlisted"."""
    package = root / name
    for folder in ("configs", "models", "docs"):
        (package / folder).mkdir(parents=True, exist_ok=True)
    (package / "configs" / "inference.json").write_text(json.dumps(config or spleen_inference_config(), indent=4))
    (package / "docs" / "README.md").write_text("# Spleen CT segmentation (test bundle)\n\nRule-based weights.\n")
    (package / "LICENSE").write_text("Apache License 2.0 (test bundle)\n")
    network = rule_network(rule)
    if weights == "pt":
        torch.save(network.state_dict(), package / "models" / "model.pt")
        files = [("model", "models/model.pt", "state_dict")]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(network, torch.zeros(1, 1, 32, 32, 32))
            torch.jit.save(traced, str(package / "models" / "model.ts"))
        files = [] if weights == "ts_unlisted" else [("model", "models/model.ts", "torchscript")]
    metadata = spleen_metadata()
    metadata["slicer"] = {
        "title": "Spleen CT segmentation (test bundle)",
        "task": "segmentation",
        "modality": "CT",
        "pipeline": bundles.PIPELINE_NAME,
        "files": [{"role": role, "path": path, "format": kind, "sha256": _sha256(package / path),
                   "size": (package / path).stat().st_size, "source": {"type": "package"}}
                  for role, path, kind in files],
    }
    if segments is not None:
        metadata["slicer"]["segments"] = segments
    (package / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4))
    return package


@pytest.fixture(scope="module")
def site_models(tmp_path_factory):
    """A models folder holding the spleen-like bundle (state dict)."""
    root = tmp_path_factory.mktemp("site-models")
    write_bundle(root)
    return root


@pytest.fixture
def registered(site_models, monkeypatch):
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(site_models))
    return site_models


# ------------------------------------------------------------------------------------------- the phantom


def _physical_points(image: sitk.Image) -> np.ndarray:
    """LPS position of every voxel, (3, N) in the (z, y, x) array's flattening order."""
    k, j, i = np.indices(image.GetSize()[::-1]).reshape(3, -1)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    index = np.stack([i, j, k]).astype(np.float64) * np.array(image.GetSpacing())[:, None]
    return np.array(image.GetOrigin())[:, None] + direction @ index


def _inside(points: np.ndarray, centre: np.ndarray, semi_axes: np.ndarray) -> np.ndarray:
    return (((points - centre[:, None]) / semi_axes[:, None]) ** 2).sum(axis=0) <= 1.0


def ct_phantom(spacing, direction: np.ndarray, extent_mm: float = 150.0) -> tuple[sitk.Image, np.ndarray]:
    """A CT (HU: air, a body, a brighter spleen-like ellipsoid on the left) and the true spleen mask (z, y, x)."""
    spacing = np.array(spacing, dtype=float)
    size = [math.ceil(extent_mm / s) for s in spacing]
    image = sitk.Image(size, sitk.sitkInt16)
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.flatten().tolist())
    image.SetOrigin((BODY_CENTRE_LPS - direction @ (spacing * (np.array(size) - 1) / 2)).tolist())
    points = _physical_points(image)
    body = _inside(points, BODY_CENTRE_LPS, BODY_SEMI_AXES)
    spleen = _inside(points, SPLEEN_CENTRE_LPS, SPLEEN_SEMI_AXES)
    hu = np.where(spleen, SPLEEN_HU, np.where(body, BODY_HU, AIR_HU))
    noise = np.random.default_rng(3).normal(0.0, 5.0, hu.shape)
    voxels = np.round(hu + np.where(body, noise, 0.0)).astype(np.int16).reshape(size[::-1])
    phantom = sitk.GetImageFromArray(voxels)
    phantom.CopyInformation(image)
    return phantom, spleen.reshape(size[::-1])


OBLIQUE = rotation(2, 25.0) @ rotation(0, 15.0)
GRIDS = {
    "oblique_anisotropic": ((0.9, 1.2, 2.5), OBLIQUE),
    "axial_flipped_left_handed": ((1.1, 0.8, 2.0), np.diag([-1.0, 1.0, 1.0]) @ rotation(1, 10.0)),
}


def _assert_on_grid(output: sitk.Image, reference: sitk.Image) -> None:
    assert output.GetSize() == reference.GetSize()
    np.testing.assert_allclose(output.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(output.GetSpacing(), reference.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(output.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-6)


def _assert_spleen_where_the_rule_says(label: sitk.Image, truth: np.ndarray) -> None:
    voxels = sitk.GetArrayFromImage(label)
    assert set(np.unique(voxels)) == {0, 1}
    score = dice(voxels, truth)
    assert score >= 0.9, score
    points = _physical_points(label)[:, voxels.ravel() == 1]
    assert np.allclose(points.mean(axis=1), SPLEEN_CENTRE_LPS, atol=1.5), points.mean(axis=1)
    # nothing outside the spleen but a thin rim of partial volume: the rule follows the intensities, in LPS
    far = ~_inside(_physical_points(label), SPLEEN_CENTRE_LPS, SPLEEN_SEMI_AXES + 3.0).reshape(voxels.shape)
    assert np.count_nonzero(voxels[far]) == 0


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    files = {}
    for name, (spacing, direction) in GRIDS.items():
        image, truth = ct_phantom(spacing, direction)
        files[name] = (imageio.write_image(image, folder / f"{name}.nrrd"), truth)
    return files


# -------------------------------------------------------------------------------------------------- runs


def test_bundle_is_listed_from_the_extra_models_dir(registered):
    model = registry.get_model(MODEL_ID)
    assert model.pipeline == bundles.PIPELINE_NAME and model.task == "segmentation"
    assert [weight.path for weight in model.weights] == ["models/model.pt"]
    assert model.pip_requirements == [registry.MONAI_REQUIREMENT]  # the Slicer module installs MONAI for bundles
    assert registry.get_model("deepbet").pip_requirements == []
    for relative in ("configs/inference.json", "configs/metadata.json", "docs/README.md", "LICENSE",
                     "models/model.pt"):
        assert (model.package_dir / relative).is_file(), relative


@pytest.fixture(scope="module")
def reference_runs(site_models, phantom_files):
    """tasks.segment_image on each phantom grid, once for the module (with the progress it reported)."""
    previous = os.environ.get(registry.EXTRA_MODELS_ENV)
    os.environ[registry.EXTRA_MODELS_ENV] = str(site_models)
    try:
        runs = {}
        for grid, (path, _) in phantom_files.items():
            stages: list = []
            output = tasks.segment_image(path, MODEL_ID, device="cpu",
                                         progress=lambda stage, fraction, message, seen=stages: seen.append(
                                             (stage, fraction)))
            runs[grid] = (output, stages)
        return runs
    finally:
        if previous is None:
            os.environ.pop(registry.EXTRA_MODELS_ENV, None)
        else:
            os.environ[registry.EXTRA_MODELS_ENV] = previous


@pytest.mark.parametrize("grid", GRIDS)
def test_segment_image_puts_the_spleen_on_the_input_grid(site_models, phantom_files, reference_runs, grid):
    path, truth = phantom_files[grid]
    output, stages = reference_runs[grid]
    image = sitk.ReadImage(str(path))
    _assert_on_grid(output.label, image)
    assert output.label.GetPixelID() == sitk.sitkUInt8
    _assert_spleen_where_the_rule_says(output.label, truth)
    assert output.segments == [{"value": 1, "name": "spleen", "color": list(bundles.DEFAULT_COLORS[0]),
                                "terminology": ""}]
    assert output.warnings == [] and output.provenance["warnings"] == []
    assert output.provenance["model_id"] == MODEL_ID
    assert output.provenance["weights_sha256"] == {"model": _sha256(site_models / MODEL_ID / "models/model.pt")}
    details = output.provenance["pipeline"]
    assert details["name"] == bundles.PIPELINE_NAME and details["weights_file"] == "model.pt"
    # the bundle's SlidingWindowInferer: its ROI and overlap, and MONAI's default blending ("constant")
    assert details["window"]["roi_size"] == [96, 96, 96] and details["window"]["overlap"] == 0.5
    assert details["window"]["mode"] == "constant"
    assert details["inference"]["device"] == "cpu" and details["inference"]["fallbacks"] == []
    json.dumps(output.provenance)
    fractions = [fraction for _, fraction in stages]
    assert fractions == sorted(fractions)
    assert {"load_model", "read_input", "checks", "preprocess", "inference", "postprocess"} <= {s for s, _ in stages}


def test_flipped_and_permuted_storage_gives_the_same_labels(registered, phantom_files, reference_runs, tmp_path):
    """Same voxels in the same places, stored in another axis order and direction: the same label per voxel."""
    path, _ = phantom_files["oblique_anisotropic"]
    image = sitk.ReadImage(str(path))
    stored = sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [True, False, False])
    assert np.linalg.det(np.array(stored.GetDirection()).reshape(3, 3)) < 0
    other = imageio.write_image(stored, tmp_path / "permuted.nrrd")
    first = reference_runs["oblique_anisotropic"][0].label
    second = tasks.segment_image(other, MODEL_ID, device="cpu").label
    _assert_on_grid(second, stored)
    back = sitk.PermuteAxes(sitk.Flip(second, [True, False, False]), [1, 2, 0])
    _assert_on_grid(back, image)
    agreement = np.mean(sitk.GetArrayViewFromImage(back) == sitk.GetArrayViewFromImage(first))
    assert agreement >= 0.999, agreement


def test_cli_segments_with_a_bundle(registered, phantom_files, tmp_path):
    path, truth = phantom_files["oblique_anisotropic"]
    output, provenance = tmp_path / "spleen.nrrd", tmp_path / "provenance.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(library_parent_dir()), env.get("PYTHONPATH", "")]))
    env[registry.EXTRA_MODELS_ENV] = str(registered)
    completed = subprocess.run(
        [sys.executable, "-m", "MIADeepLearningLib", "segment", "--model", MODEL_ID, "-i", str(path),
         "-o", str(output), "--provenance", str(provenance), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "warning:" not in completed.stderr
    label = sitk.ReadImage(str(output))
    _assert_on_grid(label, sitk.ReadImage(str(path)))
    _assert_spleen_where_the_rule_says(label, truth)
    record = json.loads(provenance.read_text())
    assert record["segments"][0]["name"] == "spleen" and record["model_id"] == MODEL_ID


@pytest.mark.parametrize("grid", GRIDS)
def test_left_and_right_survive_the_way_through_monai(tmp_path, monkeypatch, phantom_files, grid):
    """An orientation-sensitive network: its label must be on the patient's left faces, whatever the storage."""
    write_bundle(tmp_path, rule="right_gradient")
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(tmp_path))
    path, _ = phantom_files[grid]
    label = tasks.segment_image(path, MODEL_ID, device="cpu").label
    voxels = sitk.GetArrayViewFromImage(label).ravel() == 1
    left = _physical_points(label)[0, voxels] - BODY_CENTRE_LPS[0]  # LPS x grows towards the patient's Left
    assert voxels.sum() > 500
    assert left.mean() > 25.0 and np.mean(left > 0) > 0.95, (left.mean(), np.mean(left > 0))


def test_torchscript_weights_run_only_when_listed(tmp_path, monkeypatch, phantom_files):
    path, truth = phantom_files["oblique_anisotropic"]
    listed, unlisted = tmp_path / "listed", tmp_path / "unlisted"
    write_bundle(listed, weights="ts")
    write_bundle(unlisted, weights="ts_unlisted")
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(listed))
    output = tasks.segment_image(path, MODEL_ID, device="cpu")
    _assert_spleen_where_the_rule_says(output.label, truth)
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(unlisted))
    with pytest.raises(ModelError) as caught:
        tasks.segment_image(path, MODEL_ID, device="cpu")
    assert "no verified weight file" in str(caught.value) and _one_sentence(str(caught.value))


# -------------------------------------------------------------------------------------------- refusals


class _Payload:
    """Unpickling this (without weights_only) would create the marker folder: arbitrary code at load time."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _relist(package: Path) -> None:
    """Record the weight file's current sha256, as an attacker with write access to the package would."""
    metadata_path = package / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    for entry in metadata["slicer"]["files"]:
        entry["sha256"] = _sha256(package / entry["path"])
        entry["size"] = (package / entry["path"]).stat().st_size
    metadata_path.write_text(json.dumps(metadata))


def test_a_pickle_with_arbitrary_objects_is_refused(tmp_path, monkeypatch, phantom_files):
    package = write_bundle(tmp_path)
    marker = tmp_path / "code-ran"
    state = rule_network().state_dict()
    state["payload"] = _Payload(marker)
    torch.save(state, package / "models" / "model.pt")
    _relist(package)  # the sha256 matches: only weights_only stands between the file and the code
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(tmp_path))
    with pytest.raises(ModelError) as caught:
        tasks.segment_image(phantom_files["oblique_anisotropic"][0], MODEL_ID, device="cpu")
    message = str(caught.value)
    assert "model.pt" in message and "not a plain state dict" in message and "refusing" in message
    assert _one_sentence(message), message
    assert not marker.exists()


def test_a_changed_weight_file_is_refused_before_loading(tmp_path, monkeypatch, phantom_files):
    package = write_bundle(tmp_path)
    weights = package / "models" / "model.pt"
    state = torch.load(weights, weights_only=True)
    state["model.0.residual.weight"] += 1.0
    torch.save(state, weights)  # a valid state dict, just not the registered one
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(tmp_path))
    with pytest.raises(ModelError) as caught:
        tasks.segment_image(phantom_files["oblique_anisotropic"][0], MODEL_ID, device="cpu")
    message = str(caught.value)
    assert "sha256" in message and "refusing" in message and _one_sentence(message)


def test_state_dict_that_does_not_fit_the_network_is_refused(tmp_path, monkeypatch, phantom_files):
    package = write_bundle(tmp_path)
    state = rule_network().state_dict()
    del state["model.0.residual.weight"]
    torch.save(state, package / "models" / "model.pt")
    _relist(package)
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(tmp_path))
    with pytest.raises(ModelError, match="does not fit the network_def") as caught:
        tasks.segment_image(phantom_files["oblique_anisotropic"][0], MODEL_ID, device="cpu")
    assert _one_sentence(str(caught.value))


# ---------------------------------------------------------------------------------------- the way in and out


def test_in_memory_loader_matches_monais_own_reader(tmp_path):
    """What `SitkLoadd` hands to the bundle equals what LoadImaged reads from the same file (array and affine)."""
    from monai.transforms import LoadImaged

    image, _ = ct_phantom((1.3, 0.9, 2.2), np.diag([1.0, -1.0, 1.0]) @ OBLIQUE, extent_mm=60.0)
    path = imageio.write_image(image, tmp_path / "phantom.nii", compress=False)
    read_back = sitk.ReadImage(str(path))  # NIfTI keeps the geometry in float32: compare like with like
    theirs = LoadImaged(keys="image", image_only=True)({"image": str(path)})["image"]
    ours = bundles.SitkLoadd(("image",))({"image": read_back})["image"]
    assert tuple(ours.shape) == tuple(theirs.shape) == read_back.GetSize()
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    np.testing.assert_allclose(ours.affine.numpy(), theirs.affine.numpy(), atol=1e-4)
    assert ours.meta["space"] == theirs.meta["space"] == "RAS"
    # index (i, j, k) of the MetaTensor is SimpleITK's index (i, j, k); its affine gives that voxel's RAS position
    index = (5, 7, 3)
    lps = np.array(read_back.TransformIndexToPhysicalPoint(index))
    ras = ours.affine.numpy() @ np.array([*index, 1.0])
    np.testing.assert_allclose(ras[:3], lps * [-1.0, -1.0, 1.0], atol=1e-4)
    assert float(ours[index]) == float(read_back[index])


def test_label_array_goes_back_with_the_input_geometry():
    image, _ = ct_phantom((1.0, 1.5, 2.0), OBLIQUE, extent_mm=40.0)
    labels = (bundles.ijk_array(image) > 0).astype(np.uint8)
    label = bundles.image_from_ijk_array(labels, image)
    _assert_on_grid(label, image)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(label), sitk.GetArrayViewFromImage(image) > 0)


def test_prediction_off_the_input_grid_is_refused():
    image, _ = ct_phantom((1.0, 1.5, 2.0), OBLIQUE, extent_mm=40.0)
    good = bundles.metatensor_from_sitk(image, channel_first=True)
    bundles.check_on_input_grid(good, image, "test")
    shifted = good.clone()
    shifted.affine[0, 3] += 0.5
    with pytest.raises(ModelError, match="did not bring its prediction back onto the input grid"):
        bundles.check_on_input_grid(shifted, image, "test")
    with pytest.raises(ModelError):
        bundles.check_on_input_grid(good[:, 1:], image, "test")


def test_labels_are_resampled_as_probabilities_even_when_the_bundle_inverts_after_argmax(
        tmp_path, monkeypatch, phantom_files, reference_runs):
    """A bundle that discretises first and inverts with nearest neighbour gets the same (linear) treatment."""
    config = spleen_inference_config()
    post = config["postprocessing"]["transforms"]
    post[1], post[2] = post[2], {**post[1], "nearest_interp": True}
    write_bundle(tmp_path, config=config)
    path, _ = phantom_files["oblique_anisotropic"]
    reference = reference_runs["oblique_anisotropic"][0].label
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(tmp_path))
    reordered = tasks.segment_image(path, MODEL_ID, device="cpu").label
    # the bundle's own order (argmax on the model grid, nearest neighbour back) differs on ~5 % of the spleen's
    # voxels here; ours only by the inference engine's rounding (fp16 stitching, a bf16 choice made by timing)
    differing = np.count_nonzero(sitk.GetArrayViewFromImage(reordered) != sitk.GetArrayViewFromImage(reference))
    assert differing <= 0.005 * np.count_nonzero(sitk.GetArrayViewFromImage(reference)), differing


def test_package_segments_give_colour_and_terminology():
    terminology = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
                   "Structure~SCT^78961009^Spleen~^^~Anatomic codes - DICOM master list~^^~^^")
    metadata = spleen_metadata()
    metadata["slicer"] = {"segments": [{"value": 1, "name": "Spleen", "color": [157, 108, 162],
                                        "terminology": terminology}]}
    assert bundles.segments_from_metadata(metadata) == [
        {"value": 1, "name": "Spleen", "color": [157, 108, 162], "terminology": terminology}]


def test_inference_fallbacks_reach_the_warnings_and_the_provenance(registered, phantom_files, monkeypatch):
    """What the windowed inference reports (here: a simulated GPU out of memory) is told to the user."""
    from MIADeepLearningLib.engine import inference

    steps = ["GPU out of memory: batch 4 -> 2", "GPU out of memory: ran on the CPU"]

    def fake_windows(network, image, window, device, progress):
        progress(1.0)
        report = inference.InferenceReport(device="cpu", sw_batch_size=2, windows_total=4, windows_evaluated=4,
                                           seconds=0.1, fallbacks=list(steps))
        return torch.zeros((2, *image.shape[1:])), report

    monkeypatch.setattr(bundles, "_windowed_predict", fake_windows)
    output = tasks.segment_image(phantom_files["oblique_anisotropic"][0], MODEL_ID, device="cpu")
    assert output.warnings == bundles.fallback_warning(steps) == output.provenance["warnings"]
    assert output.provenance["pipeline"]["inference"]["fallbacks"] == steps
    assert np.count_nonzero(sitk.GetArrayViewFromImage(output.label)) == 0  # equal logits: background


def test_out_of_memory_fallbacks_become_one_warning():
    assert bundles.fallback_warning([]) == []
    [warning] = bundles.fallback_warning(["GPU out of memory: batch 4 -> 2", "GPU out of memory: ran on the CPU"])
    assert "batch 4 -> 2, ran on the CPU" in warning and _one_sentence(warning), warning


def test_segments_from_metadata_defaults():
    metadata = spleen_metadata()
    metadata["network_data_format"]["outputs"]["pred"]["channel_def"] = {"0": "background", "2": "kidney",
                                                                        "1": "liver"}
    segments = bundles.segments_from_metadata(metadata)
    assert [(segment["value"], segment["name"]) for segment in segments] == [(1, "liver"), (2, "kidney")]
    assert [segment["color"] for segment in segments] == [list(color) for color in bundles.DEFAULT_COLORS[:2]]
    assert all(segment["terminology"] == "" for segment in segments)


# ---------------------------------------------------------------------------------------- deepbet as a bundle


def test_deepbet_inference_config_describes_its_pipeline():
    """deepbet's configs/inference.json parses with MONAI, names our pipeline and the files its metadata verifies."""
    from monai.bundle import ConfigParser

    model = registry.get_model("deepbet")
    parser = ConfigParser()
    parser.read_config(str(model.package_dir / bundles.INFERENCE_CONFIG_RELATIVE_PATH))
    parser.read_meta(str(model.package_dir / registry.METADATA_RELATIVE_PATH))
    assert parser.get_parsed_content("pipeline") == model.pipeline == "deepbet_brain_extraction"
    files = {weight.role: weight.path for weight in model.weights}
    assert parser.get_parsed_content("bbox_model_path") == files["bbox_model"]
    assert parser.get_parsed_content("mask_model_path") == files["mask_model"]
    options = model.slicer["options"]
    assert parser.get_parsed_content("working_spacing_mm") == options["working_spacing_mm"]
    assert parser.get_parsed_content("threshold") == options["threshold"]
    assert parser.get_parsed_content("bbox_margin") == options["bbox_margin"]
    from MIADeepLearningLib.engine import brain_extraction

    assert tuple(parser.get_parsed_content("bbox_shape")) == brain_extraction.BBOX_SHAPE
    assert tuple(parser.get_parsed_content("mask_shape")) == brain_extraction.MASK_SHAPE
    names = [type(transform).__name__ for transform in parser.get_parsed_content("preprocessing").transforms]
    assert names[:4] == ["LoadImaged", "EnsureChannelFirstd", "Orientationd", "Spacingd"]
    post = [type(transform).__name__ for transform in parser.get_parsed_content("postprocessing").transforms]
    assert post == ["Invertd", "AsDiscreted", "KeepLargestConnectedComponentd", "FillHolesd"]


def test_deepbet_inference_config_loads_the_verified_networks():
    from monai.bundle import ConfigParser

    model = registry.get_model("deepbet")
    try:
        paths = registry.verified_weight_paths(model)
    except ModelError as reason:
        pytest.skip(str(reason))
    parser = ConfigParser()
    parser.read_config(str(model.package_dir / bundles.INFERENCE_CONFIG_RELATIVE_PATH))
    bbox = Path(paths["bbox_model"])
    parser["weights_root"] = str(bbox.parents[len(Path(model.weights[0].path).parts) - 1])
    parser["device"] = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for key in ("bbox_network", "mask_network"):
            assert isinstance(parser.get_parsed_content(key), torch.jit.ScriptModule)
