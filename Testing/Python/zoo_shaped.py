"""Small bundles in the MONAI Model Zoo's formats, for the tests of importing and running zoo bundles (issue 18).

The shared part (the spec, the metadata and config pieces, the spleen-like kind, weights, writing, phantoms) lives in
the library, MIADeepLearningLib/testing/zoo_shaped.py, because the Slicer self-test builds a bundle too; this file
re-exports it and adds the kinds only the pytest suites use (template, BraTS-like with 4 channels, scripts networks,
optional packages, 2-D, detection, classification, the config-expression marker).

Entry points:
* ``write_bundle(parent, kind_or_spec, ...)`` writes one bundle folder (and, with ``zip_release=True``, a zip laid
  out as ``<bundle>/...`` like a zoo release) and returns its path. Kinds: see ``KINDS``.
* ``random_state_dict(config_file, bundle_root)`` builds random weights from any bundle's network_def (also used by
  Testing/Benchmarks/zoo_release.py on real zoo configs).
* ``phantom_image`` / ``phantom_channels`` / ``write_phantom``: oblique, anisotropic, flipped SimpleITK volumes with a
  bright blob, CT-like or MR-like.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from MIADeepLearningLib.testing import zoo_shaped as _library
from MIADeepLearningLib.testing.zoo_shaped import (
    BROKEN_KINDS,
    DIRECTIONS,
    FAKE_URL,
    HASH_TYPES,
    SCHEMA_URL,
    BundleSpec,
    build_network,
    bundle_imports,
    config_header,
    config_tail,
    file_hash,
    image_input,
    inference_config_file,
    invert,
    label_output,
    large_files_yaml,
    phantom_channels,
    phantom_ijk_to_ras,
    phantom_image,
    phantom_voxels,
    random_state_dict,
    read_large_files,
    saver,
    spleen_like,
    unet,
    write_phantom,
    zip_folder,
    zoo_metadata,
)

__all__ = [
    "ABSENT_MODULE", "BROKEN_KINDS", "DIRECTIONS", "FAKE_URL", "HASH_TYPES", "KINDS", "SCHEMA_URL", "BundleSpec",
    "brats_like", "build_network", "bundle_imports", "classification_like", "detection_like", "file_hash",
    "inference_config_file", "large_files_yaml", "marker_expression", "optional_package", "phantom_channels",
    "phantom_ijk_to_ras", "phantom_image", "phantom_voxels", "random_state_dict", "read_large_files",
    "scripts_network", "slice_2d", "spleen_like", "template_like", "write_bundle", "write_phantom", "zip_folder",
]

# A module that is never installed: bundles that list it in optional_packages_version cannot run until it is.
ABSENT_MODULE = "miadl_zoo_absent_pkg"


def template_like(name: str = "tiny_segmentation_template", version: str = "0.0.2") -> BundleSpec:
    """Like segmentation_template: YAML only, intensity scaling, one whole-image window (SimpleInferer), 4 classes.
    Inputs must be divisible by 4 (two stride-2 levels)."""
    config = {
        "imports": ["$import os", "$import torch", "$import glob"],
        "image": "$monai.utils.CommonKeys.IMAGE",
        "pred": "$monai.utils.CommonKeys.PRED",
        "num_classes": 4,
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "bundle_root": ".",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": "$@bundle_root + '/test_data'",
        "output_dir": "./outputs",
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": "@num_classes",
                        "channels": [4, 8, 8], "strides": [2, 2], "num_res_units": 1},
        "network": "$@network_def.to(@device)",
        "data_list": "$list(sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*'))))",
        "data_dicts": "$[{@image: i} for i in @data_list]",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "@image", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "@image"},
            {"_target_": "ScaleIntensityd", "keys": "@image"},
        ],
        "preprocessing": {"_target_": "Compose", "transforms": "$@transforms"},
        "dataset": {"_target_": "Dataset", "data": "@data_dicts", "transform": "@preprocessing"},
        "dataloader": {"_target_": "ThreadDataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "@pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "@pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "@pred", "output_dir": "@output_dir", "output_postfix": "",
             "resample": False, "separate_folder": True, "output_dtype": "$None"},
        ]},
        "handlers": [
            {"_target_": "CheckpointLoader", "_disabled_": "$not os.path.exists(@ckpt_path)",
             "load_path": "@ckpt_path", "load_dict": {"model": "@network"}},
            {"_target_": "StatsHandler", "name": None, "output_transform": "$lambda x: None"},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers"},
        "run": ["$@evaluator.run()"],
    }
    classes = {"0": "background", "1": "class 1", "2": "class 2", "3": "class 3"}
    metadata = zoo_metadata(name, "Tiny segmentation template", image_input("MR", spatial_shape=[32, 32, 32]),
                            label_output(classes), version=version, task="Segmentation of spheres (test)")
    return BundleSpec(name, config, metadata, config_format="yaml")


def brats_like(name: str = "tiny_brats_mri_segmentation", version: str = "0.1.0") -> BundleSpec:
    """Like brats_mri_segmentation: 4 MR inputs given as 4 files (LoadImaged stacks them channel-first, no
    EnsureChannelFirstd), sigmoid, threshold, a Lambdad that writes values 1/2/4 from output channels 0/1/2."""
    config = config_header()
    config["dataset_dir"] = "/workspace/data/brats"
    config["datalist"] = "$[sorted(glob.glob(d + '/*.nii*')) for d in sorted(glob.glob(@dataset_dir + '/*'))]"
    config["network_def"] = {"_target_": "SegResNet", "blocks_down": [1, 1], "blocks_up": [1], "init_filters": 4,
                             "norm": ["GROUP", {"num_groups": 2}], "in_channels": 4, "out_channels": 3,
                             "dropout_prob": 0.2}
    config["network"] = "$@network_def.to(@device)"
    config["preprocessing"] = {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key", "image_only": False},
        {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True, "channel_wise": True},
    ]}
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 1, "overlap": 0.5}
    post = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
            {"_target_": "Lambdad", "keys": "pred",
             "func": "$lambda p: torch.where(p[2:3] > 0, 4.0, torch.where(p[0:1] > 0, 1.0, "
                     "torch.where(p[1:2] > 0, 2.0, 0.0)))"},
            saver()]
    config.update(config_tail(post, inferer, data="$[{'image': files} for files in @datalist]"))
    inputs = image_input("MR", channels=4, channel_def={"0": "T1c", "1": "T1", "2": "T2", "3": "FLAIR"})
    outputs = label_output({"0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"})
    metadata = zoo_metadata(name, "Tiny BraTS MRI segmentation", inputs, outputs, version=version,
                            task="Brain tumour segmentation (test)")
    return BundleSpec(name, config, metadata)


TINY_NETS = {
    1: '''"""A tiny network of a zoo-shaped test bundle (variant 1: two convolutions)."""

import torch
from torch import nn

VARIANT = 1


class TinyNet(nn.Module):
    def __init__(self, in_channels: int = 1, out_channels: int = 3, features: int = 4):
        super().__init__()
        self.encode = nn.Conv3d(in_channels, features, 3, padding=1)
        self.decode = nn.Conv3d(features, out_channels, 1)

    def forward(self, x):
        return self.decode(torch.relu(self.encode(x)))
''',
    2: '''"""A tiny network of a zoo-shaped test bundle (variant 2: three convolutions, other names)."""

import torch
from torch import nn

VARIANT = 2


class TinyNet(nn.Module):
    def __init__(self, in_channels: int = 1, out_channels: int = 3, features: int = 4):
        super().__init__()
        self.stem = nn.Conv3d(in_channels, features, 3, padding=1)
        self.middle = nn.Conv3d(features, features, 3, padding=1)
        self.head = nn.Conv3d(features, out_channels, 1)

    def forward(self, x):
        return self.head(torch.relu(self.middle(torch.relu(self.stem(x)))))
''',
}


def _simple_preprocessing(orient: bool = True) -> dict[str, Any]:
    transforms = [{"_target_": "LoadImaged", "keys": "@image_key"},
                  {"_target_": "EnsureChannelFirstd", "keys": "@image_key"}]
    if orient:
        transforms.append({"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"})
    transforms += [{"_target_": "ScaleIntensityd", "keys": "@image_key"},
                   {"_target_": "EnsureTyped", "keys": "@image_key"}]
    return {"_target_": "Compose", "transforms": transforms}


def scripts_network(variant: int = 1, name: str | None = None, version: str = "0.1.0") -> BundleSpec:
    """Like the UNesT bundles: the network class lives in the bundle's own scripts/networks/tiny.py and is named
    scripts.networks.tiny.TinyNet. Variants 1 and 2 have different TinyNet classes under the same dotted name, so two
    such bundles in one process collide unless each bundle's scripts are imported for that bundle only."""
    name = name or f"tiny_scripts_net{variant}_segmentation"
    config = config_header()
    config["network_def"] = {"_target_": "scripts.networks.tiny.TinyNet", "in_channels": 1, "out_channels": 3,
                             "features": 4}
    config["network"] = "$@network_def.to(@device)"
    config["preprocessing"] = _simple_preprocessing()
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 1, "overlap": 0.25}
    post = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}, invert(),
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}, saver()]
    config.update(config_tail(post, inferer))
    metadata = zoo_metadata(name, f"Tiny scripts network {variant}", image_input("CT", spatial_shape=[16, 16, 16]),
                            label_output({"0": "background", "1": "cortex", "2": "medulla"}, [16, 16, 16]),
                            version=version)
    scripts = {"scripts/__init__.py": "", "scripts/networks/__init__.py": "",
               "scripts/networks/tiny.py": TINY_NETS[variant]}
    return BundleSpec(name, config, metadata, scripts=scripts)


def optional_package(where: str = "network", name: str | None = None, module: str = ABSENT_MODULE) -> BundleSpec:
    """A bundle that needs a package which is not installed and is listed in optional_packages_version (like einops
    for swin_unetr, scikit-image for prostate). ``where="network"``: the network's module imports it (the network_def
    cannot be built); ``where="transform"``: a postprocessing transform imports it when called (like
    KeepLargestConnectedComponentd needing scikit-image)."""
    if where not in ("network", "transform"):
        raise ValueError(f"where must be 'network' or 'transform', not {where!r}")
    spec = scripts_network(1, name or f"tiny_optional_{where}_segmentation")
    spec.metadata["optional_packages_version"][module] = "1.0.0"
    spec.metadata["name"] = f"Tiny bundle needing {module} ({where})"
    if where == "network":
        spec.scripts["scripts/networks/tiny.py"] = (f"import {module}  # noqa: F401 (an optional package)\n"
                                                    + TINY_NETS[1])
        spec.stub_modules = (module,)
    else:
        spec.scripts["scripts/transforms.py"] = f'''"""A postprocessing transform that needs {module}."""

import importlib

from monai.transforms import MapTransform


class KeepBiggestPartd(MapTransform):
    def __call__(self, data):
        importlib.import_module("{module}")
        return dict(data)
'''
        post = spec.config["postprocessing"]["transforms"]
        post.insert(len(post) - 1, {"_target_": "scripts.transforms.KeepBiggestPartd", "keys": "pred"})
    return spec


def slice_2d(name: str = "tiny_ventricle_2d_segmentation", version: str = "0.1.0") -> BundleSpec:
    """Like ventricular_short_axis_3label: a 2-D UNet (spatial_dims 2) applied slice by slice by a SliceInferer
    (spatial_dim 2) on a 3-D stack."""
    config = config_header()
    config["network_def"] = unet(spatial_dims=2, out_channels=4)
    config["network"] = "$@network_def.to(@device)"
    config["preprocessing"] = _simple_preprocessing(orient=False)
    inferer = {"_target_": "SliceInferer", "roi_size": [32, 32], "spatial_dim": 2, "sw_batch_size": 1}
    post = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}, invert(),
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}, saver()]
    config.update(config_tail(post, inferer))
    inputs = image_input("MR", spatial_shape=[32, 32])
    outputs = label_output({"0": "background", "1": "left ventricle", "2": "myocardium", "3": "right ventricle"},
                           [32, 32])
    metadata = zoo_metadata(name, "Tiny 2D short-axis segmentation", inputs, outputs, version=version)
    return BundleSpec(name, config, metadata)


TINY_DETECTOR = '''"""A tiny detection head of a test bundle: returns a dict like RetinaNet's head outputs."""

from torch import nn


class TinyDetectorNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_anchors: int = 3, num_classes: int = 1):
        super().__init__()
        self.features = nn.Conv3d(in_channels, 4, 3, padding=1)
        self.classification = nn.Conv3d(4, num_anchors * num_classes, 1)
        self.box_regression = nn.Conv3d(4, num_anchors * 6, 1)

    def forward(self, x):
        features = self.features(x)
        return {"classification": [self.classification(features)], "box_regression": [self.box_regression(features)]}
'''


def detection_like(name: str = "tiny_lung_nodule_ct_detection", version: str = "0.1.0") -> BundleSpec:
    """Like lung_nodule_ct_detection: boxes, not labels (outputs type "object", format "dict"); a detector built
    around a network that returns a dict."""
    config = config_header()
    config.update({
        "spatial_dims": 3, "num_classes": 1, "size_divisible": [16, 16, 8], "infer_patch_size": [32, 32, 16],
        "anchor_generator": {"_target_": "monai.apps.detection.utils.anchor_utils.AnchorGeneratorWithAnchorShape",
                             "feature_map_scales": [1], "base_anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]]},
        "network_def": {"_target_": "scripts.networks.tiny_detector.TinyDetectorNet", "in_channels": 1,
                        "num_anchors": 3, "num_classes": "@num_classes"},
        "network": "$@network_def.to(@device)",
        "detector": {"_target_": "RetinaNetDetector", "network": "@network", "anchor_generator": "@anchor_generator",
                     "debug": False, "spatial_dims": "@spatial_dims", "num_classes": "@num_classes",
                     "size_divisible": "@size_divisible"},
        "detector_ops": ["$@detector.set_target_keys(box_key='box', label_key='label')",
                         "$@detector.set_sliding_window_inferer(roi_size=@infer_patch_size, overlap=0.25, "
                         "sw_batch_size=1, mode='constant', device='cpu')"],
    })
    config["preprocessing"] = {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
        {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -1024.0, "a_max": 300.0, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "@image_key"},
    ]}
    post = [{"_target_": "ClipBoxToImaged", "box_keys": "box", "label_keys": "label", "box_ref_image_keys":
             "@image_key", "remove_empty": True},
            {"_target_": "AffineBoxToWorldCoordinated", "box_keys": "box", "box_ref_image_keys": "@image_key",
             "affine_lps_to_ras": True}]
    config.update(config_tail(post, {"_target_": "SlidingWindowInferer", "roi_size": "@infer_patch_size",
                               "sw_batch_size": 1}))
    config["evaluator"]["_requires_"] = "@detector_ops"
    outputs = {"pred": {"type": "object", "format": "dict", "dtype": "float32", "num_channels": 1,
                        "spatial_shape": ["n", "n", "n"], "value_range": [-10000, 10000]}}
    metadata = zoo_metadata(name, "Tiny lung nodule CT detection",
                            image_input("CT", spatial_shape=["16*n", "16*n", "8*n"]), outputs, version=version,
                            task="Nodule detection (test)")
    scripts = {"scripts/__init__.py": "", "scripts/networks/__init__.py": "",
               "scripts/networks/tiny_detector.py": TINY_DETECTOR}
    return BundleSpec(name, config, metadata, scripts=scripts)


def classification_like(name: str = "tiny_ct_classification", version: str = "0.1.0") -> BundleSpec:
    """A 3-D classifier: probabilities per class, no image output."""
    config = config_header()
    config["network_def"] = {"_target_": "DenseNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                             "init_features": 4, "growth_rate": 4, "block_config": [1, 1], "bn_size": 2}
    config["network"] = "$@network_def.to(@device)"
    preprocessing = _simple_preprocessing(orient=False)
    preprocessing["transforms"].insert(3, {"_target_": "Resized", "keys": "@image_key", "spatial_size": [32, 32, 32]})
    config["preprocessing"] = preprocessing
    post = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    config.update(config_tail(post, {"_target_": "SimpleInferer"}))
    outputs = {"pred": {"type": "probabilities", "format": "classes", "num_channels": 2, "spatial_shape": [2],
                        "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                        "channel_def": {"0": "absent", "1": "present"}}}
    metadata = zoo_metadata(name, "Tiny CT classification", image_input("CT"), outputs, version=version,
                            task="Classification (test)")
    return BundleSpec(name, config, metadata)


def marker_expression(marker: Path | str, name: str = "tiny_marker_segmentation") -> BundleSpec:
    """A spleen-like bundle whose network_def.in_channels is a `$` expression that writes `marker` (and evaluates
    to 1): building its network runs code from the package, which is what the trust tests look for."""
    spec = spleen_like(name)
    spec.weights_network_def = copy.deepcopy(spec.config["network_def"])
    spec.config["network_def"]["in_channels"] = (
        f"$int(__import__('pathlib').Path({str(marker)!r}).write_text('1'))")
    spec.metadata["name"] = "Tiny bundle with a config expression"
    return spec


KINDS = {
    **_library.KINDS,
    "template": template_like,
    "brats": brats_like,
    "scripts1": lambda: scripts_network(1),
    "scripts2": lambda: scripts_network(2),
    "optional_network": lambda: optional_package("network"),
    "optional_transform": lambda: optional_package("transform"),
    "slice2d": slice_2d,
    "detection": detection_like,
    "classification": classification_like,
}


def write_bundle(parent: Path | str, kind: str | BundleSpec = "spleen", **options: Any) -> Path:
    """The library's write_bundle (see there for the options), with every kind of this file's KINDS by name."""
    return _library.write_bundle(parent, kind if isinstance(kind, BundleSpec) else KINDS[kind](), **options)
