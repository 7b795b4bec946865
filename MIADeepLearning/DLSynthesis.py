"""DL Synthesis: turn a thick-slice volume into a 1 mm volume with a verified deep-learning model, in the background.

Slicer never imports torch: the model runs in a worker process (PythonSlicer) that
MIADeepLearningLib.mrml.synthesis_logic starts and imports back into the scene. This file holds only what is this
module's own: the GUI's .ui, parameter node and result display, a thin Logic that delegates to that class, and the
self-test, which runs the same scenarios as the headless pytest suite. Apply/Cancel, polling, error reporting, the
dependency installer (run by Apply, never at start-up) and the warm worker are shared with the other task modules
through MIADeepLearningLib.gui, so all of them ask the same questions and install the same way.
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
    from collections.abc import Callable

    from MIADeepLearningLib.jobs import Event
    from MIADeepLearningLib.mrml.synthesis_logic import SynthesisLogic, SynthesisResult, SynthesisRun
    from MIADeepLearningLib.runner import WarmWorker

README_URL = "https://github.com/MIADeepLearning/SlicerMIADeepLearning#readme"
DEFAULT_MODEL_ID = "thick-slice-sr"


#
# DLSynthesis
#


class DLSynthesis(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and Help & Acknowledgement panel."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DL Synthesis")
        self.parent.categories = ["Deep Learning"]
        self.parent.dependencies = []  # PyTorch is needed only on Apply, and then installed through PyTorchUtils
        self.parent.contributors = ["MIADeepLearning developers (MIADeepLearning project)"]
        self.parent.helpText = _(
            "Computes a 1 mm isotropic volume from a thick-slice MRI (slices 2-7 mm apart, any contrast) with a "
            "verified deep-learning model. The result keeps the input's orientation and covers its extent. The model "
            "runs in a separate background process, on the CUDA GPU when one is usable and on the CPU otherwise; "
            "Slicer stays responsive and Apply becomes Cancel while it runs. Optional outputs: an uncertainty map "
            "(spread over 4 mirrored runs) and the difference to B-spline interpolation. Every output carries a "
            "provenance record (model, version, weight checksums, device, timings) and, in its description, the "
            "notice that it is synthesized: <b>not for diagnosis on its own</b>. Needs 3D Slicer {slicer} or newer. "
            "The first Apply may offer to install PyTorch {torch} or newer (through the PyTorch extension). "
            'See the <a href="{url}">MIADeepLearning README</a>.'
        ).format(url=README_URL, slicer=versions.dotted(versions.MINIMUM_SLICER_VERSION),
                 torch=versions.dotted(versions.MINIMUM_TORCH_VERSION))
        self.parent.acknowledgementText = _(
            "The thick-slice super-resolution network was trained by MIADeepLearning on synthetic images rendered "
            "from brain label maps, following the idea of Iglesias J.E. et al., \"Joint super-resolution and "
            "synthesis of 1 mm isotropic MP-RAGE volumes from clinical MRI exams with scans of different orientation, "
            "resolution and contrast\", NeuroImage 2021;237:118206."
        )


#
# DLSynthesisParameterNode
#


@parameterNodeWrapper
class DLSynthesisParameterNode:
    """What the user chose; saved with the scene.

    Annotations are evaluated at runtime by the wrapper (Python 3.9 in Slicer 5.8): no ``X | None`` here.
    outputVolume None means "create a new volume".
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelId: str = DEFAULT_MODEL_ID
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    outputVolume: vtkMRMLScalarVolumeNode
    createUncertainty: bool = False
    createDifference: bool = False
    keepModelLoaded: bool = True


#
# DLSynthesisWidget
#


class DLSynthesisWidget(TaskWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: parameter node <-> widgets, the disclaimer and the result display; Apply/Cancel, progress and log of the
    background run come from TaskWidgetMixin."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        TaskWidgetMixin.__init__(self)
        self.logic: DLSynthesisLogic | None = None
        self._parameterNode: DLSynthesisParameterNode | None = None
        self._run: SynthesisRun | None = None

    def setup(self) -> None:
        """Build the GUI. Installs nothing, downloads nothing and never imports torch (generic tests call this)."""
        ScriptedLoadableModuleWidget.setup(self)
        self._setupTaskWidget("UI/DLSynthesis.ui", DLSynthesisLogic())
        self.ui.disclaimerLabel.text = DLSynthesisLogic.disclaimer()
        self.initializeParameterNode()

    # TaskWidgetMixin hooks

    def _moduleTitle(self) -> str:
        return _("DL Synthesis")

    def _failureMessage(self, error: Exception) -> str:
        return _("Synthesis failed: {error}").format(error=error)

    def _inputProblem(self, params: DLSynthesisParameterNode) -> str | None:
        if params.outputVolume is not None and params.outputVolume.GetID() == params.inputVolume.GetID():
            return _("The output volume must not be the input volume; choose another or 'Create new volume'.")
        return None

    def _startRun(self, params: DLSynthesisParameterNode) -> SynthesisRun:
        return self.logic.start(
            params.inputVolume,
            params.modelId,
            device=params.device,
            outputVolume=params.outputVolume,
            createUncertainty=params.createUncertainty,
            createDifference=params.createDifference,
            keepModelLoaded=params.keepModelLoaded,
        )

    def _showResult(self, result: SynthesisResult, inputVolume) -> None:
        """Log warnings and times; show the result in every slice view, the input on top at 0 opacity so that the
        fader in the slice view controller compares them."""
        self.ui.progressBar.value = 100
        for warning in result.warnings:
            self._log(_("Warning: {warning}").format(warning=warning))
        if result.timings:
            timings = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.timings.items())
            self._log(_("Timings: {timings}").format(timings=timings))
        volume = result.volume_node
        done = _("Done: volume '{name}'").format(name=volume.GetName())
        maps = [node.GetName() for node in (result.uncertainty_node, result.difference_node) if node is not None]
        if maps:
            done += _(" and map(s) {names}").format(names=", ".join(f"'{name}'" for name in maps))
        if "total" in result.timings:
            done += _(" in {seconds:.1f} s").format(seconds=result.timings["total"])
        if result.warnings:
            done += _(" ({count} warning(s), see the log)").format(count=len(result.warnings))
        self._setStatus(done + ".")
        self._log(done + ".")
        self._log(DLSynthesisLogic.disclaimer())
        foreground = inputVolume if inputVolume is not None and slicer.mrmlScene.IsNodePresent(inputVolume) else None
        slicer.util.setSliceViewerLayers(background=volume, foreground=foreground, foregroundOpacity=0.0, fit=True)


#
# DLSynthesisLogic
#


class DLSynthesisLogic(TaskLogicMixin, ScriptedLoadableModuleLogic):
    """Thin wrapper: the work is done by MIADeepLearningLib.mrml.synthesis_logic.SynthesisLogic (Qt-free);
    TaskLogicMixin picks the process-per-run or the warm-worker instance of it."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        TaskLogicMixin.__init__(self)

    def getParameterNode(self) -> DLSynthesisParameterNode:
        return DLSynthesisParameterNode(super().getParameterNode())

    @staticmethod
    def availableModels() -> list:
        """Synthesis models of the registry (torch-free)."""
        from MIADeepLearningLib.mrml.synthesis_logic import SynthesisLogic

        return SynthesisLogic.models()

    @staticmethod
    def disclaimer() -> str:
        """The notice every synthesized output carries; the panel shows it above everything else."""
        from MIADeepLearningLib.mrml.synthesis_logic import DISCLAIMER

        return DISCLAIMER

    def createTaskLogic(self, pythonExecutable: str | None, warmWorker: WarmWorker | None) -> SynthesisLogic:
        """Imported here, so loading the module imports no MRML bridge code."""
        from MIADeepLearningLib.mrml.synthesis_logic import SynthesisLogic

        return SynthesisLogic(python_executable=pythonExecutable, warm_worker=warmWorker)

    def synthesisLogic(self, keepModelLoaded: bool = False) -> SynthesisLogic:
        """Created on first use. With keepModelLoaded, runs go through one worker process kept alive between runs
        (model loaded once per session); shutdownWarmWorker() ends it."""
        return self.taskLogic(keepModelLoaded)

    def start(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        modelId: str = DEFAULT_MODEL_ID,
        device: str = "auto",
        outputVolume: vtkMRMLScalarVolumeNode | None = None,
        createUncertainty: bool = False,
        createDifference: bool = False,
        timeoutS: float | None = None,
        onEvent: Callable[[Event], None] | None = None,
        keepModelLoaded: bool = False,
    ) -> SynthesisRun:
        """Start a background run and return at once; poll the returned run, then call its finish()."""
        return self.synthesisLogic(keepModelLoaded).start(
            inputVolume,
            modelId,
            device=device,
            output_volume=outputVolume,
            create_uncertainty=createUncertainty,
            create_difference=createDifference,
            timeout_s=timeoutS,
            on_event=onEvent,
        )

    def process(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        modelId: str = DEFAULT_MODEL_ID,
        device: str = "auto",
        outputVolume: vtkMRMLScalarVolumeNode | None = None,
        createUncertainty: bool = False,
        createDifference: bool = False,
        timeoutS: float | None = None,
        onEvent: Callable[[Event], None] | None = None,
    ) -> SynthesisResult:
        """Blocking run for scripts (the GUI uses start() so Slicer stays responsive)."""
        run = self.start(inputVolume, modelId, device, outputVolume, createUncertainty, createDifference, timeoutS,
                         onEvent)
        run.wait()
        return run.finish()


#
# DLSynthesisTest
#


class DLSynthesisTest(ScriptedLoadableModuleTest):
    """Runs the scenarios of MIADeepLearningLib.testing.synthesis_scenarios (the ones the headless pytest suite runs)
    and checks the panel's own rules."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_DLSynthesisPanel()
        self.test_DLSynthesisScenarios()

    def test_DLSynthesisPanel(self) -> None:
        """The disclaimer is shown; Apply needs an input and is refused with the input as output."""
        from MIADeepLearningLib.testing import synthesis_scenarios

        self.setUp()
        slicer.util.selectModule("DLSynthesis")
        widget = slicer.modules.dlsynthesis.widgetRepresentation().self()
        ui = widget.ui
        self.assertEqual(ui.disclaimerLabel.text, DLSynthesisLogic.disclaimer())
        self.assertIn("not for diagnosis", ui.disclaimerLabel.text.lower())
        self.assertGreaterEqual(ui.modelComboBox.findData(DEFAULT_MODEL_ID), 0, "the shipped model is not listed")
        params = widget.logic.getParameterNode()
        params.inputVolume = None
        params.outputVolume = None
        self.assertFalse(ui.applyButton.enabled, "Apply is enabled without an input volume")
        phantom = synthesis_scenarios.thick_slice_phantom()
        params.inputVolume = phantom
        params.modelId = DEFAULT_MODEL_ID
        self.assertTrue(ui.applyButton.enabled, ui.applyButton.toolTip)
        params.outputVolume = phantom
        self.assertFalse(ui.applyButton.enabled, "Apply is enabled with the input as output")
        params.outputVolume = None
        self.assertTrue(ui.applyButton.enabled, ui.applyButton.toolTip)
        self.setUp()

    def test_DLSynthesisScenarios(self) -> None:
        from MIADeepLearningLib.testing import synthesis_scenarios
        from MIADeepLearningLib.testing.self_test import run_scenarios

        run_scenarios(self, synthesis_scenarios.SCENARIOS, "DLSynthesis")
