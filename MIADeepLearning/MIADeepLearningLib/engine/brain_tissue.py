"""Brain tissue segmentation (background / CSF / gray matter / white matter) with a contrast-agnostic SynthSeg-style
network: the inference side of training/train_segmentation.py.

The network was trained on 2 mm renders of label maps with random contrasts, deformations and thick-slice
acquisitions, so at inference any MRI (any contrast, orientation, voxel size, thick slices) is brought onto such a
grid: the input is resampled linearly (anti-aliased where its voxels are finer) onto isotropic voxels of the model's
working spacing over the input's whole extent, with the input's axes permuted and flipped to the orientation the
training arrays had (obliquity kept), normalised like the training renders and run through the network in windows.
The softmax probabilities, never labels, are resampled linearly back onto the input grid, where the argmax gives
labels on exactly the input's voxels (1 CSF, 2 GM, 3 WM). With the ``uncertainty`` option the network also runs on
mirrored copies; the mean of their probabilities gives the labels and its normalised entropy the uncertainty map.
``flip_average`` (a package default) always takes the labels from that mean — the mirrored copy is a second opinion
that measurably helps (about +0.01 Dice for brain-tissue 0.1.0) — so asking for the map does not change them.
``grid_shifts_mm`` runs the whole thing again on copies of the working grid shifted by a fraction of a voxel and
averages the probabilities on the input grid: each copy samples the partial volumes of a fine scan differently.
``crop_to_head`` (default true) runs the network only over the head's box on each working grid (engine/crop.py,
CROP_MARGIN_MM around the foreground) when that needs fewer or smaller windows; outside the box the probabilities are
background's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from MIADeepLearningLib.engine import crop, geometry
from MIADeepLearningLib.engine.encoding import normalise
from MIADeepLearningLib.engine.errors import InputError, ModelError
from MIADeepLearningLib.engine.inference import (
    InferenceReport,
    WindowedInferenceConfig,
    pad_to_multiple,
    sliding_window_predict,
)
from MIADeepLearningLib.engine.networks import UNet3D

ProgressCallback = Callable[[str, float, str], None]
PIPELINE_NAME = "brain_tissue_segmentation"
WEIGHTS_ROLE = "network"
# The array orientation of the training label maps (shared/data/brain-label-maps are all LIA; train_segmentation
# augments with +-15 degree rotations and left-right flips only, never axis permutations). A package trained on maps
# of another orientation says so in slicer.options.orientation; "input" keeps the input's own axes.
DEFAULT_ORIENTATION = "LIA"
KEEP_INPUT_AXES = "input"
# Test-time flips: anatomical axis -> its LPS coordinate. The default mirrors left-right only, the one flip the
# network saw in training; a package may add "AP" and "SI" in slicer.options.flip_axes.
FLIP_AXES = {"LR": 0, "AP": 1, "SI": 2}
DEFAULT_FLIP_AXES = ("LR",)
# Air kept around the head's box (crop_to_head). The network's InstanceNorm makes its output depend on everything in a
# window, so this is not a receptive field but a measured choice: see Docs/Developers.md (cropping to the head).
CROP_MARGIN_MM = 16.0

# Standard names, colours and terminology of the tissue classes (training.generator.TISSUE_CLASSES), for packages
# whose metadata names no segments (slicer.segments overrides them label by label). Where each code comes from:
# - gray and white matter: Slicer's "3D Slicer General Anatomy list" (Modules/Loadable/Terminologies/Resources/
#   SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json), category "Anatomical Structure" SCT 123037004,
#   types "Gray Matter" SCT 389081007 (recommended colour 200, 200, 235) and "White Matter" SCT 389080008
#   (250, 250, 210).
# - CSF: that list has no cerebrospinal fluid type; SNOMED CT 65216001 "Cerebrospinal fluid" (a substance) under the
#   list's category "Body Substance" SCT 91720002. Colour 85, 188, 255, a light blue believed to be
#   "cerebro-spinal fluid" in Slicer's GenericAnatomyColors table (not checked against a copy of that table).
SLICER_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_REGION_CONTEXT = "Anatomic codes - DICOM master list"


def terminology_entry(category: str, segment_type: str) -> str:
    """A Slicer terminology entry string (context~category~type~modifier~region context~region~region modifier) for a
    category and type given as 'SCT^code^meaning'."""
    return f"{SLICER_ANATOMY_CONTEXT}~{category}~{segment_type}~^^~{ANATOMIC_REGION_CONTEXT}~^^~^^"


TISSUE_SEGMENTS: dict[str, dict[str, Any]] = {
    "csf": {"name": "CSF", "color": [85, 188, 255],
            "terminology": terminology_entry("SCT^91720002^Body Substance", "SCT^65216001^Cerebrospinal fluid")},
    "gm": {"name": "Gray matter", "color": [200, 200, 235],
           "terminology": terminology_entry("SCT^123037004^Anatomical Structure", "SCT^389081007^Gray Matter")},
    "wm": {"name": "White matter", "color": [250, 250, 210],
           "terminology": terminology_entry("SCT^123037004^Anatomical Structure", "SCT^389080008^White Matter")},
}


def tissue_segments(classes: list[str], declared: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One segment per class after the background (label value = output channel): the standard description of the
    class (TISSUE_SEGMENTS), updated with what the package's metadata declares for that value. A declared value the
    network cannot output is an error: it would promise a structure that never appears."""
    by_value = {int(segment["value"]): segment for segment in declared}
    unknown = sorted(value for value in by_value if not 1 <= value < len(classes))
    if unknown:
        raise ModelError(f"The model's metadata describes labels {unknown}, but its network outputs only labels "
                         f"1 to {len(classes) - 1}.")
    segments = []
    for value, name in enumerate(classes[1:], start=1):
        segment = {"value": value, "name": str(name), "color": [128, 128, 128], "terminology": "",
                   **TISSUE_SEGMENTS.get(str(name).lower(), {})}
        segment.update({key: item for key, item in by_value.get(value, {}).items() if item is not None})
        segments.append(segment)
    return segments


def load_network(path: Any, title: str) -> tuple[UNet3D, list[str], float]:
    """(network, class names, working spacing in mm) from the weights-only file train_segmentation --export writes;
    a ModelError that names the model when the file does not rebuild the network."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    try:
        classes = [str(name) for name in payload["classes"]]
        spacing = float(payload["working_spacing"])
        if len(classes) < 2 or classes[0] != "background" or not spacing > 0:
            raise ValueError(f"classes {classes} (background first) and working spacing {spacing} mm")
        network = UNet3D(in_channels=1, out_channels=len(classes), features=payload["features"])
        network.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        raise ModelError(f"The weights of model '{title}' do not fit its network ({error}).") from error
    return network, classes, spacing


REFINEMENT_REGION = 0.9  # voxels whose background probability is below this are refined
MIXTURE_STEPS = 5  # EM steps of each class's intensity mixture per refinement iteration


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, quantiles: tuple[float, ...]) -> np.ndarray:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    cumulative /= cumulative[-1]
    return values[order][np.minimum(np.searchsorted(cumulative, quantiles), values.size - 1)]


def _class_likelihood(values: np.ndarray, weights: np.ndarray, components: int, floor: float) -> np.ndarray:
    """Likelihood of every value under a Gaussian mixture (`components` Gaussians) fitted to the values weighted by
    one class's probabilities: weighted EM from the weighted quantiles, a few steps."""
    total = float(weights.sum())
    mean = float((weights * values).sum()) / total
    variance = max(float((weights * (values - mean) ** 2).sum()) / total, floor)
    if components == 1:
        return np.exp(-0.5 * (values - mean) ** 2 / variance) / math.sqrt(variance)
    quantiles = tuple((index + 0.5) / components for index in range(components))
    means = _weighted_quantiles(values, weights, quantiles).astype(np.float64)[:, None]
    variances = np.full((components, 1), max(variance / components**2, floor))
    shares = np.full((components, 1), 1.0 / components)
    for _ in range(MIXTURE_STEPS):
        densities = shares * np.exp(-0.5 * (values - means) ** 2 / variances) / np.sqrt(variances)
        responsibilities = densities / np.maximum(densities.sum(axis=0, keepdims=True), 1e-300) * weights
        mass = np.maximum(responsibilities.sum(axis=1, keepdims=True), 1e-12)
        shares = mass / mass.sum()
        means = (responsibilities * values).sum(axis=1, keepdims=True) / mass
        variances = np.maximum((responsibilities * (values - means) ** 2).sum(axis=1, keepdims=True) / mass, floor)
    return (shares * np.exp(-0.5 * (values - means) ** 2 / variances) / np.sqrt(variances)).sum(axis=0)


def refine_with_intensities(probabilities: np.ndarray, intensities: np.ndarray, iterations: int = 2,
                            components: int = 2, overwrite: bool = False) -> np.ndarray:
    """The network's tissue probabilities sharpened with the scan's own intensities, on the input's grid.

    Why: the network works on a 2 mm grid, so its probabilities, interpolated onto a finer input, blur every tissue
    boundary; the input itself still shows those boundaries. Inside the head (background probability below
    REFINEMENT_REGION) each tissue class gets an intensity model fitted to this scan — a mixture of `components`
    Gaussians (two: a tissue's sub-structures need not share one intensity, e.g. deep gray nuclei and cortex),
    weighted by the network's probabilities, so no contrast is assumed: a T1, a T2 or any other contrast fits its own
    — and the tissue posterior is prior × likelihood, renormalised: a per-scan mixture model with the network as
    spatial prior, refitted `iterations` times (EM). Where two tissues look alike the likelihoods cancel and the
    network decides; the background probability is kept as the network gave it; a class with less than one voxel of
    probability is not fitted. probabilities: (K, ...) with class 0 = background; returns the same shape, float32.
    `overwrite`: a float32 `probabilities` may be normalised and refined in place (and returned), one copy less.
    """
    # Memory: on a whole-body CT every array here is hundreds of millions of voxels, so nothing is copied that
    # need not be (a new normalised array, updated in place; the voxels converted only inside the region; the
    # posterior computed in the likelihood's own array): the same operations in the same order, the same numbers.
    total = np.maximum(probabilities.sum(axis=0, keepdims=True), 1e-6)
    if overwrite and probabilities.dtype == np.float32:
        probabilities /= total
    else:
        probabilities = (probabilities / total).astype(np.float32, copy=False)  # a new array: refined in place below
    del total
    region = probabilities[0] < REFINEMENT_REGION
    if iterations <= 0 or probabilities.shape[0] < 3 or not region.any():
        return probabilities
    values = np.asarray(intensities)[region].astype(np.float64)
    prior = probabilities[1:, region].astype(np.float64)
    floor = (1e-3 * (float(values.max() - values.min()) or 1.0)) ** 2
    posterior = prior
    for _ in range(iterations):
        usable = posterior.sum(axis=1) > 1.0
        if usable.sum() < 2:
            return probabilities
        likelihood = np.ones_like(posterior)
        for index in np.flatnonzero(usable):
            likelihood[index] = _class_likelihood(values, posterior[index], components, floor)
        likelihood *= prior  # the joint probability
        likelihood /= np.maximum(likelihood.sum(axis=0, keepdims=True), 1e-300)
        posterior = likelihood
    probabilities[1:, region] = (posterior * (1.0 - probabilities[0, region])).astype(np.float32)
    return probabilities


def grid_shifts(value: Any, working_spacing: float, title: str) -> list[tuple[float, float, float]]:
    """The option grid_shifts_mm checked: a non-empty list of (i, j, k) shifts in mm along the working grid's axes,
    each smaller than one working voxel (a whole voxel would sample the same points)."""
    try:
        shifts = [tuple(float(component) for component in shift) for shift in value]
    except (TypeError, ValueError):
        shifts = []
    if not shifts or any(len(shift) != 3 or not all(math.isfinite(c) and abs(c) < working_spacing for c in shift)
                         for shift in shifts):
        raise ModelError(f"Model '{title}': grid_shifts_mm must be a list of [i, j, k] shifts in mm, each component "
                         f"smaller than the {working_spacing:g} mm working spacing; got {value!r}.")
    return shifts


def shifted_grid(grid: sitk.Image, shift_mm: tuple[float, float, float]) -> sitk.Image:
    """The same grid moved by `shift_mm` along its own axes."""
    moved = sitk.Image(grid)
    direction = np.asarray(grid.GetDirection(), dtype=float).reshape(3, 3)
    moved.SetOrigin([float(value) for value in np.asarray(grid.GetOrigin()) + direction @ np.asarray(shift_mm)])
    return moved


COPIES_OPTION = "test_time_copies"
TEST_TIME_COPIES = (1, 2, 4)


class BrainTissueSegmentation:
    """Pipeline class for the engine's PIPELINES table (see tasks.py for the interface)."""

    def __init__(self, model: Any, weight_paths: dict[str, Any], device: torch.device, options: dict[str, Any]):
        title = getattr(model, "title", "brain tissue")
        network, self.classes, self.working_spacing = load_network(weight_paths[WEIGHTS_ROLE], title)
        self.segments = tissue_segments(self.classes, list(getattr(model, "segments", [])))
        self.network = network.eval().to(device)
        self.device = device
        self.options = {"roi_size": 96, "overlap": 0.5, "uncertainty": False, "flip_average": False,
                        "intensity_refinement_iterations": 0, "grid_shifts_mm": [[0.0, 0.0, 0.0]],
                        "orientation": DEFAULT_ORIENTATION,
                        "flip_axes": list(DEFAULT_FLIP_AXES), crop.OPTION: True, **options}
        self.crop_to_head = crop.crop_option(self.options, title)
        orientation = self.options["orientation"]
        if orientation != KEEP_INPUT_AXES:
            try:
                geometry.orientation_axes(str(orientation))
            except ValueError as error:
                raise ModelError(f"Model '{title}': option orientation {error}") from error
        unknown = [axis for axis in self.options["flip_axes"] if axis not in FLIP_AXES]
        if unknown:
            raise ModelError(f"Model '{title}': flip_axes {unknown} are not among {sorted(FLIP_AXES)}.")
        self.grid_shifts = grid_shifts(self.options["grid_shifts_mm"], self.working_spacing, title)
        copies = self.options.get(COPIES_OPTION)
        if copies is not None:
            self._set_test_time_copies(copies, title)

    def _set_test_time_copies(self, copies: Any, title: str) -> None:
        """The speed / accuracy choice in one number: 1 (the input as it is), 2 (+ its left-right mirror) or 4 (+
        both again on a grid shifted by half a working voxel, or by the model's second grid shift). Each copy is a
        full network run; what each costs and gains is measured in the model card."""
        if isinstance(copies, bool) or copies not in TEST_TIME_COPIES:
            raise ModelError(f"Model '{title}': {COPIES_OPTION} must be one of {', '.join(map(str, TEST_TIME_COPIES))}"
                             f", not {copies!r}.")
        self.options["flip_average"] = copies >= 2
        if copies < 4:
            self.grid_shifts = self.grid_shifts[:1]
        elif len(self.grid_shifts) < 2:
            half = self.working_spacing / 2.0
            self.grid_shifts = [self.grid_shifts[0], (half, half, half)]
        else:
            self.grid_shifts = self.grid_shifts[:2]

    def to(self, device: torch.device) -> BrainTissueSegmentation:
        self.network = self.network.to(device)
        self.device = device
        return self

    def working_grid(self, image: sitk.Image) -> sitk.Image:
        """The grid the network runs on: working-spacing voxels over the input's extent, in the training
        orientation (or the input's own axes)."""
        orientation = self.options["orientation"]
        grid, _ = geometry.isotropic_grid(image, self.working_spacing,
                                          None if orientation == KEEP_INPUT_AXES else str(orientation))
        return grid

    def flip_dims(self, grid: sitk.Image) -> dict[str, int]:
        """Anatomical flip axis -> the array axis ((z, y, x) order) of the grid that runs closest to it; an array
        axis is flipped once even when an oblique grid makes it the closest to two anatomical axes."""
        direction = np.abs(np.asarray(grid.GetDirection(), dtype=float).reshape(3, 3))
        dims: dict[str, int] = {}
        for axis in self.options["flip_axes"]:
            dim = 2 - int(np.argmax(direction[FLIP_AXES[axis]]))  # sitk index axis i <-> numpy axis 2 - i
            if dim not in dims.values():
                dims[axis] = dim
        return dims

    def head_box(self, volume: torch.Tensor) -> tuple[slice, ...] | None:
        """The box (spatial slices of a (1, D, H, W) working-grid input) the network runs over; None: the whole
        grid (the option is off, or the box would not save MIN_SAVING of the windows)."""
        if not self.crop_to_head:
            return None
        multiple = int(self.network.size_multiple)
        margin = math.ceil(CROP_MARGIN_MM / self.working_spacing - 1e-9)
        box = crop.foreground_box(volume[0].numpy(), margin, multiple)
        shape = tuple(int(n) for n in volume.shape[1:])
        return box if crop.worth_it(box, shape, self._roi_size(), float(self.options["overlap"]), multiple) else None

    def _roi_size(self) -> int:
        multiple = int(self.network.size_multiple)
        return max(multiple, int(self.options["roi_size"]) // multiple * multiple)

    def _probabilities(self, volume: torch.Tensor, progress: ProgressCallback, label: str, low: float,
                       high: float) -> tuple[torch.Tensor, InferenceReport]:
        """Softmax over the classes, (K, D, H, W), of a (1, D, H, W) input; windowed, progress in [low, high]."""
        padded, size = pad_to_multiple(volume, int(self.network.size_multiple))
        roi = tuple(min(self._roi_size(), n) for n in padded.shape[1:])
        config = WindowedInferenceConfig(roi_size=roi, overlap=float(self.options["overlap"]), mode="gaussian",
                                         output_kind="labels")

        def report(fraction: float) -> None:
            progress("inference", low + (high - low) * fraction, f"{label}: {fraction:.0%}")

        logits, report_ = sliding_window_predict(self.network, padded, config, self.device, report)
        if str(report_.device) != str(self.device):  # the inference fell back to the CPU: stay there
            self.to(torch.device(report_.device))
        return torch.softmax(logits[:, : size[0], : size[1], : size[2]], dim=0), report_

    def probabilities_on_input(self, image: sitk.Image, progress: ProgressCallback, low: float = 0.15,
                               high: float = 0.85, flip_average: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
        """The class probabilities (K, ...) on the input's grid, averaged over the test-time copies (mirrored with
        `flip_average` or the options, shifted grids), and what the provenance says about how they were made;
        progress in [low, high]."""
        grid = self.working_grid(image)
        orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(grid.GetDirection())
        size_text = "x".join(map(str, grid.GetSize()))
        progress("resample", low * 0.8, f"Resampling onto a {self.working_spacing:g} mm {orientation} grid of "
                                        f"{size_text} voxels")
        smoothed = geometry.anti_aliased(image, self.working_spacing)  # once, for every shifted copy of the grid
        flips: dict[str, int | None] = {"none": None}
        if flip_average or self.options.get("uncertainty") or self.options.get("flip_average"):
            flips.update(self.flip_dims(grid))
        copies = len(self.grid_shifts) * len(flips)
        total: np.ndarray | None = None
        reports, normalisation, crops = [], {}, []
        for shift_index, shift in enumerate(self.grid_shifts):
            moved = shifted_grid(grid, shift)
            working = geometry.resample_linear(smoothed, moved)
            normalised, offset, scale = normalise(torch.from_numpy(sitk.GetArrayFromImage(working)))
            normalisation = normalisation or {"offset": offset, "scale": scale}
            inputs = normalised[None].float()
            box = self.head_box(inputs)
            crops.append(crop.describe_box(None if box is None else box[::-1], grid.GetSize()))  # (i, j, k) order
            region = inputs if box is None else inputs[(slice(None), *box)].contiguous()
            on_grid: torch.Tensor | None = None
            for flip_index, dim in enumerate(flips.values()):
                index = shift_index * len(flips) + flip_index
                label = "Network" if copies == 1 else f"Network, copy {index + 1} of {copies}"
                flipped = region if dim is None else region.flip(dim + 1)  # dim 0 of the tensors is the channel
                probabilities, report_ = self._probabilities(flipped, progress, label,
                                                             low + (high - low) * index / copies,
                                                             low + (high - low) * (index + 1) / copies)
                if dim is not None:
                    probabilities = probabilities.flip(dim + 1)
                on_grid = probabilities if on_grid is None else on_grid + probabilities
                reports.append(report_)
            assert on_grid is not None
            on_grid /= len(flips)
            if box is not None:  # outside the head's box: background, as the network gives on air
                whole = torch.zeros((on_grid.shape[0], *inputs.shape[1:]), dtype=on_grid.dtype)
                whole[0] = 1.0
                whole[(slice(None), *box)] = on_grid
                on_grid = whole
            total = self._to_input_grid(on_grid.numpy(), moved, image, add_to=total)
            del working
        assert total is not None
        del smoothed  # a float32 copy of the whole input: not needed any more
        total /= len(self.grid_shifts)
        provenance = {
            "working_grid": {"size": list(grid.GetSize()), "spacing_mm": self.working_spacing,
                             "orientation": orientation},
            "classes": self.classes,
            "normalisation": normalisation,  # of the unshifted grid (the first)
            "test_time_flips": list(flips),  # "none" (the input as it is), then the mirrored anatomical axes
            "grid_shifts_mm": [list(shift) for shift in self.grid_shifts],
            "crop": crops,  # one per working grid, in the order of grid_shifts_mm: each finds its own box
            "inference": [{"device": r.device, "runtime": r.runtime, "precision": r.precision,
                           "windows": r.windows_evaluated,
                           "seconds": round(r.seconds, 3), "fallbacks": r.fallbacks, "notes": r.notes}
                          for r in reports],
        }
        return total, provenance

    def predict(self, image: sitk.Image, progress: ProgressCallback) -> dict[str, Any]:
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError("Tissue segmentation needs a 3D single-channel volume.")
        total, provenance = self.probabilities_on_input(image, progress)
        progress("postprocess", 0.88, "Combining the probabilities on the input grid")
        refinement = int(self.options.get("intensity_refinement_iterations", 0))
        labels, uncertainty = self._labels(total, image, bool(self.options.get("uncertainty")), refinement)
        result: dict[str, Any] = {"label": labels, "warnings": []}
        if uncertainty is not None:
            result["uncertainty"] = uncertainty
        provenance["intensity_refinement_iterations"] = refinement
        result["provenance"] = {key: provenance[key] for key in (
            "working_grid", "classes", "normalisation", "test_time_flips", "grid_shifts_mm", "crop",
            "intensity_refinement_iterations", "inference")}
        return result

    @staticmethod
    def _to_input_grid(probabilities: np.ndarray, grid: sitk.Image, image: sitk.Image,
                       add_to: np.ndarray | None = None) -> np.ndarray:
        """(K, ...) probabilities on `grid` resampled linearly onto the input's grid, class by class, in [0, 1];
        added into `add_to` (the sum over shifted grids) when given. Why in place: on the input grid each class is
        4 bytes a voxel, and a list, a stack and a sum of such arrays took 12 times that on a whole-body CT."""
        classes = probabilities.shape[0]
        fresh = add_to is None
        if fresh:
            add_to = np.empty((classes, *reversed(image.GetSize())), np.float32)
        for index in range(classes):
            channel = sitk.GetImageFromArray(np.ascontiguousarray(probabilities[index], dtype=np.float32))
            channel.CopyInformation(grid)
            resampled = sitk.Resample(channel, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)
            values = sitk.GetArrayFromImage(resampled)
            del resampled
            np.clip(values, 0.0, 1.0, out=values)
            if fresh:
                add_to[index] = values
            else:
                add_to[index] += values
        return add_to

    @staticmethod
    def _labels(final: np.ndarray, image: sitk.Image, with_uncertainty: bool, refinement_iterations: int = 0
                ) -> tuple[sitk.Image, sitk.Image | None]:
        """Labels (argmax of the probabilities on the input's grid, optionally refined with the input's own
        intensities, see refine_with_intensities) and, if asked, the normalised entropy of the final probabilities,
        both on the input's grid."""
        if refinement_iterations > 0:
            final = refine_with_intensities(final, sitk.GetArrayViewFromImage(image), refinement_iterations,
                                            overwrite=True)
        labels = np.empty(final.shape[1:], np.uint8)
        for start in range(0, labels.shape[0], 16):  # slab by slab: argmax alone would be 8 bytes a voxel
            labels[start:start + 16] = final[:, start:start + 16].argmax(axis=0)
        label_image = sitk.GetImageFromArray(labels)
        label_image.CopyInformation(image)
        if not with_uncertainty:
            return label_image, None
        entropy = np.zeros(final.shape[1:], np.float32)
        for values in final:
            entropy -= values * np.log(np.maximum(values, 1e-12))
        normalised = np.clip(entropy / math.log(final.shape[0]), 0.0, 1.0).astype(np.float32)
        uncertainty = sitk.GetImageFromArray(normalised)
        uncertainty.CopyInformation(image)
        return label_image, uncertainty
