"""Segmentation models in the MONAI Bundle layout (the Model Zoo's format), run around the project's own inference.

A bundle describes its own pipeline in ``configs/inference.json``: ``network_def``, ``preprocessing``, ``inferer`` and
``postprocessing``. This module builds the network and the transforms with ``monai.bundle.ConfigParser`` and runs
them on a SimpleITK image, with three deliberate changes to what the bundle would do on its own:

- Loading: the bundle's ``LoadImaged`` is replaced by `SitkLoadd`, which hands the already-read SimpleITK image to
  the rest of the chain in exactly the form MONAI's ITK reader produces: the array indexed (i, j, k) like ITK's
  index (SimpleITK's numpy view is (k, j, i)) and a RAS affine (SimpleITK is LPS). `ras_affine` is the one place
  where LPS becomes RAS; nothing converts back, because the way back never leaves array space (below).
- Inference: the bundle's ``inferer`` only contributes its parameters (ROI size, overlap, blending mode); the
  windows run through the project's windowed inference (`engine.inference`: batching, background windows
  skipped, out-of-memory fallbacks).
- Postprocessing: writers (``SaveImaged``) are dropped, and the inversion of the preprocessing always runs on
  probabilities with the forward transforms' interpolation (linear for images; never the nearest-neighbour a
  bundle may ask for), before anything that makes labels: the bundle's
  activations run on the model grid, then ``Invertd`` (back to the input's array and affine), then everything else
  (``AsDiscreted`` argmax, connected components, ...) on the input grid. The inverted prediction's affine and shape
  are compared with the input's before its voxels are wrapped with the input's own SimpleITK geometry, so the label
  lies exactly on the input grid or the run stops.

Weights are only read from paths the registry has verified (sha256): a state dict ``models/model.pt`` through
``torch.load(weights_only=True)`` (a pickle that would build arbitrary objects is refused), or a TorchScript
``models/model.ts``. Only the sections named above are built, so the bundle's ``$`` expressions elsewhere (data
lists, evaluators, writers) never run. MONAI is imported lazily: the deepbet path and the worker's start-up do
not pay for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from MIADeepLearningLib.engine import inference
from MIADeepLearningLib.engine.errors import InputError, ModelError
from MIADeepLearningLib.engine.registry import METADATA_RELATIVE_PATH, MONAI_BUNDLE_PIPELINE, ModelInfo

ProgressCallback = Callable[[str, float, str], None]

PIPELINE_NAME = MONAI_BUNDLE_PIPELINE
INFERENCE_CONFIG_RELATIVE_PATH = Path("configs") / "inference.json"
STATE_DICT_SUFFIXES = (".pt", ".pth")
TORCHSCRIPT_SUFFIXES = (".ts",)
LOADERS = ("LoadImaged", "LoadImage")
WRITERS = ("SaveImaged", "SaveImage", "SaveClassificationd", "SaveClassification")
INVERTERS = ("Invertd",)
MODEL_GRID_TRANSFORMS = ("Activationsd", "Activations")  # run on probabilities before the inversion
# Distinct anatomy-like colours (after Slicer's GenericAnatomyColors) for bundles whose package gives none
DEFAULT_COLORS = (
    (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79), (221, 130, 101),
    (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0), (255, 250, 220), (230, 220, 70),
    (200, 200, 235), (250, 250, 210), (244, 214, 49), (0, 151, 206), (216, 191, 216), (183, 156, 220),
)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
GRID_TOLERANCE_MM = 1e-3


def _no_progress(stage: str, fraction: float, message: str) -> None:
    """Default progress sink."""


def _first_line(error: BaseException) -> str:
    """The gist of a library error, for a one-sentence message."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__).rstrip(".")


def _require_monai(model_title: str) -> None:
    """A bundle needs MONAI in the worker's Python; say so in one sentence instead of an ImportError."""
    try:
        import monai  # noqa: F401
    except ImportError as error:
        raise ModelError(
            f"Model '{model_title}' is a MONAI bundle and needs the Python package monai, which is not installed "
            "(install it with: pip install monai)."
        ) from error


# --------------------------------------------------------------------------------------------------- geometry


def ras_affine(image: sitk.Image) -> np.ndarray:
    """4×4 map from the (i, j, k) voxel index to RAS millimetres: the only LPS -> RAS conversion of this pipeline.

    SimpleITK maps index -> LPS as origin + direction · diag(spacing) · index; RAS flips the first two axes.
    """
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(np.array(image.GetSpacing(), dtype=np.float64))
    affine[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=np.float64)
    return affine


def ijk_array(image: sitk.Image) -> np.ndarray:
    """The voxels indexed (i, j, k[, component]) like ITK's index, as MONAI's readers return them."""
    voxels = sitk.GetArrayFromImage(image)  # (k, j, i) or (k, j, i, c)
    axes = (2, 1, 0, 3) if voxels.ndim == 4 else (2, 1, 0)
    return np.ascontiguousarray(voxels.transpose(axes))


def image_from_ijk_array(voxels: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Inverse of `ijk_array` for a scalar volume, with exactly the reference's origin, spacing and direction."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels.transpose(2, 1, 0)))
    image.CopyInformation(reference)
    return image


def metatensor_from_sitk(image: sitk.Image, dtype: Any = np.float32, channel_first: bool = False) -> Any:
    """What ``LoadImage(reader=ITKReader)`` would return for this image, without a file in between."""
    from monai.data import MetaTensor
    from monai.utils import MetaKeys, SpaceKeys

    voxels = ijk_array(image)
    if dtype is not None:
        voxels = voxels.astype(dtype, copy=False)
    affine = ras_affine(image)
    meta = {
        MetaKeys.ORIGINAL_AFFINE: affine,
        MetaKeys.AFFINE: affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.array(image.GetSize()),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if voxels.ndim == 4 else float("nan"),
        "spacing": np.array(image.GetSpacing()),
        "filename_or_obj": "",
    }
    tensor = MetaTensor.ensure_torch_and_prune_meta(voxels, meta)
    if channel_first:
        from monai.transforms import EnsureChannelFirst

        tensor = EnsureChannelFirst()(tensor)
    return tensor


class SitkLoadd:
    """Stands in for the bundle's ``LoadImaged``: takes a SimpleITK image from the data dict instead of a path."""

    def __init__(self, keys: tuple[str, ...], dtype: Any = np.float32, ensure_channel_first: bool = False,
                 image_only: bool = True):
        self.keys, self.dtype = keys, dtype
        self.ensure_channel_first, self.image_only = ensure_channel_first, image_only

    @classmethod
    def replacing(cls, loader: Any) -> SitkLoadd:
        """Same keys and options as a MONAI ``LoadImaged`` / ``LoadImage``."""
        options = getattr(loader, "_loader", loader)
        keys = tuple(getattr(loader, "keys", ("image",)))
        return cls(keys, getattr(options, "dtype", np.float32), bool(getattr(options, "ensure_channel_first", False)),
                   bool(getattr(options, "image_only", True)))

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.keys:
            if isinstance(d.get(key), sitk.Image):
                d[key] = metatensor_from_sitk(d[key], self.dtype, self.ensure_channel_first)
                if not self.image_only:
                    d[f"{key}_meta_dict"] = dict(d[key].meta)
        return d


def check_on_input_grid(prediction: Any, image: sitk.Image, model_title: str) -> None:
    """Refuse a prediction whose array is not indexed like the input (shape and index -> RAS affine)."""
    shape = tuple(int(n) for n in prediction.shape[1:])
    affine = np.asarray(prediction.affine, dtype=np.float64) if hasattr(prediction, "affine") else None
    expected = ras_affine(image)
    if shape != tuple(image.GetSize()) or affine is None or not np.allclose(affine, expected, atol=GRID_TOLERANCE_MM):
        raise ModelError(
            f"The postprocessing of model '{model_title}' did not bring its prediction back onto the input grid "
            f"(shape {shape} instead of {tuple(image.GetSize())}); check the bundle's Invertd and preprocessing."
        )


# ------------------------------------------------------------------------------------------------ metadata


def _target_name(item: Any) -> str:
    """The class name of a config component ("monai.transforms.SaveImaged" -> "SaveImaged"), "" if none."""
    target = item.get("_target_", "") if isinstance(item, Mapping) else ""
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else ""


def segments_from_metadata(metadata: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Output labels: names from ``network_data_format.outputs.pred.channel_def``, colour and terminology from the
    package's ``slicer.segments`` (matched by value) when present, else a default colour and no terminology."""
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    output = outputs.get("pred") or next(iter(outputs.values()), {})
    channel_def = output.get("channel_def", {}) if isinstance(output, Mapping) else {}
    given = {int(segment["value"]): segment for segment in metadata.get("slicer", {}).get("segments", [])}
    segments = []
    for key, name in sorted(channel_def.items(), key=lambda item: int(item[0])):
        value = int(key)
        if value == 0:  # the background channel is never a segment
            continue
        segment = {"value": value, "name": str(name),
                   "color": list(DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)]), "terminology": ""}
        segment.update({k: v for k, v in given.pop(value, {}).items() if v is not None})
        segments.append(segment)
    segments.extend(given[value] for value in sorted(given))  # labels the metadata names only in slicer.segments
    return segments


# -------------------------------------------------------------------------------------------------- weights


def load_state_dict(path: Path, model_title: str) -> dict[str, torch.Tensor]:
    """A state dict of tensors, read without unpickling anything else (``weights_only=True``)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelError(
            f"Weight file {path.name} of model '{model_title}' is not a plain state dict of tensors "
            f"({type(error).__name__}); refusing to unpickle anything else."
        ) from error
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):  # CheckpointLoader's {"model": ...}
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ModelError(f"Weight file {path.name} of model '{model_title}' is not a state dict of tensors.")
    if state and all(key.startswith("module.") for key in state):  # saved from DataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


def _weight_file(model: ModelInfo, weight_paths: Mapping[str, Path], prefer: str | None) -> Path:
    """The verified weight file to use: a state dict first, TorchScript otherwise (``options.weights`` = role)."""
    if prefer:
        if prefer not in weight_paths:
            raise ModelError(f"Model '{model.title}' has no verified weight file with role '{prefer}'.")
        return Path(weight_paths[prefer])
    paths = [Path(path) for path in weight_paths.values()]
    for suffixes in (STATE_DICT_SUFFIXES, TORCHSCRIPT_SUFFIXES):
        found = [path for path in paths if path.suffix.lower() in suffixes]
        if found:
            return sorted(found, key=lambda path: path.name != f"model{path.suffix}")[0]
    raise ModelError(
        f"Model '{model.title}' lists no verified weight file (models/model.pt or models/model.ts with its sha256 "
        "in the slicer section of its metadata)."
    )


# ------------------------------------------------------------------------------------------------ inference


def _windowed_predict(network: Any, image: torch.Tensor, window: Mapping[str, Any], device: torch.device,
                      progress: Callable[[float], None]) -> tuple[torch.Tensor, inference.InferenceReport]:
    """(K, X, Y, Z) float32 CPU output of the network over windows of a (C, X, Y, Z) CPU image, with its report."""
    config = inference.WindowedInferenceConfig(
        roi_size=tuple(window["roi_size"]), overlap=float(window["overlap"]), mode=str(window["mode"]),
        sw_batch_size=window["sw_batch_size"], skip_background=bool(window["skip_background"]),
        autocast=bool(window["autocast"]))
    output, report = inference.sliding_window_predict(network, image, config, device, progress)
    return output.float(), report


def fallback_warning(fallbacks: list[str]) -> list[str]:
    """The inference engine's out-of-memory steps as one sentence for the user (none when nothing happened)."""
    if not fallbacks:
        return []
    steps = ", ".join(step.replace("GPU out of memory: ", "") for step in fallbacks)
    return [f"The GPU ran out of memory during inference and the run continued with: {steps} (slower, same result)."]


def _labels(prediction: torch.Tensor) -> np.ndarray:
    """(X, Y, Z) integer labels from the final prediction: one-hot or probabilities are reduced by argmax."""
    values = prediction.detach().cpu()
    if values.shape[0] > 1:
        labels = values.argmax(dim=0)
    elif torch.is_floating_point(values) and not torch.equal(values, values.round()):
        labels = (values[0] > 0.5).to(torch.int64)  # one sigmoid channel left undiscretised
    else:
        labels = values[0].round().to(torch.int64)
    labels = labels.numpy()
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)


class MonaiBundle:
    """A single-network segmentation bundle: the bundle's transforms around our windowed inference."""

    def __init__(self, model: ModelInfo, weight_paths: dict[str, Path], device: torch.device,
                 options: dict | None = None):
        options = options or {}
        self.model_title = model.title
        self.device = device
        _require_monai(model.title)
        weights = _weight_file(model, weight_paths, options.get("weights"))
        state = None if weights.suffix.lower() in TORCHSCRIPT_SUFFIXES else load_state_dict(weights, model.title)
        from monai.bundle import ConfigParser

        config_path = model.package_dir / INFERENCE_CONFIG_RELATIVE_PATH
        if not config_path.is_file():
            raise ModelError(f"Model '{model.title}' has no {INFERENCE_CONFIG_RELATIVE_PATH.as_posix()}.")
        parser = ConfigParser()
        try:
            parser.read_config(str(config_path))
            parser.read_meta(str(model.package_dir / METADATA_RELATIVE_PATH))
        except Exception as error:
            raise ModelError(
                f"The configuration of model '{model.title}' cannot be read ({_first_line(error)})."
            ) from error
        if "preprocessing" not in parser.get():
            raise ModelError(f"The inference.json of model '{model.title}' has no 'preprocessing' section.")
        parser["bundle_root"] = str(model.package_dir)
        parser["device"] = torch.device("cpu")  # preprocessing runs on the CPU; the windows go to self.device
        raw_post = parser.get("postprocessing") or {"_target_": "Compose", "transforms": []}
        post_items = raw_post.get("transforms") if isinstance(raw_post, Mapping) else None
        if _target_name(raw_post) != "Compose" or not isinstance(post_items, list):
            raise ModelError(f"The postprocessing of model '{model.title}' is not a Compose of transforms.")
        inverters = [item for item in post_items if _target_name(item) in INVERTERS]
        # activations on the model grid, the inversion (ours), then everything else on the input grid; no writers
        kept = [item for item in post_items if _target_name(item) not in WRITERS + INVERTERS]
        parser["miadl_model_grid_post"] = {"_target_": "Compose", "transforms": [
            item for item in kept if _target_name(item) in MODEL_GRID_TRANSFORMS]}
        parser["miadl_input_grid_post"] = {"_target_": "Compose", "transforms": [
            item for item in kept if _target_name(item) not in MODEL_GRID_TRANSFORMS]}
        if inverters:
            parser["miadl_pred_key"] = inverters[0].get("keys", "pred")
        try:
            self.preprocessing = parser.get_parsed_content("preprocessing")
            self.model_grid_post = parser.get_parsed_content("miadl_model_grid_post")
            self.input_grid_post = parser.get_parsed_content("miadl_input_grid_post")
            inferer = parser.get_parsed_content("inferer") if "inferer" in parser.get() else None
            pred_key = parser.get_parsed_content("miadl_pred_key") if inverters else "pred"
        except Exception as error:
            raise ModelError(
                f"The configuration of model '{model.title}' cannot be instantiated ({_first_line(error)})."
            ) from error
        self.pred_key = str(pred_key[0] if isinstance(pred_key, (list, tuple)) else pred_key)
        if type(self.preprocessing).__name__ != "Compose":
            raise ModelError(f"The preprocessing of model '{model.title}' is not a Compose of transforms.")
        self.image_key = self._install_loader()
        self.window = self._window_parameters(inferer, options)

        if state is None:
            with warnings.catch_warnings():  # torch 2.13 deprecates torch.jit.load itself
                warnings.simplefilter("ignore", DeprecationWarning)
                network = torch.jit.load(str(weights), map_location="cpu")
        else:
            network = self._network_def(parser, model.title)
            try:
                network.load_state_dict(state, strict=True)
            except RuntimeError as error:
                raise ModelError(
                    f"Weight file {weights.name} of model '{model.title}' does not fit the network_def of its "
                    "inference.json (missing or unexpected parameters)."
                ) from error
        self.weights_file = weights
        self.network = network.eval().to(device)
        self.segments = segments_from_metadata(model.metadata)

    @staticmethod
    def _network_def(parser: Any, model_title: str) -> torch.nn.Module:
        """The untrained network of ``network_def``, for a state dict to be loaded into."""
        if "network_def" not in parser.get():
            raise ModelError(f"The inference.json of model '{model_title}' has no 'network_def' section.")
        try:
            network = parser.get_parsed_content("network_def")
        except Exception as error:
            raise ModelError(
                f"The network_def of model '{model_title}' cannot be built ({_first_line(error)})."
            ) from error
        if not isinstance(network, torch.nn.Module):
            raise ModelError(f"The network_def of model '{model_title}' does not build a torch module.")
        return network

    def _install_loader(self) -> str:
        """Swap the bundle's LoadImaged for `SitkLoadd` (or put one in front); returns the image key."""
        transforms = list(getattr(self.preprocessing, "transforms", []))
        for index, transform in enumerate(transforms):
            if type(transform).__name__ in LOADERS:
                transforms[index] = SitkLoadd.replacing(transform)
                break
        else:
            transforms.insert(0, SitkLoadd(("image",), ensure_channel_first=True))
            index = 0
        self.preprocessing.transforms = tuple(transforms)
        keys = transforms[index].keys
        if len(keys) != 1:
            raise ModelError(
                f"Model '{self.model_title}' loads {len(keys)} images; only single-image bundles run here."
            )
        return str(keys[0])

    @staticmethod
    def _window_parameters(inferer: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        """ROI size, overlap and blending from the bundle's SlidingWindowInferer (run options override them)."""
        roi_size = getattr(inferer, "roi_size", None)
        window = {
            "roi_size": tuple(int(n) for n in roi_size) if roi_size is not None else None,  # None: whole image
            "overlap": float(getattr(inferer, "overlap", 0.5)),
            "mode": str(getattr(inferer, "mode", "gaussian")),
            "sw_batch_size": None,  # sized by the inference engine from the free memory
            "skip_background": True,
            "autocast": True,
        }
        for option, key in (("overlap", "overlap"), ("sw_mode", "mode"), ("sw_batch_size", "sw_batch_size"),
                            ("skip_background", "skip_background"), ("autocast", "autocast")):
            if options.get(option) is not None:
                window[key] = options[option]
        if options.get("roi_size") is not None:
            window["roi_size"] = tuple(int(n) for n in options["roi_size"])
        return window

    def to(self, device: torch.device) -> MonaiBundle:
        self.device = device
        self.network.to(device)
        return self

    def predict(self, image: sitk.Image, progress: ProgressCallback = _no_progress) -> dict[str, Any]:
        """Label image (uint8/uint16) on the input's own grid, plus any fallback the inference had to take."""
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        progress("preprocess", 0.12, "Running the bundle's preprocessing")
        with torch.no_grad():
            data = self.preprocessing({self.image_key: image})
        model_input = data[self.image_key]
        if not isinstance(model_input, MetaTensor) or model_input.ndim != 4:
            raise InputError("The model's preprocessing did not produce a single 3D volume with channels.")
        window = dict(self.window)
        if window["roi_size"] is None:
            window["roi_size"] = tuple(model_input.shape[1:])

        def window_progress(fraction: float) -> None:
            progress("inference", 0.2 + 0.6 * min(max(fraction, 0.0), 1.0),
                     f"Windows of {window['roi_size']} voxels: {100 * fraction:.0f} %")

        progress("inference", 0.2, f"Running the network on a {tuple(model_input.shape[1:])} grid")
        output, report = _windowed_predict(self.network, model_input.as_tensor().float().cpu(), window,
                                           self.device, window_progress)
        if torch.device(report.device).type != self.device.type:  # the engine's last fallback left it on the CPU
            self.device = torch.device(report.device)
        progress("postprocess", 0.82, "Resampling probabilities onto the input grid")
        data[self.pred_key] = MetaTensor(output)
        invert = Invertd(keys=self.pred_key, transform=self.preprocessing, orig_keys=self.image_key,
                         nearest_interp=False, to_tensor=True)
        with torch.no_grad():
            data = self.input_grid_post(invert(self.model_grid_post(data)))
        prediction = data[self.pred_key]
        check_on_input_grid(prediction, image, self.model_title)
        label = image_from_ijk_array(_labels(prediction), image)
        details = {
            "name": PIPELINE_NAME,
            "weights_file": self.weights_file.name,
            "window": {key: (list(value) if isinstance(value, tuple) else value) for key, value in window.items()},
            "model_grid": list(model_input.shape[1:]),
            "inference": {"device": report.device, "runtime": report.runtime, "precision": report.precision,
                          "sw_batch_size": report.sw_batch_size, "windows_total": report.windows_total,
                          "windows_evaluated": report.windows_evaluated, "fallbacks": list(report.fallbacks),
                          "notes": list(report.notes)},
        }
        return {"label": label, "warnings": fallback_warning(report.fallbacks), "provenance": details}
