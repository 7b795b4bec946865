"""Getting model packages into the user cache: download a registry ``url`` model, import a folder or zip, remove.

Torch-free (stdlib + jsonschema, imported lazily), so the Slicer GUI and the CLI share it. Every package is checked
before it gets its final folder ``<cache>/models/<id>-<version>/``: safe extraction, layout (configs/metadata.json,
docs/README.md, LICENSE), metadata schema, sha256 of every weight file inside it, and agreement with its registry
entry. It is staged in a hidden temporary folder of the cache and renamed into place, so a failure leaves nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from MIADeepLearningLib import paths
from MIADeepLearningLib.engine import downloads, registry
from MIADeepLearningLib.engine.errors import ModelError

REQUIRED_LAYOUT = (registry.METADATA_RELATIVE_PATH, registry.MODEL_CARD_RELATIVE_PATH, registry.LICENSE_RELATIVE_PATH)
DOWNLOADS_SUBDIR = ".downloads"


def _staging_dir() -> Path:
    root = paths.models_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".staging-", dir=root))


def _package_root(folder: Path, where: str) -> Path:
    """The package inside an extracted or given folder: the folder itself or its single top-level subfolder."""
    if (folder / registry.METADATA_RELATIVE_PATH).is_file():
        return folder
    children = [child for child in folder.iterdir() if child.is_dir() and child.name not in ("__MACOSX",)]
    children = [child for child in children if (child / registry.METADATA_RELATIVE_PATH).is_file()]
    if len(children) == 1:
        return children[0]
    raise ModelError(f"{where} is not a model package (no {registry.METADATA_RELATIVE_PATH.as_posix()} found).")


def validate_package(package_dir: str | Path, where: str, entry: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a package folder before it is used: layout, schema, every weight inside it; return its metadata.

    With a registry ``entry``, the package must also carry the entry's version and exactly its files.
    """
    package_dir = Path(package_dir)
    for relative in REQUIRED_LAYOUT:
        if not (package_dir / relative).is_file():
            raise ModelError(
                f"{where} has no {relative.as_posix()} (a model package needs configs/metadata.json, "
                "docs/README.md and LICENSE)."
            )
    metadata_path = package_dir / registry.METADATA_RELATIVE_PATH
    label = f"{where} (its {registry.METADATA_RELATIVE_PATH.as_posix()})"
    model = registry.load_package(package_dir, strict=True, label=label)
    if entry is not None:
        problem = registry.disagreement_with_entry(model.metadata, entry)
        if problem:
            raise ModelError(f"{where} does not belong to the registered model '{entry['id']}' ({problem}).")
    for weight in model.weights:
        if weight.source.get("type", "package") != "package":
            continue  # e.g. weights in a wheel: verified when the model is loaded
        path = package_dir / registry.safe_relative_path(weight.path, where)
        if not path.is_file() or path.is_symlink():
            raise ModelError(f"{where} lacks its weight file {weight.path} listed in {metadata_path.name}.")
        if weight.size is not None and path.stat().st_size != weight.size:
            raise ModelError(
                f"Weight file {weight.path} of {where} has {path.stat().st_size} bytes instead of {weight.size}."
            )
        actual = registry.sha256_of_file(path)
        if actual != weight.sha256:
            raise ModelError(
                f"Weight file {weight.path} of {where} does not match its registered sha256 (expected "
                f"{weight.sha256[:12]}…, found {actual[:12]}…); the package was refused."
            )
    return model.metadata


def _write_marker(package_dir: Path, model_id: str, version: str, origin: str, source: str) -> None:
    """Record what was verified (and each weight's size and mtime) so listing does not re-hash large files."""
    metadata = json.loads((package_dir / registry.METADATA_RELATIVE_PATH).read_text(encoding="utf-8"))
    files = {}
    for item in metadata.get("slicer", {}).get("files", []):
        path = package_dir / item["path"]
        if item.get("source", {}).get("type", "package") == "package" and path.is_file():
            stat = path.stat()
            files[item["path"]] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": item["sha256"].lower()}
    marker = {
        "id": model_id,
        "version": version,
        "origin": origin,
        "source": source,
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metadata_sha256": registry.sha256_of_file(package_dir / registry.METADATA_RELATIVE_PATH),
        "files": files,
    }
    (package_dir / registry.INSTALL_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")


def _move_into_place(staged: Path, target: Path) -> None:
    """Rename the verified package to its final folder, replacing a copy that no longer verifies."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=target.parent))
        target.rename(trash / target.name)
        shutil.rmtree(trash, ignore_errors=True)
    staged.rename(target)


def _url_entry(model_id_or_entry: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(model_id_or_entry, dict):
        entry = model_id_or_entry
        registry.validate(entry, "registryModel", f"The registry entry of model '{entry.get('id')}'")
    else:
        entry = registry.registry_entry(model_id_or_entry)
        if entry is None:
            known = ", ".join(item["id"] for item in registry.registry_entries()) or "none"
            raise ModelError(f"Unknown model '{model_id_or_entry}' (registered: {known}).")
    if entry["source"]["type"] != "url":
        raise ModelError(f"Model '{entry['id']}' ships with the extension and needs no download.")
    return entry


def install_model(model_id_or_entry: str | dict[str, Any], progress: downloads.ProgressCallback | None = None) -> Path:
    """Download, verify and unpack a registry ``url`` model into <cache>/models/<id>-<version>; return that folder.

    Does nothing when a verified copy is already there. ``progress(bytes_done, bytes_total)`` follows the download.
    """
    entry = _url_entry(model_id_or_entry)
    model, _problem = registry.installed_url_model(entry)
    if model is not None:
        return model.package_dir
    source = entry["source"]
    target = registry.installed_dir(entry["id"], entry["version"])
    archive = paths.models_cache_dir() / DOWNLOADS_SUBDIR / f"{entry['id']}-{entry['version']}.zip"
    downloads.download_file(source["url"], archive, source["sha256"], size=source["size"], progress=progress)
    staging = _staging_dir()
    try:
        extracted = downloads.extract_zip_safely(archive, staging / "package")
        where = f"The package of model '{entry['id']}' downloaded from {source['url']}"
        package = _package_root(extracted, where)
        validate_package(package, where, entry=entry)
        _write_marker(package, entry["id"], entry["version"], "url", source["url"])
        _move_into_place(package, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        archive.unlink(missing_ok=True)
    return target


def download_model(model_id: str, progress: downloads.ProgressCallback | None = None) -> registry.ModelInfo:
    """CLI `models --download ID`: install a registry url model (if needed) and return it as the registry sees it."""
    install_model(model_id, progress=progress)
    return registry.get_model(model_id)


def _same_package(existing: Path, staged: Path) -> bool:
    """Two verified packages are the same when their metadata (which pins every weight's sha256) is identical."""
    metadata = registry.METADATA_RELATIVE_PATH
    return registry.sha256_of_file(existing / metadata) == registry.sha256_of_file(staged / metadata)


def import_model(path: str | Path) -> registry.ModelInfo:
    """CLI `models --import PATH`: check a model package folder or .zip and copy it into the user cache.

    The id is the metadata's slicer.id, else the package folder's (or zip's) name. A package for a registry ``url``
    entry installs that entry (air-gapped download); ids of built-in models are refused, and so is a different
    package under an id already imported (remove it first with remove_model). Importing the same package twice is
    harmless.
    """
    source = Path(path).expanduser()
    where = f"The model package {source}"
    if not source.exists():
        raise ModelError(f"{where} does not exist.")
    staging = _staging_dir()
    try:
        if source.is_dir():
            package_source = _package_root(source, where)
            package = staging / "package"
            shutil.copytree(package_source, package, ignore=shutil.ignore_patterns(registry.INSTALL_MARKER))
            default_id = package_source.name
        elif zipfile.is_zipfile(source):
            extracted = downloads.extract_zip_safely(source, staging / "extracted")
            package = _package_root(extracted, where)
            default_id = package.name if package != extracted else source.stem
        else:
            raise ModelError(f"{where} is neither a folder nor a zip archive.")
        metadata = validate_package(package, where)
        model_id = metadata["slicer"].get("id") or default_id
        registry.validate(model_id, "modelId", f"{where} (its id '{model_id}')")
        version = str(metadata["version"])
        entry = registry.registry_entry(model_id)
        if entry is not None and entry["source"]["type"] != "url":
            raise ModelError(
                f"{where} uses the id '{model_id}' of a model built into the extension; give it its own id."
            )
        if entry is not None:
            validate_package(package, where, entry=entry)
        target = registry.installed_dir(model_id, version)
        existing = _existing_versions(model_id)
        if target in existing and _still_verifies(target, entry):
            if _same_package(target, package):
                return _installed_model(model_id, entry)
            raise ModelError(
                f"A different package of model '{model_id}' version {version} is already installed; remove it first."
            )
        others = [folder for folder in existing if folder != target]
        if others and entry is None:
            raise ModelError(
                f"Model '{model_id}' is already installed in another version ({others[0].name}); remove it first."
            )
        _write_marker(package, model_id, version, "url" if entry else "import", str(source))
        _move_into_place(package, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _installed_model(model_id, entry)


def _still_verifies(package_dir: Path, entry: dict[str, Any] | None) -> bool:
    """Whether an installed copy is intact (a damaged one may be replaced by a new import)."""
    marker = registry.read_install_marker(package_dir)
    try:
        model = registry.load_package(package_dir, marker["id"], entry=entry) if marker else None
        return model is not None and registry.installed_package_problem(model, marker) is None
    except (ModelError, OSError):
        return False


def _existing_versions(model_id: str) -> list[Path]:
    root = paths.models_cache_dir()
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        marker = registry.read_install_marker(folder)
        if marker and marker["id"] == model_id and not folder.name.startswith("."):
            found.append(folder)
    return found


def _installed_model(model_id: str, entry: dict[str, Any] | None) -> registry.ModelInfo:
    if entry is not None:
        model, problem = registry.installed_url_model(entry)
        if model is None:
            raise ModelError(f"Model '{model_id}' was installed but does not verify ({problem}).")
        return model
    for model in registry.imported_models(skip_ids=set()):
        if model.id == model_id:
            return model
    raise ModelError(f"Model '{model_id}' was imported but does not verify; see the log for the reason.")


def remove_model(model_id: str) -> list[Path]:
    """Delete every cached copy (downloaded or imported) of a model; return the folders removed."""
    removed = []
    for folder in _existing_versions(model_id):
        shutil.rmtree(folder)
        removed.append(folder)
    if not removed:
        raise ModelError(f"Model '{model_id}' has no downloaded or imported copy to remove.")
    return removed


def downloadable_models() -> list[dict[str, Any]]:
    """Registry url models with whether they are installed, for `models` listings and a Download button."""
    rows = []
    for entry in registry.registry_entries():
        if entry["source"]["type"] != "url":
            continue
        model, problem = registry.installed_url_model(entry)
        rows.append({
            "id": entry["id"],
            "title": entry["title"],
            "task": entry["task"],
            "version": entry["version"],
            "license": entry["license"],
            "url": entry["source"]["url"],
            "size": entry["source"]["size"],
            "installed": model is not None,
            "problem": problem,
        })
    return rows
