"""Spatial augmentation of the segmentation training data (training/spatial.py) and the segmentation targets and
resolution augmentation of training/generator.py: the random deformation is smooth and does not fold (positive
Jacobian, its inverse flow undoes it), zero strengths give the identity, labels stay labels, an image and its labels
move together, seeds reproduce transforms, tissue classes follow the FreeSurfer lists. Small volumes only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MIADeepLearningLib.training import generator as gen
from MIADeepLearningLib.training import spatial

SIZE = 24
WM, GM, CSF, VENTRICLE = 2, 3, 24, 4


@pytest.fixture(scope="module")
def label_map() -> tuple[np.ndarray, np.ndarray]:
    """(compact indices, label values) of nested, off-centre spheres: background / CSF / GM / WM / ventricle."""
    z, y, x = np.mgrid[:SIZE, :SIZE, :SIZE]
    radius = np.sqrt((z - 11.0) ** 2 + (y - 12.5) ** 2 + (x - 11.5) ** 2)
    values = np.zeros((SIZE,) * 3, dtype=np.int32)
    values[radius < 11] = CSF
    values[radius < 8.5] = GM
    values[radius < 5.5] = WM
    values[(radius < 2.5) | ((np.abs(x - 14) < 2) & (radius < 5))] = VENTRICLE
    return gen.compact_labels(values)


def _centre(shape: tuple[int, ...]) -> tuple[float, ...]:
    return tuple((n - 1) / 2.0 for n in shape)


def _transform(seed: int, settings: spatial.SpatialSettings | None = None, voxel_mm: float = 1.0,
               shape: tuple[int, int, int] = (SIZE,) * 3) -> spatial.SpatialTransform:
    return spatial.random_transform(shape, _centre((SIZE,) * 3), torch.Generator().manual_seed(seed), settings,
                                    voxel_mm)


def test_zero_strengths_give_the_identity(label_map):
    indices, _ = label_map
    assert torch.equal(spatial.random_affine(torch.Generator(), 0.0, 0.0, 0.0, 0.0), torch.eye(4, dtype=torch.float64))
    still = spatial.random_deformation((12, 10, 8), torch.Generator().manual_seed(1), 0.0, 4.0)
    assert tuple(still.shape) == (3, 12, 10, 8) and float(still.abs().max()) == 0.0
    transform = _transform(3, spatial.SpatialSettings.identity())
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"), axis=-1)
    np.testing.assert_allclose(transform.coordinates.numpy(), grid, atol=1e-5, err_msg="identity: every voxel itself")
    np.testing.assert_array_equal(transform.apply_labels(indices).numpy(), indices)
    image = torch.rand((SIZE,) * 3, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(transform.apply_image(image).numpy(), image.numpy(), atol=1e-5)
    # a crop of a larger map: the same voxels as slicing it
    crop = spatial.SpatialTransform(spatial.transform_coordinates((8, 8, 8), (9.5, 11.5, 13.5)))
    np.testing.assert_array_equal(crop.apply_labels(indices).numpy(), indices[6:14, 8:16, 10:18])


@pytest.mark.parametrize("voxel_mm", [1.0, 2.0])
def test_default_deformation_is_smooth_and_does_not_fold(voxel_mm):
    settings = spatial.SpatialSettings()
    for seed in range(3):
        displacement = spatial.random_deformation((32, 32, 32), torch.Generator().manual_seed(seed),
                                                  settings.deformation_std / voxel_mm,  # the largest std drawn
                                                  settings.deformation_spacing / voxel_mm, settings.integration_steps)
        assert float(displacement.abs().max()) > 1.0, "the deformation at full strength must move voxels"
        determinant = spatial.jacobian_determinant(displacement)
        assert float(determinant.min()) > 0.1, (
            f"seed {seed}, {voxel_mm} mm: the Jacobian determinant reaches {float(determinant.min()):.3f}; a "
            "deformation that folds (<= 0) teaches impossible anatomy")
        size = float(displacement.abs().mean())
        curvature = max(float(displacement.diff(dim=axis).diff(dim=axis).abs().mean()) for axis in (1, 2, 3))
        assert curvature < 0.05 * size, (
            f"seed {seed}, {voxel_mm} mm: mean second difference {curvature:.3f} voxels for a mean displacement of "
            f"{size:.2f}: the field is not smooth (white noise gives more than the displacement itself)")


def test_the_inverse_flow_undoes_the_deformation():
    """exp(v) composed with exp(-v) is the identity (to interpolation error): the map is invertible."""
    generator = torch.Generator().manual_seed(5)
    coarse = torch.randn((1, 3, 4, 4, 4), generator=generator) * 2.0  # control points 8 voxels apart: strong
    velocity = torch.nn.functional.interpolate(coarse, size=(24, 24, 24), mode="trilinear", align_corners=True)[0]
    forward, backward = spatial.integrate_velocity(velocity), spatial.integrate_velocity(-velocity)
    grid = torch.stack(torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij"), dim=-1)
    moved = grid + forward.movedim(0, -1)
    back = torch.stack([spatial.sample(backward[axis], moved, "bilinear", "border") for axis in range(3)])
    residual = (forward + back)[:, 4:-4, 4:-4, 4:-4].abs()  # away from the border (clamped there)
    assert float(forward.abs().max()) > 4.0, "the test field must move voxels by several voxels"
    assert float(residual.max()) < 0.25 and float(residual.mean()) < 0.03, (
        f"exp(-v) o exp(v) is off the identity by up to {float(residual.max()):.3f} voxels (mean "
        f"{float(residual.mean()):.3f}); linear interpolation of a strong field explains a few tenths at most")


def test_labels_stay_labels_and_move_with_the_image(label_map):
    indices, values = label_map
    transform = _transform(7)
    assert not np.allclose(transform.coordinates.numpy(), _transform(7, spatial.SpatialSettings.identity()).coordinates
                           .numpy(), atol=0.5), "the default transform must move the map"
    warped = transform.apply_labels(indices)
    assert warped.dtype == torch.int64
    assert set(np.unique(warped.numpy())) <= set(np.unique(indices)), "nearest sampling: no new label values"
    assert len(np.unique(warped.numpy())) == len(values), "every tissue survives a plausible transform"
    other = _transform(8).apply_labels(indices)
    for index in range(1, len(values)):
        moved = transform.apply_image((indices == index).astype(np.float32)) > 0.5
        labelled = (warped == index).numpy()
        agreement = (moved.numpy() & labelled).sum() / max((moved.numpy() | labelled).sum(), 1)
        chance = (moved.numpy() & (other == index).numpy()).sum() / max((moved.numpy() | (other == index).numpy())
                                                                         .sum(), 1)
        assert agreement > 0.8 and agreement > chance + 0.1, (
            f"label {values[index]}: the linearly warped mask and the nearest-warped labels overlap by "
            f"{agreement:.2f} (another transform: {chance:.2f}); image and labels must move together")


def test_seeds_reproduce_transforms(label_map):
    indices, _ = label_map
    first, second, third = _transform(11), _transform(11), _transform(12)
    assert torch.equal(first.coordinates, second.coordinates), "the same seed must give the same transform"
    assert not torch.equal(first.coordinates, third.coordinates), "another seed must give another transform"
    assert torch.equal(first.apply_labels(indices), second.apply_labels(indices))


def test_affine_ranges_and_flips(label_map):
    indices, _ = label_map
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        scaled = spatial.random_affine(generator, 0.0, 0.15, 0.0, 4.0)
        assert torch.all((scaled.diagonal()[:3] >= 0.85) & (scaled.diagonal()[:3] <= 1.15))
        assert torch.count_nonzero(scaled[:3, :3] - torch.diag(scaled.diagonal()[:3])) == 0
        assert torch.all(scaled[:3, 3].abs() <= 4.0) and scaled[3].tolist() == [0, 0, 0, 1]
        rotated = spatial.random_affine(generator, 15.0, 0.0, 0.0)[:3, :3]
        torch.testing.assert_close(rotated @ rotated.T, torch.eye(3, dtype=torch.float64))
        assert abs(float(torch.linalg.det(rotated)) - 1.0) < 1e-9
        angle = np.degrees(np.arccos(np.clip((float(torch.trace(rotated)) - 1.0) / 2.0, -1, 1)))
        assert angle <= 15.0 * np.sqrt(3) + 1e-6, f"seed {seed}: rotation by {angle:.1f} degrees"
        sheared = spatial.random_affine(generator, 0.0, 0.0, 0.02)[:3, :3]
        assert float((sheared - torch.eye(3, dtype=torch.float64)).abs().max()) <= 0.02
    flipped = {bool(torch.equal(_transform(seed, spatial.SpatialSettings(0, 0, 0, 0, 0, flip_axes=(2,)))
                                .apply_labels(indices), torch.from_numpy(indices[..., ::-1].astype(np.int64))))
               for seed in range(8)}
    assert flipped == {True, False}, "flip_axes flips that axis in about half the draws, and leaves it otherwise"


def test_tissue_classes_follow_the_freesurfer_lists():
    values = np.array([0, *gen.CSF_LABELS, *gen.GM_LABELS, *gen.WM_LABELS, 77, 85, 101, 165, 502, 1000])
    expected = [0] + [1] * len(gen.CSF_LABELS) + [2] * len(gen.GM_LABELS) + [3] * len(gen.WM_LABELS) + [0] * 6
    lookup = gen.tissue_classes(values)
    assert lookup.dtype == np.int64 and lookup.tolist() == expected
    assert gen.TISSUE_CLASSES == ("background", "csf", "gm", "wm")
    indices, table = gen.compact_labels(np.array([[[0, 41, 42], [43, 2, 165]]]))
    np.testing.assert_array_equal(gen.tissue_classes(table)[indices], [[[0, 3, 2], [1, 3, 0]]])


def test_resolution_augmentation_blurs_one_axis_on_the_same_grid():
    image = torch.rand((24, 20, 22), generator=torch.Generator().manual_seed(0))
    same, axis = gen.degrade_resolution(image, torch.Generator().manual_seed(1), probability=0.0)
    assert axis is None and same is image, "probability 0: the image is returned unchanged"
    axes = set()
    for seed in range(12):
        degraded, axis = gen.degrade_resolution(image, torch.Generator().manual_seed(seed), probability=1.0,
                                                spacing_range_mm=(6.0, 8.0), voxel_mm=2.0, noise_range=(0.0, 0.0))
        again, _ = gen.degrade_resolution(image, torch.Generator().manual_seed(seed), probability=1.0,
                                          spacing_range_mm=(6.0, 8.0), voxel_mm=2.0, noise_range=(0.0, 0.0))
        assert torch.equal(degraded, again), "seeded"
        assert degraded.shape == image.shape, "the network input stays on the working grid"
        roughness = [float(degraded.diff(dim=dim).abs().mean()) for dim in range(3)]
        assert roughness[axis] < 0.5 * min(roughness[dim] for dim in range(3) if dim != axis), (
            f"seed {seed}: the thick axis {axis} must be the smooth one; mean steps {roughness}")
        axes.add(axis)
    assert axes == {0, 1, 2}, f"the thick axis is drawn at random, got {axes}"
    acquisition = gen.Acquisition(spacing=4.0, thickness=4.0, offset=0.0, noise_std=0.0, in_plane_sigma=0.0)
    moved = gen.apply_acquisition(image, acquisition, 2, torch.Generator())
    direct = gen.upsample_slices(gen.acquire(image.movedim(2, 0), acquisition, torch.Generator()),
                                 gen.slice_coordinates(22, acquisition)).movedim(0, 2)
    assert torch.equal(moved, direct), "apply_acquisition is acquire + upsample_slices with the thick axis first"
