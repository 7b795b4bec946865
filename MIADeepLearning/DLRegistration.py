"""DL Registration: align a moving volume to a fixed one (any MRI contrasts) with a verified deep-learning model.

Slicer never imports torch: the model runs in a worker process (PythonSlicer) that
MIADeepLearningLib.mrml.registration_logic starts and imports back into the scene (grid transform, resampled moving
volume, carried-over segmentation, quality table). This file holds only what is this module's own: the .ui,
parameter node and result display, a thin Logic that delegates to that class, and the self-test, which runs the same
scenarios as the headless pytest suite. Apply/Cancel, polling, error reporting, the dependency installer (run by
Apply, never at start-up) and the warm worker are shared with the other task modules through MIADeepLearningLib.gui.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

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
    from MIADeepLearningLib.mrml.registration_logic import RegistrationLogic, RegistrationResult, RegistrationRun
    from MIADeepLearningLib.runner import WarmWorker

README_URL = "https://github.com/MIADeepLearning/SlicerMIADeepLearning#readme"
DEFAULT_MODEL_ID = "brain-registration"
# The shipped network alone is not yet as good as ANTs SyN; with refinement on the pair it is better (held-out
# benchmark in the model card: Dice 0.523 alone, 0.620 with 50 steps, SyN 0.542-0.577), so it is on by default.
DEFAULT_INSTANCE_STEPS = 50


#
# DLRegistration
#


class DLRegistration(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and Help & Acknowledgement panel."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DL Registration")
        self.parent.categories = ["Deep Learning"]
        self.parent.dependencies = []  # PyTorch is needed only on Apply, and then installed through PyTorchUtils
        self.parent.contributors = ["MIADeepLearning developers (MIADeepLearning project)"]
        self.parent.helpText = _(
            "Aligns a moving volume to a fixed volume (any MRI contrasts, e.g. a T2 to a T1, or an earlier scan to "
            "the current one) with a verified deep-learning model: an affine pre-alignment, then a deformable "
            "transform from the network, optionally refined on the pair itself. Optional masks (segmentations, e.g. "
            "brain masks from DL Segmentation) concentrate the alignment on what matters. Outputs: the transform "
            "(moving to fixed; put the moving volume under it to see it aligned, harden it to resample), the moving "
            "volume resampled onto the fixed grid, a segmentation of the moving volume carried over onto the fixed "
            "one (same segment names, colours and terminology), and a quality report (how regular the transform "
            "is; Dice of segments both segmentations share), each with a provenance record. The model runs in a "
            "separate background process, on the CUDA GPU when one is usable and on the CPU otherwise; Slicer stays "
            "responsive and Apply becomes Cancel while it runs. Needs 3D Slicer {slicer} or newer. The first Apply "
            "may offer to install PyTorch {torch} or newer (through the PyTorch extension). "
            'See the <a href="{url}">MIADeepLearning README</a>.'
        ).format(url=README_URL, slicer=versions.dotted(versions.MINIMUM_SLICER_VERSION),
                 torch=versions.dotted(versions.MINIMUM_TORCH_VERSION))
        self.parent.acknowledgementText = _(
            "The registration network was trained by MIADeepLearning on synthetic image pairs rendered from brain "
            "label maps, following the idea of Hoffmann M. et al., \"SynthMorph: learning contrast-invariant "
            "registration without acquired images\", IEEE Transactions on Medical Imaging 2022;41(3):543-558."
        )


#
# DLRegistrationParameterNode
#


@parameterNodeWrapper
class DLRegistrationParameterNode:
    """What the user chose; saved with the scene.

    Annotations are evaluated at runtime by the wrapper (Python 3.9 in Slicer 5.8): no ``X | None`` here. The masks
    and segmentations are optional (None); masks are segmentations, all of whose segments count as inside.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedMask: vtkMRMLSegmentationNode
    movingMask: vtkMRMLSegmentationNode
    movingSegmentation: vtkMRMLSegmentationNode
    fixedSegmentation: vtkMRMLSegmentationNode
    modelId: str = DEFAULT_MODEL_ID
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    instanceSteps: int = DEFAULT_INSTANCE_STEPS
    keepModelLoaded: bool = True


#
# DLRegistrationWidget
#


class DLRegistrationWidget(TaskWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: parameter node <-> widgets and the quality report; Apply/Cancel, progress and log of the background run
    come from TaskWidgetMixin."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        TaskWidgetMixin.__init__(self)
        self.logic: DLRegistrationLogic | None = None
        self._parameterNode: DLRegistrationParameterNode | None = None
        self._run: RegistrationRun | None = None

    def setup(self) -> None:
        """Build the GUI. Installs nothing, downloads nothing and never imports torch (generic tests call this)."""
        ScriptedLoadableModuleWidget.setup(self)
        self._setupTaskWidget("UI/DLRegistration.ui", DLRegistrationLogic())
        self._showReport(None)  # the quality section appears with the first report
        self.initializeParameterNode()

    # TaskWidgetMixin hooks

    def _moduleTitle(self) -> str:
        return _("DL Registration")

    def _failureMessage(self, error: Exception) -> str:
        return _("Registration failed: {error}").format(error=error)

    def _primaryInput(self, params: DLRegistrationParameterNode):
        return params.fixedVolume

    def _missingInput(self, params: DLRegistrationParameterNode) -> str | None:
        if not params.fixedVolume:
            return _("Select a fixed volume.")
        if not params.movingVolume:
            return _("Select a moving volume.")
        return None

    def _selectDefaultInputs(self, params: DLRegistrationParameterNode) -> None:
        """The first two image volumes of the scene (label maps skipped): fixed, then moving."""
        if params.fixedVolume and params.movingVolume:
            return
        volumes = []
        for index in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            node = slicer.mrmlScene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
            if not node.IsA("vtkMRMLLabelMapVolumeNode"):
                volumes.append(node)
        if not params.fixedVolume and volumes:
            params.fixedVolume = volumes[0]
        if not params.movingVolume:
            others = [node for node in volumes if node is not params.fixedVolume]
            if others:
                params.movingVolume = others[0]

    def _inputProblem(self, params: DLRegistrationParameterNode) -> str | None:
        if params.fixedVolume.GetID() == params.movingVolume.GetID():
            return _("The fixed and the moving volume must be two different volumes.")
        if (params.movingSegmentation is not None and params.fixedSegmentation is not None
                and params.movingSegmentation.GetID() == params.fixedSegmentation.GetID()):
            return _("The segmentation to carry over and the one to compare with must be two different "
                     "segmentations (one of each volume).")
        return None

    def _startRun(self, params: DLRegistrationParameterNode) -> RegistrationRun:
        return self.logic.start(
            params.fixedVolume,
            params.movingVolume,
            params.modelId,
            device=params.device,
            fixedMask=params.fixedMask,
            movingMask=params.movingMask,
            movingSegmentation=params.movingSegmentation,
            fixedSegmentation=params.fixedSegmentation,
            instanceSteps=int(params.instanceSteps),
            keepModelLoaded=params.keepModelLoaded,
        )

    def _showResult(self, result: RegistrationResult, fixedVolume) -> None:
        """Log warnings, times and the quality rows; show the report below; show the resampled moving volume over
        the fixed one in the slice views (the fader in the slice view controller compares them)."""
        self.ui.progressBar.value = 100
        for warning in result.warnings:
            self._log(_("Warning: {warning}").format(warning=warning))
        if result.timings:
            timings = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.timings.items())
            self._log(_("Timings: {timings}").format(timings=timings))
        names = [f"'{node.GetName()}'" for node in (result.transform_node, result.warped_volume_node,
                                                      result.segmentation_node, result.report_table_node)
                 if node is not None]
        done = _("Done: {names}").format(names=", ".join(names))
        if "total" in result.timings:
            done += _(" in {seconds:.1f} s").format(seconds=result.timings["total"])
        if result.warnings:
            done += _(" ({count} warning(s), see the log)").format(count=len(result.warnings))
        self._setStatus(done + ".")
        self._log(done + ".")
        for row in result.quality:
            self._log(f"  {row.measure}: {row.value:.4g}")
        self._showReport(result)
        if fixedVolume is not None and slicer.mrmlScene.IsNodePresent(fixedVolume):
            slicer.util.setSliceViewerLayers(background=fixedVolume, foreground=result.warped_volume_node,
                                             foregroundOpacity=0.5, fit=True)

    def _showReport(self, result) -> None:
        """The quality table of the last run in the module; hidden before the first run, so no report is shown
        for inputs it was not computed on."""
        tableNode = result.report_table_node if result is not None else None
        self.ui.reportTableView.setMRMLTableNode(tableNode)
        self.ui.reportSummaryLabel.text = result.summary() if result is not None else ""
        self.ui.resultsCollapsibleButton.visible = tableNode is not None
        if tableNode is not None:
            self.ui.resultsCollapsibleButton.collapsed = False


#
# DLRegistrationLogic
#


class DLRegistrationLogic(TaskLogicMixin, ScriptedLoadableModuleLogic):
    """Thin wrapper: the work is done by MIADeepLearningLib.mrml.registration_logic.RegistrationLogic (Qt-free);
    TaskLogicMixin picks the process-per-run or the warm-worker instance of it."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        TaskLogicMixin.__init__(self)

    def getParameterNode(self) -> DLRegistrationParameterNode:
        return DLRegistrationParameterNode(super().getParameterNode())

    @staticmethod
    def availableModels() -> list:
        """Registration models of the registry (torch-free)."""
        from MIADeepLearningLib.engine import registry

        return registry.list_models(task="registration")

    def createTaskLogic(self, pythonExecutable: str | None, warmWorker: WarmWorker | None) -> RegistrationLogic:
        """Imported here, so loading the module imports no MRML bridge code."""
        from MIADeepLearningLib.mrml.registration_logic import RegistrationLogic

        return RegistrationLogic(python_executable=pythonExecutable, warm_worker=warmWorker)

    def registrationLogic(self, keepModelLoaded: bool = False) -> RegistrationLogic:
        """Created on first use. With keepModelLoaded, runs go through one worker process kept alive between runs
        (model loaded once per session); shutdownWarmWorker() ends it."""
        return self.taskLogic(keepModelLoaded)

    def start(
        self,
        fixedVolume: vtkMRMLScalarVolumeNode,
        movingVolume: vtkMRMLScalarVolumeNode,
        modelId: str = DEFAULT_MODEL_ID,
        device: str = "auto",
        fixedMask: vtkMRMLSegmentationNode | None = None,
        movingMask: vtkMRMLSegmentationNode | None = None,
        movingSegmentation: vtkMRMLSegmentationNode | None = None,
        fixedSegmentation: vtkMRMLSegmentationNode | None = None,
        instanceSteps: int = 0,
        timeoutS: float | None = None,
        onEvent: Callable[[Event], None] | None = None,
        keepModelLoaded: bool = False,
    ) -> RegistrationRun:
        """Start a background run and return at once; poll the returned run, then call its finish()."""
        return self.registrationLogic(keepModelLoaded).start(
            fixedVolume,
            movingVolume,
            modelId,
            device=device,
            fixed_mask=fixedMask,
            moving_mask=movingMask,
            moving_segmentation=movingSegmentation,
            fixed_segmentation=fixedSegmentation,
            instance_steps=instanceSteps,
            timeout_s=timeoutS,
            on_event=onEvent,
        )

    def process(
        self,
        fixedVolume: vtkMRMLScalarVolumeNode,
        movingVolume: vtkMRMLScalarVolumeNode,
        modelId: str = DEFAULT_MODEL_ID,
        device: str = "auto",
        fixedMask: vtkMRMLSegmentationNode | None = None,
        movingMask: vtkMRMLSegmentationNode | None = None,
        movingSegmentation: vtkMRMLSegmentationNode | None = None,
        fixedSegmentation: vtkMRMLSegmentationNode | None = None,
        instanceSteps: int = 0,
        timeoutS: float | None = None,
        onEvent: Callable[[Event], None] | None = None,
    ) -> RegistrationResult:
        """Blocking run for scripts (the GUI uses start() so Slicer stays responsive)."""
        run = self.start(fixedVolume, movingVolume, modelId, device, fixedMask, movingMask, movingSegmentation,
                         fixedSegmentation, instanceSteps, timeoutS, onEvent)
        run.wait()
        return run.finish()


#
# DLRegistrationTest
#


class DLRegistrationTest(ScriptedLoadableModuleTest):
    """Runs the scenarios of MIADeepLearningLib.testing.registration_scenarios (the ones the headless pytest suite
    runs) and checks the panel's own rules."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_DLRegistrationPanel()
        self.test_DLRegistrationScenarios()

    def test_DLRegistrationPanel(self) -> None:
        """The shipped model is listed; Apply needs a fixed and a moving volume, two different ones, and two
        different segmentations; entering the module picks the first two volumes."""
        from MIADeepLearningLib.testing import registration_scenarios

        self.setUp()
        pair = registration_scenarios.phantom_pair()
        slicer.util.selectModule("DLRegistration")
        widget = slicer.modules.dlregistration.widgetRepresentation().self()
        ui = widget.ui
        self.assertGreaterEqual(ui.modelComboBox.findData(DEFAULT_MODEL_ID), 0, "the shipped model is not listed")
        params = widget.logic.getParameterNode()
        params.fixedVolume = None
        params.movingVolume = None
        widget.initializeParameterNode()
        self.assertEqual(params.fixedVolume.GetID(), pair["fixed"].GetID())
        self.assertEqual(params.movingVolume.GetID(), pair["moving"].GetID())
        params.modelId = DEFAULT_MODEL_ID
        self.assertTrue(ui.applyButton.enabled, ui.applyButton.toolTip)
        params.movingVolume = None
        self.assertFalse(ui.applyButton.enabled, "Apply is enabled without a moving volume")
        self.assertEqual(ui.applyButton.toolTip, "Select a moving volume.")
        params.movingVolume = pair["fixed"]
        self.assertFalse(ui.applyButton.enabled, "Apply is enabled with the same volume on both sides")
        params.movingVolume = pair["moving"]
        params.movingSegmentation = pair["fixed_segmentation"]
        params.fixedSegmentation = pair["fixed_segmentation"]
        self.assertFalse(ui.applyButton.enabled, "Apply is enabled with one segmentation on both sides")
        params.movingSegmentation = pair["moving_segmentation"]
        self.assertTrue(ui.applyButton.enabled, ui.applyButton.toolTip)
        params.instanceSteps = 25
        self.assertEqual(ui.instanceStepsSpinBox.value, 25)
        params.instanceSteps = 0
        self.assertFalse(ui.resultsCollapsibleButton.visible, "a quality report is shown before any run")
        self.setUp()

    def test_DLRegistrationScenarios(self) -> None:
        from MIADeepLearningLib.testing import registration_scenarios
        from MIADeepLearningLib.testing.self_test import run_scenarios

        run_scenarios(self, registration_scenarios.SCENARIOS, "DLRegistration")
