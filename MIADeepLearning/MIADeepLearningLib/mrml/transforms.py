"""Displacement fields from the engine -> Slicer grid transform nodes, and resampling through them.

The engine's field (``engine/displacement.py``) is an ITK resampling transform: on the FIXED grid, in LPS mm, each
vector u(p) takes a fixed point p to the moving point p + u(p). In Slicer the same mapping is the grid transform's
*FromParent* (world = fixed space -> the moving volume's local space), in RAS: the grid origin and direction and
every vector are multiplied by diag(-1, -1, 1). Put the moving volume under the node and Slicer shows it on the fixed
image ("apply transform"); hardening or resampling moves its voxels there. The vectors are interpolated linearly,
as ITK does, so Slicer and SimpleITK evaluate the same mapping.

This layer imports no SimpleITK: a field arrives as (z, y, x, 3) numbers plus its grid in LPS, or as the ``.h5`` file
the worker wrote, read by Slicer's own transform storage node.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from MIADeepLearningLib.engine.errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _vtk_matrix(matrix3: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(matrix3[r, c]))
    return matrix


def _check_field(field_lps: np.ndarray, spacing: Sequence[float], direction_lps: np.ndarray) -> np.ndarray:
    values = np.asarray(field_lps)
    if values.ndim != 4 or values.shape[3] != 3:
        raise InputError(f"The displacement field has shape {values.shape}; it must be (z, y, x, 3).")
    if min(values.shape[:3]) < 2:
        raise InputError(f"The displacement field's grid {values.shape[:3]} is not 3D (a dimension of 1).")
    finite = np.isfinite(values)
    if not finite.all():
        raise InputError(f"The displacement field has {int(finite.size - np.count_nonzero(finite))} values that "
                         "are NaN or infinite; a displacement must be finite.")
    invertible = direction_lps.shape == (3, 3) and abs(np.linalg.det(direction_lps)) > 1e-6
    if len(spacing) != 3 or min(spacing) <= 0 or not invertible:
        raise InputError("The displacement field's grid needs 3 positive spacings and an invertible 3x3 direction.")
    return values


def grid_transform_node_from_field(
    field_lps: np.ndarray,
    origin_lps: Sequence[float],
    spacing: Sequence[float],
    direction_lps: Sequence[float] | np.ndarray,
    name: str = "Displacement",
    scene: slicer.vtkMRMLScene | None = None,
) -> slicer.vtkMRMLGridTransformNode:
    """A grid transform node holding an engine field (the arguments are what SimpleITK reports for the field's
    grid: GetOrigin, GetSpacing, GetDirection, and GetArrayFromImage of the vector image), set as FromParent so the
    moving volume placed under it appears on the fixed grid."""
    direction = np.asarray(direction_lps, dtype=float).reshape(3, 3)
    values = _check_field(field_lps, spacing, direction)
    grid = vtk.vtkImageData()
    grid.SetOrigin(*(LPS_TO_RAS @ np.asarray(origin_lps, dtype=float)))
    grid.SetSpacing(*(float(s) for s in spacing))
    grid.SetDimensions(values.shape[2], values.shape[1], values.shape[0])
    vectors_ras = np.ascontiguousarray((values.astype(np.float64) @ LPS_TO_RAS.T).reshape(-1, 3))
    array = numpy_support.numpy_to_vtk(vectors_ras, deep=True, array_type=vtk.VTK_DOUBLE)
    array.SetName("DisplacementField")
    grid.GetPointData().SetScalars(array)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(_vtk_matrix(LPS_TO_RAS @ direction))
    transform.SetInterpolationModeToLinear()  # ITK's DisplacementFieldTransform interpolates linearly
    scene = scene or slicer.mrmlScene
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    node.SetAndObserveTransformFromParent(transform)
    return node


def field_from_grid_transform_node(node: slicer.vtkMRMLTransformNode
                                   ) -> tuple[np.ndarray, tuple, tuple, tuple]:
    """(field_lps (z, y, x, 3), origin_lps, spacing, direction_lps as 9 numbers): the inverse of
    `grid_transform_node_from_field`, for a node whose FromParent is a grid transform."""
    transform = node.GetTransformFromParent() if node is not None else None
    if not isinstance(transform, slicer.vtkOrientedGridTransform):
        raise InputError("The transform is not a displacement-field (grid) transform in the fixed-to-moving "
                         "direction; it cannot be read as an engine field.")
    grid = transform.GetDisplacementGrid()
    nx, ny, nz = grid.GetDimensions()
    vectors = numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars()).reshape(nz, ny, nx, 3)
    vectors = vectors * transform.GetDisplacementScale() + transform.GetDisplacementShift()
    matrix = transform.GetGridDirectionMatrix()
    direction_ras = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    return (vectors.astype(np.float64) @ LPS_TO_RAS.T, tuple(LPS_TO_RAS @ np.array(grid.GetOrigin())),
            tuple(grid.GetSpacing()), tuple((LPS_TO_RAS @ direction_ras).ravel()))


def load_grid_transform(path: str | os.PathLike, name: str,
                        scene: slicer.vtkMRMLScene | None = None) -> slicer.vtkMRMLTransformNode:
    """Read an engine field file (.h5 from ``displacement.write_field``) with Slicer's transform storage node
    (which does the LPS -> RAS conversion), interpolating linearly as ITK does; no link to the file is kept."""
    path = Path(path)
    if not path.is_file():
        raise RuntimeError(f"The transform file {path} does not exist.")
    scene = scene or slicer.mrmlScene
    node = slicer.vtkMRMLGridTransformNode()
    storage = slicer.vtkMRMLTransformStorageNode()  # standalone, like the volume import
    storage.SetFileName(path.as_posix())
    if not storage.ReadData(node):
        raise RuntimeError(f"Slicer could not read the transform file {path.name}.")
    transform = node.GetTransformFromParent()
    if not isinstance(transform, slicer.vtkOrientedGridTransform):
        raise RuntimeError(f"{path.name} does not hold a displacement field.")
    transform.SetInterpolationModeToLinear()
    node.SetName(name)
    scene.AddNode(node)
    return node


def resample_through_transform(
    moving: slicer.vtkMRMLScalarVolumeNode,
    transform_node: slicer.vtkMRMLTransformNode,
    fixed: slicer.vtkMRMLVolumeNode,
    name: str | None = None,
) -> slicer.vtkMRMLScalarVolumeNode:
    """The moving volume (or label map) resampled through the transform onto the fixed volume's grid by Slicer
    (``vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume``: linear for scalar volumes, nearest neighbour for
    label maps, 0 outside the moving volume). The moving node is placed under the transform only for the call;
    its own transform is restored. The result is a new node in the scene, on exactly the fixed grid."""
    for node, role in ((moving, "moving"), (fixed, "fixed")):
        if node is None or node.GetImageData() is None:
            raise InputError(f"The {role} volume has no image data.")
    if fixed.GetParentTransformNode() is not None:
        raise InputError(f"The fixed volume '{fixed.GetName()}' is under a transform; harden it first.")
    previous = moving.GetTransformNodeID()
    moving.SetAndObserveTransformNodeID(transform_node.GetID())
    try:
        result = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving, fixed)
    finally:
        moving.SetAndObserveTransformNodeID(previous)
    if result is None:
        raise RuntimeError(f"Slicer could not resample '{moving.GetName()}' onto '{fixed.GetName()}'.")
    result.SetName(name or f"{moving.GetName()} registered")
    return result
