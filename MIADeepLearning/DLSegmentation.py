"""DL Segmentation: segment a volume with a verified deep-learning model, in a background process.

Slicer never imports torch: the model runs in a worker process (PythonSlicer) that
MIADeepLearningLib.mrml.segmentation_logic starts and imports back into the scene. This file holds only what is this
module's own: the GUI's .ui, parameter node, result display and Advanced section, a thin Logic that delegates to that
class, and the self-test, which runs the same scenarios as the headless pytest suite. Apply/Cancel, polling, error
reporting, the dependency installer (run by Apply, never at start-up) and the warm worker are shared with the other
task modules through MIADeepLearningLib.gui.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MIADeepLearningLib import versions
from MIADeepLearningLib.gui.task_logic import TaskLogicMixin
from MIADeepLearningLib.gui.task_widget import DEVICE_CHOICES, TaskWidgetMixin

if TYPE_CHECKING:
    from collections.abc import Callable

    from MIADeepLearningLib.jobs import Event
    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic, SegmentationResult, SegmentationRun
    from MIADeepLearningLib.runner import WarmWorker

README_URL = "https://github.com/MIADeepLearning/SlicerMIADeepLearning#readme"
DEFAULT_MODEL_ID = "deepbet"


#
# DLSegmentation
#


class DLSegmentation(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and Help & Acknowledgement panel."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DL Segmentation")
        self.parent.categories = ["Deep Learning"]
        self.parent.dependencies = []  # PyTorch is needed only on Apply, and then installed through PyTorchUtils
        self.parent.contributors = ["MIADeepLearning developers (MIADeepLearning project)"]
        self.parent.helpText = _(
            "Segments a volume with a verified deep-learning model (built in: deepbet brain extraction of "
            "T1-weighted MRI). The model runs in a separate background process, on the CUDA GPU when one is usable "
            "and on the CPU otherwise; Slicer stays responsive and Apply becomes Cancel while it runs. "
            "Outputs: a segmentation with named, coloured segments, shown in the slice views and as a 3D surface; "
            "a table of segment volumes (voxels and mL, shown in this module); optionally a skull-stripped copy of "
            "the input and, for models that offer it (e.g. brain tissue segmentation), an uncertainty map from "
            "mirrored runs (0 certain, 1 undecided); a provenance record (model, version, weight checksums, "
            "device, timings) on every output node. Needs 3D Slicer {slicer} or newer. The first Apply may offer to "
            "install PyTorch {torch} or newer (through the PyTorch extension) and the Python package that holds the "
            "model's weights. "
            'See the <a href="{url}">MIADeepLearning README</a>.'
        ).format(url=README_URL, slicer=versions.dotted(versions.MINIMUM_SLICER_VERSION),
                 torch=versions.dotted(versions.MINIMUM_TORCH_VERSION))
        self.parent.acknowledgementText = _(
            "The deepbet brain-extraction model is by Fisch L. et al., \"deepbet: Fast brain extraction of "
            "T1-weighted MRI using Convolutional Neural Networks\", Computers in Biology and Medicine 2024 "
            "(MIT licence). Please cite it when you use its results."
        )


#
# DLSegmentationParameterNode
#


@parameterNodeWrapper
class DLSegmentationParameterNode:
    """What the user chose; saved with the scene.

    Annotations are evaluated at runtime by the wrapper (Python 3.9 in Slicer 5.8): no ``X | None`` here.
    outputSegmentation None means "create a new segmentation".
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelId: str = DEFAULT_MODEL_ID
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode
    createMaskedVolume: bool = False
    createUncertainty: bool = False  # offered only for models that list "uncertainty" in slicer.optional_outputs
    createVolumeTable: bool = True
    keepModelLoaded: bool = True


#
# DLSegmentationWidget
#


class DLSegmentationWidget(TaskWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: parameter node <-> widgets and the Advanced section; Apply/Cancel, progress and log of the background run
    come from TaskWidgetMixin."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        TaskWidgetMixin.__init__(self)
        self.logic: DLSegmentationLogic | None = None
        self._parameterNode: DLSegmentationParameterNode | None = None
        self._run: SegmentationRun | None = None

    def setup(self) -> None:
        """Build the GUI. Installs nothing, downloads nothing and never imports torch (generic tests call this)."""
        ScriptedLoadableModuleWidget.setup(self)
        self._setupTaskWidget("UI/DLSegmentation.ui", DLSegmentationLogic())
        self.ui.importModelZipButton.connect("clicked(bool)", lambda: self.onImportModel(folder=False))
        self.ui.importModelFolderButton.connect("clicked(bool)", lambda: self.onImportModel(folder=True))
        self._showVolumeTable(None)  # the Results section appears with the first table
        self.initializeParameterNode()

    # TaskWidgetMixin hooks

    def _moduleTitle(self) -> str:
        return _("DL Segmentation")

    def _failureMessage(self, error: Exception) -> str:
        return _("Segmentation failed: {error}").format(error=error)

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Also show the uncertainty option only when the selected model makes an uncertainty map."""
        TaskWidgetMixin._onParameterNodeModified(self, caller, event)
        self.ui.createUncertaintyCheckBox.visible = self._modelOffers("uncertainty")

    def _startRun(self, params: DLSegmentationParameterNode) -> SegmentationRun:
        return self.logic.start(
            params.inputVolume,
            params.modelId,
            device=params.device,
            outputSegmentation=params.outputSegmentation,
            createMaskedVolume=params.createMaskedVolume,
            createUncertainty=params.createUncertainty and self._modelOffers("uncertainty"),
            createVolumeTable=params.createVolumeTable,
            keepModelLoaded=params.keepModelLoaded,
        )

    def _showResult(self, result: SegmentationResult, inputVolume) -> None:
        self.ui.progressBar.value = 100
        for warning in result.warnings:
            self._log(_("Warning: {warning}").format(warning=warning))
        if result.timings:
            timings = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.timings.items())
            self._log(_("Timings: {timings}").format(timings=timings))
        segmentationNode = result.segmentation_node
        done = _("Done: segmentation '{name}'").format(name=segmentationNode.GetName())
        for node in (result.masked_volume_node, result.uncertainty_node):
            if node is not None:
                done += _(" and volume '{name}'").format(name=node.GetName())
        if result.volume_table_node is not None:
            done += _(" and table '{name}'").format(name=result.volume_table_node.GetName())
        if result.warnings:
            done += _(" ({count} warning(s), see the log)").format(count=len(result.warnings))
        self._setStatus(done + ".")
        self._log(done + ".")
        self._showVolumeTable(result.volume_table_node)
        if inputVolume is not None and slicer.mrmlScene.IsNodePresent(inputVolume):
            slicer.util.setSliceViewerLayers(background=inputVolume)
        _resetThreeDViewFocalPoint()

    def _showVolumeTable(self, tableNode) -> None:
        """The segment volumes of the last run in the module's Results section; hidden after a run without a table,
        so no table of an earlier result is shown as if it were this one's."""
        self.ui.volumesTableView.setMRMLTableNode(tableNode)
        self.ui.resultsCollapsibleButton.visible = tableNode is not None
        if tableNode is not None:
            self.ui.resultsCollapsibleButton.collapsed = False

    # Advanced: model import (the device report is TaskWidgetMixin's: a background job like a run)

    def onImportModel(self, folder: bool) -> None:
        """Add a model package from a .zip or a folder (air-gapped sites); it is verified before it is listed."""
        if folder:
            path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Model package folder"))
        else:
            path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Model package"), "",
                                                  _("Model package (*.zip)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("The model could not be imported."), waitCursor=True):
            model = DLSegmentationLogic.importModel(path)
            self._populateModelComboBox()
            if self._parameterNode and model.task == "segmentation":
                self._parameterNode.modelId = model.id
            self._onParameterNodeModified()
            message = _("Imported model '{title}' (version {version}).").format(title=model.title,
                                                                                 version=model.version)
            self._setStatus(message)
            self._log(message)


def _resetThreeDViewFocalPoint() -> None:
    """Center the first 3D view on what is shown (no-op without a main window, e.g. in tests)."""
    layoutManager = slicer.app.layoutManager()
    if layoutManager is None or layoutManager.threeDViewCount < 1:
        return
    layoutManager.threeDWidget(0).threeDView().resetFocalPoint()


#
# DLSegmentationLogic
#


class DLSegmentationLogic(TaskLogicMixin, ScriptedLoadableModuleLogic):
    """Thin wrapper: the work is done by MIADeepLearningLib.mrml.segmentation_logic.SegmentationLogic (Qt-free);
    TaskLogicMixin picks the process-per-run or the warm-worker instance of it."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        TaskLogicMixin.__init__(self)

    def getParameterNode(self) -> DLSegmentationParameterNode:
        return DLSegmentationParameterNode(super().getParameterNode())

    @staticmethod
    def availableModels() -> list:
        """Segmentation models of the registry (torch-free)."""
        from MIADeepLearningLib.engine import registry

        return registry.list_models(task="segmentation")

    def createTaskLogic(self, pythonExecutable: str | None, warmWorker: WarmWorker | None) -> SegmentationLogic:
        """Imported here, so loading the module imports no MRML bridge code."""
        from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic

        return SegmentationLogic(python_executable=pythonExecutable, warm_worker=warmWorker)

    def segmentationLogic(self, keepModelLoaded: bool = False) -> SegmentationLogic:
        """Created on first use. With keepModelLoaded, runs go through one worker process kept alive between runs
        (model loaded once per session); shutdownWarmWorker() ends it."""
        return self.taskLogic(keepModelLoaded)

    @staticmethod
    def importModel(path: str):
        """Verify and add a model package from a folder or .zip to the user's model cache (torch-free)."""
        from MIADeepLearningLib.engine import model_store

        return model_store.import_model(path)

    def start(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        modelId: str,
        device: str = "auto",
        outputSegmentation: vtkMRMLSegmentationNode | None = None,
        createMaskedVolume: bool = False,
        timeoutS: float | None = None,
        onEvent: Callable[[Event], None] | None = None,
        keepModelLoaded: bool = False,
        createUncertainty: bool = False,
        createVolumeTable: bool = False,
    ) -> SegmentationRun:
        """Start a background run and return at once; poll the returned run, then call its finish()."""
        return self.segmentationLogic(keepModelLoaded).start(
            inputVolume,
            modelId,
            device=device,
            output_segmentation=outputSegmentation,
            create_masked_volume=createMaskedVolume,
            timeout_s=timeoutS,
            on_event=onEvent,
            create_uncertainty=createUncertainty,
            create_volume_table=createVolumeTable,
        )

    def process(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        modelId: str,
        device: str = "auto",
        outputSegmentation: vtkMRMLSegmentationNode | None = None,
        createMaskedVolume: bool = False,
        timeoutS: float | None = None,
        onEvent: Callable[[Event], None] | None = None,
        createUncertainty: bool = False,
        createVolumeTable: bool = False,
    ) -> SegmentationResult:
        """Blocking run for scripts (the GUI uses start() so Slicer stays responsive)."""
        run = self.start(inputVolume, modelId, device, outputSegmentation, createMaskedVolume, timeoutS, onEvent,
                         createUncertainty=createUncertainty, createVolumeTable=createVolumeTable)
        run.wait()
        return run.finish()


#
# DLSegmentationTest
#


class DLSegmentationTest(ScriptedLoadableModuleTest):
    """Runs the scenarios of MIADeepLearningLib.testing.scenarios, the same ones the headless pytest suite runs."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_DLSegmentationScenarios()

    def test_DLSegmentationScenarios(self) -> None:
        from MIADeepLearningLib.testing import scenarios
        from MIADeepLearningLib.testing.self_test import run_scenarios

        run_scenarios(self, scenarios.SCENARIOS, "DLSegmentation")
