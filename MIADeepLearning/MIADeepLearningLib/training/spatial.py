"""Spatial augmentation of label maps (SynthSeg-style): a random affine and a smooth diffeomorphic deformation.

Why: with few label maps (or one template) the anatomy a segmenter sees varies only through these transforms, so
they must be strong yet plausible — a deformation that folds would teach impossible anatomy. The deformation is a
random stationary velocity field on a coarse grid, upsampled and integrated by scaling and squaring, which is
invertible by construction. Labels are sampled with nearest neighbours (labels stay labels); an image under the same
transform is sampled linearly. Everything draws from a ``torch.Generator``, so a seed reproduces a transform.

Coordinates are voxel indices of (D, H, W) arrays in that order (z, y, x); lengths given in mm are converted with the
grid's voxel size (``voxel_mm``), so the same settings mean the same anatomy at 1 mm and 2 mm working grids.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as functional

# The differentiable flow operations live in the engine (inference integrates the network's velocity the same way);
# integrate_velocity and warp stay importable from here for training code and tests.
from MIADeepLearningLib.engine.flow import _to_normalised, integrate_velocity, warp  # noqa: F401


def _uniform(generator: torch.Generator, bound: float, size: int) -> torch.Tensor:
    """`size` values uniform in [-bound, bound] (always drawn, so a zero bound leaves the random stream unchanged)."""
    return (2.0 * torch.rand(size, generator=generator, dtype=torch.float64) - 1.0) * bound


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation about each of the three axes (radians), composed in a fixed order."""
    matrix = torch.eye(3, dtype=torch.float64)
    for axis in range(3):
        first, second = [other for other in range(3) if other != axis]
        cosine, sine = math.cos(float(angles[axis])), math.sin(float(angles[axis]))
        rotation = torch.eye(3, dtype=torch.float64)
        rotation[first, first], rotation[first, second] = cosine, -sine
        rotation[second, first], rotation[second, second] = sine, cosine
        matrix = rotation @ matrix
    return matrix


def random_affine(generator: torch.Generator, rotation: float = 15.0, scaling: float = 0.15, shear: float = 0.02,
                  translation: float = 0.0) -> torch.Tensor:
    """A random 4x4 affine (float64) in voxel coordinates centred on the volume: rotation ±`rotation` degrees and
    scaling by 1 ± `scaling` per axis, shear ±`shear` per off-diagonal term, translation ±`translation` voxels.
    It maps output positions to source positions (what resampling needs)."""
    angles = _uniform(generator, math.radians(rotation), 3)
    scales = 1.0 + _uniform(generator, scaling, 3)
    shears = _uniform(generator, shear, 6)
    shifts = _uniform(generator, translation, 3)
    shear_matrix = torch.eye(3, dtype=torch.float64)
    shear_matrix[[0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1]] = shears
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = _rotation(angles) @ shear_matrix @ torch.diag(scales)
    affine[:3, 3] = shifts
    return affine


def random_deformation(shape: tuple[int, int, int], generator: torch.Generator, std: float,
                       control_spacing: float, steps: int = 7) -> torch.Tensor:
    """A smooth diffeomorphic displacement (3, *shape) in voxels: velocities N(0, `std` voxels) on a grid of control
    points `control_spacing` voxels apart, upsampled trilinearly to half the resolution (cheap, and smooth anyway),
    integrated there, and upsampled to `shape`."""
    points = [max(2, math.ceil((n - 1) / max(control_spacing, 1e-3)) + 1) for n in shape]
    coarse = torch.randn((3, *points), generator=generator) * std  # voxels of the full-resolution grid
    half = tuple(max(4, math.ceil(n / 2)) for n in shape)
    # voxels of `shape` -> voxels of the half-resolution grid, where the integration runs
    to_half = torch.tensor([(h - 1) / max(n - 1, 1) for h, n in zip(half, shape)]).view(3, 1, 1, 1)
    velocity = functional.interpolate(coarse[None], size=half, mode="trilinear", align_corners=True)[0] * to_half
    displacement = integrate_velocity(velocity, steps) / to_half
    return functional.interpolate(displacement[None], size=tuple(shape), mode="trilinear", align_corners=True)[0]


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of x -> x + displacement(x) (central differences), (D, H, W): > 0 everywhere for a
    map that does not fold."""
    gradients = [torch.stack(torch.gradient(displacement[component]), dim=0) for component in range(3)]
    jacobian = torch.stack(gradients, dim=0).permute(2, 3, 4, 0, 1) + torch.eye(3)  # (D, H, W, 3, 3)
    return torch.linalg.det(jacobian.double()).float()


@dataclass
class SpatialSettings:
    """Strengths of the random spatial transform; lengths in mm (converted to voxels of the working grid)."""

    rotation: float = 15.0  # degrees, per axis, uniform in ±
    scaling: float = 0.15  # relative, per axis, uniform in 1 ±
    shear: float = 0.02  # per off-diagonal term, uniform in ±
    translation: float = 10.0  # mm, per axis, uniform in ± (on top of the random crop position)
    deformation_std: float = 4.0  # mm: the velocity field's std is drawn uniformly in [0, this]
    deformation_spacing: float = 24.0  # mm between the velocity field's control points
    integration_steps: int = 7
    flip_axes: tuple[int, ...] = ()  # axes flipped with probability 0.5 each (left-right: tissue classes are symmetric)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, rotation: float, scaling: float, translation: float,
                      what: str = "per axis") -> None:
        """The command-line options of a training script for these strengths (its own defaults)."""
        parser.add_argument("--rotation", type=float, default=rotation, help=f"degrees, {what}")
        parser.add_argument("--scaling", type=float, default=scaling, help=f"relative, {what}")
        parser.add_argument("--shear", type=float, default=0.02)
        parser.add_argument("--translation", type=float, default=translation, help=f"mm, {what}")
        parser.add_argument("--deformation-std", type=float, default=4.0, help="mm, largest std of the velocity field")
        parser.add_argument("--deformation-spacing", type=float, default=24.0, help="mm between its control points")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, flip_axes: tuple[int, ...] = ()) -> SpatialSettings:
        return cls(rotation=args.rotation, scaling=args.scaling, shear=args.shear, translation=args.translation,
                   deformation_std=args.deformation_std, deformation_spacing=args.deformation_spacing,
                   flip_axes=tuple(flip_axes))

    @classmethod
    def identity(cls) -> SpatialSettings:
        return cls(rotation=0.0, scaling=0.0, shear=0.0, translation=0.0, deformation_std=0.0)


@dataclass
class SpatialTransform:
    """Source voxel coordinates (D, H, W, 3; z, y, x) of every output voxel: one transform for labels and images."""

    coordinates: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.coordinates.shape[:3])

    def apply_labels(self, labels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Integer labels (int64) sampled with nearest neighbours: no new values; outside the source: 0."""
        return sample(labels, self.coordinates, "nearest").round().long()

    def apply_image(self, image: np.ndarray | torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
        """An image (float32) under the same transform, sampled linearly."""
        return sample(image, self.coordinates, "bilinear", padding_mode)


def sample(volume: np.ndarray | torch.Tensor, coordinates: torch.Tensor, mode: str,
           padding_mode: str = "zeros") -> torch.Tensor:
    """`volume` (D, H, W) at voxel `coordinates` (..., 3; z, y, x) with grid_sample. Only the bounding box of the
    coordinates is converted to float, so sampling a crop from a whole label map costs what the crop costs."""
    source_shape = tuple(volume.shape)
    flat = coordinates.reshape(-1, 3)
    low = [int(value) for value in torch.floor(flat.min(dim=0).values) - 1]
    high = [int(value) for value in torch.ceil(flat.max(dim=0).values) + 2]
    box = []
    for axis, n in enumerate(source_shape):
        start, stop = min(max(low[axis], 0), n - 1), max(min(high[axis], n), 1)
        start = min(start, stop - 1)
        if stop - start < 2 and n >= 2:  # grid_sample needs two voxels per axis to tell inside from outside
            start, stop = (start, start + 2) if start + 2 <= n else (n - 2, n)
        box.append((start, stop))
    region = volume[tuple(slice(a, b) for a, b in box)]
    region = torch.as_tensor(np.ascontiguousarray(region) if isinstance(region, np.ndarray) else region)
    region = region.to(torch.float32)
    offsets = torch.tensor([a for a, _ in box], dtype=coordinates.dtype)
    local = _to_normalised((coordinates - offsets).movedim(-1, 0), tuple(region.shape)) - 1.0
    grid = local.flip(0).movedim(0, -1).reshape(1, *coordinates.shape[:3], 3).to(torch.float32)
    return functional.grid_sample(region[None, None], grid, mode=mode, padding_mode=padding_mode,
                                  align_corners=True)[0, 0]


def transform_coordinates(output_shape: tuple[int, int, int], centre: torch.Tensor | tuple[float, float, float],
                          affine: torch.Tensor | None = None, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Source coordinates of an output grid: deform the output grid (`displacement`, voxels), then map it, centred,
    through `affine` onto the source around `centre` (source voxel coordinates)."""
    axes = [torch.arange(n, dtype=torch.float32) - (n - 1) / 2.0 for n in output_shape]
    positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    if displacement is not None:
        positions = positions + displacement.movedim(0, -1)
    if affine is not None:
        matrix, shift = affine[:3, :3].float(), affine[:3, 3].float()
        positions = positions @ matrix.T + shift
    return positions + torch.as_tensor(centre, dtype=torch.float32)


def random_transform(output_shape: tuple[int, int, int], centre: tuple[float, float, float],
                     generator: torch.Generator, settings: SpatialSettings | None = None,
                     voxel_mm: float = 1.0) -> SpatialTransform:
    """A random affine + deformation of an output grid of `output_shape`, centred on `centre` of the source."""
    settings = settings or SpatialSettings()
    affine = random_affine(generator, settings.rotation, settings.scaling, settings.shear,
                           settings.translation / voxel_mm)
    flips = torch.rand(3, generator=generator)
    for axis in settings.flip_axes:
        if float(flips[axis]) < 0.5:
            affine[:3, axis] = -affine[:3, axis]
    std = float(torch.rand((), generator=generator)) * settings.deformation_std / voxel_mm
    displacement = None
    if settings.deformation_std > 0:
        displacement = random_deformation(output_shape, generator, std, settings.deformation_spacing / voxel_mm,
                                          settings.integration_steps)
    return SpatialTransform(transform_coordinates(output_shape, centre, affine, displacement))
