"""Benchmark of the brain lesion detector (issue 16, "DL Lesion Detection") against z-scored intensity. Prints
markdown tables; asserts nothing.

    python Testing/Benchmarks/lesion_detection.py --data ../shared/data [--threads 2] [--synthetic 3]
        [--max-cases N] [--weights model.pt] [--threshold T] [--work DIR] [--renders DIR]

Every case is run through the command line exactly as a user would (`python -m MIADeepLearningLib detect --model
brain-lesion -i IN [-i IN2] -o ANOMALY --lesions LABELS --brain BRAIN --json OUT.json`), one process per case, under
/usr/bin/time for its wall time and peak memory (start-up, model load and the input type check included). The anomaly
maps, candidate label maps, brain maps and JSON summaries stay in the work folder (--work; a new folder under /tmp by
default, printed at the end), and every voxel-level number is computed from those files.

Datasets (each reported on its own):
1. real glioma / metastasis, SILVER masks (algorithm outputs, not manual): BraTS-MET 00110 (flair, t1, t1c, t2;
   segmentation_aurora labels 1 metastasis + 2 oedema = lesion) and TCGA glioma 6692 preprocessed (fla, t1, t1c, t2;
   segmentation_fusion, every nonzero label = lesion). Each contrast alone, and FLAIR+T2w, FLAIR+T1c as two inputs.
2. synthetic lesions: the held-out label maps (training_seg_13/14/15, never trained on) with held-out real lesion
   shapes pasted (training/lesion_shapes.load_lesion_shapes at 1 mm: every 10th SOOP stroke mask, the last fifth of the
   MSLUB patients), rendered with the physics of the sequence-type renderer (training/sequence_render: tissue
   relaxation times and each family's signal equation) as FLAIR, T2w, T1c and T1w, plus the same renders without the
   lesion (healthy twins: same map, same sequence parameters, same bias field and noise). The lesion is painted as the
   renderer's `edema` tissue (T1 1800 ms, T2 220 ms: bright in FLAIR and T2w, dark in T1w); lesions of 1 mL or more also
   get an enhancing shell 2-4 mm inside their border (the renderer's `rim` tissue, whose T1 contrast agent shortens, so
   it enhances in T1c only). "stroke-like": one held-out SOOP shape of >= 1 mL in the parenchyma; "MS-like": 4-12
   held-out MSLUB lesions (>= 0.05 mL each) centred in the white matter. These renders come from another generator
   than the detector's training examples (training/generator.py random contrasts with lesions of random intensity).
3. healthy real heads: the project's sample heads (ROBEX whole-head T1, nilearn MNI152 2009a brain T1).
4. MS clinical series (brain-lesions/clinical-series/*FLAIR*, thick 2-D, whole head): no masks; case score and
   candidates only (positives of the case-level AUROC: these patients have MS lesions).

Metrics. Voxel level, pooled over the dataset's cases, inside the brain map the CLI wrote (plus any true lesion voxel
it left out, which counts as a positive): AUPRC (average precision) and the best-threshold Dice (the literature's
⌈Dice⌉: one threshold per dataset and contrast, chosen on that dataset), and the Dice of the candidate map (the CLI's
own output at its threshold). Lesion level, at the CLI's threshold: a true lesion (6-connected component, >= 1 mL) is
found when a candidate overlaps it; a candidate that overlaps no true lesion voxel is a false positive. Case level:
AUROC of the case score (lesion cases against healthy renders and healthy real heads). Healthy cases: the volume of
the candidates (all false positives).

Baseline, beside every number: the z-score of the input inside the same brain map (mean and standard deviation of the
brain's voxels; negated for T1w, whose lesions are dark; two inputs: the mean of their z-scores) as the anomaly score,
one threshold per dataset (its best). Its case score is the mean z of the most anomalous 1 mL of brain (the model's
rule), and its false-positive volume on a healthy case is taken at the threshold chosen on the matching lesion dataset.
brain-lesions/README.md: this baseline reaches best-threshold Dice about 0.79 on gliomas and 0.57 on MS lesions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as functional

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MIADeepLearning"))

from MIADeepLearningLib.engine import candidates as lesion_candidates
from MIADeepLearningLib.engine import devices, registry
from MIADeepLearningLib.testing import sample_data

ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "brain-lesion"
REAL = "real glioma/metastasis (silver mask)"
STROKE = "synthetic stroke-like"
MS = "synthetic MS-like"
HEALTHY_RENDER = "synthetic healthy"
HEALTHY_REAL = "healthy real heads"
CLINICAL = "MS clinical series (no mask)"
LESION_DATASETS = (REAL, STROKE, MS)
SYNTHETIC_CONTRASTS = ("FLAIR", "T2w", "T1c", "T1w")
KIND = {"FLAIR": "flair", "T2w": "t2w", "T1c": "t1c", "T1w": "t1w"}  # sequence_render kinds
MIN_LESION_ML = 1.0  # lesion-level sensitivity counts true lesions of at least this volume
TOP_ML = lesion_candidates.CASE_SCORE_ML
PARTS = ("real", "synthetic", "healthy", "clinical")
HELD_OUT_MAPS = ("training_seg_13", "training_seg_14", "training_seg_15")
RIM_MM = (2, 4)  # the enhancing shell of a >= 1 mL lesion lies this deep inside its border
MS_MIN_VOXELS = 50  # MS-like cases paste held-out MSLUB lesions of at least 0.05 mL (1 mm voxels)
NOISE = (0.01, 0.03)  # Rician noise of the renders, relative to their maximum


@dataclass
class Run:
    dataset: str
    case: str
    contrast: str  # "FLAIR", "T2w", "T1c", "T1w", "FLAIR+T2w", "FLAIR+T1c"
    inputs: list[Path]
    truth: Path | None = None
    lesion: bool = True  # a positive case for the case-level AUROC
    # filled in by run_cli / evaluate
    ok: bool = False
    error: str = ""
    seconds: float = float("nan")
    peak_mb: float = float("nan")
    case_score: float = float("nan")
    z_score: float = float("nan")  # the baseline's case score
    candidates: int = 0
    fp_candidates: int = 0
    candidate_ml: float = 0.0
    found: int = 0
    lesions: int = 0  # true lesions >= MIN_LESION_ML
    truth_ml: float = float("nan")
    dice_counts: tuple[int, int, int] = (0, 0, 0)  # tp, predicted, true (candidate map)
    sha256: str = ""
    voxel_ml: float = 0.0
    z_healthy: np.ndarray | None = None  # baseline z inside the brain (healthy cases: its false-positive volume)
    pooled: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    outputs: dict[str, Path] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.case} {self.contrast}"


# ------------------------------------------------------------------------------------------------ metrics


def _ranked(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(threshold, true positives, predicted count) for every distinct score, predicting score >= threshold."""
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    positives = np.cumsum(truth[order], dtype=np.int64)
    last = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1)  # last voxel of each tie group
    return ranked[last], positives[last], last + 1


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (sklearn's definition, ties grouped)."""
    if scores.size == 0 or not truth.any():
        return float("nan")
    _, true_positives, predicted = _ranked(scores, truth)
    recall = true_positives / true_positives[-1]
    precision = true_positives / predicted
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def best_dice(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(best Dice over all thresholds, that threshold): score >= threshold is lesion."""
    if scores.size == 0 or not truth.any():
        return float("nan"), float("nan")
    thresholds, true_positives, predicted = _ranked(scores, truth)
    dice = 2.0 * true_positives / (predicted + true_positives[-1])
    best = int(np.argmax(dice))
    return float(dice[best]), float(thresholds[best])


def auroc(positives: list[float], negatives: list[float]) -> float:
    """Mann-Whitney AUROC (ties count one half)."""
    positives = [value for value in positives if np.isfinite(value)]
    negatives = [value for value in negatives if np.isfinite(value)]
    if not positives or not negatives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return float(wins / (len(positives) * len(negatives)))


def top_mean(values: np.ndarray, voxel_mm3: float) -> float:
    """Mean of the highest TOP_ML millilitre of `values` (the case score rule of engine/candidates.py, unclipped)."""
    if values.size == 0:
        return float("nan")
    count = int(min(values.size, max(1, round(TOP_ML * 1000.0 / voxel_mm3))))
    return float(np.partition(values, values.size - count)[values.size - count:].mean())


def zscore(path: Path, reference: sitk.Image, brain: np.ndarray, contrast: str) -> np.ndarray:
    """The input's z-score inside `brain` on the reference grid (negated for T1w: its lesions are dark)."""
    image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    if (image.GetSize() != reference.GetSize() or not np.allclose(image.GetOrigin(), reference.GetOrigin())
            or not np.allclose(image.GetDirection(), reference.GetDirection())
            or not np.allclose(image.GetSpacing(), reference.GetSpacing())):
        image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    inside = voxels[brain]
    z = (voxels - inside.mean()) / max(float(inside.std()), 1e-6)
    return -z if contrast == "T1w" else z


# ------------------------------------------------------------------------------------------------ synthetic cases


def paint_lesion(tissues: torch.Tensor, lesion: np.ndarray) -> torch.Tensor:
    """The lesion as the renderer's oedema; each piece of >= 1 mL gets an enhancing shell (rim) RIM_MM inside it."""
    from MIADeepLearningLib.training import sequence_render as sr

    tissues = tissues.clone()
    mask = torch.from_numpy(lesion)
    tissues[mask] = sr.T["edema"]
    pieces, count = lesion_candidates.connected_components(lesion)
    sizes = np.bincount(pieces.ravel(), minlength=count + 1)
    big = np.flatnonzero(sizes >= MIN_LESION_ML * 1000)  # 1 mm voxels
    large = np.isin(pieces, big[big > 0])
    if large.any():
        outside = (~torch.from_numpy(large)).float()[None, None]

        def deeper_than(mm: int) -> torch.Tensor:  # lesion voxels with no outside voxel within mm (a cube)
            return (functional.max_pool3d(outside, 2 * mm + 1, 1, mm)[0, 0] == 0) & torch.from_numpy(large)

        tissues[deeper_than(RIM_MM[0]) & ~deeper_than(RIM_MM[1])] = sr.T["rim"]
    return tissues


def place(shape: np.ndarray, centre: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`shape` (cropped bool mask) centred on `centre` in a mask of `target`'s shape, clipped to it."""
    out = np.zeros(target.shape, bool)
    start = [int(c) - s // 2 for c, s in zip(centre, shape.shape)]
    into = tuple(slice(max(0, a), min(n, a + s)) for a, s, n in zip(start, shape.shape, target.shape))
    source = tuple(slice(t.start - a, t.stop - a) for t, a in zip(into, start))
    out[into] = shape[source]
    return out


def synthetic_lesion(kind: str, tissues: torch.Tensor, shapes: list[Any], rng: np.random.Generator) -> np.ndarray:
    """A held-out stroke shape (>= 1 mL, the placement of 20 that keeps most of it in the parenchyma) or 4-12
    held-out MS lesions (>= MS_MIN_VOXELS) centred in the white matter, clipped to the parenchyma."""
    from MIADeepLearningLib.training import sequence_render as sr

    values = tissues.numpy()
    parenchyma = np.isin(values, [sr.T["wm"], sr.T["gm"], sr.T["deep_gm"]])
    white = np.argwhere(values == sr.T["wm"])
    places = np.argwhere(parenchyma)
    if kind == "stroke":
        pool = [shape for shape in shapes if shape.kind == "stroke" and shape.mask.sum() >= MIN_LESION_ML * 1000]
        mask = pool[int(rng.integers(len(pool)))].mask
        mask = np.flip(mask, tuple(axis for axis in range(3) if rng.random() < 0.5)).copy()
        best, best_share = None, -1.0
        for _ in range(20):
            placed = place(mask, places[int(rng.integers(len(places)))], values)
            share = float((placed & parenchyma).sum()) / max(int(mask.sum()), 1)
            if share > best_share:
                best, best_share = placed, share
        return best & parenchyma
    pool = [shape for shape in shapes if shape.kind == "ms" and shape.mask.sum() >= MS_MIN_VOXELS]
    lesion = np.zeros(values.shape, bool)
    for _ in range(int(rng.integers(4, 13))):
        mask = pool[int(rng.integers(len(pool)))].mask
        mask = np.flip(mask, tuple(axis for axis in range(3) if rng.random() < 0.5)).copy()
        lesion |= place(mask, white[int(rng.integers(len(white)))], values)
    return lesion & parenchyma


def render(tissues: torch.Tensor, lesion: np.ndarray | None, contrast: str, seed: int) -> sitk.Image:
    """One 1 mm scan of `contrast` with the sequence-type renderer's physics (sequence_render.mr_signal), the way
    render_head makes it but without its random crop, random lesions, skull stripping and thick slices (so the truth
    stays on the image's grid): vessels, signal, texture, blur, bias field, Rician noise. The same seed gives the same
    scan with and without the lesion."""
    from MIADeepLearningLib.training import generator as gen
    from MIADeepLearningLib.training import sequence_render as sr

    generator = torch.Generator().manual_seed(seed)
    tissues = sr.add_vessels(tissues, generator)
    present = torch.unique(tissues)
    if lesion is not None:
        tissues = paint_lesion(tissues, lesion)
    signal, _ = sr.mr_signal(KIND[contrast], generator)
    shape = tuple(tissues.shape)
    image = signal[tissues] / signal[present].max().clamp(min=1e-6)  # the healthy tissues' scale: twins match
    image = image * (1.0 + gen.smooth_field(shape, 10, 1.0, generator) * 0.03)
    image = gen.gaussian_blur(image, (0.5, 0.5, 0.5))
    image = image * torch.exp(gen.smooth_field(shape, 4, 0.2, generator))
    noise = NOISE[0] + (NOISE[1] - NOISE[0]) * float(torch.rand((), generator=generator))
    real = image + torch.randn(shape, generator=generator) * noise
    image = torch.sqrt(real**2 + (torch.randn(shape, generator=generator) * noise) ** 2)
    result = sitk.GetImageFromArray((1000.0 * image).numpy().astype(np.float32))
    result.SetDirection(sr.LABEL_MAP_DIRECTION)
    return result


def held_out_shapes(folder: Path, cache: Path) -> list[Any]:
    """The held-out shapes at 1 mm (lesion_shapes.load_lesion_shapes; `cache` written on the first run)."""
    from MIADeepLearningLib.training.lesion_shapes import load_lesion_shapes

    return load_lesion_shapes(folder, 1, cache=cache)[1]


def synthetic_runs(data: Path, folder: Path, count: int, max_cases: int | None, shape_cache: Path,
                   contrasts: tuple[str, ...]) -> list[Run]:
    from MIADeepLearningLib.training import sequence_render as sr
    from MIADeepLearningLib.training.label_maps import load_label_map

    maps = [data / "brain-label-maps" / f"{name}.nii.gz" for name in HELD_OUT_MAPS]
    maps = [path for path in maps if path.is_file()]
    if not maps:
        print(f"  no held-out label maps under {data / 'brain-label-maps'}: synthetic cases skipped")
        return []
    started = time.perf_counter()
    held_out = held_out_shapes(data / "brain-lesions" / "lesion-masks-mni", shape_cache)
    print(f"  {len(held_out)} held-out lesion shapes ({sum(s.kind == 'stroke' for s in held_out)} stroke, "
          f"{sum(s.kind == 'ms' for s in held_out)} MS) in {time.perf_counter() - started:.0f} s", flush=True)
    count = min(count, max_cases) if max_cases else count
    healthy = min(len(maps), max_cases) if max_cases else len(maps)
    runs = []
    plan = [(HEALTHY_RENDER, index) for index in range(healthy)]
    plan += [(group, index) for index in range(count) for group in (STROKE, MS)]
    loaded: dict[Path, torch.Tensor] = {}
    for dataset, index in plan:
        path = maps[index % len(maps)]
        if path not in loaded:
            loaded[path] = sr.tissue_map(load_label_map(path))
        tissues = loaded[path]
        name = path.name.split(".")[0].replace("training_seg_", "map")
        lesion = None
        if dataset != HEALTHY_RENDER:
            kind = "stroke" if dataset == STROKE else "ms"
            name = f"{kind}{index:02d}-{name}"
            lesion = synthetic_lesion(kind, tissues, held_out, np.random.default_rng(zlib.crc32(name.encode())))
        case = folder / "inputs" / name
        case.mkdir(parents=True, exist_ok=True)
        truth = None
        reference = None
        for contrast in contrasts:
            image = render(tissues, lesion, contrast, zlib.crc32(f"{path.name}/{contrast}".encode()))
            image_path = case / f"{contrast}.nii"
            sitk.WriteImage(image, str(image_path))
            reference = image
            runs.append(Run(dataset, name, contrast, [image_path], lesion=lesion is not None))
        if lesion is not None and reference is not None:
            truth = case / "truth.nii.gz"
            mask = sitk.GetImageFromArray(lesion.astype(np.uint8))
            mask.CopyInformation(reference)
            sitk.WriteImage(mask, str(truth), True)
            for run in runs[-len(contrasts):]:
                run.truth = truth
    return runs


# ------------------------------------------------------------------------------------------------ real cases


def real_runs(data: Path, folder: Path, max_cases: int | None, parts: set[str]) -> list[Run]:
    lesions = data / "brain-lesions"
    runs: list[Run] = []
    cases = [("met-00110", lesions / "met-00110", {"FLAIR": "flair", "T1w": "t1", "T1c": "t1c", "T2w": "t2"},
              "segmentation_aurora.nii.gz"),
             ("tcga-fg-6692", lesions / "tcga-fg-6692" / "preprocessed",
              {"FLAIR": "fla", "T1w": "t1", "T1c": "t1c", "T2w": "t2"}, "segmentation_fusion.nii.gz")]
    for name, case, stems, mask in cases[:max_cases] if "real" in parts else []:
        files = {contrast: case / f"{stem}.nii.gz" for contrast, stem in stems.items()}
        if not (case / mask).is_file() or not all(path.is_file() for path in files.values()):
            print(f"  {case} is incomplete: skipped")
            continue
        truth = folder / "inputs" / name / "truth.nii.gz"
        truth.parent.mkdir(parents=True, exist_ok=True)
        labels = sitk.ReadImage(str(case / mask))
        sitk.WriteImage(sitk.Cast(labels > 0, sitk.sitkUInt8), str(truth), True)  # met: 1 + 2; glioma: 1, 2, 4
        for contrast in ("FLAIR", "T2w", "T1c", "T1w"):
            runs.append(Run(REAL, name, contrast, [files[contrast]], truth))
        for second in ("T2w", "T1c"):
            runs.append(Run(REAL, name, f"FLAIR+{second}", [files["FLAIR"], files[second]], truth))
    heads = [("robex-head (sample)", sample_data.robex_head_paths()[0]),
             ("mni152 (sample)", sample_data.mni152_paths()[0])]
    for name, path in heads[:max_cases] if "healthy" in parts else []:
        runs.append(Run(HEALTHY_REAL, name, "T1w", [Path(path)], lesion=False))
    series = sorted((lesions / "clinical-series").glob("*FLAIR*.nii*"))
    for path in series[:max_cases] if "clinical" in parts else []:
        runs.append(Run(CLINICAL, path.name.split(".")[0].removesuffix("_FLAIR"), "FLAIR", [path]))
    return runs


# ------------------------------------------------------------------------------------------------ running


def weights_package(weights: Path, folder: Path) -> tuple[str, dict[str, str]]:
    """A copy of the brain-lesion package whose network file is `weights` (sha256 and size updated in its metadata),
    in a folder given to the CLI through $MIADL_EXTRA_MODELS_DIRS: (model id, environment additions)."""
    source = registry.get_model(MODEL_ID).package_dir
    model_id = f"{MODEL_ID}-benchmark"
    package = folder / "extra-models" / model_id
    if package.exists():
        shutil.rmtree(package)
    shutil.copytree(source, package, ignore=shutil.ignore_patterns("models"))
    (package / "models").mkdir()
    shutil.copyfile(weights, package / "models" / "model.pt")
    metadata_path = package / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    for item in metadata["slicer"]["files"]:
        if item["role"] == "network":
            item["sha256"] = registry.sha256_of_file(package / item["path"])
            item["size"] = (package / item["path"]).stat().st_size
    metadata_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    extra = os.environ.get(registry.EXTRA_MODELS_ENV)
    return model_id, {registry.EXTRA_MODELS_ENV: os.pathsep.join(filter(None, [str(package.parent), extra]))}


def run_cli(run: Run, folder: Path, model_id: str, threshold: float | None, env: dict[str, str]) -> None:
    """Run `detect` on one case in its own process; wall seconds and peak resident memory of that process."""
    stem = folder / "outputs" / run.dataset.split(" ")[0] / run.case / run.contrast
    stem.mkdir(parents=True, exist_ok=True)
    run.outputs = {"anomaly": stem / "anomaly.nii.gz", "lesions": stem / "lesions.nii.gz",
                   "brain": stem / "brain.nii.gz", "json": stem / "summary.json"}
    command = [sys.executable, "-m", "MIADeepLearningLib", "detect", "--model", model_id]
    for path in run.inputs:
        command += ["-i", str(path)]
    command += ["-o", str(run.outputs["anomaly"]), "--lesions", str(run.outputs["lesions"]),
                "--brain", str(run.outputs["brain"]), "--json", str(run.outputs["json"]), "-q"]
    if threshold is not None:
        command += ["--threshold", str(threshold)]
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    timing = stem / "time.txt"
    if timer:
        command = [timer, "-f", "%e %M", "-o", str(timing), *command]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    run.seconds = time.perf_counter() - started
    if timer and timing.is_file():
        fields = timing.read_text().split()
        if len(fields) >= 2:
            run.seconds, run.peak_mb = float(fields[-2]), float(fields[-1]) / 1024.0
    else:  # the largest child so far (kB on Linux): an upper bound for this one
        run.peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    if done.returncode != 0 or not run.outputs["json"].is_file():
        lines = (done.stderr or done.stdout).strip().splitlines()
        run.error = f"exit {done.returncode}: {lines[-1] if lines else ''}"
        return
    run.ok = True


def evaluate(run: Run) -> None:
    """Case score, candidates, and the voxel- and lesion-level counts of one finished run from its output files."""
    summary = json.loads(run.outputs["json"].read_text(encoding="utf-8"))
    run.case_score = float(summary["case_score"])
    run.sha256 = next(iter(summary["provenance"].get("weights_sha256", {}).values()), "")
    found = summary["candidates"]
    run.candidates = len(found)
    run.candidate_ml = float(sum(item["volume_ml"] for item in found))
    reference = sitk.ReadImage(str(run.outputs["brain"]))
    run.voxel_ml = float(np.prod(reference.GetSpacing())) / 1000.0
    brain = sitk.GetArrayFromImage(reference) > 0
    anomaly = sitk.GetArrayFromImage(sitk.ReadImage(str(run.outputs["anomaly"]))).astype(np.float32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(run.outputs["lesions"])))
    contrasts = run.contrast.split("+")
    z = np.mean([zscore(path, reference, brain, contrast) for path, contrast in zip(run.inputs, contrasts)], axis=0)
    run.z_score = top_mean(z[brain], run.voxel_ml * 1000.0)
    if run.truth is None:
        run.fp_candidates = run.candidates if not run.lesion else 0
        if not run.lesion:
            run.z_healthy = z[brain].astype(np.float32)
        return
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(run.truth))) > 0
    if truth.shape != brain.shape:
        raise SystemExit(f"{run.name}: the truth {truth.shape} is not on the output grid {brain.shape}.")
    run.truth_ml = float(truth.sum()) * run.voxel_ml
    inside = brain | truth
    run.pooled = (anomaly[inside], z[inside].astype(np.float32), truth[inside])
    predicted = labels > 0
    run.dice_counts = (int((predicted & truth).sum()), int(predicted.sum()), int(truth.sum()))
    pieces, count = lesion_candidates.connected_components(truth)
    sizes = np.bincount(pieces.ravel(), minlength=count + 1)
    hit = np.unique(pieces[predicted])
    large = [index for index in range(1, count + 1) if sizes[index] * run.voxel_ml >= MIN_LESION_ML]
    run.lesions = len(large)
    run.found = sum(index in hit for index in large)
    touched = np.unique(labels[truth])
    run.fp_candidates = sum(item["label"] not in touched for item in found)


# ------------------------------------------------------------------------------------------------ renders


def write_png(run: Run, folder: Path) -> None:
    """One axial slice (the one with the most lesion, else the most anomaly): input, anomaly over it, truth (green)
    and candidate (red) contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = sitk.DICOMOrient(sitk.ReadImage(str(run.inputs[0])), "LPS")
    anomaly = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(run.outputs["anomaly"])), "LPS"))
    labels = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(run.outputs["lesions"])), "LPS")) > 0
    truth = (sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(run.truth)), "LPS")) > 0
             if run.truth is not None else None)
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    weight = truth.sum(axis=(1, 2)) if truth is not None and truth.any() else anomaly.sum(axis=(1, 2))
    k = int(np.argmax(weight))
    high = float(np.quantile(voxels, 0.995)) or 1.0
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for axis in axes:
        axis.imshow(voxels[k], cmap="gray", vmin=0, vmax=high)
        axis.axis("off")
    axes[0].set_title(f"{run.case} {run.contrast}, slice {k}", fontsize=9)
    shown = np.ma.masked_less(anomaly[k], 0.05)
    overlay = axes[1].imshow(shown, cmap="hot", vmin=0, vmax=1, alpha=0.6)
    axes[1].set_title(f"anomaly (case score {run.case_score:.2f})", fontsize=9)
    figure.colorbar(overlay, ax=axes[1], fraction=0.046)
    if truth is not None and truth[k].any():
        axes[2].contour(truth[k], levels=[0.5], colors="lime", linewidths=0.8)
    if labels[k].any():
        axes[2].contour(labels[k], levels=[0.5], colors="red", linewidths=0.8)
    axes[2].set_title("truth (green, silver mask) / candidates (red)" if truth is not None
                      else "candidates (red); no mask", fontsize=9)
    figure.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{run.case}_{run.contrast}".replace("/", "_").replace(" ", "_").replace("(", "").replace(")", "")
    figure.savefig(folder / f"{name}.png", dpi=90)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------ report


def number(value: float, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def pooled(runs: list[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts = [run.pooled for run in runs if run.pooled is not None]
    return tuple(np.concatenate([part[index] for part in parts]) for index in range(3))  # type: ignore[return-value]


def voxel_table(runs: list[Run]) -> dict[tuple[str, str], float]:
    """The main table; returns the baseline's chosen threshold of every (dataset, contrast)."""
    print("\n## Voxel and lesion level (pooled over each dataset's cases; model vs z-score baseline)\n")
    print("| dataset | contrast | cases | AUPRC model | AUPRC z-score | best Dice model (thr) "
          f"| best Dice z-score (thr) | Dice at default thr | sensitivity ≥ {MIN_LESION_ML:g} mL "
          "| FP candidates / case |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    thresholds = {}
    for dataset in LESION_DATASETS:
        contrasts = list(dict.fromkeys(run.contrast for run in runs if run.dataset == dataset))
        for contrast in contrasts:
            chosen = [run for run in runs if run.dataset == dataset and run.contrast == contrast and run.ok]
            if not chosen:
                continue
            model, baseline, truth = pooled(chosen)
            model_dice, model_threshold = best_dice(model, truth)
            z_dice, z_threshold = best_dice(baseline, truth)
            thresholds[(dataset, contrast)] = z_threshold
            tp, predicted, true = (sum(run.dice_counts[index] for run in chosen) for index in range(3))
            default_dice = 2.0 * tp / (predicted + true) if predicted + true else float("nan")
            lesions = sum(run.lesions for run in chosen)
            found = sum(run.found for run in chosen)
            sensitivity = f"{found}/{lesions} = {found / lesions:.2f}" if lesions else "– (none)"
            silver = " (silver mask)" if dataset == REAL else ""
            print(f"| {dataset} | {contrast}{silver} | {len(chosen)} | {number(average_precision(model, truth))} | "
                  f"{number(average_precision(baseline, truth))} | {number(model_dice)} ({model_threshold:.3g}) "
                  f"| {number(z_dice)} (z {z_threshold:.3g}) | {number(default_dice)} | {sensitivity} | "
                  f"{statistics.mean(run.fp_candidates for run in chosen):.1f} |")
            del model, baseline, truth
    for contrast in SYNTHETIC_CONTRASTS:  # healthy renders: the baseline threshold of stroke + MS renders together
        chosen = [run for run in runs if run.dataset in (STROKE, MS) and run.contrast == contrast and run.ok]
        if chosen:
            _, baseline, truth = pooled(chosen)
            thresholds[("synthetic stroke + MS", contrast)] = best_dice(baseline, truth)[1]
    return thresholds


def case_tables(runs: list[Run], thresholds: dict[tuple[str, str], float], threshold: float) -> None:
    single = [run for run in runs if run.ok and "+" not in run.contrast]
    healthy = [run for run in single if not run.lesion]
    sick = [run for run in single if run.lesion]
    print("\n## Case level: AUROC of the case score (lesion cases vs healthy cases; single-input runs)\n")
    print("| comparison | lesion cases | healthy cases | AUROC model | AUROC z-score (top 1 mL) |")
    print("|---|---|---|---|---|")
    comparisons = []
    for contrast in SYNTHETIC_CONTRASTS:
        comparisons.append((f"synthetic {contrast}: stroke + MS renders vs healthy twins",
                            [run for run in sick if run.dataset in (STROKE, MS) and run.contrast == contrast],
                            [run for run in healthy if run.dataset == HEALTHY_RENDER and run.contrast == contrast]))
    comparisons.append(("real: gliomas (each contrast) + MS clinical FLAIR vs healthy real heads (T1w)",
                        [run for run in sick if run.dataset in (REAL, CLINICAL)],
                        [run for run in healthy if run.dataset == HEALTHY_REAL]))
    comparisons.append(("real FLAIR: gliomas + MS clinical vs healthy real heads (T1w: another contrast)",
                        [run for run in sick if run.dataset in (REAL, CLINICAL) and run.contrast == "FLAIR"],
                        [run for run in healthy if run.dataset == HEALTHY_REAL]))
    comparisons.append(("all single-input lesion cases vs all healthy cases", sick, healthy))
    for title, positives, negatives in comparisons:
        if positives and negatives:
            print(f"| {title} | {len(positives)} | {len(negatives)} | "
                  f"{number(auroc([r.case_score for r in positives], [r.case_score for r in negatives]))} | "
                  f"{number(auroc([r.z_score for r in positives], [r.z_score for r in negatives]))} |")
    print(f"\n## Healthy cases: false positives at the default threshold ({threshold:g})\n")
    print("| dataset | case | contrast | case score | candidates | FP volume model (mL) | z-score thr (chosen on) "
          "| FP volume z-score (mL) |")
    print("|---|---|---|---|---|---|---|---|")
    for run in healthy:
        source = ("synthetic stroke + MS", run.contrast) if run.dataset == HEALTHY_RENDER else (REAL, run.contrast)
        z_threshold = thresholds.get(source, float("nan"))
        z_volume = (float((run.z_healthy >= z_threshold).sum()) * run.voxel_ml
                    if run.z_healthy is not None and np.isfinite(z_threshold) else float("nan"))
        print(f"| {run.dataset} | {run.case} | {run.contrast} | {run.case_score:.3f} | {run.candidates} | "
              f"{run.candidate_ml:.2f} | {number(z_threshold, 2)} ({source[0].split(' (')[0]} {source[1]}) | "
              f"{number(z_volume, 2)} |")
    for dataset in (HEALTHY_RENDER, HEALTHY_REAL):
        chosen = [run for run in healthy if run.dataset == dataset]
        if chosen:
            print(f"| **{dataset} mean** ({len(chosen)}) | | | {statistics.mean(r.case_score for r in chosen):.3f} "
                  f"| {statistics.mean(r.candidates for r in chosen):.1f} | "
                  f"{statistics.mean(r.candidate_ml for r in chosen):.2f} | | |")
    clinical = [run for run in single if run.dataset == CLINICAL]
    if clinical:
        print("\n## MS clinical series (no masks: these patients have MS lesions)\n")
        print("| series | case score | candidates | candidate volume (mL) | largest candidate (mL) "
              "| z-score top 1 mL |")
        print("|---|---|---|---|---|---|")
        for run in clinical:
            summary = json.loads(run.outputs["json"].read_text(encoding="utf-8"))
            largest = max((item["volume_ml"] for item in summary["candidates"]), default=0.0)
            print(f"| {run.case} FLAIR | {run.case_score:.3f} | {run.candidates} | {run.candidate_ml:.2f} | "
                  f"{largest:.2f} | {run.z_score:.2f} |")
    print("\n## Every run\n")
    print("| dataset | case | contrast | true lesion (mL) | case score | z top 1 mL | candidates | FP candidates "
          "| lesions ≥ 1 mL found | s | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        if not run.ok:
            print(f"| {run.dataset} | {run.case} | {run.contrast} | | failed: {run.error} | | | | | "
                  f"{run.seconds:.0f} | |")
            continue
        lesions = f"{run.found}/{run.lesions}" if run.truth is not None else "–"
        print(f"| {run.dataset} | {run.case} | {run.contrast} | {number(run.truth_ml, 1)} | {run.case_score:.3f} | "
              f"{run.z_score:.2f} | "
              f"{run.candidates} | {run.fp_candidates if run.truth is not None or not run.lesion else '–'} | "
              f"{lesions} | {run.seconds:.1f} | {run.peak_mb:.0f} |")


def time_table(runs: list[Run]) -> None:
    print("\n## Time and memory of the CLI process (start, model load, type check, network, writing)\n")
    print("| dataset | contrast | runs | median s / case | max s | peak memory (MB) |")
    print("|---|---|---|---|---|---|")
    keys = list(dict.fromkeys((run.dataset, run.contrast) for run in runs if run.ok))
    for dataset, contrast in keys:
        chosen = [run for run in runs if run.ok and run.dataset == dataset and run.contrast == contrast]
        print(f"| {dataset} | {contrast} | {len(chosen)} | {statistics.median(r.seconds for r in chosen):.1f} | "
              f"{max(r.seconds for r in chosen):.1f} | {max(r.peak_mb for r in chosen):.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each CLI process (OMP, MKL, ITK)")
    parser.add_argument("--synthetic", type=int, default=3, metavar="N",
                        help="synthetic lesion cases per group (stroke-like, MS-like); 0: none (default 3, one per "
                             "held-out label map)")
    parser.add_argument("--max-cases", type=int, metavar="N",
                        help="at most N cases per dataset (a quick subset)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"the parts to run, comma-separated (default all: {','.join(PARTS)})")
    parser.add_argument("--contrasts", default=",".join(SYNTHETIC_CONTRASTS),
                        help="contrasts of the synthetic renders (comma-separated)")
    parser.add_argument("--weights", type=Path,
                        help="another network file for the brain-lesion package (an exported state_dict, as "
                             "models/model.pt); run as a package copy through $MIADL_EXTRA_MODELS_DIRS")
    parser.add_argument("--threshold", type=float, help="the CLI's --threshold (default: the model's)")
    parser.add_argument("--work", type=Path, help="folder for the inputs and the CLI's outputs (kept)")
    parser.add_argument("--shape-cache", type=Path, default=Path(tempfile.gettempdir()) / "miadl-lesion-shapes-1mm.npz",
                        help="cache of the 1 mm lesion shapes (built once: minutes)")
    parser.add_argument("--renders", type=Path, metavar="DIR",
                        help="write a PNG of one slice per real case (needs matplotlib)")
    args = parser.parse_args(argv)
    contrasts = tuple(item for item in args.contrasts.split(",") if item)
    parts = {item for item in args.only.split(",") if item}
    if parts - set(PARTS):
        parser.error(f"--only: choose among {', '.join(PARTS)}")
    if any(item not in KIND for item in contrasts):
        parser.error(f"--contrasts: choose among {', '.join(SYNTHETIC_CONTRASTS)}")
    if args.renders is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed: --renders ignored")
            args.renders = None
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    folder = args.work or Path(tempfile.mkdtemp(prefix="miadl-lesion-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "MIADeepLearning"), os.environ.get("PYTHONPATH")]))}
    model = registry.get_model(MODEL_ID)
    model_id = MODEL_ID
    if args.weights:
        model_id, extra = weights_package(args.weights, folder)
        env.update(extra)
    weights = args.weights or registry.resolve_weight_path(model, model.weights[0])
    sha256 = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    print(f"Work folder {folder}", flush=True)
    runs = real_runs(args.data, folder, args.max_cases, parts)
    if args.synthetic > 0 and "synthetic" in parts:
        runs += synthetic_runs(args.data, folder, args.synthetic, args.max_cases, args.shape_cache, contrasts)
    print(f"{len(runs)} CLI runs; rendered in {time.perf_counter() - started:.0f} s", flush=True)
    for index, run in enumerate(runs, start=1):
        print(f"  [{index}/{len(runs)}] {run.dataset}: {run.name} ...", end="", flush=True)
        run_cli(run, folder, model_id, args.threshold, env)
        if run.ok:
            evaluate(run)
            print(f" score {run.case_score:.3f}, {run.candidates} candidates, {run.seconds:.1f} s, "
                  f"{run.peak_mb:.0f} MB", flush=True)
            if args.renders and run.dataset in (REAL, HEALTHY_REAL, CLINICAL) and run.contrast in ("FLAIR", "T1w") \
                    and (run.dataset != REAL or run.contrast == "FLAIR"):
                write_png(run, args.renders)
        else:
            print(f" FAILED ({run.error})", flush=True)
    threshold = args.threshold if args.threshold is not None else float(model.metadata["slicer"]["options"]
                                                                           .get("threshold", 0.5))
    ran = {run.sha256 for run in runs if run.ok and run.sha256}
    print()
    print(f"# Lesion detection — {model.title} {model.version}"
          + (f" with --weights {args.weights}" if args.weights else "")
          + f"; weights sha256 {', '.join(sorted(ran)) or sha256}")
    print()
    print(f"CPU: {devices.cpu_name()}, {os.cpu_count()} cores, {args.threads} threads per CLI process; torch "
          f"{torch.__version__}; default threshold {threshold:g}; one `detect` process per case. Load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; {(time.perf_counter() - started) / 60:.1f} min "
          "in all.")
    print()
    print("Held out: the detector trains on renders of the other label maps (training_seg_13/14/15 are never used) "
          "with the training lesion shapes (every 10th SOOP stroke mask and the last fifth of the MSLUB patients are "
          "never used); the synthetic cases here use only held-out maps and held-out shapes, rendered by the "
          "sequence-type renderer's physics (FLAIR, T2w, T1c, T1w), another generator than the training renders "
          "(random contrasts, random lesion intensities). The real cases, healthy heads and clinical series were "
          "never trained on. Real masks are SILVER (algorithm outputs).")
    thresholds = voxel_table(runs)
    case_tables(runs, thresholds, threshold)
    time_table(runs)
    failed = [run for run in runs if not run.ok]
    if failed:
        print(f"\n{len(failed)} run(s) failed: " + "; ".join(f"{run.name}: {run.error}" for run in failed))
    if args.renders:
        print(f"\nPNGs in {args.renders}")
    print(f"\nInputs and CLI outputs kept in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
