"""Static checks for what cannot run here (no Slicer GUI, no Slicer build).

- CMakeLists lists every library script, module and resource that exists, and nothing that does not.
- Every ``self.ui.<name>`` a module uses (itself or through the gui/ mixin its widget inherits) exists in its .ui
  file; every SlicerParameterName there is a parameter of the module's @parameterNodeWrapper class, bound to a widget
  type that can represent it.
- The .s4ext description agrees with the EXTENSION_* values of CMakeLists.
- ``setup()`` (run by Slicer's generic tests on factory machines) installs, downloads and imports nothing heavy,
  followed into the shared Slicer-side code of MIADeepLearningLib/gui/ (mixins, installer).
- The sources run on Slicer 5.8's Python 3.9: 3.9 grammar, postponed annotations, no 3.10+ runtime idioms.
- Each module's self-test runs a scenario list that test_scenarios.py also runs; a module that imports another
  module file declares it as a dependency (test_import_layers.py forbids such imports; shared code is in gui/).

Every per-module check is parametrized over the module files (DLSegmentation, DLSynthesis, DLRegistration,
DLClassification, DLLesionDetection).

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
CATALOG_ENTRY = ROOT / "MIADeepLearning.json"  # what a pull request to the Extensions Index adds

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
    """Arguments of every call of a CMake command (no nested parentheses outside quoted arguments in our files)."""
    calls = []
    pattern = rf'(?<![\w$]){re.escape(command)}\s*\(((?:"[^"]*"|[^()"])*)\)'
    for match in re.finditer(pattern, text, flags=re.IGNORECASE):
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


def _ui_attributes_used(tree: ast.AST) -> dict[str, int]:
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


def _inherited_gui_classes(tree: ast.Module, cls: ast.ClassDef) -> list[tuple[str, ast.ClassDef]]:
    """(gui module name, class) for every base of `cls` imported by name from MIADeepLearningLib/gui/."""
    gui = _gui_trees()
    imported = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module in gui:
            for alias in node.names:
                found = _classes(gui[node.module]).get(alias.name)
                if found is not None:
                    imported[alias.asname or alias.name] = (node.module, found)
    return [imported[base.id] for base in cls.bases if isinstance(base, ast.Name) and base.id in imported]


@pytest.mark.parametrize("module", _module_files(), ids=lambda path: path.stem)
def test_ui_names_used_by_the_module_exist(module: Path) -> None:
    """Also the names the shared gui/ mixins the widget inherits use (e.g. applyButton, progressBar)."""
    tree = _parse(module)
    used = {name: f"line {line}" for name, line in _ui_attributes_used(tree).items()}
    assert used, f"{module.name}: no self.ui.<name> found (is the checker still seeing the code?)"
    for gui_module, gui_class in _inherited_gui_classes(tree, _classes(tree)[f"{module.stem}Widget"]):
        for name, line in _ui_attributes_used(gui_class).items():
            used.setdefault(name, f"{gui_module}.{gui_class.name}, line {line}")
    names = _ui_names(_ui_file(module))
    unknown = {name: where for name, where in used.items() if name not in names}
    assert not unknown, f"{module.name} uses widgets missing from {_ui_file(module).name}: " + ", ".join(
        f"{name} ({where})" for name, where in sorted(unknown.items())
    )


def test_ui_checker_sees_the_names_the_gui_mixin_uses() -> None:
    tree = _parse(SOURCE_DIR / "DLSynthesis.py")
    inherited = _inherited_gui_classes(tree, _classes(tree)["DLSynthesisWidget"])
    assert [cls.name for _, cls in inherited] == ["TaskWidgetMixin"]
    used = _ui_attributes_used(inherited[0][1])
    assert {"applyButton", "progressBar", "logTextEdit", "statusLabel", "modelComboBox"} <= set(used)


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


# The keys of Slicer's extension catalog entry schema (slicer-extension-catalog-entry-schema-v1.0.2), which allows no
# others, and the ones it requires.
_CATALOG_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                 "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
_CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
# Categories the Extensions Index's check_description_files.py accepted (read 2026-12) that could describe this
# extension; "Deep Learning" is not accepted there (it stays the modules' own menu category).
_INDEX_CATEGORIES_THAT_FIT = {"Segmentation", "Registration", "Neuroimaging", "Image Synthesis", "Quantification"}
# "Firstname Lastname (Organization)", comma-separated: the form Slicer's extension template and the index expect.
_CONTRIBUTOR = r"[^,()]+? \([^()]+\)"


def _catalog_entry() -> dict:
    import json

    raw = CATALOG_ENTRY.read_bytes()
    assert b"\r" not in raw, "MIADeepLearning.json must have LF line endings only (the index refuses CR/CRLF)"
    return json.loads(raw.decode("utf-8"))


def test_catalog_entry_follows_the_schema() -> None:
    entry = _catalog_entry()
    assert set(entry) <= _CATALOG_KEYS, f"keys the schema does not allow: {sorted(set(entry) - _CATALOG_KEYS)}"
    assert _CATALOG_REQUIRED <= set(entry), f"missing: {sorted(_CATALOG_REQUIRED - set(entry))}"
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                        r"slicer-extension-catalog-entry-schema-v\d+\.\d+\.\d+\.json#?", entry["$schema"])
    assert isinstance(entry.get("build_dependencies", []), list)
    assert all(isinstance(name, str) for name in entry.get("build_dependencies", []))
    assert isinstance(entry.get("tier", 1), int) and 1 <= entry.get("tier", 1) <= 5
    assert entry["category"] in _INDEX_CATEGORIES_THAT_FIT, entry["category"]
    assert urlparse_scheme(entry["scm_url"]) == "https"
    repository = entry["scm_url"].rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    assert repository.startswith("Slicer") and not CATALOG_ENTRY.stem.lower().startswith("slicer"), (
        "the index wants the repository named Slicer<Name> and the extension (the .json's name) without 'Slicer'")


def urlparse_scheme(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).scheme


def test_catalog_entry_cmakelists_and_s4ext_agree() -> None:
    """The index's pull-request template asks that the JSON be consistent with the top-level CMakeLists.txt."""
    entry = _catalog_entry()
    cmake = _cmake_extension_values(_cmake_text(TOP_CMAKE))
    s4ext = _s4ext_values()
    assert [["MIADeepLearning"]] == _cmake_calls(_cmake_text(TOP_CMAKE), "project")
    assert CATALOG_ENTRY.stem == S4EXT.stem == "MIADeepLearning", "the description files are named after project()"
    assert entry["category"] == cmake["EXTENSION_CATEGORY"] == s4ext["category"]
    assert entry.get("build_dependencies", []) == cmake["EXTENSION_DEPENDS"].split() == s4ext["depends"].split()
    assert entry["scm_url"] == cmake["EXTENSION_HOMEPAGE"] == s4ext["scmurl"].removesuffix(".git")
    assert entry.get("scm_revision") == s4ext["scmrevision"] == "main"
    assert entry.get("build_subdirectory", ".") == s4ext["build_subdirectory"]
    assert entry.get("enabled", True) is (s4ext["enabled"] == "1")
    tier = entry.get("tier", 1)
    assert (tier == 1) == (cmake["EXTENSION_STATUS"] == "Experimental"), "an experimental extension is tier 1"


def test_licence_file_is_packaged_and_agrees_with_pyproject() -> None:
    licence = ROOT / "LICENSE.txt"
    assert licence.is_file(), "the index requires LICENSE.txt in the repository root"
    text = licence.read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    cmake = _cmake_extension_values(_cmake_text(TOP_CMAKE))
    # otherwise UseSlicer.cmake packages Slicer's own licence and README as this extension's
    assert cmake.get("EXTENSION_LICENSE_FILE") == "${CMAKE_CURRENT_SOURCE_DIR}/LICENSE.txt"
    assert cmake.get("EXTENSION_README_FILE") == "${CMAKE_CURRENT_SOURCE_DIR}/README.md"
    text = _cmake_text(TOP_CMAKE)
    assert text.index("EXTENSION_LICENSE_FILE") < text.index("include(${Slicer_USE_FILE})"), (
        "UseSlicer.cmake sets the defaults when it is included: set the files before")


def test_contributors_are_written_as_the_index_expects() -> None:
    contributors = _cmake_extension_values(_cmake_text(TOP_CMAKE))["EXTENSION_CONTRIBUTORS"]
    assert re.fullmatch(f"{_CONTRIBUTOR}(, {_CONTRIBUTOR})*", contributors), contributors
    names = re.findall(_CONTRIBUTOR, contributors)
    for module in _module_files():
        listed = re.search(r"self\.parent\.contributors = (\[[^\]]*\])", module.read_text(encoding="utf-8"))
        assert listed, f"{module.name} sets no parent.contributors"
        assert ast.literal_eval(listed.group(1)) == [name.strip() for name in names], (module.name, contributors)


def test_screenshot_urls_point_at_pictures_of_this_repository() -> None:
    text = _cmake_text(TOP_CMAKE)
    # the index reads the value with a one-line regular expression: one quoted string on one line
    assert re.search(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', text), "EXTENSION_SCREENSHOTURLS is not "\
        "one quoted line"
    assert re.search(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', text), "EXTENSION_ICONURL is not one quoted line"
    urls = _cmake_extension_values(text)["EXTENSION_SCREENSHOTURLS"].split()
    assert urls, "the index wants at least one screenshot"
    homepage = _cmake_extension_values(text)["EXTENSION_HOMEPAGE"]
    raw_base = homepage.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    for url in urls:
        assert url.startswith(raw_base) and url.lower().endswith((".png", ".jpg", ".jpeg", ".gif")), url
        picture = ROOT / url[len(raw_base):]
        assert picture.is_file(), f"{url} names a file that is not in the repository"
        assert picture.stat().st_size < 1_000_000, f"{picture.name}: the index downloads it; keep it under 1 MB"


def test_minimum_versions_are_said_everywhere() -> None:
    """The oldest Slicer and PyTorch (versions.py, enforced at Apply and in the worker) are the ones the README,
    the extension description and every module's help name."""
    import sys

    sys.path.insert(0, str(SOURCE_DIR))
    from MIADeepLearningLib import versions

    slicer_minimum = versions.dotted(versions.MINIMUM_SLICER_VERSION)
    torch_minimum = versions.dotted(versions.MINIMUM_TORCH_VERSION)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"Slicer {slicer_minimum} or newer" in readme, "README: say the oldest supported Slicer"
    assert f"PyTorch {torch_minimum} or newer" in readme, "README: say the oldest supported PyTorch"
    description = _cmake_extension_values(_cmake_text(TOP_CMAKE))["EXTENSION_DESCRIPTION"]
    assert f"Slicer {slicer_minimum} or newer" in description
    for module in _module_files():
        source = module.read_text(encoding="utf-8")
        assert "Needs 3D Slicer {slicer} or newer" in source and "PyTorch {torch} or newer" in source, module.name
        assert "slicer=versions.dotted(versions.MINIMUM_SLICER_VERSION)" in source, module.name
        assert "torch=versions.dotted(versions.MINIMUM_TORCH_VERSION)" in source, module.name


# (4) setup() hygiene, Python 3.9, module structure

# Calls that install, download or load torch; none may be reachable from setup() (generic tests run it).
_FORBIDDEN_IN_SETUP = re.compile(
    r"pip_install|pip_ensure|installTorch|importTorch|download|urlopen|urlretrieve|ensureDependencies", re.I
)


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


class _Namespace:
    """What a file can refer to by name: its top-level functions and classes, those it imports by name from the other
    files in `trees` (``from DLSegmentation import x``, ``from MIADeepLearningLib.gui.task_widget import Mixin``,
    ``from .dependencies import x``), and those files themselves (``from MIADeepLearningLib.gui import task_widget``),
    each function or class with the tree it lives in."""

    def __init__(self, tree: ast.Module, name: str, trees: dict[str, ast.Module]) -> None:
        self.functions = {node.name: (node, tree) for node in tree.body if isinstance(node, ast.FunctionDef)}
        self.classes = {cls_name: (node, tree) for cls_name, node in _classes(tree).items()}
        self.modules: dict[str, ast.Module] = {}
        package = name.split(".")[:-1]
        for node in tree.body:
            if not isinstance(node, ast.ImportFrom):
                continue
            base = package[: len(package) - (node.level - 1)] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                local = alias.asname or alias.name
                if f"{module}.{alias.name}" in trees:
                    self.modules[local] = trees[f"{module}.{alias.name}"]
                    continue
                other = trees.get(module)
                for item in other.body if other is not None else []:
                    if isinstance(item, ast.FunctionDef) and item.name == alias.name:
                        self.functions[local] = (item, other)
                    elif isinstance(item, ast.ClassDef) and item.name == alias.name:
                        self.classes[local] = (item, other)

    def resolve(self, node: ast.expr, kind: str) -> tuple | None:
        """`kind` ("functions" or "classes") named by ``x`` or ``module.x``, or None when it is not ours."""
        if isinstance(node, ast.Name):
            return getattr(self, kind).get(node.id)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in self.modules:
            tree = self.modules[node.value.id]
            for item in tree.body:
                wanted = ast.FunctionDef if kind == "functions" else ast.ClassDef
                if isinstance(item, wanted) and item.name == node.attr:
                    return item, tree
        return None


def _methods(cls: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in cls.body if isinstance(node, ast.FunctionDef)}


def _reachable_from_setup(
    tree: ast.Module, widget: ast.ClassDef, siblings: dict[str, ast.Module] | None = None
) -> list[tuple[str, ast.AST]]:
    """setup() and every method (self.x(), Class.x(), self.logic.x()), constructor (Class()) or function (x(),
    module.x()) it calls, transitively, also into the functions and classes the files in `siblings` (the other module
    files and MIADeepLearningLib/gui/, by module name) define, and into methods inherited from classes defined there
    (``class XWidget(TaskWidgetMixin, ...)``). ``self.logic`` is taken to be the module's Logic class
    (``XWidget`` -> ``XLogic``), as in every module."""
    siblings = siblings or {}
    names = {id(sibling): name for name, sibling in siblings.items()}
    namespaces: dict[int, _Namespace] = {}

    def namespace(module_tree: ast.Module) -> _Namespace:
        if id(module_tree) not in namespaces:
            namespaces[id(module_tree)] = _Namespace(module_tree, names.get(id(module_tree), ""), siblings)
        return namespaces[id(module_tree)]

    def all_methods(cls: ast.ClassDef, cls_tree: ast.Module, seen_classes: frozenset = frozenset()) -> dict:
        """name -> (method, its tree), own methods first, then the bases' left to right (as the MRO would)."""
        methods = {name: (method, cls_tree) for name, method in _methods(cls).items()}
        for base in cls.bases:
            found = namespace(cls_tree).resolve(base, "classes")
            if found is not None and id(found[0]) not in seen_classes:
                for name, item in all_methods(found[0], found[1], seen_classes | {id(cls)}).items():
                    methods.setdefault(name, item)
        return methods

    widget_methods = all_methods(widget, tree)
    logic_name = widget.name[: -len("Widget")] + "Logic" if widget.name.endswith("Widget") else None
    logic_class = _classes(tree).get(logic_name) if logic_name else None
    logic_methods = all_methods(logic_class, tree) if logic_class is not None else {}

    # (label, function, the tree it lives in, the methods `self.` refers to there)
    setup, setup_tree = widget_methods["setup"]
    todo = [("setup", setup, setup_tree, widget_methods)]
    seen, reached = set(), []
    while todo:
        name, function, module_tree, methods = todo.pop()
        if id(function) in seen:
            continue
        seen.add(id(function))
        reached.append((name, function))
        scope = namespace(module_tree)
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            owner = func.value if isinstance(func, ast.Attribute) else None
            if isinstance(owner, ast.Name) and owner.id == "self":
                if func.attr in methods:
                    target, target_tree = methods[func.attr]
                    todo.append((func.attr, target, target_tree, methods))
            elif (
                isinstance(owner, ast.Attribute) and owner.attr == "logic"
                and isinstance(owner.value, ast.Name) and owner.value.id == "self"
            ):
                if func.attr in logic_methods:  # e.g. self.logic.availableModels() in a shared mixin
                    target, target_tree = logic_methods[func.attr]
                    todo.append((f"{logic_class.name}.{func.attr}", target, target_tree, logic_methods))
            elif owner is not None and scope.resolve(owner, "classes") is not None:
                cls, cls_tree = scope.resolve(owner, "classes")  # e.g. DLSegmentationLogic.availableModels()
                cls_methods = all_methods(cls, cls_tree)
                if func.attr in cls_methods:
                    target, target_tree = cls_methods[func.attr]
                    # Mixin.__init__(self): `self` is still the caller's object, with the caller's methods
                    passes_self = bool(node.args) and isinstance(node.args[0], ast.Name) and node.args[0].id == "self"
                    self_methods = methods if passes_self else cls_methods
                    todo.append((f"{cls.name}.{func.attr}", target, target_tree, self_methods))
            elif scope.resolve(func, "functions") is not None:
                target, target_tree = scope.resolve(func, "functions")
                todo.append((target.name, target, target_tree, {}))
            elif scope.resolve(func, "classes") is not None:  # constructor: e.g. DLSegmentationLogic()
                cls, cls_tree = scope.resolve(func, "classes")
                cls_methods = all_methods(cls, cls_tree)
                if "__init__" in cls_methods:
                    target, target_tree = cls_methods["__init__"]
                    todo.append((f"{cls.name}.__init__", target, target_tree, cls_methods))
    return reached


def _gui_trees() -> dict[str, ast.Module]:
    """MIADeepLearningLib/gui/*.py by module name: the Slicer-side code the module files share."""
    trees = {}
    for path in sorted((LIB_DIR / "gui").glob("*.py")):
        parts = path.relative_to(SOURCE_DIR).with_suffix("").parts
        trees[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = _parse(path)
    return trees


def _module_trees() -> dict[str, ast.Module]:
    """The module files by stem, and the gui/ files they call into by module name."""
    return {**{module.stem: _parse(module) for module in _module_files()}, **_gui_trees()}


@pytest.mark.parametrize("module", _module_files(), ids=lambda path: path.stem)
def test_setup_installs_downloads_and_imports_nothing_heavy(module: Path) -> None:
    trees = _module_trees()
    tree = trees[module.stem]
    widget = _classes(tree)[f"{module.stem}Widget"]
    reached = _reachable_from_setup(tree, widget, trees)
    assert len(reached) > 1, "setup() should be followed into the methods it calls"
    problems = _setup_problems(reached)
    assert not problems, f"{module.name}: reachable from setup(): " + "; ".join(problems)


def test_setup_is_followed_into_the_shared_gui_code() -> None:
    """The shared setup part, the model list and the Logic's constructor live in gui/; they must be checked too."""
    trees = _module_trees()
    for stem in ("DLSegmentation", "DLSynthesis", "DLRegistration", "DLClassification", "DLLesionDetection"):
        widget = _classes(trees[stem])[f"{stem}Widget"]
        reached = {name for name, _ in _reachable_from_setup(trees[stem], widget, trees)}
        expected = {"_setupTaskWidget", "_populateModelComboBox", f"{stem}Logic.availableModels",
                    "TaskLogicMixin.__init__", "initializeParameterNode", "_updateButtons"}
        assert expected <= reached, f"{stem}: not followed: {sorted(expected - reached)}"


def _setup_problems(reached: list[tuple[str, ast.AST]]) -> list[str]:
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
    return problems


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


def test_setup_checker_follows_imports_from_other_module_files() -> None:
    """A helper or class imported by name from another file is checked like a local one."""
    other = ast.parse(
        "def helper():\n    return _install()\n"
        "def _install():\n    import slicer\n    slicer.util.pip_install('x')\n"
        "class OtherLogic:\n    def __init__(self):\n        self._load()\n"
        "    def _load(self):\n        import torch\n"
    )
    tree = ast.parse(
        "from Other import helper as shared, OtherLogic\n"
        "class XWidget:\n    def setup(self):\n        shared()\n        OtherLogic()\n"
    )
    reached = dict(_reachable_from_setup(tree, _classes(tree)["XWidget"], {"Other": other}))
    assert {"setup", "helper", "_install", "OtherLogic.__init__", "_load"} <= set(reached), sorted(reached)
    assert set(dict(_reachable_from_setup(tree, _classes(tree)["XWidget"]))) == {"setup"}


def test_setup_checker_follows_the_shared_gui_code() -> None:
    """Installs reached from setup() through gui/ are caught: an inherited mixin method, a gui function it calls
    (imported relatively from another gui file), self.logic.x() in the mixin, and Mixin.__init__(self) in a Logic."""
    dependencies = ast.parse("def ensureDependencies():\n    import slicer\n    slicer.util.pip_install('x')\n")
    task_widget = ast.parse(
        "from .dependencies import ensureDependencies\n"
        "class TaskWidgetMixin:\n"
        "    def _setupTaskWidget(self):\n        self._fill()\n        self.logic.availableModels()\n"
        "    def _fill(self):\n        ensureDependencies()\n        self._hook()\n"
        "    def _hook(self):\n        pass\n"
    )
    task_logic = ast.parse("class TaskLogicMixin:\n    def __init__(self):\n        self._warm()\n"
                           "    def _warm(self):\n        pass\n")
    tree = ast.parse(
        "from MIADeepLearningLib.gui.task_widget import TaskWidgetMixin\n"
        "from MIADeepLearningLib.gui import task_logic\n"
        "class XWidget(TaskWidgetMixin, ScriptedLoadableModuleWidget):\n"
        "    def setup(self):\n        self._setupTaskWidget()\n        self.logic = XLogic()\n"
        "    def _hook(self):\n        import torch\n"
        "class XLogic(task_logic.TaskLogicMixin):\n"
        "    def __init__(self):\n        task_logic.TaskLogicMixin.__init__(self)\n"
        "    def _warm(self):\n        slicer.packaging.pip_ensure([])\n"
        "    @staticmethod\n    def availableModels():\n        download()\n"
    )
    trees = {
        "MIADeepLearningLib.gui.dependencies": dependencies,
        "MIADeepLearningLib.gui.task_widget": task_widget,
        "MIADeepLearningLib.gui.task_logic": task_logic,
    }
    reached = _reachable_from_setup(tree, _classes(tree)["XWidget"], trees)
    assert {"setup", "_setupTaskWidget", "_fill", "ensureDependencies", "_hook", "XLogic.availableModels",
            "XLogic.__init__", "TaskLogicMixin.__init__", "_warm"} <= {name for name, _ in reached}, reached
    problems = " ".join(_setup_problems(reached))
    for culprit in ("calls pip_install()", "imports torch", "calls download()", "calls pip_ensure()"):
        assert culprit in problems, problems
    # The overriding method of the module is the one followed, not the mixin's empty one.
    assert "_hook:" in problems and "_warm:" in problems


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
    run_test = next(node for node in classes[f"{module.stem}Test"].body
                    if isinstance(node, ast.FunctionDef) and node.name == "runTest")
    first = ast.unparse(run_test.body[0]) if run_test.body else ""
    assert first == "self.setUp()", (
        f"{module.stem}Test.runTest must call self.setUp() first, as Slicer's templates do (Reload and Test calls "
        f"runTest directly); it starts with {first!r}")


def _scenario_modules_used(test_class: ast.ClassDef) -> dict[str, str]:
    """Local name -> file stem of every MIADeepLearningLib.testing module the self-test class imports."""
    used = {}
    for node in ast.walk(test_class):
        if isinstance(node, ast.ImportFrom) and node.module == f"{LIB_DIR.name}.testing":
            for alias in node.names:
                if (LIB_DIR / "testing" / f"{alias.name}.py").is_file():
                    used[alias.asname or alias.name] = alias.name
    return used


@pytest.mark.parametrize("module", _module_files(), ids=lambda path: path.stem)
def test_module_test_runs_the_shared_scenarios(module: Path) -> None:
    """Slicer's self-test must exercise the scenarios pytest runs, not a copy of them."""
    source = module.read_text(encoding="utf-8")
    test_class = _classes(ast.parse(source))[f"{module.stem}Test"]
    test_source = ast.get_source_segment(source, test_class) or ""
    used = _scenario_modules_used(test_class)
    assert used, f"{module.stem}Test imports no scenario module from {LIB_DIR.name}.testing"
    pytest_source = (ROOT / "Testing" / "Python" / "test_scenarios.py").read_text(encoding="utf-8")
    for local, stem in used.items():
        if stem in ("sample_data", "self_test", "__init__"):
            continue
        # either its own loop, or the shared one (testing/self_test.run_scenarios reports ScenarioSkipped as a skip)
        reports_skips = f"{local}.ScenarioSkipped" in test_source or "run_scenarios(" in test_source
        assert f"{local}.SCENARIOS" in test_source and reports_skips, (
            f"{module.stem}Test must run {stem}.SCENARIOS and report {stem}.ScenarioSkipped as a skip"
        )
        assert f"{stem}.SCENARIOS" in pytest_source, f"Testing/Python/test_scenarios.py does not run {stem}.SCENARIOS"


def test_every_task_module_is_checked() -> None:
    """The parametrized checks above run per module file; make sure every task module is among them."""
    assert {"DLSegmentation", "DLSynthesis", "DLRegistration", "DLClassification", "DLLesionDetection"} <= {
        module.stem for module in _module_files()}


def _declared_dependencies(tree: ast.Module, module_name: str) -> list[str]:
    """The list assigned to self.parent.dependencies in the module class."""
    for node in ast.walk(_classes(tree)[module_name]):
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(target, ast.Attribute) and target.attr == "dependencies" for target in node.targets)
            and isinstance(node.value, (ast.List, ast.Tuple))
        ):
            return [element.value for element in node.value.elts if isinstance(element, ast.Constant)]
    return []


@pytest.mark.parametrize("module", _module_files(), ids=lambda path: path.stem)
def test_imported_module_files_are_declared_dependencies(module: Path) -> None:
    """A module that imports another module file needs Slicer to load that one first (parent.dependencies)."""
    tree = _parse(module)
    others = {path.stem for path in _module_files()} - {module.stem}
    imported = {
        name
        for node in ast.walk(tree)
        for name in (
            [node.module] if isinstance(node, ast.ImportFrom) and not node.level else
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        )
        if name in others
    }
    missing = sorted(imported - set(_declared_dependencies(tree, module.stem)))
    assert not missing, f"{module.name} imports {missing}; add them to self.parent.dependencies"
