"""Training the SynthMorph-style registration network (training/train_registration.py) for a few steps at a tiny size:
the checkpoint and its learning curve (val_dice, val_dice_identity, val_fold_percent), resuming (bit-identical to an
uninterrupted run), the weights-only export and refusals; and the pieces: a training pair (same anatomy, independent
transforms and contrasts), the warp convention of the loss, the identity start."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_label_maps

from MIADeepLearningLib.engine.networks import UNet3D
from MIADeepLearningLib.training import common, label_maps, train_registration
from MIADeepLearningLib.training.spatial import SpatialSettings

FEATURES = ["4", "8"]
HISTORY_KEYS = {"iteration", "hours", "train_loss", "val_dice", "val_dice_identity", "val_fold_percent",
                "val_dice_csf", "val_dice_gm", "val_dice_wm"}

pytestmark = pytest.mark.usefixtures("torch_global_state")


@pytest.fixture(scope="module")
def label_folder(tmp_path_factory) -> Path:
    return write_tiny_label_maps(tmp_path_factory.mktemp("label-maps"), extra_cerebral=True)


def _train(label_folder: Path, checkpoint: Path, iterations: int, *extra: str) -> list[str]:
    argv = ["--label-maps", str(label_folder), "--held-out", "case_2", "--checkpoint", str(checkpoint),
            "--iterations", str(iterations), "--patch", "16", "--validate-every", "2", "--validation-patch", "16",
            "--validation-pairs", "2", "--features", *FEATURES, "--threads", "1", "--lr", "1e-3",
            "--inter-subject", "0.5", *extra]
    assert train_registration.main(argv) == 0
    return argv


def _load(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def test_training_resumes_bit_for_bit_and_exports(label_folder, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoints" / "reg.pt"
    argv = _train(label_folder, checkpoint, 2)
    state = _load(checkpoint)
    assert tuple(state) == common.CHECKPOINT_KEYS and state["iteration"] == 2
    settings = state["settings"]
    assert settings["features"] == [4, 8] and settings["working_spacing"] == 2 and settings["integration_steps"] == 7
    assert settings["smoothness"] == 1.0 and settings["inter_subject"] == 0.5
    assert settings["training_maps"] == ["case_0", "case_1"] and settings["held_out_maps"] == ["case_2"]
    history = state["history"]
    assert [row["iteration"] for row in history] == [0, 2]
    for row in history:
        assert HISTORY_KEYS <= set(row), f"history row lacks {HISTORY_KEYS - set(row)}"
        assert 0.0 <= row["val_dice"] <= 1.0 and 0.0 <= row["val_dice_identity"] <= 1.0, row
        assert 0.0 <= row["val_fold_percent"] <= 100.0, row
    assert history[0]["val_dice"] == history[0]["val_dice_identity"], "an untrained network is the identity"
    assert history[0]["val_fold_percent"] == 0.0
    assert history[0]["train_loss"] is None and 0.0 < history[1]["train_loss"] < 2.0
    assert state["commands"] == [f"[from iteration 0] python -m MIADeepLearningLib.training.train_registration "
                                 f"{' '.join(argv)}  # on CPU (1 thread)"]

    _train(label_folder, checkpoint, 4)
    resumed = _load(checkpoint)
    assert "resumed at iteration 2" in capsys.readouterr().out
    assert [row["iteration"] for row in resumed["history"]] == [0, 2, 4] and resumed["history"][:2] == history
    assert len(resumed["commands"]) == 2 and resumed["commands"][1].startswith("[from iteration 2] ")
    straight_path = tmp_path / "straight.pt"
    _train(label_folder, straight_path, 4)
    straight = _load(straight_path)
    different = [name for name in straight["model"] if not torch.equal(resumed["model"][name], straight["model"][name])]
    assert not different, f"resumed 2 + 2 iterations against 4 in one run: {different[:5]} differ"
    assert resumed["history"][-1] == {**straight["history"][-1], "hours": resumed["history"][-1]["hours"]}
    assert any(not torch.equal(straight["model"][name], state["model"][name]) for name in straight["model"]), (
        "training changed the weights")

    capsys.readouterr()
    exported = tmp_path / "package" / "model.pt"
    assert train_registration.main(["--checkpoint", str(checkpoint), "--export", str(exported)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == f"sha256 {hashlib.sha256(exported.read_bytes()).hexdigest()}  {exported}"
    payload = torch.load(exported, map_location="cpu", weights_only=True)
    assert set(payload) == {"state_dict", "features", "working_spacing", "integration_steps", "classes"}
    assert payload["features"] == [4, 8] and payload["working_spacing"] == 2 and payload["integration_steps"] == 7
    UNet3D(in_channels=2, out_channels=3, features=payload["features"]).load_state_dict(payload["state_dict"])

    with pytest.raises(SystemExit, match=r"The checkpoint has integration steps 7, not 5\."):
        _train(label_folder, checkpoint, 6, "--integration-steps", "5")
    assert _load(checkpoint)["iteration"] == 4, "a refused resume leaves the checkpoint alone"


def test_a_pair_is_one_anatomy_under_two_transforms_and_two_contrasts(label_folder):
    training, _ = label_maps.load_label_maps(label_folder, ["case_2"])
    maps = [label_maps.downsample_label_map(item, 2) for item in training]
    settings = train_registration.PairSettings(patch=16, voxel_mm=2.0, spatial=SpatialSettings())
    pair = train_registration.make_pair(maps[0], maps[0], ("t1", "t2"), torch.Generator().manual_seed(3), settings)
    again = train_registration.make_pair(maps[0], maps[0], ("t1", "t2"), torch.Generator().manual_seed(3), settings)
    assert torch.equal(pair.inputs, again.inputs) and torch.equal(pair.moving, again.moving), "seeded"
    assert tuple(pair.inputs.shape) == (2, 16, 16, 16) and pair.fixed.dtype == torch.int64
    assert set(pair.fixed.unique().tolist()) <= {0, 1, 2, 3} and set(pair.moving.unique().tolist()) <= {0, 1, 2, 3}
    assert not torch.equal(pair.fixed, pair.moving), "two independent spatial transforms"
    for channel, labels, wm_brighter in ((0, pair.fixed, True), (1, pair.moving, False)):
        image = pair.inputs[channel]
        wm, gm = float(image[labels == 3].mean()), float(image[labels == 2].mean())
        assert (wm > gm) == wm_brighter, "each side has its own contrast (T1-like fixed, T2-like moving)"

    # without spatial transforms both sides are the same crop of the same map: only the contrasts differ
    identity = train_registration.PairSettings(patch=16, voxel_mm=2.0, spatial=None)
    same = train_registration.make_pair(maps[0], maps[0], ("random", "random"), torch.Generator().manual_seed(4),
                                        identity)
    assert torch.equal(same.fixed, same.moving) and not torch.equal(same.inputs[0], same.inputs[1])
    other = train_registration.make_pair(maps[0], maps[1], ("t1", "t1"), torch.Generator().manual_seed(4), identity)
    assert torch.equal(other.fixed, same.fixed) and not torch.equal(other.moving, same.moving), "inter-subject"


def test_the_loss_warps_the_moving_labels_onto_the_fixed_grid():
    """The fixed voxel x samples the moving labels at x + u(x): content shifted by +2 voxels along z is brought back
    by u = +2 (the engine's convention); a constant field costs no smoothness."""
    fixed = torch.zeros((1, 16, 16, 16), dtype=torch.int64)
    fixed[0, 4:10, 3:12, 3:12], fixed[0, 6:8, 5:10, 5:10] = 3, 2
    moving = torch.roll(fixed, 2, dims=1)
    zero = torch.zeros((1, 3, 16, 16, 16), requires_grad=True)
    shift = torch.zeros((1, 3, 16, 16, 16))
    shift[:, 0] = 2.0
    assert float(train_registration.registration_loss(zero, fixed, fixed, 1.0).detach()) < 1e-5, "identical labels"
    before = train_registration.registration_loss(zero, fixed, moving, 1.0)
    after = train_registration.registration_loss(shift, fixed, moving, 1.0)
    assert float(after) < 1e-5 < 0.3 < float(before.detach())
    assert float(train_registration.registration_loss(-shift, fixed, moving, 1.0)) > float(before.detach()), (
        "the wrong way")
    before.backward()
    assert torch.isfinite(zero.grad).all() and zero.grad.abs().sum() > 0, "the Dice term has a gradient at identity"
    wavy = shift.clone()
    wavy[:, 0, ::2] = 0.0
    assert float(train_registration.smoothness(shift)) == 0.0 < float(train_registration.smoothness(wavy))


def test_an_untrained_network_is_almost_the_identity():
    """Near-zero head: well under a tenth of a voxel anywhere, but not exactly zero (the body must get gradients)."""
    torch.manual_seed(0)
    network = train_registration.build_network([4, 8])
    inputs = torch.rand((1, 2, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    displacement = train_registration.displacements(network, inputs, 7)
    assert tuple(displacement.shape) == (1, 3, 16, 16, 16)
    assert 0.0 < float(displacement.abs().max()) < 0.1
    exact = train_registration.displacements(train_registration.build_network([4, 8], head_std=0.0), inputs, 7)
    assert torch.equal(exact, torch.zeros_like(exact))
