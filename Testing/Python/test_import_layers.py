"""One-way imports between the layers (Docs/Developers.md), checked on the source with ast.

Every import counts, including those inside functions and ``importlib.import_module("...")`` with a literal name:
a lazy ``import torch`` in a Slicer module file breaks the "Slicer without torch" promise just as surely as a
top-level one. The checker is a pure function of (source, path), so the tests below also prove it catches
violations in synthetic sources. The shared Slicer GUI code (gui/) is its own layer: only the module files import
it, and importing it does nothing but import and define (import_time_work).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIR = ROOT / "MIADeepLearning"
LIB = "MIADeepLearningLib"
LIB_DIR = SOURCE_DIR / LIB

STDLIB = set(sys.stdlib_module_names) | {"__future__"}


@dataclass(frozen=True)
class Layer:
    """What one layer may import. Names are dotted prefixes: "torch" covers "torch.nn"."""

    name: str
    forbidden: tuple[str, ...] = ()
    # Library modules this layer may import (prefixes); None = any part of the library not forbidden.
    allowed_lib: tuple[str, ...] | None = None
    stdlib_only: bool = False
    # When set: the only packages outside the standard library this layer may import (prefixes), e.g. ("numpy",).
    third_party: tuple[str, ...] | None = None
    # Forbidden only when executed on import (module level, outside functions and `if TYPE_CHECKING:`).
    forbidden_at_import: tuple[str, ...] = ()
    allowed_lib_at_import: tuple[str, ...] | None = None


def _lib(*names: str) -> tuple[str, ...]:
    return tuple(f"{LIB}.{name}" for name in names)


# The task module files (DLSegmentation, DLSynthesis, ...): neither a module file nor gui/ may import one. Slicer
# would have to load that module first, and what two modules share belongs in MIADeepLearningLib/gui/.
MODULE_FILES = tuple(sorted(path.stem for path in SOURCE_DIR.glob("*.py")))
_SLICER_SIDE_LIB = (
    "mrml", "runner", "jobs", "paths", "versions", "engine.errors", "engine.registry", "engine.downloads",
    "engine.model_store", "engine.candidates", "engine.zoo", "testing", "remote",
)

MODULE = Layer(
    name="Slicer module file (MIADeepLearning/*.py)",
    forbidden=("torch", "monai", "SimpleITK", "sitkUtils", *MODULE_FILES),
    allowed_lib=_lib("gui", *_SLICER_SIDE_LIB),
)
# The Qt code the modules share. On import it pulls only the light parts of the library (the MRML bridge is imported
# inside the functions that use it), so loading a module still imports no MRML bridge code.
GUI = Layer(
    name="shared Slicer GUI code (gui/)",
    forbidden=("torch", "monai", "SimpleITK", "sitkUtils", *MODULE_FILES),
    allowed_lib=_lib("gui", *_SLICER_SIDE_LIB),
    allowed_lib_at_import=_lib("gui", "engine.errors", "jobs", "paths", "runner", "versions"),
)
MRML = Layer(
    name="MRML bridge (mrml/, testing/)",
    forbidden=("qt", "ctk", "torch", "monai", "SimpleITK", "sitkUtils", *_lib("gui")),
    allowed_lib=_lib(
        "mrml", "testing", "runner", "jobs", "paths", "versions", "engine.errors", "engine.registry",
        "engine.downloads", "engine.model_store", "engine.filecheck", "engine.candidates", "remote",
    ),
)
# The zoo-shaped test bundle builder (issue 18): the DLSegmentation self-test builds a bundle inside Slicer, so it is
# library code, but writing random weights needs torch and MONAI. It runs as its own process in the worker's Python
# (python -m MIADeepLearningLib.testing.zoo_shaped); importing it (the scenario reads its phantom) pulls numpy only.
TESTING_BUNDLES = Layer(
    name="zoo-shaped test bundle builder (testing/zoo_shaped.py)",
    forbidden=("slicer", "vtk", "vtkmodules", "qt", "ctk", "mrml", "sitkUtils", *MODULE_FILES),
    allowed_lib=(),
    forbidden_at_import=("torch", "monai", "SimpleITK", "yaml", "itk"),
)
STDLIB_ONLY = Layer(
    name="stdlib-only layer (runner.py, jobs.py, paths.py, versions.py, __init__.py)",
    forbidden=_lib("gui"),
    allowed_lib=_lib("jobs", "paths", "versions"),
    stdlib_only=True,
)
# The inference server's client (issue 19): runs in Slicer's Python, which has no new package and no torch, so the
# standard library only (http.client, ssl, json) and the stdlib-only parts of the library plus engine.errors.
REMOTE_CLIENT = Layer(
    name="inference server client (remote.py)",
    forbidden=_lib("gui"),
    allowed_lib=_lib("jobs", "paths", "versions", "runner", "engine.errors"),
    stdlib_only=True,
)
_ENGINE_FORBIDDEN = (
    "slicer", "vtk", "vtkmodules", "qt", "ctk", "mrml", "sitkUtils", *_lib("mrml", "testing", "gui")
)
ENGINE = Layer(name="engine side (worker.py, cli.py, __main__.py, training/)", forbidden=_ENGINE_FORBIDDEN)
# The cohort runner (cli.py imports it): Ray and tqdm only when a cohort uses them (neither exists inside Slicer),
# torch and SimpleITK only inside the worker that runs a case.
COHORT = Layer(name="cohort runner (cohort.py)", forbidden=_ENGINE_FORBIDDEN,
               forbidden_at_import=("ray", "tqdm", "torch", "SimpleITK", "numpy"))
# engine/ runs models; training/ builds on it (shared flows, networks, encodings), never the other way round, so the
# engine ships and runs without the training code's dependencies.
ENGINE_CORE = Layer(name="engine (engine/)", forbidden=(*_ENGINE_FORBIDDEN, *_lib("training")))
# Imported by the Slicer side, which has no torch: importing them must not pull torch (engine/__init__ runs first).
ENGINE_TORCH_FREE = Layer(
    name="torch-free engine part (engine/__init__.py, errors.py, registry.py, downloads.py, model_store.py, zoo.py)",
    forbidden=(*_ENGINE_FORBIDDEN, *_lib("training")),
    forbidden_at_import=("torch", "monai", "SimpleITK", "numpy", "itk"),
    allowed_lib_at_import=_lib(
        "engine.errors", "engine.registry", "engine.downloads", "engine.model_store", "engine.zoo", "paths", "jobs"
    ),
)

# Verifies image files for the engine and for the MRML bridge (the file a volume was loaded from): the standard
# library only, not even numpy inside a function, so it runs wherever Python does.
ENGINE_STDLIB = Layer(
    name="stdlib-only engine part (engine/filecheck.py)",
    forbidden=(*_ENGINE_FORBIDDEN, *_lib("training")),
    allowed_lib=_lib("engine.errors"),
    stdlib_only=True,
)

# Lesion candidates from an anomaly map: the engine runs it after the network, and the Slicer side (the lesion
# detection logic's sensitivity slider) re-derives candidates with it without a worker, so it must import with
# numpy alone (no torch, no SimpleITK) and nothing else of the library.
ENGINE_CANDIDATES = Layer(
    name="numpy-only engine part (engine/candidates.py)",
    forbidden=(*_ENGINE_FORBIDDEN, *_lib("training")),
    allowed_lib=(),
    third_party=("numpy",),
)


def layer_of(relpath: str) -> Layer | None:
    """The layer of a file, by its path relative to MIADeepLearning/ (posix separators)."""
    parts = relpath.split("/")
    if len(parts) == 1:
        return MODULE
    if parts[0] != LIB:
        return None
    inner = parts[1:]
    if inner == ["testing", "zoo_shaped.py"]:
        return TESTING_BUNDLES
    if inner[0] in ("mrml", "testing") and len(inner) > 1:
        return MRML
    if inner[0] == "gui" and len(inner) > 1:
        return GUI
    if inner in (["runner.py"], ["jobs.py"], ["paths.py"], ["versions.py"], ["__init__.py"]):
        return STDLIB_ONLY
    if inner == ["remote.py"]:
        return REMOTE_CLIENT
    if inner[0] == "engine" and inner[1:] in (
        ["__init__.py"], ["errors.py"], ["registry.py"], ["downloads.py"], ["model_store.py"], ["zoo.py"]
    ):
        return ENGINE_TORCH_FREE
    if inner == ["engine", "filecheck.py"]:
        return ENGINE_STDLIB
    if inner == ["engine", "candidates.py"]:
        return ENGINE_CANDIDATES
    if inner[0] == "engine" and len(inner) > 1:
        return ENGINE_CORE
    if inner == ["cohort.py"]:
        return COHORT
    if inner in (["worker.py"], ["cli.py"], ["__main__.py"], ["server.py"]) or (
        inner[0] == "training" and len(inner) > 1
    ):
        return ENGINE
    return None


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _is_lib_module(dotted: str) -> bool:
    """Whether a dotted name is a module or package of the library on disk (vs. an attribute of one)."""
    path = SOURCE_DIR.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@dataclass(frozen=True)
class ImportRef:
    name: str  # the dotted module this statement makes Python import
    lineno: int
    at_import: bool  # executed when the file itself is imported


def _is_type_checking_guard(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve_from(node: ast.ImportFrom, relpath: str) -> str:
    if not node.level:
        return node.module or ""
    package = relpath.split("/")[:-1]
    if node.level > 1:
        package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *(node.module.split(".") if node.module else [])])


def collect_imports(source: str, relpath: str) -> list[ImportRef]:
    """Every import in the source: statements anywhere, and importlib.import_module/__import__ with a literal."""
    tree = ast.parse(source)
    refs: list[ImportRef] = []

    def visit(node: ast.AST, at_import: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            at_import = False
        if isinstance(node, ast.If) and _is_type_checking_guard(node):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, at_import)
            return
        if isinstance(node, ast.Import):
            refs.extend(ImportRef(alias.name, node.lineno, at_import) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve_from(node, relpath)
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                is_submodule = module.split(".")[0] == LIB and alias.name != "*" and _is_lib_module(candidate)
                refs.append(ImportRef(candidate if is_submodule else module, node.lineno, at_import))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                refs.append(ImportRef(node.args[0].value, node.lineno, at_import))
        for child in ast.iter_child_nodes(node):
            visit(child, at_import)

    visit(tree, True)
    return refs


def check_source(source: str, relpath: str) -> list[str]:
    """Violations of the layer rules in one file; each names the file, line, import and rule."""
    layer = layer_of(relpath)
    if layer is None:
        return [
            f"MIADeepLearning/{relpath}: not assigned to any layer; add it to layer_of() in "
            f"Testing/Python/test_import_layers.py and to the table in Docs/Developers.md"
        ]
    problems = []
    for ref in collect_imports(source, relpath):
        where = f"MIADeepLearning/{relpath}:{ref.lineno}: {layer.name} imports '{ref.name}'"
        top = ref.name.split(".")[0]
        if _matches(ref.name, layer.forbidden):
            problems.append(f"{where}, which it must never import")
        elif top == LIB:
            if ref.name != LIB and layer.allowed_lib is not None and not _matches(ref.name, layer.allowed_lib):
                allowed = ", ".join(layer.allowed_lib)
                problems.append(f"{where}; from the library it may import only {allowed}")
            elif (
                ref.at_import
                and layer.allowed_lib_at_import is not None
                and ref.name != LIB
                and not _matches(ref.name, layer.allowed_lib_at_import)
            ):
                allowed = ", ".join(layer.allowed_lib_at_import)
                problems.append(
                    f"{where} at import time; only {allowed} may be imported there (import it inside the function)"
                )
        elif layer.stdlib_only and top not in STDLIB:
            problems.append(f"{where}, which is not in the standard library (stdlib only)")
        elif layer.third_party is not None and top not in STDLIB and not _matches(ref.name, layer.third_party):
            allowed = ", ".join(layer.third_party)
            problems.append(f"{where}; besides the standard library it may import only {allowed}")
        elif ref.at_import and _matches(ref.name, layer.forbidden_at_import):
            problems.append(f"{where} at import time, which the torch-free Slicer side would then need")
    return problems


def _source_files() -> list[Path]:
    return sorted(path for path in SOURCE_DIR.rglob("*.py") if "__pycache__" not in path.parts)


# The real tree


def test_there_are_files_to_check() -> None:
    relpaths = {path.relative_to(SOURCE_DIR).as_posix() for path in _source_files()}
    assert f"{LIB}/jobs.py" in relpaths and "DLSegmentation.py" in relpaths


@pytest.mark.parametrize("path", _source_files(), ids=lambda path: path.relative_to(SOURCE_DIR).as_posix())
def test_layer_rules(path: Path) -> None:
    relpath = path.relative_to(SOURCE_DIR).as_posix()
    problems = check_source(path.read_text(encoding="utf-8"), relpath)
    assert not problems, "\n".join(problems)


# The checker catches what it must (synthetic sources)

VIOLATIONS = [
    ("DLSegmentation.py", "import torch\n", "torch"),
    ("DLSegmentation.py", "def f():\n    import monai.networks\n", "monai.networks"),
    ("DLSegmentation.py", "from SimpleITK import ReadImage\n", "SimpleITK"),
    ("DLSegmentation.py", "import importlib\nimportlib.import_module('torch')\n", "torch"),
    ("DLSegmentation.py", "from MIADeepLearningLib.engine import tasks\n", f"{LIB}.engine.tasks"),
    ("DLSegmentation.py", "from MIADeepLearningLib import engine\n", f"{LIB}.engine"),
    ("DLSegmentation.py", "from MIADeepLearningLib.worker import main\n", f"{LIB}.worker"),
    (f"{LIB}/mrml/volumes.py", "import qt\n", "qt"),
    (f"{LIB}/mrml/volumes.py", "def f():\n    import ctk\n", "ctk"),
    (f"{LIB}/mrml/volumes.py", "from ..engine import imageio\n", f"{LIB}.engine.imageio"),
    (f"{LIB}/testing/scenarios.py", "import torch\n", "torch"),
    (f"{LIB}/runner.py", "import numpy\n", "numpy"),
    (f"{LIB}/jobs.py", "def f():\n    import slicer\n", "slicer"),
    (f"{LIB}/paths.py", "from MIADeepLearningLib import runner\n", f"{LIB}.runner"),
    (f"{LIB}/__init__.py", "from MIADeepLearningLib.engine import registry\n", f"{LIB}.engine.registry"),
    (f"{LIB}/worker.py", "import slicer\n", "slicer"),
    (f"{LIB}/cli.py", "def f():\n    import vtk\n", "vtk"),
    (f"{LIB}/engine/tasks.py", "from MIADeepLearningLib.mrml import volumes\n", f"{LIB}.mrml.volumes"),
    (f"{LIB}/engine/tasks.py", "from . import errors\nfrom ..mrml.volumes import x\n", f"{LIB}.mrml.volumes"),
    (f"{LIB}/engine/registry.py", "import torch\n", "torch"),
    (f"{LIB}/engine/downloads.py", "import numpy\n", "numpy"),
    (f"{LIB}/engine/model_store.py", "from MIADeepLearningLib.engine import tasks\n", f"{LIB}.engine.tasks"),
    (f"{LIB}/engine/__init__.py", "from .tasks import segment_image\n", f"{LIB}.engine.tasks"),
    (f"{LIB}/engine/errors.py", "try:\n    import numpy\nexcept ImportError:\n    pass\n", "numpy"),
    # module files share code through gui/, never by importing each other
    ("DLSynthesis.py", "from DLSegmentation import ensureDependencies\n", "DLSegmentation"),
    ("DLSegmentation.py", "def f():\n    import DLSynthesis\n", "DLSynthesis"),
    # gui/: Slicer side, so never torch; light on import; no module files
    (f"{LIB}/gui/task_widget.py", "import torch\n", "torch"),
    (f"{LIB}/gui/dependencies.py", "def f():\n    import SimpleITK\n", "SimpleITK"),
    (f"{LIB}/gui/task_widget.py", "def f():\n    from MIADeepLearningLib.engine import tasks\n", f"{LIB}.engine.tasks"),
    (f"{LIB}/gui/task_logic.py", "from ..worker import main\n", f"{LIB}.worker"),
    (f"{LIB}/gui/task_logic.py", "from MIADeepLearningLib.mrml import segmentation_logic\n",
     f"{LIB}.mrml.segmentation_logic"),
    (f"{LIB}/gui/task_widget.py", "from DLSegmentation import DEVICE_CHOICES\n", "DLSegmentation"),
    # nothing else in the library imports gui/
    (f"{LIB}/mrml/volumes.py", "from MIADeepLearningLib.gui import task_widget\n", f"{LIB}.gui.task_widget"),
    (f"{LIB}/testing/scenarios.py", "def f():\n    from ..gui.dependencies import pythonSlicerExecutable\n",
     f"{LIB}.gui.dependencies"),
    (f"{LIB}/runner.py", "from . import gui\n", f"{LIB}.gui"),
    (f"{LIB}/jobs.py", "def f():\n    import MIADeepLearningLib.gui.task_logic\n", f"{LIB}.gui.task_logic"),
    (f"{LIB}/worker.py", "from MIADeepLearningLib.gui.task_logic import TaskLogicMixin\n", f"{LIB}.gui.task_logic"),
    (f"{LIB}/cli.py", "def f():\n    from MIADeepLearningLib.gui import dependencies\n", f"{LIB}.gui.dependencies"),
    (f"{LIB}/engine/tasks.py", "from ..gui.task_widget import describeModel\n", f"{LIB}.gui.task_widget"),
    (f"{LIB}/engine/registry.py", "def f():\n    from MIADeepLearningLib import gui\n", f"{LIB}.gui"),
    (f"{LIB}/training/generator.py", "import MIADeepLearningLib.gui\n", f"{LIB}.gui"),
    (f"{LIB}/engine/registration.py", "from MIADeepLearningLib.training.spatial import warp\n",
     f"{LIB}.training.spatial"),
    (f"{LIB}/engine/flow.py", "def f():\n    from ..training import generator\n", f"{LIB}.training.generator"),
    # engine/filecheck.py: the standard library and engine.errors, nothing else, not even inside a function
    (f"{LIB}/engine/filecheck.py", "def f():\n    import numpy\n", "numpy"),
    (f"{LIB}/engine/filecheck.py", "import SimpleITK as sitk\n", "SimpleITK"),
    (f"{LIB}/engine/filecheck.py", "from MIADeepLearningLib.engine import imageio\n", f"{LIB}.engine.imageio"),
    (f"{LIB}/mrml/source_files.py", "from MIADeepLearningLib.engine import imageio\n", f"{LIB}.engine.imageio"),
    # classification: the Slicer side keeps its own class titles, since engine/classification.py imports torch
    (f"{LIB}/mrml/classification_logic.py", "from MIADeepLearningLib.engine.classification import CLASSES\n",
     f"{LIB}.engine.classification"),
    ("DLClassification.py", "def f():\n    from MIADeepLearningLib.engine import classification\n",
     f"{LIB}.engine.classification"),
    ("DLClassification.py", "from DLSegmentation import DEFAULT_MODEL_ID\n", "DLSegmentation"),
    (f"{LIB}/engine/classification.py", "from MIADeepLearningLib.training import sequence_render\n",
     f"{LIB}.training.sequence_render"),
    # engine/candidates.py: numpy and the standard library only (the Slicer side re-derives candidates with it)
    (f"{LIB}/engine/candidates.py", "import torch\n", "torch"),
    (f"{LIB}/engine/candidates.py", "def f():\n    import SimpleITK as sitk\n", "SimpleITK"),
    (f"{LIB}/engine/candidates.py", "from scipy import ndimage\n", "scipy"),
    (f"{LIB}/engine/candidates.py", "from MIADeepLearningLib.engine import imageio\n", f"{LIB}.engine.imageio"),
    (f"{LIB}/engine/candidates.py", "from . import errors\n", f"{LIB}.engine.errors"),
    (f"{LIB}/engine/candidates.py", "import slicer\n", "slicer"),
    # the Slicer side may use engine.candidates, never the engine's detection pipeline (SimpleITK, torch)
    (f"{LIB}/mrml/detection_logic.py", "from MIADeepLearningLib.engine.detection import kji_to_ras\n",
     f"{LIB}.engine.detection"),
    ("DLLesionDetection.py", "def f():\n    from MIADeepLearningLib.engine import detection\n",
     f"{LIB}.engine.detection"),
    (f"{LIB}/gui/task_widget.py", "from MIADeepLearningLib.engine import candidates\n", f"{LIB}.engine.candidates"),
]


@pytest.mark.parametrize(("relpath", "source", "culprit"), VIOLATIONS)
def test_checker_catches_violation(relpath: str, source: str, culprit: str) -> None:
    problems = check_source(source, relpath)
    assert len(problems) == 1, problems
    assert f"imports '{culprit}'" in problems[0] and relpath in problems[0]


ALLOWED = [
    ("DLSegmentation.py", "import qt, ctk, vtk, slicer\nfrom MIADeepLearningLib.engine import errors, registry\n"),
    ("DLSegmentation.py", "from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic\n"),
    ("DLSegmentation.py", "from MIADeepLearningLib import jobs, runner, paths\nimport MIADeepLearningLib\n"),
    ("DLSegmentation.py", "def t():\n    from MIADeepLearningLib.testing import scenarios\n"),
    (f"{LIB}/mrml/volumes.py", "import numpy as np\nimport slicer, vtk\nfrom . import scene_guard\n"),
    (f"{LIB}/mrml/source_files.py", "from MIADeepLearningLib.engine.filecheck import examine_image_file\n"),
    (f"{LIB}/engine/filecheck.py", "import os, zlib\nfrom MIADeepLearningLib.engine.errors import InputError\n"),
    (f"{LIB}/runner.py", "import os, subprocess, queue\nfrom MIADeepLearningLib import jobs\nfrom . import paths\n"),
    (f"{LIB}/engine/tasks.py", "import torch\nimport SimpleITK as sitk\nfrom . import imageio\n"),
    (f"{LIB}/training/spatial.py", "from MIADeepLearningLib.engine.flow import warp\n"),
    (f"{LIB}/engine/registry.py", "def f():\n    import torch\n"),
    (f"{LIB}/engine/registry.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import numpy\n"),
    (f"{LIB}/engine/registry.py", "from MIADeepLearningLib.engine.errors import ModelError\nfrom ..paths import x\n"),
    ("DLSynthesis.py", "from MIADeepLearningLib.gui.task_widget import DEVICE_CHOICES, TaskWidgetMixin\n"),
    (f"{LIB}/gui/task_widget.py", "import qt, ctk, vtk, slicer\nfrom slicer.i18n import tr as _\n"
     "from MIADeepLearningLib.engine.errors import MIADLError\nfrom MIADeepLearningLib.gui.dependencies import x\n"
     "from . import task_logic\nfrom .. import runner, jobs, paths\n"),
    (f"{LIB}/gui/task_logic.py", "def f():\n    from MIADeepLearningLib.mrml.segmentation_logic import Logic\n"
     "    from MIADeepLearningLib.engine import registry, model_store\n    import PyTorchUtils\n"),
    (f"{LIB}/gui/task_widget.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from MIADeepLearningLib.mrml.task_run import TaskRun\n"),
    (f"{LIB}/engine/candidates.py", "from __future__ import annotations\nfrom collections.abc import Sequence\n"
     "import numpy as np\n"),
    (f"{LIB}/mrml/detection_logic.py", "from MIADeepLearningLib.engine import candidates as lesion_candidates\n"),
    (f"{LIB}/testing/detection_scenarios.py", "from MIADeepLearningLib.engine.candidates import find_candidates\n"),
    ("DLLesionDetection.py", "def f():\n    from MIADeepLearningLib.engine.candidates import candidate_label\n"),
    (f"{LIB}/gui/task_widget.py", "def f():\n    from MIADeepLearningLib.engine import candidates\n"),
]


@pytest.mark.parametrize(("relpath", "source"), ALLOWED)
def test_checker_accepts_allowed_imports(relpath: str, source: str) -> None:
    assert check_source(source, relpath) == []


@pytest.mark.parametrize(("relpath", "layer"), [
    ("DLClassification.py", MODULE),
    (f"{LIB}/engine/classification.py", ENGINE_CORE),
    (f"{LIB}/mrml/classification_logic.py", MRML),
    (f"{LIB}/testing/classification_scenarios.py", MRML),
    (f"{LIB}/training/sequence_render.py", ENGINE),
    (f"{LIB}/training/train_classification.py", ENGINE),
])
def test_classification_files_have_their_layers(relpath: str, layer: Layer) -> None:
    assert (SOURCE_DIR / relpath).is_file(), relpath
    assert layer_of(relpath) is layer


@pytest.mark.parametrize(("relpath", "layer"), [
    ("DLLesionDetection.py", MODULE),
    (f"{LIB}/engine/candidates.py", ENGINE_CANDIDATES),
    (f"{LIB}/engine/detection.py", ENGINE_CORE),
    (f"{LIB}/mrml/detection_logic.py", MRML),
    (f"{LIB}/testing/detection_scenarios.py", MRML),
])
def test_detection_files_have_their_layers(relpath: str, layer: Layer) -> None:
    assert (SOURCE_DIR / relpath).is_file(), relpath
    assert layer_of(relpath) is layer


def test_inference_server_files_have_their_layers() -> None:
    """The server is engine side (FastAPI, uvicorn, SimpleITK); its client is stdlib only (Slicer's Python)."""
    assert layer_of(f"{LIB}/server.py") is ENGINE and layer_of(f"{LIB}/remote.py") is REMOTE_CLIENT
    assert "fastapi" in check_source("import fastapi\n", f"{LIB}/remote.py")[0]
    assert f"{LIB}.worker" in check_source("from MIADeepLearningLib import worker\n", f"{LIB}/remote.py")[0]
    assert "slicer" in check_source("def f():\n    import slicer\n", f"{LIB}/server.py")[0]
    assert check_source("from MIADeepLearningLib import remote\n", f"{LIB}/mrml/task_run.py") == []


def test_zoo_bundle_builder_has_its_layer() -> None:
    """Torch and MONAI inside its functions only; no Slicer, no other part of the library."""
    relpath = f"{LIB}/testing/zoo_shaped.py"
    assert (SOURCE_DIR / relpath).is_file() and layer_of(relpath) is TESTING_BUNDLES
    assert check_source("def f():\n    import torch\n    from monai.bundle import ConfigParser\n", relpath) == []
    assert "torch" in check_source("import torch\n", relpath)[0]
    assert "slicer" in check_source("def f():\n    import slicer\n", relpath)[0]
    assert f"{LIB}.mrml" in check_source("from MIADeepLearningLib.mrml import volumes\n", relpath)[0]
    assert layer_of(f"{LIB}/testing/scenarios.py") is MRML


def test_checker_refuses_files_outside_every_layer() -> None:
    problems = check_source("import os\n", f"{LIB}/helpers.py")
    assert len(problems) == 1 and "not assigned to any layer" in problems[0]


# gui/ does no work when it is imported (the module files import it while Slicer loads them)


def _literal(node: ast.AST | None) -> bool:
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def import_time_work(source: str) -> list[str]:
    """Statements that run code when the file is imported, beyond importing: anything at module or class level
    other than imports, ``def``/``class`` (without decorators, with literal defaults), docstrings, literal
    constants and ``if TYPE_CHECKING:``. gui/ must not touch slicer.app, the scene or Qt objects before setup()."""
    problems = []

    def check(body: list[ast.stmt], where: str) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) or _is_type_checking_guard(node):
                continue
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # docstring
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                decorators = [ast.unparse(decorator) for decorator in node.decorator_list]
                if any(name not in ("staticmethod", "classmethod", "property") for name in decorators):
                    problems.append(f"line {node.lineno}: decorator {decorators} of {node.name} runs on import")
                if isinstance(node, ast.ClassDef):
                    if node.keywords:
                        problems.append(f"line {node.lineno}: class keywords of {node.name} run on import")
                    check(node.body, f"class {node.name}")
                    continue
                defaults = [*node.args.defaults, *filter(None, node.args.kw_defaults)]
                if not all(_literal(default) for default in defaults):
                    problems.append(f"line {node.lineno}: a default of {node.name}() is computed on import")
                continue
            if isinstance(node, ast.Assign) and _literal(node.value):
                continue
            if isinstance(node, ast.AnnAssign) and (node.value is None or _literal(node.value)):
                continue
            problems.append(f"line {node.lineno}: {where} runs {type(node).__name__} on import")

    check(ast.parse(source).body, "module level")
    return problems


def _gui_files() -> list[Path]:
    return sorted((LIB_DIR / "gui").glob("*.py"))


def test_there_are_gui_files() -> None:
    assert {path.name for path in _gui_files()} >= {"__init__.py", "dependencies.py", "task_widget.py"}


@pytest.mark.parametrize("path", _gui_files(), ids=lambda path: path.name)
def test_gui_does_no_work_on_import(path: Path) -> None:
    problems = import_time_work(path.read_text(encoding="utf-8"))
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        "import slicer\nTIMER = slicer.app.processEvents()\n",
        "import qt\nclass A:\n    timer = qt.QTimer()\n",
        "import slicer\ndef f(scene=slicer.mrmlScene):\n    pass\n",
        "import functools\n@functools.lru_cache\ndef f():\n    pass\n",
        "import logging\nlogging.basicConfig()\n",
        "for x in range(3):\n    pass\n",
    ],
)
def test_import_time_checker_sees_work(source: str) -> None:
    assert len(import_time_work(source)) == 1


def test_import_time_checker_accepts_definitions() -> None:
    source = (
        '"""Doc."""\nfrom __future__ import annotations\nimport qt\nfrom typing import TYPE_CHECKING\n'
        "if TYPE_CHECKING:\n    import slicer\nCHOICES = ['a', 'b']\nLIMIT: int = 3\nVERSION = (2, 1)\n"
        "class A(qt.QObject):\n    'Doc.'\n    x: int\n    def f(self, y: slicer.X = None, z=-1) -> None:\n"
        "        qt.QTimer()\n    @staticmethod\n    def g():\n        pass\n"
        "def h(a=(1, 2), *, b='x'):\n    return slicer.app\n"
    )
    assert import_time_work(source) == []
