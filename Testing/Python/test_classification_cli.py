"""Scan type classification from the command line (`python -m MIADeepLearningLib classify`) and through the worker
protocol (job task "classify", one process per job and the warm worker): JSON and CSV results, saliency files named
after their inputs and lying on their grids, a bad volume among good ones reported while the others are classified,
and the `--no-type-check` switch of the other commands. Nothing here depends on which class the shipped weights give."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import DIRECTIONS, run_cli, run_worker_job, thick_blob_voxels

from MIADeepLearningLib import cli, jobs, runner, worker
from MIADeepLearningLib.engine import tasks
from MIADeepLearningLib.engine.classification import CLASSES
from MIADeepLearningLib.testing import sample_data

JSON_KEYS = {"input", "label", "probabilities", "ood", "reasons", "error"}
CSV_COLUMNS = ["input", "label", "probability", "runner_up", "runner_up_probability", "ood", "error"]


def _write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _head(spacing=(1.2, 1.2, 1.2), direction=None, shape=(40, 48, 44)) -> sitk.Image:
    image = sitk.GetImageFromArray(sample_data.phantom_head(shape))
    image.SetSpacing(spacing)
    image.SetOrigin((12.0, -30.5, 41.0))
    if direction is not None:
        image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    return image


def _thick(direction=DIRECTIONS["oblique"]) -> sitk.Image:
    image = sitk.GetImageFromArray(thick_blob_voxels(10, 5.5))
    image.SetSpacing((0.9, 0.9, 5.5))
    image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    image.SetOrigin((-17.0, 20.0, -24.0))
    return image


def _bad(folder: Path) -> Path:
    """A single slice: refused by every model's structure check."""
    return _write(sitk.GetImageFromArray(np.random.default_rng(0).normal(300, 50, (1, 30, 30)).astype(np.float32)),
                  folder / "single.nii.gz")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("classify_inputs")
    return {
        "head": _write(_head(), folder / "head.nrrd"),
        "oblique": _write(_head((1.1, 0.9, 2.2), DIRECTIONS["oblique"]), folder / "oblique.nii.gz"),
        "flipped": _write(_head((1.0, 1.3, 1.0), DIRECTIONS["flipped"]), folder / "flipped.mha"),
        "thick": _write(_thick(), folder / "thick.nrrd"),
    }


def _check_entry(entry: dict, source: Path) -> None:
    assert set(entry) >= JSON_KEYS and entry["input"] == str(source)
    assert entry["error"] is None and entry["label"] in CLASSES
    assert list(entry["probabilities"]) == list(CLASSES)
    assert sum(entry["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert isinstance(entry["ood"], bool) and isinstance(entry["reasons"], list)


def _assert_on_grid(output: sitk.Image, reference: sitk.Image) -> None:
    """NIfTI keeps the geometry in float32: equal within its precision."""
    assert output.GetSize() == reference.GetSize()
    np.testing.assert_allclose(output.GetSpacing(), reference.GetSpacing(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(output.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(output.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- the CLI


def test_one_file_in_a_process_of_its_own(volumes, tmp_path):
    out = tmp_path / "result.json"
    completed = run_cli("classify", "-i", str(volumes["head"]), "--json", str(out), "--device", "cpu")
    assert completed.returncode == 0, completed.stderr
    [entry] = json.loads(out.read_text(encoding="utf-8"))
    assert set(entry) == JSON_KEYS
    _check_entry(entry, volumes["head"])
    assert not list(tmp_path.glob("*.csv"))  # a CSV only for folders (or --csv)
    assert "[1/1] head" in completed.stderr and "1 of 1 volumes classified" in completed.stderr


def test_a_folder_gives_json_and_csv(volumes, tmp_path, capsys):
    out = tmp_path / "results" / "types.json"
    folder = volumes["head"].parent
    code = cli.main(["classify", "-i", str(folder), "--json", str(out), "--device", "cpu"])
    assert code == cli.EXIT_OK, capsys.readouterr().err
    entries = json.loads(out.read_text(encoding="utf-8"))
    sources = [path for _, path in cli.find_cases(folder)]
    assert [entry["input"] for entry in entries] == [str(path) for path in sources]
    for entry, source in zip(entries, sources):
        _check_entry(entry, source)
    with (tmp_path / "results" / "types.csv").open(encoding="utf-8", newline="") as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
    assert reader.fieldnames == CSV_COLUMNS
    for row, entry in zip(rows, entries):
        ranked = sorted(entry["probabilities"].items(), key=lambda item: -item[1])
        assert row["input"] == entry["input"] and row["label"] == entry["label"] and row["error"] == ""
        assert float(row["probability"]) == pytest.approx(entry["probabilities"][entry["label"]], abs=1e-4)
        assert row["runner_up"] in CLASSES and row["runner_up"] != row["label"]
        assert float(row["runner_up_probability"]) <= float(row["probability"]) + 1e-4
        assert row["runner_up"] == next(name for name, _ in ranked if name != entry["label"])
        assert row["ood"] == str(entry["ood"]).lower()
    assert len(rows) == len(entries) == 4


def test_saliency_files_are_named_after_their_inputs_and_on_their_grids(volumes, tmp_path, capsys):
    saliency = tmp_path / "saliency"
    code = cli.main(["classify", "-i", str(volumes["oblique"]), "-i", str(volumes["flipped"]), "-i",
                     str(volumes["thick"]), "--json", str(tmp_path / "r.json"), "--saliency-dir", str(saliency),
                     "--device", "cpu", "-q"])
    assert code == cli.EXIT_OK, capsys.readouterr().err
    assert sorted(path.name for path in saliency.iterdir()) == [
        "flipped_saliency.nii.gz", "oblique_saliency.nii.gz", "thick_saliency.nii.gz"]
    entries = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    for entry, name in zip(entries, ("oblique", "flipped", "thick")):
        assert entry["saliency"] == str(saliency / f"{name}_saliency.nii.gz")
        output = sitk.ReadImage(entry["saliency"])
        _assert_on_grid(output, sitk.ReadImage(str(volumes[name])))
        values = sitk.GetArrayViewFromImage(output)
        assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6
    assert not (tmp_path / "r.csv").exists()


def test_a_bad_file_among_good_ones(volumes, tmp_path, capsys):
    folder = tmp_path / "mixed"
    _write(_head(), folder / "a_head.nrrd")
    _bad(folder)
    _write(_thick(DIRECTIONS["identity"]), folder / "z_thick.nii.gz")
    missing = tmp_path / "absent.nii.gz"
    out = tmp_path / "mixed.json"
    code = cli.main(["classify", "-i", str(folder), "-i", str(missing), "--json", str(out),
                     "--saliency-dir", str(tmp_path / "maps"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_SOME_CASES_FAILED
    entries = {Path(entry["input"]).name: entry for entry in json.loads(out.read_text(encoding="utf-8"))}
    assert list(entries) == ["a_head.nrrd", "single.nii.gz", "z_thick.nii.gz", "absent.nii.gz"]
    for name in ("a_head.nrrd", "z_thick.nii.gz"):
        _check_entry(entries[name], folder / name if name != "absent.nii.gz" else missing)
    single = entries["single.nii.gz"]
    assert single["label"] is None and single["saliency"] is None
    assert single["error"] == ("The input volume is a single slice (30×30×1 voxels); the model needs a 3D volume.")
    assert entries["absent.nii.gz"]["error"] == f"Input image {missing} does not exist."
    assert f"failed: single ({folder / 'single.nii.gz'}): {single['error']}" in err
    assert f"failed: absent ({missing}): " in err and "2 of 4 volumes classified, 2 failed" in err
    assert sorted(path.name for path in (tmp_path / "maps").iterdir()) == ["a_head_saliency.nii.gz",
                                                                         "z_thick_saliency.nii.gz"]
    rows = list(csv.DictReader((tmp_path / "mixed.csv").open(encoding="utf-8", newline="")))
    assert [row["error"] for row in rows][1] == single["error"] and rows[1]["label"] == ""


@pytest.mark.parametrize("case", ["unknown_model", "segmentation_model", "same_names", "empty_folder"])
def test_refusals_before_any_volume(volumes, tmp_path, capsys, case):
    arguments = ["classify", "-i", str(volumes["head"]), "--json", str(tmp_path / "r.json"), "--device", "cpu"]
    expected = {"unknown_model": "Unknown model 'nope'",
                "segmentation_model": "is a segmentation model, not a classification model",
                "same_names": "Several inputs are named head",
                "empty_folder": "has no image files"}[case]
    if case == "unknown_model":
        arguments += ["--model", "nope"]
    elif case == "segmentation_model":
        arguments += ["--model", "deepbet"]
    elif case == "same_names":
        other = _write(_head(), tmp_path / "other" / "head.nii.gz")
        arguments += ["-i", str(other), "--saliency-dir", str(tmp_path / "maps")]
    else:
        (tmp_path / "empty").mkdir()
        arguments += ["-i", str(tmp_path / "empty")]
    assert cli.main(arguments) == cli.EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "r.json").exists()


def test_help_documents_the_exit_codes_and_the_type_check():
    text = cli.build_parser()._subparsers._group_actions[0].choices["classify"].format_help()
    assert "3  some volumes failed" in text and "<case>_saliency.nii.gz" in text
    segment = cli.build_parser()._subparsers._group_actions[0].choices["segment"].format_help()
    assert "--no-type-check" in segment and "MIADL_TYPE_CHECK=0" in segment


def test_no_type_check_reaches_the_task(monkeypatch, volumes, tmp_path):
    seen = {}

    class Output:
        label = masked = uncertainty = None
        warnings: ClassVar[list] = []
        provenance: ClassVar[dict] = {}
        segments: ClassVar[list] = []

    def fake_segment(*args, **kwargs):
        seen.update(kwargs)
        return Output()

    monkeypatch.setattr(tasks, "segment_image", fake_segment)
    monkeypatch.setattr("MIADeepLearningLib.engine.imageio.write_image", lambda image, path, compress=True: path)
    cli.main(["segment", "--model", "deepbet", "-i", str(volumes["head"]), "-o", str(tmp_path / "l.nrrd"),
              "--no-type-check", "-q"])
    assert seen["type_check"] is False
    cli.main(["segment", "--model", "deepbet", "-i", str(volumes["head"]), "-o", str(tmp_path / "l.nrrd"), "-q"])
    assert seen["type_check"] is None


# ------------------------------------------------------------------------------------------------- the worker


def _classify_job(folder: Path, inputs: dict[str, Path], saliency=(), model: str = "sequence-type") -> jobs.Job:
    return jobs.Job(task="classify", model=model, inputs={key: str(path) for key, path in inputs.items()},
                    folder=str(folder), outputs={f"saliency_{key}": f"saliency_{key}.nrrd" for key in saliency},
                    device="cpu", options={"input_names": {key: f"Volume {key}" for key in inputs}})


def test_worker_classify_job(volumes, tmp_path):
    bad = _bad(tmp_path)
    job = _classify_job(tmp_path / "job", {"t1": volumes["oblique"], "thick": volumes["thick"], "bad": bad},
                        saliency=("thick", "bad"))
    code, events = run_worker_job(job)
    final = events[-1]
    assert code == 0 and final.stage == jobs.STAGE_DONE, final
    stages = [event.stage for event in events]
    assert stages[0] == "start" and "load_model" in stages and "classify" in stages and "write" in stages
    progress = [event.progress for event in events if event.progress is not None]
    assert progress == sorted(progress)
    result = final.result
    assert set(result["classifications"]) == {"t1", "thick", "bad"}
    for key in ("t1", "thick"):
        entry = result["classifications"][key]
        assert set(entry) == {"label", "probabilities", "ood", "reasons", "error", "timings"}
        assert entry["error"] is None and entry["label"] in CLASSES
        assert sum(entry["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["classifications"]["bad"]["label"] is None
    assert "single slice" in result["classifications"]["bad"]["error"]
    assert any("Volume bad: not classified" in event.message for event in events)
    assert result["outputs"] == {"saliency_thick": str(job.outputs_dir / "saliency_thick.nrrd")}
    saliency = sitk.ReadImage(result["outputs"]["saliency_thick"])
    reference = sitk.ReadImage(str(volumes["thick"]))
    assert saliency.GetSize() == reference.GetSize()  # NRRD both ways: equal up to the last bit of a double
    for get in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
        np.testing.assert_allclose(get(saliency), get(reference), rtol=0, atol=1e-9)
    provenance = result["provenance"]
    assert provenance["model_id"] == "sequence-type" and provenance["inputs"] == ["Volume t1", "Volume thick",
                                                                                  "Volume bad"]
    assert {"load_model", "classify", "engine_import", "worker_total"} <= set(result["timings"])
    assert result["model_cached"] is False
    stored = json.loads((Path(job.folder) / jobs.RESULT_FILE_NAME).read_text(encoding="utf-8"))
    assert stored["classifications"] == result["classifications"] and stored["outputs"] == result["outputs"]
    assert not job.partial_dir.exists()


@pytest.mark.parametrize("case", ["no_inputs", "unknown_output", "segmentation_model"])
def test_worker_classify_refusals(volumes, tmp_path, case):
    inputs = {} if case == "no_inputs" else {"a": volumes["head"]}
    job = _classify_job(tmp_path / "job", inputs, model="deepbet" if case == "segmentation_model" else "sequence-type")
    if case == "unknown_output":
        job.outputs = {"label": "label.nrrd"}
    code, events = run_worker_job(job)
    final = events[-1]
    assert code == 2 and final.stage == jobs.STAGE_ERROR
    expected = {"no_inputs": "needs at least one input volume", "unknown_output": "Unknown classify output(s) label",
                "segmentation_model": "not a classification model"}[case]
    assert expected in final.message and "\n" not in final.message
    assert not job.outputs_dir.exists() and not job.partial_dir.exists()


def test_worker_classify_job_in_a_worker_process(volumes, tmp_path):
    job = _classify_job(tmp_path / "job", {"a": volumes["head"], "b": volumes["flipped"]}, saliency=("a",))
    run = runner.run(job, timeout_s=300)
    final = run.final_event
    assert run.state == runner.STATE_DONE and final.stage == jobs.STAGE_DONE, (final, run.log_lines)
    assert set(final.result["classifications"]) == {"a", "b"}
    assert set(final.result["outputs"]) == {"saliency_a"} and Path(final.result["outputs"]["saliency_a"]).is_file()


def test_warm_worker_keeps_the_classifier_between_classify_jobs(volumes, tmp_path):
    first = _classify_job(tmp_path / "one", {"a": volumes["head"]})
    second = _classify_job(tmp_path / "two", {"a": volumes["thick"], "b": volumes["oblique"]})
    stream = io.StringIO()
    stdin = io.StringIO(f"{first.write()}\n{second.write()}\n{jobs.SHUTDOWN_COMMAND}\n")
    assert worker.serve(stdin=stdin, reporter=worker.Reporter(stream)) == 0
    finals = [event for event in map(jobs.Event.from_line, stream.getvalue().splitlines())
              if event is not None and event.stage == jobs.STAGE_DONE]
    assert [event.job for event in finals] == [str(first.write()), str(second.write())]
    assert finals[0].result["model_cached"] is False and finals[1].result["model_cached"] is True
    assert set(finals[1].result["classifications"]) == {"a", "b"}
