"""Train a contrast-agnostic deformable registration network on synthetic pairs, SynthMorph-style (resumable).

    python -m MIADeepLearningLib.training.train_registration --label-maps ../shared/data/brain-label-maps \
        --checkpoint Training/Checkpoints/brain-registration.pt --iterations 50000 --max-minutes 90

Why synthetic pairs: a crop of one label map goes through two independent random spatial transforms (affine +
diffeomorphic deformation, training/spatial.py), giving fixed and moving labels; each side is rendered with its own
random contrast (the families drawn independently), so the network cannot match intensities and must match anatomy.
With ``--inter-subject`` > 0 that share of pairs takes the moving side from another label map. The network
(``engine.networks.UNet3D``, 2 input channels fixed/moving, 3 outputs) predicts a stationary velocity field in voxels of
the working grid, integrated by scaling and squaring (``--integration-steps``) into a displacement u on the fixed grid:
the fixed voxel x samples the moving image at x + u(x), the convention of engine/displacement.py. Its head is
near zero (N(0, 0.01)), so training starts almost at the identity. Loss: 1 - soft Dice of the warped moving tissue
classes (CSF, GM, WM of ``generator.tissue_classes``: the same classes in every map, so inter-subject pairs compare
like with like) against the fixed ones, + ``--smoothness`` x the mean squared spatial gradient of u (voxels).
Validation on fixed held-out pairs (T1/T2, T2/random, random/T1): ``val_dice`` (warped moving vs fixed, CSF/GM/WM
pooled per class then averaged), ``val_dice_identity`` (the same before registration) and ``val_fold_percent`` (% of
voxels whose Jacobian determinant is <= 0). Checkpoints resume exactly like train_segmentation (training/common.py);
``--export`` writes the weights-only file with what rebuilds the network (``--export-best``: from the best val_dice).

Status: the shipped brain-registration weights come from 6,250 CPU iterations of this script; they are only slightly
better than the identity on the held-out validation pairs and not yet better than the affine step on the benchmark
(model card); the checkpoint resumes for longer (GPU) stretches.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional
from torch import nn

from MIADeepLearningLib.engine.devices import autocast_dtype
from MIADeepLearningLib.engine.flow import integrate_velocity, warp
from MIADeepLearningLib.engine.networks import UNet3D
from MIADeepLearningLib.training import common
from MIADeepLearningLib.training import generator as gen
from MIADeepLearningLib.training.label_maps import LabelMap, downsample_label_map, load_label_maps
from MIADeepLearningLib.training.spatial import SpatialSettings, jacobian_determinant, random_transform
from MIADeepLearningLib.training.train_segmentation import crop_centre, draw_contrast, margin

MODULE = "MIADeepLearningLib.training.train_registration"
DEFAULT_HELD_OUT = ["training_seg_13", "training_seg_14", "training_seg_15"]
CLASS_NAMES = gen.TISSUE_CLASSES[1:]  # csf, gm, wm: the structures the loss and validation compare
VALIDATION_CONTRASTS = (("t1", "t2"), ("t2", "random"), ("random", "t1"))  # (fixed, moving): never the same family
EXPORT_KEYS = ("features", "working_spacing", "integration_steps", "classes")
GRADIENT_CLIP = 1.0
HEAD_STD = 1e-2
CURRICULUM_FAMILIES = ("t1", "t2")  # families whose two draws keep the same tissue order, so intensities still match


@dataclass
class Pair:
    inputs: torch.Tensor  # (2, P, P, P): normalised fixed and moving renders
    fixed: torch.Tensor  # (P, P, P) int64 tissue class of the fixed side
    moving: torch.Tensor  # (P, P, P) int64 tissue class of the moving side


@dataclass
class PairSettings:
    patch: int  # voxels of the working grid
    voxel_mm: float = 2.0
    spatial: SpatialSettings | None = None  # None: SpatialSettings.identity() (both sides the same crop)


def matching_centre(centre: tuple[float, ...], source: tuple[int, ...], target: tuple[int, ...]) -> tuple[float, ...]:
    """The same relative position in another map (maps are cropped to the head, so this is roughly the same anatomy):
    the starting point an affine pre-alignment would give an inter-subject pair."""
    return tuple(c / max(s - 1, 1) * (t - 1) for c, s, t in zip(centre, source, target))


def make_pair(fixed_map: LabelMap, moving_map: LabelMap, contrasts: tuple[str, str], generator: torch.Generator,
              settings: PairSettings) -> Pair:
    """One training (or validation) pair: a crop (at the same relative position in both maps), an independent
    random spatial transform and an independent render per side; targets are tissue classes."""
    pad = margin(settings.voxel_mm)
    size = settings.patch + 2 * pad
    spatial = settings.spatial or SpatialSettings.identity()
    centre = crop_centre(fixed_map.indices.shape, size, generator)
    inner = (slice(pad, pad + settings.patch),) * 3
    images, targets = [], []
    for label_map, contrast, side_centre in (
            (fixed_map, contrasts[0], centre),
            (moving_map, contrasts[1], matching_centre(centre, fixed_map.indices.shape, moving_map.indices.shape))):
        transform = random_transform((size,) * 3, side_centre, generator, spatial, settings.voxel_mm)
        labels = transform.apply_labels(label_map.indices)
        image = gen.render(labels, label_map.values, generator, gen.RenderSettings(contrast=contrast))
        normalised, _, _ = gen.normalise(image[inner])
        images.append(normalised)
        lookup = torch.from_numpy(gen.tissue_classes(label_map.values))
        targets.append(lookup[labels[inner]].contiguous())
    return Pair(torch.stack(images).contiguous(), targets[0], targets[1])


def one_hot(classes: torch.Tensor) -> torch.Tensor:
    """(B, P, P, P) int64 -> (B, C, P, P, P) float32 over the tissue classes."""
    return functional.one_hot(classes, len(gen.TISSUE_CLASSES)).movedim(-1, 1).float()


def displacements(network: nn.Module, inputs: torch.Tensor, steps: int,
                  precision: torch.dtype | None = None) -> torch.Tensor:
    """(B, 3, P, P, P) voxel displacements of the flows of the predicted velocity fields (integrated in float32)."""
    with common.autocast(inputs.device, precision):
        velocity = network(inputs)
    return torch.stack([integrate_velocity(field.float(), steps) for field in velocity])


def soft_dice(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Soft Dice per structure class (background left out: it is everything outside the head and the crop's border),
    over the batch; (C - 1,)."""
    dims = (0, *range(2, warped.dim()))
    warped, fixed = warped[:, 1:], fixed[:, 1:]
    intersection = (warped * fixed).sum(dims)
    return (2.0 * intersection + 1e-5) / (warped.sum(dims) + fixed.sum(dims) + 1e-5)


def smoothness(displacement: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of the displacement (voxels) along the three axes: the diffusion regulariser."""
    return sum((displacement.diff(dim=axis) ** 2).mean() for axis in (2, 3, 4)) / 3.0


def registration_loss(displacement: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor,
                      weight: float) -> torch.Tensor:
    """1 - mean soft Dice of the moving classes warped (as probabilities, linearly) onto the fixed grid, + `weight` x
    smoothness."""
    moving_probabilities = one_hot(moving)
    warped = torch.stack([warp(volume, field) for volume, field in zip(moving_probabilities, displacement)])
    return (1.0 - soft_dice(warped, one_hot(fixed)).mean()) + weight * smoothness(displacement)


def validation_pairs(maps: list[LabelMap], patch: int, voxel_mm: float, spatial: SpatialSettings, seed: int,
                     count: int = 3) -> list[Pair]:
    """Fixed held-out pairs (same map both sides, as SynthMorph's intra-subject pairs), contrast families cycling
    through VALIDATION_CONTRASTS: the fixed and moving sides never share a family."""
    generator = torch.Generator().manual_seed(seed)
    settings = PairSettings(patch=patch, voxel_mm=voxel_mm, spatial=spatial)
    return [make_pair(maps[index % len(maps)], maps[index % len(maps)],
                      VALIDATION_CONTRASTS[index % len(VALIDATION_CONTRASTS)], generator, settings)
            for index in range(count)]


def dice_counts(prediction: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """(intersection, predicted, true) voxel counts per structure class."""
    return np.array([[int(((prediction == k) & (truth == k)).sum()), int((prediction == k).sum()),
                      int((truth == k).sum())] for k in range(1, len(gen.TISSUE_CLASSES))], dtype=np.float64)


def evaluate(network: nn.Module, pairs: list[Pair], steps: int, precision: torch.dtype | None,
             device: torch.device | None = None) -> dict:
    """Dice of the moving labels warped by nearest neighbour onto the fixed grid (counts pooled over the pairs, per
    class, then averaged), the same without warping, and the % of voxels where the map folds (det J <= 0)."""
    device = device or torch.device("cpu")
    network.eval()
    warped_counts, identity_counts = np.zeros((len(CLASS_NAMES), 3)), np.zeros((len(CLASS_NAMES), 3))
    folded, voxels = 0, 0
    with torch.no_grad():
        for pair in pairs:
            displacement = displacements(network, pair.inputs[None].to(device), steps, precision)[0]
            warped = warp(pair.moving[None].float().to(device), displacement, mode="nearest")[0].round().long().cpu()
            warped_counts += dice_counts(warped, pair.fixed)
            identity_counts += dice_counts(pair.moving, pair.fixed)
            determinant = jacobian_determinant(displacement.cpu())
            folded += int((determinant <= 0).sum())
            voxels += determinant.numel()
    network.train()

    def dice(counts: np.ndarray) -> list[float]:
        return [float(2.0 * i / (p + t)) if p + t > 0 else 1.0 for i, p, t in counts]

    per_class = dice(warped_counts)
    return {"val_dice": float(np.mean(per_class)), "val_dice_identity": float(np.mean(dice(identity_counts))),
            "val_fold_percent": 100.0 * folded / max(voxels, 1),
            **{f"val_dice_{name}": value for name, value in zip(CLASS_NAMES, per_class)}}


def build_network(features: list[int], head_std: float = HEAD_STD) -> UNet3D:
    """The registration U-Net: fixed and moving in, a velocity field (voxels, z y x) out. A near-zero head (weights
    N(0, `head_std`), zero bias) makes an untrained network almost the identity, so the first steps refine a sensible
    map instead of undoing a random one; not exactly zero, so the body gets gradients from the first step."""
    network = UNet3D(in_channels=2, out_channels=3, features=features)
    nn.init.normal_(network.head.weight, 0.0, head_std)
    nn.init.zeros_(network.head.bias)
    return network


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label-maps", type=Path, help="folder of NIfTI label maps (default: nilearn's MNI maps)")
    parser.add_argument("--held-out", nargs="*", default=DEFAULT_HELD_OUT, help="label-map names kept for validation")
    parser.add_argument("--checkpoint", type=Path, required=True, help="resumed when it exists, rewritten as it goes")
    parser.add_argument("--iterations", type=int, default=50000, help="cumulative iterations to reach")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    parser.add_argument("--working-spacing", type=int, default=2, choices=(1, 2), help="mm per voxel of the grid "
                        "the network works on (label maps are downsampled by block mode)")
    parser.add_argument("--patch", type=int, default=64, help="crop size in voxels of the working grid")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--integration-steps", type=int, default=7, help="scaling-and-squaring steps")
    parser.add_argument("--smoothness", type=float, default=1.0,
                        help="weight of the mean squared gradient of the displacement (voxels) in the loss")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-half-life", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--contrast-mix", type=float, nargs=3, default=[0.5, 0.25, 0.25],
                        metavar=("RANDOM", "T1", "T2"), help="weights of the contrast families, drawn per side")
    parser.add_argument("--same-family-until", type=int, default=3000,
                        help="curriculum: before this cumulative iteration both sides of a pair are T1-like or both "
                             "T2-like (each still rendered with its own draw); after it, families drawn independently")
    parser.add_argument("--inter-subject", type=float, default=0.0,
                        help="share of pairs whose moving side comes from another training label map")
    # small affine differences: the engine pre-aligns affinely before the network runs
    SpatialSettings.add_arguments(parser, rotation=3.0, scaling=0.03, translation=2.0, what="per axis, per side")
    parser.add_argument("--validate-every", type=int, default=250)
    parser.add_argument("--validation-patch", type=int, default=64)
    parser.add_argument("--validation-pairs", type=int, default=6, help="held-out pairs")
    common.add_run_arguments(parser, "validation Dice")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    device = common.export_or_prepare(args, EXPORT_KEYS)
    if device is None:
        return 0
    features = list(args.features)
    network = build_network(features).to(device)
    common.require_patch_multiple(network, args)
    training_maps, held_out_maps = load_label_maps(args.label_maps, args.held_out)
    if not held_out_maps:
        raise SystemExit(f"None of the held-out maps {args.held_out} is in {args.label_maps}.")
    training_maps = [downsample_label_map(item, args.working_spacing) for item in training_maps]
    held_out_maps = [downsample_label_map(item, args.working_spacing) for item in held_out_maps]
    # no flips: a mirrored side cannot be reached by a diffeomorphism
    spatial = SpatialSettings.from_arguments(args)
    optimiser = torch.optim.Adam(network.parameters(), lr=args.lr)
    settings: dict[str, Any] = {
        "features": features, "working_spacing": args.working_spacing, "integration_steps": args.integration_steps,
        "classes": list(gen.TISSUE_CLASSES), "patch": args.patch, "batch": args.batch, "lr": args.lr,
        "lr_half_life": args.lr_half_life, "seed": args.seed, "smoothness": args.smoothness,
        "contrast_mix": list(args.contrast_mix), "same_family_until": args.same_family_until,
        "inter_subject": args.inter_subject,
        "spatial": {**asdict(spatial), "flip_axes": list(spatial.flip_axes)},
        "training_maps": [item.name for item in training_maps], "held_out_maps": [item.name for item in held_out_maps]}
    state = common.resume(args.checkpoint, network, optimiser, common.TrainingState(settings=settings),
                          lambda saved: common.require_same(saved, settings,
                                                            ("features", "working_spacing", "integration_steps")))
    state.commands.append(common.command_line(MODULE, state, sys.argv[1:] if argv is None else argv, device))
    precision = None if args.no_autocast else autocast_dtype(device)
    validation = validation_pairs(held_out_maps, args.validation_patch, float(args.working_spacing), spatial,
                                  args.seed + 1, args.validation_pairs)
    pair_settings = PairSettings(patch=args.patch, voxel_mm=float(args.working_spacing), spatial=spatial)

    def draw(generator: torch.Generator, iteration: int) -> tuple[torch.Tensor, ...]:
        pairs = []
        for _ in range(args.batch):
            fixed_index = int(torch.randint(0, len(training_maps), (), generator=generator))
            moving_index = fixed_index
            if float(torch.rand((), generator=generator)) < args.inter_subject and len(training_maps) > 1:
                moving_index = (fixed_index + 1 + int(torch.randint(0, len(training_maps) - 1, (),
                                                                    generator=generator))) % len(training_maps)
            contrasts = (draw_contrast(generator, args.contrast_mix), draw_contrast(generator, args.contrast_mix))
            if iteration < args.same_family_until:  # T1/T1 or T2/T2: two "random" draws would differ entirely
                family = CURRICULUM_FAMILIES[int(torch.randint(0, len(CURRICULUM_FAMILIES), (), generator=generator))]
                contrasts = (family, family)
            pairs.append(make_pair(training_maps[fixed_index], training_maps[moving_index], contrasts, generator,
                                   pair_settings))
        return tuple(torch.stack([getattr(pair, key) for pair in pairs]) for key in ("inputs", "fixed", "moving"))

    def compute_loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs, fixed, moving = batch
        return registration_loss(displacements(network, inputs, args.integration_steps, precision), fixed, moving,
                                 args.smoothness)

    common.train(state, network, optimiser, args.checkpoint, iterations=args.iterations,
                 max_minutes=args.max_minutes, validate_every=args.validate_every, base_lr=args.lr,
                 lr_half_life=args.lr_half_life, draw=draw, seed=args.seed, compute_loss=compute_loss,
                 evaluate=lambda: evaluate(network, validation, args.integration_steps, precision, device),
                 loss_name="train_loss", best_metric="val_dice", gradient_clip=GRADIENT_CLIP, workers=args.workers,
                 device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
