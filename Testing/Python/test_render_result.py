"""What a clinician sees: after brain extraction the slice view shows the Brain overlay inside the brain and nowhere
outside the head, and the 3D view shows the brain surface where the brain is. Rendered offscreen (OSMesa) by
Slicer's own displayable managers."""

from __future__ import annotations

import numpy as np
import pytest
import slicer

from MIADeepLearningLib.mrml import rendering
from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic
from MIADeepLearningLib.mrml.segmentations import label_array
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
