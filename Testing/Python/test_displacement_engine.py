"""Displacement fields in the engine: exact ITK resampling transforms, physical Jacobians, Dice, clear refusals.

Each grid case (helpers.REGISTRATION_GRIDS: oblique anisotropic, left-handed, permuted) has a fixed grid and a
different, axis-aligned moving grid, and a smooth field of up to 4 mm in LPS millimetres on the fixed grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import REGISTRATION_GRIDS, grid_image, physical_points, registration_case, rotation

from MIADeepLearningLib.engine import displacement
from MIADeepLearningLib.engine.errors import InputError

CASES = sorted(REGISTRATION_GRIDS)


@pytest.mark.parametrize("kind", CASES)
def test_warps_equal_simpleitk_resample_exactly(kind):
    fixed, moving, labels, field = registration_case(kind)
    transform = sitk.DisplacementFieldTransform(
        sitk.Cast(displacement.field_image(field, fixed), sitk.sitkVectorFloat64))
    expected = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    expected_labels = sitk.GetArrayFromImage(
        sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID()))
    # the same field as an array, a vector image and a transform
    for given in (field, displacement.field_image(field, fixed), displacement.field_transform(field, fixed)):
        warped = displacement.warp_image(moving, fixed, given)
        assert warped.GetSize() == fixed.GetSize() and warped.GetDirection() == fixed.GetDirection()
        assert np.array_equal(sitk.GetArrayFromImage(warped), expected)
        warped_labels = displacement.warp_labels(labels, fixed, given)
        assert warped_labels.GetPixelID() == labels.GetPixelID()
        assert np.array_equal(sitk.GetArrayFromImage(warped_labels), expected_labels)
    assert set(np.unique(expected_labels)) == {0, 1, 2, 3}  # labels never blended


@pytest.mark.parametrize("pixel", [sitk.sitkFloat32, sitk.sitkInt16, sitk.sitkFloat64])
def test_warps_equal_simpleitk_resample_where_the_field_leaves_the_moving_image(pixel):
    """Arrays and images go through WarpImageFilter, transforms through Resample: the same voxels, also where points
    land outside the moving image (default value, nearest-neighbour labels) and for any moving pixel type."""
    fixed, moving, labels, field = registration_case("oblique_anisotropic")
    field = field * 6.0 + np.array([9.0, -7.0, 5.0])  # far enough to push part of the grid out of the moving image
    moving = sitk.Cast(moving * 50.0, pixel)
    transform = sitk.DisplacementFieldTransform(displacement.field_image(field, fixed))
    expected = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -3.0, sitk.sitkFloat32))
    expected_labels = sitk.GetArrayFromImage(sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor, 0,
                                                           labels.GetPixelID()))
    assert (expected == -3.0).mean() > 0.05, "some points must fall outside the moving image"
    for given in (field, displacement.field_image(field, fixed)):
        warped = displacement.warp_image(moving, fixed, given, default=-3.0)
        assert warped.GetPixelID() == sitk.sitkFloat32
        np.testing.assert_array_equal(sitk.GetArrayFromImage(warped), expected)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(displacement.warp_labels(labels, fixed, given)),
                                      expected_labels)


@pytest.mark.parametrize("kind", CASES)
def test_vectors_are_lps_millimetres_sampling_the_moving_image(kind):
    """warped(p) = moving(p + u(p)): checked on a moving image linear in LPS position, which linear interpolation
    reproduces exactly, so any error in units (voxels vs mm), frame (RAS vs LPS) or axis order would show."""
    fixed, moving, _, field = registration_case(kind)
    weights = np.array([0.7, -1.3, 2.1])
    ramp = sitk.GetImageFromArray((physical_points(moving) @ weights).astype(np.float64))
    ramp.CopyInformation(moving)
    warped = sitk.GetArrayFromImage(displacement.warp_image(ramp, fixed, field))
    expected = (physical_points(fixed) + field) @ weights
    assert np.abs(warped - expected).max() < 1e-3  # float32 output of values up to ~100


def test_constant_field_moves_content_against_the_vector():
    """Resampling convention: u = (+5, 0, 0) LPS (5 mm towards Left) shows the content 5 mm towards Right."""
    grid = grid_image(np.eye(3), (1.0, 1.0, 1.0), (30, 30, 30))
    p = physical_points(grid) - np.array([3.0, -4.0, 5.0])
    blob = sitk.GetImageFromArray((np.linalg.norm(p, axis=-1) < 6).astype(np.float32))
    blob.CopyInformation(grid)
    field = np.zeros((30, 30, 30, 3))
    field[..., 0] = 5.0
    warped = sitk.GetArrayFromImage(displacement.warp_image(blob, grid, field))

    def centre(voxels):
        weights = voxels / voxels.sum()
        return (physical_points(grid) * weights[..., None]).sum(axis=(0, 1, 2))

    assert np.allclose(centre(warped) - centre(sitk.GetArrayFromImage(blob)), [-5.0, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("kind", CASES)
def test_h5_round_trip_keeps_grid_and_vectors(tmp_path, kind):
    fixed, _, _, field = registration_case(kind)
    path = displacement.write_field(displacement.field_transform(field, fixed), tmp_path / "field.h5")
    back = displacement.field_of(displacement.read_field(path))
    assert back.GetSize() == fixed.GetSize()
    assert np.allclose(back.GetOrigin(), fixed.GetOrigin(), atol=1e-9)
    assert np.allclose(back.GetSpacing(), fixed.GetSpacing(), atol=1e-12)
    assert np.allclose(back.GetDirection(), fixed.GetDirection(), atol=1e-12)
    assert np.array_equal(sitk.GetArrayFromImage(back), field)


def test_identity_field_has_unit_jacobian():
    fixed, _, _, field = registration_case("oblique_anisotropic")
    determinant = displacement.jacobian_determinant(np.zeros_like(field), fixed)
    assert determinant.shape == field.shape[:3] and np.array_equal(determinant, np.ones(field.shape[:3]))
    stats = displacement.jacobian_stats(determinant)
    assert (stats.non_positive_percent, stats.log_std, stats.mean) == (0.0, 0.0, 1.0)


@pytest.mark.parametrize("kind", CASES)
def test_affine_field_gives_det_a_on_every_grid(kind):
    """x -> A x (about a centre) sampled on oblique, anisotropic, flipped and permuted grids: det(A) everywhere, so
    the derivatives are physical (spacing and direction applied), not per voxel index."""
    fixed, _, _, _ = registration_case(kind)
    a = np.array([[1.10, 0.15, -0.05], [-0.08, 0.92, 0.12], [0.06, -0.10, 1.05]]) @ rotation(1, 12.0)
    p = physical_points(fixed) - np.array([3.0, -4.0, 5.0])
    field = p @ (a - np.eye(3)).T
    determinant = displacement.jacobian_determinant(displacement.field_transform(field, fixed))
    assert np.abs(determinant - np.linalg.det(a)).max() < 1e-9
    assert abs(displacement.jacobian_stats(determinant).log_std) < 1e-9


def test_matches_simpleitk_filter_on_axis_aligned_grids_only():
    """SimpleITK's DisplacementFieldJacobianDeterminant uses the spacing but not the direction; on an axis-aligned
    anisotropic grid both agree to rounding, on an oblique grid only ours is the physical Jacobian (see above)."""
    fixed, _, _, field = registration_case("oblique_anisotropic")
    aligned = displacement.field_image(field, fixed)
    aligned.SetDirection(np.eye(3).ravel().tolist())
    ours = displacement.jacobian_determinant(aligned)
    theirs = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(aligned))
    assert np.abs(ours - theirs)[1:-1, 1:-1, 1:-1].max() < 1e-12
    oblique = displacement.field_image(field, fixed)
    theirs_oblique = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(oblique))
    assert np.abs(displacement.jacobian_determinant(oblique) - theirs_oblique)[1:-1, 1:-1, 1:-1].max() > 0.05


def test_slabs_give_the_same_determinant_as_one_piece(monkeypatch):
    fixed = grid_image(rotation(0, 30.0), (1.0, 1.5, 2.0), (10, 9, 70))  # 70 slices: three slabs
    field = np.sin(physical_points(fixed) / 4.0) * 2.0
    whole = displacement.jacobian_determinant(field, fixed)
    monkeypatch.setattr(displacement, "_SLAB", 1000)
    assert np.abs(displacement.jacobian_determinant(field, fixed) - whole).max() < 1e-12


@pytest.mark.parametrize("kind", CASES)
def test_determinant_equals_numpy_on_the_physical_jacobian(kind):
    """The written-out determinant equals np.linalg.det of I + (np.gradient along the index axes) ·
    (direction · diag(spacing))^-1 — the plain construction — for a non-linear field on every kind of grid."""
    fixed, _, _, _ = registration_case(kind)
    field = np.sin(physical_points(fixed) @ np.array([[0.2, -0.1, 0.15], [0.05, 0.25, -0.2], [0.1, 0.1, 0.3]])) * 3.0
    by_index = np.stack([np.gradient(field, axis=axis) for axis in (2, 1, 0)], axis=-1)  # [..., a, c]
    to_index = np.linalg.inv(np.asarray(fixed.GetDirection()).reshape(3, 3) @ np.diag(fixed.GetSpacing()))
    expected = np.linalg.det(np.eye(3) + by_index @ to_index)
    assert np.abs(displacement.jacobian_determinant(field, fixed) - expected).max() < 1e-12
    assert expected.min() < 0.8 and expected.max() > 1.2, "the test field stretches and squeezes"


def test_folding_field_is_reported():
    fixed = grid_image(np.eye(3), (1.0, 1.0, 1.0), (24, 12, 12))
    x = physical_points(fixed)[..., 0] - 3.0
    field = np.zeros((12, 12, 24, 3))
    field[..., 0] = -1.6 * 4.0 * np.sin(x / 4.0)  # d(x + u)/dx = 1 - 1.6 cos(x/4) < 0 near x = 0
    stats = displacement.jacobian_stats(displacement.jacobian_determinant(field, fixed))
    assert 0 < stats.non_positive_percent < 100 and stats.minimum < 0
    assert np.isfinite(stats.log_std)


def test_jacobian_stats_numbers():
    determinant = np.array([[[-0.5, 0.0, 1.0, np.e]]])
    stats = displacement.jacobian_stats(determinant)
    assert stats.non_positive_percent == 50.0
    assert stats.log_std == pytest.approx(0.5)  # log of (1, e) = (0, 1)
    assert stats.mean == pytest.approx((np.e + 0.5) / 4)
    assert (stats.minimum, stats.maximum, stats.voxels) == (-0.5, np.e, 4)
    inside = displacement.jacobian_stats(determinant, mask=np.array([[[False, False, True, True]]]))
    assert inside.non_positive_percent == 0.0 and inside.voxels == 2


def test_dice_per_label():
    first = np.array([0, 1, 1, 2, 2, 0, 0])
    second = np.array([0, 1, 2, 2, 2, 3, 0])
    scores = displacement.dice_per_label(first, second)
    assert scores == pytest.approx({1: 2 / 3, 2: 0.8, 3: 0.0})
    assert np.isnan(displacement.dice_per_label(first, second, labels=[7])[7])
    fixed, _, labels, field = registration_case("left_handed")
    warped = displacement.warp_labels(labels, fixed, field)
    assert displacement.dice_per_label(warped, warped) == {1: 1.0, 2: 1.0, 3: 1.0}


def test_bad_inputs_are_refused_clearly(tmp_path):
    fixed, moving, _, field = registration_case("permuted")
    with pytest.raises(InputError, match=r"shape \(16, 20, 22, 2\).*\(16, 20, 22, 3\)"):
        displacement.field_transform(field[..., :2], fixed)
    with pytest.raises(InputError, match=r"shape \(20, 16, 22, 3\)"):
        displacement.field_transform(field.transpose(1, 0, 2, 3), fixed)
    broken = field.copy()
    broken[3, 4, 5, 1] = np.nan
    with pytest.raises(InputError, match="1 values that are NaN"):
        displacement.warp_image(moving, fixed, broken)
    with pytest.raises(InputError, match="2D"):
        displacement.field_transform(np.zeros((5, 6, 3)), sitk.Image([6, 5], sitk.sitkFloat32))
    with pytest.raises(InputError, match="single slice"):
        displacement.field_transform(np.zeros((1, 5, 6, 3)), sitk.Image([6, 5, 1], sitk.sitkFloat32))
    with pytest.raises(InputError, match="needs the fixed image"):
        displacement.jacobian_determinant(field)
    with pytest.raises(InputError, match="not on the fixed image's grid"):
        displacement.warp_image(moving, fixed, displacement.field_image(field, fixed)[1:, :, :])
    with pytest.raises(InputError, match="2 components"):
        displacement.field_image(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 2))
    with pytest.raises(InputError, match="not a displacement field"):
        sitk.WriteTransform(sitk.TranslationTransform(3, (1.0, 2.0, 3.0)), str(tmp_path / "shift.h5"))
        displacement.read_field(tmp_path / "shift.h5")
    with pytest.raises(InputError, match="does not exist"):
        displacement.read_field(tmp_path / "missing.h5")
    with pytest.raises(ValueError, match=r"\.h5"):
        displacement.write_field(displacement.field_transform(field, fixed), tmp_path / "field.nii.gz")
    with pytest.raises(InputError, match="TranslationTransform"):
        displacement.warp_image(moving, fixed, sitk.TranslationTransform(3))
    with pytest.raises(InputError, match="same grid"):
        displacement.dice_per_label(moving, fixed)
