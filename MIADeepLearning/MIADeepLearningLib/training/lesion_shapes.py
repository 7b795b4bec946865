"""Real lesion shapes pasted into healthy label maps, for the lesion detector (train_lesion.py).

The shapes are the manual stroke (SOOP) and multiple-sclerosis (MSLUB) masks of shared/data/brain-lesions/
lesion-masks-mni, brought into the label maps' orientation (LIA) and block-averaged onto the render grid once. A
painter pastes 1-2 stroke shapes or a handful of MS lesions at random places in the brain parenchyma of a cropped
label map (never into CSF or outside the brain), as new labels whose rendered intensity is drawn away from the white
and gray matter around them (brighter in 60 %: FLAIR/T2-like; else darker: T1-like), sometimes with a core of a
third intensity (necrosis, cyst). A share of the examples stay healthy, so the network learns that most brains have
nothing to flag. Only shapes are taken from the masks; the contrast is made up every time, so the detector cannot
learn one disease's appearance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as functional

LESION_VALUE = 10000  # label values of the pasted lesion (and its core): in no tissue list, so never a tissue
CORE_VALUE = 10001
SHAPE_ORIENTATION = "LIA"  # the label maps' orientation (shared/data/brain-label-maps)


@dataclass
class LesionShape:
    name: str
    kind: str  # "stroke" (one event, pasted whole) or "ms" (one lesion of a patient's mask)
    mask: np.ndarray  # bool, cropped to the shape, on the render grid


def _components(mask: np.ndarray) -> list[np.ndarray]:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(image, True))
    pieces = []
    for value in range(1, int(labels.max()) + 1):
        piece = labels == value
        if piece.any():
            pieces.append(_crop(piece))
    return pieces


def _crop(mask: np.ndarray) -> np.ndarray:
    where = np.argwhere(mask)
    low, high = where.min(axis=0), where.max(axis=0) + 1
    return mask[tuple(slice(a, b) for a, b in zip(low, high))].copy()


def load_shape(path: Path, voxel_mm: int) -> np.ndarray | None:
    """The mask in LIA, block-averaged to `voxel_mm` (a block is lesion when at least 40 % of it is), cropped; None
    when nothing is left."""
    image = sitk.DICOMOrient(sitk.ReadImage(str(path)), SHAPE_ORIENTATION)
    mask = sitk.GetArrayFromImage(image) > 0
    if voxel_mm > 1:
        trimmed = mask[tuple(slice(0, n - n % voxel_mm) for n in mask.shape)]
        pooled = functional.avg_pool3d(torch.from_numpy(trimmed).float()[None, None], voxel_mm)[0, 0]
        mask = (pooled >= 0.4).numpy()
    return _crop(mask) if mask.any() else None


def save_shapes(path: Path, training: list[LesionShape], held_out: list[LesionShape]) -> None:
    """Both lists in one .npz (reading and reorienting 1,476 masks takes minutes; the cache, seconds)."""
    everything = training + held_out
    np.savez_compressed(
        path, masks=np.concatenate([shape.mask.ravel() for shape in everything]),
        sizes=np.asarray([shape.mask.shape for shape in everything], np.int64),
        names=np.asarray([shape.name for shape in everything]), kinds=np.asarray([shape.kind for shape in everything]),
        held_out=np.asarray([False] * len(training) + [True] * len(held_out)))


def read_shapes(path: Path) -> tuple[list[LesionShape], list[LesionShape]]:
    bundle = np.load(path)
    masks = bundle["masks"]  # once: every access to an .npz member reads it again
    held_out: list[LesionShape] = []
    training: list[LesionShape] = []
    offset = 0
    for size, name, kind, kept in zip(bundle["sizes"], bundle["names"], bundle["kinds"], bundle["held_out"]):
        count = int(np.prod(size))
        shape = LesionShape(str(name), str(kind), masks[offset:offset + count].reshape(size).copy())
        offset += count
        (held_out if kept else training).append(shape)
    return training, held_out


def load_lesion_shapes(folder: Path, voxel_mm: int = 2, held_out_every: int = 10, cache: Path | None = None
                       ) -> tuple[list[LesionShape], list[LesionShape]]:
    """(training shapes, held-out shapes) from `folder`/soop/*.nii.gz (every `held_out_every`-th file held out) and
    `folder`/mslub/*.nii.gz (split into single lesions; the last fifth of the patients held out). With `cache`, read
    from that file when it exists, else written there (derived from the masks: keep it out of the repository)."""
    if cache is not None and Path(cache).exists():
        return read_shapes(Path(cache))
    training: list[LesionShape] = []
    held_out: list[LesionShape] = []
    for index, path in enumerate(sorted((folder / "soop").glob("*.nii*"))):
        mask = load_shape(path, voxel_mm)
        if mask is not None:
            (held_out if index % held_out_every == 0 else training).append(LesionShape(path.name, "stroke", mask))
    patients = sorted((folder / "mslub").glob("*.nii*"))
    first_held_out = len(patients) - max(1, len(patients) // 5)
    for index, path in enumerate(patients):
        mask = load_shape(path, voxel_mm)
        if mask is None:
            continue
        for number, piece in enumerate(_components(mask)):
            shape = LesionShape(f"{path.name}#{number}", "ms", piece)
            (held_out if index >= first_held_out else training).append(shape)
    if not training or not held_out:
        raise FileNotFoundError(f"No lesion masks under {folder} (expected soop/ and mslub/ folders of NIfTI masks).")
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        save_shapes(Path(cache), training, held_out)
    return training, held_out


def _u(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _draw(generator: torch.Generator, count: int) -> int:
    return int(torch.randint(0, count, (), generator=generator))


@dataclass
class LesionPainter:
    """Pastes lesions into a compact label crop; see the module docstring. Called by train_segmentation.make_sample
    through SampleSettings.label_edit."""

    shapes: list[LesionShape]
    healthy_fraction: float = 0.25
    stroke_share: float = 0.5
    lesion_class: int = 4
    brighter: float = 0.6
    wm_classes: tuple[int, ...] = (3,)
    parenchyma_classes: tuple[int, ...] = (2, 3)
    _by_kind: dict[str, list[LesionShape]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for shape in self.shapes:
            self._by_kind.setdefault(shape.kind, []).append(shape)

    def __call__(self, labels: torch.Tensor, values: np.ndarray, lookup: torch.Tensor, generator: torch.Generator,
                 inner: tuple[slice, ...]) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, Callable | None]:
        if _u(generator, 0, 1) < self.healthy_fraction:
            return labels, values, lookup, None
        classes = lookup[labels]
        parenchyma = torch.zeros_like(classes, dtype=torch.bool)
        for value in self.parenchyma_classes:
            parenchyma |= classes == value
        window = torch.zeros_like(parenchyma)
        window[inner] = True
        places = torch.nonzero(parenchyma & window)
        if len(places) == 0:
            return labels, values, lookup, None
        white = torch.nonzero((classes == self.wm_classes[0]) & window)
        kind = "stroke" if ("ms" not in self._by_kind or _u(generator, 0, 1) < self.stroke_share) else "ms"
        pool = self._by_kind.get(kind) or self.shapes
        count = _draw(generator, 2) + 1 if kind == "stroke" else _draw(generator, 10) + 3
        lesion = torch.zeros_like(parenchyma)
        for _ in range(count):
            shape = torch.from_numpy(pool[_draw(generator, len(pool))].mask)
            for axis in range(3):
                if _u(generator, 0, 1) < 0.5:
                    shape = shape.flip(axis)
            centres = white if kind == "ms" and len(white) else places
            centre = centres[_draw(generator, len(centres))]
            start = [int(c) - s // 2 for c, s in zip(centre.tolist(), shape.shape)]
            target = tuple(slice(max(0, a), min(n, a + s)) for a, s, n in zip(start, shape.shape, lesion.shape))
            source = tuple(slice(t.start - a, t.stop - a) for t, a in zip(target, start))
            lesion[target] |= shape[source]
        lesion &= parenchyma
        if int(lesion.sum()) < 2:
            return labels, values, lookup, None
        core = torch.zeros_like(lesion)
        if int(lesion.sum()) > 60 and _u(generator, 0, 1) < 0.35:
            outside = (~lesion).float()[None, None]
            core = (functional.max_pool3d(outside, 5, 1, 2)[0, 0] == 0) & lesion  # lesion voxels 2+ voxels deep
        base = len(values)
        labels = labels.clone()
        labels[lesion] = base
        labels[core] = base + 1
        values = np.concatenate([np.asarray(values), np.asarray([LESION_VALUE, CORE_VALUE], values.dtype)])
        lookup = torch.cat([lookup, torch.tensor([self.lesion_class, self.lesion_class], dtype=lookup.dtype)])
        tissue_indices = [index for index, value in enumerate(lookup[:base].tolist())
                          if value in self.parenchyma_classes]
        return labels, values, lookup, self._intensities(generator, base, tissue_indices)

    def _intensities(self, generator: torch.Generator, base: int, tissue_indices: list[int]
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
        brighter = _u(generator, 0, 1) < self.brighter
        magnitude = _u(generator, 0.12, 0.5)
        core_shift = _u(generator, -0.5, 0.5)

        def adjust(means: torch.Tensor) -> torch.Tensor:
            tissue = means[tissue_indices]
            low, high = float(tissue.min()), float(tissue.max())
            value = high + magnitude if brighter else low - magnitude
            if value < 0.02:  # no room below the darkest tissue: go above the brightest
                value = high + magnitude
            means = means.clone()
            means[base] = value
            means[base + 1] = max(0.0, value + core_shift)
            peak = float(means.max())
            return means / peak if peak > 1.0 else means  # render clamps to 0..1: keep the lesion above the rest

        return adjust


def sphere(radius_voxels: float) -> np.ndarray:
    """A ball mask (for tests and smoke runs without the real masks)."""
    size = 2 * math.ceil(radius_voxels) + 1
    grid = np.indices((size,) * 3) - size // 2
    return (grid**2).sum(axis=0) <= radius_voxels**2
