"""DL Segmentation: segment a volume with a verified deep-learning model, in a background process.

Slicer never imports torch: the model runs in a worker process (PythonSlicer) that
MIADeepLearningLib.mrml.segmentation_logic starts and imports back into the scene. This file holds only what is this
module's own: the GUI's .ui, parameter node, result display and Advanced section, a thin Logic that delegates to that
class, and the self-test, which runs the same scenarios as the headless pytest suite. Apply/Cancel, polling, error
reporting, the dependency installer (run by Apply, never at start-up) and the warm worker are shared with the other
task modules through MIADeepLearningLib.gui.
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
from MIADeepLearningLib.gui.dependencies import DependenciesNotInstalled, ensureImportDependencies
from MIADeepLearningLib.gui.task_logic import TaskLogicMixin
from MIADeepLearningLib.gui.task_widget import DEVICE_CHOICES, JOB_MODEL_IMPORT, TaskWidgetMixin

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from MIADeepLearningLib.jobs import Event
    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic, SegmentationResult, SegmentationRun
    from MIADeepLearningLib.runner import WarmWorker

README_URL = "https://github.com/MIADeepLearning/SlicerMIADeepLearning#readme"
DEFAULT_MODEL_ID = "deepbet"
MAX_CHANNELS = 4  # input volume + extraVolume1-3 (BraTS-style bundles take 4 images)


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
    outputSegmentation None means "create a new segmentation". extraVolume1-3: the further input channels of a
    model that takes several images (shown only for such models).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    extraVolume1: vtkMRMLScalarVolumeNode
    extraVolume2: vtkMRMLScalarVolumeNode
    extraVolume3: vtkMRMLScalarVolumeNode
    modelId: str = DEFAULT_MODEL_ID
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode
    createMaskedVolume: bool = False
    createUncertainty: bool = False  # offered only for models that list "uncertainty" in slicer.optional_outputs
    createVolumeTable: bool = True
    keepModelLoaded: bool = True
    bundleSettings: str = ""  # an imported MONAI bundle's config overrides, "KEY=VALUE; KEY=VALUE"
    bundleWeights: str = ""  # one of its verified weight files by name; "" = the bundle's default


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
        self._modelInputChannels: dict[str, list] = {}
        self._modelWeightFiles: dict[str, list] = {}  # MONAI bundles only: their verified weight files by name
        self._updatingWeightsCombo = False

    def setup(self) -> None:
        """Build the GUI. Installs nothing, downloads nothing and never imports torch (generic tests call this)."""
        ScriptedLoadableModuleWidget.setup(self)
        self._setupTaskWidget("UI/DLSegmentation.ui", DLSegmentationLogic())
        self.ui.importModelZipButton.connect("clicked(bool)", self.onImportModelZip)
        self.ui.importModelFolderButton.connect("clicked(bool)", self.onImportModelFolder)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.bundleWeightsComboBox.connect("currentIndexChanged(int)", self._onBundleWeightsChanged)
        self._showVolumeTable(None)  # the Results section appears with the first table
        self.initializeParameterNode()

    # TaskWidgetMixin hooks

    def _moduleTitle(self) -> str:
        return _("DL Segmentation")

    def _failureMessage(self, error: Exception) -> str:
        return _("Segmentation failed: {error}").format(error=error)

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Also show the uncertainty option only when the selected model makes an uncertainty map, and one volume
        selector per further input channel of the selected model, labelled with the channel's name."""
        TaskWidgetMixin._onParameterNodeModified(self, caller, event)
        self.ui.createUncertaintyCheckBox.visible = self._modelOffers("uncertainty")
        channels = self._modelChannels()
        self.ui.inputVolumeLabel.text = (_("Input volume ({channel}):").format(channel=channels[0]) if len(channels) > 1
                                         else _("Input volume:"))
        for index in range(1, MAX_CHANNELS):
            shown = index < len(channels)
            getattr(self.ui, f"extraVolume{index}Label").visible = shown
            getattr(self.ui, f"extraVolume{index}Selector").visible = shown
            if shown:
                getattr(self.ui, f"extraVolume{index}Label").text = _("{channel}:").format(channel=channels[index])
        self._updateBundleFields()

    def _updateBundleFields(self) -> None:
        """The bundle settings field for imported MONAI bundles, the weights choice for those with several files."""
        modelId = self._parameterNode.modelId if self._parameterNode else ""
        weights = self._modelWeightFiles.get(modelId)
        self.ui.bundleSettingsLabel.visible = self.ui.bundleSettingsLineEdit.visible = weights is not None
        several = bool(weights) and len(weights) > 1
        self.ui.bundleWeightsLabel.visible = self.ui.bundleWeightsComboBox.visible = several
        self._updatingWeightsCombo = True
        try:
            combo = self.ui.bundleWeightsComboBox
            combo.clear()
            combo.addItem(_("default"), "")
            for name in weights or []:
                combo.addItem(name, name)
            chosen = self._parameterNode.bundleWeights if self._parameterNode else ""
            combo.currentIndex = max(combo.findData(chosen), 0)
        finally:
            self._updatingWeightsCombo = False

    def _onBundleWeightsChanged(self, index: int) -> None:
        if self._updatingWeightsCombo or not self._parameterNode or index < 0:
            return
        self._parameterNode.bundleWeights = self.ui.bundleWeightsComboBox.itemData(index) or ""

    def _bundleOptions(self, params: DLSegmentationParameterNode) -> dict:
        """Run options of an imported MONAI bundle from the two fields (none for other models); ValueError (one
        sentence) for settings that are not KEY=VALUE."""
        weights = self._modelWeightFiles.get(params.modelId)
        if weights is None:
            return {}
        from MIADeepLearningLib.engine import zoo

        options = {}
        overrides = zoo.parse_overrides(params.bundleSettings.split(";"))
        if overrides:
            options["overrides"] = overrides
        if params.bundleWeights and params.bundleWeights in weights:
            options["weights"] = params.bundleWeights
        return options

    def _modelChannels(self) -> list:
        """Names of the selected model's input channels (empty or one name: it takes one volume)."""
        modelId = self._parameterNode.modelId if self._parameterNode else ""
        return self._modelInputChannels.get(modelId, [])

    def _populateModelComboBox(self) -> None:
        """Also remember each model's input channels (from its metadata: no torch)."""
        TaskWidgetMixin._populateModelComboBox(self)
        from MIADeepLearningLib.engine.registry import MONAI_BUNDLE_PIPELINE

        self._modelInputChannels = {}
        self._modelWeightFiles = {}
        try:
            for model in self.logic.availableModels():
                self._modelInputChannels[model.id] = list(getattr(model, "input_channels", []))
                if getattr(model, "pipeline", "") == MONAI_BUNDLE_PIPELINE:
                    self._modelWeightFiles[model.id] = [weight.path.rsplit("/", 1)[-1]
                                                        for weight in getattr(model, "weights", [])]
        except Exception:  # already reported by the mixin's listing
            pass

    def _extraVolumes(self, params: DLSegmentationParameterNode) -> list:
        """The selected volumes of the further channels the model takes, in its order (None where unselected)."""
        count = max(len(self._modelChannels()) - 1, 0)
        return [getattr(params, f"extraVolume{index}") for index in range(1, count + 1)]

    def _inputProblem(self, params: DLSegmentationParameterNode) -> str | None:
        """A model that takes several images needs one volume per channel, each a different one."""
        channels = self._modelChannels()
        extras = self._extraVolumes(params)
        for name, node in zip(channels[1:], extras):
            if node is None:
                return _("Select the volume for the channel '{channel}'.").format(channel=name)
        nodes = [params.inputVolume, *extras]
        if len({id(node) for node in nodes}) != len(nodes):
            return _("The same volume is selected for two channels; each channel needs a volume of its own.")
        try:
            self._bundleOptions(params)
        except ValueError as error:
            return _("Bundle settings: {error}").format(error=error)
        return None

    def _startRun(self, params: DLSegmentationParameterNode) -> SegmentationRun:
        return self.logic.start(
            params.inputVolume,
            params.modelId,
            device=params.device,
            extraVolumes=self._extraVolumes(params),
            modelOptions=self._bundleOptions(params),
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

    def onImportModelZip(self) -> None:
        self.onImportModel(folder=False)

    def onImportModelFolder(self) -> None:
        self.onImportModel(folder=True)

    def onImportModel(self, folder: bool) -> None:
        """Add a model package from a .zip or a folder (a zoo bundle as downloaded, or our own format): show where it
        comes from and ask, since its configuration is code; then check and import it in a worker process."""
        if folder:
            path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Model package folder"))
        else:
            path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Model package"), "",
                                                  _("Model package (*.zip)"))
        if not path or self._run is not None:
            return
        with slicer.util.tryWithErrorDisplay(_("The model could not be imported."), waitCursor=True):
            package = DLSegmentationLogic.describePackage(path)
            if not slicer.util.confirmYesNoDisplay(importQuestion(package), windowTitle=_("Import model"),
                                                   detailedText=importDetails(package)):
                return
            replace = False
            installed = DLSegmentationLogic.installedCopy(package.get("id", ""))
            if installed is not None:
                replace = slicer.util.confirmYesNoDisplay(
                    _("Model '{id}' is already imported (version {version}). Replace it with this package? The old "
                      "copy is kept if the new one fails its checks.").format(id=package.get("id", ""),
                                                                             version=installed.version),
                    windowTitle=_("Import model"))
                if not replace:
                    return
            self._startModelImport(path, replace, DLSegmentationLogic.importRequirements(package))

    def _startModelImport(self, path: str, replace: bool, requirements: list) -> None:
        """Install what the check needs (asking first), then check and import in a worker process."""
        self._installing = True
        self._updateButtons()
        try:
            ensureImportDependencies(self.resourcePath("requirements.txt"), requirements)
        except DependenciesNotInstalled as error:
            self._setStatus(str(error))
            self._log(str(error))
            return
        finally:
            self._installing = False
            self._updateButtons()
        self.ui.progressBar.value = 0
        self._setStatus(_("Checking and importing the model (configs, network, weights)..."))
        self._pendingImport = (path, replace, requirements)
        run = self.logic.startModelImport(path, replace=replace)
        self._log(_("Importing model package {path}.").format(path=path))
        self._startPolling(run, JOB_MODEL_IMPORT, None)

    def _offerPackagesAndRetry(self, error: Exception) -> bool:
        """The import's check found Python packages the bundle needs (its optional_packages_version): offer to
        install them and import again. Returns whether it took over the error."""
        requirements = list(getattr(error, "requirements", []) or [])
        pending = getattr(self, "_pendingImport", None)
        if not requirements or pending is None:
            return False
        path, replace, known = pending
        if all(requirement in known for requirement in requirements):
            return False  # installed before and still missing: report the error instead of asking again
        self._log(str(error))
        try:
            self._startModelImport(path, replace, list(known) + requirements)
        except Exception as retryError:  # on a poll-timer tick: nothing above would show it
            self._reportError(retryError, traceback.format_exc(), [],
                              _("The model could not be imported: {error}").format(error=retryError))
        return True

    def onRemoveModel(self) -> None:
        """Delete the selected model's imported or downloaded copy after asking; built-in models stay."""
        modelId = self._parameterNode.modelId if self._parameterNode else ""
        if not modelId or self._run is not None:
            return
        with slicer.util.tryWithErrorDisplay(_("The model could not be removed."), waitCursor=True):
            installed = DLSegmentationLogic.installedCopy(modelId)
            if installed is None:  # a refusal, not a failure: one sentence, no traceback
                message = _("Model '{id}' is built into the extension; only imported or downloaded models can be "
                            "removed.").format(id=modelId)
                slicer.util.warningDisplay(message, windowTitle=_("Remove model"))
                self._setStatus(message)
                return
            if not slicer.util.confirmYesNoDisplay(
                    _("Remove model '{title}' (version {version}) from this computer?").format(
                        title=installed.title, version=installed.version), windowTitle=_("Remove model")):
                return
            DLSegmentationLogic.removeModel(modelId)
            self.logic.shutdownWarmWorker()  # a warm worker may still hold the removed model
            self._populateModelComboBox()
            self._parameterNode.modelId = DEFAULT_MODEL_ID
            message = _("Removed model '{title}'.").format(title=installed.title)
            self._setStatus(message)
            self._log(message)


def importQuestion(package: dict) -> str:
    """The confirmation asked before a package is imported: what it is, where it comes from, and that its
    configuration is code (importing a model is like installing software); the engine's own wording."""
    from MIADeepLearningLib.engine import model_store

    return _("{question}.\n\nThe checksums only prove that the files are the ones the package lists, not who made "
             "it. Import this model?").format(question=model_store.confirmation_text(package))


def importDetails(package: dict) -> str:
    """Everything describe_package found, for the dialog's details."""
    return "\n".join(f"{key}: {value}" for key, value in package.items())


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
    def describePackage(path: str) -> dict:
        """What a package says about itself (title, version, authors, origin, kind), read from its metadata only:
        nothing of it runs (torch-free); shown to the user before the import is confirmed."""
        from MIADeepLearningLib.engine import model_store

        return model_store.describe_package(path)

    @staticmethod
    def importRequirements(package: dict) -> list:
        """pip specs the worker needs to check a package: MONAI for a bundle, PyYAML when its config is YAML."""
        from MIADeepLearningLib.engine import registry

        config = str(package.get("inference_config") or "")
        if not package.get("carries_code") and not config:
            return []
        return [registry.MONAI_REQUIREMENT] + (["pyyaml>=5.4"] if config.endswith((".yaml", ".yml")) else [])

    @staticmethod
    def installedCopy(modelId: str):
        """The imported or downloaded copy of a model (its ModelInfo), None for built-in or unknown ids."""
        from MIADeepLearningLib.engine import registry

        for model in registry.list_models():
            if model.id == modelId and getattr(model, "origin_kind", "built-in") != "built-in":
                return model
        return None

    @staticmethod
    def removeModel(modelId: str) -> list:
        """Delete every imported or downloaded copy of a model (torch-free)."""
        from MIADeepLearningLib.engine import model_store

        return model_store.remove_model(modelId)

    def startModelImport(self, path: str, replace: bool = False, onEvent: Callable[[Event], None] | None = None):
        """Check and import a package in a worker process (its code may run: the user confirmed); poll the returned
        run like a model run, finish() returns the model's summary."""
        from MIADeepLearningLib.gui.dependencies import requirePythonSlicer
        from MIADeepLearningLib.mrml.model_import import start_model_import

        return start_model_import(path, replace=replace, python_executable=requirePythonSlicer(), on_event=onEvent)

    def importModel(self, path: str, replace: bool = False) -> dict:
        """Blocking import for scripts and the Python console (the module uses startModelImport); the caller
        confirms that the package's code may run."""
        run = self.startModelImport(path, replace=replace)
        run.wait()
        return run.finish()

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
        extraVolumes: Sequence[vtkMRMLScalarVolumeNode] = (),
        modelOptions: dict | None = None,
    ) -> SegmentationRun:
        """Start a background run and return at once; poll the returned run, then call its finish().
        `extraVolumes`: the further input channels of a model that takes several images, in its order;
        `modelOptions`: run options of the model (an imported bundle's "overrides" and "weights")."""
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
            extra_volumes=list(extraVolumes),
            model_options=modelOptions,
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
        extraVolumes: Sequence[vtkMRMLScalarVolumeNode] = (),
        modelOptions: dict | None = None,
    ) -> SegmentationResult:
        """Blocking run for scripts (the GUI uses start() so Slicer stays responsive)."""
        run = self.start(inputVolume, modelId, device, outputSegmentation, createMaskedVolume, timeoutS, onEvent,
                         createUncertainty=createUncertainty, createVolumeTable=createVolumeTable,
                         extraVolumes=extraVolumes, modelOptions=modelOptions)
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
