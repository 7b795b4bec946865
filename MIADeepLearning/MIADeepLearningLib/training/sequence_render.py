"""Head scans of a named type rendered from label maps with each sequence family's physics, for the sequence-type
classifier (train_classification.py).

Unlike the contrast-agnostic renders of generator.py (a random intensity per label), every tissue here gets relaxation
times and proton density (T1, T2, PD with per-scan jitter around 1.5-3 T literature values) and each family its signal
equation with TR/TE/TI/flip angle drawn in its clinical range: spin echo, inversion recovery (MPRAGE-like, T1-FLAIR,
FLAIR with the inversion time that nulls CSF), spoiled gradient echo, EPI diffusion (b0 and trace, fat suppressed, low
resolution, distortion along the phase-encoding axis, dropout near the sinuses). Contrast agent shortens T1 in the
structures that enhance (choroid plexus, vessels, dura and venous sinuses, mucosa, enhancing lesion rims). CT is in
Hounsfield units with bone from the skull label. Lesions (oedema, necrotic core, rim) are painted into the white
matter of a third of the scans. Each scan is then acquired: blur, bias field, thick 2-D slices along any axis or
partial coverage, Rician noise; skull stripping sometimes; any orientation (including a wrong header) and any
intensity scale. `other` is label maps stored as volumes, trunk-like phantoms and noise.

The output is a SimpleITK image with a real geometry, so the classifier's own preprocessing (engine/classification
.network_input) runs on it exactly as on a file.

Extra-cerebral labels of shared/data/brain-label-maps (SynthSeg's training maps), identified by position (distance
from brain and air, centre offset, volume): 507 face and neck soft tissue, 511 and 509 scalp and facial skin and fat,
515 skull, 516 paranasal sinuses and facial bone, 514 eyes, 512 spinal cord, 502/506/508/530 small soft tissues,
136/137/163/164 next to the lateral ventricles (treated as choroid plexus), 30/62 vessels.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as functional

from MIADeepLearningLib.engine.classification import CLASSES
from MIADeepLearningLib.training import generator as gen
from MIADeepLearningLib.training.label_maps import LabelMap

LABEL_MAP_DIRECTION = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)  # LIA, the maps' orientation (LPS columns)

TISSUES = ("air", "wm", "gm", "deep_gm", "csf", "choroid", "vessel", "skull", "sinus", "fat", "soft", "eye",
           "dura", "mucosa", "edema", "core", "rim")
T = {name: index for index, name in enumerate(TISSUES)}
_LABEL_TISSUE = {
    **{value: "wm" for value in (2, 41, 7, 46, 16, 28, 60, 85, 512)},
    **{value: "gm" for value in (3, 42, 8, 47, 17, 18, 53, 54)},
    **{value: "deep_gm" for value in (10, 11, 12, 13, 26, 49, 50, 51, 52, 58)},
    **{value: "csf" for value in (4, 5, 14, 15, 24, 43, 44, 72, 25, 57)},
    **{value: "choroid" for value in (136, 137, 163, 164, 31, 63)},
    **{value: "vessel" for value in (30, 62)},
    515: "skull", 516: "sinus", 511: "fat", 509: "fat", 514: "eye",
    **{value: "soft" for value in (507, 502, 506, 508, 530)},
}
# (T1 ms, T2 ms, PD) around 3 T; T2 of fat is its fast-spin-echo value
RELAXATION = {
    "air": (1000.0, 1.0, 0.0), "wm": (850.0, 75.0, 0.69), "gm": (1350.0, 95.0, 0.80),
    "deep_gm": (1150.0, 85.0, 0.77), "csf": (4000.0, 1800.0, 1.0), "choroid": (1250.0, 100.0, 0.85),
    "vessel": (1900.0, 150.0, 0.15), "skull": (400.0, 40.0, 0.12), "sinus": (1000.0, 20.0, 0.04),
    "fat": (370.0, 130.0, 0.90), "soft": (1200.0, 45.0, 0.75), "eye": (3800.0, 1500.0, 0.98),
    "dura": (1100.0, 60.0, 0.55), "mucosa": (1200.0, 180.0, 0.85), "edema": (1800.0, 220.0, 0.90),
    "core": (3000.0, 800.0, 0.95), "rim": (1500.0, 120.0, 0.85),
}
ENHANCING = ("choroid", "vessel", "dura", "mucosa", "rim")
# Hounsfield units (low, high)
HOUNSFIELD = {
    "air": (-1010.0, -990.0), "wm": (22.0, 32.0), "gm": (33.0, 45.0), "deep_gm": (33.0, 44.0), "csf": (0.0, 14.0),
    "choroid": (30.0, 300.0), "vessel": (38.0, 55.0), "skull": (700.0, 1600.0), "sinus": (-950.0, 200.0),
    "fat": (-120.0, -40.0), "soft": (20.0, 60.0), "eye": (5.0, 20.0), "dura": (40.0, 70.0),
    "mucosa": (20.0, 50.0), "edema": (12.0, 24.0), "core": (5.0, 20.0), "rim": (25.0, 45.0),
}
MR_CLASSES = ("t1w", "t1c", "t2w", "flair", "pdw", "dwi")


def _u(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _chance(generator: torch.Generator, probability: float) -> bool:
    return float(torch.rand((), generator=generator)) < probability


def _pick(generator: torch.Generator, options: tuple | list):
    return options[int(torch.randint(0, len(options), (), generator=generator))]


def tissue_map(label_map: LabelMap) -> torch.Tensor:
    """(D, H, W) int64 tissue indices from a compact label map; dura (CSF touching skull) and mucosa (sinus touching
    soft tissue or air) are found from the neighbours."""
    lookup = torch.tensor([T[_LABEL_TISSUE.get(int(value), "air" if value == 0 else "soft")]
                           for value in label_map.values], dtype=torch.int64)
    tissues = lookup[torch.from_numpy(label_map.indices.astype(np.int64))]

    def near(name: str) -> torch.Tensor:
        mask = (tissues == T[name]).float()[None, None]
        return functional.max_pool3d(mask, 3, 1, 1)[0, 0] > 0

    dura = (tissues == T["csf"]) & near("skull")
    mucosa = (tissues == T["sinus"]) & (near("soft") | near("fat"))
    eyes = (tissues == T["eye"]).float()[None, None]
    orbit = (tissues == T["soft"]) & (functional.max_pool3d(eyes, 5, 1, 2)[0, 0] > 0)  # orbital fat, 4 mm
    tissues[dura] = T["dura"]
    tissues[mucosa] = T["mucosa"]
    tissues[orbit] = T["fat"]
    return tissues


def add_vessels(tissues: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random tubes (where two smooth random fields both cross zero) in the CSF around the brain: cortical vessels."""
    shape = tuple(tissues.shape)
    points = int(_u(generator, 8, 14))
    first = gen.smooth_field(shape, points, 1.0, generator)
    second = gen.smooth_field(shape, points, 1.0, generator)
    width = _u(generator, 0.04, 0.09)
    tubes = (first.abs() < width) & (second.abs() < width) & (tissues == T["csf"])
    tissues = tissues.clone()
    tissues[tubes] = T["vessel"]
    return tissues


def add_lesions(tissues: torch.Tensor, generator: torch.Generator, voxel_mm: float) -> torch.Tensor:
    """1-3 lesions centred in the white matter: oedema, and sometimes a necrotic core and an (enhancing) rim."""
    tissues = tissues.clone()
    white = torch.nonzero(tissues == T["wm"])
    if white.numel() == 0:
        return tissues
    for _ in range(int(torch.randint(1, 4, (), generator=generator))):
        centre = white[int(torch.randint(0, white.shape[0], (), generator=generator))].float()
        radius = _u(generator, 4.0, 25.0) / voxel_mm
        box = math.ceil(radius * 1.6) + 1
        low = [max(0, int(c) - box) for c in centre]
        high = [min(n, int(c) + box + 1) for c, n in zip(centre, tissues.shape)]
        grids = torch.meshgrid(*[torch.arange(a, b, dtype=torch.float32) for a, b in zip(low, high)], indexing="ij")
        axes = torch.tensor([_u(generator, 0.6, 1.4) for _ in range(3)])
        distance = torch.sqrt(sum(((g - c) / (radius * a)) ** 2 for g, c, a in zip(grids, centre, axes)))
        distance = distance + gen.smooth_field(tuple(distance.shape), 4, 0.25, generator)
        region = tissues[tuple(slice(a, b) for a, b in zip(low, high))]
        brain = (region == T["wm"]) | (region == T["gm"]) | (region == T["deep_gm"])
        region[(distance < 1.0) & brain] = T["edema"]
        if _chance(generator, 0.5):
            core = _u(generator, 0.3, 0.6)
            if _chance(generator, 0.7):
                region[(distance < core + 0.15) & (distance >= core) & brain] = T["rim"]
            region[(distance < core) & brain] = T["core"]
    return tissues


def _relaxation(generator: torch.Generator, field_scale: float) -> torch.Tensor:
    """(K, 3) per-tissue T1, T2, PD for one scan: literature values with per-scan jitter."""
    rows = []
    for name in TISSUES:
        t1, t2, pd = RELAXATION[name]
        # per-tissue jitter small enough to keep each family's tissue order (±10 % / ±12 % / ±7 % levelled GM and
        # WM in a quarter of the FLAIR renders until 2026-12-07); the field factor moves every T1 together
        rows.append((t1 * field_scale * _u(generator, 0.95, 1.05), t2 * _u(generator, 0.94, 1.06),
                     pd * _u(generator, 0.96, 1.04)))
    return torch.tensor(rows, dtype=torch.float32)


def mr_signal(kind: str, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Per-tissue signal of one MR scan of `kind` (t1w t1c t2w flair pdw dwi) and the sequence drawn."""
    params = _relaxation(generator, _u(generator, 0.8, 1.1))
    t1, t2, pd = params[:, 0], params[:, 1], params[:, 2]
    # the diploe's fatty marrow makes the skull anything from dark to fat-bright in T1 (age, site)
    marrow = _u(generator, 0.0, 0.7)
    pd[T["skull"]] = 0.08 + marrow * 0.6
    t1[T["skull"]] = 370.0 + (1.0 - marrow) * 400.0
    sequence: dict = {}
    fat = T["fat"]
    if kind in ("t1w", "t1c"):
        if kind == "t1c":
            for name in ENHANCING:
                t1[T[name]] = _u(generator, 200.0, 500.0)
            t1[T["soft"]] *= _u(generator, 0.7, 0.95)
        elif _chance(generator, 0.5):
            pd[T["vessel"]] = _u(generator, 0.3, 0.8)  # inflow: vessels grey rather than black in gradient echo
        recipe = _pick(generator, ("se", "mprage", "gre", "t1flair"))
        if recipe == "se":
            tr, te = _u(generator, 350, 750), _u(generator, 6, 20)
            signal = pd * (1 - torch.exp(-tr / t1)) * torch.exp(-te / t2)
        elif recipe == "gre":
            tr, te, flip = _u(generator, 7, 30), _u(generator, 2, 6), math.radians(_u(generator, 12, 35))
            e1 = torch.exp(-tr / t1)
            signal = pd * math.sin(flip) * (1 - e1) / (1 - math.cos(flip) * e1) * torch.exp(-te / (0.6 * t2))
        else:
            tr = _u(generator, 1800, 2700)
            # past gray matter's null point (so WM > GM > CSF, as a clinical MPRAGE or T1-FLAIR shows): a fixed
            # 700-1150 ms range put it before the null of white matter with long T1s and inverted 12 % of these
            # renders until 2026-12-07 (found by test_training_classification)
            gm_t1 = float(t1[T["gm"]])
            ti = gm_t1 * math.log(2.0 / (1.0 + math.exp(-tr / gm_t1))) * _u(generator, 1.3, 1.8)
            te = _u(generator, 2, 5) if recipe == "mprage" else _u(generator, 8, 25)
            signal = pd * (1 - 2 * torch.exp(-ti / t1) + torch.exp(-tr / t1)).abs() * torch.exp(-te / t2)
        sequence = {"recipe": recipe}
    elif kind in ("t2w", "pdw"):
        if kind == "t2w":
            tr, te = _u(generator, 2500, 7000), _u(generator, 70, 130)
        else:
            tr, te = _u(generator, 1800, 4500), _u(generator, 8, 35)
        if _chance(generator, 0.2):
            pd[fat] *= 0.1
        signal = pd * (1 - torch.exp(-tr / t1)) * torch.exp(-te / t2)
        sequence = {"tr": tr, "te": te}
    elif kind == "flair":
        tr, te = _u(generator, 7000, 11000), _u(generator, 85, 140)  # shorter TR: a short TI and WM > GM
        csf_t1 = float(t1[T["csf"]])
        ti = csf_t1 * math.log(2.0 / (1.0 + math.exp(-tr / csf_t1))) * _u(generator, 0.96, 1.04)
        if _chance(generator, 0.3):
            pd[fat] *= 0.15
        signal = pd * (1 - 2 * torch.exp(-ti / t1) + torch.exp(-tr / t1)).abs() * torch.exp(-te / t2)
        sequence = {"tr": tr, "te": te, "ti": ti}
    elif kind == "dwi":
        tr, te = _u(generator, 3000, 10000), _u(generator, 55, 110)
        pd[fat] *= 0.05
        pd[T["skull"]] *= 0.3
        b0 = pd * (1 - torch.exp(-tr / t1)) * torch.exp(-te / (0.8 * t2))
        if _chance(generator, 0.5):
            signal, sequence = b0, {"b": 0}
        else:
            adc = torch.full((len(TISSUES),), 1.0e-3)
            for name, value in (("wm", 0.72e-3), ("gm", 0.85e-3), ("deep_gm", 0.75e-3), ("csf", 3.0e-3),
                                ("eye", 2.9e-3), ("core", 2.5e-3), ("vessel", 2.0e-3)):
                adc[T[name]] = value * _u(generator, 0.9, 1.1)
            adc[T["edema"]] = _u(generator, 0.4e-3, 1.8e-3)
            b = _u(generator, 700, 1500)
            signal, sequence = b0 * torch.exp(-b * adc), {"b": b}
    else:
        raise ValueError(f"unknown MR type {kind!r}")
    signal[T["air"]] = 0.0
    return signal.clamp(min=0.0), sequence


def ct_values(generator: torch.Generator) -> torch.Tensor:
    values = torch.tensor([_u(generator, *HOUNSFIELD[name]) for name in TISSUES])
    if _chance(generator, 0.15):  # CT angiography: contrast in the vessels
        values[T["vessel"]] = _u(generator, 200, 450)
    if _chance(generator, 0.5):  # choroid plexus calcified or not
        values[T["choroid"]] = _u(generator, 30, 45)
    if _chance(generator, 0.2):  # haemorrhage instead of a hypodense lesion
        values[T["edema"]] = _u(generator, 55, 80)
    return values


def _blur(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    return gen.gaussian_blur(volume, (sigma, sigma, sigma)) if sigma > 0.05 else volume


def _epi_distortion(image: torch.Tensor, generator: torch.Generator, axis: int, voxel_mm: float) -> torch.Tensor:
    """Shift voxels along the phase-encoding axis by a smooth field (a few mm), with the intensity pile-up of the
    Jacobian: EPI's geometric distortion."""
    shape = tuple(image.shape)
    shift = gen.smooth_field(shape, 5, _u(generator, 1.0, 4.0) / voxel_mm, generator)
    grids = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    coordinates = [g.clone() for g in grids]
    coordinates[axis] = coordinates[axis] + shift * 2.0 / max(shape[axis] - 1, 1)
    sample_grid = torch.stack(coordinates[::-1], dim=-1)[None]  # grid_sample wants (x, y, z) = (W, H, D)
    warped = functional.grid_sample(image[None, None], sample_grid, mode="bilinear", padding_mode="zeros",
                                    align_corners=True)[0, 0]
    jacobian = 1.0 + torch.gradient(shift, dim=axis)[0]
    return warped * jacobian.clamp(0.3, 3.0)


def _to_image(volume: torch.Tensor, spacing: tuple[float, float, float], direction: np.ndarray) -> sitk.Image:
    """A SimpleITK image of a (D, H, W) array: `spacing` per array axis (D, H, W), `direction` 3x3 (LPS columns
    for sitk's x, y, z = W, H, D)."""
    image = sitk.GetImageFromArray(volume.numpy().astype(np.float32))
    image.SetSpacing([float(spacing[2]), float(spacing[1]), float(spacing[0])])
    image.SetDirection([float(value) for value in direction.ravel()])
    return image


def random_rotation(generator: torch.Generator, degrees: float) -> np.ndarray:
    angles = [math.radians(_u(generator, -degrees, degrees)) for _ in range(3)]
    cx, cy, cz = (math.cos(a) for a in angles)
    sx, sy, sz = (math.sin(a) for a in angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def acquire_scan(image: torch.Tensor, generator: torch.Generator, voxel_mm: float, kind: str,
                 noise: float) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Thick slices (or partial coverage, or low-resolution EPI) of a render on the voxel_mm grid: the acquired
    array and its spacing per array axis."""
    spacing = [voxel_mm] * 3
    if kind == "dwi":
        axis = 1 if _chance(generator, 0.8) else _pick(generator, (0, 2))  # axial mostly (array axis 1 is I-S)
        image = _epi_distortion(image, generator, 0 if axis != 0 else 2, voxel_mm)
        in_plane = _u(generator, 1.5, 3.0)
        image = _blur(image, 0.5 * math.sqrt(max(in_plane**2 - voxel_mm**2, 0.0)) / voxel_mm)
        thickness = _u(generator, 3.0, 6.0)
    elif _chance(generator, 0.5):
        axis = _pick(generator, (1, 1, 0, 2))
        thickness = _u(generator, 2.5, 7.0)
    else:
        axis, thickness = None, None
    if axis is not None:
        moved = image.movedim(axis, 0)
        step = thickness / voxel_mm
        acquisition = gen.Acquisition(spacing=step, thickness=step * _u(generator, 0.75, 1.0),
                                      offset=_u(generator, 0.0, step), noise_std=0.0, in_plane_sigma=0.0)
        slices = gen.acquire(moved, acquisition, generator)
        image = slices.movedim(0, axis).contiguous()
        spacing[axis] = thickness
        if _chance(generator, 0.3):  # the series covers part of the head only
            keep = max(4, int(image.shape[axis] * _u(generator, 0.55, 0.95)))
            start = int(torch.randint(0, image.shape[axis] - keep + 1, (), generator=generator))
            image = image.narrow(axis, start, keep).contiguous()
    if noise > 0:
        real = image + torch.randn(image.shape, generator=generator) * noise
        imaginary = torch.randn(image.shape, generator=generator) * noise
        image = torch.sqrt(real**2 + imaginary**2)
    return image, (spacing[0], spacing[1], spacing[2])


def render_head(tissues: torch.Tensor, kind: str, generator: torch.Generator, voxel_mm: float) -> sitk.Image:
    """One scan of `kind` (an MR type or 'ct') from a tissue map on a voxel_mm grid in the maps' orientation."""
    if _chance(generator, 0.5):  # the field of view ends above the neck (array axis 1 points inferior)
        keep_rows = int(tissues.shape[1] * _u(generator, 0.65, 1.0))
        tissues = tissues[:, :keep_rows].contiguous()
    if kind == "t1c" or _chance(generator, 0.7):  # enhancing vessels are the commonest sign of contrast
        tissues = add_vessels(tissues, generator)
    if _chance(generator, 0.35):
        tissues = add_lesions(tissues, generator, voxel_mm)
    stripped = _chance(generator, 0.35 if kind != "ct" else 0.15)
    if stripped:
        keep = torch.zeros(len(TISSUES), dtype=torch.bool)
        kept = ["wm", "gm", "deep_gm", "csf", "choroid", "vessel", "edema", "core", "rim"]
        if _chance(generator, 0.5):  # skull stripping often leaves the dura and venous sinuses
            kept.append("dura")
        for name in kept:
            keep[T[name]] = True
        inside = keep[tissues]
        if _chance(generator, 0.5):  # stripping also removes most of the CSF around the brain
            brain = ((tissues != T["csf"]) & inside).float()[None, None]
            inside &= functional.max_pool3d(brain, 3, 1, 1)[0, 0] > 0
    if kind == "ct":
        values = ct_values(generator)
        image = values[tissues]
        image = image + gen.smooth_field(tuple(image.shape), 8, 1.0, generator) * _u(generator, 0.0, 4.0)
        if stripped:
            image = torch.where(inside, image, torch.full_like(image, _pick(generator, (0.0, -1000.0, -1024.0))))
        image = _blur(image, _u(generator, 0.2, 0.6))
        image, spacing = acquire_scan(image, generator, voxel_mm, kind, 0.0)
        image = image + torch.randn(image.shape, generator=generator) * _u(generator, 2.0, 12.0)
        if _chance(generator, 0.15):
            image = image + 1024.0  # stored without the rescale intercept
        return _to_image(image, spacing, np.asarray(LABEL_MAP_DIRECTION).reshape(3, 3))
    signal, _ = mr_signal(kind, generator)
    image = signal[tissues]
    image = image * (1.0 + gen.smooth_field(tuple(image.shape), 10, 1.0, generator) * _u(generator, 0.0, 0.05))
    image = _blur(image, _u(generator, 0.3, 0.8))
    image = image * torch.exp(gen.smooth_field(tuple(image.shape), 4, _u(generator, 0.0, 0.35), generator))
    image = image / image.max().clamp(min=1e-6)
    if kind == "dwi" and _chance(generator, 0.6):
        # susceptibility dropout around the sinuses and petrous bone
        sinus = (tissues == T["sinus"]).float()[None, None]
        near = _blur(functional.max_pool3d(sinus, 7, 1, 3)[0, 0], 2.0)
        image = image * (1.0 - _u(generator, 0.5, 1.0) * near.clamp(0, 1))
    if stripped:
        image = image * inside.float()
    noise = _u(generator, 0.02, 0.08) if kind == "dwi" else _u(generator, 0.0, 0.04)
    image, spacing = acquire_scan(image, generator, voxel_mm, kind, noise)
    return _to_image(image, spacing, np.asarray(LABEL_MAP_DIRECTION).reshape(3, 3))


def render_label_volume(label_map: LabelMap, tissues: torch.Tensor, generator: torch.Generator,
                        voxel_mm: float) -> sitk.Image:
    """A label map stored as a volume (class `other`). Not masks or probability maps: a skull-stripped brain looks
    too much like them at the classifier's resolution (a first run called real stripped T1s `other`); binary masks
    are caught by the label-map rule instead (engine/classification.looks_like_label_map)."""
    choice = _pick(generator, ("values", "indices", "tissues"))
    indices = torch.from_numpy(label_map.indices.astype(np.int64))
    if choice == "values":
        volume = torch.from_numpy(label_map.values.astype(np.float32))[indices]
    elif choice == "indices":
        volume = indices.float()
    else:
        volume = tissues.float()
    return _to_image(volume, (voxel_mm,) * 3, np.asarray(LABEL_MAP_DIRECTION).reshape(3, 3))


def render_body(generator: torch.Generator) -> sitk.Image:
    """A trunk-like phantom (not a head): a large ellipse extruded along I-S with a fat layer, organs, a spine and
    lungs, in Hounsfield units or as an MR image; or a noise / smooth random volume."""
    choice = _pick(generator, ("ct", "mr", "mr", "ct", "noise"))
    size = (int(_u(generator, 30, 90)), int(_u(generator, 60, 110)), int(_u(generator, 80, 128)))  # (S, A, R)
    spacing = (_u(generator, 2.0, 6.0), _u(generator, 1.5, 4.0), _u(generator, 1.5, 4.0))
    if choice == "noise":
        volume = gen.smooth_field(size, int(_u(generator, 3, 12)), 1.0, generator)
        volume = volume + torch.randn(size, generator=generator) * _u(generator, 0.0, 0.5)
        return _to_image(volume * _u(generator, 1, 1000), spacing, np.diag([-1.0, -1.0, 1.0]))
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in size], indexing="ij")
    rx, ry = _u(generator, 0.7, 0.95), _u(generator, 0.5, 0.8)
    radius = torch.sqrt((x / rx) ** 2 + (y / ry) ** 2)
    tissue = torch.zeros(size, dtype=torch.int64)  # 0 air, 1 fat, 2 muscle/organ, 3 bone, 4 lung, 5 organ b
    tissue[radius < 1.0] = 1
    tissue[radius < 0.85] = 2
    organs = gen.smooth_field(size, 5, 1.0, generator)
    tissue[(radius < 0.8) & (organs > 0.3)] = 5
    if _chance(generator, 0.5):
        tissue[(radius < 0.75) & (z > _u(generator, -0.2, 0.6)) & (x.abs() > 0.15)] = 4
    tissue[((x / 0.08) ** 2 + ((y - 0.45 * ry) / 0.08) ** 2) < 1.0] = 3
    if choice == "ct":
        values = torch.tensor([-1000.0, _u(generator, -120, -80), _u(generator, 30, 60), _u(generator, 300, 1000),
                               _u(generator, -900, -700), _u(generator, 40, 120)])
        volume = values[tissue] + torch.randn(size, generator=generator) * _u(generator, 3, 15)
    else:
        values = torch.rand(6, generator=generator)
        values[0] = 0.0
        volume = values[tissue] * _u(generator, 10, 2000)
        volume = volume + torch.randn(size, generator=generator).abs() * volume.max() * _u(generator, 0, 0.03)
    return _to_image(volume, spacing, np.diag([-1.0, -1.0, 1.0]))  # array (S, A, R): sitk x R, y A, z S


def mr_scale(image: sitk.Image, generator: torch.Generator) -> sitk.Image:
    """Any MR intensity scale: 0-1 floats, 12-bit integers, thousands."""
    scale = 10.0 ** _u(generator, -0.5, 4.0)
    scaled = image * scale
    if scale > 300.0 and _chance(generator, 0.6):  # stored as integers
        scaled = sitk.Round(scaled)
    return scaled


def reorient(image: sitk.Image, generator: torch.Generator, rotation_degrees: float = 20.0,
             wrong_header: float = 0.1) -> sitk.Image:
    """The head tilted in the scanner (a rotated direction), sometimes axes permuted behind the header's back."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if _chance(generator, wrong_header):
        order = torch.randperm(3, generator=generator).tolist()
        array = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(order))
        spacing = np.asarray(image.GetSpacing())[::-1][order][::-1]  # sitk (x, y, z) is array axes (2, 1, 0)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing([float(value) for value in spacing])
    image.SetDirection([float(value) for value in (random_rotation(generator, rotation_degrees) @ direction).ravel()])
    image.SetOrigin([_u(generator, -100, 100) for _ in range(3)])
    return image


def render_example(kind: str, label_map: LabelMap, tissues: torch.Tensor, generator: torch.Generator,
                   voxel_mm: float = 2.0) -> sitk.Image:
    """One scan of class `kind` (a CLASSES string) as a SimpleITK image."""
    if kind not in CLASSES:
        raise ValueError(f"kind must be one of {CLASSES}")
    if kind == "other":
        image = (render_label_volume(label_map, tissues, generator, voxel_mm) if _chance(generator, 0.5)
                 else render_body(generator))
    else:
        image = render_head(tissues, kind, generator, voxel_mm)
        if kind != "ct":
            image = mr_scale(image, generator)
    if _chance(generator, 0.5):
        flipped = sitk.Flip(image, [True, False, False])
        flipped.CopyInformation(image)
        image = flipped
    return reorient(image, generator)


def load_real_scan(path: str) -> sitk.Image:
    """A real scan for fine-tuning, as float32 on about the renders' 2 mm grid (block-averaged once at load: the
    classifier's grid is coarser still, and augmenting a 1 mm volume every draw would cost 8x as much)."""
    image = sitk.Cast(sitk.ReadImage(path), sitk.sitkFloat32)
    factors = [max(1, int(2.0 / spacing)) for spacing in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def augment_real(image: sitk.Image, generator: torch.Generator) -> sitk.Image:
    """A new acquisition of a real scan: bias field, thick slices or partial coverage (volumes with near-isotropic
    voxels only), Rician noise, any intensity scale, left-right flip, tilt and sometimes a wrong header, as the
    renders get; contrast (which tissue is brighter) is left as scanned."""
    voxels = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))
    voxels = voxels / torch.quantile(voxels.flatten()[::97], 0.995).clamp(min=1e-6)
    shape = tuple(voxels.shape)
    voxels = voxels.clamp(min=0) * torch.exp(gen.smooth_field(shape, 4, _u(generator, 0.0, 0.25), generator))
    spacing_zyx = list(image.GetSpacing())[::-1]
    isotropic = max(spacing_zyx) < 1.5 * min(spacing_zyx)
    noise = _u(generator, 0.0, 0.03)
    if isotropic:
        voxels, acquired = acquire_scan(voxels, generator, float(min(spacing_zyx)), "t1w", noise)
        spacing_zyx = [float(value) for value in acquired]
    elif noise > 0:
        real = voxels + torch.randn(shape, generator=generator) * noise
        voxels = torch.sqrt(real**2 + (torch.randn(shape, generator=generator) * noise) ** 2)
    result = sitk.GetImageFromArray(voxels.numpy())
    result.SetSpacing([float(value) for value in spacing_zyx[::-1]])
    result.SetOrigin(image.GetOrigin())
    result.SetDirection(image.GetDirection())
    result = mr_scale(result, generator)
    if _chance(generator, 0.5):
        flipped = sitk.Flip(result, [True, False, False])
        flipped.CopyInformation(result)
        result = flipped
    return reorient(result, generator, rotation_degrees=15.0)
