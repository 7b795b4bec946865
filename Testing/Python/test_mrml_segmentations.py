"""Label files written like the engine writes them (SimpleITK, input grid) -> segmentation nodes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import rotation

BRAIN_TERMINOLOGY = (
    "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^12738006^Brain~^^~"
    "Anatomic codes - DICOM master list~^^~^^"
)
SEGMENTS = [
    {"value": 1, "name": "Brain", "color": [250, 250, 225], "terminology": BRAIN_TERMINOLOGY},
    {"value": 4, "name": "Lesion", "color": [216, 101, 79], "terminology": "lesion-entry"},
    {"value": 7, "name": "Absent", "color": [0, 151, 206], "terminology": ""},  # no voxels in the label file
]




GRIDS = {
    "oblique": rotation(1, 30.0) @ rotation(2, 25.0),
    "flipped": np.diag([-1.0, 1.0, 1.0]),  # left-handed
    "permuted": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),  # i->A, j->S, k->R
    "permuted_oblique": rotation(0, 20.0) @ np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
}


def _reference(kind: str, name: str = "T1"):
    import slicer

    matrix = np.eye(4)
    matrix[:3, :3] = GRIDS[kind] @ np.diag([0.9, 1.1, 2.5])
    matrix[:3, 3] = [-20.0, 15.5, 40.0]
    voxels = np.random.default_rng(3).normal(size=(10, 12, 14)).astype(np.float32)
    return slicer.util.addVolumeFromArray(voxels, ijkToRAS=matrix, name=name)


def _labels(shape) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[2:8, 3:9, 3:11] = 1
    labels[4:6, 5:7, 6:9] = 4
    return labels


def _write_like_the_engine(reference, labels: np.ndarray, path, tmp_path, shift_mm: float = 0.0):
    """Export the reference, read it with SimpleITK and write the labels on its grid (what the worker does)."""
    from MIADeepLearningLib.mrml import volumes

    grid = sitk.ReadImage(str(volumes.export_volume(reference, tmp_path / "input.nrrd")))
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(grid)
    if shift_mm:
        image.SetOrigin([o + shift_mm for o in image.GetOrigin()])
    sitk.WriteImage(image, str(path), True)
    return path


def _node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


@pytest.mark.parametrize("kind", sorted(GRIDS))
def test_segments_match_the_label_file(scene, tmp_path, kind):
    import slicer
    import vtk

    from MIADeepLearningLib.mrml import segmentations

    reference = _reference(kind)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), "study")
    sh.SetItemParent(sh.GetItemByDataNode(reference), folder)
    labels = _labels((10, 12, 14))
    path = _write_like_the_engine(reference, labels, tmp_path / "label.nrrd", tmp_path)

    node = segmentations.segmentation_from_label_file(path, reference, SEGMENTS, "T1 brain")
    assert node.GetName() == "T1 brain"
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(3)] == ["Brain", "Lesion", "Absent"]
    assert segmentations.segment_names(node) == ["Brain", "Lesion", "Absent"]
    for spec in SEGMENTS:
        segment = segmentation.GetSegment(spec["name"])
        assert segment.GetName() == spec["name"]
        assert np.allclose(segment.GetColor(), np.array(spec["color"]) / 255.0)
        tag = vtk.reference("")
        segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
        # without a terminology the segment keeps Slicer's default entry ("Tissue")
        assert str(tag) == (spec["terminology"] or str(tag)) and str(tag)
        got = segmentations.label_array(node, spec["name"], reference)
        assert got.dtype == np.uint8 and got.shape == labels.shape
        assert np.array_equal(got, (labels == spec["value"]).astype(np.uint8))
    assert segmentations.label_array(node, "Absent", reference).sum() == 0

    surface_name = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    assert segmentation.ContainsRepresentation(surface_name)
    surface = vtk.vtkPolyData()
    node.GetClosedSurfaceRepresentation("Brain", surface)
    assert surface.GetNumberOfPoints() > 0
    display = node.GetDisplayNode()
    assert display is not None and display.GetVisibility3D() and display.GetVisibility2DFill()
    reference_node = node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    assert reference_node is reference
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == folder


def test_reuses_a_given_segmentation_node(scene, tmp_path):
    from MIADeepLearningLib.mrml import segmentations

    reference = _reference("oblique")
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "previous result")
    existing.GetSegmentation().AddEmptySegment("Old", "Old", (1.0, 0.0, 0.0))
    labels = (_labels((10, 12, 14)) > 0).astype(np.uint8)
    path = _write_like_the_engine(reference, labels, tmp_path / "label.nrrd", tmp_path)
    count = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")

    node = segmentations.segmentation_from_label_file(path, reference, SEGMENTS[:1], "new result", existing)
    assert node is existing
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count
    assert segmentations.segment_names(node) == ["Brain"]
    assert node.GetName() == "new result"
    assert np.array_equal(segmentations.label_array(node, "Brain", reference), (labels == 1).astype(np.uint8))


def test_grid_mismatch_raises_and_leaves_the_scene_unchanged(scene, tmp_path):
    from MIADeepLearningLib.mrml import segmentations

    reference = _reference("oblique")
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "keep me")
    existing.GetSegmentation().AddEmptySegment("Old", "Old", (1.0, 0.0, 0.0))
    path = _write_like_the_engine(reference, _labels((10, 12, 14)), tmp_path / "off.nrrd", tmp_path, shift_mm=1.0)
    ids = _node_ids(scene)
    with pytest.raises(RuntimeError, match="not on the grid of the input volume 'T1'"):
        segmentations.segmentation_from_label_file(path, reference, SEGMENTS, "bad")
    assert _node_ids(scene) == ids
    with pytest.raises(RuntimeError, match="not on the grid"):
        segmentations.segmentation_from_label_file(path, reference, SEGMENTS, "bad", existing)
    assert _node_ids(scene) == ids
    assert segmentations.segment_names(existing) == ["Old"]  # untouched: the file was checked first
    assert existing.GetName() == "keep me"


def test_undescribed_label_values_are_refused(scene, tmp_path):
    from MIADeepLearningLib.mrml import segmentations

    reference = _reference("oblique")
    path = _write_like_the_engine(reference, _labels((10, 12, 14)), tmp_path / "label.nrrd", tmp_path)
    ids = _node_ids(scene)
    with pytest.raises(RuntimeError, match=r"values \[4\] that no segment describes"):
        segmentations.segmentation_from_label_file(path, reference, SEGMENTS[:1], "partial")
    assert _node_ids(scene) == ids


def test_failure_after_nodes_were_added_removes_them(scene, tmp_path, monkeypatch):
    import slicer

    from MIADeepLearningLib.mrml import segmentations

    reference = _reference("oblique")
    path = _write_like_the_engine(reference, _labels((10, 12, 14)), tmp_path / "label.nrrd", tmp_path)
    ids = _node_ids(scene)

    def fail(*_args):
        raise RuntimeError("placement failed")

    monkeypatch.setattr(segmentations, "place_beside", fail)
    with pytest.raises(RuntimeError, match="placement failed"):
        segmentations.segmentation_from_label_file(path, reference, SEGMENTS, "half built")
    assert _node_ids(scene) == ids
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert slicer.mrmlScene.GetFirstNodeByName("half built") is None


@pytest.mark.parametrize(
    "segments",
    [
        [],
        [{"value": 1, "name": "A", "color": [1, 2, 3]}, {"value": 1, "name": "B", "color": [1, 2, 3]}],
        [{"value": 1, "name": "A", "color": [1, 2, 3]}, {"value": 2, "name": "A", "color": [1, 2, 3]}],
        [{"value": 0, "name": "background", "color": [0, 0, 0]}],
    ],
)
def test_bad_segment_descriptions_are_refused(scene, tmp_path, segments):
    from MIADeepLearningLib.mrml import segmentations

    reference = _reference("oblique")
    with pytest.raises(ValueError):
        segmentations.segmentation_from_label_file(tmp_path / "never-read.nrrd", reference, segments, "x")
