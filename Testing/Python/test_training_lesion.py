"""The lesion detector's training (training/train_lesion.py, training/lesion_shapes.py) at tiny size: lesion shapes
loaded and cached, pasted only into parenchyma with an intensity set apart from the tissue around them, a target with
the lesion class, a few resumable steps from the tissue model, and an export the engine's detector loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import write_tiny_label_maps

from MIADeepLearningLib.engine.detection import LesionDetection
from MIADeepLearningLib.training import generator as gen
from MIADeepLearningLib.training import lesion_shapes, train_lesion, train_segmentation
from MIADeepLearningLib.training.label_maps import load_label_maps

pytestmark = pytest.mark.usefixtures("torch_global_state")


def _write_masks(folder: Path) -> Path:
    """A soop/ folder of ball-shaped 'stroke' masks and an mslub/ folder of two patients with three small lesions."""
    for kind in ("soop", "mslub"):
        (folder / kind).mkdir(parents=True)
    for index, radius in enumerate((3, 4, 5, 6, 3, 4, 5, 6, 4, 5, 6)):
        mask = np.zeros((30, 32, 28), np.uint8)
        ball = lesion_shapes.sphere(radius)
        mask[5:5 + ball.shape[0], 6:6 + ball.shape[1], 4:4 + ball.shape[2]] = ball
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(folder / "soop" / f"sub-{index:02d}_lesion.nii.gz"))
    for patient in range(2):
        mask = np.zeros((30, 32, 28), np.uint8)
        for offset in (2, 12, 22):
            mask[offset:offset + 3, offset:offset + 3, 5:8] = 1
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(folder / "mslub" / f"patient{patient:02d}_GT.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return (write_tiny_label_maps(tmp_path_factory.mktemp("maps")),
            _write_masks(tmp_path_factory.mktemp("masks")))


def test_shapes_are_split_held_out_and_cached(data, tmp_path):
    _, masks = data
    cache = tmp_path / "shapes.npz"
    training, held_out = lesion_shapes.load_lesion_shapes(masks, 1, held_out_every=5, cache=cache)
    assert cache.exists()
    assert sum(shape.kind == "stroke" for shape in held_out) == 3  # files 0, 5 and 10 of 11
    assert [shape.name.split("#")[0] for shape in held_out if shape.kind == "ms"] == ["patient01_GT.nii.gz"] * 3
    assert sum(shape.kind == "ms" for shape in training) == 3, "MS masks are split into single lesions"
    again_training, again_held_out = lesion_shapes.load_lesion_shapes(masks / "nowhere", 1, cache=cache)
    assert [s.name for s in again_training] == [s.name for s in training]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(again_held_out, held_out))
    coarse, _ = lesion_shapes.load_lesion_shapes(masks, 2, held_out_every=5)
    assert max(shape.mask.shape[0] for shape in coarse) < max(shape.mask.shape[0] for shape in training)


def test_lesions_are_pasted_into_parenchyma_and_stand_out(data):
    maps_folder, masks = data
    maps, _ = load_label_maps(maps_folder, [])
    shapes, _ = lesion_shapes.load_lesion_shapes(masks, 1, held_out_every=5)
    painter = lesion_shapes.LesionPainter(shapes, healthy_fraction=0.0)
    settings = train_segmentation.SampleSettings(patch=24, voxel_mm=1.0, spatial=None, resolution_probability=0.0,
                                                 label_edit=painter, classes=len(train_lesion.CLASSES))
    found = 0
    for seed in range(12):
        generator = torch.Generator().manual_seed(seed)
        sample = train_segmentation.make_sample(maps[seed % len(maps)], ("t1", "t2", "random")[seed % 3], generator,
                                                settings)
        lesion = sample.target == train_lesion.LESION
        assert int(sample.target.max()) <= train_lesion.LESION
        if not lesion.any():
            continue
        found += 1
        image = sample.inputs[0]
        tissue = (sample.target == 2) | (sample.target == 3)
        assert not (lesion & (sample.target == 1)).any()
        # the pasted intensity lies outside the gray/white matter range (before blur and bias: compare medians)
        lesion_median = float(image[lesion].median())
        gm, wm = float(image[sample.target == 2].median()), float(image[sample.target == 3].median())
        assert lesion_median > max(gm, wm) + 0.03 or lesion_median < min(gm, wm) - 0.03, seed
        assert tissue.any()
    assert found >= 6, "most examples with healthy_fraction 0 carry a lesion inside the crop"
    healthy = lesion_shapes.LesionPainter(shapes, healthy_fraction=1.0)
    labels = torch.zeros((8, 8, 8), dtype=torch.long)
    values = np.array([0, 2], np.int32)
    lookup = torch.from_numpy(gen.tissue_classes(values))
    same = healthy(labels, values, lookup, torch.Generator().manual_seed(0), (slice(None),) * 3)
    assert same[0] is labels and same[3] is None


def test_a_few_steps_from_the_tissue_model_resume_and_export(data, tmp_path, capsys):
    maps_folder, masks = data
    tissue = tmp_path / "tissue.pt"
    network = train_lesion.UNet3D(1, 4, [4, 8])
    torch.save({"state_dict": network.state_dict(), "features": [4, 8], "working_spacing": 2,
                "classes": list(gen.TISSUE_CLASSES)}, tissue)
    start = train_lesion.initial_state(tissue, [4, 8])
    assert torch.equal(start["head.weight"][:4], network.state_dict()["head.weight"])
    assert not start["head.weight"][4].any() and float(start["head.bias"][4]) == train_lesion.INITIAL_LESION_BIAS
    checkpoint = tmp_path / "lesion.pt"
    argv = ["--label-maps", str(maps_folder), "--held-out", "case_2", "--lesion-masks", str(masks), "--init",
            str(tissue), "--checkpoint", str(checkpoint), "--patch", "8", "--validation-patch", "8", "--features",
            "4", "8", "--validate-every", "1", "--threads", "1", "--shape-cache", str(tmp_path / "shapes.npz")]
    assert train_lesion.main([*argv, "--iterations", "1"]) == 0
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert float(state["model"]["head.bias"][-1]) == pytest.approx(train_lesion.INITIAL_LESION_BIAS, abs=0.01)
    assert train_lesion.main([*argv, "--iterations", "2"]) == 0
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["iteration"] == 2 and "resumed at iteration 1" in capsys.readouterr().out
    assert {"val_lesion_dice", "val_tissue_dice", "val_false_ml"} <= set(state["history"][-1])
    exported = tmp_path / "model.pt"
    assert train_lesion.main(["--checkpoint", str(checkpoint), "--export", str(exported)]) == 0
    detector = LesionDetection(None, {"network": exported}, torch.device("cpu"), {"roi_size": 16})
    assert detector.classes == list(train_lesion.CLASSES) and detector.lesion_index == 4
    with pytest.raises(SystemExit, match="needs --init"):
        train_lesion.main(["--label-maps", str(maps_folder), "--held-out", "case_2", "--lesion-masks", str(masks),
                           "--checkpoint", str(tmp_path / "new.pt"), "--patch", "8", "--validation-patch", "8",
                           "--features", "4", "8"])
