"""SceneGuard rolls failed runs back; provenance survives as a node attribute (and so in saved scenes)."""

from __future__ import annotations

import json

import numpy as np
import pytest


def _node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def test_scene_guard_removes_added_nodes_on_exception(scene):
    import slicer

    from MIADeepLearningLib.mrml.scene_guard import SceneGuard

    kept = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.float32), name="kept")
    ids = _node_ids(scene)
    with pytest.raises(ValueError, match="boom"):
        with SceneGuard() as guard:
            volume = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.float32), name="added")
            volume.CreateDefaultDisplayNodes()
            segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "added seg")
            segmentation.CreateDefaultDisplayNodes()
            kept.SetName("renamed")  # existing nodes are never removed, even when modified
            assert {"added", "added seg"} <= {scene.GetNodeByID(i).GetName() for i in guard.added_node_ids()}
            raise ValueError("boom")
    assert _node_ids(scene) == ids
    assert scene.GetFirstNodeByName("added") is None
    assert kept.GetScene() is scene and kept.GetName() == "renamed"


def test_scene_guard_keeps_nodes_on_success_and_after_commit(scene):
    import slicer

    from MIADeepLearningLib.mrml.scene_guard import SceneGuard

    with SceneGuard():
        slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.float32), name="result")
    assert scene.GetFirstNodeByName("result") is not None

    with pytest.raises(KeyError):
        with SceneGuard(scene) as guard:
            scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "committed")
            guard.commit()
            raise KeyError("after commit")
    assert scene.GetFirstNodeByName("committed") is not None


def test_nested_guards_roll_back_both_levels(scene):
    from MIADeepLearningLib.mrml.scene_guard import SceneGuard

    ids = _node_ids(scene)
    with pytest.raises(RuntimeError):
        with SceneGuard():
            scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "outer")
            with SceneGuard():
                scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "inner")
                raise RuntimeError("inner failure")
    assert _node_ids(scene) == ids


def test_provenance_round_trip(scene, tmp_path):
    from MIADeepLearningLib.mrml import headless
    from MIADeepLearningLib.mrml.provenance import PROVENANCE_ATTRIBUTE, get_provenance, set_provenance

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    assert get_provenance(node) is None
    data = {
        "model": "deepbet",
        "version": "1.0.2",
        "sha256": {"model.pt": "ab" * 32},
        "device": "cpu",
        "timings_s": {"inference": 1.25},
        "created": tmp_path,  # not JSON: stored as its string
    }
    set_provenance(node, data)
    text = node.GetAttribute(PROVENANCE_ATTRIBUTE)
    assert " " not in text.replace("tmp", "")[:20] and json.loads(text)["model"] == "deepbet"
    expected = dict(data, created=str(tmp_path))
    assert get_provenance(node) == expected

    # attributes are saved with the scene
    path = headless.save_scene_mrb(tmp_path / "scene.mrb")
    scene.Clear(False)
    assert scene.ReadFromMRB(str(path))
    assert get_provenance(scene.GetFirstNodeByName("result")) == expected

    node.SetAttribute(PROVENANCE_ATTRIBUTE, "{not json")
    assert get_provenance(node) is None
