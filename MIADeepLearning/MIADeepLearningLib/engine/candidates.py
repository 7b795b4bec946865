"""Lesion candidates from an anomaly map: threshold inside the brain, connected components, a minimum size, ranked
by score, each with its volume, centre (RAS), scores and the tissue it sits in; and the case-level score.

numpy and the standard library only, so the engine (after the network) and the MRML bridge (the module's
sensitivity slider, which re-derives candidates from the anomaly map without running the network again) share one
implementation. Arrays are in numpy (k, j, i) order; `kji_to_ras` maps (k, j, i, 1) voxel indices to RAS millimetres.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_THRESHOLD = 0.5
MIN_VOLUME_MM3 = 10.0
CASE_SCORE_ML = 1.0  # the case score is the mean anomaly of the most anomalous 1 mL of brain
# Names of the brain map's values (0 outside the brain): the tissue a candidate sits in is its majority value.
TISSUE_NAMES = {1: "CSF", 2: "gray matter", 3: "white matter"}
CANDIDATE_FIELDS = ("label", "volume_ml", "center_ras", "max_score", "mean_score", "tissue", "voxels")


def _find(parent: np.ndarray) -> np.ndarray:
    """Every element's root in a parent forest, by pointer jumping (halves every path each pass)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """6-connected components of a boolean 3D mask: (int32 labels 1..n in order of first voxel, 0 elsewhere; n).

    Vectorised union-find over the mask's voxels only: neighbour pairs are hooked root to smaller root until no
    pair spans two trees, then paths are compressed. A lesion mask is a small share of the volume, so this runs in a
    fraction of a second without scipy (which Slicer's Python is not guaranteed to have)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"connected_components needs a 3D mask, got {mask.ndim} dimensions.")
    labels = np.zeros(mask.shape, np.int32)
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        return labels, 0
    index_of = np.full(mask.size, -1, np.int64)
    index_of[flat] = np.arange(flat.size)
    pairs = []
    strides = [mask.shape[1] * mask.shape[2], mask.shape[2], 1]
    for axis, stride in enumerate(strides):
        # a voxel and its next neighbour along `axis`, both in the mask
        first = np.zeros(mask.shape, bool)
        selection = [slice(None)] * 3
        selection[axis] = slice(0, mask.shape[axis] - 1)
        shifted = [slice(None)] * 3
        shifted[axis] = slice(1, None)
        first[tuple(selection)] = mask[tuple(selection)] & mask[tuple(shifted)]
        starts = np.flatnonzero(first)
        if starts.size:
            pairs.append(np.stack([index_of[starts], index_of[starts + stride]], axis=1))
    parent = np.arange(flat.size)
    if pairs:
        edges = np.concatenate(pairs)
        while True:
            roots = _find(parent)
            a, b = roots[edges[:, 0]], roots[edges[:, 1]]
            differ = a != b
            if not differ.any():
                parent = roots
                break
            high, low = np.maximum(a[differ], b[differ]), np.minimum(a[differ], b[differ])
            np.minimum.at(roots, high, low)  # hook each larger root under the smallest root it touches
            parent = roots
    _, component = np.unique(parent, return_inverse=True)
    labels.ravel()[flat] = component.astype(np.int32) + 1
    return labels, int(component.max()) + 1


def case_score(anomaly: np.ndarray, brain: np.ndarray | None, voxel_volume_mm3: float) -> float:
    """How likely the scan is abnormal at all: the mean anomaly of the most anomalous CASE_SCORE_ML of brain (so
    one noisy voxel cannot raise it, and a lesion of 1 mL or more brings it to the lesion's own score)."""
    values = np.asarray(anomaly, np.float32)
    if brain is not None:
        values = values[np.asarray(brain) > 0]
    values = values.ravel()
    if values.size == 0:
        return 0.0
    count = int(min(values.size, max(1, round(CASE_SCORE_ML * 1000.0 / max(voxel_volume_mm3, 1e-6)))))
    top = np.partition(values, values.size - count)[values.size - count:]
    return float(np.clip(top.mean(), 0.0, 1.0))


def find_candidates(anomaly: np.ndarray, brain: np.ndarray | None, kji_to_ras: np.ndarray | Sequence,
                    voxel_volume_mm3: float, threshold: float = DEFAULT_THRESHOLD,
                    min_volume_mm3: float = MIN_VOLUME_MM3) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(labels, candidates): voxels above `threshold` inside the brain (`brain` > 0; everywhere when None), split
    into 6-connected components, those of at least `min_volume_mm3` kept and numbered 1..n by decreasing maximum
    score (ties: larger first). `labels` is uint16 on the anomaly map's grid (0 = no candidate). Each candidate:
    label, volume_ml, center_ras (the centroid), max_score, mean_score, tissue (majority brain value by name, when
    `brain` holds tissue values), voxels."""
    values = np.asarray(anomaly, np.float32)
    if values.ndim != 3:
        raise ValueError(f"The anomaly map must be 3D, got {values.ndim} dimensions.")
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"The threshold must lie between 0 and 1, got {threshold}.")
    matrix = np.asarray(kji_to_ras, dtype=float).reshape(4, 4)
    mask = values > float(threshold)
    brain_values = None
    if brain is not None:
        brain_values = np.asarray(brain)
        if brain_values.shape != values.shape:
            raise ValueError(f"The brain map {brain_values.shape} is not on the anomaly map's grid {values.shape}.")
        mask &= brain_values > 0
    components, count = connected_components(mask)
    found = []
    if count:
        flat_labels = components.ravel()
        inside = np.flatnonzero(flat_labels)
        ids = flat_labels[inside] - 1
        scores = values.ravel()[inside]
        sizes = np.bincount(ids, minlength=count)
        sums = np.bincount(ids, weights=scores, minlength=count)
        maxima = np.full(count, -np.inf)
        np.maximum.at(maxima, ids, scores)
        kji = np.stack(np.unravel_index(inside, values.shape), axis=1).astype(float)
        centres = np.stack([np.bincount(ids, weights=kji[:, axis], minlength=count) for axis in range(3)], axis=1)
        centres /= np.maximum(sizes, 1)[:, None]
        tissues = None
        if brain_values is not None:
            tissue_ids = brain_values.ravel()[inside].astype(np.int64)
            tissues = np.zeros((count, int(tissue_ids.max()) + 1), np.int64)
            np.add.at(tissues, (ids, tissue_ids), 1)
        min_voxels = float(min_volume_mm3) / max(float(voxel_volume_mm3), 1e-9)
        kept = [index for index in range(count) if sizes[index] >= min_voxels]
        kept.sort(key=lambda index: (-maxima[index], -sizes[index]))
        for rank, index in enumerate(kept, start=1):
            centre = matrix @ np.append(centres[index], 1.0)
            tissue = ""
            if tissues is not None:
                majority = int(np.argmax(tissues[index]))
                tissue = TISSUE_NAMES.get(majority, f"label {majority}")
            found.append({"label": rank, "volume_ml": round(float(sizes[index]) * voxel_volume_mm3 / 1000.0, 4),
                          "center_ras": [round(float(value), 2) for value in centre[:3]],
                          "max_score": round(float(maxima[index]), 4),
                          "mean_score": round(float(sums[index] / sizes[index]), 4),
                          "tissue": tissue, "voxels": int(sizes[index])})
        lookup = np.zeros(count + 1, np.uint16)
        for rank, index in enumerate(kept, start=1):
            lookup[index + 1] = rank
        labels = lookup[components]
    else:
        labels = np.zeros(values.shape, np.uint16)
    return labels, found


def candidate_label(candidate: dict[str, Any]) -> str:
    """The markup label of a candidate: "C1 · 12.4 mL · 0.93"."""
    return f"C{candidate['label']} · {candidate['volume_ml']:.1f} mL · {candidate['max_score']:.2f}"
