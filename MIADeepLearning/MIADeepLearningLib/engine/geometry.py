"""Model space and the way back: resample any input (oblique, anisotropic, flipped, permuted) onto a grid the
networks were trained on, and bring probabilities back onto the input's own grid.

Two kinds of working grid:

- `ras_model_grid`: axis-aligned RAS around the head's foreground. Its direction is diag(-1, -1, 1) in LPS, i.e. its
  x axis points to patient Right, y to Anterior, z to Superior; `ras_array` turns SimpleITK's (z, y, x) array into
  the (R, A, S)-indexed array that nibabel's "closest canonical" orientation gives, which is what deepbet's networks
  expect.
- `isotropic_grid`: isotropic voxels over the input's whole extent in the input's own orientation (obliquity kept),
  optionally with the axes permuted and flipped to the orientation a network was trained in (e.g. "LIA").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

RAS_DIRECTION_IN_LPS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
# Where each letter of a DICOM orientation code ("LPS", "LIA", ...: the direction each image axis points to) points,
# in LPS physical coordinates, as sitk.DICOMOrient reads the code.
ORIENTATION_VECTORS = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "S": (0, 0, 1),
                       "I": (0, 0, -1)}
ANTI_ALIAS_BELOW = 0.9  # input voxels finer than this share of the grid's spacing are smoothed before sampling


def orientation_axes(orientation: str) -> np.ndarray:
    """3x3 matrix whose columns are where the axes of a DICOM orientation code point (LPS); ValueError for a string
    that is no such code (three letters naming three different physical axes)."""
    code = orientation.upper()
    physical_axes = {int(np.flatnonzero(ORIENTATION_VECTORS[letter])[0]) for letter in code
                     if letter in ORIENTATION_VECTORS}
    if len(code) != 3 or len(physical_axes) != 3:
        raise ValueError(f"'{orientation}' is not an orientation code such as LPS, RAS or LIA.")
    return np.array([ORIENTATION_VECTORS[letter] for letter in code], dtype=float).T


def axes_towards(direction: Sequence[float], orientation: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(permutation, signs): grid axis t is input axis permutation[t] times signs[t], the assignment whose axes are
    best aligned with the DICOM orientation code (largest sum of |cos|). Without touching voxels; the same choice as
    sitk.DICOMOrient up to obliquities near 45 degrees, where that filter's axis-by-axis rule may pick another."""
    target = orientation_axes(orientation)
    axes = np.asarray(direction, dtype=float).reshape(3, 3)  # columns: where the input's axes point
    alignment = axes.T @ target  # [input axis, grid axis]
    permutation = max(itertools.permutations(range(3)),
                      key=lambda order: sum(abs(alignment[order[t], t]) for t in range(3)))
    signs = tuple(1 if alignment[permutation[t], t] >= 0 else -1 for t in range(3))
    return tuple(permutation), signs


def isotropic_grid(image: sitk.Image, spacing_mm: float = 1.0,
                   orientation: str | None = None) -> tuple[sitk.Image, np.ndarray]:
    """An empty image on a working grid: `spacing_mm` voxels centred on the input's extent (voxel corners to voxel
    corners), in the input's direction, or, with `orientation` (e.g. "LIA"), the input's axes permuted and flipped
    to come closest to that code, so a network sees the brain the way round it was trained on while any obliquity
    is kept. Also returns, per grid axis, the offset (mm, along that axis) of the first grid voxel centre from the
    first input voxel centre along the same axis (for `orientation` None: per input axis)."""
    size_in = np.asarray(image.GetSize(), dtype=float)
    spacing_in = np.asarray(image.GetSpacing(), dtype=float)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    first = np.asarray(image.GetOrigin(), dtype=float)  # physical position of the first voxel centre
    if orientation is not None:
        permutation, signs = axes_towards(image.GetDirection(), orientation)
        order = list(permutation)
        for axis, sign in zip(permutation, signs):  # a flipped axis starts at the input's last voxel along it
            if sign < 0:
                first = first + direction[:, axis] * (size_in[axis] - 1) * spacing_in[axis]
        size_in, spacing_in = size_in[order], spacing_in[order]
        direction = direction[:, order] * np.asarray(signs, dtype=float)
    extent = size_in * spacing_in
    size_out = np.maximum(np.round(extent / spacing_mm).astype(int), 1)
    offset = -0.5 * spacing_in + 0.5 * spacing_mm + (extent - size_out * spacing_mm) / 2.0
    origin = first + direction @ offset
    grid = sitk.Image([int(n) for n in size_out], sitk.sitkUInt8)
    grid.SetSpacing([spacing_mm] * 3)
    grid.SetDirection([float(value) for value in direction.ravel()])
    grid.SetOrigin([float(value) for value in origin])
    return grid, offset


def anti_aliased(image: sitk.Image, target_spacing: float, keep_axes: Sequence[int] = ()) -> sitk.Image:
    """A float32 copy blurred along every input axis whose voxels are finer than `target_spacing` mm (sigma
    1/2 sqrt(target^2 - s^2) mm), so that sampling it at that spacing does not alias; the axes in `keep_axes` are never
    blurred. Separate from the resampling so that one blurred copy can serve several grids of that spacing (the
    registration's affine copies and its working grid)."""
    source = sitk.Cast(image, sitk.sitkFloat32)
    sigmas = [0.0 if index in keep_axes or spacing >= ANTI_ALIAS_BELOW * target_spacing else
              0.5 * math.sqrt(target_spacing**2 - spacing**2) for index, spacing in enumerate(image.GetSpacing())]
    if any(sigmas):
        source = sitk.SmoothingRecursiveGaussian(source, [max(value, 1e-3) for value in sigmas])
        source = sitk.Cast(source, sitk.sitkFloat32)
    return source


def resample_linear(source: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
    """`source` linearly resampled onto `grid` (float32, nearest-neighbour extrapolation at the border) through
    `transform` (grid point -> source point; default the identity)."""
    return sitk.Resample(source, grid, transform or sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)


def resample_anti_aliased(image: sitk.Image, grid: sitk.Image, keep_axes: Sequence[int] = (),
                          transform: sitk.Transform | None = None) -> sitk.Image:
    """The input linearly resampled onto `grid` after anti_aliased() for the grid's coarsest spacing. `transform`
    (a resampling transform, grid point -> input point) e.g. brings a registration's moving image through its
    affine pre-alignment in the same single interpolation."""
    return resample_linear(anti_aliased(image, float(max(grid.GetSpacing())), keep_axes), grid, transform)


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
