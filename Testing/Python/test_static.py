"""Static checks for what cannot run here (no Slicer GUI, no Slicer build).

- CMakeLists lists every library script, module and resource that exists, and nothing that does not.
- Every ``self.ui.<name>`` a module uses exists in its .ui file; every SlicerParameterName there is a parameter of
  the module's @parameterNodeWrapper class, bound to a widget type that can represent it.
- The .s4ext description agrees with the EXTENSION_* values of CMakeLists.
- ``setup()`` (run by Slicer's generic tests on factory machines) installs, downloads and imports nothing heavy.
- The sources run on Slicer 5.8's Python 3.9: 3.9 grammar, postponed annotations, no 3.10+ runtime idioms.

Nothing here imports slicer, qt or the module files; they are read as text, XML and ast.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIR = ROOT / "MIADeepLearning"
LIB_DIR = SOURCE_DIR / "MIADeepLearningLib"
RESOURCES_DIR = ROOT / "Resources"
TOP_CMAKE = ROOT / "CMakeLists.txt"
MODULE_CMAKE = SOURCE_DIR / "CMakeLists.txt"
S4EXT = ROOT / "MIADeepLearning.s4ext"

LIBRARY_LIST = "MIADL_LIBRARY_SCRIPTS"
RESOURCE_LIST = "MIADL_RESOURCES"
IGNORED_NAMES = {".DS_Store", "Thumbs.db"}


# Helpers: files, CMake, modules


def _project_files(folder: Path) -> list[Path]:
    """Files under a folder that belong to the project: tracked or not ignored by git; without git, all files."""
    files: list[Path] = []
    git = shutil.which("git")
    if git and (ROOT / ".git").exists():
        listed = subprocess.run(
            [git, "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", str(folder)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        files = [ROOT / name for name in listed.split("\0") if name]
    else:
        files = [path for path in folder.rglob("*") if path.is_file()]
    return sorted(
        {
            path
            for path in files
            if path.is_file()
            and "__pycache__" not in path.parts
            and path.suffix != ".pyc"
            and path.name not in IGNORED_NAMES
        }
    )


def _cmake_text(path: Path) -> str:
    """CMake source without comments (a '#' outside a quoted argument starts one)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        in_quotes = False
        for index, char in enumerate(line):
            if char == '"':
                in_quotes = not in_quotes
            elif char == "#" and not in_quotes:
                line = line[:index]
                break
        lines.append(line)
    return "\n".join(lines)


def _cmake_calls(text: str, command: str) -> list[list[str]]:
    """Arguments of every call of a CMake command (our files have no nested parentheses in arguments)."""
    calls = []
    for match in re.finditer(rf"(?<![\w$]){re.escape(command)}\s*\(([^()]*)\)", text, flags=re.IGNORECASE):
        calls.append([arg.strip('"') for arg in re.findall(r'"[^"]*"|[^\s"]+', match.group(1))])
    return calls


def _cmake_list(text: str, name: str) -> list[str]:
    values = [args[1:] for args in _cmake_calls(text, "set") if args and args[0] == name]
    assert len(values) == 1, f"expected exactly one set({name} ...) in the CMakeLists, found {len(values)}"
    return values[0]


def _cmake_extension_values(text: str) -> dict[str, str]:
    return {
        args[0]: " ".join(args[1:]) for args in _cmake_calls(text, "set") if args and args[0].startswith("EXTENSION_")
    }


def _module_files() -> list[Path]:
    return sorted(path for path in SOURCE_DIR.glob("*.py"))


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _decorator_name(node: ast.expr) -> str:
    target = node.func if isinstance(node, ast.Call) else node
    return target.attr if isinstance(target, ast.Attribute) else target.id if isinstance(target, ast.Name) else ""


def _parameter_node_classes(tree: ast.Module) -> list[ast.ClassDef]:
    return [
        node
        for node in _classes(tree).values()
        if any(_decorator_name(decorator) == "parameterNodeWrapper" for decorator in node.decorator_list)
    ]


def _parameter_fields(tree: ast.Module) -> dict[str, str]:
    """Field name -> annotation source of the module's @parameterNodeWrapper classes."""
    fields = {}
    for node in _parameter_node_classes(tree):
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                fields[statement.target.id] = ast.unparse(statement.annotation)
    return fields


def _ui_file(module: Path) -> Path:
    return RESOURCES_DIR / "UI" / f"{module.stem}.ui"


def _ui_names(ui_path: Path) -> dict[str, str]:
    """objectName -> class of every widget, layout and action of a .ui file."""
    root = ElementTree.parse(ui_path).getroot()
    names = {}
    for tag in ("widget", "layout", "action"):
        for element in root.iter(tag):
            if element.get("name"):
                names[element.get("name")] = element.get("class", tag)
    return names


def _ui_parameter_bindings(ui_path: Path) -> list[tuple[str, str, str]]:
    """(widget name, widget class, SlicerParameterName) for every widget bound to a parameter."""
    bindings = []
    for widget in ElementTree.parse(ui_path).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings.append((widget.get("name", ""), widget.get("class", ""), prop.findtext("string", "")))
    return bindings


def _ui_attributes_used(tree: ast.Module) -> dict[str, int]:
    """Names used as ``self.ui.<name>`` or ``ui.<name>`` -> first line."""
    used: dict[str, int] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        is_ui = (
            isinstance(owner, ast.Attribute)
            and owner.attr == "ui"
            and isinstance(owner.value, ast.Name)
            and owner.value.id == "self"
        ) or (isinstance(owner, ast.Name) and owner.id == "ui")
        if is_ui:
            used.setdefault(node.attr, node.lineno)
    return used


# (1) CMakeLists lists exactly the files that exist


def test_every_library_script_is_listed_and_exists() -> None:
    listed = _cmake_list(_cmake_text(MODULE_CMAKE), LIBRARY_LIST)
    duplicates = sorted({name for name in listed if listed.count(name) > 1})
    present = {path.relative_to(SOURCE_DIR).as_posix() for path in _project_files(LIB_DIR)}
    not_python = sorted(name for name in present if not name.endswith(".py"))
    unlisted = sorted(name for name in present if name.endswith(".py") and name not in listed)
    missing = sorted(name for name in listed if not (SOURCE_DIR / name).is_file())
    assert not duplicates, f"listed twice in {LIBRARY_LIST}: {duplicates}"
    assert not unlisted, f"add to {LIBRARY_LIST} in MIADeepLearning/CMakeLists.txt: {unlisted}"
    assert not missing, f"listed in {LIBRARY_LIST} but missing (remove them): {missing}"
    assert not not_python, f"only .py files of MIADeepLearningLib are installed; move these to Resources/: {not_python}"


def test_library_is_built_from_its_list() -> None:
    calls = _cmake_calls(_cmake_text(MODULE_CMAKE), "slicerMacroBuildScriptedModule")
    library = [args for args in calls if args[:2] == ["NAME", "MIADeepLearningLib"]]
    assert len(library) == 1, "one slicerMacroBuildScriptedModule(NAME MIADeepLearningLib ...) expected"
    assert library[0][2:] == ["SCRIPTS", f"${{{LIBRARY_LIST}}}"], library[0]


def test_every_module_is_built_with_generic_tests_and_its_self_test() -> None:
    text = _cmake_text(MODULE_CMAKE)
    calls = {args[1]: args for args in _cmake_calls(text, "slicerMacroBuildScriptedModule") if args[0] == "NAME"}
    testing_blocks = " ".join(re.findall(r"if\s*\(\s*BUILD_TESTING\s*\)(.*?)endif\s*\(", text, flags=re.S | re.I))
    tests = [args for args in _cmake_calls(testing_blocks, "slicer_add_python_unittest")]
    modules = _module_files()
    assert modules, "no module files found"
    for module in modules:
        name = module.stem
        assert name in calls, f"MIADeepLearning/CMakeLists.txt: add slicerMacroBuildScriptedModule(NAME {name} ...)"
        args = calls[name]
        scripts = args[args.index("SCRIPTS") + 1 :] if "SCRIPTS" in args else []
        assert module.name in scripts, f"{name}: SCRIPTS must list {module.name}"
        assert "WITH_GENERIC_TESTS" in args, f"{name}: add WITH_GENERIC_TESTS"
        assert ["SCRIPT", module.name] in tests, (
            f"{name}: add slicer_add_python_unittest(SCRIPT {module.name}) under if(BUILD_TESTING)"
        )
        assert _ui_file(module).is_file(), f"{name}: Resources/UI/{name}.ui is missing"
        assert (RESOURCES_DIR / "Icons" / f"{name}.png").is_file(), f"{name}: Resources/Icons/{name}.png is missing"
    built = {name for name in calls if name != "MIADeepLearningLib"}
    assert built == {module.stem for module in modules}, f"modules built but without a file: {built}"


def test_every_resource_is_listed_and_exists() -> None:
    listed = _cmake_list(_cmake_text(MODULE_CMAKE), RESOURCE_LIST)
    duplicates = sorted({name for name in listed if listed.count(name) > 1})
    present = {path.relative_to(ROOT).as_posix() for path in _project_files(RESOURCES_DIR)}
    unlisted = sorted(present - set(listed))
    missing = sorted(name for name in listed if not (ROOT / name).is_file())
    outside = sorted(name for name in listed if not name.startswith("Resources/"))
    assert not duplicates, f"listed twice in {RESOURCE_LIST}: {duplicates}"
    assert not unlisted, f"add to {RESOURCE_LIST} in MIADeepLearning/CMakeLists.txt: {unlisted}"
    assert not missing, f"listed in {RESOURCE_LIST} but missing (remove them): {missing}"
    assert not outside, f"{RESOURCE_LIST} holds paths under Resources/ only: {outside}"


def test_resources_are_copied_beside_the_modules() -> None:
    """resourcePath() looks in <folder of the module>/Resources: copy there at build time and install there."""
    text = _cmake_text(MODULE_CMAKE)
    assert re.search(rf"foreach\s*\(\s*\w+\s+IN\s+LISTS\s+{RESOURCE_LIST}\s*\)", text), "no foreach over resources"
    copies = _cmake_calls(text, "configure_file")
    assert any(
        "COPYONLY" in args and any("${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in arg for arg in args) for args in copies
    )
    installs = _cmake_calls(text, "install")
    assert any(
        "RuntimeLibraries" in args
        and any(arg.startswith("${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}") for arg in args)
        for args in installs
    )
    for args in _cmake_calls(text, "slicerMacroBuildScriptedModule"):
        assert "RESOURCES" not in args, "RESOURCES would be copied relative to MIADeepLearning/; use MIADL_RESOURCES"


# (2) widget names and parameter bindings


@pytest.mark.parametrize("module", _module_files(), ids=lambda path: path.stem)
def test_ui_names_used_by_the_module_exist(module: Path) -> None:
    used = _ui_attributes_used(_parse(module))
    names = _ui_names(_ui_file(module))
    assert used, f"{module.name}: no self.ui.<name> found (is the checker still seeing the code?)"
    unknown = {name: line for name, line in used.items() if name not in names}
    assert not unknown, f"{module.name} uses widgets missing from {_ui_file(module).name}: " + ", ".join(
        f"{name} (line {line})" for name, line in sorted(unknown.items())
    )


# Which widget classes can represent which field types (slicer/parameterNodeWrapper/guiConnectors.py).
_NODE_WIDGETS = {"qMRMLNodeComboBox"}
_COMBO_WIDGETS = {"QComboBox", "ctkComboBox"}
_CHECKBOX_WIDGETS = {"QCheckBox", "ctkCheckBox"}


@pytest.mark.parametrize("module", _module_files(), ids=lambda path: path.stem)
def test_parameter_bindings_match_the_parameter_node(module: Path) -> None:
    tree = _parse(module)
    assert len(_parameter_node_classes(tree)) == 1, f"{module.name}: one @parameterNodeWrapper class expected"
    fields = _parameter_fields(tree)
    bindings = _ui_parameter_bindings(_ui_file(module))
    assert bindings, f"{_ui_file(module).name}: no SlicerParameterName properties"
    names = [parameter for _, _, parameter in bindings]
    assert len(names) == len(set(names)), f"a parameter is bound to two widgets: {names}"
    for widget, widget_class, parameter in bindings:
        assert parameter in fields, f"{widget}: SlicerParameterName '{parameter}' is not a field of the parameter node"
        annotation = fields[parameter]
        if widget_class in _NODE_WIDGETS:
            assert re.search(r"\bvtkMRML\w+Node\b", annotation), f"{widget}: a node combo needs a node field"
        elif widget_class in _COMBO_WIDGETS:
            # QComboBoxToStringableConnector refuses a str/int/float/bool without Choice (and rewrites the items)
            assert "Choice(" in annotation or annotation not in ("str", "int", "float", "bool"), (
                f"{widget}: a QComboBox bound to '{parameter}: {annotation}' needs Annotated[..., Choice([...])]"
            )
        elif widget_class in _CHECKBOX_WIDGETS:
            assert annotation == "bool", f"{widget}: a check box needs a bool field, not {annotation}"


@pytest.mark.parametrize("module", _module_files(), ids=lambda path: path.stem)
def test_parameter_node_annotations_evaluate_on_python39(module: Path) -> None:
    """The wrapper calls typing.get_type_hints: a string 'X | None' raises TypeError on Python 3.9."""
    for name, annotation in _parameter_fields(_parse(module)).items():
        assert "|" not in annotation, f"{module.name}: parameter '{name}: {annotation}' fails on Python 3.9"


# (3) extension metadata


def _s4ext_values() -> dict[str, str]:
    values = {}
    for line in S4EXT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            values[key] = value.strip()
    return values


_S4EXT_TO_CMAKE = {
    "homepage": "EXTENSION_HOMEPAGE",
    "category": "EXTENSION_CATEGORY",
    "contributors": "EXTENSION_CONTRIBUTORS",
    "description": "EXTENSION_DESCRIPTION",
    "iconurl": "EXTENSION_ICONURL",
    "screenshoturls": "EXTENSION_SCREENSHOTURLS",
    "depends": "EXTENSION_DEPENDS",
    "status": "EXTENSION_STATUS",
}


def test_s4ext_agrees_with_cmakelists() -> None:
    cmake = _cmake_extension_values(_cmake_text(TOP_CMAKE))
    s4ext = _s4ext_values()
    for key, variable in _S4EXT_TO_CMAKE.items():
        assert variable in cmake, f"CMakeLists.txt: set({variable} ...) is missing"
        assert key in s4ext, f"MIADeepLearning.s4ext: '{key}' is missing"
        assert s4ext[key] == cmake[variable], (
            f"{key}: s4ext '{s4ext[key]}' != CMakeLists {variable} '{cmake[variable]}'"
        )
    assert s4ext.get("scm") == "git"
    assert s4ext.get("scmurl", "").startswith(cmake["EXTENSION_HOMEPAGE"])
    assert s4ext.get("scmrevision") and s4ext.get("build_subdirectory") == "."
    assert s4ext.get("enabled") == "1"


def test_extension_cmakelists_follows_the_template() -> None:
    text = _cmake_text(TOP_CMAKE)
    values = _cmake_extension_values(text)
    assert "PyTorch" in values.get("EXTENSION_DEPENDS", "").split()
    assert [["MIADeepLearning"]] == _cmake_calls(text, "project")
    assert ["Slicer", "REQUIRED"] in _cmake_calls(text, "find_package")
    assert ["MIADeepLearning"] in _cmake_calls(text, "add_subdirectory")
    includes = [args[0] for args in _cmake_calls(text, "include")]
    for variable in ("${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"):
        assert variable in includes, f"CMakeLists.txt: include({variable}) is missing"


def test_extension_icon_url_points_at_a_file_of_this_repository() -> None:
    url = _cmake_extension_values(_cmake_text(TOP_CMAKE))["EXTENSION_ICONURL"]
    relative = url.split("/main/", 1)[1]
    assert (ROOT / relative).is_file(), f"EXTENSION_ICONURL names {relative}, which is not in the repository"


# (4) setup() hygiene, Python 3.9, module structure

# Calls that install, download or load torch; none may be reachable from setup() (generic tests run it).
_FORBIDDEN_IN_SETUP = re.compile(
    r"pip_install|pip_ensure|installTorch|importTorch|download|urlopen|urlretrieve|ensureDependencies", re.I
)


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _reachable_from_setup(tree: ast.Module, widget: ast.ClassDef) -> list[tuple[str, ast.AST]]:
    """setup() and every method (self.x()) or module function (x()) it calls, transitively."""
    methods = {node.name: node for node in widget.body if isinstance(node, ast.FunctionDef)}
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    classes = _classes(tree)
    todo, seen, reached = [("setup", methods["setup"])], set(), []
    while todo:
        name, function = todo.pop()
        if id(function) in seen:
            continue
        seen.add(id(function))
        reached.append((name, function))
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
                if func.attr in methods:
                    todo.append((func.attr, methods[func.attr]))
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in classes:
                for item in classes[func.value.id].body:  # e.g. DLSegmentationLogic.availableModels()
                    if isinstance(item, ast.FunctionDef) and item.name == func.attr:
                        todo.append((f"{func.value.id}.{func.attr}", item))
            elif isinstance(func, ast.Name) and func.id in functions:
                todo.append((func.id, functions[func.id]))
            elif isinstance(func, ast.Name) and func.id in classes:  # constructor: e.g. DLSegmentationLogic()
                for item in classes[func.id].body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        todo.append((f"{func.id}.__init__", item))
    return reached


@pytest.mark.parametrize("module", _module_files(), ids=lambda path: path.stem)
def test_setup_installs_downloads_and_imports_nothing_heavy(module: Path) -> None:
    tree = _parse(module)
    widget = _classes(tree)[f"{module.stem}Widget"]
    reached = _reachable_from_setup(tree, widget)
    assert len(reached) > 1, "setup() should be followed into the methods it calls"
    problems = []
    for name, function in reached:
        for node in ast.walk(function):
            if isinstance(node, ast.Call) and _FORBIDDEN_IN_SETUP.search(_call_name(node)):
                problems.append(f"{name}:{node.lineno} calls {_call_name(node)}()")
            elif isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "torch" for alias in node.names):
                problems.append(f"{name}:{node.lineno} imports torch")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("torch", "PyTorchUtils"):
                problems.append(f"{name}:{node.lineno} imports from {node.module}")
            elif isinstance(node, ast.Import) and any(alias.name == "PyTorchUtils" for alias in node.names):
                problems.append(f"{name}:{node.lineno} imports PyTorchUtils")
    assert not problems, f"{module.name}: reachable from setup(): " + "; ".join(problems)


def test_setup_checker_sees_a_violation() -> None:
    source = (
        "class XWidget:\n"
        "    def setup(self):\n        self._fill()\n"
        "    def _fill(self):\n        helper()\n"
        "def helper():\n    import slicer\n    slicer.util.pip_install('x')\n"
    )
    tree = ast.parse(source)
    reached = dict(_reachable_from_setup(tree, _classes(tree)["XWidget"]))
    assert set(reached) == {"setup", "_fill", "helper"}
    calls = [_call_name(node) for node in ast.walk(reached["helper"]) if isinstance(node, ast.Call)]
    assert any(_FORBIDDEN_IN_SETUP.search(name) for name in calls)


def _python_files() -> list[Path]:
    return sorted(path for path in SOURCE_DIR.rglob("*.py") if "__pycache__" not in path.parts)


def _annotation_nodes(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            all_args = [
                *arguments.posonlyargs,
                *arguments.args,
                *arguments.kwonlyargs,
                arguments.vararg,
                arguments.kwarg,
            ]
            annotations = [arg.annotation for arg in all_args if arg is not None] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        for annotation in filter(None, annotations):
            ids.update(id(child) for child in ast.walk(annotation))
    return ids


def python39_problems(source: str) -> list[str]:
    """Reasons a source would not run on Python 3.9 (the Python of Slicer 5.8 and of its PythonSlicer worker)."""
    try:
        tree = ast.parse(source, feature_version=(3, 9))
    except SyntaxError as error:
        return [f"line {error.lineno}: not Python 3.9 syntax ({error.msg})"]
    problems = []
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # docstring
    has_future = any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(a.name == "annotations" for a in node.names)
        for node in body[:1]
    )
    if body and not has_future:
        problems.append("'from __future__ import annotations' must be the first statement (after the docstring)")
    in_annotation = _annotation_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in in_annotation:
            continue
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            if any(isinstance(side, ast.Constant) and side.value is None for side in (node.left, node.right)):
                problems.append(f"line {node.lineno}: 'X | None' evaluated at runtime needs Python 3.10")
        elif isinstance(node, ast.Call):
            keywords = {keyword.arg for keyword in node.keywords}
            if _call_name(node) == "zip" and "strict" in keywords:
                problems.append(f"line {node.lineno}: zip(strict=...) needs Python 3.10")
            if _call_name(node) == "dataclass" and keywords & {"slots", "kw_only"}:
                problems.append(f"line {node.lineno}: dataclass(slots/kw_only) needs Python 3.10")
        elif isinstance(node, ast.ImportFrom) and node.module == "itertools":
            if any(alias.name == "pairwise" for alias in node.names):
                problems.append(f"line {node.lineno}: itertools.pairwise needs Python 3.10")
    return problems


@pytest.mark.parametrize("path", _python_files(), ids=lambda path: path.relative_to(SOURCE_DIR).as_posix())
def test_sources_run_on_python39(path: Path) -> None:
    problems = python39_problems(path.read_text(encoding="utf-8"))
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        "from __future__ import annotations\nmatch = 1\nmatch x:\n    case 1:\n        pass\n",
        "import os\n",
        "from __future__ import annotations\nOptionalInt = int | None\n",
        "from __future__ import annotations\nfor a, b in zip([1], [2], strict=True):\n    pass\n",
        "from __future__ import annotations\nfrom dataclasses import dataclass\n"
        "@dataclass(slots=True)\nclass A:\n    x: int\n",
    ],
)
def test_python39_checker_sees_violations(source: str) -> None:
    assert python39_problems(source)


def test_python39_checker_accepts_postponed_annotations() -> None:
    source = (
        '"""Doc."""\nfrom __future__ import annotations\n'
        "def f(x: int | None = None) -> list[str] | None:\n    y: str | None = None\n    return None\n"
    )
    assert python39_problems(source) == []


_MODULE_BASES = {
    "": "ScriptedLoadableModule",
    "Widget": "ScriptedLoadableModuleWidget",
    "Logic": "ScriptedLoadableModuleLogic",
    "Test": "ScriptedLoadableModuleTest",
}


@pytest.mark.parametrize("module", _module_files(), ids=lambda path: path.stem)
def test_module_defines_module_widget_logic_and_test(module: Path) -> None:
    classes = _classes(_parse(module))
    for suffix, base in _MODULE_BASES.items():
        name = module.stem + suffix
        assert name in classes, f"{module.name}: class {name} is missing"
        bases = {ast.unparse(node).split(".")[-1] for node in classes[name].bases}
        assert base in bases, f"{module.name}: {name} must derive from {base}"
    test_methods = {node.name for node in classes[f"{module.stem}Test"].body if isinstance(node, ast.FunctionDef)}
    assert "runTest" in test_methods, f"{module.stem}Test needs runTest (Slicer's self-test entry point)"
    assert any(name.startswith("test_") for name in test_methods), f"{module.stem}Test has no test_ method (ctest)"


def test_module_test_runs_the_shared_scenarios() -> None:
    """Slicer's self-test must exercise the scenarios pytest runs, not a copy of them."""
    for module in _module_files():
        source = module.read_text(encoding="utf-8")
        assert "from MIADeepLearningLib.testing import scenarios" in source, module.name
        assert "scenarios.SCENARIOS" in source and "scenarios.ScenarioSkipped" in source, module.name
