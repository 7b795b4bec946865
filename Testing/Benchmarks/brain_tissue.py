"""Benchmark of the brain tissue model (CSF / GM / WM, any contrast) against three-class Otsu thresholds.

Prints one table from one run (never asserts). Issue "contrast-agnostic brain tissue segmentation": Dice per class on
held-out label maps rendered (a) T1-like, (b) T2-like, (c) with random contrasts, (d) T1-like with 5 mm slices, and
on a real T1 (the nilearn MNI152 2009a T1 against its own GM / WM probability maps thresholded at 0.5). Goal: WM >=
0.90 and GM >= 0.85 on (a) and the real T1, >= 0.85 for both on (b)-(d); to ship at all WM >= 0.80 and GM >= 0.75
everywhere.

Cases:
- renders: label maps not used in training (default training_seg_13/14/15), whole (cropped to the head + 8 voxels by
  label_maps.load_label_map), rendered at 1 mm by training.generator.render with a fixed seed per case, on the label
  map's own grid, with Rician noise of std 2 % of the maximum (as the thick-slice acquisition below; without noise a
  render's tissues are separable by thresholds alone); truth = the tissue class of each label
  (generator.tissue_classes: the issue's FreeSurfer lists).
  One extra case repeats the first T1 render with an oblique direction and another origin (same voxels): the
  pipeline works in index space, so its Dice must match its twin's (a geometry check, kept out of the means);
- T1 skull-stripped: the T1 render with every voxel outside the brain labels (FreeSurfer values 1-99) set to 0 before
  the noise, as a brain-extraction tool leaves it (not one of the issue's targets; reported because the model is
  meant to take skull-stripped brains too);
- T1 with 5 mm slices: the T1 render acquired as in Testing/Benchmarks/synthesis.py (generator.acquire along the
  axis nearest S-I: 5 mm thick slices every 5 mm, the first centred on voxel 2, Rician noise 2 %), saved as an image
  with 5 mm spacing; the model's labels are on that grid, and the truth there is the 1 mm tissue class at each thick
  voxel's centre (slice centres fall on 1 mm voxel centres);
- real T1: the MNI152 T1 (whole head, cropped to the head + 8 voxels); truth GM = gm map > 0.5, WM = wm map > 0.5
  (the maps have no CSF, so CSF is not scored there).
Every image is written to a file and given to the model as a user would (engine.tasks.segment_image with the
registry model): labels come back on the input's grid.

Baseline: three-class Otsu thresholds (exhaustive search on a 256-bin histogram) of the image inside a brain mask
taken from the truth (renders: CSF ∪ GM ∪ WM; MNI: gm + wm > 0.25 with holes filled), classes by intensity order
where the contrast fixes it: T1 dark→bright = CSF, GM, WM; T2 the reverse; random contrasts have no order (n/a). The
baseline is given the brain mask; the network is not.

Usage: python Testing/Benchmarks/brain_tissue.py [--label-maps FOLDER] [--held-out NAME ...] [--cases PATTERN,...]
       [--threads 2] [--device cpu] [--uncertainty] [--option KEY=JSON ...] [--json out.json] [--list-cases]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MIADeepLearning"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthesis as thick_slice_benchmark

from MIADeepLearningLib.engine import devices, imageio, registry, tasks
from MIADeepLearningLib.training import generator as gen
from MIADeepLearningLib.training.label_maps import load_label_map, nilearn_file

MODEL_ID = "brain-tissue"
CLASSES = ("csf", "gm", "wm")  # label values 1, 2, 3 of the model's output
GROUPS = {"t1": "(a) T1-like", "t2": "(b) T2-like", "random": "(c) random contrast", "t1_5mm": "(d) T1-like 5 mm",
          "t1_stripped": "(e) T1-like skull-stripped", "mni152": "real T1 (MNI152)"}
GOALS = {"(a) T1-like": (0.85, 0.90), "real T1 (MNI152)": (0.85, 0.90)}  # (GM, WM); else (0.85, 0.85)
SHIP = (0.75, 0.80)  # (GM, WM) everywhere
ORDER = {"t1": (1, 2, 3), "t2": (3, 2, 1)}  # class of the dark, middle and bright Otsu bands
NOISE_STD = 0.02  # Rician, relative to the render's maximum (1), on the 1 mm renders


@dataclass
class Case:
    name: str  # "<map>/<setting>[-oblique]" or "mni152"
    setting: str  # t1, t2, random, t1_5mm, mni152
    source: str
    oblique: bool = False

    @property
    def group(self) -> str:
        return "" if self.oblique else GROUPS[self.setting]


@dataclass
class Result:
    case: Case
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    network: dict[str, float]
    otsu: dict[str, float] | None
    cpu_s: float
    wall_s: float
    warnings: list[str] = field(default_factory=list)


def all_cases(held_out: list[str]) -> list[Case]:
    cases = []
    for index, name in enumerate(held_out):
        for setting in ("t1", "t2", "random", "t1_5mm", "t1_stripped"):
            cases.append(Case(f"{name}/{setting}", setting, name))
            if index == 0 and setting == "t1":
                cases.append(Case(f"{name}/t1-oblique", "t1", name, oblique=True))
    return [*cases, Case("mni152", "mni152", "mni152")]


# ------------------------------------------------------------------------------------------------ metrics


def dice(prediction: np.ndarray, truth: np.ndarray, classes: dict[str, int], where: np.ndarray | None = None
         ) -> dict[str, float]:
    """Dice per named class (label value); `where` limits the voxels counted (None: all)."""
    scores = {}
    for name, value in classes.items():
        predicted, true = prediction == value, truth == value
        if where is not None:
            predicted, true = predicted & where, true & where
        total = int(predicted.sum()) + int(true.sum())
        scores[name] = 2.0 * int((predicted & true).sum()) / total if total else 1.0
    return scores


def otsu_two_thresholds(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """The two thresholds that maximise the between-class variance of three classes (Otsu 1979), on a histogram."""
    histogram, edges = np.histogram(values, bins=bins)
    probability = histogram / max(histogram.sum(), 1)
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight = np.cumsum(probability)
    moment = np.cumsum(probability * centres)
    total_mean = moment[-1]
    best, thresholds = -1.0, (centres[bins // 3], centres[2 * bins // 3])
    for first in range(1, bins - 1):
        w0, m0 = weight[first - 1], moment[first - 1]
        if w0 <= 0:
            continue
        w1 = weight[first:-1] - w0
        m1 = moment[first:-1] - m0
        w2 = 1.0 - weight[first:-1]
        m2 = total_mean - moment[first:-1]
        valid = (w1 > 0) & (w2 > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            variance = m0**2 / w0 + np.where(valid, m1**2 / w1 + m2**2 / w2, -np.inf)
        second = int(np.argmax(variance))
        if variance[second] > best:
            best, thresholds = float(variance[second]), (edges[first], edges[first + second + 1])
    return float(thresholds[0]), float(thresholds[1])


def otsu_labels(image: np.ndarray, brain: np.ndarray, order: tuple[int, int, int]) -> np.ndarray:
    low, high = otsu_two_thresholds(image[brain])
    bands = np.digitize(image, [low, high])  # 0 dark, 1 middle, 2 bright
    labels = np.asarray(order)[bands]
    labels[~brain] = 0
    return labels


# ------------------------------------------------------------------------------------------------ cases


def tissue_truth(label_map: Any) -> np.ndarray:
    return gen.tissue_classes(label_map.values)[label_map.indices]


def render_case(case: Case, label_map: Any, direction: tuple[float, ...], origin: tuple[float, ...], seed: int
                ) -> tuple[sitk.Image, np.ndarray]:
    """(image the model gets, truth on that image's grid)."""
    contrast = "t1" if case.setting.startswith("t1") else case.setting
    twin = case.name.removesuffix("-oblique").replace("/t1_5mm", "/t1").replace("/t1_stripped", "/t1")
    image, _ = thick_slice_benchmark.render_reference(label_map, direction, origin, contrast,
                                                      thick_slice_benchmark.seed_of(twin, seed))
    truth = tissue_truth(label_map)
    if case.oblique:
        rotated = thick_slice_benchmark.rotation(thick_slice_benchmark.OBLIQUE_ANGLES_DEG) @ np.asarray(
            image.GetDirection()).reshape(3, 3)
        image.SetDirection([float(value) for value in rotated.ravel()])
        image.SetOrigin(thick_slice_benchmark.OBLIQUE_ORIGIN)
    if case.setting == "t1_stripped":  # extra-cerebral labels (FreeSurfer values > 100) and background removed
        brain = (label_map.values[label_map.indices] > 0) & (label_map.values[label_map.indices] < 100)
        stripped = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) * brain.astype(np.float32))
        stripped.CopyInformation(image)
        image = stripped
    if case.setting != "t1_5mm":
        generator = torch.Generator().manual_seed(thick_slice_benchmark.seed_of(twin + "/noise", seed))
        array = torch.from_numpy(sitk.GetArrayFromImage(image))
        real = array + NOISE_STD * torch.randn(array.shape, generator=generator)
        imaginary = NOISE_STD * torch.randn(array.shape, generator=generator)
        noisy = sitk.GetImageFromArray(torch.sqrt(real**2 + imaginary**2).numpy())
        noisy.CopyInformation(image)
        return noisy, truth
    axis = thick_slice_benchmark.slice_axis(image, "axial")
    image, truth = thick_slice_benchmark.trim_to_slices(image, truth, axis)
    thick = thick_slice_benchmark.degrade(image, axis, 1.0, thick_slice_benchmark.seed_of(case.name, seed))
    acquisition = thick_slice_benchmark.ACQUISITION
    centres = [slice(None)] * 3
    centres[2 - axis] = slice(int(acquisition.offset), None, int(acquisition.spacing))
    return thick, truth[tuple(centres)]


def mni_case() -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """(T1 cropped to the head, truth 2 = GM / 3 = WM / 0 else, Otsu's brain mask) on the T1's grid."""
    t1 = sitk.Cast(sitk.ReadImage(str(nilearn_file("t1"))), sitk.sitkFloat32)
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(nilearn_file("gm")))).astype(np.float32) / 255.0
    wm = sitk.GetArrayFromImage(sitk.ReadImage(str(nilearn_file("wm")))).astype(np.float32) / 255.0
    truth = np.zeros(gm.shape, dtype=np.int64)
    truth[gm > 0.5] = 2
    truth[wm > 0.5] = 3
    brain_image = sitk.GetImageFromArray(((gm + wm) > 0.25).astype(np.uint8))
    brain = sitk.GetArrayFromImage(sitk.BinaryFillhole(brain_image)) > 0
    head = thick_slice_benchmark.head_mask(t1)
    inside = np.argwhere(head)
    low = np.maximum(inside.min(axis=0) - 8, 0)
    high = np.minimum(inside.max(axis=0) + 9, head.shape)
    index = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    cropped = t1[int(low[2]):int(high[2]), int(low[1]):int(high[1]), int(low[0]):int(high[0])]
    return cropped, truth[index], brain[index]


def run_case(case: Case, image: sitk.Image, truth: np.ndarray, brain: np.ndarray | None, folder: Path,
             device: str, cache: tasks.PipelineCache, options: dict[str, Any]) -> Result:
    path = imageio.write_image(image, folder / (case.name.replace("/", "_") + ".nrrd"), compress=False)
    cpu, wall = time.process_time(), time.perf_counter()
    output = tasks.segment_image(path, MODEL_ID, device=device, options=options, pipeline_cache=cache)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    prediction = sitk.GetArrayFromImage(output.label).astype(np.int64)
    if prediction.shape != truth.shape:
        raise SystemExit(f"{case.name}: labels {prediction.shape} are not on the input grid {truth.shape}.")
    classes = {"gm": 2, "wm": 3} if case.setting == "mni152" else {"csf": 1, "gm": 2, "wm": 3}
    scores = dice(prediction, truth, classes)
    otsu = None
    order_key = "t1" if case.setting in ("t1", "t1_5mm", "t1_stripped", "mni152") else case.setting
    if order_key in ORDER:
        mask = brain if brain is not None else truth > 0
        otsu = dice(otsu_labels(sitk.GetArrayFromImage(image).astype(np.float64), mask, ORDER[order_key]), truth,
                    classes)
    path.unlink()
    return Result(case, tuple(image.GetSize()), tuple(round(s, 3) for s in image.GetSpacing()), scores, otsu, cpu,
                  wall, list(output.warnings))


# ------------------------------------------------------------------------------------------------ report


def cell(scores: dict[str, float] | None, name: str) -> str:
    return f"{scores[name]:.3f}" if scores is not None and name in scores else "–"


def mean_scores(items: list[dict[str, float] | None]) -> dict[str, float] | None:
    present = [item for item in items if item is not None]
    if not present:
        return None
    return {name: statistics.mean(item[name] for item in present) for name in present[0]}


def print_report(results: list[Result], threads: int, device: str, load: tuple[float, float],
                 seconds: float, uncertainty: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    model = registry.get_model(MODEL_ID)
    print()
    print(f"# Brain tissue segmentation — {devices.cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{threads} threads, device {device}"
          + (", uncertainty option on (labels from the mean over the input and its mirror)" if uncertainty else "")
          + (f", package options overridden: {json.dumps(overrides)}" if overrides else ""))
    print()
    print(f"Model {MODEL_ID} {model.version} (sha256 {', '.join(w.sha256[:12] for w in model.weights)}…). Dice per "
          "class on the model's output grid (= the input's); Otsu = three-class Otsu inside the true brain mask "
          f"(given to it, not to the network). Load average {load[0]:.1f} before, {load[1]:.1f} after; "
          f"{seconds / 60:.1f} min in all.")
    print()
    print("| case | size | CSF net | GM net | WM net | CSF Otsu | GM Otsu | WM Otsu | CPU s | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        label = r.case.name + (" (geometry check, not in the means)" if r.case.oblique else "")
        print(f"| {label} | {'x'.join(map(str, r.size))} @ {'x'.join(f'{s:g}' for s in r.spacing)} mm | "
              + " | ".join(cell(r.network, name) for name in CLASSES) + " | "
              + " | ".join(cell(r.otsu, name) for name in CLASSES) + f" | {r.cpu_s:.1f} | {r.wall_s:.1f} |")
    means: dict[str, Any] = {}
    for group in GROUPS.values():
        members = [r for r in results if r.case.group == group]
        if not members:
            continue
        network, otsu = mean_scores([r.network for r in members]), mean_scores([r.otsu for r in members])
        means[group] = {"network": network, "otsu": otsu, "cases": len(members),
                        "cpu_s": statistics.mean(r.cpu_s for r in members)}
        print(f"| **mean {group}** ({len(members)}) | | " + " | ".join(cell(network, name) for name in CLASSES)
              + " | " + " | ".join(cell(otsu, name) for name in CLASSES)
              + f" | {means[group]['cpu_s']:.1f} | |")
    print()
    for group, values in means.items():
        gm_goal, wm_goal = GOALS.get(group, (0.85, 0.85))
        network = values["network"]
        goal = "met" if network["gm"] >= gm_goal and network["wm"] >= wm_goal else "NOT met"
        ship = "met" if network["gm"] >= SHIP[0] and network["wm"] >= SHIP[1] else "NOT met"
        versus = ""
        if values["otsu"] is not None:
            otsu = values["otsu"]
            versus = (f"; vs Otsu GM {network['gm'] - otsu['gm']:+.3f}, WM {network['wm'] - otsu['wm']:+.3f}")
        print(f"{group}: goal (GM >= {gm_goal}, WM >= {wm_goal}) {goal}; ship (GM >= {SHIP[0]}, WM >= {SHIP[1]}) "
              f"{ship}{versus}.")
    by_name = {r.case.name: r for r in results}
    for r in results:
        twin = by_name.get(r.case.name.removesuffix("-oblique"))
        if r.case.oblique and twin is not None:
            difference = max(abs(r.network[name] - twin.network[name]) for name in r.network)
            print(f"Oblique direction ({r.case.name}): largest Dice difference from {twin.case.name} {difference:.4f}.")
    for r in results:
        for warning in r.warnings:
            print(f"Pipeline warning ({r.case.name}): {warning}")
    return means


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label-maps", type=Path, default=thick_slice_benchmark.DEFAULT_LABEL_MAPS)
    parser.add_argument("--held-out", nargs="+", default=thick_slice_benchmark.DEFAULT_HELD_OUT)
    parser.add_argument("--cases", help="comma-separated patterns on case names (fnmatch), e.g. 'mni152,*/t2'")
    parser.add_argument("--list-cases", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--uncertainty", action="store_true",
                        help="run with the uncertainty option (labels from the mean over the input and its mirror)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                        help="override a package option for an ablation, e.g. intensity_refinement_iterations=0")
    args = parser.parse_args()
    overrides = {}
    for text in args.option:
        key, separator, value = text.partition("=")
        if not separator:
            raise SystemExit(f"--option {text!r} is not KEY=VALUE.")
        overrides[key] = json.loads(value)
    cases = all_cases(args.held_out)
    if args.list_cases:
        print("\n".join(case.name for case in cases))
        return 0
    cases = thick_slice_benchmark.select_cases(cases, args.cases, quick=False)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    cache: tasks.PipelineCache = {}
    results = []
    with tempfile.TemporaryDirectory(prefix="miadl-tissue-") as folder:
        loaded: dict[str, Any] = {}
        for case in cases:
            brain = None
            if case.setting == "mni152":
                image, truth, brain = mni_case()
            else:
                if case.source not in loaded:
                    path = args.label_maps / f"{case.source}.nii.gz"
                    if not path.is_file():
                        raise SystemExit(f"No label map {path}; give --label-maps and --held-out.")
                    reader = sitk.ImageFileReader()
                    reader.SetFileName(str(path))
                    reader.ReadImageInformation()
                    loaded.clear()
                    loaded[case.source] = (load_label_map(path), reader.GetDirection(), reader.GetOrigin())
                label_map, direction, origin = loaded[case.source]
                image, truth = render_case(case, label_map, direction, origin, args.seed)
            print(f"  {case.name}: {'x'.join(map(str, image.GetSize()))} ...", end="", flush=True)
            result = run_case(case, image, truth, brain, Path(folder), args.device, cache,
                              {**({"uncertainty": True} if args.uncertainty else {}), **overrides})
            results.append(result)
            print(" " + ", ".join(f"{name} {value:.3f}" for name, value in result.network.items())
                  + f", {result.cpu_s:.1f} CPU s", flush=True)
    means = print_report(results, args.threads, args.device, (load_before, os.getloadavg()[0]),
                         time.perf_counter() - started, args.uncertainty, overrides)
    if args.json:
        payload = {"model": MODEL_ID, "device": args.device, "threads": args.threads, "seed": args.seed,
                   "uncertainty": args.uncertainty, "option_overrides": overrides,
                   "cpu": devices.cpu_name(), "torch": torch.__version__,
                   "cases": [{"name": r.case.name, "group": r.case.group, "size": r.size, "spacing": r.spacing,
                              "network": r.network, "otsu": r.otsu, "cpu_s": r.cpu_s, "wall_s": r.wall_s,
                              "warnings": r.warnings} for r in results],
                   "means": means}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"Numbers saved to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
