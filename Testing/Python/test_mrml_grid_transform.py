"""Engine displacement fields as Slicer grid transform nodes: the same mapping as SimpleITK, the same resampled voxels,
the same .h5 file, and content moving where a Slicer user expects after "apply transform" + harden.

Tolerances (measured with slicer-core 5.13 / SimpleITK 2.5.7 on these cases, limits set about 10x above):
- mapped points: <= 5e-6 mm apart (vtkGridTransform's own arithmetic), limit 1e-4 mm;
- resampled intensities (range +-140): <= 3.3e-4 apart, mean 7e-5 (vtkImageReslice interpolates in float32, ITK in
  float64), limit 3e-3;
- propagated labels (nearest neighbour): identical, voxel for voxel, also where warped points leave the moving image
  (both libraries keep points up to half a voxel beyond the last voxel centre, and give 0 beyond that). Only a point
  exactly half way between two moving voxels could round differently; none occurs here.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import LPS_TO_RAS, REGISTRATION_GRIDS, grid_image, ijk_to_ras, physical_points, registration_case

from MIADeepLearningLib.engine import displacement
from MIADeepLearningLib.engine.errors import InputError

CASES = sorted(REGISTRATION_GRIDS)
POINT_TOLERANCE_MM = 1e-4
INTENSITY_TOLERANCE = 3e-3


def _volume(image: sitk.Image, name: str, labelmap: bool = False):
    import slicer

    node_class = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    return slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), ijkToRAS=ijk_to_ras(image), name=name,
                                          nodeClassName=node_class)


def _node(field: np.ndarray, fixed: sitk.Image, name: str = "field"):
    from MIADeepLearningLib.mrml import transforms

    return transforms.grid_transform_node_from_field(field, fixed.GetOrigin(), fixed.GetSpacing(),
                                                     fixed.GetDirection(), name)


def _mapping_difference(sitk_transform: sitk.Transform, node, points_lps: np.ndarray) -> float:
    """Largest distance (mm, per coordinate) between SimpleITK's fixed->moving mapping and the node's FromParent."""
    from_parent = node.GetTransformFromParent()
    worst = 0.0
    for point in points_lps:
        expected_ras = LPS_TO_RAS @ np.array(sitk_transform.TransformPoint(tuple(float(v) for v in point)))
        actual_ras = np.array(from_parent.TransformPoint(tuple(float(v) for v in LPS_TO_RAS @ point)))
        worst = max(worst, float(np.abs(actual_ras - expected_ras).max()))
    return worst


def _sample_points(fixed: sitk.Image) -> np.ndarray:
    """Voxel centres and points between them (where the vectors are interpolated) inside the field's grid."""
    rng = np.random.default_rng(1)
    index = rng.uniform(0, np.array(fixed.GetSize()) - 1, size=(60, 3))
    direction = np.asarray(fixed.GetDirection()).reshape(3, 3)
    between = np.asarray(fixed.GetOrigin()) + (index * np.asarray(fixed.GetSpacing())) @ direction.T
    return np.concatenate([physical_points(fixed).reshape(-1, 3)[::97], between])


@pytest.mark.parametrize("kind", CASES)
def test_node_maps_points_like_simpleitk(scene, kind):
    fixed, _, _, field = registration_case(kind)
    node = _node(field, fixed)
    assert node.IsA("vtkMRMLGridTransformNode")
    assert _mapping_difference(displacement.field_transform(field, fixed), node, _sample_points(fixed)) \
        < POINT_TOLERANCE_MM


@pytest.mark.parametrize("kind", CASES)
def test_slicer_resampling_reproduces_simpleitk(scene, kind):
    import slicer

    from MIADeepLearningLib.mrml import transforms

    fixed, moving, labels, field = registration_case(kind)
    node = _node(field, fixed)
    moving_node, labels_node = _volume(moving, "moving"), _volume(labels, "moving labels", labelmap=True)
    fixed_node = _volume(sitk.Cast(fixed, sitk.sitkFloat32), "fixed")
    result = transforms.resample_through_transform(moving_node, node, fixed_node, "moving registered")
    assert moving_node.GetParentTransformNode() is None  # the user's node is left as it was
    assert np.abs(volume_ijk_to_ras(result) - ijk_to_ras(fixed)).max() < 1e-9
    expected = sitk.GetArrayFromImage(displacement.warp_image(moving, fixed, field))
    difference = np.abs(slicer.util.arrayFromVolume(result) - expected)
    assert difference.max() < INTENSITY_TOLERANCE, f"max {difference.max():.2e}, mean {difference.mean():.2e}"

    propagated = transforms.resample_through_transform(labels_node, node, fixed_node)
    assert propagated.IsA("vtkMRMLLabelMapVolumeNode")
    expected_labels = sitk.GetArrayFromImage(displacement.warp_labels(labels, fixed, field))
    assert set(np.unique(expected_labels)) == {0, 1, 2, 3}
    assert np.array_equal(slicer.util.arrayFromVolume(propagated), expected_labels)


def volume_ijk_to_ras(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_moving_border_treated_alike(scene):
    """A moving image that covers only part of the warped fixed grid: Slicer (vtkImageReslice, half-voxel border)
    and ITK (half-voxel buffer edge, nearest value there) agree at the moving image's border too: 0 beyond it, the
    same labels and intensities (within the float32 tolerance) up to it."""
    import slicer

    from MIADeepLearningLib.mrml import transforms

    fixed, moving, labels, field = registration_case("oblique_anisotropic")
    crop = (slice(6, 30), slice(4, 40), slice(8, 28))
    cropped, cropped_labels = moving[crop], labels[crop]  # fixed-grid content now reaches beyond the moving image
    # where each fixed voxel samples the moving image, in the moving image's continuous index
    direction = np.asarray(cropped.GetDirection()).reshape(3, 3)
    index = (physical_points(fixed) + field - np.asarray(cropped.GetOrigin())) @ np.linalg.inv(
        direction @ np.diag(cropped.GetSpacing())).T
    outside_by = np.maximum(-index, index - (np.asarray(cropped.GetSize()) - 1)).max(axis=-1)
    assert np.count_nonzero(outside_by > 0.5) > 1000  # the crop does cut the warped grid
    assert np.count_nonzero((outside_by > 0) & (outside_by <= 0.5)) > 50  # and points fall in the half-voxel band

    node = _node(field, fixed)
    fixed_node = _volume(sitk.Cast(fixed, sitk.sitkFloat32), "fixed")
    propagated = slicer.util.arrayFromVolume(transforms.resample_through_transform(
        _volume(cropped_labels, "cropped labels", labelmap=True), node, fixed_node))
    expected_labels = sitk.GetArrayFromImage(displacement.warp_labels(cropped_labels, fixed, field))
    assert np.array_equal(propagated, expected_labels)
    assert not expected_labels[outside_by > 0.5].any()
    resampled = slicer.util.arrayFromVolume(
        transforms.resample_through_transform(_volume(cropped, "cropped"), node, fixed_node))
    expected = sitk.GetArrayFromImage(displacement.warp_image(cropped, fixed, field))
    assert np.abs(resampled - expected).max() < INTENSITY_TOLERANCE
    assert not expected[outside_by > 0.5].any()


@pytest.mark.parametrize("kind", CASES)
def test_node_saved_by_slicer_reads_back_in_simpleitk(scene, tmp_path, kind):
    from MIADeepLearningLib.mrml import headless, transforms

    fixed, _, _, field = registration_case(kind)
    node = _node(field, fixed)
    path = headless.save_node(node, tmp_path / "field.h5")
    back = displacement.read_field(path)
    image = displacement.field_of(back)
    assert image.GetSize() == fixed.GetSize()
    assert np.allclose(image.GetOrigin(), fixed.GetOrigin(), atol=1e-9)
    assert np.allclose(image.GetSpacing(), fixed.GetSpacing(), atol=1e-12)
    assert np.allclose(image.GetDirection(), fixed.GetDirection(), atol=1e-12)
    assert np.abs(sitk.GetArrayFromImage(image) - field).max() < 1e-12
    # and the numbers come back from the node itself
    values, origin, spacing, direction = transforms.field_from_grid_transform_node(node)
    assert np.abs(values - field).max() < 1e-12
    assert np.allclose(origin, fixed.GetOrigin()) and np.allclose(spacing, fixed.GetSpacing())
    assert np.allclose(direction, fixed.GetDirection())


@pytest.mark.parametrize("kind", CASES)
def test_engine_file_loads_as_the_same_transform(scene, tmp_path, kind):
    """The worker's path: engine writes .h5, Slicer's storage node reads it; same mapping as SimpleITK's."""
    from MIADeepLearningLib.mrml import transforms

    fixed, _, _, field = registration_case(kind)
    transform = displacement.field_transform(field, fixed)
    path = displacement.write_field(transform, tmp_path / "engine.h5")
    node = transforms.load_grid_transform(path, "from engine")
    assert node.GetScene() is not None and node.GetStorageNode() is None
    assert _mapping_difference(transform, node, _sample_points(fixed)) < POINT_TOLERANCE_MM


def test_apply_and_harden_moves_content_as_the_engine_warp(scene):
    """A constant u = (+5, 0, 0) LPS field: the engine shows the content 5 mm towards patient Right, and so does
    Slicer after putting the moving volume under the node and hardening (RAS +5 mm in x)."""
    import slicer

    from MIADeepLearningLib.mrml import transforms

    grid = grid_image(np.eye(3), (1.0, 1.0, 1.0), (30, 30, 30))
    p = physical_points(grid) - np.array([3.0, -4.0, 5.0])
    blob = sitk.GetImageFromArray((100.0 * (np.linalg.norm(p, axis=-1) < 6)).astype(np.float32))
    blob.CopyInformation(grid)
    field = np.zeros((30, 30, 30, 3))
    field[..., 0] = 5.0

    def centre_ras(voxels, matrix):
        k, j, i = np.nonzero(voxels > 50)
        return (matrix @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[:3]

    before = centre_ras(sitk.GetArrayFromImage(blob), ijk_to_ras(grid))
    engine = centre_ras(sitk.GetArrayFromImage(displacement.warp_image(blob, grid, field)), ijk_to_ras(grid))
    assert np.allclose(engine - before, [5.0, 0.0, 0.0], atol=1e-6)

    node = _node(field, grid)
    assert np.allclose(node.GetTransformToParent().TransformPoint((0.0, 0.0, 0.0)), (5.0, 0.0, 0.0), atol=1e-6)
    moving = _volume(blob, "moving")
    resampled = transforms.resample_through_transform(moving, node, _volume(blob, "fixed"))
    assert np.allclose(centre_ras(slicer.util.arrayFromVolume(resampled), ijk_to_ras(grid)) - before,
                       [5.0, 0.0, 0.0], atol=1e-6)
    moving.SetAndObserveTransformNodeID(node.GetID())  # "apply transform" in the Data module ...
    assert slicer.vtkSlicerTransformLogic.hardenTransform(moving)  # ... then "harden"
    assert moving.GetParentTransformNode() is None
    hardened = centre_ras(slicer.util.arrayFromVolume(moving), volume_ijk_to_ras(moving))
    assert np.allclose(hardened - before, [5.0, 0.0, 0.0], atol=0.05)


def test_bad_inputs_are_refused_clearly(scene, tmp_path):
    import slicer

    from MIADeepLearningLib.mrml import transforms

    fixed, moving, _, field = registration_case("permuted")
    args = (fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
    with pytest.raises(InputError, match=r"must be \(z, y, x, 3\)"):
        transforms.grid_transform_node_from_field(field[..., :2], *args)
    with pytest.raises(InputError, match="not 3D"):
        transforms.grid_transform_node_from_field(field[:1], *args)
    broken = field.copy()
    broken[0, 0, 0, 2] = np.inf
    with pytest.raises(InputError, match="1 values that are NaN or infinite"):
        transforms.grid_transform_node_from_field(broken, *args)
    with pytest.raises(InputError, match="positive spacings"):
        transforms.grid_transform_node_from_field(field, fixed.GetOrigin(), (1.0, 0.0, 1.0), fixed.GetDirection())
    linear = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "linear")
    with pytest.raises(InputError, match="not a displacement-field"):
        transforms.field_from_grid_transform_node(linear)
    sitk.WriteTransform(sitk.TranslationTransform(3, (1.0, 0.0, 0.0)), str(tmp_path / "shift.h5"))
    with pytest.raises(RuntimeError, match="does not hold a displacement field"):
        transforms.load_grid_transform(tmp_path / "shift.h5", "shift")
    with pytest.raises(RuntimeError, match="does not exist"):
        transforms.load_grid_transform(tmp_path / "missing.h5", "missing")
    node = _node(field, fixed)
    fixed_node = _volume(sitk.Cast(fixed, sitk.sitkFloat32), "fixed")
    fixed_node.SetAndObserveTransformNodeID(linear.GetID())
    with pytest.raises(InputError, match="fixed volume 'fixed' is under a transform"):
        transforms.resample_through_transform(_volume(moving, "moving"), node, fixed_node)
    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="moving volume has no image data"):
        transforms.resample_through_transform(empty, node, fixed_node)
