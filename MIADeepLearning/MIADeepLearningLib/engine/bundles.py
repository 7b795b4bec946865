"""Segmentation models in the MONAI Bundle layout (the Model Zoo's format), run around the project's own inference.

A bundle describes its own pipeline in ``configs/inference.json`` (or ``inference.yaml``): ``network_def``,
``preprocessing``, ``inferer`` and ``postprocessing``. This module builds the network and the transforms with
``monai.bundle.ConfigParser`` and runs them on SimpleITK images, with deliberate changes to what the bundle would do
on its own:

- Loading: the bundle's ``LoadImaged`` is rewritten in the config, before anything is instantiated, to `SitkLoadd`,
  which hands the already-read SimpleITK image to the rest of the chain in exactly the form MONAI's ITK reader
  produces: the array indexed (i, j, k) like ITK's index (SimpleITK's numpy view is (k, j, i)) and a RAS affine
  (SimpleITK is LPS). `ras_affine` is the one place where LPS becomes RAS; nothing converts back, because the way
  back never leaves array space (below). Several images (or one multi-component volume) are stacked channel-first,
  as ``LoadImaged`` stacks a list of files (``original_channel_dim`` 0); the channel names come from the metadata.
- Inference: a ``SlidingWindowInferer`` only contributes its parameters (ROI size, overlap, blending, sigma, padding
  mode, batch size on CUDA); the windows run through the project's windowed inference (`engine.inference`:
  batching, background windows skipped, out-of-memory fallbacks). A non-constant padding mode is applied by padding
  the image here exactly as MONAI would, before the windows. ``SimpleInferer`` (or none) is one window over the
  whole image; ``SliceInferer`` (a 2-D network over the 3-D volume) is the bundle's own instance run on our device.
  Any other inferer is refused before any work.
- Postprocessing: writers (``SaveImaged``) are dropped, and the inversion of the preprocessing always runs on
  probabilities with the forward transforms' interpolation (linear for images; never the nearest-neighbour a
  bundle may ask for), before anything that makes labels: the bundle's activations run on the model grid, then
  ``Invertd`` (back to the input's array and affine), then everything else (``AsDiscreted`` argmax, connected
  components, ``Lambdad`` label values, ...) on the input grid. So a bundle that makes labels on the model grid and
  then inverts them linearly (prostate_mri_anatomy: argmax, largest component, linear Invertd, which leaves
  non-integer "labels") gets clean labels here, not the bundle's own output. The inverted prediction's affine and
  shape are compared with the input's before its voxels are wrapped with the input's own SimpleITK geometry, so the
  label lies exactly on the input grid or the run stops.
- Segment names: ``channel_def`` names the network's output CHANNELS, not label values. Which value each channel
  becomes is found by running the bundle's own postprocessing (no inversion) on a tiny synthetic prediction where
  region c has only channel c on (`probe_channel_values`); BraTS's channels 0, 1, 2 become 1, 2, 4.
- CPU compatibility shims that ``monai.bundle run`` lacks, each recorded in the provenance notes: a ``torch.load``
  in a config expression loads with ``weights_only=True`` (numpy arrays allowed through torch's safe globals, never
  full pickle) and on the CPU when CUDA is absent; ``torch.device('cuda')`` in an expression becomes the CPU when
  CUDA is absent; ``network_def`` keywords removed from MONAI (SwinUNETR's ``img_size``) are dropped.
- A bundle's ``scripts/`` package is importable only while that bundle builds and runs (`bundle_imports`).

Weights are only read from paths the registry has verified (sha256): a state dict ``models/model.pt`` through
``torch.load(weights_only=True)`` (a pickle that would build arbitrary objects is refused), or a TorchScript
``models/model.ts``. Only the sections named above are built, so the bundle's ``$`` expressions elsewhere (data
lists, evaluators, writers) never run; the ones in those sections do, which is why an imported bundle is code.
Every failure while building or running becomes one `ModelError`/`InputError` sentence naming the root cause
(`MissingPackages` when a Python package is missing). MONAI is imported lazily: the deepbet path and the worker's
start-up do not pay for it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from MIADeepLearningLib.engine import inference, zoo
from MIADeepLearningLib.engine.errors import InputError, MIADLError, MissingPackages, ModelError
from MIADeepLearningLib.engine.registry import MONAI_BUNDLE_PIPELINE, ModelInfo

ProgressCallback = Callable[[str, float, str], None]

PIPELINE_NAME = MONAI_BUNDLE_PIPELINE
INFERENCE_CONFIG_RELATIVE_PATH = Path("configs") / "inference.json"
STATE_DICT_SUFFIXES = (".pt", ".pth")
TORCHSCRIPT_SUFFIXES = (".ts",)
LOADERS = ("LoadImaged", "LoadImage")
LOADER_TARGET = "MIADeepLearningLib.engine.bundles.SitkLoadd"
WRITERS = ("SaveImaged", "SaveImage", "SaveClassificationd", "SaveClassification")
INVERTERS = ("Invertd",)
MODEL_GRID_TRANSFORMS = ("Activationsd", "Activations")  # run on probabilities before the inversion
WINDOW_INFERERS = ("SlidingWindowInferer", "SlidingWindowInfererAdapt")
WHOLE_IMAGE_INFERERS = ("SimpleInferer", "")
SLICE_INFERERS = ("SliceInferer",)
# Distinct anatomy-like colours (after Slicer's GenericAnatomyColors) for bundles whose package gives none
DEFAULT_COLORS = (
    (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79), (221, 130, 101),
    (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0), (255, 250, 220), (230, 220, 70),
    (200, 200, 235), (250, 250, 210), (244, 214, 49), (0, 151, 206), (216, 191, 216), (183, 156, 220),
)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
GRID_TOLERANCE_MM = 1e-3
# import name -> pip name where they differ (the zoo's optional_packages_version uses pip names)
MODULE_PACKAGES = {"skimage": "scikit-image", "sklearn": "scikit-learn", "PIL": "pillow",
                   "cv2": "opencv-python-headless", "yaml": "pyyaml", "ignite": "pytorch-ignite"}
# network_def keywords that MONAI removed (class name -> keywords): dropped when the installed class lacks them
REMOVED_NETWORK_KEYWORDS = {"SwinUNETR": ("img_size",)}
PROBE_LOGIT = 10.0  # the synthetic prediction of the segment probe: +10 where a channel is on, -10 elsewhere
SAFE_LOAD_NAME = "miadl_safe_torch_load"
_CUDA_DEVICE_EXPRESSION = re.compile(r"torch\.device\(\s*['\"]cuda(?::\d+)?['\"]\s*\)")


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


# ---------------------------------------------------------------------------------------------------- errors


def _chain(error: BaseException) -> list[BaseException]:
    """The error and its causes, outermost first (``raise ... from`` first, else the implicit context)."""
    found: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in found and len(found) < 32:
        found.append(current)
        value = getattr(current, "value", None)  # pydoc.ErrorDuringImport keeps the import's own error here
        if current.__cause__ is not None:
            current = current.__cause__
        elif isinstance(value, BaseException):
            current = value
        elif current.__context__ is not None and not current.__suppress_context__:
            current = current.__context__
        else:
            current = None
    return found


def root_cause(error: BaseException) -> str:
    """The innermost error of a chain as one clause: MONAI's wrappers ("Failed to evaluate ConfigExpression:",
    "Failed to instantiate component ...", "applying transform ...") say where, never why."""
    cause = _chain(error)[-1]
    text = " ".join(_first_line(cause).split())
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # torch colours parts of its messages
    text = re.split(r"(?<=[a-z0-9)'\"`])\. (?=[A-Z])", text)[0].rstrip(" .:")  # its first sentence only
    generic = not text or text == type(cause).__name__
    return type(cause).__name__ if generic else (text if ":" in text[:40] else f"{type(cause).__name__}: {text}")


def _missing_module(error: BaseException, bundle_root: Path | None = None) -> str | None:
    """The top-level name of a Python module whose absence caused `error` (None when something else did)."""
    for item in _chain(error):
        name = getattr(item, "name", None) if isinstance(item, ModuleNotFoundError) else None
        text = str(item)
        match = re.search(r"No module named '([\w.]+)'", text) or re.search(r"required package `([\w.-]+)`", text)
        if name is None and match:
            name = match.group(1)
        if name is None and "Skimage.measure required" in text:
            name = "skimage"
        if name:
            top = name.split(".")[0]
            local = bundle_root is not None and ((bundle_root / top).exists() or (bundle_root / f"{top}.py").exists())
            if top != "scripts" and not local:
                return top
    return None


def _requirement(module: str, metadata: Mapping[str, Any]) -> str:
    """The pip spec for a missing module, at the version the bundle lists in ``optional_packages_version`` (as a
    lower bound: the zoo pins the version it was tested with, which may have no wheel for Slicer's Python)."""
    package = MODULE_PACKAGES.get(module, module)
    listed = metadata.get("optional_packages_version") or metadata.get("required_packages_version") or {}
    normal = package.lower().replace("_", "-")
    for name, version in (listed.items() if isinstance(listed, Mapping) else ()):
        if str(name).lower().replace("_", "-") in (normal, module.lower()):
            return f"{name}>={version}" if version else str(name)
    return package


def model_failure(error: BaseException, model_title: str, what: str, metadata: Mapping[str, Any] | None = None,
                  bundle_root: Path | None = None) -> ModelError:
    """One sentence for a failure while building or running a bundle: the missing package (with its pip spec) or
    the root cause of the error chain. `what` starts the sentence ("The network_def of model 'X'")."""
    module = _missing_module(error, bundle_root)
    if module is not None:
        spec = _requirement(module, metadata or {})
        return MissingPackages(
            f"{what} needs the Python package {spec.split('>=')[0].split('==')[0]}, which is not installed "
            f"(install it with: pip install {spec}).", [spec])
    return ModelError(f"{what} failed: {root_cause(error)}.")


# --------------------------------------------------------------------------------------------- scripts/ path


def _drop_scripts_modules() -> None:
    for name in [name for name in sys.modules if name == "scripts" or name.startswith("scripts.")]:
        del sys.modules[name]


@contextlib.contextmanager
def bundle_imports(bundle_root: Path) -> Iterator[None]:
    """The bundle's root first on sys.path, and no other bundle's ``scripts`` package imported, while it builds and
    runs (as MONAI's ConfigWorkflow and MONAI Label do); objects built inside keep working afterwards."""
    root = str(bundle_root)
    _drop_scripts_modules()
    sys.path.insert(0, root)
    try:
        with warnings.catch_warnings():
            # MONAI's deprecation notices about a bundle's config (renamed keys, changed defaults) are for its
            # authors; the user running it could not act on them. Other warnings still reach the log.
            for category in (DeprecationWarning, FutureWarning, UserWarning):
                warnings.filterwarnings("ignore", category=category, module=r"monai(\.|$)")
            warnings.filterwarnings("ignore", message=r".*deprecated name 'optional_packages_version'")
            yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(root)
        _drop_scripts_modules()


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


def channel_images(image: sitk.Image | Sequence[sitk.Image]) -> list[sitk.Image]:
    """The scalar images a bundle input stands for: a list as given, a multi-component volume split."""
    if isinstance(image, sitk.Image):
        count = image.GetNumberOfComponentsPerPixel()
        return [image] if count == 1 else [sitk.VectorIndexSelectionCast(image, index) for index in range(count)]
    return [item for part in image for item in channel_images(part)]


def metatensor_from_sitk(image: sitk.Image | Sequence[sitk.Image], dtype: Any = np.float32,
                         channel_first: bool = False) -> Any:
    """What ``LoadImage(reader=ITKReader)`` would return for this image (or a list of files: stacked channel-first
    with ``original_channel_dim`` 0, as MONAI's reader does), without a file in between."""
    from monai.data import MetaTensor
    from monai.utils import MetaKeys, SpaceKeys

    images = [image] if isinstance(image, sitk.Image) else list(image)
    if len(images) == 1 and images[0].GetNumberOfComponentsPerPixel() > 1:
        images = channel_images(images[0])  # one volume with components stands for the bundle's list of files
    first = images[0]
    arrays = [ijk_array(item) for item in images]
    voxels = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=0)
    if dtype is not None:
        voxels = voxels.astype(dtype, copy=False)
    affine = ras_affine(first)
    meta = {
        MetaKeys.ORIGINAL_AFFINE: affine,
        MetaKeys.AFFINE: affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.array(first.GetSize()),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.ORIGINAL_CHANNEL_DIM: 0 if len(arrays) > 1 else float("nan"),
        "spacing": np.array(first.GetSpacing()),
        "filename_or_obj": "",
    }
    tensor = MetaTensor.ensure_torch_and_prune_meta(voxels, meta)
    if channel_first:
        from monai.transforms import EnsureChannelFirst

        tensor = EnsureChannelFirst()(tensor)
    return tensor


def _numpy_dtype(dtype: Any) -> Any:
    """A config's dtype ("float32", numpy.float32, torch.float32 or None) as numpy understands it."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).numpy().dtype
    return np.dtype(dtype)


class SitkLoadd:
    """Stands in for the bundle's ``LoadImaged``: takes SimpleITK images from the data dict instead of paths."""

    def __init__(self, keys: str | Sequence[str] = ("image",), dtype: Any = np.float32,
                 ensure_channel_first: bool = False, image_only: bool = True):
        self.keys = (keys,) if isinstance(keys, str) else tuple(keys)
        self.dtype = _numpy_dtype(dtype)
        self.ensure_channel_first, self.image_only = bool(ensure_channel_first), bool(image_only)

    @classmethod
    def replacing(cls, loader: Any) -> SitkLoadd:
        """Same keys and options as an instantiated MONAI ``LoadImaged`` / ``LoadImage``."""
        options = getattr(loader, "_loader", loader)
        keys = tuple(getattr(loader, "keys", ("image",)))
        return cls(keys, getattr(options, "dtype", np.float32), bool(getattr(options, "ensure_channel_first", False)),
                   bool(getattr(options, "image_only", True)))

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.keys:
            value = d.get(key)
            if isinstance(value, sitk.Image) or (isinstance(value, (list, tuple)) and value
                                                 and all(isinstance(item, sitk.Image) for item in value)):
                d[key] = metatensor_from_sitk(value, self.dtype, self.ensure_channel_first)
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


def _default_segment(value: int, name: str) -> dict[str, Any]:
    return {"value": value, "name": name, "color": list(DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)]),
            "terminology": ""}


def _with_package_segments(segments: list[dict[str, Any]], metadata: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``slicer.segments`` of the package override names, colours and terminology by value, and add values."""
    given = {int(segment["value"]): segment for segment in metadata.get("slicer", {}).get("segments", [])}
    merged = []
    for segment in segments:
        segment = dict(segment)
        segment.update({k: v for k, v in given.pop(int(segment["value"]), {}).items() if v is not None})
        merged.append(segment)
    merged.extend(dict(given[value]) for value in sorted(given))
    return sorted(merged, key=lambda segment: int(segment["value"]))


def segments_from_metadata(metadata: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Output labels when the channel -> value map cannot be probed: channel c of ``channel_def`` is label value c
    (0 the background), with the package's ``slicer.segments`` overriding by value."""
    channel_def = zoo.main_output(metadata).get("channel_def", {})
    channel_def = channel_def if isinstance(channel_def, Mapping) else {}
    segments = [_default_segment(int(key), str(name)) for key, name in channel_def.items() if int(key) != 0]
    return _with_package_segments(segments, metadata)


def segments_from_channels(metadata: Mapping[str, Any], channel_values: Sequence[int]) -> list[dict[str, Any]]:
    """Segments from a probed channel -> label value map: channel c's ``channel_def`` name on value
    channel_values[c]; the channel that becomes 0 is the background; the package's ``slicer.segments`` override."""
    channel_def = zoo.main_output(metadata).get("channel_def", {})
    channel_def = channel_def if isinstance(channel_def, Mapping) else {}
    segments: dict[int, dict[str, Any]] = {}
    for channel, value in enumerate(channel_values):
        if value == 0 or value in segments:
            continue
        name = channel_def.get(str(channel), channel_def.get(channel))
        segments[value] = _default_segment(int(value), str(name) if name is not None else f"Label {value}")
    return _with_package_segments(list(segments.values()), metadata)


def complete_segments(segments: Sequence[Mapping[str, Any]], values: Sequence[int]) -> list[dict[str, Any]]:
    """Add "Label N" (default colour) for every non-zero value of an output that no segment names."""
    named = {int(segment["value"]) for segment in segments}
    extra = [_default_segment(int(value), f"Label {int(value)}") for value in values
             if int(value) != 0 and int(value) not in named]
    return sorted([dict(segment) for segment in segments] + extra, key=lambda segment: int(segment["value"]))


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
    """The verified weight file to use: `prefer` (a role or a file name, e.g. wholeBody's model_lowres.pt), else a
    state dict first, TorchScript otherwise."""
    if prefer:
        if prefer in weight_paths:
            return Path(weight_paths[prefer])
        named = [Path(path) for path in weight_paths.values()
                 if Path(path).name == prefer or Path(path).as_posix().endswith(f"/{prefer}")]
        if named:
            return named[0]
        known = ", ".join(sorted(Path(path).name for path in weight_paths.values())) or "none"
        raise ModelError(f"Model '{model.title}' has no verified weight file '{prefer}' (it has: {known}).")
    paths = [Path(path) for path in weight_paths.values()]
    for suffixes in (STATE_DICT_SUFFIXES, TORCHSCRIPT_SUFFIXES):
        found = [path for path in paths if path.suffix.lower() in suffixes]
        if found:
            return sorted(found, key=lambda path: path.name != f"model{path.suffix}")[0]
    raise ModelError(
        f"Model '{model.title}' lists no verified weight file (models/model.pt or models/model.ts with its sha256 "
        "in the slicer section of its metadata)."
    )


def _numpy_safe_globals() -> list[Any]:
    """What torch's weights_only unpickler needs for plain numpy arrays and scalars (data, never code)."""
    core = getattr(np, "_core", None) or np.core
    found: list[Any] = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, name) for name in dir(dtypes)
                  if name.endswith("DType") and name not in ("ObjectDType", "VoidDType")]
    return found


def safe_torch_load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``torch.load`` as a bundle's config expressions call it (pancreas_ct_dints_segmentation's search code), but
    always ``weights_only`` with numpy arrays allowed, and onto the CPU when CUDA is absent."""
    for name in ("weights_only", "pickle_module", "mmap"):
        kwargs.pop(name, None)
    if not torch.cuda.is_available() and not callable(map_location):
        map_location = "cpu"
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    context = safe_globals(_numpy_safe_globals()) if safe_globals is not None else contextlib.nullcontext()
    with context:
        return torch.load(f, map_location=map_location, weights_only=True, **kwargs)


# --------------------------------------------------------------------------------------------- config (plain)


def _set_config_value(config: dict[str, Any], key: str, value: Any, model_title: str) -> None:
    """MONAI's ``--key value`` override ("network_def#in_channels" or "network_def::in_channels")."""
    parts = [part for part in re.split(r"#|::", str(key)) if part != ""]
    node: Any = config
    try:
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if not parts or not isinstance(node, (dict, list)):
            raise KeyError(key)
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    except (KeyError, IndexError, ValueError, TypeError) as error:
        raise ModelError(
            f"The config override '{key}' names no setting of model '{model_title}''s inference config."
        ) from error


def _walk_expressions(node: Any, rewrite: Callable[[str], str]) -> Any:
    """`node` with every ``$`` expression string passed through `rewrite`."""
    if isinstance(node, dict):
        return {key: _walk_expressions(value, rewrite) for key, value in node.items()}
    if isinstance(node, list):
        return [_walk_expressions(value, rewrite) for value in node]
    if isinstance(node, str) and node.startswith("$"):
        return rewrite(node)
    return node


def _compatibility_shims(config: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The explicit, short list of CPU and MONAI-version shims; each applied one adds a note (provenance)."""
    applied: set[str] = set()

    def rewrite(expression: str) -> str:
        if "torch.load(" in expression:
            applied.add("load")
            expression = expression.replace("torch.load(", f"{SAFE_LOAD_NAME}(")
        if not torch.cuda.is_available() and _CUDA_DEVICE_EXPRESSION.search(expression):
            applied.add("cuda")
            expression = _CUDA_DEVICE_EXPRESSION.sub("torch.device('cpu')", expression)
        return expression

    config = _walk_expressions(config, rewrite)
    if "load" in applied:
        notes.append("torch.load in the bundle's config ran with weights_only=True (numpy arrays allowed, no other "
                     "pickled objects) and onto the CPU when CUDA is absent, where monai.bundle run would unpickle "
                     "fully or fail.")
    if "cuda" in applied:
        notes.append("torch.device('cuda') in the bundle's config became the CPU, since CUDA is not available.")
    network_def = config.get("network_def")
    name = _target_name(network_def)
    if isinstance(network_def, dict) and name in REMOVED_NETWORK_KEYWORDS:
        import monai.networks.nets as nets

        network_class = getattr(nets, name, None)
        parameters = inspect.signature(network_class).parameters if network_class is not None else {}
        for keyword in REMOVED_NETWORK_KEYWORDS[name]:
            if keyword in network_def and keyword not in parameters:
                del network_def[keyword]
                notes.append(f"network_def keyword {keyword} of {name} was dropped: MONAI "
                             f"{_monai_version()} no longer has it (the network does not depend on it).")
    return config


def _monai_version() -> str:
    import monai

    return str(monai.__version__)


def _transform_list(config: Mapping[str, Any], section: Any) -> list[Any] | None:
    """The list of transforms of a Compose section: given inline, or by one reference ("$@transforms", as
    segmentation_template writes it); None for anything else (an expression that builds the list)."""
    transforms = section.get("transforms") if isinstance(section, Mapping) else None
    if isinstance(transforms, list):
        return transforms
    match = re.fullmatch(r"\$?@([\w#:]+)", transforms.strip()) if isinstance(transforms, str) else None
    node: Any = config
    for part in re.split(r"#|::", match.group(1)) if match else ["\0"]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return None
    return node if isinstance(node, list) else None


def _replace_loader(config: dict[str, Any], model_title: str) -> None:
    """Rewrite the preprocessing's LoadImaged/LoadImage as our `SitkLoadd`, before anything is instantiated (the
    bundle's own loader may need itk or nibabel readers that are not installed)."""
    preprocessing = config.get("preprocessing")
    if not isinstance(preprocessing, Mapping):
        raise ModelError(f"The inference config of model '{model_title}' has no 'preprocessing' section.")
    transforms = _transform_list(config, preprocessing)
    if _target_name(preprocessing) != "Compose" or transforms is None:
        raise ModelError(f"The preprocessing of model '{model_title}' is not a Compose of a list of transforms.")
    for index, item in enumerate(transforms):
        if _target_name(item) in LOADERS:
            replacement = {"_target_": LOADER_TARGET, "keys": item.get("keys", "image"),
                           "ensure_channel_first": item.get("ensure_channel_first", False),
                           "image_only": item.get("image_only", True)}
            if "dtype" in item:
                replacement["dtype"] = item["dtype"]
            transforms[index] = replacement
            return
    key = config.get("image_key") if isinstance(config.get("image_key"), str) else "image"
    transforms.insert(0, {"_target_": LOADER_TARGET, "keys": key, "ensure_channel_first": True})


@dataclass
class _Plan:
    """A bundle's inference config, rewritten for our run, and what was decided about it (plain data only)."""

    config: dict[str, Any]
    kind: str
    inferer_name: str
    labels_before_inversion: bool
    notes: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)


def plan_bundle(model: ModelInfo, options: Mapping[str, Any] | None = None) -> _Plan:
    """Read the config (JSON or YAML), apply overrides and shims, and refuse before any work what cannot run."""
    options = options or {}
    path = zoo.inference_config_path(model.package_dir)
    if path is None:
        raise ModelError(f"Model '{model.title}' has no configs/inference.json or configs/inference.yaml.")
    config = zoo.read_config(path)
    overrides = dict(options.get("overrides") or {})
    for key, value in overrides.items():
        _set_config_value(config, key, value, model.title)
    kind = zoo.bundle_kind(model.metadata, config)
    if kind == zoo.OTHER and model.task == "segmentation":  # the package states it; the metadata says too little
        kind = zoo.SEGMENTATION_3D
    zoo.refuse_unless_runnable(kind, model.title)
    notes: list[str] = []
    inferer_name = _target_name(config.get("inferer"))
    if inferer_name not in WINDOW_INFERERS + WHOLE_IMAGE_INFERERS + SLICE_INFERERS:
        raise ModelError(
            f"Model '{model.title}' uses the inferer {inferer_name or config.get('inferer')!r}, which this version "
            "cannot run (it runs SlidingWindowInferer, SimpleInferer and SliceInferer)."
        )
    if kind == zoo.SEGMENTATION_2D and inferer_name not in SLICE_INFERERS:
        given = dict(config.get("inferer") or {})
        roi = given.get("roi_size") if isinstance(given.get("roi_size"), list) else [-1, -1]
        config["inferer"] = {**{k: v for k, v in given.items() if k not in ("_target_", "roi_size")},
                             "_target_": "SliceInferer", "roi_size": roi[-2:], "spatial_dim": 2}
        notes.append("The bundle's 2-D network ran slice by slice over the volume's third axis (SliceInferer).")
        inferer_name = "SliceInferer"
    config = _compatibility_shims(config, notes)
    _replace_loader(config, model.title)
    post = config.get("postprocessing") or {"_target_": "Compose", "transforms": []}
    items = _transform_list(config, post)
    if _target_name(post) != "Compose" or items is None:
        raise ModelError(f"The postprocessing of model '{model.title}' is not a Compose of a list of transforms.")
    inverters = [index for index, item in enumerate(items) if _target_name(item) in INVERTERS]
    before = items[:inverters[0]] if inverters else []
    labels_before = any(_target_name(item) not in MODEL_GRID_TRANSFORMS for item in before)
    if labels_before:
        notes.append("The bundle makes labels on its model grid and then inverts them; here its probabilities are "
                     "inverted onto the input grid first (linear) and the labels are made there.")
    kept = [item for item in items if _target_name(item) not in WRITERS + INVERTERS]
    config["miadl_model_grid_post"] = {"_target_": "Compose", "transforms": [
        item for item in kept if _target_name(item) in MODEL_GRID_TRANSFORMS]}
    config["miadl_input_grid_post"] = {"_target_": "Compose", "transforms": [
        item for item in kept if _target_name(item) not in MODEL_GRID_TRANSFORMS]}
    config["miadl_pred_key"] = items[inverters[0]].get("keys", "pred") if inverters else "pred"
    return _Plan(config, kind, inferer_name, labels_before, notes, overrides)


# ------------------------------------------------------------------------------------------------ inference


def _windowed_predict(network: Any, image: torch.Tensor, window: Mapping[str, Any], device: torch.device,
                      progress: Callable[[float], None]) -> tuple[torch.Tensor, inference.InferenceReport]:
    """(K, X, Y, Z) float32 CPU output of the network over windows of a (C, X, Y, Z) CPU image, with its report.

    A padding mode other than zeros is applied here, exactly where and how MONAI's sliding window pads (an image
    smaller than the window, half before and half after), so the engine's windows never need padding."""
    original_size = tuple(image.shape[1:])
    roi = inference.resolve_roi(original_size, window["roi_size"])
    padding_mode, cval = str(window.get("padding_mode", "constant")), float(window.get("cval", 0.0))
    pad: list[int] = []
    if padding_mode != "constant" or cval != inference.PAD_VALUE:
        for size, size_roi in reversed(list(zip(image.shape[1:], roi))):
            diff = max(int(size_roi) - int(size), 0)
            pad.extend([diff // 2, diff - diff // 2])
    padded = any(pad)
    if padded:
        arguments = {"value": cval} if padding_mode == "constant" else {}
        image = torch.nn.functional.pad(image[None], pad, mode=padding_mode, **arguments)[0]
    config = inference.WindowedInferenceConfig(
        roi_size=tuple(roi), overlap=float(window["overlap"]), mode=str(window["mode"]),
        sigma_scale=float(window.get("sigma_scale", 0.125)), sw_batch_size=window["sw_batch_size"],
        skip_background=bool(window["skip_background"]), autocast=bool(window["autocast"]))
    output, report = inference.sliding_window_predict(network, image, config, device, progress)
    if padded:
        before = pad[::2][::-1]  # F.pad lists the last axis first
        crop = tuple(slice(start, start + int(size)) for start, size in zip(before, original_size))
        output = output[(slice(None), *crop)]
    return output.float(), report


def fallback_warning(fallbacks: list[str]) -> list[str]:
    """The inference engine's out-of-memory steps as one sentence for the user (none when nothing happened)."""
    if not fallbacks:
        return []
    steps = ", ".join(step.replace("GPU out of memory: ", "") for step in fallbacks)
    return [f"The GPU ran out of memory during inference and the run continued with: {steps} (slower, same result)."]


def _labels(prediction: torch.Tensor) -> np.ndarray:
    """(X, Y, Z) integer labels from the final prediction: one-hot or probabilities are reduced by argmax."""
    values = torch.as_tensor(prediction).detach().cpu()
    if values.shape[0] > 1:
        labels = values.argmax(dim=0)
    elif torch.is_floating_point(values) and not torch.equal(values, values.round()):
        labels = (values[0] > 0.5).to(torch.int64)  # one sigmoid channel left undiscretised
    else:
        labels = values[0].round().to(torch.int64)
    labels = labels.numpy()
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)


def _output_channels(metadata: Mapping[str, Any], config: Mapping[str, Any]) -> int | None:
    """How many channels the network outputs: metadata first, then the network_def's own count."""
    output = zoo.main_output(metadata)
    channel_def = output.get("channel_def") if isinstance(output.get("channel_def"), Mapping) else {}
    for value in (output.get("num_channels"), len(channel_def) or None):
        if isinstance(value, int) and value > 0:
            return value
    network_def = config.get("network_def") if isinstance(config.get("network_def"), Mapping) else {}
    for key in ("out_channels", "num_classes", "classes"):
        if isinstance(network_def.get(key), int) and network_def[key] > 0:
            return int(network_def[key])
    return None


def probe_channel_values(model_grid_post: Any, input_grid_post: Any, pred_key: str, channels: int) -> list[int]:
    """The label value each output channel becomes through the bundle's own postprocessing (no inversion): a
    (K, 2K, 2, 2) prediction where region c has only channel c on (+10, others -10)."""
    from monai.data import MetaTensor

    logits = torch.full((channels, 2 * channels, 2, 2), -PROBE_LOGIT)
    for channel in range(channels):
        logits[channel, 2 * channel:2 * channel + 2] = PROBE_LOGIT
    with torch.no_grad():
        data = input_grid_post(model_grid_post({pred_key: MetaTensor(logits, affine=torch.eye(4))}))
    labels = _labels(data[pred_key])
    return [int(np.bincount(labels[2 * c:2 * c + 2].ravel().astype(np.int64)).argmax()) for c in range(channels)]


def _size_multiple(network: Any, channels: int, device: torch.device) -> int | None:
    """The power of two its sizes must be a multiple of: the smallest m for which the network runs on 3·m voxels
    per axis (3·m is a multiple of 2^k exactly when m is, and keeps the deepest level more than one voxel wide for
    its normalisation layers)."""
    for multiple in (1, 2, 4, 8, 16, 32):
        size = 3 * multiple
        try:
            with torch.no_grad():
                network(torch.zeros((1, channels, size, size, size), device=device))
            return multiple
        except Exception:  # probing: any failure means "not this size"
            continue
    return None


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


@dataclass
class _Built:
    preprocessing: Any
    model_grid_post: Any
    input_grid_post: Any
    inferer: Any
    network: torch.nn.Module
    weights_file: Path
    image_key: str
    pred_key: str
    input_channels: list[str]
    segments: list[dict[str, Any]]


def _parse(parser: Any, section: str, model: ModelInfo, what: str) -> Any:
    try:
        return parser.get_parsed_content(section)
    except MIADLError:
        raise
    except Exception as error:
        raise model_failure(error, model.title, f"The {what} of model '{model.title}'", model.metadata,
                            model.package_dir) from error


def _build(model: ModelInfo, weight_paths: Mapping[str, Path], plan: _Plan, weights_choice: str | None) -> _Built:
    """Transforms, inferer and network on the CPU with the verified weights loaded (strict); inside
    `bundle_imports`. Every failure is one sentence with its root cause."""
    from monai.bundle import ConfigParser

    weights = _weight_file(model, weight_paths, weights_choice)
    state = None if weights.suffix.lower() in TORCHSCRIPT_SUFFIXES else load_state_dict(weights, model.title)
    try:
        parser = ConfigParser(copy.deepcopy(plan.config), globals={SAFE_LOAD_NAME: safe_torch_load})
        parser.read_meta(copy.deepcopy(dict(model.metadata)))
    except Exception as error:
        raise model_failure(error, model.title, f"Reading the configuration of model '{model.title}'",
                            model.metadata, model.package_dir) from error
    parser["bundle_root"] = str(model.package_dir)
    parser["device"] = torch.device("cpu")  # preprocessing runs on the CPU; the windows go to the run's device
    preprocessing = _parse(parser, "preprocessing", model, "preprocessing")
    model_grid_post = _parse(parser, "miadl_model_grid_post", model, "postprocessing")
    input_grid_post = _parse(parser, "miadl_input_grid_post", model, "postprocessing")
    inferer = _parse(parser, "inferer", model, "inferer") if "inferer" in parser.get() else None
    pred_key = _parse(parser, "miadl_pred_key", model, "postprocessing")
    pred_key = str(pred_key[0] if isinstance(pred_key, (list, tuple)) else pred_key)
    if type(preprocessing).__name__ != "Compose":
        raise ModelError(f"The preprocessing of model '{model.title}' is not a Compose of transforms.")
    loaders = [transform for transform in getattr(preprocessing, "transforms", ()) if isinstance(transform, SitkLoadd)]
    if len(loaders) != 1 or len(loaders[0].keys) != 1:
        raise ModelError(f"Model '{model.title}' loads images under several keys; only bundles with one image key "
                         "(one or several files stacked as channels) run here.")
    image_key = str(loaders[0].keys[0])
    if state is None:
        with warnings.catch_warnings():  # torch 2.13 deprecates torch.jit.load itself
            warnings.simplefilter("ignore", DeprecationWarning)
            network = torch.jit.load(str(weights), map_location="cpu")
    else:
        if "network_def" not in parser.get():
            raise ModelError(f"The inference config of model '{model.title}' has no 'network_def' section.")
        network = _parse(parser, "network_def", model, "network_def")
        if not isinstance(network, torch.nn.Module):
            raise ModelError(f"The network_def of model '{model.title}' does not build a torch module.")
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ModelError(
                f"Weight file {weights.name} of model '{model.title}' does not fit the network_def of its "
                "inference config (missing or unexpected parameters)."
            ) from error
    channels = _output_channels(model.metadata, plan.config)
    segments = segments_from_metadata(model.metadata)
    if channels:
        try:
            segments = segments_from_channels(
                model.metadata, probe_channel_values(model_grid_post, input_grid_post, pred_key, channels))
        except Exception as error:  # a probe that cannot run keeps the channel = value reading
            failure = model_failure(error, model.title, f"The postprocessing of model '{model.title}'",
                                    model.metadata, model.package_dir)
            if isinstance(failure, MissingPackages):
                raise failure from error
            plan.notes.append(f"The label value of each output channel could not be probed ({root_cause(error)}); "
                              "channel c was taken as label value c.")
    return _Built(preprocessing, model_grid_post, input_grid_post, inferer, network.eval(), weights, image_key,
                  pred_key, zoo.input_channel_names(model.metadata, image_key), segments)


def check_bundle(model: ModelInfo, weight_paths: dict[str, Path], options: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Build a bundle on the CPU as a run would (transforms, inferer, network, weights loaded strictly), so an
    import can refuse what would fail later. Returns {"segments", "input_channels", "kind", "notes"}; raises
    ModelError (MissingPackages when a Python package is missing) with one sentence naming the root cause."""
    _require_monai(model.title)
    options = {**model.slicer.get("options", {}), **(options or {})}
    plan = plan_bundle(model, options)
    with bundle_imports(model.package_dir):
        built = _build(model, weight_paths, plan, options.get("weights"))
    return {"segments": built.segments, "input_channels": built.input_channels, "kind": plan.kind,
            "notes": list(plan.notes)}


class MonaiBundle:
    """A single-network segmentation bundle: the bundle's transforms around our windowed inference."""

    def __init__(self, model: ModelInfo, weight_paths: dict[str, Path], device: torch.device,
                 options: dict | None = None):
        options = options or {}
        self.model_title = model.title
        self.metadata = model.metadata
        self.bundle_root = Path(model.package_dir)
        self.device = device
        _require_monai(model.title)
        self.plan = plan_bundle(model, options)
        with bundle_imports(self.bundle_root):
            built = _build(model, weight_paths, self.plan, options.get("weights"))
        self.preprocessing, self.model_grid_post = built.preprocessing, built.model_grid_post
        self.input_grid_post, self.inferer = built.input_grid_post, built.inferer
        self.image_key, self.pred_key = built.image_key, built.pred_key
        self.input_channels, self.segments = built.input_channels, built.segments
        self.weights_file = built.weights_file
        self.kind, self.notes = self.plan.kind, list(self.plan.notes)
        self.slices_2d = self.plan.inferer_name in SLICE_INFERERS  # a 2-D image may run as a one-slice volume
        self.window = self._window_parameters(built.inferer, options, device)
        self.network = built.network.to(device)
        self._model_grid: tuple[int, ...] = ()

    def _window_parameters(self, inferer: Any, options: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        """ROI size, overlap, blending, sigma and padding from the bundle's SlidingWindowInferer (run options
        override them); the bundle's batch size on CUDA only (on the CPU the engine sizes it)."""
        windowed = self.plan.inferer_name in WINDOW_INFERERS
        roi_size = getattr(inferer, "roi_size", None) if windowed else None
        batch = getattr(inferer, "sw_batch_size", None) if windowed and device.type == "cuda" else None
        window = {
            "roi_size": tuple(int(n) for n in roi_size) if roi_size is not None else None,  # None: whole image
            "overlap": float(getattr(inferer, "overlap", 0.5)) if windowed else 0.0,
            "mode": str(getattr(inferer, "mode", "gaussian")) if windowed else "constant",
            "sigma_scale": float(np.mean(getattr(inferer, "sigma_scale", 0.125))) if windowed else 0.125,
            "padding_mode": str(getattr(inferer, "padding_mode", "constant")) if windowed else "constant",
            "cval": float(getattr(inferer, "cval", 0.0)) if windowed else 0.0,
            "sw_batch_size": int(batch) if batch else None,
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

    def predict(self, image: sitk.Image | Sequence[sitk.Image], progress: ProgressCallback = _no_progress
                ) -> dict[str, Any]:
        """Label image (uint8/uint16) on the input's own grid, plus any fallback the inference had to take.

        `image`: one volume, a multi-component volume, or a list of volumes on one grid (one per input channel)."""
        try:
            with bundle_imports(self.bundle_root):
                return self._predict(image, progress)
        except MIADLError:
            raise
        except Exception as error:
            if _is_out_of_memory(error):
                raise  # the task layer retries on the CPU
            raise self._run_failure(error) from error

    def _run_failure(self, error: BaseException) -> ModelError:
        cause = root_cause(error)
        if "Sizes of tensors must match" in cause or "must match the size of tensor" in cause:
            grid = "×".join(str(n) for n in self._model_grid)
            multiple = None
            if self.plan.inferer_name not in SLICE_INFERERS:
                multiple = _size_multiple(self.network, max(len(self.input_channels), 1), self.device)
            need = (f"it needs every size to be a multiple of {multiple}" if multiple else
                    "its down-sampling cannot halve every size evenly")
            return ModelError(f"The network of model '{self.model_title}' cannot run on the {grid} grid its "
                              f"preprocessing made from this image: {need} (crop or pad the image, or set a window "
                              "size that is).")
        return model_failure(error, self.model_title, f"Running model '{self.model_title}'", self.metadata,
                             self.bundle_root)

    def _inputs(self, image: sitk.Image | Sequence[sitk.Image]) -> list[sitk.Image]:
        """The scalar images of one run, checked against the bundle's channel count and against one grid."""
        images = channel_images(image)
        expected = self.input_channels
        if expected and len(images) != len(expected):
            raise InputError(
                f"Model '{self.model_title}' needs {len(expected)} input image(s), one per channel in this order: "
                f"{', '.join(expected)}; {len(images)} were given."
            )
        first = images[0]
        for index, other in enumerate(images[1:], start=2):
            if other.GetSize() != first.GetSize() or not (
                    np.allclose(other.GetSpacing(), first.GetSpacing(), atol=1e-6)
                    and np.allclose(other.GetOrigin(), first.GetOrigin(), atol=GRID_TOLERANCE_MM)
                    and np.allclose(other.GetDirection(), first.GetDirection(), atol=1e-6)):
                raise InputError(f"Input image {index} of model '{self.model_title}' is not on the first image's grid "
                                 "(size, spacing, origin and direction must be the same); resample it first.")
        return images

    def _predict(self, image: sitk.Image | Sequence[sitk.Image], progress: ProgressCallback) -> dict[str, Any]:
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        images = self._inputs(image)
        progress("preprocess", 0.12, "Running the bundle's preprocessing")
        with torch.no_grad():
            data = self.preprocessing({self.image_key: images if len(images) > 1 else images[0]})
        model_input = data[self.image_key]
        if not isinstance(model_input, MetaTensor) or model_input.ndim != 4:
            raise InputError("The model's preprocessing did not produce a single 3D volume with channels.")
        self._model_grid = tuple(int(n) for n in model_input.shape[1:])
        window = dict(self.window)
        progress("inference", 0.2, f"Running the network on a {self._model_grid} grid")
        tensor = model_input.as_tensor().float().cpu()
        if self.plan.inferer_name in SLICE_INFERERS:
            output, report = self._slice_predict(tensor)
        else:
            if window["roi_size"] is None:
                window["roi_size"] = self._model_grid

            def window_progress(fraction: float) -> None:
                progress("inference", 0.2 + 0.6 * min(max(fraction, 0.0), 1.0),
                         f"Windows of {window['roi_size']} voxels: {100 * fraction:.0f} %")

            output, report = _windowed_predict(self.network, tensor, window, self.device, window_progress)
        if torch.device(report.device).type != self.device.type:  # the engine's last fallback left it on the CPU
            self.device = torch.device(report.device)
        progress("postprocess", 0.82, "Resampling probabilities onto the input grid")
        data[self.pred_key] = MetaTensor(output)
        invert = Invertd(keys=self.pred_key, transform=self.preprocessing, orig_keys=self.image_key,
                         nearest_interp=False, to_tensor=True)
        with torch.no_grad():
            data = self.input_grid_post(invert(self.model_grid_post(data)))
        prediction = data[self.pred_key]
        check_on_input_grid(prediction, images[0], self.model_title)
        labels = _labels(prediction)
        label = image_from_ijk_array(labels, images[0])
        details = {
            "name": PIPELINE_NAME,
            "kind": self.kind,
            "weights_file": self.weights_file.name,
            "inferer": self.plan.inferer_name or "none (whole image)",
            "config_overrides": dict(self.plan.overrides),
            "input_channels": list(self.input_channels),
            "deliberate_differences": list(self.notes),
            "window": {key: (list(value) if isinstance(value, tuple) else value) for key, value in window.items()},
            "model_grid": list(self._model_grid),
            "inference": {"device": report.device, "runtime": report.runtime, "precision": report.precision,
                          "sw_batch_size": report.sw_batch_size, "windows_total": report.windows_total,
                          "windows_evaluated": report.windows_evaluated, "fallbacks": list(report.fallbacks),
                          "notes": list(report.notes)},
        }
        segments = complete_segments(self.segments, np.unique(labels).tolist())
        return {"label": label, "warnings": fallback_warning(report.fallbacks), "provenance": details,
                "segments": segments}

    def _slice_predict(self, tensor: torch.Tensor) -> tuple[torch.Tensor, inference.InferenceReport]:
        """The bundle's own SliceInferer (a 2-D network slice by slice) on our device."""
        started = time.perf_counter()
        with torch.no_grad():
            output = self.inferer(inputs=tensor[None].to(self.device), network=self.network)
        if not isinstance(output, torch.Tensor):
            raise ModelError(f"The network of model '{self.model_title}' returned {type(output).__name__}; a "
                             "segmentation run needs one tensor.")
        output = output[0].float().cpu()
        slices = int(tensor.shape[1 + int(getattr(self.inferer, "spatial_dim", 2))])
        report = inference.InferenceReport(
            device=str(self.device), sw_batch_size=int(getattr(self.inferer, "sw_batch_size", 1)),
            windows_total=slices, windows_evaluated=slices, seconds=time.perf_counter() - started)
        return output, report
