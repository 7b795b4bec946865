"""Registration from the command line (`register`) and through the worker protocol (task "register"), end to end on a
small phantom pair with the shipped brain-registration model: the outputs exist on the fixed grid, the .h5 reads
back as a displacement field transform on the fixed grid, the report has its keys, and a failure leaves nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import registration_phantom_pair, run_worker_job

from MIADeepLearningLib import cli, jobs, worker
from MIADeepLearningLib.engine import displacement

MODEL_ID = "brain-registration"
JACOBIAN_KEYS = {"jacobian_non_positive_percent", "jacobian_log_std", "jacobian_mean", "jacobian_min",
                 "jacobian_max", "jacobian_voxels", "jacobian_region"}
DICE_KEYS = {"dice", "dice_mean", "dice_before", "dice_before_mean", "dice_affine", "dice_affine_mean"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pair")
    fixed, fixed_labels, moving, moving_labels = registration_phantom_pair()
    paths = {"fixed": folder / "fixed.nrrd", "moving": folder / "moving.nii.gz",
             "fixed_labels": folder / "fixed_labels.nrrd", "moving_labels": folder / "moving_labels.nii.gz"}
    for role, image in (("fixed", fixed), ("moving", moving), ("fixed_labels", fixed_labels),
                        ("moving_labels", moving_labels)):
        sitk.WriteImage(image, str(paths[role]))
    return paths


def _assert_on_fixed_grid(image: sitk.Image, fixed: Path) -> None:
    grid = sitk.ReadImage(str(fixed))
    assert image.GetSize() == grid.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), grid.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(image.GetSpacing(), grid.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), grid.GetDirection(), atol=1e-6)


def _assert_transform(path: Path, fixed: Path) -> sitk.DisplacementFieldTransform:
    transform = displacement.read_field(path)
    assert isinstance(transform, sitk.DisplacementFieldTransform)
    field = transform.GetDisplacementField()
    _assert_on_fixed_grid(field, fixed)
    assert np.isfinite(sitk.GetArrayViewFromImage(field)).all()
    return transform


# --------------------------------------------------------------------------------------------------- worker


def _job(tmp_path: Path, inputs: dict[str, Path], outputs: dict[str, str] | None = None, **options) -> jobs.Job:
    return jobs.Job(task="register", model=MODEL_ID, inputs={role: str(path) for role, path in inputs.items()},
                    folder=str(tmp_path / "job"), outputs=outputs or {}, device="cpu", options=options)


def test_worker_register_job_writes_transform_warped_labels_and_report(pair, tmp_path):
    job = _job(tmp_path, pair, input_names={"fixed": "Fixed T1", "moving": "Moving T1"})
    code, events = run_worker_job(job)
    assert code == 0, events[-1]
    final = events[-1]
    assert final.stage == jobs.STAGE_DONE
    stages = [event.stage for event in events]
    for stage in ("start", "load_model", "read_input", "checks", "inference", "postprocess", "write"):
        assert stage in stages
    result = final.result
    outputs = {role: Path(path) for role, path in result["outputs"].items()}
    assert {role: path.name for role, path in outputs.items()} == {
        "transform": "transform.h5", "warped": "warped.nrrd", "warped_labels": "warped_labels.nrrd",
        "report": "report.json"}
    assert all(path.parent == job.outputs_dir and path.is_file() for path in outputs.values())
    transform = _assert_transform(outputs["transform"], pair["fixed"])
    warped = sitk.ReadImage(str(outputs["warped"]))
    _assert_on_fixed_grid(warped, pair["fixed"])
    reference = sitk.Resample(sitk.ReadImage(str(pair["moving"])), sitk.ReadImage(str(pair["fixed"])), transform,
                              sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(reference), atol=1e-5)
    labels = sitk.ReadImage(str(outputs["warped_labels"]))
    _assert_on_fixed_grid(labels, pair["fixed"])
    assert labels.GetPixelID() == sitk.sitkInt16 and set(np.unique(sitk.GetArrayViewFromImage(labels))) <= set(
        range(8))
    report = json.loads(outputs["report"].read_text(encoding="utf-8"))
    assert report == result["report"]
    assert set(report) == JACOBIAN_KEYS | DICE_KEYS
    assert list(report["dice"]) == [str(value) for value in range(1, 8)]
    assert result["provenance"]["model_id"] == MODEL_ID
    assert result["provenance"]["inputs"]["fixed"] == "Fixed T1"
    assert result["provenance"]["inputs"]["moving_labels"] == "moving_labels.nii.gz"
    assert result["timings"]["engine_import"] >= 0 and "worker_total" in result["timings"]
    written = json.loads((Path(job.folder) / jobs.RESULT_FILE_NAME).read_text(encoding="utf-8"))
    assert written["outputs"] == result["outputs"] and written["report"] == report
    assert not job.partial_dir.exists()


def test_worker_register_job_without_labels_and_with_own_names(pair, tmp_path):
    inputs = {"fixed": pair["fixed"], "moving": pair["moving"]}
    job = _job(tmp_path, inputs, outputs={"transform": "field.h5", "warped": "moved.nii.gz"},
               model_options={"deformable": False})
    code, events = run_worker_job(job)
    assert code == 0, events[-1]
    result = events[-1].result
    assert sorted(result["outputs"]) == ["report", "transform", "warped"]
    assert Path(result["outputs"]["transform"]).name == "field.h5"
    assert Path(result["outputs"]["warped"]).name == "moved.nii.gz"
    assert set(result["report"]) == JACOBIAN_KEYS
    assert result["provenance"]["parameters"]["deformable"] is False
    assert result["report"]["jacobian_non_positive_percent"] == 0.0
    _assert_transform(Path(result["outputs"]["transform"]), pair["fixed"])


@pytest.mark.parametrize("case", ["constant fixed", "labels off grid", "missing moving", "unknown input"])
def test_worker_register_failure_leaves_nothing(pair, tmp_path, case):
    inputs = dict(pair)
    expected = {
        "constant fixed": "The fixed image is empty (every voxel is 0); there is nothing to register.",
        "labels off grid": "The moving label map is not on the grid of the moving image",
        "missing moving": "A registration job needs a moving image.",
        "unknown input": "Unknown registration input(s) atlas",
    }[case]
    if case == "constant fixed":
        sitk.WriteImage(sitk.Image([16, 16, 16], sitk.sitkFloat32), str(tmp_path / "zero.nrrd"))
        inputs = {"fixed": tmp_path / "zero.nrrd", "moving": pair["moving"]}
    elif case == "labels off grid":
        inputs["moving_labels"] = pair["fixed_labels"]
    elif case == "missing moving":
        inputs.pop("moving")
    else:
        inputs["atlas"] = pair["fixed"]
    job = _job(tmp_path, inputs)
    code, events = run_worker_job(job)
    assert code == 2
    assert events[-1].stage == jobs.STAGE_ERROR and expected in events[-1].message, events[-1].message
    assert not job.outputs_dir.exists() and not job.partial_dir.exists()
    assert not (Path(job.folder) / jobs.RESULT_FILE_NAME).exists()


def test_worker_knows_the_register_task():
    assert worker.TASKS["register"] is worker.run_register_job
    assert worker.REGISTER_OUTPUTS == {"transform": "transform.h5", "warped": "warped.nrrd",
                                       "warped_labels": "warped_labels.nrrd", "report": "report.json"}


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_register_writes_every_output(pair, tmp_path, capsys):
    out = tmp_path / "out"
    targets = {"warped": out / "warped.nii.gz", "transform": out / "field.h5",
               "warped_labels": out / "labels" / "warped_labels.nrrd", "report": out / "report.json",
               "provenance": out / "provenance.json"}
    code = cli.main(["register", "--model", MODEL_ID, "--fixed", str(pair["fixed"]), "--moving", str(pair["moving"]),
                     "-o", str(targets["warped"]), "--transform", str(targets["transform"]),
                     "--moving-labels", str(pair["moving_labels"]), "--warped-labels", str(targets["warped_labels"]),
                     "--fixed-labels", str(pair["fixed_labels"]), "--report", str(targets["report"]),
                     "--provenance", str(targets["provenance"]), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    assert "mean Dice" in captured.err and "wrote" in captured.err
    assert all(path.is_file() for path in targets.values())
    _assert_transform(targets["transform"], pair["fixed"])
    _assert_on_fixed_grid(sitk.ReadImage(str(targets["warped"])), pair["fixed"])
    _assert_on_fixed_grid(sitk.ReadImage(str(targets["warped_labels"])), pair["fixed"])
    report = json.loads(targets["report"].read_text(encoding="utf-8"))
    assert set(report) == JACOBIAN_KEYS | DICE_KEYS
    assert json.loads(targets["provenance"].read_text(encoding="utf-8"))["report"] == report
    assert sorted(path.name for path in out.rglob("*")) == sorted(
        ["field.h5", "labels", "provenance.json", "report.json", "warped.nii.gz", "warped_labels.nrrd"]), \
        "no staging folder left behind"


def test_cli_register_with_instance_steps_and_masks(pair, tmp_path, capsys):
    fixed = sitk.ReadImage(str(pair["fixed"]))
    mask = sitk.Cast(sitk.ReadImage(str(pair["fixed_labels"])) > 0, sitk.sitkUInt8)
    sitk.WriteImage(mask, str(tmp_path / "fixed_mask.nrrd"))
    moving_mask = sitk.Cast(sitk.ReadImage(str(pair["moving_labels"])) > 0, sitk.sitkUInt8)
    sitk.WriteImage(moving_mask, str(tmp_path / "moving_mask.nrrd"))
    provenance = tmp_path / "provenance.json"
    code = cli.main(["register", "--model", MODEL_ID, "--fixed", str(pair["fixed"]), "--moving", str(pair["moving"]),
                     "--transform", str(tmp_path / "field.h5"), "--fixed-mask", str(tmp_path / "fixed_mask.nrrd"),
                     "--moving-mask", str(tmp_path / "moving_mask.nrrd"), "--instance-steps", "2",
                     "--provenance", str(provenance), "--device", "cpu", "-q"])
    assert code == cli.EXIT_OK, capsys.readouterr().err
    record = json.loads(provenance.read_text(encoding="utf-8"))
    assert record["parameters"]["instance_steps"] == 2
    assert record["pipeline"]["instance_optimisation"]["steps"] == 2
    assert record["report"]["jacobian_region"] == "fixed mask"
    assert record["report"]["jacobian_voxels"] == int(sitk.GetArrayViewFromImage(mask).sum())
    assert displacement.read_field(tmp_path / "field.h5").GetDisplacementField().GetSize() == fixed.GetSize()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["field.h5", "fixed_mask.nrrd", "moving_mask.nrrd",
                                                                "provenance.json"]


@pytest.mark.parametrize("case", ["constant moving", "labels off grid", "nothing to write", "warped labels alone",
                                  "transform not h5", "overwrites input", "same outputs", "missing input",
                                  "segmentation model"])
def test_cli_register_refusals_write_nothing(pair, tmp_path, capsys, case):
    out = tmp_path / "out"
    moving = str(pair["moving"])
    arguments = ["-o", str(out / "warped.nrrd"), "--transform", str(out / "field.h5")]
    extra: list[str] = []
    model = MODEL_ID
    expected = {
        "constant moving": "The moving image is empty (every voxel is 3); there is nothing to register.",
        "labels off grid": "The moving label map is not on the grid of the moving image",
        "nothing to write": "Nothing to write",
        "warped labels alone": "--warped-labels needs --moving-labels",
        "transform not h5": "must end in .h5",
        "overwrites input": "would overwrite an input",
        "same outputs": "must be different files",
        "missing input": "is not a file",
        "segmentation model": "is a segmentation model, not a registration model",
    }[case]
    if case == "constant moving":
        out.mkdir()
        sitk.WriteImage(sitk.Image([16, 16, 16], sitk.sitkFloat32) + 3.0, str(tmp_path / "constant.nrrd"))
        moving = str(tmp_path / "constant.nrrd")
    elif case == "labels off grid":
        extra = ["--moving-labels", str(pair["fixed_labels"]), "--warped-labels", str(out / "labels.nrrd")]
    elif case == "nothing to write":
        arguments = ["--report", str(out / "report.json")]
    elif case == "warped labels alone":
        extra = ["--warped-labels", str(out / "labels.nrrd")]
    elif case == "transform not h5":
        arguments = ["--transform", str(out / "field.nrrd")]
    elif case == "overwrites input":
        arguments = ["-o", str(pair["fixed"])]
    elif case == "same outputs":
        arguments = ["-o", str(out / "a.nrrd"), "--moving-labels", str(pair["moving_labels"]), "--warped-labels",
                     str(out / "a.nrrd")]
    elif case == "missing input":
        moving = str(tmp_path / "nope.nrrd")
    elif case == "segmentation model":
        model = "deepbet"
    code = cli.main(["register", "--model", model, "--fixed", str(pair["fixed"]), "--moving", moving, *arguments,
                     *extra, "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE, err
    assert expected in err and err.startswith("error: ") and err.count("\n") == 1, err
    written = sorted(path.name for path in out.rglob("*")) if out.exists() else []
    assert written == [], written
    assert sorted(path.name for path in tmp_path.iterdir() if path.name != "out") == (
        ["constant.nrrd"] if case == "constant moving" else [])
