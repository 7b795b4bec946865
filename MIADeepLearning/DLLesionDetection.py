"""DL Lesion Detection: point at what departs from healthy anatomy in a brain MRI (any contrast; FLAIR is the most
informative), optionally with more co-registered contrasts of the same visit, with a verified deep-learning model
run in the background.

Slicer never imports torch: the model runs in a worker process (PythonSlicer) that
MIADeepLearningLib.mrml.detection_logic starts and imports back into the scene (anomaly map, brain map, candidate
segments, boxes, points and table). This file holds only what is this module's own: the .ui, parameter node, the
sensitivity slider (which re-derives the candidates from the maps already in the scene, without the model), the
result display, a thin Logic that delegates to that library, and the self-test, which runs the same scenarios as the
headless pytest suite. Apply/Cancel, polling, error reporting, the dependency installer (run by Apply, never at
start-up) and the warm worker are shared with the other task modules through MIADeepLearningLib.gui.
"""

from __future__ import annotations

import traceback
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
    from collections.abc import Callable, Sequence

    from MIADeepLearningLib.jobs import Event
    from MIADeepLearningLib.mrml.detection_logic import DetectionLogic, DetectionResult, DetectionRun
    from MIADeepLearningLib.runner import WarmWorker

README_URL = "https://github.com/MIADeepLearning/SlicerMIADeepLearning#readme"
DEFAULT_MODEL_ID = "brain-lesion"
ANOMALY_OPACITY = 0.4  # the anomaly map over its scan: the anatomy stays readable under the colours
REDERIVE_DELAY_MS = 300  # the slider re-derives once it rests, not on every step of a drag
THRESHOLD_TOLERANCE = 1e-6


#
# DLLesionDetection
#


class DLLesionDetection(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and Help & Acknowledgement panel."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DL Lesion Detection")
        self.parent.categories = ["Deep Learning"]
        self.parent.dependencies = []  # PyTorch is needed only on Apply, and then installed through PyTorchUtils
        self.parent.contributors = ["MIADeepLearning developers (MIADeepLearning project)"]
        self.parent.helpText = _(
            "Points at regions of a brain MRI that depart from healthy anatomy (tumours, metastases, MS plaques, "
            "strokes) with a verified deep-learning model. Any contrast works; FLAIR is the most informative, and "
            "more co-registered contrasts of the same visit can be added (their anomaly is averaged). It flags "
            "abnormalities; it does not diagnose them. Outputs, on the input's grid beside it in the Data module: an "
            "anomaly map (0-1, shown in colour over the scan), the brain map the model used (CSF, gray and white "
            "matter), a segmentation with one segment per lesion candidate (by decreasing score, shown as 3D "
            "surfaces), a box and a labelled point per candidate (click a row of the table to jump there), and a "
            "table of the candidates (volume, centre, maximum and mean score, tissue). The case-level abnormality "
            "score (the mean anomaly of the most anomalous millilitre of brain) is shown here and stored on the "
            "table as the attribute MIADeepLearning.CaseScore. The sensitivity threshold re-derives the candidates "
            "from the anomaly map without running the model again. Every output carries a provenance record. The "
            "model runs in a separate background process, on the CUDA GPU when one is usable and on the CPU "
            "otherwise; Slicer stays responsive and Apply becomes Cancel while it runs. "
            "Needs 3D Slicer {slicer} or newer. The first Apply may offer to install PyTorch {torch} or newer "
            "(through the PyTorch extension). "
            'See the <a href="{url}">MIADeepLearning README</a>.'
        ).format(url=README_URL, slicer=versions.dotted(versions.MINIMUM_SLICER_VERSION),
                 torch=versions.dotted(versions.MINIMUM_TORCH_VERSION))
        self.parent.acknowledgementText = _(
            "The brain lesion network was trained by MIADeepLearning on renders of healthy brain label maps into "
            "which real lesion shapes were pasted (self-supervised synthetic anomalies as in Tan J. et al., "
            "\"Detecting outliers with foreign patch interpolation\", MELBA 2022; contrast-agnostic renders as in "
            "Billot B. et al., Medical Image Analysis 2023;86:102789). Lesion shapes: ISLES 2022 / SOOP (Hernandez "
            "Petzsche M.R. et al.) and MSLUB (Lesjak Z. et al., Neuroinformatics 2018)."
        )


#
# DLLesionDetectionParameterNode
#


@parameterNodeWrapper
class DLLesionDetectionParameterNode:
    """What the user chose; saved with the scene.

    Annotations are evaluated at runtime by the wrapper (Python 3.9 in Slicer 5.8): no ``X | None`` here.
    extraVolume1/2: optional co-registered contrasts of the same visit. outputSegmentation None means "create a new
    segmentation". anomalyMap: the result the sensitivity slider acts on (set by Apply; kept with the scene), and
    threshold the slider's value: a new result starts at the model's own threshold.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    extraVolume1: vtkMRMLScalarVolumeNode
    extraVolume2: vtkMRMLScalarVolumeNode
    modelId: str = DEFAULT_MODEL_ID
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode
    threshold: float = 0.5
    anomalyMap: vtkMRMLScalarVolumeNode
    keepModelLoaded: bool = True


#
# DLLesionDetectionWidget
#


class DLLesionDetectionWidget(TaskWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: parameter node <-> widgets, the results section and its sensitivity slider; Apply/Cancel, progress and
    log of the background run come from TaskWidgetMixin."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        TaskWidgetMixin.__init__(self)
        self.logic: DLLesionDetectionLogic | None = None
        self._parameterNode: DLLesionDetectionParameterNode | None = None
        self._run: DetectionRun | None = None
        self._rederiveTimer = None
        self._shownAnomalyMap = None  # the result shown in the results section
        self._shownThreshold: float | None = None  # the threshold its candidates come from
        self._shownCandidates: list = []
        self._syncingResult = False  # _showDetection is writing the parameter node itself

    def setup(self) -> None:
        """Build the GUI. Installs nothing, downloads nothing and never imports torch (generic tests call this)."""
        ScriptedLoadableModuleWidget.setup(self)
        self._setupTaskWidget("UI/DLLesionDetection.ui", DLLesionDetectionLogic())
        self._rederiveTimer = qt.QTimer()
        self._rederiveTimer.setInterval(REDERIVE_DELAY_MS)
        self._rederiveTimer.connect("timeout()", self._onRederiveTimer)
        self.ui.resultsTableView.connect("clicked(QModelIndex)", self.onResultsTableClicked)
        self._showDetection(None)  # the results section appears with the first result
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._rederiveTimer is not None:
            self._rederiveTimer.stop()
        TaskWidgetMixin.cleanup(self)

    # TaskWidgetMixin hooks

    def _moduleTitle(self) -> str:
        return _("DL Lesion Detection")

    def _failureMessage(self, error: Exception) -> str:
        return _("Lesion detection failed: {error}").format(error=error)

    def _inputProblem(self, params: DLLesionDetectionParameterNode) -> str | None:
        """An extra contrast must be another volume than the input and than the other extra contrast."""
        extras = [node for node in (params.extraVolume1, params.extraVolume2) if node is not None]
        if any(node is params.inputVolume for node in extras):
            return _("An extra contrast is the input volume itself; choose another volume or none.")
        if len(extras) == 2 and extras[0] is extras[1]:
            return _("The two extra contrasts are the same volume; choose two different volumes.")
        return None

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Also: show the result the parameter node points at (after Apply, or a loaded scene), and re-derive it
        when the slider moved away from the threshold its candidates come from."""
        TaskWidgetMixin._onParameterNodeModified(self, caller, event)
        if self._syncingResult:
            return
        params = self._parameterNode
        anomalyMap = params.anomalyMap if params else None
        if anomalyMap is not self._shownAnomalyMap:
            self._showDetection(self.logic.detectionOf(anomalyMap) if anomalyMap is not None else None)
        elif anomalyMap is not None and self._thresholdMoved():
            self._rederiveTimer.start()

    def _thresholdMoved(self) -> bool:
        params = self._parameterNode
        return bool(params and self._shownThreshold is not None
                    and abs(float(params.threshold) - self._shownThreshold) > THRESHOLD_TOLERANCE)

    def _startRun(self, params: DLLesionDetectionParameterNode) -> DetectionRun:
        """A new detection starts at the model's own threshold (the slider then re-derives it without the model)."""
        return self.logic.start(
            params.inputVolume,
            params.modelId,
            device=params.device,
            extraVolumes=[node for node in (params.extraVolume1, params.extraVolume2) if node is not None],
            outputSegmentation=params.outputSegmentation,
            keepModelLoaded=params.keepModelLoaded,
        )

    def _showResult(self, result: DetectionResult, inputVolume) -> None:
        """Status and log; the results section with the slider on this result; the anomaly map over the scan."""
        self.ui.progressBar.value = 100
        for warning in result.warnings:
            self._log(_("Warning: {warning}").format(warning=warning))
        if result.timings:
            timings = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.timings.items())
            self._log(_("Timings: {timings}").format(timings=timings))
        done = _("Done: {summary}").format(summary=result.summary())
        if "total" in result.timings:
            done += _(" ({seconds:.1f} s)").format(seconds=result.timings["total"])
        if result.warnings:
            done += _(" ({count} warning(s), see the log)").format(count=len(result.warnings))
        self._setStatus(done + ".")
        self._log(done + ".")
        self._logCandidates(result)
        self._showDetection(result)
        if inputVolume is not None and slicer.mrmlScene.IsNodePresent(inputVolume):
            slicer.util.setSliceViewerLayers(background=inputVolume, foreground=result.anomaly_node,
                                             foregroundOpacity=ANOMALY_OPACITY, fit=True)

    def _logCandidates(self, result: DetectionResult) -> None:
        for candidate in result.candidates:
            centre = ", ".join(f"{value:.1f}" for value in candidate["center_ras"])
            self._log(_("  Candidate {label}: {volume:.2f} mL at RAS ({centre}), max {maximum:.2f}, mean {mean:.2f}"
                        "{tissue}").format(label=candidate["label"], volume=candidate["volume_ml"], centre=centre,
                                           maximum=candidate["max_score"], mean=candidate["mean_score"],
                                           tissue=f", {candidate['tissue']}" if candidate.get("tissue") else ""))

    # Results section and the sensitivity slider

    def _showDetection(self, result: DetectionResult | None) -> None:
        """The result's table, case score and candidate count in the results section (hidden without a result); the
        parameter node points at it, and the slider at the threshold its candidates come from."""
        self._shownAnomalyMap = result.anomaly_node if result is not None else None
        self._shownThreshold = result.threshold if result is not None else None
        self._shownCandidates = list(result.candidates) if result is not None else []
        self.ui.resultsTableView.setMRMLTableNode(result.table_node if result is not None else None)
        self.ui.resultsCollapsibleButton.visible = result is not None
        if result is None:
            self.ui.resultSummaryLabel.text = ""
            return
        self.ui.resultsCollapsibleButton.collapsed = False
        self.ui.resultSummaryLabel.text = _(
            "{count} candidate(s) at threshold {threshold:.2f}. Case abnormality score: {score:.2f} (the mean "
            "anomaly of the most anomalous millilitre of brain).").format(
                count=result.found, threshold=result.threshold, score=result.case_score)
        params = self._parameterNode
        if params:
            self._syncingResult = True
            try:
                if params.anomalyMap is not result.anomaly_node:
                    params.anomalyMap = result.anomaly_node
                if abs(float(params.threshold) - result.threshold) > THRESHOLD_TOLERANCE:
                    params.threshold = result.threshold
            finally:
                self._syncingResult = False
        if self._rederiveTimer is not None:
            self._rederiveTimer.stop()  # the slider now shows this result's own threshold

    def _onRederiveTimer(self) -> None:
        """The slider rests: candidates, segments, boxes, points and table again at its threshold, from the anomaly
        and brain maps in the scene (no model run)."""
        self._rederiveTimer.stop()
        params = self._parameterNode
        anomalyMap = params.anomalyMap if params else None
        if anomalyMap is None or not self._thresholdMoved():
            return
        try:
            result = self.logic.rederive(anomalyMap, float(params.threshold))
        except Exception as error:
            message = _("The candidates could not be derived again: {error}").format(error=error)
            self._reportError(error, traceback.format_exc(), [], message)
            return
        self._showDetection(result)
        text = _("Threshold {threshold:.2f}: {summary}.").format(threshold=result.threshold, summary=result.summary())
        self._setStatus(text)
        self._log(text)

    def onResultsTableClicked(self, index) -> None:
        """Jump the slice views to the candidate of the clicked row (centred)."""
        row = index.row()
        if 0 <= row < len(self._shownCandidates):
            centre = self._shownCandidates[row]["center_ras"]
            slicer.modules.markups.logic().JumpSlicesToLocation(*(float(value) for value in centre), True)


#
# DLLesionDetectionLogic
#


class DLLesionDetectionLogic(TaskLogicMixin, ScriptedLoadableModuleLogic):
    """Thin wrapper: the work is done by MIADeepLearningLib.mrml.detection_logic (Qt-free); TaskLogicMixin picks the
    process-per-run or the warm-worker instance of its DetectionLogic."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        TaskLogicMixin.__init__(self)

    def getParameterNode(self) -> DLLesionDetectionParameterNode:
        return DLLesionDetectionParameterNode(super().getParameterNode())

    @staticmethod
    def availableModels() -> list:
        """Detection models of the registry (torch-free)."""
        from MIADeepLearningLib.engine import registry

        return registry.list_models(task="detection")

    def createTaskLogic(self, pythonExecutable: str | None, warmWorker: WarmWorker | None) -> DetectionLogic:
        """Imported here, so loading the module imports no MRML bridge code."""
        from MIADeepLearningLib.mrml.detection_logic import DetectionLogic

        return DetectionLogic(python_executable=pythonExecutable, warm_worker=warmWorker)

    def detectionLogic(self, keepModelLoaded: bool = False) -> DetectionLogic:
        """Created on first use. With keepModelLoaded, runs go through one worker process kept alive between runs
        (model loaded once per session); shutdownWarmWorker() ends it."""
        return self.taskLogic(keepModelLoaded)

    def start(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        modelId: str = DEFAULT_MODEL_ID,
        device: str = "auto",
        extraVolumes: Sequence[vtkMRMLScalarVolumeNode] = (),
        threshold: float | None = None,
        outputSegmentation: vtkMRMLSegmentationNode | None = None,
        timeoutS: float | None = None,
        onEvent: Callable[[Event], None] | None = None,
        keepModelLoaded: bool = False,
    ) -> DetectionRun:
        """Start a background run and return at once; poll the returned run, then call its finish().

        `threshold` None: the model's own (its package's slicer.options.threshold)."""
        return self.detectionLogic(keepModelLoaded).start(
            inputVolume,
            modelId,
            device=device,
            extra_volumes=list(extraVolumes),
            threshold=threshold,
            output_segmentation=outputSegmentation,
            timeout_s=timeoutS,
            on_event=onEvent,
        )

    def process(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        modelId: str = DEFAULT_MODEL_ID,
        device: str = "auto",
        extraVolumes: Sequence[vtkMRMLScalarVolumeNode] = (),
        threshold: float | None = None,
        outputSegmentation: vtkMRMLSegmentationNode | None = None,
        timeoutS: float | None = None,
        onEvent: Callable[[Event], None] | None = None,
    ) -> DetectionResult:
        """Blocking run for scripts (the GUI uses start() so Slicer stays responsive)."""
        run = self.start(inputVolume, modelId, device, extraVolumes, threshold, outputSegmentation, timeoutS, onEvent)
        run.wait()
        return run.finish()

    @staticmethod
    def rederive(anomalyMap: vtkMRMLScalarVolumeNode, threshold: float) -> DetectionResult:
        """Candidates, segments, boxes, points and table of a detection again at `threshold`, from its anomaly and
        brain maps in the scene: no worker, no model."""
        from MIADeepLearningLib.mrml.detection_logic import rederive

        return rederive(anomalyMap, threshold)

    @staticmethod
    def detectionOf(anomalyMap: vtkMRMLScalarVolumeNode) -> DetectionResult | None:
        """The detection an anomaly map belongs to, as it is in the scene (None for any other volume)."""
        from MIADeepLearningLib.mrml.detection_logic import detection_of

        return detection_of(anomalyMap)


#
# DLLesionDetectionTest
#


class DLLesionDetectionTest(ScriptedLoadableModuleTest):
    """Runs the scenarios of MIADeepLearningLib.testing.detection_scenarios (the ones the headless pytest suite runs:
    outputs of a detection on an oblique flipped grid checked candidate by candidate, the slider re-deriving without
    a worker, a real run of the shipped model, bad inputs, cancel) and checks the panel's own rules."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_DLLesionDetectionPanel()
        self.test_DLLesionDetectionScenarios()

    def test_DLLesionDetectionPanel(self) -> None:
        """The shipped model is listed; Apply needs an input and refuses an extra contrast that is the input; a
        detection in the scene shows its table, and moving the slider re-derives it (fewer candidates at a higher
        threshold) without starting a worker."""
        from MIADeepLearningLib.testing import detection_scenarios

        self.setUp()
        slicer.util.selectModule("DLLesionDetection")
        widget = slicer.modules.dllesiondetection.widgetRepresentation().self()
        ui = widget.ui
        self.assertGreaterEqual(ui.modelComboBox.findData(DEFAULT_MODEL_ID), 0, "the shipped model is not listed")
        params = widget.logic.getParameterNode()
        params.inputVolume = None
        params.anomalyMap = None
        params.modelId = DEFAULT_MODEL_ID
        self.assertFalse(ui.applyButton.enabled, "Apply is enabled without an input volume")
        self.assertFalse(ui.resultsCollapsibleButton.visible, "a result is shown before any run")
        volume, result = detection_scenarios.synthetic_detection()
        params.inputVolume = volume
        self.assertTrue(ui.applyButton.enabled, ui.applyButton.toolTip)
        params.extraVolume1 = volume
        self.assertFalse(ui.applyButton.enabled, "Apply is enabled with the input as its own extra contrast")
        params.extraVolume1 = None
        params.anomalyMap = result.anomaly_node
        self.assertTrue(ui.resultsCollapsibleButton.visible)
        self.assertAlmostEqual(params.threshold, result.threshold)
        self.assertEqual(ui.resultsTableView.mrmlTableNode(), result.table_node)
        with detection_scenarios.no_worker_may_start() as attempts:
            params.threshold = 0.85
            widget._onRederiveTimer()  # what the timer does once the slider rests
        self.assertEqual(attempts, [])
        self.assertEqual(result.table_node.GetTable().GetNumberOfRows(), 1)
        self.assertEqual(result.segmentation_node.GetSegmentation().GetNumberOfSegments(), 1)
        params.anomalyMap = None
        self.setUp()

    def test_DLLesionDetectionScenarios(self) -> None:
        from MIADeepLearningLib.testing import detection_scenarios
        from MIADeepLearningLib.testing.self_test import run_scenarios

        run_scenarios(self, detection_scenarios.SCENARIOS, "DLLesionDetection")
