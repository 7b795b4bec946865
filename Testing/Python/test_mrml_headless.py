"""The headless Slicer bootstrap: globals, logics, subject hierarchy, file IO and scene bundles on a real scene."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest


def test_init_is_a_singleton_with_slicer_globals(headless):
    import slicer

    from MIADeepLearningLib.mrml import headless as headless_module

    assert headless_module.init() is headless
    assert slicer.mrmlScene is headless.scene
    assert slicer.modules.volumes.logic() is headless.logics["Volumes"]
    assert slicer.modules.volumes.logic().IsA("vtkSlicerVolumesLogic")
    assert slicer.modules.segmentations.logic().IsA("vtkSlicerSegmentationsModuleLogic")
    assert slicer.modules.subjecthierarchy.logic().IsA("vtkSlicerSubjectHierarchyModuleLogic")
    assert slicer.modules.transforms.logic().IsA("vtkSlicerTransformLogic")
    assert slicer.modules.markups.logic().IsA("vtkSlicerMarkupsLogic")
    for name in ("Colors", "Data", "Models", "Tables", "VolumeRendering"):
        assert name in headless.logics
    # C++ code finds logics by module name through the application logic
    assert headless.app_logic.GetModuleLogic("Segmentations") is headless.logics["Segmentations"]
    assert headless.scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") > 10


def test_converter_rules_are_registered_once(headless):
    import slicer

    from MIADeepLearningLib.mrml import headless as headless_module

    headless_module.init()
    names = [rule.GetClassName() for rule in slicer.vtkSegmentationConverterFactory.GetInstance().GetConverterRules()]
    assert "vtkBinaryLabelmapToClosedSurfaceConversionRule" in names
    assert len(names) == len(set(names))


def test_refuses_to_run_inside_the_slicer_application(headless, monkeypatch):
    import slicer

    from MIADeepLearningLib.mrml import headless as headless_module

    monkeypatch.setattr(slicer, "app", object(), raising=False)
    with pytest.raises(RuntimeError, match="tests and the headless demo only"):
        headless_module.init()


def test_subject_hierarchy_items_follow_nodes(scene):
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    items_before = sh.GetNumberOfItems()
    volume = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.float32), name="v")
    item = sh.GetItemByDataNode(volume)
    assert item != 0
    assert sh.GetItemParent(item) == sh.GetSceneItemID()
    assert sh.GetNumberOfItems() == items_before + 1
    scene.RemoveNode(volume)
    assert sh.GetNumberOfItems() == items_before


def test_clear_removes_user_nodes_and_keeps_logics(headless):
    import slicer

    slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.float32), name="to_be_cleared")
    headless.clear()
    assert headless.scene.GetFirstNodeByName("to_be_cleared") is None
    # the hierarchy node is recreated right after closing, as the application does
    assert headless.scene.GetNumberOfNodesByClass("vtkMRMLSubjectHierarchyNode") == 1
    volume = slicer.util.addVolumeFromArray(np.ones((3, 4, 5), np.float32), name="after")
    assert slicer.util.arrayFromVolume(volume).sum() == 60
    headless.clear()


def test_save_node_and_load_volume_round_trip(scene, tmp_path):
    import slicer

    from MIADeepLearningLib.mrml import headless as headless_module

    voxels = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    matrix = np.diag([0.5, 0.75, 2.0, 1.0])
    matrix[:3, 3] = [1.0, -2.0, 3.0]
    volume = slicer.util.addVolumeFromArray(voxels, ijkToRAS=matrix, name="src")
    path = headless_module.save_node(volume, tmp_path / "src.nrrd")
    assert path.is_file()
    assert volume.GetStorageNode() is None  # standalone storage node
    loaded = headless_module.load_volume(path, name="loaded")
    assert loaded.GetName() == "loaded"
    assert np.array_equal(slicer.util.arrayFromVolume(loaded), voxels)
    got = slicer.util.arrayFromVTKMatrix(_matrix(loaded))
    assert np.abs(got - matrix).max() < 1e-9
    labelmap = headless_module.load_volume(path, labelmap=True)
    assert labelmap.IsA("vtkMRMLLabelMapVolumeNode")
    assert labelmap.GetName().startswith("src")  # the volumes logic makes names unique ("src_1")
    with pytest.raises(RuntimeError, match="could not load"):
        headless_module.load_volume(tmp_path / "missing.nrrd")


def test_scene_bundle_contains_the_data_and_reopens(scene, tmp_path):
    import slicer

    from MIADeepLearningLib.mrml import headless as headless_module

    voxels = np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(voxels, ijkToRAS=np.diag([0.8, 0.9, 2.5, 1.0]), name="head")
    mask = np.zeros(voxels.shape, np.uint8)
    mask[2:4, 2:5, 3:6] = 1
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "head segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("Brain", "Brain", (0.9, 0.9, 0.8))
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment_id, volume)

    path = headless_module.save_scene_mrb(tmp_path / "out" / "scene.mrb")
    assert path.is_file() and zipfile.is_zipfile(path)
    names = zipfile.ZipFile(path).namelist()
    assert any(n.endswith(".mrml") for n in names)
    assert any(n.endswith("/head.nrrd") for n in names)
    assert any(n.endswith(".seg.nrrd") for n in names)

    scene.Clear(False)
    assert scene.ReadFromMRB(str(path))
    reopened = scene.GetFirstNodeByName("head")
    assert np.array_equal(slicer.util.arrayFromVolume(reopened), voxels)
    reopened_seg = scene.GetFirstNodeByName("head segmentation")
    assert reopened_seg.GetSegmentation().GetSegment("Brain") is not None
    back = slicer.util.arrayFromSegmentBinaryLabelmap(reopened_seg, "Brain", reopened)
    assert np.array_equal(back > 0, mask > 0)


def _matrix(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix
