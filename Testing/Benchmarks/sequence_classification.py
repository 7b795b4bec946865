"""Accuracy of the MRI sequence-type classifier on real scans it was never trained on, and the faithfulness of its
saliency maps. Prints tables; asserts nothing.

    python Testing/Benchmarks/sequence_classification.py --data ../shared/data [--model sequence-type]

Real volumes (the shipped model trains on renders of label maps only; weights fine-tuned on real scans with
train_classification --real-cases are measured with `--fine-tuned-on Training/sequence-type-real-cases.tsv`: the
listed rows are then marked "tuned" and left out of every accuracy, confusion matrix, calibration, stress and saliency
number):
- ../shared/data/brain-lesions: BraTS-MET case 00110 and TCGA glioma 6692 (preprocessed: 1 mm, skull-stripped),
  the same glioma's raw clinical series (2-D axial, ~5.5 mm slices, whole head), three MS patients' clinical series
  (2-D, 3-4 mm slices, whole head), niivue's FLAIR (1 mm) and DWI b0 (2 mm);
- the sample heads the project ships with (ROBEX whole-head T1, MNI152 2009a brain T1 from nilearn);
- `other`: the abdominal CT and MR of ../shared/data/ct-mr-examples, a multi-organ segmentation stored as a
  volume, and a held-out brain label map stored as a volume.
Groups: "1 mm" (preprocessed / isotropic volumes), "thick" (raw 2-D clinical series), "other".

Saliency faithfulness (issue 15): on each real head volume, delete (set to the background value) the 10 % most
salient head voxels of the classifier's grid, and the same number of random head voxels; the saliency map is
faithful on a volume when the predicted class's probability falls more for the salient deletion.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MIADeepLearning"))

from MIADeepLearningLib.engine import classification, devices, registry
from MIADeepLearningLib.testing import sample_data


def real_volumes(data: Path) -> list[tuple[str, Path, str, str]]:
    """(name, path, true class, group) of every real volume the benchmark uses that exists under `data`."""
    lesions = data / "brain-lesions"
    items = []
    for case in ("met-00110", "tcga-fg-6692/preprocessed"):
        for stem, truth in (("flair", "flair"), ("fla", "flair"), ("t1", "t1w"), ("t1c", "t1c"), ("t2", "t2w")):
            path = lesions / case / f"{stem}.nii.gz"
            if path.exists():
                items.append((f"{case.split('/')[0]}/{stem}", path, truth, "1 mm"))
    raw = lesions / "tcga-fg-6692" / "raw-series"
    for stem, truth in (("flair_ax", "flair"), ("t1_ax", "t1w"), ("t1_ax_post_gad", "t1c"), ("t2_ax", "t2w")):
        if (raw / f"{stem}.nii.gz").exists():
            items.append((f"tcga-raw/{stem}", raw / f"{stem}.nii.gz", truth, "thick"))
    for path in sorted((lesions / "clinical-series").glob("*.nii.gz")):
        truth = {"FLAIR": "flair", "T1W": "t1w", "T2W": "t2w"}[path.name.split("_")[-1].split(".")[0]]
        items.append((path.name.split(".")[0], path, truth, "thick"))
    for stem, truth in (("flair", "flair"), ("dwi_b0", "dwi")):
        path = lesions / "niivue" / f"{stem}.nii.gz"
        if path.exists():
            items.append((f"niivue/{stem}", path, truth, "1 mm"))
    head, _ = sample_data.robex_head_paths()
    items.append(("robex-head (sample)", head, "t1w", "1 mm"))
    mni_t1 = sample_data.mni152_paths()[0]
    items.append(("mni152-t1 (sample)", mni_t1, "t1w", "1 mm"))
    examples = data / "ct-mr-examples"
    for stem in ("example_ct_sm", "example_mr_sm", "example_seg"):
        if (examples / f"{stem}.nii.gz").exists():
            items.append((stem, examples / f"{stem}.nii.gz", "other", "other"))
    held_out_map = data / "brain-label-maps" / "training_seg_15.nii.gz"
    if held_out_map.exists():
        items.append(("label map 15 as volume", held_out_map, "other", "other"))
    return items


def fine_tuned_paths(listing: str, data: Path) -> set[Path]:
    """The resolved paths of the real scans a training run fine-tuned on (train_classification --real-cases)."""
    if not listing or not Path(listing).exists():
        return set()
    paths = set()
    for line in Path(listing).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            paths.add((data / line.split()[0]).resolve())
    return paths


def _with_voxels(image: sitk.Image, voxels: np.ndarray) -> sitk.Image:
    result = sitk.GetImageFromArray(voxels.astype(np.float32))
    result.CopyInformation(image)
    return result


def ghosting(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Motion ghosts: random phase errors on every 4th..8th k-space line along one in-plane axis."""
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    spectrum = np.fft.fftn(voxels, axes=(1, 2))
    lines = np.arange(spectrum.shape[1])[:: int(rng.integers(4, 9))]
    spectrum[:, lines, :] *= np.exp(1j * rng.uniform(-1.0, 1.0, size=(1, lines.size, 1)))
    return _with_voxels(image, np.abs(np.fft.ifftn(spectrum, axes=(1, 2))))


def ringing(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Gibbs ringing: k-space truncated to the central 35 % along both in-plane axes (no window)."""
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    spectrum = np.fft.fftshift(np.fft.fftn(voxels, axes=(1, 2)), axes=(1, 2))
    mask = np.zeros(spectrum.shape[1:], dtype=bool)
    h, w = mask.shape
    mask[int(h * 0.325): int(h * 0.675), int(w * 0.325): int(w * 0.675)] = True
    spectrum[:, ~mask] = 0
    return _with_voxels(image, np.abs(np.fft.ifftn(np.fft.ifftshift(spectrum, axes=(1, 2)), axes=(1, 2))))


def very_thick(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """10 mm slices along the coarsest axis (training stopped at 7 mm)."""
    axis = int(np.argmax(image.GetSpacing()))
    spacing = list(image.GetSpacing())
    factor = max(1, round(10.0 / spacing[axis]))
    shrink = [1, 1, 1]
    shrink[axis] = factor
    return sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), shrink)


def heavy_noise(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Rician noise at 10 % of the 99th percentile (training stopped at 4 %; 8 % for diffusion)."""
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    sigma = 0.10 * float(np.quantile(voxels, 0.99))
    noisy = np.hypot(voxels + rng.normal(0, sigma, voxels.shape), rng.normal(0, sigma, voxels.shape))
    return _with_voxels(image, noisy)


def spikes(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """1 % of the voxels set to 3x the maximum (hot pixels / spike noise)."""
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    chosen = rng.random(voxels.shape) < 0.01
    voxels[chosen] = 3.0 * float(voxels.max())
    return _with_voxels(image, voxels)


STRESS = {"motion ghosts": ghosting, "Gibbs ringing": ringing, "10 mm slices": very_thick, "noise 10 %": heavy_noise,
          "spike noise 1 %": spikes}


def stress(classifier: classification.SequenceClassifier, rows: list[dict]) -> None:
    """Accuracy of the real MR volumes under degradations never used in training."""
    rng = np.random.default_rng(0)
    heads = [row for row in rows if row["group"] != "other"]
    print("\nStress benchmark (degradations never used in training), real head volumes\n")
    print("| degradation | volumes | correct | accuracy | t1w/t1c pair |")
    print("|---|---|---|---|---|")
    base = sum(row["label"] == row["truth"] for row in heads)
    pair = [row for row in heads if row["truth"] in ("t1w", "t1c")]
    print(f"| none | {len(heads)} | {base} | {base / max(len(heads), 1):.3f} | "
          f"{sum(row['label'] == row['truth'] for row in pair)}/{len(pair)} |")
    for name, degrade in STRESS.items():
        correct, pair_correct = 0, 0
        for row in heads:
            label = classifier.classify(degrade(row["image"], rng)).label
            correct += label == row["truth"]
            pair_correct += label == row["truth"] and row["truth"] in ("t1w", "t1c")
        accuracy = correct / max(len(heads), 1)
        print(f"| {name} | {len(heads)} | {correct} | {accuracy:.3f} | {pair_correct}/{len(pair)} |")


def held_out_renders(classifier: classification.SequenceClassifier, data: Path, per_class: int, seed: int) -> None:
    """Accuracy on renders of the three held-out label maps (never trained on), per class, with a confusion matrix."""
    from MIADeepLearningLib.training import train_classification
    from MIADeepLearningLib.training.label_maps import load_label_maps

    _, held_out = load_label_maps(data / "brain-label-maps", train_classification.DEFAULT_HELD_OUT)
    maps = train_classification.prepare_maps(held_out)
    generator = torch.Generator().manual_seed(seed)
    classes = list(classification.CLASSES)
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for truth, kind in enumerate(classes):
        for _ in range(per_class):
            label_map, tissues = maps[int(torch.randint(0, len(maps), (), generator=generator))]
            image = train_classification.render.render_example(kind, label_map, tissues, generator,
                                                               train_classification.VOXEL_MM)
            confusion[truth, classes.index(classifier.classify(image).label)] += 1
    print(f"\nHeld-out renders ({', '.join(train_classification.DEFAULT_HELD_OUT)}; {per_class} per class, seed "
          f"{seed}): accuracy {np.trace(confusion) / confusion.sum():.3f}\n")
    print("| truth \\ predicted | " + " | ".join(classes) + " | recall |")
    print("|---|" + "---|" * (len(classes) + 1))
    for truth, row in enumerate(confusion):
        print(f"| {classes[truth]} | " + " | ".join(str(value) for value in row) + f" | {row[truth] / row.sum():.2f} |")


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        chosen = (confidences > low) & (confidences <= high)
        if chosen.any():
            error += chosen.mean() * abs(confidences[chosen].mean() - correct[chosen].mean())
    return float(error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    parser.add_argument("--model", default="sequence-type")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", type=Path,
                        help="a weights file to try instead of the package's (train_classification --export)")
    parser.add_argument("--no-saliency", action="store_true")
    parser.add_argument("--stress", action="store_true", help="also the stress benchmark (unseen degradations)")
    parser.add_argument("--renders", type=int, default=0, help="also N renders per class of the held-out label maps")
    parser.add_argument("--fine-tuned-on", default="",
                        help="TSV of the real scans the weights were fine-tuned on (left out of the numbers)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = registry.get_model(args.model)
    weights = {"network": args.weights} if args.weights else registry.verified_weight_paths(model)
    classifier = classification.SequenceClassifier(model, weights, torch.device("cpu"))
    print(f"# {model.title} {args.weights or model.version}; CPU: {devices.cpu_name()}, {args.threads} threads, "
          f"float32; torch {torch.__version__}")
    rows = []
    tuned_paths = fine_tuned_paths(args.fine_tuned_on, args.data)
    print(f"\nFine-tuned on {len(tuned_paths)} of these real scans ({args.fine_tuned_on or 'none'}): marked 'tuned', "
          f"left out of every number below the table.")
    print("\n| volume | group | size | spacing (mm) | truth | predicted | p | runner-up | ood | s | tuned |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, path, truth, group in real_volumes(args.data):
        image = sitk.ReadImage(str(path))
        if image.GetNumberOfComponentsPerPixel() > 1 or image.GetDimension() != 3:
            print(f"| {name} | {group} | skipped: not a scalar 3D volume |")
            continue
        started = time.perf_counter()
        result = classifier.classify(image)
        seconds = time.perf_counter() - started
        ranked = result.ranked()
        runner = next((item for item in ranked if item[0] != result.label), ranked[1])
        tuned = Path(path).resolve() in tuned_paths
        rows.append({"name": name, "group": group, "truth": truth, "label": result.label,
                     "confidence": result.probabilities[result.label] if result.label in result.probabilities else 0,
                     "seconds": seconds, "image": image, "ood": result.ood, "tuned": tuned})
        spacing = "×".join(f"{value:.1f}" for value in image.GetSpacing())
        print(f"| {name} | {group} | {'×'.join(map(str, image.GetSize()))} | {spacing} | {truth} | {result.label} "
              f"| {result.probability:.2f} | {runner[0]} {runner[1]:.2f} | {result.ood} | {seconds:.2f} | "
              f"{'tuned' if tuned else ''} |")
    tuned_rows = [row for row in rows if row["tuned"]]
    if tuned_rows:
        correct = sum(row["label"] == row["truth"] for row in tuned_rows)
        print(f"\nThe {len(tuned_rows)} fine-tuning scans (not an accuracy: trained on): {correct} right.")
    timed = rows
    rows = [row for row in rows if not row["tuned"]]
    print("\n| group | volumes | correct | accuracy |")
    print("|---|---|---|---|")
    for group in ("1 mm", "thick", "other", "MR (1 mm + thick)", "all"):
        chosen = [row for row in rows if group == "all" or row["group"] == group
                  or (group.startswith("MR") and row["group"] in ("1 mm", "thick"))]
        correct = sum(row["label"] == row["truth"] for row in chosen)
        if chosen:
            print(f"| {group} | {len(chosen)} | {correct} | {correct / len(chosen):.3f} |")
    pair = [row for row in rows if row["truth"] in ("t1w", "t1c")]
    if pair:
        correct = sum(row["label"] == row["truth"] for row in pair)
        print(f"| t1w vs t1c | {len(pair)} | {correct} | {correct / len(pair):.3f} |")
    classes = list(classification.CLASSES)
    print("\nConfusion matrix (rows: truth, columns: predicted)\n")
    print("| truth \\ predicted | " + " | ".join(classes) + " | recall |")
    print("|---|" + "---|" * (len(classes) + 1))
    for truth in classes:
        chosen = [row for row in rows if row["truth"] == truth]
        if not chosen:
            continue
        counts = [sum(row["label"] == predicted for row in chosen) for predicted in classes]
        print(f"| {truth} | " + " | ".join(str(count) for count in counts)
              + f" | {counts[classes.index(truth)] / len(chosen):.2f} |")
    confidences = np.array([row["confidence"] for row in rows])
    correct = np.array([row["label"] == row["truth"] for row in rows], dtype=float)
    print(f"\nExpected calibration error (10 bins, {len(rows)} volumes): "
          f"{expected_calibration_error(confidences, correct):.3f}")
    print(f"Median seconds per volume (read excluded, resample + network): "
          f"{np.median([row['seconds'] for row in timed]):.2f}")
    if args.renders:
        held_out_renders(classifier, args.data, args.renders, seed=2026)
    if args.stress:
        stress(classifier, rows)
    if args.no_saliency:
        return 0
    print("\nSaliency faithfulness: probability of the predicted class after deleting 10 % of the head voxels\n")
    print("| volume | class | original | salient deleted | random deleted | faithful |")
    print("|---|---|---|---|---|---|")
    faithful = []
    for row in rows:
        if row["group"] == "other":
            continue
        drops = [classification.deletion_drop(classifier, row["image"], seed=seed) for seed in range(3)]
        random_mean = float(np.mean([drop["random_deleted"] for drop in drops]))
        drop = drops[0]
        ok = drop["salient_deleted"] < random_mean
        faithful.append(ok)
        print(f"| {row['name']} | {drop['class']} | {drop['original']:.3f} | {drop['salient_deleted']:.3f} | "
              f"{random_mean:.3f} | {'yes' if ok else 'no'} |")
    print(f"\nFaithful on {sum(faithful)} of {len(faithful)} real head volumes "
          f"({sum(faithful) / max(len(faithful), 1):.0%}; goal >= 90 %).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
