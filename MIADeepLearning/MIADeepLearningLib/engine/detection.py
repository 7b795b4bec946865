"""Lesion detection in brain MRI of any contrast: an anomaly map, the brain (tissue) map it used, and lesion
candidates — the inference side of training/train_lesion.py.

The network is the brain tissue segmenter's U-Net with one more output class, `lesion`, trained only on renders of
healthy label maps into which real lesion shapes (stroke and MS masks) were pasted with random intensities: it learns
what healthy anatomy looks like in any contrast, and calls `lesion` what does not fit it. So it runs exactly as the
tissue model does (engine/brain_tissue.py: a 2 mm grid in the training orientation, windows, the left-right mirror),
and its probabilities come back onto the input's grid, where
- the anomaly map is the lesion probability (0-1), averaged over the inputs when several co-registered contrasts are
  given (each is run through the network on its own; extra inputs are resampled onto the first one's grid);
- the brain map is every voxel whose background probability is below one half, valued by its most likely tissue
  (1 CSF, 2 gray matter, 3 white matter; a lesion voxel gets the tissue it replaces);
- candidates come from engine/candidates.py (threshold, connected components, minimum size, ranked by score), and
  the case score is the mean anomaly of the most anomalous millilitre of brain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from MIADeepLearningLib.engine import candidates as lesion_candidates
from MIADeepLearningLib.engine.brain_tissue import BrainTissueSegmentation, ProgressCallback, terminology_entry
from MIADeepLearningLib.engine.errors import InputError, ModelError

PIPELINE_NAME = "lesion_detection"
LESION_CLASS = "lesion"
MIN_BRAIN_ML = 250.0  # less brain than this: not a brain MRI (an adult brain is 1,000-1,600 mL)
MIN_OVERLAP = 0.5  # an extra input must cover at least this share of the first input's head
COMBINE_MODES = ("mean", "max")
# Slicer's generic terminology: category "Morphologically Altered Structure" (SCT 49755003), type "Lesion" (SCT
# 52988006) — a finding, not a diagnosis.
LESION_TERMINOLOGY = terminology_entry("SCT^49755003^Morphologically Altered Structure", "SCT^52988006^Lesion")
CANDIDATE_COLOURS = ([230, 41, 41], [255, 150, 0], [240, 220, 30], [200, 60, 200], [40, 160, 230], [60, 200, 120])


def kji_to_ras(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from numpy (k, j, i, 1) voxel indices of `image` to RAS millimetres."""
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    ijk_to_lps = direction @ np.diag(image.GetSpacing())
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ ijk_to_lps[:, ::-1]  # columns in (k, j, i) order
    matrix[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(image.GetOrigin(), float)
    return matrix


def voxel_volume_mm3(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing()))


def candidate_segments(found: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One segment description per candidate, for the lesion label map (value = candidate number)."""
    return [{"value": int(item["label"]), "name": f"Candidate {item['label']}",
             "color": CANDIDATE_COLOURS[(int(item["label"]) - 1) % len(CANDIDATE_COLOURS)],
             "terminology": LESION_TERMINOLOGY} for item in found]


def _head_mask(image: sitk.Image) -> np.ndarray:
    """Voxels above a tenth of the robust intensity range: the head (or brain) the input shows."""
    voxels = sitk.GetArrayViewFromImage(image)
    sample = voxels[::4, ::4, ::4]
    low, high = np.quantile(sample, [0.005, 0.995])
    return np.asarray(voxels) > low + 0.1 * (high - low)


def resample_onto(extra: sitk.Image, reference: sitk.Image, name: str) -> sitk.Image:
    """An extra contrast on the first input's grid (linear); an InputError when it covers too little of the head."""
    if extra.GetDimension() != 3 or extra.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"The extra input {name} is not a 3D single-channel volume.")
    inside = sitk.Image(extra.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(extra)
    covered = sitk.GetArrayViewFromImage(
        sitk.Resample(inside, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0
    head = _head_mask(reference)
    share = float(covered[head].mean()) if head.any() else 0.0
    if share < MIN_OVERLAP:
        raise InputError(f"The extra input {name} covers only {share:.0%} of the first input's head; it must be "
                         f"co-registered with the first input (register it first, for example with DL Registration).")
    return sitk.Resample(sitk.Cast(extra, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, 0.0,
                         sitk.sitkFloat32)


def _monotonic(progress: ProgressCallback) -> ProgressCallback:
    """Progress that never goes back: the tissue pipeline announces its resampling a little below the start of its
    share, which lies below the end of the previous input's share."""
    highest = [0.0]

    def report(stage: str, fraction: float, message: str) -> None:
        highest[0] = max(highest[0], float(fraction))
        progress(stage, highest[0], message)

    return report


class LesionDetection(BrainTissueSegmentation):
    """Pipeline class for the engine's PIPELINES table (see tasks.py for the interface)."""

    def __init__(self, model: Any, weight_paths: dict[str, Any], device: Any, options: dict[str, Any]):
        options = {"threshold": lesion_candidates.DEFAULT_THRESHOLD,
                   "min_volume_mm3": lesion_candidates.MIN_VOLUME_MM3, "combine": "mean", "flip_average": True,
                   **options}
        super().__init__(model, weight_paths, device, options)
        title = getattr(model, "title", "lesion detection")
        if LESION_CLASS not in self.classes:
            raise ModelError(f"Model '{title}' has no '{LESION_CLASS}' output (classes {self.classes}).")
        if self.options["combine"] not in COMBINE_MODES:
            raise ModelError(f"Model '{title}': option combine must be one of {COMBINE_MODES}.")
        threshold = float(self.options["threshold"])
        if not 0.0 < threshold < 1.0:
            raise ModelError(f"Model '{title}': option threshold must lie between 0 and 1, got {threshold}.")
        self.lesion_index = self.classes.index(LESION_CLASS)
        self.tissue_indices = [index for index, name in enumerate(self.classes)
                               if index not in (0, self.lesion_index)]

    def predict(self, image: sitk.Image, progress: ProgressCallback,
                extra_images: Sequence[tuple[str, sitk.Image]] = ()) -> dict[str, Any]:
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError("Lesion detection needs a 3D single-channel volume.")
        inputs = [image] + [resample_onto(extra, image, name) for name, extra in extra_images]
        anomaly: np.ndarray | None = None
        tissue: np.ndarray | None = None
        provenance: dict[str, Any] = {}
        progress = _monotonic(progress)
        share = 0.7 / len(inputs)
        for index, volume in enumerate(inputs):
            probabilities, made = self.probabilities_on_input(volume, progress, 0.15 + share * index,
                                                              0.15 + share * (index + 1))
            provenance = provenance or made
            lesion = probabilities[self.lesion_index]
            if anomaly is None:
                anomaly = lesion.copy()
            elif self.options["combine"] == "max":
                np.maximum(anomaly, lesion, out=anomaly)
            else:
                anomaly += lesion
            tissue = probabilities if tissue is None else tissue + probabilities
            del probabilities, lesion
        assert anomaly is not None and tissue is not None
        if self.options["combine"] == "mean":
            anomaly /= len(inputs)
        tissue /= len(inputs)
        progress("postprocess", 0.88, "Brain map and lesion candidates")
        brain = self.brain_map(tissue)
        del tissue
        spacing_volume = voxel_volume_mm3(image)
        brain_ml = float((brain > 0).sum()) * spacing_volume / 1000.0
        if brain_ml < MIN_BRAIN_ML:
            raise InputError(f"This does not look like a brain MRI: the brain found covers only {brain_ml:.0f} mL "
                             f"(an adult brain is about 1,000-1,600 mL), so no lesion candidates are given.")
        threshold = float(self.options["threshold"])
        labels, found = lesion_candidates.find_candidates(
            anomaly, brain, kji_to_ras(image), spacing_volume, threshold, float(self.options["min_volume_mm3"]))
        score = lesion_candidates.case_score(anomaly, brain, spacing_volume)
        result: dict[str, Any] = {
            "anomaly": self._on_grid(anomaly.astype(np.float32), image),
            "label": self._on_grid(labels, image),
            "brain": self._on_grid(brain, image),
            "candidates": found, "case_score": round(score, 4), "threshold": threshold,
            "segments": candidate_segments(found), "warnings": [],
        }
        provenance.update({"threshold": threshold, "min_volume_mm3": float(self.options["min_volume_mm3"]),
                           "combine": self.options["combine"], "inputs": len(inputs),
                           "brain_volume_ml": round(brain_ml, 1), "case_score": round(score, 4),
                           "candidates": len(found)})
        result["provenance"] = provenance
        return result

    def brain_map(self, probabilities: np.ndarray) -> np.ndarray:
        """uint8 on the input grid: 0 where the background is the likelier half, else 1 + the likeliest tissue
        among the non-lesion classes (1 CSF, 2 GM, 3 WM for the shipped model); the largest connected piece only."""
        brain = np.zeros(probabilities.shape[1:], np.uint8)
        tissue = probabilities[self.tissue_indices]
        for start in range(0, brain.shape[0], 16):  # slab by slab: argmax alone would be 8 bytes a voxel
            inside = probabilities[0, start:start + 16] < 0.5
            best = tissue[:, start:start + 16].argmax(axis=0).astype(np.uint8) + 1
            brain[start:start + 16] = np.where(inside, best, 0)
        mask = sitk.GetImageFromArray((brain > 0).astype(np.uint8))
        largest = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True))
        brain[largest != 1] = 0
        return brain

    @staticmethod
    def _on_grid(voxels: np.ndarray, image: sitk.Image) -> sitk.Image:
        result = sitk.GetImageFromArray(voxels)
        result.CopyInformation(image)
        return result
