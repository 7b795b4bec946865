"""The module files and MIADeepLearningLib/gui/ run with stand-ins for Qt and Slicer's GUI (no Slicer application).

What this proves without Slicer: importing a module file touches nothing of a running Slicer (slicer.app and the
scene do not exist yet) and imports neither torch, the MRML bridge nor another module file; the parameter node's
annotations resolve; and the shared widget code (gui.task_widget.TaskWidgetMixin) drives Apply -> Cancel, polling,
progress, finish, cancel, errors and declined installs the same way in every module, with the module's own hooks
(run arguments, result display, titles, Apply refusals). The Logic's warm-worker handling (gui.task_logic) too.

Each case runs in a subprocess of its own: the stand-ins replace `qt`, `slicer` and `vtk` in sys.modules, which must
not leak into the other suites (they use slicer-core's real `slicer`). The real widgets, layout and dialogs are
covered by the Slicer self-tests (DLSegmentationTest, DLSynthesisTest, DLRegistrationTest, DLClassificationTest,
DLLesionDetectionTest); the lesion detection panel's own rules (extra contrasts, the sensitivity slider) by
test_detection_module.py.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import types
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable, ClassVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIR = ROOT / "MIADeepLearning"
UI_DIR = ROOT / "Resources" / "UI"
MODULES = ("DLSegmentation", "DLSynthesis", "DLRegistration", "DLClassification", "DLLesionDetection")


# Stand-ins (installed only in the subprocess)


class _Missing:
    """slicer.app / slicer.mrmlScene before Slicer has started: any use is an error."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        raise AssertionError(f"slicer.{self._name}.{attribute} used while the module file was being imported")


class FakeWidget:
    """Any widget of a .ui: the properties the code sets, and the few methods it calls."""

    def __init__(self, name: str) -> None:
        self.name, self.text, self.toolTip, self.enabled, self.value = name, "", "", True, 0
        self.visible, self.collapsed, self.tableNode = True, False, None
        self.items: list[tuple[str, Any]] = []
        self._currentIndex = -1
        self.lines: list[str] = []
        self.connections: dict[str, Callable] = {}

    def connect(self, signal: str, slot: Callable) -> None:
        self.connections[signal] = slot

    def setMRMLScene(self, scene: Any) -> None:
        pass

    # QComboBox
    def clear(self) -> None:
        self.items, self._currentIndex, self.lines = [], -1, []

    def addItem(self, title: str, data: Any = None) -> None:
        self.items.append((title, data))

    def setItemData(self, index: int, value: Any, role: Any) -> None:
        pass

    @property
    def count(self) -> int:
        return len(self.items)

    def findText(self, text: str) -> int:
        return next((index for index, (title, _) in enumerate(self.items) if title == text), -1)

    def findData(self, data: Any) -> int:
        return next((index for index, (_, item) in enumerate(self.items) if item == data), -1)

    def itemData(self, index: int) -> Any:
        return self.items[index][1]

    @property
    def currentIndex(self) -> int:
        return self._currentIndex

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        self._currentIndex = index

    # QPlainTextEdit
    def appendPlainText(self, text: str) -> None:
        self.lines.append(text)

    # qMRMLTableView
    def setMRMLTableNode(self, node: Any) -> None:
        self.tableNode = node


class FakeParameterNode:
    """The MRML node behind a parameter node wrapper: values, and ModifiedEvent observers."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.observers: dict[int, Callable] = {}


def _parameter_node_wrapper(cls: type) -> type:
    """Like slicer.parameterNodeWrapper: resolves the annotations (typing.get_type_hints, as the real one does, so a
    name missing from the module's globals fails here too), stores values on the node and fires ModifiedEvent."""
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name, None) for name in hints}

    class Wrapped:
        def __init__(self, node: FakeParameterNode) -> None:
            object.__setattr__(self, "_node", node)
            for name, value in defaults.items():
                node.values.setdefault(name, value)

        def __getattr__(self, name: str) -> Any:
            if name in defaults:
                return self._node.values[name]
            raise AttributeError(name)

        def __setattr__(self, name: str, value: Any) -> None:
            assert name in defaults, f"{cls.__name__} has no parameter {name}"
            self._node.values[name] = value
            for callback in list(self._node.observers.values()):
                callback(self, "ModifiedEvent")

        def connectGui(self, ui: Any) -> str:
            return "gui-tag"

        def disconnectGui(self, tag: Any) -> None:
            pass

        def AddObserver(self, event: Any, callback: Callable) -> int:
            tag = len(self._node.observers) + 1
            self._node.observers[tag] = callback
            return tag

        def RemoveObserver(self, tag: int) -> None:
            self._node.observers.pop(tag, None)

    Wrapped.__name__ = Wrapped.__qualname__ = cls.__name__
    Wrapped.hints = hints
    return Wrapped


class Recorder:
    """Calls to the dialogs and to the patched functions, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __call__(self, name: str, result: Any = None) -> Callable:
        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            return result

        return record

    def named(self, name: str) -> list[tuple[tuple, dict]]:
        return [(args, kwargs) for called, args, kwargs in self.calls if called == name]


def install_stubs(recorder: Recorder) -> types.ModuleType:
    """Put qt, vtk and slicer (with the submodules the module files import) into sys.modules; return slicer."""

    def module(name: str, **attributes: Any) -> types.ModuleType:
        created = types.ModuleType(name)
        created.__dict__.update(attributes)
        sys.modules[name] = created
        return created

    class QTimer:
        def __init__(self) -> None:
            self.active, self.interval, self.connections = False, None, {}

        def setInterval(self, milliseconds: int) -> None:
            self.interval = milliseconds

        def connect(self, signal: str, slot: Callable) -> None:
            self.connections[signal] = slot

        def start(self) -> None:
            self.active = True

        def stop(self) -> None:
            self.active = False

    class QSettings:
        """Slicer's application settings: one store for every module in this process."""

        store: ClassVar[dict[str, Any]] = {}

        def value(self, key: str, default: Any = None) -> Any:
            return self.store.get(key, default)

        def setValue(self, key: str, value: Any) -> None:
            self.store[key] = value

    module("qt", QTimer=QTimer, Qt=types.SimpleNamespace(ToolTipRole=3), QFileDialog=None, QSettings=QSettings)

    @contextlib.contextmanager
    def try_with_error_display(message: str | None = None, show: bool = True, waitCursor: bool = False) -> Any:
        """Like slicer.util.tryWithErrorDisplay: the message and the error in a dialog, then the error re-raised."""
        try:
            yield
        except Exception as error:
            recorder("errorDisplay")(f"{message}\n\n{error}" if message else str(error))
            raise
    module("ctk")
    module("vtk", vtkCommand=types.SimpleNamespace(ModifiedEvent="ModifiedEvent"))

    class VTKObservationMixin:
        def __init__(self) -> None:
            self.Observations: list[tuple[Any, Any, Callable, int]] = []

        def addObserver(self, obj: Any, event: Any, callback: Callable) -> None:
            tag = obj.AddObserver(event, callback) if hasattr(obj, "AddObserver") else 0
            self.Observations.append((obj, event, callback, tag))

        def removeObserver(self, obj: Any, event: Any, callback: Callable) -> None:
            for observation in list(self.Observations):
                if observation[:3] == (obj, event, callback):
                    if hasattr(obj, "RemoveObserver"):
                        obj.RemoveObserver(observation[3])
                    self.Observations.remove(observation)

        def removeObservers(self) -> None:
            for observation in list(self.Observations):
                self.removeObserver(*observation[:3])

    def load_ui(path: str) -> Any:
        return types.SimpleNamespace(path=path, setMRMLScene=lambda scene: None)

    def child_widget_variables(ui_widget: Any) -> Any:
        """Only the names the .ui really has, so a name the code uses but the .ui lacks fails here too."""
        root = ElementTree.parse(ui_widget.path).getroot()
        names = {element.get("name") for tag in ("widget", "layout", "action") for element in root.iter(tag)}
        return types.SimpleNamespace(**{name: FakeWidget(name) for name in names if name})

    util = module(
        "slicer.util",
        VTKObservationMixin=VTKObservationMixin,
        loadUI=load_ui,
        childWidgetVariables=child_widget_variables,
        warningDisplay=recorder("warningDisplay"),
        errorDisplay=recorder("errorDisplay"),
        infoDisplay=recorder("infoDisplay"),
        setSliceViewerLayers=recorder("setSliceViewerLayers"),
        confirmOkCancelDisplay=recorder("confirmOkCancelDisplay", False),
        confirmYesNoDisplay=recorder("confirmYesNoDisplay", False),
        tryWithErrorDisplay=try_with_error_display,
        mainWindow=lambda: None,
        pip_install=recorder("pip_install"),
        WaitCursor=contextlib.nullcontext,
    )

    class ScriptedLoadableModule:
        def __init__(self, parent: Any) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent or types.SimpleNamespace(isEntered=True)
            self.layout = types.SimpleNamespace(addWidget=lambda widget: None)
            self.moduleName = type(self).__name__[: -len("Widget")]

        def setup(self) -> None:
            pass

        def resourcePath(self, relative: str) -> str:
            return str(ROOT / "Resources" / relative)

        def onReload(self) -> None:
            recorder("onReload")(self.moduleName)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent: Any = None) -> None:
            self._node = FakeParameterNode()

        def getParameterNode(self) -> FakeParameterNode:
            return self._node

    class ScriptedLoadableModuleTest:
        pass

    module(
        "slicer.ScriptedLoadableModule",
        ScriptedLoadableModule=ScriptedLoadableModule,
        ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest=ScriptedLoadableModuleTest,
    )
    module("slicer.i18n", tr=lambda text: text)
    module("slicer.parameterNodeWrapper", parameterNodeWrapper=_parameter_node_wrapper,
           Choice=lambda choices: ("Choice", tuple(choices)))
    slicer = module(
        "slicer",
        util=util,
        app=_Missing("app"),
        mrmlScene=_Missing("mrmlScene"),
        vtkMRMLScalarVolumeNode=type("vtkMRMLScalarVolumeNode", (), {}),
        vtkMRMLSegmentationNode=type("vtkMRMLSegmentationNode", (), {}),
    )
    slicer.__path__ = []  # a package, so `import slicer.util` works; slicer.packaging stays missing (old Slicer)
    return slicer


class FakeScene:
    StartCloseEvent, EndCloseEvent = "StartCloseEvent", "EndCloseEvent"
    NodeAddedEvent, NodeRemovedEvent = "NodeAddedEvent", "NodeRemovedEvent"

    def __init__(self) -> None:
        self.nodes: list[Any] = []

    def GetFirstNodeByClass(self, class_name: str) -> Any:
        return self.nodes[0] if self.nodes else None

    def GetNumberOfNodesByClass(self, class_name: str) -> int:
        return len(self.nodes)

    def GetNthNodeByClass(self, index: int, class_name: str) -> Any:
        return self.nodes[index]

    def IsNodePresent(self, node: Any) -> bool:
        return node in self.nodes

    def AddObserver(self, event: Any, callback: Callable) -> int:
        return 0


class FakeNode:
    def __init__(self, name: str, node_id: str) -> None:
        self._name, self._id = name, node_id

    def GetName(self) -> str:
        return self._name

    def GetID(self) -> str:
        return self._id

    def IsA(self, class_name: str) -> bool:
        return class_name == "vtkMRMLScalarVolumeNode"


class FakeLabelMapNode(FakeNode):
    def IsA(self, class_name: str) -> bool:
        return class_name in ("vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode")


class FakeRun:
    """A started run: events per poll, then stopped; finish() returns `result` or raises `error`."""

    def __init__(self, polls: list[list[Any]], result: Any = None, error: Exception | None = None) -> None:
        self.polls, self.result, self.error = list(polls), result, error
        self.cancelled = self.finished = 0
        self.log_lines = ["worker line 1", "worker line 2"]

    def poll(self) -> list[Any]:
        return self.polls.pop(0) if self.polls else []

    def is_running(self) -> bool:
        return bool(self.polls) and not self.cancelled

    def cancel(self) -> None:
        self.cancelled += 1

    def finish(self) -> Any:
        self.finished += 1
        if self.cancelled:
            from MIADeepLearningLib.engine.errors import CancelledError

            raise CancelledError("Cancelled.")
        if self.error is not None:
            raise self.error
        return self.result


# The cases (run in the subprocess)


def _import_modules(recorder: Recorder, first: str) -> tuple[types.ModuleType, dict[str, types.ModuleType]]:
    """Import `first` alone (it must not pull the other module file), then the rest; then 'start' Slicer."""
    slicer = install_stubs(recorder)
    modules = {first: __import__(first)}
    others = set(MODULES) - {first}
    assert not others & set(sys.modules), f"importing {first} imported {others & set(sys.modules)}"
    heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "monai", "SimpleITK", "numpy")
                   or name.startswith("MIADeepLearningLib.mrml"))
    assert not heavy, f"importing {first} imported {heavy}"
    for name in sorted(others):
        modules[name] = __import__(name)
    slicer.app = types.SimpleNamespace(processEvents=lambda: None, layoutManager=lambda: None)
    slicer.mrmlScene = FakeScene()
    return slicer, modules


def _widget(module: types.ModuleType, name: str, models: list[Any]) -> Any:
    logic_class = getattr(module, f"{name}Logic")
    logic_class.availableModels = staticmethod(lambda: list(models))  # the registry, without the MRML bridge
    if hasattr(logic_class, "disclaimer"):
        logic_class.disclaimer = staticmethod(lambda: "Synthesized: not for diagnosis on its own.")
    widget = getattr(module, f"{name}Widget")()
    widget.setup()
    return widget


def _model(model_id: str) -> Any:
    return types.SimpleNamespace(id=model_id, title=model_id.title(), description=f"{model_id} model.",
                                 license="MIT", citation="Someone 2024.")


_SEGMENTATION_RESULT = types.SimpleNamespace(
    segmentation_node=FakeNode("brain", "vtkMRMLSegmentationNode1"), masked_volume_node=None, warnings=["w1"],
    timings={"inference": 1.25}, uncertainty_node=None, volume_table_node=None,
)
_SYNTHESIS_RESULT = types.SimpleNamespace(
    volume_node=FakeNode("head 1mm", "vtkMRMLScalarVolumeNode9"), uncertainty_node=None, difference_node=None,
    warnings=[], timings={"total": 3.0},
)
_REGISTRATION_RESULT = types.SimpleNamespace(
    transform_node=FakeNode("moving to fixed", "vtkMRMLGridTransformNode1"),
    warped_volume_node=FakeNode("moving registered", "vtkMRMLScalarVolumeNode9"), segmentation_node=None,
    report_table_node=FakeNode("moving to fixed registration quality", "vtkMRMLTableNode1"),
    quality=[types.SimpleNamespace(measure="Folded voxels (det J <= 0), %", value=0.0)], warnings=[],
    timings={"total": 2.0}, summary=lambda: "folding 0.00 % of voxels",
)
_CLASSIFIED_VOLUME = FakeNode("head", "vtkMRMLScalarVolumeNode1")
_CLASSIFICATION_RESULT = types.SimpleNamespace(
    rows=[types.SimpleNamespace(volume_node=_CLASSIFIED_VOLUME, name="head", classified=True,
                                saliency_node=FakeNode("head saliency", "vtkMRMLScalarVolumeNode9"),
                                summary=lambda: "FLAIR (p = 0.96; runner-up T2-weighted 0.02)")],
    table_node=FakeNode("Sequence types", "vtkMRMLTableNode1"), warnings=[], timings={"total": 2.0},
    summary=lambda: "'head': FLAIR (p = 0.96; runner-up T2-weighted 0.02)",
)
_DETECTION_RESULT = types.SimpleNamespace(
    anomaly_node=FakeNode("head anomaly map", "vtkMRMLScalarVolumeNode8"),
    table_node=FakeNode("head lesion candidates table", "vtkMRMLTableNode1"),
    candidates=[{"label": 1, "volume_ml": 1.5, "center_ras": [10.0, -5.0, 2.5], "max_score": 0.8,
                 "mean_score": 0.7, "tissue": "white matter", "voxels": 40}],
    found=1, threshold=0.5, case_score=0.83, warnings=[], timings={"total": 2.0},
    summary=lambda: "1 lesion candidate at threshold 0.50; case abnormality score 0.83",
)
CASES: dict[str, dict[str, Any]] = {
    "DLSegmentation": {
        "model": "deepbet", "title": "DL Segmentation", "failed": "Segmentation failed: boom",
        "start_kwargs": {"extraVolumes": [], "modelOptions": {}, "outputSegmentation": None,
                         "createMaskedVolume": False, "createUncertainty": False, "createVolumeTable": True,
                         "keepModelLoaded": True},
        "result": _SEGMENTATION_RESULT, "done": "Done: segmentation 'brain' (1 warning(s), see the log).",
    },
    "DLSynthesis": {
        "model": "thick-slice-sr", "title": "DL Synthesis", "failed": "Synthesis failed: boom",
        "start_kwargs": {"outputVolume": None, "createUncertainty": False, "createDifference": False,
                         "keepModelLoaded": True},
        "result": _SYNTHESIS_RESULT, "done": "Done: volume 'head 1mm' in 3.0 s.",
    },
    "DLRegistration": {
        "model": "brain-registration", "title": "DL Registration", "failed": "Registration failed: boom",
        "inputs": ("fixedVolume", "movingVolume"), "missing": "Select a fixed volume.",
        "start_kwargs": {"fixedMask": None, "movingMask": None, "movingSegmentation": None,
                         "fixedSegmentation": None, "instanceSteps": 50, "keepModelLoaded": True},
        "result": _REGISTRATION_RESULT,
        "done": "Done: 'moving to fixed', 'moving registered', 'moving to fixed registration quality' in 2.0 s.",
    },
    "DLClassification": {
        "model": "sequence-type", "title": "DL Classification", "failed": "Classification failed: boom",
        "start_kwargs": {"createSaliency": False, "keepModelLoaded": True},
        "result": _CLASSIFICATION_RESULT,
        "done": "Done: 'head': FLAIR (p = 0.96; runner-up T2-weighted 0.02); see table 'Sequence types' (2.0 s).",
    },
    "DLLesionDetection": {
        "model": "brain-lesion", "title": "DL Lesion Detection", "failed": "Lesion detection failed: boom",
        "start_kwargs": {"extraVolumes": [], "outputSegmentation": None, "keepModelLoaded": True},
        "result": _DETECTION_RESULT,
        "done": "Done: 1 lesion candidate at threshold 0.50; case abnormality score 0.83 (2.0 s).",
    },
}


def case_apply_poll_finish_cancel_errors(name: str) -> None:
    from MIADeepLearningLib.engine.errors import InputError
    from MIADeepLearningLib.jobs import Event

    recorder = Recorder()
    slicer, modules = _import_modules(recorder, name)
    import MIADeepLearningLib.gui.task_widget as task_widget

    case = CASES[name]
    module = modules[name]
    assert module.DEVICE_CHOICES == ["auto", "cpu", "cuda", "remote"]
    widget = _widget(module, name, [_model(case["model"])])
    ui, params = widget.ui, widget._parameterNode
    assert params.device == "auto" and params.modelId == case["model"]
    assert ui.modelComboBox.currentIndex == 0
    assert ui.modelDescriptionLabel.text == f"{case['model']} model. Licence: MIT. Cite: Someone 2024."
    assert widget._pollTimer.interval == task_widget.POLL_INTERVAL_MS
    assert ui.applyButton.connections["clicked(bool)"] == widget.onApplyButton
    assert (ui.applyButton.text, ui.applyButton.enabled, ui.applyButton.toolTip) == (
        "Apply", False, case.get("missing", "Select an input volume."))

    inputs = case.get("inputs", ("inputVolume",))
    volumes = [FakeNode(f"head {index}", f"vtkMRMLScalarVolumeNode{index + 1}") for index in range(len(inputs))]
    for field, node in zip(inputs, volumes):
        slicer.mrmlScene.nodes.append(node)
        setattr(params, field, node)
    volume = volumes[0]
    assert ui.applyButton.enabled, ui.applyButton.toolTip
    if name == "DLSynthesis":  # the module's own refusal, through the _inputProblem hook
        assert ui.disclaimerLabel.text.startswith("Synthesized")
        params.outputVolume = volume
        assert not ui.applyButton.enabled and "must not be the input volume" in ui.applyButton.toolTip
        params.outputVolume = None
        assert ui.applyButton.enabled
    if name == "DLRegistration":  # a moving volume, and two different volumes
        params.movingVolume = None
        assert not ui.applyButton.enabled and ui.applyButton.toolTip == "Select a moving volume."
        params.movingVolume = volume
        assert not ui.applyButton.enabled and "two different volumes" in ui.applyButton.toolTip
        params.movingVolume = volumes[1]
        assert ui.applyButton.enabled
    params.modelId = "unknown"
    assert not ui.applyButton.enabled and ui.applyButton.toolTip == "Select a model."
    assert ui.modelDescriptionLabel.text == "Model 'unknown' is not available here."
    params.modelId = case["model"]
    assert ui.applyButton.enabled

    ensured: list[tuple] = []
    task_widget.ensureDependencies = lambda *args: ensured.append(args)
    started: list[tuple] = []
    runs: list[FakeRun] = []

    def start(*args: Any, **kwargs: Any) -> FakeRun:
        started.append((args, kwargs))
        return runs.pop(0)

    widget.logic.start = start

    # 1. success: Apply -> Cancel, progress, log, result, back to Apply
    runs.append(FakeRun([[Event(stage="inference", progress=0.5, message="Half way")], []], result=case["result"]))
    widget.onApplyButton()
    assert ensured == [(case["model"], str(ROOT / "Resources" / "requirements.txt"))]
    assert started == [((*volumes, case["model"]), {"device": "auto", **case["start_kwargs"]})]
    assert (ui.applyButton.text, ui.applyButton.enabled) == ("Cancel", True)
    assert not ui.inputsCollapsibleButton.enabled and not ui.outputsCollapsibleButton.enabled
    assert widget._pollTimer.active
    assert ui.logTextEdit.lines[-1] == f"Started model '{case['model']}' on device 'auto'."
    widget._onPollTimer()
    assert ui.progressBar.value == 50 and ui.statusLabel.text == "Half way"
    assert ui.logTextEdit.lines[-1] == "[inference] Half way"
    widget._onPollTimer()
    widget._onPollTimer()
    assert not widget._pollTimer.active and widget._run is None
    assert ui.statusLabel.text == case["done"], ui.statusLabel.text
    assert ui.progressBar.value == 100
    assert (ui.applyButton.text, ui.applyButton.enabled) == ("Apply", True)
    assert ui.inputsCollapsibleButton.enabled and ui.outputsCollapsibleButton.enabled
    assert recorder.named("setSliceViewerLayers"), "the result was not shown"

    # 2. cancel: the second press cancels, the button is disabled until the run has stopped
    run = FakeRun([[], [], []])
    runs.append(run)
    widget.onApplyButton()
    widget.onApplyButton()
    assert run.cancelled == 1 and ui.statusLabel.text == "Cancelling..."
    assert (ui.applyButton.text, ui.applyButton.enabled) == ("Cancel", False)
    widget._onPollTimer()
    assert ui.statusLabel.text == "Cancelled; nothing was added to the scene."
    assert (ui.applyButton.text, ui.applyButton.enabled) == ("Apply", True)
    assert not recorder.named("errorDisplay")

    # 3. errors: one sentence in the dialog (module title), worker output in the details
    runs.append(FakeRun([[]], error=RuntimeError("boom")))
    widget.onApplyButton()
    widget._onPollTimer()
    widget._onPollTimer()
    (args, kwargs), = recorder.named("errorDisplay")
    assert args == (case["failed"],) and kwargs["windowTitle"] == case["title"]
    assert "worker line 2" in kwargs["detailedText"] and "--- worker output ---" in ui.logTextEdit.lines
    runs.append(FakeRun([[]], error=InputError("The input is not a 3D volume.")))
    widget.onApplyButton()
    widget._onPollTimer()
    widget._onPollTimer()
    assert recorder.named("errorDisplay")[-1][0] == ("The input is not a 3D volume.",)
    widget.logic.start = lambda *args, **kwargs: (_ for _ in ()).throw(InputError("Refused before start."))
    widget.onApplyButton()
    assert recorder.named("errorDisplay")[-1][0] == ("Refused before start.",) and widget._run is None
    assert ui.applyButton.text == "Apply"

    # 4. a declined install: a warning, nothing started
    def decline(*args: Any) -> None:
        raise task_widget.DependenciesNotInstalled("PyTorch was not installed.")

    task_widget.ensureDependencies = decline
    widget.logic.start = start
    widget.onApplyButton()
    (args, kwargs), = recorder.named("warningDisplay")
    assert args == ("PyTorch was not installed.",) and kwargs["windowTitle"] == case["title"]
    assert ui.statusLabel.text == "PyTorch was not installed." and widget._run is None and not runs

    # 5. a run still going when the module is unloaded is cancelled and reaped; the warm worker is ended
    task_widget.ensureDependencies = lambda *args: None
    run = FakeRun([[], [], []])
    runs.append(run)
    widget.onApplyButton()
    shutdowns: list[int] = []
    widget.logic.shutdownWarmWorker = lambda: shutdowns.append(1)
    widget.cleanup()
    assert run.cancelled == 1 and run.finished == 1 and shutdowns == [1] and not widget._pollTimer.active
    assert widget.Observations == []


def case_logic_warm_worker(name: str) -> None:
    recorder = Recorder()
    _, modules = _import_modules(recorder, name)
    import MIADeepLearningLib.gui.task_logic as task_logic
    import MIADeepLearningLib.runner as runner

    class FakeWarmWorker:
        def __init__(self, python_executable: str | None = None) -> None:
            self.python_executable, self.shutdowns = python_executable, 0

        def shutdown(self) -> None:
            self.shutdowns += 1

    runner.WarmWorker = FakeWarmWorker
    task_logic.requirePythonSlicer = lambda: "/opt/Slicer/bin/PythonSlicer"
    logic = getattr(modules[name], f"{name}Logic")()
    created: list[tuple] = []
    logic.createTaskLogic = lambda python, warm: created.append((python, warm)) or types.SimpleNamespace(warm=warm)
    accessor = getattr(logic, {"DLSegmentation": "segmentationLogic", "DLSynthesis": "synthesisLogic",
                               "DLRegistration": "registrationLogic", "DLClassification": "classificationLogic",
                               "DLLesionDetection": "detectionLogic"}[name])

    cold = accessor(False)
    assert accessor(False) is cold and cold.warm is None
    warm = accessor(True)
    assert accessor(True) is warm and isinstance(warm.warm, FakeWarmWorker)
    assert warm.warm.python_executable == "/opt/Slicer/bin/PythonSlicer"
    assert created == [("/opt/Slicer/bin/PythonSlicer", None), ("/opt/Slicer/bin/PythonSlicer", warm.warm)]
    logic.shutdownWarmWorker()
    assert warm.warm.shutdowns == 1
    assert accessor(True) is not warm, "a new warm worker after shutdown"
    assert accessor(False) is cold


def case_parameter_node_hints(name: str) -> None:
    """The annotations resolve in the module's globals (DEVICE_CHOICES now comes from gui.task_widget)."""
    _, modules = _import_modules(Recorder(), name)
    hints = getattr(modules[name], f"{name}ParameterNode").hints
    assert "Choice" in repr(hints["device"]) or "auto" in repr(hints["device"]), hints["device"]


def case_segmentation_optional_outputs(name: str) -> None:
    """The uncertainty option shows only for a model that lists it (and is passed on only then); the volume table
    of a run appears in the Results section and goes away after a run without one."""
    recorder = Recorder()
    slicer, modules = _import_modules(recorder, name)
    import MIADeepLearningLib.gui.task_widget as task_widget

    tissue = types.SimpleNamespace(**vars(_model("tiny-tissue")), optional_outputs=["uncertainty"])
    widget = _widget(modules[name], name, [_model("deepbet"), tissue])
    ui, params = widget.ui, widget._parameterNode
    assert params.createVolumeTable is True and params.createUncertainty is False
    assert not ui.resultsCollapsibleButton.visible and ui.volumesTableView.tableNode is None
    assert not ui.createUncertaintyCheckBox.visible, "deepbet makes no uncertainty map"
    params.modelId = "tiny-tissue"
    assert ui.createUncertaintyCheckBox.visible
    params.createUncertainty = True
    volume = FakeNode("head", "vtkMRMLScalarVolumeNode1")
    slicer.mrmlScene.nodes.append(volume)
    params.inputVolume = volume
    task_widget.ensureDependencies = lambda *args: None
    started: list[dict] = []
    results: list[Any] = []
    widget.logic.start = lambda *args, **kwargs: started.append(kwargs) or FakeRun([[]], result=results.pop(0))

    table = FakeNode("head tissue volumes", "vtkMRMLTableNode1")
    results.append(types.SimpleNamespace(
        segmentation_node=FakeNode("head tissue", "vtkMRMLSegmentationNode1"), masked_volume_node=None,
        uncertainty_node=FakeNode("head tissue uncertainty", "vtkMRMLScalarVolumeNode2"), volume_table_node=table,
        warnings=[], timings={}))
    widget.onApplyButton()
    widget._onPollTimer()
    assert started[-1]["createUncertainty"] is True and started[-1]["createVolumeTable"] is True
    assert ui.statusLabel.text == ("Done: segmentation 'head tissue' and volume 'head tissue uncertainty' and table "
                                   "'head tissue volumes'."), ui.statusLabel.text
    assert ui.volumesTableView.tableNode is table
    assert ui.resultsCollapsibleButton.visible and not ui.resultsCollapsibleButton.collapsed

    # back to a model without the map: hidden, and not asked for although the parameter node still says so
    params.modelId = "deepbet"
    assert not ui.createUncertaintyCheckBox.visible and params.createUncertainty is True
    params.createVolumeTable = False
    results.append(types.SimpleNamespace(
        segmentation_node=FakeNode("head brain", "vtkMRMLSegmentationNode2"), masked_volume_node=None,
        uncertainty_node=None, volume_table_node=None, warnings=[], timings={}))
    widget.onApplyButton()
    widget._onPollTimer()
    assert started[-1]["createUncertainty"] is False and started[-1]["createVolumeTable"] is False
    assert ui.statusLabel.text == "Done: segmentation 'head brain'."
    assert ui.volumesTableView.tableNode is None and not ui.resultsCollapsibleButton.visible


def case_registration_inputs_and_report(name: str) -> None:
    """Entering the module picks the first two image volumes (label maps skipped) as fixed and moving; the masks,
    segmentations and refinement steps are passed on as chosen; one segmentation on both sides is refused; after a
    run the quality report is shown (table, summary, rows in the log) and the moving image over the fixed one."""
    recorder = Recorder()
    slicer, modules = _import_modules(recorder, name)
    import MIADeepLearningLib.gui.task_widget as task_widget

    labels = FakeLabelMapNode("labels", "vtkMRMLLabelMapVolumeNode1")
    fixed, moving = FakeNode("t1", "vtkMRMLScalarVolumeNode2"), FakeNode("t2", "vtkMRMLScalarVolumeNode3")
    slicer.mrmlScene.nodes.extend([labels, fixed, moving])
    widget = _widget(modules[name], name, [_model("brain-registration")])
    ui, params = widget.ui, widget._parameterNode
    assert params.fixedVolume is fixed and params.movingVolume is moving, (params.fixedVolume, params.movingVolume)
    assert params.instanceSteps == 50 and params.fixedMask is None and params.movingSegmentation is None
    assert not ui.resultsCollapsibleButton.visible and ui.reportTableView.tableNode is None
    assert ui.applyButton.enabled, ui.applyButton.toolTip

    mask, structures = FakeNode("brain", "vtkMRMLSegmentationNode1"), FakeNode("tissue", "vtkMRMLSegmentationNode2")
    params.movingSegmentation = structures
    params.fixedSegmentation = structures
    assert not ui.applyButton.enabled and "two different segmentations" in ui.applyButton.toolTip
    params.fixedSegmentation = None
    params.fixedMask = mask
    params.instanceSteps = 20
    assert ui.applyButton.enabled, ui.applyButton.toolTip

    task_widget.ensureDependencies = lambda *args: None
    started: list[tuple] = []
    widget.logic.start = lambda *args, **kwargs: started.append((args, kwargs)) or FakeRun(
        [[]], result=_REGISTRATION_RESULT)
    widget.onApplyButton()
    widget._onPollTimer()
    ((args, kwargs),) = started
    assert args == (fixed, moving, "brain-registration")
    assert kwargs == {"device": "auto", "fixedMask": mask, "movingMask": None, "movingSegmentation": structures,
                      "fixedSegmentation": None, "instanceSteps": 20, "keepModelLoaded": True}, kwargs
    assert ui.reportTableView.tableNode is _REGISTRATION_RESULT.report_table_node
    assert ui.resultsCollapsibleButton.visible and not ui.resultsCollapsibleButton.collapsed
    assert ui.reportSummaryLabel.text == "folding 0.00 % of voxels"
    assert "  Folded voxels (det J <= 0), %: 0" in ui.logTextEdit.lines, ui.logTextEdit.lines
    ((_, layers_kwargs),) = recorder.named("setSliceViewerLayers")
    assert layers_kwargs == {"background": fixed, "foreground": _REGISTRATION_RESULT.warped_volume_node,
                             "foregroundOpacity": 0.5, "fit": True}, layers_kwargs


def case_one_job_or_install_at_a_time(name: str) -> None:
    """While Apply installs packages (Slicer's pip helpers process GUI events on every output line, so clicks
    arrive), Apply and every other action are disabled and a second click starts nothing; a second install from any
    module is refused, not nested."""
    recorder = Recorder()
    slicer, modules = _import_modules(recorder, name)
    import MIADeepLearningLib.gui.dependencies as dependencies
    import MIADeepLearningLib.gui.task_widget as task_widget

    case = CASES[name]
    widget = _widget(modules[name], name, [_model(case["model"])])
    ui, params = widget.ui, widget._parameterNode
    for field in case.get("inputs", ("inputVolume",)):
        node = FakeNode(field, f"vtkMRMLScalarVolumeNode{len(slicer.mrmlScene.nodes) + 1}")
        slicer.mrmlScene.nodes.append(node)
        setattr(params, field, node)
    assert ui.applyButton.enabled, ui.applyButton.toolTip
    actions = [getattr(ui, button) for button in task_widget.ACTION_BUTTONS if hasattr(ui, button)]
    assert "deviceReportButton" in [action.name for action in actions], "every module has the device report"
    assert all(action.enabled for action in actions)

    seen_during_install: list[tuple] = []
    nested: list[Any] = []

    def install(model_id: str, requirements: str) -> None:
        """What the real installer does meanwhile: events are processed, the user clicks Apply again."""
        seen_during_install.append((ui.applyButton.enabled, ui.applyButton.toolTip,
                                    [action.enabled for action in actions], ui.inputsCollapsibleButton.enabled))
        widget.onApplyButton()  # re-entrant click: must start nothing and not install again
        if hasattr(ui, "deviceReportButton"):
            widget.onDeviceReportButton()
        try:  # another module's Apply at the same moment: refused by the installer itself
            dependencies._installing = True
            dependencies.ensureDependencies(model_id, requirements)
        except dependencies.DependenciesNotInstalled as error:
            nested.append(str(error))
        finally:
            dependencies._installing = False

    task_widget.ensureDependencies = install
    started: list[tuple] = []
    widget.logic.start = lambda *args, **kwargs: started.append(args) or FakeRun([[], []], result=case["result"])
    widget.logic.startDeviceReport = lambda: started.append(("device report",)) or FakeRun([[]], result={})
    widget.onApplyButton()
    ((apply_enabled, tooltip, action_states, inputs_enabled),) = seen_during_install
    assert not apply_enabled and "being installed" in tooltip, tooltip
    assert not any(action_states) and not inputs_enabled
    assert len(started) == 1 and started[0] != ("device report",), started
    assert nested and "still installing" in nested[0], nested
    assert (ui.applyButton.text, ui.applyButton.enabled) == ("Cancel", True)
    assert not any(action.enabled for action in actions), "an action stayed enabled while the model runs"
    widget._onPollTimer()
    widget._onPollTimer()
    assert (ui.applyButton.text, ui.applyButton.enabled) == ("Apply", True)
    assert all(action.enabled for action in actions)

    # a declined or failed install re-enables everything too
    def decline(*args: Any) -> None:
        raise task_widget.DependenciesNotInstalled("PyTorch was not installed.")

    task_widget.ensureDependencies = decline
    widget.onApplyButton()
    assert ui.applyButton.enabled and all(action.enabled for action in actions) and widget._run is None


def case_unsupported_slicer_torch_or_launcher(name: str) -> None:
    """An older Slicer or torch, and a missing PythonSlicer, are one sentence at Apply, not a traceback."""
    recorder = Recorder()
    slicer, modules = _import_modules(recorder, name)
    import MIADeepLearningLib.gui.dependencies as dependencies
    from MIADeepLearningLib import versions

    case = CASES[name]
    widget = _widget(modules[name], name, [_model(case["model"])])
    params = widget._parameterNode
    for field in case.get("inputs", ("inputVolume",)):
        node = FakeNode(field, f"vtkMRMLScalarVolumeNode{len(slicer.mrmlScene.nodes) + 1}")
        slicer.mrmlScene.nodes.append(node)
        setattr(params, field, node)
    minimum = ".".join(str(part) for part in versions.MINIMUM_SLICER_VERSION)
    major, minor = versions.MINIMUM_SLICER_VERSION
    slicer.app.majorVersion, slicer.app.minorVersion = major, minor - 1
    widget.onApplyButton()
    (args, kwargs), = recorder.named("warningDisplay")
    assert args[0].startswith(f"MIADeepLearning needs 3D Slicer {minimum} or newer; this is Slicer {major}.{minor - 1}")
    assert widget._run is None and not recorder.named("pip_install")

    slicer.app.majorVersion, slicer.app.minorVersion = major, minor
    dependencies._installedVersion = lambda distribution: "2.0.1" if distribution == "torch" else None
    widget.onApplyButton()
    (args, _), = recorder.named("warningDisplay")[1:]
    torch_minimum = versions.dotted(versions.MINIMUM_TORCH_VERSION)
    assert f"PyTorch 2.0.1 is installed, but MIADeepLearning needs PyTorch {torch_minimum} or newer" in args[0], args
    assert widget._run is None and not recorder.named("pip_install")

    # everything installed, but no PythonSlicer next to Slicer: a clear sentence instead of a Popen error
    import MIADeepLearningLib.gui.task_widget as task_widget

    task_widget.ensureDependencies = lambda *args: None
    dependencies.pythonSlicerExecutable = lambda: None
    widget.onApplyButton()
    (args, kwargs), = recorder.named("errorDisplay")
    assert "'PythonSlicer' was not found" in args[0] and kwargs["windowTitle"] == case["title"], args
    assert widget._run is None and widget.ui.applyButton.text == "Apply"


def case_device_report_in_the_background(name: str) -> None:
    """Device report: a background job with progress and Cancel, like a run; Apply waits for it."""
    recorder = Recorder()
    slicer, modules = _import_modules(recorder, name)
    import MIADeepLearningLib.gui.task_widget as task_widget
    from MIADeepLearningLib.jobs import Event

    widget = _widget(modules[name], name, [_model(CASES[name]["model"])])
    ui, params = widget.ui, widget._parameterNode
    for field in CASES[name].get("inputs", ("inputVolume",)):
        node = FakeNode(field, f"vtkMRMLScalarVolumeNode{len(slicer.mrmlScene.nodes) + 1}")
        slicer.mrmlScene.nodes.append(node)
        setattr(params, field, node)
    assert ui.deviceReportButton.connections["clicked(bool)"] == widget.onDeviceReportButton
    report = {"torch": "2.13.0+cpu", "cuda_usable": False, "auto_choice": "CPU (no CUDA build of torch)",
              "torch_problem": None}
    runs = [FakeRun([[Event(stage="device", progress=0.2, message="Importing PyTorch")], []], result=report)]
    widget.logic.startDeviceReport = lambda: runs.pop(0)
    task_widget.ensureDependencies = lambda *args: (_ for _ in ()).throw(AssertionError("Apply ran"))

    widget.onDeviceReportButton()
    assert ui.deviceReportButton.text == "Cancel device report" and ui.deviceReportButton.enabled
    assert not ui.applyButton.enabled and "device report is being made" in ui.applyButton.toolTip
    widget.onApplyButton()  # refused while the report runs (ensureDependencies would raise)
    widget._onPollTimer()
    assert ui.progressBar.value == 20 and ui.statusLabel.text == "Importing PyTorch"
    widget._onPollTimer()
    widget._onPollTimer()
    assert widget._run is None and ui.deviceReportButton.text == "Device report" and ui.applyButton.enabled
    (args, kwargs), = recorder.named("infoDisplay")
    assert args == ("CPU (no CUDA build of torch)",) and "torch: 2.13.0+cpu" in kwargs["detailedText"]
    assert "  cuda_usable: False" in ui.logTextEdit.lines

    # cancel: the same button stops it; the status says so, no dialog
    run = FakeRun([[], [], []])
    runs.append(run)
    widget.onDeviceReportButton()
    widget.onDeviceReportButton()
    assert run.cancelled == 1 and not ui.deviceReportButton.enabled
    widget._onPollTimer()
    assert ui.statusLabel.text == "Device report cancelled." and ui.deviceReportButton.text == "Device report"
    assert not recorder.named("errorDisplay") and len(recorder.named("infoDisplay")) == 1

    # a failed report: one sentence in the dialog, the worker's output in the details
    runs.append(FakeRun([[]], error=RuntimeError("CUDA driver hung")))
    widget.onDeviceReportButton()
    widget._onPollTimer()
    widget._onPollTimer()
    (args, kwargs), = recorder.named("errorDisplay")
    assert args == ("The device report could not be made: CUDA driver hung",), args
    assert ui.applyButton.enabled and ui.deviceReportButton.enabled


def case_reload_leaves_the_other_modules_working(name: str) -> None:
    """Developer Reload of one module purges the library (edits are picked up), but a Cancel in another module, whose
    widget keeps the library code it was loaded with, is still recognised when the error comes from code imported
    after the reload."""
    recorder = Recorder()
    slicer, modules = _import_modules(recorder, name)
    from MIADeepLearningLib.engine.errors import CancelledError as cancelled_before

    other = next(module for module in MODULES if module != name)
    widgets = {module: _widget(modules[module], module, [_model(CASES[module]["model"])]) for module in (name, other)}
    widgets[name].onReload()
    assert recorder.named("onReload") == [((name,), {})]
    assert "MIADeepLearningLib.gui.task_widget" not in sys.modules, "the library was not purged"
    import MIADeepLearningLib.gui.task_widget  # noqa: F401  (what the reloaded module imports again)
    from MIADeepLearningLib.engine.errors import CancelledError as cancelled_after

    class RunCancelledByNewCode(FakeRun):
        def finish(self) -> Any:
            self.finished += 1
            raise cancelled_after("Cancelled by the user.")

    widget = widgets[other]
    params = widget._parameterNode
    for field in CASES[other].get("inputs", ("inputVolume",)):
        node = FakeNode(field, f"vtkMRMLScalarVolumeNode{len(slicer.mrmlScene.nodes) + 1}")
        slicer.mrmlScene.nodes.append(node)
        setattr(params, field, node)
    # The other module's widget runs the shared code it was loaded with (the module object purged from sys.modules)
    old_mixin = next(cls for cls in type(widget).__mro__ if cls.__name__ == "TaskWidgetMixin")
    assert old_mixin is not sys.modules["MIADeepLearningLib.gui.task_widget"].TaskWidgetMixin
    old_mixin.onApplyButton.__globals__["ensureDependencies"] = lambda *args: None
    widget.logic.start = lambda *args, **kwargs: RunCancelledByNewCode([[]])
    widget.onApplyButton()
    widget._onPollTimer()
    assert widget._run is None
    assert widget.ui.statusLabel.text == "Cancelled; nothing was added to the scene.", widget.ui.statusLabel.text
    assert not recorder.named("errorDisplay"), recorder.named("errorDisplay")
    assert cancelled_after is cancelled_before, "engine.errors must survive a reload (gui.task_widget.KEPT_ON_RELOAD)"


def _channel_model(model_id: str, channels: list[str]) -> Any:
    """A model that takes several images as channels (like an imported BraTS bundle)."""
    return types.SimpleNamespace(**vars(_model(model_id)), input_channels=list(channels))


def _answers(recorder: Recorder, name: str, replies: list[Any]) -> Callable:
    """A dialog that records its calls under `name` and gives the next of `replies` (then False)."""
    def reply(*args: Any, **kwargs: Any) -> Any:
        recorder.calls.append((name, args, kwargs))
        return replies.pop(0) if replies else False

    return reply


def case_segmentation_model_channels(name: str) -> None:
    """One volume selector per further input channel of the selected model, labelled with the channel's name and
    hidden for a one-channel model; Apply is refused until every channel has a volume of its own, and the volumes
    are passed on in the model's order (none for a one-channel model)."""
    recorder = Recorder()
    slicer, modules = _import_modules(recorder, name)
    import MIADeepLearningLib.gui.task_widget as task_widget

    brats = _channel_model("tiny-brats", ["T1c", "T1", "T2", "FLAIR"])
    widget = _widget(modules[name], name, [_model("deepbet"), brats])
    ui, params = widget.ui, widget._parameterNode
    selectors = [(getattr(ui, f"extraVolume{index}Label"), getattr(ui, f"extraVolume{index}Selector"))
                 for index in (1, 2, 3)]
    assert params.modelId == "deepbet" and ui.inputVolumeLabel.text == "Input volume:"
    assert not any(label.visible or selector.visible for label, selector in selectors)

    volumes = [FakeNode(f"case {channel}", f"vtkMRMLScalarVolumeNode{index + 1}")
               for index, channel in enumerate(brats.input_channels)]
    slicer.mrmlScene.nodes.extend(volumes)
    params.inputVolume = volumes[0]
    assert ui.applyButton.enabled, ui.applyButton.toolTip
    params.modelId = "tiny-brats"
    assert ui.inputVolumeLabel.text == "Input volume (T1c):"
    assert all(label.visible and selector.visible for label, selector in selectors)
    assert [label.text for label, _ in selectors] == ["T1:", "T2:", "FLAIR:"]
    assert not ui.applyButton.enabled and ui.applyButton.toolTip == "Select the volume for the channel 'T1'."
    params.extraVolume1, params.extraVolume2 = volumes[1], volumes[2]
    assert not ui.applyButton.enabled and ui.applyButton.toolTip == "Select the volume for the channel 'FLAIR'."
    params.extraVolume3 = volumes[1]
    assert not ui.applyButton.enabled and "same volume is selected for two channels" in ui.applyButton.toolTip
    params.extraVolume3 = volumes[0]  # the input volume again
    assert not ui.applyButton.enabled and "same volume" in ui.applyButton.toolTip
    params.extraVolume3 = volumes[3]
    assert ui.applyButton.enabled, ui.applyButton.toolTip

    task_widget.ensureDependencies = lambda *args: None
    started: list[tuple] = []
    widget.logic.start = lambda *args, **kwargs: started.append((args, kwargs)) or FakeRun(
        [[]], result=_SEGMENTATION_RESULT)
    widget.onApplyButton()
    widget._onPollTimer()
    ((args, kwargs),) = started
    assert args == (volumes[0], "tiny-brats") and kwargs["extraVolumes"] == volumes[1:], kwargs

    # back to a one-channel model: the selectors hide, their volumes are neither required nor passed on
    params.modelId = "deepbet"
    assert not any(label.visible or selector.visible for label, selector in selectors)
    assert ui.inputVolumeLabel.text == "Input volume:" and ui.applyButton.enabled
    params.extraVolume1 = volumes[0]
    assert ui.applyButton.enabled, "a hidden selector refused Apply"
    widget.onApplyButton()
    widget._onPollTimer()
    assert started[-1][1]["extraVolumes"] == [], started[-1]


def case_segmentation_import_model(name: str) -> None:
    """Import model: the package is described and the user asked (No starts nothing); Yes installs what the check
    needs and starts the import job, whose end lists and selects the model; an id already imported asks to replace
    it; packages the bundle needs are offered and the import started again with them."""
    recorder = Recorder()
    slicer, modules = _import_modules(recorder, name)
    import qt

    import MIADeepLearningLib.gui.task_widget as task_widget
    from MIADeepLearningLib.engine import registry
    from MIADeepLearningLib.engine.errors import MissingPackages
    from MIADeepLearningLib.gui.dependencies import DependenciesNotInstalled
    from MIADeepLearningLib.jobs import Event

    module = modules[name]
    models = [_model("deepbet")]
    widget = _widget(module, name, models)
    ui, params = widget.ui, widget._parameterNode
    logic_class = module.DLSegmentationLogic
    assert ui.importModelZipButton.connections["clicked(bool)"] == widget.onImportModelZip
    assert ui.removeModelButton.connections["clicked(bool)"] == widget.onRemoveModel

    qt.QFileDialog = types.SimpleNamespace(getOpenFileName=lambda *args: "/data/tiny_brats.zip",
                                           getExistingDirectory=lambda *args: "/data/tiny_brats")
    package = {"id": "tiny_brats", "title": "Tiny BraTS", "version": "0.2.0", "authors": "The tests",
               "origin": "/data/tiny_brats.zip", "python_files": [], "carries_code": True, "zoo_bundle": True,
               "inference_config": "configs/inference.yaml", "kind": "segmentation"}
    described: list[str] = []
    logic_class.describePackage = staticmethod(lambda path: described.append(path) or dict(package))
    installed: list[Any] = [None]
    logic_class.installedCopy = staticmethod(lambda modelId: installed[0])
    ensured: list[tuple] = []
    module.ensureImportDependencies = lambda *args: ensured.append(args)
    started: list[tuple] = []
    runs: list[FakeRun] = []
    widget.logic.startModelImport = lambda *args, **kwargs: started.append((args, kwargs)) or runs.pop(0)
    replies: list[Any] = []
    slicer.util.confirmYesNoDisplay = _answers(recorder, "confirmYesNoDisplay", replies)
    requirements = [registry.MONAI_REQUIREMENT, "pyyaml>=5.4"]  # a YAML bundle

    # 1. the user says No: nothing is installed or started
    replies.append(False)
    widget.onImportModelZip()
    assert described == ["/data/tiny_brats.zip"]
    ((args, kwargs),) = recorder.named("confirmYesNoDisplay")
    assert "/data/tiny_brats.zip ('Tiny BraTS' version 0.2.0 by The tests)" in args[0], args[0]
    assert "importing a model is like installing software" in args[0] and "Import this model?" in args[0]
    assert kwargs["windowTitle"] == "Import model" and "kind: segmentation" in kwargs["detailedText"]
    assert not ensured and not started and widget._run is None

    # 2. Yes: the check's packages (asked for by ensureImportDependencies), then the import job in the background
    brats = _channel_model("tiny_brats", ["T1c", "T1", "T2", "FLAIR"])
    brats.title = "Tiny BraTS"
    summary = {"id": "tiny_brats", "title": "Tiny BraTS", "version": "0.2.0", "task": "segmentation",
               "origin_kind": "imported"}
    runs.append(FakeRun([[Event(stage="import", progress=0.1, message="Checking the model package")], []],
                        result=summary))
    replies.append(True)
    widget.onImportModelZip()
    assert ensured == [(str(ROOT / "Resources" / "requirements.txt"), requirements)]
    assert started == [(("/data/tiny_brats.zip",), {"replace": False})]
    assert widget._run is not None and widget._runKind == task_widget.JOB_MODEL_IMPORT
    busy = "A model is being checked and imported; wait for it."
    assert not ui.applyButton.enabled and ui.applyButton.toolTip == busy
    assert not ui.importModelZipButton.enabled and not ui.removeModelButton.enabled
    assert widget._pollTimer.active
    widget._onPollTimer()
    assert ui.statusLabel.text == "Checking the model package" and ui.progressBar.value == 10
    models.append(brats)  # what the registry lists once the worker has imported it
    widget._onPollTimer()
    widget._onPollTimer()
    assert widget._run is None and not widget._pollTimer.active
    assert ui.modelComboBox.findData("tiny_brats") == 1 and params.modelId == "tiny_brats"
    assert ui.statusLabel.text == "Imported model 'Tiny BraTS' (version 0.2.0)." and ui.progressBar.value == 100
    assert ui.extraVolume3Selector.visible and ui.extraVolume3Label.text == "FLAIR:"
    assert ui.importModelZipButton.enabled and ui.removeModelButton.enabled
    assert not recorder.named("errorDisplay")

    # 3. the id is imported already: a second question; No leaves it, Yes replaces it
    installed[0] = types.SimpleNamespace(id="tiny_brats", title="Tiny BraTS", version="0.1.0")
    replies.extend([True, False])
    widget.onImportModelFolder()
    question = recorder.named("confirmYesNoDisplay")[-1][0][0]
    assert question.startswith("Model 'tiny_brats' is already imported (version 0.1.0). Replace it"), question
    assert len(started) == 1 and widget._run is None
    runs.append(FakeRun([[]], result=summary))
    replies.extend([True, True])
    widget.onImportModelFolder()
    assert started[-1] == (("/data/tiny_brats",), {"replace": True})
    widget._onPollTimer()
    widget._onPollTimer()
    assert ui.statusLabel.text == "Imported model 'Tiny BraTS' (version 0.2.0)."

    # 4. the bundle needs a package that is not installed: offered (ensureImportDependencies asks), imported again
    installed[0] = None
    missing = MissingPackages("Model 'Tiny BraTS' needs the Python package einops.", ["einops>=0.6"])
    runs.append(FakeRun([[]], error=missing))
    runs.append(FakeRun([[]], result=summary))
    replies.append(True)
    ensured.clear()
    widget.onImportModelZip()
    widget._onPollTimer()
    assert ensured == [(str(ROOT / "Resources" / "requirements.txt"), requirements),
                       (str(ROOT / "Resources" / "requirements.txt"), [*requirements, "einops>=0.6"])]
    assert started[-1] == (("/data/tiny_brats.zip",), {"replace": False}) and len(started) == 4
    assert "Model 'Tiny BraTS' needs the Python package einops." in ui.logTextEdit.lines
    assert widget._run is not None and not recorder.named("errorDisplay")
    widget._onPollTimer()
    widget._onPollTimer()
    assert ui.statusLabel.text == "Imported model 'Tiny BraTS' (version 0.2.0)."

    # 5. still missing after the install: one sentence, not asked again
    runs.extend([FakeRun([[]], error=missing), FakeRun([[]], error=missing)])
    replies.append(True)
    widget.onImportModelZip()
    widget._onPollTimer()
    widget._onPollTimer()
    assert len(started) == 6 and widget._run is None
    ((args, kwargs),) = recorder.named("errorDisplay")
    assert args == ("The model could not be imported: Model 'Tiny BraTS' needs the Python package einops.",), args

    # 6. the offered packages are declined: nothing more is started, the module is usable again
    runs.append(FakeRun([[]], error=missing))
    replies.append(True)
    calls = iter([None, DependenciesNotInstalled("The packages were not installed. Nothing was changed.")])

    def ensure_then_decline(*args: Any) -> None:
        ensured.append(args)
        error = next(calls)
        if error is not None:
            raise error

    module.ensureImportDependencies = ensure_then_decline
    widget.onImportModelZip()
    widget._onPollTimer()
    widget._onPollTimer()
    assert len(started) == 7 and widget._run is None and len(recorder.named("errorDisplay")) == 1
    assert ui.statusLabel.text == "The packages were not installed. Nothing was changed."
    assert ui.importModelZipButton.enabled and ui.applyButton.toolTip != busy

    # 7. the second start itself fails (on the poll timer's tick): one sentence in the dialog, not a lost traceback
    module.ensureImportDependencies = lambda *args: None
    runs.append(FakeRun([[]], error=missing))
    replies.append(True)
    widget.onImportModelZip()

    def no_launcher(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("PythonSlicer was not found")

    widget.logic.startModelImport = no_launcher
    widget._onPollTimer()
    assert widget._run is None and len(recorder.named("errorDisplay")) == 2
    assert recorder.named("errorDisplay")[-1][0] == ("The model could not be imported: PythonSlicer was not found",)
    assert ui.importModelZipButton.enabled and ui.applyButton.toolTip != busy


def case_segmentation_remove_model(name: str) -> None:
    """Remove model: a built-in model is refused in one sentence; an imported one is removed after asking, the warm
    worker is ended and the list is read again."""
    recorder = Recorder()
    slicer, modules = _import_modules(recorder, name)
    module = modules[name]
    spleen = _model("tiny_spleen")
    models = [_model("deepbet"), spleen]
    widget = _widget(module, name, models)
    ui, params = widget.ui, widget._parameterNode
    logic_class = module.DLSegmentationLogic
    logic_class.installedCopy = staticmethod(
        lambda modelId: types.SimpleNamespace(id=modelId, title="Tiny spleen", version="0.1.0")
        if modelId == "tiny_spleen" else None)
    removed: list[str] = []

    def remove(modelId: str) -> list:
        removed.append(modelId)
        models.remove(spleen)
        return []

    logic_class.removeModel = staticmethod(remove)
    shutdowns: list[int] = []
    widget.logic.shutdownWarmWorker = lambda: shutdowns.append(1)
    replies: list[Any] = []
    slicer.util.confirmYesNoDisplay = _answers(recorder, "confirmYesNoDisplay", replies)

    assert params.modelId == "deepbet"
    widget.onRemoveModel()
    ((args, kwargs),) = recorder.named("warningDisplay")
    refusal = "Model 'deepbet' is built into the extension; only imported or downloaded models can be removed."
    assert args == (refusal,) and kwargs["windowTitle"] == "Remove model" and ui.statusLabel.text == refusal
    assert not recorder.named("errorDisplay")
    assert not recorder.named("confirmYesNoDisplay") and not removed and not shutdowns

    params.modelId = "tiny_spleen"
    replies.append(False)
    widget.onRemoveModel()
    ((args, kwargs),) = recorder.named("confirmYesNoDisplay")
    assert args == ("Remove model 'Tiny spleen' (version 0.1.0) from this computer?",) and \
        kwargs["windowTitle"] == "Remove model"
    assert not removed and ui.modelComboBox.findData("tiny_spleen") == 1

    replies.append(True)
    widget.onRemoveModel()
    assert removed == ["tiny_spleen"] and shutdowns == [1]
    assert ui.modelComboBox.findData("tiny_spleen") == -1 and ui.modelComboBox.count == 1
    assert params.modelId == "deepbet" and ui.modelComboBox.currentIndex == 0
    assert ui.statusLabel.text == "Removed model 'Tiny spleen'."
    assert "Removed model 'Tiny spleen'." in ui.logTextEdit.lines


def case_segmentation_bundle_settings(name: str) -> None:
    """An imported MONAI bundle shows its settings field (and a weights choice when it has several files); the
    settings must read as KEY=VALUE (else Apply is refused with the reason) and reach the run as its options; other
    models show neither and pass no options."""
    recorder = Recorder()
    slicer, modules = _import_modules(recorder, name)
    import MIADeepLearningLib.gui.task_widget as task_widget

    weights = [types.SimpleNamespace(path="models/model.pt"), types.SimpleNamespace(path="models/model_lowres.pt")]
    bundle = types.SimpleNamespace(**vars(_model("tiny-body")), pipeline="monai_bundle", weights=weights)
    widget = _widget(modules[name], name, [_model("deepbet"), bundle])
    ui, params = widget.ui, widget._parameterNode
    fields = (ui.bundleSettingsLabel, ui.bundleSettingsLineEdit, ui.bundleWeightsLabel, ui.bundleWeightsComboBox)
    assert not any(field.visible for field in fields), "bundle fields shown for a built-in model"
    volume = FakeNode("ct", "vtkMRMLScalarVolumeNode1")
    slicer.mrmlScene.nodes.append(volume)
    params.inputVolume = volume
    params.modelId = "tiny-body"
    assert all(field.visible for field in fields)
    combo = ui.bundleWeightsComboBox
    assert [combo.itemData(index) for index in range(combo.count)] == ["", "model.pt", "model_lowres.pt"]
    params.bundleSettings = "highres false"
    assert not ui.applyButton.enabled and ui.applyButton.toolTip.startswith("Bundle settings: "), ui.applyButton.toolTip
    params.bundleSettings = "highres=false; inferer#overlap=0.5;"
    combo.currentIndex = 2  # the user picks the low-resolution weights (the stub emits no signal: call the slot)
    combo.connections["currentIndexChanged(int)"](2)
    assert params.bundleWeights == "model_lowres.pt" and ui.applyButton.enabled, ui.applyButton.toolTip

    task_widget.ensureDependencies = lambda *args: None
    started: list[tuple] = []
    widget.logic.start = lambda *args, **kwargs: started.append((args, kwargs)) or FakeRun(
        [[]], result=_SEGMENTATION_RESULT)
    widget.onApplyButton()
    widget._onPollTimer()
    assert started[-1][1]["modelOptions"] == {"overrides": {"highres": False, "inferer#overlap": 0.5},
                                              "weights": "model_lowres.pt"}, started[-1]
    params.modelId = "deepbet"
    assert not any(field.visible for field in fields)
    widget.onApplyButton()
    widget._onPollTimer()
    assert started[-1][1]["modelOptions"] == {}, "a built-in model got a bundle's settings"


def case_remote_device(name: str) -> None:
    """Device "remote": Apply waits for the server's address and token (kept in the application settings, never in
    the parameter node), then starts the run on that server without installing anything here; Test connection
    reports the server or the one-sentence reason it cannot be used."""
    recorder = Recorder()
    slicer, modules = _import_modules(recorder, name)
    import qt

    import MIADeepLearningLib.gui.remote_settings as remote_settings
    import MIADeepLearningLib.gui.task_widget as task_widget
    from MIADeepLearningLib import remote

    qt.QSettings.store.clear()
    case = CASES[name]
    widget = _widget(modules[name], name, [_model(case["model"])])
    ui, params = widget.ui, widget._parameterNode
    assert ui.deviceComboBox.findText("remote") >= 0, "no 'remote' device choice"
    inputs = case.get("inputs", ("inputVolume",))
    volumes = [FakeNode(f"head {index}", f"vtkMRMLScalarVolumeNode{index + 1}") for index in range(len(inputs))]
    slicer.mrmlScene.nodes.extend(volumes)
    for field, node in zip(inputs, volumes):
        setattr(params, field, node)
    params.device = "remote"
    assert not ui.applyButton.enabled and "address and token" in ui.applyButton.toolTip, ui.applyButton.toolTip

    ui.remoteUrlLineEdit.text, ui.remoteTokenLineEdit.text = "https://gpu.example.org:8443", "s3cret-token"
    ui.remoteUrlLineEdit.connections["editingFinished()"]()
    assert qt.QSettings.store[remote_settings.SETTINGS_TOKEN] == "s3cret-token"
    assert "s3cret-token" not in repr(vars(params)), "the token went into the parameter node (the scene)"
    assert ui.applyButton.enabled, ui.applyButton.toolTip

    installs: list = []
    task_widget.ensureDependencies = lambda *args: installs.append(args)
    started: list = []
    widget.logic.start = lambda *args, **kwargs: started.append((args, kwargs, widget.logic.remoteServer)) or \
        FakeRun([[]], result=case["result"])
    widget.onApplyButton()
    ((_args, kwargs, server),) = started
    assert not installs, "a remote run installed packages here"
    assert isinstance(server, remote.RemoteServer) and server.url == "https://gpu.example.org:8443"
    assert kwargs.get("device") == "remote", kwargs
    widget._onPollTimer()

    remote_settings.testConnection = lambda: "Connected to https://gpu.example.org:8443: MIADeepLearning 0.1, CPU."
    widget.onTestConnection()
    assert recorder.named("infoDisplay")[-1][0][0].startswith("Connected to"), recorder.named("infoDisplay")

    def unreachable() -> str:
        raise remote.RemoteError("The server at https://gpu.example.org:8443 cannot be reached (Connection refused).")

    remote_settings.testConnection = unreachable
    widget.onTestConnection()
    warning = recorder.named("warningDisplay")[-1][0][0]
    assert warning.endswith("(Connection refused).") and "\n" not in warning, warning

    params.device = "auto"  # back to local: the server is no longer used
    widget.onApplyButton()
    assert installs and widget.logic.remoteServer is None


def case_bundle_packages_through_slicer_packaging(name: str) -> None:
    """A bundle's missing packages (gui.dependencies.ensurePackages): on a Slicer with slicer.packaging (5.12 and
    later) its pip_ensure asks and installs, a decline is one sentence; on older Slicers our own question and
    slicer.util.pip_install (the import case covers that branch)."""
    recorder = Recorder()
    slicer, _modules = _import_modules(recorder, name)
    from packaging.requirements import Requirement

    import MIADeepLearningLib.gui.dependencies as dependencies

    dependencies._requirementSatisfied = lambda requirement: requirement.startswith("numpy")
    ensured: list = []
    packaging_module = types.ModuleType("slicer.packaging")
    packaging_module.load_requirements = lambda path: []
    packaging_module.pip_ensure = lambda requirements, requester=None: ensured.append((requirements, requester))
    sys.modules["slicer.packaging"] = slicer.packaging = packaging_module
    dependencies.ensurePackages(["einops>=0.7.0", "numpy>=1"], "This model")
    ((requirements, requester),) = ensured
    assert [str(item) for item in requirements] == [str(Requirement("einops>=0.7.0"))]
    assert requester == "MIADeepLearning"
    assert not recorder.named("pip_install") and not recorder.named("confirmOkCancelDisplay")

    def decline(requirements: Any, requester: Any = None) -> None:
        raise RuntimeError("the user declined")

    packaging_module.pip_ensure = decline
    try:
        dependencies.ensurePackages(["einops>=0.7.0"], "This model")
    except dependencies.DependenciesNotInstalled as error:
        assert "not installed" in str(error) and "\n" not in str(error), error
    else:
        raise AssertionError("a declined install went on")


CASE_FUNCTIONS = {
    function.__name__: function
    for function in (case_apply_poll_finish_cancel_errors, case_logic_warm_worker, case_parameter_node_hints,
                     case_segmentation_optional_outputs, case_registration_inputs_and_report,
                     case_one_job_or_install_at_a_time, case_unsupported_slicer_torch_or_launcher,
                     case_device_report_in_the_background, case_reload_leaves_the_other_modules_working,
                     case_segmentation_model_channels, case_segmentation_import_model,
                     case_segmentation_remove_model, case_segmentation_bundle_settings, case_remote_device,
                     case_bundle_packages_through_slicer_packaging)
}


# pytest side


MODULE_CASES = {  # cases for some modules only
    "case_segmentation_optional_outputs": ("DLSegmentation",),
    "case_segmentation_model_channels": ("DLSegmentation",),
    "case_segmentation_import_model": ("DLSegmentation",),
    "case_segmentation_remove_model": ("DLSegmentation",),
    "case_segmentation_bundle_settings": ("DLSegmentation",),
    "case_bundle_packages_through_slicer_packaging": ("DLSegmentation",),
    "case_registration_inputs_and_report": ("DLRegistration",),
}


@pytest.mark.parametrize(("case", "module"), [(case, module) for case in sorted(CASE_FUNCTIONS)
                                              for module in MODULE_CASES.get(case, MODULES)])
def test_module_with_stub_qt(case: str, module: str) -> None:
    completed = subprocess.run([sys.executable, __file__, case, module], capture_output=True, text=True,
                               timeout=120, cwd=str(ROOT), check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.strip() == "ok", completed.stdout + completed.stderr


if __name__ == "__main__":
    sys.path.insert(0, str(SOURCE_DIR))
    CASE_FUNCTIONS[sys.argv[1]](sys.argv[2])
    print("ok")
