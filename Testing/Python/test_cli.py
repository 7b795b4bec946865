"""The batch command line `python -m MIADeepLearningLib`, run as a real subprocess: model and device listings,
brain extraction whose output lies exactly on the input's grid whatever its orientation and format, and one clear
`error:` line (exit code 2, no output file) for every input it must refuse."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import SHIPPED_IDS, dice, rotation
from helpers import run_cli as _cli

from MIADeepLearningLib.engine import devices

cpu_only = pytest.mark.skipif(devices.cuda_unavailable_reason() is None,
                              reason="these checks expect a PyTorch without a usable CUDA GPU")




def _dice(first: sitk.Image, second: sitk.Image) -> float:
    return dice(sitk.GetArrayViewFromImage(first), sitk.GetArrayViewFromImage(second))


def _assert_same_grid(output: sitk.Image, reference: sitk.Image) -> None:
    assert output.GetSize() == reference.GetSize()
    np.testing.assert_allclose(output.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(output.GetSpacing(), reference.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(output.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------------------- listings


def test_models_lists_deepbet():
    completed = _cli("models")
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert "deepbet\tsegmentation\tBrain extraction (deepbet) (v1.0.2, MIT)" in lines


def test_models_json():
    completed = _cli("models", "--json")
    assert completed.returncode == 0, completed.stderr
    models = {model["id"]: model for model in json.loads(completed.stdout)}
    deepbet = models["deepbet"]
    assert {"id", "title", "task", "version", "license", "citation"} <= set(deepbet)
    assert deepbet["title"] == "Brain extraction (deepbet)" and deepbet["task"] == "segmentation"
    assert deepbet["version"] == "1.0.2" and deepbet["license"] == "MIT"
    assert "deepbet" in deepbet["citation"] and "doi:10.1016/j.compbiomed.2024.108845" in deepbet["citation"]
    assert deepbet["segments"] == ["Brain"] and deepbet["requirements_no_deps"] == ["deepbet==1.0.2"]
    filtered = _cli("models", "--json", "--task", "registration")
    assert filtered.returncode == 0 and "deepbet" not in {model["id"] for model in json.loads(filtered.stdout)}


@cpu_only
def test_device_json_explains_the_cpu():
    completed = _cli("device", "--json")
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["cuda_usable"] is False
    assert report["cuda_unavailable_reason"] == devices.cuda_unavailable_reason()
    assert report["auto_choice"].startswith("CPU: ") and report["gpus"] == []
    import torch

    assert report["torch"] == torch.__version__


# ------------------------------------------------------------------------------------------ real segmentation




def _oblique_anisotropic(head: sitk.Image) -> sitk.Image:
    """The head resampled onto a grid rotated 20° and 15° about two axes, with 1.1 × 0.9 × 2.2 mm voxels."""
    direction = rotation(2, 20.0) @ rotation(0, 15.0) @ np.array(head.GetDirection()).reshape(3, 3)
    spacing = np.array([1.1, 0.9, 2.2])
    centre = np.array(head.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in head.GetSize()]))
    extent = 1.15 * np.array(head.GetSize()) * np.array(head.GetSpacing())
    size = [math.ceil(e / s) for e, s in zip(extent, spacing)]
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing(spacing.tolist())
    reference.SetDirection(direction.flatten().tolist())
    reference.SetOrigin((centre - direction @ (spacing * (np.array(size) - 1) / 2)).tolist())
    return sitk.Resample(head, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _flipped_permuted(head: sitk.Image) -> sitk.Image:
    """Same voxels, same physical positions, axes stored in another order and two of them reversed."""
    return sitk.Flip(sitk.PermuteAxes(head, [2, 0, 1]), [True, False, True])


@pytest.fixture(scope="module")
def shipped_run(robex, tmp_path_factory):
    """(a): the ROBEX NIfTI as shipped, with the masked volume and the provenance written too."""
    head, _ = robex
    folder = tmp_path_factory.mktemp("cli_shipped")
    output, masked, provenance = folder / "brain.nii.gz", folder / "masked.nrrd", folder / "provenance.json"
    completed = _cli("segment", "--model", "deepbet", "-i", str(head), "-o", str(output), "--masked", str(masked),
                     "--provenance", str(provenance), "--device", "cpu", cwd=folder)
    return completed, output, masked, provenance


@pytest.mark.slow
def test_segment_shipped_nifti(robex, shipped_run):
    head_path, mask_path = robex
    completed, output, masked, provenance = shipped_run
    assert completed.returncode == 0, completed.stderr
    assert f"wrote {output}" in completed.stderr and "inference" in completed.stderr
    head, label = sitk.ReadImage(str(head_path)), sitk.ReadImage(str(output))
    _assert_same_grid(label, head)
    assert label.GetPixelID() == sitk.sitkUInt8 and set(np.unique(sitk.GetArrayViewFromImage(label))) == {0, 1}
    dice = _dice(label, sitk.ReadImage(str(mask_path)))
    assert dice >= 0.95, dice
    masked_image = sitk.ReadImage(str(masked))
    _assert_same_grid(masked_image, head)
    outside = sitk.GetArrayViewFromImage(label) == 0
    assert (sitk.GetArrayViewFromImage(masked_image)[outside] == sitk.GetArrayViewFromImage(head).min()).all()
    record = json.loads(provenance.read_text())
    assert record["model_id"] == "deepbet" and record["device"] == "cpu" and record["segments"][0]["name"] == "Brain"
    assert set(record["weights_sha256"]) == {"bbox_model", "mask_model"}


@pytest.mark.slow
@pytest.mark.parametrize("variant,suffix,make,min_dice", [
    ("oblique_anisotropic", ".nrrd", _oblique_anisotropic, 0.97),
    ("flipped_permuted", ".nii.gz", _flipped_permuted, 0.99),  # voxel centres coincide: only storage differs
], ids=["b_oblique_anisotropic_nrrd", "c_flipped_permuted_nii_gz"])
def test_segment_resampled_copy(robex, shipped_run, tmp_path, variant, suffix, make, min_dice):
    head_path, _ = robex
    assert shipped_run[0].returncode == 0, shipped_run[0].stderr
    source = make(sitk.ReadImage(str(head_path)))
    input_path = tmp_path / f"{variant}{suffix}"
    sitk.WriteImage(source, str(input_path))
    output = tmp_path / f"{variant}_brain{suffix}"
    completed = _cli("segment", "--model", "deepbet", "-i", str(input_path), "-o", str(output), "-q")
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""  # quiet, and no warnings
    written_input = sitk.ReadImage(str(input_path))
    label = sitk.ReadImage(str(output))
    _assert_same_grid(label, written_input)
    reference = sitk.ReadImage(str(shipped_run[1]))
    assert not np.allclose(written_input.GetDirection(), reference.GetDirection())
    back = sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    dice = _dice(back, reference)
    assert dice >= min_dice, dice


# ------------------------------------------------------------------------------------------------ refusals


def _textured(size_zyx, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(300, 50, size_zyx).astype(np.float32)


def _single_slice(folder: Path) -> Path:
    path = folder / "single_slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(_textured((1, 40, 40))), str(path))
    return path


def _with_nan(folder: Path) -> Path:
    # NRRD, not NIfTI: SimpleITK 2.5's NIfTI reader silently turns NaN/Inf into 0 (fixed in ITK 6, ITK PR #6683)
    voxels = _textured((20, 20, 20))
    voxels[5, 5, 5:12] = np.nan
    path = folder / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(path))
    return path


def _good(folder: Path) -> Path:
    path = folder / "good.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(_textured((20, 20, 20))), str(path))
    return path


REFUSALS = {
    "single_slice": (_single_slice, [], ["single slice", "3D volume"]),
    "nan": (_with_nan, [], ["7 voxels that are NaN or infinite"]),
    "missing": (lambda folder: folder / "absent.nii.gz", [], ["absent.nii.gz does not exist"]),
    "unknown_model": (_good, ["--model", "nope"],
                      [f"Unknown model 'nope' (available: {', '.join(SHIPPED_IDS)})"]),
    "cuda_on_cpu_torch": (_good, ["--device", "cuda"], ["CUDA was requested but cannot be used"]),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_input_is_one_error_line_and_no_output(tmp_path, case):
    make, extra, phrases = REFUSALS[case]
    if case == "cuda_on_cpu_torch" and devices.cuda_unavailable_reason() is None:
        pytest.skip("a usable CUDA GPU is present")
    input_path = make(tmp_path)
    output = tmp_path / "out" / "label.nii.gz"
    arguments = ["segment", "--model", "deepbet", "-i", str(input_path), "-o", str(output), "-q", *extra]
    completed = _cli(*arguments)
    assert completed.returncode == 2, (completed.stdout, completed.stderr)
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    line = lines[0]
    assert line.startswith("error: ") and line.endswith(".") and ". " not in line[:-1]
    for phrase in phrases:
        assert phrase in line
    assert "Traceback" not in completed.stderr and completed.stdout == ""
    assert not output.exists() and not output.parent.exists()
