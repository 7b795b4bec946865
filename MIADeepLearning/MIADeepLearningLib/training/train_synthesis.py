"""Train the thick-slice → 1 mm super-resolution network on synthetic renders of label maps (resumable).

    python -m MIADeepLearningLib.training.train_synthesis --label-maps ../shared/data/brain-label-maps \
        --checkpoint Training/Checkpoints/thick-slice-sr.pt --iterations 20000 --max-minutes 90

Every run continues the checkpoint when it exists (model, optimiser, data-generator state, cumulative iterations and
wall time, learning curve), so each stretch of compute improves the same model. ``--export`` writes the weights-only
file a model package ships and prints its sha256.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as functional

from MIADeepLearningLib.engine.devices import autocast_dtype
from MIADeepLearningLib.engine.networks import ResidualUNet3D
from MIADeepLearningLib.training import common
from MIADeepLearningLib.training import generator as gen
from MIADeepLearningLib.training.common import (  # noqa: F401  (best_path, TrainingState: re-exported)
    TrainingState,
    best_path,
    export_source,
    export_weights,
)
from MIADeepLearningLib.training.label_maps import LabelMap, load_label_maps

MODULE = "MIADeepLearningLib.training.train_synthesis"
DEFAULT_HELD_OUT = ["training_seg_13", "training_seg_14", "training_seg_15"]
MARGIN = 8  # voxels rendered around each patch so blur and slice interpolation have no border effects inside it
# Renders peak at 1. A patch that is mostly background has a tiny 99.5th percentile; normalising by it made targets
# of thousands and wrecked the first training run at iteration ~2,400. Real volumes are normalised over the whole head.
MIN_SCALE = 0.25
GRADIENT_CLIP = 1.0  # global gradient-norm clip: one odd batch cannot undo what was learned


@dataclass
class Sample:
    inputs: torch.Tensor  # (3, P, P, P) network input, normalised
    target: torch.Tensor  # (1, P, P, P) the 1 mm render, same normalisation
    mask: torch.Tensor  # (1, P, P, P) bool: inside the head (labelled voxels)
    linear: torch.Tensor  # (1, P, P, P) the plain linear interpolation (the baseline)


def _random_crop(label_map: LabelMap, size: int, generator: torch.Generator) -> np.ndarray:
    shape = np.asarray(label_map.indices.shape)
    padded = label_map.indices
    if np.any(shape < size):
        pad = [(0, max(0, size - n)) for n in shape]
        padded = np.pad(padded, pad)  # index 0 is the smallest label value, 0 (background) in these maps
        shape = np.asarray(padded.shape)
    start = [int(torch.randint(0, int(n - size) + 1, (), generator=generator)) for n in shape]
    return padded[tuple(slice(s, s + size) for s in start)]


def make_sample(label_map: LabelMap, patch: int, generator: torch.Generator, contrast: str | None = None,
                acquisition: gen.Acquisition | None = None, scale_jitter: float = 0.3) -> Sample:
    """One training (or validation) example: a random crop, orientation, contrast and thick-slice acquisition."""
    size = patch + 2 * MARGIN
    labels = torch.from_numpy(_random_crop(label_map, size, generator).astype(np.int64))
    order = torch.randperm(3, generator=generator).tolist()  # the slice axis may be any anatomical direction
    labels = labels.permute(*order)
    flips = [axis for axis in range(3) if float(torch.rand((), generator=generator)) < 0.5]
    if flips:
        labels = labels.flip(flips)
    if contrast is None:
        contrast = gen.CONTRASTS[int(torch.randint(0, len(gen.CONTRASTS), (), generator=generator))]
    image = gen.render(labels, label_map.values, generator, gen.RenderSettings(contrast=contrast))
    acquisition = acquisition or gen.Acquisition.random(generator)
    slices = gen.acquire(image, acquisition, generator)
    slice_index = gen.slice_coordinates(size, acquisition)
    upsampled = gen.upsample_slices(slices, slice_index)
    _, low, scale = gen.normalise(upsampled)
    scale = max(scale, MIN_SCALE)
    scale *= 1.0 + scale_jitter * (2.0 * float(torch.rand((), generator=generator)) - 1.0)
    inner = (slice(MARGIN, MARGIN + patch),) * 3
    inputs = gen.network_input((upsampled - low) / scale, slice_index, acquisition.spacing)
    target = ((image - low) / scale)[inner][None]
    return Sample(inputs[(slice(None), *inner)].contiguous(), target.contiguous(), (labels[inner] > 0)[None],
                  inputs[(slice(0, 1), *inner)].contiguous())


def psnr(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR inside the mask, with the target's range inside the mask as the peak."""
    inside = target[mask]
    peak = float(inside.max() - inside.min()) if inside.numel() else 1.0
    mse = float(((prediction - target)[mask] ** 2).mean()) if inside.numel() else 0.0
    return 10.0 * math.log10(peak**2 / max(mse, 1e-12))


def validation_set(maps: list[LabelMap], patch: int, seed: int) -> list[tuple[str, Sample]]:
    """Fixed held-out examples at 5 mm slices (the issue's benchmark setting), two per contrast family."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for contrast in gen.CONTRASTS:
        for repeat in range(2):
            label_map = maps[(len(samples)) % len(maps)]
            acquisition = gen.Acquisition(spacing=5.0, thickness=5.0, offset=float(repeat) * 2.5, noise_std=0.02,
                                          in_plane_sigma=0.0)
            samples.append((contrast, make_sample(label_map, patch, generator, contrast, acquisition, 0.0)))
    return samples


def evaluate(network: torch.nn.Module, samples: list[tuple[str, Sample]], precision: torch.dtype | None,
             device: torch.device | None = None) -> dict:
    device = device or torch.device("cpu")
    network.eval()
    gains: dict[str, list[float]] = {}
    network_psnr, linear_psnr = [], []
    with torch.no_grad(), common.autocast(device, precision):
        for contrast, sample in samples:
            prediction = network(sample.inputs[None].to(device))[0].float().cpu()
            value, baseline = psnr(prediction, sample.target, sample.mask), psnr(sample.linear, sample.target,
                                                                                sample.mask)
            network_psnr.append(value)
            linear_psnr.append(baseline)
            gains.setdefault(contrast, []).append(value - baseline)
    network.train()
    return {"val_psnr": float(np.mean(network_psnr)), "val_psnr_linear": float(np.mean(linear_psnr)),
            **{f"gain_{name}": float(np.mean(values)) for name, values in gains.items()}}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label-maps", type=Path, help="folder of NIfTI label maps (default: nilearn's MNI maps)")
    parser.add_argument("--held-out", nargs="*", default=DEFAULT_HELD_OUT, help="label-map names kept for validation")
    parser.add_argument("--checkpoint", type=Path, required=True, help="resumed when it exists, rewritten as it goes")
    parser.add_argument("--iterations", type=int, default=20000, help="cumulative iterations to reach")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-half-life", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument("--validate-every", type=int, default=250)
    parser.add_argument("--validation-patch", type=int, default=64)
    common.add_run_arguments(parser, "validation PSNR")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    device = common.export_or_prepare(args)
    if device is None:
        return 0
    training_maps, held_out_maps = load_label_maps(args.label_maps, args.held_out)
    if not held_out_maps:
        raise SystemExit(f"None of the held-out maps {args.held_out} is in {args.label_maps}.")
    features = list(args.features)
    network = ResidualUNet3D(in_channels=3, features=features).to(device)
    optimiser = torch.optim.Adam(network.parameters(), lr=args.lr)
    settings = {"features": features, "patch": args.patch, "batch": args.batch, "lr": args.lr,
                "lr_half_life": args.lr_half_life, "seed": args.seed,
                "training_maps": [item.name for item in training_maps],
                "held_out_maps": [item.name for item in held_out_maps]}
    state = common.resume(args.checkpoint, network, optimiser, TrainingState(settings=settings),
                          lambda saved: common.require_same(saved, settings, ("features",)))
    state.commands.append(common.command_line(MODULE, state, sys.argv[1:] if argv is None else argv, device))
    precision = None if args.no_autocast else autocast_dtype(device)
    validation = validation_set(held_out_maps, args.validation_patch, args.seed + 1)

    def draw(generator: torch.Generator, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        samples = [make_sample(training_maps[int(torch.randint(0, len(training_maps), (), generator=generator))],
                               args.patch, generator) for _ in range(args.batch)]
        return torch.stack([sample.inputs for sample in samples]), torch.stack([sample.target for sample in samples])

    def compute_loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs, target = batch
        with common.autocast(device, precision):
            prediction = network(inputs)
        return functional.l1_loss(prediction.float(), target)

    common.train(state, network, optimiser, args.checkpoint, iterations=args.iterations,
                 max_minutes=args.max_minutes, validate_every=args.validate_every, base_lr=args.lr,
                 lr_half_life=args.lr_half_life, draw=draw, seed=args.seed, compute_loss=compute_loss,
                 evaluate=lambda: evaluate(network, validation, precision, device), loss_name="train_l1",
                 best_metric="val_psnr", gradient_clip=GRADIENT_CLIP, workers=args.workers, device=device)
    return 0

if __name__ == "__main__":
    sys.exit(main())
