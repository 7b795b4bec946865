"""Model space and the way back: resample any input (oblique, anisotropic, flipped, permuted) onto an axis-aligned
RAS grid the networks were trained on, and bring probabilities back onto the input's own grid.

A model-space grid has direction diag(-1, -1, 1) in LPS, i.e. its x axis points to patient Right, y to Anterior,
z to Superior; `ras_array` turns SimpleITK's (z, y, x) array into the (R, A, S)-indexed array that
nibabel's "closest canonical" orientation gives, which is what deepbet's networks expect.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

RAS_DIRECTION_IN_LPS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def foreground_physical_box(image: sitk.Image, fraction: float = 0.1, trim: float = 0.001,
                            max_points: int = 2_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS bounds of the voxels brighter than `fraction` of the robust intensity range.

    Scans are often padded (an oblique acquisition resampled onto a larger grid, a wide field of view), and the
    box of an oblique grid's corners is far larger than the head; the networks expect the head to fill most of
    their input, as in their training data. The bounds are taken from the foreground voxels' own positions,
    ignoring the outermost `trim` share on each side (isolated noise and artefacts).
    """
    voxels = sitk.GetArrayViewFromImage(image)
    step = max(1, round((voxels.size / max_points) ** (1 / 3)))
    sample = voxels[::step, ::step, ::step]
    low, high = np.quantile(sample, [0.005, 0.995])
    z, y, x = np.nonzero(sample > low + fraction * (high - low))
    if x.size == 0:
        z, y, x = (np.array([0, n - 1]) for n in sample.shape)
    index = np.stack([x, y, z]).astype(np.float64) * step
    direction = np.array(image.GetDirection()).reshape(3, 3)
    points = np.array(image.GetOrigin())[:, None] + direction @ (np.array(image.GetSpacing())[:, None] * index)
    half_voxel = 0.5 * step * float(max(image.GetSpacing()))
    return (np.quantile(points, trim, axis=1) - half_voxel, np.quantile(points, 1 - trim, axis=1) + half_voxel)


def ras_model_grid(image: sitk.Image, spacing_mm: float = 1.0, margin_mm: float = 10.0,
                   max_voxels_per_axis: int = 512) -> sitk.Image:
    """An empty axis-aligned RAS grid of isotropic spacing covering the input's foreground plus a margin.

    The spacing grows when the field of view would need more than ``max_voxels_per_axis`` voxels, which keeps
    memory bounded for whole-body inputs.
    """
    low, high = foreground_physical_box(image)
    low, high = low - margin_mm, high + margin_mm
    extent = high - low
    spacing = max(spacing_mm, float(extent.max()) / max_voxels_per_axis)
    size = [max(2, math.ceil(e / spacing)) for e in extent]
    # Indices grow towards Right, Anterior and Superior, so index 0 is the Left-most (largest LPS x),
    # Posterior-most (largest LPS y) and Inferior-most (smallest LPS z) voxel centre.
    origin = (high[0] - spacing / 2, high[1] - spacing / 2, low[2] + spacing / 2)
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetOrigin(origin)
    grid.SetDirection(RAS_DIRECTION_IN_LPS)
    return grid


def resample(image: sitk.Image, reference: sitk.Image, linear: bool = True, default: float = 0.0) -> sitk.Image:
    """Resample onto the reference grid in physical space (identity transform)."""
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default, image.GetPixelID())


def ras_array(image: sitk.Image) -> np.ndarray:
    """(z, y, x) voxels of a model-grid image as an (R, A, S)-indexed array."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def image_from_ras_array(voxels: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """Inverse of `ras_array`: an (R, A, S)-indexed array on a model grid back to a SimpleITK image."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels.transpose(2, 1, 0)))
    image.CopyInformation(grid)
    return image
