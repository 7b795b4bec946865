"""Training the thick-slice model (training/train_synthesis.py) for a few steps at a tiny size: the checkpoint and its
learning curve, resuming (same result as an uninterrupted run), determinism, the weights-only export the model
package ships, clear refusals; and the label-map sources (a folder of NIfTI maps, nilearn's MNI tissue maps)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import run_cli, write_tiny_label_maps

from MIADeepLearningLib.engine.networks import ResidualUNet3D
from MIADeepLearningLib.training import label_maps, train_synthesis

FEATURES = ["4", "8", "16"]
HISTORY_KEYS = {"iteration", "hours", "train_l1", "val_psnr", "val_psnr_linear", "gain_random", "gain_t1", "gain_t2"}


pytestmark = pytest.mark.usefixtures("torch_global_state")


@pytest.fixture(scope="module")
def label_folder(tmp_path_factory) -> Path:
    return write_tiny_label_maps(tmp_path_factory.mktemp("label-maps"), extra_cerebral=False)


def _train(label_folder: Path, checkpoint: Path, iterations: int, *extra: str) -> list[str]:
    argv = ["--label-maps", str(label_folder), "--held-out", "case_2", "--checkpoint", str(checkpoint),
            "--iterations", str(iterations), "--patch", "16", "--batch", "1", "--validate-every", "2",
            "--validation-patch", "16", "--features", *FEATURES, "--threads", "1", *extra]
    assert train_synthesis.main(argv) == 0
    return argv


def _load(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def _assert_same_weights(first: dict, second: dict, what: str) -> None:
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"{what}: these weights differ: {different[:5]}"


# ------------------------------------------------------------------------------------------------- training


def test_training_writes_a_resumable_checkpoint(label_folder, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoints" / "sr.pt"
    argv = _train(label_folder, checkpoint, 3)
    assert checkpoint.is_file(), "the checkpoint (and its folder) must be created"
    assert not checkpoint.with_suffix(".pt.tmp").exists(), "the checkpoint is written atomically (no .tmp left)"
    state = _load(checkpoint)
    assert {"model", "optimiser", "iteration", "wall_seconds", "history", "settings",
            "commands"} <= set(state)
    assert state["iteration"] == 3 and state["wall_seconds"] > 0
    assert state["settings"]["features"] == [4, 8, 16]
    assert state["settings"]["training_maps"] == ["case_0", "case_1"]
    assert state["settings"]["held_out_maps"] == ["case_2"]
    history = state["history"]
    assert [row["iteration"] for row in history] == [0, 2, 3], "rows: before training, every 2 iterations, the end"
    for row in history:
        assert HISTORY_KEYS <= set(row), f"history row lacks {HISTORY_KEYS - set(row)}"
        assert np.isfinite(row["val_psnr"]) and np.isfinite(row["val_psnr_linear"]), row
    assert history[0]["train_l1"] is None and all(row["train_l1"] > 0 for row in history[1:])
    assert len({row["val_psnr_linear"] for row in history}) == 1, "the validation set is fixed: same linear baseline"
    assert state["commands"] == [f"[from iteration 0] python -m MIADeepLearningLib.training.train_synthesis "
                                 f"{' '.join(argv)}  # on CPU (1 thread)"], "the command and the hardware it ran on"
    assert "stopped at iteration 3" in capsys.readouterr().out
    ResidualUNet3D(in_channels=3, features=[4, 8, 16]).load_state_dict(state["model"])

    _train(label_folder, checkpoint, 5)
    resumed = _load(checkpoint)
    assert "resumed at iteration 3" in capsys.readouterr().out
    assert resumed["iteration"] == 5
    assert resumed["wall_seconds"] > state["wall_seconds"], "wall time accumulates over runs"
    assert [row["iteration"] for row in resumed["history"]] == [0, 2, 3, 4, 5], "the learning curve is extended"
    assert resumed["history"][:3] == history, "earlier rows are kept as they were"
    assert len(resumed["commands"]) == 2 and resumed["commands"][0] == state["commands"][0]
    assert resumed["commands"][1].startswith("[from iteration 3] ") and "--iterations 5" in resumed["commands"][1]

    # three iterations, then two more, are the same training as five in one go (model, optimiser, data stream)
    uninterrupted = tmp_path / "uninterrupted.pt"
    _train(label_folder, uninterrupted, 5)
    straight = _load(uninterrupted)
    _assert_same_weights(resumed["model"], straight["model"], "resumed 3 + 2 iterations against 5 in one run")
    last_resumed, last_straight = resumed["history"][-1], straight["history"][-1]
    assert last_resumed["iteration"] == last_straight["iteration"] == 5
    for key in ("train_l1", "val_psnr"):
        assert last_resumed[key] == last_straight[key], f"{key} at iteration 5: resumed and uninterrupted differ"

    _train(label_folder, checkpoint, 5)  # already there: nothing to train, the checkpoint is kept
    again = _load(checkpoint)
    assert again["iteration"] == 5 and len(again["history"]) == 5 and len(again["commands"]) == 3
    _assert_same_weights(again["model"], resumed["model"], "a run with nothing left to do")


def test_batches_drawn_by_worker_processes_train_the_same_network(label_folder, tmp_path):
    """--workers only moves the drawing of batches into other processes (to keep a GPU busy): each batch comes from
    the seed of its iteration, so the trained weights are the same bit for bit.

    Both trainings run as the command a user types, each in a fresh process: the workers are forked, and forking
    this test process (which has by now loaded OpenVINO, VTK's renderer, ITK and several thread pools) crashed
    the whole suite with a segmentation fault after ~900 tests, which neither half of the suite did alone."""
    in_process, with_workers = tmp_path / "in-process.pt", tmp_path / "workers.pt"
    for checkpoint, extra in ((in_process, ()), (with_workers, ("--workers", "2"))):
        argv = ["--label-maps", str(label_folder), "--held-out", "case_2", "--checkpoint", str(checkpoint),
                "--iterations", "3", "--patch", "16", "--batch", "1", "--validate-every", "2",
                "--validation-patch", "16", "--features", *FEATURES, "--threads", "1", *extra]
        run = run_cli(*argv, module="MIADeepLearningLib.training.train_synthesis")
        assert run.returncode == 0, run.stdout + run.stderr
    first, second = _load(in_process), _load(with_workers)
    _assert_same_weights(first["model"], second["model"], "batches drawn in the training process vs by 2 workers")
    assert first["history"][-1]["train_l1"] == second["history"][-1]["train_l1"]


def test_label_maps_travel_as_one_bundle(label_folder, tmp_path):
    """A bundle (.npz) holds the loaded maps, so training runs where SimpleITK is not installed (a GPU machine)."""
    bundle = tmp_path / "maps.npz"
    assert label_maps.main([str(label_folder), "--bundle", str(bundle)]) == 0
    from_folder = label_maps.load_label_maps(label_folder, ["case_2"])
    from_bundle = label_maps.load_label_maps(bundle, ["case_2"])
    for folder_maps, bundle_maps in zip(from_folder, from_bundle):
        assert [item.name for item in folder_maps] == [item.name for item in bundle_maps]
        for a, b in zip(folder_maps, bundle_maps):
            assert np.array_equal(a.indices, b.indices) and a.indices.dtype == b.indices.dtype
            assert np.array_equal(a.values, b.values)
    with_folder, with_bundle = tmp_path / "folder.pt", tmp_path / "bundle.pt"
    _train(label_folder, with_folder, 2)
    argv = ["--label-maps", str(bundle), "--held-out", "case_2", "--checkpoint", str(with_bundle), "--iterations", "2",
            "--patch", "16", "--batch", "1", "--validate-every", "2", "--validation-patch", "16", "--features",
            *FEATURES, "--threads", "1"]
    assert train_synthesis.main(argv) == 0
    _assert_same_weights(_load(with_folder)["model"], _load(with_bundle)["model"], "maps from a folder vs a bundle")


def test_the_same_seed_trains_the_same_network(label_folder, tmp_path):
    runs = []
    for name, seed in (("a", "11"), ("b", "11"), ("c", "12")):
        checkpoint = tmp_path / f"{name}.pt"
        _train(label_folder, checkpoint, 2, "--seed", seed)
        runs.append(_load(checkpoint))
    first, second, other = runs
    _assert_same_weights(first["model"], second["model"], "two runs with seed 11")
    assert first["history"][1]["train_l1"] == second["history"][1]["train_l1"], "same seed, same first losses"
    assert first["history"][1]["val_psnr"] == second["history"][1]["val_psnr"]
    assert any(not torch.equal(first["model"][name], other["model"][name]) for name in first["model"]), (
        "another seed must give another network")


def test_export_writes_weights_that_load_safely(label_folder, tmp_path, capsys):
    checkpoint = tmp_path / "sr.pt"
    _train(label_folder, checkpoint, 2)
    capsys.readouterr()
    exported = tmp_path / "package" / "models" / "model.pt"
    assert train_synthesis.main(["--checkpoint", str(checkpoint), "--export", str(exported)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    digest = hashlib.sha256(exported.read_bytes()).hexdigest()
    assert printed == f"sha256 {digest}  {exported}", f"the export must print the file's sha256, got {printed!r}"
    payload = torch.load(exported, map_location="cpu", weights_only=True)
    assert set(payload) == {"state_dict", "features"}, "weights-only: no optimiser or training state shipped"
    network = ResidualUNet3D(in_channels=3, features=payload["features"])
    network.load_state_dict(payload["state_dict"])
    _assert_same_weights(network.state_dict(), _load(checkpoint)["model"], "the exported weights")
    assert exported.stat().st_size < checkpoint.stat().st_size, "the export must leave the optimiser state out"

    from types import SimpleNamespace

    from MIADeepLearningLib.engine.synthesis import ThickSliceSuperResolution

    pipeline = ThickSliceSuperResolution(SimpleNamespace(title="exported"), {"network": exported},
                                         torch.device("cpu"), {})
    assert pipeline.network.features == [4, 8, 16], "the synthesis pipeline must load an exported file as it is"


def test_refusals_are_clear(label_folder, tmp_path):
    checkpoint = tmp_path / "sr.pt"
    _train(label_folder, checkpoint, 1)
    with pytest.raises(SystemExit, match=r"The checkpoint has features \[4, 8, 16\], not \[4, 8\]\."):
        train_synthesis.main(["--label-maps", str(label_folder), "--held-out", "case_2", "--checkpoint",
                              str(checkpoint), "--iterations", "2", "--patch", "16", "--features", "4", "8",
                              "--threads", "1"])
    assert _load(checkpoint)["iteration"] == 1, "a refused resume must leave the checkpoint alone"
    fresh = tmp_path / "fresh.pt"
    with pytest.raises(SystemExit, match=r"None of the held-out maps \['case_9'\] is in "):
        train_synthesis.main(["--label-maps", str(label_folder), "--held-out", "case_9", "--checkpoint",
                              str(fresh), "--iterations", "1", "--patch", "16", "--features", *FEATURES])
    assert not fresh.exists(), "nothing is written when the held-out maps are wrong"
    with pytest.raises(ValueError, match="Every label map is held out"):
        label_maps.load_label_maps(label_folder, ["case_0", "case_1", "case_2"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="No NIfTI label maps in"):
        label_maps.load_label_maps(empty, [])


# ----------------------------------------------------------------------------------------------- label maps


def test_label_maps_from_a_folder(label_folder, tmp_path):
    training, held_out = label_maps.load_label_maps(label_folder, ["case_1"])
    assert [item.name for item in training] == ["case_0", "case_2"] and [item.name for item in held_out] == ["case_1"]
    for item in training + held_out:
        assert item.indices.dtype == np.int16 and item.values.tolist() == [0, 2, 3, 4, 24]
        assert item.values[item.indices].min() == 0, "a margin of background is kept around the head"
        assert max(item.indices.shape) <= 32 + 2 * 8, "cropped to the labelled region plus the margin"
    # a map on another grid is resampled to 1 mm voxels with nearest neighbours (labels stay labels)
    coarse = sitk.GetImageFromArray(np.pad(np.full((10, 10, 10), 3, dtype=np.int16), 5))
    coarse.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(coarse, str(tmp_path / "coarse.nii.gz"))
    loaded = label_maps.load_label_map(tmp_path / "coarse.nii.gz", margin=0)
    assert loaded.name == "coarse" and loaded.values.tolist() == [3]
    assert loaded.indices.shape == (20, 20, 20), f"10 voxels of 2 mm are 20 of 1 mm, got {loaded.indices.shape}"
    with pytest.raises(ValueError, match="no labelled voxel"):
        label_maps.crop_to_foreground(np.zeros((4, 4, 4), dtype=np.int32), 2)


@pytest.fixture(scope="module")
def mni_map():
    """nilearn's MNI tissue label map; nilearn (installed --no-deps for its data) is required in CI, else a skip."""
    try:
        importlib.metadata.version("nilearn")
    except importlib.metadata.PackageNotFoundError:
        reason = "nilearn is not installed (pip install --no-deps nilearn==0.14.1)"
        if os.environ.get("MIADL_REQUIRE_ALL"):
            pytest.fail(f"prerequisite missing in CI: {reason}")
        pytest.skip(reason)
    return label_maps.mni_tissue_label_map()


def test_mni_tissue_label_map_from_nilearn(mni_map):
    assert mni_map.name == "mni152_2009a_tissue"
    assert mni_map.values.tolist() == [0, 2, 3, 24], f"background, WM, GM, CSF expected, got {mni_map.values}"
    counts = np.bincount(mni_map.indices.ravel(), minlength=4)
    share = counts / counts.sum()
    assert all(share[1:] > 0.03), f"each tissue should take a real share of the map: {dict(zip([0, 2, 3, 24], share))}"
    assert all(50 < n < 240 for n in mni_map.indices.shape), f"a cropped 1 mm brain, got {mni_map.indices.shape}"
    for axis in (1, 2):  # left-right and front-back have background around the head (axis 0 may reach the neck)
        faces = np.moveaxis(mni_map.indices, axis, 0)
        assert (faces[0] == 0).all() and (faces[-1] == 0).all(), f"the crop keeps a background margin on axis {axis}"
