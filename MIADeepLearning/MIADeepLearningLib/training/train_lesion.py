"""Train the brain lesion detector: the tissue segmenter with a fifth class, `lesion`, learnt from healthy renders
with pasted real lesion shapes (resumable).

    python -m MIADeepLearningLib.training.train_lesion --label-maps ../shared/data/brain-label-maps \
        --lesion-masks ../shared/data/brain-lesions/lesion-masks-mni --init Training/Checkpoints/brain-tissue.pt \
        --checkpoint Training/Checkpoints/brain-lesion.pt --shape-cache /tmp/lesion-shapes-2mm.npz \
        --iterations 3000 --max-minutes 60 --workers 2

Every example is made as the tissue segmenter's (train_segmentation.make_sample: a crop of a label map under a
random affine and deformation, rendered with a random, T1-like or T2-like contrast, sometimes with thick slices),
after training/lesion_shapes.LesionPainter pasted stroke or MS lesion shapes into its parenchyma with an intensity
set apart from the tissue around them (a quarter of the examples stay healthy). The target is background, CSF,
gray matter, white matter or lesion. A new checkpoint starts from the tissue model (`--init`: its checkpoint or
exported weights), with the lesion output at zero weight and a strongly negative bias, so training begins from a
working tissue segmenter that flags nothing. Validation: lesion Dice and the tissue classes' mean Dice on fixed
held-out crops (held-out label maps and held-out lesion shapes) in T1-like, T2-like, random and 5 mm T1-like
contrasts, and the false-positive lesion volume on healthy held-out crops.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from MIADeepLearningLib.engine.devices import autocast_dtype
from MIADeepLearningLib.engine.networks import UNet3D
from MIADeepLearningLib.training import common
from MIADeepLearningLib.training import generator as gen
from MIADeepLearningLib.training import train_segmentation as segmentation
from MIADeepLearningLib.training.label_maps import downsample_label_map, load_label_maps
from MIADeepLearningLib.training.lesion_shapes import LesionPainter, load_lesion_shapes
from MIADeepLearningLib.training.spatial import SpatialSettings

MODULE = "MIADeepLearningLib.training.train_lesion"
CLASSES = (*gen.TISSUE_CLASSES, "lesion")
LESION = len(CLASSES) - 1
EXPORT_KEYS = ("features", "working_spacing", "classes")
INITIAL_LESION_BIAS = -4.0  # softmax share of about 1/70 against a confident tissue class: nothing flagged at first


def initial_state(source: Path, features: list[int]) -> dict[str, torch.Tensor]:
    """The tissue model's weights (a training checkpoint or an exported weights file) with one more output channel."""
    payload = torch.load(source, map_location="cpu", weights_only=False)
    state = payload.get("model") or payload.get("state_dict")
    if state is None:
        raise SystemExit(f"{source} holds neither a training checkpoint ('model') nor exported weights.")
    saved_features = (payload.get("settings") or payload).get("features")
    if saved_features is not None and list(saved_features) != list(features):
        raise SystemExit(f"--init {source} has features {saved_features}, this run {features}.")
    state = dict(state)
    weight, bias = state["head.weight"], state["head.bias"]
    if weight.shape[0] != len(gen.TISSUE_CLASSES):
        raise SystemExit(f"--init {source} has {weight.shape[0]} output classes, not the tissue model's 4.")
    state["head.weight"] = torch.cat([weight, weight.new_zeros((1, *weight.shape[1:]))])
    state["head.bias"] = torch.cat([bias, bias.new_full((1,), INITIAL_LESION_BIAS)])
    return state


def validation_set(maps: list, painter: LesionPainter, settings: segmentation.SampleSettings, seed: int,
                   crops: int) -> list[tuple[str, segmentation.Sample]]:
    """Fixed held-out crops: with lesions in each contrast setting, and healthy ones (T1-like and random)."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    sick = replace(settings, label_edit=replace(painter, healthy_fraction=0.0), resolution_probability=0.0)
    healthy = replace(settings, label_edit=None, resolution_probability=0.0)
    for setting in (*segmentation.VALIDATION_SETTINGS, "healthy_t1", "healthy_random"):
        for repeat in range(crops):
            label_map = maps[len(samples) % len(maps)]
            chosen = healthy if setting.startswith("healthy") else sick
            if setting == "t1_5mm":
                thick = 5.0 / settings.voxel_mm
                chosen = replace(chosen, acquisition=(0, gen.Acquisition(
                    spacing=thick, thickness=thick, offset=repeat * thick / 2.0, noise_std=0.02,
                    in_plane_sigma=0.0)))
            contrast = setting.split("_")[-1] if setting.startswith("healthy") else setting.split("_")[0]
            samples.append((setting, segmentation.make_sample(label_map, contrast, generator, chosen)))
    return samples


def evaluate(network: torch.nn.Module, samples: list, precision: torch.dtype | None, device: torch.device,
             voxel_mm: float) -> dict[str, float]:
    """Lesion Dice (pooled over the crops with lesions), per setting, the tissue mean Dice, and the false-positive
    lesion volume (mL per healthy crop)."""
    network.eval()
    counts: dict[str, np.ndarray] = {}
    tissue = np.zeros((len(gen.TISSUE_CLASSES) - 1, 3))
    false_ml = []
    with torch.no_grad(), common.autocast(device, precision):
        for setting, sample in samples:
            prediction = network(sample.inputs[None].to(device)).argmax(dim=1)[0].cpu()
            predicted, true = prediction == LESION, sample.target == LESION
            if setting.startswith("healthy"):
                false_ml.append(float(predicted.sum()) * voxel_mm**3 / 1000.0)
                continue
            row = counts.setdefault(setting, np.zeros(3))
            row += [int((predicted & true).sum()), int(predicted.sum()), int(true.sum())]
            for index in range(1, len(gen.TISSUE_CLASSES)):
                p, t = prediction == index, sample.target == index
                tissue[index - 1] += [int((p & t).sum()), int(p.sum()), int(t.sum())]
    network.train()
    result: dict[str, float] = {}
    total = np.zeros(3)
    for setting, row in counts.items():
        total += row
        result[f"lesion_dice_{setting}"] = segmentation.dice(row[None])[0]
    result = {"val_lesion_dice": segmentation.dice(total[None])[0],
              "val_tissue_dice": float(np.mean(segmentation.dice(tissue))),
              "val_false_ml": float(np.mean(false_ml)) if false_ml else 0.0, **result}
    return result


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label-maps", type=Path, help="folder of NIfTI label maps or a bundle (.npz)")
    parser.add_argument("--lesion-masks", type=Path, help="folder with soop/ and mslub/ lesion masks")
    parser.add_argument("--shape-cache", type=Path, default=None, help="the lesion shapes on the 2 mm grid as one "
                        ".npz (written on the first run, read afterwards; derived data: keep it out of git)")
    parser.add_argument("--held-out", nargs="*", default=segmentation.DEFAULT_HELD_OUT)
    parser.add_argument("--init", type=Path, default=None, help="tissue model checkpoint or weights to start from "
                        "(only when --checkpoint does not exist yet)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="resumed when it exists, rewritten as it goes")
    parser.add_argument("--iterations", type=int, default=3000, help="cumulative iterations to reach")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    parser.add_argument("--patch", type=int, default=64, help="crop size in voxels of the 2 mm grid")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lr-half-life", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--healthy-fraction", type=float, default=0.25, help="share of examples without lesions")
    parser.add_argument("--contrast-mix", type=float, nargs=3, default=[0.5, 0.25, 0.25],
                        metavar=("RANDOM", "T1", "T2"), help="weights of the contrast families")
    parser.add_argument("--resolution-probability", type=float, default=0.4, help="share of thick-slice examples")
    SpatialSettings.add_arguments(parser, rotation=15.0, scaling=0.15, translation=10.0)
    parser.add_argument("--validate-every", type=int, default=200)
    parser.add_argument("--validation-crops", type=int, default=2)
    parser.add_argument("--validation-patch", type=int, default=64, help="held-out crop size (voxels)")
    common.add_run_arguments(parser, "validation lesion Dice")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    device = common.export_or_prepare(args, EXPORT_KEYS)
    if device is None:
        return 0
    voxel_mm = 2
    features = list(args.features)
    network = UNet3D(in_channels=1, out_channels=len(CLASSES), features=features).to(device)
    common.require_patch_multiple(network, args)
    if not args.checkpoint.exists():
        if args.init is None:
            raise SystemExit("A new checkpoint needs --init (the tissue model to start from).")
        network.load_state_dict(initial_state(args.init, features))
    training_maps, held_out_maps = load_label_maps(args.label_maps, args.held_out)
    if not held_out_maps:
        raise SystemExit(f"None of the held-out maps {args.held_out} is in {args.label_maps}.")
    if args.lesion_masks is None:
        raise SystemExit("--lesion-masks is required (a folder with soop/ and mslub/ masks).")
    training_shapes, held_out_shapes = load_lesion_shapes(args.lesion_masks, voxel_mm, cache=args.shape_cache)
    training_maps = [downsample_label_map(item, voxel_mm) for item in training_maps]
    held_out_maps = [downsample_label_map(item, voxel_mm) for item in held_out_maps]
    spatial = SpatialSettings.from_arguments(args, flip_axes=(2,))
    optimiser = torch.optim.Adam(network.parameters(), lr=args.lr)
    settings: dict[str, Any] = {
        "features": features, "working_spacing": voxel_mm, "classes": list(CLASSES), "patch": args.patch,
        "batch": args.batch, "lr": args.lr, "lr_half_life": args.lr_half_life, "seed": args.seed,
        "healthy_fraction": args.healthy_fraction, "contrast_mix": list(args.contrast_mix),
        "resolution_probability": args.resolution_probability,
        "spatial": {**asdict(spatial), "flip_axes": list(spatial.flip_axes)},
        "training_maps": [item.name for item in training_maps], "held_out_maps": [item.name for item in held_out_maps],
        "lesion_shapes": {"training": len(training_shapes), "held_out": len(held_out_shapes)},
        "init": str(args.init) if args.init else None}
    state = common.resume(args.checkpoint, network, optimiser, common.TrainingState(settings=settings),
                          lambda saved: common.require_same(saved, settings, ("features", "classes")))
    state.commands.append(common.command_line(MODULE, state, sys.argv[1:] if argv is None else argv, device))
    precision = None if args.no_autocast else autocast_dtype(device)
    sample_settings = segmentation.SampleSettings(
        patch=args.patch, voxel_mm=float(voxel_mm), spatial=spatial,
        resolution_probability=args.resolution_probability,
        label_edit=LesionPainter(training_shapes, healthy_fraction=args.healthy_fraction), classes=len(CLASSES))
    validation = validation_set(held_out_maps, LesionPainter(held_out_shapes),
                                replace(sample_settings, spatial=None, patch=args.validation_patch), args.seed + 1,
                                args.validation_crops)

    def draw(generator: torch.Generator, iteration: int) -> tuple[torch.Tensor, ...]:
        samples = []
        for _ in range(args.batch):
            label_map = training_maps[int(torch.randint(0, len(training_maps), (), generator=generator))]
            contrast = segmentation.draw_contrast(generator, list(args.contrast_mix))
            samples.append(segmentation.make_sample(label_map, contrast, generator, sample_settings))
        return torch.stack([sample.inputs for sample in samples]), torch.stack([sample.target for sample in samples])

    def compute_loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with common.autocast(device, precision):
            logits = network(batch[0])
        return segmentation.segmentation_loss(logits, batch[1])

    common.train(state, network, optimiser, args.checkpoint, iterations=args.iterations,
                 max_minutes=args.max_minutes, validate_every=args.validate_every, base_lr=args.lr,
                 lr_half_life=args.lr_half_life, draw=draw, seed=args.seed, compute_loss=compute_loss,
                 evaluate=lambda: evaluate(network, validation, precision, device, float(voxel_mm)),
                 loss_name="train_loss", best_metric="val_lesion_dice", gradient_clip=segmentation.GRADIENT_CLIP,
                 workers=args.workers, device=device)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
