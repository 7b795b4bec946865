"""Synthetic MR images from label maps, and their thick-slice acquisitions (SynthSeg/SynthSR-style), in torch.

Why synthetic: no paired thick/thin scans exist offline, but label maps do. Each label gets a random intensity, so a
network trained on these renders sees every contrast; the thick-slice "acquisition" is simulated from the same render,
so input and 1 mm target are perfectly aligned. Everything takes a ``torch.Generator`` so a seed reproduces a run.

Arrays are (D, H, W) float32 tensors; the thick-slice axis is always axis 0 (callers permute volumes so the slice axis
comes first — the same convention the synthesis pipeline uses at inference).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as functional

from MIADeepLearningLib.engine.encoding import network_input, normalise  # noqa: F401  (shared with inference)

# FreeSurfer label values per tissue (the classes of the brain tissue model; used here to draw T1/T2-like contrasts)
CSF_LABELS = (4, 5, 14, 15, 24, 43, 44, 72)
GM_LABELS = (3, 42, 8, 47, 10, 11, 12, 13, 17, 18, 26, 49, 50, 51, 52, 53, 54, 58)
WM_LABELS = (2, 41, 7, 46, 16, 28, 60)
CONTRASTS = ("random", "t1", "t2")
# (low, high) of the mean intensity per tissue for the ordered contrast families, before bias field and gamma
_FAMILY_MEANS = {
    "t1": {"wm": (0.72, 0.88), "gm": (0.42, 0.58), "csf": (0.08, 0.22), "background": (0.0, 0.04)},
    "t2": {"wm": (0.30, 0.42), "gm": (0.48, 0.62), "csf": (0.80, 1.00), "background": (0.0, 0.04)},
}


def _uniform(generator: torch.Generator, low: float, high: float, size: tuple[int, ...] = ()) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator)


def _scalar(generator: torch.Generator, low: float, high: float) -> float:
    return float(_uniform(generator, low, high))


def compact_labels(label_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices 0..K-1 with the array's shape, the K label values they stand for) — lookup tables stay small."""
    values, indices = np.unique(np.asarray(label_values).astype(np.int32), return_inverse=True)
    return indices.reshape(np.shape(label_values)).astype(np.int16), values


def tissue_of(values: np.ndarray) -> list[str]:
    """Tissue family of each FreeSurfer label value: wm, gm, csf, background (0) or other (extra-cerebral, unknown)."""
    families = []
    for value in np.asarray(values).tolist():
        if value == 0:
            families.append("background")
        elif value in WM_LABELS:
            families.append("wm")
        elif value in GM_LABELS:
            families.append("gm")
        elif value in CSF_LABELS:
            families.append("csf")
        else:
            families.append("other")
    return families


def label_means(values: np.ndarray, contrast: str, generator: torch.Generator) -> torch.Tensor:
    """Mean intensity per label: T1/T2-like keep the tissue order with per-label jitter; random draws each label."""
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}.")
    count = len(values)
    means = torch.rand(count, generator=generator)
    if contrast == "random":
        # background is mostly dark, as in real scans; sometimes not, so the network cannot rely on it
        if _scalar(generator, 0, 1) < 0.8:
            means[np.asarray(values) == 0] = _scalar(generator, 0.0, 0.1)
        return means
    ranges = _FAMILY_MEANS[contrast]
    for index, family in enumerate(tissue_of(values)):
        if family in ranges:
            low, high = ranges[family]
            means[index] = _scalar(generator, low, high)
    return means


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / max(sigma, 1e-3)) ** 2)
    return kernel / kernel.sum()


def blur_axis(volume: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """Correlate a (D, H, W) volume with a 1D kernel along one axis (as conv1d does), replicating the border.

    A sum of shifted copies rather than conv1d on rows: the kernels are short (2 * 3 sigma + 1 taps) and the shifted
    sum needs no transposed copy, about ten times faster on the CPU for the 1 mm renders the tissue training makes."""
    radius = (kernel.numel() - 1) // 2
    length = volume.shape[axis]
    border = [radius if dim == axis else size for dim, size in enumerate(volume.shape)]
    padded = torch.cat([volume.narrow(axis, 0, 1).expand(*border), volume,
                        volume.narrow(axis, length - 1, 1).expand(*border)], dim=axis)
    weights = kernel.to(volume.dtype).tolist()
    blurred = padded.narrow(axis, 0, length) * weights[0]
    for offset in range(1, len(weights)):
        blurred.add_(padded.narrow(axis, offset, length), alpha=weights[offset])
    return blurred


def gaussian_blur(volume: torch.Tensor, sigmas: tuple[float, float, float]) -> torch.Tensor:
    for axis, sigma in enumerate(sigmas):
        if sigma > 0.05:
            volume = blur_axis(volume, gaussian_kernel(sigma), axis)
    return volume


def smooth_field(shape: tuple[int, ...], control_points: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """A smooth random field: Gaussian noise on a coarse grid, upsampled trilinearly to `shape`."""
    coarse = torch.randn((1, 1, control_points, control_points, control_points), generator=generator) * std
    return functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0]


@dataclass
class RenderSettings:
    contrast: str = "random"  # random | t1 | t2
    texture_std: tuple[float, float] = (0.0, 0.04)  # within-label variation (smooth, part of the anatomy)
    label_std: tuple[float, float] = (0.0, 0.03)  # per-label spread of the means inside the family ranges
    partial_volume_sigma: tuple[float, float] = (0.3, 0.8)  # voxels: blur of the 1 mm render (a scanner's PSF)
    bias_std: tuple[float, float] = (0.0, 0.3)  # std of the log bias field
    gamma_std: float = 0.2  # std of log(gamma)


def render(label_indices: torch.Tensor, values: np.ndarray, generator: torch.Generator,
           settings: RenderSettings | None = None,
           adjust_means: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """A 1 mm image with random contrast from a compact label map (D, H, W); values in [0, 1]. `adjust_means`
    changes the drawn mean of each label before rendering (e.g. a pasted lesion set apart from the tissue around)."""
    settings = settings or RenderSettings()
    means = label_means(values, settings.contrast, generator)
    means = means + torch.randn(means.shape, generator=generator) * _scalar(generator, *settings.label_std)
    if adjust_means is not None:
        means = adjust_means(means)
    image = means.clamp(0, 1)[label_indices.long()]
    shape = tuple(image.shape)
    texture = torch.randn(shape, generator=generator) * _scalar(generator, *settings.texture_std)
    image = image + gaussian_blur(texture, (1.0, 1.0, 1.0)) * 2.0
    sigma = _scalar(generator, *settings.partial_volume_sigma)
    image = gaussian_blur(image.clamp(min=0), (sigma, sigma, sigma))
    image = image * torch.exp(smooth_field(shape, 4, _scalar(generator, *settings.bias_std), generator))
    image = image / image.max().clamp(min=1e-6)
    gamma = math.exp(float(torch.randn((), generator=generator)) * settings.gamma_std)
    return image.clamp(min=0) ** gamma


def slice_profile(thickness: float, softness: float = 0.15) -> torch.Tensor:
    """Weights at integer offsets of a slice profile: a box of `thickness` mm with soft (Gaussian) edges, 1 mm voxels.

    Real slice-selective excitation gives a nearly rectangular profile with smooth edges, so neither a pure box nor
    a Gaussian of the same width; the weights integrate the profile over each 1 mm voxel.
    """
    edge = max(softness * thickness, 0.2)
    radius = math.ceil(thickness / 2.0 + 3.0 * edge)
    taps, samples = 2 * radius + 1, 20
    # midpoints of `samples` equal sub-intervals of each 1 mm voxel: symmetric about the centre tap
    fine = (torch.arange(taps * samples, dtype=torch.float64) + 0.5) / samples - (radius + 0.5)
    scale = math.sqrt(2.0) * edge
    profile = 0.5 * (torch.erf((fine + thickness / 2.0) / scale) - torch.erf((fine - thickness / 2.0) / scale))
    weights = profile.reshape(taps, samples).mean(dim=1)
    return (weights / weights.sum()).float()


def linear_sample_axis0(volume: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """volume sampled at fractional indices along axis 0 (clamped to the ends), linear interpolation."""
    positions = positions.clamp(0, volume.shape[0] - 1)
    lower = positions.floor().long().clamp(max=volume.shape[0] - 1)
    upper = (lower + 1).clamp(max=volume.shape[0] - 1)
    weight = (positions - lower.to(positions.dtype)).view(-1, 1, 1).to(volume.dtype)
    return volume[lower] * (1 - weight) + volume[upper] * weight


@dataclass
class Acquisition:
    """A simulated thick-slice acquisition along axis 0, in voxels of the 1 mm grid."""

    spacing: float  # distance between slice centres (mm)
    thickness: float  # slice thickness (mm); spacing - thickness is the gap
    offset: float  # position of the first slice centre (voxel index on the 1 mm grid)
    noise_std: float  # Rician noise on the acquired slices, relative to the image maximum
    in_plane_sigma: float  # in-plane blur (voxels) for in-plane resolution coarser than 1 mm

    @classmethod
    def random(cls, generator: torch.Generator, spacing_range: tuple[float, float] = (2.0, 7.0),
               gap_probability: float = 0.5, noise_range: tuple[float, float] = (0.0, 0.04)) -> Acquisition:
        spacing = _scalar(generator, *spacing_range)
        gap = _scalar(generator, 0.0, 0.3) * spacing if _scalar(generator, 0, 1) < gap_probability else 0.0
        return cls(spacing=spacing, thickness=spacing - gap, offset=_scalar(generator, 0.0, spacing),
                   noise_std=_scalar(generator, *noise_range), in_plane_sigma=_scalar(generator, 0.0, 0.5))

    def slice_positions(self, length: int) -> torch.Tensor:
        count = math.floor((length - 1 - self.offset) / self.spacing) + 1
        return self.offset + self.spacing * torch.arange(max(count, 1), dtype=torch.float32)


def acquire(image: torch.Tensor, acquisition: Acquisition, generator: torch.Generator) -> torch.Tensor:
    """The thick slices (K, H, W) an acquisition of `image` (D, H, W) would record along axis 0."""
    blurred = blur_axis(image, slice_profile(acquisition.thickness), 0)
    sigma = acquisition.in_plane_sigma
    blurred = gaussian_blur(blurred, (0.0, sigma, sigma))
    slices = linear_sample_axis0(blurred, acquisition.slice_positions(image.shape[0]))
    if acquisition.noise_std > 0:
        real = slices + torch.randn(slices.shape, generator=generator) * acquisition.noise_std
        imaginary = torch.randn(slices.shape, generator=generator) * acquisition.noise_std
        slices = torch.sqrt(real**2 + imaginary**2)
    return slices


def slice_coordinates(length: int, acquisition: Acquisition) -> torch.Tensor:
    """Continuous slice index of every 1 mm position along axis 0 (what the pipeline computes from the geometry)."""
    return (torch.arange(length, dtype=torch.float32) - acquisition.offset) / acquisition.spacing


def upsample_slices(slices: torch.Tensor, slice_index: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of acquired slices back onto the 1 mm positions, nearest beyond the outer slices."""
    return linear_sample_axis0(slices, slice_index)


# ------------------------------------------------------------------------------ segmentation targets and resolution

TISSUE_CLASSES = ("background", "csf", "gm", "wm")  # output channels of the brain tissue segmenter, in this order
_TISSUE_INDEX = {"background": 0, "other": 0, "csf": 1, "gm": 2, "wm": 3}


def tissue_classes(values: np.ndarray) -> np.ndarray:
    """Tissue class (0 background, 1 CSF, 2 GM, 3 WM) of each label value: a lookup table indexed by compact label
    index, so ``tissue_classes(values)[indices]`` turns a compact label map into the segmentation target. Labels that
    are in no tissue list (extra-cerebral, > 100, unknown) are background."""
    return np.asarray([_TISSUE_INDEX[family] for family in tissue_of(values)], dtype=np.int64)


def apply_acquisition(image: torch.Tensor, acquisition: Acquisition, axis: int,
                      generator: torch.Generator) -> torch.Tensor:
    """`image` as a thick-slice acquisition along `axis` would show it once interpolated back onto the same grid:
    the thick axis is moved to axis 0 (the acquisition convention), acquired, upsampled, and moved back."""
    moved = image.movedim(axis, 0)
    slices = acquire(moved, acquisition, generator)
    upsampled = upsample_slices(slices, slice_coordinates(moved.shape[0], acquisition))
    return upsampled.movedim(0, axis).contiguous()


def degrade_resolution(image: torch.Tensor, generator: torch.Generator, probability: float = 0.5,
                       spacing_range_mm: tuple[float, float] = (2.0, 8.0), voxel_mm: float = 1.0,
                       noise_range: tuple[float, float] = (0.0, 0.04)) -> tuple[torch.Tensor, int | None]:
    """With `probability`, a random thick-slice acquisition along a random axis (a segmenter must work on clinical
    scans with thick slices, which reach it interpolated onto its working grid); else the image unchanged.

    Slice spacing and thickness are drawn in mm and converted to voxels of the working grid (`voxel_mm`). Returns
    (image, thick axis or None)."""
    if _scalar(generator, 0.0, 1.0) >= probability:
        return image, None
    axis = int(torch.randint(0, 3, (), generator=generator))
    low, high = spacing_range_mm
    acquisition = Acquisition.random(generator, spacing_range=(low / voxel_mm, high / voxel_mm),
                                     noise_range=noise_range)
    return apply_acquisition(image, acquisition, axis, generator), axis
