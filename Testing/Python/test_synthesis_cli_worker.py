"""Synthesis from the command line (`python -m MIADeepLearningLib synthesize`) and through the worker protocol
("synthesize" jobs), with the shipped model "thick-slice-sr" on a small thick-slice scan: outputs on the 1 mm grid,
optional maps, provenance, clear refusals (exit code 2, one line) and nothing half-written when a run fails.
Sanity only: the shipped weights are still being trained, so no accuracy is asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import run_worker_job

from MIADeepLearningLib import cli, jobs
from MIADeepLearningLib.engine import synthesis
from MIADeepLearningLib.paths import library_parent_dir

MODEL = "thick-slice-sr"
PROVENANCE_KEYS = {"model_id", "model_title", "model_version", "weights_sha256", "device", "parameters", "input",
                   "created_utc", "extension_version", "torch_version", "warnings", "pipeline"}


@pytest.fixture
def thick_scan(tmp_path) -> Path:
    """A smooth head-like blob, 40 x 40 voxels of 1 mm in-plane, 8 slices 5 mm apart, as NRRD."""
    z, y, x = np.mgrid[:8, :40, :40].astype(np.float32)
    z *= 5.0
    blob = 60.0 + 700.0 * np.exp(-((x - 19.5) ** 2 + (y - 21) ** 2 + (z - 17.5) ** 2) / (2 * 11.0**2))
    blob += 250.0 * np.exp(-((x - 25) ** 2 + (y - 15) ** 2 + (z - 20) ** 2) / (2 * 4.0**2))
    image = sitk.GetImageFromArray(blob.astype(np.float32))
    image.SetSpacing((1.0, 1.0, 5.0))
    image.SetOrigin((-20.0, 15.5, -8.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    path = tmp_path / "input" / "thick.nrrd"
    path.parent.mkdir()
    sitk.WriteImage(image, str(path))
    return path


def _assert_on_grid(output: sitk.Image, grid: sitk.Image) -> None:
    assert output.GetSize() == grid.GetSize(), f"size {output.GetSize()} instead of {grid.GetSize()}"
    np.testing.assert_allclose(output.GetSpacing(), (1.0, 1.0, 1.0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(output.GetOrigin(), grid.GetOrigin(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(output.GetDirection(), grid.GetDirection(), rtol=0, atol=1e-9)


def _expected_grid(path: Path) -> sitk.Image:
    grid, _ = synthesis.isotropic_grid(sitk.ReadImage(str(path)))
    return grid


def _leftovers(folder: Path) -> list[str]:
    """Staging folders or partial files a run may have left anywhere below `folder`."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                  if path.name.startswith((".miadl-staging", ".partial")) or path.suffix in (".part", ".tmp"))


def _files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_synthesize_writes_every_output(thick_scan, tmp_path, capsys):
    out = tmp_path / "out"
    output, uncertainty = out / "thick_1mm.nii.gz", out / "maps" / "uncertainty.nrrd"
    difference, provenance = out / "difference.mha", out / "provenance.json"
    code = cli.main(["synthesize", "--model", MODEL, "-i", str(thick_scan), "-o", str(output), "--uncertainty",
                     str(uncertainty), "--difference", str(difference), "--provenance", str(provenance),
                     "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_OK, err
    grid = _expected_grid(thick_scan)
    for path in (output, uncertainty, difference):
        assert path.is_file(), f"{path.name} was not written; stderr:\n{err}"
        _assert_on_grid(sitk.ReadImage(str(path)), grid)
    assert grid.GetSize() == (40, 40, 40)
    spread = sitk.GetArrayFromImage(sitk.ReadImage(str(uncertainty)))
    assert np.isfinite(spread).all() and spread.min() >= 0.0
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    assert np.isfinite(result).all() and result.min() >= 60.0 - 1e-3, "the output stays above the input's minimum"
    record = json.loads(provenance.read_text())
    assert PROVENANCE_KEYS <= set(record), f"provenance lacks {PROVENANCE_KEYS - set(record)}"
    assert record["model_id"] == MODEL and record["input"] == "thick.nrrd" and record["device"] == "cpu"
    assert set(record["weights_sha256"]) == {"network"} and len(record["weights_sha256"]["network"]) == 64
    assert record["pipeline"]["thick_axis"] == "K" and record["pipeline"]["slice_spacing_mm"] == 5.0
    assert record["pipeline"]["test_time_flips"] == 4 and record["parameters"]["uncertainty"] is True
    assert any("field of view" in warning for warning in record["warnings"]), "the 40 mm field of view is reported"
    assert "warning: The field of view" in err and f"wrote {output}" in err
    assert _leftovers(tmp_path) == [], "no staging folder may be left"


def test_cli_synthesize_as_a_subprocess(thick_scan, tmp_path):
    output = tmp_path / "sr.nrrd"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(library_parent_dir()), env.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, "-m", "MIADeepLearningLib", "synthesize", "--model", MODEL, "-i",
                                str(thick_scan), "-o", str(output), "--device", "cpu", "-q"],
                               capture_output=True, text=True, env=env, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    _assert_on_grid(sitk.ReadImage(str(output)), _expected_grid(thick_scan))
    assert completed.stdout == ""
    assert "warning: The field of view" in completed.stderr, completed.stderr
    assert "% inference:" not in completed.stderr and "wrote " not in completed.stderr, (
        f"-q prints no progress, only warnings:\n{completed.stderr}")
    assert _files(tmp_path) == ["input/thick.nrrd", "sr.nrrd"]


@pytest.mark.parametrize("case", ["output is input", "segmentation model", "missing input", "no image extension",
                                  "same file twice", "unknown model"])
def test_cli_synthesize_refusals(thick_scan, tmp_path, capsys, case):
    before = (thick_scan.read_bytes(), thick_scan.stat().st_mtime_ns)
    out = tmp_path / "out"
    arguments = {"-i": str(thick_scan), "-o": str(out / "sr.nrrd"), "--model": MODEL}
    extra: list[str] = []
    expected = {
        "output is input": "would overwrite the input",
        "segmentation model": "is a segmentation model, not a synthesis model.",
        "missing input": "is not a file",
        "no image extension": "needs an image extension",
        "same file twice": "must be different files",
        "unknown model": "nosuchmodel",
    }[case]
    if case == "output is input":
        arguments["-o"] = str(thick_scan.parent / ".." / "input" / "thick.nrrd")
    elif case == "segmentation model":
        arguments["--model"] = "deepbet"
    elif case == "missing input":
        arguments["-i"] = str(tmp_path / "nowhere.nrrd")
    elif case == "no image extension":
        extra = ["--difference", str(out / "difference.txt")]
    elif case == "same file twice":
        extra = ["--uncertainty", str(out / "sr.nrrd")]
    else:
        arguments["--model"] = "nosuchmodel"
    code = cli.main(["synthesize", *[item for pair in arguments.items() for item in pair], *extra, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert (thick_scan.read_bytes(), thick_scan.stat().st_mtime_ns) == before, "the input must stay untouched"
    assert _files(tmp_path) == ["input/thick.nrrd"], "a refused run writes nothing"


def test_cli_synthesize_refuses_an_output_folder_it_cannot_create_before_running(thick_scan, tmp_path, capsys):
    """The difference's folder is a file: one line, exit 2, before the model runs, and nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "blocked").write_text("a file where a folder is needed")
    code = cli.main(["synthesize", "--model", MODEL, "-i", str(thick_scan), "-o", str(out / "sr.nrrd"), "--difference",
                     str(out / "blocked" / "difference.nrrd"), "--device", "cpu", "-q"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error: Cannot create the folder") and error.count("\n") == 1, error
    assert _files(tmp_path) == ["input/thick.nrrd", "out/blocked"], "no output may be left by a failed run"
    assert _leftovers(tmp_path) == []


def test_cli_synthesize_leaves_nothing_when_writing_fails(thick_scan, tmp_path, capsys, monkeypatch):
    """The second image fails to write (disk full, say): the first, already staged, must not appear either."""
    from MIADeepLearningLib.engine import imageio

    real_write, written = imageio.write_image, []

    def failing_write(image, path):
        written.append(path)
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        return real_write(image, path)

    monkeypatch.setattr(imageio, "write_image", failing_write)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        cli.main(["synthesize", "--model", MODEL, "-i", str(thick_scan), "-o", str(out / "sr.nrrd"), "--difference",
                  str(out / "difference.nrrd"), "--device", "cpu", "-q"])
    capsys.readouterr()
    assert len(written) == 2
    assert _files(tmp_path) == ["input/thick.nrrd"], "no output may be left by a failed run"
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------- worker


def test_worker_synthesize_job(thick_scan, tmp_path):
    job = jobs.Job(task="synthesize", model=MODEL, inputs={"image": str(thick_scan)}, folder=str(tmp_path / "job"),
                   outputs={"image": "thick 1mm.nrrd", "difference": "difference.nrrd"}, device="cpu",
                   options={"input_name": "Thick T2"})
    code, events = run_worker_job(job)
    assert code == 0, events[-1]
    stages = [event.stage for event in events]
    assert stages[0] == "start" and stages[-1] == "done", stages
    for stage in ("load_model", "read_input", "checks", "resample", "inference", "difference", "write"):
        assert stage in stages, f"no {stage} event in {stages}"
    progress = [event.progress for event in events if event.progress is not None]
    assert progress == sorted(progress) and progress[-1] == 1.0, progress

    result = events[-1].result
    written = json.loads((Path(job.folder) / jobs.RESULT_FILE_NAME).read_text())
    done_timings = dict(result["timings"])
    assert done_timings.pop("worker_total") > 0, "the done event adds the worker's total time"
    assert {**result, "timings": done_timings} == written, "result.json holds the done event's result"
    outputs_dir = job.outputs_dir
    assert result["outputs"] == {"image": str(outputs_dir / "thick 1mm.nrrd"),
                                 "difference": str(outputs_dir / "difference.nrrd")}
    assert sorted(path.name for path in outputs_dir.iterdir()) == ["difference.nrrd", "thick 1mm.nrrd"]
    grid = _expected_grid(thick_scan)
    for path in result["outputs"].values():
        _assert_on_grid(sitk.ReadImage(path), grid)
    assert not job.partial_dir.exists(), "the staging folder is renamed to outputs/"
    provenance = result["provenance"]
    assert provenance["model_id"] == MODEL and provenance["input"] == "Thick T2"
    assert provenance["parameters"]["difference"] is True and provenance["parameters"]["uncertainty"] is False
    assert provenance["pipeline"]["thick_axis"] == "K" and provenance["pipeline"]["test_time_flips"] == 1
    assert result["warnings"] == provenance["warnings"] and result["model_cached"] is False
    assert {"engine_import", "load_model", "inference", "worker_total"} <= set(result["timings"])
    assert "segments" not in result, "a synthesis result has no segments"


@pytest.mark.parametrize("case", ["segmentation model", "2D input"])
def test_worker_synthesize_job_errors_leave_nothing(thick_scan, tmp_path, case):
    image = thick_scan
    model = MODEL
    if case == "segmentation model":
        model = "deepbet"
    else:
        image = tmp_path / "flat.nrrd"
        sitk.WriteImage(sitk.Image([32, 32], sitk.sitkFloat32) + 1.0, str(image))
    job = jobs.Job(task="synthesize", model=model, inputs={"image": str(image)}, folder=str(tmp_path / "job"),
                   outputs={"image": "sr.nrrd"}, device="cpu")
    code, events = run_worker_job(job)
    assert code == 2, events[-1]
    final = events[-1]
    assert final.stage == "error" and final.traceback and "Traceback" in final.traceback
    if case == "segmentation model":
        assert final.error_type == "ModelError"
        assert final.message == "Model 'Brain extraction (deepbet)' is a segmentation model, not a synthesis model."
    else:
        assert final.error_type == "InputError" and "3D" in final.message, final.message
    assert final.message.endswith(".") and "\n" not in final.message
    assert not job.partial_dir.exists() and not job.outputs_dir.exists()
    assert not (Path(job.folder) / jobs.RESULT_FILE_NAME).exists()
