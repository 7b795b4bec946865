"""Deformable registration of two head MRIs of any contrast with a SynthMorph-style network: the inference side of
training/train_registration.py.

The network was trained on pairs rendered from label maps with independent random contrasts on a 2 mm grid in the
label maps' array orientation, after only a small affine difference. So at inference:

1. both images are checked (3D, not a single slice, not constant);
2. an affine pre-alignment (engine/affine.py, Mattes mutual information, contrast-independent) takes the moving
   head onto the fixed one;
3. a working grid of the network's spacing covers the FIXED image's extent in the training orientation ("LIA",
   obliquity kept), one voxel wider on every side and padded to the network's size multiple; the fixed image is
   resampled onto it (anti-aliased) and the moving image through the affine (same single interpolation), each
   normalised as in training (minimum -> 0, 99.5th percentile -> 1);
4. the network predicts a stationary velocity field in working-grid voxels, integrated by scaling and squaring into
   a displacement u (the fixed voxel x samples the affinely resampled moving image at x + u(x)); optionally a few
   Adam steps refine that map on this very pair with a contrast-independent similarity (instance optimisation: a
   diffeomorphic correction composed with the network's flow, see `instance_optimise`);
5. u is converted to LPS millimetres, interpolated linearly onto the fixed grid and composed with the affine:
   v(p) = A(p + u(p)) - p, one displacement field on the fixed grid in the convention of engine/displacement.py
   (a resampling transform that Slicer, ITK and ANTs read as is).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as functional

from MIADeepLearningLib.engine import affine as affine_module
from MIADeepLearningLib.engine import geometry
from MIADeepLearningLib.engine.encoding import normalise
from MIADeepLearningLib.engine.errors import InputError, ModelError
from MIADeepLearningLib.engine.flow import integrate_velocity, warp
from MIADeepLearningLib.engine.networks import UNet3D

ProgressCallback = Callable[[str, float, str], None]
PIPELINE_NAME = "synthmorph_registration"
WEIGHTS_ROLE = "network"
# The training pairs are crops of the shared label maps, whose arrays are all LIA, never permuted: the network saw
# anatomy the LIA way round only. "input" keeps the fixed image's own axes.
DEFAULT_ORIENTATION = "LIA"
KEEP_INPUT_AXES = "input"
SIMILARITIES = ("mind",)
INSTANCE_RESOLUTIONS = ("full", "half")
DEFAULT_OPTIONS: dict[str, Any] = {
    "deformable": True,  # False: the affine pre-alignment alone (as a field), e.g. as a benchmark baseline
    "instance_steps": 0,  # Adam steps refining the network's map on the pair (0: the network alone)
    "instance_lr": 0.4,  # Adam step size of the correction velocity (voxels of its half-resolution grid)
    "instance_smoothness": 1.0,  # weight of the diffusion regulariser of the correction (working-grid voxels)
    "similarity": "mind",  # what instance optimisation matches (MIND-SSC, contrast-independent)
    # where that similarity is evaluated: "full" (the working grid) or "half" (its descriptors averaged over 2x2x2
    # blocks: 8x fewer voxels to warp per step, the correction on the same half-resolution grid)
    "instance_resolution": "full",
    # share of the fixed foreground's voxels (of that grid) that the similarity reads per step, drawn anew each step
    # (seeded; at least MIN_SAMPLES points); 1: every voxel of the grid, densely. Measured on three held-out benchmark
    # pairs, 50 steps: 0.05 with lr 0.4 gave brain-structure Dice 0.603 in 16.7 CPU s per registration, dense with
    # lr 0.2 0.598 in 49.9 s.
    "instance_sampling": 0.05,
    "orientation": DEFAULT_ORIENTATION,
    # how the affine pre-alignment starts: "moments" (centres of the foregrounds) or "none" (the identity, for images
    # that already share a scanner frame, e.g. two scans of one session)
    "affine_initialization": "moments",
}
MARGIN_VOXELS = 1  # working-grid voxels added on every side, so every fixed voxel centre lies inside its centres
LOW_OVERLAP = 0.5  # warn when the foregrounds' Dice after the affine is below this
# MIND-SSC: patch radius and the distance (voxels) of the six-neighbourhood whose 12 pairs are compared
MIND_RADIUS = 1
MIND_DILATION = 2
# Scaling-and-squaring steps of the instance optimisation's correction: it is small and on a coarse grid, so 2**5
# pieces keep each below a voxel; fewer than the network's 7 because every step integrates it again (measured: 15
# sampled steps 5.3 -> 4.8 CPU s on a 96x128x96 grid).
CORRECTION_INTEGRATION_STEPS = 5
MIN_SAMPLES = 2000  # a sampled similarity reads at least this many points per step (all candidates when fewer)
# CPU threads of the instance optimisation. Its tensors are small (a correction grid of ~50^3 voxels, a few
# thousand sampled points), so a second thread mostly waits: on two benchmark pairs with 20 steps on 2 cores, 2
# threads took 6.8-7.9 CPU s and 4.0-5.1 s of wall for this stage, 1 thread 4.4-4.7 CPU s and 4.4-4.7 s of wall
# (same Dice). The affine (ITK) and the network (large convolutions) keep every thread.
INSTANCE_CPU_THREADS = 1


def _no_progress(stage: str, fraction: float, message: str) -> None:
    """Default progress sink."""


def load_network(path: Any, title: str) -> tuple[UNet3D, float, int]:
    """(network, working spacing in mm, integration steps) from the weights-only file that train_registration --export
    writes; a ModelError naming the model when the file does not rebuild the network."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    try:
        spacing = float(payload["working_spacing"])
        steps = int(payload["integration_steps"])
        if not spacing > 0 or steps < 0:
            raise ValueError(f"working spacing {spacing} mm and {steps} integration steps")
        network = UNet3D(in_channels=2, out_channels=3, features=payload["features"])
        network.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        raise ModelError(f"The weights of model '{title}' do not fit its network ({error}).") from error
    return network, spacing, steps


# ------------------------------------------------------------------------------------------------- input checks


def check_volume(image: sitk.Image, what: str) -> None:
    """InputError, one sentence, for what cannot be registered: not 3D, a single slice, several components, NaN or
    infinite values, a constant (empty) volume."""
    if image.GetDimension() != 3:
        raise InputError(f"{what} is {image.GetDimension()}D; registration needs a 3D volume.")
    if min(image.GetSize()) < 2:
        size = "×".join(str(n) for n in image.GetSize())
        raise InputError(f"{what} is a single slice ({size} voxels); registration needs a 3D volume.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel; registration "
                         "needs a scalar volume.")
    values = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(values).all():
        raise InputError(f"{what} has values that are NaN or infinite; fix or mask them first.")
    if float(values.max()) == float(values.min()):
        raise InputError(f"{what} is empty (every voxel is {float(values.min()):g}); there is nothing to register.")


def check_on_grid(image: sitk.Image, reference: sitk.Image, what: str, reference_name: str,
                  tolerance: float = 1e-4) -> None:
    """InputError when a mask or label map does not lie on its image's voxel grid (it would be misplaced)."""
    if image.GetDimension() != reference.GetDimension():
        raise InputError(f"{what} is {image.GetDimension()}D but {reference_name} is {reference.GetDimension()}D; "
                         "it must lie on that image's grid.")
    same = (image.GetSize() == reference.GetSize()
            and np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=tolerance)
            and np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=tolerance)
            and np.allclose(image.GetDirection(), reference.GetDirection(), atol=tolerance))
    if not same:
        raise InputError(f"{what} is not on the grid of {reference_name} (size, origin, spacing or direction "
                         "differ); resample it onto that image first.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} must have one component per voxel.")


def check_pair(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None = None,
               moving_mask: sitk.Image | None = None) -> None:
    """All input checks of a registration, before anything runs."""
    if fixed.GetDimension() != moving.GetDimension():
        raise InputError(f"The fixed image is {fixed.GetDimension()}D and the moving image "
                         f"{moving.GetDimension()}D; registration needs two 3D volumes.")
    check_volume(fixed, "The fixed image")
    check_volume(moving, "The moving image")
    for mask, image, what, name in ((fixed_mask, fixed, "The fixed mask", "the fixed image"),
                                    (moving_mask, moving, "The moving mask", "the moving image")):
        if mask is None:
            continue
        check_on_grid(mask, image, what, name)
        if not sitk.GetArrayViewFromImage(mask).any():
            raise InputError(f"{what} is empty; give a mask with at least one voxel inside, or none.")


# ---------------------------------------------------------------------------------------------------- geometry


def working_grid(fixed: sitk.Image, spacing_mm: float, orientation: str | None, multiple: int,
                 margin: int = MARGIN_VOXELS) -> sitk.Image:
    """The grid the network runs on: `spacing_mm` voxels over the fixed image's extent (geometry.isotropic_grid, in
    `orientation` or the fixed image's axes), `margin` voxels wider on every side and padded (evenly on both sides)
    to a multiple of `multiple` voxels per axis. The margin puts every fixed voxel centre strictly inside the
    working grid's voxel centres, so the field is interpolated onto the fixed grid, never extrapolated."""
    grid, _ = geometry.isotropic_grid(fixed, spacing_mm, orientation)
    size = np.asarray(grid.GetSize(), dtype=int)
    padded = -(-(size + 2 * margin) // multiple) * multiple
    before = (padded - size) // 2
    direction = np.asarray(grid.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.asarray(grid.GetOrigin(), dtype=float) - direction @ (before * spacing_mm)
    result = sitk.Image([int(n) for n in padded], sitk.sitkUInt8)
    result.SetSpacing([float(spacing_mm)] * 3)
    result.SetDirection(grid.GetDirection())
    result.SetOrigin([float(value) for value in origin])
    return result


def physical_displacement(displacement: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """(3, D, H, W) displacement in voxels of `grid`, channels in array-axis order (z, y, x) -> (D, H, W, 3) LPS mm.

    u_phys = direction · diag(spacing) · u_index, with the index order (i, j, k) = the reversed array axes."""
    values = np.asarray(displacement, dtype=np.float64)
    if values.shape != (3, *reversed(grid.GetSize())):
        raise ValueError(f"A displacement of shape {values.shape} does not fit a grid of size {grid.GetSize()}.")
    index = np.stack([values[2], values[1], values[0]], axis=-1)  # (D, H, W, 3) in (i, j, k)
    matrix = np.asarray(grid.GetDirection(), dtype=float).reshape(3, 3) @ np.diag(grid.GetSpacing())
    return index @ matrix.T


def field_on_fixed(displacement: np.ndarray, grid: sitk.Image, fixed: sitk.Image) -> np.ndarray:
    """The working grid's voxel displacement as LPS mm vectors, interpolated linearly onto the fixed grid:
    (z, y, x, 3) float64 in SimpleITK's array order (what displacement.field_image takes)."""
    vectors = sitk.GetImageFromArray(physical_displacement(displacement, grid), isVector=True)
    vectors.CopyInformation(grid)
    resampled = sitk.Resample(vectors, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)
    return sitk.GetArrayFromImage(resampled)


def total_field(affine: sitk.Transform, fixed: sitk.Image, displacement: np.ndarray | None = None,
                grid: sitk.Image | None = None) -> sitk.Image:
    """One field on the fixed grid for "affine, then the network's displacement on the affinely resampled moving
    image": v(p) = A(p + u(p)) - p (affine.compose_with_field); without a displacement, the affine alone."""
    if displacement is None:
        return affine_module.compose_with_field(affine, fixed)
    if grid is None:
        raise ValueError("A working-grid displacement needs its grid.")
    return affine_module.compose_with_field(affine, fixed, field_on_fixed(displacement, grid, fixed))


def _coarser(image: sitk.Image, spacing_mm: float, mask: sitk.Image | None, what: str,
             smoothed: sitk.Image | None = None) -> tuple[sitk.Image, sitk.Image | None]:
    """The image (and its mask) on an isotropic `spacing_mm` grid over its extent, in its own axes, when its voxels
    are finer than that; else as they are. `smoothed`: geometry.anti_aliased(image, spacing_mm) when the caller
    already has it."""
    if min(image.GetSpacing()) >= geometry.ANTI_ALIAS_BELOW * spacing_mm:
        return image, mask
    grid, _ = geometry.isotropic_grid(image, spacing_mm)
    coarse = geometry.resample_linear(geometry.anti_aliased(image, spacing_mm) if smoothed is None else smoothed, grid)
    if mask is not None:
        mask = sitk.Resample(sitk.Cast(mask > 0, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                             sitk.sitkFloat32) >= 0.5
        if not sitk.GetArrayViewFromImage(mask).any():
            raise InputError(f"{what} is thinner than the {spacing_mm:g} mm voxels the registration works on; give "
                             "a larger mask or none.")
    return coarse, mask


def affine_inputs(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None,
                  spacing_mm: float, smoothed: tuple[sitk.Image, sitk.Image] | None = None
                  ) -> tuple[sitk.Image, sitk.Image, sitk.Image | None, sitk.Image | None]:
    """(fixed, moving, fixed mask, moving mask) for the affine pre-alignment: each image resampled (anti-aliased)
    onto isotropic voxels of the network's working spacing when it is finer. Why: the affine's last level would
    otherwise run at the input's full resolution (measured 30 s for a 1 mm head pair on 2 CPU cores instead of a few)
    while the network, which runs at that spacing anyway, corrects what remains; the transform, in physical space,
    applies to the original images unchanged. `smoothed`: (fixed, moving) through geometry.anti_aliased at
    `spacing_mm`, when the caller has them (register blurs each image once for this and for its working grid)."""
    fixed_smoothed, moving_smoothed = smoothed or (None, None)
    fixed, fixed_mask = _coarser(fixed, spacing_mm, fixed_mask, "The fixed mask", fixed_smoothed)
    moving, moving_mask = _coarser(moving, spacing_mm, moving_mask, "The moving mask", moving_smoothed)
    return fixed, moving, fixed_mask, moving_mask


# The pre-alignment's levels (shrink factor, smoothing sigma in voxels) on the copies at the working spacing: rigid
# at 4x and 2x, then affine. Without masks the affine stops at 2x: on the held-out inter-subject benchmark pairs
# (Testing/Benchmarks/registration.py, 2 mm copies, one core) that gave brain-structure Dice 0.329 after the affine in
# 1.8 CPU s, an extra level on the copies' own voxels 0.286 in 6.8 s (whole heads: it is drawn to scalp and neck
# detail). With a mask the metric sees only what it covers (e.g. the brain), and the finer level helps: the demo's
# brain-masked MNI -> ROBEX pair, GM / WM Dice after the affine 0.467 / 0.522 with it, 0.445 / 0.481 without, and
# 0.581 / 0.608 against 0.466 / 0.556 after the network and 10 refinement steps.
PREALIGN_RIGID_LEVELS = ((4, 2.0), (2, 1.0))
PREALIGN_AFFINE_LEVELS = ((2, 1.0),)
PREALIGN_AFFINE_LEVELS_MASKED = ((2, 1.0), (1, 0.5))


def prealign(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None = None,
             moving_mask: sitk.Image | None = None, spacing_mm: float = 2.0, initialization: str = "moments",
             smoothed: tuple[sitk.Image, sitk.Image] | None = None) -> affine_module.AffineResult:
    """The affine pre-alignment of `register` (engine.affine.affine_prealign on copies at `spacing_mm` with the levels
    above), also what the benchmark gives every classical method, so all start from the same transform. `smoothed`:
    see affine_inputs."""
    masked = fixed_mask is not None or moving_mask is not None
    return affine_module.affine_prealign(
        *affine_inputs(fixed, moving, fixed_mask, moving_mask, spacing_mm, smoothed),
        rigid_levels=PREALIGN_RIGID_LEVELS,
        affine_levels=PREALIGN_AFFINE_LEVELS_MASKED if masked else PREALIGN_AFFINE_LEVELS,
        initialization=initialization)


# -------------------------------------------------------------------------------------- instance optimisation


def _shifted(padded: torch.Tensor, offset: tuple[int, int, int], pad: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The volume (padded by `pad` on every side) read at x + offset, for every voxel x of the unpadded volume."""
    z, y, x = (pad + value for value in offset)
    return padded[..., z: z + shape[0], y: y + shape[1], x: x + shape[2]]


SIX_NEIGHBOURS = ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1))
# MIND-SSC compares the 12 pairs of six-neighbourhood points that are sqrt(2) apart (the edges of an octahedron)
MIND_PAIRS = tuple((a, b) for index, a in enumerate(SIX_NEIGHBOURS) for b in SIX_NEIGHBOURS[index + 1:]
                   if sum((p - q) ** 2 for p, q in zip(a, b)) == 2)


def _box_mean(volume: torch.Tensor, width: int) -> torch.Tensor:
    """Mean over width^3 boxes of a (C, D, H, W) volume, 'valid' positions only (each size shrinks by width - 1):
    avg_pool3d(stride 1) as sums of shifted views, axis by axis — the same numbers, in about 3/4 of its CPU time for
    the 3-voxel boxes of MIND."""
    for axis in (1, 2, 3):
        length = volume.shape[axis] - width + 1
        total = volume.narrow(axis, 0, length)
        for shift in range(1, width):
            total = total + volume.narrow(axis, shift, length)
        volume = total
    return volume / float(width**3)


def mind_ssc(volume: torch.Tensor, radius: int = MIND_RADIUS, dilation: int = MIND_DILATION) -> torch.Tensor:
    """MIND-SSC descriptors (Heinrich et al., MICCAI 2013) of a (D, H, W) volume: (12, D, H, W) in (0, 1].

    For each of the 12 point pairs of the six-neighbourhood (`dilation` voxels from the centre) the patch distance
    (squared difference averaged over a (2 radius + 1)^3 box) between the two points, minus the smallest of the 12,
    divided by their mean (the local variance estimate), through exp(-d). Every step compares the image with
    itself nearby, so a voxel's descriptor describes local structure whatever its contrast: T1 and T2 of one head
    give nearly the same descriptors, and the squared difference of descriptors is a smooth, contrast-independent
    dissimilarity."""
    shape = tuple(volume.shape)
    image = volume[None, None].float()
    padded = functional.pad(image, (dilation,) * 6, mode="replicate")
    distances = []
    for first, second in MIND_PAIRS:
        scaled = [tuple(dilation * value for value in offset) for offset in (first, second)]
        difference = _shifted(padded, scaled[0], dilation, shape) - _shifted(padded, scaled[1], dilation, shape)
        distances.append(difference**2)
    squared = torch.cat(distances, dim=1)
    patch = _box_mean(functional.pad(squared, (radius,) * 6, mode="replicate")[0], 2 * radius + 1)  # (12, D, H, W)
    patch = patch - patch.min(dim=0, keepdim=True).values
    variance = patch.mean(dim=0, keepdim=True)
    mean_variance = variance.mean()
    variance = variance.clamp(float(mean_variance) * 1e-3 + 1e-12, float(mean_variance) * 1e3 + 1e-12)
    return torch.exp(-patch / variance)


def diffusion(displacement: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared forward difference of a (3, D, H, W) displacement (voxels) along the three axes: the smoothness
    term the network was trained with. With `region` (D, H, W, weights in [0, 1]) the mean is taken over it, where
    the similarity is: a mask-restricted similarity against a whole-grid smoothness would loosen the regulariser
    inside the mask by the grid-to-mask volume ratio (measured on the demo's brain-masked pair: 0.57 % folding and
    SD log det J 1.16 after 50 steps)."""
    if region is None:
        return sum((displacement.diff(dim=axis) ** 2).mean() for axis in (1, 2, 3)) / 3.0
    total = displacement.new_zeros(())
    for axis in (1, 2, 3):
        length = displacement.shape[axis] - 1
        weights = region.narrow(axis - 1, 0, length)
        total = total + ((displacement.diff(dim=axis) ** 2).sum(dim=0) * weights).sum() / (
            3.0 * weights.sum().clamp_min(1e-6))
    return total / 3.0


def _dissimilarity(fixed_features: torch.Tensor, moving_features: torch.Tensor, displacement: torch.Tensor,
                   weight: torch.Tensor | None) -> torch.Tensor:
    per_voxel = ((warp(moving_features, displacement) - fixed_features) ** 2).mean(dim=0)
    if weight is None:
        return per_voxel.mean()
    return (per_voxel * weight).sum() / weight.sum().clamp_min(1e-6)


def _normalised_points(points: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(N, 3) voxel positions (z, y, x) on a grid of `shape` -> (1, N, 1, 1, 3) grid_sample coordinates (x, y, z,
    align_corners=True). These coordinates do not depend on the grid's size: the same tensor reads a coarser grid
    over the same extent at the same physical points."""
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], dtype=points.dtype, device=points.device)
    return (points * scale - 1.0).flip(-1).view(1, -1, 1, 1, 3)


def _sampled_dissimilarity(fixed_at_points: torch.Tensor, moving_features: torch.Tensor, correction: torch.Tensor,
                           points: torch.Tensor, weight_at_points: torch.Tensor | None) -> torch.Tensor:
    """_dissimilarity read at N points (voxel positions of the features' grid) only: the correction (3, d, h, w;
    voxels of its own, coarser grid over the same extent) is interpolated at the points and the moving descriptors
    at the points it moves them to. fixed_at_points: (C, N)."""
    shape = tuple(moving_features.shape[1:])
    coarse = tuple(correction.shape[1:])
    to_features = torch.tensor([max(n - 1, 1) / max(c - 1, 1) for n, c in zip(shape, coarse)],
                               dtype=correction.dtype, device=correction.device)
    moved = functional.grid_sample(correction[None], _normalised_points(points, shape), mode="bilinear",
                                   padding_mode="border", align_corners=True)[0, :, :, 0, 0].T * to_features
    moving_at = functional.grid_sample(moving_features[None], _normalised_points(points + moved, shape),
                                       mode="bilinear", padding_mode="border", align_corners=True)[0, :, :, 0, 0]
    per_point = ((moving_at - fixed_at_points) ** 2).mean(dim=0)
    if weight_at_points is None:
        return per_point.mean()
    return (per_point * weight_at_points).sum() / weight_at_points.sum().clamp_min(1e-6)


def _candidate_voxels(fixed: torch.Tensor, weight: torch.Tensor | None, threshold: float = 0.1) -> torch.Tensor:
    """Flat indices of the voxels a sampled similarity draws from: inside the weight (the fixed mask) when given,
    else the fixed image's foreground (normalised value above `threshold`, dilated by 2 voxels); the whole grid
    when that leaves almost nothing."""
    if weight is not None:
        inside = weight > 0
    else:
        inside = functional.max_pool3d((fixed > threshold).float()[None, None], 5, stride=1, padding=2)[0, 0] > 0
    indices = torch.nonzero(inside.flatten()).flatten()
    return indices if indices.numel() >= 1000 else torch.arange(inside.numel(), device=fixed.device)


def _coarse_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(max(2, (n + 1) // 2) for n in shape)


def from_coarse_grid(displacement: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A displacement (3, d, h, w; voxels of a coarser grid over the same extent, corner voxels aligned) as a
    displacement (3, *shape) in voxels of the full grid: trilinear, align_corners, as training's random_deformation
    upsamples its deformations."""
    coarse = tuple(displacement.shape[1:])
    to_full = torch.tensor([max(n - 1, 1) / max(c - 1, 1) for n, c in zip(shape, coarse)],
                           dtype=displacement.dtype, device=displacement.device).view(3, 1, 1, 1)
    return functional.interpolate(displacement[None], size=tuple(shape), mode="trilinear",
                                  align_corners=True)[0] * to_full


def from_half_resolution(displacement: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A displacement (3, d, h, w) on the grid of 2x2x2 block averages of a grid of `shape` (even sizes; voxels of the
    block grid) as a displacement (3, *shape) in voxels of the full grid. Block m's centre is full voxel 2m + 0.5,
    which is trilinear upsampling with align_corners=False, and one block voxel is exactly two full ones."""
    return functional.interpolate(displacement[None], size=tuple(shape), mode="trilinear", align_corners=False)[0] * 2.0


def compose(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """The displacement of x -> y + first(y) with y = x + then(x): `then` applied first (both (3, D, H, W), voxels).
    A refinement `then` of a map `first` that samples the moving image at x + first(x)."""
    return then + warp(first, then)


def instance_optimise(displacement: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, steps: int, lr: float,
                      smoothness: float, integration_steps: int, weight: torch.Tensor | None = None,
                      progress: Callable[[int], None] | None = None, resolution: str = "full",
                      sampling: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """The network's displacement (3, D, H, W; working-grid voxels) refined on this pair by `steps` Adam steps.

    The refinement is a diffeomorphic correction composed with the network's map: the fixed voxel x samples the
    moving image at y + u_net(y), y = x + c(x), where c is the flow (scaling and squaring, `integration_steps`) of a
    stationary correction velocity on a grid of half the working resolution, starting at zero. So the refined map
    starts exactly at the network's, stays a composition of two diffeomorphisms (it cannot fold beyond what
    interpolation does), keeps the network's full-resolution detail, and a step costs about a fifth of integrating a
    full-resolution velocity (grid_sample in 3D is slow on CPUs). Loss: mean squared difference between the MIND-SSC
    descriptors of the fixed image and of the moving image warped by the composed map (inside `weight` when given)
    + `smoothness` x diffusion(c) (c in working-grid voxels).

    Why MIND-SSC: the pair may differ in contrast (T1 vs T2), where local normalised cross-correlation fails (it
    assumes a locally linear intensity relation) and mutual information is neither local nor smooth enough for a
    dense field. MIND compares each image with itself, so its descriptors agree across contrasts; NGF (normalised
    gradient fields) would be the other choice, but it is undefined in flat regions and needs a noise threshold per
    image. fixed, moving: (D, H, W) normalised volumes on the working grid (moving already through the affine).

    resolution "half": the descriptors (computed on the working grid) and the weight are averaged over 2x2x2 blocks
    and the correction lives on that block grid, so a step warps 8x fewer descriptor voxels and upsamples nothing
    (even sizes needed: the working grid's are multiples of the network's). The diffusion term of a displacement
    in block voxels over block steps has about the value of the same motion in working-grid voxels and steps, so
    `smoothness` keeps its meaning.

    sampling < 1: each step reads the similarity at that share of the fixed foreground's voxels only (drawn anew each
    step from a generator seeded with `seed`, as ITK's sampled metrics do) and the correction there, without
    building it on the whole grid; the smoothness term is then taken on the correction's own grid (its value per
    step of that grid, in its voxels, about equals the full grid's). A step costs about the sampled share of a dense
    one while the similarity keeps the grid's detail."""
    shape = tuple(fixed.shape)
    if resolution not in INSTANCE_RESOLUTIONS:
        raise InputError(f"instance_resolution must be one of {', '.join(INSTANCE_RESOLUTIONS)}, not '{resolution}'.")
    if not 0.0 < sampling <= 1.0:
        raise InputError(f"instance_sampling must be above 0 and at most 1, not {sampling}.")
    half = resolution == "half"
    if half and any(n % 2 for n in shape):
        raise ValueError(f"A half-resolution refinement needs even grid sizes, not {shape}.")
    network_displacement = displacement.detach().float()
    with torch.no_grad():
        fixed_features = mind_ssc(fixed)
        moving_features = mind_ssc(warp(moving[None], network_displacement)[0])
        if half:
            fixed_features, moving_features = (functional.avg_pool3d(features[None], 2)[0]
                                               for features in (fixed_features, moving_features))
            if weight is not None:
                weight = functional.avg_pool3d(weight[None, None].float(), 2)[0, 0]
        per_voxel = ((moving_features - fixed_features) ** 2).mean(dim=0)  # before: no correction, no warp
        before = float(per_voxel.mean() if weight is None
                       else (per_voxel * weight).sum() / weight.sum().clamp_min(1e-6))
    coarse_shape = tuple(fixed_features.shape[1:]) if half else _coarse_shape(shape)
    parameter = torch.zeros((3, *coarse_shape), device=fixed.device, requires_grad=True)
    optimiser = torch.optim.Adam([parameter], lr=lr)

    def to_working_grid(flow: torch.Tensor) -> torch.Tensor:
        """The correction's flow (voxels of its grid) as a displacement on the working grid (its voxels)."""
        return from_half_resolution(flow, shape) if half else from_coarse_grid(flow, shape)

    sampled = sampling < 1.0
    if sampled:
        feature_shape = tuple(fixed_features.shape[1:])
        candidates = _candidate_voxels(functional.avg_pool3d(fixed[None, None], 2)[0, 0] if half else fixed, weight)
        count = min(candidates.numel(), max(MIN_SAMPLES, round(sampling * candidates.numel())))
        generator = torch.Generator().manual_seed(seed)
        flat_features = fixed_features.flatten(1)
        flat_weight = None if weight is None else weight.flatten()
        strides = torch.tensor([feature_shape[1] * feature_shape[2], feature_shape[2], 1], device=fixed.device)
        sizes = torch.tensor(feature_shape, device=fixed.device)

    def dissimilarity(flow: torch.Tensor) -> torch.Tensor:
        """Of the correction's flow: at a fresh draw of points (sampled) or over the grid (the flow upsampled first
        when the descriptors are on the working grid)."""
        if not sampled:
            return _dissimilarity(fixed_features, moving_features, flow if half else to_working_grid(flow), weight)
        chosen = candidates[torch.randint(candidates.numel(), (count,), generator=generator).to(fixed.device)]
        points = ((chosen[:, None] // strides) % sizes).float()
        return _sampled_dissimilarity(flat_features[:, chosen], moving_features, flow, points,
                                      None if flat_weight is None else flat_weight[chosen])

    def smoothness_term(flow: torch.Tensor) -> torch.Tensor:
        """Diffusion of the correction where it is built: its own grid when half or sampled (no upsampling); over the
        weight's region when there is one."""
        if half or sampled:
            return diffusion(flow, None if weight is None else region_on(flow))
        return diffusion(to_working_grid(flow), weight)

    def region_on(flow: torch.Tensor) -> torch.Tensor:
        """The weight on the flow's grid (block averages or trilinear, corners aligned)."""
        if tuple(flow.shape[1:]) == tuple(weight.shape):
            return weight
        return functional.interpolate(weight[None, None], size=tuple(flow.shape[1:]), mode="trilinear",
                                      align_corners=True)[0, 0]

    for step in range(steps):
        optimiser.zero_grad()
        flow = integrate_velocity(parameter, integration_steps)
        loss = dissimilarity(flow) + smoothness * smoothness_term(flow)
        loss.backward()
        optimiser.step()
        if progress is not None:
            progress(step + 1)
    with torch.no_grad():
        flow = integrate_velocity(parameter.detach(), integration_steps)
        after = float(dissimilarity(flow))  # sampled: on one more draw (a dense warp would cost a few steps)
        correction = to_working_grid(flow)
        refined = compose(network_displacement, correction)
        largest = float(correction.square().sum(dim=0).max().sqrt())  # norm(dim=0) took 0.1 s for this
    return refined, {"steps": steps, "lr": lr, "smoothness": smoothness, "similarity": "mind", "resolution": resolution,
                     "sampling": sampling,
                     "dissimilarity_before": round(before, 6), "dissimilarity_after": round(after, 6),
                     "largest_correction_voxels": round(largest, 3)}


# ---------------------------------------------------------------------------------------------------- pipeline


class DeformableRegistration:
    """Pipeline class for the engine's PIPELINES table: `register(fixed, moving, ...)` (see tasks.register_images)."""

    def __init__(self, model: Any, weight_paths: dict[str, Any], device: torch.device, options: dict[str, Any]):
        self.title = getattr(model, "title", "registration")
        network, self.working_spacing, self.integration_steps = load_network(weight_paths[WEIGHTS_ROLE], self.title)
        self.network = network.eval().to(device)
        self.device = device
        self.options = {**DEFAULT_OPTIONS, **options}
        orientation = str(self.options["orientation"])
        if orientation != KEEP_INPUT_AXES:
            try:
                geometry.orientation_axes(orientation)
            except ValueError as error:
                raise ModelError(f"Model '{self.title}': option orientation {error}") from error
        if self.options["affine_initialization"] not in affine_module.INITIALIZATIONS:
            raise InputError(f"affine_initialization must be one of {', '.join(affine_module.INITIALIZATIONS)}, not "
                             f"'{self.options['affine_initialization']}'.")
        if self.options["instance_resolution"] not in INSTANCE_RESOLUTIONS:
            raise InputError(f"instance_resolution must be one of {', '.join(INSTANCE_RESOLUTIONS)}, not "
                             f"'{self.options['instance_resolution']}'.")
        if self.options["similarity"] not in SIMILARITIES:
            raise InputError(f"The similarity '{self.options['similarity']}' is not one of {', '.join(SIMILARITIES)}.")
        try:
            steps = int(self.options["instance_steps"])
            sampling = float(self.options["instance_sampling"])
            learning_rate = float(self.options["instance_lr"])
            smoothness = float(self.options["instance_smoothness"])
        except (TypeError, ValueError) as error:
            raise InputError(f"The instance optimisation options must be numbers ({error}).") from error
        if steps < 0 or not learning_rate > 0 or smoothness < 0 or not 0 < sampling <= 1:
            raise InputError("instance_steps must be 0 or more, instance_lr above 0, instance_smoothness 0 or "
                             "more and instance_sampling above 0 and at most 1.")
        self.options.update(instance_steps=steps, instance_lr=learning_rate, instance_smoothness=smoothness,
                            instance_sampling=sampling,
                            deformable=bool(self.options["deformable"]))

    def to(self, device: torch.device) -> DeformableRegistration:
        self.network = self.network.to(device)
        self.device = device
        return self

    def working_grid(self, fixed: sitk.Image) -> sitk.Image:
        orientation = str(self.options["orientation"])
        return working_grid(fixed, self.working_spacing, None if orientation == KEEP_INPUT_AXES else orientation,
                            int(self.network.size_multiple))

    def _velocity(self, inputs: torch.Tensor) -> torch.Tensor:
        """The network's velocity (3, D, H, W), float32, for a (2, D, H, W) input, in one pass on self.device
        (reduced precision on a GPU, as training's bf16 autocast; float32 on the CPU, where bf16 is rarely faster)."""
        precision = None
        if self.device.type == "cuda":
            precision = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.no_grad(), torch.autocast(self.device.type, dtype=precision or torch.bfloat16,
                                             enabled=precision is not None):
            return self.network(inputs[None].to(self.device))[0].float()

    def register(self, fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None = None,
                 moving_mask: sitk.Image | None = None, progress: ProgressCallback = _no_progress) -> dict[str, Any]:
        """Register `moving` to `fixed`: {"field": float64 3-vector image on the fixed grid (LPS mm, affine
        included), "affine": sitk.AffineTransform (fixed -> moving point), "warnings": [...], "provenance": {...}}."""
        timings: dict[str, float] = {}
        warnings: list[str] = []
        mark = time.perf_counter()
        check_pair(fixed, moving, fixed_mask, moving_mask)
        timings["checks"] = time.perf_counter() - mark

        mark = time.perf_counter()
        progress("inference", 0.15, "Affine pre-alignment (mutual information)")
        # each image is blurred once for the working spacing: the affine's copies and the working grid share it
        smoothed = (geometry.anti_aliased(fixed, self.working_spacing),
                    geometry.anti_aliased(moving, self.working_spacing))
        aligned = prealign(fixed, moving, fixed_mask, moving_mask, self.working_spacing,
                           str(self.options["affine_initialization"]), smoothed)
        timings["affine"] = time.perf_counter() - mark
        if aligned.overlap < LOW_OVERLAP:
            warnings.append(f"After the affine pre-alignment the two foregrounds overlap only {aligned.overlap:.0%} "
                            "(Dice); check that both images show the same body part.")
            progress("inference", 0.3, f"Warning: {warnings[-1]}")
        provenance: dict[str, Any] = {
            "affine": {"metric": round(aligned.metric, 6), "overlap": round(aligned.overlap, 4),
                       "seconds": round(aligned.seconds, 3), "iterations": aligned.iterations,
                       "matrix": [round(value, 8) for value in aligned.transform.GetMatrix()],
                       "translation": [round(value, 6) for value in aligned.transform.GetTranslation()],
                       "center": [round(value, 6) for value in aligned.transform.GetCenter()]},
            "deformable": self.options["deformable"],
        }
        if not self.options["deformable"]:
            mark = time.perf_counter()
            field = total_field(aligned.transform, fixed)
            timings["field"] = time.perf_counter() - mark
            provenance["timings"] = {stage: round(seconds, 3) for stage, seconds in timings.items()}
            return {"field": field, "affine": aligned.transform, "warnings": warnings, "provenance": provenance}

        mark = time.perf_counter()
        progress("inference", 0.3, "Resampling both images onto the network's grid")
        grid = self.working_grid(fixed)
        fixed_grid = geometry.resample_linear(smoothed[0], grid)
        moving_grid = geometry.resample_linear(smoothed[1], grid, aligned.transform)
        fixed_values, _, _ = normalise(torch.from_numpy(sitk.GetArrayFromImage(fixed_grid)))
        moving_values, _, _ = normalise(torch.from_numpy(sitk.GetArrayFromImage(moving_grid)))
        timings["resample"] = time.perf_counter() - mark

        mark = time.perf_counter()
        progress("inference", 0.4, f"Network on a {'×'.join(str(n) for n in grid.GetSize())} grid")
        velocity = self._velocity(torch.stack([fixed_values, moving_values]))
        with torch.no_grad():
            displacement_t = integrate_velocity(velocity, self.integration_steps)
        timings["network"] = time.perf_counter() - mark
        provenance["working_grid"] = {"size": list(grid.GetSize()), "spacing_mm": self.working_spacing,
                                      "orientation": str(self.options["orientation"]),
                                      "integration_steps": self.integration_steps}

        steps = int(self.options["instance_steps"])
        if steps > 0:
            mark = time.perf_counter()
            weight = None
            if fixed_mask is not None:  # the similarity counts inside the fixed mask (a little dilated) only
                mask_grid = sitk.Resample(sitk.Cast(fixed_mask > 0, sitk.sitkFloat32), grid, sitk.Transform(),
                                          sitk.sitkLinear, 0.0, sitk.sitkFloat32)
                weight = functional.max_pool3d(torch.from_numpy(sitk.GetArrayFromImage(mask_grid))[None, None],
                                               5, stride=1, padding=2)[0, 0].to(self.device)

            def report(step: int) -> None:
                if step == steps or step % max(1, steps // 10) == 0:
                    progress("inference", 0.55 + 0.3 * step / steps, f"Instance optimisation: step {step}/{steps}")

            threads = torch.get_num_threads()
            if self.device.type == "cpu":
                torch.set_num_threads(min(threads, INSTANCE_CPU_THREADS))
            try:
                displacement_t, provenance["instance_optimisation"] = instance_optimise(
                    displacement_t, fixed_values.to(self.device), moving_values.to(self.device), steps,
                    float(self.options["instance_lr"]), float(self.options["instance_smoothness"]),
                    CORRECTION_INTEGRATION_STEPS, weight, report, str(self.options["instance_resolution"]),
                    float(self.options["instance_sampling"]))
            finally:
                torch.set_num_threads(threads)
            timings["instance_optimisation"] = time.perf_counter() - mark

        mark = time.perf_counter()
        progress("inference", 0.87, "Composing the field on the fixed grid")
        displacement = displacement_t.cpu().numpy()
        field = total_field(aligned.transform, fixed, displacement, grid)
        timings["field"] = time.perf_counter() - mark
        provenance["timings"] = {stage: round(seconds, 3) for stage, seconds in timings.items()}
        provenance["max_displacement_mm"] = round(float(np.linalg.norm(physical_displacement(displacement, grid),
                                                                      axis=-1).max()), 3)
        return {"field": field, "affine": aligned.transform, "warnings": warnings, "provenance": provenance}
