"""Train the contrast-agnostic brain tissue segmenter (background / CSF / GM / WM) on synthetic renders (resumable).

    python -m MIADeepLearningLib.training.train_segmentation --label-maps ../shared/data/brain-label-maps \
        --checkpoint Training/Checkpoints/brain-tissue-synthseg.pt --iterations 50000 --max-minutes 90

SynthSeg's recipe: every example is a label map under a random affine and diffeomorphic deformation, rendered with a
random contrast (the share of fully random contrasts against T1/T2-like ones follows a curriculum over the cumulative
iterations), sometimes acquired with thick slices along a random axis and interpolated back; the target is the
tissue class of each label. Training runs on a working grid (``--working-spacing`` 1 or 2 mm: label maps are
downsampled by block mode first, so generation costs an eighth at 2 mm); ``--patch`` counts voxels of that grid.
``--render-spacing 1`` with a 2 mm grid renders at 1 mm and brings the render onto the 2 mm grid as the engine brings
a 1 mm scan (thin structures then carry real partial volumes; about ten times the generation cost).
Validation: per-class Dice on fixed held-out crops rendered T1-like, T2-like, random, and T1-like with 5 mm slices.
Checkpoints resume exactly like train_synthesis (training/common.py); ``--export`` writes the weights-only file
(``--export-best``: from the copy kept at the best mean validation Dice).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional

from MIADeepLearningLib.engine.devices import autocast_dtype
from MIADeepLearningLib.engine.networks import UNet3D
from MIADeepLearningLib.training import common
from MIADeepLearningLib.training import generator as gen
from MIADeepLearningLib.training.label_maps import LabelMap, downsample_label_map, load_label_maps
from MIADeepLearningLib.training.spatial import (
    SpatialSettings,
    SpatialTransform,
    random_transform,
    transform_coordinates,
)

MODULE = "MIADeepLearningLib.training.train_segmentation"
DEFAULT_HELD_OUT = ["training_seg_13", "training_seg_14", "training_seg_15"]
CLASS_NAMES = gen.TISSUE_CLASSES[1:]  # csf, gm, wm: the classes validation reports
VALIDATION_SETTINGS = ("t1", "t2", "random", "t1_5mm")
EXPORT_KEYS = ("features", "working_spacing", "classes")
GRADIENT_CLIP = 1.0  # global gradient-norm clip, as train_synthesis: one odd batch cannot undo what was learned


@dataclass
class Sample:
    inputs: torch.Tensor  # (1, P, P, P) normalised render
    target: torch.Tensor  # (P, P, P) int64 tissue class
    fractions: torch.Tensor | None = None  # (K, P, P, P): share of each class in the voxel (fine renders only)


@dataclass
class SampleSettings:
    patch: int  # voxels of the working grid
    voxel_mm: float = 1.0  # the working grid's voxel size
    spatial: SpatialSettings | None = None  # None: no spatial augmentation (a plain crop)
    resolution_probability: float = 0.5
    slice_spacing_range_mm: tuple[float, float] = (2.0, 8.0)
    acquisition: tuple[int, gen.Acquisition] | None = None  # fixed (axis, acquisition) instead
    render_factor: int = 1  # 2: the label map is twice as fine; render there, then downsample (1: render as is)
    soft_targets: bool = False  # with render_factor 2: also the class fractions of each voxel (Sample.fractions)
    # (labels, values, class lookup, generator, inner crop slices) -> the same with labels added (e.g. pasted
    # lesions, training/lesion_shapes.LesionPainter) and a function adjusting the rendered means, or None
    label_edit: Callable | None = None
    classes: int = len(gen.TISSUE_CLASSES)  # output classes (the target's values are 0..classes-1)


def margin(voxel_mm: float) -> int:
    """Voxels rendered around the patch so blur, texture and slice interpolation have no border effect inside it."""
    return math.ceil(8.0 / voxel_mm)


def crop_centre(shape: tuple[int, ...], size: int, generator: torch.Generator) -> tuple[float, float, float]:
    """A random crop centre: the whole crop inside the map where it fits (as train_synthesis's crops), else the
    map's centre."""
    centre = []
    for n in shape:
        start = int(torch.randint(0, n - size + 1, (), generator=generator)) if n > size else (n - size) / 2.0
        centre.append(start + (size - 1) / 2.0)
    return tuple(centre)


def downsample_render(image: torch.Tensor) -> torch.Tensor:
    """A render (D, H, W) on the grid twice as coarse, as the engine brings a scan of half the working spacing onto
    its grid (geometry.resample_anti_aliased): Gaussian blur of sigma 1/2 sqrt(2^2 - 1) fine voxels, then a linear
    sample at each coarse voxel's centre, i.e. the mean of its 2³ block. Even sizes."""
    blurred = gen.gaussian_blur(image, (0.5 * math.sqrt(3.0),) * 3)
    return functional.avg_pool3d(blurred[None, None], 2)[0, 0]


def block_fractions(classes: torch.Tensor, count: int) -> torch.Tensor:
    """The share of each class (0..count-1) in every 2³ block of a (D, H, W) class map (even sizes): (count, D/2,
    H/2, W/2), summing to 1. Its argmax (ties to the lower class) is the block's majority class."""
    one_hot = functional.one_hot(classes.long(), count).movedim(-1, 0).float()[None]
    return functional.avg_pool3d(one_hot, 2)[0]


def make_sample(label_map: LabelMap, contrast: str, generator: torch.Generator, settings: SampleSettings) -> Sample:
    """One training (or validation) example: crop + spatial transform of the labels, render, resolution, target.

    With settings.render_factor 2 the label map is twice as fine as the working grid: labels are
    transformed and rendered there and the render is brought onto the working grid as the engine brings a scan
    (downsample_render), so thin structures reach the network with the partial-volume mixing of a real fine scan
    rather than as whole coarse voxels of one label; the target is each block's majority tissue class, and with
    settings.soft_targets also the class fractions of each block (a boundary voxel is part grey, part white)."""
    factor = int(settings.render_factor)
    if factor not in (1, 2):
        raise ValueError(f"render_factor must be 1 or 2, got {factor}.")
    if settings.soft_targets and factor != 2:
        raise ValueError("soft_targets need render_factor 2 (the fractions come from the finer labels).")
    pad = margin(settings.voxel_mm)
    size = settings.patch + 2 * pad
    centre = crop_centre(label_map.indices.shape, size * factor, generator)
    if settings.spatial is None:
        transform = SpatialTransform(transform_coordinates((size * factor,) * 3, centre))
    else:
        transform = random_transform((size * factor,) * 3, centre, generator, settings.spatial,
                                     settings.voxel_mm / factor)
    labels = transform.apply_labels(label_map.indices)
    values = label_map.values
    lookup = torch.from_numpy(gen.tissue_classes(values))
    adjust = None
    if settings.label_edit is not None:
        inner_fine = (slice(pad * factor, (pad + settings.patch) * factor),) * 3
        labels, values, lookup, adjust = settings.label_edit(labels, values, lookup, generator, inner_fine)
    image = gen.render(labels, values, generator, gen.RenderSettings(contrast=contrast), adjust)
    fractions = None
    if factor > 1:
        image = downsample_render(image)
        fractions = block_fractions(lookup[labels], settings.classes)
        target = fractions.argmax(dim=0)
    else:
        target = lookup[labels]
    if settings.acquisition is not None:
        axis, acquisition = settings.acquisition
        image = gen.apply_acquisition(image, acquisition, axis, generator)
    elif settings.resolution_probability > 0:
        image, _ = gen.degrade_resolution(image, generator, settings.resolution_probability,
                                          settings.slice_spacing_range_mm, settings.voxel_mm)
    normalised, _, _ = gen.normalise(image)
    inner = (slice(pad, pad + settings.patch),) * 3
    soft = fractions[(slice(None), *inner)].contiguous() if settings.soft_targets else None
    return Sample(normalised[inner][None].contiguous(), target[inner].contiguous(), soft)


def contrast_weights(iteration: int, start: list[float], final: list[float], ramp: int) -> list[float]:
    """Weights of the random / t1 / t2 contrast families at a cumulative iteration: linear from `start` to `final`
    over `ramp` iterations (a curriculum: realistic contrasts first, more random ones later), then `final`."""
    progress = min(iteration / ramp, 1.0) if ramp > 0 else 1.0
    weights = [a + progress * (b - a) for a, b in zip(start, final)]
    total = sum(weights)
    if total <= 0:
        raise ValueError("The contrast mix needs a positive weight.")
    return [value / total for value in weights]


def draw_contrast(generator: torch.Generator, weights: list[float]) -> str:
    draw, cumulative = float(torch.rand((), generator=generator)), 0.0
    for contrast, weight in zip(gen.CONTRASTS, weights):
        cumulative += weight
        if draw < cumulative:
            return contrast
    return gen.CONTRASTS[max(index for index, weight in enumerate(weights) if weight > 0)]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, fractions: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice averaged over the classes, background included), on the whole batch; against
    the class `fractions` (B, K, ...) of each voxel when given (the network then learns partial volumes, which its
    probabilities, interpolated onto a finer scan, place better than hard labels), else the one-hot `target`."""
    logits = logits.float()
    probabilities = torch.softmax(logits, dim=1)
    if fractions is not None:
        one_hot = fractions.to(probabilities.dtype)
        target = one_hot  # cross_entropy takes class probabilities as the target too
    else:
        one_hot = functional.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probabilities.dtype)
    dims = (0, *range(2, logits.dim()))
    intersection = (probabilities * one_hot).sum(dims)
    dice = (2.0 * intersection + 1e-5) / (probabilities.sum(dims) + one_hot.sum(dims) + 1e-5)
    return functional.cross_entropy(logits, target) + (1.0 - dice.mean())


def validation_set(maps: list[LabelMap], patch: int, voxel_mm: float, seed: int,
                   crops: int = 2, render_factor: int = 1) -> list[tuple[str, Sample]]:
    """Fixed held-out crops without spatial augmentation: T1-like, T2-like and random contrast at the working
    resolution, and T1-like acquired with 5 mm slices along axis 0 (the thick-slice scans the segmenter must handle);
    rendered as the training examples are (`render_factor`, see make_sample)."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for setting in VALIDATION_SETTINGS:
        for repeat in range(crops):
            label_map = maps[len(samples) % len(maps)]
            settings = SampleSettings(patch=patch, voxel_mm=voxel_mm, resolution_probability=0.0,
                                      render_factor=render_factor)
            if setting == "t1_5mm":
                thick = 5.0 / voxel_mm
                settings.acquisition = (0, gen.Acquisition(spacing=thick, thickness=thick, offset=repeat * thick / 2.0,
                                                           noise_std=0.02, in_plane_sigma=0.0))
            samples.append((setting, make_sample(label_map, setting.split("_")[0], generator, settings)))
    return samples


def dice(counts: np.ndarray) -> list[float]:
    """Dice per class from (intersection, predicted, true) voxel counts; 1.0 where a class is absent from both."""
    return [float(2.0 * i / (p + t)) if p + t > 0 else 1.0 for i, p, t in counts]


def evaluate(network: torch.nn.Module, samples: list[tuple[str, Sample]], precision: torch.dtype | None,
             device: torch.device | None = None) -> dict:
    """Dice of CSF / GM / WM per validation setting (voxel counts pooled over its crops), their means per class over
    the settings, and the mean of those."""
    device = device or torch.device("cpu")
    network.eval()
    counts = {setting: np.zeros((len(CLASS_NAMES), 3)) for setting, _ in samples}
    with torch.no_grad(), common.autocast(device, precision):
        for setting, sample in samples:
            prediction = network(sample.inputs[None].to(device)).argmax(dim=1)[0].cpu()
            for index in range(len(CLASS_NAMES)):
                predicted, true = prediction == index + 1, sample.target == index + 1
                counts[setting][index] += [int((predicted & true).sum()), int(predicted.sum()), int(true.sum())]
    network.train()
    row: dict[str, float] = {}
    per_class: dict[str, list[float]] = {name: [] for name in CLASS_NAMES}
    for setting, setting_counts in counts.items():
        for name, value in zip(CLASS_NAMES, dice(setting_counts)):
            row[f"dice_{setting}_{name}"] = value
            per_class[name].append(value)
    means = {f"val_dice_{name}": float(np.mean(values)) for name, values in per_class.items()}
    return {"val_dice": float(np.mean(list(means.values()))), **means, **row}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label-maps", type=Path, help="folder of NIfTI label maps (default: nilearn's MNI maps)")
    parser.add_argument("--held-out", nargs="*", default=DEFAULT_HELD_OUT, help="label-map names kept for validation")
    parser.add_argument("--checkpoint", type=Path, required=True, help="resumed when it exists, rewritten as it goes")
    parser.add_argument("--iterations", type=int, default=50000, help="cumulative iterations to reach")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    parser.add_argument("--working-spacing", type=int, default=2, choices=(1, 2), help="mm per voxel of the grid "
                        "the network works on (label maps are downsampled by block mode)")
    parser.add_argument("--render-spacing", type=int, choices=(1, 2), default=None, help="mm per voxel of the "
                        "renders (default: the working spacing); 1 with a 2 mm working grid renders at 1 mm and "
                        "downsamples as the engine downsamples a 1 mm scan, so partial volumes look as in real scans")
    parser.add_argument("--soft-targets", action="store_true", help="with --render-spacing 1 and a 2 mm grid: learn "
                        "the class fractions of each 2 mm voxel (from the 1 mm labels) instead of its majority class")
    parser.add_argument("--patch", type=int, default=64, help="crop size in voxels of the working grid")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-half-life", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--contrast-mix", type=float, nargs=3, default=[0.2, 0.4, 0.4], metavar=("RANDOM", "T1", "T2"),
                        help="weights of the contrast families at iteration 0")
    parser.add_argument("--contrast-mix-final", type=float, nargs=3, default=[0.7, 0.15, 0.15],
                        metavar=("RANDOM", "T1", "T2"), help="weights reached at --curriculum-iterations")
    parser.add_argument("--curriculum-iterations", type=int, default=10000, help="length of the linear ramp")
    parser.add_argument("--resolution-probability", type=float, default=0.5, help="share of thick-slice examples")
    parser.add_argument("--slice-spacing-range", type=float, nargs=2, default=[2.0, 8.0], metavar=("LOW", "HIGH"),
                        help="mm, of the simulated thick-slice acquisitions")
    SpatialSettings.add_arguments(parser, rotation=15.0, scaling=0.15, translation=10.0)
    parser.add_argument("--flip-axes", type=int, nargs="*", default=[2], help="array axes flipped with p=0.5 "
                        "(2: left-right in NIfTI/NRRD arrays; tissue classes are symmetric)")
    parser.add_argument("--validate-every", type=int, default=250)
    parser.add_argument("--validation-patch", type=int, default=64)
    parser.add_argument("--validation-crops", type=int, default=2, help="held-out crops per validation setting")
    common.add_run_arguments(parser, "validation Dice")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    device = common.export_or_prepare(args, EXPORT_KEYS)
    if device is None:
        return 0
    features = list(args.features)
    network = UNet3D(in_channels=1, out_channels=len(gen.TISSUE_CLASSES), features=features).to(device)
    common.require_patch_multiple(network, args)
    training_maps, held_out_maps = load_label_maps(args.label_maps, args.held_out)
    if not held_out_maps:
        raise SystemExit(f"None of the held-out maps {args.held_out} is in {args.label_maps}.")
    render_spacing = args.render_spacing or args.working_spacing
    if render_spacing > args.working_spacing:
        raise SystemExit(f"--render-spacing {render_spacing} is coarser than --working-spacing {args.working_spacing}.")
    render_factor = args.working_spacing // render_spacing
    if args.soft_targets and render_factor != 2:
        raise SystemExit("--soft-targets needs --render-spacing 1 with --working-spacing 2.")
    training_maps = [downsample_label_map(item, render_spacing) for item in training_maps]
    held_out_maps = [downsample_label_map(item, render_spacing) for item in held_out_maps]
    spatial = SpatialSettings.from_arguments(args, flip_axes=tuple(args.flip_axes))
    optimiser = torch.optim.Adam(network.parameters(), lr=args.lr)
    settings: dict[str, Any] = {
        "features": features, "working_spacing": args.working_spacing, "render_spacing": render_spacing,
        "soft_targets": bool(args.soft_targets),
        "classes": list(gen.TISSUE_CLASSES),
        "patch": args.patch, "batch": args.batch, "lr": args.lr, "lr_half_life": args.lr_half_life,
        "seed": args.seed, "contrast_mix": list(args.contrast_mix), "contrast_mix_final": list(args.contrast_mix_final),
        "curriculum_iterations": args.curriculum_iterations, "resolution_probability": args.resolution_probability,
        "slice_spacing_range": list(args.slice_spacing_range),
        "spatial": {**asdict(spatial), "flip_axes": list(spatial.flip_axes)},
        "training_maps": [item.name for item in training_maps], "held_out_maps": [item.name for item in held_out_maps]}
    state = common.resume(args.checkpoint, network, optimiser, common.TrainingState(settings=settings),
                          lambda saved: common.require_same(saved, settings, ("features", "working_spacing")))
    state.commands.append(common.command_line(MODULE, state, sys.argv[1:] if argv is None else argv, device))
    precision = None if args.no_autocast else autocast_dtype(device)
    validation = validation_set(held_out_maps, args.validation_patch, float(args.working_spacing), args.seed + 1,
                                args.validation_crops, render_factor)
    sample_settings = SampleSettings(patch=args.patch, voxel_mm=float(args.working_spacing), spatial=spatial,
                                     resolution_probability=args.resolution_probability,
                                     slice_spacing_range_mm=tuple(args.slice_spacing_range),
                                     render_factor=render_factor, soft_targets=bool(args.soft_targets))

    def draw(generator: torch.Generator, iteration: int) -> tuple[torch.Tensor, ...]:
        weights = contrast_weights(iteration, args.contrast_mix, args.contrast_mix_final, args.curriculum_iterations)
        samples = []
        for _ in range(args.batch):
            label_map = training_maps[int(torch.randint(0, len(training_maps), (), generator=generator))]
            samples.append(make_sample(label_map, draw_contrast(generator, weights), generator, sample_settings))
        batch = (torch.stack([sample.inputs for sample in samples]), torch.stack([sample.target for sample in samples]))
        if sample_settings.soft_targets:
            batch += (torch.stack([sample.fractions for sample in samples]),)
        return batch

    def compute_loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with common.autocast(device, precision):
            logits = network(batch[0])
        return segmentation_loss(logits, batch[1], batch[2] if len(batch) > 2 else None)

    common.train(state, network, optimiser, args.checkpoint, iterations=args.iterations,
                 max_minutes=args.max_minutes, validate_every=args.validate_every, base_lr=args.lr,
                 lr_half_life=args.lr_half_life, draw=draw, seed=args.seed, compute_loss=compute_loss,
                 evaluate=lambda: evaluate(network, validation, precision, device), loss_name="train_loss",
                 best_metric="val_dice", gradient_clip=GRADIENT_CLIP, workers=args.workers, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
