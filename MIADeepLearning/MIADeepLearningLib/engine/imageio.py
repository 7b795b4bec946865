"""Reading, checking and writing images with SimpleITK: the one place where the engine touches files.

SimpleITK keeps geometry in LPS and ITK's file readers and writers convert from and to each format's own
convention (NRRD space, NIfTI qform/sform); the engine never converts coordinates by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MIADeepLearningLib.engine.errors import InputError
from MIADeepLearningLib.engine.filecheck import verify_image_file

SUPPORTED_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def image_name(path: str | Path) -> str:
    """File name without its image suffix (``head.nii.gz`` -> ``head``)."""
    name = Path(path).name
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def read_image(path: str | Path) -> sitk.Image:
    """Read an image file; an unreadable file is an input error, not a crash.

    The file is verified first (engine/filecheck.py): ITK reads some cut-short or corrupt files without a word, as
    partly blank images or wrong voxels, which a model would then segment as if they were the patient's.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Input image {path} does not exist.")
    verify_image_file(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise InputError(f"Input image {path.name} cannot be read ({first_line}).") from error


def check_scalar_volume(image: sitk.Image, name: str = "The input image") -> np.ndarray:
    """Refuse what no volumetric model can use, in one sentence each; returns the voxels as float32 (z, y, x)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (vector or colour image); "
            "the model needs a single scalar volume."
        )
    if image.GetDimension() != 3:
        raise InputError(f"{name} is {image.GetDimension()}D; the model needs a 3D volume.")
    size = image.GetSize()
    if min(size) < 2:
        raise InputError(
            f"{name} is a single slice ({size[0]}×{size[1]}×{size[2]} voxels); the model needs a 3D volume."
        )
    voxels = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(voxels)
    if not finite.all():
        count = int(voxels.size - np.count_nonzero(finite))
        raise InputError(f"{name} has {count} voxels that are NaN or infinite; fix or mask them first.")
    # Always a copy: a float32 image would otherwise return a view into its own buffer, which dangles (and reads
    # freed memory) as soon as a temporary image is garbage-collected.
    voxels = voxels.astype(np.float32)
    low, high = float(voxels.min()), float(voxels.max())
    if low == high:
        raise InputError(f"{name} is constant (every voxel is {low:g}); there is nothing to segment.")
    return voxels


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def image_on_grid(voxels: np.ndarray, reference: sitk.Image, pixel_type: int | None = None) -> sitk.Image:
    """Wrap a (z, y, x) array as an image with exactly the reference's origin, spacing and direction."""
    image = sitk.GetImageFromArray(voxels)
    if pixel_type is not None:
        image = sitk.Cast(image, pixel_type)
    image.CopyInformation(reference)
    return image


def same_grid(first: sitk.Image, second: sitk.Image, tolerance: float = 1e-6) -> bool:
    """True when both images have the same size and index-to-physical mapping (within tolerance)."""
    return (
        first.GetSize() == second.GetSize()
        and np.allclose(first.GetOrigin(), second.GetOrigin(), atol=tolerance)
        and np.allclose(first.GetSpacing(), second.GetSpacing(), atol=tolerance)
        and np.allclose(first.GetDirection(), second.GetDirection(), atol=tolerance)
    )
