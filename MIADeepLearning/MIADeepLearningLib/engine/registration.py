"""Deformable registration of two head MRIs of any contrast with a SynthMorph-style network: the inference side of
training/train_registration.py.

The network was trained on pairs rendered from label maps with independent random contrasts on a 2 mm grid in the
label maps' array orientation, after only a small affine difference. So at inference:

1. both images are checked (3D, not a single slice, not constant);
2. an affine pre-alignment (engine/affine.py, Mattes mutual information, contrast-independent) takes the moving
   head onto the fixed one;
3. a working grid of the network's spacing covers the FIXED image's extent in the training orientation ("LIA",
   obliquity kept), one voxel wider on every side and padded to the network's size multiple, then cut to the fixed
   image's head (option crop_to_head, see head_box: the network was trained on crops that the head fills); the fixed
   image is resampled onto it (anti-aliased) and the moving image through the affine (same single interpolation),
   each normalised as in training (minimum -> 0, 99.5th percentile -> 1);
4. the network predicts a stationary velocity field in working-grid voxels, integrated by scaling and squaring into
   a displacement u (the fixed voxel x samples the affinely resampled moving image at x + u(x)); optionally a few
   Adam steps refine that map on this very pair with a contrast-independent similarity (instance optimisation: a
   diffeomorphic correction composed with the network's flow, see `instance_optimise`);
5. u is converted to LPS millimetres, interpolated linearly onto the fixed grid (beyond a cropped grid: the
   displacement at its nearest voxel) and composed with the affine: v(p) = A(p + u(p)) - p, one displacement field
   on the fixed grid in the convention of engine/displacement.py (a resampling transform that Slicer, ITK and ANTs
   read as is).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as functional

from MIADeepLearningLib.engine import affine as affine_module
from MIADeepLearningLib.engine import cpu_runtime, geometry
from MIADeepLearningLib.engine.crop import box_volume_share, crop_option, describe_box, foreground_box
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
    "instance_lr": 0.4,  # Adam step of the correction velocity, in voxels of a half-resolution (2-voxel) grid
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
    # the working grid cut to the fixed image's head (plus CROP_MARGIN_MM): the network, the refinement and the field
    # work on the head's box only; beyond it the deformable displacement is that at the nearest box voxel
    "crop_to_head": True,
}
# Margin of the head's box (mm): wider than MIND's reach (3 voxels) and the foreground's block size (8 mm), so the
# field is already smooth in the air where the crop's nearest extension begins. Unlike the segmenters' crops
# (crop.unet_reach) it is not meant to reproduce the whole grid's answer: the network saw training crops that the head
# fills, and InstanceNorm statistics over a grid half air are not those. Measured on the benchmark's six pairs padded
# with air to 256 mm (network + 50 steps): Dice 0.550 whole grid -> 0.574 head box, max % det J <= 0 0.10 -> 0.0007,
# SDlogJ 0.570 -> 0.400, 27.5 -> 19.7 CPU s (unpadded, the head fills the grid: no crop, same answer).
CROP_MARGIN_MM = 12.0
MARGIN_VOXELS = 1  # working-grid voxels added on every side, so every fixed voxel centre lies inside its centres
LOW_OVERLAP = 0.5  # warn when the foregrounds' Dice after the affine is below this
# MIND-SSC: patch radius and the distance (voxels) of the six-neighbourhood whose 12 pairs are compared
MIND_RADIUS = 1
MIND_DILATION = 2
# Scaling-and-squaring steps of the instance optimisation's correction: it is small and on a coarse grid, so 2**5
# pieces keep each below a voxel; fewer than the network's 7 because every step integrates it again (measured: 15
# sampled steps 5.3 -> 4.8 CPU s on a 96x128x96 grid). 3 steps were measured too (issue 17): same Dice, a little
# more folding.
CORRECTION_INTEGRATION_STEPS = 5
# Working-grid voxels per step of the sampled refinement's correction grid (6 mm on the 2 mm grid). Every Adam step
# integrates the correction and differentiates through that (3D grid_sample forward and backward: most of the
# refinement's time), so its voxel count sets the cost; the correction is smooth (diffusion-regularised) and the
# network's own map keeps the fine detail. Measured on the benchmark's six pairs (Testing/Benchmarks/registration.py,
# network + 50 steps, instance_lr 0.4 meaning the same physical step, see instance_optimise), 2 -> 3: Dice 0.618 ->
# 0.619, max % det J <= 0 0.0009 -> 0.0000, SDlogJ 0.394 -> 0.370; on six other renders of the same maps (--seed 7)
# 0.541 -> 0.548, 0.0014 -> 0.0006, 0.404 -> 0.385; refinement CPU time about a third. A grid must keep
# MIN_CORRECTION_NODES along every axis, else it stays at 2: the benchmark's heads have 30-45 nodes at 3; on the tests'
# half-size phantom (a 48-voxel grid, 16 nodes at 3) the coarser correction lost Dice (T2-like pair, 20 steps:
# 0.729 -> 0.701).
CORRECTION_SPACING = 3
MIN_CORRECTION_NODES = 24
MIN_SAMPLES = 2000  # a sampled similarity reads at least this many points per step (all candidates when fewer)
# CPU threads of the instance optimisation's steps (its descriptors, computed once on the whole grid, take every
# thread). A step's tensors are small (a correction grid of ~50^3 voxels, a few thousand sampled points), so a
# second thread mostly waits: on two benchmark pairs with 20 steps on 2 cores, 2 threads took 6.8-7.9 CPU s and
# 4.0-5.1 s of wall for this stage, 1 thread 4.4-4.7 CPU s and 4.4-4.7 s of wall (same Dice). The affine (ITK) and
# the network (large convolutions) keep every thread. Still so with flow.sample spreading grid_sample over threads
# (issue 17): on 2 cores shared with other jobs, 2 threads took 50 s of wall for what 1 thread did in 13 s (each
# parallel step waits for the busier core).
INSTANCE_CPU_THREADS = 1


def _no_progress(stage: str, fraction: float, message: str) -> None:
    """Default progress sink."""


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """At most `count` torch CPU threads inside the block; the process's count is restored afterwards, also on an
    error."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, count))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


def head_box(fixed_values: np.ndarray, spacing_mm: float, multiple: int, mask: np.ndarray | None = None,
             margin_mm: float = CROP_MARGIN_MM) -> tuple[slice, ...] | None:
    """Array slices (z, y, x) of the working grid around the fixed image's head (crop.foreground_box: every
    foreground block kept, `margin_mm` wider, each size a multiple of `multiple`), or None when the head fills the
    grid (nothing to gain) or a fixed mask reaches beyond the box (its similarity region must stay whole). Why: a
    1 mm 256 mm field of view is often half air, and the network, the refinement and the field cost per voxel."""
    box = foreground_box(fixed_values, max(1, round(margin_mm / spacing_mm)), multiple)
    if box is None or mask is None:
        return box
    outside = np.asarray(mask, dtype=bool).copy()
    outside[box] = False
    return None if outside.any() else box


def cropped_grid(grid: sitk.Image, box: tuple[slice, ...]) -> sitk.Image:
    """The part of `grid` that `box` (array slices z, y, x) selects, as an empty image of its geometry."""
    start = [int(box[2].start), int(box[1].start), int(box[0].start)]  # (i, j, k)
    result = sitk.Image([int(box[2].stop - box[2].start), int(box[1].stop - box[1].start),
                         int(box[0].stop - box[0].start)], sitk.sitkUInt8)
    result.SetSpacing(grid.GetSpacing())
    result.SetDirection(grid.GetDirection())
    result.SetOrigin(grid.TransformIndexToPhysicalPoint(start))
    return result


def crop_provenance(box: tuple[slice, ...] | None, grid: sitk.Image) -> dict[str, Any] | None:
    """What the crop kept of the working grid (index start and size in (i, j, k), share of its voxels), or None."""
    if box is None:
        return None
    shape = tuple(reversed(grid.GetSize()))
    return {"start": [int(box[axis].start) for axis in (2, 1, 0)],
            "size": [int(box[axis].stop - box[axis].start) for axis in (2, 1, 0)],
            "voxel_share": round(box_volume_share(box, shape), 4), "margin_mm": CROP_MARGIN_MM,
            "outside": "the working-grid displacement at the nearest box voxel (nearest extension)",
            "description": describe_box(box, shape)}


def physical_displacement(displacement: np.ndarray, grid: sitk.Image, linear: np.ndarray | None = None
                          ) -> np.ndarray:
    """(3, D, H, W) displacement in voxels of `grid`, channels in array-axis order (z, y, x) -> (D, H, W, 3) LPS mm.

    u_phys = direction · diag(spacing) · u_index, with the index order (i, j, k) = the reversed array axes; with
    `linear` (3 x 3), that matrix times u_phys (one pass: total_field's affine matrix)."""
    values = np.asarray(displacement, dtype=np.float64)
    if values.shape != (3, *reversed(grid.GetSize())):
        raise ValueError(f"A displacement of shape {values.shape} does not fit a grid of size {grid.GetSize()}.")
    matrix = np.asarray(grid.GetDirection(), dtype=float).reshape(3, 3) @ np.diag(grid.GetSpacing())
    if linear is not None:
        matrix = np.asarray(linear, dtype=float) @ matrix
    result = np.empty((*values.shape[1:], 3))
    for row in range(3):  # index axis c is array channel 2 - c
        result[..., row] = matrix[row, 0] * values[2] + matrix[row, 1] * values[1] + matrix[row, 2] * values[0]
    return result


def _add_affine_ramp(values: np.ndarray, grid: sitk.Image, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """values (D, H, W, 3) + (matrix - I) p + offset at every voxel centre p of `grid`, in place: p is linear in the
    index, so three broadcast ramps, no grid of points."""
    change = matrix - np.eye(3)
    steps = change @ np.asarray(grid.GetDirection(), dtype=float).reshape(3, 3) @ np.diag(grid.GetSpacing())
    size_x, size_y, size_z = grid.GetSize()
    values += change @ np.asarray(grid.GetOrigin(), dtype=float) + offset
    values += np.arange(size_x, dtype=float)[None, None, :, None] * steps[:, 0]
    values += np.arange(size_y, dtype=float)[None, :, None, None] * steps[:, 1]
    values += np.arange(size_z, dtype=float)[:, None, None, None] * steps[:, 2]
    return values


def _covering(values: np.ndarray, grid: sitk.Image, fixed: sitk.Image) -> tuple[np.ndarray, sitk.Image]:
    """`values` (D, H, W, C) on `grid`, extended by repeating its border voxels (nearest extension) to a grid of the
    same spacing and axes whose voxel centres enclose every fixed voxel centre; unchanged when `grid` already does.
    Why: a working grid cropped to the head still has to give a field at every fixed voxel, continuous at the crop's
    edge, and interpolation onto the fixed grid then never reads outside its source."""
    size = np.asarray(grid.GetSize())
    corners = np.array(np.meshgrid(*[[0, 1]] * 3, indexing="ij")).reshape(3, -1).T * (np.asarray(fixed.GetSize()) - 1)
    index = np.array([grid.TransformPhysicalPointToContinuousIndex(
        fixed.TransformContinuousIndexToPhysicalPoint([float(v) for v in corner])) for corner in corners])
    before = np.maximum(0, np.ceil(-index.min(axis=0) - 1e-6)).astype(int)  # (i, j, k)
    after = np.maximum(0, np.ceil(index.max(axis=0) - (size - 1) - 1e-6)).astype(int)
    if not before.any() and not after.any():
        return values, grid
    padding = [(int(before[2 - axis]), int(after[2 - axis])) for axis in range(3)] + [(0, 0)]
    covering = sitk.Image([int(n) for n in size + before + after], sitk.sitkUInt8)
    covering.SetSpacing(grid.GetSpacing())
    covering.SetDirection(grid.GetDirection())
    covering.SetOrigin(grid.TransformContinuousIndexToPhysicalPoint([-float(n) for n in before]))
    return np.pad(values, padding, mode="edge"), covering


def _axis_map(grid: sitk.Image, fixed: sitk.Image) -> tuple[list[int], np.ndarray, np.ndarray] | None:
    """When every fixed index axis runs along one axis of `grid` (the working grid is the fixed grid's axes permuted
    and flipped: geometry.isotropic_grid keeps obliquity): per fixed index axis c, that grid index axis r[c], and
    scale, offset with grid index = scale[c] * fixed index + offset[c]; else None."""
    to_grid = np.linalg.inv(np.asarray(grid.GetDirection(), dtype=float).reshape(3, 3) @ np.diag(grid.GetSpacing()))
    matrix = to_grid @ np.asarray(fixed.GetDirection(), dtype=float).reshape(3, 3) @ np.diag(fixed.GetSpacing())
    offset = to_grid @ (np.asarray(fixed.GetOrigin(), dtype=float) - np.asarray(grid.GetOrigin(), dtype=float))
    axes = [int(np.argmax(np.abs(matrix[:, c]))) for c in range(3)]
    if sorted(axes) != [0, 1, 2]:
        return None
    scale = np.array([matrix[axes[c], c] for c in range(3)])
    rest = matrix.copy()
    rest[axes, [0, 1, 2]] = 0.0
    if np.abs(rest).max() > 1e-9 * np.abs(scale).max():
        return None
    return axes, scale, np.array([offset[axes[c]] for c in range(3)])


def _linear_along(values: torch.Tensor, axis: int, positions: np.ndarray) -> torch.Tensor:
    """Linear interpolation of `values` along one axis at continuous `positions` (clamped to its range)."""
    length = values.shape[axis]
    where = torch.from_numpy(np.clip(positions, 0.0, length - 1.0))
    low = where.floor().long().clamp(max=max(length - 2, 0))
    high = (low + 1).clamp(max=length - 1)
    shape = [1] * values.dim()
    shape[axis] = -1
    weight = (where - low).to(values.dtype).view(shape)
    return torch.lerp(values.index_select(axis, low), values.index_select(axis, high), weight)


def _onto_fixed(values: np.ndarray, grid: sitk.Image, fixed: sitk.Image) -> np.ndarray:
    """(D, H, W, C) values on `grid` (which encloses the fixed voxel centres) interpolated linearly onto the fixed
    grid: (z, y, x, C) float64. Axis by axis when the grids' axes are parallel (what register gives): each source
    plane is interpolated in (y, x) once, and every fixed slice is one blend of two such planes written in place —
    no temporary as large as the result (measured 0.5 s instead of SimpleITK's 3D vector resampling's 5 s for a
    1 mm 256³ head on 2 cores); SimpleITK's linear resampling otherwise."""
    mapping = _axis_map(grid, fixed)
    if mapping is None:
        image = sitk.GetImageFromArray(values, isVector=True)
        image.CopyInformation(grid)
        return sitk.GetArrayFromImage(sitk.Resample(image, fixed, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                    sitk.sitkVectorFloat64, True))
    with torch_threads(1):  # memory-bound blends: a second thread gains little, and on a busy CPU waits a lot
        return _onto_parallel_grid(values, mapping, fixed)


def _onto_parallel_grid(values: np.ndarray, mapping: tuple[list[int], np.ndarray, np.ndarray], fixed: sitk.Image
                        ) -> np.ndarray:
    """_onto_fixed for a grid whose axes run along the fixed grid's (mapping: _axis_map)."""
    axes, scale, offset = mapping
    # array axis m of the result is fixed index axis 2 - m; bring the source's matching axes into that order
    source = torch.from_numpy(np.asarray(values, dtype=np.float64)).permute(*[2 - axes[2 - m] for m in range(3)], 3)
    size = fixed.GetSize()
    along = [scale[2 - m] * np.arange(size[2 - m], dtype=float) + offset[2 - m] for m in range(3)]
    planes: dict[int, torch.Tensor] = {}

    def plane(index: int) -> torch.Tensor:
        """Source plane `index` (first axis) interpolated onto the fixed (y, x) positions; the last few kept."""
        if index not in planes:
            if len(planes) > 3:  # the fixed slices walk the source planes in order: the oldest is done
                del planes[next(iter(planes))]
            planes[index] = _linear_along(_linear_along(source[index], 1, along[2]), 0, along[1]).contiguous()
        return planes[index]

    length = source.shape[0]
    where = np.clip(along[0], 0.0, length - 1.0)
    low = np.minimum(np.floor(where).astype(int), max(length - 2, 0))
    result = torch.empty((size[2], size[1], size[0], source.shape[3]), dtype=torch.float64)
    for z in range(size[2]):
        high = min(int(low[z]) + 1, length - 1)
        torch.lerp(plane(int(low[z])), plane(high), float(where[z] - low[z]), out=result[z])
    return result.numpy()


def field_on_fixed(displacement: np.ndarray, grid: sitk.Image, fixed: sitk.Image) -> np.ndarray:
    """The working grid's voxel displacement as LPS mm vectors, interpolated linearly onto the fixed grid (nearest
    extension beyond the grid's voxel centres): (z, y, x, 3) float64 in SimpleITK's array order (what
    displacement.field_image takes)."""
    return _onto_fixed(*_covering(physical_displacement(displacement, grid), grid, fixed), fixed)


def total_field(affine: sitk.Transform, fixed: sitk.Image, displacement: np.ndarray | None = None,
                grid: sitk.Image | None = None) -> sitk.Image:
    """One field on the fixed grid for "affine, then the network's displacement on the affinely resampled moving
    image": v(p) = A(p + u(p)) - p (affine.compose_with_field); without a displacement, the affine alone.

    With a displacement, v = M u(p) + (M - I) p + t is formed on the working grid (extended to enclose the fixed
    grid, u by nearest extension beyond it: a grid cropped to the head) and interpolated onto the fixed grid once:
    linear interpolation reproduces the affine part exactly, so no pass over the fixed grid's millions of vectors
    is needed for it."""
    if displacement is None:
        return affine_module.compose_with_field(affine, fixed)
    if grid is None:
        raise ValueError("A working-grid displacement needs its grid.")
    matrix, offset = affine_module.matrix_offset(affine)
    values, covering = _covering(physical_displacement(displacement, grid, matrix), grid, fixed)
    _add_affine_ramp(values, covering, matrix, offset)
    result = sitk.GetImageFromArray(_onto_fixed(values, covering, fixed), isVector=True)
    result.CopyInformation(fixed)
    return result


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
    if width == 1:
        return volume / 1.0
    for axis in (1, 2, 3):
        length = volume.shape[axis] - width + 1
        total = volume.narrow(axis, 0, length) + volume.narrow(axis, 1, length)
        for shift in range(2, width):
            total += volume.narrow(axis, shift, length)  # in place on the new sum: same order, one buffer
        volume = total
    return volume.div_(float(width**3))


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
    # written into one buffer and then in place: the same numbers as the plain expressions, without a dozen
    # temporaries the size of the 12 channels (this runs on a million voxels or more, twice per registration)
    squared = image.new_empty((1, len(MIND_PAIRS), *shape))
    for channel, (first, second) in enumerate(MIND_PAIRS):
        scaled = [tuple(dilation * value for value in offset) for offset in (first, second)]
        torch.sub(_shifted(padded, scaled[0], dilation, shape)[0, 0],
                  _shifted(padded, scaled[1], dilation, shape)[0, 0], out=squared[0, channel])
    squared.square_()
    patch = _box_mean(functional.pad(squared, (radius,) * 6, mode="replicate")[0], 2 * radius + 1)  # (12, D, H, W)
    patch.sub_(patch.min(dim=0, keepdim=True).values)
    variance = patch.mean(dim=0, keepdim=True)
    mean_variance = variance.mean()
    variance = variance.clamp(float(mean_variance) * 1e-3 + 1e-12, float(mean_variance) * 1e3 + 1e-12)
    return patch.div_(variance).neg_().exp_()


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


def channels_last(features: torch.Tensor) -> torch.Tensor:
    """(C, D, H, W) -> (D·H·W, C), contiguous: a voxel's C values side by side, so reading one point's descriptors
    is one short row instead of C reads far apart (what makes sampling 12 MIND channels at scattered points slow)."""
    return features.flatten(1).T.contiguous()


def _trilinear_rows(table: torch.Tensor, shape: tuple[int, ...], points: torch.Tensor) -> torch.Tensor:
    """Rows of a channels-last table (D·H·W, C) of a grid of `shape`, trilinearly interpolated at (N, 3) voxel
    positions (z, y, x; clamped to the grid as grid_sample's border padding): (N, C), differentiable in the points.
    The same numbers as grid_sample (align_corners=True) on the (C, D, H, W) volume, at a fraction of its cost for
    scattered points and many channels."""
    limits = torch.tensor([n - 1 for n in shape], dtype=points.dtype, device=points.device)
    where = torch.minimum(points.clamp_min(0.0), limits)
    low = torch.minimum(where.detach().floor(), (limits - 1).clamp_min(0.0))
    fraction = where - low  # (N, 3), carries the gradient
    index = low.long()
    strides = (shape[1] * shape[2], shape[2], 1)
    base = index[:, 0] * strides[0] + index[:, 1] * strides[1] + index[:, 2]
    steps = [[(0, 1.0 - fraction[:, axis])] + ([(strides[axis], fraction[:, axis])] if shape[axis] > 1 else [])
             for axis in range(3)]
    result = None
    for offset_z, weight_z in steps[0]:
        for offset_y, weight_y in steps[1]:
            weight_zy = weight_z * weight_y
            for offset_x, weight_x in steps[2]:
                term = table.index_select(0, base + (offset_z + offset_y + offset_x)) * (weight_zy * weight_x)[:, None]
                result = term if result is None else result + term
    return result


def _sampled_dissimilarity(fixed_at_points: torch.Tensor, moving_features: torch.Tensor, correction: torch.Tensor,
                           points: torch.Tensor, weight_at_points: torch.Tensor | None,
                           moving_table: torch.Tensor | None = None) -> torch.Tensor:
    """_dissimilarity read at N points (voxel positions of the features' grid) only: the correction (3, d, h, w;
    voxels of its own, coarser grid over the same extent) is interpolated at the points and the moving descriptors
    at the points it moves them to. fixed_at_points: (C, N); moving_table: channels_last(moving_features) when the
    caller keeps it (instance_optimise builds it once, not every step)."""
    shape = tuple(moving_features.shape[1:])
    coarse = tuple(correction.shape[1:])
    to_features = torch.tensor([max(n - 1, 1) / max(c - 1, 1) for n, c in zip(shape, coarse)],
                               dtype=correction.dtype, device=correction.device)
    moved = functional.grid_sample(correction[None], _normalised_points(points, shape), mode="bilinear",
                                   padding_mode="border", align_corners=True)[0, :, :, 0, 0].T * to_features
    table = channels_last(moving_features) if moving_table is None else moving_table
    moving_at = _trilinear_rows(table, shape, points + moved).T  # (C, N)
    per_point = ((moving_at - fixed_at_points) ** 2).mean(dim=0)
    if weight_at_points is None:
        return per_point.mean()
    return (per_point * weight_at_points).sum() / weight_at_points.sum().clamp_min(1e-6)


def box_max(volume: torch.Tensor, width: int = 5) -> torch.Tensor:
    """Maximum over width³ boxes centred on each voxel of a (D, H, W) volume (odd width, same size out): max_pool3d
    with stride 1 and padding width // 2, taken axis by axis — the same numbers, measured 0.25 s -> 0.03 s on a
    1.6 M voxel grid (a 3D window reads width³ values per voxel, three 1D windows 3·width)."""
    result = volume[None, None].float()
    for kernel in ((width, 1, 1), (1, width, 1), (1, 1, width)):
        result = functional.max_pool3d(result, kernel, stride=1, padding=tuple(n // 2 for n in kernel))
    return result[0, 0]


def _candidate_voxels(fixed: torch.Tensor, weight: torch.Tensor | None, threshold: float = 0.1) -> torch.Tensor:
    """Flat indices of the voxels a sampled similarity draws from: inside the weight (the fixed mask) when given,
    else the fixed image's foreground (normalised value above `threshold`, dilated by 2 voxels); the whole grid
    when that leaves almost nothing."""
    if weight is not None:
        inside = weight > 0
    else:
        inside = box_max((fixed > threshold).float()) > 0
    indices = torch.nonzero(inside.flatten()).flatten()
    return indices if indices.numel() >= 1000 else torch.arange(inside.numel(), device=fixed.device)


def _coarse_shape(shape: tuple[int, ...], factor: int | None = None) -> tuple[int, ...]:
    """The correction's grid over the same extent (corners aligned): about `factor` (CORRECTION_SPACING) working
    voxels per step."""
    factor = CORRECTION_SPACING if factor is None else factor
    return tuple(max(2, -(-n // factor)) for n in shape)


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


class _Adam:
    """torch.optim.Adam's update (its defaults: betas 0.9 / 0.999, eps 1e-8, no weight decay; the same operations in
    the same order as its single-tensor CPU path) for one tensor. Why not torch.optim.Adam itself: its first use
    imports torch._dynamo, measured 3 s of a 1 mm registration's start on 2 CPU cores."""

    def __init__(self, parameter: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.parameter, self.lr, self.betas, self.eps = parameter, lr, betas, eps
        self.average = torch.zeros_like(parameter)
        self.squares = torch.zeros_like(parameter)
        self.count = 0

    @torch.no_grad()
    def step(self) -> None:
        gradient = self.parameter.grad
        beta1, beta2 = self.betas
        self.count += 1
        self.average.lerp_(gradient, 1 - beta1)
        self.squares.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        step_size = self.lr / (1 - beta1 ** float(self.count))
        denominator = (self.squares.sqrt() / (1 - beta2 ** float(self.count)) ** 0.5).add_(self.eps)
        self.parameter.addcdiv_(self.average, denominator, value=-step_size)


def instance_optimise(displacement: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, steps: int, lr: float,
                      smoothness: float, integration_steps: int, weight: torch.Tensor | None = None,
                      progress: Callable[[int], None] | None = None, resolution: str = "full",
                      sampling: float = 1.0, seed: int = 0, loop_threads: int | None = None
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The network's displacement (3, D, H, W; working-grid voxels) refined on this pair by `steps` Adam steps
    (on at most `loop_threads` torch threads; the descriptors before them and the composition after on all).

    The refinement is a diffeomorphic correction composed with the network's map: the fixed voxel x samples the
    moving image at y + u_net(y), y = x + c(x), where c is the flow (scaling and squaring, `integration_steps`) of a
    stationary correction velocity on a coarser grid (CORRECTION_SPACING working voxels when sampled, else half the
    working resolution), starting at zero. So the refined map starts exactly at the network's, stays a composition
    of two diffeomorphisms (it cannot fold beyond what interpolation does), keeps the network's full-resolution
    detail, and a step costs a small share of integrating a full-resolution velocity (grid_sample in 3D is slow on
    CPUs). `lr` is the Adam step in voxels of a half-resolution grid, whatever the correction's grid. Loss: mean
    squared difference between the MIND-SSC descriptors of the fixed image and of the moving image warped by the
    composed map (inside `weight` when given) + `smoothness` x diffusion(c) (c in working-grid voxels).

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
    sampled = sampling < 1.0
    # the correction's grid: the descriptors' blocks (half), CORRECTION_SPACING working voxels (sampled: only its
    # values at the points are read) while that leaves MIN_CORRECTION_NODES along every axis, else half the working
    # resolution (dense: upsampled to the grid every step)
    factor = 2
    if sampled and not half and min(_coarse_shape(shape, CORRECTION_SPACING)) >= MIN_CORRECTION_NODES:
        factor = CORRECTION_SPACING
    coarse_shape = tuple(fixed_features.shape[1:]) if half else _coarse_shape(shape, factor)
    parameter = torch.zeros((3, *coarse_shape), device=fixed.device, requires_grad=True)
    # lr is a step in voxels of a half-resolution grid (2 working voxels) whatever the correction's grid: the same
    # physical step on a coarser one
    optimiser = _Adam(parameter, lr * 2.0 / factor)

    def to_working_grid(flow: torch.Tensor) -> torch.Tensor:
        """The correction's flow (voxels of its grid) as a displacement on the working grid (its voxels)."""
        return from_half_resolution(flow, shape) if half else from_coarse_grid(flow, shape)

    if sampled:
        feature_shape = tuple(fixed_features.shape[1:])
        candidates = _candidate_voxels(functional.avg_pool3d(fixed[None, None], 2)[0, 0] if half else fixed, weight)
        count = min(candidates.numel(), max(MIN_SAMPLES, round(sampling * candidates.numel())))
        generator = torch.Generator().manual_seed(seed)
        fixed_table, moving_table = channels_last(fixed_features), channels_last(moving_features)
        flat_weight = None if weight is None else weight.flatten()
        strides = torch.tensor([feature_shape[1] * feature_shape[2], feature_shape[2], 1], device=fixed.device)
        sizes = torch.tensor(feature_shape, device=fixed.device)

    def dissimilarity(flow: torch.Tensor) -> torch.Tensor:
        """Of the correction's flow: at a fresh draw of points (sampled) or over the grid (the flow upsampled first
        when the descriptors are on the working grid)."""
        if not sampled:
            return _dissimilarity(fixed_features, moving_features, flow if half else to_working_grid(flow), weight)
        # in memory order: reading the descriptors around sorted points walks the tables forwards instead of jumping
        chosen = candidates[torch.randint(candidates.numel(), (count,), generator=generator).to(fixed.device)].sort()[0]
        points = ((chosen[:, None] // strides) % sizes).float()
        return _sampled_dissimilarity(fixed_table.index_select(0, chosen).T, moving_features, flow, points,
                                      None if flat_weight is None else flat_weight[chosen], moving_table)

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

    with torch_threads(loop_threads or torch.get_num_threads()):
        for step in range(steps):
            parameter.grad = None
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
                     "sampling": sampling, "correction_grid": [int(n) for n in reversed(coarse_shape)],
                     "integration_steps": integration_steps,
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
                            instance_sampling=sampling, deformable=bool(self.options["deformable"]),
                            crop_to_head=crop_option(self.options, self.title))

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
        call = self.network if self.device.type == "cuda" else cpu_runtime.runner(self.network, self.device,
                                                                                     "intensities")
        with torch.no_grad(), torch.autocast(self.device.type, dtype=precision or torch.bfloat16,
                                             enabled=precision is not None):
            velocity = call(inputs[None].to(self.device))[0].float()
        self.network_runtime = getattr(call, "note", f"PyTorch on {self.device.type.upper()}")
        return velocity

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
        full_grid = self.working_grid(fixed)
        fixed_array = sitk.GetArrayFromImage(geometry.resample_linear(smoothed[0], full_grid))
        mask_array = None
        if fixed_mask is not None:  # the similarity counts inside the fixed mask (a little dilated) only
            mask_array = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(fixed_mask > 0, sitk.sitkFloat32), full_grid,
                                                              sitk.Transform(), sitk.sitkLinear, 0.0,
                                                              sitk.sitkFloat32))
        box = None
        if self.options["crop_to_head"]:
            box = head_box(fixed_array, self.working_spacing, int(self.network.size_multiple), mask_array)
        grid = full_grid if box is None else cropped_grid(full_grid, box)
        if box is not None:
            fixed_array = np.ascontiguousarray(fixed_array[box])
            mask_array = None if mask_array is None else np.ascontiguousarray(mask_array[box])
        moving_grid = geometry.resample_linear(smoothed[1], grid, aligned.transform)
        fixed_values, _, _ = normalise(torch.from_numpy(fixed_array))
        moving_values, _, _ = normalise(torch.from_numpy(sitk.GetArrayFromImage(moving_grid)))
        timings["resample"] = time.perf_counter() - mark

        mark = time.perf_counter()
        progress("inference", 0.4, f"Network on a {'×'.join(str(n) for n in grid.GetSize())} grid")
        velocity = self._velocity(torch.stack([fixed_values, moving_values]))
        with torch.no_grad():
            displacement_t = integrate_velocity(velocity, self.integration_steps)
        timings["network"] = time.perf_counter() - mark
        provenance["network_runtime"] = self.network_runtime  # PyTorch or OpenVINO, and why (cpu_runtime.py)
        provenance["working_grid"] = {"size": list(full_grid.GetSize()), "spacing_mm": self.working_spacing,
                                      "orientation": str(self.options["orientation"]),
                                      "integration_steps": self.integration_steps,
                                      "crop": crop_provenance(box, full_grid)}

        steps = int(self.options["instance_steps"])
        if steps > 0:
            mark = time.perf_counter()
            weight = None
            if mask_array is not None:
                weight = box_max(torch.from_numpy(mask_array)).to(self.device)

            def report(step: int) -> None:
                if step == steps or step % max(1, steps // 10) == 0:
                    progress("inference", 0.55 + 0.3 * step / steps, f"Instance optimisation: step {step}/{steps}")

            displacement_t, provenance["instance_optimisation"] = instance_optimise(
                displacement_t, fixed_values.to(self.device), moving_values.to(self.device), steps,
                float(self.options["instance_lr"]), float(self.options["instance_smoothness"]),
                CORRECTION_INTEGRATION_STEPS, weight, report, str(self.options["instance_resolution"]),
                float(self.options["instance_sampling"]),
                loop_threads=INSTANCE_CPU_THREADS if self.device.type == "cpu" else None)
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
