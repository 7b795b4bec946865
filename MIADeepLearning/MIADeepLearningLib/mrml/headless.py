"""A real Slicer MRML scene without the Slicer application, for pytest and the demo.

The ``slicer-core`` wheel ships the MRML library and the C++ module logics but nothing that the Qt application
normally wires up: no ``slicer.mrmlScene``, no ``slicer.modules``, no subject-hierarchy bookkeeping. ``init()``
does that wiring once per process (module logics and several VTK factories are process-wide singletons), so the
rest of ``mrml/`` runs unchanged here and inside Slicer. It refuses to run inside Slicer, where it would replace
the application's scene.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import types
from pathlib import Path

import slicer
import vtk

# Module name (``slicer.modules.<name.lower()>``) -> logic class in slicer-core, in registration order.
# Classes missing from a given slicer-core build are skipped.
_MODULE_LOGICS = (
    ("Volumes", "vtkSlicerVolumesLogic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),  # SetMRMLScene registers the converter rules
    ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    ("Data", "vtkSlicerDataModuleLogic"),
    ("Transforms", "vtkSlicerTransformLogic"),
    ("Models", "vtkSlicerModelsLogic"),
    ("Tables", "vtkSlicerTablesLogic"),
    ("Markups", "vtkSlicerMarkupsLogic"),
    ("VolumeRendering", "vtkSlicerVolumeRenderingLogic"),
    ("Sequences", "vtkSlicerSequencesLogic"),
)


def in_slicer_application() -> bool:
    """True inside the real Slicer application, where ``slicer.app`` exists and owns the scene."""
    return hasattr(slicer, "app")


def _refuse_inside_slicer(what: str) -> None:
    if in_slicer_application():
        raise RuntimeError(
            f"{what} is for tests and the headless demo only; inside Slicer use the application's scene."
        )


class HeadlessModule:
    """Stand-in for a Slicer module object: scripts only ever call ``slicer.modules.<name>.logic()``."""

    def __init__(self, name: str, logic: vtk.vtkObject) -> None:
        self.name = name
        self._logic = logic

    def logic(self) -> vtk.vtkObject:
        return self._logic

    def __repr__(self) -> str:
        return f"<HeadlessModule {self.name}: {self._logic.GetClassName()}>"


class HeadlessSlicer:
    """Scene + application logic + module logics, wired the way qSlicerCoreApplication wires them."""

    def __init__(self, sync_subject_hierarchy: bool = True) -> None:
        _refuse_inside_slicer("MIADeepLearningLib.mrml.headless")
        self.scene = slicer.vtkMRMLScene()
        crosshair = slicer.vtkMRMLCrosshairNode()  # the application adds this singleton; slice views expect it
        crosshair.SetCrosshairName("default")
        self.scene.AddNode(crosshair)

        # Reading a scene bundle (.mrb) unpacks it into the cache manager's folder, as in the application.
        self._cache_dir = tempfile.mkdtemp(prefix="miadl-slicer-cache-")
        atexit.register(shutil.rmtree, self._cache_dir, True)
        cache_manager = slicer.vtkCacheManager()
        cache_manager.SetRemoteCacheDirectory(self._cache_dir)
        self._data_io_manager = slicer.vtkDataIOManager()
        self._data_io_manager.SetCacheManager(cache_manager)
        self.scene.SetCacheManager(cache_manager)
        self.scene.SetDataIOManager(self._data_io_manager)

        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        color_logic = self.app_logic.GetColorLogic()
        color_logic.SetMRMLScene(self.scene)  # adds the default colour tables
        self.app_logic.SetSliceLogics(vtk.vtkCollection())
        self.app_logic.SetViewLogics(vtk.vtkCollection())
        slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(self.app_logic)
        slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(self.app_logic)

        self.logics: dict[str, vtk.vtkObject] = {"Colors": color_logic}
        self.app_logic.SetModuleLogic("Colors", color_logic)
        for name, class_name in _MODULE_LOGICS:
            cls = getattr(slicer, class_name, None)
            if cls is not None:
                self.logics[name] = self._register_logic(name, cls())
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene, True)

        _dedupe_converter_rules()
        self._observers: list[int] = []
        self._callbacks: tuple = ()
        if sync_subject_hierarchy:
            self._sync_subject_hierarchy()
        self.install_globals()

    def _register_logic(self, name: str, logic: vtk.vtkObject) -> vtk.vtkObject:
        logic.SetMRMLScene(self.scene)
        logic.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.SetModuleLogic(name, logic)  # C++ code looks logics up by module name
        return logic

    def install_globals(self) -> None:
        """Set ``slicer.mrmlScene`` and ``slicer.modules``, which slicer.util and our code rely on."""
        slicer.mrmlScene = self.scene
        modules = types.SimpleNamespace()
        for name, logic in self.logics.items():
            setattr(modules, name.lower(), HeadlessModule(name, logic))
        slicer.modules = modules

    def clear(self) -> None:
        """Remove all user nodes; logics, default colour tables and singletons survive (like File > Close Scene)."""
        self.scene.Clear(False)

    def _sync_subject_hierarchy(self) -> None:
        """Port of the parts of qSlicerSubjectHierarchyPluginLogic (Qt) that give every data node a subject-hierarchy
        item and drop it again on removal. Without it new nodes have no item, so placing outputs beside their input
        (or anything else done through the hierarchy) silently does nothing."""

        def wants_item(node: vtk.vtkObject) -> bool:
            return (
                isinstance(node, (slicer.vtkMRMLDisplayableNode, slicer.vtkMRMLStorableNode))
                and not isinstance(node, slicer.vtkMRMLSubjectHierarchyNode)
                and not node.GetHideFromEditors()
            )

        def add_missing_items(scene: slicer.vtkMRMLScene) -> None:
            sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
            if sh is None:
                return
            for i in range(scene.GetNumberOfNodes()):
                node = scene.GetNthNode(i)
                if wants_item(node) and not sh.GetItemByDataNode(node):
                    sh.CreateItem(sh.GetSceneItemID(), node)

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def on_node_added(scene, _event, node) -> None:
            if scene is None or node is None or scene.IsImporting():
                return
            if isinstance(node, slicer.vtkMRMLSubjectHierarchyNode):
                slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
            elif wants_item(node):
                sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
                if sh is not None and not sh.GetItemByDataNode(node):
                    sh.CreateItem(sh.GetSceneItemID(), node)

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def on_node_about_to_be_removed(scene, _event, node) -> None:
            if scene is None or node is None or scene.IsClosing():
                return
            if isinstance(node, slicer.vtkMRMLSubjectHierarchyNode):
                return
            sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
            item = sh.GetItemByDataNode(node) if sh is not None else 0
            if item:
                sh.RemoveItem(item, False, False)

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def on_node_removed(scene, _event, node) -> None:
            if scene is None or scene.IsClosing() or not isinstance(node, slicer.vtkMRMLSubjectHierarchyNode):
                return
            slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
            add_missing_items(scene)

        def on_import_ended(scene, _event) -> None:
            if scene is None:
                return
            slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
            add_missing_items(scene)

        def on_close_ended(scene, _event) -> None:
            # Closing the scene removes the (non-singleton) hierarchy node; the application recreates it at once,
            # so that it exists before any node is added, and so must we.
            if scene is not None:
                slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)

        self._callbacks = (on_node_added, on_node_about_to_be_removed, on_node_removed, on_import_ended, on_close_ended)
        events = (
            slicer.vtkMRMLScene.NodeAddedEvent,
            slicer.vtkMRMLScene.NodeAboutToBeRemovedEvent,
            slicer.vtkMRMLScene.NodeRemovedEvent,
            slicer.vtkMRMLScene.EndImportEvent,
            slicer.vtkMRMLScene.EndCloseEvent,
        )
        self._observers = [self.scene.AddObserver(e, cb) for e, cb in zip(events, self._callbacks)]


def _dedupe_converter_rules() -> None:
    """The segmentation converter factory is process-wide and every Segmentations logic registers its rules again;
    duplicates would make conversions ambiguous, so keep the first rule of each class."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    seen: set[str] = set()
    for rule in list(factory.GetConverterRules()):
        if rule.GetClassName() in seen:
            factory.UnregisterConverterRule(rule)
        else:
            seen.add(rule.GetClassName())


_instance: HeadlessSlicer | None = None


def init(sync_subject_hierarchy: bool = True) -> HeadlessSlicer:
    """Create the process-wide headless Slicer, or return the existing one (module logics are singletons)."""
    global _instance
    _refuse_inside_slicer("MIADeepLearningLib.mrml.headless.init()")
    # OSMesa needs no GPU and no display; must be chosen before the first render window exists.
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")
    if _instance is None:
        _instance = HeadlessSlicer(sync_subject_hierarchy)
    else:
        _instance.install_globals()
    return _instance


# --- file IO that slicer.util offers only through slicer.app ---------------------------------------------------


def load_volume(path: str | os.PathLike, name: str | None = None, labelmap: bool = False) -> slicer.vtkMRMLVolumeNode:
    """Load a volume file through vtkSlicerVolumesLogic (Slicer's own ITK-based reader), like File > Add Data."""
    path = Path(path)
    if name is None:
        name = path.name.split(".")[0]
    logic = slicer.modules.volumes.logic()
    node = logic.AddArchetypeVolume(path.as_posix(), name, 1 if labelmap else 0, vtk.vtkStringArray())
    if node is None:
        raise RuntimeError(f"Slicer could not load the volume file {path}.")
    return node


def save_node(node: slicer.vtkMRMLStorableNode, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a node with a standalone default storage node, so the node's own storage settings stay untouched."""
    path = Path(path)
    storage = node.CreateDefaultStorageNode()
    if storage is None:
        raise RuntimeError(f"Node {node.GetName()!r} cannot be saved to a file.")
    storage.SetFileName(path.as_posix())
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(node):
        raise RuntimeError(f"Could not write {node.GetName()!r} to {path}.")
    return path


def save_scene_mrb(path: str | os.PathLike) -> Path:
    """Write the whole scene (MRML + every node's data) as a Slicer data bundle that opens in Slicer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not slicer.mrmlScene.WriteToMRB(path.as_posix()):
        raise RuntimeError(f"Could not write the scene to {path}.")
    return path
