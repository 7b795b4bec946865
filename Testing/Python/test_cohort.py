"""Cohorts (cohort.py): folder runs of segment and synthesize and register --pairs, on the local engine and on a
real local Ray instance (loopback only, one per test module), with identical outputs; resume, retries of a failing
case and of a killed worker, the report, the progress bar and the one-sentence refusals. Tiny inputs, 1 thread."""

from __future__ import annotations

import builtins
import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import TISSUE_MODEL_ID, registration_phantom_pair, thick_blob_voxels, write_tissue_package

from MIADeepLearningLib import cli, cohort
from MIADeepLearningLib.engine import displacement, registry


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


def _head(path: Path, seed: int) -> Path:
    """A small oblique thick-slice volume (bright ball in a darker one) that the tiny tissue model runs in ~0.1 s."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:10, :40, :36].astype(np.float32)
    radius = np.sqrt((x - 18) ** 2 + (y - 20) ** 2 + (5.0 * (z - 4.5)) ** 2)
    voxels = np.where(radius < 16, 120.0, 0.0) + np.where(radius < 9, 180.0, 0.0) + rng.normal(0, 2, z.shape)
    image = sitk.GetImageFromArray(np.clip(voxels, 0, None).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 5.0))
    image.SetDirection((0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _voxels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def tissue_model(tmp_path_factory):
    """The tiny tissue package, visible to this process and (MIADL_* variables are forwarded) to Ray's actors."""
    root = tmp_path_factory.mktemp("models")
    write_tissue_package(root)
    before = os.environ.get(registry.EXTRA_MODELS_ENV)
    os.environ[registry.EXTRA_MODELS_ENV] = str(root)
    yield TISSUE_MODEL_ID
    if before is None:
        os.environ.pop(registry.EXTRA_MODELS_ENV, None)
    else:
        os.environ[registry.EXTRA_MODELS_ENV] = before


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("heads")
    for index in range(3):
        _head(folder / f"head{index}.nrrd", seed=index)
    return folder


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module (start-up costs seconds); a failure in CI when Ray is missing."""
    try:
        import ray
    except ImportError:
        if os.environ.get("MIADL_REQUIRE_ALL"):
            pytest.fail(f"prerequisite missing in CI: Ray ({cohort.RAY_INSTALL_HINT})")
        pytest.skip("Ray is not installed")
    ray = cohort.start_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def _segment(heads: Path, out: Path, *extra: str) -> int:
    return cli.main(["segment", "--model", TISSUE_MODEL_ID, "-i", str(heads), "-o", str(out), "--device", "cpu",
                     "--cpus-per-worker", "1", *extra])


# ------------------------------------------------------------------------------------------ local vs ray


def test_segment_folder_on_ray_is_identical_to_local(tissue_model, heads, tmp_path, ray_instance, capsys):
    assert {node["NodeManagerAddress"] for node in ray_instance.nodes()} == {"127.0.0.1"}  # loopback only
    assert _segment(heads, tmp_path / "local", "-q") == cli.EXIT_OK
    assert _segment(heads, tmp_path / "ray", "--engine", "ray", "--workers", "2") == cli.EXIT_OK, \
        capsys.readouterr().err
    err = capsys.readouterr().err
    assert "engine: ray (local instance): 2 workers x 1 CPU" in err and "3 of 3 cases succeeded" in err
    rows = _read(tmp_path / "ray" / "report.csv")
    assert list(rows[0]) == cli.REPORT_COLUMNS
    assert sorted(row["case"] for row in rows) == ["head0", "head1", "head2"]
    for row in rows:
        assert row["status"] == "ok" and row["attempts"] == "1" and float(row["seconds"]) > 0
        assert "/" in row["worker"] and row["worker"].split("/")[1] != str(os.getpid())  # actor id / its pid
        name = Path(row["output"]).name
        np.testing.assert_array_equal(_voxels(tmp_path / "ray" / name), _voxels(tmp_path / "local" / name))
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    local_rows = _read(tmp_path / "local" / "report.csv")
    assert {row["worker"] for row in local_rows} == {str(os.getpid())}


def test_synthesize_folder_on_ray_is_identical_to_local(tmp_path, ray_instance):
    cases = tmp_path / "cases"
    cases.mkdir()
    image = sitk.GetImageFromArray(thick_blob_voxels(8, 5.0))
    image.SetSpacing((1.0, 1.0, 5.0))
    sitk.WriteImage(image, str(cases / "blob.nii.gz"))
    outputs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        code = cli.main(["synthesize", "--model", "thick-slice-sr", "-i", str(cases), "-o", str(out), "--device",
                         "cpu", "--cpus-per-worker", "1", "--engine", engine, "-q"])
        assert code == cli.EXIT_OK
        rows = _read(out / "report.csv")
        assert [row["status"] for row in rows] == ["ok"] and list(rows[0]) == [
            "case", "input", "status", "seconds", "output", "warnings", "error", "worker", "attempts"]
        outputs[engine] = _voxels(Path(rows[0]["output"]))
    # one thread in both: the same float32 voxels, bit for bit
    np.testing.assert_array_equal(outputs["ray"], outputs["local"])


def test_register_pairs_on_ray_is_identical_to_local(tmp_path, ray_instance):
    fixed, _, moving, _ = registration_phantom_pair()
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nrrd"))
    sitk.WriteImage(moving, str(tmp_path / "moving.nrrd"))
    (tmp_path / "pairs.csv").write_text("fixed,moving,name\nfixed.nrrd,moving.nrrd,p1\n", encoding="utf-8")
    for engine in ("local", "ray"):
        code = cli.main(["register", "--model", "brain-registration", "--pairs", str(tmp_path / "pairs.csv"), "-o",
                         str(tmp_path / engine), "--device", "cpu", "--cpus-per-worker", "1", "--engine", engine,
                         "-q"])
        assert code == cli.EXIT_OK
        rows = _read(tmp_path / engine / "report.csv")
        assert list(rows[0]) == cli.REGISTER_REPORT_COLUMNS and rows[0]["status"] == "ok"
        assert rows[0]["output"] == str(tmp_path / engine / "p1_warped.nrrd")
    for name in ("p1_warped.nrrd", "p1_report.json"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    fields = [displacement.read_field(tmp_path / engine / "p1_field.h5") for engine in ("local", "ray")]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(displacement.field_of(fields[0])),
                                  sitk.GetArrayFromImage(displacement.field_of(fields[1])))


def test_a_killed_worker_and_a_failing_case_are_retried_once(tissue_model, heads, tmp_path, ray_instance,
                                                               monkeypatch, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    for path in heads.iterdir():
        (cases / path.name).write_bytes(path.read_bytes())
    (cases / "broken.nrrd").write_bytes(b"not an image")
    monkeypatch.setenv(cohort.FAULT_ENV, "head0:exit,head1:raise")  # first attempts only
    code = _segment(cases, tmp_path / "out", "--engine", "ray", "--workers", "2", "-q")
    err = capsys.readouterr().err
    assert code == cli.EXIT_SOME_CASES_FAILED, err
    rows = {row["case"]: row for row in _read(tmp_path / "out" / "report.csv")}
    assert {case: (row["status"], row["attempts"]) for case, row in rows.items()} == {
        "broken": ("failed", "2"), "head0": ("ok", "2"), "head1": ("ok", "2"), "head2": ("ok", "1")}
    assert "cannot be read" in rows["broken"]["error"]
    assert "1 failed (broken)" in err


# ------------------------------------------------------------------------------------------ local engine


def test_resume_skips_done_cases_and_redoes_changed_or_interrupted_ones(tissue_model, heads, tmp_path, capsys):
    cases, out = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    for path in heads.iterdir():
        (cases / path.name).write_bytes(path.read_bytes())
    assert _segment(cases, out, "-q") == cli.EXIT_OK
    first = {path.name: path.stat().st_mtime_ns for path in out.glob("*.nrrd")}
    _head(cases / "head1.nrrd", seed=7)  # changed input: its sha256 no longer matches the sidecar
    (out / "head2_tissue.nrrd").unlink()  # an interrupted run: the output missing, a half-written staging file
    partial = out / cohort.SIDECAR_DIR / "partial" / "head2-999"
    partial.mkdir(parents=True)
    (partial / "head2_tissue.nrrd").write_bytes(b"half")
    assert _segment(cases, out) == cli.EXIT_OK
    err = capsys.readouterr().err
    rows = {row["case"]: row for row in _read(out / "report.csv")}
    assert {case: row["status"] for case, row in rows.items()} == {"head0": "skipped", "head1": "ok", "head2": "ok"}
    assert rows["head0"]["output"] == str(out / "head0_tissue.nrrd") and rows["head0"]["attempts"] == "0"
    assert (out / "head0_tissue.nrrd").stat().st_mtime_ns == first["head0_tissue.nrrd"]
    assert (out / "head1_tissue.nrrd").stat().st_mtime_ns != first["head1_tissue.nrrd"]
    assert "3 of 3 cases succeeded (1 already done)" in err
    assert not (out / cohort.SIDECAR_DIR / "partial").exists()
    assert sorted(path.name for path in (out / cohort.SIDECAR_DIR).iterdir()) == [
        "head0.json", "head1.json", "head2.json"]
    # --no-resume runs everything again
    assert _segment(cases, out, "-q", "--no-resume") == cli.EXIT_OK
    assert {row["status"] for row in _read(out / "report.csv")} == {"ok"}


def test_a_failing_case_is_retried_once_then_reported_locally(tissue_model, heads, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(cohort.FAULT_ENV, "head1:raise")
    assert _segment(heads, tmp_path / "out", "-q") == cli.EXIT_OK
    rows = {row["case"]: row for row in _read(tmp_path / "out" / "report.csv")}
    assert (rows["head1"]["status"], rows["head1"]["attempts"]) == ("ok", "2")
    assert rows["head0"]["attempts"] == "1"
    assert capsys.readouterr().err == ""  # -q: no progress, no retry lines


def test_progress_bar_on_a_terminal_and_quiet():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = cohort.CohortProgress(2, stream=stream)
    assert progress.bar is not None  # tqdm
    progress.case_started(1, "a")
    progress.case_finished(1, "a", "ok", 1.0, "")
    progress.close()
    text = stream.getvalue()
    assert "[1/2] a: ok in 1.0 s" in text and "1/2" in text and "case" in text and "\r" in text
    quiet = Terminal()
    silent = cohort.CohortProgress(2, stream=quiet, quiet=True)
    silent.case_started(1, "a")
    silent.case_finished(1, "a", "ok", 1.0, "")
    silent.close()
    assert silent.bar is None and quiet.getvalue() == ""


# ------------------------------------------------------------------------------------------ refusals


def _one_line_error(capsys, phrase: str) -> None:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], err


def test_no_ray_installed_is_one_sentence(tissue_model, heads, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert _segment(heads, tmp_path / "out", "--engine", "ray", "-q") == cli.EXIT_USAGE
    _one_line_error(capsys, f"needs Ray, which is not installed here: pip install ray=={cohort.RAY_PIN}")
    assert not (tmp_path / "out").exists()


def test_cohort_refusals(tissue_model, heads, tmp_path, capsys):
    assert _segment(heads, tmp_path / "o1", "--engine", "ray", "--ray-address", "127.0.0.1:1", "-q") == 2
    _one_line_error(capsys, "Could not reach the Ray cluster at 127.0.0.1:1")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _segment(empty, tmp_path / "o2", "-q") == 2
    _one_line_error(capsys, "has no image files")
    assert _segment(heads, tmp_path / "o3", "--workers", "2", "-q") == 2
    _one_line_error(capsys, "--workers goes with --engine ray")
    assert cli.main(["segment", "--model", TISSUE_MODEL_ID, "-i", str(heads / "head0.nrrd"), "-o",
                     str(tmp_path / "l.nrrd"), "--engine", "ray"]) == 2
    _one_line_error(capsys, "--engine ray is for a cohort")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"{heads / 'head0.nrrd'},{heads / 'head1.nrrd'}\n{heads / 'head0.nrrd'},missing.nrrd\n",
                     encoding="utf-8")
    assert cli.main(["register", "--model", "brain-registration", "--pairs", str(pairs), "-o",
                     str(tmp_path / "o4")]) == 2
    _one_line_error(capsys, f"Line 2 of pairs.csv: the moving image {tmp_path / 'missing.nrrd'} does not exist.")
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4"))
