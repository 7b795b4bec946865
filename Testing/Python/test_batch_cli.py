"""The batch command line: `python -m MIADeepLearningLib segment -i FOLDER -o FOLDER`, run as a real subprocess on a
folder that mixes good heads with files it must refuse, plus in-process checks of the pieces (case discovery,
progress lines, the report) with a fake engine where a real model would only cost time."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import dice, small_head
from helpers import run_cli as _cli

from MIADeepLearningLib import cli
from MIADeepLearningLib.engine import errors


def _read_report(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


def _assert_same_grid(output: sitk.Image, reference: sitk.Image) -> None:
    assert output.GetSize() == reference.GetSize()
    for getter in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(output, getter)(), getattr(reference, getter)(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def batch_folder(robex, tmp_path_factory):
    """2 good heads (NIfTI; a flipped copy as NRRD), a broken file, a single slice, a README: in name order."""
    folder = tmp_path_factory.mktemp("batch") / "cases"
    folder.mkdir()
    head = small_head(robex[0])
    sitk.WriteImage(head, str(folder / "head_a.nii.gz"))
    sitk.WriteImage(sitk.Flip(head, [True, False, False]), str(folder / "head_flipped.nrrd"))  # same anatomy
    (folder / "broken.nii.gz").write_bytes(b"this is not an image")
    slice_voxels = np.random.default_rng(0).normal(300, 50, (1, 40, 40)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(slice_voxels), str(folder / "single_slice.nii.gz"))
    (folder / "README.txt").write_text("Cases for the batch test.\n", encoding="utf-8")
    (folder / "subfolder").mkdir()
    sitk.WriteImage(head, str(folder / "subfolder" / "not_a_case.nii.gz"))  # only the folder's own files count
    return folder


@pytest.fixture(scope="module")
def batch_run(batch_folder):
    output = batch_folder.parent / "out"
    provenance = batch_folder.parent / "provenance.json"
    completed = _cli("segment", "--model", "deepbet", "-i", str(batch_folder), "-o", str(output), "--device", "cpu",
                     "--masked-suffix", "--provenance", str(provenance))
    return completed, output, provenance


# -------------------------------------------------------------------------------------------- real batch


@pytest.mark.slow
def test_batch_exit_code_and_report(batch_folder, batch_run):
    completed, output, _ = batch_run
    assert completed.returncode == 3, completed.stderr
    assert completed.stdout == ""
    rows = _read_report(output / "report.csv")
    assert list(rows[0]) == cli.REPORT_COLUMNS
    assert [row["case"] for row in rows] == ["broken", "head_a", "head_flipped", "single_slice"]
    by_case = {row["case"]: row for row in rows}
    assert [by_case[case]["status"] for case in ("broken", "head_a", "head_flipped", "single_slice")] == [
        "failed", "ok", "ok", "failed"]
    assert "broken.nii.gz cannot be read" in by_case["broken"]["error"]
    assert "single slice" in by_case["single_slice"]["error"] and "3D volume" in by_case["single_slice"]["error"]
    for row in rows:
        assert Path(row["input"]) == batch_folder / Path(row["input"]).name
        assert float(row["seconds"]) >= 0
        if row["status"] == "ok":
            assert row["error"] == "" and Path(row["output"]).is_file() and Path(row["masked_output"]).is_file()
        else:
            assert row["output"] == "" and row["masked_output"] == ""
    assert by_case["head_a"]["output"] == str(output / "head_a_brain.nii.gz")
    assert by_case["head_flipped"]["output"] == str(output / "head_flipped_brain.nrrd")  # the input's own format
    assert by_case["head_flipped"]["masked_output"] == str(output / "head_flipped_skull-stripped.nrrd")
    assert sorted(path.name for path in output.iterdir()) == [
        ".miadl-cohort", "head_a_brain.nii.gz", "head_a_skull-stripped.nii.gz", "head_flipped_brain.nrrd",
        "head_flipped_skull-stripped.nrrd", "report.csv"]  # nothing for failed cases
    assert sorted(path.name for path in (output / ".miadl-cohort").iterdir()) == [
        "head_a.json", "head_flipped.json"]  # the provenance sidecars of the done cases, no staging folder left
    assert "2 of 4 cases succeeded, 2 failed (broken, single_slice)" in completed.stderr


@pytest.mark.slow
def test_batch_outputs_lie_on_their_inputs_grids(batch_folder, batch_run):
    _, output, _ = batch_run
    labels = {}
    for case, extension in (("head_a", ".nii.gz"), ("head_flipped", ".nrrd")):
        source = sitk.ReadImage(str(batch_folder / f"{case}{extension}"))
        label = sitk.ReadImage(str(output / f"{case}_brain{extension}"))
        masked = sitk.ReadImage(str(output / f"{case}_skull-stripped{extension}"))
        _assert_same_grid(label, source)
        _assert_same_grid(masked, source)
        voxels = sitk.GetArrayViewFromImage(label)
        assert set(np.unique(voxels)) == {0, 1} and 0.05 < voxels.mean() < 0.6
        labels[case] = label
    # the flipped copy stores the same anatomy in mirrored voxel order: its label, flipped back, is the same brain
    back = sitk.GetArrayViewFromImage(sitk.Flip(labels["head_flipped"], [True, False, False]))
    assert dice(back, sitk.GetArrayViewFromImage(labels["head_a"])) >= 0.98


@pytest.mark.slow
def test_batch_loads_the_model_once_and_reports_progress(batch_run):
    completed, _, provenance = batch_run
    lines = completed.stderr.splitlines()
    assert sum("(model deepbet loaded" in line for line in lines) == 1, completed.stderr
    for index, case in enumerate(["broken", "head_a", "head_flipped", "single_slice"], start=1):
        assert f"[{index}/4] {case} ..." in lines
        finished = [line for line in lines if line.startswith(f"[{index}/4] {case}: ")]
        assert len(finished) == 1 and "elapsed" in finished[0] and "ETA" in finished[0]
    assert "\r" not in completed.stderr and "\x1b[" not in completed.stderr  # plain lines when not a terminal
    record = json.loads(provenance.read_text(encoding="utf-8"))
    assert sorted(record) == ["head_a", "head_flipped"]
    assert record["head_a"]["model_id"] == "deepbet" and record["head_a"]["segments"][0]["name"] == "Brain"


@pytest.mark.slow
def test_batch_all_ok_quiet_with_own_report_format_and_suffix(robex, tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    sitk.WriteImage(small_head(robex[0]), str(folder / "only.mha"))
    report = tmp_path / "reports" / "run.csv"
    completed = _cli("segment", "--model", "deepbet", "-i", str(folder), "-o", str(tmp_path / "out"), "-q",
                     "--format", "nii.gz", "--suffix", "mask", "--report", str(report), "--device", "cpu")
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == "" and completed.stdout == ""
    rows = _read_report(report)
    assert [(row["case"], row["status"], row["output"]) for row in rows] == [
        ("only", "ok", str(tmp_path / "out" / "only_mask.nii.gz"))]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [".miadl-cohort", "only_mask.nii.gz"]


@pytest.mark.slow
def test_single_file_into_an_output_folder(robex, tmp_path):
    source = tmp_path / "head.nrrd"
    sitk.WriteImage(small_head(robex[0]), str(source))
    out = tmp_path / "out"
    out.mkdir()
    completed = _cli("segment", "--model", "deepbet", "-i", str(source), "-o", str(out), "-q")
    assert completed.returncode == 0, completed.stderr
    assert sorted(path.name for path in out.iterdir()) == ["head_brain.nrrd"]
    _assert_same_grid(sitk.ReadImage(str(out / "head_brain.nrrd")), sitk.ReadImage(str(source)))


# ----------------------------------------------------------------------------------- refused before any case


def _textured_file(path: Path) -> Path:
    voxels = np.random.default_rng(1).normal(300, 50, (12, 12, 12)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(path))
    return path


USAGE_ERRORS = {
    "no_images": (lambda folder: (folder / "notes.txt").write_text("x"), {}, "has no image files"),
    "output_is_input": (lambda folder: _textured_file(folder / "a.nrrd"), {"-o": "{in}"}, "other than the input"),
    "masked_file_for_folder": (lambda folder: _textured_file(folder / "a.nrrd"), {"--masked": "{out}/m.nrrd"},
                               "--masked FILE is for a single input file"),
    "unknown_model": (lambda folder: _textured_file(folder / "a.nrrd"), {"--model": "nope"},
                      "Unknown model 'nope'"),
    "same_suffixes": (lambda folder: _textured_file(folder / "a.nrrd"), {"--suffix": "x", "--masked-suffix": "x"},
                      "cannot both use the suffix 'x'"),
}


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_folder_usage_errors_exit_2_before_any_case(tmp_path, case):
    make, overrides, phrase = USAGE_ERRORS[case]
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    make(folder)
    before = sorted(path.name for path in folder.iterdir())
    options = {"--model": "deepbet", "-o": str(out), **overrides}
    arguments = [item.format(**{"in": folder, "out": out}) for pair in options.items() for item in pair]
    completed = _cli("segment", "-i", str(folder), *arguments, "-q")
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], completed.stderr
    assert not out.exists()  # no report, no folder: nothing ran
    assert sorted(path.name for path in folder.iterdir()) == before


def test_report_and_masked_suffix_are_for_folders(tmp_path):
    source = _textured_file(tmp_path / "a.nrrd")
    for extra, phrase in ((["--report", str(tmp_path / "r.csv")], "--report is for a folder input"),
                          (["--masked-suffix", "m"], "--masked-suffix names outputs in an output folder")):
        completed = _cli("segment", "--model", "deepbet", "-i", str(source), "-o", str(tmp_path / "l.nrrd"), *extra)
        assert completed.returncode == 2 and completed.stderr.startswith("error: ") and phrase in completed.stderr
        assert not (tmp_path / "l.nrrd").exists() and not (tmp_path / "r.csv").exists()


def test_help_documents_the_exit_codes():
    completed = _cli("segment", "--help")
    assert completed.returncode == 0
    assert "exit codes:" in completed.stdout
    for line in ("0  every image was segmented", "3  some cases of a folder failed", "2  bad command line"):
        assert line in completed.stdout


# ------------------------------------------------------------------------------------ pieces, in-process


def test_case_discovery(tmp_path):
    for name in ["b.nii.gz", "a.NRRD", "c.nii", "d.mha", "e.mhd", "e.raw", "f.nhdr", "g.txt", ".hidden.nii.gz",
                 "head.nii.gz", "head.nrrd", "nii.gz", "report.csv"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.nii.gz").mkdir()  # a folder with an image-like name is not a case
    cases = cli.find_cases(tmp_path)
    assert cases == [("a", tmp_path / "a.NRRD"), ("b", tmp_path / "b.nii.gz"), ("c", tmp_path / "c.nii"),
                     ("d", tmp_path / "d.mha"), ("e", tmp_path / "e.mhd"), ("f", tmp_path / "f.nhdr"),
                     ("head.nii.gz", tmp_path / "head.nii.gz"), ("head.nrrd", tmp_path / "head.nrrd")]
    assert cli.output_extension(tmp_path / "a.NRRD", "same") == ".nrrd"
    assert cli.output_extension(tmp_path / "b.nii.gz", "mha") == ".mha"


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_without_a_terminal():
    stream, clock = io.StringIO(), _Clock()
    progress = cli.BatchProgress(3, stream=stream, clock=clock)
    progress.case_started(1, "a")
    progress.stage("inference", 0.5, "Running")  # no redraw into a file
    clock.now += 10
    progress.case_finished("ok", 10.0, " (model m loaded in 1.0 s)")
    progress.case_started(2, "b")
    clock.now += 20
    progress.case_finished("failed", 20.0, ": Bad input.")
    assert stream.getvalue().splitlines() == [
        "[1/3] a ...",
        "[1/3] a: ok in 10.0 s (model m loaded in 1.0 s) | elapsed 0:10, ETA 0:20",
        "[2/3] b ...",
        "[2/3] b: FAILED in 20.0 s: Bad input. | elapsed 0:30, ETA 0:15",
    ]


def test_progress_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream, clock = Terminal(), _Clock()
    progress = cli.BatchProgress(2, stream=stream, clock=clock)
    progress.case_started(1, "a")
    clock.now += 1
    progress.stage("inference", 0.5, "Running")
    text = stream.getvalue()
    assert text.count("\r\x1b[K") == 2 and "\n" not in text
    assert "[#####---------------] 1/2 a inference  50% | elapsed 0:01, ETA --" in text
    progress.case_finished("ok", 1.0, "")
    assert stream.getvalue().endswith("\r\x1b[K[1/2] a: ok in 1.0 s | elapsed 0:01, ETA 0:01\n")
    assert cli.BatchProgress(2, stream=Terminal(), quiet=True).tty is False


class _FakeModel:
    def __init__(self):
        self.id = "fake"
        self.slicer = {"output_name_suffix": "seg"}


def _fake_engine(monkeypatch, behaviour):
    """cli.segment_folder with a fake model check and a fake segment_image that does `behaviour[case]`."""
    from MIADeepLearningLib.engine import tasks

    monkeypatch.setattr(cli, "check_model", lambda model_id, device: _FakeModel())

    def segment_image(path, model_id, pipeline_cache=None, **kwargs):
        pipeline_cache.setdefault("fake", object())
        action = behaviour.get(cli.case_name(Path(path)))
        if action is not None:
            raise action
        image = sitk.ReadImage(str(path))
        label = sitk.Cast(image > 300, sitk.sitkUInt8)
        return tasks.SegmentationOutput(label=label, masked=None, segments=[], provenance={"model_id": "fake"},
                                        warnings=["a warning"], timings={"load_model": 0.5})

    monkeypatch.setattr(tasks, "segment_image", segment_image)


def test_a_case_that_fails_unexpectedly_does_not_stop_the_batch(tmp_path, monkeypatch, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("a", "b", "c"):
        _textured_file(folder / f"{name}.nrrd")
    out.mkdir()
    (out / "b_seg.nrrd").write_bytes(b"left over from an earlier run")
    _fake_engine(monkeypatch, {"b": MemoryError("out of memory")})
    code = cli.main(["segment", "--model", "fake", "-i", str(folder), "-o", str(out)])
    assert code == 3
    rows = _read_report(out / "report.csv")
    assert [(row["case"], row["status"]) for row in rows] == [("a", "ok"), ("b", "failed"), ("c", "ok")]
    assert rows[1]["error"] == "Unexpected error (MemoryError: out of memory)."
    assert rows[0]["warnings"] == "a warning"
    assert not (out / "b_seg.nrrd").exists()  # the stale output of the failed case is gone
    assert "Traceback" in capsys.readouterr().err


def test_a_model_that_cannot_load_stops_the_batch(tmp_path, monkeypatch, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("a", "b", "c"):
        _textured_file(folder / f"{name}.nrrd")
    _fake_engine(monkeypatch, {"a": errors.ModelError("The weights of model 'fake' are damaged.")})
    code = cli.main(["segment", "--model", "fake", "-i", str(folder), "-o", str(out), "-q"])
    assert code == 2
    assert capsys.readouterr().err == "error: The weights of model 'fake' are damaged.\n"
    rows = _read_report(out / "report.csv")
    assert [(row["case"], row["status"]) for row in rows] == [("a", "failed"), ("b", "skipped"), ("c", "skipped")]
    assert rows[2]["error"] == "Not run: The weights of model 'fake' are damaged."


# ---------------------------------------------------------------------------- models --download / --import


def test_models_download_and_import_refusals_are_one_line():
    for arguments, phrase in ((["--download", "nope"], "Unknown model 'nope'"),
                              (["--download", "deepbet"], "ships with the extension"),
                              (["--import", "/nonexistent/package.zip"], "does not exist")):
        completed = _cli("models", *arguments)
        assert completed.returncode == 2, completed.stderr
        assert completed.stdout == "" and completed.stderr.startswith("error: ") and phrase in completed.stderr
        assert len(completed.stderr.splitlines()) == 1
    both = _cli("models", "--download", "a", "--import", "b")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_models_download_and_import_call_the_model_store(monkeypatch, capsys, tmp_path):
    from MIADeepLearningLib.engine import model_store, registry

    model = registry.ModelInfo(id="tiny", package_dir=tmp_path / "tiny", origin="url",
                               metadata={"version": "2.0", "license": "MIT",
                                         "slicer": {"title": "Tiny", "task": "segmentation"}})
    calls = []

    def download_model(model_id, progress=None):
        calls.append(("download", model_id))
        for done in (0, 5 << 20, 10 << 20):
            progress(done, 10 << 20)
        return model

    def import_model(path, trust_code=False, replace=False):
        calls.append(("import", path, trust_code, replace))
        return model

    monkeypatch.setattr(model_store, "download_model", download_model)
    monkeypatch.setattr(model_store, "import_model", import_model)
    assert cli.main(["models", "--download", "tiny"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "tiny\tsegmentation\tTiny (v2.0, MIT)\n"
    assert captured.err.splitlines() == [
        "downloading tiny: 0.0 / 10.0 MiB (  0%)", "downloading tiny: 5.0 / 10.0 MiB ( 50%)",
        "downloading tiny: 10.0 / 10.0 MiB (100%)", f"installed tiny v2.0 in {tmp_path / 'tiny'}"]
    assert cli.main(["models", "--import", str(tmp_path / "tiny.zip"), "--json", "-q", "--trust", "--replace"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["id"] == "tiny" and captured.err == ""
    assert calls == [("download", "tiny"), ("import", str(tmp_path / "tiny.zip"), True, True)]
