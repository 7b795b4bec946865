"""DL Lesion Detection: DetectionLogic end to end on a headless scene with a stand-in worker, the load / re-derive
parts on synthetic maps, and the module's widget with stand-ins for Qt (as test_module_widgets.py does for every
module).

Why a stand-in worker: the logic's side of the "detect" job (inputs image, image2, ...; the anomaly, label and brain
files on the input's grid; candidates, case score, threshold, segments) must be right whatever the network answers,
and what an untrained or placeholder network answers nobody may assert. The stand-in runs in this process on the
files the logic exported: the anomaly map is the scan's intensity / 1000 (the test volumes put their "lesions"
above 500), the brain map comes from intensity bands, and the candidates come from engine.candidates, as in the
engine; it writes with SimpleITK, as the engine does. The scenarios of testing/detection_scenarios.py run here
unchanged on it; test_scenarios.py runs them with the real worker.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "brain-lesion"


# ------------------------------------------------------------------------------------------ the stand-in worker
def _sitk_kji_to_ras(image):
    """As engine.detection.kji_to_ras (that module imports torch through brain_tissue)."""
    import numpy as np

    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ (direction @ np.diag(image.GetSpacing()))[:, ::-1]
    matrix[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(image.GetOrigin(), float)
    return matrix


def fake_detect(job) -> dict:
    """What the worker's "detect" task returns, from intensity rules instead of the network."""
    import numpy as np
    import SimpleITK as sitk

    from MIADeepLearningLib.engine import candidates, registry
    from MIADeepLearningLib.mrml.detection_logic import CANDIDATE_COLOURS, LESION_TERMINOLOGY

    assert job.task == "detect" and set(job.outputs) == {"anomaly", "label", "brain"}, job
    image = sitk.ReadImage(job.inputs["image"], sitk.sitkFloat32)
    for role, path in job.inputs.items():  # image, image2, image3, ...: each a readable 3D volume
        assert role.startswith("image") and sitk.ReadImage(path).GetDimension() == 3, role
    voxels = sitk.GetArrayFromImage(image)
    anomaly = np.clip(voxels / 1000.0, 0.0, 1.0).astype(np.float32)
    brain = np.select([voxels >= 180, voxels >= 120], [3, 1], 0).astype(np.uint8)
    threshold = float(job.options.get("model_options", {}).get("threshold", 0.5))
    voxel_volume = float(np.prod(image.GetSpacing()))
    labels, found = candidates.find_candidates(anomaly, brain, _sitk_kji_to_ras(image), voxel_volume, threshold,
                                               10.0)
    score = candidates.case_score(anomaly, brain, voxel_volume)
    job.partial_dir.mkdir(parents=True)
    for role, voxels_out in (("anomaly", anomaly), ("label", labels), ("brain", brain)):
        written = sitk.GetImageFromArray(voxels_out)
        written.CopyInformation(image)
        sitk.WriteImage(written, str(job.partial_dir / job.outputs[role]))
    job.partial_dir.rename(job.outputs_dir)
    model = registry.get_model(job.model)
    provenance = {"model_id": model.id, "model_version": model.version, "device": "cpu",
                  "created_utc": "2026-01-01T00:00:00+00:00", "extension_version": "test",
                  "weights_sha256": {weight.role: weight.sha256 for weight in model.weights},
                  "threshold": threshold, "min_volume_mm3": 10.0, "candidates": len(found),
                  "inputs": [job.options["input_names"][role] for role in job.inputs]}
    segments = [{"value": item["label"], "name": f"Candidate {item['label']}",
                 "color": CANDIDATE_COLOURS[(item["label"] - 1) % len(CANDIDATE_COLOURS)],
                 "terminology": LESION_TERMINOLOGY} for item in found]
    return {"outputs": {role: str(job.outputs_dir / name) for role, name in job.outputs.items()},
            "candidates": found, "case_score": round(score, 4), "threshold": threshold, "segments": segments,
            "provenance": provenance, "timings": {"detect": 0.1}, "warnings": [], "model_cached": False}


def _fake_worker_class():
    from MIADeepLearningLib import jobs, runner
    from MIADeepLearningLib.engine.errors import InputError

    class FakeWorker(runner._JobHandle):
        """Running until first polled (so Cancel can come first); then the stand-in runs on the exported files."""

        def __init__(self, job: jobs.Job, on_event=None, **kwargs) -> None:
            super().__init__(job, on_event, None, None)
            self.pid = None

        def poll(self) -> list[jobs.Event]:
            if self.state != runner.STATE_RUNNING:
                return []
            events = [jobs.Event(stage="start", progress=0.0, message="stand-in worker")]
            try:
                result = sys.modules[__name__].fake_detect(self.job)
            except InputError as error:
                events.append(jobs.Event(stage=jobs.STAGE_ERROR, message=str(error), error_type="InputError"))
                self.state = runner.STATE_ERROR
            else:
                events.append(jobs.Event(stage=jobs.STAGE_DONE, progress=1.0, result=result))
                self.state = runner.STATE_DONE
            self.final_event = events[-1]
            for event in events:
                if self.on_event is not None:
                    self.on_event(event)
            return events

        def _kill(self) -> int | None:
            return None

    return FakeWorker


@pytest.fixture
def stand_in(scene, tmp_path, monkeypatch):
    """The stand-in worker for every job (jobs under tmp_path); returns the list of started jobs."""
    from MIADeepLearningLib import runner
    from MIADeepLearningLib.testing import detection_scenarios

    monkeypatch.setattr(detection_scenarios, "JOBS_ROOT", tmp_path / "jobs")
    fake_worker = _fake_worker_class()
    started: list = []

    def start(job, **kwargs):
        started.append(job)
        return fake_worker(job, **kwargs)

    monkeypatch.setattr(runner, "start", start)
    return started


def lesion_voxels(shape=(18, 30, 26)):
    """A phantom head (k, j, i): scalp 150, brain 200, and two "lesions" peaking at 900 and 700."""
    import numpy as np

    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(i**2 + j**2 + k**2)
    voxels = np.where(radius < 0.95, 150.0, 0.0) + np.where(radius < 0.8, 50.0, 0.0)
    for peak, (ck, cj, ci) in ((700.0, (0.0, -0.3, -0.3)), (500.0, (0.1, 0.35, 0.3))):
        voxels += peak * np.exp(-0.5 * (((k - ck) ** 2 + (j - cj) ** 2 + (i - ci) ** 2) / 0.15**2))
    return voxels.astype(np.float32)


def _volume(name: str, direction_lps=None, spacing=(0.9, 1.3, 3.5), voxels=None):
    """A lesion phantom on a grid with the given (LPS) direction (default: the identity) and anisotropic spacing."""
    import numpy as np

    from MIADeepLearningLib.testing.scenarios import volume_from_array

    matrix = np.eye(4)
    direction = np.eye(3) if direction_lps is None else direction_lps
    matrix[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction @ np.diag(spacing)
    matrix[:3, 3] = (-7.0, 11.0, 3.0)
    return volume_from_array(lesion_voxels() if voxels is None else voxels, matrix, name)


# ----------------------------------------------------------------------------------------------------- scenarios
def pytest_generate_tests(metafunc) -> None:
    """The scenarios, listed at collection: this file's top level must not import slicer (the stub-Qt case runs it
    as a script with stand-ins for slicer)."""
    if "scenario" in metafunc.fixturenames:
        from MIADeepLearningLib.testing import detection_scenarios

        metafunc.parametrize("name,scenario", detection_scenarios.SCENARIOS,
                             ids=[name for name, _ in detection_scenarios.SCENARIOS])


def test_scenario_with_stand_in_worker(stand_in, name, scenario):
    scenario()


# ---------------------------------------------------------------------------------------------------- the logic
@pytest.mark.parametrize("kind", ["identity", "flipped", "permuted", "oblique"])
def test_outputs_on_the_input_grid(stand_in, kind):
    """One job (inputs image only, the three output files, the model's threshold); every output on the input's
    exact grid (flipped, permuted, oblique, anisotropic: the result files are re-indexed, never resampled), the
    anomaly map holding the stand-in's values voxel for voxel; two candidates by decreasing score."""
    import helpers
    import numpy as np
    import slicer

    from MIADeepLearningLib.mrml import detection_logic as dl
    from MIADeepLearningLib.mrml.provenance import get_provenance
    from MIADeepLearningLib.testing import detection_scenarios

    volume = _volume(f"head {kind}", helpers.DIRECTIONS[kind])
    result = dl.DetectionLogic().run(volume, MODEL_ID, device="cpu")
    (job,) = stand_in
    assert (job.task, job.model, list(job.inputs)) == ("detect", MODEL_ID, ["image"])
    assert job.outputs == dl.OUTPUT_FILES
    assert job.options["input_names"] == {"image": f"head {kind}"}
    assert job.options["model_options"] == {"threshold": 0.5}
    voxels = slicer.util.arrayFromVolume(volume)
    assert np.array_equal(slicer.util.arrayFromVolume(result.anomaly_node), np.clip(voxels / 1000.0, 0, 1)), \
        "the anomaly map was re-indexed wrongly"
    detection_scenarios.assert_detection(result, volume, expected_model=MODEL_ID)
    assert len(result.candidates) == 2 and result.candidates[0]["max_score"] > 0.8
    assert result.segmentation_node.GetName() == f"head {kind} lesion candidates"
    assert result.anomaly_node.GetName() == f"head {kind} anomaly map"
    assert result.table_node.GetAttribute(dl.CASE_SCORE_ATTRIBUTE) == f"{result.case_score:.4f}"
    provenance = get_provenance(result.table_node)
    assert provenance["extra_input_nodes"] == [] and "timings_s" in provenance
    assert provenance["candidates"] == 2 and provenance["candidate_records"][0]["label"] == 1
    assert provenance["case_score"] == result.case_score
    assert result.warnings == []


def test_extra_contrasts_go_to_the_job_as_image2_and_image3(stand_in):
    """The extra contrasts travel as image2, image3 with their names; the provenance names them; a contrast that
    is the input or given twice, or far away in space, is refused before any job."""
    import numpy as np

    from MIADeepLearningLib.engine.errors import InputError
    from MIADeepLearningLib.mrml import detection_logic as dl
    from MIADeepLearningLib.mrml.provenance import get_provenance
    from MIADeepLearningLib.testing.scenarios import assert_fails_cleanly

    flair = _volume("FLAIR")
    t1 = _volume("T1", np.diag([-1.0, 1.0, 1.0]), spacing=(1.0, 1.0, 1.0))
    t2 = _volume("T2", voxels=lesion_voxels() * 0.5)
    result = dl.DetectionLogic().run(flair, MODEL_ID, extra_volumes=[t1, None, t2])
    (job,) = stand_in
    assert list(job.inputs) == ["image", "image2", "image3"]
    assert [Path(path).name for path in job.inputs.values()] == ["image.nrrd", "image2.nrrd", "image3.nrrd"]
    assert job.options["input_names"] == {"image": "FLAIR", "image2": "T1", "image3": "T2"}
    assert get_provenance(result.anomaly_node)["extra_input_nodes"] == ["T1", "T2"]
    logic = dl.DetectionLogic()
    assert_fails_cleanly(lambda: logic.run(flair, MODEL_ID, extra_volumes=[t1, t1]), InputError,
                         "selected twice", watched_volume=flair)
    assert_fails_cleanly(lambda: logic.run(flair, MODEL_ID, extra_volumes=[flair]), InputError, "selected twice")
    far = _volume("elsewhere")
    far.SetOrigin(500.0, 500.0, 500.0)
    assert_fails_cleanly(lambda: logic.run(flair, MODEL_ID, extra_volumes=[far]), InputError, "co-registered")
    assert len(stand_in) == 1


def test_the_slider_never_runs_a_job(stand_in):
    """After one run, re-deriving at other thresholds starts no job; fewer candidates as the threshold rises; the
    shown result is the anomaly map's (detection_of) every time."""
    from MIADeepLearningLib.mrml import detection_logic as dl

    volume = _volume("head")
    first = dl.DetectionLogic().run(volume, MODEL_ID)
    counts = []
    for threshold in (0.3, 0.55, 0.75, 0.88, 0.95):
        result = dl.rederive(first.anomaly_node, threshold)
        counts.append(result.found)
        shown = dl.detection_of(first.anomaly_node)
        assert shown.candidates == result.candidates and shown.threshold == threshold
        assert [roi.GetID() for roi in shown.roi_nodes] == [roi.GetID() for roi in result.roi_nodes]
    assert len(stand_in) == 1, "re-deriving ran a job"
    assert counts == sorted(counts, reverse=True) and counts[0] == 2 and counts[-1] == 0, counts


def test_a_failed_run_leaves_the_scene_and_the_chosen_segmentation_as_they_were(stand_in, monkeypatch, tmp_path):
    """The worker refuses the input; Slicer cannot import the segments after every other output was made (the
    chosen output segmentation is restored, the boxes' folder removed): one sentence, no new node, no job folder."""
    import slicer

    from MIADeepLearningLib.engine.errors import InputError
    from MIADeepLearningLib.mrml import detection_logic as dl
    from MIADeepLearningLib.testing.scenarios import assert_fails_cleanly

    volume = _volume("head")
    chosen = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my candidates")
    chosen.GetSegmentation().AddEmptySegment("kept", "kept")
    logic = dl.DetectionLogic(jobs_root=tmp_path / "jobs")

    def refusing(job):
        raise InputError("This does not look like a brain MRI.")

    original = fake_detect
    monkeypatch.setattr(sys.modules[__name__], "fake_detect", refusing)
    assert_fails_cleanly(lambda: logic.run(volume, MODEL_ID, output_segmentation=chosen), InputError,
                         "brain MRI", watched_volume=volume)
    monkeypatch.setattr(sys.modules[__name__], "fake_detect", original)

    class BrokenSegmentations:
        def ImportLabelmapToSegmentationNode(self, *args):
            return False

    monkeypatch.setattr(slicer.modules.segmentations, "logic", lambda: BrokenSegmentations())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    items_before = sh.GetNumberOfItems()
    assert_fails_cleanly(lambda: logic.run(volume, MODEL_ID, output_segmentation=chosen), RuntimeError,
                         "segments", watched_volume=volume)
    assert sh.GetNumberOfItems() == items_before, "the failed import left subject hierarchy items (a folder)"
    assert chosen.GetName() == "my candidates"
    segmentation = chosen.GetSegmentation()
    assert [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())] == \
        ["kept"], "the chosen output segmentation was not restored"
    assert not list((tmp_path / "jobs").iterdir()), "a failed run left its job folder"


def test_a_chosen_output_segmentation_receives_the_candidates(stand_in):
    """Outputs go to new nodes except the segmentation the user picked: its old segments are replaced."""
    import slicer

    from MIADeepLearningLib.mrml import detection_logic as dl

    volume = _volume("head")
    chosen = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my candidates")
    chosen.GetSegmentation().AddEmptySegment("old", "old")
    segmentations_before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    result = dl.DetectionLogic().run(volume, MODEL_ID, output_segmentation=chosen)
    assert result.segmentation_node is chosen
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations_before
    assert chosen.GetSegmentation().GetSegment("old") is None
    assert chosen.GetSegmentation().GetNumberOfSegments() == len(result.candidates) == 2
    second = dl.DetectionLogic().run(volume, MODEL_ID)
    assert second.segmentation_node is not chosen and second.anomaly_node is not result.anomaly_node
    assert second.anomaly_node.GetName() != result.anomaly_node.GetName(), "two runs, one name"


def test_worker_candidates_that_do_not_match_its_label_map_are_derived_again(stand_in, monkeypatch):
    """A worker answer whose candidates disagree with its label file is not shown as it is: the candidates are
    derived from the anomaly map (same code as the engine) and a warning says so."""
    from MIADeepLearningLib.mrml import detection_logic as dl

    original = fake_detect

    def partial(job):
        result = original(job)
        result["candidates"] = result["candidates"][:1]
        return result

    monkeypatch.setattr(sys.modules[__name__], "fake_detect", partial)
    result = dl.DetectionLogic().run(_volume("head"), MODEL_ID)
    assert len(result.candidates) == 2 and len(result.warnings) == 1 and "derived again" in result.warnings[0]


def test_many_candidates_are_capped_and_the_summary_says_so(scene, monkeypatch):
    from MIADeepLearningLib.mrml import detection_logic as dl
    from MIADeepLearningLib.testing import detection_scenarios

    monkeypatch.setattr(dl, "MAX_SHOWN_CANDIDATES", 2)
    _, result = detection_scenarios.synthetic_detection()
    assert result.found == 3 and [item["label"] for item in result.candidates] == [1, 2]
    assert len(result.roi_nodes) == result.points_node.GetNumberOfControlPoints() == 2
    assert result.segmentation_node.GetSegmentation().GetNumberOfSegments() == 2
    assert result.table_node.GetAttribute(dl.CANDIDATES_FOUND_ATTRIBUTE) == "3"
    assert "3 lesion candidates (the 2 highest shown)" in result.summary(), result.summary()


def test_rederive_remakes_deleted_outputs_and_refuses_without_the_brain_map(scene):
    import slicer

    from MIADeepLearningLib.engine.errors import InputError
    from MIADeepLearningLib.mrml import detection_logic as dl
    from MIADeepLearningLib.testing import detection_scenarios
    from MIADeepLearningLib.testing.scenarios import assert_fails_cleanly

    volume, first = detection_scenarios.synthetic_detection()
    slicer.mrmlScene.RemoveNode(first.table_node)
    slicer.mrmlScene.RemoveNode(first.points_node)
    slicer.mrmlScene.RemoveNode(first.roi_nodes[0])
    again = dl.rederive(first.anomaly_node, 0.7)
    assert again.table_node is not None and again.table_node.GetScene() is slicer.mrmlScene
    assert again.points_node.GetNumberOfControlPoints() == len(again.candidates) == 2
    detection_scenarios.assert_detection(again, volume)
    slicer.mrmlScene.RemoveNode(first.brain_node)
    assert_fails_cleanly(lambda: dl.rederive(first.anomaly_node, 0.5), InputError, "brain map", "run the detection")


def test_a_detection_survives_a_scene_bundle(scene, tmp_path):
    """Saved as .mrb and opened again, the anomaly map still leads to every output (node references) and the
    slider still re-derives."""
    from MIADeepLearningLib.mrml import detection_logic as dl
    from MIADeepLearningLib.mrml import headless as headless_module
    from MIADeepLearningLib.testing import detection_scenarios

    volume, first = detection_scenarios.synthetic_detection()
    names = sorted(node.GetName() for node in first.nodes)
    path = headless_module.save_scene_mrb(tmp_path / "case.mrb")
    scene.Clear(False)
    assert scene.ReadFromMRB(str(path))
    anomaly = scene.GetFirstNodeByName(first.anomaly_node.GetName())
    shown = dl.detection_of(anomaly)
    assert shown is not None and sorted(node.GetName() for node in shown.nodes) == names
    assert shown.candidates == first.candidates and shown.case_score == first.case_score
    again = dl.rederive(anomaly, 0.7)
    assert again.found == 2 and again.table_node is shown.table_node
    reopened = scene.GetFirstNodeByName(volume.GetName())
    detection_scenarios.assert_detection(again, reopened)


def test_constants_agree_with_the_engine():
    """The Slicer side keeps copies of the lesion terminology and colours (engine/detection.py imports SimpleITK)."""
    from MIADeepLearningLib.engine import candidates, detection
    from MIADeepLearningLib.mrml import detection_logic as dl

    assert dl.LESION_TERMINOLOGY == detection.LESION_TERMINOLOGY
    assert [list(colour) for colour in dl.CANDIDATE_COLOURS] == [list(colour) for colour in
                                                                 detection.CANDIDATE_COLOURS]
    assert {value: name.lower() for value, (name, _) in dl.BRAIN_LABELS.items()} == \
        {value: name.lower() for value, name in candidates.TISSUE_NAMES.items()}
    assert dl.WORKER_TASK == "detect"


def test_a_real_worker_cancelled_at_once_leaves_nothing(scene, tmp_path):
    """Through a real worker process (whatever task it knows): Cancel kills it, the scene and the job folder are
    as before."""
    from MIADeepLearningLib.engine.errors import CancelledError
    from MIADeepLearningLib.mrml import detection_logic as dl
    from MIADeepLearningLib.testing.scenarios import scene_node_ids

    volume = _volume("head")
    nodes = scene_node_ids()
    run = dl.DetectionLogic(jobs_root=tmp_path / "jobs").start(volume, MODEL_ID)
    run.cancel()
    with pytest.raises(CancelledError):
        run.finish()
    assert scene_node_ids() == nodes
    assert not list((tmp_path / "jobs").iterdir())


# ------------------------------------------------------------------------------------ the module with stub Qt
def _detection_result(widgets, threshold: float, found: int, name: str = "head"):
    """What DetectionResult offers the widget, with stand-in nodes."""
    candidates = [{"label": index, "volume_ml": 1.5 * index, "center_ras": [10.0 * index, -5.0, 2.5],
                   "max_score": 0.9 - 0.1 * index, "mean_score": 0.7, "tissue": "white matter", "voxels": 40}
                  for index in range(1, found + 1)]
    return types.SimpleNamespace(
        anomaly_node=widgets.FakeNode(f"{name} anomaly map", "vtkMRMLScalarVolumeNode8"),
        table_node=widgets.FakeNode(f"{name} lesion candidates table", "vtkMRMLTableNode1"), candidates=candidates,
        found=found, threshold=threshold, case_score=0.83, warnings=[], timings={"total": 2.0},
        summary=lambda: f"{found} lesion candidates at threshold {threshold:.2f}; case abnormality score 0.83")


def _register_module(widgets) -> None:
    """Teach test_module_widgets' generic cases about this module (in the subprocess only)."""
    if "DLLesionDetection" not in widgets.MODULES:
        widgets.MODULES = (*widgets.MODULES, "DLLesionDetection")
    result = _detection_result(widgets, 0.5, 2)
    widgets.CASES["DLLesionDetection"] = {
        "model": MODEL_ID, "title": "DL Lesion Detection", "failed": "Lesion detection failed: boom",
        "start_kwargs": {"extraVolumes": [], "outputSegmentation": None, "keepModelLoaded": True},
        "result": result,
        "done": "Done: 2 lesion candidates at threshold 0.50; case abnormality score 0.83 (2.0 s).",
    }


def case_detection_panel(_: str) -> None:
    """Extra contrasts reach start() and one that is the input refuses Apply; the result: status, candidates in the
    log, the anomaly map over the input at 0.4 opacity, the results section with case score and table, the slider
    at the result's threshold; moving it re-derives once the timer fires (no start()), a failure there is one
    sentence; a click on a row jumps to that candidate; another anomaly map in the parameter node (a loaded scene)
    is shown through detectionOf; none hides the section."""
    import test_module_widgets as widgets

    _register_module(widgets)
    recorder = widgets.Recorder()
    slicer, modules = widgets._import_modules(recorder, "DLLesionDetection")
    import MIADeepLearningLib.gui.task_widget as task_widget
    from MIADeepLearningLib.engine.errors import InputError

    module = modules["DLLesionDetection"]
    slicer.modules = types.SimpleNamespace(markups=types.SimpleNamespace(
        logic=lambda: types.SimpleNamespace(JumpSlicesToLocation=recorder("jump"))))
    widget = widgets._widget(module, "DLLesionDetection", [widgets._model(MODEL_ID)])
    ui, params = widget.ui, widget._parameterNode
    assert params.threshold == 0.5 and params.anomalyMap is None and params.extraVolume1 is None
    assert not ui.resultsCollapsibleButton.visible and ui.resultsTableView.tableNode is None
    assert ui.resultsTableView.connections["clicked(QModelIndex)"] == widget.onResultsTableClicked
    head, t2, t1 = (widgets.FakeNode(name, f"vtkMRMLScalarVolumeNode{index}")
                    for index, name in enumerate(("head", "T2", "T1"), start=1))
    slicer.mrmlScene.nodes.extend([head, t2, t1])
    params.inputVolume = head
    assert ui.applyButton.enabled, ui.applyButton.toolTip
    params.extraVolume1 = head
    assert not ui.applyButton.enabled and "input volume itself" in ui.applyButton.toolTip
    params.extraVolume1 = t2
    params.extraVolume2 = t2
    assert not ui.applyButton.enabled and "same volume" in ui.applyButton.toolTip
    params.extraVolume2 = t1
    assert ui.applyButton.enabled, ui.applyButton.toolTip

    task_widget.ensureDependencies = lambda *args: None
    started: list[tuple] = []
    result = _detection_result(widgets, 0.5, 2)
    widget.logic.start = lambda *args, **kwargs: started.append((args, kwargs)) or widgets.FakeRun([[]],
                                                                                                   result=result)
    params.threshold = 0.3  # a slider value with no result shown: not used by Apply, re-derives nothing
    assert not widget._rederiveTimer.active
    widget.onApplyButton()
    widget._onPollTimer()
    ((args, kwargs),) = started
    assert args == (head, MODEL_ID)
    assert kwargs == {"device": "auto", "extraVolumes": [t2, t1], "outputSegmentation": None,
                      "keepModelLoaded": True}, kwargs
    assert ui.statusLabel.text == ("Done: 2 lesion candidates at threshold 0.50; case abnormality score 0.83 "
                                   "(2.0 s)."), ui.statusLabel.text
    assert any(line.startswith("  Candidate 1: 1.50 mL at RAS (10.0, -5.0, 2.5), max 0.80") for line in
               ui.logTextEdit.lines), ui.logTextEdit.lines
    ((_, layers),) = recorder.named("setSliceViewerLayers")
    assert layers == {"background": head, "foreground": result.anomaly_node, "foregroundOpacity": 0.4,
                      "fit": True}, layers
    assert params.anomalyMap is result.anomaly_node and params.threshold == 0.5
    assert ui.resultsCollapsibleButton.visible and ui.resultsTableView.tableNode is result.table_node
    assert "Case abnormality score: 0.83" in ui.resultSummaryLabel.text and not widget._rederiveTimer.active

    # the slider: re-derive when the timer fires, never start()
    rederived: list[tuple] = []
    fewer = _detection_result(widgets, 0.7, 1)
    fewer.anomaly_node = result.anomaly_node
    widget.logic.rederive = lambda *args: rederived.append(args) or fewer
    params.threshold = 0.7
    assert widget._rederiveTimer.active and widget._rederiveTimer.interval == module.REDERIVE_DELAY_MS
    widget._onRederiveTimer()
    assert rederived == [(result.anomaly_node, 0.7)] and len(started) == 1
    assert not widget._rederiveTimer.active and "1 candidate(s) at threshold 0.70" in ui.resultSummaryLabel.text
    assert ui.statusLabel.text.startswith("Threshold 0.70: 1 lesion candidates")
    widget._onRederiveTimer()  # nothing moved since: nothing to do
    assert len(rederived) == 1

    def broken(*args):
        raise InputError("The brain map of 'head anomaly map' was removed from the scene.")

    widget.logic.rederive = broken
    params.threshold = 0.6
    widget._onRederiveTimer()
    (args, kwargs), = recorder.named("errorDisplay")
    assert args == ("The candidates could not be derived again: The brain map of 'head anomaly map' was removed "
                    "from the scene.",), args

    # a row click jumps the slice views to that candidate
    widget.onResultsTableClicked(types.SimpleNamespace(row=lambda: 0))
    widget.onResultsTableClicked(types.SimpleNamespace(row=lambda: 5))  # no such row: nothing
    assert recorder.named("jump") == [((10.0, -5.0, 2.5, True), {})]

    # another detection selected in the parameter node (e.g. a loaded scene), then none
    loaded = _detection_result(widgets, 0.42, 3, name="other")
    asked: list = []
    widget.logic.detectionOf = lambda node: asked.append(node) or loaded
    params.anomalyMap = loaded.anomaly_node
    assert asked == [loaded.anomaly_node] and ui.resultsTableView.tableNode is loaded.table_node
    assert params.threshold == 0.42 and not widget._rederiveTimer.active
    params.anomalyMap = None
    assert not ui.resultsCollapsibleButton.visible and ui.resultsTableView.tableNode is None
    widget.cleanup()


def case_logic_wrapper(_: str) -> None:
    """The thin Logic: cold and warm task logics as every module's; rederive and detectionOf go to the library."""
    import test_module_widgets as widgets

    _register_module(widgets)
    _, modules = widgets._import_modules(widgets.Recorder(), "DLLesionDetection")
    import MIADeepLearningLib.gui.task_logic as task_logic

    task_logic.requirePythonSlicer = lambda: "/opt/Slicer/bin/PythonSlicer"
    logic = modules["DLLesionDetection"].DLLesionDetectionLogic()
    created: list[tuple] = []
    calls: list[tuple] = []

    def create(python, warm):
        created.append((python, warm))
        return types.SimpleNamespace(start=lambda *args, **kwargs: calls.append((args, kwargs)) or "run")

    logic.createTaskLogic = create
    cold = logic.detectionLogic(False)
    assert logic.detectionLogic(False) is cold and created == [("/opt/Slicer/bin/PythonSlicer", None)]
    volume = widgets.FakeNode("head", "vtkMRMLScalarVolumeNode1")
    assert logic.start(volume, extraVolumes=(volume,), threshold=0.6) == "run"
    assert calls == [((volume, MODEL_ID), {"device": "auto", "extra_volumes": [volume], "threshold": 0.6,
                                           "output_segmentation": None, "timeout_s": None, "on_event": None})]


@pytest.mark.parametrize("case", ["case_detection_panel", "case_logic_wrapper"])
def test_detection_module_with_stub_qt(case: str) -> None:
    completed = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, timeout=120,
                               cwd=str(ROOT), check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.strip() == "ok", completed.stdout + completed.stderr


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "MIADeepLearning"))
    sys.path.insert(0, str(Path(__file__).parent))
    globals()[sys.argv[1]]("DLLesionDetection")
    print("ok")
