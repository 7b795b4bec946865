"""DL Classification: ClassificationLogic end to end on a headless scene with a stand-in worker, and the module's
widget with stand-ins for Qt (as test_module_widgets.py does for every module).

Why a stand-in worker: the logic's side of the "classify" job contract (one job for several volumes, keys, the
per-volume results and errors, saliency files on each input's grid) must be right whatever the network answers, and
the shipped weights are placeholders whose answers nobody may assert. The stand-in runs in this process on the
files the logic exported: a fixed rule picks the type, the saliency map is the scan's own normalised intensities on
its own grid (written by SimpleITK, as the engine writes it), and a constant volume is an error for that volume
only. The scenarios of testing/classification_scenarios.py run here unchanged on it; test_scenarios.py runs them
with the real worker.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("t1w", "t1c", "t2w", "flair", "pdw", "dwi", "ct", "other")


# ------------------------------------------------------------------------------------------ the stand-in worker
def fake_classify(job) -> dict:
    """What the worker's "classify" task returns (Docs/Developers.md), from a fixed rule instead of the network."""
    import numpy as np
    import SimpleITK as sitk

    from MIADeepLearningLib.engine import registry

    classifications, files = {}, {}
    job.partial_dir.mkdir(parents=True)
    for key, path in job.inputs.items():
        image = sitk.ReadImage(path, sitk.sitkFloat32)
        voxels = sitk.GetArrayFromImage(image)
        low, high = float(voxels.min()), float(voxels.max())
        if low == high:
            classifications[key] = {"label": None, "probabilities": {}, "ood": False, "reasons": [],
                                    "error": f"The volume is empty (every voxel is {low:g}).", "timings": {}}
            continue
        scores = np.array([1.0 + index for index in range(len(CLASSES))])
        scores[int(abs(voxels.mean())) % len(CLASSES)] += 3.0  # a fixed rule: the type depends on the voxels
        probabilities = np.exp(scores) / np.exp(scores).sum()
        values = {name: float(value) for name, value in zip(CLASSES, probabilities)}
        label = max(values, key=values.get)
        classifications[key] = {"label": label, "probabilities": values, "ood": label == "other",
                                "reasons": ["the classifier found no head MR or CT contrast it knows"]
                                if label == "other" else [], "error": None, "timings": {"total_seconds": 0.01}}
        role = f"saliency_{key}"
        if role in job.outputs:
            saliency = sitk.GetImageFromArray(((voxels - low) / (high - low)).astype(np.float32))
            saliency.CopyInformation(image)
            files[role] = job.partial_dir / job.outputs[role]
            sitk.WriteImage(saliency, str(files[role]))
    job.partial_dir.rename(job.outputs_dir)
    model = registry.get_model(job.model)
    provenance = {"model_id": model.id, "model_version": model.version, "device": "cpu",
                  "created_utc": "2026-01-01T00:00:00+00:00", "extension_version": "test",
                  "weights_sha256": {weight.role: weight.sha256 for weight in model.weights},
                  "input_names": job.options.get("input_names")}
    return {"outputs": {role: str(job.outputs_dir / path.name) for role, path in files.items()},
            "classifications": classifications, "provenance": provenance, "timings": {"classify": 0.1},
            "warnings": [], "model_cached": False}


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
                result = sys.modules[__name__].fake_classify(self.job)
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
    from MIADeepLearningLib.testing import classification_scenarios

    monkeypatch.setattr(classification_scenarios, "JOBS_ROOT", tmp_path / "jobs")
    fake_worker = _fake_worker_class()
    started: list = []

    def start(job, **kwargs):
        started.append(job)
        return fake_worker(job, **kwargs)

    monkeypatch.setattr(runner, "start", start)
    return started


def _volume(name: str, direction_lps=None, spacing=(0.9, 1.3, 3.5), voxels=None):
    """A phantom head on a grid with the given (LPS) direction (default: the identity) and anisotropic spacing, as
    a volume node."""
    import numpy as np

    from MIADeepLearningLib.testing import sample_data
    from MIADeepLearningLib.testing.scenarios import volume_from_array

    matrix = np.eye(4)
    direction = np.eye(3) if direction_lps is None else direction_lps
    matrix[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction @ np.diag(spacing)
    matrix[:3, 3] = (-7.0, 11.0, 3.0)
    return volume_from_array(sample_data.phantom_head((20, 30, 26)) if voxels is None else voxels, matrix, name)


# ----------------------------------------------------------------------------------------------------- scenarios
def pytest_generate_tests(metafunc) -> None:
    """The scenarios, listed at collection: this file's top level must not import slicer (the stub-Qt case runs it
    as a script with stand-ins for slicer)."""
    if "scenario" in metafunc.fixturenames:
        from MIADeepLearningLib.testing import classification_scenarios

        metafunc.parametrize("name,scenario", classification_scenarios.SCENARIOS,
                             ids=[name for name, _ in classification_scenarios.SCENARIOS])


def test_scenario_with_stand_in_worker(stand_in, name, scenario):
    scenario()


# ---------------------------------------------------------------------------------------------------- the logic
@pytest.mark.parametrize("kind", ["identity", "flipped", "permuted", "oblique"])
def test_one_volume_job_table_attributes_and_saliency_on_the_input_grid(stand_in, kind):
    """One job, one input keyed volume1, the saliency output asked for by name; the saliency node is on the input's
    exact grid (flipped, permuted, oblique, anisotropic) with the input's values scaled to 0-1, coloured, over
    nothing else; the table and the attributes agree."""
    import helpers
    import numpy as np
    import slicer

    from MIADeepLearningLib.mrml import classification_logic as cl
    from MIADeepLearningLib.mrml.provenance import get_provenance
    from MIADeepLearningLib.mrml.volumes import ijk_to_ras, same_grid
    from MIADeepLearningLib.testing import classification_scenarios

    volume = _volume(f"head {kind}", helpers.DIRECTIONS[kind])
    result = cl.ClassificationLogic().run(volume, "sequence-type", device="cpu", create_saliency=True)
    (job,) = stand_in
    assert (job.task, job.model, list(job.inputs)) == ("classify", "sequence-type", ["volume1"])
    assert job.outputs == {"saliency_volume1": "saliency_volume1.nrrd"}
    assert job.options["input_names"] == {"volume1": f"head {kind}"}
    (row,) = result.rows
    saliency = row.saliency_node
    assert same_grid(saliency, volume) and np.allclose(ijk_to_ras(saliency), ijk_to_ras(volume), atol=1e-6)
    voxels = slicer.util.arrayFromVolume(volume)
    expected = (voxels - voxels.min()) / (voxels.max() - voxels.min())
    assert np.allclose(slicer.util.arrayFromVolume(saliency), expected, atol=1e-5), "voxels re-indexed wrongly"
    assert saliency.GetName() == f"head {kind} saliency"
    display = saliency.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeRainbow"  # the headless scene has no file colours
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0) and display.GetApplyThreshold()
    line = classification_scenarios.assert_classified(result, volume, saliency=True)
    assert line[cl.NOTES_COLUMN] == row.note_text()
    assert get_provenance(saliency)["input_node"] == f"head {kind}"
    assert get_provenance(result.table_node)["classifications"] == [row.record()]
    assert result.summary().startswith(f"'head {kind}': {row.title} (p = ")


def test_all_volumes_keeps_going_when_the_worker_fails_one(stand_in):
    """A volume the worker cannot classify (here: constant) gets its error in its row and no attributes; the
    others are classified; saliency maps only for those; earlier saliency maps and label maps are no inputs."""
    import helpers
    import numpy as np
    import slicer

    from MIADeepLearningLib.mrml import classification_logic as cl
    from MIADeepLearningLib.testing import classification_scenarios

    good = _volume("good", helpers.DIRECTIONS["oblique"])
    constant = _volume("constant", voxels=np.full((10, 12, 14), 7.0, np.float32))
    constant.SetAttribute(cl.SEQUENCE_TYPE_ATTRIBUTE, "t1w")  # from an earlier run: stays, untouched
    other = _volume("other head", helpers.DIRECTIONS["flipped"])
    labels = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    labels.SetAndObserveImageData(good.GetImageData())
    first = cl.ClassificationLogic().run(cl.scene_volumes(), "sequence-type", create_saliency=True)
    assert [row.name for row in first.rows] == ["good", "constant", "other head"]
    assert [row.classified for row in first.rows] == [True, False, True]
    assert first.rows[1].error == "The volume is empty (every voxel is 7)." and first.rows[1].saliency_node is None
    assert constant.GetAttribute(cl.SEQUENCE_TYPE_ATTRIBUTE) == "t1w"
    assert constant.GetAttribute(cl.SEQUENCE_TYPE_PROBABILITY_ATTRIBUTE) is None
    for volume in (good, other):
        classification_scenarios.assert_classified(first, volume, saliency=True)
    lines = classification_scenarios.table_rows(first.table_node)
    assert lines[1] == {cl.VOLUME_COLUMN: "constant", cl.TYPE_COLUMN: "", cl.PROBABILITY_COLUMN: "",
                        cl.RUNNER_UP_COLUMN: "", cl.RUNNER_UP_PROBABILITY_COLUMN: "", cl.OOD_COLUMN: "",
                        cl.NOTES_COLUMN: "The volume is empty (every voxel is 7)."}
    assert first.summary() == "2 of 3 volume(s) classified, 1 could not be"

    # a second run over all volumes: the saliency maps of the first are no inputs; a new table, unique name
    second = cl.ClassificationLogic().run(cl.scene_volumes(), "sequence-type")
    assert [row.name for row in second.rows] == ["good", "constant", "other head"]
    assert second.table_node is not first.table_node and second.table_node.GetName() != first.table_node.GetName()
    assert [len(job.inputs) for job in stand_in] == [3, 3], "the constant volume goes to the worker, which refuses it"


def test_a_volume_removed_during_the_run_gets_no_result(stand_in):
    import slicer

    from MIADeepLearningLib.mrml import classification_logic as cl

    first, second = _volume("first"), _volume("second")
    run = cl.ClassificationLogic().start([first, second], "sequence-type")
    slicer.mrmlScene.RemoveNode(first)
    run.wait()
    result = run.finish()
    assert [row.classified for row in result.rows] == [False, True]
    assert "removed from the scene" in result.rows[0].error
    assert first.GetAttribute(cl.SEQUENCE_TYPE_ATTRIBUTE) is None
    assert second.GetAttribute(cl.SEQUENCE_TYPE_ATTRIBUTE) in CLASSES


def test_a_failing_import_or_worker_leaves_the_scene_as_it_was(stand_in, monkeypatch, tmp_path):
    """The table cannot be made after the saliency maps were added; the worker refuses the whole job; the worker
    answers without a usable label: one sentence, no new node, no attribute, no job folder."""
    from MIADeepLearningLib.engine.errors import InputError
    from MIADeepLearningLib.mrml import classification_logic as cl
    from MIADeepLearningLib.testing import scenarios

    volumes = [_volume("first"), _volume("second")]
    logic = cl.ClassificationLogic(jobs_root=tmp_path / "jobs")

    table = cl.classification_table

    def broken_table(*args, **kwargs):
        raise RuntimeError("The table could not be made.")

    monkeypatch.setattr(cl, "classification_table", broken_table)
    scenarios.assert_fails_cleanly(lambda: logic.run(volumes, "sequence-type", create_saliency=True), RuntimeError,
                                   "table", watched_volume=volumes[0])
    monkeypatch.setattr(cl, "classification_table", table)

    def refusing(job):
        raise InputError("The worker refuses these volumes.")

    monkeypatch.setattr(sys.modules[__name__], "fake_classify", refusing)
    scenarios.assert_fails_cleanly(lambda: logic.run(volumes, "sequence-type"), InputError, "refuses",
                                   watched_volume=volumes[1])
    assert all(volume.GetAttribute(cl.SEQUENCE_TYPE_ATTRIBUTE) is None for volume in volumes)
    assert not list((tmp_path / "jobs").iterdir()), "a failed run left its job folder"


def test_unusable_answers_become_row_errors(stand_in, monkeypatch):
    """A key missing from the answer, a label that is not among the probabilities, a saliency file missing: the
    row says so, the other volumes keep their results."""
    from MIADeepLearningLib.mrml import classification_logic as cl

    volumes = [_volume(name) for name in ("a", "b", "c")]
    original = fake_classify

    def partial(job):
        result = original(job)
        del result["classifications"]["volume1"]
        result["classifications"]["volume2"]["label"] = "unheard-of"
        Path(result["outputs"].pop("saliency_volume3")).unlink()
        return result

    monkeypatch.setattr(sys.modules[__name__], "fake_classify", partial)
    result = cl.ClassificationLogic().run(volumes, "sequence-type", create_saliency=True)
    assert [row.error for row in result.rows] == ["The worker returned no result for this volume.",
                                                  "The worker returned no usable class for this volume.", None]
    assert result.rows[2].saliency_node is None
    assert result.rows[2].notes == ["no saliency map came back for this volume"]
    assert volumes[2].GetAttribute(cl.SEQUENCE_TYPE_ATTRIBUTE) in CLASSES
    assert all(volume.GetAttribute(cl.SEQUENCE_TYPE_ATTRIBUTE) is None for volume in volumes[:2])


def test_a_real_worker_cancelled_at_once_leaves_nothing(scene, tmp_path):
    """Through a real worker process (whatever task it knows): Cancel kills it, the scene and the job folder are
    as before."""
    from MIADeepLearningLib.engine.errors import CancelledError
    from MIADeepLearningLib.mrml import classification_logic as cl
    from MIADeepLearningLib.testing.scenarios import scene_node_ids

    volume = _volume("head")
    nodes = scene_node_ids()
    run = cl.ClassificationLogic(jobs_root=tmp_path / "jobs").start(volume, "sequence-type", create_saliency=True)
    run.cancel()
    with pytest.raises(CancelledError):
        run.finish()
    assert scene_node_ids() == nodes and volume.GetAttribute(cl.SEQUENCE_TYPE_ATTRIBUTE) is None
    assert not list((tmp_path / "jobs").iterdir())


@pytest.mark.slow
def test_real_worker_classifies_several_volumes_in_one_job(scene, tmp_path):
    """The real "classify" task and the shipped (placeholder) weights: an oblique anisotropic and a flipped
    permuted head are classified with saliency maps on their own grids, a constant volume gets the worker's
    sentence in its row; which type the heads get is not checked."""
    import helpers
    import numpy as np

    from MIADeepLearningLib.mrml import classification_logic as cl
    from MIADeepLearningLib.testing import classification_scenarios

    oblique = _volume("oblique head", helpers.DIRECTIONS["oblique"])
    permuted = _volume("permuted head", helpers.DIRECTIONS["permuted"] @ np.diag([-1.0, 1.0, 1.0]), (1.4, 1.0, 2.2))
    constant = _volume("constant", voxels=np.full((10, 12, 14), 7.0, np.float32))
    result = cl.ClassificationLogic(jobs_root=tmp_path / "jobs").run(cl.scene_volumes(), "sequence-type",
                                                                     device="cpu", create_saliency=True)
    assert [row.name for row in result.rows] == ["oblique head", "permuted head", "constant"]
    for volume in (oblique, permuted):  # the saliency map on the volume's own grid, 0-1 (its content: the weights')
        classification_scenarios.assert_classified(result, volume, saliency=True)
    row = result.rows[2]
    assert not row.classified and "constant" in row.error and row.saliency_node is None
    assert constant.GetAttribute(cl.SEQUENCE_TYPE_ATTRIBUTE) is None
    assert not list((tmp_path / "jobs").iterdir())


def test_class_titles_agree_with_the_engine():
    """The Slicer side keeps its own copy of the titles (the engine module imports torch)."""
    from MIADeepLearningLib.engine import classification, registry
    from MIADeepLearningLib.mrml import classification_logic as cl

    assert cl.CLASS_TITLES == classification.CLASS_TITLES
    assert tuple(registry.get_model("sequence-type").slicer["classes"]) == classification.CLASSES == CLASSES


def test_scene_volumes_and_row_texts(scene):
    import slicer

    from MIADeepLearningLib.mrml import classification_logic as cl

    visible, hidden = _volume("visible"), _volume("hidden")
    hidden.SetHideFromEditors(True)
    saliency = _volume("visible saliency")
    saliency.SetAttribute(cl.SALIENCY_OF_ATTRIBUTE, visible.GetID())
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert cl.scene_volumes() == [visible]

    row = cl.VolumeClassification(visible, "visible", "flair", {"flair": 0.956, "t2w": 0.04, "t1w": 0.004}, False)
    assert row.summary() == "FLAIR (p = 0.96; runner-up T2-weighted 0.04)"
    assert row.runner_up == ("t2w", 0.04) and row.record()["label"] == "flair"
    odd = cl.VolumeClassification(visible, "x", "other", {"other": 0.7, "ct": 0.3}, True, ["a label map"])
    assert odd.summary() == "other (p = 0.70; runner-up CT 0.30) - out of distribution"
    assert odd.note_text() == "a label map"
    failed = cl.VolumeClassification(visible, "x", error="It is 2D.")
    assert failed.summary() == "not classified: It is 2D." and failed.runner_up is None and failed.title == ""


# ------------------------------------------------------------------------------------ the module with stub Qt
def case_classification_panel(_: str) -> None:
    """All volumes: the selector is disabled and Apply needs a volume in the scene; the saliency option shows for a
    model that offers it and is passed on only then; the result: table in the panel, the status, rows in the log,
    the first saliency map over its scan at 0.4 opacity."""
    import test_module_widgets as widgets

    recorder = widgets.Recorder()
    slicer, modules = widgets._import_modules(recorder, "DLClassification")
    import MIADeepLearningLib.gui.task_widget as task_widget

    plain = types.SimpleNamespace(**vars(widgets._model("plain-classifier")), optional_outputs=[])
    with_maps = types.SimpleNamespace(**vars(widgets._model("sequence-type")), optional_outputs=["saliency"])
    widget = widgets._widget(modules["DLClassification"], "DLClassification", [with_maps, plain])
    ui, params = widget.ui, widget._parameterNode
    assert params.allVolumes is False and params.createSaliency is False and params.modelId == "sequence-type"
    assert ui.createSaliencyCheckBox.visible and not ui.resultsCollapsibleButton.visible
    assert not ui.applyButton.enabled and ui.applyButton.toolTip == "Select an input volume."

    params.allVolumes = True
    assert not ui.inputVolumeSelector.enabled
    assert not ui.applyButton.enabled and ui.applyButton.toolTip == "There is no volume in the scene to classify."
    observed = {event: callback for _, event, callback, _ in widget.Observations}
    assert observed["NodeAddedEvent"] == observed["NodeRemovedEvent"] == widget._onSceneNodesChanged
    labels = widgets.FakeLabelMapNode("labels", "vtkMRMLLabelMapVolumeNode1")
    slicer.mrmlScene.nodes.append(labels)
    widget._onSceneNodesChanged(slicer.mrmlScene, "NodeAddedEvent")
    assert not ui.applyButton.enabled, "a label map alone is nothing to classify"
    head, other = (widgets.FakeNode(name, f"vtkMRMLScalarVolumeNode{index}") for index, name in
                   enumerate(("head", "other"), start=2))
    slicer.mrmlScene.nodes.extend([head, other])
    widget._onSceneNodesChanged(slicer.mrmlScene, "NodeAddedEvent")  # loading a volume enables Apply at once
    assert ui.applyButton.enabled, ui.applyButton.toolTip

    params.createSaliency = True
    task_widget.ensureDependencies = lambda *args: None
    started: list[tuple] = []
    saliency = widgets.FakeNode("head saliency", "vtkMRMLScalarVolumeNode9")
    table = widgets.FakeNode("Sequence types", "vtkMRMLTableNode1")
    rows = [types.SimpleNamespace(volume_node=head, name="head", classified=True, saliency_node=saliency,
                                  summary=lambda: "FLAIR (p = 0.96; runner-up T2-weighted 0.02)"),
            types.SimpleNamespace(volume_node=other, name="other", classified=False, saliency_node=None,
                                  summary=lambda: "not classified: It is 2D.")]
    result = types.SimpleNamespace(rows=rows, table_node=table, warnings=[], timings={"total": 1.5},
                                   summary=lambda: "1 of 2 volume(s) classified, 1 could not be")
    widget.logic.sceneVolumes = lambda: [head, other]
    widget.logic.start = lambda *args, **kwargs: started.append((args, kwargs)) or widgets.FakeRun([[]], result=result)
    widget.onApplyButton()
    widget._onPollTimer()
    ((args, kwargs),) = started
    assert args == ([head, other], "sequence-type")
    assert kwargs == {"device": "auto", "createSaliency": True, "keepModelLoaded": True}, kwargs
    assert ui.statusLabel.text == ("Done: 1 of 2 volume(s) classified, 1 could not be; see table 'Sequence types' "
                                   "(1.5 s)."), ui.statusLabel.text
    assert "  head: FLAIR (p = 0.96; runner-up T2-weighted 0.02)" in ui.logTextEdit.lines, ui.logTextEdit.lines
    assert "  other: not classified: It is 2D." in ui.logTextEdit.lines
    assert ui.resultsTableView.tableNode is table
    assert ui.resultsCollapsibleButton.visible and not ui.resultsCollapsibleButton.collapsed
    ((_, layers),) = recorder.named("setSliceViewerLayers")
    assert layers == {"background": head, "foreground": saliency, "foregroundOpacity": 0.4, "fit": True}, layers

    # one volume, a model without saliency maps: the option is hidden and not asked for
    params.allVolumes = False
    assert ui.inputVolumeSelector.enabled and not ui.applyButton.enabled
    params.inputVolume = head
    params.modelId = "plain-classifier"
    assert not ui.createSaliencyCheckBox.visible and ui.applyButton.enabled
    result.rows, result.summary = rows[:1], lambda: "'head': FLAIR (p = 0.96)"
    rows[0].saliency_node = None
    widget.onApplyButton()
    widget._onPollTimer()
    args, kwargs = started[-1]
    assert args == (head, "plain-classifier") and kwargs["createSaliency"] is False
    assert ui.statusLabel.text == "Done: 'head': FLAIR (p = 0.96); see table 'Sequence types' (1.5 s)."
    assert len(recorder.named("setSliceViewerLayers")) == 1, "no saliency map: the views are left as they were"


def test_classification_panel_with_stub_qt() -> None:
    completed = subprocess.run([sys.executable, __file__, "case_classification_panel"], capture_output=True,
                               text=True, timeout=120, cwd=str(ROOT), check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.strip() == "ok", completed.stdout + completed.stderr


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "MIADeepLearning"))
    sys.path.insert(0, str(Path(__file__).parent))
    globals()[sys.argv[1]]("DLClassification")
    print("ok")

