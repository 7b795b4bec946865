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

import torch
import torch.nn.functional as functional


def _to_normalised(displacement: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(3, ...) voxel displacements (z, y, x) -> grid_sample units (align_corners=True) of a grid of `shape`."""
    factors = torch.tensor([2.0 / max(n - 1, 1) for n in shape], dtype=displacement.dtype, device=displacement.device)
    return displacement * factors.view(3, *([1] * (displacement.dim() - 1)))


def _identity_grid(shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """(D, H, W, 3) grid_sample coordinates (x, y, z order, align_corners=True) of every voxel of `shape`."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Displacement (3, D, H, W; voxels of that grid) of the flow of a stationary velocity field by scaling and
    squaring: the field divided by 2**steps is composed with itself `steps` times, which keeps the map invertible."""
    shape = tuple(velocity.shape[1:])
    displacement = _to_normalised(velocity.float(), shape) / (2.0**steps)  # (3, D, H, W), z y x
    identity = _identity_grid(shape, velocity.device)[None]
    for _ in range(steps):
        grid = identity + displacement.flip(0).permute(1, 2, 3, 0)[None]
        displacement = displacement + functional.grid_sample(displacement[None], grid, mode="bilinear",
                                                             padding_mode="border", align_corners=True)[0]
    factors = torch.tensor([max(n - 1, 1) / 2.0 for n in shape], dtype=displacement.dtype, device=displacement.device)
    return displacement * factors.view(3, 1, 1, 1)


def warp(volume: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "border") -> torch.Tensor:
    """`volume` (C, D, H, W) resampled on its own grid at x + displacement(x) (3, D, H, W; voxels, z y x): the
    convention of integrate_velocity and of the engine's fields (the fixed voxel x samples the moving image there).
    Differentiable in both arguments, on the tensors' device."""
    shape = tuple(volume.shape[1:])
    offsets = _to_normalised(displacement.float(), shape).flip(0).permute(1, 2, 3, 0)
    grid = _identity_grid(shape, volume.device) + offsets
    return functional.grid_sample(volume[None].float(), grid[None], mode=mode, padding_mode=padding_mode,
                                  align_corners=True)[0]
