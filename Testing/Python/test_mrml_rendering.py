"""Offscreen slice and 3D views: the segment colour appears where the segment is, drawn by Slicer's own managers."""

from __future__ import annotations

import numpy as np
import pytest

SIZE = 256
SEGMENT_COLOR = (230, 40, 40)


def _head_with_segment(tmp_path):
    """A 64×64×40 'head' (bright ellipsoid) and a red ball-shaped segment in its right posterior part."""
    import slicer

    from MIADeepLearningLib.mrml import segmentations, volumes

    shape = (40, 64, 64)  # k, j, i
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r = np.sqrt(((ii - 32) / 28) ** 2 + ((jj - 32) / 30) ** 2 + ((kk - 20) / 18) ** 2)
    head = np.where(r < 1, 300 + 200 * np.cos(r * 3), -1000).astype(np.float32)
    matrix = np.diag([1.0, 1.0, 1.5, 1.0])
    matrix[:3, 3] = [-32.0, -32.0, -30.0]
    volume = slicer.util.addVolumeFromArray(head, ijkToRAS=matrix, name="head")
    volume.CreateDefaultDisplayNodes()
    volume.GetDisplayNode().SetAutoWindowLevel(False)
    volume.GetDisplayNode().SetWindowLevel(800, 100)

    label = ((((ii - 42) / 8) ** 2 + ((jj - 25) / 7) ** 2 + ((kk - 20) / 5) ** 2) < 1).astype(np.uint8)
    label_node = slicer.util.addVolumeFromArray(label, ijkToRAS=matrix, name="label")
    path = volumes.export_volume(label_node, tmp_path / "label.nrrd")
    slicer.mrmlScene.RemoveNode(label_node)
    segmentation = segmentations.segmentation_from_label_file(
        path, volume, [{"value": 1, "name": "Lesion", "color": list(SEGMENT_COLOR), "terminology": ""}], "seg"
    )
    return volume, segmentation, label, matrix


def _reddish(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(int)
    return (pixels[..., 0] - pixels[..., 1] > 40) & (pixels[..., 0] - pixels[..., 2] > 40)


def _read_png(path) -> np.ndarray:
    import vtk
    from vtk.util import numpy_support

    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    image = reader.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return pixels[::-1, :, :3]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a 3D mask by one voxel (26-neighbourhood)."""
    padded = np.pad(mask, 1)
    grown = np.zeros_like(mask)
    k, j, i = mask.shape
    for dk in range(3):
        for dj in range(3):
            for di in range(3):
                grown |= padded[dk : dk + k, dj : dj + j, di : di + i]
    return grown


def _erode(mask: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask)


def _label_at(mask: np.ndarray, ras: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Mask value at the voxel nearest to each RAS point (False outside the volume)."""
    ijk = np.rint((np.linalg.inv(matrix) @ np.c_[ras, np.ones(len(ras))].T)[:3]).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.array(mask.shape[::-1])[:, None]), axis=0)
    values = np.zeros(len(ras), bool)
    values[inside] = mask[ijk[2, inside], ijk[1, inside], ijk[0, inside]]
    return values


SEGMENT_CENTRE_RAS = (10.0, -7.0, 0.0)  # voxel (42, 25, 20)


@pytest.mark.parametrize("orientation", ["Axial", "Sagittal", "Coronal"])
def test_slice_overlay_lies_on_the_segment(scene, tmp_path, orientation):
    from MIADeepLearningLib.mrml import rendering

    volume, _, label, matrix = _head_with_segment(tmp_path)
    png = tmp_path / f"{orientation}.png"
    pixels = rendering.render_slice_png(png, volume, orientation, offset_ras=SEGMENT_CENTRE_RAS, size=SIZE)
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
    assert np.array_equal(_read_png(png), pixels)

    rows, cols = np.nonzero(np.ones((SIZE, SIZE), bool))
    ras = rendering.slice_pixels_to_ras(rows, cols)
    reddish = _reddish(pixels).ravel()
    assert reddish.sum() > 200  # a ball of ~8 mm radius covers many 0.25 mm pixels
    # every overlay pixel lies on the segment or at most one voxel outside it (outline, rounding)
    assert _label_at(_dilate(label > 0), ras[reddish], matrix).all()
    # and every pixel well inside the segment shows the overlay
    deep_inside = _label_at(_erode(label > 0), ras, matrix)
    assert deep_inside.sum() > 100 and reddish[deep_inside].all()
    # the fill is translucent over the image (Slicer's look), not over black
    centre = pixels.reshape(-1, 3)[np.argmin(np.linalg.norm(ras - SEGMENT_CENTRE_RAS, axis=1))].astype(int)
    assert centre[0] - centre[1] > 40 and centre[1] > 90, centre
    # the image itself is there: grey head pixels outside the overlay
    grey = (np.abs(pixels[..., 0].astype(int) - pixels[..., 1]) < 4) & (pixels[..., 0] > 100)
    assert grey.sum() > 0.2 * SIZE * SIZE


def test_slice_xy_to_ras_is_the_pixel_mapping(scene, tmp_path):
    from MIADeepLearningLib.mrml import rendering

    volume, _, _, _ = _head_with_segment(tmp_path)
    rendering.render_slice_png(None, volume, "Axial", offset_ras=0.0, size=SIZE)
    xy_to_ras = rendering.slice_xy_to_ras()
    assert xy_to_ras.shape == (4, 4)
    top_left = rendering.slice_pixels_to_ras([0], [0])[0]
    assert np.allclose(top_left, (xy_to_ras @ [0, SIZE - 1, 0, 1])[:3])
    assert abs(top_left[2]) < 1e-9  # the axial plane at S = 0
    # radiological convention: patient right on the left of the screen, anterior at the top
    bottom_right = rendering.slice_pixels_to_ras([SIZE - 1], [SIZE - 1])[0]
    assert top_left[0] > bottom_right[0] and top_left[1] > bottom_right[1]


def test_3d_view_shows_the_segment_surface(scene, tmp_path):
    from MIADeepLearningLib.mrml import rendering

    _head_with_segment(tmp_path)
    png = tmp_path / "3d.png"
    pixels = rendering.render_3d_png(png, size=SIZE)
    assert pixels.shape == (SIZE, SIZE, 3)
    assert np.array_equal(_read_png(png), pixels)
    row, col = rendering.threed_ras_to_pixel(SEGMENT_CENTRE_RAS)
    assert 0 <= row < SIZE and 0 <= col < SIZE
    reddish = _reddish(pixels)
    assert reddish.sum() > 100
    rows, cols = np.nonzero(reddish)
    assert abs(rows.mean() - row) < 8 and abs(cols.mean() - col) < 8
    r, c = round(row), round(col)
    assert reddish[r - 2 : r + 3, c - 2 : c + 3].all()
    # anterior view: the patient's right (the segment is at R = 10) is on the left of the screen
    assert col < SIZE / 2
    assert not reddish[:10, :10].any()  # background corner


def test_views_are_reused_and_survive_scene_clear(headless, tmp_path):
    from MIADeepLearningLib.mrml import rendering

    volume, _, _, _ = _head_with_segment(tmp_path)
    rendering.render_slice_png(None, volume, size=64)
    rendering.render_3d_png(None, size=64)
    views = rendering._views_for_scene(64)
    slice_window, threed_window = views.slice.window, views.threed.window
    headless.clear()
    volume, _, _, _ = _head_with_segment(tmp_path)
    pixels = rendering.render_slice_png(None, volume, offset_ras=SEGMENT_CENTRE_RAS, size=SIZE)
    assert _reddish(pixels).sum() > 200
    assert _reddish(rendering.render_3d_png(None, size=SIZE)).sum() > 100
    views = rendering._views_for_scene(SIZE)
    assert views.slice.window is slice_window and views.threed.window is threed_window
    headless.clear()


def test_rendering_refuses_inside_slicer(scene, monkeypatch):
    import slicer

    from MIADeepLearningLib.mrml import rendering

    monkeypatch.setattr(slicer, "app", object(), raising=False)
    with pytest.raises(RuntimeError, match="headless"):
        rendering.render_3d_png(None)
    with pytest.raises(ValueError, match="Orientation"):
        rendering.render_slice_png(None, None, orientation="Oblique")


def _boundary_band(label: np.ndarray) -> np.ndarray:
    """Voxels within one voxel of the segment's boundary, inside or outside."""
    mask = label > 0
    return _dilate(mask) & ~_erode(mask)


def test_outlines_are_drawn_on_the_boundary_without_changing_the_segment_colour(scene, tmp_path):
    """Outlines only (fill 0): the overlay lies on the segment's boundary, the inside shows the image; thicker
    outlines cover more pixels; the colour stored on the segment is not touched (only the display node is)."""
    from MIADeepLearningLib.mrml import rendering

    volume, segmentation, label, matrix = _head_with_segment(tmp_path)
    segment = segmentation.GetSegmentation().GetSegment("Lesion")
    stored_colour = segment.GetColor()
    rows, cols = np.nonzero(np.ones((SIZE, SIZE), bool))
    counts = {}
    for thickness in (1, 3):
        rendering.show_segments_in_slices(segmentation, fill_opacity=0.0, outline_thickness=thickness)
        pixels = rendering.render_slice_png(None, volume, "Axial", offset_ras=SEGMENT_CENTRE_RAS, size=SIZE)
        ras = rendering.slice_pixels_to_ras(rows, cols)
        reddish = _reddish(pixels).ravel()
        counts[thickness] = int(reddish.sum())
        assert reddish.sum() > 100, "no outline drawn"
        on_boundary = _label_at(_boundary_band(label), ras[reddish], matrix)
        assert on_boundary.mean() > 0.98, f"{100 * (1 - on_boundary.mean()):.1f} % of outline pixels off the boundary"
        deep_inside = _label_at(_erode(_erode(label > 0)), ras, matrix)
        assert deep_inside.sum() > 50 and not reddish[deep_inside].any(), "the inside is filled"
    assert counts[3] > 1.5 * counts[1], counts
    display = segmentation.GetDisplayNode()
    assert not display.GetVisibility2DFill() and display.GetVisibility2DOutline()
    assert display.GetSliceIntersectionThickness() == 3
    assert segment.GetColor() == stored_colour

    rendering.show_segments_in_slices(segmentation)  # the defaults: fill and outline
    pixels = rendering.render_slice_png(None, volume, "Axial", offset_ras=SEGMENT_CENTRE_RAS, size=SIZE)
    deep_inside = _label_at(_erode(label > 0), rendering.slice_pixels_to_ras(rows, cols), matrix)
    assert _reddish(pixels).ravel()[deep_inside].all()
    assert display.GetOpacity2DFill() == pytest.approx(rendering.SLICE_FILL_OPACITY)
    assert display.GetSliceIntersectionThickness() == rendering.SLICE_OUTLINE_THICKNESS


def test_slice_view_shows_the_volume_with_its_own_window(scene, tmp_path):
    """The grey of every image pixel is the voxel value through the display node's window/level (what a copied
    window, e.g. a synthesized volume's, relies on), not an automatic one."""
    import slicer

    from MIADeepLearningLib.mrml import rendering

    volume, segmentation, _, matrix = _head_with_segment(tmp_path)
    segmentation.GetDisplayNode().SetVisibility(False)
    voxels = slicer.util.arrayFromVolume(volume)
    rows, cols = np.nonzero(np.ones((SIZE, SIZE), bool))
    greys = {}
    for window, level in ((800.0, 100.0), (300.0, 350.0)):
        volume.GetDisplayNode().SetWindowLevel(window, level)
        pixels = rendering.render_slice_png(None, volume, "Axial", offset_ras=0.0, size=SIZE).astype(float)
        ras = rendering.slice_pixels_to_ras(rows, cols)
        ijk = np.rint((np.linalg.inv(matrix) @ np.c_[ras, np.ones(len(ras))].T)[:3]).astype(int)
        inside = np.all((ijk >= 1) & (ijk < np.array(voxels.shape[::-1])[:, None] - 1), axis=0)
        values = voxels[ijk[2, inside], ijk[1, inside], ijk[0, inside]]
        expected = np.clip((values - (level - window / 2)) / window * 255.0, 0, 255)
        grey = pixels[..., 1].ravel()[inside]
        # interpolation between voxels blurs edges: compare where neighbours agree, i.e. most pixels
        assert np.median(np.abs(grey - expected)) < 4, (window, level)
        greys[window] = grey
    assert np.abs(greys[300.0] - greys[800.0]).mean() > 20  # each render followed its own window


def test_3d_view_zooms_to_the_shown_segments(scene, tmp_path):
    """Fitted to the segment, it fills most of the view and stays inside it; fitted to everything (the scene box),
    the same segment is small."""
    from MIADeepLearningLib.mrml import rendering

    _, segmentation, label, matrix = _head_with_segment(tmp_path)
    bounds = rendering.shown_segments_bounds(segmentation)
    labelled = np.nonzero(label)  # (k, j, i); the matrix is diagonal
    for axis in range(3):  # the surface's bounds, about the labelled voxels (not the whole reference image)
        low = matrix[axis, axis] * labelled[2 - axis].min() + matrix[axis, 3]
        high = matrix[axis, axis] * labelled[2 - axis].max() + matrix[axis, 3]
        assert low - 2 < bounds[2 * axis] < low + 2 and high - 2 < bounds[2 * axis + 1] < high + 2, (bounds, axis)

    whole_pixels = rendering.render_3d_png(None, size=SIZE)
    whole = _reddish(whole_pixels)
    fitted = _reddish(rendering.render_3d_png(None, size=SIZE, fit=segmentation, box=False))
    # a fitted render leaves nothing behind (camera view angle, box): the next plain render is the same
    assert np.array_equal(rendering.render_3d_png(None, size=SIZE), whole_pixels)
    view_node = rendering._views_for_scene(SIZE).threed.node
    assert view_node.GetBoxVisible() and view_node.GetAxisLabelsVisible(), "the scene's view node keeps its box"
    assert fitted.sum() > 4 * whole.sum(), (fitted.sum(), whole.sum())
    rows, cols = np.nonzero(fitted)
    extent = max(rows.max() - rows.min(), cols.max() - cols.min())
    assert extent > 0.6 * SIZE, extent
    assert not (fitted[0].any() or fitted[-1].any() or fitted[:, 0].any() or fitted[:, -1].any()), "cut off"
    row, col = rendering.threed_ras_to_pixel(SEGMENT_CENTRE_RAS)
    assert abs(row - SIZE / 2) < 0.1 * SIZE and abs(col - SIZE / 2) < 0.1 * SIZE
    left = _reddish(rendering.render_3d_png(None, size=SIZE, fit=segmentation, view_from="Left", box=False))
    assert left.sum() > 4 * whole.sum()
    with pytest.raises(ValueError, match="view_from"):
        rendering.render_3d_png(None, size=SIZE, view_from="Sideways")
    segmentation.GetDisplayNode().SetVisibility3D(False)
    assert rendering.shown_segments_bounds(segmentation) is None
    with pytest.raises(ValueError, match="Nothing to fit"):
        rendering.render_3d_png(None, size=SIZE, fit=segmentation)


def test_field_of_view_zooms_onto_the_point(scene, tmp_path):
    from MIADeepLearningLib.mrml import rendering

    volume, _, _, _ = _head_with_segment(tmp_path)
    pixels = rendering.render_slice_png(None, volume, "Coronal", offset_ras=SEGMENT_CENTRE_RAS, size=SIZE,
                                        field_of_view_mm=32.0)
    xy_to_ras = rendering.slice_xy_to_ras()
    assert np.linalg.norm(xy_to_ras[:3, 0]) == pytest.approx(32.0 / SIZE)
    centre = rendering.slice_pixels_to_ras([SIZE / 2], [SIZE / 2])[0]
    assert np.allclose(centre, SEGMENT_CENTRE_RAS, atol=0.2), centre
    rows, cols = np.nonzero(_reddish(pixels))
    assert abs(rows.mean() - SIZE / 2) < 0.1 * SIZE and abs(cols.mean() - SIZE / 2) < 0.1 * SIZE
    assert rows.max() - rows.min() > 0.3 * SIZE  # the ~10 mm ball spans about a third of a 32 mm view


def test_caption_is_drawn_top_left_and_removed_again(scene, tmp_path):
    from MIADeepLearningLib.mrml import rendering

    volume, _, _, _ = _head_with_segment(tmp_path)
    plain = rendering.render_slice_png(None, volume, size=SIZE).astype(int)
    captioned = rendering.render_slice_png(None, volume, size=SIZE, caption="Thick-slice input").astype(int)
    changed = np.abs(captioned - plain).sum(axis=-1) > 60
    rows, cols = np.nonzero(changed)
    assert rows.size > 50 and rows.max() < 0.15 * SIZE and cols.min() < 0.1 * SIZE, (rows.size, rows.max())
    assert np.array_equal(rendering.render_slice_png(None, volume, size=SIZE).astype(int), plain)
    plain_3d = rendering.render_3d_png(None, size=SIZE).astype(int)
    captioned_3d = rendering.render_3d_png(None, size=SIZE, caption="3D").astype(int)
    rows, _ = np.nonzero(np.abs(captioned_3d - plain_3d).sum(axis=-1) > 60)
    assert rows.size > 10 and rows.max() < 0.15 * SIZE


def test_side_by_side_is_written_as_one_small_png(tmp_path):
    from MIADeepLearningLib.mrml import rendering

    rng = np.random.default_rng(0)
    left = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    right = np.zeros((32, 24, 3), np.uint8)
    joined = rendering.side_by_side([left, right], gap=3)
    assert joined.shape == (32, 40 + 3 + 24, 3)
    assert np.array_equal(joined[:, :40], left) and (joined[:, 40:43] == 255).all() and not joined[:, 43:].any()
    path = rendering.write_png(tmp_path / "shot" / "pair.png", joined)
    assert np.array_equal(_read_png(path), joined)
    with pytest.raises(ValueError, match="heights"):
        rendering.side_by_side([left, right[:16]])


def test_foreground_volume_is_blended_over_the_background_and_removed_again(scene, tmp_path):
    """A foreground volume (e.g. a saliency map) is drawn in its colour table where its display threshold keeps it,
    the background shows through elsewhere, and the next render without one shows the background alone."""
    import slicer

    from MIADeepLearningLib.mrml import rendering

    volume, segmentation, label, matrix = _head_with_segment(tmp_path)
    segmentation.GetDisplayNode().SetVisibility(False)  # only the foreground may be red
    overlay = slicer.util.addVolumeFromArray(label.astype(np.float32), ijkToRAS=matrix, name="overlay")
    overlay.CreateDefaultDisplayNodes()
    display = overlay.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeRed")
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetAutoThreshold(False)
    display.SetThreshold(0.5, 1.0)
    display.SetApplyThreshold(True)

    plain = rendering.render_slice_png(None, volume, "Axial", offset_ras=SEGMENT_CENTRE_RAS, size=SIZE)
    pixels = rendering.render_slice_png(None, volume, "Axial", offset_ras=SEGMENT_CENTRE_RAS, size=SIZE,
                                        foreground_volume=overlay, foreground_opacity=1.0)
    rows, cols = np.nonzero(np.ones((SIZE, SIZE), bool))
    ras = rendering.slice_pixels_to_ras(rows, cols)
    inside = _label_at(_erode(label > 0), ras, matrix).reshape(SIZE, SIZE)
    outside = ~_label_at(_dilate(label > 0), ras, matrix).reshape(SIZE, SIZE)
    assert inside.sum() > 100 and not _reddish(plain).any()
    assert _reddish(pixels)[inside].mean() > 0.9, "foreground not drawn"
    assert np.array_equal(pixels[outside], plain[outside]), "the thresholded-away foreground hid the background"
    again = rendering.render_slice_png(None, volume, "Axial", offset_ras=SEGMENT_CENTRE_RAS, size=SIZE)
    assert np.array_equal(again, plain)
