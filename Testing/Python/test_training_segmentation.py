"""Training the brain tissue segmenter (training/train_segmentation.py) for a few steps at a tiny size: the
checkpoint and its learning curve (per-class validation Dice per setting), resuming (same result as an uninterrupted
run), determinism, the weights-only export, the working grid (label maps downsampled by block mode), renders at
1 mm brought onto the 2 mm grid as the engine brings a scan, clear refusals; and the pieces of a training example
(render aligned with its target, contrast curriculum, loss)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import write_tiny_label_maps

from MIADeepLearningLib.engine import geometry
from MIADeepLearningLib.engine.networks import UNet3D
from MIADeepLearningLib.training import common, label_maps, train_segmentation
from MIADeepLearningLib.training import generator as gen
from MIADeepLearningLib.training.spatial import SpatialSettings

FEATURES = ["4", "8", "16"]
DICE_KEYS = {f"dice_{setting}_{name}" for setting in ("t1", "t2", "random", "t1_5mm") for name in ("csf", "gm", "wm")}
HISTORY_KEYS = {"iteration", "hours", "train_loss", "val_dice", "val_dice_csf", "val_dice_gm", "val_dice_wm",
                *DICE_KEYS}


pytestmark = pytest.mark.usefixtures("torch_global_state")


@pytest.fixture(scope="module")
def label_folder(tmp_path_factory) -> Path:
    return write_tiny_label_maps(tmp_path_factory.mktemp("label-maps"), extra_cerebral=True)


def _train(label_folder: Path, checkpoint: Path, iterations: int, *extra: str) -> list[str]:
    argv = ["--label-maps", str(label_folder), "--held-out", "case_2", "--checkpoint", str(checkpoint),
            "--iterations", str(iterations), "--patch", "16", "--batch", "1", "--validate-every", "2",
            "--validation-patch", "16", "--validation-crops", "1", "--features", *FEATURES, "--threads", "1",
            "--working-spacing", "1", "--curriculum-iterations", "4", *extra]
    assert train_segmentation.main(argv) == 0
    return argv


def _load(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def _assert_same_weights(first: dict, second: dict, what: str) -> None:
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"{what}: these weights differ: {different[:5]}"


# ------------------------------------------------------------------------------------------------- training


def test_training_writes_a_resumable_checkpoint(label_folder, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoints" / "seg.pt"
    argv = _train(label_folder, checkpoint, 3)
    assert checkpoint.is_file() and not checkpoint.with_suffix(".pt.tmp").exists(), "written atomically"
    state = _load(checkpoint)
    assert tuple(state) == common.CHECKPOINT_KEYS, "the checkpoint has the same layout as train_synthesis's"
    assert state["iteration"] == 3 and state["wall_seconds"] > 0
    settings = state["settings"]
    assert settings["features"] == [4, 8, 16] and settings["working_spacing"] == 1
    assert settings["classes"] == ["background", "csf", "gm", "wm"]
    assert settings["training_maps"] == ["case_0", "case_1"] and settings["held_out_maps"] == ["case_2"]
    assert settings["contrast_mix"] == [0.2, 0.4, 0.4] and settings["curriculum_iterations"] == 4
    history = state["history"]
    assert [row["iteration"] for row in history] == [0, 2, 3], "rows: before training, every 2 iterations, the end"
    for row in history:
        assert HISTORY_KEYS <= set(row), f"history row lacks {HISTORY_KEYS - set(row)}"
        assert all(0.0 <= row[key] <= 1.0 for key in DICE_KEYS), row
        assert row["val_dice_gm"] == pytest.approx(np.mean([row[f"dice_{s}_gm"] for s in ("t1", "t2", "random",
                                                                                          "t1_5mm")]))
    assert history[0]["train_loss"] is None and all(row["train_loss"] > 0 for row in history[1:])
    assert state["commands"] == [f"[from iteration 0] python -m MIADeepLearningLib.training.train_segmentation "
                                 f"{' '.join(argv)}  # on CPU (1 thread)"], "the command and the hardware it ran on"
    assert "stopped at iteration 3" in capsys.readouterr().out
    UNet3D(1, 4, [4, 8, 16]).load_state_dict(state["model"])

    _train(label_folder, checkpoint, 5)
    resumed = _load(checkpoint)
    assert "resumed at iteration 3" in capsys.readouterr().out
    assert resumed["iteration"] == 5 and resumed["wall_seconds"] > state["wall_seconds"]
    assert [row["iteration"] for row in resumed["history"]] == [0, 2, 3, 4, 5], "the learning curve is extended"
    assert resumed["history"][:3] == history, "earlier rows are kept as they were"
    assert len(resumed["commands"]) == 2 and resumed["commands"][1].startswith("[from iteration 3] ")

    # three iterations, then two more, are the same training as five in one go (model, optimiser, data stream,
    # contrast curriculum)
    uninterrupted = tmp_path / "uninterrupted.pt"
    _train(label_folder, uninterrupted, 5)
    straight = _load(uninterrupted)
    _assert_same_weights(resumed["model"], straight["model"], "resumed 3 + 2 iterations against 5 in one run")
    assert resumed["history"][-1]["train_loss"] == straight["history"][-1]["train_loss"]
    assert resumed["history"][-1]["val_dice"] == straight["history"][-1]["val_dice"]


def test_the_same_seed_trains_the_same_network(label_folder, tmp_path):
    runs = []
    for name, seed in (("a", "11"), ("b", "11"), ("c", "12")):
        checkpoint = tmp_path / f"{name}.pt"
        _train(label_folder, checkpoint, 2, "--seed", seed)
        runs.append(_load(checkpoint))
    first, second, other = runs
    _assert_same_weights(first["model"], second["model"], "two runs with seed 11")
    assert first["history"][1]["train_loss"] == second["history"][1]["train_loss"], "same seed, same losses"
    assert any(not torch.equal(first["model"][name], other["model"][name]) for name in first["model"]), (
        "another seed must give another network")


def test_export_and_a_two_mm_working_grid(label_folder, tmp_path, capsys):
    checkpoint = tmp_path / "seg.pt"
    _train(label_folder, checkpoint, 1, "--working-spacing", "2", "--patch", "8", "--validation-patch", "8")
    assert _load(checkpoint)["settings"]["working_spacing"] == 2
    capsys.readouterr()
    exported = tmp_path / "package" / "models" / "model.pt"
    assert train_segmentation.main(["--checkpoint", str(checkpoint), "--export", str(exported)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == f"sha256 {hashlib.sha256(exported.read_bytes()).hexdigest()}  {exported}"
    payload = torch.load(exported, map_location="cpu", weights_only=True)
    assert set(payload) == {"state_dict", "features", "working_spacing", "classes"}, "weights-only"
    assert payload["working_spacing"] == 2 and payload["classes"] == ["background", "csf", "gm", "wm"]
    network = UNet3D(1, len(payload["classes"]), payload["features"])
    network.load_state_dict(payload["state_dict"])
    _assert_same_weights(network.state_dict(), _load(checkpoint)["model"], "the exported weights")

    with pytest.raises(SystemExit, match=r"The checkpoint has working spacing 2, not 1\."):
        _train(label_folder, checkpoint, 2)
    with pytest.raises(SystemExit, match=r"The checkpoint has features \[4, 8, 16\], not \[4, 8\]\."):
        _train(label_folder, checkpoint, 2, "--working-spacing", "2", "--features", "4", "8")
    assert _load(checkpoint)["iteration"] == 1, "a refused resume must leave the checkpoint alone"
    with pytest.raises(SystemExit, match=r"--patch 10 is not a multiple of 4 \(3 levels\)\."):
        _train(label_folder, tmp_path / "odd.pt", 1, "--patch", "10")
    with pytest.raises(SystemExit, match=r"None of the held-out maps \['case_9'\] is in "):
        _train(label_folder, tmp_path / "none.pt", 1, "--held-out", "case_9")
    assert not (tmp_path / "odd.pt").exists() and not (tmp_path / "none.pt").exists()


def test_non_finite_losses_are_skipped_and_the_best_validation_is_kept(label_folder, tmp_path, monkeypatch, capsys):
    """The shared loop (training/common.py): a non-finite loss, or a finite loss with non-finite gradients, counts as
    an iteration but changes no weight; the checkpoint at the best val_dice so far (ties: the later one) is copied to
    <checkpoint>.best.pt for --export-best; a checkpoint with non-finite weights is never exported."""
    scores = iter([0.1, 0.3, 0.2, 0.3, 0.05])  # iterations 0 (before training), 1, 2, 3, 4
    weights_at: list[dict] = []  # the network's weights at each validation

    def evaluate(network, *args):
        weights_at.append({name: value.clone() for name, value in network.state_dict().items()})
        return {"val_dice": next(scores)}

    monkeypatch.setattr(train_segmentation, "evaluate", evaluate)
    real_loss, calls = train_segmentation.segmentation_loss, []

    def loss_with_a_nan(logits, target, fractions=None):
        calls.append(len(calls) + 1)
        loss = real_loss(logits, target, fractions)
        if len(calls) == 2:
            return loss * float("nan")
        if len(calls) == 3:  # value 0, gradient 0 * inf = NaN
            return loss + (logits.sum() * 0.0).clamp(min=0.0).sqrt()
        return loss

    monkeypatch.setattr(train_segmentation, "segmentation_loss", loss_with_a_nan)
    checkpoint = tmp_path / "seg.pt"
    _train(label_folder, checkpoint, 4, "--validate-every", "1")
    printed = capsys.readouterr().out
    assert "iteration 2: non-finite loss, step skipped" in printed
    assert "iteration 3: non-finite gradient, step skipped" in printed
    state = _load(checkpoint)
    assert [row["train_loss"] is None for row in state["history"]] == [True, False, True, True, False], (
        "a row whose only step was skipped has no training loss")
    assert all(torch.isfinite(value).all() for value in state["model"].values()), "no NaN reached the weights"
    _assert_same_weights(weights_at[3], weights_at[1], "the two skipped steps")
    assert not all(torch.equal(weights_at[4][name], weights_at[3][name]) for name in weights_at[3]), "4 learned"
    best = common.best_path(checkpoint)
    assert best.name == "seg.best.pt" and _load(best)["iteration"] == 3, "the best val_dice (0.3, last at 3)"
    exported = tmp_path / "best-model.pt"
    assert train_segmentation.main(["--checkpoint", str(checkpoint), "--export", str(exported), "--export-best"]) == 0
    payload = torch.load(exported, map_location="cpu", weights_only=True)
    _assert_same_weights(payload["state_dict"], _load(best)["model"], "--export-best")

    broken = _load(checkpoint)
    broken["model"]["head.bias"][0] = float("nan")
    torch.save(broken, checkpoint)
    with pytest.raises(SystemExit, match=r"seg\.pt has non-finite weights \(head\.bias\); nothing was exported\."):
        train_segmentation.main(["--checkpoint", str(checkpoint), "--export", str(tmp_path / "never.pt")])
    assert not (tmp_path / "never.pt").exists()


# ------------------------------------------------------------------------------------------ training examples


def test_a_sample_is_a_render_aligned_with_its_tissue_target(label_folder):
    training, _ = label_maps.load_label_maps(label_folder, ["case_2"])
    label_map = training[0]
    for voxel_mm in (1.0, 2.0):
        working = label_maps.downsample_label_map(label_map, int(voxel_mm))
        settings = train_segmentation.SampleSettings(patch=16, voxel_mm=voxel_mm, spatial=SpatialSettings(),
                                                     resolution_probability=0.5)
        for seed, contrast in ((0, "t1"), (1, "t2"), (2, "random")):
            sample = train_segmentation.make_sample(working, contrast, torch.Generator().manual_seed(seed), settings)
            again = train_segmentation.make_sample(working, contrast, torch.Generator().manual_seed(seed), settings)
            assert torch.equal(sample.inputs, again.inputs) and torch.equal(sample.target, again.target), "seeded"
            assert tuple(sample.inputs.shape) == (1, 16, 16, 16) and sample.inputs.dtype == torch.float32
            assert sample.target.dtype == torch.int64 and set(sample.target.unique().tolist()) <= {0, 1, 2, 3}
            image, target = sample.inputs[0].numpy(), sample.target.numpy()
            means = [image[target == k].mean() for k in range(4) if (target == k).sum() > 20]
            assert len(means) >= 3, f"a 16³ crop of the head should show most classes: {np.bincount(target.ravel())}"
            within = sum(((image[target == k] - image[target == k].mean()) ** 2).sum() for k in range(4))
            explained = 1.0 - within / ((image - image.mean()) ** 2).sum()
            if contrast != "random":  # a random draw may give two tissues the same intensity
                assert explained > 0.5, f"{voxel_mm} mm {contrast}: the target explains {explained:.2f} of the image"
            if contrast == "t1":
                wm, gm = image[target == 3].mean(), image[target == 2].mean()
                assert wm > gm, "T1-like: the target's white matter is brighter than its grey matter"


def test_a_fine_render_reaches_the_working_grid_as_the_engine_brings_a_scan(label_folder):
    """render_factor 2: labels transformed and rendered at 1 mm, the render brought onto the 2 mm grid as the engine
    brings a 1 mm scan (blur + linear sample at the block centres), the target each block's majority class."""
    torch.manual_seed(0)
    fine = gen.gaussian_blur(torch.rand(32, 32, 32), (1.5, 1.5, 1.5))
    ours = train_segmentation.downsample_render(fine).numpy()
    image = sitk.GetImageFromArray(fine.numpy())
    grid, _ = geometry.isotropic_grid(image, 2.0)
    engine = sitk.GetArrayFromImage(geometry.resample_anti_aliased(image, grid))
    inner = (slice(3, -3),) * 3  # the engine's recursive Gaussian treats the border its own way
    assert ours.shape == engine.shape == (16, 16, 16)
    assert np.abs(ours - engine)[inner].max() < 0.05 * ours[inner].std(), "the engine's own 2 mm view of the scan"

    classes = torch.zeros(4, 4, 2, dtype=torch.int64)
    classes[:2, :2, :2] = 3
    classes[0, 0, 0] = 1  # 7 of 8: white matter
    classes[2:, :2, :2] = torch.tensor([1, 2]).repeat(2, 2, 1)  # a 4-4 tie: the lower class (CSF)
    classes[:2, 2:, :2] = torch.tensor([[2, 2], [2, 0]])  # 6 of 8: grey matter
    fractions = train_segmentation.block_fractions(classes, 4)
    assert tuple(fractions.shape) == (4, 2, 2, 1) and torch.allclose(fractions.sum(dim=0), torch.ones(2, 2, 1))
    assert fractions[:, 0, 0, 0].tolist() == [0.0, 0.125, 0.0, 0.875] and fractions[:, 1, 0, 0].tolist() == [
        0.0, 0.5, 0.5, 0.0]
    assert fractions.argmax(dim=0).tolist() == [[[3], [2]], [[1], [0]]], "majority, ties to the lower class"

    training, _ = label_maps.load_label_maps(label_folder, ["case_2"])
    settings = train_segmentation.SampleSettings(patch=8, voxel_mm=2.0, spatial=SpatialSettings(),
                                                 resolution_probability=0.5, render_factor=2)
    for seed, contrast in ((0, "t1"), (1, "t2"), (2, "t1")):
        sample = train_segmentation.make_sample(training[0], contrast, torch.Generator().manual_seed(seed), settings)
        again = train_segmentation.make_sample(training[0], contrast, torch.Generator().manual_seed(seed), settings)
        assert torch.equal(sample.inputs, again.inputs) and torch.equal(sample.target, again.target), "seeded"
        assert tuple(sample.inputs.shape) == (1, 8, 8, 8) and tuple(sample.target.shape) == (8, 8, 8)
        assert sample.fractions is None, "no fractions unless asked"
        soft = train_segmentation.make_sample(training[0], contrast, torch.Generator().manual_seed(seed),
                                              dataclasses.replace(settings, soft_targets=True))
        assert torch.equal(soft.inputs, sample.inputs) and torch.equal(soft.fractions.argmax(dim=0), soft.target)
        assert tuple(soft.fractions.shape) == (4, 8, 8, 8) and torch.allclose(soft.fractions.sum(0), torch.ones(1))
        assert 0 < int(((soft.fractions > 0) & (soft.fractions < 1)).any(dim=0).sum()) < 8**3, "mixed boundaries"
        image, target = sample.inputs[0].numpy(), sample.target.numpy()
        wm, gm = image[target == 3].mean(), image[target == 2].mean()
        assert (wm > gm) if contrast == "t1" else (wm < gm), f"{contrast}: the target is aligned with the render"
    with pytest.raises(ValueError, match="soft_targets need render_factor 2"):
        train_segmentation.make_sample(training[0], "t1", torch.Generator(), train_segmentation.SampleSettings(
            patch=8, voxel_mm=2.0, soft_targets=True))
    with pytest.raises(ValueError, match="render_factor must be 1 or 2, got 3"):
        train_segmentation.make_sample(training[0], "t1", torch.Generator(),
                                       train_segmentation.SampleSettings(patch=8, voxel_mm=2.0, render_factor=3))


def test_training_on_fine_renders_records_its_render_spacing(label_folder, tmp_path):
    checkpoint = tmp_path / "fine.pt"
    _train(label_folder, checkpoint, 1, "--working-spacing", "2", "--render-spacing", "1", "--patch", "8",
           "--validation-patch", "8")
    saved = _load(checkpoint)
    assert saved["settings"]["working_spacing"] == 2 and saved["settings"]["render_spacing"] == 1
    assert "--render-spacing 1" in saved["commands"][-1] and saved["settings"]["soft_targets"] is False
    # float32: on CPUs with native bf16, oneDNN's bf16 convolution backward gave this tiny network (2³ voxels at its
    # deepest level) NaN weight gradients on some batches (measured here), a step the loop then skips
    _train(label_folder, checkpoint, 2, "--working-spacing", "2", "--render-spacing", "1", "--patch", "8",
           "--validation-patch", "8", "--soft-targets", "--no-autocast")
    saved = _load(checkpoint)
    assert saved["iteration"] == 2 and saved["settings"]["soft_targets"] is True, "resumed with soft targets"
    assert np.isfinite(saved["history"][-1]["train_loss"])
    with pytest.raises(SystemExit, match=r"--soft-targets needs --render-spacing 1 with --working-spacing 2\."):
        _train(label_folder, tmp_path / "soft.pt", 1, "--soft-targets")
    with pytest.raises(SystemExit, match=r"--render-spacing 2 is coarser than --working-spacing 1\."):
        _train(label_folder, tmp_path / "coarse.pt", 1, "--render-spacing", "2")
    assert not (tmp_path / "coarse.pt").exists()


def test_downsampling_keeps_labels_and_takes_the_block_mode():
    indices = np.zeros((4, 4, 5), dtype=np.int16)
    indices[:2, :2, :2] = 2  # a full block
    indices[2:, 2:, :2] = [[1, 1], [1, 3]]  # 6 of 8 are label 1
    indices[:2, 2:, 2:4] = [[3, 1], [1, 3]]  # a 4-4 tie: the block's first voxel (3) wins
    coarse = label_maps.downsample_label_map(label_maps.LabelMap("x", indices, np.array([0, 2, 3, 41])), 2)
    assert coarse.indices.shape == (2, 2, 3) and coarse.indices.dtype == np.int16, "padded to whole blocks"
    assert coarse.indices[0, 0, 0] == 2 and coarse.indices[1, 1, 0] == 1 and coarse.indices[0, 1, 1] == 3
    assert coarse.indices.sum() == 6 and coarse.values.tolist() == [0, 2, 3, 41]
    same = label_maps.LabelMap("y", indices, np.array([0, 2, 3, 41]))
    assert label_maps.downsample_label_map(same, 1) is same


def test_contrast_curriculum_and_loss():
    start, final = [0.2, 0.4, 0.4], [0.8, 0.1, 0.1]
    assert train_segmentation.contrast_weights(0, start, final, 100) == pytest.approx(start)
    assert train_segmentation.contrast_weights(50, start, final, 100) == pytest.approx([0.5, 0.25, 0.25])
    assert train_segmentation.contrast_weights(500, start, final, 100) == pytest.approx(final)
    assert train_segmentation.contrast_weights(0, start, final, 0) == pytest.approx(final)
    generator = torch.Generator().manual_seed(0)
    draws = [train_segmentation.draw_contrast(generator, [0.8, 0.1, 0.1]) for _ in range(400)]
    share = draws.count("random") / len(draws)
    assert 0.72 < share < 0.88 and set(draws) == set(gen.CONTRASTS), f"random drawn {share:.2f} of the time"
    assert {train_segmentation.draw_contrast(generator, [0.0, 0.0, 1.0]) for _ in range(50)} == {"t2"}

    target = torch.randint(0, 4, (1, 8, 8, 8), generator=torch.Generator().manual_seed(1))
    perfect = torch.nn.functional.one_hot(target, 4).movedim(-1, 1).float() * 20.0
    assert float(train_segmentation.segmentation_loss(perfect, target)) < 1e-3
    assert float(train_segmentation.segmentation_loss(-perfect, target)) > 2.0
    one_hot = torch.nn.functional.one_hot(target, 4).movedim(-1, 1).float()
    assert float(train_segmentation.segmentation_loss(perfect, target, one_hot)) == pytest.approx(
        float(train_segmentation.segmentation_loss(perfect, target)), abs=1e-6), "one-hot fractions: the same loss"
    mixed = torch.full((1, 4, 8, 8, 8), 0.25)  # every voxel a quarter of each class
    best = train_segmentation.segmentation_loss(torch.zeros(1, 4, 8, 8, 8), target, mixed)
    assert float(best) < float(train_segmentation.segmentation_loss(perfect, target, mixed)), (
        "against fractions, the uniform prediction beats a confident one")
    counts = np.array([[5, 10, 10], [0, 0, 0], [0, 3, 2]])
    assert train_segmentation.dice(counts) == [0.5, 1.0, 0.0]
