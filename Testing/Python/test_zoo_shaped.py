"""Checks of the zoo-shaped test bundles themselves (Testing/Python/zoo_shaped.py), so that a failing import or run
test points at the product and not at a broken fixture: every config parses with monai's ConfigParser, the weights
load strictly into the bundle's own network_def, large_files.yml carries the md5 of the actual file, the release zip
is laid out as `<bundle>/...`, the broken variants are broken in the stated way, and the phantom has the promised
grid. Fast: tiny networks, no inference run."""

from __future__ import annotations

import json
import sys
import zipfile

import numpy as np
import pytest
import torch
import zoo_shaped

monai = pytest.importorskip("monai")
from monai.bundle import ConfigParser  # noqa: E402


def _parser(root):
    parser = ConfigParser()
    parser.read_config(str(zoo_shaped.inference_config_file(root)))
    parser["bundle_root"] = str(root)
    return parser


@pytest.mark.parametrize("kind", sorted(zoo_shaped.KINDS))
def test_every_kind_parses_builds_and_loads_its_weights(tmp_path, kind):
    root = zoo_shaped.write_bundle(tmp_path, kind)
    spec = zoo_shaped.KINDS[kind]()
    config_file = zoo_shaped.inference_config_file(root)
    assert config_file.suffix == (".yaml" if kind == "template" else ".json")
    for name in ("LICENSE", "docs/README.md", "configs/metadata.json", "large_files.yml", "models/model.pt"):
        assert (root / name).is_file(), name
    metadata = json.loads((root / "configs" / "metadata.json").read_text())
    assert "slicer" not in metadata
    for key in ("version", "name", "authors", "optional_packages_version", "network_data_format"):
        assert key in metadata
    assert set(metadata["network_data_format"]) == {"inputs", "outputs"}

    parser = _parser(root)
    for key in ("preprocessing", "postprocessing", "inferer", "network_def"):
        assert key in parser.config
    with zoo_shaped.bundle_imports(root, spec.stub_modules):
        network = parser.get_parsed_content("network_def")
        state = torch.load(root / "models" / "model.pt", weights_only=True)
        network.load_state_dict(state, strict=True)
        if kind not in ("optional_network", "detection"):
            parser.get_parsed_content("inferer")
        if kind != "optional_network":
            parser.get_parsed_content("preprocessing")
    assert 100 < sum(p.numel() for p in network.parameters()) < 20_000

    (entry,) = zoo_shaped.read_large_files(root)
    assert entry["path"] == "models/model.pt" and entry["hash_type"] == "md5"
    assert entry["hash_val"] == zoo_shaped.file_hash(root / "models" / "model.pt", "md5")
    assert "scripts" not in sys.modules


def test_scripts_networks_with_one_name_do_not_collide(tmp_path):
    first = zoo_shaped.write_bundle(tmp_path, "scripts1")
    second = zoo_shaped.write_bundle(tmp_path, "scripts2")
    assert _parser(first)["network_def"]["_target_"] == _parser(second)["network_def"]["_target_"]
    variants = []
    for root in (first, second, first):
        with zoo_shaped.bundle_imports(root):
            network = _parser(root).get_parsed_content("network_def")
            network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True), strict=True)
            variants.append(sys.modules["scripts.networks.tiny"].VARIANT)
    assert variants == [1, 2, 1]
    with pytest.raises(RuntimeError):
        network.load_state_dict(torch.load(second / "models" / "model.pt", weights_only=True), strict=True)


def test_optional_package_bundles_need_the_absent_module(tmp_path):
    for where in ("network", "transform"):
        root = zoo_shaped.write_bundle(tmp_path, zoo_shaped.optional_package(where))
        metadata = json.loads((root / "configs" / "metadata.json").read_text())
        assert zoo_shaped.ABSENT_MODULE in metadata["optional_packages_version"]
        with zoo_shaped.bundle_imports(root):
            parser = _parser(root)
            if where == "network":
                with pytest.raises(Exception, match=zoo_shaped.ABSENT_MODULE):
                    parser.get_parsed_content("network_def")
            else:
                post = parser.get_parsed_content("postprocessing")
                with pytest.raises(Exception, match=zoo_shaped.ABSENT_MODULE):
                    post.transforms[-2]({"pred": torch.zeros(1, 4, 4, 4)})
    assert zoo_shaped.ABSENT_MODULE not in sys.modules


def test_metadata_of_the_special_kinds(tmp_path):
    detection = zoo_shaped.detection_like().metadata["network_data_format"]["outputs"]["pred"]
    assert (detection["type"], detection["format"]) == ("object", "dict")
    brats = zoo_shaped.brats_like().metadata["network_data_format"]
    assert brats["inputs"]["image"]["num_channels"] == 4 and len(brats["inputs"]["image"]["channel_def"]) == 4
    assert brats["outputs"]["pred"]["channel_def"]["0"] == "Tumor core"
    slice_spec = zoo_shaped.slice_2d()
    assert slice_spec.config["network_def"]["spatial_dims"] == 2
    assert slice_spec.config["inferer"]["_target_"] == "SliceInferer"
    spleen = zoo_shaped.spleen_like(padding_mode="reflect")
    assert spleen.config["inferer"]["padding_mode"] == "reflect"
    classification = zoo_shaped.classification_like().metadata["network_data_format"]["outputs"]["pred"]
    assert classification["type"] == "probabilities"


def test_brats_like_loads_four_files_channel_first(tmp_path):
    root = zoo_shaped.write_bundle(tmp_path, "brats")
    files = []
    for index, image in enumerate(zoo_shaped.phantom_channels(4, size=(12, 10, 6))):
        import SimpleITK as sitk

        files.append(str(tmp_path / f"channel{index}.nii.gz"))
        sitk.WriteImage(image, files[-1])
    preprocessing = _parser(root).get_parsed_content("preprocessing")
    data = preprocessing({"image": files})
    assert tuple(data["image"].shape) == (4, 12, 10, 6)
    post = _parser(root).get_parsed_content("postprocessing")
    lambdad = post.transforms[2]
    labels = lambdad({"pred": torch.tensor([[[[1.0]]], [[[1.0]]], [[[0.0]]]])})["pred"]
    assert labels.flatten().tolist() == [1.0]


def test_marker_expression_writes_its_marker_only_when_built(tmp_path):
    marker = tmp_path / "marker.txt"
    root = zoo_shaped.write_bundle(tmp_path, zoo_shaped.marker_expression(marker))
    assert not marker.exists()  # writing the bundle (and its weights) runs none of its code
    assert "write_text" in _parser(root).config["network_def"]["in_channels"]
    network = _parser(root).get_parsed_content("network_def")
    assert marker.read_text() == "1"
    network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True), strict=True)


@pytest.mark.parametrize("hash_type", ["sha256", None, "wrong"])
def test_large_files_options(tmp_path, hash_type):
    root = zoo_shaped.write_bundle(tmp_path, "spleen", hash_type=hash_type, absent_ts=True)
    entries = zoo_shaped.read_large_files(root)
    assert [entry["path"] for entry in entries] == ["models/model.pt", "models/model.ts"]
    assert not (root / "models" / "model.ts").exists()
    weights = root / "models" / "model.pt"
    if hash_type == "sha256":
        assert entries[0]["hash_val"] == zoo_shaped.file_hash(weights, "sha256")
    elif hash_type is None:
        assert "hash_val" not in entries[0] and "hash_type" not in entries[0]
    else:
        assert entries[0]["hash_type"] == "md5" and entries[0]["hash_val"] != zoo_shaped.file_hash(weights)


def test_broken_variants(tmp_path):
    assert zoo_shaped.inference_config_file(zoo_shaped.write_bundle(tmp_path / "a", broken="no_inference")) is None
    unreadable = zoo_shaped.write_bundle(tmp_path / "b", broken="unreadable_config")
    with pytest.raises(json.JSONDecodeError):
        json.loads((unreadable / "configs" / "inference.json").read_text())
    not_state = zoo_shaped.write_bundle(tmp_path / "c", broken="not_state_dict")
    content = torch.load(not_state / "models" / "model.pt", weights_only=True)
    assert content == {"a": "b", "n": 3}
    assert zoo_shaped.read_large_files(not_state)[0]["hash_val"] == zoo_shaped.file_hash(not_state / "models/model.pt")


def test_release_zip_layout(tmp_path):
    archive = zoo_shaped.write_bundle(tmp_path, "scripts1", zip_release=True)
    assert archive.name == "tiny_scripts_net1_segmentation.zip"
    with zipfile.ZipFile(archive) as opened:
        names = opened.namelist()
    assert all(name.startswith("tiny_scripts_net1_segmentation/") for name in names)
    for member in ("configs/inference.json", "configs/metadata.json", "models/model.pt", "large_files.yml",
                   "LICENSE", "docs/README.md", "scripts/networks/tiny.py", "scripts/"):
        assert f"tiny_scripts_net1_segmentation/{member}" in names
    assert not any("__pycache__" in name for name in names)


def test_phantom_grid():
    image = zoo_shaped.phantom_image()
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    assert np.allclose(direction @ direction.T, np.eye(3))
    assert not np.allclose(np.abs(direction), np.eye(3))  # oblique
    assert len(set(image.GetSpacing())) == 3  # anisotropic
    import SimpleITK as sitk

    values = sitk.GetArrayViewFromImage(image)
    assert values.min() < -900 and values.max() > 120
    mr = zoo_shaped.phantom_image(modality="MR", size=(20, 18, 5))
    assert mr.GetSize() == (20, 18, 5) and sitk.GetArrayViewFromImage(mr).min() >= 0
