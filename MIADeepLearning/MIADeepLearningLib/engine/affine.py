"""Affine pre-alignment before a deformable registration network, and its composition with the network's field.

Learned deformable registration assumes the two heads are already roughly aligned; across subjects and contrasts
(T1 fixed, T2 moving) they are not. `affine_prealign` supplies that alignment in a second or two on the CPU:

- initialisation from the centres of mass of the two FOREGROUNDS (binary masks, not intensities), so a contrast
  change that makes different tissues bright cannot pull the centre;
- a light multi-resolution rigid, then affine registration with Mattes mutual information (contrast-independent)
  on shrunk, smoothed images, with a fixed sampling seed so two runs give the same transform (to ~1e-6 mm:
  ITK's threaded sums may round differently).

The result follows the conventions of `engine/displacement.py`: a resampling transform that takes a FIXED point to
the MOVING point it samples, in LPS millimetres. `compose_with_field` turns "affine, then the network's field on the
affinely resampled moving image" into one displacement field on the fixed grid, so a single grid transform can be
exported.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from MIADeepLearningLib.engine.displacement import field_array, field_image
from MIADeepLearningLib.engine.errors import InputError

NO_OVERLAP = "The two images do not overlap: no overlap after affine alignment."
FOREGROUND_FRACTION = 0.1  # foreground: above min + this share of (99.5th percentile - min)
INITIALIZATIONS = ("moments", "none")
LevelPlan = Sequence[tuple[int, float]]  # (shrink factor, smoothing sigma in voxels) per level, coarse first


@dataclass(frozen=True)
class AffineResult:
    """What the pre-alignment found, with the numbers a caller needs to judge it."""

    transform: sitk.AffineTransform  # resampling transform: fixed point -> moving point (LPS mm)
    metric: float  # final Mattes mutual information (negative; lower is better)
    overlap: float  # Dice of the two foregrounds on the fixed grid after alignment (0..1)
    seconds: float
    iterations: int  # optimizer iterations of the affine stage's last level


def _check_image(image: sitk.Image, what: str) -> None:
    if image.GetDimension() != 3:
        raise InputError(f"{what} is {image.GetDimension()}D; affine pre-alignment needs a 3D volume.")
    if min(image.GetSize()) < 2:
        size = "×".join(str(n) for n in image.GetSize())
        raise InputError(f"{what} is a single slice ({size} voxels); affine pre-alignment needs a 3D volume.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel; it must have one.")


def _scalar(image: sitk.Image, what: str) -> sitk.Image:
    values = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(values).all():
        raise InputError(f"{what} has values that are NaN or infinite.")
    if values.size == 0 or float(values.max()) == float(values.min()):
        raise InputError(f"{what} is empty (every voxel has the same value); there is nothing to align.")
    return sitk.Cast(image, sitk.sitkFloat32)


def foreground(image: sitk.Image, mask: sitk.Image | None = None) -> sitk.Image:
    """A UInt8 foreground mask: the given mask (anything > 0), else voxels above a low threshold.

    The threshold is relative to the image's own range, so it holds for T1 and T2 alike (both have dark air)."""
    if mask is not None:
        if mask.GetSize() != image.GetSize():
            raise InputError("A mask is not on its image's grid (sizes differ).")
        result = sitk.Cast(mask > 0, sitk.sitkUInt8)
        result.CopyInformation(image)
    else:
        values = sitk.GetArrayViewFromImage(image)
        low, high = float(values.min()), float(np.percentile(values, 99.5))
        if high <= low:
            high = float(values.max())
        result = sitk.Cast(image > low + FOREGROUND_FRACTION * (high - low), sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(result).any():
        raise InputError("A foreground mask is empty; there is nothing to align.")
    return result


def foreground_overlap(fixed_foreground: sitk.Image, moving_foreground: sitk.Image, transform: sitk.Transform
                       ) -> float:
    """Dice of the fixed foreground and the moving foreground resampled (nearest neighbour) onto the fixed grid."""
    warped = sitk.Resample(moving_foreground, fixed_foreground, transform, sitk.sitkNearestNeighbor, 0,
                           sitk.sitkUInt8)
    a = sitk.GetArrayViewFromImage(fixed_foreground) > 0
    b = sitk.GetArrayViewFromImage(warped) > 0
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2.0 * np.count_nonzero(a & b) / total if total else 0.0


def affine_prealign(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None = None,
                    moving_mask: sitk.Image | None = None, *, rigid_levels: LevelPlan = ((4, 2.0), (2, 1.0)),
                    affine_levels: LevelPlan = ((2, 1.0), (1, 0.5)), iterations: int = 100,
                    sampling_percentage: float = 0.1, histogram_bins: int = 32, seed: int = 42,
                    initialization: str = "moments") -> AffineResult:
    """Align `moving` to `fixed` with an affine transform (12 parameters), robust to a change of contrast.

    Two stages, because a 12-parameter affine started from a pure translation creeps towards a rotation very slowly
    (measured: a 10 degree rotation left 4 mm errors): a rigid stage (versor, 6 parameters) on coarse levels finds
    the rotation, then the affine stage adds scaling and shear on finer levels. Each level is (shrink factor,
    smoothing sigma in voxels of the full-resolution fixed image). Masks (optional, e.g. brain masks) restrict the
    metric and replace the intensity-threshold foregrounds used for the initialisation and the overlap.
    `initialization="none"` starts from the identity, for images that already share a scanner frame. Runs on as
    many threads as SimpleITK's global setting allows. InputError for 2D or empty images and for a result without
    overlap.
    """
    if initialization not in INITIALIZATIONS:
        raise ValueError(f"initialization must be one of {INITIALIZATIONS}, not {initialization!r}.")
    if not rigid_levels or not affine_levels:
        raise ValueError("Both stages need at least one (shrink factor, smoothing sigma) level.")
    start = time.perf_counter()
    _check_image(fixed, "The fixed image")
    _check_image(moving, "The moving image")
    fixed_f = _scalar(fixed, "The fixed image")
    moving_f = _scalar(moving, "The moving image")
    fixed_fg = foreground(fixed_f, fixed_mask)
    moving_fg = foreground(moving_f, moving_mask)

    rigid = sitk.VersorRigid3DTransform()
    if initialization == "moments":
        # Moments of the binary foregrounds: the centre of the head, whichever tissues are bright in each contrast.
        # SimpleITK < 2.4 returns a plain sitk.Transform (no GetCenter): the constructor makes it a versor again.
        centred = sitk.VersorRigid3DTransform(sitk.CenteredTransformInitializer(
            sitk.Cast(fixed_fg, sitk.sitkFloat32), sitk.Cast(moving_fg, sitk.sitkFloat32),
            sitk.VersorRigid3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS))
        rigid.SetCenter(centred.GetCenter())
        rigid.SetTranslation(centred.GetTranslation())
    else:
        rigid.SetCenter(fixed_f.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in fixed_f.GetSize()]))

    # The metric sees the masks dilated: a mask's own edge (skull, brain surface) is the strongest feature to align.
    masks = (_dilated(fixed_fg) if fixed_mask is not None else None,
             _dilated(moving_fg) if moving_mask is not None else None)
    settings = dict(iterations=iterations, sampling_percentage=sampling_percentage, histogram_bins=histogram_bins,
                    seed=seed, masks=masks)
    _register(fixed_f, moving_f, rigid, rigid_levels, learning_rate=2.0, **settings)
    transform = sitk.AffineTransform(3)
    transform.SetCenter(rigid.GetCenter())
    transform.SetMatrix(rigid.GetMatrix())
    transform.SetTranslation(rigid.GetTranslation())
    method = _register(fixed_f, moving_f, transform, affine_levels, learning_rate=1.0, **settings)
    overlap = foreground_overlap(fixed_fg, moving_fg, transform)
    if overlap <= 0.0:
        raise InputError(NO_OVERLAP)
    return AffineResult(transform=transform, metric=float(method.GetMetricValue()), overlap=float(overlap),
                        seconds=time.perf_counter() - start, iterations=int(method.GetOptimizerIteration()))


def _dilated(mask: sitk.Image, margin_mm: float = 6.0) -> sitk.Image:
    radius = [max(1, round(margin_mm / spacing)) for spacing in mask.GetSpacing()]
    return sitk.BinaryDilate(mask, radius)


def _register(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, levels: LevelPlan, *,
              learning_rate: float, iterations: int, sampling_percentage: float, histogram_bins: int, seed: int,
              masks: tuple[sitk.Image | None, sitk.Image | None]) -> sitk.ImageRegistrationMethod:
    """One multi-resolution Mattes-MI stage, optimising `transform` in place (deterministic: fixed sampling seed)."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling_percentage, seed)
    if masks[0] is not None:
        method.SetMetricFixedMask(masks[0])
    if masks[1] is not None:
        method.SetMetricMovingMask(masks[1])
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=1e-3,
                                                    numberOfIterations=iterations, relaxationFactor=0.6,
                                                    gradientMagnitudeTolerance=1e-6)
    # Scales: one unit of step moves a voxel by about 1 mm, so rotation/scaling and translation are balanced.
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([int(shrink) for shrink, _ in levels])
    method.SetSmoothingSigmasPerLevel([float(sigma) for _, sigma in levels])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(transform, inPlace=True)
    # One thread: ITK's multi-threaded Mattes MI sums in an order that varies between runs, and the optimiser
    # amplifies it (measured on the demo's masked MNI -> head pair with 2 threads: three runs, three transforms, up to
    # 0.5 mm apart in translation and 0.02 in scale; the demo's Dice after the affine moved by 0.03). A clinician
    # running the same registration twice must get the same answer. The metric takes SimpleITK's global default
    # (the method's own SetNumberOfThreads(1) left the runs different), so that is lowered for the call.
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        method.Execute(fixed, moving)
    except RuntimeError as error:  # e.g. "All samples map outside moving image buffer"
        if "sample" in str(error).lower() or "outside" in str(error).lower():
            raise InputError(NO_OVERLAP) from error
        raise
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return method


def matrix_offset(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """(M, t) with transform(x) = M x + t, for any SimpleITK matrix-offset transform (affine, Euler, similarity)."""
    try:
        matrix = np.asarray(transform.GetMatrix(), dtype=float).reshape(3, 3)
        centre = np.asarray(transform.GetCenter(), dtype=float)
        translation = np.asarray(transform.GetTranslation(), dtype=float)
    except AttributeError as error:
        raise InputError(f"Expected an affine transform, got a {transform.GetName()}.") from error
    return matrix, translation + centre - matrix @ centre


def compose_with_field(affine: sitk.Transform, fixed: sitk.Image,
                       field: np.ndarray | sitk.Image | None = None) -> sitk.Image:
    """One displacement field on the fixed grid for "affine, then deformable": v(p) = A(p + u(p)) - p.

    Why this order: the deformable network sees the moving image already resampled onto the fixed grid through A,
    M_A(q) = M(A(q)), and its field u samples that image at p + u(p); so the fixed point p samples the original
    moving image at A(p + u(p)). This equals sitk.CompositeTransform([A, u]) (the last transform added is applied
    first). Without `field` the result is the affine alone as a field. Returns a float64 3-vector image (LPS mm).
    """
    matrix, offset = matrix_offset(affine)
    size_x, size_y, size_z = fixed.GetSize()
    base = field_image(field, fixed) if isinstance(field, sitk.Image) else None  # alive while its view is used
    if field is None:
        u = None
    elif base is not None:
        u = sitk.GetArrayViewFromImage(base)  # (z, y, x, 3)
    else:  # an array is used as it is (an image of it would be two more copies of 7 M vectors for a 1 mm head)
        u = field_array(field, fixed)
    # v(p) = M (p + u) + t - p = M u + (M - I) p + t, and p = origin + D S (i, j, k) is linear in the index, so the
    # second part is a sum of three broadcast ramps: no grid of points is built (a 1 mm head has 7 M voxels; the
    # meshgrid version took 2.7 s of the 3.3 s this step cost on one core).
    direction = np.asarray(fixed.GetDirection(), dtype=float).reshape(3, 3)
    per_index = (matrix - np.eye(3)) @ direction @ np.diag(fixed.GetSpacing())  # columns: change per step in i, j, k
    start = (matrix - np.eye(3)) @ np.asarray(fixed.GetOrigin(), dtype=float) + offset
    total = u @ matrix.T if u is not None else np.zeros((size_z, size_y, size_x, 3))
    # two passes over the big array: a ramp along x (with the constant) and one over (z, y), each small
    total += start + np.arange(size_x, dtype=float)[None, None, :, None] * per_index[:, 0]
    total += (np.arange(size_y, dtype=float)[None, :, None, None] * per_index[:, 1]
              + np.arange(size_z, dtype=float)[:, None, None, None] * per_index[:, 2])
    result = sitk.GetImageFromArray(total, isVector=True)
    result.CopyInformation(fixed)
    return result
