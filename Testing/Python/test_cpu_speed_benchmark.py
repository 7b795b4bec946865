"""Smoke test of Testing/Benchmarks/cpu_speed.py's pure parts on tiny inputs (seconds; no network is timed).

Why: the benchmark runs the CLI for minutes per task on a quiet machine, so a broken case builder, command line,
accuracy comparison or table would otherwise show up only then. This checks that the cases have the grids the
docstring promises (centred, thick slices along S-I with the origin at the first slab's centre, a moved copy), that
every task's command line is one the real CLI accepts, that the accuracy helpers and the PASS/FAIL bars give the
numbers they should on outputs with known differences, that the path used is read from provenance notes or the
cache's decisions, and that the tables come out. It says nothing about speed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

BENCHMARK = Path(__file__).resolve().parents[1] / "Benchmarks" / "cpu_speed.py"
DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # the ROBEX head's: index k runs S-I


def load_benchmark():
    spec = importlib.util.spec_from_file_location("cpu_speed_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_benchmark()


def tiny_head(shape=(26, 24, 22), spacing=1.5) -> tuple[sitk.Image, sitk.Image]:
    """(head, brain mask): nested ellipsoids, intensities like a T1 (brain brighter than the scalp), x y z sizes."""
    z, y, x = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in reversed(shape)], indexing="ij")
    radius = np.sqrt(x**2 + y**2 + z**2)
    head = np.where(radius < 0.9, 300.0, 0.0) + np.where(radius < 0.6, 500.0, 0.0)
    images = []
    for array in (head.astype(np.float32), (radius < 0.6).astype(np.uint8)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing([spacing] * 3)
        image.SetDirection(DIRECTION)
        image.SetOrigin((-20.0, 15.0, -18.0))
        images.append(image)
    return images[0], images[1]


def centre_of(image: sitk.Image) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()]))


def test_cases_have_the_promised_grids(bench, tmp_path):
    head, brain = tiny_head()
    paths = bench.build_cases(tmp_path, head, brain, size=20, spacing=2.0)
    assert set(paths) == {"head", "brain", "thick", "moving", "moving_brain"}
    images = {role: sitk.ReadImage(str(path)) for role, path in paths.items()}
    fixed = images["head"]
    assert fixed.GetSize() == (20, 20, 20) and fixed.GetSpacing() == (2.0, 2.0, 2.0)
    assert fixed.GetPixelID() == sitk.sitkInt16 and images["brain"].GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(centre_of(fixed), centre_of(head), atol=1e-6)
    array = sitk.GetArrayFromImage(fixed)
    assert array.min() >= 0 and np.count_nonzero(array[0, 0] > 0) > 0  # Rician noise in the air too
    assert sitk.GetArrayFromImage(images["brain"]).sum() > 0
    # the thick copy: along index k (nearest S-I), factor round(5 mm / 2 mm) = 3, origin at the first slab's centre
    thick = images["thick"]
    assert bench.si_axis(fixed) == 2
    assert thick.GetSize() == (20, 20, 6) and thick.GetSpacing() == (2.0, 2.0, 6.0)
    np.testing.assert_allclose(thick.GetOrigin(), fixed.TransformContinuousIndexToPhysicalPoint((0, 0, 1)))
    np.testing.assert_allclose(sitk.GetArrayFromImage(thick)[1], array[3:6].astype(np.float32).mean(0), rtol=1e-5)
    # the moving copy is moved: its brain mask is not the fixed one
    moved = sitk.GetArrayFromImage(images["moving_brain"])
    assert moved.sum() > 0 and not np.array_equal(moved, sitk.GetArrayFromImage(images["brain"]))


def test_accuracy_helpers(bench):
    a = np.array([[0, 1, 1, 2], [2, 2, 0, 0]])
    b = np.array([[0, 1, 2, 2], [2, 2, 0, 0]])
    assert bench.label_agreement(a, b) == pytest.approx(7 / 8)
    assert bench.dice(a, b, 1) == pytest.approx(2 * 1 / 3)
    assert bench.dice(a, b, 2) == pytest.approx(2 * 3 / 7)
    assert bench.dice(np.zeros(4), np.zeros(4), 1) == 1.0  # both empty: the same answer
    assert bench.dice_per_label(a, b) == pytest.approx({1: 2 / 3, 2: 6 / 7})
    reference = np.linspace(0.0, 100.0, 101)
    mask = np.ones_like(reference, dtype=bool)
    assert bench.psnr(reference + 1.0, reference, mask) == pytest.approx(40.0)
    assert bench.relative_difference(reference + 0.5, reference) == pytest.approx(0.005)
    first, second = np.zeros((2, 2, 3)), np.zeros((2, 2, 3))
    second[1, 1] = (3.0, 4.0, 0.0)
    assert bench.field_difference_mm(first, second) == pytest.approx(5.0)
    inside = np.ones((2, 2), dtype=bool)
    inside[1, 1] = False
    assert bench.field_difference_mm(first, second, inside, 99.0) == 0.0
    assert bench.bar(0.001, 0.002) == "PASS" and bench.bar(0.003, 0.002) == "FAIL"
    assert bench.bar(0.9995, 0.999, at_least=True) == "PASS" and bench.bar(0.99, 0.999, at_least=True) == "FAIL"
    assert bench.bar(float("nan"), 0.002) == "—"


def test_network_agreement(bench):
    import torch

    logits = torch.zeros(1, 3, 4, 4, 4)
    logits[:, 1] = 1.0
    changed = logits.clone()
    changed[0, 2, 0, 0, 0] = 5.0  # one voxel of 64 changes its label
    assert bench.network_agreement(changed, logits, "labels") == pytest.approx(63 / 64)
    image = torch.linspace(0, 10, 64).view(1, 1, 4, 4, 4)
    assert bench.network_agreement(image + 0.01, image, "intensities") == pytest.approx(0.001, rel=1e-4)


def test_network_inputs_have_the_spec_shapes(bench):
    head, _ = tiny_head()
    for spec in bench.NETWORKS:
        batch = bench.network_input(spec, head, quick=True)
        assert tuple(batch.shape) == spec.quick_shape, spec.name
        assert bool(batch.isfinite().all()) and float(batch.std()) > 0, spec.name


def test_time_paths_alternates_and_counts(bench):
    calls = []
    times, outputs = bench.time_paths({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2},
                                      runs=2, warmups=2)
    assert calls == ["a", "b", "a", "b", "a", "b", "b", "a"]
    assert outputs == {"a": 1, "b": 2} and all(len(values) == 2 for values in times.values())


def test_task_commands_parse_with_the_cli(bench, tmp_path):
    from MIADeepLearningLib import cli

    cases = {role: tmp_path / f"{role}.nrrd" for role in ("head", "brain", "thick", "moving", "moving_brain")}
    parser = cli.build_parser()
    for task in bench.TASKS:
        args = parser.parse_args(bench.task_command(task, cases, tmp_path / task))
        assert args.model == task and args.device == "cpu" and not args.no_type_check
    assert parser.parse_args(bench.task_command("brain-registration", cases, tmp_path)).instance_steps == 50
    with pytest.raises(ValueError):
        bench.task_command("sequence-type", cases, tmp_path)


def test_child_environment(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("MIADL_TYPE_CHECK", "0")
    env = bench.child_environment(2, tmp_path, None)
    assert "MIADL_CPU_RUNTIME" not in env and "MIADL_TYPE_CHECK" not in env
    assert env["MIADL_CACHE_DIR"] == str(tmp_path) and env["OMP_NUM_THREADS"] == "2"
    assert bench.child_environment(2, tmp_path, "pytorch")["MIADL_CPU_RUNTIME"] == "pytorch"


def test_path_used_from_provenance_and_cache(bench, tmp_path):
    provenance = {"pipeline": {"network_runtime": ["OpenVINO 2026.4.1 fp32: checked ..."],
                               "inference": [{"runtime": "openvino 2026.4.1", "notes": [
                                   "PyTorch fp32: MIADL_CPU_RUNTIME=pytorch", "windows skipped: 3"]}]},
               "warnings": ["something else"]}
    notes = bench.runtimes_in(provenance)
    assert "windows skipped: 3" not in notes and "something else" not in notes
    assert bench.path_used(notes) == "openvino + pytorch"
    assert bench.path_used(["PyTorch fp32: MIADL_CPU_RUNTIME=pytorch"]) == "pytorch"
    assert bench.path_used(["bf16 autocast on the CPU (native bf16): ..."]) == "pytorch bf16"
    assert bench.path_used([]) == "not recorded"
    out, cache = tmp_path / "out", tmp_path / "cache"
    (cache / "cpu-runtime").mkdir(parents=True)
    out.mkdir()
    (cache / "cpu-runtime" / "x.json").write_text(json.dumps({"decisions": {"machine": {
        "runtime": "openvino 2026.4.1", "note": "OpenVINO 2026.4.1 fp32: checked, 3.0x as fast"}}}))
    assert bench.run_notes(out, cache, bench.PATH_B)[1].startswith("openvino (cache decisions")
    (out / "provenance.json").write_text(json.dumps({"pipeline": {"notes": ["PyTorch fp32: failed the check"]}}))
    assert bench.run_notes(out, cache, bench.PATH_B) == (["PyTorch fp32: failed the check"], "pytorch")


def write(image_array: np.ndarray, path: Path, reference: sitk.Image) -> None:
    image = sitk.GetImageFromArray(image_array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))


def verdicts(rows: list[dict]) -> dict[str, str]:
    return {row["measure"]: row["verdict"] for row in rows if row["verdict"]}


def test_compare_outputs(bench, tmp_path):
    from MIADeepLearningLib.engine import displacement

    head, brain = tiny_head()
    cases = bench.build_cases(tmp_path / "cases", head, brain, size=20, spacing=2.0)
    fixed = sitk.ReadImage(str(cases["head"]))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(cases["brain"]))).astype(np.uint8)
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
    changed = labels.copy()
    changed[10, 10, 10] = 1 - changed[10, 10, 10]  # 1 of 8000 voxels: 99.9875 % the same
    for folder, values in ((first, labels), (second, changed)):
        write(values, folder / "label.nrrd", fixed)
    rows = bench.compare_outputs("deepbet", first, second, cases)
    assert set(verdicts(rows).values()) == {"PASS"}
    tissue = bench.compare_outputs("brain-tissue", first, second, cases)
    assert set(verdicts(tissue).values()) == {"PASS"}
    write(np.zeros_like(labels), second / "label.nrrd", fixed)  # a path that lost the brain fails every bar
    assert set(verdicts(bench.compare_outputs("deepbet", first, second, cases)).values()) == {"FAIL"}
    # synthesis: the same output gives 0 dB difference; an offset by 5 % of the range fails the 0.05 dB bar
    original = sitk.GetArrayFromImage(fixed).astype(np.float32)
    write(original, first / "image.nrrd", fixed)
    write(original + 0.05 * float(original.max()), second / "image.nrrd", fixed)
    synthesis = {row["measure"]: row for row in bench.compare_outputs("thick-slice-sr", first, second, cases)}
    assert synthesis["PSNR difference (absolute, dB)"]["verdict"] == "FAIL"
    assert math.isinf(synthesis["PSNR vs the 1 mm original in the head, pytorch (dB)"]["value"]) or \
        synthesis["PSNR vs the 1 mm original in the head, pytorch (dB)"]["value"] > 150
    # registration: fields 0 and 1.5 mm apart, the same warped labels and report Dice
    for folder, shift in ((first, 0.0), (second, 1.5)):
        field = np.zeros((*original.shape, 3))
        field[..., 0] = shift
        displacement.write_field(displacement.field_image(field, fixed), folder / "field.h5", fixed)
        write(original, folder / "warped.nrrd", fixed)
        write(labels, folder / "warped_brain.nrrd", fixed)
        (folder / "report.json").write_text(json.dumps({"dice_mean": 0.95, "jacobian_log_std": 0.1}))
    registration = {row["measure"]: row for row in bench.compare_outputs("brain-registration", first, second, cases)}
    assert registration["displacement fields: largest difference (mm)"]["value"] == pytest.approx(1.5)
    assert registration["displacement fields: mean difference in the fixed brain (mm)"]["value"] == pytest.approx(1.5)
    assert registration["Dice difference (absolute)"]["verdict"] == "PASS"
    assert registration["jacobian_log_std: pytorch / this path"]["shown"] == "0.1000 / 0.1000"


def test_tables(bench):
    text = bench.table(("a", "b"), [["x", 1.234], ["y", None]])
    lines = text.splitlines()
    assert lines[0] == "| a | b |" and lines[1] == "|---|---|"
    assert lines[2] == "| x | 1.23 |" and lines[3] == "| y | — |"
    result = bench.NetworkResult("brain-tissue", (2, 1, 96, 96, 96), seconds={"pytorch fp32": 4.0,
                                                                              "openvino fp32": 1.6},
                                 agreement={"openvino fp32": 0.9999}, convert_s=2.0,
                                 notes={"pytorch bf16": "n/a (no native bf16)"})
    rows = bench.network_rows([result])
    assert len(rows[0]) == len(bench.NETWORK_HEADERS) and rows[-1][0] == "sequence-type"
    assert "2.50x" in rows[0] and "met" in rows[0] and "n/a (no native bf16)" in rows[0]
    runs = {("deepbet", bench.PATH_A): bench.CaseRun("deepbet", bench.PATH_A, 9.0, [8.0, 8.2, 7.9], "pytorch"),
            ("deepbet", bench.PATH_B): bench.CaseRun("deepbet", bench.PATH_B, 20.0, [4.0, 4.1, 3.9], "openvino")}
    case_rows = bench.case_rows(runs, quick=False)
    assert [row[-1] for row in case_rows] == ["not met", "met"]
    assert case_rows[1][6] == "2.00x" and len(case_rows[0]) == len(bench.CASE_HEADERS)
    info = {"cpu": "Test CPU", "cores": 2, "flags": bench.cpu_flags("flags\t: fpu avx2 amx_bf16\n"),
            "native_bf16": True, "threads": 2, "torch": "2", "openvino": None, "python": "3.11",
            "load_average": [0.5, 0.4, 0.3]}
    header = "\n".join(bench.header_lines(info))
    assert "avx2 yes, avx512f no, avx512_bf16 no, amx_bf16 yes" in header and "OpenVINO not installed" in header
