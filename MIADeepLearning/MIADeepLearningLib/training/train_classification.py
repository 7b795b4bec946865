"""Train the MRI sequence-type classifier on physics-based renders of label maps (resumable).

    python -m MIADeepLearningLib.training.train_classification --label-maps ../shared/data/brain-label-maps \
        --checkpoint Training/Checkpoints/sequence-type.pt --iterations 6000 --max-minutes 90 --workers 2

Every batch holds the eight classes (engine/classification.CLASSES) in equal shares, each scan rendered by
training/sequence_render.py and passed through the classifier's own preprocessing (network_input), so training and
inference see the same grid and channels. Validation: a fixed set of renders of the held-out maps, accuracy per
class. ``--real-cases`` mixes augmented real scans into every batch (fine-tuning; the cases listed must then be left
out of any accuracy reported). ``--export`` writes the weights-only file the model package ships and prints its sha256.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as functional

from MIADeepLearningLib.engine.classification import CLASSES, network_input
from MIADeepLearningLib.engine.networks import SequenceClassifierNet
from MIADeepLearningLib.training import common
from MIADeepLearningLib.training import sequence_render as render
from MIADeepLearningLib.training.common import TrainingState
from MIADeepLearningLib.training.label_maps import LabelMap, downsample_label_map, load_label_maps

MODULE = "MIADeepLearningLib.training.train_classification"
DEFAULT_HELD_OUT = ["training_seg_13", "training_seg_14", "training_seg_15"]
EXPORT_KEYS = ("features", "classes")
VOXEL_MM = 2.0  # renders are made on a 2 mm copy of the maps (the classifier's grid is coarser still)
LABEL_SMOOTHING = 0.05


def prepare_maps(maps: list[LabelMap]) -> list[tuple[LabelMap, torch.Tensor]]:
    """Each map on the 2 mm grid with its tissue map (computed once; forked workers share them)."""
    prepared = []
    for item in maps:
        coarse = downsample_label_map(item, int(VOXEL_MM))
        prepared.append((coarse, render.tissue_map(coarse)))
    return prepared


def make_example(kind: str, maps: list[tuple[LabelMap, torch.Tensor]], generator: torch.Generator) -> torch.Tensor:
    label_map, tissues = maps[int(torch.randint(0, len(maps), (), generator=generator))]
    image = render.render_example(kind, label_map, tissues, generator, VOXEL_MM)
    return network_input(image)[0]


def load_real_cases(listing: Path, root: Path) -> list[tuple[str, sitk.Image, int]]:
    """(path, image, class index) of each `relative/path<TAB>class` line of `listing` (paths under `root`)."""
    cases = []
    for line in listing.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        relative, kind = line.split()
        if kind not in CLASSES:
            raise SystemExit(f"{listing}: '{kind}' is not one of {', '.join(CLASSES)}.")
        path = root / relative
        if not path.exists():
            raise SystemExit(f"{listing}: {path} does not exist (is --real-root right?).")
        cases.append((relative, render.load_real_scan(str(path)), CLASSES.index(kind)))
    return cases


def validation_set(maps: list[tuple[LabelMap, torch.Tensor]], per_class: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = [], []
    for index, kind in enumerate(CLASSES):
        for _ in range(per_class):
            inputs.append(make_example(kind, maps, generator))
            targets.append(index)
    return torch.stack(inputs), torch.tensor(targets)


def evaluate(network: torch.nn.Module, validation: tuple[torch.Tensor, torch.Tensor],
             device: torch.device) -> dict:
    network.eval()
    inputs, targets = validation
    with torch.no_grad():
        logits = torch.cat([network(chunk.to(device)).float().cpu() for chunk in inputs.split(16)])
    network.train()
    predicted = logits.argmax(dim=1)
    row = {"val_accuracy": float((predicted == targets).float().mean()),
           "val_loss": float(functional.cross_entropy(logits, targets))}
    for index, kind in enumerate(CLASSES):
        chosen = targets == index
        row[f"acc_{kind}"] = float((predicted[chosen] == index).float().mean())
    return row


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label-maps", type=Path, help="folder of NIfTI label maps or a bundle (.npz)")
    parser.add_argument("--held-out", nargs="*", default=DEFAULT_HELD_OUT, help="label-map names kept for validation")
    parser.add_argument("--checkpoint", type=Path, required=True, help="resumed when it exists, rewritten as it goes")
    parser.add_argument("--iterations", type=int, default=6000, help="cumulative iterations to reach")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    parser.add_argument("--batch", type=int, default=16, help="a multiple of the 8 classes")
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128, 160])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-half-life", type=int, default=2000)
    parser.add_argument("--validate-every", type=int, default=200)
    parser.add_argument("--validation-per-class", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-cases", type=Path, default=None,
                        help="TSV of real scans to fine-tune on (relative path, class); report accuracy without them")
    parser.add_argument("--real-root", type=Path, default=Path("../shared/data"), help="where --real-cases paths start")
    parser.add_argument("--real-per-batch", type=int, default=2, help="real scans in each batch (in place of renders)")
    common.add_run_arguments(parser, "val_accuracy")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    device = common.export_or_prepare(args, EXPORT_KEYS)
    if device is None:
        return 0
    if args.batch % len(CLASSES):
        raise SystemExit(f"--batch {args.batch} is not a multiple of the {len(CLASSES)} classes.")
    training_maps, held_out_maps = load_label_maps(args.label_maps, args.held_out)
    if not held_out_maps:
        raise SystemExit(f"None of the held-out maps {args.held_out} is in {args.label_maps}.")
    training, held_out = prepare_maps(training_maps), prepare_maps(held_out_maps)
    features = list(args.features)
    network = SequenceClassifierNet(in_channels=3, classes=len(CLASSES), features=features).to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=1e-4)
    settings = {"features": features, "classes": list(CLASSES), "batch": args.batch, "lr": args.lr,
                "lr_half_life": args.lr_half_life, "seed": args.seed, "voxel_mm": VOXEL_MM,
                "training_maps": [item.name for item in training_maps],
                "held_out_maps": [item.name for item in held_out_maps]}
    state = common.resume(args.checkpoint, network, optimiser, TrainingState(settings=settings),
                          lambda saved: common.require_same(saved, settings, ("features", "classes")))
    state.commands.append(common.command_line(MODULE, state, sys.argv[1:] if argv is None else argv, device))
    validation = validation_set(held_out, args.validation_per_class, args.seed + 1)
    real = load_real_cases(args.real_cases, args.real_root) if args.real_cases else []
    if real:
        state.settings["real_cases"] = sorted(relative for relative, _, _ in real)
    real_count = min(args.real_per_batch, args.batch - len(CLASSES)) if real else 0

    def draw(generator: torch.Generator, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        kinds = [index % len(CLASSES) for index in range(args.batch - real_count)]
        inputs = [make_example(CLASSES[kind], training, generator) for kind in kinds]
        for _ in range(real_count):
            _, image, kind = real[int(torch.randint(0, len(real), (), generator=generator))]
            inputs.append(network_input(render.augment_real(image, generator))[0])
            kinds.append(kind)
        return torch.stack(inputs), torch.tensor(kinds)

    def compute_loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs, target = batch
        return functional.cross_entropy(network(inputs), target, label_smoothing=LABEL_SMOOTHING)

    common.train(state, network, optimiser, args.checkpoint, iterations=args.iterations,
                 max_minutes=args.max_minutes, validate_every=args.validate_every, base_lr=args.lr,
                 lr_half_life=args.lr_half_life, draw=draw, seed=args.seed, compute_loss=compute_loss,
                 evaluate=lambda: evaluate(network, validation, device), loss_name="train_loss",
                 best_metric="val_accuracy", workers=args.workers, device=device)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
