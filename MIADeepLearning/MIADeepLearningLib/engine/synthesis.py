"""Thick-slice MRI -> 1 mm isotropic volume: the synthesis pipeline of the engine.

The input is resampled linearly onto a 1 mm grid with the input's orientation that covers its physical extent; the
network (trained on simulated thick-slice acquisitions, see training/train_synthesis.py) adds what interpolation
cannot recover. Because the output grid keeps the input's axes, the thick-slice axis is one array axis; it is moved
to the front, where the network was trained to expect it, and back afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as functional

from MIADeepLearningLib.engine.encoding import network_input, normalise
from MIADeepLearningLib.engine.errors import InputError, ModelError
from MIADeepLearningLib.engine.inference import WindowedInferenceConfig, sliding_window_predict
from MIADeepLearningLib.engine.networks import ResidualUNet3D

ProgressCallback = Callable[[str, float, str], None]
PIPELINE_NAME = "thick_slice_super_resolution"
THICK_SLICE_MIN_MM = 1.5  # spacing above which an axis counts as "thick"
TRAINED_SPACING_MM = (2.0, 7.0)  # the slice spacings the network saw in training


def isotropic_grid(image: sitk.Image, spacing_mm: float = 1.0) -> tuple[sitk.Image, np.ndarray]:
    """An empty image on the output grid: the input's direction, `spacing_mm` voxels, centred on the input's extent
    (voxel corners to voxel corners). Also returns, per input axis, the offset (mm, along that axis) of the first
    output voxel centre from the first input voxel centre."""
    size_in = np.asarray(image.GetSize(), dtype=float)
    spacing_in = np.asarray(image.GetSpacing(), dtype=float)
    extent = size_in * spacing_in
    size_out = np.maximum(np.round(extent / spacing_mm).astype(int), 1)
    offset = -0.5 * spacing_in + 0.5 * spacing_mm + (extent - size_out * spacing_mm) / 2.0
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=float) + direction @ offset
    grid = sitk.Image([int(n) for n in size_out], sitk.sitkUInt8)
    grid.SetSpacing([spacing_mm] * 3)
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin([float(value) for value in origin])
    return grid, offset


def thick_axis(image: sitk.Image) -> int:
    """The image axis (0 = i) with the largest spacing: the slice-select direction of a thick-slice scan."""
    return int(np.argmax(image.GetSpacing()))


def _pad_to_multiple(volume: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Replicate-pad (C, D, H, W) at the far ends so every spatial size is a multiple; returns the original size."""
    size = tuple(int(n) for n in volume.shape[1:])
    padding: list[int] = []
    for n in reversed(size):
        padding.extend([0, (-n) % multiple])
    if any(padding):
        volume = functional.pad(volume[None], padding, mode="replicate")[0]
    return volume, size


class ThickSliceSuperResolution:
    """Pipeline class for the engine's PIPELINES table (see tasks.py for the interface)."""

    def __init__(self, model: Any, weight_paths: dict[str, Any], device: torch.device, options: dict[str, Any]):
        payload = torch.load(weight_paths["network"], map_location="cpu", weights_only=True)
        try:
            network = ResidualUNet3D(in_channels=3, features=payload["features"])
            network.load_state_dict(payload["state_dict"])
        except (KeyError, RuntimeError) as error:
            raise ModelError(f"The weights of model '{model.title}' do not fit its network ({error}).") from error
        self.network = network.eval().to(device)
        self.device = device
        self.options = {"output_spacing_mm": 1.0, "roi_size": 96, "overlap": 0.25, "uncertainty": False,
                        "difference": False, **options}

    def to(self, device: torch.device) -> ThickSliceSuperResolution:
        self.network = self.network.to(device)
        self.device = device
        return self

    def _predict_array(self, inputs: torch.Tensor, progress: ProgressCallback, label: str,
                       low: float, high: float) -> tuple[torch.Tensor, Any]:
        """Network output for a (3, D, H, W) input, windowed; progress mapped into [low, high]."""
        padded, size = _pad_to_multiple(inputs, 4)
        roi = tuple(min(int(self.options["roi_size"]), n) for n in padded.shape[1:])
        config = WindowedInferenceConfig(roi_size=roi, overlap=float(self.options["overlap"]), mode="gaussian",
                                         skip_background=False, output_dtype=torch.float32,
                                         output_kind="intensities")

        def report(fraction: float) -> None:
            progress("inference", low + (high - low) * fraction, f"{label}: {fraction:.0%}")

        output, report_ = sliding_window_predict(self.network, padded, config, self.device, report)
        if str(report_.device) != str(self.device):
            self.to(torch.device(report_.device))
        return output[0, : size[0], : size[1], : size[2]], report_

    def predict(self, image: sitk.Image, progress: ProgressCallback) -> dict[str, Any]:
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError("Synthesis needs a 3D single-channel volume.")
        warnings: list[str] = []
        axis = thick_axis(image)
        spacing = np.asarray(image.GetSpacing(), dtype=float)
        slice_spacing = float(spacing[axis])
        if slice_spacing < THICK_SLICE_MIN_MM:
            warnings.append(f"The input has {slice_spacing:.2f} mm voxels at most, not thick slices; the network was "
                            "trained for 2-7 mm slices and will mostly smooth this image.")
        elif not TRAINED_SPACING_MM[0] - 0.25 <= slice_spacing <= TRAINED_SPACING_MM[1] + 0.5:
            warnings.append(f"The slices are {slice_spacing:.1f} mm apart; the network was trained for 2-7 mm, so "
                            "expect a weaker result.")
        others = [float(spacing[index]) for index in range(3) if index != axis]
        if max(others) > THICK_SLICE_MIN_MM:
            warnings.append(f"Two axes are coarse ({', '.join(f'{value:.1f}' for value in sorted(spacing))} mm); only "
                            "the thickest is super-resolved, the other is interpolated.")
        output_spacing = float(self.options["output_spacing_mm"])
        grid, offset = isotropic_grid(image, output_spacing)
        size_text = "x".join(map(str, grid.GetSize()))
        progress("resample", 0.15, f"Resampling onto a {output_spacing:g} mm grid of {size_text} voxels")
        source = sitk.Cast(image, sitk.sitkFloat32)
        in_plane = [0.0 if index == axis or spacing[index] >= 0.9 * output_spacing else
                    0.5 * math.sqrt(output_spacing**2 - spacing[index] ** 2) for index in range(3)]
        if any(in_plane):  # anti-alias finer in-plane voxels before sampling them at 1 mm
            source = sitk.SmoothingRecursiveGaussian(source, [max(value, 1e-3) for value in in_plane])
            source = sitk.Cast(source, sitk.sitkFloat32)
        linear = sitk.Resample(source, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)
        array_axis = 2 - axis  # sitk index axis i <-> numpy axis 2 - i
        upsampled = torch.from_numpy(np.moveaxis(sitk.GetArrayFromImage(linear), array_axis, 0).copy())
        positions = torch.arange(upsampled.shape[0], dtype=torch.float64) * output_spacing
        slice_index = ((offset[axis] + positions) / slice_spacing).float()
        normalised, low, scale = normalise(upsampled)
        inputs = network_input(normalised, slice_index, slice_spacing)
        flips: list[tuple[int, ...]] = [()]
        if self.options.get("uncertainty"):
            flips += [(2,), (3,), (2, 3)]  # in-plane flips: the slice geometry stays the same
        predictions, reports = [], []
        for index, dims in enumerate(flips):
            low_fraction = 0.2 + 0.7 * index / len(flips)
            high_fraction = 0.2 + 0.7 * (index + 1) / len(flips)
            flipped = inputs.flip(list(dims)) if dims else inputs
            label = "Network" if len(flips) == 1 else f"Network, flip {index + 1} of {len(flips)}"
            output, report_ = self._predict_array(flipped, progress, label, low_fraction, high_fraction)
            predictions.append(output.flip([d - 1 for d in dims]) if dims else output)
            reports.append(report_)
        stacked = torch.stack(predictions)
        mean = stacked.mean(dim=0) * scale + low
        minimum = float(sitk.GetArrayViewFromImage(image).min())
        result = {"image": self._to_image(mean.clamp(min=minimum), array_axis, grid), "warnings": warnings}
        if len(predictions) > 1:
            result["uncertainty"] = self._to_image(stacked.std(dim=0) * scale, array_axis, grid)
        if self.options.get("difference"):
            progress("difference", 0.93, "Difference against B-spline interpolation")
            bspline = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkBSpline,
                                    0.0, sitk.sitkFloat32, True)
            result["difference"] = sitk.Subtract(result["image"], bspline)
        result["provenance"] = {
            "thick_axis": "IJK"[axis], "slice_spacing_mm": round(slice_spacing, 4),
            "input_spacing_mm": [round(float(value), 4) for value in spacing],
            "output_size": list(grid.GetSize()), "output_spacing_mm": output_spacing,
            "normalisation": {"offset": low, "scale": scale}, "test_time_flips": len(flips),
            "inference": [{"device": r.device, "precision": r.precision, "windows": r.windows_evaluated,
                           "seconds": round(r.seconds, 3), "fallbacks": r.fallbacks, "notes": r.notes}
                          for r in reports],
        }
        return result

    @staticmethod
    def _to_image(volume: torch.Tensor, array_axis: int, grid: sitk.Image) -> sitk.Image:
        array = np.ascontiguousarray(np.moveaxis(volume.numpy().astype(np.float32), 0, array_axis))
        output = sitk.GetImageFromArray(array)
        output.CopyInformation(grid)
        return output
