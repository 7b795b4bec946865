"""Small bundles in the MONAI Model Zoo's formats, for the tests and the Slicer self-test of importing and running
zoo bundles (issue 18).

Why here, in the library: the DLSegmentation self-test (testing/scenarios.py) imports such a bundle inside Slicer,
where Testing/Python is not installed. Real zoo bundles cannot be downloaded in CI and the tests must not read the
zoo's own files, so the configs are written by the project in the zoo's layout (configs/inference.json or
inference.yaml, configs/metadata.json with network_data_format, large_files.yml, docs/README.md, LICENSE), with tiny
networks and random weights built from each bundle's own ``network_def`` with ``monai.bundle.ConfigParser``.
Testing/Python/zoo_shaped.py adds the other kinds (BraTS-like, scripts, optional packages, 2-D, detection, ...).

Importing this file pulls only the standard library and numpy: torch, MONAI, SimpleITK and PyYAML are imported
inside the functions that need them, so the scenario (in Slicer's process, which never loads torch) builds bundles
by running this file in the worker's Python: ``python -m MIADeepLearningLib.testing.zoo_shaped spleen <folder>
--zip`` prints the path written.

Entry points:
* ``write_bundle(parent, kind_or_spec, ...)`` writes one bundle folder (and, with ``zip_release=True``, a zip laid
  out as ``<bundle>/...`` like a zoo release) and returns its path. Kinds here: ``KINDS`` (spleen).
* ``random_state_dict(config_file, bundle_root)`` builds random weights from any bundle's network_def.
* ``phantom_voxels`` / ``phantom_ijk_to_ras`` (numpy: for a volume node) and ``phantom_image`` /
  ``phantom_channels`` / ``write_phantom`` (SimpleITK): oblique, anisotropic, flipped volumes with a bright blob,
  CT-like or MR-like.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import sys
import types
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
              "meta_schema_20220324.json")
FAKE_URL = "https://example.invalid/model-zoo/{name}/{file}"  # never fetched: the weights ship in the package
BROKEN_KINDS = ("no_inference", "unreadable_config", "not_state_dict")
HASH_TYPES = ("md5", "sha256", None, "wrong")


@dataclass
class BundleSpec:
    """What one zoo-shaped bundle holds before it is written (configs as dicts, scripts as source text)."""

    name: str
    config: dict[str, Any]
    metadata: dict[str, Any]
    config_format: str = "json"  # "json" or "yaml" (configs/inference.<format>)
    scripts: dict[str, str] = field(default_factory=dict)  # path under the bundle root -> Python source
    # network_def used to build the weights when the config's own one must not run here (the marker bundle)
    weights_network_def: dict[str, Any] | None = None
    stub_modules: tuple[str, ...] = ()  # modules faked while the weights are built (absent optional packages)
    readme: str = ""


# ------------------------------------------------------------------------------------------------ metadata


def zoo_metadata(name: str, title: str, inputs: dict[str, Any], outputs: dict[str, Any], *, version: str = "0.1.0",
                 task: str = "", optional_packages: dict[str, str] | None = None) -> dict[str, Any]:
    """configs/metadata.json with the fields a zoo bundle carries (no `slicer` section: zoo bundles have none)."""
    packages = {"nibabel": "5.2.1", "pytorch-ignite": "0.4.11"}
    packages.update(optional_packages or {})
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: "tiny test bundle written by the MIADeepLearning tests", "0.0.1": "first version"},
        "monai_version": "1.4.0",
        "pytorch_version": "2.4.0",
        "numpy_version": "1.24.4",
        "optional_packages_version": packages,
        "name": title,
        "task": task or f"{title} (test bundle {name})",
        "description": f"A randomly initialised tiny network in the layout of a MONAI Model Zoo bundle ({name}).",
        "authors": "MIADeepLearning tests",
        "copyright": "Copyright (c) MIADeepLearning contributors",
        "data_source": "none: random weights",
        "data_type": "nibabel",
        "image_classes": "see network_data_format",
        "label_classes": "see network_data_format",
        "pred_classes": "see network_data_format",
        "eval_metrics": {"mean_dice": 0.0},
        "intended_use": "Tests only, not for any use on patients",
        "references": ["None: written for the MIADeepLearning test suite."],
        "network_data_format": {"inputs": inputs, "outputs": outputs},
    }


def image_input(modality: str, channels: int = 1, spatial_shape: list[Any] | None = None,
                channel_def: dict[str, str] | None = None, fmt: str | None = None) -> dict[str, Any]:
    """network_data_format.inputs.image as the zoo writes it."""
    item = {"type": "image", "format": fmt or ("hounsfield" if modality == "CT" else "magnitude"),
            "modality": modality, "num_channels": channels, "spatial_shape": spatial_shape or [32, 32, 32],
            "dtype": "float32", "value_range": [0, 1], "is_patch_data": True}
    item["channel_def"] = channel_def or {"0": "image"}
    return {"image": item}


def label_output(channel_def: dict[str, str], spatial_shape: list[Any] | None = None) -> dict[str, Any]:
    """network_data_format.outputs.pred of a segmentation bundle (one channel per class, before argmax)."""
    return {"pred": {"type": "image", "format": "segmentation", "num_channels": len(channel_def),
                     "spatial_shape": spatial_shape or [32, 32, 32], "dtype": "float32", "value_range": [0, 1],
                     "is_patch_data": True, "channel_def": dict(channel_def)}}


# ------------------------------------------------------------------------------------------------ config parts


def config_header(image_key: str = "image") -> dict[str, Any]:
    """The first keys most zoo inference configs share (paths, output settings, device)."""
    return {
        "imports": ["$import glob", "$import numpy", "$import os"],
        "bundle_root": ".",
        "image_key": image_key,
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.float32",
        "output_postfix": "seg",
        "separate_folder": True,
        "load_pretrain": True,
        "dataset_dir": "/workspace/data/test_images",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii*')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    }


def config_tail(postprocessing: list[dict[str, Any]], inferer: dict[str, Any],
          data: str = "$[{'image': i} for i in @datalist]", amp: bool = False) -> dict[str, Any]:
    """dataset, dataloader, inferer, postprocessing, evaluator, checkpoint loader and run keys."""
    return {
        "dataset": {"_target_": "Dataset", "data": data, "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": amp},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}},
        "initialize": ["$monai.utils.set_determinism(seed=0)",
                       "$@checkpointloader(@evaluator) if @load_pretrain else None"],
        "run": ["$@evaluator.run()"],
    }


def saver(key: str = "pred") -> dict[str, Any]:
    return {"_target_": "SaveImaged", "keys": key, "output_dir": "@output_dir", "output_ext": "@output_ext",
            "output_dtype": "@output_dtype", "output_postfix": "@output_postfix",
            "separate_folder": "@separate_folder"}


def invert(nearest: bool = False) -> dict[str, Any]:
    return {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
            "nearest_interp": nearest, "to_tensor": True}


def unet(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, channels: tuple[int, ...] = (4, 8),
          strides: tuple[int, ...] = (2,)) -> dict[str, Any]:
    return {"_target_": "UNet", "spatial_dims": spatial_dims, "in_channels": in_channels,
            "out_channels": out_channels, "channels": list(channels), "strides": list(strides),
            "num_res_units": 1, "norm": "batch"}


# ------------------------------------------------------------------------------------------------ the kinds


def spleen_like(name: str = "tiny_spleen_ct_segmentation", padding_mode: str = "replicate",
                blend_mode: str = "constant", version: str = "0.1.0") -> BundleSpec:
    """Like spleen_ct_segmentation: a 3-D UNet on CT, RAS + resampling + HU window + foreground crop, a sliding
    window with a padding mode, softmax, inversion, argmax."""
    config = config_header()
    config["network_def"] = unet()
    config["network"] = "$@network_def.to(@device)"
    config["preprocessing"] = {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [2.0, 2.0, 2.5], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -60, "a_max": 160, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "CropForegroundd", "keys": "@image_key", "source_key": "@image_key", "margin": 2,
         "allow_smaller": True},
        {"_target_": "EnsureTyped", "keys": "@image_key"},
    ]}
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 1, "overlap": 0.25,
               "mode": blend_mode, "padding_mode": padding_mode}
    post = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}, invert(),
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}, saver()]
    config.update(config_tail(post, inferer))
    metadata = zoo_metadata(name, "Tiny spleen CT segmentation", image_input("CT"),
                            label_output({"0": "background", "1": "spleen"}), version=version,
                            task="Spleen segmentation (test)")
    return BundleSpec(name, config, metadata)


KINDS = {"spleen": spleen_like}
"""The kinds this file writes by name; Testing/Python/zoo_shaped.py adds the others."""


# ------------------------------------------------------------------------------------------------ weights


@contextlib.contextmanager
def bundle_imports(bundle_root: Path, stub_modules: tuple[str, ...] = ()) -> Iterator[None]:
    """The bundle root on sys.path with no earlier bundle's `scripts` package loaded (and some modules faked),
    undone afterwards, so bundles that each ship a different `scripts` never see each other's."""
    def drop_scripts() -> None:
        for module in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[module]

    drop_scripts()
    sys.path.insert(0, str(bundle_root))
    faked = [m for m in stub_modules if m not in sys.modules]
    for module in faked:
        sys.modules[module] = types.ModuleType(module)
    try:
        yield
    finally:
        for module in faked:
            sys.modules.pop(module, None)
        with contextlib.suppress(ValueError):
            sys.path.remove(str(bundle_root))
        drop_scripts()


def inference_config_file(bundle_root: Path) -> Path | None:
    """configs/inference.json, .yaml or .yml, whichever the bundle has (None: none)."""
    for suffix in (".json", ".yaml", ".yml"):
        candidate = Path(bundle_root) / "configs" / f"inference{suffix}"
        if candidate.is_file():
            return candidate
    return None


def build_network(config_file: Path, bundle_root: Path, network_def: dict[str, Any] | None = None,
                  stub_modules: tuple[str, ...] = (), seed: int = 0) -> Any:
    """The bundle's network_def (a torch module) built by monai.bundle.ConfigParser, randomly initialised with
    `seed`, on CPU."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(bundle_root)
    if network_def is not None:
        parser["network_def"] = copy.deepcopy(network_def)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with bundle_imports(Path(bundle_root), stub_modules), torch.random.fork_rng():
            torch.manual_seed(seed)
            return parser.get_parsed_content("network_def", instantiate=True)
    finally:
        torch.set_num_threads(threads)


def random_state_dict(config_file: Path, bundle_root: Path, network_def: dict[str, Any] | None = None,
                      stub_modules: tuple[str, ...] = (), seed: int = 0) -> dict[str, Any]:
    """Random weights for any bundle (ours or a real zoo one): the state dict of its own network_def."""
    network = build_network(config_file, bundle_root, network_def, stub_modules, seed)
    return {key: value.detach().clone() for key, value in network.state_dict().items()}


def file_hash(path: Path, hash_type: str = "md5") -> str:
    digest = hashlib.new(hash_type)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def large_files_yaml(entries: list[dict[str, str]]) -> str:
    """large_files.yml in the zoo's layout (quoted strings, one block per file)."""
    lines = ["large_files:"]
    for entry in entries:
        lines.append(f'- path: "{entry["path"]}"')
        for key in ("url", "hash_val", "hash_type"):
            if key in entry:
                lines.append(f'  {key}: "{entry[key]}"')
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ writing


def _dump_config(config: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(config, indent=4) + "\n"
    import yaml

    return ("# Inference workflow of a tiny test bundle (written by the MIADeepLearning tests).\n"
            + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=120))


def write_bundle(parent: Path | str, kind: str | BundleSpec = "spleen", *, name: str | None = None,
                 hash_type: str | None = "md5", absent_ts: bool = False, broken: str | None = None,
                 zip_release: bool = False, seed: int = 0) -> Path:
    """Write one zoo-shaped bundle folder under `parent` (and zip it when `zip_release`); returns the folder or the
    zip. `kind` is a key of KINDS or a BundleSpec. `hash_type`: md5 (the zoo's usual), sha256, None (no hash in
    large_files.yml) or "wrong" (an md5 that does not match). `absent_ts`: large_files.yml also lists a
    models/model.ts that is not in the package (as in the zoo's spleen bundle). `broken`: one of BROKEN_KINDS."""
    import torch

    if hash_type not in HASH_TYPES:
        raise ValueError(f"hash_type must be one of {HASH_TYPES}, not {hash_type!r}")
    if broken is not None and broken not in BROKEN_KINDS:
        raise ValueError(f"broken must be one of {BROKEN_KINDS}, not {broken!r}")
    spec = kind if isinstance(kind, BundleSpec) else KINDS[kind]()
    if name:
        spec.name = name
    root = Path(parent) / spec.name
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "docs").mkdir(exist_ok=True)
    (root / "LICENSE").write_text("Copyright (c) MIADeepLearning contributors. Licensed under the Apache License, "
                                  "Version 2.0 (test bundle).\n")
    title = spec.metadata.get("name", spec.name)
    (root / "docs" / "README.md").write_text(
        spec.readme or f"# {title}\n\nA tiny bundle with random weights, written by the MIADeepLearning tests in the "
                       f"layout of a MONAI Model Zoo bundle. It segments nothing meaningful.\n")
    (root / "configs" / "metadata.json").write_text(json.dumps(spec.metadata, indent=4) + "\n")
    for relative, source in spec.scripts.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(source)
    config_file = root / "configs" / f"inference.{spec.config_format}"
    config_file.write_text(_dump_config(spec.config, spec.config_format))

    weights = root / "models" / "model.pt"
    if broken == "not_state_dict":
        torch.save({"a": "b", "n": 3}, weights)
    else:
        torch.save(random_state_dict(config_file, root, spec.weights_network_def, spec.stub_modules, seed), weights)
    if broken == "no_inference":
        config_file.unlink()
    elif broken == "unreadable_config":
        config_file.write_text('{"imports": ["$import glob",\n  "network_def": {\n' if spec.config_format == "json"
                               else "network_def:\n  _target_: UNet\n    in_channels: [1\n")

    entry = {"path": "models/model.pt", "url": FAKE_URL.format(name=spec.name, file="model.pt")}
    if hash_type == "md5" or hash_type == "sha256":
        entry.update(hash_val=file_hash(weights, hash_type), hash_type=hash_type)
    elif hash_type == "wrong":
        entry.update(hash_val="0" * 32, hash_type="md5")
    entries = [entry]
    if absent_ts:
        entries.append({"path": "models/model.ts", "url": FAKE_URL.format(name=spec.name, file="model.ts"),
                        "hash_val": "1" * 32, "hash_type": "md5"})
    (root / "large_files.yml").write_text(large_files_yaml(entries))
    return zip_folder(root) if zip_release else root


def zip_folder(root: Path, destination: Path | None = None) -> Path:
    """Zip a bundle folder as a zoo release is laid out: every member under `<bundle>/`, folders listed too."""
    root = Path(root)
    destination = Path(destination) if destination else root.parent / f"{root.name}.zip"
    with zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            if "__pycache__" in path.parts:
                continue
            arcname = f"{root.name}/{path.relative_to(root).as_posix()}"
            archive.write(path, arcname + "/" if path.is_dir() else arcname)
    return destination


def read_large_files(root: Path) -> list[dict[str, str]]:
    """large_files.yml of a bundle folder as a list of dicts."""
    import yaml

    return list((yaml.safe_load((Path(root) / "large_files.yml").read_text()) or {}).get("large_files", []))


# ------------------------------------------------------------------------------------------------ phantoms


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation about coordinate axis 0, 1 or 2, for oblique test grids (also Testing/Python/helpers.py's)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[j, j], matrix[i, j], matrix[j, i] = c, c, -s, s
    return matrix


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),
    "oblique": rotation(0, 20.0) @ rotation(1, -15.0) @ rotation(2, 10.0),
    "oblique-flipped": rotation(0, 20.0) @ rotation(1, -15.0) @ rotation(2, 10.0) @ np.diag([-1.0, 1.0, -1.0]),
}


PHANTOM_SIZE = (40, 36, 18)
PHANTOM_SPACING = (1.3, 1.1, 3.0)
PHANTOM_ORIGIN = (-21.0, 13.5, -30.0)


def phantom_voxels(size: tuple[int, int, int] = PHANTOM_SIZE, modality: str = "CT", seed: int = 0,
                   contrast: float = 1.0) -> np.ndarray:
    """The phantom's voxels as a (z, y, x) float32 array: a body ellipsoid with a bright off-centre blob and a little
    noise. CT-like: HU (air -1000, body 40, blob 40 + 110*contrast); MR-like: 0, 300, 300 + 500*contrast."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in reversed(size)], indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.8) ** 2 + (z / 0.9) ** 2 < 1.0
    blob = ((x - 0.3) / 0.3) ** 2 + ((y + 0.15) / 0.28) ** 2 + (z / 0.45) ** 2 < 1.0
    if modality.upper() == "CT":
        values = np.where(body, 40.0, -1000.0) + np.where(blob, 110.0 * contrast, 0.0) + rng.normal(0, 5, x.shape)
    else:
        values = np.where(body, 300.0, 0.0) + np.where(blob, 500.0 * contrast, 0.0)
        values = np.abs(values + rng.normal(0, 10, x.shape))
    return values.astype(np.float32)


def phantom_ijk_to_ras(spacing: tuple[float, float, float] = PHANTOM_SPACING, direction: str = "oblique-flipped",
                       origin: tuple[float, float, float] = PHANTOM_ORIGIN) -> np.ndarray:
    """The 4x4 IJK->RAS matrix of the phantom's grid (what a Slicer volume node takes; the SimpleITK image of
    phantom_image has the same grid in LPS)."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    matrix = np.eye(4)
    matrix[:3, :3] = lps_to_ras @ DIRECTIONS[direction] @ np.diag([float(s) for s in spacing])
    matrix[:3, 3] = lps_to_ras @ np.array([float(o) for o in origin])
    return matrix


def phantom_image(size: tuple[int, int, int] = PHANTOM_SIZE, spacing: tuple[float, float, float] = PHANTOM_SPACING,
                  modality: str = "CT", direction: str = "oblique-flipped",
                  origin: tuple[float, float, float] = PHANTOM_ORIGIN, seed: int = 0, contrast: float = 1.0) -> Any:
    """phantom_voxels as a SimpleITK volume (x, y, z sizes) on an oblique, anisotropic, flipped grid."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(phantom_voxels(size, modality, seed, contrast))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection(DIRECTIONS[direction].flatten().tolist())
    return image


def phantom_channels(count: int, **options: Any) -> list[Any]:
    """`count` co-registered MR-like volumes on one grid, each with its own contrast (for multi-channel bundles)."""
    options.setdefault("modality", "MR")
    return [phantom_image(seed=index, contrast=1.0 - 0.3 * index, **options) for index in range(count)]


def write_phantom(path: Path | str, **options: Any) -> Path:
    """phantom_image written to `path` (any SimpleITK format, e.g. .nii.gz or .nrrd)."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(phantom_image(**options), str(path))
    return path


# ------------------------------------------------------------------------------------------------ command line


def main(argv: Sequence[str] | None = None) -> int:
    """Write one bundle of KINDS and print its path: how the Slicer self-test builds one in the worker's Python
    (torch and MONAI must not be loaded into Slicer's own process)."""
    parser = argparse.ArgumentParser(description="Write a tiny zoo-shaped MONAI bundle (random weights).")
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("parent", help="folder to write the bundle into")
    parser.add_argument("--name", help="the bundle's folder name (its model id)")
    parser.add_argument("--zip", action="store_true", help="also zip it like a zoo release; print the zip's path")
    arguments = parser.parse_args(argv)
    print(write_bundle(arguments.parent, arguments.kind, name=arguments.name, zip_release=arguments.zip))
    return 0


if __name__ == "__main__":
    sys.exit(main())
