"""The synthesis logic behind the DL Synthesis module (Qt-free: the headless tests and the demo run exactly it).

One Apply: check the input node -> export it -> worker (thick slices -> 1 mm volume, optional uncertainty and
difference maps) -> new volume nodes beside the input, shown with the input's window, each carrying provenance and,
in its description, the notice that it is synthesized. Nothing touches the scene before the worker has succeeded; the
import runs inside a SceneGuard, so a failed or cancelled run leaves the scene exactly as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import slicer

from MIADeepLearningLib.engine import errors, registry
from MIADeepLearningLib.mrml.provenance import set_provenance
from MIADeepLearningLib.mrml.scene_guard import SceneGuard
from MIADeepLearningLib.mrml.task_run import EventCallback, TaskLogic, TaskRun
from MIADeepLearningLib.mrml.volumes import place_beside, read_unattached_volume

DISCLAIMER = ("Synthesized image: computed by a neural network from a thick-slice acquisition, not measured at this "
              "resolution. Not for diagnosis on its own; compare with the acquired image.")
DESCRIPTION_ATTRIBUTE = "MIADeepLearning.Description"


@dataclass
class SynthesisResult:
    volume_node: Any
    uncertainty_node: Any | None
    difference_node: Any | None
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    model_cached: bool = False


def _add_volume(path: str, name: str, input_volume, existing=None):
    """A new scalar volume beside the input, or `existing` (the user's choice) refilled with the file's voxels."""
    loaded = read_unattached_volume(path, labelmap=False)
    scene = input_volume.GetScene() or slicer.mrmlScene
    if existing is not None:
        existing.SetAndObserveImageData(loaded.GetImageData())
        existing.CopyOrientation(loaded)
        return existing
    loaded.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(loaded)
    loaded.CreateDefaultDisplayNodes()
    place_beside(loaded, input_volume)
    return loaded


class SynthesisRun(TaskRun):
    """A started synthesis run (see TaskRun)."""

    def __init__(self, worker, input_volume, model: registry.ModelInfo, output_volume, started_at: float,
                 export_seconds: float):
        super().__init__(worker, input_volume, model, started_at, export_seconds)
        self.output_volume = output_volume

    def _import(self, result: dict[str, Any]) -> SynthesisResult:
        import_started = time.perf_counter()
        input_name = self.input_volume.GetName()
        suffix = self.model.slicer.get("output_name_suffix", "synthesized")
        provenance = dict(result["provenance"])
        files = result["outputs"]
        with SceneGuard():
            volume = _add_volume(files["image"], f"{input_name} {suffix}", self.input_volume, self.output_volume)
            self._copy_display(volume)
            uncertainty = difference = None
            if "uncertainty" in files:
                uncertainty = _add_volume(files["uncertainty"], f"{input_name} {suffix} uncertainty",
                                          self.input_volume)
            if "difference" in files:
                difference = _add_volume(files["difference"], f"{input_name} {suffix} minus B-spline",
                                         self.input_volume)
                self._centre_window(difference)
            timings = self._timings(result, import_started)
            provenance["timings_s"] = timings
            provenance["input_node"] = input_name
            for node in filter(None, [volume, uncertainty, difference]):
                set_provenance(node, provenance)
                node.SetAttribute(DESCRIPTION_ATTRIBUTE, DISCLAIMER)
                node.SetDescription(DISCLAIMER)
        return SynthesisResult(volume, uncertainty, difference, provenance, list(result.get("warnings", [])), timings,
                               bool(result.get("model_cached", False)))

    @staticmethod
    def _centre_window(node) -> None:
        """A difference map is signed: a window symmetric around 0 shows where the network added or removed signal."""
        display = node.GetDisplayNode()
        image = node.GetImageData()
        if display is None or image is None:
            return
        low, high = image.GetScalarRange()
        width = max(abs(low), abs(high), 1e-6)
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(width, 0.0)


class SynthesisLogic(TaskLogic):
    """Starts synthesis runs for volume nodes. `python_executable` is PythonSlicer inside Slicer; with `warm_worker`
    runs go through that long-lived worker, which keeps the model loaded."""

    TASK = "synthesis"

    def start(self, input_volume, model_id: str, device: str = "auto", output_volume=None,
              create_uncertainty: bool = False, create_difference: bool = False, timeout_s: float | None = None,
              on_event: EventCallback | None = None, worker_env: dict[str, str] | None = None) -> SynthesisRun:
        """Validate, export and launch; raises InputError/ModelError before anything is started or created."""
        started_at = time.perf_counter()
        model = self._checked_model(input_volume, model_id)
        if output_volume is not None:
            if not output_volume.IsA("vtkMRMLScalarVolumeNode") or output_volume.IsA("vtkMRMLLabelMapVolumeNode"):
                raise errors.InputError(f"Output node '{output_volume.GetName()}' is not a scalar volume.")
            if output_volume is input_volume:
                raise errors.InputError("The output volume must not be the input volume; choose another or a new one.")
        outputs = {"image": "synthesized.nrrd"}
        if create_uncertainty:
            outputs["uncertainty"] = "uncertainty.nrrd"
        if create_difference:
            outputs["difference"] = "difference.nrrd"
        worker, export_seconds = self._launch("synthesize", input_volume, model, outputs, device, timeout_s, on_event,
                                              worker_env)
        return SynthesisRun(worker, input_volume, model, output_volume, started_at, export_seconds)

    def run(self, input_volume, model_id: str, device: str = "auto", output_volume=None,
            create_uncertainty: bool = False, create_difference: bool = False, timeout_s: float | None = None,
            on_event: EventCallback | None = None, worker_env: dict[str, str] | None = None) -> SynthesisResult:
        """Blocking variant for scripts, tests and the demo."""
        run = self.start(input_volume, model_id, device, output_volume, create_uncertainty, create_difference,
                         timeout_s, on_event, worker_env)
        run.wait()
        return run.finish()
