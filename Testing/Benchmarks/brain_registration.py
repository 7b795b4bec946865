"""Benchmark of the brain registration model: Dice of propagated labels and folding, against the affine alone.

Prints one table from one run (never asserts). For the model card of `brain-registration`.

Cases (held-out label maps, default training_seg_13/14/15, never used in training; each whole, cropped to the head
+ 8 voxels by label_maps.load_label_map, 1 mm, LIA axes as the files have them):
- intra-subject: the fixed image is the map rendered T1-like (training.generator.render, fixed seed per case); the
  moving one is the same map under a random affine (rotation ±8° per axis, scaling ±6 %, translation ±8 mm) and a
  diffeomorphic deformation (training.spatial.random_transform, velocity std up to 4 mm on control points 24 mm
  apart), rendered T1-like, T2-like or with a random contrast;
- inter-subject: fixed map A rendered T1-like, moving map B rendered T2-like (13 -> 14, 14 -> 15, 15 -> 13), each on
  its own grid.
Rician noise of std 2 % of the maximum on every image. Every image and label map is written to a file and given to
the model as a user would (engine.tasks.register_images with the registry model).

Per case and setting (affine alone = option deformable false; the network; the network + N instance-optimisation
steps): Dice of the tissue classes (CSF, GM, WM; generator.tissue_classes) of the moving labels propagated by
nearest neighbour onto the fixed grid, their mean, the mean Dice over the fine FreeSurfer labels of the brain (values
1-99 present in both maps), the % of fixed-foreground voxels with det J <= 0 and SDlogJ of the total field, and the
wall seconds of the whole register_images call. "before" is the Dice without any transform.

Usage: python Testing/Benchmarks/brain_registration.py [--label-maps FOLDER] [--held-out NAME ...]
       [--cases PATTERN,...] [--instance-steps 20] [--threads 2] [--device cpu] [--json out.json] [--list-cases]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MIADeepLearning"))

from MIADeepLearningLib.engine import displacement, tasks
from MIADeepLearningLib.training import generator as gen
from MIADeepLearningLib.training import spatial
from MIADeepLearningLib.training.label_maps import LabelMap, load_label_map

MODEL_ID = "brain-registration"
DEFAULT_LABEL_MAPS = Path(__file__).resolve().parents[3] / "shared" / "data" / "brain-label-maps"
DEFAULT_HELD_OUT = ["training_seg_13", "training_seg_14", "training_seg_15"]
LIA = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)  # i -> L, j -> I, k -> A (LPS columns)
NOISE_STD = 0.02
MISALIGNMENT = spatial.SpatialSettings(rotation=8.0, scaling=0.06, shear=0.02, translation=8.0,
                                       deformation_std=4.0, deformation_spacing=24.0)
CONTRASTS = ("t1", "t2", "random")
TISSUES = {"csf": 1, "gm": 2, "wm": 3}


def seed_of(name: str, seed: int) -> int:
    return seed + sum((index + 1) * ord(character) for index, character in enumerate(name))


def noisy(image: torch.Tensor, generator: torch.Generator) -> np.ndarray:
    scale = NOISE_STD * float(image.max())
    real = image + scale * torch.randn(image.shape, generator=generator)
    imaginary = scale * torch.randn(image.shape, generator=generator)
    return torch.sqrt(real**2 + imaginary**2).numpy().astype(np.float32)


def render(label_map: LabelMap, contrast: str, seed: int, moved: bool) -> tuple[np.ndarray, np.ndarray]:
    """(image, FreeSurfer labels) on the map's own 1 mm grid; `moved`: under a random affine + deformation."""
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(label_map.indices.shape)
    indices = torch.from_numpy(label_map.indices.astype(np.int64))
    if moved:
        centre = tuple((n - 1) / 2.0 for n in shape)
        indices = spatial.random_transform(shape, centre, generator, MISALIGNMENT, 1.0).apply_labels(
            label_map.indices)
    image = gen.render(indices, label_map.values, generator, gen.RenderSettings(contrast=contrast))
    return noisy(image, generator), label_map.values[indices.numpy()].astype(np.int16)


def on_grid(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetDirection(LIA)
    image.SetOrigin((-80.0, 100.0, 90.0))
    return image


def all_cases(held_out: list[str]) -> list[tuple[str, str, str, str]]:
    """(name, fixed map, moving map, moving contrast)."""
    cases = [(f"{name}/intra-{contrast}", name, name, contrast) for name in held_out for contrast in CONTRASTS]
    cases += [(f"{a}->{b}/inter-t2", a, b, "t2") for a, b in zip(held_out, held_out[1:] + held_out[:1]) if a != b]
    return cases


def tissue_map(labels: np.ndarray) -> np.ndarray:
    lookup = np.zeros(int(labels.max()) + 1, np.int16)
    values = np.arange(lookup.size)
    lookup[:] = gen.tissue_classes(values)
    return lookup[labels]


def scores(warped: np.ndarray, fixed: np.ndarray) -> dict[str, float]:
    tissue = displacement.dice_per_label(tissue_map(warped), tissue_map(fixed), list(TISSUES.values()))
    fine_labels = sorted(set(np.unique(fixed)) & set(np.unique(warped)) & set(range(1, 100)))
    fine = displacement.dice_per_label(warped, fixed, fine_labels)
    result = {name: tissue[value] for name, value in TISSUES.items()}
    result["mean"] = float(np.nanmean(list(tissue.values())))
    result["fine"] = float(np.nanmean(list(fine.values())))
    return result


def run_case(case: tuple[str, str, str, str], maps: dict[str, LabelMap], folder: Path, seed: int, device: str,
             settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    name, fixed_name, moving_name, contrast = case
    fixed_image, fixed_labels = render(maps[fixed_name], "t1", seed_of(name + "/fixed", seed), moved=False)
    moving_image, moving_labels = render(maps[moving_name], contrast, seed_of(name + "/moving", seed),
                                         moved=fixed_name == moving_name)
    paths = {}
    for role, array in (("fixed", fixed_image), ("fixed_labels", fixed_labels), ("moving", moving_image),
                        ("moving_labels", moving_labels)):
        paths[role] = folder / f"{role}.nii.gz"
        sitk.WriteImage(on_grid(array), str(paths[role]))
    row: dict[str, Any] = {"case": name, "size": "x".join(str(n) for n in reversed(fixed_image.shape))}
    fixed_grid = sitk.ReadImage(str(paths["fixed"]))
    before = sitk.Resample(sitk.ReadImage(str(paths["moving_labels"])), fixed_grid, sitk.Transform(),
                           sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    row["before"] = scores(sitk.GetArrayFromImage(before), fixed_labels)
    for setting, options in settings.items():
        started = time.perf_counter()
        result = tasks.register_images(paths["fixed"], paths["moving"], MODEL_ID, device=device, options=options,
                                       moving_labels_path=paths["moving_labels"])
        seconds = time.perf_counter() - started
        row[setting] = {**scores(sitk.GetArrayFromImage(result.warped_labels), fixed_labels),
                        "folds_percent": result.report["jacobian_non_positive_percent"],
                        "sdlogj": result.report["jacobian_log_std"], "seconds": round(seconds, 1)}
        print(f"  {name} {setting}: mean Dice {row[setting]['mean']:.3f}, fine {row[setting]['fine']:.3f}, "
              f"folds {row[setting]['folds_percent']:.3f} %, {seconds:.1f} s", file=sys.stderr, flush=True)
    return row


def print_report(rows: list[dict[str, Any]], settings: list[str]) -> None:
    header = ["case", "size", "before"] + [f"{setting} {what}" for setting in settings
                                            for what in ("CSF", "GM", "WM", "mean", "fine", "folds %", "SDlogJ", "s")]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))

    def number(value: Any, digits: int = 3) -> str:
        return "–" if value is None or value != value else f"{value:.{digits}f}"

    for row in rows:
        cells = [row["case"], row["size"], number(row["before"]["mean"])]
        for setting in settings:
            item = row[setting]
            cells += [number(item["csf"]), number(item["gm"]), number(item["wm"]), number(item["mean"]),
                      number(item["fine"]), number(item["folds_percent"]), number(item["sdlogj"]),
                      number(item["seconds"], 1)]
        print("| " + " | ".join(cells) + " |")
    for group in ("intra-t1", "intra-t2", "intra-random", "inter-t2"):
        chosen = [row for row in rows if row["case"].endswith(group)]
        if not chosen:
            continue
        parts = [f"before {np.mean([row['before']['mean'] for row in chosen]):.3f}"]
        for setting in settings:
            parts.append(f"{setting} {np.mean([row[setting]['mean'] for row in chosen]):.3f} (fine "
                         f"{np.mean([row[setting]['fine'] for row in chosen]):.3f}, folds "
                         f"{max(row[setting]['folds_percent'] for row in chosen):.3f} % at most)")
        print(f"**mean {group}** ({len(chosen)}): " + "; ".join(parts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label-maps", type=Path, default=DEFAULT_LABEL_MAPS)
    parser.add_argument("--held-out", nargs="+", default=DEFAULT_HELD_OUT)
    parser.add_argument("--cases", help="comma-separated patterns on case names (fnmatch), e.g. '*/intra-t2'")
    parser.add_argument("--list-cases", action="store_true")
    parser.add_argument("--instance-steps", type=int, default=20, help="0: no instance-optimisation setting")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cases = all_cases(args.held_out)
    if args.cases:
        patterns = args.cases.split(",")
        cases = [case for case in cases if any(fnmatch.fnmatch(case[0], pattern) for pattern in patterns)]
    if args.list_cases:
        print("\n".join(case[0] for case in cases))
        return 0
    torch.set_num_threads(args.threads)
    maps = {path.name.split(".")[0]: load_label_map(path) for path in sorted(args.label_maps.glob("*.nii*"))
            if path.name.split(".")[0] in args.held_out}
    settings: dict[str, dict[str, Any]] = {"affine": {"deformable": False}, "network": {"instance_steps": 0}}
    if args.instance_steps > 0:
        settings[f"network+{args.instance_steps}"] = {"instance_steps": args.instance_steps}
    rows = []
    with tempfile.TemporaryDirectory(prefix="miadl-registration-benchmark-") as folder:
        for case in cases:
            rows.append(run_case(case, maps, Path(folder), args.seed, args.device, settings))
    print(f"brain-registration benchmark: {len(rows)} cases, device {args.device}, {args.threads} threads\n")
    print_report(rows, list(settings))
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
