"""Input checks before a run, from the model's metadata: refuse what cannot work, warn about what may not.

A network answers whatever it is given; a CT fed to an MR model or a 5 mm slab fed to a 1 mm model still yields a
segmentation, just a wrong one, and nobody is told. So before inference:

- hard errors (`InputError`, the run stops): not a 3D volume, the wrong number of channels, NaN/infinite voxels,
  a constant image;
- soft warnings (one sentence each, returned, recorded in the provenance and shown in the module's log):
  intensities that look like CT (Hounsfield units, lots of air at -1000) for an MR model or not like CT for a CT
  model, voxel spacing or field of view far from what the model expects, extremely anisotropic voxels.

What the model expects comes from MONAI's ``network_data_format.inputs`` (``modality``, ``num_channels``) and from
an optional ``slicer.expected_input`` section of the metadata::

    "expected_input": {
        "modality": "MR",                   # overrides network_data_format; "CT", "MR" or "" (no modality check)
        "spacing_mm": [0.5, 2.5],           # every voxel side should lie in this range
        "field_of_view_mm": [100, 400],     # every axis' extent (size × spacing) should lie in this range
        "max_anisotropy": 3.0,              # largest / smallest voxel side (default 4)
        "channels": 1,                      # image channels, when the pipeline builds the network's channels
        "intensity_range": [-57, 164],      # where the values that matter lie (e.g. a CT model's window) ...
        "min_fraction_in_range": 0.05       # ... and the share of voxels expected in it (default 5 %)
    }
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from MIADeepLearningLib.engine import imageio
from MIADeepLearningLib.engine.errors import InputError

DEFAULT_MAX_ANISOTROPY = 4.0
DEFAULT_MIN_FRACTION_IN_RANGE = 0.05
# CT in Hounsfield units has air at -1000 and fat at about -100; MR magnitude images are not negative.
CT_LIKE_THRESHOLD_HU = -500.0  # air, lung and scanner padding lie below
CT_LIKE_MIN_FRACTION = 0.05
HU_NEGATIVE_THRESHOLD = -100.0  # a CT in HU always has some air or fat below this
HU_NEGATIVE_MIN_FRACTION = 0.005
MAX_SAMPLED_VOXELS = 2_000_000


@dataclass(frozen=True)
class ExpectedInput:
    """What a model expects of its input, read from its metadata."""

    modality: str = ""
    num_channels: int = 1
    channel_names: tuple[str, ...] = ()
    spacing_mm: tuple[float, float] | None = None
    field_of_view_mm: tuple[float, float] | None = None
    max_anisotropy: float = DEFAULT_MAX_ANISOTROPY
    intensity_range: tuple[float, float] | None = None
    min_fraction_in_range: float = DEFAULT_MIN_FRACTION_IN_RANGE

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ExpectedInput:
        inputs = metadata.get("network_data_format", {}).get("inputs", {})
        image = inputs.get("image") or next(iter(inputs.values()), {})
        slicer = metadata.get("slicer", {})
        expected = slicer.get("expected_input", {})
        channel_def = image.get("channel_def", {})
        if "channels" in expected:  # the pipeline derives the network's channels from fewer image channels
            channel_def = {}
        return cls(
            modality=normalized_modality(expected.get("modality", image.get("modality", slicer.get("modality", "")))),
            num_channels=int(expected.get("channels", image.get("num_channels", 1))),
            channel_names=tuple(str(channel_def[key]) for key in sorted(channel_def, key=int)),
            spacing_mm=_range(expected.get("spacing_mm")),
            field_of_view_mm=_range(expected.get("field_of_view_mm")),
            max_anisotropy=float(expected.get("max_anisotropy", DEFAULT_MAX_ANISOTROPY)),
            intensity_range=_range(expected.get("intensity_range")),
            min_fraction_in_range=float(expected.get("min_fraction_in_range", DEFAULT_MIN_FRACTION_IN_RANGE)),
        )


def normalized_modality(modality: Any) -> str:
    """"CT", "MR" or "" for the spellings bundles use ("CT", "ct", "MRI", "MR T1", ...)."""
    text = str(modality or "").strip().upper()
    if text.startswith("CT"):
        return "CT"
    if text.startswith("MR"):
        return "MR"
    return ""


def _range(value: Sequence[float] | None) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


def _mm(values: Sequence[float]) -> str:
    return " × ".join(f"{value:.3g}" for value in values) + " mm"


def _sample(voxels: np.ndarray) -> np.ndarray:
    """A regular subsample of at most ~2 million voxels: enough for fractions and quantiles, fast on 512³."""
    step = max(1, round((voxels.size / MAX_SAMPLED_VOXELS) ** (1 / 3)))
    return voxels[::step, ::step, ::step].ravel()


# ------------------------------------------------------------------------------------------------ hard errors


def check_structure(image: sitk.Image, expected: ExpectedInput, name: str = "The input volume") -> np.ndarray:
    """Raise `InputError` for what no run can use; returns the voxels as float32 ((z, y, x) or (z, y, x, c))."""
    components = image.GetNumberOfComponentsPerPixel()
    if expected.num_channels <= 1 or (components == 1 and image.GetDimension() != 3):
        return imageio.check_scalar_volume(image, name)
    if components != expected.num_channels:
        named = len(expected.channel_names) == expected.num_channels
        names = f" ({', '.join(expected.channel_names)})" if named else ""
        raise InputError(
            f"{name} has {components} component(s) per voxel; the model needs {expected.num_channels} "
            f"channels{names} in one multi-component volume."
        )
    channels = [sitk.VectorIndexSelectionCast(image, index, sitk.sitkFloat32) for index in range(components)]
    voxels = [imageio.check_scalar_volume(channel, f"{name} (channel {index})") for index, channel in
              enumerate(channels)]
    return np.stack(voxels, axis=-1)


# ---------------------------------------------------------------------------------------------- soft warnings


def modality_warnings(voxels: np.ndarray, expected: ExpectedInput) -> list[str]:
    """CT-looking intensities for an MR model, or intensities that are not Hounsfield units for a CT model."""
    if not expected.modality:
        return []
    sample = _sample(voxels)
    if expected.modality == "MR":
        ct_like = float(np.mean(sample <= CT_LIKE_THRESHOLD_HU))
        if ct_like >= CT_LIKE_MIN_FRACTION:
            return [f"The intensities look like CT in Hounsfield units ({100 * ct_like:.0f} % of the voxels at or "
                    f"below {CT_LIKE_THRESHOLD_HU:g}, where CT has air) but the model expects MR; check that the "
                    "right volume is selected."]
    elif expected.modality == "CT":
        negative = float(np.mean(sample < HU_NEGATIVE_THRESHOLD))
        if negative < HU_NEGATIVE_MIN_FRACTION:
            return [f"The intensities do not look like CT in Hounsfield units (almost no voxels below "
                    f"{HU_NEGATIVE_THRESHOLD:g}, where CT has air and fat) but the model expects CT; check the "
                    "modality and the intensity rescaling."]
    return []


def geometry_warnings(image: sitk.Image, expected: ExpectedInput) -> list[str]:
    """Spacing and field of view far from the model's, and thick slices."""
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    extent = spacing * np.array(image.GetSize(), dtype=np.float64)
    found = []
    if expected.spacing_mm is not None:
        low, high = expected.spacing_mm
        if spacing.min() < low or spacing.max() > high:
            found.append(f"The voxel spacing ({_mm(spacing)}) is far from what the model expects ({low:g} to "
                         f"{high:g} mm per axis); the result may be less accurate.")
    if expected.field_of_view_mm is not None:
        low, high = expected.field_of_view_mm
        if extent.min() < low or extent.max() > high:
            found.append(f"The field of view ({_mm(extent)}) is outside what the model expects ({low:g} to "
                         f"{high:g} mm per axis); the structure it looks for may be cut off or a small part of "
                         "the image.")
    anisotropy = float(spacing.max() / spacing.min())
    if anisotropy > expected.max_anisotropy:
        found.append(f"The voxels are very anisotropic ({_mm(spacing)}, ratio {anisotropy:.1f}, thick slices); "
                     "structures thinner than the slices may be missed or look blocky.")
    return found


def intensity_warnings(voxels: np.ndarray, expected: ExpectedInput) -> list[str]:
    """Too few voxels in the intensity range the model works in (e.g. a CT model's soft-tissue window)."""
    if expected.intensity_range is None:
        return []
    low, high = expected.intensity_range
    sample = _sample(voxels)
    inside = float(np.mean((sample >= low) & (sample <= high)))
    if inside < expected.min_fraction_in_range:
        return [f"Only {100 * inside:.1f} % of the voxels lie in the intensity range the model works in "
                f"({low:g} to {high:g}); check the intensity scaling of the input."]
    return []


def check_input(image: sitk.Image, metadata: Mapping[str, Any], name: str = "The input volume") -> list[str]:
    """Raise `InputError` for an input the model cannot use; return one-sentence warnings for doubtful ones."""
    expected = ExpectedInput.from_metadata(metadata)
    voxels = check_structure(image, expected, name)
    return [*modality_warnings(voxels, expected), *geometry_warnings(image, expected),
            *intensity_warnings(voxels, expected)]
