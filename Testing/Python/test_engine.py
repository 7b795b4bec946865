"""The torch side in-process: model registry and weight verification, input checks, model-space geometry, device
choice, the GPU out-of-memory fallback, and (slow) real brain extraction on the ROBEX whole-head T1."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import SHIPPED_IDS, dice, rotation

from MIADeepLearningLib.engine import devices, geometry, imageio, registry, tasks
from MIADeepLearningLib.engine.errors import InputError, ModelError
from MIADeepLearningLib.testing import sample_data

DEEPBET_PIPELINE = "deepbet_brain_extraction"
CUDA_USABLE = devices.cuda_unavailable_reason() is None
cpu_only = pytest.mark.skipif(CUDA_USABLE, reason="these checks expect a PyTorch without a usable CUDA GPU")


def _one_sentence(message: str) -> bool:
    """One line, ends with a full stop, and no second sentence inside it."""
    return "\n" not in message and message.endswith(".") and ". " not in message[:-1]


# --------------------------------------------------------------------------------------------------- registry


def test_builtin_deepbet_is_listed_with_its_metadata():
    models = {model.id: model for model in registry.list_models()}
    assert "deepbet" in models
    deepbet = models["deepbet"]
    assert deepbet.task == "segmentation"
    assert deepbet.title == "Brain extraction (deepbet)"
    assert deepbet.version == "1.0.2"
    assert deepbet.pipeline == DEEPBET_PIPELINE
    assert [segment["name"] for segment in deepbet.segments] == ["Brain"]
    assert deepbet.segments[0]["value"] == 1
    assert deepbet.pip_requirements_no_deps == ["deepbet==1.0.2"]
    assert [model.id for model in registry.list_models(task="segmentation")].count("deepbet") == 1
    assert "deepbet" not in {model.id for model in registry.list_models(task="registration")}
    summary = deepbet.summary()
    assert summary["segments"] == ["Brain"] and summary["license"] == "MIT" and "Fisch" in summary["citation"]


def test_unknown_model_names_the_available_ones():
    with pytest.raises(ModelError) as caught:
        registry.get_model("nope")
    message = str(caught.value)
    assert "'nope'" in message and "deepbet" in message and "available" in message
    assert _one_sentence(message)


def test_deepbet_weights_resolve_and_match_their_registered_sha256():
    model = registry.get_model("deepbet")
    paths = registry.verified_weight_paths(model)
    assert set(paths) == {"bbox_model", "mask_model"}
    for weight in model.weights:
        path = paths[weight.role]
        assert path.is_file() and path.as_posix().endswith(weight.path)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == weight.sha256
        assert path.stat().st_size == weight.size
    assert paths["bbox_model"] != paths["mask_model"]


@pytest.fixture
def extra_package(tmp_path, monkeypatch):
    """A copy of the deepbet package with its weights inside it ("source": package), found via the extra dirs."""
    deepbet = registry.get_model("deepbet")
    weights = registry.verified_weight_paths(deepbet)
    root = tmp_path / "site-models"
    package = root / "localbet"
    shutil.copytree(deepbet.package_dir / "configs", package / "configs")
    metadata_path = package / registry.METADATA_RELATIVE_PATH
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    for entry in metadata["slicer"]["files"]:
        relative = f"models/{Path(entry['path']).name}"
        (package / "models").mkdir(exist_ok=True)
        shutil.copyfile(weights[entry["role"]], package / relative)
        entry["path"] = relative
        entry["source"] = {"type": "package"}
    metadata["slicer"]["title"] = "Brain extraction (site copy)"
    metadata_path.write_text(json.dumps(metadata), encoding="utf-8")
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, os.pathsep.join([str(tmp_path / "does-not-exist"), str(root)]))
    return package


def test_extra_package_intact_copy_loads_and_verifies(extra_package):
    assert [model.id for model in registry.list_models()] == [*SHIPPED_IDS, "localbet"]
    model = registry.get_model("localbet")
    assert model.package_dir == extra_package
    assert model.title == "Brain extraction (site copy)"
    assert model.pip_requirements_no_deps == []
    paths = registry.verified_weight_paths(model)
    assert paths == {"bbox_model": extra_package / "models" / "bbox_model.pt",
                     "mask_model": extra_package / "models" / "model.pt"}
    builtin = {weight.role: weight.sha256 for weight in registry.get_model("deepbet").weights}
    assert {role: registry.sha256_of_file(path) for role, path in paths.items()} == builtin


def test_extra_package_with_a_missing_weight_is_refused(extra_package):
    (extra_package / "models" / "model.pt").unlink()
    with pytest.raises(ModelError, match="missing") as caught:
        registry.verified_weight_paths(registry.get_model("localbet"))
    assert "model.pt" in str(caught.value) and "site copy" in str(caught.value)


def test_extra_package_with_one_changed_byte_is_refused(extra_package):
    weight = extra_package / "models" / "model.pt"
    data = bytearray(weight.read_bytes())
    data[len(data) // 2] ^= 0x01
    weight.write_bytes(bytes(data))
    with pytest.raises(ModelError) as caught:
        registry.verified_weight_paths(registry.get_model("localbet"))
    message = str(caught.value)
    assert "sha256" in message and "refusing" in message and "model.pt" in message
    assert _one_sentence(message)


def test_package_whose_pypi_distribution_is_missing_says_how_to_install_it(extra_package):
    metadata_path = extra_package / registry.METADATA_RELATIVE_PATH
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    for entry in metadata["slicer"]["files"]:
        entry["source"] = {"type": "pypi", "distribution": "miadl-absent-weights",
                           "requirement": "miadl-absent-weights==9.9"}
    metadata_path.write_text(json.dumps(metadata), encoding="utf-8")
    model = registry.get_model("localbet")
    assert model.pip_requirements_no_deps == ["miadl-absent-weights==9.9"]
    with pytest.raises(ModelError) as caught:
        registry.verified_weight_paths(model)
    message = str(caught.value)
    assert "pip install --no-deps miadl-absent-weights==9.9" in message and "not installed" in message


def test_package_with_broken_metadata_is_a_model_error(extra_package):
    (extra_package / registry.METADATA_RELATIVE_PATH).write_text("{ not json", encoding="utf-8")
    with pytest.raises(ModelError, match="not valid JSON"):
        registry.list_models()


# -------------------------------------------------------------------------------------------------- imageio


def _image(size, pixel_type=sitk.sitkFloat32, components=None):
    image = sitk.Image(list(size), pixel_type, components) if components else sitk.Image(list(size), pixel_type)
    return image


def _textured(size=(9, 8, 7)):
    voxels = np.random.default_rng(1).normal(100, 20, size[::-1]).astype(np.float32)
    return sitk.GetImageFromArray(voxels), voxels


BAD_VOLUMES = {
    "2d": (lambda: _textured((12, 10, 1))[0][:, :, 0], ["is 2D", "3D volume"]),
    "single_slice": (lambda: _textured((12, 10, 1))[0], ["single slice", "12×10×1", "3D volume"]),
    "4d": (lambda: sitk.GetImageFromArray(np.random.default_rng(0).random((3, 5, 5, 5)), isVector=False),
           ["is 4D", "3D volume"]),
    "vector": (lambda: _image((6, 6, 6), sitk.sitkVectorFloat32, 3), ["3 components", "single scalar volume"]),
    "all_zero": (lambda: _image((6, 6, 6)), ["constant", "every voxel is 0", "nothing to segment"]),
}


@pytest.mark.parametrize("kind", BAD_VOLUMES)
def test_check_scalar_volume_refuses_in_one_sentence(kind):
    make, phrases = BAD_VOLUMES[kind]
    image = make()
    with pytest.raises(InputError) as caught:
        imageio.check_scalar_volume(image, "The input volume")
    message = str(caught.value)
    assert message.startswith("The input volume ")
    for phrase in phrases:
        assert phrase in message
    assert _one_sentence(message), message


def test_check_scalar_volume_counts_non_finite_voxels():
    _, voxels = _textured()
    voxels[0, 0, :3] = np.nan
    voxels[6, 7, 8] = np.inf
    voxels[3, 3, 3] = -np.inf
    with pytest.raises(InputError) as caught:
        imageio.check_scalar_volume(sitk.GetImageFromArray(voxels))
    message = str(caught.value)
    assert "5 voxels that are NaN or infinite" in message and _one_sentence(message)


@pytest.mark.parametrize("pixel_type", [sitk.sitkFloat32, sitk.sitkInt16, sitk.sitkFloat64],
                         ids=["float32", "int16", "float64"])
def test_check_scalar_volume_returns_float32_zyx_independent_of_the_image(pixel_type):
    expected = np.arange(4 * 5 * 6, dtype=np.float64).reshape(4, 5, 6) - 17.0
    image = sitk.Cast(sitk.GetImageFromArray(expected), pixel_type)
    voxels = imageio.check_scalar_volume(image)
    assert voxels.dtype == np.float32
    assert voxels.shape == (4, 5, 6)  # (z, y, x) for a 6×5×4 (x, y, z) image
    np.testing.assert_array_equal(voxels, expected.astype(np.float32))
    # a view into the image's buffer would change with the image, and dangle once a temporary image is freed
    image[1, 2, 3] = 99
    assert voxels[3, 2, 1] == expected[3, 2, 1]
    del image
    [sitk.Image([64, 64, 64], sitk.sitkFloat32) + 7.0 for _ in range(20)]
    gc.collect()
    np.testing.assert_array_equal(voxels, expected.astype(np.float32))


def test_read_image_missing_and_garbage_files(tmp_path):
    with pytest.raises(InputError, match="does not exist") as missing:
        imageio.read_image(tmp_path / "absent.nii.gz")
    assert _one_sentence(str(missing.value))
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"this is not an image\n" * 10)
    with pytest.raises(InputError, match=r"garbage\.nrrd cannot be read \("):
        imageio.read_image(garbage)
    image, voxels = _textured()
    written = imageio.write_image(image, tmp_path / "sub" / "good.nrrd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(imageio.read_image(written)), voxels)
    assert imageio.image_name(tmp_path / "head.nii.gz") == "head"


# ------------------------------------------------------------------------------------------------- geometry




HEAD_CENTRE_LPS = np.array([27.0, -40.0, 65.0])
HEAD_SEMI_AXES = np.array([35.0, 45.0, 30.0])  # mm along L, P, S


def _physical_points(image: sitk.Image) -> np.ndarray:
    """LPS position of every voxel, (3, N) in the (z, y, x) array's flattening order."""
    k, j, i = np.indices(image.GetSize()[::-1]).reshape(3, -1)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    index = np.stack([i, j, k]).astype(np.float64) * np.array(image.GetSpacing())[:, None]
    return np.array(image.GetOrigin())[:, None] + direction @ index


@pytest.fixture(scope="module")
def oblique_head():
    """An ellipsoid "head" on an oblique (30° about two axes), anisotropic, left-handed grid with wide padding."""
    size = (250, 170, 70)
    spacing = np.array([0.8, 1.2, 3.0])
    direction = rotation(2, 30.0) @ rotation(0, 30.0) @ np.diag([1.0, -1.0, 1.0])
    assert np.isclose(np.linalg.det(direction), -1.0)
    field_centre = HEAD_CENTRE_LPS - np.array([15.0, -10.0, 20.0])  # the head is off-centre in the padded field
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.flatten().tolist())
    image.SetOrigin((field_centre - direction @ (spacing * (np.array(size) - 1) / 2)).tolist())
    points = _physical_points(image)
    inside = (((points - HEAD_CENTRE_LPS[:, None]) / HEAD_SEMI_AXES[:, None]) ** 2).sum(axis=0) <= 1.0
    voxels = np.where(inside, 800.0, 0.0).astype(np.float32).reshape(size[::-1])
    head = sitk.GetImageFromArray(voxels)
    head.CopyInformation(image)
    assert 0.01 < inside.mean() < 0.05  # mostly zero background
    return head, points[:, inside]


def test_ras_model_grid_is_axis_aligned_ras_1mm(oblique_head):
    head, _ = oblique_head
    grid = geometry.ras_model_grid(head)
    assert grid.GetDirection() == geometry.RAS_DIRECTION_IN_LPS == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert grid.GetSpacing() == (1.0, 1.0, 1.0)


def test_ras_model_grid_covers_the_foreground_and_ignores_the_padding(oblique_head):
    head, foreground = oblique_head
    grid = geometry.ras_model_grid(head, margin_mm=10.0)
    size = np.array(grid.GetSize(), dtype=float)
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    continuous_index = direction.T @ (foreground - np.array(grid.GetOrigin())[:, None])  # spacing is 1 mm
    assert (continuous_index >= -0.5).all() and (continuous_index <= (size - 0.5)[:, None]).all()
    # every foreground voxel is at least ~the margin away from the grid's faces
    assert continuous_index.min(axis=1).min() > 8.0
    assert ((size[:, None] - continuous_index).min(axis=1) > 8.0).all()
    # ...and the grid is the foreground box plus margins, not the box of the padded oblique field's corners
    foreground_extent = foreground.max(axis=1) - foreground.min(axis=1)
    assert np.allclose(foreground_extent, 2 * HEAD_SEMI_AXES, atol=3.5)
    assert (size <= foreground_extent + 2 * 10.0 + 8.0).all(), (size, foreground_extent)
    corner_index = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]]).T
    corners = np.array(head.GetOrigin())[:, None] + np.array(head.GetDirection()).reshape(3, 3) @ (
        (np.array(head.GetSize()) - 1)[:, None] * np.array(head.GetSpacing())[:, None] * corner_index)
    corner_box = corners.max(axis=1) - corners.min(axis=1)
    assert np.prod(size) < 0.1 * np.prod(corner_box)


def test_head_lands_where_it_is_in_ras_on_the_model_grid(oblique_head):
    """The resampled ellipsoid's centroid, read from the (R, A, S) array, is the head's RAS centre (flip included)."""
    head, _ = oblique_head
    grid = geometry.ras_model_grid(head)
    voxels = geometry.ras_array(geometry.resample(head, grid, linear=True))
    assert voxels.shape == grid.GetSize()
    r, a, s = (np.nonzero(voxels > 400.0)[axis].mean() for axis in range(3))
    origin_ras = np.array(grid.GetOrigin()) * [-1.0, -1.0, 1.0]
    centroid_ras = origin_ras + np.array([r, a, s])
    assert np.allclose(centroid_ras, HEAD_CENTRE_LPS * [-1.0, -1.0, 1.0], atol=0.6), centroid_ras


def test_ras_array_round_trip_is_exact(oblique_head):
    grid = geometry.ras_model_grid(oblique_head[0])
    values = np.random.default_rng(2).random(grid.GetSize()).astype(np.float32)
    image = geometry.image_from_ras_array(values, grid)
    assert imageio.same_grid(image, grid, tolerance=0.0)
    assert sitk.GetArrayViewFromImage(image)[3, 2, 1] == values[1, 2, 3]  # (z, y, x) vs (R, A, S)
    np.testing.assert_array_equal(geometry.ras_array(image), values)
    again = geometry.image_from_ras_array(geometry.ras_array(image), grid)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(again), sitk.GetArrayViewFromImage(image))


@pytest.mark.parametrize("point_ras", [(-3.0, 12.0, 30.0), (9.0, 7.0, 11.0), (-4.0, 30.0, 43.0)])
def test_ras_array_index_order_is_right_anterior_superior(point_ras):
    grid = sitk.Image([20, 30, 40], sitk.sitkFloat32)
    grid.SetDirection(geometry.RAS_DIRECTION_IN_LPS)
    grid.SetOrigin((5.0, -7.0, 11.0))  # LPS; in RAS the first voxel centre is (-5, 7, 11)
    origin_ras = np.array([-5.0, 7.0, 11.0])
    for offset in (np.zeros(3), np.array([4.0, 0, 0]), np.array([0, 4.0, 0]), np.array([0, 0, 4.0])):
        ras = np.array(point_ras) + offset
        image = sitk.Image(grid)
        image.SetPixel(image.TransformPhysicalPointToIndex(tuple(ras * [-1.0, -1.0, 1.0])), 1000.0)
        voxels = geometry.ras_array(image)
        expected = tuple(int(v) for v in np.round(ras - origin_ras))
        assert np.unravel_index(np.argmax(voxels), voxels.shape) == expected
        assert voxels[expected] == 1000.0 and np.count_nonzero(voxels) == 1


# -------------------------------------------------------------------------------------------------- devices


def test_cpu_is_chosen_when_asked():
    choice = devices.choose_device("cpu")
    assert choice.device == torch.device("cpu") and not choice.is_cuda
    assert choice.reason == "CPU requested"
    assert devices.choose_device(" CPU ").device.type == "cpu"


@cpu_only
def test_auto_explains_why_the_cpu_is_used():
    choice = devices.choose_device("auto")
    assert choice.device.type == "cpu" and not choice.is_cuda
    assert choice.reason.startswith("CPU: ") and "CUDA" in choice.reason
    assert devices.choose_device("").device.type == "cpu"


@cpu_only
@pytest.mark.parametrize("requested", ["cuda", "cuda:1"])
def test_cuda_that_cannot_run_is_an_error_not_a_silent_cpu_run(requested):
    with pytest.raises(InputError) as caught:
        devices.choose_device(requested)
    message = str(caught.value)
    assert message.startswith("CUDA was requested but cannot be used: ")
    assert devices.cuda_unavailable_reason() in message
    assert _one_sentence(message)


def test_unknown_device_is_refused():
    with pytest.raises(InputError) as caught:
        devices.choose_device("tpu")
    assert "Unknown device 'tpu'" in str(caught.value) and "cuda:N" in str(caught.value)


@cpu_only
def test_device_report_says_why_no_gpu():
    report = devices.device_report()
    assert report["torch"] == torch.__version__
    assert report["torch_cuda_build"] == torch.version.cuda
    assert report["cuda_usable"] is False
    assert report["cuda_unavailable_reason"] == devices.cuda_unavailable_reason()
    assert report["cuda_unavailable_reason"]
    assert report["auto_choice"] == devices.choose_device("auto").reason
    assert report["gpus"] == [] and report["cpu_threads"] >= 1
    json.dumps(report)  # the CLI prints it as JSON


# ------------------------------------------------------------------------------------ OOM fallback (no GPU)


def _fake_pipeline(first_error: BaseException):
    class FakePipeline:
        created: ClassVar[list] = []

        def __init__(self, model, weight_paths, device, options):
            self.weight_paths, self.device, self.options = weight_paths, device, options
            self.to_calls: list = []
            self.predict_calls = 0
            FakePipeline.created.append(self)

        def to(self, device):
            self.to_calls.append(device)
            self.device = device
            return self

        def predict(self, image, progress):
            self.predict_calls += 1
            progress("inference", 0.5, f"fake inference #{self.predict_calls}")
            if self.predict_calls == 1:
                raise first_error
            label = sitk.Cast(image > 250.0, sitk.sitkUInt8)  # the phantom's inner "brain"
            return {"label": label}

    return FakePipeline


@pytest.fixture
def phantom_file(tmp_path):
    image = sitk.GetImageFromArray(sample_data.phantom_head((24, 28, 26)))
    image.SetSpacing((1.1, 0.9, 1.7))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(rotation(1, 20.0).flatten().tolist())
    return imageio.write_image(image, tmp_path / "phantom.nrrd")


def _fake_gpu(monkeypatch, error, is_cuda=True):
    choice = types.SimpleNamespace(device=torch.device("cpu"), is_cuda=is_cuda, reason="fake GPU")
    monkeypatch.setattr(tasks, "choose_device", lambda requested="auto": choice)
    pipeline = _fake_pipeline(error)
    monkeypatch.setitem(tasks.PIPELINES, DEEPBET_PIPELINE, pipeline)
    return pipeline


def test_gpu_out_of_memory_falls_back_to_the_cpu(monkeypatch, phantom_file):
    pipeline = _fake_gpu(monkeypatch, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    seen = []
    output = tasks.segment_image(phantom_file, "deepbet", device="cuda", create_masked_volume=True,
                                 progress=lambda stage, fraction, message: seen.append((stage, message)))
    [instance] = pipeline.created
    assert instance.predict_calls == 2
    assert instance.to_calls == [torch.device("cpu")]
    assert set(instance.weight_paths) == {"bbox_model", "mask_model"}
    assert instance.options == {"threshold": 0.5, "bbox_margin": 0.1, "working_spacing_mm": 1.0}
    # the tiny phantom also gets the input checks' field-of-view warning (engine.checks); the fallback comes last
    [warning] = [warning for warning in output.warnings if "GPU" in warning]
    assert "GPU ran out of memory" in warning and "on the CPU" in warning
    assert ("inference", warning) in seen
    assert output.provenance["device"] == "cpu"
    assert output.provenance["device_reason"] == "fake GPU"
    assert output.provenance["warnings"] == output.warnings and output.warnings[-1] == warning
    image = sitk.ReadImage(str(phantom_file))
    assert imageio.same_grid(output.label, image) and imageio.same_grid(output.masked, image)
    assert np.count_nonzero(sitk.GetArrayViewFromImage(output.label)) > 0


@pytest.mark.parametrize("error,is_cuda", [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("DefaultCPUAllocator: out of memory"), False),  # out of memory on the CPU: nothing to fall to
], ids=["gpu_non_oom", "cpu_oom"])
def test_other_failures_are_raised_not_swallowed(monkeypatch, phantom_file, error, is_cuda):
    pipeline = _fake_gpu(monkeypatch, error, is_cuda=is_cuda)
    with pytest.raises(RuntimeError) as caught:
        tasks.segment_image(phantom_file, "deepbet")
    assert caught.value is error
    [instance] = pipeline.created
    assert instance.predict_calls == 1 and instance.to_calls == []


# --------------------------------------------------------------------------------------- real brain extraction


@pytest.mark.slow
def test_brain_extraction_on_the_robex_head(robex):
    head_path, mask_path = robex
    progress = []
    output = tasks.segment_image(head_path, "deepbet", device="cpu", create_masked_volume=True,
                                 progress=lambda stage, fraction, message: progress.append((stage, fraction)))
    head = sitk.ReadImage(str(head_path))
    label = output.label
    assert label.GetPixelID() == sitk.sitkUInt8
    assert imageio.same_grid(label, head)
    label_voxels = sitk.GetArrayFromImage(label)
    assert set(np.unique(label_voxels)) == {0, 1}
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))) > 0
    score = dice(label_voxels, reference)
    assert score >= 0.95, score

    head_voxels = sitk.GetArrayFromImage(head)
    masked = output.masked
    assert imageio.same_grid(masked, head) and masked.GetPixelID() == head.GetPixelID()
    masked_voxels = sitk.GetArrayFromImage(masked)
    inside = label_voxels == 1
    np.testing.assert_array_equal(masked_voxels[inside], head_voxels[inside])
    assert (masked_voxels[~inside] == head_voxels.min()).all()

    provenance = output.provenance
    assert provenance["model_id"] == "deepbet" and provenance["model_version"] == "1.0.2"
    assert provenance["model_origin"] == "built-in", "provenance says whether the model was built in or imported"
    model = registry.get_model("deepbet")
    assert provenance["weights_sha256"] == {weight.role: weight.sha256 for weight in model.weights}
    assert set(provenance["weights_sha256"]) == {"bbox_model", "mask_model"}
    assert provenance["device"] == "cpu" and provenance["device_reason"] == "CPU requested"
    assert provenance["parameters"] == {"threshold": 0.5, "bbox_margin": 0.1, "working_spacing_mm": 1.0}
    assert provenance["input"] == Path(head_path).name
    assert output.warnings == [] and [segment["name"] for segment in output.segments] == ["Brain"]
    stages = [stage for stage, _ in progress]
    assert stages[0] == "load_model" and "inference" in stages and stages[-1] == "postprocess"
    assert [fraction for _, fraction in progress] == sorted(fraction for _, fraction in progress)
