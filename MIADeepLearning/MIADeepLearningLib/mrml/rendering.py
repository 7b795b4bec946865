"""Offscreen slice and 3D views of the headless scene, drawn by Slicer's own displayable managers, to PNG.

Tests and the demo check pixels where a result must appear, so the views are the Slicer ones, not a
re-implementation: a slice view (vtkMRMLSliceLogic + the slice displayable managers, slice image in its own
layer-0 renderer like ctkVTKSliceView, so a translucent segment fill blends over the image) and a 3D view
(vtkMRMLViewLogic + camera/view/model/segmentation displayable managers). Views are created once per scene and
reused, because displayable managers and render windows are expensive and leak when rebuilt on every call.
Headless only: inside Slicer the application's own views are the ones to look at.
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

    def show(self, volume: slicer.vtkMRMLVolumeNode, orientation: str, offset_ras, size: int) -> None:
        self.window.SetSize(size, size)
        self.node.SetOrientation(orientation)
        composite = self.logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(volume.GetID())
        composite.SetForegroundVolumeID(None)
        composite.SetLabelVolumeID(None)
        self.logic.ResizeSliceNode(size, size)
        self.logic.FitSliceToBackground()
        if offset_ras is not None:
            if np.ndim(offset_ras) == 0:
                self.logic.SetSliceOffset(float(offset_ras))
            else:  # a RAS point: move the plane through it without re-centring the view
                self.node.JumpSliceByOffsetting(*[float(c) for c in offset_ras])
        self.image_actor.GetMapper().SetInputConnection(self.logic.GetImageDataConnection())


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

    def show_anterior(self, size: int) -> None:
        """Look from the patient's front (Slicer's default 3D direction) and zoom to fit everything visible."""
        self.window.SetSize(size, size)
        camera = self.renderer.GetActiveCamera()
        camera.SetFocalPoint(0.0, 0.0, 0.0)
        camera.SetPosition(0.0, 500.0, 0.0)
        camera.SetViewUp(0.0, 0.0, 1.0)
        self.renderer.ResetCamera()
        self.renderer.ResetCameraClippingRange()


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
) -> np.ndarray:
    """Render the slice view (background volume + every visible segmentation/model) and return H×W×3 uint8.

    ``offset_ras`` is either the slice offset along the view normal (mm) or a RAS point the plane must pass
    through; None keeps the centre of the volume. ``path`` None skips writing the PNG.
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"Orientation must be one of {ORIENTATIONS}, got {orientation!r}.")
    if background_volume is None or background_volume.GetImageData() is None:
        raise ValueError("The slice view needs a background volume with image data.")
    views = _views_for_scene(size)
    if views.slice is None:
        views.slice = _SliceView(views.hs, size)
    views.slice.show(background_volume, orientation, offset_ras, size)
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


def render_3d_png(path: str | os.PathLike | None, size: int = 512) -> np.ndarray:
    """Render the 3D view from the anterior, zoomed to fit, and return H×W×3 uint8 (top row first)."""
    views = _views_for_scene(size)
    if views.threed is None:
        views.threed = _ThreeDView(views.hs, size)
    views.threed.show_anterior(size)
    return _grab(views.threed.window, path)


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
