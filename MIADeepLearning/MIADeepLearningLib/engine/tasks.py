"""Task runners shared by the worker and the CLI: model resolution and verification, input checks, inference with
device fallback, and provenance — everything between "a file and a model id" and "images on the input grid".

Input type check: a package that states the scan types it is made for (``slicer.accepted_types``) gets its input
classified by the sequence-type model when that model is installed (TYPE_CHECK_MODEL; its weights verify), and a
volume that looks like another type adds one warning sentence to the run (never a refusal) and its type to the
provenance (``input_type``). A missing classifier, or anything failing inside the check, skips it silently: the check
must never cost a run. ``MIADL_TYPE_CHECK=0`` (or ``type_check=False``) turns it off.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from MIADeepLearningLib import __version__
from MIADeepLearningLib.engine import affine, checks, displacement, imageio, memory, registration, registry
from MIADeepLearningLib.engine.brain_extraction import BrainExtraction
from MIADeepLearningLib.engine.brain_tissue import PIPELINE_NAME as TISSUE_PIPELINE
from MIADeepLearningLib.engine.brain_tissue import BrainTissueSegmentation
from MIADeepLearningLib.engine.bundles import PIPELINE_NAME as BUNDLE_PIPELINE
from MIADeepLearningLib.engine.bundles import MonaiBundle
from MIADeepLearningLib.engine.classification import PIPELINE_NAME as CLASSIFICATION_PIPELINE
from MIADeepLearningLib.engine.classification import (
    WARNING_MIN_PROBABILITY,
    Classification,
    SequenceClassifier,
    mismatch_warning,
)
from MIADeepLearningLib.engine.detection import PIPELINE_NAME as DETECTION_PIPELINE
from MIADeepLearningLib.engine.detection import LesionDetection
from MIADeepLearningLib.engine.devices import choose_device
from MIADeepLearningLib.engine.errors import InputError, MIADLError, ModelError
from MIADeepLearningLib.engine.registration import PIPELINE_NAME as REGISTRATION_PIPELINE
from MIADeepLearningLib.engine.registration import DeformableRegistration
from MIADeepLearningLib.engine.synthesis import PIPELINE_NAME as SYNTHESIS_PIPELINE
from MIADeepLearningLib.engine.synthesis import ThickSliceSuperResolution

ProgressCallback = Callable[[str, float, str], None]

# pipeline name in a package's metadata -> class with __init__(model, weight_paths, device, options), to(device),
# predict(image, progress) -> {"label": sitk.Image on the input grid, ...} (segmentation) or {"image": ...} (synthesis),
# or, for registration, register(fixed, moving, fixed_mask, moving_mask, progress) -> {"field": vector image on the
# fixed grid, "affine": ..., "warnings": [...], "provenance": {...}} (engine/registration.py).
# A pipeline may also have `segments` (the labels it found in its package) and return "warnings" (one sentence each),
# "provenance" (a JSON-able dict of what it decided) and optional outputs on the same grid (a segmentation's
# "uncertainty", when the options ask for it and the package lists it in slicer.optional_outputs) from predict.
# A classification pipeline has classify(image, saliency, progress) -> engine.classification.Classification.
# A detection pipeline's predict also takes extra_images=[(name, sitk.Image), ...] (co-registered contrasts) and
# returns "anomaly", "label", "brain", "candidates", "case_score", "threshold", "segments" (engine/detection.py).
PIPELINES = {"deepbet_brain_extraction": BrainExtraction, BUNDLE_PIPELINE: MonaiBundle,
             SYNTHESIS_PIPELINE: ThickSliceSuperResolution, TISSUE_PIPELINE: BrainTissueSegmentation,
             REGISTRATION_PIPELINE: DeformableRegistration,
             CLASSIFICATION_PIPELINE: SequenceClassifier, DETECTION_PIPELINE: LesionDetection}
# Pipelines without a measured memory bound of their own that run like one that has it: lesion detection is the
# tissue network with one more class and no intensity refinement, so the tissue bound (which counts the
# refinement's float64 arrays) is taken for its first input; extra contrasts (one float32 copy each on that grid, run
# one after the other) are not counted. Borrowed, not measured.
MEMORY_BOUND_OF = {DETECTION_PIPELINE: TISSUE_PIPELINE}
PipelineCache = dict  # (model id, device, options) -> loaded pipeline; a warm worker keeps one between jobs

TYPE_CHECK_MODEL = "sequence-type"  # the classifier behind the input type check, when installed
TYPE_CHECK_ENV = "MIADL_TYPE_CHECK"  # "0" (or false, no, off) turns the input type check off
# Pipeline cache keys of helper models another task uses (the type check's classifier) start with this tag: model
# ids cannot (registry schema), and a warm worker neither counts nor evicts them as the job's model.
AUXILIARY_CACHE_TAG = "@auxiliary"

_log = logging.getLogger(__name__)


def _no_progress(stage: str, fraction: float, message: str) -> None:
    """Default progress sink."""


@dataclass
class SegmentationOutput:
    label: sitk.Image
    masked: sitk.Image | None
    segments: list[dict[str, Any]]
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    uncertainty: sitk.Image | None = None  # only when asked for ({"uncertainty": True}) and the model makes one


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def masked_volume(image: sitk.Image, label: sitk.Image) -> sitk.Image:
    """The input with everything outside the label set to the image minimum, in the input's pixel type."""
    background = float(sitk.GetArrayViewFromImage(image).min())
    masked = sitk.Mask(image, label, outsideValue=background)
    masked.CopyInformation(image)
    return masked


@dataclass
class _LoadedPipeline:
    model: registry.ModelInfo
    pipeline: Any
    choice: Any  # devices.DeviceChoice
    options: dict[str, Any]
    cache_key: tuple


def _load_pipeline(model_id: str, task: str, device: str, options: dict | None,
                   pipeline_cache: PipelineCache | None, requested: tuple[str, ...] = ()) -> _LoadedPipeline:
    """Resolve and verify the model, pick the device, and build (or reuse) its pipeline. `requested`: optional
    outputs asked for, refused before anything runs unless the model lists them in slicer.optional_outputs."""
    model = registry.get_model(model_id)
    if model.task != task:
        raise ModelError(f"Model '{model.title}' is a {model.task or 'unknown'} model, not a {task} model.")
    missing = [name for name in requested if name not in model.optional_outputs]
    if missing:
        raise ModelError(f"Model '{model.title}' makes no {' or '.join(missing)} map.")
    pipeline_class = PIPELINES.get(model.pipeline)
    if pipeline_class is None:
        raise ModelError(f"Model '{model.title}' needs pipeline '{model.pipeline}', which this version does not have.")
    choice = choose_device(device)
    run_options = {**model.slicer.get("options", {}), **(options or {})}
    cache_key = (model.id, str(choice.device), json.dumps(run_options, sort_keys=True, default=str))
    pipeline = pipeline_cache.get(cache_key) if pipeline_cache is not None else None
    if pipeline is None:
        weight_paths = registry.verified_weight_paths(model)
        pipeline = pipeline_class(model, weight_paths, choice.device, run_options)
        if pipeline_cache is not None:
            pipeline_cache[cache_key] = pipeline
    return _LoadedPipeline(model, pipeline, choice, run_options, cache_key)


def _check_memory(loaded: _LoadedPipeline, paths: dict[str, str | Path | None]) -> None:
    """Refuse (InputError, one sentence) a run whose peak memory, estimated from the input files' headers, exceeds
    the memory available: before any voxel is read, so a whole-body CT fails in a second with advice instead of
    swapping for minutes and being killed (engine/memory.py; MIADL_AVAILABLE_MEMORY_GB overrides the figure)."""
    model_bytes = sum(weight.size or 0 for weight in loaded.model.weights)
    spacing = getattr(loaded.pipeline, "working_spacing", None)  # the 2 mm grids of tissue and registration
    pipeline = MEMORY_BOUND_OF.get(loaded.model.pipeline, loaded.model.pipeline)
    memory.check_files(pipeline, paths, loaded.options, model_bytes,
                       float(spacing) if isinstance(spacing, (int, float)) else None)


def _read_and_check(image_path: str | Path, model: registry.ModelInfo, progress: ProgressCallback,
                    timings: dict[str, float], warnings: list[str], name: str = "The input volume",
                    fractions: tuple[float, float] = (0.08, 0.1), channel_paths: Sequence[str | Path] = (),
                    slices_2d: bool = False) -> sitk.Image:
    """Read one input and run the structure checks (InputError sentences start with `name`); timings add up over
    the inputs of a run; progress at `fractions` (reading, checks). `channel_paths`: more images that are further
    channels of the same input (a multi-channel bundle), each on the first one's grid; they are stacked into one
    multi-component volume before the checks, which then see the channels the model's metadata asks for."""
    mark = time.perf_counter()
    progress("read_input", fractions[0], "Reading the input image")
    image = imageio.read_image(image_path)
    if image.GetDimension() == 2 and slices_2d:
        raise InputError(f"{name} is a single 2-D image; model '{model.title}' runs its 2-D network slice by slice "
                         "over a 3-D volume, so give it the stack of slices as one volume.")
    if channel_paths:
        image = stack_channels(image, [imageio.read_image(path) for path in channel_paths], name)
    timings["read_input"] = timings.get("read_input", 0.0) + time.perf_counter() - mark
    mark = time.perf_counter()
    progress("checks", fractions[1], "Checking the input against what the model expects")
    for warning in checks.check_input(image, model.metadata, name):
        warnings.append(warning)
        progress("checks", fractions[1], f"Warning: {warning}")
    timings["checks"] = timings.get("checks", 0.0) + time.perf_counter() - mark
    return image


def stack_channels(first: sitk.Image, others: Sequence[sitk.Image], name: str = "The input volume") -> sitk.Image:
    """One multi-component float32 volume from scalar images on one grid (a bundle's list of input files); an image
    on another grid is refused in one sentence (the model sees voxels, so the channels must line up voxel for
    voxel, and resampling them silently would hide a wrong pick)."""
    images = [first, *others]
    for index, image in enumerate(images, start=1):
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"Input image {index} of {name.lower()} has several components per voxel; give one "
                             "scalar volume per channel.")
        if index > 1 and not imageio.same_grid(first, image, tolerance=1e-4):
            raise InputError(f"Input image {index} is not on the grid of the first input image (size, spacing, "
                             "origin and direction must be the same); resample it onto the first one first.")
    return sitk.Compose([sitk.Cast(image, sitk.sitkFloat32) for image in images])


def _run_with_cpu_fallback(loaded: _LoadedPipeline, run: Callable[[Any], dict[str, Any]], progress: ProgressCallback,
                           warnings: list[str], pipeline_cache: PipelineCache | None
                           ) -> tuple[dict[str, Any], torch.device]:
    """run(pipeline), run again with the pipeline on the CPU when the GPU runs out of memory."""
    try:
        return run(loaded.pipeline), loaded.choice.device
    except RuntimeError as error:
        if not (loaded.choice.is_cuda and _is_out_of_memory(error)):
            raise
    torch.cuda.empty_cache()
    warnings.append("The GPU ran out of memory; the model was run again on the CPU (slower, same result).")
    progress("inference", 0.1, warnings[-1])
    if pipeline_cache is not None:  # the cached entry is for the GPU; this one now lives on the CPU
        pipeline_cache.pop(loaded.cache_key, None)
    cpu = torch.device("cpu")
    return run(loaded.pipeline.to(cpu)), cpu


def _predict(loaded: _LoadedPipeline, image: sitk.Image, progress: ProgressCallback, warnings: list[str],
             pipeline_cache: PipelineCache | None, extra_images: Sequence[tuple[str, sitk.Image]] = ()
             ) -> tuple[dict[str, Any], torch.device]:
    """pipeline.predict, run again on the CPU when the GPU runs out of memory; `extra_images` (name, image) only
    for pipelines that take more inputs (detection)."""
    extra = {"extra_images": list(extra_images)} if extra_images else {}
    return _run_with_cpu_fallback(loaded, lambda pipeline: pipeline.predict(image, progress, **extra), progress,
                                  warnings, pipeline_cache)


def _provenance(loaded: _LoadedPipeline, device_used: torch.device, input_name: str, warnings: list[str],
                outputs: dict[str, Any]) -> dict[str, Any]:
    model = loaded.model
    provenance = {
        "model_id": model.id,
        "model_title": model.title,
        "model_version": model.version,
        # built-in (shipped), registry (downloaded, checksums pinned in the extension) or imported (code the user
        # confirmed when importing it)
        "model_origin": model.origin_kind,
        "weights_sha256": {weight.role: weight.sha256 for weight in model.weights},
        "device": str(device_used),
        "device_reason": loaded.choice.reason,
        "parameters": loaded.options,
        "input": input_name,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extension_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "warnings": warnings,
    }
    if outputs.get("provenance"):  # what the pipeline decided (e.g. a bundle's windows and inference report)
        provenance["pipeline"] = outputs["provenance"]
    if outputs.get("input_type"):  # what the input type check found (per input for a registration)
        provenance["input_type"] = outputs["input_type"]
    return provenance


def _run_model(task: str, image_path: str | Path, model_id: str, device: str, options: dict | None,
               progress: ProgressCallback, pipeline_cache: PipelineCache | None, requested: tuple[str, ...] = (),
               type_check: bool | None = None, extra_paths: Sequence[tuple[str, str | Path]] = (),
               channel_paths: Sequence[str | Path] = ()
               ) -> tuple[_LoadedPipeline, sitk.Image, dict[str, Any], torch.device, list[str], dict[str, float]]:
    """Load (or reuse) the model, read and check the input (its type too), predict with the OOM fallback; timings
    per stage. outputs["input_type"]: what the type check found, when it ran. `extra_paths` (name, path): more
    inputs for the pipeline (detection), read and checked as the first one; the type check sees the first only.
    `channel_paths`: further channels of the first input (see `_read_and_check`)."""
    timings: dict[str, float] = {}
    warnings: list[str] = []
    started = time.perf_counter()
    progress("load_model", 0.02, f"Loading model {model_id}")
    loaded = _load_pipeline(model_id, task, device, options, pipeline_cache, requested)
    timings["load_model"] = time.perf_counter() - started
    _check_memory(loaded, {"image": image_path})
    image = _read_and_check(image_path, loaded.model, progress, timings, warnings, channel_paths=channel_paths,
                            slices_2d=bool(getattr(loaded.pipeline, "slices_2d", False)))
    extra_images = [(name, _read_and_check(path, loaded.model, progress, timings, warnings,
                                           f"The extra input {name}", (0.1, 0.1))) for name, path in extra_paths]
    input_type = check_input_type(loaded, {"image": image}, progress, warnings, timings, pipeline_cache, type_check)
    mark = time.perf_counter()
    outputs, device_used = _predict(loaded, image, progress, warnings, pipeline_cache, extra_images)
    warnings.extend(outputs.get("warnings", []))
    timings["inference"] = time.perf_counter() - mark
    if input_type:
        outputs = {**outputs, "input_type": input_type["image"]}
    return loaded, image, outputs, device_used, warnings, timings


def segment_image(image_path: str | Path, model_id: str, device: str = "auto", options: dict | None = None,
                  create_masked_volume: bool = False, progress: ProgressCallback = _no_progress,
                  input_name: str | None = None, pipeline_cache: PipelineCache | None = None,
                  type_check: bool | None = None, extra_image_paths: Sequence[str | Path] | None = None
                  ) -> SegmentationOutput:
    """Run a segmentation model on one image file; outputs are on the input's grid.

    `options` may ask for an uncertainty map ({"uncertainty": True}) from a model that lists "uncertainty" in its
    slicer.optional_outputs. With a `pipeline_cache`, a model loaded (and verified) by an earlier call on the same
    device is reused. `type_check`: False skips the input type check (None: on unless MIADL_TYPE_CHECK=0).
    `extra_image_paths`: the further input channels of a multi-channel model (a MONAI bundle's list of files, in
    the order of its metadata's channel names), each on the first image's grid or refused in one sentence.
    """
    requested = ("uncertainty",) if (options or {}).get("uncertainty") else ()
    extra = [Path(path) for path in (extra_image_paths or ())]
    loaded, image, outputs, device_used, warnings, timings = _run_model(
        "segmentation", image_path, model_id, device, options, progress, pipeline_cache, requested, type_check,
        channel_paths=extra)
    if requested and outputs.get("uncertainty") is None:  # metadata that promises what its pipeline cannot make
        raise ModelError(f"Model '{loaded.model.title}' lists an uncertainty map, but its pipeline made none.")
    if extra:  # the masked volume is of the first image, not of the stacked channels
        image = sitk.VectorIndexSelectionCast(image, 0)
    masked = masked_volume(image, outputs["label"]) if create_masked_volume else None
    names = [input_name or Path(image_path).name, *(path.name for path in extra)]
    provenance = _provenance(loaded, device_used, names[0] if not extra else ", ".join(names), warnings, outputs)
    # the run's own segments first (a bundle names every value its output holds), then the pipeline's, the model's
    segments = outputs.get("segments") or getattr(loaded.pipeline, "segments", None) or loaded.model.segments
    return SegmentationOutput(outputs["label"], masked, segments, provenance, warnings, timings,
                              outputs.get("uncertainty"))


@dataclass
class SynthesisOutput:
    image: sitk.Image
    uncertainty: sitk.Image | None
    difference: sitk.Image | None
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def synthesize_image(image_path: str | Path, model_id: str, device: str = "auto", options: dict | None = None,
                     progress: ProgressCallback = _no_progress, input_name: str | None = None,
                     pipeline_cache: PipelineCache | None = None, type_check: bool | None = None) -> SynthesisOutput:
    """Run a synthesis model on one image file; the output grid is the pipeline's (e.g. 1 mm over the input's extent).

    `options` may ask for the optional outputs: {"uncertainty": True, "difference": True}. `type_check` as in
    segment_image.
    """
    loaded, _, outputs, device_used, warnings, timings = _run_model(
        "synthesis", image_path, model_id, device, options, progress, pipeline_cache, (), type_check)
    provenance = _provenance(loaded, device_used, input_name or Path(image_path).name, warnings, outputs)
    return SynthesisOutput(outputs["image"], outputs.get("uncertainty"), outputs.get("difference"), provenance,
                           warnings, timings)


@dataclass
class RegistrationOutput:
    field: sitk.Image  # float64 3-vector image on the fixed grid, LPS mm, ITK resampling convention, affine included
    warped: sitk.Image  # the moving image resampled linearly onto the fixed grid through the field (float32)
    warped_labels: sitk.Image | None  # the moving label map through the field by nearest neighbour (its pixel type)
    report: dict[str, Any]  # Jacobian statistics of the field (and Dice with label maps): see register_images
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    affine: sitk.Transform | None = None  # the affine pre-alignment alone (fixed point -> moving point)


REGISTRATION_ROLES = ("fixed", "moving", "fixed_mask", "moving_mask", "moving_labels", "fixed_labels")


def _finite(value: float, digits: int = 6) -> float | None:
    """JSON has no NaN: a label absent from both maps has no Dice."""
    return None if value != value else round(float(value), digits)


def _dice_entry(scores: dict[int, float]) -> tuple[dict[str, float | None], float | None]:
    values = [score for score in scores.values() if score == score]
    mean = float(np.mean(values)) if values else float("nan")
    return {str(label): _finite(score) for label, score in scores.items()}, _finite(mean)


def registration_report(fixed: sitk.Image, field_image: sitk.Image, affine_transform: sitk.Transform | None,
                        fixed_mask: sitk.Image | None = None, moving_labels: sitk.Image | None = None,
                        fixed_labels: sitk.Image | None = None, warped_labels: sitk.Image | None = None
                        ) -> dict[str, Any]:
    """What a registration is judged by, on the fixed grid: the Jacobian determinant of the TOTAL field over the
    fixed foreground (the mask when given, else affine.foreground(fixed)) — % of voxels with det <= 0 (folds),
    the std of log det (SDlogJ: how unevenly it stretches), mean, min, max — and, with both label maps, the Dice per
    label after registration, before it (the moving labels on the fixed grid as they are, identity in physical
    space) and after the affine alone, each with its mean over the labels present."""
    region = fixed_mask if fixed_mask is not None else affine.foreground(fixed)
    inside = sitk.GetArrayViewFromImage(region) > 0
    stats = displacement.jacobian_stats(displacement.jacobian_determinant(field_image), inside)
    report: dict[str, Any] = {
        "jacobian_non_positive_percent": _finite(stats.non_positive_percent),
        "jacobian_log_std": _finite(stats.log_std),
        "jacobian_mean": _finite(stats.mean),
        "jacobian_min": _finite(stats.minimum),
        "jacobian_max": _finite(stats.maximum),
        "jacobian_voxels": stats.voxels,
        "jacobian_region": "fixed mask" if fixed_mask is not None else "fixed foreground",
    }
    if moving_labels is not None and fixed_labels is not None and warped_labels is not None:
        fixed_values = sitk.GetArrayViewFromImage(fixed_labels)
        labels = sorted(int(value) for value in np.union1d(np.unique(fixed_values),
                                                             np.unique(sitk.GetArrayViewFromImage(moving_labels)))
                        if value != 0)
        identity = sitk.Resample(moving_labels, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                 moving_labels.GetPixelID())
        stages = {"dice": warped_labels, "dice_before": identity}
        if affine_transform is not None:
            stages["dice_affine"] = sitk.Resample(moving_labels, fixed, affine_transform, sitk.sitkNearestNeighbor, 0,
                                                  moving_labels.GetPixelID())
        for key, labels_on_fixed in stages.items():
            scores, mean = _dice_entry(displacement.dice_per_label(sitk.GetArrayViewFromImage(labels_on_fixed),
                                                                   fixed_values, labels))
            report[key], report[f"{key}_mean"] = scores, mean
    return report


def register_images(fixed_path: str | Path, moving_path: str | Path, model_id: str, device: str = "auto",
                    options: dict | None = None, fixed_mask_path: str | Path | None = None,
                    moving_mask_path: str | Path | None = None, moving_labels_path: str | Path | None = None,
                    fixed_labels_path: str | Path | None = None, progress: ProgressCallback = _no_progress,
                    input_names: dict[str, str] | None = None,
                    pipeline_cache: PipelineCache | None = None, type_check: bool | None = None) -> RegistrationOutput:
    """Register the moving image file to the fixed one; every output lies on the fixed image's grid.

    Masks (optional, on their image's grid) restrict the affine metric and the Jacobian statistics; a moving label
    map is propagated by nearest neighbour, and with a fixed label map too the report gets Dice before and after.
    `options` go to the pipeline (engine/registration.py: deformable, instance_steps, instance_lr,
    instance_smoothness, similarity, orientation) over the package's slicer.options. `input_names`: role -> name
    for the provenance (default: the file names). InputError for inputs that cannot be registered. `type_check` as
    in segment_image (both images are checked; provenance["input_type"] has one entry per image)."""
    timings: dict[str, float] = {}
    warnings: list[str] = []
    started = time.perf_counter()
    progress("load_model", 0.02, f"Loading model {model_id}")
    loaded = _load_pipeline(model_id, "registration", device, options, pipeline_cache)
    timings["load_model"] = time.perf_counter() - started

    paths = {"fixed": fixed_path, "moving": moving_path, "fixed_mask": fixed_mask_path,
             "moving_mask": moving_mask_path, "moving_labels": moving_labels_path, "fixed_labels": fixed_labels_path}
    if fixed_labels_path is not None and moving_labels_path is None:
        raise InputError("A fixed label map is only used with a moving label map (to measure Dice); give both.")
    _check_memory(loaded, paths)
    mark = time.perf_counter()
    progress("read_input", 0.06, "Reading the fixed and moving images")
    images = {role: imageio.read_image(path) for role, path in paths.items() if path is not None}
    timings["read_input"] = time.perf_counter() - mark

    mark = time.perf_counter()
    progress("checks", 0.1, "Checking the inputs")
    fixed, moving = images["fixed"], images["moving"]
    registration.check_pair(fixed, moving, images.get("fixed_mask"), images.get("moving_mask"))
    for role, reference, name in (("moving_labels", moving, "the moving image"),
                                  ("fixed_labels", fixed, "the fixed image")):
        if role in images:
            what = "The moving label map" if role == "moving_labels" else "The fixed label map"
            registration.check_on_grid(images[role], reference, what, name)
    for role, name in (("fixed", "The fixed image"), ("moving", "The moving image")):
        for warning in checks.check_input(images[role], loaded.model.metadata, name):
            warnings.append(warning)
            progress("checks", 0.1, f"Warning: {warning}")
    timings["checks"] = time.perf_counter() - mark
    input_type = check_input_type(loaded, {"fixed": fixed, "moving": moving}, progress, warnings, timings,
                                  pipeline_cache, type_check)

    mark = time.perf_counter()
    outputs, device_used = _run_with_cpu_fallback(
        loaded, lambda pipeline: pipeline.register(fixed, moving, images.get("fixed_mask"), images.get("moving_mask"),
                                                   progress), progress, warnings, pipeline_cache)
    warnings.extend(outputs.get("warnings", []))
    timings["inference"] = time.perf_counter() - mark
    if input_type:
        outputs = {**outputs, "input_type": input_type}

    mark = time.perf_counter()
    progress("postprocess", 0.9, "Warping the moving image and measuring the field")
    field_image = outputs["field"]
    warped = displacement.warp_image(moving, fixed, field_image)
    moving_labels = images.get("moving_labels")
    warped_labels = displacement.warp_labels(moving_labels, fixed, field_image) if moving_labels is not None else None
    report = registration_report(fixed, field_image, outputs.get("affine"), images.get("fixed_mask"), moving_labels,
                                 images.get("fixed_labels"), warped_labels)
    timings["postprocess"] = time.perf_counter() - mark

    names = {role: Path(path).name for role, path in paths.items() if path is not None}
    names.update(input_names or {})
    provenance = _provenance(loaded, device_used, names["fixed"], warnings, outputs)
    provenance["inputs"] = names
    provenance["report"] = report
    return RegistrationOutput(field_image, warped, warped_labels, report, provenance, warnings, timings,
                              outputs.get("affine"))


# ------------------------------------------------------------------------------------------- input type check


def type_check_enabled(type_check: bool | None = None) -> bool:
    """`type_check` when given; else on unless MIADL_TYPE_CHECK is 0, false, no or off."""
    if type_check is not None:
        return bool(type_check)
    return os.environ.get(TYPE_CHECK_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def is_auxiliary_cache_key(key: Any) -> bool:
    """A pipeline cache entry of a helper model (the type check's classifier), not a job's own model."""
    return isinstance(key, tuple) and bool(key) and key[0] == AUXILIARY_CACHE_TAG


def _type_classifier(device: torch.device, pipeline_cache: PipelineCache | None) -> Any:
    """The type check's classifier on `device`: from the cache, else resolved, verified and loaded (ModelError when
    it is not installed, its weights do not verify or it is no classifier)."""
    key = (AUXILIARY_CACHE_TAG, TYPE_CHECK_MODEL, str(device))
    pipeline = pipeline_cache.get(key) if pipeline_cache is not None else None
    if pipeline is not None:
        return pipeline
    model = registry.get_model(TYPE_CHECK_MODEL)
    pipeline_class = PIPELINES.get(model.pipeline)
    if model.task != "classification" or not hasattr(pipeline_class, "classify"):
        raise ModelError(f"Model '{model.title}' is no scan type classifier.")
    pipeline = pipeline_class(model, registry.verified_weight_paths(model), device,
                              dict(model.slicer.get("options", {})))
    if pipeline_cache is not None:
        pipeline_cache[key] = pipeline
    return pipeline


def check_input_type(loaded: _LoadedPipeline, images: dict[str, sitk.Image], progress: ProgressCallback,
                     warnings: list[str], timings: dict[str, float], pipeline_cache: PipelineCache | None = None,
                     type_check: bool | None = None) -> dict[str, dict[str, Any]] | None:
    """Classify the already-read, already-checked inputs (role -> image) with the sequence-type model when the run's
    package states its accepted types and the classifier is installed; a mismatch adds one warning sentence per
    image. Returns role -> {"label", "probability", "model", "version"} for the provenance, or None when the check
    did not run. Never raises: a check that fails is skipped (logged at debug level), the run goes on."""
    accepted = loaded.model.accepted_types
    if not accepted or not images or not type_check_enabled(type_check):
        return None
    mark = time.perf_counter()
    try:
        classifier = _type_classifier(loaded.choice.device, pipeline_cache)
        found: dict[str, dict[str, Any]] = {}
        sentences = []
        progress("checks", 0.11, f"Checking the input type with the {classifier.model.title} model")
        for role, image in images.items():
            result = classifier.classify(image, saliency=False)
            subject = "this" if len(images) == 1 else f"the {role} image"
            sentence = mismatch_warning(result, accepted, loaded.model.title, subject=subject,
                                        min_probability=float(classifier.options.get(
                                            "warning_min_probability", WARNING_MIN_PROBABILITY)))
            if sentence:
                sentences.append(sentence)
            found[role] = {"label": result.label, "probability": round(result.probability, 4),
                           "model": classifier.model.id, "version": classifier.model.version}
    except Exception as error:  # the check is an aid: whatever goes wrong in it must not cost the run
        _log.debug("Input type check skipped: %s", error, exc_info=True)
        return None
    finally:
        timings["type_check"] = time.perf_counter() - mark
    for sentence in sentences:
        warnings.append(sentence)
        progress("checks", 0.12, f"Warning: {sentence}")
    return found


# ------------------------------------------------------------------------------------------------ classification

CLASSIFICATION_FIELDS = ("label", "probabilities", "ood", "reasons", "error", "timings")


@dataclass
class ClassificationOutput:
    """classify_images' result: one entry per input, in order (see classify_images), and the run's provenance."""

    results: list[dict[str, Any]]
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [entry for entry in self.results if entry["error"] is not None]


def _error_entry(path: str | Path, name: str, error: str, timings: dict[str, float]) -> dict[str, Any]:
    return {"input": str(path), "name": name, "label": None, "probabilities": {}, "ood": False, "reasons": [],
            "error": error, "timings": timings, "saliency": None}


def classify_images(paths: Sequence[str | Path], model_id: str = TYPE_CHECK_MODEL, device: str = "auto",
                    saliency: bool | Sequence[bool] = False, progress: ProgressCallback = _no_progress,
                    pipeline_cache: PipelineCache | None = None, input_names: Sequence[str] | None = None,
                    on_result: Callable[[int, dict[str, Any]], None] | None = None) -> ClassificationOutput:
    """Classify every image file with a classification model loaded once; a volume that fails is recorded and the
    others go on.

    Each entry of ``results``: ``{"input": path, "name", "label": a CLASSES string or None on error,
    "probabilities": {class: p} (sum 1), "ood": bool, "reasons": [sentence parts], "error": None or one sentence,
    "timings": {stage: seconds}, "saliency": sitk.Image on the input's grid or None}``. `saliency`: one flag for
    all inputs or one per input (the model must list "saliency" in slicer.optional_outputs). A volume gets the same
    structure checks (and the same InputError sentences) as the other tasks' inputs. Problems with the model or
    device raise before any volume is read. `on_result(index, entry)` is called as each entry is made; the entry
    then keeps no saliency image (the callback writes it), so a long batch does not hold every map in memory.
    """
    paths = list(paths)
    flags = [bool(saliency)] * len(paths) if isinstance(saliency, bool) else [bool(flag) for flag in saliency]
    if len(flags) != len(paths):
        raise ValueError("saliency needs one flag per input")
    names = list(input_names) if input_names is not None else [Path(path).name for path in paths]
    timings: dict[str, float] = {}
    warnings: list[str] = []
    started = time.perf_counter()
    progress("load_model", 0.02, f"Loading model {model_id}")
    loaded = _load_pipeline(model_id, "classification", device, None, pipeline_cache,
                            ("saliency",) if any(flags) else ())
    if not hasattr(loaded.pipeline, "classify"):
        raise ModelError(f"Model '{loaded.model.title}' has no classification pipeline.")
    timings["load_model"] = time.perf_counter() - started
    device_used = loaded.choice.device
    results: list[dict[str, Any]] = []
    count = max(1, len(paths))
    for index, (path, name, want_saliency) in enumerate(zip(paths, names, flags)):
        def step(stage: str, fraction: float, message: str, index: int = index, name: str = name) -> None:
            overall = 0.05 + 0.9 * (index + max(0.0, min(1.0, fraction))) / count
            progress(stage, overall, f"[{index + 1}/{len(paths)}] {name}: {message}")

        entry, device_used = _classify_one(loaded, path, name, want_saliency, step, warnings, pipeline_cache,
                                           device_used)
        if on_result is not None:
            on_result(index, entry)
            entry = {**entry, "saliency": None}
        results.append(entry)
    timings["classify"] = time.perf_counter() - started - timings["load_model"]
    outputs: dict[str, Any] = {}
    provenance = _provenance(loaded, device_used, ", ".join(names), warnings, outputs)
    provenance["inputs"] = names
    provenance["classifications"] = {name: {key: entry[key] for key in ("label", "probabilities", "ood", "error")}
                                     for name, entry in zip(names, results)}
    return ClassificationOutput(results, provenance, warnings, timings)


def _classify_one(loaded: _LoadedPipeline, path: str | Path, name: str, saliency: bool, progress: ProgressCallback,
                  warnings: list[str], pipeline_cache: PipelineCache | None, device_used: torch.device
                  ) -> tuple[dict[str, Any], torch.device]:
    """One volume: read, structure checks, classification (CPU fallback on GPU out-of-memory); an InputError or an
    unexpected failure becomes the entry's error sentence."""
    timings: dict[str, float] = {}
    mark = time.perf_counter()
    try:
        _check_memory(loaded, {"image": path})
        progress("read_input", 0.0, "Reading the volume")
        image = imageio.read_image(path)
        timings["read_input"] = time.perf_counter() - mark
        progress("checks", 0.05, "Checking the volume")
        imageio.check_scalar_volume(image, "The input volume")  # the sentences checks.check_structure gives
        mark = time.perf_counter()
        outputs, device_used = _run_with_cpu_fallback(
            loaded, lambda pipeline: {"result": pipeline.classify(image, saliency=saliency, progress=progress)},
            progress, warnings, pipeline_cache)
        result: Classification = outputs["result"]
        timings["classify"] = time.perf_counter() - mark
        timings.update(result.timings)
    except MIADLError as error:
        return _error_entry(path, name, str(error), timings), device_used
    except Exception as error:  # one bad volume must not end the others' classification
        _log.debug("Classification of %s failed", path, exc_info=True)
        return _error_entry(path, name, f"Unexpected error ({type(error).__name__}: {error}).", timings), device_used
    entry = {"input": str(path), "name": name, "label": result.label,
             "probabilities": {key: float(value) for key, value in result.probabilities.items()},
             "ood": bool(result.ood), "reasons": list(result.reasons), "error": None,
             "timings": {key: round(float(value), 4) for key, value in timings.items()}, "saliency": result.saliency}
    return entry, device_used


# ----------------------------------------------------------------------------------------------------- detection

DETECTION_MODEL = "brain-lesion"


@dataclass
class DetectionOutput:
    """detect_lesions' result: every map on the FIRST input's grid, the ranked candidates and the provenance."""

    anomaly: sitk.Image  # float32 0-1: the lesion probability (combined over the inputs)
    label: sitk.Image  # uint16: 0 no candidate, k = candidate k
    brain: sitk.Image  # uint8: the brain map used (1 CSF, 2 gray matter, 3 white matter)
    candidates: list[dict[str, Any]]  # engine.candidates.CANDIDATE_FIELDS, by decreasing max score
    case_score: float  # mean anomaly of the most anomalous millilitre of brain
    threshold: float
    segments: list[dict[str, Any]]  # one per candidate: value, name, color, terminology
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def detect_lesions(image_paths: Sequence[str | Path], model_id: str = DETECTION_MODEL, device: str = "auto",
                   options: dict | None = None, progress: ProgressCallback = _no_progress,
                   pipeline_cache: PipelineCache | None = None, type_check: bool | None = None,
                   input_names: Sequence[str] | None = None) -> DetectionOutput:
    """Run a detection model on one image file, or on several co-registered contrasts of one visit (the first is
    the reference: the others are resampled onto its grid, and refused when they cover too little of its head).

    Every input gets the structure checks of the other tasks; the input type check sees the first. `options`
    override the package's (threshold, min_volume_mm3, combine, flip_average ...). `input_names` name the inputs
    in the provenance and in messages (default: the file names). InputError for an input that cannot be used (a
    volume that is no brain MRI included); ModelError for a model or option that cannot be."""
    paths = list(image_paths)
    if not paths:
        raise InputError("Lesion detection needs at least one input volume.")
    names = [str(name) for name in input_names] if input_names is not None else [Path(path).name for path in paths]
    if len(names) != len(paths):
        raise ValueError("input_names needs one name per input")
    loaded, _, outputs, device_used, warnings, timings = _run_model(
        "detection", paths[0], model_id, device, options, progress, pipeline_cache, (), type_check,
        list(zip(names[1:], paths[1:])))
    provenance = _provenance(loaded, device_used, names[0], warnings, outputs)
    provenance.update(inputs=names, threshold=outputs["threshold"], case_score=outputs["case_score"],
                      candidates=len(outputs["candidates"]))
    if "min_volume_mm3" in (outputs.get("provenance") or {}):  # with the threshold: what the candidates used
        provenance["min_volume_mm3"] = outputs["provenance"]["min_volume_mm3"]
    return DetectionOutput(outputs["anomaly"], outputs["label"], outputs["brain"], list(outputs["candidates"]),
                           float(outputs["case_score"]), float(outputs["threshold"]), list(outputs["segments"]),
                           provenance, warnings, timings)
