"""The MONAI bundle runtime (engine/bundles.py) on zoo-shaped bundles (Testing/Python/zoo_shaped.py: the zoo's
formats, tiny networks, random weights from each bundle's own network_def), issue 18.

What a zoo bundle declares must run as MONAI's own pipeline would, on oblique, anisotropic, flipped grids with the
output exactly on the input grid: the sliding window with its padding mode, the whole-image SimpleInferer, a 2-D
SliceInferer, YAML configs, several input files stacked as channels, the bundle's scripts/ for that bundle only.
Where MONAI's own pipeline is compared, it runs in-process (its LoadImaged reading NIfTI files, the bundle's inferer
and postprocessing) and at least 99.8 % of the voxels must agree. What cannot run is refused before any work, and
every failure is one sentence naming its root cause (MissingPackages with pip specs for missing packages)."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import zoo_shaped

from MIADeepLearningLib.engine import bundles, registry, tasks
from MIADeepLearningLib.engine.errors import InputError, ModelError

monai = pytest.importorskip("monai")

AGREEMENT = 0.998


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and "Traceback" not in message


def _model(folder: Path) -> registry.ModelInfo:
    metadata = json.loads((folder / "configs" / "metadata.json").read_text())
    return registry.ModelInfo(id=folder.name, package_dir=folder, metadata=metadata)


def _weights(folder: Path) -> dict[str, Path]:
    return {"model": folder / "models" / "model.pt"}


def _bundle(tmp_path: Path, kind: str | zoo_shaped.BundleSpec) -> tuple[registry.ModelInfo, dict[str, Path]]:
    folder = zoo_shaped.write_bundle(tmp_path, kind)
    return _model(folder), _weights(folder)


def _assert_on_grid(output: sitk.Image, reference: sitk.Image) -> None:
    assert output.GetSize() == reference.GetSize()
    np.testing.assert_allclose(output.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(output.GetSpacing(), reference.GetSpacing(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(output.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-9)


def _monai_labels(model: registry.ModelInfo, files: list[Path]) -> np.ndarray:
    """MONAI's own pipeline in-process: the bundle's LoadImaged on NIfTI files, its inferer, its postprocessing
    without writers; (X, Y, Z) labels indexed like ITK."""
    from monai.bundle import ConfigParser

    folder = model.package_dir
    parser = ConfigParser()
    parser.read_config(str(zoo_shaped.inference_config_file(folder)))
    parser["bundle_root"] = str(folder)
    parser["device"] = torch.device("cpu")
    post = parser["postprocessing"]
    post["transforms"] = [item for item in post["transforms"] if item["_target_"] != "SaveImaged"]
    with zoo_shaped.bundle_imports(folder):
        preprocessing = parser.get_parsed_content("preprocessing")
        network = parser.get_parsed_content("network_def")
        network.load_state_dict(torch.load(str(folder / "models" / "model.pt"), weights_only=True))
        inferer = parser.get_parsed_content("inferer")
        postprocessing = parser.get_parsed_content("postprocessing")
        data = preprocessing({"image": [str(f) for f in files] if len(files) > 1 else str(files[0])})
        with torch.no_grad():
            data["pred"] = inferer(data["image"][None], network.eval())[0]
        data = postprocessing(data)
    return bundles._labels(data["pred"])


def _agreement(ours: sitk.Image, theirs: np.ndarray) -> float:
    return float(np.mean(bundles.ijk_array(ours) == theirs))


def _nifti(images: list[sitk.Image], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        paths.append(folder / f"channel{index}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    return paths


def _read_back(paths: list[Path]) -> list[sitk.Image]:
    """The NIfTI files as SimpleITK reads them (the same float32 header MONAI's reader sees)."""
    return [sitk.ReadImage(str(path)) for path in paths]


# ------------------------------------------------------------------------------------------- check_bundle


def test_check_bundle_builds_everything_and_names_segments_from_the_probe(tmp_path):
    model, weights = _bundle(tmp_path, "brats")
    info = bundles.check_bundle(model, weights)
    assert set(info) == {"segments", "input_channels", "kind", "notes"}
    assert info["kind"] == "segmentation"
    assert info["input_channels"] == ["T1c", "T1", "T2", "FLAIR"]
    # channel_def names CHANNELS: the bundle's Lambdad writes channel 0 -> 1, 1 -> 2, 2 -> 4
    assert [(s["value"], s["name"]) for s in info["segments"]] == [
        (1, "Tumor core"), (2, "Whole tumor"), (4, "Enhancing tumor")]
    assert all(len(s["color"]) == 3 for s in info["segments"])


def test_check_bundle_refuses_weights_that_do_not_fit(tmp_path):
    model, weights = _bundle(tmp_path, "spleen")
    state = torch.load(str(weights["model"]), weights_only=True)
    state.pop(next(iter(state)))
    torch.save(state, weights["model"])
    with pytest.raises(ModelError) as caught:
        bundles.check_bundle(model, weights)
    assert _one_sentence(str(caught.value)) and "does not fit" in str(caught.value)


@pytest.mark.parametrize("where", ["network", "transform"])
def test_missing_package_is_named_with_its_pip_spec(tmp_path, where):
    model, weights = _bundle(tmp_path, zoo_shaped.optional_package(where))
    with pytest.raises(bundles.MissingPackages) as caught:
        bundles.check_bundle(model, weights)
    spec = f"{zoo_shaped.ABSENT_MODULE}>=1.0.0"  # the version the bundle's optional_packages_version lists
    assert caught.value.requirements == [spec]
    assert f"pip install {spec}" in str(caught.value) and _one_sentence(str(caught.value))
    assert "scripts" not in sys.modules


def test_module_names_map_to_pip_names_and_listed_versions():
    metadata = {"optional_packages_version": {"scikit-image": "0.19.2", "einops": "0.7.0"}}
    assert bundles._requirement("skimage", metadata) == "scikit-image>=0.19.2"
    assert bundles._requirement("einops", metadata) == "einops>=0.7.0"
    assert bundles._requirement("itk", metadata) == "itk"
    error = RuntimeError("applying transform KeepLargestConnectedComponentd")
    error.__cause__ = RuntimeError("Skimage.measure required.")
    assert bundles._missing_module(error) == "skimage"


def test_the_root_cause_replaces_monai_wrappers(tmp_path):
    spec = zoo_shaped.spleen_like("tiny_root_cause")
    spec.weights_network_def = copy.deepcopy(spec.config["network_def"])
    spec.config["network_def"]["in_channels"] = "$int({'a': 1}['missing_key'])"
    model, weights = _bundle(tmp_path, spec)
    with pytest.raises(ModelError) as caught:
        bundles.check_bundle(model, weights)
    message = str(caught.value)
    assert "KeyError" in message and "missing_key" in message, message
    assert "Failed to evaluate" not in message and _one_sentence(message)


# ----------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kind, words", [("detection", "detection bundle"), ("classification", "classification")])
def test_unsupported_kinds_are_refused_before_any_work(tmp_path, kind, words):
    model, weights = _bundle(tmp_path, kind)
    weights["model"].write_bytes(b"not even a checkpoint: nothing may be read before the refusal")
    with pytest.raises(ModelError) as caught:
        bundles.MonaiBundle(model, weights, torch.device("cpu"))
    assert words in str(caught.value) and _one_sentence(str(caught.value))


def test_an_inferer_we_cannot_run_is_refused(tmp_path):
    spec = zoo_shaped.spleen_like("tiny_other_inferer")
    model, weights = _bundle(tmp_path, spec)
    config_file = model.package_dir / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    config["inferer"] = {"_target_": "SaliencyInferer", "cam_name": "GradCAM", "target_layers": "model"}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelError) as caught:
        bundles.check_bundle(model, weights)
    assert "SaliencyInferer" in str(caught.value) and _one_sentence(str(caught.value))


# -------------------------------------------------------------------------------------- runs vs MONAI


def test_sliding_window_with_replicate_padding_matches_monai_on_an_oblique_grid(tmp_path):
    model, weights = _bundle(tmp_path, "spleen")  # roi 32³, padding_mode replicate, Spacingd + crop + Invertd
    [path] = _nifti([zoo_shaped.phantom_image(size=(30, 26, 10))], tmp_path / "ct")
    [image] = _read_back([path])
    bundle = bundles.MonaiBundle(model, weights, torch.device("cpu"))
    assert bundle.window["padding_mode"] == "replicate"
    result = bundle.predict(image)
    _assert_on_grid(result["label"], image)
    assert _agreement(result["label"], _monai_labels(model, [path])) >= AGREEMENT


def test_yaml_template_runs_whole_image_and_matches_monai(tmp_path):
    model, weights = _bundle(tmp_path, "template")  # inference.yaml, SimpleInferer, preprocessing "$@transforms"
    assert not (model.package_dir / "configs" / "inference.json").exists()
    [path] = _nifti([zoo_shaped.phantom_image(size=(36, 28, 16), modality="MR")], tmp_path / "mr")
    [image] = _read_back([path])
    result = bundles.MonaiBundle(model, weights, torch.device("cpu")).predict(image)
    _assert_on_grid(result["label"], image)
    assert result["provenance"]["inferer"] == "SimpleInferer"
    assert result["provenance"]["inference"]["windows_total"] == 1
    assert _agreement(result["label"], _monai_labels(model, [path])) >= AGREEMENT


def test_a_whole_image_network_on_sizes_it_cannot_halve_says_the_multiple(tmp_path):
    model, weights = _bundle(tmp_path, "template")  # two stride-2 levels: sizes must be multiples of 4
    image = zoo_shaped.phantom_image(size=(37, 30, 15), modality="MR")
    with pytest.raises(ModelError) as caught:
        bundles.MonaiBundle(model, weights, torch.device("cpu")).predict(image)
    message = str(caught.value)
    assert "multiple of 4" in message and "37×30×15" in message and _one_sentence(message), message


def test_four_files_stack_as_channels_like_monai_and_values_follow_the_bundle(tmp_path):
    model, weights = _bundle(tmp_path, "brats")
    paths = _nifti(zoo_shaped.phantom_channels(4, size=(34, 30, 12)), tmp_path / "brats")
    images = _read_back(paths)
    bundle = bundles.MonaiBundle(model, weights, torch.device("cpu"))
    result = bundle.predict(images)
    _assert_on_grid(result["label"], images[0])
    assert _agreement(result["label"], _monai_labels(model, paths)) >= AGREEMENT
    values = set(np.unique(sitk.GetArrayFromImage(result["label"])).tolist())
    assert values <= {0, 1, 2, 4}
    assert {s["value"] for s in result["segments"]} >= values - {0}
    # one multi-component volume stands for the same list of files
    vector = bundle.predict(sitk.Compose([sitk.Cast(i, sitk.sitkFloat32) for i in images]))
    assert np.array_equal(sitk.GetArrayFromImage(vector["label"]), sitk.GetArrayFromImage(result["label"]))
    with pytest.raises(InputError) as caught:
        bundle.predict(images[:3])
    assert "T1c, T1, T2, FLAIR" in str(caught.value) and _one_sentence(str(caught.value))


def test_slice_inferer_runs_a_2d_network_slice_by_slice_like_monai(tmp_path):
    model, weights = _bundle(tmp_path, "slice2d")
    [path] = _nifti([zoo_shaped.phantom_image(size=(32, 30, 6), modality="MR")], tmp_path / "sax")
    [image] = _read_back([path])
    bundle = bundles.MonaiBundle(model, weights, torch.device("cpu"))
    assert bundle.kind == "segmentation-2d" and bundle.slices_2d
    result = bundle.predict(image)
    _assert_on_grid(result["label"], image)
    assert result["provenance"]["inferer"] == "SliceInferer"
    assert _agreement(result["label"], _monai_labels(model, [path])) >= AGREEMENT


# ------------------------------------------------------------------------------------------- scripts/


def test_each_bundle_sees_only_its_own_scripts(tmp_path):
    first_model, first_weights = _bundle(tmp_path, "scripts1")
    second_model, second_weights = _bundle(tmp_path, "scripts2")
    path_before = list(sys.path)
    first = bundles.MonaiBundle(first_model, first_weights, torch.device("cpu"))
    second = bundles.MonaiBundle(second_model, second_weights, torch.device("cpu"))
    # the same dotted name scripts.networks.tiny.TinyNet, two different classes (their modules' VARIANT)
    assert type(first.network).forward.__globals__["VARIANT"] == 1
    assert type(second.network).forward.__globals__["VARIANT"] == 2
    assert sys.path == path_before and not any(n == "scripts" or n.startswith("scripts.") for n in sys.modules)
    image = zoo_shaped.phantom_image(size=(20, 18, 8))
    for bundle in (first, second):  # built networks keep working after their bundle's scripts were unloaded
        _assert_on_grid(bundle.predict(image)["label"], image)


# ---------------------------------------------------------------------------------------- shims, options


def test_torch_load_in_a_config_is_weights_only_with_numpy_and_on_the_cpu(tmp_path):
    spec = zoo_shaped.spleen_like("tiny_search_code")
    spec.config["arch_ckpt"] = ("$torch.load(@bundle_root + '/models/search_code.pt', "
                                "map_location=torch.device('cuda'))")
    spec.weights_network_def = copy.deepcopy(spec.config["network_def"])
    spec.config["network_def"]["channels"] = "$[int(c) for c in @arch_ckpt['channels']]"
    folder = zoo_shaped.write_bundle(tmp_path, spec)
    torch.save({"channels": np.array([4, 8]), "code": np.zeros((2, 3), dtype=np.float32)},
               folder / "models" / "search_code.pt")
    info = bundles.check_bundle(_model(folder), _weights(folder))
    assert any("weights_only=True" in note for note in info["notes"])

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (tmp_path / "pwned", "1"))

    buffer = io.BytesIO()
    torch.save({"channels": Evil()}, buffer)
    (folder / "models" / "search_code.pt").write_bytes(buffer.getvalue())
    with pytest.raises(ModelError) as caught:
        bundles.check_bundle(_model(folder), _weights(folder))
    assert not (tmp_path / "pwned").exists() and _one_sentence(str(caught.value))


def test_network_keywords_removed_from_monai_are_dropped_with_a_note():
    notes: list[str] = []
    config = {"network_def": {"_target_": "SwinUNETR", "img_size": [96, 96, 96], "in_channels": 1,
                              "out_channels": 14, "feature_size": 48}}
    shimmed = bundles._compatibility_shims(config, notes)
    assert "img_size" not in shimmed["network_def"] and shimmed["network_def"]["feature_size"] == 48
    assert len(notes) == 1 and "img_size" in notes[0]


def test_overrides_and_a_weights_file_by_name_are_applied_and_recorded(tmp_path):
    model, weights = _bundle(tmp_path, "spleen")
    other = weights["model"].parent / "model_lowres.pt"
    other.write_bytes(weights["model"].read_bytes())
    weights["lowres"] = other
    options = {"overrides": {"inferer#overlap": 0.125, "network_def::num_res_units": 1},
               "weights": "model_lowres.pt"}
    bundle = bundles.MonaiBundle(model, weights, torch.device("cpu"), options)
    image = zoo_shaped.phantom_image(size=(20, 18, 8))
    details = bundle.predict(image)["provenance"]
    assert details["weights_file"] == "model_lowres.pt" and details["window"]["overlap"] == 0.125
    assert details["config_overrides"] == options["overrides"]
    with pytest.raises(ModelError) as caught:
        bundles.MonaiBundle(model, weights, torch.device("cpu"), {"overrides": {"no_such#key": 1}})
    assert "no_such#key" in str(caught.value) and _one_sentence(str(caught.value))
    with pytest.raises(ModelError) as caught:
        bundles.MonaiBundle(model, weights, torch.device("cpu"), {"weights": "model_missing.pt"})
    assert "model_lowres.pt" in str(caught.value)


def test_loader_is_replaced_before_it_is_built(tmp_path):
    """A LoadImaged with reader ITKReader (itk is not installed here) never gets instantiated."""
    model, weights = _bundle(tmp_path, "spleen")
    config_file = model.package_dir / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    config["preprocessing"]["transforms"][0]["reader"] = "ITKReader"
    config_file.write_text(json.dumps(config))
    image = zoo_shaped.phantom_image(size=(20, 18, 8))
    _assert_on_grid(bundles.MonaiBundle(model, weights, torch.device("cpu")).predict(image)["label"], image)


def test_package_segments_override_by_value_and_unnamed_values_get_a_segment():
    metadata = {"network_data_format": {"outputs": {"pred": {"channel_def": {"0": "bg", "1": "a", "2": "b"}}}},
                "slicer": {"segments": [{"value": 4, "name": "given", "color": [1, 2, 3], "terminology": "t"}]}}
    segments = bundles.segments_from_channels(metadata, [0, 1, 4])
    assert [(s["value"], s["name"], s["terminology"]) for s in segments] == [(1, "a", ""), (4, "given", "t")]
    completed = bundles.complete_segments(segments, [0, 1, 3, 4])
    assert [(s["value"], s["name"]) for s in completed] == [(1, "a"), (3, "Label 3"), (4, "given")]


# ------------------------------------------------------------------------------------- tasks, worker, CLI


def _registered(tmp_path: Path, kind: str, monkeypatch) -> registry.ModelInfo:
    """The bundle under $MIADL_EXTRA_MODELS_DIRS with the slicer section a package carries (sha256 of its weights)."""
    root = tmp_path / "site"
    folder = zoo_shaped.write_bundle(root, kind)
    metadata_file = folder / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    weight = folder / "models" / "model.pt"
    metadata["slicer"] = {"title": metadata["name"], "task": "segmentation", "pipeline": bundles.PIPELINE_NAME,
                          "files": [{"role": "model", "path": "models/model.pt", "format": "state_dict",
                                     "sha256": hashlib.sha256(weight.read_bytes()).hexdigest(),
                                     "size": weight.stat().st_size, "source": {"type": "package"}}]}
    metadata_file.write_text(json.dumps(metadata))
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(root))
    return registry.get_model(folder.name)


def test_segment_image_takes_extra_channel_files_on_one_grid(tmp_path, monkeypatch):
    model = _registered(tmp_path, "brats", monkeypatch)
    channels = zoo_shaped.phantom_channels(4, size=(30, 28, 10))
    paths = []
    for index, image in enumerate(channels):
        paths.append(tmp_path / f"c{index}.nrrd")
        sitk.WriteImage(image, str(paths[-1]))
    output = tasks.segment_image(paths[0], model.id, device="cpu", extra_image_paths=paths[1:])
    _assert_on_grid(output.label, channels[0])
    assert [s["name"] for s in output.segments][:3] == ["Tumor core", "Whole tumor", "Enhancing tumor"]
    assert output.provenance["pipeline"]["input_channels"] == ["T1c", "T1", "T2", "FLAIR"]
    moved = sitk.Image(channels[3])
    moved.SetOrigin([o + 1.0 for o in moved.GetOrigin()])
    sitk.WriteImage(moved, str(tmp_path / "moved.nrrd"))
    with pytest.raises(InputError) as caught:
        tasks.segment_image(paths[0], model.id, device="cpu", extra_image_paths=[*paths[1:3], tmp_path / "moved.nrrd"])
    assert "not on the grid" in str(caught.value) and _one_sentence(str(caught.value))
    with pytest.raises(InputError) as caught:
        tasks.segment_image(paths[0], model.id, device="cpu", extra_image_paths=paths[1:3])
    assert "T1c, T1, T2, FLAIR" in str(caught.value)


def test_cli_segment_with_extra_inputs_config_and_weights(tmp_path, monkeypatch):
    from MIADeepLearningLib import cli

    model = _registered(tmp_path, "brats", monkeypatch)
    paths = []
    for index, image in enumerate(zoo_shaped.phantom_channels(4, size=(24, 22, 8))):
        paths.append(tmp_path / f"c{index}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    output, provenance = tmp_path / "label.nrrd", tmp_path / "provenance.json"
    argv = ["segment", "--model", model.id, "-i", str(paths[0]), "-o", str(output), "--device", "cpu", "-q",
            "--provenance", str(provenance), "--config", "inferer#overlap=0.25", "--weights", "model.pt"]
    for path in paths[1:]:
        argv += ["--extra-input", str(path)]
    assert cli.main(argv) == 0
    record = json.loads(provenance.read_text())
    assert record["pipeline"]["config_overrides"] == {"inferer#overlap": 0.25}
    assert record["pipeline"]["weights_file"] == "model.pt"
    _assert_on_grid(sitk.ReadImage(str(output)), sitk.ReadImage(str(paths[0])))
