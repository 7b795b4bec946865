"""Task runners shared by the worker and the CLI: model resolution and verification, input checks, inference with
device fallback, and provenance — everything between "a file and a model id" and "images on the input grid"."""

from __future__ import annotations

import datetime
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

from MIADeepLearningLib import __version__
from MIADeepLearningLib.engine import checks, imageio, registry
from MIADeepLearningLib.engine.brain_extraction import BrainExtraction
from MIADeepLearningLib.engine.brain_tissue import PIPELINE_NAME as TISSUE_PIPELINE
from MIADeepLearningLib.engine.brain_tissue import BrainTissueSegmentation
from MIADeepLearningLib.engine.bundles import PIPELINE_NAME as BUNDLE_PIPELINE
from MIADeepLearningLib.engine.bundles import MonaiBundle
from MIADeepLearningLib.engine.devices import choose_device
from MIADeepLearningLib.engine.errors import ModelError
from MIADeepLearningLib.engine.synthesis import PIPELINE_NAME as SYNTHESIS_PIPELINE
from MIADeepLearningLib.engine.synthesis import ThickSliceSuperResolution

ProgressCallback = Callable[[str, float, str], None]

# pipeline name in a package's metadata -> class with __init__(model, weight_paths, device, options), to(device),
# predict(image, progress) -> {"label": sitk.Image on the input grid, ...} (segmentation) or {"image": ...} (synthesis)
# A pipeline may also have `segments` (the labels it found in its package) and return "warnings" (one sentence each),
# "provenance" (a JSON-able dict of what it decided) and optional outputs on the same grid (a segmentation's
# "uncertainty", when the options ask for it and the package lists it in slicer.optional_outputs) from predict.
PIPELINES = {"deepbet_brain_extraction": BrainExtraction, BUNDLE_PIPELINE: MonaiBundle,
             SYNTHESIS_PIPELINE: ThickSliceSuperResolution, TISSUE_PIPELINE: BrainTissueSegmentation}
PipelineCache = dict  # (model id, device, options) -> loaded pipeline; a warm worker keeps one between jobs


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


def _read_and_check(image_path: str | Path, model: registry.ModelInfo, progress: ProgressCallback,
                    timings: dict[str, float], warnings: list[str]) -> sitk.Image:
    mark = time.perf_counter()
    progress("read_input", 0.08, "Reading the input image")
    image = imageio.read_image(image_path)
    timings["read_input"] = time.perf_counter() - mark
    mark = time.perf_counter()
    progress("checks", 0.1, "Checking the input against what the model expects")
    for warning in checks.check_input(image, model.metadata):
        warnings.append(warning)
        progress("checks", 0.1, f"Warning: {warning}")
    timings["checks"] = time.perf_counter() - mark
    return image


def _predict(loaded: _LoadedPipeline, image: sitk.Image, progress: ProgressCallback, warnings: list[str],
             pipeline_cache: PipelineCache | None) -> tuple[dict[str, Any], torch.device]:
    """pipeline.predict, run again on the CPU when the GPU runs out of memory."""
    try:
        return loaded.pipeline.predict(image, progress), loaded.choice.device
    except RuntimeError as error:
        if not (loaded.choice.is_cuda and _is_out_of_memory(error)):
            raise
    torch.cuda.empty_cache()
    warnings.append("The GPU ran out of memory; the model was run again on the CPU (slower, same result).")
    progress("inference", 0.1, warnings[-1])
    if pipeline_cache is not None:  # the cached entry is for the GPU; this one now lives on the CPU
        pipeline_cache.pop(loaded.cache_key, None)
    cpu = torch.device("cpu")
    return loaded.pipeline.to(cpu).predict(image, progress), cpu


def _provenance(loaded: _LoadedPipeline, device_used: torch.device, input_name: str, warnings: list[str],
                outputs: dict[str, Any]) -> dict[str, Any]:
    model = loaded.model
    provenance = {
        "model_id": model.id,
        "model_title": model.title,
        "model_version": model.version,
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
    return provenance


def _run_model(task: str, image_path: str | Path, model_id: str, device: str, options: dict | None,
               progress: ProgressCallback, pipeline_cache: PipelineCache | None, requested: tuple[str, ...] = ()
               ) -> tuple[_LoadedPipeline, sitk.Image, dict[str, Any], torch.device, list[str], dict[str, float]]:
    """Load (or reuse) the model, read and check the input, predict with the OOM fallback; timings per stage."""
    timings: dict[str, float] = {}
    warnings: list[str] = []
    started = time.perf_counter()
    progress("load_model", 0.02, f"Loading model {model_id}")
    loaded = _load_pipeline(model_id, task, device, options, pipeline_cache, requested)
    timings["load_model"] = time.perf_counter() - started
    image = _read_and_check(image_path, loaded.model, progress, timings, warnings)
    mark = time.perf_counter()
    outputs, device_used = _predict(loaded, image, progress, warnings, pipeline_cache)
    warnings.extend(outputs.get("warnings", []))
    timings["inference"] = time.perf_counter() - mark
    return loaded, image, outputs, device_used, warnings, timings


def segment_image(image_path: str | Path, model_id: str, device: str = "auto", options: dict | None = None,
                  create_masked_volume: bool = False, progress: ProgressCallback = _no_progress,
                  input_name: str | None = None, pipeline_cache: PipelineCache | None = None) -> SegmentationOutput:
    """Run a segmentation model on one image file; outputs are on the input's grid.

    `options` may ask for an uncertainty map ({"uncertainty": True}) from a model that lists "uncertainty" in its
    slicer.optional_outputs. With a `pipeline_cache`, a model loaded (and verified) by an earlier call on the same
    device is reused.
    """
    requested = ("uncertainty",) if (options or {}).get("uncertainty") else ()
    loaded, image, outputs, device_used, warnings, timings = _run_model(
        "segmentation", image_path, model_id, device, options, progress, pipeline_cache, requested)
    if requested and outputs.get("uncertainty") is None:  # metadata that promises what its pipeline cannot make
        raise ModelError(f"Model '{loaded.model.title}' lists an uncertainty map, but its pipeline made none.")
    masked = masked_volume(image, outputs["label"]) if create_masked_volume else None
    provenance = _provenance(loaded, device_used, input_name or Path(image_path).name, warnings, outputs)
    segments = getattr(loaded.pipeline, "segments", None) or loaded.model.segments
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
                     pipeline_cache: PipelineCache | None = None) -> SynthesisOutput:
    """Run a synthesis model on one image file; the output grid is the pipeline's (e.g. 1 mm over the input's extent).

    `options` may ask for the optional outputs: {"uncertainty": True, "difference": True}.
    """
    loaded, _, outputs, device_used, warnings, timings = _run_model(
        "synthesis", image_path, model_id, device, options, progress, pipeline_cache)
    provenance = _provenance(loaded, device_used, input_name or Path(image_path).name, warnings, outputs)
    return SynthesisOutput(outputs["image"], outputs.get("uncertainty"), outputs.get("difference"), provenance,
                           warnings, timings)
