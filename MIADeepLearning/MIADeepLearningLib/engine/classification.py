"""What kind of scan is this? MRI sequence type (and head CT) classification with Grad-CAM saliency maps: the
inference side of training/train_classification.py.

Any volume (any orientation, voxel size, thick slices, field of view) is brought onto one small grid the network
was trained on: an axis-aligned RAS cube of GRID_SIZE³ isotropic voxels fitted around the head's foreground (aspect
kept, so a thick-slice series and a 1 mm volume of the same head give nearly the same input). Three channels:
the robustly normalised image (what MR contrast is about: which tissue is brighter than which) and two fixed
Hounsfield windows (brain and bone/air), which only CT fills consistently. The network's class probabilities name
the type; a label map, a non-head, or a damaged volume is `other`, from the trained class or from checks on the
voxels (few integer values: a label map). The saliency map is MONAI's Grad-CAM at an 8³ feature level, resampled
back onto the input's grid (0-1)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from MIADeepLearningLib.engine import geometry
from MIADeepLearningLib.engine.errors import ModelError
from MIADeepLearningLib.engine.networks import SequenceClassifierNet

ProgressCallback = Callable[[str, float, str], None]
PIPELINE_NAME = "sequence_classification"
WEIGHTS_ROLE = "network"
# The fixed vocabulary: outputs, JSON and the accepted types in other packages' metadata use exactly these strings.
CLASSES = ("t1w", "t1c", "t2w", "flair", "pdw", "dwi", "ct", "other")
CLASS_TITLES = {"t1w": "T1-weighted", "t1c": "T1-weighted after contrast", "t2w": "T2-weighted",
                "flair": "FLAIR", "pdw": "proton density", "dwi": "diffusion (EPI)", "ct": "CT", "other": "other"}
GRID_SIZE = 64  # voxels per axis of the network input
MIN_SPACING_MM = 2.0  # a small field of view is not blown up beyond this
MARGIN_MM = 6.0
# Hounsfield windows of the two CT channels: (low, high) -> 0..1
BRAIN_WINDOW = (-20.0, 100.0)
WIDE_WINDOW = (-1000.0, 2000.0)
LABEL_MAP_MAX_VALUES = 1024  # more distinct integer values than this: an image, not a label map
LABEL_MAP_SMOOTHNESS = 0.75  # share of foreground voxels equal to their neighbour above which it is a label map
DEFAULT_FLIP_AXES = (0,)
NETWORK_OTHER_REASON = "the classifier found no head MR or CT contrast it knows"
# Other models' input checks warn only above this probability of the type found (package option
# warning_min_probability overrides it): a warning that is often wrong teaches clinicians to ignore warnings.
WARNING_MIN_PROBABILITY = 0.5  # test-time mirror images: left-right (the RAS grid's first axis)


def _sample(voxels: np.ndarray, max_points: int = 1_000_000) -> np.ndarray:
    step = max(1, round((voxels.size / max_points) ** (1 / 3)))
    return voxels[::step, ::step, ::step] if voxels.ndim == 3 else voxels


def model_grid(image: sitk.Image, size: int = GRID_SIZE) -> sitk.Image:
    """An empty size³ RAS grid of isotropic voxels centred on the input's foreground box (plus a margin), the
    spacing chosen so the longest side fits: the head fills the cube whatever its voxel size."""
    low, high = geometry.foreground_physical_box(image, max_points=200_000)  # a sample is enough at ~3 mm
    low, high = low - MARGIN_MM, high + MARGIN_MM
    spacing = max(MIN_SPACING_MM, float((high - low).max()) / size)
    centre = (low + high) / 2.0
    half = spacing * (size - 1) / 2.0
    # RAS grid: index 0 is the largest LPS x and y, the smallest z (as geometry.ras_model_grid)
    origin = (centre[0] + half, centre[1] + half, centre[2] - half)
    grid = sitk.Image([size] * 3, sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetOrigin([float(value) for value in origin])
    grid.SetDirection(geometry.RAS_DIRECTION_IN_LPS)
    return grid


def background_value(voxels: np.ndarray) -> float:
    """The value outside the head: the 0.5th percentile (air in CT, noise floor in MR)."""
    return float(np.quantile(_sample(voxels), 0.005))


def network_input(image: sitk.Image, size: int = GRID_SIZE) -> tuple[torch.Tensor, sitk.Image]:
    """(3, size, size, size) float32 channels in RAS index order, and the grid they lie on.

    Channel 0: the image anti-aliased and resampled linearly (the outside filled with the background value), then
    background -> 0 and the 99.5th percentile of the foreground -> 1. Channels 1 and 2: the raw values in the brain
    and wide Hounsfield windows."""
    grid = model_grid(image, size)
    voxels = sitk.GetArrayViewFromImage(image)
    background = background_value(voxels)
    target = float(grid.GetSpacing()[0])
    # block means first (cheap), so the Gaussian anti-aliasing runs on a volume 8-27 times smaller
    factors = [max(1, math.ceil(target / (2.0 * spacing))) if spacing < target else 1
               for spacing in image.GetSpacing()]
    source = sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors) if max(factors) > 1 else image
    source = geometry.anti_aliased(source, target)
    resampled = sitk.Resample(source, grid, sitk.Transform(), sitk.sitkLinear, background, sitk.sitkFloat32)
    values = torch.from_numpy(geometry.ras_array(resampled).astype(np.float32))
    return encode(values, background), grid


def encode(values: torch.Tensor, background: float) -> torch.Tensor:
    """The three network channels from raw values on the model grid (shared with training)."""
    values = torch.nan_to_num(values.float())
    flat = values.flatten()
    if flat.numel() > 100_000:
        flat = flat[:: flat.numel() // 100_000 + 1]
    high_all = float(torch.quantile(flat, 0.995))
    foreground = flat[flat > background + 0.05 * (high_all - background)]
    high = float(torch.quantile(foreground, 0.995)) if foreground.numel() > 100 else high_all
    scale = max(high - background, 1e-6)
    channels = [((values - background) / scale).clamp(-0.5, 2.0)]
    for low, top in (BRAIN_WINDOW, WIDE_WINDOW):
        channels.append(((values - low) / (top - low)).clamp(0.0, 1.0))
    return torch.stack(channels)


def looks_like_label_map(voxels: np.ndarray) -> bool:
    """Integer values that are piecewise constant: a label map or segmentation exported as a volume, not an image.
    (An 8-bit image also holds few integer values, but neighbouring voxels of an image differ, those of a label map
    mostly do not.)"""
    # whole rows (neighbours along the last axis stay neighbours) from every few planes
    step = max(1, round(math.sqrt(voxels.size / 300_000))) if voxels.ndim == 3 else 1
    sample = np.asarray(voxels[::step, ::step] if voxels.ndim == 3 else voxels)
    if not np.all(np.isfinite(sample)) or not np.allclose(sample, np.round(sample)):
        return False
    values, inverse = np.unique(sample, return_inverse=True)
    if values.size > LABEL_MAP_MAX_VALUES:
        return False
    inverse = inverse.reshape(sample.shape)
    foreground = inverse != np.bincount(inverse.ravel()).argmax()  # the commonest value is the background
    same = (sample[..., 1:] == sample[..., :-1]) & foreground[..., 1:]
    inside = int(foreground[..., 1:].sum())
    return inside == 0 or float(same.sum()) / inside > LABEL_MAP_SMOOTHNESS


def _first_problem(error: BaseException) -> str:
    """The line of a (multi-line) loading error that says what does not fit, without its final full stop."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith("Error(s) in loading state_dict")]
    text = (useful or lines or [type(error).__name__])[0].rstrip(".")
    return text if len(text) <= 200 else text[:197] + "…"


def load_network(path: Any, title: str) -> tuple[SequenceClassifierNet, list[str]]:
    """(network, class names) from the weights-only file train_classification --export writes; a ModelError naming
    the model, in one sentence, when the file cannot be read or does not rebuild the network."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors of a file that is not a weights file
        raise ModelError(f"The weights file of model '{title}' cannot be read as PyTorch weights "
                         f"({type(error).__name__}); replace it with the package's own file.") from error
    try:
        classes = [str(name) for name in payload["classes"]]
        if tuple(classes) != CLASSES:
            raise ValueError(f"classes {classes}, expected {list(CLASSES)}")
        network = SequenceClassifierNet(in_channels=3, classes=len(classes), features=payload["features"])
        network.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError, IndexError) as error:
        raise ModelError(f"The weights of model '{title}' do not fit its network ({_first_problem(error)}).") from error
    return network.eval(), classes


@dataclass
class Classification:
    """One volume's result: the label (a CLASSES string), all probabilities, the out-of-distribution flag, and
    the saliency map on the input's grid when asked for."""

    label: str
    probabilities: dict[str, float]
    ood: bool
    reasons: list[str] = field(default_factory=list)
    saliency: sitk.Image | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda item: -item[1])

    @property
    def probability(self) -> float:
        return float(self.probabilities[self.label])

    def summary(self) -> str:
        """'flair (p = 0.96)' — the phrase warnings and tables use."""
        return f"{self.label} (p = {self.probability:.2f})"


def _no_progress(stage: str, fraction: float, message: str) -> None:
    """Default progress sink."""


class SequenceClassifier:
    """The pipeline: load once, classify many volumes (a warm worker keeps it)."""

    def __init__(self, model: Any, weight_paths: dict[str, Any], device: torch.device,
                 options: dict[str, Any] | None = None) -> None:
        self.model = model
        self.options = dict(options or {})
        title = getattr(model, "title", "sequence classifier")
        if WEIGHTS_ROLE not in weight_paths:
            raise ModelError(f"Model '{title}' has no '{WEIGHTS_ROLE}' weights file.")
        self.network, self.classes = load_network(weight_paths[WEIGHTS_ROLE], title)
        self.device = torch.device("cpu")
        self.to(device)

    def to(self, device: torch.device) -> SequenceClassifier:
        self.device = torch.device(device)
        self.network.to(self.device)
        return self

    def _probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """Class probabilities, averaged over the input and its mirror images along the axes in the package option
        `flip_axes` (RAS axis indices; default left-right only): one batched pass, a steadier answer for ~0.05 s."""
        axes = [int(axis) for axis in self.options.get("flip_axes", DEFAULT_FLIP_AXES)]
        batch = torch.stack([inputs] + [inputs.flip(axis + 1) for axis in axes])  # +1: the channel axis comes first
        with torch.no_grad():
            return torch.softmax(self.network(batch.to(self.device)).float(), dim=1).mean(dim=0).cpu()

    def classify(self, image: sitk.Image, saliency: bool = False,
                 progress: ProgressCallback = _no_progress) -> Classification:
        """Classify one scalar 3D volume (checked by the caller for structure); saliency on request."""
        timings: dict[str, float] = {}
        started = time.perf_counter()
        voxels = sitk.GetArrayViewFromImage(image)
        reasons: list[str] = []
        progress("classify", 0.1, "Resampling onto the classifier's grid")
        inputs, grid = network_input(image)
        timings["prepare_seconds"] = time.perf_counter() - started
        progress("classify", 0.5, "Running the classifier")
        tick = time.perf_counter()
        probabilities = self._probabilities(inputs)
        timings["network_seconds"] = time.perf_counter() - tick
        values = {name: float(probabilities[index]) for index, name in enumerate(self.classes)}
        label = max(values, key=values.get)
        if looks_like_label_map(voxels):
            reasons.append("it holds a few integer values only, like a label map or segmentation")
        extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
        if float(extent.max()) > 600.0:
            reasons.append(f"its field of view ({extent.max():.0f} mm) is larger than a head")
        if label == "other":
            reasons.append(NETWORK_OTHER_REASON)
        if reasons and label != "other":
            label = "other"
        ood = bool(reasons)
        result = Classification(label, values, ood, reasons, timings=timings)
        if saliency:
            progress("saliency", 0.7, "Computing the saliency map (Grad-CAM)")
            tick = time.perf_counter()
            target = self.classes.index(max(values, key=values.get))
            result.saliency = self.saliency_on_input(inputs, grid, image, target)
            timings["saliency_seconds"] = time.perf_counter() - tick
        timings["total_seconds"] = time.perf_counter() - started
        progress("classify", 1.0, f"{result.summary()}")
        return result

    def saliency_array(self, inputs: torch.Tensor, target: int) -> torch.Tensor:
        """Grad-CAM of class `target` on the model grid (GRID_SIZE³, 0..1), with MONAI's implementation."""
        from monai.visualize import GradCAM

        cam = GradCAM(nn_module=self.network, target_layers=self.network.saliency_layer)
        with torch.enable_grad():
            heat = cam(x=inputs.to(self.device)[None], class_idx=target)
        heat = heat[0, 0].detach().float().cpu()
        low, high = float(heat.min()), float(heat.max())
        return (heat - low) / (high - low) if high > low else torch.zeros_like(heat)

    def saliency_on_input(self, inputs: torch.Tensor, grid: sitk.Image, image: sitk.Image,
                          target: int) -> sitk.Image:
        """The Grad-CAM map resampled linearly onto the input's grid (0 outside the model grid), float32 0..1."""
        heat = self.saliency_array(inputs, target).numpy()
        on_grid = geometry.image_from_ras_array(heat.astype(np.float32), grid)
        resampled = sitk.Resample(on_grid, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        resampled.CopyInformation(image)
        return resampled


def mismatch_warning(result: Classification, accepted: Sequence[str], model_title: str,
                     min_probability: float = WARNING_MIN_PROBABILITY, subject: str = "this") -> str | None:
    """One sentence when a model that accepts `accepted` types gets a volume that looks like another type (and
    the classifier is reasonably sure); None when it fits, or when the package accepts any type. `subject` names the
    volume in the sentence ("this", or "the moving image" when a run has several)."""
    accepted = [str(item) for item in accepted]
    if not accepted or result.label in accepted:
        return None
    rule_based = [reason for reason in result.reasons if reason != NETWORK_OTHER_REASON]
    if result.probabilities.get(result.label, 0.0) < min_probability and not rule_based:
        return None  # the network is not sure enough (a rule — a label map, a huge field of view — always is)
    titles = [CLASS_TITLES.get(item, item) for item in accepted]
    wanted = titles[0] if len(titles) == 1 else f"{', '.join(titles[:-1])} or {titles[-1]}"
    looks = CLASS_TITLES.get(result.label, result.label)
    if result.label == "other":
        return (f"{model_title} expects {wanted}; {subject} does not look like a head MR or CT scan "
                f"({'; '.join(result.reasons) or 'class other'}).")
    return f"{model_title} expects {wanted}; {subject} looks like {looks} (p = {result.probability:.2f})."


def deletion_drop(classifier: SequenceClassifier, image: sitk.Image, fraction: float = 0.1,
                  seed: int = 0) -> dict[str, float]:
    """Saliency faithfulness on one volume: the predicted class's probability after setting the `fraction` most
    salient head voxels to the background value, against the same number of random head voxels (model grid)."""
    inputs, _grid = network_input(image)
    probabilities = classifier._probabilities(inputs)
    target = int(torch.argmax(probabilities))
    heat = classifier.saliency_array(inputs, target)
    head = inputs[0] > 0.05
    count = max(1, math.ceil(fraction * int(head.sum())))
    head_index = torch.nonzero(head.flatten()).flatten()
    salient = head_index[torch.argsort(heat.flatten()[head_index], descending=True)[:count]]
    generator = torch.Generator().manual_seed(seed)
    random = head_index[torch.randperm(head_index.numel(), generator=generator)[:count]]
    # every channel takes its value at the input's background (channel 0: 0; the Hounsfield windows: the air's)
    background = inputs.flatten(1)[:, torch.argmin(inputs[0].flatten())]

    def deleted(indices: torch.Tensor) -> float:
        changed = inputs.clone().flatten(1)
        changed[:, indices] = background[:, None]
        return float(classifier._probabilities(changed.view_as(inputs))[target])

    return {"class": CLASSES[target], "original": float(probabilities[target]),
            "salient_deleted": deleted(salient), "random_deleted": deleted(random)}
