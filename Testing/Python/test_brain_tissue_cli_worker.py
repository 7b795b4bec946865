"""A brain tissue model (a minimal package with tiny random UNet3D weights) from the command line and through the
worker protocol: the uncertainty map is one more output on the input grid (`--uncertainty`, `--uncertainty-suffix`,
a job's "uncertainty" output), asked for only from models that list it in slicer.optional_outputs; other models and
runs that do not ask behave as before."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import TISSUE_MODEL_ID, run_worker_job, write_tissue_package

from MIADeepLearningLib import cli, jobs
from MIADeepLearningLib.engine import registry


@pytest.fixture
def tissue_model(tmp_path, monkeypatch) -> str:
    root = tmp_path / "models"
    write_tissue_package(root)
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(root))
    return TISSUE_MODEL_ID


def _head(path: Path, seed: int = 0) -> Path:
    """A small oblique thick-slice volume: a bright ball in a darker one on a zero background."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:10, :40, :36].astype(np.float32)
    radius = np.sqrt((x - 18) ** 2 + (y - 20) ** 2 + (5.0 * (z - 4.5)) ** 2)
    voxels = np.where(radius < 16, 120.0, 0.0) + np.where(radius < 9, 180.0, 0.0) + rng.normal(0, 2, z.shape)
    image = sitk.GetImageFromArray(np.clip(voxels, 0, None).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 5.0))
    image.SetOrigin((-18.0, 20.5, -22.0))
    image.SetDirection((0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _assert_on_grid(path: Path, reference: Path) -> sitk.Image:
    output, grid = sitk.ReadImage(str(path)), sitk.ReadImage(str(reference))
    assert output.GetSize() == grid.GetSize() and output.GetSpacing() == grid.GetSpacing()
    np.testing.assert_allclose(output.GetOrigin(), grid.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(output.GetDirection(), grid.GetDirection(), atol=1e-9)
    return output


def _uncertainty_values(path: Path) -> np.ndarray:
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert values.dtype == np.float32 and np.all(np.isfinite(values))
    assert values.min() >= 0.0 and values.max() <= 1.0
    return values


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_segment_one_file_with_uncertainty(tissue_model, tmp_path, capsys):
    head = _head(tmp_path / "in" / "head.nrrd")
    label, uncertainty = tmp_path / "out" / "tissue.nrrd", tmp_path / "maps" / "u.nii.gz"
    provenance = tmp_path / "p.json"
    label.parent.mkdir()
    code = cli.main(["segment", "--model", tissue_model, "-i", str(head), "-o", str(label), "--uncertainty",
                     str(uncertainty), "--provenance", str(provenance), "--device", "cpu", "-q"])
    assert code == cli.EXIT_OK, capsys.readouterr().err
    labels = sitk.GetArrayFromImage(_assert_on_grid(label, head))
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    _assert_on_grid(uncertainty, head)
    _uncertainty_values(uncertainty)
    record = json.loads(provenance.read_text())
    assert record["parameters"]["uncertainty"] is True and record["pipeline"]["test_time_flips"] == ["none", "LR"]
    assert [segment["name"] for segment in record["segments"]] == ["CSF", "Gray matter", "White matter"]


def test_cli_segment_folder_with_uncertainty_suffix(tissue_model, tmp_path, capsys):
    cases = tmp_path / "cases"
    for index in range(2):
        _head(cases / f"head{index}.nrrd", seed=index)
    out = tmp_path / "out"
    code = cli.main(["segment", "--model", tissue_model, "-i", str(cases), "-o", str(out), "--uncertainty-suffix",
                     "--device", "cpu", "-q"])
    assert code == cli.EXIT_OK, capsys.readouterr().err
    with (out / "report.csv").open(encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["case", "input", "status", "seconds", "output", "masked_output", "uncertainty_output",
                             "warnings", "error", "worker", "attempts"]
    for index, row in enumerate(rows):
        assert row["status"] == "ok" and row["output"] == str(out / f"head{index}_tissue.nrrd"), row
        assert row["uncertainty_output"] == str(out / f"head{index}_uncertainty.nrrd")
        _assert_on_grid(Path(row["uncertainty_output"]), cases / f"head{index}.nrrd")
        _uncertainty_values(Path(row["uncertainty_output"]))
    assert sorted(path.name for path in out.iterdir()) == [
        ".miadl-cohort", "head0_tissue.nrrd", "head0_uncertainty.nrrd", "head1_tissue.nrrd", "head1_uncertainty.nrrd",
        "report.csv"]

    plain = tmp_path / "plain"
    assert cli.main(["segment", "--model", tissue_model, "-i", str(cases), "-o", str(plain), "--device", "cpu",
                     "-q"]) == cli.EXIT_OK
    with (plain / "report.csv").open(encoding="utf-8") as stream:
        assert next(csv.reader(stream)) == cli.REPORT_COLUMNS, "no uncertainty column unless asked for"


@pytest.mark.parametrize("case", ["model without uncertainty", "folder input", "suffix for one output file",
                                  "uncertainty is the output", "no image extension", "same suffixes"])
def test_cli_segment_uncertainty_refusals(tissue_model, tmp_path, capsys, case):
    head = _head(tmp_path / "in" / "head.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    arguments = ["-i", str(head), "-o", str(out / "tissue.nrrd"), "--model", tissue_model]
    extra = ["--uncertainty", str(out / "u.nrrd")]
    expected = {
        "model without uncertainty": "Model 'Brain extraction (deepbet)' makes no uncertainty map.",
        "folder input": "--uncertainty FILE is for a single input file",
        "suffix for one output file": "--uncertainty-suffix names outputs in an output folder",
        "uncertainty is the output": "must be a file of its own",
        "no image extension": "needs an image extension",
        "same suffixes": "need different suffixes",
    }[case]
    if case == "model without uncertainty":
        arguments[-1] = "deepbet"
    elif case == "folder input":
        arguments[1], arguments[3] = str(head.parent), str(out)
    elif case == "suffix for one output file":
        extra = ["--uncertainty-suffix"]
    elif case == "uncertainty is the output":
        extra = ["--uncertainty", str(out / "tissue.nrrd")]
    elif case == "no image extension":
        extra = ["--uncertainty", str(out / "u.txt")]
    else:
        arguments[3] = str(out)
        extra = ["--uncertainty-suffix", "tissue"]
    code = cli.main(["segment", *arguments, *extra, "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert sorted(path.name for path in out.iterdir()) == [], "a refused run writes nothing"


# --------------------------------------------------------------------------------------------------- worker


def test_worker_segment_job_writes_the_uncertainty_map(tissue_model, tmp_path):
    head = _head(tmp_path / "head.nrrd")
    job = jobs.Job(task="segment", model=tissue_model, inputs={"image": str(head)}, folder=str(tmp_path / "job"),
                   outputs={"label": "label.nrrd", "uncertainty": "uncertainty.nrrd"}, device="cpu",
                   options={"input_name": "T2 head"})
    code, events = run_worker_job(job)
    assert code == 0, events[-1]
    result = events[-1].result
    assert result["outputs"] == {"label": str(job.outputs_dir / "label.nrrd"),
                                 "uncertainty": str(job.outputs_dir / "uncertainty.nrrd")}
    _assert_on_grid(Path(result["outputs"]["label"]), head)
    _assert_on_grid(Path(result["outputs"]["uncertainty"]), head)
    _uncertainty_values(Path(result["outputs"]["uncertainty"]))
    assert [segment["value"] for segment in result["segments"]] == [1, 2, 3]
    assert result["provenance"]["parameters"]["uncertainty"] is True

    plain = jobs.Job(task="segment", model=tissue_model, inputs={"image": str(head)}, folder=str(tmp_path / "job2"),
                     outputs={"label": "label.nrrd"}, device="cpu")
    code, events = run_worker_job(plain)
    assert code == 0 and set(events[-1].result["outputs"]) == {"label"}
    assert "uncertainty" not in events[-1].result["provenance"]["parameters"]


def test_worker_refuses_uncertainty_from_a_model_without_it(tmp_path):
    head = _head(tmp_path / "head.nrrd")
    job = jobs.Job(task="segment", model="deepbet", inputs={"image": str(head)}, folder=str(tmp_path / "job"),
                   outputs={"label": "label.nrrd", "uncertainty": "uncertainty.nrrd"}, device="cpu")
    code, events = run_worker_job(job)
    assert code == 2 and events[-1].error_type == "ModelError"
    assert events[-1].message == "Model 'Brain extraction (deepbet)' makes no uncertainty map."
    assert not Path(job.outputs_dir).exists() and not job.partial_dir.exists()


def test_cli_test_time_copies(tissue_model, tmp_path, capsys):
    """--test-time-copies picks the speed / accuracy choice; a model without copies refuses it in one sentence."""
    head = _head(tmp_path / "in" / "head.nrrd")
    label, provenance = tmp_path / "tissue.nrrd", tmp_path / "p.json"
    code = cli.main(["segment", "--model", tissue_model, "-i", str(head), "-o", str(label), "--test-time-copies", "1",
                     "--provenance", str(provenance), "--device", "cpu", "-q"])
    assert code == cli.EXIT_OK, capsys.readouterr().err
    _assert_on_grid(label, head)
    record = json.loads(provenance.read_text())
    assert record["parameters"]["test_time_copies"] == 1
    assert record["pipeline"]["test_time_flips"] == ["none"] and len(record["pipeline"]["inference"]) == 1
    capsys.readouterr()
    code = cli.main(["segment", "--model", "deepbet", "-i", str(head), "-o", str(tmp_path / "brain.nrrd"),
                     "--test-time-copies", "2", "--device", "cpu", "-q"])
    error = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and "has no test-time copies" in error and "Traceback" not in error
    assert not (tmp_path / "brain.nrrd").exists()
    with pytest.raises(SystemExit):
        cli.main(["segment", "--model", tissue_model, "-i", str(head), "-o", str(label), "--test-time-copies", "3"])
