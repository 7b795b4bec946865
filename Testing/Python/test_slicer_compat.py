"""Both branches of every version-dependent call (mrml/compat.py) and the version floors (versions.py).

The suite runs on one slicer-core (5.13), which has every newer API; each old-Slicer branch is exercised here with the
real MRML object behind a stand-in that exposes only what Slicer 5.8 has, and must give the same answer as the new
branch. A static check keeps the version-dependent names out of every other file of the extension.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from MIADeepLearningLib import versions
from MIADeepLearningLib.engine.errors import MIADLError

ROOT = Path(__file__).resolve().parents[2]
BRAIN = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~"
         "SCT^12738006^Brain~^^~Anatomic codes - DICOM master list~^^~^^")


class Slicer58Segment:
    """A real vtkSegment seen through Slicer 5.8's API: the terminology tag, no GetTerminology/SetTerminology."""

    def __init__(self, segment) -> None:
        self._segment = segment

    def GetTag(self, tag, value):
        return self._segment.GetTag(tag, value)

    def GetTerminologyEntryTagName(self):
        return self._segment.GetTerminologyEntryTagName()


@pytest.fixture
def compat(headless):
    from MIADeepLearningLib.mrml import compat

    return compat


@pytest.mark.parametrize("terminology", [BRAIN, ""])
def test_segment_terminology_is_the_same_on_both_branches(compat, terminology: str) -> None:
    import slicer

    segment = slicer.vtkSegment()  # every version tags a new segment "Tissue"
    default = compat.segment_terminology(segment)
    assert "Tissue" in default and compat.segment_terminology(Slicer58Segment(segment)) == default
    if terminology:
        segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)
    else:
        segment.RemoveTag(segment.GetTerminologyEntryTagName())
    assert hasattr(segment, "GetTerminology"), "slicer-core is expected to be newer than 5.10 here"
    old = Slicer58Segment(segment)
    assert not hasattr(old, "GetTerminology")
    assert compat.segment_terminology(segment) == terminology
    assert compat.segment_terminology(old) == terminology


def test_packaging_module_on_both_branches(compat, monkeypatch) -> None:
    """slicer.packaging (Slicer >= 5.12) is used when present; older Slicers (no such module, or one without
    pip_ensure) get None, so the caller asks and uses slicer.util.pip_install."""
    import slicer

    new = types.ModuleType("slicer.packaging")
    new.pip_ensure = lambda requirements, requester=None: None
    new.load_requirements = lambda path: []
    monkeypatch.setitem(sys.modules, "slicer.packaging", new)
    monkeypatch.setattr(slicer, "packaging", new, raising=False)
    assert compat.packaging_module() is new
    monkeypatch.delattr(new, "pip_ensure")
    assert compat.packaging_module() is None
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # what `import` sees on Slicer 5.8 / 5.10
    assert compat.packaging_module() is None


def test_slicer_version_check_on_both_branches(compat, monkeypatch) -> None:
    import slicer

    major, minor = versions.MINIMUM_SLICER_VERSION
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(majorVersion=major, minorVersion=minor - 1),
                        raising=False)
    assert compat.slicer_version() == (major, minor - 1)
    problem = compat.slicer_version_problem()
    assert problem == (f"MIADeepLearning needs 3D Slicer {major}.{minor} or newer; this is Slicer {major}.{minor - 1}. "
                       "Install a current Slicer and then the extension again from its Extensions Manager.")
    for newer in ((major, minor), (major, minor + 5), (major + 1, 0)):
        monkeypatch.setattr(slicer, "app", types.SimpleNamespace(majorVersion=newer[0], minorVersion=newer[1]))
        assert compat.slicer_version_problem() is None, newer
    monkeypatch.setattr(slicer, "app", None)
    assert compat.slicer_version() is None and compat.slicer_version_problem() is None  # headless: nothing to say


@pytest.mark.parametrize(("installed", "supported"), [
    ("2.13.0+cpu", True), ("2.10.0a0+git1234", True), ("3.0.0", True),
    (versions.dotted(versions.MINIMUM_TORCH_VERSION) + ".0+cu118", True),
    ("2.0.1", False), ("1.13.1+cu117", False), ("nonsense", False),
])
def test_torch_version_problem(installed: str, supported: bool) -> None:
    problem = versions.torch_version_problem(installed)
    if supported:
        assert problem is None
    else:
        minimum = versions.dotted(versions.MINIMUM_TORCH_VERSION)
        assert problem.startswith(f"PyTorch {installed} is installed, but MIADeepLearning needs PyTorch {minimum} or "
                                  "newer."), problem
    assert versions.torch_requirement() == f">={versions.dotted(versions.MINIMUM_TORCH_VERSION)}"


@pytest.mark.parametrize(("installed", "numpy_version", "minimum"), [
    ("2.2.0", "1.26.4", None), ("2.2.0", "2.0.2", "2.3"), ("2.3.1", "2.0.2", None), ("2.2.0", None, None),
    ("2.1.2", "1.26.4", "2.2"),
])
def test_numpy_2_needs_a_newer_torch(installed: str, numpy_version: str | None, minimum: str | None) -> None:
    """Slicer 5.10 and later ship numpy 2, with which torch 2.2 cannot exchange arrays: the floor rises to 2.3."""
    problem = versions.torch_version_problem(installed, numpy_version)
    if minimum is None:
        assert problem is None
    else:
        assert f"needs PyTorch {minimum} or newer" in problem, problem
        assert ("beside numpy" in problem) == (minimum == "2.3"), problem
    expected = "2.3" if numpy_version and numpy_version.startswith("2") else "2.2"
    assert versions.torch_requirement(numpy_version) == f">={expected}"


def test_version_tuple() -> None:
    assert versions.version_tuple("2.8.0+cu126") == (2, 8, 0)
    assert versions.version_tuple("2.10.0a0") == (2, 10, 0)
    assert versions.version_tuple("2.9.0rc1") == (2, 9, 0)
    assert versions.version_tuple("garbage") == ()


def test_worker_refuses_an_older_torch_in_one_sentence(monkeypatch) -> None:
    """The worker names the minimum before the engine meets an API the old torch lacks; a supported torch passes."""
    import numpy
    import torch

    from MIADeepLearningLib import worker

    worker.check_torch_version()  # the torch of this environment is supported
    monkeypatch.setattr(torch, "__version__", "2.0.1")
    with pytest.raises(MIADLError) as raised:
        worker.import_engine()
    minimum = versions.dotted(versions.minimum_torch_version(numpy.__version__))
    assert str(raised.value).startswith(f"PyTorch 2.0.1 is installed, but MIADeepLearning needs PyTorch {minimum}")


# Names whose availability differs between the oldest supported Slicer and today's: only mrml/compat.py uses them.
VERSION_DEPENDENT = {
    r"\.GetTerminology\(": "vtkSegment.GetTerminology (Slicer >= 5.10)",
    r"\.SetTerminology\(": "vtkSegment.SetTerminology (Slicer >= 5.10)",
    r"\.HasTerminology\(": "vtkSegment.HasTerminology (Slicer >= 5.10)",
    r"slicer\.packaging\b|import packaging as|from slicer import packaging": "slicer.packaging (Slicer >= 5.12)",
}


def version_dependent_uses(source: str) -> list[str]:
    """The version-dependent names a Python source uses outside comments and docstrings (code lines only)."""
    import ast
    import io
    import tokenize

    code_tokens = []
    docstring_lines: set[int] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            docstring_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE) or token.start[0] in docstring_lines:
            continue
        if token.type == tokenize.STRING and "packaging" not in token.string:
            continue
        code_tokens.append(token.string)
    code = " ".join(code_tokens).replace(" . ", ".").replace(" (", "(").replace(". ", ".")
    return [what for pattern, what in VERSION_DEPENDENT.items() if re.search(pattern, code)]


def test_version_dependent_calls_live_only_in_compat() -> None:
    compat_path = ROOT / "MIADeepLearning" / "MIADeepLearningLib" / "mrml" / "compat.py"
    offenders = []
    for path in sorted((ROOT / "MIADeepLearning").rglob("*.py")):
        if path == compat_path:
            continue
        for what in version_dependent_uses(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(ROOT)}: {what}")
    assert not offenders, "call these through MIADeepLearningLib/mrml/compat.py:\n" + "\n".join(offenders)
    assert version_dependent_uses(compat_path.read_text(encoding="utf-8")), "the checker finds nothing in compat.py"


@pytest.mark.parametrize("source", [
    "x = segment.GetTerminology()\n",
    "def f(s):\n    return s.GetTerminology() or ''\n",
    "import slicer.packaging as p\n",
    "def f():\n    import slicer.packaging\n",
])
def test_version_dependent_checker_sees_uses(source: str) -> None:
    assert version_dependent_uses(source)


def test_version_dependent_checker_ignores_comments_and_docstrings() -> None:
    source = '"""Uses GetTerminology() on 5.10; slicer.packaging on 5.12."""\n# segment.GetTerminology()\nx = 1\n'
    assert version_dependent_uses(source) == []


@pytest.mark.parametrize("command", [
    ["segment", "--model", "deepbet", "-i", "{input}", "-o", "{output}"],
    ["synthesize", "--model", "thick-slice-sr", "-i", "{input}", "-o", "{output}"],
    ["register", "--model", "brain-registration", "--fixed", "{input}", "--moving", "{input}", "-o", "{output}"],
])
def test_cli_refuses_an_older_torch_before_any_work(command, monkeypatch, capsys, tmp_path) -> None:
    import numpy as np
    import SimpleITK as sitk
    import torch

    from MIADeepLearningLib import cli

    image = tmp_path / "head.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((8, 8, 8), np.float32)), str(image))
    output = tmp_path / "out.nii.gz"
    monkeypatch.setattr(torch, "__version__", "2.0.1")
    arguments = [part.format(input=image, output=output) for part in command]
    assert cli.main(arguments) == cli.EXIT_USAGE
    minimum = versions.dotted(versions.minimum_torch_version(np.__version__))
    assert f"needs PyTorch {minimum} or newer" in capsys.readouterr().err
    assert not output.exists()
