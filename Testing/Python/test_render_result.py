"""What a clinician sees: after brain extraction the slice view shows the Brain overlay inside the brain and nowhere
outside the head, and the 3D view shows the brain surface where the brain is, zoomed to it on request; a synthesized
volume is shown with its input's window. Rendered offscreen (OSMesa) by Slicer's own displayable managers."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
from helpers import thick_blob_volume

from MIADeepLearningLib.mrml import rendering
from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic
from MIADeepLearningLib.mrml.segmentations import label_array
from MIADeepLearningLib.mrml.synthesis_logic import SynthesisLogic
from MIADeepLearningLib.mrml.volumes import ijk_to_ras
from MIADeepLearningLib.testing import scenarios


def _mask_at(mask: np.ndarray, volume, ras: np.ndarray) -> np.ndarray:
    """Mask values (0 outside the volume) at RAS points (N×3), nearest voxel."""
    ijk = np.rint(np.linalg.solve(ijk_to_ras(volume), np.c_[ras, np.ones(len(ras))].T)[:3]).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.array(mask.shape[::-1])[:, None]), axis=0)
    values = np.zeros(len(ras), mask.dtype)
    values[inside] = mask[ijk[2, inside], ijk[1, inside], ijk[0, inside]]
    return values


@pytest.mark.slow
def test_slice_and_3d_views_show_the_brain(scene, tmp_path):
    scenarios.require_model()
    head, _ = scenarios.load_sample_head()
    result = SegmentationLogic().run(head, scenarios.MODEL_ID, device="cpu")
    segmentation = result.segmentation_node
    brain = label_array(segmentation, "Brain", head)
    head_mask = (slicer.util.arrayFromVolume(head) > 60).astype(np.uint8)  # scalp and everything inside
    centre_ijk = np.argwhere(brain).mean(axis=0)[::-1]
    centre_ras = (ijk_to_ras(head) @ np.append(centre_ijk, 1.0))[:3]

    display = segmentation.GetDisplayNode()
    display.SetVisibility2DFill(True)
    display.SetOpacity2DFill(0.6)
    with_overlay = rendering.render_slice_png(tmp_path / "slice.png", head, "Axial", offset_ras=centre_ras).astype(int)
    display.SetVisibility(False)
    without_overlay = rendering.render_slice_png(None, head, "Axial", offset_ras=centre_ras).astype(int)
    display.SetVisibility(True)
    assert (tmp_path / "slice.png").stat().st_size > 1000

    changed = np.abs(with_overlay - without_overlay).sum(axis=-1) > 12
    rows, cols = np.nonzero(changed)
    assert rows.size > 5000, f"only {rows.size} pixels show the overlay"
    in_brain = _mask_at(brain, head, rendering.slice_pixels_to_ras(rows, cols))
    in_head = _mask_at(head_mask, head, rendering.slice_pixels_to_ras(rows, cols))
    assert in_brain.mean() > 0.97, f"{100 * (1 - in_brain.mean()):.1f} % of overlay pixels lie outside the brain"
    assert in_head.mean() > 0.999, "overlay pixels outside the head"
    colour = np.array(segmentation.GetSegmentation().GetSegment("Brain").GetColor())
    tint = (with_overlay[changed] - without_overlay[changed]).mean(axis=0)
    assert np.argmin(tint) == np.argmin(colour), f"overlay tint {tint} does not follow the segment colour {colour}"

    image = rendering.render_3d_png(tmp_path / "threed.png")
    background = image[2, 2].astype(int)
    foreground = np.abs(image.astype(int) - background).sum(axis=-1) > 60
    row, col = rendering.threed_ras_to_pixel(centre_ras)
    window = foreground[int(row) - 20:int(row) + 21, int(col) - 20:int(col) + 21]
    assert window.mean() > 0.9, "the brain surface is not drawn where the brain is"
    assert foreground.mean() > 0.05, "the 3D view shows almost nothing"

    # zoomed to the brain (the demo's view): the brain fills most of the view and is not cut off
    bounds = rendering.shown_segments_bounds(segmentation)

    def brain_pixels(**view) -> np.ndarray:
        """Pixels that change when the brain is hidden (the 3D background is a gradient, not one colour)."""
        shown = rendering.render_3d_png(None, **view).astype(int)
        display.SetVisibility(False)
        empty = rendering.render_3d_png(None, **view).astype(int)
        display.SetVisibility(True)
        return np.abs(shown - empty).sum(axis=-1) > 30

    fitted = brain_pixels(fit=bounds, box=False)
    # (not compared with the plain view: its framing depends on Slicer's scene box, which the headless view sizes
    # once, for the first scene it renders)
    assert fitted.mean() > 0.3, fitted.mean()
    rows, cols = np.nonzero(fitted)
    size = fitted.shape[0]
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) > 0.65 * size
    assert rows.min() > 0 and cols.min() > 0 and rows.max() < size - 1 and cols.max() < size - 1, "cut off"


def _thick_head(spacing_mm: float = 5.0, slices: int = 8):
    """A smooth head-like blob of 1 mm × 1 mm × `spacing_mm` voxels (a synthesis run takes seconds), windowed by hand
    narrower than its range, as a reader windows a head: an automatic window on the output would differ."""
    volume = thick_blob_volume("thick head", slices, spacing_mm)
    volume.GetDisplayNode().SetAutoWindowLevel(False)
    volume.GetDisplayNode().SetWindowLevel(500.0, 400.0)
    return volume


@pytest.mark.slow
def test_synthesized_volume_is_shown_with_the_input_window(scene):
    """The synthesized 1 mm volume carries its input's window/level, so the coronal views of input and output show
    the same tissue equally bright (the demo's comparison screenshot puts them side by side)."""
    scenarios.require_model("thick-slice-sr")
    thick = _thick_head()
    synthesized = SynthesisLogic().run(thick, "thick-slice-sr", device="cpu").volume_node
    source, shown = thick.GetDisplayNode(), synthesized.GetDisplayNode()
    assert not shown.GetAutoWindowLevel()
    assert (shown.GetWindow(), shown.GetLevel()) == (source.GetWindow(), source.GetLevel())
    assert shown.GetColorNodeID() == source.GetColorNodeID()

    centre = (ijk_to_ras(thick) @ np.array([19.5, 21.0, 3.5, 1.0]))[:3]
    before = rendering.render_slice_png(None, thick, "Coronal", offset_ras=centre, size=256).astype(float)[..., 1]
    after = rendering.render_slice_png(None, synthesized, "Coronal", offset_ras=centre, size=256).astype(float)[..., 1]
    values = slicer.util.arrayFromVolume(thick)
    head = before > 40
    assert head.mean() > 0.1
    assert abs(np.median(after[head]) - np.median(before[head])) < 15, (np.median(after[head]), np.median(before[head]))
    assert (after[head] >= 254).mean() < (before[head] >= 254).mean() + 0.05, "the synthesized view is over-bright"
    assert values.max() > source.GetLevel() + source.GetWindow() / 2  # the window does saturate the bright spot
