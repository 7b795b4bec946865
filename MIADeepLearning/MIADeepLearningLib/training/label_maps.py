"""Label maps to train on: a folder of NIfTI label maps, a bundle of them (.npz), or (fresh machine) the MNI tissue
maps shipped in nilearn.

A bundle holds the maps already loaded (compact indices + label values), so training runs where SimpleITK is not
installed (a GPU machine that only has torch) and one file travels instead of a folder:
``python -m MIADeepLearningLib.training.label_maps FOLDER --bundle maps.npz``."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from MIADeepLearningLib.training.generator import compact_labels

NILEARN_FILES = {
    "t1": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass
class LabelMap:
    name: str
    indices: np.ndarray  # int16 compact label indices, cropped to the labelled region plus a margin
    values: np.ndarray  # the label value of each index


def crop_to_foreground(array: np.ndarray, margin: int) -> np.ndarray:
    foreground = np.argwhere(array > 0)
    if foreground.size == 0:
        raise ValueError("The label map has no labelled voxel.")
    low = np.maximum(foreground.min(axis=0) - margin, 0)
    high = np.minimum(foreground.max(axis=0) + margin + 1, array.shape)
    return array[tuple(slice(a, b) for a, b in zip(low, high))]


def load_label_map(path: Path, margin: int = 8) -> LabelMap:
    import SimpleITK as sitk  # here, not at the top: bundles load without it

    image = sitk.ReadImage(str(path))
    spacing = np.asarray(image.GetSpacing())
    if np.any(np.abs(spacing - 1.0) > 0.05):
        image = sitk.Resample(image, [round(n * s) for n, s in zip(image.GetSize(), spacing)], sitk.Transform(),
                              sitk.sitkNearestNeighbor, image.GetOrigin(), (1.0, 1.0, 1.0), image.GetDirection())
    array = sitk.GetArrayFromImage(image)
    indices, values = compact_labels(crop_to_foreground(np.rint(array).astype(np.int32), margin))
    return LabelMap(Path(path).name.split(".")[0], indices, values)


def downsample_label_map(label_map: LabelMap, factor: int) -> LabelMap:
    """The map on a grid `factor` times coarser: the most frequent label of each factor³ block (ties go to the
    block's first voxel, i.e. nearest neighbour), so labels stay labels and thin structures are not all lost to
    background. Rendering and augmenting a 2 mm map costs an eighth of a 1 mm one. The value table is kept."""
    if factor == 1:
        return label_map
    indices = label_map.indices
    padded = np.pad(indices, [(0, -n % factor) for n in indices.shape])  # index 0: background (value 0)
    coarse = [n // factor for n in padded.shape]
    blocks = padded.reshape(coarse[0], factor, coarse[1], factor, coarse[2], factor).transpose(0, 2, 4, 1, 3, 5)
    blocks = blocks.reshape(-1, factor**3)
    best = blocks[:, 0].copy()
    mixed = np.flatnonzero((blocks != best[:, None]).any(axis=1))  # most blocks hold one label: nothing to count
    blocks = blocks[mixed]
    mode = blocks[:, 0].copy()
    mode_count = (blocks == mode[:, None]).sum(axis=1)
    for index in np.unique(blocks):
        count = (blocks == index).sum(axis=1)
        better = count > mode_count
        mode[better], mode_count[better] = index, count[better]
    best[mixed] = mode
    return LabelMap(label_map.name, best.reshape(coarse).astype(np.int16), label_map.values)


def nilearn_file(key: str) -> Path:
    """A file of the MNI template shipped inside the nilearn wheel (installed with --no-deps; never imported)."""
    try:
        files = importlib.metadata.files("nilearn") or []
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError("nilearn is not installed (pip install --no-deps nilearn) — it carries the MNI "
                                "template used when no label maps are given.") from error
    wanted = NILEARN_FILES[key]
    for item in files:
        if str(item).replace("\\", "/") == wanted:
            return Path(item.locate())
    raise FileNotFoundError(f"nilearn does not contain {wanted}.")


def mni_tissue_label_map() -> LabelMap:
    """CSF / GM / WM labels (FreeSurfer values 24 / 3 / 2) from nilearn's MNI probability maps and T1 brain."""
    import SimpleITK as sitk  # here, not at the top: bundles load without it

    t1 = sitk.GetArrayFromImage(sitk.ReadImage(str(nilearn_file("t1")))).astype(np.float32)
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(nilearn_file("gm")))).astype(np.float32) / 255.0
    wm = sitk.GetArrayFromImage(sitk.ReadImage(str(nilearn_file("wm")))).astype(np.float32) / 255.0
    brain = t1 > 0.05 * t1.max()
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    labels = np.array([24, 3, 2], dtype=np.int32)[np.argmax(np.stack([csf, gm, wm]), axis=0)]
    labels[~brain] = 0
    indices, values = compact_labels(crop_to_foreground(labels, 8))
    return LabelMap("mni152_2009a_tissue", indices, values)


def save_bundle(maps: list[LabelMap], path: Path) -> None:
    """All maps in one compressed .npz (two arrays per map: <name>/indices and <name>/values)."""
    arrays = {}
    for item in maps:
        arrays[f"{item.name}/indices"] = item.indices
        arrays[f"{item.name}/values"] = item.values
    np.savez_compressed(path, **arrays)


def load_bundle(path: Path) -> list[LabelMap]:
    with np.load(path, allow_pickle=False) as arrays:
        names = sorted({key.rsplit("/", 1)[0] for key in arrays.files})
        return [LabelMap(name, arrays[f"{name}/indices"], arrays[f"{name}/values"]) for name in names]


def load_label_maps(source: Path | None, held_out: list[str]) -> tuple[list[LabelMap], list[LabelMap]]:
    """(training maps, held-out maps) from a folder of NIfTI maps or a bundle (.npz). Without a source: the MNI tissue
    map for both (a fallback for smoke runs)."""
    if source is None:
        mni = mni_tissue_label_map()
        return [mni], [mni]
    if Path(source).suffix == ".npz":
        maps = load_bundle(Path(source))
    else:
        paths = sorted(Path(source).glob("*.nii*"))
        if not paths:
            raise FileNotFoundError(f"No NIfTI label maps in {source}.")
        maps = [load_label_map(path) for path in paths]
    training = [item for item in maps if item.name not in held_out]
    validation = [item for item in maps if item.name in held_out]
    if not training:
        raise ValueError("Every label map is held out; nothing is left to train on.")
    return training, validation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pack a folder of NIfTI label maps into one bundle (.npz).")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--bundle", type=Path, required=True, help="the .npz to write")
    args = parser.parse_args(argv)
    maps, held_out = load_label_maps(args.folder, [])
    save_bundle(maps + held_out, args.bundle)
    print(f"{len(maps) + len(held_out)} label maps -> {args.bundle} ({args.bundle.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
