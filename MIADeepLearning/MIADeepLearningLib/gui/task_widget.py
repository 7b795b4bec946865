"""The widget behaviour every task module shares: one background run at a time, started by Apply.

Why shared: Apply -> Cancel toggling, polling the worker from a QTimer on the main thread, progress bar, log, and
the finish / cancel / error reporting must behave the same in every module, and copies drift. A module's widget
mixes in ``TaskWidgetMixin`` and keeps what is its own: its .ui, its parameter node class, how a run is started
(``_startRun``) and how a result is shown (``_showResult``).

The .ui of a module using the mixin needs the widgets named below (Testing/Python/test_static.py checks them):
applyButton, modelComboBox, modelDescriptionLabel, inputsCollapsibleButton, outputsCollapsibleButton, progressBar,
statusLabel, logTextEdit.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import TYPE_CHECKING, Any

import qt
import slicer
import vtk
from slicer.i18n import tr as _

from MIADeepLearningLib.engine.errors import CancelledError, MIADLError, MissingPackages
from MIADeepLearningLib.gui import remote_settings
from MIADeepLearningLib.gui.dependencies import (
    DependenciesNotInstalled,
    ensureDependencies,
    ensurePackages,
    installationInProgress,
)

if TYPE_CHECKING:
    from MIADeepLearningLib.jobs import Event
    from MIADeepLearningLib.mrml.task_run import TaskRun

# For a parameter node field `device: Annotated[str, Choice(DEVICE_CHOICES)]`. A module imports this name into its
# own namespace: parameterNodeWrapper resolves the string annotations (typing.get_type_hints) in the module's globals.
DEVICE_CHOICES = ["auto", "cpu", "cuda", "remote"]  # remote: the inference server of Advanced → Remote server
POLL_INTERVAL_MS = 100
# What the one background job of a module is: a model run (Apply), the device report or a model import (Advanced).
JOB_RUN = "run"
REMOTE_DEVICE = "remote"
JOB_DEVICE_REPORT = "device report"
JOB_MODEL_IMPORT = "model import"
# Buttons of a module's .ui (when it has them) that start something: disabled while any job or install is going on.
ACTION_BUTTONS = ("deviceReportButton", "importModelZipButton", "importModelFolderButton", "removeModelButton")
# Library modules a Developer Reload keeps: the exception classes every module's widget catches. Reloading them
# would give the modules that are not reloaded (and still catch the old classes) errors they cannot recognise, e.g.
# a Cancel reported as a failure. Edit them, then restart Slicer.
KEPT_ON_RELOAD = ("MIADeepLearningLib", "MIADeepLearningLib.engine", "MIADeepLearningLib.engine.errors")


def describeModel(model: Any) -> str:
    """One paragraph for the model under the combo box: what it is for, licence, and what to cite."""
    parts = [model.description]
    if model.license:
        parts.append(_("Licence: {license}.").format(license=model.license))
    if model.citation:
        parts.append(_("Cite: {citation}").format(citation=model.citation))
    return " ".join(part for part in parts if part)


class TaskWidgetMixin:
    """Mixed into a ScriptedLoadableModuleWidget that also derives from VTKObservationMixin, listed first so that
    its cleanup/enter/exit/onReload are the ones used.

    The module calls ``TaskWidgetMixin.__init__(self)`` in its ``__init__`` and ``self._setupTaskWidget(...)`` in its
    ``setup()``, and implements ``_startRun``, ``_showResult``, ``_moduleTitle`` and ``_failureMessage``; the
    parameter node must have modelId, device and keepModelLoaded, and inputVolume unless the module overrides
    ``_primaryInput``, ``_missingInput`` and ``_selectDefaultInputs`` (registration: a fixed and a moving volume).
    ``_inputProblem`` may refuse Apply for a module's own reasons. The Logic must have ``availableModels()``,
    ``getParameterNode()`` and ``shutdownWarmWorker()``.
    """

    def __init__(self) -> None:
        self.logic: Any = None
        self._parameterNode: Any = None
        self._parameterNodeGuiTag = None
        self._run: TaskRun | None = None
        self._runKind: str | None = None  # JOB_RUN or JOB_DEVICE_REPORT while self._run is set
        self._runInput = None
        self._cancelRequested = False
        self._installing = False  # Apply is installing packages (pip runs processEvents: clicks arrive meanwhile)
        self._pollTimer = None
        self._updatingModelCombo = False
        self._modelDescriptions: dict[str, str] = {}
        self._modelOptionalOutputs: dict[str, list[str]] = {}

    # Hooks the module implements

    def _moduleTitle(self) -> str:
        """Title of the module's message boxes (translated in the module file)."""
        raise NotImplementedError

    def _failureMessage(self, error: Exception) -> str:
        """The one sentence shown when a run fails with an error that is not a MIADLError."""
        raise NotImplementedError

    def _startRun(self, params: Any) -> TaskRun:
        """Start the module's run from the parameter node (e.g. ``self.logic.start(...)``); return at once."""
        raise NotImplementedError

    def _showResult(self, result: Any, inputVolume: Any) -> None:
        """Report a successful run (status, log) and show its outputs."""
        raise NotImplementedError

    def _inputProblem(self, params: Any) -> str | None:
        """Why Apply is refused for a module's own reason (the tooltip), checked after the input volume; None: fine."""
        return None

    def _primaryInput(self, params: Any) -> Any:
        """The volume a run is for (handed to _showResult): the input volume, or a registration's fixed volume."""
        return params.inputVolume

    def _missingInput(self, params: Any) -> str | None:
        """What the user must still select before Apply (the tooltip); None when the inputs are there."""
        return None if params.inputVolume else _("Select an input volume.")

    def _selectDefaultInputs(self, params: Any) -> None:
        """Fill empty inputs when the module is entered: the first scalar volume of the scene (not a label map)."""
        if not params.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                params.inputVolume = firstVolumeNode

    # Setup and life cycle

    def _setupTaskWidget(self, uiPath: str, logic: Any) -> None:
        """The shared part of setup(): load the .ui, create the poll timer, list the models, connect Apply and the
        scene observers. Installs nothing, downloads nothing and never imports torch (generic tests call setup)."""
        uiWidget = slicer.util.loadUI(self.resourcePath(uiPath))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = logic

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPollTimer)

        self._populateModelComboBox()
        # modelId is bound by hand, not with SlicerParameterName: the combo shows titles and keeps ids as item data.
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._onModelComboBoxChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self._setupRemoteServer()
        if hasattr(self.ui, "deviceReportButton"):
            self.ui.deviceReportButton.connect("clicked(bool)", self.onDeviceReportButton)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

    def _setupRemoteServer(self) -> None:
        """The "remote" device choice and the Remote server fields (kept in Slicer's settings, not the scene)."""
        combo = getattr(self.ui, "deviceComboBox", None)
        if combo is not None and combo.findText(REMOTE_DEVICE) < 0:
            combo.addItem(REMOTE_DEVICE)
        if not hasattr(self.ui, "remoteUrlLineEdit"):
            return
        remote_settings.loadInto(self.ui)
        for name, _key in remote_settings.FIELDS:
            getattr(self.ui, name).connect("editingFinished()", self._onRemoteSettingsEdited)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)

    def _onRemoteSettingsEdited(self) -> None:
        remote_settings.saveFrom(self.ui)
        self._updateButtons()

    def onTestConnection(self) -> None:
        """Ask the configured server for its version and device (a few seconds at most); say what came back."""
        remote_settings.saveFrom(self.ui)
        try:
            with slicer.util.WaitCursor():
                message = remote_settings.testConnection()
        except Exception as error:  # RemoteError: one sentence; anything else: say it plainly
            message = str(error) if isinstance(error, MIADLError) else _(
                "The connection test failed: {error}").format(error=error)
            self._setStatus(message)
            self._log(message)
            slicer.util.warningDisplay(message, windowTitle=_("Remote server"))
            return
        self._setStatus(message)
        self._log(message)
        slicer.util.infoDisplay(message, windowTitle=_("Remote server"))

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
        """Developer reload: also drop the cached library modules (this one included) so their edits are picked up,
        except KEPT_ON_RELOAD, so the other task modules, which keep the library code they were loaded with, still
        recognise the errors raised by code imported after the reload."""
        for name in list(sys.modules):
            if (name == "MIADeepLearningLib" or name.startswith("MIADeepLearningLib.")) and name not in KEPT_ON_RELOAD:
                del sys.modules[name]
        super().onReload()

    # Parameter node

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self._selectDefaultInputs(self._parameterNode)

    def setParameterNode(self, inputParameterNode: Any) -> None:
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
        """List the module's models from the registry (reads JSON only; no torch, no network)."""
        combo = self.ui.modelComboBox
        self._updatingModelCombo = True
        try:
            combo.clear()
            self._modelDescriptions.clear()
            self._modelOptionalOutputs.clear()
            try:
                models = self.logic.availableModels()
            except Exception as error:  # a broken registry must not leave an empty module panel
                logging.exception("MIADeepLearning: the model registry could not be read")
                self._setStatus(_("The model list could not be read: {error}").format(error=error))
                models = []
            for model in models:
                combo.addItem(model.title, model.id)
                combo.setItemData(combo.count - 1, model.description, qt.Qt.ToolTipRole)
                self._modelDescriptions[model.id] = describeModel(model)
                self._modelOptionalOutputs[model.id] = list(getattr(model, "optional_outputs", []))
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

    def _modelOffers(self, output: str) -> bool:
        """Whether the selected model lists `output` (e.g. "uncertainty") in its package's slicer.optional_outputs:
        a module shows the option for it only then."""
        modelId = self._parameterNode.modelId if self._parameterNode else ""
        return output in self._modelOptionalOutputs.get(modelId, [])

    # Buttons and status

    def _updateButtons(self) -> None:
        """One job or install at a time: while one runs, only its own Cancel stays clickable."""
        running = self._run is not None
        installing = self._installing or installationInProgress()
        busy = running or installing
        self.ui.inputsCollapsibleButton.enabled = not busy
        self.ui.outputsCollapsibleButton.enabled = not busy
        for name in ACTION_BUTTONS:
            if hasattr(self.ui, name):
                getattr(self.ui, name).enabled = not busy
        if hasattr(self.ui, "deviceReportButton"):
            reporting = running and self._runKind == JOB_DEVICE_REPORT
            self.ui.deviceReportButton.text = _("Cancel device report") if reporting else _("Device report")
            if reporting:
                self.ui.deviceReportButton.enabled = not self._cancelRequested
        if running and self._runKind == JOB_RUN:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running model; nothing is added to the scene.")
            self.ui.applyButton.enabled = not self._cancelRequested
            return
        self.ui.applyButton.text = _("Apply")
        if running and self._runKind == JOB_MODEL_IMPORT:
            refusal = _("A model is being checked and imported; wait for it.")
        elif running:
            refusal = _("The device report is being made; wait for it or cancel it.")
        elif installing:
            refusal = _("Python packages are being installed; wait until the installation has finished.")
        else:
            refusal = self._applyRefusal()
        self.ui.applyButton.toolTip = refusal or _("Run the model in a background process.")
        self.ui.applyButton.enabled = not refusal

    def _applyRefusal(self) -> str | None:
        """Why Apply cannot start with the current parameters (the tooltip); None when it can."""
        params = self._parameterNode
        if not params:
            return _("Select an input volume.")
        refusal = self._missingInput(params) or self._inputProblem(params)
        if not refusal and getattr(params, "device", "") == REMOTE_DEVICE:
            refusal = remote_settings.missingSetting()
        if not refusal and self.ui.modelComboBox.currentIndex < 0:
            refusal = _("Select a model.")
        return refusal

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def _log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    # Apply / Cancel

    def onApplyButton(self) -> None:
        """Start the run (after making sure its dependencies are installed), or cancel the running one."""
        if self._run is not None:
            if self._runKind == JOB_RUN:
                self._cancelRun()
            return  # a device report is running: its own button cancels it
        if self._installing:
            return  # a click delivered while pip's output lines process GUI events
        params = self._parameterNode
        if not params or self._missingInput(params):
            return
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        if params.device == REMOTE_DEVICE:
            self._startRemoteRun(params)
            return
        self.logic.remoteServer = None
        self._setStatus(_("Checking the Python packages the model needs..."))
        self._installing = True
        self._updateButtons()
        slicer.app.processEvents()
        try:
            ensureDependencies(params.modelId, self.resourcePath("requirements.txt"))
        except DependenciesNotInstalled as error:
            self._setStatus(str(error))
            self._log(str(error))
            slicer.util.warningDisplay(str(error), windowTitle=self._moduleTitle())
            return
        except Exception as error:
            message = None if isinstance(error, MIADLError) else _(
                "Installing the Python packages the model needs failed: {error}").format(error=error)
            self._reportError(error, traceback.format_exc(), [], message)
            return
        finally:
            self._installing = False
            self._updateButtons()
        self._setStatus(_("Starting..."))
        try:
            run = self._startRun(params)
        except Exception as error:
            self._reportError(error, traceback.format_exc(), [])
            return
        self._log(_("Started model '{modelId}' on device '{device}'.").format(
            modelId=params.modelId, device=params.device))
        self._startPolling(run, JOB_RUN, self._primaryInput(params))

    def _startRemoteRun(self, params: Any) -> None:
        """Device "remote": the model runs on the inference server, so nothing is installed here."""
        try:
            self.logic.remoteServer = remote_settings.server()
            self._setStatus(_("Sending the job to {server}...").format(server=self.logic.remoteServer.url))
            run = self._startRun(params)
        except Exception as error:
            self._reportError(error, traceback.format_exc(), [])
            return
        self._log(_("Started model '{modelId}' on the remote server {server}.").format(
            modelId=params.modelId, server=self.logic.remoteServer.url))
        self._startPolling(run, JOB_RUN, self._primaryInput(params))

    def onDeviceReportButton(self) -> None:
        """Make the device report in the background (torch is imported by a worker process, never by Slicer), or
        cancel the report that is being made."""
        if self._run is not None:
            if self._runKind == JOB_DEVICE_REPORT:
                self._cancelRun()
            return
        if self._installing or installationInProgress():
            return
        self.ui.progressBar.value = 0
        self._setStatus(_("Making the device report (the first PyTorch import can take a minute)..."))
        try:
            run = self.logic.startDeviceReport()
        except Exception as error:
            message = _("The device report could not be made: {error}").format(error=error)
            self._reportError(error, traceback.format_exc(), [], message)
            return
        self._log(_("Device report started."))
        self._startPolling(run, JOB_DEVICE_REPORT, None)

    def _startPolling(self, run: Any, kind: str, runInput: Any) -> None:
        self._run = run
        self._runKind = kind
        self._runInput = runInput
        self._cancelRequested = False
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

    def _finishRun(self, run: TaskRun) -> None:
        inputVolume = self._runInput
        cancelRequested = self._cancelRequested
        kind = self._runKind
        self._run = None
        self._runKind = None
        self._runInput = None
        self._cancelRequested = False
        try:
            result = run.finish()
        except CancelledError:
            self._reportCancelled(kind, "")
        except Exception as error:
            if cancelRequested:
                self._reportCancelled(kind, f" ({error})")
            elif kind == JOB_MODEL_IMPORT and isinstance(error, MissingPackages) and self._offerPackagesAndRetry(error):
                return
            elif kind == JOB_RUN and isinstance(error, MissingPackages) and error.requirements:
                self._offerPackagesForNextRun(error)
            else:
                message = None
                if kind == JOB_DEVICE_REPORT:
                    message = _("The device report could not be made: {error}").format(error=error)
                elif kind == JOB_MODEL_IMPORT:
                    message = _("The model could not be imported: {error}").format(error=error)
                self._reportError(error, traceback.format_exc(), list(getattr(run, "log_lines", [])), message)
        else:
            if kind == JOB_DEVICE_REPORT:
                self._showDeviceReport(result)
            elif kind == JOB_MODEL_IMPORT:
                self._showImportedModel(result)
            else:
                self._showResult(result, inputVolume)
        self._updateButtons()

    def _reportCancelled(self, kind: str | None, detail: str) -> None:
        if kind == JOB_DEVICE_REPORT:
            self._setStatus(_("Device report cancelled."))
        elif kind == JOB_MODEL_IMPORT:
            self._setStatus(_("Model import cancelled; nothing was imported."))
        else:
            self._setStatus(_("Cancelled; nothing was added to the scene."))
        self._log(_("Cancelled") + detail)

    def _showDeviceReport(self, report: dict) -> None:
        """The report's lines in the log, its verdict in the status, everything in a dialog's details."""
        self.ui.progressBar.value = 100
        lines = [f"{key}: {value}" for key, value in report.items()]
        self._log(_("Device report:"))
        for line in lines:
            self._log(f"  {line}")
        summary = str(report.get("auto_choice", ""))
        if report.get("torch_problem"):
            summary = f"{summary} {report['torch_problem']}".strip()
        self._setStatus(summary)
        slicer.util.infoDisplay(summary, windowTitle=_("Device report"), detailedText="\n".join(lines))

    def _offerPackagesForNextRun(self, error: MissingPackages) -> None:
        """A run stopped because the model needs Python packages Slicer lacks (a bundle's optional packages): say
        so, offer to install them (asking first), and leave the next Apply to the user."""
        self._setStatus(str(error))
        self._log(str(error))
        self._installing = True
        self._updateButtons()
        try:
            ensurePackages(list(error.requirements), _("This model"))
        except DependenciesNotInstalled as declined:
            self._log(str(declined))
            return
        finally:
            self._installing = False
            self._updateButtons()
        message = _("Installed {packages}; press Apply again.").format(packages=", ".join(error.requirements))
        self._setStatus(message)
        self._log(message)

    def _offerPackagesAndRetry(self, error: Exception) -> bool:
        """A module that imports models may install the packages a failed import named and try again (True)."""
        return False

    def _showImportedModel(self, summary: dict) -> None:
        """A model import finished: list it, select it when it belongs to this module, say so."""
        self.ui.progressBar.value = 100
        self._populateModelComboBox()
        modelId = summary.get("id", "")
        if self._parameterNode and modelId and self.ui.modelComboBox.findData(modelId) >= 0:
            self._parameterNode.modelId = modelId
        self._onParameterNodeModified()
        message = _("Imported model '{title}' (version {version}).").format(
            title=summary.get("title", modelId), version=summary.get("version", ""))
        self._setStatus(message)
        self._log(message)

    def _reportError(self, error: Exception, details: str, logLines: list[str], message: str | None = None) -> None:
        """One sentence in the dialog; the traceback and the worker's own output in the log."""
        if message is None:
            message = str(error) if isinstance(error, MIADLError) else self._failureMessage(error)
        self._setStatus(message)
        self._log(message)
        self._log(details.rstrip())
        if logLines:
            self._log(_("--- worker output ---"))
            for line in logLines:
                self._log(line)
            details = details.rstrip() + "\n\n" + "\n".join(logLines[-40:])
        slicer.util.errorDisplay(message, windowTitle=self._moduleTitle(), detailedText=details)

    def _abandonRun(self) -> None:
        """Cancel a running job and reap its process and job folder (scene close, module unload, poll failure)."""
        run = self._run
        self._run = None
        self._runKind = None
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
