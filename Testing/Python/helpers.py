"""Small helpers shared by the pytest suites (pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from MIADeepLearningLib.testing.zoo_shaped import rotation

# Resources/Models/models.json, in order
SHIPPED_IDS = ("deepbet", "thick-slice-sr", "brain-tissue", "brain-registration", "sequence-type", "brain-lesion")


# Input orientations every geometry test goes through (directions as SimpleITK's 3x3 matrices, LPS)
DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),
    "permuted": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "oblique": rotation(0, 20.0) @ rotation(1, -15.0) @ rotation(2, 10.0),
}


def physical_points(image) -> np.ndarray:
    """(z, y, x, 3) physical position of every voxel centre of a SimpleITK image, in numpy array order."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in reversed(size)), indexing="ij")
    index = np.stack([i, j, k], axis=-1) * np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + index @ direction.T


def dice(first: np.ndarray, second: np.ndarray) -> float:
    """Dice overlap of two masks (anything > 0 is inside)."""
    first, second = np.asarray(first) > 0, np.asarray(second) > 0
    total = np.count_nonzero(first) + np.count_nonzero(second)
    return 2.0 * np.count_nonzero(first & second) / total if total else 1.0


def small_head(head_path, spacing_mm: float = 2.4):
    """A real head that runs fast: the ROBEX head smoothed and resampled to coarse voxels (same origin/direction)."""
    import SimpleITK as sitk

    head = sitk.ReadImage(str(head_path))
    size = [round(n * s / spacing_mm) for n, s in zip(head.GetSize(), head.GetSpacing())]
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing((spacing_mm,) * 3)
    reference.SetOrigin(head.GetOrigin())
    reference.SetDirection(head.GetDirection())
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(head, sitk.sitkFloat32), spacing_mm / 2)
    return sitk.Resample(smooth, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def process_gone(pid: int) -> bool:
    """True when the process no longer exists or is a zombie waiting to be reaped (it runs no code any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    """Poll `condition` every 50 ms until it holds or the time is up; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def write_tiny_label_maps(folder: Path, extra_cerebral: bool = False) -> Path:
    """Three 40³ NIfTI label maps case_0..2 (background 0, CSF 24, cortex 3, white matter 2, ventricle 4 and, with
    `extra_cerebral`, a ring of label 165 around the head) for a few training steps at tiny size."""
    import SimpleITK as sitk

    z, y, x = np.mgrid[:40, :40, :40]
    for index, centre in enumerate([(20, 20, 20), (18, 22, 19), (21, 18, 22)]):
        radius = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
        labels = np.zeros((40, 40, 40), dtype=np.int16)
        if extra_cerebral:
            labels[radius < 18] = 165
        labels[radius < 16] = 24
        labels[radius < 13 - index] = 3
        labels[radius < 9] = 2
        labels[(radius < 3) | ((np.abs(x - centre[2]) < 2) & (np.abs(y - centre[1]) < 6) & (radius < 8))] = 4
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(folder / f"case_{index}.nii.gz"))
    return folder


# The metadata a brain tissue model package declares (the fragment Docs/Developers.md shows), used by the tests.
TISSUE_MODEL_ID = "tiny-tissue"


def tissue_metadata(sha256: str, size: int, segments: list | None = None, version: str = "0.0.1") -> dict:
    """configs/metadata.json of a brain tissue package: the `slicer` section the engine, worker and MRML layer read."""
    from MIADeepLearningLib.engine.brain_tissue import PIPELINE_NAME, TISSUE_SEGMENTS

    if segments is None:
        segments = [{"value": value, **TISSUE_SEGMENTS[key]} for value, key in enumerate(("csf", "gm", "wm"), 1)]
    return {
        "version": version,
        "name": "Brain tissue (test package)",
        "license": "Apache-2.0",
        "network_data_format": {"inputs": {"image": {"modality": "MR", "num_channels": 1}},
                                "outputs": {"pred": {"num_channels": 4, "channel_def": {
                                    "0": "background", "1": "csf", "2": "gm", "3": "wm"}}}},
        "slicer": {
            "id": TISSUE_MODEL_ID,
            "title": "Brain tissue (test package)",
            "task": "segmentation",
            "modality": "MR",
            "pipeline": PIPELINE_NAME,
            "output_name_suffix": "tissue",
            "optional_outputs": ["uncertainty"],
            "files": [{"role": "network", "path": "models/model.pt", "format": "state_dict", "sha256": sha256,
                       "size": size}],
            "segments": segments,
            "expected_input": {"modality": "MR", "spacing_mm": [0.3, 8.0], "max_anisotropy": 10.0},
            "options": {"roi_size": 96, "overlap": 0.5, "orientation": "LIA", "flip_axes": ["LR"]},
        },
    }


def write_tissue_weights(path: Path, features=(4, 8), classes=("background", "csf", "gm", "wm"),
                         working_spacing: float = 2, seed: int = 0) -> Path:
    """A randomly initialised UNet3D saved the way train_segmentation --export saves trained ones."""
    import torch

    from MIADeepLearningLib.engine.networks import UNet3D

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = UNet3D(in_channels=1, out_channels=len(classes), features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": network.state_dict(), "features": list(features), "working_spacing": working_spacing,
                "classes": list(classes)}, path)
    return path


def write_tissue_package(root: Path, segments: list | None = None, edit=None, **weights) -> Path:
    """A minimal brain tissue model package <root>/tiny-tissue (metadata, tiny weights, model card, licence);
    `edit(metadata)` may change the metadata before it is written."""
    import hashlib
    import json

    package = root / TISSUE_MODEL_ID
    weight_path = write_tissue_weights(package / "models" / "model.pt", **weights)
    data = weight_path.read_bytes()
    metadata = tissue_metadata(hashlib.sha256(data).hexdigest(), len(data), segments)
    if edit is not None:
        edit(metadata)
    (package / "configs").mkdir(parents=True, exist_ok=True)
    (package / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    (package / "docs").mkdir(exist_ok=True)
    (package / "docs" / "README.md").write_text("Test package: random weights.\n", encoding="utf-8")
    (package / "LICENSE").write_text("Apache-2.0\n", encoding="utf-8")
    return package


def run_worker_job(job) -> tuple[int, list]:
    """Run a jobs.Job in this process through worker.run; (exit code, the events it reported, all parseable)."""
    import io

    from MIADeepLearningLib import jobs, worker

    stream = io.StringIO()
    code = worker.run(job.write(), worker.Reporter(stream))
    events = [jobs.Event.from_line(line) for line in stream.getvalue().splitlines()]
    assert all(event is not None for event in events), stream.getvalue()
    return code, events


# --- registration geometry (displacement fields), shared by the engine and the MRML tests -----------------------

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Fixed grids (direction, spacing) a displacement field must survive; the moving grid is always another one.
REGISTRATION_GRIDS = {
    "oblique_anisotropic": (rotation(0, 20.0) @ rotation(1, -15.0) @ rotation(2, 10.0), (1.5, 2.0, 2.6)),
    "left_handed": (np.diag([-1.0, 1.0, 1.0]) @ rotation(2, 25.0), (2.2, 1.4, 1.8)),  # one axis flipped, oblique
    "permuted": (np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), (1.6, 2.4, 2.0)),
}


def ijk_to_ras(image) -> np.ndarray:
    """4x4 IJK->RAS matrix of a SimpleITK image (what Slicer's volume node holds for the same grid)."""
    matrix = np.eye(4)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin())
    return matrix


def grid_image(direction: np.ndarray, spacing, size, centre_lps=(3.0, -4.0, 5.0)):
    """An empty float32 SimpleITK image of the given geometry centred on `centre_lps`."""
    import SimpleITK as sitk

    image = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in np.asarray(direction).ravel()])
    half = np.asarray(direction) @ ((np.asarray(size) - 1) * np.asarray(spacing) / 2.0)
    image.SetOrigin([float(v) for v in np.asarray(centre_lps) - half])
    return image


def smooth_field(fixed) -> np.ndarray:
    """(z, y, x, 3) LPS displacement on the fixed grid: smooth, non-constant, up to ~4 mm, no folding."""
    p = physical_points(fixed) - np.array([3.0, -4.0, 5.0])
    return np.stack([3.0 * np.sin(p[..., 1] / 9.0) + 1.0,
                     2.5 * np.cos(p[..., 2] / 11.0) - 0.5 * np.sin(p[..., 0] / 7.0),
                     2.0 * np.sin((p[..., 0] + p[..., 1]) / 13.0)], axis=-1)


def registration_case(kind: str):
    """(fixed, moving image, moving label map, field array) on different fixed and moving grids: the moving grid is
    axis-aligned with 1.7 mm voxels and covers the fixed grid plus a margin, so every warped point has data."""
    import SimpleITK as sitk

    direction, spacing = REGISTRATION_GRIDS[kind]
    fixed = grid_image(direction, spacing, (22, 20, 16))
    moving = grid_image(rotation(2, -8.0), (1.7, 1.7, 1.9), (46, 46, 40), centre_lps=(2.0, -3.0, 6.0))
    p = physical_points(moving) - np.array([3.0, -4.0, 5.0])
    voxels = 100.0 * np.sin(p[..., 0] / 6.0) * np.cos(p[..., 1] / 8.0) + 40.0 * np.sin(p[..., 2] / 5.0)
    radius = np.linalg.norm(p * np.array([1.0, 1.2, 0.9]), axis=-1)
    labels = np.zeros(radius.shape, np.int16)
    labels[radius < 14.0] = 1
    labels[radius < 9.0] = 2
    labels[(np.abs(p[..., 0] - 6.0) < 4.0) & (np.abs(p[..., 2]) < 5.0) & (radius < 14.0)] = 3
    moving_image = sitk.GetImageFromArray(voxels.astype(np.float32))
    moving_image.CopyInformation(moving)
    moving_labels = sitk.GetImageFromArray(labels)
    moving_labels.CopyInformation(moving)
    return fixed, moving_image, moving_labels, smooth_field(fixed)


# --- a head-like phantom pair for the registration engine (analytic in physical space, no interpolation) ----------

PHANTOM_CENTRE = np.array([3.0, -4.0, 5.0])
# (centre offset from PHANTOM_CENTRE in mm, radii in mm, label, T1-like intensity): head, brain, white matter,
# ventricles and asymmetric blobs, so that a shift or a deformation changes the overlap of every label
PHANTOM_PARTS = [((0, 0, 0), (36, 42, 32), 1, 0.35), ((0, 2, 2), (31, 37, 27), 2, 0.55),
                 ((0, 4, 4), (20, 25, 17), 3, 0.85), ((-6, -4, 6), (4, 10, 5), 4, 0.15),
                 ((7, -2, 5), (3, 9, 6), 4, 0.15), ((14, 18, -8), (6, 5, 7), 5, 0.7),
                 ((-18, 10, -6), (5, 8, 4), 6, 0.25), ((10, -22, 8), (7, 4, 5), 7, 0.4)]


def phantom_values(points: np.ndarray, t2: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(intensities, labels) of the phantom at LPS points (..., 3): soft-edged nested ellipsoids, labels where each
    part's ellipsoid holds the point (later parts on top); `t2` maps each intensity v to 0.95 - v (inside the head)
    and keeps dark air, as a T2 inverts a T1's tissue contrast."""
    values = np.zeros(points.shape[:-1])
    labels = np.zeros(points.shape[:-1], np.int16)
    for offset, radii, label, value in PHANTOM_PARTS:
        r = np.linalg.norm((points - PHANTOM_CENTRE - np.asarray(offset)) / np.asarray(radii), axis=-1)
        weight = 1.0 / (1.0 + np.exp(-(1.0 - r) * np.mean(radii) / 1.5))
        tissue = (0.95 - value) if (t2 and label > 1) else value
        values = values * (1.0 - weight) + tissue * weight
        labels[r < 1.0] = label
    return values, labels


def phantom_deformation(points: np.ndarray, amplitude: float = 4.0) -> np.ndarray:
    """A smooth, invertible (max gradient well below 1) LPS displacement in mm at points (..., 3)."""
    q = points - PHANTOM_CENTRE
    return amplitude * np.stack([np.sin(q[..., 1] / 12.0), 0.9 * np.cos(q[..., 2] / 14.0),
                                 0.75 * np.sin(q[..., 0] / 11.0)], axis=-1)


def phantom_images(grid, points_to_sample=None, t2: bool = False):
    """(image float32, labels int16) on a SimpleITK grid: the phantom sampled at `points_to_sample` (the grid's own
    voxel centres by default, else an array (z, y, x, 3) of LPS points, one per voxel)."""
    import SimpleITK as sitk

    points = physical_points(grid) if points_to_sample is None else points_to_sample
    values, labels = phantom_values(points, t2)
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.CopyInformation(grid)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(grid)
    return image, label_image


def registration_phantom_pair(shift=(3.0, -2.0, 1.0), amplitude: float = 4.0, t2: bool = False):
    """(fixed, fixed labels, moving, moving labels): the fixed phantom on an oblique, anisotropic 2.5-2.9 mm grid;
    the moving one on an axis-aligned 2.4 mm grid, its content the fixed anatomy moved by a known shift and smooth
    deformation: moving(q) = phantom(q + shift + deformation(q))."""
    fixed_grid = grid_image(rotation(0, 8.0) @ rotation(2, -12.0), (2.5, 2.7, 2.9), (36, 34, 30), PHANTOM_CENTRE)
    moving_grid = grid_image(np.eye(3), (2.4, 2.4, 2.4), (40, 40, 36), PHANTOM_CENTRE + np.array([2.0, -1.0, 1.0]))
    fixed, fixed_labels = phantom_images(fixed_grid)
    points = physical_points(moving_grid)
    moving, moving_labels = phantom_images(moving_grid, points + np.asarray(shift) +
                                           phantom_deformation(points, amplitude), t2)
    return fixed, fixed_labels, moving, moving_labels


def thick_blob_voxels(slices: int = 8, spacing_mm: float = 5.0) -> np.ndarray:
    """(z, y, x) float32 voxels of a smooth head-like blob: 40 x 40 voxels of 1 mm in-plane, `slices` slices
    `spacing_mm` apart (a thick-slice synthesis run on it takes seconds)."""
    k, j, i = np.mgrid[:slices, :40, :40].astype(np.float32)
    z = k * spacing_mm
    centre_z = (slices - 1) * spacing_mm / 2
    blob = 60.0 + 700.0 * np.exp(-((i - 19.5) ** 2 + (j - 21) ** 2 + (z - centre_z) ** 2) / (2 * 11.0**2))
    blob += 250.0 * np.exp(-((i - 25) ** 2 + (j - 15) ** 2 + (z - centre_z - 2) ** 2) / (2 * 4.0**2))
    return blob.astype(np.float32)


def thick_blob_volume(name: str, slices: int = 8, spacing_mm: float = 5.0):
    """thick_blob_voxels as a volume node of the headless scene (RAS: i, j flipped, centred on z = 0)."""
    from MIADeepLearningLib.testing.scenarios import volume_from_array

    centre_z = (slices - 1) * spacing_mm / 2
    matrix = np.diag([-1.0, -1.0, spacing_mm, 1.0])
    matrix[:3, 3] = (20.0, -15.5, -centre_z)
    return volume_from_array(thick_blob_voxels(slices, spacing_mm), matrix, name)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            module: str = "MIADeepLearningLib") -> subprocess.CompletedProcess:
    """`python -m MIADeepLearningLib ARGS` (or another `module` of the library) in a process of its own, as a user
    runs it (library on PYTHONPATH, no extra model folders from the test session)."""
    from MIADeepLearningLib.paths import library_parent_dir

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(library_parent_dir()), env.get("PYTHONPATH", "")]))
    env.pop("MIADL_EXTRA_MODELS_DIRS", None)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env, cwd=str(cwd) if cwd else None, timeout=timeout, check=False)


class IntensityBands(torch.nn.Module):
    """Logits that make the class the intensity band of the normalised input, voxel by voxel (flip-equivariant): a
    stand-in tissue network whose answer the tests can predict."""

    size_multiple = 2

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("centres", torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).view(1, 4, 1, 1, 1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return -(((inputs.float() - self.centres) / 0.08) ** 2)
