"""Engine label files -> segmentation nodes with proper names, colours and terminology, shown in 2D and 3D.

The label file is read and checked against the input volume's grid before anything in the scene changes, and
every node a failed import added is removed again, so an error never leaves a half-built segmentation behind.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import slicer
import vtk

from MIADeepLearningLib.mrml.scene_guard import SceneGuard
from MIADeepLearningLib.mrml.volumes import (
    array_from_image,
    image_from_array,
    place_beside,
    put_on_grid,
    read_unattached_volume,
)


def segmentation_from_label_file(
    label_path: str | os.PathLike,
    reference_volume: slicer.vtkMRMLVolumeNode,
    segments: list[dict[str, Any]],
    name: str,
    segmentation_node: slicer.vtkMRMLSegmentationNode | None = None,
) -> slicer.vtkMRMLSegmentationNode:
    """One segment per ``segments`` item (``value``, ``name``, ``color`` 0-255, ``terminology``, optional ``id``)
    from a label file on the reference volume's grid; segment ID = ``id``, else the segment name; empty labels still
    get their (empty) segment.

    A given ``segmentation_node`` is reused (its old segments replaced) only once the file has been read and
    verified. Raises RuntimeError when the file is unreadable, off the reference grid or holds undescribed labels.
    """
    specs = _validated_specs(segments)
    scene = reference_volume.GetScene() or slicer.mrmlScene
    with SceneGuard(scene):
        labels = read_unattached_volume(label_path, labelmap=True)
        put_on_grid(labels, reference_volume, os.path.basename(os.fspath(label_path)))
        indexed = _index_labels(array_from_image(labels.GetImageData()), specs, os.fspath(label_path))
        # A labelmap node outside the scene: the import reads its voxels and grid only, nothing to clean up.
        import_node = slicer.vtkMRMLLabelMapVolumeNode()
        import_node.SetAndObserveImageData(image_from_array(indexed))
        matrix = vtk.vtkMatrix4x4()
        reference_volume.GetIJKToRASMatrix(matrix)
        import_node.SetIJKToRASMatrix(matrix)

        if segmentation_node is None:
            segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        else:
            segmentation_node.SetName(name)
        segmentation = segmentation_node.GetSegmentation()
        segmentation.RemoveAllSegments()
        _set_source_representation_to_labelmap(segmentation)
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)

        segment_ids = vtk.vtkStringArray()
        for spec in specs:
            segment_id = segmentation.AddEmptySegment(spec["id"], spec["name"], spec["color"])
            if segment_id != spec["id"]:
                raise RuntimeError(f"Slicer renamed segment {spec['id']!r} to {segment_id!r}.")
            segment = segmentation.GetSegment(segment_id)
            if spec["terminology"]:
                segment.SetTag(segment.GetTerminologyEntryTagName(), spec["terminology"])
            segment_ids.InsertNextValue(segment_id)
        # Label value n (1-based) goes to segment_ids[n - 1]; all segments end up in one shared labelmap layer.
        logic = slicer.modules.segmentations.logic()
        if not logic.ImportLabelmapToSegmentationNode(import_node, segmentation_node, segment_ids):
            raise RuntimeError(f"Slicer could not import the labels of {os.fspath(label_path)} as segments.")

        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.CreateClosedSurfaceRepresentation()
        segmentation_node.GetDisplayNode().SetVisibility3D(True)
        place_beside(segmentation_node, reference_volume)
    return segmentation_node


def _validated_specs(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalise segment descriptions (colour to 0-1 floats, ID defaulting to the name) and refuse duplicate labels or
    IDs, which would merge segments. Two segments may share a name only with IDs of their own (a propagated
    segmentation keeps the original's IDs and names)."""
    if not segments:
        raise ValueError("At least one segment description is needed to import a label file.")
    specs, values, ids = [], set(), set()
    for item in segments:
        value, seg_name = int(item["value"]), str(item["name"])
        segment_id = str(item.get("id") or seg_name)
        if value <= 0 or value in values or not seg_name or segment_id in ids:
            raise ValueError(f"Segment {seg_name!r} (label {value}) is not a unique positive label with a unique ID.")
        values.add(value)
        ids.add(segment_id)
        color = [float(c) / 255.0 for c in item.get("color", (128, 128, 128))]
        if len(color) != 3:
            raise ValueError(f"Segment {seg_name!r} needs an RGB colour, got {item.get('color')!r}.")
        specs.append({"value": value, "name": seg_name, "id": segment_id, "color": color,
                      "terminology": item.get("terminology", "")})
    return specs


def _index_labels(voxels: np.ndarray, specs: list[dict[str, Any]], path: str) -> np.ndarray:
    """Map each described label value to its 1-based position in ``specs``; any other non-zero value is an error,
    since it would be a structure the user is never shown."""
    unknown = set(np.unique(voxels).tolist()) - {0} - {spec["value"] for spec in specs}
    if unknown:
        raise RuntimeError(
            f"The label file {os.path.basename(path)} holds values {sorted(unknown)} that no segment describes."
        )
    indexed = np.zeros(voxels.shape, np.uint8 if len(specs) < 256 else np.uint16)
    for position, spec in enumerate(specs, start=1):
        indexed[voxels == spec["value"]] = position
    return indexed


def _set_source_representation_to_labelmap(segmentation: slicer.vtkSegmentation) -> None:
    """A reused node may have been edited as closed surfaces; the import needs binary labelmap as source."""
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segmentation.SetSourceRepresentationName(labelmap_name)  # every supported Slicer (5.8 and later) has it


def label_array(
    segmentation_node: slicer.vtkMRMLSegmentationNode, segment_id: str, reference_volume: slicer.vtkMRMLVolumeNode
) -> np.ndarray:
    """The segment as a 0/1 uint8 (k, j, i) array on the reference volume's grid (tests and scenarios)."""
    voxels = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, reference_volume)
    return (voxels > 0).astype(np.uint8)


def segment_names(segmentation_node: slicer.vtkMRMLSegmentationNode) -> list[str]:
    """Segment names in display order."""
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def segments_label_array(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    reference_volume: slicer.vtkMRMLVolumeNode,
    segment_values: list[tuple[str, int]],
) -> np.ndarray:
    """The given segments (segment ID, label value) as one (k, j, i) label array on the reference volume's grid;
    where segments overlap, the later one in the list wins (as in Slicer's own labelmap export).

    Why a copy of the segmentation: the merge may have to convert closed surfaces to binary labelmaps, which must
    not change the user's node; the copy is in no scene, so the export adds, removes and modifies nothing there.
    """
    geometry = slicer.vtkOrientedImageData()
    matrix = vtk.vtkMatrix4x4()
    reference_volume.GetIJKToRASMatrix(matrix)
    geometry.SetImageToWorldMatrix(matrix)
    geometry.SetExtent(reference_volume.GetImageData().GetExtent())
    copy = slicer.vtkMRMLSegmentationNode()
    copy.GetSegmentation().DeepCopy(segmentation_node.GetSegmentation())
    converter = slicer.vtkSegmentationConverter
    if not copy.GetSegmentation().ContainsRepresentation(converter.GetBinaryLabelmapRepresentationName()):
        # surfaces are rasterised straight onto the reference grid (not onto a default, much finer one)
        copy.GetSegmentation().SetConversionParameter(converter.GetReferenceImageGeometryParameterName(),
                                                      converter.SerializeImageGeometry(geometry))
        if not copy.GetSegmentation().CreateRepresentation(converter.GetBinaryLabelmapRepresentationName()):
            raise RuntimeError(f"Slicer could not turn the segments of '{segmentation_node.GetName()}' into a "
                               "label map.")
    ids, values = vtk.vtkStringArray(), vtk.vtkIntArray()
    for segment_id, value in segment_values:
        ids.InsertNextValue(segment_id)
        values.InsertNextValue(int(value))
    merged = slicer.vtkOrientedImageData()
    if not copy.GenerateMergedLabelmapForAllSegments(merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
                                                     geometry, ids, values):
        raise RuntimeError(f"Slicer could not turn the segments of '{segmentation_node.GetName()}' into a label map.")
    if merged.GetDimensions() != reference_volume.GetImageData().GetDimensions():
        raise RuntimeError(f"The label map of '{segmentation_node.GetName()}' is not on the grid of "
                           f"'{reference_volume.GetName()}'.")
    voxels = array_from_image(merged)
    dtype = np.uint8 if max((value for _, value in segment_values), default=0) < 256 else np.uint16
    return voxels.astype(dtype)
