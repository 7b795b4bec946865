"""DL Classification: tell what kind of scan a volume is (MRI sequence type, or head CT) with a verified deep-learning
model, in the background, for one volume or every volume of the scene.

Slicer never imports torch: the model runs in a worker process (PythonSlicer) that
MIADeepLearningLib.mrml.classification_logic starts and imports back into the scene (a table, the type as attributes
on each volume, optional saliency maps). This file holds only what is this module's own: the .ui, parameter node and
result display, a thin Logic that delegates to that class, and the self-test, which runs the same scenarios as the
headless pytest suite. Apply/Cancel, polling, error reporting, the dependency installer (run by Apply, never at
start-up) and the warm worker are shared with the other task modules through MIADeepLearningLib.gui.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import slicer
from slicer import vtkMRMLScalarVolumeNode
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
    from collections.abc import Callable, Sequence

    from MIADeepLearningLib.jobs import Event
    from MIADeepLearningLib.mrml.classification_logic import (
        ClassificationLogic,
        ClassificationResult,
        ClassificationRun,
    )
    from MIADeepLearningLib.runner import WarmWorker

README_URL = "https://github.com/MIADeepLearning/SlicerMIADeepLearning#readme"
DEFAULT_MODEL_ID = "sequence-type"
SALIENCY_OPACITY = 0.4  # the saliency map over its scan: the anatomy stays readable under the colours


#
# DLClassification
#


class DLClassification(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and Help & Acknowledgement panel."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DL Classification")
        self.parent.categories = ["Deep Learning"]
        self.parent.dependencies = []  # PyTorch is needed only on Apply, and then installed through PyTorchUtils
        self.parent.contributors = ["MIADeepLearning developers (MIADeepLearning project)"]
        self.parent.helpText = _(
            "Tells what kind of head scan a volume is (T1-weighted, T1-weighted after contrast, T2-weighted, FLAIR, "
            "proton density, diffusion, CT, or other) with a verified deep-learning model, for one volume or for "
            "every volume in the scene. Results: a table with one row per volume (predicted type and its "
            "probability, the runner-up, whether the volume looks like nothing the model was made for, and why a "
            "volume could not be classified), and on each classified volume the attributes "
            "MIADeepLearning.SequenceType and MIADeepLearning.SequenceTypeProbability, which other modules and "
            "scripts can read; optionally a saliency map per volume (where the model looked), shown in colour over "
            "the scan. Every output carries a provenance record. The model runs in a separate background process, on "
            "the CUDA GPU when one is usable and on the CPU otherwise; Slicer stays responsive and Apply becomes "
            "Cancel while it runs. Needs 3D Slicer {slicer} or newer. The first Apply may offer to install "
            "PyTorch {torch} or newer (through the PyTorch extension). "
            'See the <a href="{url}">MIADeepLearning README</a>.'
        ).format(url=README_URL, slicer=versions.dotted(versions.MINIMUM_SLICER_VERSION),
                 torch=versions.dotted(versions.MINIMUM_TORCH_VERSION))
        self.parent.acknowledgementText = _(
            "The sequence type network was trained by MIADeepLearning on scans rendered from brain label maps with "
            "each sequence's signal equation. The task follows van der Voort S.R. et al., \"DeepDicomSort: an "
            "automatic sorting algorithm for brain magnetic resonance imaging data\", Neuroinformatics "
            "2021;19:159-184; the saliency maps are Grad-CAM (Selvaraju R.R. et al., ICCV 2017) as implemented in "
            "MONAI."
        )


#
# DLClassificationParameterNode
#


@parameterNodeWrapper
class DLClassificationParameterNode:
    """What the user chose; saved with the scene.

    Annotations are evaluated at runtime by the wrapper (Python 3.9 in Slicer 5.8): no ``X | None`` here. With
    allVolumes, every volume of the scene is classified and inputVolume is not used.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    allVolumes: bool = False
    modelId: str = DEFAULT_MODEL_ID
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    createSaliency: bool = False
    keepModelLoaded: bool = True


#
# DLClassificationWidget
#


class DLClassificationWidget(TaskWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: parameter node <-> widgets and the results table; Apply/Cancel, progress and log of the background run
    come from TaskWidgetMixin."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        TaskWidgetMixin.__init__(self)
        self.logic: DLClassificationLogic | None = None
        self._parameterNode: DLClassificationParameterNode | None = None
        self._run: ClassificationRun | None = None

    def setup(self) -> None:
        """Build the GUI. Installs nothing, downloads nothing and never imports torch (generic tests call this)."""
        ScriptedLoadableModuleWidget.setup(self)
        self._setupTaskWidget("UI/DLClassification.ui", DLClassificationLogic())
        # "All volumes in the scene": Apply follows volumes being loaded or deleted, not only the parameter node
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self._onSceneNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self._onSceneNodesChanged)
        self._showTable(None)  # the results section appears with the first table
        self.initializeParameterNode()

    def _onSceneNodesChanged(self, caller=None, event=None) -> None:
        if self._parameterNode and self._parameterNode.allVolumes:
            self._updateButtons()

    # TaskWidgetMixin hooks

    def _moduleTitle(self) -> str:
        return _("DL Classification")

    def _failureMessage(self, error: Exception) -> str:
        return _("Classification failed: {error}").format(error=error)

    def _primaryInput(self, params: DLClassificationParameterNode):
        return None if params.allVolumes else params.inputVolume

    def _missingInput(self, params: DLClassificationParameterNode) -> str | None:
        if params.allVolumes:
            return None if self._sceneHasVolumes() else _("There is no volume in the scene to classify.")
        return None if params.inputVolume else _("Select an input volume.")

    @staticmethod
    def _sceneHasVolumes() -> bool:
        """A scalar volume that is not a label map (the MRML bridge is not imported for the button state)."""
        scene = slicer.mrmlScene
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            if not scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode").IsA("vtkMRMLLabelMapVolumeNode"):
                return True
        return False

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Also: the volume selector only for one volume; the saliency option only for a model that makes maps."""
        TaskWidgetMixin._onParameterNodeModified(self, caller, event)
        params = self._parameterNode
        self.ui.inputVolumeSelector.enabled = not (params and params.allVolumes)
        self.ui.createSaliencyCheckBox.visible = self._modelOffers("saliency")

    def _startRun(self, params: DLClassificationParameterNode) -> ClassificationRun:
        volumes = self.logic.sceneVolumes() if params.allVolumes else params.inputVolume
        return self.logic.start(
            volumes,
            params.modelId,
            device=params.device,
            createSaliency=params.createSaliency and self._modelOffers("saliency"),
            keepModelLoaded=params.keepModelLoaded,
        )

    def _showResult(self, result: ClassificationResult, inputVolume) -> None:
        """Status, one log line per volume, the table below; the first saliency map over its scan in the slice views
        (the slice view controller's fader changes its opacity)."""
        self.ui.progressBar.value = 100
        for warning in result.warnings:
            self._log(_("Warning: {warning}").format(warning=warning))
        if result.timings:
            timings = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.timings.items())
            self._log(_("Timings: {timings}").format(timings=timings))
        done = _("Done: {summary}; see table '{table}'").format(summary=result.summary(),
                                                               table=result.table_node.GetName())
        if "total" in result.timings:
            done += _(" ({seconds:.1f} s)").format(seconds=result.timings["total"])
        if result.warnings:
            done += _(" ({count} warning(s), see the log)").format(count=len(result.warnings))
        self._setStatus(done + ".")
        self._log(done + ".")
        for row in result.rows:
            self._log(f"  {row.name}: {row.summary()}")
        self._showTable(result.table_node)
        # a saliency map exists only for a volume that was in the scene when the results were imported, just now
        shown = next((row for row in result.rows if row.saliency_node is not None), None)
        if shown is not None:
            slicer.util.setSliceViewerLayers(background=shown.volume_node, foreground=shown.saliency_node,
                                             foregroundOpacity=SALIENCY_OPACITY, fit=True)

    def _showTable(self, tableNode) -> None:
        """The table of the last run in the module; hidden before the first run."""
        self.ui.resultsTableView.setMRMLTableNode(tableNode)
        self.ui.resultsCollapsibleButton.visible = tableNode is not None
        if tableNode is not None:
            self.ui.resultsCollapsibleButton.collapsed = False


#
# DLClassificationLogic
#


class DLClassificationLogic(TaskLogicMixin, ScriptedLoadableModuleLogic):
    """Thin wrapper: the work is done by MIADeepLearningLib.mrml.classification_logic.ClassificationLogic (Qt-free);
    TaskLogicMixin picks the process-per-run or the warm-worker instance of it."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        TaskLogicMixin.__init__(self)

    def getParameterNode(self) -> DLClassificationParameterNode:
        return DLClassificationParameterNode(super().getParameterNode())

    @staticmethod
    def availableModels() -> list:
        """Classification models of the registry (torch-free)."""
        from MIADeepLearningLib.engine import registry

        return registry.list_models(task="classification")

    @staticmethod
    def sceneVolumes() -> list:
        """'All volumes in the scene': every volume except label maps and the saliency maps this module made."""
        from MIADeepLearningLib.mrml.classification_logic import scene_volumes

        return scene_volumes()

    def createTaskLogic(self, pythonExecutable: str | None, warmWorker: WarmWorker | None) -> ClassificationLogic:
        """Imported here, so loading the module imports no MRML bridge code."""
        from MIADeepLearningLib.mrml.classification_logic import ClassificationLogic

        return ClassificationLogic(python_executable=pythonExecutable, warm_worker=warmWorker)

    def classificationLogic(self, keepModelLoaded: bool = False) -> ClassificationLogic:
        """Created on first use. With keepModelLoaded, runs go through one worker process kept alive between runs
        (model loaded once per session); shutdownWarmWorker() ends it."""
        return self.taskLogic(keepModelLoaded)

    def start(
        self,
        volumes: vtkMRMLScalarVolumeNode | Sequence[vtkMRMLScalarVolumeNode],
        modelId: str = DEFAULT_MODEL_ID,
        device: str = "auto",
        createSaliency: bool = False,
        timeoutS: float | None = None,
        onEvent: Callable[[Event], None] | None = None,
        keepModelLoaded: bool = False,
    ) -> ClassificationRun:
        """Start a background run and return at once; poll the returned run, then call its finish().

        `volumes`: one volume (refused in one sentence when unusable) or a list of them (sceneVolumes(): each
        unusable one gets a row that says why)."""
        return self.classificationLogic(keepModelLoaded).start(
            volumes,
            modelId,
            device=device,
            create_saliency=createSaliency,
            timeout_s=timeoutS,
            on_event=onEvent,
        )

    def process(
        self,
        volumes: vtkMRMLScalarVolumeNode | Sequence[vtkMRMLScalarVolumeNode],
        modelId: str = DEFAULT_MODEL_ID,
        device: str = "auto",
        createSaliency: bool = False,
        timeoutS: float | None = None,
        onEvent: Callable[[Event], None] | None = None,
    ) -> ClassificationResult:
        """Blocking run for scripts (the GUI uses start() so Slicer stays responsive)."""
        run = self.start(volumes, modelId, device, createSaliency, timeoutS, onEvent)
        run.wait()
        return run.finish()


#
# DLClassificationTest
#


class DLClassificationTest(ScriptedLoadableModuleTest):
    """Runs the scenarios of MIADeepLearningLib.testing.classification_scenarios (the ones the headless pytest suite
    runs: a real classification of a sample volume, checking the table, the attributes and the saliency map's grid)
    and checks the panel's own rules."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_DLClassificationPanel()
        self.test_DLClassificationScenarios()

    def test_DLClassificationPanel(self) -> None:
        """The shipped model is listed with its saliency option; Apply needs a volume; "all volumes" disables the
        selector and needs a volume in the scene."""
        from MIADeepLearningLib.testing import classification_scenarios

        self.setUp()
        slicer.util.selectModule("DLClassification")
        widget = slicer.modules.dlclassification.widgetRepresentation().self()
        ui = widget.ui
        self.assertGreaterEqual(ui.modelComboBox.findData(DEFAULT_MODEL_ID), 0, "the shipped model is not listed")
        params = widget.logic.getParameterNode()
        params.inputVolume = None
        params.allVolumes = False
        params.modelId = DEFAULT_MODEL_ID
        self.assertFalse(ui.applyButton.enabled, "Apply is enabled without an input volume")
        self.assertFalse(ui.createSaliencyCheckBox.isHidden(), "the shipped model offers saliency maps")
        params.allVolumes = True
        self.assertFalse(ui.inputVolumeSelector.enabled)
        self.assertFalse(ui.applyButton.enabled, "Apply is enabled for all volumes of an empty scene")
        volume = classification_scenarios.sample_volume()
        params.allVolumes = False
        params.inputVolume = volume
        self.assertTrue(ui.applyButton.enabled, ui.applyButton.toolTip)
        params.allVolumes = True
        self.assertTrue(ui.applyButton.enabled, ui.applyButton.toolTip)
        self.assertEqual(widget.logic.sceneVolumes(), [volume])
        params.allVolumes = False
        self.assertFalse(ui.resultsCollapsibleButton.visible, "a results table is shown before any run")
        self.setUp()

    def test_DLClassificationScenarios(self) -> None:
        from MIADeepLearningLib.testing import classification_scenarios
        from MIADeepLearningLib.testing.self_test import run_scenarios

        run_scenarios(self, classification_scenarios.SCENARIOS, "DLClassification")
