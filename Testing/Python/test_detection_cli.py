"""Lesion detection from the command line (`python -m MIADeepLearningLib detect`) and through the worker protocol
(job task "detect", one job and the warm worker): maps exactly on the first input's grid, the JSON summary and the
result fields, refusals in one sentence with exit code 2 and nothing written, an unexpected failure in one line with
exit code 1 and nothing written. Nothing here depends on what the shipped weights find."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import DIRECTIONS, run_cli, run_worker_job

from MIADeepLearningLib import cli, jobs, worker
from MIADeepLearningLib.engine import candidates, imageio, registry, tasks
from MIADeepLearningLib.testing import sample_data

MODEL_ID = "brain-lesion"
JSON_KEYS = {"input", "inputs", "model", "threshold", "case_score", "candidates", "warnings", "provenance"}
CANDIDATE_KEYS = {"label", "volume_ml", "center_ras", "max_score", "mean_score", "tissue"}
FAST = {"flip_average": False}  # one network pass per input instead of two: the worker tests' model options


def _image(voxels: np.ndarray, direction=None, spacing=(3.6, 3.1, 4.0), origin=(-70.0, 85.0, -60.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(voxels))
    image.SetSpacing([float(value) for value in spacing])
    image.SetOrigin([float(value) for value in origin])
    if direction is not None:
        image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    return image


def _head(direction=None, spacing=(3.6, 3.1, 4.0), origin=(-70.0, 85.0, -60.0), shape=(36, 44, 40)) -> sitk.Image:
    """A phantom head of adult size on coarse voxels (a run takes seconds)."""
    return _image(sample_data.phantom_head(shape), direction, spacing, origin)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("detect_inputs")
    oblique = np.diag([-1.0, 1.0, 1.0]) @ DIRECTIONS["oblique"]  # mirrored and oblique
    spacing = np.array([3.3, 2.9, 4.1])
    centre = oblique @ ((np.array([40, 44, 36]) - 1) * spacing / 2)  # the head's centre at (0, 0, 0) mm
    head = _head(oblique, spacing=spacing, origin=-centre)
    t2 = sitk.Resample(head, _head(spacing=(3.0, 3.0, 3.0), origin=(-126.0, -126.0, -126.0), shape=(85, 85, 85)),
                       sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)  # the same head on another grid
    nan = sample_data.phantom_head((36, 44, 40))
    nan[3, 4, 5] = np.nan
    return {
        "head": imageio.write_image(head, folder / "head.nrrd"),
        "t2": imageio.write_image(t2, folder / "t2.nii.gz"),
        "far": imageio.write_image(_head(origin=(600.0, 85.0, -60.0)), folder / "far.nrrd"),
        "two_d": imageio.write_image(sitk.GetImageFromArray(np.random.default_rng(0).normal(300, 50, (30, 30))),
                                     folder / "slice.nii.gz"),
        "nan": imageio.write_image(_image(nan), folder / "nan.nrrd"),
        "box": imageio.write_image(_image(np.pad(np.full((12, 12, 12), 400.0, np.float32), 6) +
                                          np.random.default_rng(1).normal(0, 4, (24, 24, 24)).astype(np.float32),
                                          spacing=(1.0, 1.0, 1.0)), folder / "box.nrrd"),
    }


def _assert_on_grid(output: sitk.Image, reference: sitk.Image, atol: float = 1e-9) -> None:
    """NRRD keeps the geometry in full: equal to the last bit (atol 1e-9); NIfTI in float32 (pass a looser atol)."""
    assert output.GetSize() == reference.GetSize()
    np.testing.assert_allclose(output.GetSpacing(), reference.GetSpacing(), rtol=0, atol=max(atol, 1e-9))
    np.testing.assert_allclose(output.GetOrigin(), reference.GetOrigin(), rtol=0, atol=atol)
    np.testing.assert_allclose(output.GetDirection(), reference.GetDirection(), rtol=0, atol=atol)


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message[:-1]


def _files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


# ---------------------------------------------------------------------------------------------------- the CLI


def test_detect_in_a_process_of_its_own(volumes, tmp_path):
    out = tmp_path / "out"
    completed = run_cli("detect", "-i", str(volumes["head"]), "-i", str(volumes["t2"]),
                        "-o", str(out / "anomaly.nii.gz"), "--lesions", str(out / "lesions.nrrd"),
                        "--brain", str(out / "brain.nrrd"), "--json", str(out / "candidates.json"),
                        "--provenance", str(out / "provenance.json"), "--threshold", "0.02", "--min-volume", "5",
                        "--device", "cpu")
    assert completed.returncode == 0, completed.stderr
    assert _files(out) == ["anomaly.nii.gz", "brain.nrrd", "candidates.json", "lesions.nrrd", "provenance.json"]
    reference = sitk.ReadImage(str(volumes["head"]))
    anomaly = sitk.ReadImage(str(out / "anomaly.nii.gz"))
    lesions = sitk.ReadImage(str(out / "lesions.nrrd"))
    brain = sitk.ReadImage(str(out / "brain.nrrd"))
    _assert_on_grid(anomaly, reference, atol=1e-4)  # NIfTI: float32 geometry
    _assert_on_grid(lesions, reference)
    _assert_on_grid(brain, reference)
    assert anomaly.GetPixelID() == sitk.sitkFloat32 and lesions.GetPixelID() == sitk.sitkUInt16
    assert brain.GetPixelID() == sitk.sitkUInt8
    values = sitk.GetArrayViewFromImage(anomaly)
    assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6
    summary = json.loads((out / "candidates.json").read_text(encoding="utf-8"))
    assert set(summary) == JSON_KEYS
    assert summary["input"] == str(volumes["head"]) and summary["inputs"] == [str(volumes["head"]),
                                                                              str(volumes["t2"])]
    assert summary["model"] == MODEL_ID and summary["threshold"] == 0.02 and 0.0 <= summary["case_score"] <= 1.0
    labels = sitk.GetArrayViewFromImage(lesions)
    assert sorted(set(np.unique(labels)) - {0}) == [item["label"] for item in summary["candidates"]]
    voxel_ml = float(np.prod(reference.GetSpacing())) / 1000.0
    for item in summary["candidates"]:
        assert set(item) == CANDIDATE_KEYS and len(item["center_ras"]) == 3
        assert item["volume_ml"] == pytest.approx(int((labels == item["label"]).sum()) * voxel_ml, abs=1e-4)
        assert item["volume_ml"] * 1000.0 >= 5.0 and item["max_score"] > 0.02
        assert item["tissue"] in candidates.TISSUE_NAMES.values()
        assert float(values[labels == item["label"]].max()) == pytest.approx(item["max_score"], abs=1e-4)
    assert not np.asarray(labels)[sitk.GetArrayViewFromImage(brain) == 0].any()
    provenance = summary["provenance"]
    assert provenance["model_id"] == MODEL_ID and provenance["inputs"] == ["head.nrrd", "t2.nii.gz"]
    assert provenance["parameters"]["threshold"] == 0.02 and provenance["parameters"]["min_volume_mm3"] == 5.0
    assert provenance["candidates"] == len(summary["candidates"]) and provenance["case_score"] == summary[
        "case_score"]
    sidecar = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    assert sidecar["model_id"] == MODEL_ID and len(sidecar["segments"]) == len(summary["candidates"])
    assert "candidate(s) above 0.02" in completed.stderr and "wrote " in completed.stderr
    assert "Traceback" not in completed.stderr and completed.stdout == ""


def test_a_refusal_in_a_process_of_its_own_is_one_line(volumes, tmp_path):
    out = tmp_path / "out"
    completed = run_cli("detect", "-i", str(volumes["two_d"]), "-o", str(out / "a.nrrd"), "--lesions",
                        str(out / "l.nrrd"), "--json", str(out / "c.json"), "--device", "cpu", "-q")
    assert completed.returncode == cli.EXIT_USAGE
    assert completed.stderr == "error: The input volume is 2D; the model needs a 3D volume.\n"
    assert completed.stdout == "" and _files(tmp_path) == []


REFUSALS = {  # case -> (extra arguments or input names, phrase in the one line)
    "two_d": (["two_d"], "The input volume is 2D; the model needs a 3D volume."),
    "nan": (["nan"], "The input volume has 1 voxels that are NaN or infinite"),
    "nan_second": (["head", "nan"], "The extra input nan.nrrd has 1 voxels that are NaN or infinite"),
    "missing": (["head", "missing"], "does not exist."),
    "unknown_model": (["head", "--model", "nope"], "Unknown model 'nope' (available: "),
    "segmentation_model": (["head", "--model", "brain-tissue"], "is a segmentation model, not a detection model."),
    "not_overlapping": (["head", "far"], "The extra input far.nrrd covers only 0% of the first input's head"),
    "no_brain": (["box"], "This does not look like a brain MRI"),
    "threshold_zero": (["head", "--threshold", "0"], "--threshold must lie between 0 and 1"),
    "threshold_high": (["head", "--threshold", "1.5"], "--threshold must lie between 0 and 1"),
    "negative_volume": (["head", "--min-volume", "-3"], "--min-volume must be 0 or more"),
    "same_input_twice": (["head", "head"], "The same file is given twice"),
    "folder": (["folder"], "is not a file"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_sentence_and_write_nothing(volumes, tmp_path, capsys, case):
    words, phrase = REFUSALS[case]
    arguments = ["detect"]
    for word in words:
        if word.startswith("-") or arguments[-1].startswith("--"):
            arguments.append(word)
        elif word == "missing":
            arguments += ["-i", str(tmp_path / "absent.nii.gz")]
        elif word == "folder":
            arguments += ["-i", str(volumes["head"].parent)]
        else:
            arguments += ["-i", str(volumes[word])]
    out = tmp_path / "out"
    arguments += ["-o", str(out / "a.nrrd"), "--lesions", str(out / "l.nrrd"), "--json", str(out / "c.json"),
                  "--device", "cpu", "-q"]
    assert cli.main(arguments) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], lines
    assert _one_sentence(lines[0][len("error: "):]), lines[0]
    assert captured.out == "" and (not out.exists() or _files(out) == [])


@pytest.mark.parametrize("case", ["same_outputs", "overwrites_input", "no_extension"])
def test_bad_output_names_are_refused_before_the_model_runs(volumes, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(tasks, "detect_lesions", lambda *args, **kwargs: pytest.fail("the model ran"))
    anomaly, lesions = tmp_path / "a.nrrd", tmp_path / "l.nrrd"
    expected = {"same_outputs": "must be different files", "overwrites_input": "would overwrite an input",
                "no_extension": "needs an image extension"}[case]
    if case == "same_outputs":
        lesions = anomaly
    elif case == "overwrites_input":
        anomaly = volumes["head"]
    else:
        lesions = tmp_path / "lesions"
    code = cli.main(["detect", "-i", str(volumes["head"]), "-o", str(anomaly), "--lesions", str(lesions), "-q"])
    assert code == cli.EXIT_USAGE and expected in capsys.readouterr().err
    assert _files(tmp_path) == []


class _StandIn:
    """A detection pipeline that answers at once: one candidate of 8 voxels, the maps on the input's grid."""

    seen: ClassVar[list] = []

    def __init__(self, model, weight_paths, device, options):
        self.options = options

    def to(self, device):
        return self

    def predict(self, image, progress, extra_images=()):
        _StandIn.seen.append(self.options)
        labels = np.zeros(image.GetSize()[::-1], np.uint16)
        labels[10:12, 10:12, 10:12] = 1
        found = [{"label": 1, "volume_ml": 0.3, "center_ras": [1.0, 2.0, 3.0], "max_score": 0.8, "mean_score": 0.7,
                  "tissue": "white matter", "voxels": 8}]

        def on_grid(voxels):
            result = sitk.GetImageFromArray(voxels)
            result.CopyInformation(image)
            return result

        return {"anomaly": on_grid(labels * np.float32(0.8)), "label": on_grid(labels),
                "brain": on_grid((labels + 2).astype(np.uint8)), "candidates": found, "case_score": 0.25,
                "threshold": float(self.options["threshold"]), "segments": [{"value": 1, "name": "Candidate 1"}],
                "warnings": ["A stand-in warning."], "provenance": {"stand_in": True}}


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setitem(tasks.PIPELINES, registry.get_model(MODEL_ID).pipeline, _StandIn)
    _StandIn.seen = []


def test_without_json_the_summary_goes_to_stdout(stand_in, volumes, tmp_path, capsys):
    code = cli.main(["detect", "-i", str(volumes["head"]), "-o", str(tmp_path / "a.mha"), "--lesions",
                     str(tmp_path / "l.nrrd"), "--min-volume", "0", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    summary = json.loads(captured.out)
    assert set(summary) == JSON_KEYS and summary["case_score"] == 0.25 and summary["threshold"] == 0.5
    assert summary["candidates"] == [{"label": 1, "volume_ml": 0.3, "center_ras": [1.0, 2.0, 3.0], "max_score": 0.8,
                                      "mean_score": 0.7, "tissue": "white matter"}]  # no voxel count
    assert summary["warnings"] == ["A stand-in warning."] and "warning: A stand-in warning." in captured.err
    assert "1 candidate(s) above 0.5: C1 0.30 mL (max 0.80, white matter); case score 0.250" in captured.err
    assert _StandIn.seen[0]["min_volume_mm3"] == 0.0 and _StandIn.seen[0]["threshold"] == 0.5
    assert _files(tmp_path) == ["a.mha", "l.nrrd"]


def test_an_unexpected_failure_is_one_line_and_leaves_nothing(stand_in, volumes, tmp_path, capsys, monkeypatch):
    real_write, written = imageio.write_image, []

    def failing_write(image, path, compress=True):
        written.append(path)
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        return real_write(image, path, compress)

    monkeypatch.setattr(imageio, "write_image", failing_write)
    out = tmp_path / "out"
    code = cli.main(["detect", "-i", str(volumes["head"]), "-o", str(out / "a.nrrd"), "--lesions",
                     str(out / "l.nrrd"), "--brain", str(out / "b.nrrd"), "--json", str(out / "c.json"), "-q"])
    assert code == cli.EXIT_UNEXPECTED and len(written) == 2
    assert capsys.readouterr().err == ("error: Lesion detection failed unexpectedly (OSError: [Errno 28] No space "
                                       "left on device).\n")
    assert [path for path in out.rglob("*")] == []  # no output, no staging folder


def test_no_type_check_reaches_the_task(monkeypatch, volumes, tmp_path):
    seen = {}

    def fake_detect(*args, **kwargs):
        seen.update(kwargs)
        raise tasks.InputError("Stop here.")

    monkeypatch.setattr(tasks, "detect_lesions", fake_detect)
    arguments = ["detect", "-i", str(volumes["head"]), "-o", str(tmp_path / "a.nrrd"), "--lesions",
                 str(tmp_path / "l.nrrd"), "-q"]
    assert cli.main([*arguments, "--no-type-check"]) == cli.EXIT_USAGE and seen["type_check"] is False
    assert cli.main(arguments) == cli.EXIT_USAGE and seen["type_check"] is None
    assert seen["options"] is None  # the package's threshold and minimum volume unless given


def test_help_documents_outputs_and_exit_codes():
    text = cli.build_parser()._subparsers._group_actions[0].choices["detect"].format_help()
    for phrase in ("--lesions", "--brain", "--threshold", "--min-volume", "--no-type-check", "exactly on the first "
                   "input's grid", "2  bad command line, input, model, option or device", "1  unexpected failure"):
        assert phrase in text, phrase


def test_models_lists_detection_models(capsys):
    assert cli.main(["models", "--task", "detection", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [entry["id"] for entry in listed] == [MODEL_ID] and listed[0]["task"] == "detection"
    with pytest.raises(SystemExit) as error:
        cli.main(["models", "--task", "detections"])
    assert error.value.code == 2 and "invalid choice: 'detections'" in capsys.readouterr().err
    assert cli.check_model(MODEL_ID, "cpu", task="detection").id == MODEL_ID


# ------------------------------------------------------------------------------------------------- the worker


def _detect_job(folder: Path, inputs: dict[str, Path], outputs: dict[str, str] | None = None,
                model: str = MODEL_ID, **model_options) -> jobs.Job:
    return jobs.Job(task="detect", model=model, inputs={key: str(path) for key, path in inputs.items()},
                    folder=str(folder), outputs=dict(outputs or {}), device="cpu",
                    options={"input_names": {key: f"Volume {key}" for key in inputs},
                             "model_options": {**FAST, **model_options}})


def test_worker_detect_job(volumes, tmp_path):
    job = _detect_job(tmp_path / "job", {"image": volumes["head"], "image2": volumes["t2"]},
                      outputs={"label": "candidates.nrrd"}, threshold=0.02)
    code, events = run_worker_job(job)
    final = events[-1]
    assert code == 0 and final.stage == jobs.STAGE_DONE, final
    stages = [event.stage for event in events]
    assert stages[0] == "start" and {"load_model", "read_input", "inference", "postprocess", "write"} <= set(stages)
    progress = [event.progress for event in events if event.progress is not None]
    assert progress == sorted(progress)
    result = final.result
    assert set(result) == {"outputs", "candidates", "case_score", "threshold", "segments", "provenance", "timings",
                           "warnings", "model_cached"}
    assert result["outputs"] == {role: str(job.outputs_dir / name) for role, name in
                                 (("anomaly", "anomaly.nrrd"), ("label", "candidates.nrrd"), ("brain", "brain.nrrd"))}
    reference = sitk.ReadImage(str(volumes["head"]))
    for path in result["outputs"].values():
        _assert_on_grid(sitk.ReadImage(path), reference)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(result["outputs"]["label"]))
    assert sorted(set(np.unique(labels)) - {0}) == [item["label"] for item in result["candidates"]]
    assert [segment["value"] for segment in result["segments"]] == [item["label"] for item in result["candidates"]]
    assert all(set(item) == set(candidates.CANDIDATE_FIELDS) for item in result["candidates"])
    assert result["threshold"] == 0.02 and result["provenance"]["case_score"] == result["case_score"]
    assert result["provenance"]["inputs"] == ["Volume image", "Volume image2"]
    assert result["provenance"]["parameters"]["flip_average"] is False and result["model_cached"] is False
    assert {"load_model", "inference", "engine_import", "worker_total"} <= set(result["timings"])
    stored = json.loads((Path(job.folder) / jobs.RESULT_FILE_NAME).read_text(encoding="utf-8"))
    assert stored["candidates"] == result["candidates"] and stored["outputs"] == result["outputs"]
    assert not job.partial_dir.exists()


def test_worker_orders_extra_inputs_by_number():
    assert worker.detect_input_keys({"image10": "c", "image": "a", "image2": "b"}) == ["image", "image2", "image10"]


@pytest.mark.parametrize("case", ["no_image", "unknown_input", "unknown_output", "classification_model",
                                  "not_overlapping", "bad_threshold"])
def test_worker_detect_refusals(volumes, tmp_path, case):
    inputs = {"image": volumes["head"]}
    outputs, model, options = {}, MODEL_ID, {}
    if case == "no_image":
        inputs = {"image2": volumes["head"]}
    elif case == "unknown_input":
        inputs["flair"] = volumes["t2"]
    elif case == "unknown_output":
        outputs = {"mask": "mask.nrrd"}
    elif case == "classification_model":
        model = "sequence-type"
    elif case == "not_overlapping":
        inputs["image2"] = volumes["far"]
    else:
        options = {"threshold": 1.5}
    job = _detect_job(tmp_path / "job", inputs, outputs, model, **options)
    code, events = run_worker_job(job)
    final = events[-1]
    assert code == 2 and final.stage == jobs.STAGE_ERROR
    expected = {"no_image": "needs an input 'image'", "unknown_input": "Unknown detect input 'flair'",
                "unknown_output": "Unknown detect output(s) mask (known: anomaly, label, brain)",
                "classification_model": "is a classification model, not a detection model",
                "not_overlapping": "The extra input Volume image2 covers only 0% of the first input's head",
                "bad_threshold": "threshold must lie between 0 and 1, got 1.5"}[case]
    assert expected in final.message and _one_sentence(final.message), final.message
    assert not job.outputs_dir.exists() and not job.partial_dir.exists()


def test_warm_worker_keeps_the_detector_between_detect_jobs(volumes, tmp_path):
    first = _detect_job(tmp_path / "one", {"image": volumes["head"]})
    second = _detect_job(tmp_path / "two", {"image": volumes["head"], "image2": volumes["t2"]})
    stream = io.StringIO()
    stdin = io.StringIO(f"{first.write()}\n{second.write()}\n{jobs.SHUTDOWN_COMMAND}\n")
    assert worker.serve(stdin=stdin, reporter=worker.Reporter(stream)) == 0
    finals = [event for event in map(jobs.Event.from_line, stream.getvalue().splitlines())
              if event is not None and event.stage in jobs.FINAL_STAGES]
    assert [event.stage for event in finals] == [jobs.STAGE_DONE, jobs.STAGE_DONE], finals
    assert [event.job for event in finals] == [str(first.write()), str(second.write())]
    assert finals[0].result["model_cached"] is False and finals[1].result["model_cached"] is True
    assert finals[1].result["provenance"]["inputs"] == ["Volume image", "Volume image2"]
    _assert_on_grid(sitk.ReadImage(finals[1].result["outputs"]["anomaly"]), sitk.ReadImage(str(volumes["head"])))
