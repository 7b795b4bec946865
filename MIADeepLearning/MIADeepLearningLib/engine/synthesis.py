"""Thick-slice MRI -> 1 mm isotropic volume: the synthesis pipeline of the engine.

The input is resampled linearly onto a 1 mm grid with the input's orientation that covers its physical extent; the
network (trained on simulated thick-slice acquisitions, see training/train_synthesis.py) adds what interpolation
cannot recover. Because the output grid keeps the input's axes, the thick-slice axis is one array axis; it is moved
to the front, where the network was trained to expect it, and back afterwards.

The network runs only over the head's box (engine/crop.py; option ``crop_to_head``, default true) with a margin of
the network's reach: outside it the output is the interpolated input, which is what a residual network that adds a
learned correction gives on air (the correction there is about zero). The test-time flips run on the same box.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from MIADeepLearningLib.engine import crop
from MIADeepLearningLib.engine.encoding import network_input, normalise
from MIADeepLearningLib.engine.errors import InputError, ModelError
from MIADeepLearningLib.engine.geometry import isotropic_grid, resample_anti_aliased
from MIADeepLearningLib.engine.inference import WindowedInferenceConfig, pad_to_multiple, sliding_window_predict
from MIADeepLearningLib.engine.networks import ResidualUNet3D

ProgressCallback = Callable[[str, float, str], None]
PIPELINE_NAME = "thick_slice_super_resolution"
THICK_SLICE_MIN_MM = 1.5  # spacing above which an axis counts as "thick"
TRAINED_SPACING_MM = (2.0, 7.0)  # the slice spacings the network saw in training


def thick_axis(image: sitk.Image) -> int:
    """The image axis (0 = i) with the largest spacing: the slice-select direction of a thick-slice scan."""
    return int(np.argmax(image.GetSpacing()))


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
                        "difference": False, crop.OPTION: True, **options}
        self.crop_to_head = crop.crop_option(self.options, getattr(model, "title", "thick-slice synthesis"))

    def to(self, device: torch.device) -> ThickSliceSuperResolution:
        self.network = self.network.to(device)
        self.device = device
        return self

    def _predict_array(self, inputs: torch.Tensor, progress: ProgressCallback, label: str,
                       low: float, high: float) -> tuple[torch.Tensor, Any]:
        """Network output for a (3, D, H, W) input, windowed; progress mapped into [low, high]."""
        padded, size = pad_to_multiple(inputs, 4)
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

    def head_box(self, inputs: torch.Tensor) -> tuple[slice, ...] | None:
        """The box (spatial slices of the (3, D, H, W) network input) the network runs over, found on channel 0
        (the interpolated image) with a margin of the network's reach; None: the whole volume (the option is off,
        or the box would not save MIN_SAVING of the windows)."""
        if not self.crop_to_head:
            return None
        multiple = int(self.network.size_multiple)
        box = crop.foreground_box(inputs[0].numpy(), crop.unet_reach(multiple), multiple)
        shape = tuple(int(n) for n in inputs.shape[1:])
        worth = crop.worth_it(box, shape, int(self.options["roi_size"]), float(self.options["overlap"]), multiple)
        return box if worth else None

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
        linear = resample_anti_aliased(image, grid, keep_axes=(axis,))  # finer in-plane voxels: no aliasing at 1 mm
        array_axis = 2 - axis  # sitk index axis i <-> numpy axis 2 - i
        upsampled = torch.from_numpy(np.moveaxis(sitk.GetArrayFromImage(linear), array_axis, 0).copy())
        positions = torch.arange(upsampled.shape[0], dtype=torch.float64) * output_spacing
        slice_index = ((offset[axis] + positions) / slice_spacing).float()
        normalised, low, scale = normalise(upsampled)
        inputs = network_input(normalised, slice_index, slice_spacing)
        box = self.head_box(inputs)
        region = inputs if box is None else inputs[(slice(None), *box)].contiguous()
        flips: list[tuple[int, ...]] = [()]
        if self.options.get("uncertainty"):
            flips += [(2,), (3,), (2, 3)]  # in-plane flips: the slice geometry stays the same
        predictions, reports = [], []
        for index, dims in enumerate(flips):
            low_fraction = 0.2 + 0.7 * index / len(flips)
            high_fraction = 0.2 + 0.7 * (index + 1) / len(flips)
            flipped = region.flip(list(dims)) if dims else region
            label = "Network" if len(flips) == 1 else f"Network, flip {index + 1} of {len(flips)}"
            output, report_ = self._predict_array(flipped, progress, label, low_fraction, high_fraction)
            output = output.flip([d - 1 for d in dims]) if dims else output
            if box is not None:  # outside the box: the interpolated input (every flip alike, so no spread there)
                filled = inputs[0].float().clone()
                filled[box] = output
                output = filled
            predictions.append(output)
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
            "crop": self._describe(box, inputs.shape[1:], array_axis),
            "inference": [{"device": r.device, "runtime": r.runtime, "precision": r.precision,
                           "windows": r.windows_evaluated,
                           "seconds": round(r.seconds, 3), "fallbacks": r.fallbacks, "notes": r.notes}
                          for r in reports],
        }
        return result

    @staticmethod
    def _describe(box: tuple[slice, ...] | None, shape: Any, array_axis: int) -> str:
        """crop.describe_box in the output grid's (i, j, k) order, as output_size: the network's arrays have the
        thick axis first."""
        network_axes = [array_axis] + [axis for axis in range(3) if axis != array_axis]  # (z, y, x) axis of each
        order = [network_axes.index(axis) for axis in (2, 1, 0)]  # network axis of each of i, j, k
        sizes = [int(n) for n in shape]
        ijk_box = None if box is None else [box[axis] for axis in order]
        return crop.describe_box(ijk_box, [sizes[axis] for axis in order])

    @staticmethod
    def _to_image(volume: torch.Tensor, array_axis: int, grid: sitk.Image) -> sitk.Image:
        array = np.ascontiguousarray(np.moveaxis(volume.numpy().astype(np.float32), 0, array_axis))
        output = sitk.GetImageFromArray(array)
        output.CopyInformation(grid)
        return output
