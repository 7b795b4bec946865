"""Segment volumes as a table node: one row per segment with its voxel count and volume in millilitres.

Why a table node: tissue volumes (CSF, gray and white matter) are the numbers a segmentation is usually run for; a
vtkMRMLTableNode is shown by Slicer's table views, saved with the scene and exported to CSV from the Tables module,
and carries the provenance attribute like the segmentation it was measured on. Voxels are counted on the input
volume's own grid, which is where the engine writes its labels, so the count is exact and the voxel volume is that
of the input (product of its spacings).
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk

from MIADeepLearningLib.mrml.segmentations import label_array
from MIADeepLearningLib.mrml.volumes import place_beside

SEGMENT_COLUMN = "Segment"
VOXELS_COLUMN = "Voxels"
VOLUME_COLUMN = "Volume (mL)"
MM3_PER_ML = 1000.0


def segment_volumes(segmentation_node: slicer.vtkMRMLSegmentationNode,
                    reference_volume: slicer.vtkMRMLVolumeNode) -> list[tuple[str, int, float]]:
    """(segment name, voxels, millilitres) per segment, in display order, counted on the reference volume's grid."""
    voxel_mm3 = float(np.prod(reference_volume.GetSpacing()))
    segmentation = segmentation_node.GetSegmentation()
    rows = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        voxels = int(np.count_nonzero(label_array(segmentation_node, segment_id, reference_volume)))
        rows.append((segmentation.GetSegment(segment_id).GetName(), voxels, voxels * voxel_mm3 / MM3_PER_ML))
    return rows


def volume_table(segmentation_node: slicer.vtkMRMLSegmentationNode, reference_volume: slicer.vtkMRMLVolumeNode,
                 name: str) -> slicer.vtkMRMLTableNode:
    """A new table node (name made unique) beside the reference volume in the Data module, one row per segment."""
    names, voxels, volumes = vtk.vtkStringArray(), vtk.vtkIntArray(), vtk.vtkDoubleArray()
    for array, column in ((names, SEGMENT_COLUMN), (voxels, VOXELS_COLUMN), (volumes, VOLUME_COLUMN)):
        array.SetName(column)
    for segment_name, count, millilitres in segment_volumes(segmentation_node, reference_volume):
        names.InsertNextValue(segment_name)
        voxels.InsertNextValue(count)
        volumes.InsertNextValue(millilitres)
    scene = reference_volume.GetScene() or slicer.mrmlScene
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    table = table_node.GetTable()
    for array in (names, voxels, volumes):
        table.AddColumn(array)
    spacing = " x ".join(f"{value:g}" for value in reference_volume.GetSpacing())
    table_node.SetColumnDescription(VOXELS_COLUMN, f"voxels of {reference_volume.GetName()} ({spacing} mm)")
    table_node.SetColumnUnitLabel(VOLUME_COLUMN, "mL")
    table_node.SetColumnDescription(VOLUME_COLUMN, "voxels x voxel volume of the input grid")
    table_node.SetLocked(True)  # measured values: not meant to be edited in the table view
    table_node.Modified()
    place_beside(table_node, reference_volume)
    return table_node
