"""Volume nodes <-> files for the engine, with the geometry exact and the user's nodes untouched.

Export and import go through Slicer's own ``vtkMRMLVolumeArchetypeStorageNode`` (ITK IO), which converts
RAS <-> LPS itself. The storage nodes used here are standalone: never attached to a node or added to the scene,
so exporting does not change what the user's node would save to, and imported results carry no link to a
temporary job folder.

One Slicer quirk is handled here: Slicer's reader turns a left-handed grid (negative determinant of IJKToRAS, e.g.
one flipped axis) into a right-handed one by reversing the slice order. The voxels stay at the same physical
places, but the array and matrix differ from the input's, so results are re-indexed back onto the input grid
(a lossless axis permutation/flip, never a resampling).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from MIADeepLearningLib.engine.errors import InputError

GRID_TOLERANCE = 1e-6
"""Largest difference (mm, per IJKToRAS matrix entry) between two grids that are considered the same."""
NRRD_HEADER_BYTES = 4096
"""Room for the text header of an exported NRRD (a few hundred bytes in practice)."""


def _describe(node: vtk.vtkObject) -> str:
    return f"'{node.GetName()}'" if node.GetName() else f"The {node.GetClassName()} node"


def check_input_volume(node: slicer.vtkMRMLNode | None) -> None:
    """Refuse, in one sentence the user can act on, any node a volumetric model cannot use as its input."""
    if node is None:
        raise InputError("No input volume is selected; select a 3D scalar volume.")
    label = _describe(node)
    if not isinstance(node, slicer.vtkMRMLScalarVolumeNode):
        raise InputError(
            f"{label} is a {node.GetClassName()}, not a scalar volume; the model needs a 3D scalar volume."
        )
    if node.IsA("vtkMRMLLabelMapVolumeNode"):  # a scalar volume subclass: its values are labels, not intensities
        raise InputError(
            f"{label} is a label map (a segmentation stored as a volume), not an image; to run the model on its "
            "values anyway, convert it in the Volumes module (Volume Information > Convert to scalar volume) and "
            "select the converted volume."
        )
    image = node.GetImageData()
    components = image.GetNumberOfScalarComponents() if image is not None else 1
    if node.IsA("vtkMRMLMultiVolumeNode"):  # MultiVolumeExplorer's 4D volume: one frame per component
        raise InputError(
            f"{label} is a 4D multi-volume ({components} frames); the model needs one 3D scalar volume, so extract "
            "the frame you want first (for example with the Sequences module) and select that."
        )
    if isinstance(node, getattr(slicer, "vtkMRMLTensorVolumeNode", ())) or components > 1:
        components = max(components, 2)
        hint = " (Vector to Scalar Volume module)" if node.IsA("vtkMRMLVectorVolumeNode") else ""
        raise InputError(f"{label} has {components} components per voxel; the model needs a single scalar volume"
                         f"{', so convert it first' + hint if hint else ''}.")
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"{label} has no image data; load or create its voxels first.")
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise InputError(f"{label} is 2D ({dims[0]}×{dims[1]}×{dims[2]} voxels); the model needs a 3D volume.")
    if _is_sequence_proxy(node):
        raise InputError(
            f"{label} is one frame of a 4D sequence; clone the frame into its own volume (Data module) and use that."
        )
    if node.GetParentTransformNode() is not None:
        raise InputError(_transform_message(node))


def _transform_message(node: slicer.vtkMRMLNode) -> str:
    """The refusal of a volume under a transform. A non-linear one (grid, B-spline, or a linear transform under
    one) is named as such: hardening it resamples the voxels onto a new grid, which the user should know."""
    transform = node.GetParentTransformNode()
    if transform.IsTransformToWorldLinear():
        return (
            f"{_describe(node)} is under the transform '{transform.GetName()}'; harden the transform (Data module, "
            "right-click > Harden transform) so results can land on the volume's own grid."
        )
    return (
        f"{_describe(node)} is under the non-linear transform '{transform.GetName()}' (a warp, such as a grid or "
        "B-spline transform); harden the transform (Data module, right-click > Harden transform, which resamples "
        "the volume onto a new grid) so results can land on the volume's own grid."
    )


def _is_sequence_proxy(node: slicer.vtkMRMLNode) -> bool:
    """A proxy node shows whichever frame a sequence browser selects; a result computed from it would silently
    stop matching the displayed volume when the user browses to another frame."""
    scene = node.GetScene()
    browser_class = getattr(slicer, "vtkMRMLSequenceBrowserNode", None)
    if scene is None or browser_class is None:
        return False
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
        if browser.IsProxyNodeID(node.GetID()):
            return True
    return False


def ijk_to_ras(node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """The node's own 4x4 IJK->RAS matrix (parent transforms not applied)."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def export_volume(node: slicer.vtkMRMLVolumeNode, path: str | os.PathLike, compress: bool = False) -> Path:
    """Write the node's voxels and exact grid (oblique, anisotropic, flipped axes) to a NRRD file for the engine.

    The node's own grid is written; a node under a transform is refused, because a result computed in the
    transformed space could not be put back on the node's grid without resampling.
    """
    if node is None or node.GetImageData() is None:
        raise InputError("There is no volume with image data to export.")
    if node.GetParentTransformNode() is not None:
        raise InputError(_transform_message(node))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not compress:
        check_disk_space(node, path.parent)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()  # standalone: the node keeps its own storage node
    storage.SetFileName(path.as_posix())
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(node):
        raise RuntimeError(f"Could not write {_describe(node)} to {path}.")
    return path


def nrrd_bytes(node: slicer.vtkMRMLVolumeNode) -> int:
    """Size of the node's uncompressed NRRD: every voxel's components and the header."""
    image = node.GetImageData()
    return (image.GetNumberOfPoints() * image.GetNumberOfScalarComponents() * image.GetScalarSize()
            + NRRD_HEADER_BYTES)


def free_disk_bytes(folder: str | os.PathLike) -> int | None:
    """Free bytes on the drive that holds `folder` (None when the system does not say)."""
    try:
        return int(shutil.disk_usage(os.fspath(folder)).free)
    except OSError:
        return None


def check_disk_space(node: slicer.vtkMRMLVolumeNode, folder: str | os.PathLike) -> None:
    """InputError, one sentence, when the node's NRRD does not fit on the drive of `folder` (the job folder). Why
    before writing: a whole-body CT is 0.6 GB, and a write that fills the drive half way fails with an I/O error
    that names neither the volume nor the folder, and leaves the drive full for the user's other programs."""
    needed = nrrd_bytes(node)
    free = free_disk_bytes(folder)
    if free is not None and needed > free:
        raise InputError(
            f"Handing {_describe(node)} to the model needs {needed / 1024**3:.2f} GB of disk space in the job folder "
            f"{os.fspath(folder)}, but only {free / 1024**3:.2f} GB is free on that drive; free some space there, or "
            "start Slicer with the TMPDIR (Windows: TEMP) environment variable pointing to a folder on a larger drive."
        )


def read_volume_file(
    path: str | os.PathLike,
    name: str,
    reference: slicer.vtkMRMLVolumeNode | None = None,
    labelmap: bool = False,
) -> slicer.vtkMRMLVolumeNode:
    """Load an engine output into a new volume node; with ``reference``, the result must lie on its grid.

    Nothing is added to the scene unless the file was read and, when a reference is given, found on its grid.
    """
    node = read_unattached_volume(path, labelmap)
    if reference is not None:
        put_on_grid(node, reference, Path(path).name)
    node.SetName(name)
    scene = reference.GetScene() if reference is not None and reference.GetScene() else slicer.mrmlScene
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    if reference is not None:
        place_beside(node, reference)
    return node


def read_unattached_volume(path: str | os.PathLike, labelmap: bool) -> slicer.vtkMRMLVolumeNode:
    """Read a volume file into a node that is in no scene and keeps no storage node (no link to the job folder)."""
    path = Path(path)
    if not path.is_file():
        raise RuntimeError(f"The result file {path} does not exist.")
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path.as_posix())
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise RuntimeError(f"Slicer could not read the result file {path.name}.")
    return node


def same_grid(node: slicer.vtkMRMLVolumeNode, reference: slicer.vtkMRMLVolumeNode) -> bool:
    """Same voxel count per axis and IJKToRAS equal within GRID_TOLERANCE."""
    image, ref_image = node.GetImageData(), reference.GetImageData()
    if image is None or ref_image is None or image.GetDimensions() != ref_image.GetDimensions():
        return False
    return bool(np.abs(ijk_to_ras(node) - ijk_to_ras(reference)).max() <= GRID_TOLERANCE)


def _lattice_map(matrix: np.ndarray, dims: tuple, ref_matrix: np.ndarray, ref_dims: tuple) -> np.ndarray | None:
    """The signed axis permutation (4x4, index space) taking this grid's IJK to the reference's IJK when both grids
    have the same voxel centres, else None."""
    t = np.linalg.solve(ref_matrix, matrix)
    perm = np.round(t)
    rot = perm[:3, :3]
    ones = np.ones(3)
    if not np.array_equal(np.abs(rot).sum(axis=0), ones) or not np.array_equal(np.abs(rot).sum(axis=1), ones):
        return None
    for a in range(3):  # reference axis a comes from this grid's axis b, possibly reversed
        b = int(np.argmax(np.abs(rot[a])))
        if dims[b] != ref_dims[a] or perm[a, 3] != (0 if rot[a, b] > 0 else dims[b] - 1):
            return None
    if np.abs(ref_matrix @ perm - matrix).max() > GRID_TOLERANCE:
        return None
    return perm


def put_on_grid(node: slicer.vtkMRMLVolumeNode, reference: slicer.vtkMRMLVolumeNode, what: str) -> None:
    """Make ``node`` use exactly the reference's grid, re-indexing its voxels if Slicer's reader flipped or permuted
    axes; raise when the voxel centres are not the reference's."""
    if same_grid(node, reference):
        return
    dims, ref_dims = node.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions()
    perm = _lattice_map(ijk_to_ras(node), dims, ijk_to_ras(reference), ref_dims)
    if perm is None:
        raise RuntimeError(
            f"The result {what} is not on the grid of the input volume '{reference.GetName()}' "
            f"({dims[0]}×{dims[1]}×{dims[2]} voxels vs {ref_dims[0]}×{ref_dims[1]}×{ref_dims[2]}, or a different "
            "origin, spacing or direction), so it cannot be shown as a result for that volume."
        )
    voxels = array_from_image(node.GetImageData()).transpose(2, 1, 0)  # (i, j, k)
    axes = [int(np.argmax(np.abs(perm[a, :3]))) for a in range(3)]
    voxels = voxels.transpose(axes)
    for a in range(3):
        if perm[a, axes[a]] < 0:
            voxels = np.flip(voxels, axis=a)
    node.SetAndObserveImageData(image_from_array(np.ascontiguousarray(voxels.transpose(2, 1, 0))))
    matrix = vtk.vtkMatrix4x4()
    reference.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)


def array_from_image(image: vtk.vtkImageData) -> np.ndarray:
    """(k, j, i) view of a single-component vtkImageData's voxels."""
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])


def image_from_array(voxels: np.ndarray) -> vtk.vtkImageData:
    """A vtkImageData (origin 0, spacing 1, as Slicer volume nodes keep theirs) holding a copy of (k, j, i) voxels."""
    image = vtk.vtkImageData()
    image.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(voxels).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


def place_beside(node: slicer.vtkMRMLNode, reference: slicer.vtkMRMLNode) -> None:
    """Put the node's subject-hierarchy item under the reference's parent (same patient/study folder in Data)."""
    scene = reference.GetScene()
    if scene is None:
        return
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    ref_item = sh.GetItemByDataNode(reference)
    parent = sh.GetItemParent(ref_item) if ref_item else sh.GetSceneItemID()
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)


def export_label_array(voxels: np.ndarray, reference: slicer.vtkMRMLVolumeNode, path: str | os.PathLike) -> Path:
    """Write (k, j, i) labels on the reference volume's grid to a NRRD label file for the engine, through a label map
    node that is never added to the scene (e.g. a segmentation exported for a registration job)."""
    if voxels.shape != tuple(reversed(reference.GetImageData().GetDimensions())):
        raise RuntimeError(f"The label map ({voxels.shape}) is not on the grid of '{reference.GetName()}'.")
    node = slicer.vtkMRMLLabelMapVolumeNode()
    node.SetAndObserveImageData(image_from_array(voxels))
    matrix = vtk.vtkMatrix4x4()
    reference.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    node.SetName(reference.GetName())
    return export_volume(node, path)


# Colour tables for 0-1 overlays (saliency, anomaly), the first one the scene has: a perceptual map where Slicer ships
# it, else older tables
OVERLAY_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
                          "vtkMRMLColorTableNodeRainbow")


def style_overlay(node: slicer.vtkMRMLScalarVolumeNode, threshold: float,
                  color_node_ids: tuple[str, ...] = OVERLAY_COLOR_NODE_IDS) -> None:
    """A 0-1 map in a colour table, window 0-1, transparent below `threshold`: meant as the foreground over its scan,
    so the scan shows through where the map says nothing."""
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    scene = node.GetScene()
    color_id = next((color_id for color_id in color_node_ids
                     if scene is not None and scene.GetNodeByID(color_id) is not None), None)
    if color_id is not None:
        display.SetAndObserveColorNodeID(color_id)
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetAutoThreshold(False)
    display.SetThreshold(threshold, 1.0)
    display.SetApplyThreshold(True)
