"""Getting model packages into the user cache: download a registry ``url`` model, import a folder or zip (a package of
this extension or a MONAI Model Zoo bundle as downloaded), remove, replace, confirm, correct segment names.

Torch-free at import time (stdlib + jsonschema, imported lazily), so the Slicer GUI and the CLI share it; only the
check of a MONAI bundle's network and weights (engine.bundles.check_bundle) needs torch, and is imported then.
Every package is checked before it gets its final folder ``<cache>/models/<id>-<version>/``: safe extraction,
layout (configs/metadata.json, docs/README.md, LICENSE), metadata schema, sha256 of every weight file inside it,
agreement with its registry entry, and for a MONAI bundle: its inference config parses, its network builds and its
weights load. It is staged in a hidden temporary folder of the cache and renamed into place, so a failure leaves
nothing. A bundle's config is code: importing anything but the exact zip a registry entry pins needs the user's
confirmation (``trust_code``), recorded in the install marker and checked before every run
(registry.trust_problem).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

from MIADeepLearningLib import paths
from MIADeepLearningLib.engine import downloads, registry, zoo
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


def validate_package(package_dir: str | Path, where: str, entry: dict[str, Any] | None = None,
                     known_sha256: dict[str, str] | None = None) -> dict[str, Any]:
    """Check a package folder before it is used: layout, schema, every weight inside it; return its metadata (with
    the derived slicer section merged in for a zoo bundle).

    With a registry ``entry``, the package must also carry the entry's version and exactly its files.
    ``known_sha256`` (path -> sha256 just computed from the same files) spares hashing large weights twice.
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
                f"{where} has a weight file {weight.path} of {path.stat().st_size} bytes instead of {weight.size}."
            )
        actual = known_sha256.get(weight.path) if known_sha256 else None
        actual = actual or registry.sha256_of_file(path)
        if actual != weight.sha256:
            raise ModelError(
                f"{where} has a weight file {weight.path} that does not match its registered sha256 (expected "
                f"{weight.sha256[:12]}…, found {actual[:12]}…); the package was refused."
            )
    return model.metadata


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write_marker(package_dir: Path, model_id: str, version: str, origin: str, source: str,
                  trust: dict[str, Any] | None = None) -> None:
    """Record what was verified (and each weight's size and mtime) so listing does not re-hash large files, the
    digests of the derived slicer section and of the code, and whether (and when) the user confirmed the code."""
    model = registry.load_package(package_dir, model_id)
    files = {}
    for weight in model.weights:
        path = package_dir / weight.path
        if weight.source.get("type", "package") == "package" and path.is_file():
            stat = path.stat()
            files[weight.path] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": weight.sha256}
    marker = {
        "id": model_id,
        "version": version,
        "origin": origin,
        "source": source,
        "installed_at": _now(),
        "metadata_sha256": registry.sha256_of_file(package_dir / registry.METADATA_RELATIVE_PATH),
        "code_sha256": registry.code_digest(package_dir),
        "files": files,
    }
    if model.derived_slicer:
        marker["slicer_sidecar_sha256"] = registry.sha256_of_file(package_dir / registry.SLICER_SIDECAR)
    if trust:
        marker["trust"] = trust
    _write_json(package_dir / registry.INSTALL_MARKER, marker)


def _write_json(path: Path, content: Any) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(content, indent=2), encoding="utf-8")
    partial.replace(path)


def _move_into_place(staged: Path, target: Path) -> None:
    """Rename the verified package to its final folder, replacing the copy there (put back if the rename fails)."""
    trash = None
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=target.parent))
        target.rename(trash / target.name)
    try:
        staged.rename(target)
    except OSError:
        if trash is not None:
            (trash / target.name).rename(target)
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


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


def _same_package(existing: Path, staged: Path, model_id: str) -> bool:
    """Two verified packages are the same when their metadata, their code and every weight's sha256 agree."""
    metadata = registry.METADATA_RELATIVE_PATH
    if registry.sha256_of_file(existing / metadata) != registry.sha256_of_file(staged / metadata):
        return False
    if registry.code_digest(existing) != registry.code_digest(staged):
        return False
    weights = [
        sorted((weight.path, weight.sha256) for weight in registry.load_package(folder, model_id).weights)
        for folder in (existing, staged)
    ]
    return weights[0] == weights[1]


# ------------------------------------------------------------------------------------------ reading before import


class ConfirmationNeeded(ModelError):
    """The package's code may run only after the user confirmed it: import again with trust_code=True.

    ``description`` is describe_package's dict, for a dialog that shows origin, title, version and authors.
    """

    def __init__(self, message: str, description: dict[str, Any]):
        super().__init__(message)
        self.description = description


MAX_MEMBER_BYTES = 64 << 20  # metadata and configs read from a zip before it is extracted


class _PackageReader:
    """Files of a package folder or zip, read without copying or extracting anything (for describe_package and the
    refusals that must come before anything is written to the cache)."""

    def __init__(self, source: Path, where: str):
        self.source, self.where = source, where
        self._zip: zipfile.ZipFile | None = None
        if source.is_dir():
            self.root = _package_root(source, where)
            self.default_id = self.root.name
            self._names = sorted(
                path.relative_to(self.root).as_posix() for path in self.root.rglob("*") if path.is_file()
            )
            return
        if not zipfile.is_zipfile(source):
            raise ModelError(f"{where} is neither a folder nor a zip archive.")
        try:
            self._zip = zipfile.ZipFile(source)
        except (OSError, zipfile.BadZipFile) as error:
            raise ModelError(f"{source.name} is not a valid zip archive ({error}).") from error
        entries = self._zip.infolist()
        # the same checks as the extraction, so an unsafe archive is named as such before anything else
        downloads._check_entries(source, entries, downloads.MAX_EXTRACTED_BYTES, downloads.MAX_ZIP_ENTRIES)
        names = [info.filename.replace("\\", "/") for info in entries if not info.is_dir()]
        metadata = registry.METADATA_RELATIVE_PATH.as_posix()
        if metadata in names:
            self.prefix = ""
        else:
            prefixes = {name[: -len(metadata)] for name in names
                        if name.endswith("/" + metadata) and name.count("/") == 2 and not name.startswith("__MACOSX")}
            if len(prefixes) != 1:
                raise ModelError(f"{where} is not a model package (no {metadata} found).")
            self.prefix = prefixes.pop()
        self.default_id = self.prefix.rstrip("/") or source.stem
        self._names = sorted(name[len(self.prefix):] for name in names if name.startswith(self.prefix))

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def names(self) -> list[str]:
        return list(self._names)

    def read_text(self, relative: str) -> str | None:
        """A small text file of the package, None when it is absent."""
        if relative not in self._names:
            return None
        try:
            if self._zip is None:
                data = (self.root / relative).read_bytes()[: MAX_MEMBER_BYTES + 1]
            else:
                info = self._zip.getinfo(self.prefix + relative)
                if info.file_size > MAX_MEMBER_BYTES:
                    raise ModelError(f"{self.where} has an oversized {relative} ({info.file_size} bytes).")
                data = self._zip.read(info)
        except (OSError, zipfile.BadZipFile, KeyError) as error:
            raise ModelError(f"{self.where} cannot be read ({type(error).__name__}: {error}).") from error
        if len(data) > MAX_MEMBER_BYTES:
            raise ModelError(f"{self.where} has an oversized {relative}.")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ModelError(f"{self.where} has a {relative} that is not UTF-8 text.") from error


def _authors(metadata: dict[str, Any]) -> str:
    authors = metadata.get("authors") or metadata.get("author") or ""
    return ", ".join(str(item) for item in authors) if isinstance(authors, list) else str(authors)


def _describe(reader: _PackageReader, source: Path, where: str) -> dict[str, Any]:
    metadata_text = reader.read_text(registry.METADATA_RELATIVE_PATH.as_posix())
    label = f"{where} (its {registry.METADATA_RELATIVE_PATH.as_posix()})"
    try:
        metadata = json.loads(metadata_text or "")
    except ValueError as error:
        raise ModelError(f"{label} is not valid JSON ({error}).") from error
    if not isinstance(metadata, dict):
        raise ModelError(f"{label} is not a JSON object.")
    slicer = metadata.get("slicer") if isinstance(metadata.get("slicer"), dict) else None
    names = reader.names()
    config_name = next((f"configs/{name}" for name in zoo.INFERENCE_CONFIG_NAMES if f"configs/{name}" in names), None)
    config, config_problem = None, None
    if config_name:
        try:
            config = zoo.parse_config_text(reader.read_text(config_name) or "", config_name)
        except ModelError as error:
            config_problem = str(error)
    if slicer is not None:
        kind = str(slicer.get("task", ""))
    else:
        kind = zoo.bundle_kind(metadata, config)
    model_id = str((slicer or {}).get("id") or reader.default_id)
    entry = _registry_entry_or_none(model_id)
    pinned = bool(
        entry is not None and entry["source"]["type"] == "url" and source.is_file()
        and registry.sha256_of_file(source) == entry["source"]["sha256"]
    )
    python_files = [name for name in names if name.endswith(".py")]
    return {
        "id": model_id,
        "title": str((slicer or {}).get("title") or metadata.get("name") or model_id),
        "version": str(metadata.get("version", "")),
        "authors": _authors(metadata),
        "license": str(metadata.get("license", "")),
        "description": str(metadata.get("description", "")),
        "kind": kind,
        "origin": str(source),
        "zoo_bundle": slicer is None,
        "inference_config": config_name,
        "config_problem": config_problem,
        "has_scripts": any(name.startswith("scripts/") for name in names),
        "python_files": python_files,
        "carries_code": bool(config_name or python_files),
        "registry_pinned": pinned,
    }


def _registry_entry_or_none(model_id: str) -> dict[str, Any] | None:
    try:
        registry.validate(model_id, "modelId", "id")
    except ModelError:
        return None
    return registry.registry_entry(model_id)


def describe_package(path: str | Path) -> dict[str, Any]:
    """What a folder or zip holds, from its metadata only (nothing is copied, nothing runs), for the confirmation
    shown before import: id, title, version, authors, license, kind, origin (the path), whether it has scripts/ or
    other Python files, whether it carries code (any bundle config is code), and whether it is the exact zip a
    registry entry pins (then no confirmation is needed)."""
    source = Path(path).expanduser()
    where = f"The model package {source}"
    if not source.exists():
        raise ModelError(f"{where} does not exist.")
    reader = _PackageReader(source, where)
    try:
        return _describe(reader, source, where)
    finally:
        reader.close()


def confirmation_text(description: dict[str, Any]) -> str:
    """The question to ask before an import, in one sentence (also the ConfirmationNeeded message)."""
    authors = description["authors"] or "unknown authors"
    scripts = ", with Python scripts" if description["python_files"] else ""
    return (
        f"The model package {description['origin']} ('{description['title']}' version {description['version']} by "
        f"{authors}{scripts}) contains code that will run on this computer, so importing a model is like installing "
        "software: import it only if you trust where it comes from"
    )


# ------------------------------------------------------------------------------------------------------- import


def _stage(source: Path, staging: Path, where: str) -> Path:
    """A private copy of the package in the cache's staging folder, without any sidecar it may carry."""
    if source.is_dir():
        package = staging / "package"
        shutil.copytree(_package_root(source, where), package, symlinks=True,
                        ignore=shutil.ignore_patterns(*registry.SIDECARS))
        for path in package.rglob("*"):
            if path.is_symlink():
                relative = path.relative_to(package).as_posix()
                raise ModelError(f"{where} contains a symbolic link ({relative}); nothing was imported.")
    else:
        extracted = downloads.extract_zip_safely(source, staging / "extracted")
        package = _package_root(extracted, where)
        for name in registry.SIDECARS:
            (package / name).unlink(missing_ok=True)
    return package


def _check_bundle(model: registry.ModelInfo, weight_paths: dict[str, Path]) -> dict[str, Any]:
    """engine.bundles.check_bundle (configs parse, the network builds, the weights load into it): imported only
    here, since it needs torch and MONAI."""
    try:
        from MIADeepLearningLib.engine import bundles
    except ImportError as error:
        raise ModelError(
            f"Checking model '{model.title}' before import needs PyTorch, which is not installed ({error})."
        ) from error
    with warnings.catch_warnings():  # MONAI's deprecation warnings say nothing to the user importing a model
        warnings.simplefilter("ignore")
        return bundles.check_bundle(model, weight_paths)


def _validate_bundle(package: Path, model: registry.ModelInfo, where: str, zoo_bundle: bool) -> dict[str, Any]:
    """What can be checked at import: the inference config is there and parses, the network builds and the
    weights load into it (engine.bundles.check_bundle); its report."""
    config = zoo.inference_config_path(package)
    if config is None:
        raise ModelError(f"{where} has no configs/inference.json or configs/inference.yaml, so it cannot run.")
    zoo.read_config(config)
    if not zoo_bundle and model.task == "segmentation":
        kind = zoo.bundle_kind(model.metadata, zoo.read_config(config))
        if kind in (zoo.DETECTION, zoo.CLASSIFICATION, zoo.GENERATIVE):
            zoo.refuse_unless_runnable(kind, model.title)
    weight_paths = {weight.role: package / weight.path for weight in model.weights
                    if weight.source.get("type", "package") == "package"}
    return _check_bundle(model, weight_paths)


def _add_check_results(package: Path, report: dict[str, Any]) -> None:
    """Store what the check found (segments from the bundle's labels, input channel names, notes) in the derived
    slicer section."""
    sidecar = package / registry.SLICER_SIDECAR
    section = json.loads(sidecar.read_text(encoding="utf-8"))
    segments = []
    for segment in report.get("segments") or []:
        if int(segment.get("value", 0)) < 1:
            continue
        item = {"value": int(segment["value"]), "name": str(segment.get("name") or f"Label {segment['value']}")}
        if segment.get("color") is not None:
            item["color"] = [int(channel) for channel in segment["color"]][:3]
        if segment.get("terminology"):
            item["terminology"] = str(segment["terminology"])
        segments.append(item)
    section["segments"] = segments
    for key in ("input_channels", "notes"):
        if report.get(key):
            section[key] = [str(item) for item in report[key]]
    if report.get("kind"):
        section["bundle_kind"] = str(report["kind"])
    _write_json(sidecar, section)


def import_model(path: str | Path, trust_code: bool = False, replace: bool = False) -> registry.ModelInfo:
    """CLI `models --import PATH`: check a model package folder or .zip and copy it into the user cache.

    A MONAI Model Zoo bundle is taken as downloaded: without a ``slicer`` section in its metadata, what the
    extension needs is derived (engine.zoo) and stored beside it in the installed copy (registry.SLICER_SIDECAR).
    Bundles this version cannot run (detection, classification, generative, ...) are refused before anything is
    written. Every package's code must be confirmed (``trust_code``; ConfirmationNeeded otherwise), except the exact
    zip a registry entry pins. A MONAI bundle is checked before it is installed: its config parses, its network
    builds, its weights load. The id is the metadata's slicer.id, else the package folder's (or zip's) name. ids of
    built-in models are refused; a different package under an id already installed is refused unless ``replace``
    (then the new one is fully checked first and the old copies go only once it is in place). Importing the same
    package twice is harmless (and records the confirmation).
    """
    source = Path(path).expanduser()
    where = f"The model package {source}"
    description = describe_package(source)
    model_id = description["id"]
    if description["zoo_bundle"]:
        zoo.refuse_unless_runnable(description["kind"], description["title"])
        if description["inference_config"] is None:
            raise ModelError(
                f"{where} has no configs/inference.json or configs/inference.yaml, so this extension cannot run it."
            )
    registry.validate(model_id, "modelId", f"{where} (its id '{model_id}')")
    entry = registry.registry_entry(model_id)
    if entry is not None and entry["source"]["type"] != "url":
        raise ModelError(f"{where} uses the id '{model_id}' of a model built into the extension; give it its own id.")
    pinned = description["registry_pinned"]
    if not pinned and not trust_code:
        raise ConfirmationNeeded(confirmation_text(description) + ".", description)
    trust = {"pinned": True} if pinned else {"confirmed": True, "at": _now(), "origin": str(source)}
    staging = _staging_dir()
    try:
        package = _stage(source, staging, where)
        known_sha256 = None
        if description["zoo_bundle"]:
            metadata = json.loads((package / registry.METADATA_RELATIVE_PATH).read_text(encoding="utf-8"))
            section = zoo.derive_slicer_section(package, metadata, model_id, where)
            known_sha256 = {item["path"]: item["sha256"] for item in section["files"]}
            _write_json(package / registry.SLICER_SIDECAR, section)
        metadata = validate_package(package, where, known_sha256=known_sha256)
        version = str(metadata["version"])
        if entry is not None:
            validate_package(package, where, entry=entry, known_sha256=known_sha256)
        model = registry.load_package(package, model_id, entry=entry, label=where)
        if model.pipeline == registry.MONAI_BUNDLE_PIPELINE:
            report = _validate_bundle(package, model, where, description["zoo_bundle"])
            if description["zoo_bundle"]:
                _add_check_results(package, report)
                registry.load_package(package, model_id, strict=True, label=where)
        elif not model.pipeline:
            raise ModelError(
                f"{where} names no pipeline in its metadata and has no configs/inference.json or "
                "configs/inference.yaml, so this extension cannot run it."
            )
        target = registry.installed_dir(model_id, version)
        existing = _existing_versions(model_id)
        if target in existing and _still_verifies(target, entry) and _same_package(target, package, model_id):
            if not pinned:
                _record_trust(target, trust)
            return _installed_model(model_id, entry)
        conflicts = [folder for folder in existing
                     if folder != target or _still_verifies(folder, entry)]
        if entry is not None:  # a registry model may have its versions side by side
            conflicts = [folder for folder in conflicts if folder == target]
        if conflicts and not replace:
            installed = registry.read_install_marker(conflicts[0]) or {}
            raise ModelError(
                f"A different package of model '{model_id}' (version {installed.get('version', '?')}) is already "
                f"installed; replace it with {registry.CLI} models --import {source} --replace, or remove it with "
                f"{registry.CLI} models --remove {model_id}."
            )
        _write_marker(package, model_id, version, "url" if pinned else "import", str(source), trust)
        _move_into_place(package, target)
        for folder in conflicts:
            if folder != target:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _installed_model(model_id, entry)


def _record_trust(package_dir: Path, trust: dict[str, Any]) -> None:
    marker = registry.read_install_marker(package_dir)
    if marker is not None:
        marker["trust"] = trust
        _write_json(package_dir / registry.INSTALL_MARKER, marker)


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


def _refuse_builtin(model_id: str, what: str) -> None:
    entry = _registry_entry_or_none(model_id)
    if entry is not None and entry["source"]["type"] != "url":
        raise ModelError(f"Model '{model_id}' is built into the extension, so it cannot be {what}.")


def remove_model(model_id: str) -> list[Path]:
    """Delete every cached copy (downloaded or imported) of a model; return the folders removed."""
    _refuse_builtin(model_id, "removed")
    removed = []
    for folder in _existing_versions(model_id):
        shutil.rmtree(folder)
        removed.append(folder)
    if not removed:
        raise ModelError(f"Model '{model_id}' has no downloaded or imported copy to remove.")
    return removed


def _installed_copies(model_id: str, what: str) -> list[Path]:
    _refuse_builtin(model_id, what)
    folders = _existing_versions(model_id)
    if not folders:
        raise ModelError(
            f"Model '{model_id}' has no downloaded or imported copy (import one with {registry.CLI} models "
            "--import PATH)."
        )
    return folders


def trust_model(model_id: str) -> registry.ModelInfo:
    """CLI `models --trust ID`: record that the code of an imported model may run (every installed version)."""
    folders = _installed_copies(model_id, "confirmed (it needs no confirmation)")
    for folder in folders:
        marker = registry.read_install_marker(folder) or {}
        if not (marker.get("trust") or {}).get("pinned"):
            _record_trust(folder, {"confirmed": True, "at": _now(), "origin": str(marker.get("source", ""))})
    return registry.get_model(model_id)


def describe_installed(model_id: str) -> dict[str, Any]:
    """describe_package for an installed copy (for the question asked before `models --trust ID`)."""
    folder = _installed_copies(model_id, "confirmed (it needs no confirmation)")[-1]
    description = describe_package(folder)
    marker = registry.read_install_marker(folder) or {}
    return {**description, "id": model_id, "origin": str(marker.get("source") or folder)}


def set_segments(model_id: str, segments_file: str | Path) -> registry.ModelInfo:
    """CLI `models --segments ID FILE.json`: store the user's segment names, colours and terminology in the
    installed copy (registry.SEGMENTS_SIDECAR), applied over the package's own segments by label value.

    FILE.json: a list of {"value": label value >= 1, "name": text, "color": [r, g, b] 0-255 (optional),
    "terminology": a Slicer terminology string (optional)}, or {"segments": [...]}; an empty list removes the
    corrections.
    """
    folders = _installed_copies(model_id, "changed (copy it as a package with its own id and import that)")
    segments_file = Path(segments_file).expanduser()
    where = f"The segments file {segments_file}"
    try:
        content = json.loads(segments_file.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ModelError(f"{where} does not exist.") from error
    except (OSError, UnicodeError, ValueError) as error:
        raise ModelError(f"{where} is not readable JSON ({' '.join(str(error).split())}).") from error
    if content == [] or content == {"segments": []}:
        for folder in folders:
            (folder / registry.SEGMENTS_SIDECAR).unlink(missing_ok=True)
        return registry.get_model(model_id)
    segments = registry.check_segment_corrections(content, where)
    for folder in folders:
        _write_json(folder / registry.SEGMENTS_SIDECAR, segments)
    return registry.get_model(model_id)


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
