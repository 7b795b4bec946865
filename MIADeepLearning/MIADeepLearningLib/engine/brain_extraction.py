"""Brain extraction with deepbet's pretrained networks (Fisch et al. 2024, MIT), reimplemented around our geometry.

deepbet's own script runs on the voxel array in nibabel's closest-canonical orientation, whatever the spacing.
Here the head is first resampled onto an axis-aligned 1 mm RAS grid (so oblique, anisotropic or permuted inputs
look like the data the networks were trained on), then deepbet's steps run unchanged: intensities clipped to the
0.5-99.5 % quantiles and standardised, the bounding-box network on the whole head at 128³, a crop with 10 % margin,
the mask network on the crop at 256³. The brain probability is resampled *linearly* onto the input grid and only
there thresholded, reduced to the largest connected component and hole-filled, so the mask follows the input's
own voxels instead of being a blocky nearest-neighbour copy of a coarse grid.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from MIADeepLearningLib.engine import cpu_runtime, geometry
from MIADeepLearningLib.engine.errors import InputError
from MIADeepLearningLib.engine.registry import ModelInfo

ProgressCallback = Callable[[str, float, str], None]

BBOX_SHAPE = (128, 128, 128)
MASK_SHAPE = (256, 256, 256)


def _no_progress(stage: str, fraction: float, message: str) -> None:
    """Default progress sink."""


def normalize(voxels: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """deepbet's input normalisation: clip to [low, high], standardise, map to ImageNet-like mean/std."""
    scaled = ((voxels - low) / (high - low)).clamp(0, 1)
    scaled = (scaled - scaled.mean()) / scaled.std().clamp_min(1e-6)
    return 0.226 * scaled + 0.449


def bbox_with_margin(mask_small: torch.Tensor, full_shape: tuple[int, ...], margin: float,
                     plane_threshold: float = 0.02) -> tuple[slice, ...]:
    """Bounding box of the coarse brain mask scaled to the full grid, enlarged by `margin` on each side."""
    ranges = []
    for dims in [(1, 2), (0, 2), (0, 1)]:
        rows = torch.where(mask_small.mean(dims) > plane_threshold)[0]
        if rows.numel() == 0:
            raise InputError("No brain was found in the image (is it a T1-weighted head MRI?).")
        ranges.append((int(rows.min()), int(rows.max()) + 1))
    box = []
    for (start, stop), small, full in zip(ranges, mask_small.shape, full_shape):
        scale = full / small
        centre, size = scale * (start + stop) / 2, scale * (stop - start) * (1 + 2 * margin)
        lo, hi = round(centre - size / 2), round(centre + size / 2)
        box.append(slice(max(0, lo), min(full, hi)))
    return tuple(box)


def largest_component(mask: sitk.Image) -> sitk.Image:
    components = sitk.ConnectedComponent(mask, True)
    relabelled = sitk.RelabelComponent(components, sortByObjectSize=True)
    return sitk.Cast(relabelled == 1, sitk.sitkUInt8)


class BrainExtraction:
    """Runs the two deepbet networks; weights are loaded only from verified paths."""

    def __init__(self, model: ModelInfo, weight_paths: dict[str, Path], device: torch.device,
                 options: dict | None = None):
        options = options or {}
        self.device = device
        self.threshold = float(options.get("threshold", 0.5))
        self.margin = float(options.get("bbox_margin", 0.1))
        self.runtime_notes: dict[str, None] = {}  # what ran the networks in the last run, and why (ordered set)
        self.spacing_mm = float(options.get("working_spacing_mm", 1.0))
        with warnings.catch_warnings():  # deepbet ships TorchScript; torch 2.13 deprecates torch.jit.load itself
            warnings.simplefilter("ignore", DeprecationWarning)
            self.bbox_model = torch.jit.load(str(weight_paths["bbox_model"]), map_location=device).eval()
            self.mask_model = torch.jit.load(str(weight_paths["mask_model"]), map_location=device).eval()

    def to(self, device: torch.device) -> BrainExtraction:
        self.device = device
        self.bbox_model.to(device)
        self.mask_model.to(device)
        return self

    def _network(self, model: torch.jit.ScriptModule, voxels: torch.Tensor) -> torch.Tensor:
        """Brain probability of one normalised volume; fp16/bf16 autocast on CUDA; on the CPU fp32, by OpenVINO
        where it was checked against PyTorch on this machine (engine/cpu_runtime.py)."""
        with torch.inference_mode():
            if self.device.type == "cuda":
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
                with torch.autocast("cuda", dtype=dtype):
                    return model(voxels[None, None])[0, 1].float()
            call = cpu_runtime.runner(model, self.device, "labels")
            probability = call(voxels[None, None])[0, 1].float()
            self.runtime_notes[call.note] = None
            return probability

    def brain_probability(self, head_ras: np.ndarray, progress: ProgressCallback = _no_progress) -> np.ndarray:
        """Brain probability on the (R, A, S)-indexed model grid."""
        voxels = torch.from_numpy(head_ras).to(self.device, torch.float32)
        small = F.interpolate(voxels[None, None], BBOX_SHAPE, mode="nearest-exact")[0, 0]
        low, high = torch.quantile(small.flatten().float().cpu(), torch.tensor([0.005, 0.995])).to(self.device)
        if float(high - low) <= 0:
            raise InputError("The image has almost no contrast (0.5 % and 99.5 % intensity quantiles are equal).")
        progress("inference", 0.2, "Locating the brain (bounding-box network, 128³)")
        coarse = self._network(self.bbox_model, normalize(small, low, high))
        coarse_mask = sitk.GetImageFromArray((coarse > 0.5).to(torch.uint8).cpu().numpy())
        if sitk.GetArrayViewFromImage(coarse_mask).max() == 0:
            raise InputError("No brain was found in the image (is it a T1-weighted head MRI?).")
        coarse_mask = torch.from_numpy(sitk.GetArrayFromImage(largest_component(coarse_mask))).float()
        box = bbox_with_margin(coarse_mask, tuple(voxels.shape), self.margin)
        crop = voxels[box]
        progress("inference", 0.45, f"Segmenting the brain (mask network, 256³ from a {tuple(crop.shape)} crop)")
        fine = self._network(self.mask_model, normalize(
            F.interpolate(crop[None, None], MASK_SHAPE, mode="nearest-exact")[0, 0], low, high))
        probability = torch.zeros_like(voxels)
        back = F.interpolate(fine[None, None], tuple(crop.shape), mode="trilinear", align_corners=False)
        probability[box] = back[0, 0]
        return probability.clamp_(0, 1).cpu().numpy()

    def predict(self, image: sitk.Image, progress: ProgressCallback = _no_progress) -> dict[str, sitk.Image]:
        """Brain label (uint8, 1 = brain) and probability on the input's own grid."""
        self.runtime_notes = {}
        progress("preprocess", 0.12, "Resampling to a 1 mm RAS working grid")
        grid = geometry.ras_model_grid(image, self.spacing_mm)
        background = float(sitk.GetArrayViewFromImage(image).min())
        head = geometry.resample(sitk.Cast(image, sitk.sitkFloat32), grid, linear=True, default=background)
        probability_ras = self.brain_probability(geometry.ras_array(head), progress)
        progress("postprocess", 0.85, "Resampling the probability onto the input grid")
        probability_model = geometry.image_from_ras_array(probability_ras.astype(np.float32), grid)
        probability = geometry.resample(probability_model, image, linear=True, default=0.0)
        mask = sitk.Cast(probability > self.threshold, sitk.sitkUInt8)
        if sitk.GetArrayViewFromImage(mask).max() == 0:
            raise InputError("No brain was found in the image (is it a T1-weighted head MRI?).")
        progress("postprocess", 0.9, "Keeping the largest component and filling holes")
        mask = sitk.BinaryFillhole(largest_component(mask), fullyConnected=False, foregroundValue=1)
        mask = sitk.Cast(mask, sitk.sitkUInt8)
        mask.CopyInformation(image)
        probability.CopyInformation(image)
        return {"label": mask, "probability": probability,
                "provenance": {"network_runtime": list(self.runtime_notes)}}
