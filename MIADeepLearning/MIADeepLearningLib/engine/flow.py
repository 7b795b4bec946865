"""Differentiable dense flows on a voxel grid: integrating a stationary velocity field and warping a volume by a
displacement, both with torch's grid_sample so gradients reach the field.

Why in the engine: the registration pipeline (engine/registration.py) integrates the network's velocity and refines
it on the pair at inference, and training (training/spatial.py, train_registration.py) must use exactly the same
operations, so that what the network learnt to predict is integrated the same way where it is used. Training imports
these from here; the engine never imports training.

Coordinates are voxel indices of (D, H, W) arrays in that order (z, y, x); a displacement (3, D, H, W) holds, per
voxel, the offset (z, y, x) in voxels of the position it samples: the fixed voxel x samples the moving image at
x + u(x), the convention of engine/displacement.py.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as functional


def _to_normalised(displacement: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(3, ...) voxel displacements (z, y, x) -> grid_sample units (align_corners=True) of a grid of `shape`."""
    factors = torch.tensor([2.0 / max(n - 1, 1) for n in shape], dtype=displacement.dtype, device=displacement.device)
    return displacement * factors.view(3, *([1] * (displacement.dim() - 1)))


@functools.lru_cache(maxsize=4)
def _identity_grid(shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """(D, H, W, 3) grid_sample coordinates (x, y, z order, align_corners=True) of every voxel of `shape`; kept for
    the last few shapes (the refinement integrates on one grid every step). Never modify the result in place."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1)


def sample(volume: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border"
           ) -> torch.Tensor:
    """functional.grid_sample (align_corners=True) of one (1, C, D, H, W) volume at a (1, d, h, w, 3) grid, on all
    of torch's CPU threads. Why: PyTorch's CPU kernel for 3D grids parallelises over the batch only, so one volume
    runs on one thread; here the grid is cut into as many equal slabs (along d) as there are threads, sampled as a
    batch of the same (expanded, not copied) volume. Every point is interpolated exactly as in one call."""
    parts = torch.get_num_threads() if volume.device.type == "cpu" and volume.shape[0] == 1 else 1
    depth = grid.shape[1]
    if parts < 2 or depth < 2 * parts:
        return functional.grid_sample(volume, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    slab = -(-depth // parts)
    padded = functional.pad(grid, (0, 0, 0, 0, 0, 0, 0, slab * parts - depth)) if slab * parts > depth else grid
    batch = padded.reshape(parts, slab, *grid.shape[2:])
    sampled = functional.grid_sample(volume.expand(parts, *volume.shape[1:]), batch, mode=mode,
                                     padding_mode=padding_mode, align_corners=True)  # (parts, C, slab, h, w)
    joined = sampled.transpose(0, 1).reshape(1, volume.shape[1], slab * parts, *grid.shape[2:4])
    return joined[:, :, :depth]


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Displacement (3, D, H, W; voxels of that grid) of the flow of a stationary velocity field by scaling and
    squaring: the field divided by 2**steps is composed with itself `steps` times, which keeps the map invertible."""
    shape = tuple(velocity.shape[1:])
    # channels in grid_sample's (x, y, z) order while squaring, so each step's grid needs no reordering copy (every
    # channel is interpolated alone: the order changes no number); / 2**steps is exact, as before
    displacement = (_to_normalised(velocity.float(), shape) / (2.0**steps)).flip(0)
    identity = _identity_grid(shape, velocity.device)[None]
    for _ in range(steps):
        grid = identity + displacement.permute(1, 2, 3, 0)[None]
        displacement = displacement + sample(displacement[None], grid)[0]
    factors = torch.tensor([max(n - 1, 1) / 2.0 for n in shape], dtype=displacement.dtype, device=displacement.device)
    return displacement.flip(0) * factors.view(3, 1, 1, 1)


def warp(volume: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "border") -> torch.Tensor:
    """`volume` (C, D, H, W) resampled on its own grid at x + displacement(x) (3, D, H, W; voxels, z y x): the
    convention of integrate_velocity and of the engine's fields (the fixed voxel x samples the moving image there).
    Differentiable in both arguments, on the tensors' device."""
    shape = tuple(volume.shape[1:])
    offsets = _to_normalised(displacement.float(), shape).flip(0).permute(1, 2, 3, 0)
    grid = _identity_grid(shape, volume.device) + offsets
    return sample(volume[None].float(), grid[None], mode, padding_mode)[0]
