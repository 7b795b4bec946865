"""RegistrationLogic end to end on a headless scene, with a stand-in for the registration worker.

Why a stand-in: the logic's side of the job contract (what it exports, how it reads the .h5 transform, the warped
volume, the propagated labels and the report) must be right whatever network fills the field. The stand-in runs in
this process on the files the logic exported, with the engine's own functions: affine pre-alignment with the
masks, the field of that affine on the fixed grid (``affine.compose_with_field``), the engine's warps, Jacobian
statistics and Dice. So the scenarios of ``registration_scenarios`` that need no worker process run here unchanged
(an affine alone already beats the phantom's shift), and the real network runs them in test_scenarios.py once its
package ships.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from MIADeepLearningLib import jobs, runner
from MIADeepLearningLib.engine import affine, displacement, registry, tasks
from MIADeepLearningLib.engine.errors import InputError

MODEL_ID = "tiny-registration"


def fake_register(job: jobs.Job) -> dict:
    """What the worker's "register" task returns, computed with an affine instead of the network (the report by
    the engine's own tasks.registration_report)."""
    read = {role: sitk.ReadImage(path) for role, path in job.inputs.items()}
    fixed, moving = sitk.Cast(read["fixed"], sitk.sitkFloat32), sitk.Cast(read["moving"], sitk.sitkFloat32)
    for role in ("fixed_mask", "moving_mask", "moving_labels", "fixed_labels"):
        if role in read:  # masks and labels on their image's grid, as the contract says
            image = read["fixed" if role.startswith("fixed") else "moving"]
            assert read[role].GetSize() == image.GetSize(), role
            assert np.allclose(read[role].GetOrigin(), image.GetOrigin(), atol=1e-4), role
            assert np.allclose(read[role].GetDirection(), image.GetDirection(), atol=1e-6), role
    aligned = affine.affine_prealign(fixed, moving, read.get("fixed_mask"), read.get("moving_mask"))
    field = affine.compose_with_field(aligned.transform, fixed)
    partial = job.partial_dir
    partial.mkdir(parents=True)
    files = {"transform": displacement.write_field(field, partial / job.outputs["transform"], fixed)}
    warped = displacement.warp_image(moving, fixed, field)
    files["warped"] = partial / job.outputs["warped"]
    sitk.WriteImage(warped, str(files["warped"]))
    propagated = None
    if "moving_labels" in read:
        propagated = displacement.warp_labels(read["moving_labels"], fixed, field)
        files["warped_labels"] = partial / job.outputs["warped_labels"]
        sitk.WriteImage(propagated, str(files["warped_labels"]))
    report = tasks.registration_report(fixed, field, aligned.transform, read.get("fixed_mask"),
                                       read.get("moving_labels"), read.get("fixed_labels"), propagated)
    files["report"] = partial / job.outputs["report"]
    files["report"].write_text(json.dumps(report), encoding="utf-8")
    partial.rename(job.outputs_dir)
    model = registry.get_model(job.model)
    provenance = {"model_id": model.id, "model_version": model.version, "device": "cpu",
                  "created_utc": "2026-01-01T00:00:00+00:00", "extension_version": "test",
                  "weights_sha256": {weight.role: weight.sha256 for weight in model.weights}}
    return {"outputs": {role: str(job.outputs_dir / path.name) for role, path in files.items()}, "report": report,
            "provenance": provenance, "timings": {"inference": 0.1}, "warnings": [], "model_cached": False}


class FakeWorker(runner._JobHandle):
    """A finished job: the stand-in ran when the logic started it (or failed with the error it raised)."""

    def __init__(self, job: jobs.Job, on_event=None, **kwargs) -> None:
        super().__init__(job, on_event, None, None)
        self.pid = None
        events = [jobs.Event(stage="start", progress=0.0, message="stand-in worker")]
        try:
            result = fake_register(job)
        except InputError as error:
            events.append(jobs.Event(stage=jobs.STAGE_ERROR, message=str(error), error_type="InputError"))
            self.state = runner.STATE_ERROR
        else:
            events.append(jobs.Event(stage=jobs.STAGE_DONE, progress=1.0, result=result))
            self.state = runner.STATE_DONE
        self.final_event = events[-1]
        self._pending = events

    def poll(self) -> list[jobs.Event]:
        events, self._pending = self._pending, []
        for event in events:
            if self.on_event is not None:
                self.on_event(event)
        return events

    def _kill(self) -> int | None:
        return None


@pytest.fixture
def stand_in(scene, tmp_path, monkeypatch):
    """A registration model package (tiny weights file) and the stand-in worker; jobs under tmp_path."""
    from MIADeepLearningLib.testing import registration_scenarios

    package = tmp_path / "models" / MODEL_ID
    weights = package / "models" / "model.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"not a network: the stand-in worker never loads it")
    metadata = {"version": "0.0.1", "name": "Registration (test package)", "license": "Apache-2.0",
                "slicer": {"id": MODEL_ID, "title": "Registration (test package)", "task": "registration",
                           "modality": "MR", "pipeline": "test",
                           "files": [{"role": "network", "path": "models/model.pt",
                                      "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                                      "size": weights.stat().st_size}]}}
    (package / "configs").mkdir()
    (package / "configs" / "metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(tmp_path / "models"))
    monkeypatch.setattr(registration_scenarios, "MODEL_ID", MODEL_ID)
    monkeypatch.setattr(registration_scenarios, "JOBS_ROOT", tmp_path / "jobs")
    started: list[jobs.Job] = []

    def start(job: jobs.Job, **kwargs) -> FakeWorker:
        started.append(job)
        return FakeWorker(job, **kwargs)

    monkeypatch.setattr(runner, "start", start)
    return started


def test_phantom_pair_scenario_with_stand_in_worker(stand_in):
    """The full scenario (transform conventions, hardening, warped volume, propagated segments, report, provenance,
    untouched inputs) on the logic's real exports and imports."""
    from MIADeepLearningLib.testing import registration_scenarios

    registration_scenarios.scenario_register_phantom_pair()
    (job,) = stand_in
    assert job.task == "register" and job.model == MODEL_ID
    assert set(job.inputs) == {"fixed", "moving", "fixed_mask", "moving_mask", "moving_labels", "fixed_labels"}
    assert job.outputs == {"transform": "transform.h5", "warped": "warped.nrrd", "warped_labels": "warped_labels.nrrd",
                           "report": "report.json"}
    assert job.options["model_options"] == {"instance_steps": 0}
    assert job.options["input_names"] == {"fixed": "fixed phantom", "moving": "moving phantom",
                                          "fixed_mask": "fixed head", "moving_mask": "moving head",
                                          "moving_segmentation": "moving structures",
                                          "fixed_segmentation": "fixed structures"}
    assert job.device == "cpu"


def test_warm_worker_scenario_with_stand_in_worker(stand_in, monkeypatch):
    """The volumes-only scenario through a stand-in kept-alive worker: jobs go to its submit(), and it reports the
    model as already loaded from the second job on."""
    from MIADeepLearningLib.testing import registration_scenarios

    class FakeWarmWorker:
        def __init__(self) -> None:
            self.submitted: list[jobs.Job] = []

        def __enter__(self) -> FakeWarmWorker:
            return self

        def __exit__(self, *exc_info) -> None:
            pass

        def submit(self, job: jobs.Job, on_event=None, timeout_s=None) -> FakeWorker:
            handle = FakeWorker(job, on_event=on_event)
            handle.final_event.result["model_cached"] = bool(self.submitted)
            self.submitted.append(job)
            return handle

    monkeypatch.setattr(runner, "WarmWorker", FakeWarmWorker)
    registration_scenarios.scenario_volumes_only_with_warm_worker()
    assert not stand_in, "a job bypassed the kept-alive worker"


def test_bad_inputs_scenario(stand_in):
    from MIADeepLearningLib.testing import registration_scenarios

    registration_scenarios.scenario_bad_inputs_fail_cleanly()
    assert not stand_in, "a refused run started a worker"


def test_exported_labels_follow_the_segments(stand_in):
    """Moving segments travel as 1..N in display order (a later segment wins where they overlap); the fixed
    segmentation sends only segments whose names match, under the moving segment's value; masks are 0/1."""
    import slicer

    from MIADeepLearningLib.mrml.registration_logic import RegistrationLogic, _prepare
    from MIADeepLearningLib.testing import registration_scenarios

    pair = registration_scenarios.phantom_pair()
    prepared = _prepare(pair["fixed"], pair["moving"], None, None, pair["moving_segmentation"],
                        pair["fixed_segmentation"])
    assert [(label.value, label.name) for label in prepared.labels] == [
        (1, "Brain"), (2, "Left ventricle"), (3, "Right ventricle"), (4, "Lesion")]
    assert [label.segment_id for label in prepared.labels] == ["Brain", "Left_ventricle", "Right_ventricle", "Lesion"]
    assert [label.value for label in prepared.compared] == [1, 2, 3, 4]  # "brain " matches "Brain"
    moving_points = registration_scenarios.moving_to_anatomy(registration_scenarios.voxel_centres(pair["moving"]))
    assert np.array_equal(prepared.moving_labels, registration_scenarios.anatomy_labels(moving_points))
    fixed_points = registration_scenarios.voxel_centres(pair["fixed"])
    assert np.array_equal(prepared.fixed_labels, registration_scenarios.anatomy_labels(fixed_points)), \
        "the fixed labels are not the matched segments under the moving values (or Scalp was sent)"
    assert prepared.moving_labels.dtype == np.uint8 and not prepared.warnings

    # a moving segment the fixed side lacks is propagated but gets no Dice, and the means leave it out
    fixed = pair["fixed_segmentation"].GetSegmentation()
    fixed.RemoveSegment(fixed.GetSegmentIdBySegmentName("Lesion"))
    result = RegistrationLogic().run(pair["fixed"], pair["moving"], MODEL_ID, device="cpu",
                                     moving_segmentation=pair["moving_segmentation"],
                                     fixed_segmentation=pair["fixed_segmentation"])
    measures = [row.measure for row in result.quality]
    assert "Dice: Lesion" not in measures and "Dice: Brain" in measures
    rows = {row.measure: row.value for row in result.quality}
    assert rows["Mean Dice"] == pytest.approx(np.mean([rows[f"Dice: {name}"] for name in (
        "Brain", "Left ventricle", "Right ventricle")]))
    before = {key: value for key, value in result.report["dice_before"].items() if key != "4"}
    assert rows["Mean Dice before registration"] == pytest.approx(np.mean(list(before.values())))
    assert result.report["dice"]["4"] == 0.0, "the stand-in scored the unmatched label (as the engine does)"
    assert result.segmentation_node.GetSegmentation().GetSegment("Lesion") is not None

    # a fixed segmentation without a common name: a warning, no Dice, no fixed labels sent
    other = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other names")
    other.SetReferenceImageGeometryParameterFromVolumeNode(pair["fixed"])
    segment_id = other.GetSegmentation().AddEmptySegment("Tumour", "Tumour", (1.0, 0.0, 0.0))
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.ones((28, 34, 44), np.uint8), other, segment_id,
                                                     pair["fixed"])
    prepared = _prepare(pair["fixed"], pair["moving"], None, pair["moving_segmentation"], pair["moving_segmentation"],
                        other)
    assert prepared.fixed_labels is None and not prepared.compared
    assert prepared.moving_mask is not None and set(np.unique(prepared.moving_mask)) == {0, 1}
    assert any("No segment of 'other names'" in warning for warning in prepared.warnings), prepared.warnings


def test_quality_rows_ignore_missing_and_non_finite_values():
    """Means over the compared segments only, from per-label scores; NaN, None and missing values are left out."""
    from MIADeepLearningLib.mrml.registration_logic import QualityRow, SegmentLabel, quality_rows

    labels = [SegmentLabel(1, "a", "A", (1.0, 0.0, 0.0), ""), SegmentLabel(2, "b", "B", (0.0, 1.0, 0.0), "")]
    report = {"jacobian_non_positive_percent": 0.25, "jacobian_log_std": math.nan, "jacobian_mean": "1.01",
              "dice": {"1": 0.8, "2": None, "3": 0.0}, "dice_mean": 0.4, "dice_before_mean": 0.5}
    rows = quality_rows(report, labels)
    assert [row.measure for row in rows] == ["Folded voxels (det J <= 0), %", "Mean det J", "Dice: A", "Mean Dice"]
    assert rows[-1] == QualityRow("Mean Dice", 0.8, "over the 1 segment(s) present in both segmentations")
    assert quality_rows({}, labels) == []

    per_label = {"jacobian_region": "fixed mask", "jacobian_non_positive_percent": 0.0,
                 "dice": {"1": 0.9, "2": 0.7, "3": 0.0}, "dice_before": {"1": 0.5, "2": 0.3, "3": 0.0},
                 "dice_affine": {"1": 0.8, "2": None, "3": 0.0}}
    rows = {row.measure: row for row in quality_rows(per_label, labels)}
    assert rows["Folded voxels (det J <= 0), %"].meaning.endswith("(over the fixed mask)")
    assert rows["Dice: A"].meaning.endswith("; before registration 0.500; after the affine step 0.800")
    assert rows["Dice: B"].meaning.endswith("; before registration 0.300")
    assert rows["Mean Dice"].value == pytest.approx(0.8) and rows["Mean Dice before registration"].value == 0.4
    assert "Mean Dice after affine only" not in rows, "a mean over fewer segments than the others"


def test_a_failing_import_or_worker_leaves_the_scene_as_it_was(stand_in, monkeypatch, tmp_path):
    """Propagated labels the logic never sent (the transform and the warped volume are already in the scene by then)
    and an engine that refuses the pair: the run fails with one sentence, and the scene, the inputs and the job
    folders are as before."""
    from MIADeepLearningLib.engine.errors import InputError as EngineInputError
    from MIADeepLearningLib.mrml.registration_logic import RegistrationLogic
    from MIADeepLearningLib.testing import registration_scenarios, scenarios

    pair = registration_scenarios.phantom_pair()
    logic = RegistrationLogic(jobs_root=tmp_path / "jobs")
    arguments = {"device": "cpu", "moving_segmentation": pair["moving_segmentation"],
                 "fixed_segmentation": pair["fixed_segmentation"]}
    segmentations = {name: registration_scenarios.segmentation_fingerprint(pair[name])
                     for name in ("moving_segmentation", "fixed_segmentation")}

    original = fake_register

    def with_unknown_label(job):
        result = original(job)
        path = result["outputs"]["warped_labels"]
        labels = sitk.ReadImage(path)
        voxels = sitk.GetArrayFromImage(labels)
        voxels[0, 0, 0] = 99
        corrupted = sitk.GetImageFromArray(voxels)
        corrupted.CopyInformation(labels)
        sitk.WriteImage(corrupted, path)
        return result

    monkeypatch.setattr(sys.modules[__name__], "fake_register", with_unknown_label)
    scenarios.assert_fails_cleanly(lambda: logic.run(pair["fixed"], pair["moving"], MODEL_ID, **arguments),
                                   RuntimeError, "99", "no segment describes", watched_volume=pair["moving"])

    def refusing(job):
        raise EngineInputError("The fixed and the moving image do not overlap after the affine step.")

    monkeypatch.setattr(sys.modules[__name__], "fake_register", refusing)
    scenarios.assert_fails_cleanly(lambda: logic.run(pair["fixed"], pair["moving"], MODEL_ID, **arguments),
                                   InputError, "do not overlap", watched_volume=pair["fixed"])
    assert {name: registration_scenarios.segmentation_fingerprint(pair[name]) for name in segmentations} \
        == segmentations
    assert len(stand_in) == 2 and not list((tmp_path / "jobs").iterdir()), "a failed run left its job folder"


def test_segments_of_a_surface_segmentation_are_exported_without_touching_it(scene):
    """A segmentation that holds only closed surfaces (e.g. imported models) is converted on a copy: the label map
    covers the sphere on the reference grid, and the user's node still has no binary labelmap, in no changed scene."""
    import slicer
    import vtk

    from MIADeepLearningLib.mrml.segmentations import segments_label_array
    from MIADeepLearningLib.testing import scenarios

    reference = scenarios.volume_from_array(np.zeros((20, 24, 22), np.float32), np.diag([2.0, 2.0, 2.5, 1.0]),
                                            "reference")
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(20.0, 24.0, 25.0)
    sphere.SetRadius(10.0)
    sphere.SetThetaResolution(32)
    sphere.SetPhiResolution(32)
    sphere.Update()
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    node.GetSegmentation().SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    segment_id = node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "Ball", (1.0, 0.0, 0.0))
    labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    assert not node.GetSegmentation().ContainsRepresentation(labelmap)
    nodes_before = scenarios.scene_node_ids()

    voxels = segments_label_array(node, reference, [(segment_id, 7)])
    assert voxels.shape == (20, 24, 22) and set(np.unique(voxels)) == {0, 7}
    ball_ml = np.count_nonzero(voxels) * 2.0 * 2.0 * 2.5 / 1000.0
    assert abs(ball_ml - 4.0 / 3.0 * np.pi * 10.0**3 / 1000.0) < 0.5, ball_ml
    assert not node.GetSegmentation().ContainsRepresentation(labelmap), "the user's segmentation was converted"
    assert scenarios.scene_node_ids() == nodes_before
