"""Brain tissue results on a headless MRML scene: CSF / gray / white matter become terminology-coded segments with
their standard colours and 3D surfaces, segment volumes become a table node (voxels counted on the input grid, mL
from its voxel size), and a whole run through SegmentationLogic (real worker process, a minimal package with tiny
random UNet3D weights) adds the segmentation, the uncertainty map and the table, each with provenance."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import TISSUE_MODEL_ID, rotation, write_tissue_package

from MIADeepLearningLib.engine import errors, registry
from MIADeepLearningLib.engine.brain_tissue import TISSUE_SEGMENTS

SEGMENTS = [{"value": value, **TISSUE_SEGMENTS[key]} for value, key in enumerate(("csf", "gm", "wm"), 1)]
SPACING = (0.9, 1.1, 2.5)


def _reference(name: str = "T2 head"):
    """An oblique, anisotropic volume node: a bright ball inside a darker one on a zero background."""
    import slicer

    matrix = np.eye(4)
    matrix[:3, :3] = rotation(1, 30.0) @ rotation(2, 25.0) @ np.diag(SPACING)
    matrix[:3, 3] = [-20.0, 15.5, 40.0]
    k, j, i = np.mgrid[:16, :40, :36].astype(np.float32)
    radius = np.sqrt((0.9 * (i - 18)) ** 2 + (1.1 * (j - 20)) ** 2 + (2.5 * (k - 8)) ** 2)
    voxels = np.where(radius < 17, 120.0, 0.0) + np.where(radius < 9, 180.0, 0.0)
    node = slicer.util.addVolumeFromArray(voxels.astype(np.float32), ijkToRAS=matrix, name=name)
    node.CreateDefaultDisplayNodes()
    return node


def _tissue_labels(shape) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[2:14, 4:36, 4:32] = 1
    labels[4:12, 8:32, 8:28] = 2
    labels[6:10, 14:26, 12:24] = 3
    return labels


def _label_file(reference, labels: np.ndarray, tmp_path):
    """The labels written on the reference's grid, as the worker writes them (SimpleITK, the exported geometry)."""
    from MIADeepLearningLib.mrml import volumes

    grid = sitk.ReadImage(str(volumes.export_volume(reference, tmp_path / "input.nrrd")))
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(grid)
    path = tmp_path / "label.nrrd"
    sitk.WriteImage(image, str(path), True)
    return path


def _terminology(segment) -> str:
    import vtk

    tag = vtk.reference("")
    segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
    return str(tag)


def _table_rows(table_node) -> list[tuple[str, int, float]]:
    table = table_node.GetTable()
    return [(table.GetValue(row, 0).ToString(), table.GetValue(row, 1).ToInt(), table.GetValue(row, 2).ToDouble())
            for row in range(table.GetNumberOfRows())]


def test_tissue_segments_are_terminology_coded_coloured_surfaces(scene, tmp_path):
    import slicer
    import vtk

    from MIADeepLearningLib.mrml import segmentations

    reference = _reference()
    labels = _tissue_labels((16, 40, 36))
    node = segmentations.segmentation_from_label_file(_label_file(reference, labels, tmp_path), reference, SEGMENTS,
                                                      "T2 head tissue")
    segmentation = node.GetSegmentation()
    assert segmentations.segment_names(node) == ["CSF", "Gray matter", "White matter"]
    surface = vtk.vtkPolyData()
    for spec in SEGMENTS:
        segment = segmentation.GetSegment(spec["name"])
        assert np.allclose(segment.GetColor(), np.array(spec["color"]) / 255.0)
        assert _terminology(segment) == spec["terminology"]
        assert np.array_equal(segmentations.label_array(node, spec["name"], reference), labels == spec["value"])
        node.GetClosedSurfaceRepresentation(spec["name"], surface)
        assert surface.GetNumberOfPoints() > 0, f"no 3D surface for {spec['name']}"
    assert "SCT^389081007^Gray Matter" in _terminology(segmentation.GetSegment("Gray matter"))
    assert "SCT^65216001^Cerebrospinal fluid" in _terminology(segmentation.GetSegment("CSF"))
    assert segmentation.ContainsRepresentation(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    assert node.GetDisplayNode().GetVisibility3D()


def test_volume_table_counts_voxels_on_the_input_grid(scene, tmp_path):
    import slicer

    from MIADeepLearningLib.mrml import segment_volumes, segmentations

    reference = _reference()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), "study")
    sh.SetItemParent(sh.GetItemByDataNode(reference), folder)
    labels = _tissue_labels((16, 40, 36))
    node = segmentations.segmentation_from_label_file(_label_file(reference, labels, tmp_path), reference, SEGMENTS,
                                                      "T2 head tissue")
    table_node = segment_volumes.volume_table(node, reference, "T2 head tissue volumes")
    assert table_node.IsA("vtkMRMLTableNode") and table_node.GetName() == "T2 head tissue volumes"
    voxel_ml = float(np.prod(SPACING)) / 1000.0
    expected = [(spec["name"], int(np.count_nonzero(labels == spec["value"])),
                 np.count_nonzero(labels == spec["value"]) * voxel_ml) for spec in SEGMENTS]
    rows = _table_rows(table_node)
    assert [(name, count) for name, count, _ in rows] == [(name, count) for name, count, _ in expected]
    np.testing.assert_allclose([ml for _, _, ml in rows], [ml for _, _, ml in expected], rtol=1e-12)
    assert [table_node.GetColumnName(index) for index in range(3)] == ["Segment", "Voxels", "Volume (mL)"]
    assert table_node.GetColumnUnitLabel("Volume (mL)") == "mL" and table_node.GetLocked()
    assert sh.GetItemParent(sh.GetItemByDataNode(table_node)) == folder, "placed beside the input in Data"
    again = segment_volumes.volume_table(node, reference, "T2 head tissue volumes")
    assert again is not table_node and again.GetName() != table_node.GetName(), "a new node, never overwritten"


def test_tissue_run_adds_segmentation_uncertainty_and_volume_table(scene, tmp_path, monkeypatch):
    import slicer

    from MIADeepLearningLib.mrml import segmentations
    from MIADeepLearningLib.mrml.provenance import get_provenance
    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic
    from MIADeepLearningLib.mrml.volumes import same_grid

    root = tmp_path / "models"
    write_tissue_package(root)
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(root))
    reference = _reference()
    logic = SegmentationLogic(jobs_root=tmp_path / "jobs")
    result = logic.run(reference, TISSUE_MODEL_ID, device="cpu", create_uncertainty=True, create_volume_table=True)

    node = result.segmentation_node
    assert node.GetName() == "T2 head tissue"
    assert segmentations.segment_names(node) == ["CSF", "Gray matter", "White matter"]
    for spec in SEGMENTS:
        assert _terminology(node.GetSegmentation().GetSegment(spec["name"])) == spec["terminology"]
    uncertainty = result.uncertainty_node
    assert uncertainty.GetName() == "T2 head tissue uncertainty" and same_grid(uncertainty, reference)
    values = slicer.util.arrayFromVolume(uncertainty)
    assert values.min() >= 0.0 and values.max() <= 1.0
    assert uncertainty.GetDisplayNode().GetWindowLevelMin() == 0.0
    assert uncertainty.GetDisplayNode().GetWindowLevelMax() == 1.0
    rows = _table_rows(result.volume_table_node)
    assert result.volume_table_node.GetName() == "T2 head tissue volumes"
    assert [name for name, _, _ in rows] == ["CSF", "Gray matter", "White matter"]
    for name, count, _ in rows:
        assert count == int(segmentations.label_array(node, name, reference).sum())
    for output in (node, uncertainty, result.volume_table_node):
        provenance = get_provenance(output)
        assert provenance["model_id"] == TISSUE_MODEL_ID and provenance["parameters"]["uncertainty"] is True
        assert provenance["input_node"] == "T2 head" and provenance["pipeline"]["working_grid"]["orientation"] == "LIA"
    assert not list((tmp_path / "jobs").iterdir()), "the job folder is removed"

    plain = logic.run(reference, TISSUE_MODEL_ID, device="cpu")
    assert plain.uncertainty_node is None and plain.volume_table_node is None


def test_uncertainty_from_a_model_without_it_is_refused_before_anything_starts(scene, tmp_path):
    import slicer

    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic

    reference = _reference()

    def node_ids() -> list[str]:
        return [slicer.mrmlScene.GetNthNode(index).GetID() for index in range(slicer.mrmlScene.GetNumberOfNodes())]

    before = node_ids()
    with pytest.raises(errors.ModelError, match=r"^Model 'Brain extraction \(deepbet\)' makes no uncertainty map\.$"):
        SegmentationLogic(jobs_root=tmp_path / "jobs").start(reference, "deepbet", create_uncertainty=True)
    assert node_ids() == before
    assert not (tmp_path / "jobs").exists() or not list((tmp_path / "jobs").iterdir()), "no job was started"
