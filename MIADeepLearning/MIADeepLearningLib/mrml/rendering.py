"""Offscreen slice and 3D views of the headless scene, drawn by Slicer's own displayable managers, to PNG.

Tests and the demo check pixels where a result must appear, so the views are the Slicer ones, not a
re-implementation: a slice view (vtkMRMLSliceLogic + the slice displayable managers, slice image in its own
layer-0 renderer like ctkVTKSliceView, so a translucent segment fill blends over the image) and a 3D view
(vtkMRMLViewLogic + camera/view/model/segmentation displayable managers). Views are created once per scene and
reused, because displayable managers and render windows are expensive and leak when rebuilt on every call.
Headless only: inside Slicer the application's own views are the ones to look at.

The demo also makes the Extensions Index screenshots here (``side_by_side`` + ``write_png``), so what the index
shows is what the modules' logic produced, drawn the way Slicer draws it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from MIADeepLearningLib.mrml import headless

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")

ORIENTATIONS = ("Axial", "Sagittal", "Coronal")
_SLICE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLModelSliceDisplayableManager")
# Camera direction (from the focal point towards the camera, RAS) and view-up of each named 3D viewpoint.
VIEW_DIRECTIONS = {
    "Anterior": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),  # Slicer's default 3D view
    "Posterior": ((0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),
    "Left": ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    "Right": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    "Superior": ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),
    "Inferior": ((0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
    "Left anterior superior": ((-0.6, 0.6, 0.5), (0.0, 0.0, 1.0)),
}
FIT_MARGIN = 0.95  # share of the view's width or height the fitted bounds (their projected corners) take
VIEW_ANGLE = 30.0  # degrees: Slicer's 3D view default (vtkMRMLCameraNode)
CAPTION_FONT_SIZE = 18
# Slicer's default fill (0.5) and outline (1 px) leave its pale standard anatomy colours hard to tell apart.
SLICE_FILL_OPACITY = 0.6
SLICE_OUTLINE_THICKNESS = 2
_THREED_MANAGERS = (
    "vtkMRMLCameraDisplayableManager",
    "vtkMRMLViewDisplayableManager",
    "vtkMRMLModelDisplayableManager",
    "vtkMRMLSegmentationsDisplayableManager3D",
)


def _render_window(renderers: list[vtk.vtkRenderer], size: int) -> vtk.vtkRenderWindow:
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(size, size)
    window.SetNumberOfLayers(len(renderers))
    for layer, renderer in enumerate(renderers):
        renderer.SetLayer(layer)
        window.AddRenderer(renderer)
    interactor = vtk.vtkGenericRenderWindowInteractor()  # displayable managers expect one; no event loop needed
    interactor.SetRenderWindow(window)
    interactor.Initialize()
    return window


def _manager_group(factory_class: type, renderer: vtk.vtkRenderer, names: Sequence[str], app_logic: vtk.vtkObject):
    factory = factory_class.GetInstance()
    factory.SetMRMLApplicationLogic(app_logic)
    for name in names:
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.Initialize(factory, renderer)
    return group


def _caption_actor(renderer: vtk.vtkRenderer) -> vtk.vtkCornerAnnotation:
    """A top-left caption like the view annotations of Slicer's views: a screenshot must say what it shows."""
    annotation = vtk.vtkCornerAnnotation()
    annotation.SetLinearFontScaleFactor(2)
    annotation.SetNonlinearFontScaleFactor(1)
    annotation.SetMaximumFontSize(CAPTION_FONT_SIZE)
    annotation.SetMinimumFontSize(CAPTION_FONT_SIZE)
    properties = annotation.GetTextProperty()
    properties.SetColor(1.0, 1.0, 1.0)
    properties.ShadowOn()  # readable over bright anatomy and the light 3D background alike
    properties.BoldOn()
    renderer.AddViewProp(annotation)
    return annotation


def _set_caption(annotation: vtk.vtkCornerAnnotation, caption: str | None) -> None:
    annotation.SetText(vtk.vtkCornerAnnotation.UpperLeft, caption or "")
    annotation.SetVisibility(bool(caption))


def _image_from_pixels(pixels: np.ndarray) -> vtk.vtkImageData:
    """H×W×3 uint8 (top row first) -> vtkImageData (bottom row first, as VTK stores images)."""
    pixels = np.ascontiguousarray(np.asarray(pixels, dtype=np.uint8)[::-1, :, :3])
    height, width = pixels.shape[:2]
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    scalars = numpy_support.numpy_to_vtk(pixels.reshape(-1, 3), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    return image


def write_png(path: str | os.PathLike, pixels: np.ndarray) -> Path:
    """Write H×W×3 uint8 (top row first) as a PNG at the strongest compression: the Extensions Index downloads
    every screenshot, so they must stay small."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(os.fspath(path))
    writer.SetCompressionLevel(9)
    writer.SetInputData(_image_from_pixels(pixels))
    writer.Write()
    return path


def side_by_side(images: Sequence[np.ndarray], gap: int = 4, gap_color: Sequence[int] = (255, 255, 255)) -> np.ndarray:
    """Views of the same height put next to each other with a thin gap, as one screenshot (e.g. a slice view and
    the 3D view, like Slicer's conventional layout)."""
    if not images:
        raise ValueError("side_by_side needs at least one image.")
    height = images[0].shape[0]
    if any(image.shape[0] != height for image in images):
        raise ValueError(f"Images of different heights: {[image.shape for image in images]}.")
    separator = np.empty((height, gap, 3), np.uint8)
    separator[:] = np.asarray(gap_color, np.uint8)
    parts: list[np.ndarray] = []
    for index, image in enumerate(images):
        if index:
            parts.append(separator)
        parts.append(np.asarray(image, np.uint8)[..., :3])
    return np.concatenate(parts, axis=1)


def show_segments_in_slices(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    fill_opacity: float = SLICE_FILL_OPACITY,
    outline_thickness: int = SLICE_OUTLINE_THICKNESS,
) -> None:
    """Stronger fill and a thick outline in slice views, through the display node only.

    Slicer's standard anatomy colours (gray matter lavender, white matter cream, brain off-white) are pale, so at the
    default fill they wash into the image and into each other; an opaque outline marks every boundary and a stronger
    fill tells the classes apart. The colours stored on the segments (their terminology colours) are not touched.
    ``fill_opacity`` 0 shows outlines only.
    """
    display = segmentation_node.GetDisplayNode()
    if display is None:
        segmentation_node.CreateDefaultDisplayNodes()
        display = segmentation_node.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2DFill(fill_opacity > 0)
    display.SetOpacity2DFill(float(fill_opacity))
    display.SetVisibility2DOutline(outline_thickness > 0)
    display.SetOpacity2DOutline(1.0)
    display.SetSliceIntersectionThickness(int(outline_thickness))


def shown_segments_bounds(segmentation_node: slicer.vtkMRMLSegmentationNode) -> list[float] | None:
    """RAS bounds (xmin, xmax, ymin, ymax, zmin, zmax) of the segments shown in 3D, from their closed surfaces.

    The node's own GetRASBounds is its reference image's extent (the whole head for a brain segmentation), which
    is no use for zooming to the brain; the surfaces are exactly what the 3D view draws.
    """
    display = segmentation_node.GetDisplayNode()
    if display is None or not display.GetVisibility() or not display.GetVisibility3D():
        return None
    segmentation = segmentation_node.GetSegmentation()
    surface_name = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    box = vtk.vtkBoundingBox()
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        if not display.GetSegmentVisibility(segment_id) or not display.GetSegmentVisibility3D(segment_id):
            continue
        surface = segmentation.GetSegment(segment_id).GetRepresentation(surface_name)
        if surface is not None and surface.GetNumberOfPoints() > 0:
            box.AddBounds(surface.GetBounds())
    if not box.IsValid():
        return None
    bounds = [0.0] * 6
    box.GetBounds(bounds)
    return bounds


def _grab(window: vtk.vtkRenderWindow, path: str | os.PathLike | None) -> np.ndarray:
    """Render, optionally write a PNG, and return H×W×3 uint8 with the top row first."""
    window.Render()
    grabber = vtk.vtkWindowToImageFilter()
    grabber.SetInput(window)
    grabber.SetInputBufferTypeToRGB()
    grabber.ReadFrontBufferOff()
    grabber.Update()
    image = grabber.GetOutput()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(os.fspath(path))
        writer.SetInputData(image)
        writer.Write()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return np.ascontiguousarray(pixels[::-1, :, :3])


class _SliceView:
    """The "Red" slice view of a scene."""

    def __init__(self, hs: headless.HeadlessSlicer, size: int) -> None:
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(hs.app_logic)
        self.logic.SetMRMLScene(hs.scene)
        self.node = self.logic.AddSliceNode("Red")
        hs.app_logic.GetSliceLogics().AddItem(self.logic)
        self.image_renderer, self.manager_renderer = vtk.vtkRenderer(), vtk.vtkRenderer()
        for renderer in (self.image_renderer, self.manager_renderer):
            renderer.GetActiveCamera().ParallelProjectionOn()
        self.manager_renderer.SetActiveCamera(self.image_renderer.GetActiveCamera())
        self.window = _render_window([self.image_renderer, self.manager_renderer], size)
        self.group = _manager_group(
            slicer.vtkMRMLSliceViewDisplayableManagerFactory, self.manager_renderer, _SLICE_MANAGERS, hs.app_logic
        )
        self.group.SetMRMLDisplayableNode(self.node)
        mapper = vtk.vtkImageMapper()  # the slice logic's output is already window/levelled RGBA
        mapper.SetColorWindow(255)
        mapper.SetColorLevel(127.5)
        self.image_actor = vtk.vtkActor2D()
        self.image_actor.SetMapper(mapper)
        self.image_renderer.AddViewProp(self.image_actor)
        self.caption = _caption_actor(self.manager_renderer)

    def show(self, volume: slicer.vtkMRMLVolumeNode, orientation: str, offset_ras, size: int,
             field_of_view_mm: float | None = None, caption: str | None = None,
             foreground: slicer.vtkMRMLVolumeNode | None = None, foreground_opacity: float = 0.5) -> None:
        self.window.SetSize(size, size)
        self.node.SetOrientation(orientation)
        composite = self.logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(volume.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(float(foreground_opacity) if foreground is not None else 0.0)
        composite.SetLabelVolumeID(None)
        self.logic.ResizeSliceNode(size, size)
        self.logic.FitSliceToBackground()
        point = offset_ras is not None and np.ndim(offset_ras) != 0
        if offset_ras is not None and not point:
            self.logic.SetSliceOffset(float(offset_ras))
        elif point and field_of_view_mm is None:  # move the plane through the point without re-centring the view
            self.node.JumpSliceByOffsetting(*[float(c) for c in offset_ras])
        elif point:  # a zoomed view is centred on the point, or what it is about may fall outside
            self.node.JumpSliceByCentering(*[float(c) for c in offset_ras])
        if field_of_view_mm is not None:
            thickness = self.node.GetFieldOfView()[2]
            self.node.SetFieldOfView(float(field_of_view_mm), float(field_of_view_mm), thickness)
            self.logic.ResizeSliceNode(size, size)
        self.image_actor.GetMapper().SetInputConnection(self.logic.GetImageDataConnection())
        _set_caption(self.caption, caption)


class _ThreeDView:
    """The "1" 3D view of a scene."""

    def __init__(self, hs: headless.HeadlessSlicer, size: int) -> None:
        self.logic = slicer.vtkMRMLViewLogic()
        self.logic.SetMRMLApplicationLogic(hs.app_logic)
        self.logic.SetMRMLScene(hs.scene)
        self.node = self.logic.AddViewNode("1")
        hs.app_logic.GetViewLogics().AddItem(self.logic)
        self.renderer = vtk.vtkRenderer()
        self.window = _render_window([self.renderer], size)
        self.group = _manager_group(
            slicer.vtkMRMLThreeDViewDisplayableManagerFactory, self.renderer, _THREED_MANAGERS, hs.app_logic
        )
        self.group.SetMRMLDisplayableNode(self.node)
        self.caption = _caption_actor(self.renderer)

    def show(self, size: int, view_from: str, fit_bounds: Sequence[float] | None, caption: str | None,
             box: bool) -> None:
        """Look from ``view_from`` and zoom to fit ``fit_bounds`` (RAS), or everything visible when None."""
        self.window.SetSize(size, size)
        self.node.SetBoxVisible(box)
        self.node.SetAxisLabelsVisible(box)
        direction, view_up = VIEW_DIRECTIONS[view_from]
        camera = self.renderer.GetActiveCamera()
        camera.SetViewAngle(VIEW_ANGLE)
        if fit_bounds is None:
            centre = np.zeros(3)
        else:
            centre = np.array(fit_bounds, float).reshape(3, 2).mean(axis=1)
        camera.SetFocalPoint(*centre)
        camera.SetPosition(*(centre + 500.0 * np.asarray(direction, float) / np.linalg.norm(direction)))
        camera.SetViewUp(*view_up)
        camera.OrthogonalizeViewUp()
        _set_caption(self.caption, caption)
        if fit_bounds is None:
            self.renderer.ResetCamera()
        else:
            self.renderer.ResetCamera(*[float(b) for b in fit_bounds])
            self._tighten(fit_bounds)
        self.renderer.ResetCameraClippingRange()

    def _tighten(self, bounds: Sequence[float]) -> None:
        """ResetCamera fits the bounding sphere, which leaves an elongated brain small: move the camera closer until
        the projected corners of the bounds fill FIT_MARGIN of the view. Dolly keeps Slicer's perspective (Zoom
        would narrow the view angle, and every later render would inherit it); a few steps, as perspective makes
        one step inexact."""
        self.renderer.SetAspect(1.0, 1.0)  # the window is square; the aspect is otherwise only set by a render
        camera = self.renderer.GetActiveCamera()
        for _ in range(3):
            reach = 0.0
            for x in bounds[0:2]:
                for y in bounds[2:4]:
                    for z in bounds[4:6]:
                        self.renderer.SetWorldPoint(float(x), float(y), float(z), 1.0)
                        self.renderer.WorldToView()
                        view_x, view_y, _ = self.renderer.GetViewPoint()
                        reach = max(reach, abs(view_x), abs(view_y))
            if reach <= 0 or abs(reach - FIT_MARGIN) < 0.01:
                break
            camera.Dolly(FIT_MARGIN / reach)


class _Views:
    def __init__(self, hs: headless.HeadlessSlicer) -> None:
        self.hs = hs
        self.slice: _SliceView | None = None
        self.threed: _ThreeDView | None = None


_views: dict[int, _Views] = {}


def _views_for_scene(size: int) -> _Views:
    if headless.in_slicer_application():
        raise RuntimeError("Offscreen rendering is for tests and the headless demo only; Slicer has its own views.")
    hs = headless.init()
    views = _views.get(id(hs.scene))
    if views is None or views.hs is not hs:
        views = _views[id(hs.scene)] = _Views(hs)
    return views


def render_slice_png(
    path: str | os.PathLike | None,
    background_volume: slicer.vtkMRMLVolumeNode,
    orientation: str = "Axial",
    offset_ras: float | Sequence[float] | None = None,
    size: int = 512,
    field_of_view_mm: float | None = None,
    caption: str | None = None,
    foreground_volume: slicer.vtkMRMLVolumeNode | None = None,
    foreground_opacity: float = 0.5,
) -> np.ndarray:
    """Render the slice view (background volume + every visible segmentation/model) and return H×W×3 uint8.

    ``offset_ras`` is either the slice offset along the view normal (mm) or a RAS point the plane must pass
    through; None keeps the centre of the volume. ``field_of_view_mm`` zooms to that width (None: the whole
    volume), centred on ``offset_ras`` when it is a point. ``caption`` is written in the top-left corner.
    ``path`` None skips the PNG. The volume is shown with its display node's window/level, as Slicer shows it.
    ``foreground_volume`` is blended over it at ``foreground_opacity`` (the slice view's foreground layer, e.g. a
    saliency map in its colour table, transparent where its display node thresholds it away); None shows none.
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"Orientation must be one of {ORIENTATIONS}, got {orientation!r}.")
    if background_volume is None or background_volume.GetImageData() is None:
        raise ValueError("The slice view needs a background volume with image data.")
    views = _views_for_scene(size)
    if views.slice is None:
        views.slice = _SliceView(views.hs, size)
    views.slice.show(background_volume, orientation, offset_ras, size, field_of_view_mm, caption,
                     foreground_volume, foreground_opacity)
    return _grab(views.slice.window, path)


def slice_xy_to_ras() -> np.ndarray:
    """4x4 XYToRAS of the last rendered slice view (XY: pixel units, origin at the bottom-left corner)."""
    views = _views_for_scene(1)
    if views.slice is None:
        raise RuntimeError("No slice view has been rendered yet.")
    matrix = views.slice.node.GetXYToRAS()
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def slice_pixels_to_ras(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """RAS positions (N×3) of pixels of the last slice render given as (row, col) with row 0 at the top."""
    views = _views_for_scene(1)
    height = views.slice.window.GetSize()[1] if views.slice is not None else 0
    rows, cols = np.asarray(rows, float).ravel(), np.asarray(cols, float).ravel()
    xy = np.stack([cols, height - 1 - rows, np.zeros_like(rows), np.ones_like(rows)])
    return (slice_xy_to_ras() @ xy)[:3].T


def render_3d_png(
    path: str | os.PathLike | None,
    size: int = 512,
    fit: slicer.vtkMRMLSegmentationNode | Sequence[float] | None = None,
    view_from: str = "Anterior",
    caption: str | None = None,
    box: bool = True,
) -> np.ndarray:
    """Render the 3D view and return H×W×3 uint8 (top row first).

    ``fit`` is a segmentation (zoom to the segments it shows in 3D) or RAS bounds; None fits everything visible,
    which includes the box around the whole scene, so a brain ends up small. ``view_from`` names a viewpoint of
    VIEW_DIRECTIONS (default: Slicer's, from the anterior). ``box`` False hides Slicer's box and axis labels
    around the whole scene, which cut through a view zoomed onto one structure.
    """
    if view_from not in VIEW_DIRECTIONS:
        raise ValueError(f"view_from must be one of {tuple(VIEW_DIRECTIONS)}, got {view_from!r}.")
    bounds = None
    if fit is not None:
        bounds = shown_segments_bounds(fit) if hasattr(fit, "GetSegmentation") else [float(b) for b in fit]
        if bounds is None or len(bounds) != 6:
            raise ValueError("Nothing to fit: the segmentation shows no segment in 3D.")
    views = _views_for_scene(size)
    if views.threed is None:
        views.threed = _ThreeDView(views.hs, size)
    node = views.threed.node
    shown = node.GetBoxVisible(), node.GetAxisLabelsVisible()
    views.threed.show(size, view_from, bounds, caption, box)
    try:
        return _grab(views.threed.window, path)
    finally:  # the view node is in the scene (and a saved .mrb): leave its box as the user had it
        node.SetBoxVisible(shown[0])
        node.SetAxisLabelsVisible(shown[1])


def threed_ras_to_pixel(ras: Sequence[float]) -> tuple[float, float]:
    """(row, col) where a RAS point appears in the last 3D render (row 0 at the top)."""
    views = _views_for_scene(1)
    if views.threed is None:
        raise RuntimeError("No 3D view has been rendered yet.")
    coordinate = vtk.vtkCoordinate()
    coordinate.SetCoordinateSystemToWorld()
    coordinate.SetValue(*[float(c) for c in ras])
    x, y = coordinate.GetComputedDoubleDisplayValue(views.threed.renderer)
    height = views.threed.window.GetSize()[1]
    return height - 1 - y, x
