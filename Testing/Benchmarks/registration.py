"""Benchmark of deformable brain registration across contrasts: affine only, SimpleITK demons and B-spline, ANTs SyN
(antspyx, when a Python with it is given) and the network with and without instance optimisation.

Prints one table from one run (never asserts on quality or time). Issue 4, point 5: the network must reach at least
the Dice of the best classical baseline at >= 20x less CPU time, with < 0.1 % of non-positive Jacobian determinants.

Pairs (each side rendered with its own contrast, so intensities never match across a pair):
- inter-subject: the held-out label maps (not used in training: training_seg_13, 14, 15) in a cycle, moving -> fixed
  13->14, 14->15, 15->13, contrasts (fixed, moving) T1/T2, T2/random, random/T1;
- intra-subject: one map per pair; the moving side is the same map under a random smooth diffeomorphic deformation
  (velocity std VELOCITY_STD_MM on control points DEFORMATION_SPACING_MM apart, integrated; training/spatial.py) and a
  small affine (rotation, scaling, shear, translation of INTRA_AFFINE); contrasts cycle as above. The second intra
  pair's fixed side has a permuted, flipped and oblique grid (index axes reordered and one reversed, exactly, then the
  grid rotated by OBLIQUE_ANGLES_DEG about its centre): the anatomy is then also rotated against the moving side,
  which the affine pre-alignment has to find, and every method has to respect the grid's direction.
Maps come from the bundle (training/label_maps.load_bundle; ../.devdata/brain-label-maps.npz when present, it loads
in seconds) or the NIfTI folder ../shared/data/brain-label-maps, cropped to the head + 8 voxels, at 1 mm (the maps'
native grid), then cut FIELD_OF_VIEW_MM below the top of the brain (common_field_of_view: the maps end at
different depths in the neck, which an inter-subject affine otherwise matches by squashing a head). The bundle keeps
no geometry, so every map gets the NIfTI files' LIA direction and an origin that puts
the grid's centre at (0, 0, 0): the two sides of an inter-subject pair start roughly, not exactly, overlapped. Renders:
training.generator.render with a fixed seed per pair and side, plus Rician noise of std 2 % of the maximum (as in
Testing/Benchmarks/brain_tissue.py).

Methods: every method starts from the same affine pre-alignment (engine.registration.prealign: the network
pipeline's own, engine.affine.affine_prealign on 2 mm copies, no masks), run once per pair; its CPU and wall time
are added to every method's total ('syn+affine' refines it with ANTs' own affine stage before SyN, the usual ANTs
pipeline, in case the shared pre-alignment is what limits the others). The network
(engine.registration) runs its own pre-alignment inside `register`, which its time includes. Every method's result
is one total displacement field on the fixed grid (LPS mm, engine/displacement.py convention: affine included,
compose_with_field) and is evaluated the same way:
- Dice over brain structures: the moving label map warped by nearest neighbour through the total field onto the fixed
  grid, Dice per FreeSurfer label < 100 present in both maps, mean over those labels; tissue Dice CSF / GM / WM on
  the same warped map through generator.tissue_classes;
- % of non-positive Jacobian determinants and SDlogJ (std of log det over det > 0) of the total field inside the
  fixed brain mask (FreeSurfer labels 1-99; extra-cerebral labels > 100 are skull, scalp, eyes), from
  engine.displacement.jacobian_determinant (physical-space derivatives, oblique grids included);
- CPU seconds: time.process_time of this process (all its threads) plus the CPU time of child processes it waited
  for (resource.RUSAGE_CHILDREN), and wall seconds; SimpleITK and torch get --threads threads; ANTs runs in a child
  process (another Python with antspyx: --ants-python, because antspyx pins another numpy than this project) with
  ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS = --threads, and all of that child's CPU time counts.
Other jobs on the machine inflate wall time more than CPU time; the load average is printed.

Usage: python Testing/Benchmarks/registration.py [--quick] [--pairs PATTERN,...] [--methods NAME,...]
       [--label-maps BUNDLE.npz|FOLDER] [--ants-python PATH] [--network-weights FILE] [--threads 2] [--device cpu]
       [--json out.json] [--save FOLDER] [--list-pairs]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MIADeepLearning"))

from MIADeepLearningLib.engine import devices, registration, registry
from MIADeepLearningLib.engine.affine import AffineResult, compose_with_field
from MIADeepLearningLib.engine.displacement import jacobian_determinant, jacobian_stats, warp_image, warp_labels
from MIADeepLearningLib.training import generator as gen
from MIADeepLearningLib.training import spatial
from MIADeepLearningLib.training.label_maps import LabelMap, downsample_label_map, load_bundle, load_label_map

MODEL_ID = "brain-registration"
REPOSITORY = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = REPOSITORY / ".devdata" / "brain-label-maps.npz"
DEFAULT_FOLDER = REPOSITORY.parent / "shared" / "data" / "brain-label-maps"
DEFAULT_HELD_OUT = ["training_seg_13", "training_seg_14", "training_seg_15"]
CONTRASTS = (("t1", "t2"), ("t2", "random"), ("random", "t1"))  # (fixed, moving), cycled over the pairs
LIA = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)  # the label maps' NIfTI direction (LPS, row-major)
NOISE_STD = 0.02  # Rician, relative to the render's maximum (1)
VELOCITY_STD_MM = 3.0  # intra-subject deformation: std of the velocity at the control points
DEFORMATION_SPACING_MM = 24.0
INTRA_AFFINE = {"rotation": 5.0, "scaling": 0.05, "shear": 0.02, "translation_mm": 5.0}
OBLIQUE_PAIR = 1  # index of the intra-subject pair whose fixed grid is permuted, flipped and oblique
PERMUTATION, FLIPPED = (2, 0, 1), 1  # new index axis m = old axis PERMUTATION[m]; new axis FLIPPED reversed
OBLIQUE_ANGLES_DEG = (12.0, -8.0, 6.0)  # rotation about L, P, S of the fixed grid (and its content)
BRAIN_MAX_LABEL = 100  # FreeSurfer brain structures are < 100; extra-cerebral labels above
FIELD_OF_VIEW_MM = 145.0  # every map is cut this far below the top of its brain (training_seg_13's ends there)
CLASSES = ("csf", "gm", "wm")
CLASSICAL = ("affine", "demons", "bspline", "syn", "syn+affine")
NETWORKS = ("network", "network+IO-short", "network+IO")
METHODS = ("identity", *CLASSICAL, *NETWORKS)
TARGET_SPEED_UP, TARGET_FOLDS_PERCENT = 20.0, 0.1
OPTIMISERS = {"gdls": "gradient descent with line search", "lbfgs2": "L-BFGS (LBFGS2)"}


@dataclass
class Settings:
    """Settings of the classical methods and the network, printed with the table."""

    demons_iterations: tuple[int, ...] = (50, 30)  # per level, coarse first
    demons_shrink: tuple[int, ...] = (2, 1)
    demons_sigma_mm: float = 1.5  # Gaussian smoothing of the displacement field after each iteration
    bspline_mesh_mm: float = 40.0  # control-point spacing of the first level
    bspline_scale: tuple[int, ...] = (1, 2, 4)  # mesh refinement per level: 40 -> 20 -> 10 mm
    bspline_shrink: tuple[int, ...] = (4, 2, 1)
    bspline_sigma: tuple[float, ...] = (2.0, 1.0, 0.0)  # voxels
    bspline_iterations: int = 30  # per level
    bspline_sampling: tuple[float, ...] = (0.02, 0.02, 0.005)  # per level: share of the level's fixed voxels
    # sampled by the metric (random, fixed seed)
    bspline_bins: int = 32
    bspline_optimizer: str = "gdls"  # gdls (gradient descent with line search) | lbfgs2
    bspline_physical_scales: bool = False
    syn_iterations: tuple[int, ...] = (40, 20, 10)  # per level at shrink 4, 2, 1
    syn_metric: str = "mattes"
    instance_steps: int = 50  # network+IO (the module's default)
    short_instance_steps: int = 20  # network+IO-short: fewer steps, for the CPU-time target


# ------------------------------------------------------------------------------------------------ pairs


@dataclass
class Pair:
    name: str  # inter-13-14 (moving 13 onto fixed 14), intra-15, intra-14-oblique
    kind: str  # inter | intra
    fixed: str  # label-map names
    moving: str
    contrasts: tuple[str, str]  # (fixed, moving)
    oblique: bool = False


@dataclass
class PairData:
    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image  # FreeSurfer values (Int32) on the fixed grid
    moving_labels: sitk.Image  # on the moving grid
    structures: list[int]  # labels 1-99 present in both maps
    notes: dict[str, float] = field(default_factory=dict)


@dataclass
class Outcome:
    pair: str
    method: str
    dice: float  # mean over structures
    tissue: dict[str, float]
    non_positive_percent: float
    sdlogj: float
    cpu_s: float
    wall_s: float
    per_label: dict[int, float] = field(default_factory=dict)
    head_non_positive_percent: float = math.nan  # same, over the head (labels > 0)
    extra: dict[str, Any] = field(default_factory=dict)


def short(name: str) -> str:
    return name.rsplit("_", 1)[-1]


def all_pairs(held_out: list[str]) -> list[Pair]:
    pairs = []
    count = len(held_out)
    if count > 1:
        for index, moving in enumerate(held_out):
            fixed = held_out[(index + 1) % count]
            pairs.append(Pair(f"inter-{short(moving)}-{short(fixed)}", "inter", fixed, moving,
                              CONTRASTS[index % len(CONTRASTS)]))
    for index, name in enumerate(held_out):
        oblique = index == OBLIQUE_PAIR
        pairs.append(Pair(f"intra-{short(name)}" + ("-oblique" if oblique else ""), "intra", name, name,
                          CONTRASTS[index % len(CONTRASTS)], oblique))
    return pairs


def select_pairs(pairs: list[Pair], patterns: str | None, quick: bool) -> list[Pair]:
    """--pairs: comma-separated fnmatch patterns on the names; --quick: the first intra-subject pair."""
    if patterns:
        wanted = [pattern.strip() for pattern in patterns.split(",") if pattern.strip()]
        chosen = [pair for pair in pairs if any(fnmatch.fnmatchcase(pair.name, pattern) for pattern in wanted)]
        if not chosen:
            raise SystemExit(f"No pair matches {patterns!r}; --list-pairs shows the names.")
        return chosen
    if quick:
        return [pair for pair in pairs if pair.kind == "intra"][:1]
    return pairs


def seed_of(text: str, base: int) -> int:
    """A fixed seed per name (crc32, not hash(): the latter changes between processes)."""
    return base + zlib.crc32(text.encode())


def centred_grid(shape_zyx: tuple[int, ...], spacing: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(origin, direction) of an LIA grid of that shape whose centre is at (0, 0, 0)."""
    direction = np.asarray(LIA).reshape(3, 3)
    half = (np.asarray(shape_zyx[::-1], dtype=float) - 1.0) / 2.0 * spacing
    return tuple(float(v) for v in -direction @ half), LIA


def image_of(array: np.ndarray, spacing: float, origin: tuple[float, ...], direction: tuple[float, ...]) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing,) * 3)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def common_field_of_view(label_map: LabelMap, below_brain_top_mm: float = FIELD_OF_VIEW_MM) -> LabelMap:
    """The map cut off `below_brain_top_mm` below the top of its brain (FreeSurfer labels 1-99), as a scanner's field
    of view placed on the brain would cut it. Why: the held-out maps end at different depths (training_seg_13 stops
    at the lower brainstem, 14 and 15 run ~60 mm further into the neck), and with the whole maps an inter-subject
    affine squashes one head by a third along S-I to match the other's neck. Array axis 1 is I (LIA grids)."""
    labels = np.asarray(label_map.values)[label_map.indices]
    brain_rows = np.flatnonzero(((labels > 0) & (labels < BRAIN_MAX_LABEL)).any(axis=(0, 2)))
    stop = min(int(brain_rows[0] + round(below_brain_top_mm)) + 1, label_map.indices.shape[1])
    return LabelMap(label_map.name, label_map.indices[:, :stop].copy(), label_map.values)


def render_image(indices: torch.Tensor, values: np.ndarray, contrast: str, seed: int) -> np.ndarray:
    """generator.render at the label map's resolution + Rician noise (std NOISE_STD of the maximum, 1)."""
    generator = torch.Generator().manual_seed(seed)
    image = gen.render(indices, values, generator, gen.RenderSettings(contrast=contrast))
    real = image + NOISE_STD * torch.randn(image.shape, generator=generator)
    imaginary = NOISE_STD * torch.randn(image.shape, generator=generator)
    return torch.sqrt(real**2 + imaginary**2).numpy().astype(np.float32)


def deformed(label_map: LabelMap, spacing: float, generator: torch.Generator) -> tuple[np.ndarray, float]:
    """(compact indices of the map under a random affine + smooth diffeomorphic deformation on its own grid, mean
    displacement in mm inside the brain: how far the moving anatomy is from the fixed one before registration)."""
    shape = tuple(label_map.indices.shape)
    affine = spatial.random_affine(generator, INTRA_AFFINE["rotation"], INTRA_AFFINE["scaling"],
                                   INTRA_AFFINE["shear"], INTRA_AFFINE["translation_mm"] / spacing)
    displacement = spatial.random_deformation(shape, generator, VELOCITY_STD_MM / spacing,
                                              DEFORMATION_SPACING_MM / spacing)
    centre = tuple((n - 1) / 2.0 for n in shape)
    coordinates = spatial.transform_coordinates(shape, centre, affine, displacement)
    labels = spatial.SpatialTransform(coordinates).apply_labels(label_map.indices)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    moved = torch.linalg.vector_norm(coordinates - torch.stack(axes, dim=-1), dim=-1) * spacing
    values = np.asarray(label_map.values)
    brain = torch.from_numpy(((values > 0) & (values < BRAIN_MAX_LABEL))[label_map.indices])
    return labels.numpy().astype(np.int16), float(moved[brain].mean())


def reoriented(image: sitk.Image) -> sitk.Image:
    """The same voxels on a permuted, flipped and rotated grid: index axes reordered by PERMUTATION and axis FLIPPED
    reversed (exact, no resampling: physical positions unchanged), then the grid rotated by OBLIQUE_ANGLES_DEG about
    its centre (the content turns with it)."""
    array = sitk.GetArrayFromImage(image)  # (k, j, i)
    old_direction = np.asarray(image.GetDirection()).reshape(3, 3)
    old_spacing, size = np.asarray(image.GetSpacing()), np.asarray(image.GetSize())
    # numpy axis of sitk index axis a is 2 - a
    array = np.transpose(array, [2 - PERMUTATION[m] for m in (2, 1, 0)])
    array = np.flip(array, axis=2 - FLIPPED).copy()
    direction = old_direction[:, list(PERMUTATION)].copy()
    spacing = old_spacing[list(PERMUTATION)]
    corner = np.zeros(3)  # old index of the new index (0, 0, 0)
    corner[PERMUTATION[FLIPPED]] = size[PERMUTATION[FLIPPED]] - 1
    origin = np.asarray(image.TransformContinuousIndexToPhysicalPoint(corner.tolist()))
    direction[:, FLIPPED] *= -1.0
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2.0).tolist()))
    x, y, z = (math.radians(angle) for angle in OBLIQUE_ANGLES_DEG)
    rotation = (np.array([[math.cos(z), -math.sin(z), 0], [math.sin(z), math.cos(z), 0], [0, 0, 1]])
                @ np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
                @ np.array([[1, 0, 0], [0, math.cos(x), -math.sin(x)], [0, math.sin(x), math.cos(x)]]))
    result = sitk.GetImageFromArray(array)
    result.SetSpacing(spacing.tolist())
    result.SetDirection((rotation @ direction).ravel().tolist())
    result.SetOrigin((centre + rotation @ (origin - centre)).tolist())
    return result


def make_pair(pair: Pair, maps: dict[str, LabelMap], spacing: float, seed: int) -> PairData:
    fixed_map, moving_map = maps[pair.fixed], maps[pair.moving]
    notes: dict[str, float] = {}
    fixed_indices = fixed_map.indices
    if pair.kind == "intra":
        moving_indices, notes["true_mean_displacement_mm"] = deformed(
            moving_map, spacing, torch.Generator().manual_seed(seed_of(pair.name + "/deformation", seed)))
    else:
        moving_indices = moving_map.indices
    sides = []
    for label_map, indices, contrast, side in ((fixed_map, fixed_indices, pair.contrasts[0], "fixed"),
                                               (moving_map, moving_indices, pair.contrasts[1], "moving")):
        origin, direction = centred_grid(indices.shape, spacing)
        rendered = render_image(torch.from_numpy(indices.astype(np.int64)), label_map.values, contrast,
                                seed_of(f"{pair.name}/{side}", seed))
        labels = np.asarray(label_map.values, dtype=np.int32)[indices]
        sides.append((image_of(rendered, spacing, origin, direction), image_of(labels, spacing, origin, direction)))
    (fixed, fixed_labels), (moving, moving_labels) = sides
    if pair.oblique:
        fixed, fixed_labels = reoriented(fixed), reoriented(fixed_labels)
    present = [{int(v) for v in item.values if 0 < v < BRAIN_MAX_LABEL} for item in (fixed_map, moving_map)]
    return PairData(fixed, moving, fixed_labels, moving_labels, sorted(present[0] & present[1]), notes)


# ------------------------------------------------------------------------------------------------ methods

# A method takes (fixed, moving, the shared affine pre-alignment) and returns the total field on the fixed grid and
# any extra numbers to report; its time is measured around the call (plus the affine's, for the classical ones).
Method = Callable[[sitk.Image, sitk.Image, AffineResult], "tuple[sitk.Image, dict[str, Any]]"]


def normalised(image: sitk.Image) -> sitk.Image:
    """Intensities mapped so the 1st / 99th percentiles become 0 / 1 (demons compares intensities directly)."""
    values = sitk.GetArrayViewFromImage(image)
    low, high = (float(v) for v in np.percentile(values, (1, 99)))
    return sitk.Cast((image - low) / max(high - low, 1e-6), sitk.sitkFloat32)


def identity_method(fixed: sitk.Image, moving: sitk.Image, affine: AffineResult) -> tuple[sitk.Image, dict]:
    """No registration at all: where the two grids put the anatomy (a reference row, not a method)."""
    field = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, 3)
    field.CopyInformation(fixed)
    return field, {}


def affine_method(fixed: sitk.Image, moving: sitk.Image, affine: AffineResult) -> tuple[sitk.Image, dict]:
    return compose_with_field(affine.transform, fixed), {}


def demons_method(settings: Settings) -> Method:
    def run(fixed: sitk.Image, moving: sitk.Image, affine: AffineResult) -> tuple[sitk.Image, dict]:
        """FastSymmetricForces demons on the moving image resampled through the affine onto the fixed grid, coarse
        to fine (the field of one level, resampled, starts the next). Demons assumes both sides share a contrast."""
        fixed_n = normalised(fixed)
        moving_a = normalised(sitk.Resample(moving, fixed, affine.transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        field = None
        for shrink, iterations in zip(settings.demons_shrink, settings.demons_iterations):
            if shrink > 1:
                sigma = [0.5 * shrink * s for s in fixed.GetSpacing()]
                level_fixed = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed_n, sigma), [shrink] * 3)
                level_moving = sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving_a, sigma), [shrink] * 3)
            else:
                level_fixed, level_moving = fixed_n, moving_a
            demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
            demons.SetNumberOfIterations(iterations)
            demons.SetSmoothDisplacementField(True)
            demons.SetStandardDeviations(settings.demons_sigma_mm)
            demons.SetUseImageSpacing(True)
            if field is None:
                field = demons.Execute(level_fixed, level_moving)
            else:
                start = sitk.Resample(field, level_fixed, sitk.Transform(), sitk.sitkLinear, 0.0,
                                      sitk.sitkVectorFloat64)
                field = demons.Execute(level_fixed, level_moving, start)
        if field.GetSize() != fixed.GetSize():
            field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        field = sitk.Cast(field, sitk.sitkVectorFloat64)
        field.CopyInformation(fixed)
        return compose_with_field(affine.transform, fixed, field), {"demons_rms_change": demons.GetRMSChange()}
    return run


def bspline_method(settings: Settings) -> Method:
    def run(fixed: sitk.Image, moving: sitk.Image, affine: AffineResult) -> tuple[sitk.Image, dict]:
        """Free-form deformation: a cubic B-spline transform in the fixed space after the affine (moving initial
        transform, so the moving image is interpolated once), Mattes mutual information (any contrast pair),
        multi-resolution with the mesh refined per level."""
        extent = [(n - 1) * s for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
        mesh = [max(1, round(e / settings.bspline_mesh_mm)) for e in extent]
        bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.bspline_bins)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentagePerLevel(list(settings.bspline_sampling), 42)
        method.SetInterpolator(sitk.sitkLinear)
        if settings.bspline_optimizer == "lbfgs2":
            method.SetOptimizerAsLBFGS2(solutionAccuracy=1e-5, numberOfIterations=settings.bspline_iterations)
        else:
            method.SetOptimizerAsGradientDescentLineSearch(learningRate=5.0,
                                                           numberOfIterations=settings.bspline_iterations,
                                                           convergenceMinimumValue=1e-5, convergenceWindowSize=5)
        if settings.bspline_physical_scales:
            method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel(list(settings.bspline_shrink))
        method.SetSmoothingSigmasPerLevel(list(settings.bspline_sigma))
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        method.SetMovingInitialTransform(affine.transform)
        method.SetInitialTransformAsBSpline(bspline, inPlace=True, scaleFactors=list(settings.bspline_scale))
        method.Execute(sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32))
        field = sitk.TransformToDisplacementField(bspline, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                                  fixed.GetSpacing(), fixed.GetDirection())
        return compose_with_field(affine.transform, fixed, field), {
            "bspline_metric": float(method.GetMetricValue()), "bspline_mesh": mesh,
            "bspline_parameters": int(bspline.GetNumberOfParameters())}
    return run


ANTS_CHILD = r"""
import json, sys, time
import ants
job = json.loads(sys.argv[1])
fixed, moving = ants.image_read(job["fixed"]), ants.image_read(job["moving"])
cpu, wall = time.process_time(), time.perf_counter()
result = ants.registration(fixed, moving, type_of_transform=job["type"], initial_transform=[job["affine"]],
                           syn_metric=job["metric"], syn_sampling=32, reg_iterations=tuple(job["iterations"]),
                           outprefix=job["prefix"], verbose=False)
print(json.dumps({"fwdtransforms": result["fwdtransforms"], "cpu_s": time.process_time() - cpu,
                  "wall_s": time.perf_counter() - wall, "version": ants.__version__}))
"""


def ants_version(python: Path) -> str | None:
    try:
        completed = subprocess.run([str(python), "-c", "import ants; print(ants.__version__)"], capture_output=True,
                                   text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def read_affine(path: str) -> sitk.AffineTransform:
    """An ITK .mat matrix-offset transform (what ANTs writes) as a SimpleITK affine (same parameter layout)."""
    written = sitk.ReadTransform(path)
    result = sitk.AffineTransform(3)
    result.SetFixedParameters(written.GetFixedParameters())
    result.SetParameters(written.GetParameters())
    return result


def syn_method(settings: Settings, python: Path, threads: int, folder: Path, own_affine: bool = False) -> Method:
    def run(fixed: sitk.Image, moving: sitk.Image, affine: AffineResult) -> tuple[sitk.Image, dict]:
        """ANTs SyN after the shared affine, given as its initial transform: 'SyNOnly' keeps that affine; with
        `own_affine` ('SyN') ANTs first refines it with its own multi-resolution affine stage (the usual ANTs
        pipeline, antspyx defaults: Mattes MI, 2100/1200/1200/10 iterations at shrink 6/4/2/1), and the affine it
        writes back is the one composed with the warp. In a child process because antspyx pins another numpy than
        this project. The caller's timing counts the whole child (resource.RUSAGE_CHILDREN); extra['child_cpu_s']
        is its time inside ants.registration alone."""
        prefix = folder / "syn_"
        paths = {"fixed": folder / "fixed.nrrd", "moving": folder / "moving.nrrd", "affine": folder / "affine.mat"}
        sitk.WriteImage(sitk.Cast(fixed, sitk.sitkFloat32), str(paths["fixed"]))
        sitk.WriteImage(sitk.Cast(moving, sitk.sitkFloat32), str(paths["moving"]))
        sitk.WriteTransform(affine.transform, str(paths["affine"]))
        job = {**{key: str(value) for key, value in paths.items()}, "prefix": str(prefix),
               "type": "SyN" if own_affine else "SyNOnly", "metric": settings.syn_metric,
               "iterations": list(settings.syn_iterations)}
        environment = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads),
                       "OMP_NUM_THREADS": str(threads)}
        completed = subprocess.run([str(python), "-c", ANTS_CHILD, json.dumps(job)], capture_output=True, text=True,
                                   env=environment)
        if completed.returncode != 0:
            raise RuntimeError(f"ANTs failed: {completed.stderr.strip()[-2000:]}")
        report = json.loads(completed.stdout.strip().splitlines()[-1])
        warps = [path for path in report["fwdtransforms"] if path.endswith("Warp.nii.gz")]
        if len(warps) != 1:
            raise RuntimeError(f"Expected one SyN warp among {report['fwdtransforms']}.")
        field = sitk.Cast(sitk.ReadImage(warps[0]), sitk.sitkVectorFloat64)
        if field.GetSize() != fixed.GetSize() or not np.allclose(field.GetOrigin(), fixed.GetOrigin(), atol=1e-3):
            raise RuntimeError("The SyN warp is not on the fixed grid.")
        field.CopyInformation(fixed)  # NIfTI keeps the geometry in float32: same grid to 1e-3 mm
        # the affine ANTs wrote back (applied after the warp): SyNOnly must echo the shared one; SyN refines it
        echoed = [path for path in report["fwdtransforms"] if path.endswith(".mat")]
        if own_affine and len(echoed) != 1:
            raise RuntimeError(f"Expected one affine among {report['fwdtransforms']}.")
        used = read_affine(echoed[0]) if own_affine else affine.transform
        change = math.nan
        if echoed:
            written = read_affine(echoed[0])
            corners = [fixed.TransformIndexToPhysicalPoint([0, 0, 0]),
                       fixed.TransformIndexToPhysicalPoint([n - 1 for n in fixed.GetSize()])]
            change = max(float(np.linalg.norm(np.subtract(written.TransformPoint(p),
                                                          affine.transform.TransformPoint(p)))) for p in corners)
        for path in folder.iterdir():
            path.unlink()
        return compose_with_field(used, fixed, field), {
            "child_cpu_s": report["cpu_s"], "child_wall_s": report["wall_s"], "antspyx": report["version"],
            "ants_affine_vs_shared_mm": change}
    return run


def network_methods(settings: Settings, device: str, weights_file: Path | None, folder: Path
                    ) -> tuple[dict[str, Method], str]:
    """The network rows, plugged in when engine.registration and a model package exist; else ({}, why not).

    engine.registration.DeformableRegistration(model, weight_paths, device, options).register(fixed, moving)
    returns {"field": the total LPS displacement field on the fixed grid (its own affine pre-alignment included),
    ...}. Options: the package's slicer.options (what a user gets) with instance_steps 0 or settings.instance_steps.
    `weights_file` (a weights-only file or a training checkpoint, exported here) replaces the package's weights, to
    measure a checkpoint before it is shipped."""
    try:
        model = registry.get_model(MODEL_ID)
        weights = registry.verified_weight_paths(model) if weights_file is None else {"network": weights_file}
    except Exception as error:  # any reason is reported, not raised
        return {}, f"no usable model package {MODEL_ID!r} ({error})"
    label = f"{MODEL_ID} {model.version} (sha256 {', '.join(w.sha256[:12] for w in model.weights)}...)"
    if weights_file is not None:
        payload = torch.load(weights_file, map_location="cpu", weights_only=True)
        if "model" in payload and "settings" in payload:  # a training checkpoint: evaluate it as it would be exported
            from MIADeepLearningLib.training.common import export_weights
            from MIADeepLearningLib.training.train_registration import EXPORT_KEYS

            weights = {"network": folder / "exported-network.pt"}
            export_weights(weights_file, weights["network"], EXPORT_KEYS)
            label = (f"{MODEL_ID} pipeline with training checkpoint {weights_file} at iteration "
                     f"{payload.get('iteration')}")
        else:
            label = f"{MODEL_ID} pipeline with weights file {weights_file}"
    methods: dict[str, Method] = {}
    package_options = dict(getattr(model, "slicer", {}).get("options", {}))
    for name, steps in (("network", 0), ("network+IO-short", settings.short_instance_steps),
                        ("network+IO", settings.instance_steps)):
        options = {**package_options, "instance_steps": steps, "deformable": True}
        engine = registration.DeformableRegistration(model, weights, torch.device(device), options)

        def run(fixed: sitk.Image, moving: sitk.Image, affine: AffineResult, engine: Any = engine
                ) -> tuple[sitk.Image, dict]:
            result = engine.register(fixed, moving)
            return result["field"], {"warnings": list(result.get("warnings", []))}
        methods[name] = run
    options_text = ", ".join(f"{key} {value}" for key, value in sorted(package_options.items())
                             if key != "instance_steps")
    return methods, f"{label}; package options {options_text}"


# ------------------------------------------------------------------------------------------------ evaluation


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def evaluate(data: PairData, total: sitk.Image) -> dict[str, Any]:
    """Dice per structure and per tissue class of the warped moving labels, and the Jacobian numbers of the field."""
    warped = sitk.GetArrayFromImage(warp_labels(data.moving_labels, data.fixed_labels, total))
    fixed = sitk.GetArrayFromImage(data.fixed_labels)
    per_label = {}
    for label in data.structures:
        in_fixed, in_warped = fixed == label, warped == label
        total_count = np.count_nonzero(in_fixed) + np.count_nonzero(in_warped)
        per_label[label] = 2.0 * np.count_nonzero(in_fixed & in_warped) / total_count if total_count else math.nan
    values = np.union1d(np.unique(fixed), np.unique(warped))
    lookup = np.zeros(int(values.max()) + 1, dtype=np.int64)
    lookup[values] = gen.tissue_classes(values)
    fixed_tissue, warped_tissue = lookup[fixed], lookup[warped]
    tissue = {}
    for index, name in enumerate(CLASSES, start=1):
        a, b = fixed_tissue == index, warped_tissue == index
        tissue[name] = 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)
    determinant = jacobian_determinant(total)
    brain = (fixed > 0) & (fixed < BRAIN_MAX_LABEL)
    stats = jacobian_stats(determinant, brain)
    head = jacobian_stats(determinant, fixed > 0)
    return {"dice": float(np.nanmean(list(per_label.values()))), "per_label": per_label, "tissue": tissue,
            "non_positive_percent": stats.non_positive_percent, "sdlogj": stats.log_std,
            "head_non_positive_percent": head.non_positive_percent}


def timed(function: Callable[[], Any]) -> tuple[Any, float, float]:
    children, cpu, wall = children_cpu(), time.process_time(), time.perf_counter()
    value = function()
    return value, time.process_time() - cpu + (children_cpu() - children), time.perf_counter() - wall


def save_images(folder: Path | None, name: str, images: dict[str, sitk.Image]) -> None:
    """--save: images written as <folder>/<pair>/<role>.nrrd (compressed), to look at a result in Slicer."""
    if folder is None:
        return
    (folder / name).mkdir(parents=True, exist_ok=True)
    for role, image in images.items():
        sitk.WriteImage(image, str(folder / name / f"{role}.nrrd"), True)


def run_pair(pair: Pair, data: PairData, methods: dict[str, Method], log: Callable[[str], None],
             save: Path | None = None) -> tuple[list[Outcome], dict[str, Any]]:
    affine, affine_cpu, affine_wall = timed(lambda: registration.prealign(data.fixed, data.moving))
    info = {"affine_cpu_s": affine_cpu, "affine_wall_s": affine_wall, "affine_overlap": affine.overlap,
            "affine_metric": affine.metric, **data.notes}
    log(f"affine {affine_cpu:.1f} CPU s (foreground overlap {affine.overlap:.3f})")
    save_images(save, pair.name, {"fixed": data.fixed, "moving": data.moving, "fixed_labels": data.fixed_labels,
                                  "moving_labels": data.moving_labels})
    outcomes = []
    for name, method in methods.items():
        try:
            (total, extra), cpu, wall = timed(lambda method=method: method(data.fixed, data.moving, affine))
        except Exception as error:  # one failure must not lose the other rows
            log(f"{name} FAILED: {error}")
            outcomes.append(Outcome(pair.name, name, math.nan, dict.fromkeys(CLASSES, math.nan), math.nan, math.nan,
                                    math.nan, math.nan, extra={"error": str(error)}))
            continue
        if name not in ("identity", *NETWORKS):  # these start from the shared pre-alignment
            cpu, wall = cpu + affine_cpu, wall + affine_wall
        scores = evaluate(data, total)
        save_images(save, pair.name, {f"{name}_warped": warp_image(data.moving, data.fixed, total),
                                      f"{name}_warped_labels": warp_labels(data.moving_labels, data.fixed, total)})
        outcomes.append(Outcome(pair.name, name, scores["dice"], scores["tissue"], scores["non_positive_percent"],
                                scores["sdlogj"], cpu, wall, scores["per_label"], scores["head_non_positive_percent"],
                                extra))
        log(f"{name}: Dice {scores['dice']:.3f}, GM {scores['tissue']['gm']:.3f}, "
            f"det<=0 {scores['non_positive_percent']:.3f} %, {cpu:.1f} CPU s, {wall:.1f} s")
    return outcomes, info


# ------------------------------------------------------------------------------------------------ report


def number(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def mean(values: list[float]) -> float:
    present = [value for value in values if not math.isnan(value)]
    return statistics.mean(present) if present else math.nan


def summarise(outcomes: list[Outcome], methods: list[str]) -> dict[str, dict[str, float]]:
    """Per method: the mean over the pairs it ran on (a failed pair counts as missing, and `failed` says so)."""
    summary = {}
    for method in methods:
        rows = [o for o in outcomes if o.method == method]
        if not rows:
            continue
        summary[method] = {"pairs": len(rows), "failed": sum(math.isnan(o.dice) for o in rows),
                           "dice": mean([o.dice for o in rows]),
                           **{name: mean([o.tissue[name] for o in rows]) for name in CLASSES},
                           "non_positive_percent": mean([o.non_positive_percent for o in rows]),
                           "sdlogj": mean([o.sdlogj for o in rows]),
                           "cpu_s": mean([o.cpu_s for o in rows]), "wall_s": mean([o.wall_s for o in rows])}
    return summary


def row(label: str, values: dict[str, float], extra: str = "") -> str:
    return (f"| {label} | {number(values['dice'])} | " + " | ".join(number(values[name]) for name in CLASSES)
            + f" | {number(values['non_positive_percent'], 4)} | {number(values['sdlogj'])} | "
            + f"{number(values['cpu_s'], 1)} | {number(values['wall_s'], 1)} |{extra}")


def target_check(summary: dict[str, dict[str, float]]) -> list[str]:
    classical = {name: values for name, values in summary.items() if name in CLASSICAL and name != "affine"
                 and not math.isnan(values["dice"])}
    if not classical:
        return ["Target: no deformable classical baseline ran; nothing to compare against."]
    best_name = max(classical, key=lambda name: classical[name]["dice"])
    best = classical[best_name]
    lines = [f"Best classical baseline by mean Dice: {best_name} ({best['dice']:.3f}, {best['cpu_s']:.1f} CPU s)."]
    for name in NETWORKS:
        if name not in summary or math.isnan(summary[name]["dice"]):
            continue
        values = summary[name]
        speed_up = best["cpu_s"] / values["cpu_s"] if values["cpu_s"] > 0 else math.inf
        met = (values["dice"] >= best["dice"] and speed_up >= TARGET_SPEED_UP
               and values["non_positive_percent"] < TARGET_FOLDS_PERCENT)
        lines.append(f"Target for {name} (Dice >= {best['dice']:.3f}, >= {TARGET_SPEED_UP:.0f}x less CPU, "
                     f"det<=0 < {TARGET_FOLDS_PERCENT} %): {'MET' if met else 'NOT met'} — Dice "
                     f"{values['dice'] - best['dice']:+.3f}, {speed_up:.1f}x less CPU, det<=0 "
                     f"{values['non_positive_percent']:.4f} %.")
    return lines


def print_report(outcomes: list[Outcome], infos: dict[str, dict[str, Any]], methods: list[str], notes: list[str],
                 header: str) -> dict[str, dict[str, float]]:
    summary = summarise(outcomes, methods)
    print()
    print(header)
    print()
    columns = ("| method | Dice structures | CSF | GM | WM | % det J <= 0 | SDlogJ | CPU s | wall s |",
               "|---|---|---|---|---|---|---|---|---|")
    print("Mean over pairs:")
    print()
    print("\n".join(columns))
    for method, values in summary.items():
        failed = f" {values['failed']} of {values['pairs']} pairs failed" if values["failed"] else ""
        print(row(method, values, failed))
    print()
    print("Per pair:")
    print()
    print("| pair | " + columns[0][2:])
    print("|---" + columns[1])
    for pair in infos:
        for outcome in (o for o in outcomes if o.pair == pair):
            values = {"dice": outcome.dice, **outcome.tissue, "non_positive_percent": outcome.non_positive_percent,
                      "sdlogj": outcome.sdlogj, "cpu_s": outcome.cpu_s, "wall_s": outcome.wall_s}
            print(row(f"{pair} | {outcome.method}", values))
    print()
    for pair, info in infos.items():
        details = [f"contrasts fixed/moving {info['contrasts']}", f"fixed {info['fixed_size']}",
                   f"{info['structures']} structures", f"affine {info['affine_cpu_s']:.1f} CPU s / "
                   f"{info['affine_wall_s']:.1f} s, foreground overlap {info['affine_overlap']:.3f}"]
        if "true_mean_displacement_mm" in info:
            details.append(f"true mean displacement in the brain {info['true_mean_displacement_mm']:.1f} mm")
        print(f"- {pair}: " + "; ".join(details) + ".")
    print()
    for line in target_check(summary):
        print(line)
    print()
    print("Notes:")
    for note in notes:
        print(f"- {note}")
    return summary


def settings_notes(settings: Settings, ants: str | None, network: str, threads: int) -> list[str]:
    s = settings
    return [
        "Every method starts from the same affine pre-alignment (engine.registration.prealign, the network "
        "pipeline's own: Mattes MI on 2 mm copies, rigid then affine, no masks); its time is included in each "
        "classical method's CPU and wall seconds. "
        "'identity' = no registration (both grids centred on (0, 0, 0)), for reference.",
        f"demons: SimpleITK FastSymmetricForces, {s.demons_iterations} iterations at shrink {s.demons_shrink}, field "
        f"smoothed with sigma {s.demons_sigma_mm} mm, on the affinely resampled moving image, intensities mapped to "
        "[0, 1] between the 1st and 99th percentiles. Demons is mono-modal: it matches intensities, and every pair "
        "here has different contrasts on its two sides (run as is, honestly: its numbers show what that costs).",
        f"bspline: SimpleITK B-spline FFD (cubic), Mattes MI ({s.bspline_bins} bins, random samples of "
        f"{'/'.join(f'{v:.1%}' for v in s.bspline_sampling)} of each level's voxels, fixed seed), mesh "
        f"{s.bspline_mesh_mm:g} mm refined x{s.bspline_scale} over shrink {s.bspline_shrink} (smoothing "
        f"{s.bspline_sigma} voxels), {OPTIMISERS[s.bspline_optimizer]}"
        f"{', physical-shift scales' if s.bspline_physical_scales else ''}, {s.bspline_iterations} iterations per "
        "level; the affine as moving initial transform.",
        (f"syn: ANTs SyN (antspyx {ants}, type 'SyNOnly' after the shared affine as initial transform), metric "
         f"{s.syn_metric} (32 bins), iterations {s.syn_iterations} at shrink 4, 2, 1 (smoothing 2, 1, 0 voxels), "
         "in a separate Python (antspyx pins numpy 2.3, this project's venv has 2.4). syn+affine: the same after "
         "ANTs' own affine stage (type 'SyN', antspyx defaults) refining the shared pre-alignment: the usual ANTs "
         "pipeline, in case the shared pre-alignment is what holds the others back." if ants else
         "syn: ANTs SyN not run: no Python with antspyx given (--ants-python); antspyx cannot go into the project's "
         "venv (pip install antspyx==0.6.3 would downgrade numpy 2.4.6 -> 2.3.5)."),
        (f"network: {network}; network+IO-short / network+IO: the same with {s.short_instance_steps} / "
         f"{s.instance_steps} instance-optimisation steps (the package's options otherwise). Their time "
         "includes their own affine pre-alignment (inside register)." if not network.startswith("not run")
         else f"network: {network}."),
        f"Threads: SimpleITK global default {threads}, torch {threads}, ANTs (ITK) {threads}. CPU s = process time of "
        "all threads of this process plus that of the child processes it waited for (ANTs: the whole child, Python "
        "start and antspyx import included, about 2 s); wall s beside it. Other jobs shared the 2 cores (see the "
        "load average), which inflates wall time much more than CPU time.",
        "Dice: mean over the FreeSurfer labels < 100 present in both maps (moving labels warped by nearest neighbour "
        "through the total field onto the fixed grid); CSF / GM / WM: generator.tissue_classes of the same maps. "
        "% det J <= 0 and SDlogJ: total field (affine included) inside the fixed brain (labels 1-99).",
    ]


# ------------------------------------------------------------------------------------------------ main


def load_maps(source: Path, names: list[str]) -> dict[str, LabelMap]:
    if source.suffix == ".npz":
        maps = {item.name: item for item in load_bundle(source) if item.name in names}
    else:
        maps = {name: load_label_map(source / f"{name}.nii.gz") for name in names
                if (source / f"{name}.nii.gz").is_file()}
    missing = [name for name in names if name not in maps]
    if missing:
        raise SystemExit(f"Label maps {missing} are not in {source}; give --label-maps.")
    return maps


def write_json(path: Path, context: dict[str, Any], infos: dict[str, dict[str, Any]], outcomes: list[Outcome]
               ) -> None:
    payload = {**context, "pairs": infos,
               "outcomes": [{**asdict(o), "per_label": {str(k): v for k, v in o.per_label.items()}} for o in outcomes]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label-maps", type=Path,
                        default=DEFAULT_BUNDLE if DEFAULT_BUNDLE.is_file() else DEFAULT_FOLDER,
                        help="a label-map bundle (.npz) or a folder of NIfTI label maps")
    parser.add_argument("--held-out", nargs="+", default=DEFAULT_HELD_OUT)
    parser.add_argument("--pairs", help="comma-separated patterns on pair names (fnmatch), e.g. 'inter-*,intra-13'")
    parser.add_argument("--list-pairs", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one intra-subject pair on a 2 mm grid (label maps block-downsampled), fewer "
                             "iterations")
    parser.add_argument("--ants-python", type=Path, help="a Python with antspyx (kept out of the project's venv)")
    parser.add_argument("--network-weights", type=Path,
                        help="evaluate these weights (weights-only file or training checkpoint) in the package's "
                             "pipeline instead of the package's own")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--save", type=Path, help="write each pair's images and labels, and each method's warped "
                        "moving image and labels, as NRRD under this folder (to look at in Slicer)")
    args = parser.parse_args(argv)
    pairs = all_pairs(args.held_out)
    if args.list_pairs:
        print("\n".join(f"{pair.name}: fixed {pair.fixed} ({pair.contrasts[0]}), moving {pair.moving} "
                        f"({pair.contrasts[1]})" + (", fixed grid permuted + oblique" if pair.oblique else "")
                        for pair in pairs))
        return 0
    pairs = select_pairs(pairs, args.pairs, args.quick)
    wanted = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown methods {unknown}; choose from {', '.join(METHODS)}.")
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    settings = Settings()
    spacing = 1.0
    if args.quick:  # a smoke run: every method runs, briefly
        settings = Settings(demons_iterations=(20, 10), bspline_iterations=10, syn_iterations=(20, 10, 0),
                            instance_steps=10, short_instance_steps=5)
        spacing = 2.0
    started, load_before = time.perf_counter(), os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="miadl-registration-") as folder:
        ants = None
        available: dict[str, Method] = {"identity": identity_method, "affine": affine_method,
                                        "demons": demons_method(settings), "bspline": bspline_method(settings)}
        if {"syn", "syn+affine"} & set(wanted) and args.ants_python is not None:
            ants = ants_version(args.ants_python)
            if ants is None:
                raise SystemExit(f"{args.ants_python} cannot import ants (antspyx).")
            available["syn"] = syn_method(settings, args.ants_python, args.threads, Path(folder))
            available["syn+affine"] = syn_method(settings, args.ants_python, args.threads, Path(folder), True)
        network = "not run (not asked for)"
        if any(name in wanted for name in NETWORKS):
            networks, network = network_methods(settings, args.device, args.network_weights, Path(folder))
            if not networks:
                network = f"not run: {network}"
            available.update(networks)
        methods = {name: available[name] for name in METHODS if name in wanted and name in available}

        maps = load_maps(args.label_maps, sorted({name for pair in pairs for name in (pair.fixed, pair.moving)}))
        maps = {name: common_field_of_view(item) for name, item in maps.items()}
        if spacing != 1.0:
            maps = {name: downsample_label_map(item, int(spacing)) for name, item in maps.items()}
        outcomes: list[Outcome] = []
        infos: dict[str, dict[str, Any]] = {}
        context = {"settings": asdict(settings), "spacing_mm": spacing, "threads": args.threads, "seed": args.seed,
                   "device": args.device, "cpu": devices.cpu_name(), "simpleitk": sitk.Version.VersionString(),
                   "torch": torch.__version__, "antspyx": ants, "network": network}
        for pair in pairs:
            print(f"{pair.name}: rendering ...", flush=True)
            data = make_pair(pair, maps, spacing, args.seed)
            outcome, info = run_pair(pair, data, methods, lambda text: print(f"  {text}", flush=True), args.save)
            outcomes += outcome
            infos[pair.name] = {**info, "contrasts": "/".join(pair.contrasts), "kind": pair.kind,
                                "fixed_size": "x".join(map(str, data.fixed.GetSize())),
                                "moving_size": "x".join(map(str, data.moving.GetSize())),
                                "structures": len(data.structures), "oblique": pair.oblique}
            if args.json:  # after every pair, so a run that dies keeps what it measured
                write_json(args.json, {**context, "complete": False}, infos, outcomes)

    seconds = time.perf_counter() - started
    notes = settings_notes(settings, ants, network, args.threads)
    if args.quick:
        notes.insert(0, "QUICK smoke run: label maps block-downsampled to 2 mm, one pair, fewer iterations; not the "
                        "benchmark.")
    header = (f"# Registration across contrasts — {devices.cpu_name()}, {os.cpu_count()} CPU cores, "
              f"SimpleITK {sitk.Version.VersionString()}, torch {torch.__version__}, {args.threads} threads, "
              f"device {args.device}; {len(pairs)} pairs at {spacing:g} mm; load average {load_before:.1f} before, "
              f"{os.getloadavg()[0]:.1f} after; {seconds / 60:.1f} min in all")
    summary = print_report(outcomes, infos, list(methods), notes, header)
    if args.json:
        write_json(args.json, {**context, "notes": notes, "summary": summary, "seconds": seconds, "complete": True},
                   infos, outcomes)
        print(f"Numbers saved to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
