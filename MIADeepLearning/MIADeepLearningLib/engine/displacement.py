"""Dense displacement fields, the output of a registration network, as exact ITK resampling transforms.

Convention (the one ITK, SimpleITK and ANTs use, so no conversion is needed on the engine side):

- A field lies on the FIXED image's grid: one vector per fixed voxel, held as a (z, y, x, 3) float array in
  SimpleITK's array order (``sitk.GetArrayFromImage`` of a vector image), or as that vector image itself.
- Each vector u(p) is in LPS millimetres (physical, not voxels, whatever the grid's spacing or direction), and
  p + u(p) is the MOVING image's point that the fixed point p samples: a resampling transform, moving -> fixed
  registration. Content therefore appears moved by -u: a constant u = (+5, 0, 0) moves it 5 mm towards patient Right.
- Outside the field's grid ITK uses u = 0; a field on the fixed grid covers every fixed voxel, so this never matters
  for warps onto that grid.

The Slicer side turns the same numbers into a grid transform node (``mrml/transforms.py``); files travel as ``.h5``
written by ``sitk.WriteTransform``, which Slicer's transform storage node reads as the same mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MIADeepLearningLib.engine.errors import InputError

FIELD_SUFFIXES = (".h5", ".hdf5")
_SLAB = 32  # fixed-grid slices per chunk of the Jacobian computation (bounds memory on whole-head fields)


def _check_grid(reference: sitk.Image, what: str = "The fixed image") -> None:
    if reference.GetDimension() != 3:
        raise InputError(f"{what} is {reference.GetDimension()}D; displacement fields need a 3D grid.")
    if min(reference.GetSize()) < 2:
        size = "×".join(str(n) for n in reference.GetSize())
        raise InputError(f"{what} is a single slice ({size} voxels); displacement fields need a 3D grid.")


def _check_finite(values: np.ndarray, what: str) -> None:
    finite = np.isfinite(values)
    if not finite.all():
        count = int(finite.size - np.count_nonzero(finite))
        raise InputError(f"{what} has {count} values that are NaN or infinite; a displacement must be finite.")


def field_image(field: np.ndarray | sitk.Image, reference: sitk.Image | None = None) -> sitk.Image:
    """The field as a float64 3-vector image on the fixed grid, validated (shape vs grid, 3D, finite).

    A (z, y, x, 3) array takes the reference's origin, spacing and direction; an image must already be a 3D
    3-vector image (and lie on the reference's grid when one is given)."""
    if isinstance(field, sitk.Image):
        if field.GetNumberOfComponentsPerPixel() != 3 or field.GetDimension() != 3:
            raise InputError(
                f"The displacement field is a {field.GetDimension()}D image with "
                f"{field.GetNumberOfComponentsPerPixel()} components per voxel; it must be 3D with 3 (x, y, z)."
            )
        _check_grid(field, "The displacement field")
        if reference is not None and not _same_grid(field, reference):
            raise InputError("The displacement field is not on the fixed image's grid (size, origin, spacing or "
                             "direction differ).")
        # already float64: used as it is (a cast would copy a 1 mm head's 400 MB field; callers only read it)
        image = field if field.GetPixelID() == sitk.sitkVectorFloat64 else sitk.Cast(field, sitk.sitkVectorFloat64)
        _check_finite(sitk.GetArrayViewFromImage(image), "The displacement field")
        return image
    if reference is None:
        raise InputError("A displacement field given as an array needs the fixed image whose grid it lies on.")
    image = sitk.GetImageFromArray(field_array(field, reference), isVector=True)
    image.CopyInformation(reference)
    return image


def field_array(field: np.ndarray, reference: sitk.Image) -> np.ndarray:
    """A (z, y, x, 3) field array on the reference's grid, validated as field_image does, as float64 (not copied
    when it already is): for callers that compute with the array and need no image of it."""
    _check_grid(reference)
    values = np.asarray(field)
    expected = (*reversed(reference.GetSize()), 3)
    if values.shape != expected:
        raise InputError(
            f"The displacement field has shape {values.shape}; on the fixed grid it must be (z, y, x, 3) = "
            f"{expected}."
        )
    _check_finite(values, "The displacement field")
    return values.astype(np.float64, copy=False)


def _same_grid(first: sitk.Image, second: sitk.Image, tolerance: float = 1e-6) -> bool:
    return (first.GetSize() == second.GetSize()
            and np.allclose(first.GetOrigin(), second.GetOrigin(), atol=tolerance)
            and np.allclose(first.GetSpacing(), second.GetSpacing(), atol=tolerance)
            and np.allclose(first.GetDirection(), second.GetDirection(), atol=tolerance))


def field_transform(field: np.ndarray | sitk.Image, reference: sitk.Image | None = None
                    ) -> sitk.DisplacementFieldTransform:
    """The field as an ITK resampling transform (linear interpolation of the vectors, as ITK's default)."""
    # The transform takes over the image's buffer, so it gets its own copy.
    return sitk.DisplacementFieldTransform(sitk.Image(field_image(field, reference)))


def _as_transform(field: sitk.Transform | np.ndarray | sitk.Image, reference: sitk.Image | None
                  ) -> sitk.DisplacementFieldTransform:
    if isinstance(field, sitk.DisplacementFieldTransform):
        return field
    if isinstance(field, sitk.Transform):
        raise InputError(f"Expected a displacement field transform, got a {field.GetName()}.")
    return field_transform(field, reference)


def field_of(transform: sitk.DisplacementFieldTransform) -> sitk.Image:
    """The transform's displacement field as a vector image (a copy; the transform keeps its own)."""
    return transform.GetDisplacementField()


def _warp(moving: sitk.Image, fixed: sitk.Image, field: sitk.Transform | np.ndarray | sitk.Image,
          interpolator: int, default: float, pixel_type: int) -> sitk.Image:
    """sitk.Resample(moving, fixed, the field as a transform, interpolator, default, pixel_type). A field given as an
    array or image lies on the fixed grid, so WarpImageFilter reads its vectors directly: the same numbers (the
    vector at a grid point is exact either way; the moving image is interpolated alike, in double), without building
    a DisplacementFieldTransform (measured 2.0 -> 1.1 CPU s for a 1 mm 256³ head)."""
    if isinstance(field, sitk.Transform):
        return sitk.Resample(moving, fixed, _as_transform(field, fixed), interpolator, default, pixel_type)
    vectors = field_image(field, fixed)
    source = moving
    if moving.GetPixelID() != pixel_type:  # interpolated in double either way; cast exactly first, back after
        source = sitk.Cast(moving, sitk.sitkFloat64 if moving.GetNumberOfComponentsPerPixel() == 1
                           else sitk.sitkVectorFloat64)
    warp = sitk.WarpImageFilter()
    warp.SetInterpolator(interpolator)
    warp.SetOutputParameteresFromImage(fixed)
    warp.SetEdgePaddingValue(default)
    result = warp.Execute(source, vectors)
    return result if result.GetPixelID() == pixel_type else sitk.Cast(result, pixel_type)


def warp_image(moving: sitk.Image, fixed: sitk.Image, field: sitk.Transform | np.ndarray | sitk.Image,
               default: float = 0.0) -> sitk.Image:
    """The moving image linearly resampled onto the fixed grid through the field (float32; `default` outside the
    moving image)."""
    _check_grid(moving, "The moving image")
    return _warp(moving, fixed, field, sitk.sitkLinear, default, sitk.sitkFloat32)


def warp_labels(moving_labels: sitk.Image, fixed: sitk.Image,
                field: sitk.Transform | np.ndarray | sitk.Image) -> sitk.Image:
    """A label map propagated onto the fixed grid by nearest neighbour (label values never blended; background 0
    outside the moving image); keeps the label map's pixel type."""
    _check_grid(moving_labels, "The moving label map")
    if moving_labels.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("The moving label map must have one component per voxel.")
    return _warp(moving_labels, fixed, field, sitk.sitkNearestNeighbor, 0, moving_labels.GetPixelID())


def write_field(field: sitk.Transform | sitk.Image, path: str | Path, reference: sitk.Image | None = None) -> Path:
    """Write the field as an ITK transform file (.h5), the format Slicer's transform storage node reads."""
    path = Path(path)
    if path.suffix.lower() not in FIELD_SUFFIXES:
        raise ValueError(f"Displacement fields are written as .h5 transform files, not {path.name}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(_as_transform(field, reference), str(path))
    return path


def read_field(path: str | Path) -> sitk.DisplacementFieldTransform:
    """Read a displacement field transform file; any other transform kind is an input error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Transform file {path} does not exist.")
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as error:
        raise InputError(f"Transform file {path.name} cannot be read.") from error
    if isinstance(transform, sitk.DisplacementFieldTransform):
        return transform
    try:
        return sitk.DisplacementFieldTransform(transform)
    except RuntimeError as error:
        raise InputError(f"{path.name} holds a {transform.GetName()}, not a displacement field.") from error


def jacobian_determinant(field: sitk.Transform | np.ndarray | sitk.Image,
                         reference: sitk.Image | None = None) -> np.ndarray:
    """det(d(p + u(p))/dp) at every grid voxel, (z, y, x) float64, with the derivatives taken in physical space.

    Central differences along the grid's axes (one-sided at the border) give du/d(index); the chain rule with
    (direction · diag(spacing))^-1 turns them into du/dp, so anisotropic, oblique and flipped grids give the same
    determinant as an axis-aligned grid sampling the same mapping (exact for a linear mapping). Computed slab by slab
    to bound memory."""
    if isinstance(field, sitk.Transform):
        image = field_image(field_of(_as_transform(field, None)))
    else:
        image = field_image(field, reference)
    values = sitk.GetArrayViewFromImage(image)  # (z, y, x, 3)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    index_from_physical = np.linalg.inv(direction @ np.diag(image.GetSpacing()))  # rows: i, j, k
    depth = values.shape[0]
    result = np.empty(values.shape[:3], dtype=np.float64)
    for start in range(0, depth, _SLAB):
        stop = min(start + _SLAB, depth)
        low, high = max(start - 1, 0), min(stop + 1, depth)  # one slice of overlap: interior differences are central
        chunk = values[low:high]
        keep = slice(start - low, start - low + (stop - start))
        # J = I + du/dp entry by entry, du_a/dp_b = sum_c du_a/d(index c) · d(index c)/dp_b (zero terms skipped: an
        # axis-aligned grid has one per entry), then the 3 x 3 determinant written out — no per-voxel matrices
        # through np.linalg.det (measured 12 s -> 2 s for a 1 mm 256³ field)
        entry: list[list[np.ndarray | float]] = [[0.0] * 3 for _ in range(3)]
        for a in range(3):
            component = np.ascontiguousarray(chunk[..., a], dtype=np.float64)  # one copy, then contiguous passes
            for c in range(3):  # index axis c (i, j, k) is array axis 2 - c; the overlap only serves axis 0
                derivative = (_central_difference(component, 0)[keep] if c == 2
                              else _central_difference(component[keep], 2 - c))
                for b in range(3):
                    if index_from_physical[c, b] != 0.0:
                        entry[a][b] = entry[a][b] + derivative * index_from_physical[c, b]
            entry[a][a] = entry[a][a] + 1.0
        determinant = entry[1][1] * entry[2][2]
        determinant -= entry[1][2] * entry[2][1]
        determinant *= entry[0][0]
        minor = entry[1][0] * entry[2][2]
        minor -= entry[1][2] * entry[2][0]
        minor *= entry[0][1]
        determinant -= minor
        minor = entry[1][0] * entry[2][1]
        minor -= entry[1][1] * entry[2][0]
        minor *= entry[0][2]
        np.add(determinant, minor, out=result[start:stop])
    return result


def _central_difference(values: np.ndarray, axis: int) -> np.ndarray:
    """np.gradient(values, axis=axis) (unit spacing: central differences, one-sided at both ends; zeros along an axis
    of one voxel) for one scalar component: the same numbers without its generic bookkeeping."""
    length = values.shape[axis]
    result = np.zeros(values.shape)
    if length < 2:
        return result

    def part(start: int | None, stop: int | None) -> tuple[slice, ...]:
        return tuple(slice(start, stop) if index == axis else slice(None) for index in range(values.ndim))

    np.subtract(values[part(2, None)], values[part(None, -2)], out=result[part(1, -1)])
    result[part(1, -1)] /= 2.0
    np.subtract(values[part(1, 2)], values[part(0, 1)], out=result[part(0, 1)])
    np.subtract(values[part(-1, None)], values[part(-2, -1)], out=result[part(-1, None)])
    return result


@dataclass(frozen=True)
class JacobianStats:
    """The field-quality numbers reported for a registration (issue 4)."""

    non_positive_percent: float  # share of voxels where the mapping folds or collapses (det <= 0)
    log_std: float  # std of log(det) over the voxels with det > 0: how unevenly the field stretches
    mean: float  # mean det: ~1 when volume is preserved overall
    minimum: float
    maximum: float
    voxels: int


def jacobian_stats(determinant: np.ndarray, mask: np.ndarray | None = None) -> JacobianStats:
    """Summarise a Jacobian determinant map, optionally inside a mask (e.g. the fixed image's foreground)."""
    values = np.asarray(determinant, dtype=np.float64)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != values.shape:
            raise InputError(f"The mask has shape {mask.shape}, the Jacobian map {values.shape}.")
        values = values[mask]
    values = values.ravel()
    if values.size == 0:
        raise InputError("There are no voxels to summarise (empty mask).")
    positive = values[values > 0]
    return JacobianStats(
        non_positive_percent=100.0 * float(np.count_nonzero(values <= 0)) / values.size,
        log_std=float(np.log(positive).std()) if positive.size else float("nan"),
        mean=float(values.mean()),
        minimum=float(values.min()),
        maximum=float(values.max()),
        voxels=int(values.size),
    )


def dice_per_label(first: np.ndarray | sitk.Image, second: np.ndarray | sitk.Image,
                   labels: list[int] | None = None) -> dict[int, float]:
    """Dice overlap of each label (default: every non-zero label in either map); NaN for a label absent from both,
    so an average over labels is never inflated by a perfect score for nothing."""
    if isinstance(first, sitk.Image) and isinstance(second, sitk.Image) and not _same_grid(first, second):
        raise InputError("The two label maps are not on the same grid; warp one onto the other's grid first.")
    a = sitk.GetArrayViewFromImage(first) if isinstance(first, sitk.Image) else np.asarray(first)
    b = sitk.GetArrayViewFromImage(second) if isinstance(second, sitk.Image) else np.asarray(second)
    if a.shape != b.shape:
        raise InputError(f"The two label maps have different shapes ({a.shape} and {b.shape}).")
    if labels is None:
        labels = sorted(int(v) for v in np.union1d(np.unique(a), np.unique(b)) if v != 0)
    scores: dict[int, float] = {}
    for label in labels:
        in_a, in_b = a == label, b == label
        total = np.count_nonzero(in_a) + np.count_nonzero(in_b)
        scores[int(label)] = 2.0 * np.count_nonzero(in_a & in_b) / total if total else float("nan")
    return scores
