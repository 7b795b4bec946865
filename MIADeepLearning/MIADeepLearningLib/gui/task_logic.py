"""The part of a module Logic that every task module shares: which Qt-free task logic runs a job.

Why: "Keep model loaded" routes runs through one worker process kept alive between runs (the model is loaded once
per session), otherwise each run starts a process of its own. Both task logics are created on first use, so loading
a module imports no MRML bridge code, and the kept-alive worker must be ended with the module (cleanup, exit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from MIADeepLearningLib.gui.dependencies import requirePythonSlicer

if TYPE_CHECKING:
    from MIADeepLearningLib.runner import WarmWorker


class TaskLogicMixin:
    """Mixed into a ScriptedLoadableModuleLogic; the module implements ``createTaskLogic``.

    Call ``TaskLogicMixin.__init__(self)`` from the Logic's ``__init__``.
    """

    def __init__(self) -> None:
        self._taskLogic: Any = None
        self._warmTaskLogic: Any = None
        self._warmWorker: WarmWorker | None = None
        self._remoteTaskLogic: Any = None
        self.remoteServer: Any = None  # a remote.RemoteServer while Device is "remote" (set by the widget)

    def createTaskLogic(self, pythonExecutable: str | None, warmWorker: WarmWorker | None) -> Any:
        """The module's Qt-free task logic (e.g. SegmentationLogic), imported inside, on first use."""
        raise NotImplementedError

    def taskLogic(self, keepModelLoaded: bool = False) -> Any:
        """Created on first use. With keepModelLoaded, runs go through one worker process kept alive between runs
        (model loaded once per session); without, each run starts a worker process of its own. With `remoteServer`
        set, runs go to that inference server (no local worker, no PyTorch needed here)."""
        if self.remoteServer is not None:
            if self._remoteTaskLogic is None or self._remoteTaskLogic.remote_server is not self.remoteServer:
                self._remoteTaskLogic = self.createTaskLogic(None, None)
                self._remoteTaskLogic.remote_server = self.remoteServer
            return self._remoteTaskLogic
        if not keepModelLoaded:
            if self._taskLogic is None:
                self._taskLogic = self.createTaskLogic(requirePythonSlicer(), None)
            return self._taskLogic
        if self._warmTaskLogic is None:
            from MIADeepLearningLib.runner import WarmWorker

            python = requirePythonSlicer()
            self._warmWorker = WarmWorker(python_executable=python)
            self._warmTaskLogic = self.createTaskLogic(python, self._warmWorker)
        return self._warmTaskLogic

    def startDeviceReport(self, onEvent=None) -> Any:
        """Start the device report (PyTorch build, GPUs, free memory, why CUDA is or is not used) in a worker process
        of its own and return at once; poll it like a run, then finish() returns the report dict."""
        from MIADeepLearningLib.mrml.device_report import start_device_report

        return start_device_report(requirePythonSlicer(), on_event=onEvent)

    def deviceReport(self) -> dict:
        """The device report, blocking (for scripts and the Python console; the module uses startDeviceReport)."""
        run = self.startDeviceReport()
        run.wait()
        return run.finish()

    def shutdownWarmWorker(self) -> None:
        """End the kept-alive worker process (module cleanup, application exit)."""
        if self._warmWorker is not None:
            self._warmWorker.shutdown()
        self._warmWorker = None
        self._warmTaskLogic = None
