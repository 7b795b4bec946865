"""The segmentation logic behind the DL Segmentation module, Qt-free so the headless tests and the demo run exactly it.

One Apply: check the input node -> export it to NRRD in a job folder -> worker process -> import the label file as
a segmentation node (names, colours, terminology, closed surface) and, optionally, the skull-stripped volume, the
model's uncertainty map (for models that list it in slicer.optional_outputs) and a table of segment volumes ->
provenance on every output. Nothing touches the scene before the worker has succeeded, and the import runs inside
a SceneGuard, so a failed or cancelled run leaves the scene exactly as it was.

By default every run starts its own worker process (clean state, all memory freed afterwards). With a
`runner.WarmWorker` the runs go through one long-lived worker that keeps the model loaded, which saves the worker
start-up and the model load on every run after the first; the files, events and results are the same.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from MIADeepLearningLib import runner
from MIADeepLearningLib.engine import errors, registry
from MIADeepLearningLib.mrml.provenance import set_provenance
from MIADeepLearningLib.mrml.scene_guard import SceneGuard
from MIADeepLearningLib.mrml.segment_volumes import volume_table
from MIADeepLearningLib.mrml.segmentations import segmentation_from_label_file
from MIADeepLearningLib.mrml.source_files import verify_source_file
from MIADeepLearningLib.mrml.task_run import EventCallback, TaskLogic, TaskRun, launch
from MIADeepLearningLib.mrml.volumes import check_input_volume, export_volume, read_volume_file


@dataclass
class SegmentationResult:
    segmentation_node: Any
    masked_volume_node: Any | None
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    model_cached: bool = False  # a warm worker reused the model it had loaded for an earlier run
    uncertainty_node: Any | None = None  # voxel-wise uncertainty in [0, 1] on the input grid, when asked for
    volume_table_node: Any | None = None  # one row per segment: name, voxels, mL, when asked for


class SegmentationRun(TaskRun):
    """A started segmentation run (see TaskRun): the import makes the segmentation and the optional outputs."""

    def __init__(self, worker: runner.WorkerProcess | runner.WarmJob, input_volume, model: registry.ModelInfo,
                 output_segmentation, create_masked_volume: bool, started_at: float, export_seconds: float,
                 create_volume_table: bool = False, extra_volumes: Sequence[Any] = ()):
        super().__init__(worker, input_volume, model, started_at, export_seconds)
        self.extra_volumes = list(extra_volumes)
        self.output_segmentation = output_segmentation
        self.create_masked_volume = create_masked_volume
        self.create_volume_table = create_volume_table

    def _import(self, result: dict[str, Any]) -> SegmentationResult:
        import_started = time.perf_counter()
        input_name = self.input_volume.GetName()
        slicer_meta = self.model.slicer
        provenance = dict(result["provenance"])
        outputs = result["outputs"]
        name = f"{input_name} {slicer_meta.get('output_name_suffix', self.model.id)}"
        masked_node = uncertainty_node = table_node = None
        with SceneGuard():
            segmentation = segmentation_from_label_file(
                outputs["label"], self.input_volume, result["segments"], name=name,
                segmentation_node=self.output_segmentation,
            )
            if self.create_masked_volume and "masked" in outputs:
                masked_node = read_volume_file(
                    outputs["masked"], f"{input_name} {slicer_meta.get('masked_name_suffix', 'masked')}",
                    reference=self.input_volume,
                )
                self._copy_display(masked_node)
            if "uncertainty" in outputs:
                uncertainty_node = read_volume_file(outputs["uncertainty"], f"{name} uncertainty",
                                                    reference=self.input_volume)
                _show_as_fraction(uncertainty_node)
            if self.create_volume_table:
                table_node = volume_table(segmentation, self.input_volume, f"{name} volumes")
            timings = self._timings(result, import_started)
            provenance["timings_s"] = timings
            provenance["input_node"] = input_name
            if self.extra_volumes:
                provenance["extra_input_nodes"] = [node.GetName() for node in self.extra_volumes]
            for node in filter(None, [segmentation, masked_node, uncertainty_node, table_node]):
                set_provenance(node, provenance)
        return SegmentationResult(segmentation, masked_node, provenance, list(result.get("warnings", [])), timings,
                                  bool(result.get("model_cached", False)), uncertainty_node, table_node)


def _show_as_fraction(volume_node) -> None:
    """A map of values in [0, 1] (0 certain, 1 undecided) is shown over exactly that range, so maps of different runs
    look alike, instead of with an automatic window fitted to each."""
    display = volume_node.GetDisplayNode()
    if display is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, 1.0)


class SegmentationLogic(TaskLogic):
    """Starts segmentation runs for volume nodes. `python_executable` is PythonSlicer inside Slicer.

    With `warm_worker`, runs go through that long-lived worker (its own python and environment apply); without,
    each run starts a worker process of its own.
    """

    TASK = "segmentation"

    def start(self, input_volume, model_id: str, device: str = "auto", output_segmentation=None,
              create_masked_volume: bool = False, timeout_s: float | None = None,
              on_event: EventCallback | None = None, worker_env: dict[str, str] | None = None,
              create_uncertainty: bool = False, create_volume_table: bool = False,
              extra_volumes: Sequence[Any] | None = None, model_options: dict[str, Any] | None = None
              ) -> SegmentationRun:
        """Validate, export and launch; raises InputError/ModelError before anything is started or created.

        `extra_volumes`: the model's further input channels, in its order (a BraTS bundle: T1, T2, FLAIR after the
        input's T1c), each on the input's grid; a model that takes several channels needs exactly that many.
        `model_options`: run options of the model (an imported bundle's config "overrides" and "weights" file).
        `create_uncertainty` needs a model that lists "uncertainty" in slicer.optional_outputs; `create_volume_table`
        adds a table of segment volumes after the import. `worker_env` (tests: fault injection) needs a worker
        process of its own, so it cannot go with a warm worker.
        """
        started_at = time.perf_counter()
        model = self._checked_model(input_volume, model_id)
        if output_segmentation is not None and not output_segmentation.IsA("vtkMRMLSegmentationNode"):
            raise errors.InputError(f"Output node '{output_segmentation.GetName()}' is not a segmentation node.")
        if create_uncertainty and "uncertainty" not in model.optional_outputs:
            raise errors.ModelError(f"Model '{model.title}' makes no uncertainty map.")
        outputs = {"label": "label.nrrd"}
        if create_masked_volume:
            outputs["masked"] = "masked.nrrd"
        if create_uncertainty:
            outputs["uncertainty"] = "uncertainty.nrrd"
        extras = self._checked_channels(input_volume, model, extra_volumes)
        roles = {"image": input_volume, **{f"image{index}": node for index, node in enumerate(extras, start=2)}}

        def export(folder: Path) -> dict[str, str]:
            return {role: str(export_volume(node, folder / f"{role}.nrrd")) for role, node in roles.items()}

        options: dict[str, Any] = {}
        if extras:
            options["input_names"] = {role: node.GetName() for role, node in roles.items()}
        if model_options:
            options["model_options"] = dict(model_options)
        worker, export_seconds = launch("segment", input_volume, model, outputs, device, options, self.jobs_root,
                                        self.python_executable, self.warm_worker, timeout_s, on_event, worker_env,
                                        export_inputs=export if extras else None, remote_server=self.remote_server)
        return SegmentationRun(worker, input_volume, model, output_segmentation, create_masked_volume,
                               started_at, export_seconds, create_volume_table, extras)

    @staticmethod
    def _checked_channels(input_volume, model: registry.ModelInfo, extra_volumes: Sequence[Any] | None) -> list[Any]:
        """The extra channel volumes as sent: as many as the model takes besides the input, each another volume
        than the input and the others, unchanged since loaded (the engine checks they share the input's grid)."""
        extras = [node for node in extra_volumes or () if node is not None]
        channels = model.input_channels
        needed = max(len(channels) - 1, 0)
        if len(extras) != needed:
            if needed == 0:
                raise errors.InputError(f"Model '{model.title}' takes one volume; remove the extra input volumes.")
            raise errors.InputError(
                f"Model '{model.title}' takes {len(channels)} volumes ({', '.join(channels)}): select the input "
                f"({channels[0]}) and {needed} more ({', '.join(channels[1:])}), {len(extras)} given.")
        for index, node in enumerate(extras):
            if node is input_volume or any(node is other for other in extras[:index]):
                raise errors.InputError(f"'{node.GetName()}' is selected twice; each channel of the model needs a "
                                        "volume of its own.")
            check_input_volume(node)
            verify_source_file(node, role=f"input channel '{channels[index + 1]}'")
        return extras

    def run(self, input_volume, model_id: str, device: str = "auto", output_segmentation=None,
            create_masked_volume: bool = False, timeout_s: float | None = None,
            on_event: EventCallback | None = None, worker_env: dict[str, str] | None = None,
            create_uncertainty: bool = False, create_volume_table: bool = False,
            extra_volumes: Sequence[Any] | None = None, model_options: dict[str, Any] | None = None
            ) -> SegmentationResult:
        """Blocking variant for scripts, tests and the demo."""
        run = self.start(input_volume, model_id, device, output_segmentation, create_masked_volume, timeout_s,
                         on_event, worker_env, create_uncertainty, create_volume_table, extra_volumes, model_options)
        run.wait()
        return run.finish()
