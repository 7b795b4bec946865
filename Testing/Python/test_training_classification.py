"""The sequence-type classifier's training (training/train_classification.py, training/sequence_render.py) at tiny
size: the physics of each family's signal (tissue order), contrast enhancement, reproducible renders with a real
geometry, a few resumable steps and the weights-only export the model package ships."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import write_tiny_label_maps

from MIADeepLearningLib.engine import classification
from MIADeepLearningLib.training import sequence_render as render
from MIADeepLearningLib.training import train_classification
from MIADeepLearningLib.training.label_maps import load_label_maps

pytestmark = pytest.mark.usefixtures("torch_global_state")
T = render.T
SEEDS = range(40)


def _signals(kind: str) -> list[torch.Tensor]:
    return [render.mr_signal(kind, torch.Generator().manual_seed(seed))[0] for seed in SEEDS]


def test_each_family_keeps_its_tissue_order():
    """What makes a T1 a T1: WM > GM > CSF (in at least 95 % of draws: a spin echo or gradient echo with jittered
    relaxation times may leave WM and GM level, as a real low-contrast T1 does; an inversion time before gray
    matter's null once inverted 12 %); T2: CSF > GM > WM in every draw; FLAIR: GM > WM in 90 % (76 % until
    2026-12-07) and CSF dark in every draw."""
    for kind in ("t1w", "t1c"):
        signals = [render.mr_signal(kind, torch.Generator().manual_seed(seed))[0] for seed in range(400)]
        ordered = [bool(s[T["wm"]] > s[T["gm"]] > s[T["csf"]]) for s in signals]
        assert np.mean(ordered) >= 0.95, f"{kind}: WM > GM > CSF in only {np.mean(ordered):.1%} of draws"
        assert all(s[T["wm"]] > s[T["csf"]] for s in signals)
    for signal in _signals("t2w"):
        assert signal[T["csf"]] > signal[T["gm"]] > signal[T["wm"]]
    flair = [render.mr_signal("flair", torch.Generator().manual_seed(seed))[0] for seed in range(400)]
    assert np.mean([bool(s[T["gm"]] > s[T["wm"]]) for s in flair]) >= 0.9  # a modest contrast, jitter may level it
    for signal in flair:
        assert signal[T["csf"]] < 0.4 * signal[T["wm"]], "the inversion time (±4 %) keeps CSF dark"
    for kind in ("t1w", "t2w", "flair", "pdw", "dwi"):
        assert all(float(signal[T["air"]]) == 0.0 for signal in _signals(kind))


def test_contrast_agent_brightens_what_enhances():
    """Choroid plexus, vessels and dura relative to white matter: brighter after gadolinium on average."""
    def ratio(kind: str, tissue: str) -> float:
        return float(np.mean([float(s[T[tissue]] / s[T["wm"]]) for s in _signals(kind)]))

    for tissue in ("choroid", "vessel", "dura"):
        assert ratio("t1c", tissue) > 1.5 * ratio("t1w", tissue)


def test_ct_is_in_hounsfield_units():
    for seed in SEEDS:
        values = render.ct_values(torch.Generator().manual_seed(seed))
        assert values[T["air"]] < -900 and values[T["skull"]] > 600
        assert values[T["csf"]] < values[T["wm"]] < values[T["gm"]] < 50


@pytest.fixture(scope="module")
def tiny_maps(tmp_path_factory) -> Path:
    return write_tiny_label_maps(tmp_path_factory.mktemp("label-maps"), extra_cerebral=True)


def test_renders_are_reproducible_images_with_a_geometry(tiny_maps):
    maps, _ = load_label_maps(tiny_maps, [])
    prepared = train_classification.prepare_maps(maps)
    for kind in classification.CLASSES:
        first = train_classification.make_example(kind, prepared, torch.Generator().manual_seed(7))
        second = train_classification.make_example(kind, prepared, torch.Generator().manual_seed(7))
        assert first.shape == (3, classification.GRID_SIZE, classification.GRID_SIZE, classification.GRID_SIZE)
        assert torch.equal(first, second), f"{kind}: the same seed must give the same example"
        assert torch.isfinite(first).all()
    label_map, tissues = prepared[0]
    image = render.render_example("t2w", label_map, tissues, torch.Generator().manual_seed(3))
    assert isinstance(image, sitk.Image) and image.GetDimension() == 3
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-6), "a rotation, as a scanner's header holds"


def _train(maps: Path, checkpoint: Path, iterations: int) -> None:
    argv = ["--label-maps", str(maps), "--held-out", "case_2", "--checkpoint", str(checkpoint), "--iterations",
            str(iterations), "--batch", "8", "--validate-every", "1", "--validation-per-class", "1",
            "--features", "4", "4", "8", "8", "8", "--threads", "1"]
    assert train_classification.main(argv) == 0


def test_a_few_steps_resume_and_export(tiny_maps, tmp_path, capsys):
    checkpoint = tmp_path / "classifier.pt"
    _train(tiny_maps, checkpoint, 1)
    _train(tiny_maps, checkpoint, 2)  # continues the checkpoint
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["iteration"] == 2
    assert [row["iteration"] for row in state["history"]] == [0, 1, 2]
    assert {"val_accuracy", "val_loss", "acc_t1c", "acc_other"} <= set(state["history"][-1])
    assert "resumed at iteration 1" in capsys.readouterr().out
    exported = tmp_path / "model.pt"
    assert train_classification.main(["--checkpoint", str(checkpoint), "--export", str(exported)]) == 0
    printed = capsys.readouterr().out
    assert hashlib.sha256(exported.read_bytes()).hexdigest() in printed
    network, classes = classification.load_network(exported, "tiny classifier")
    assert tuple(classes) == classification.CLASSES
    with torch.no_grad():
        logits = network(torch.zeros(1, 3, 64, 64, 64))
    assert logits.shape == (1, len(classification.CLASSES))


def test_a_batch_that_is_not_a_multiple_of_the_classes_is_refused(tiny_maps, tmp_path):
    with pytest.raises(SystemExit, match="multiple of the 8 classes"):
        train_classification.main(["--label-maps", str(tiny_maps), "--held-out", "case_2", "--checkpoint",
                                   str(tmp_path / "c.pt"), "--batch", "12"])


def _real_scan(folder: Path, name: str, spacing: tuple[float, float, float]) -> Path:
    """A small head-like volume (a bright ellipsoid with a darker core) standing in for a real scan."""
    z, y, x = np.mgrid[-1:1:40j, -1:1:48j, -1:1:44j]
    radius = np.sqrt(x**2 + y**2 + z**2)
    voxels = np.where(radius < 0.8, 300.0, 5.0) - np.where(radius < 0.4, 150.0, 0.0)
    image = sitk.GetImageFromArray(voxels.astype(np.float32))
    image.SetSpacing(spacing)
    path = folder / name
    sitk.WriteImage(image, str(path))
    return path


def test_real_cases_are_listed_loaded_and_augmented(tmp_path):
    """--real-cases: a TSV of (path under --real-root, class); each scan is loaded once onto about 2 mm and every draw
    is a new acquisition of it (same contrast order), through the classifier's own preprocessing."""
    _real_scan(tmp_path, "iso.nii.gz", (1.0, 1.0, 1.0))
    _real_scan(tmp_path, "thick.nii.gz", (0.9, 0.9, 4.0))
    listing = tmp_path / "cases.tsv"
    listing.write_text("# comment\niso.nii.gz\tflair\n\nthick.nii.gz\tt1w  # trailing comment\n")
    cases = train_classification.load_real_cases(listing, tmp_path)
    assert [(relative, kind) for relative, _, kind in cases] == [
        ("iso.nii.gz", classification.CLASSES.index("flair")), ("thick.nii.gz", classification.CLASSES.index("t1w"))]
    assert cases[0][1].GetSpacing() == (2.0, 2.0, 2.0), "1 mm scans are block-averaged once, at load"
    for _, image, _ in cases:
        first = render.augment_real(image, torch.Generator().manual_seed(5))
        again = render.augment_real(image, torch.Generator().manual_seed(5))
        other = render.augment_real(image, torch.Generator().manual_seed(6))
        assert np.array_equal(sitk.GetArrayFromImage(first), sitk.GetArrayFromImage(again))
        assert not np.array_equal(sitk.GetArrayFromImage(first), sitk.GetArrayFromImage(other))
        inputs, _ = classification.network_input(first)
        assert inputs.shape == (3, classification.GRID_SIZE, classification.GRID_SIZE, classification.GRID_SIZE)
        assert torch.isfinite(inputs).all()
    listing.write_text("iso.nii.gz\tmprage\n")
    with pytest.raises(SystemExit, match="'mprage' is not one of"):
        train_classification.load_real_cases(listing, tmp_path)
    listing.write_text("missing.nii.gz\tt1w\n")
    with pytest.raises(SystemExit, match="does not exist"):
        train_classification.load_real_cases(listing, tmp_path)


def test_training_with_real_cases_records_them(tiny_maps, tmp_path):
    _real_scan(tmp_path, "scan.nii.gz", (1.0, 1.0, 1.0))
    listing = tmp_path / "cases.tsv"
    listing.write_text("scan.nii.gz\tt2w\n")
    checkpoint = tmp_path / "classifier.pt"
    argv = ["--label-maps", str(tiny_maps), "--held-out", "case_2", "--checkpoint", str(checkpoint), "--iterations",
            "1", "--batch", "16", "--validate-every", "1", "--validation-per-class", "1", "--features", "4", "4", "8",
            "8", "8", "--threads", "1", "--real-cases", str(listing), "--real-root", str(tmp_path)]
    assert train_classification.main(argv) == 0
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["settings"]["real_cases"] == ["scan.nii.gz"]
