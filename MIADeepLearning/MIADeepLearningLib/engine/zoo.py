"""MONAI Model Zoo bundles as downloaded: where their inference config is, and what kind of model they are.

A zoo bundle describes itself in ``configs/metadata.json`` (``network_data_format``: inputs and outputs) and in an
inference config that may be JSON or YAML (6 of the zoo's 31 bundles ship only YAML). Both the import (to refuse
what cannot run before anything is copied) and the run (to refuse before any work) ask this module, so the two
always agree. Nothing here runs config code: configs are read as plain data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from MIADeepLearningLib.engine.errors import ModelError

CONFIG_DIR = "configs"
INFERENCE_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")

# What a bundle is, from its own description; only the first two run in this version.
SEGMENTATION_3D = "segmentation"
SEGMENTATION_2D = "segmentation-2d"  # a 2-D network run slice by slice over the 3-D volume (SliceInferer)
DETECTION = "detection"
CLASSIFICATION = "classification"
GENERATIVE = "generative"
OTHER = "other"
RUNNABLE_KINDS = (SEGMENTATION_3D, SEGMENTATION_2D)
PYYAML_REQUIREMENT = "pyyaml>=5.4"

_REFUSALS = {
    DETECTION: "it is a detection bundle (it returns boxes, not a label map); this version runs segmentation bundles "
               "only, and detection bundles are not supported yet",
    CLASSIFICATION: "it is a classification bundle (it returns class scores, not a label map); this version runs "
                    "segmentation bundles only",
    GENERATIVE: "it is a generative bundle (it makes images, not a label map); this version runs segmentation "
                "bundles only",
    OTHER: "its metadata does not describe a segmentation output (network_data_format.outputs with type 'image' and "
           "format 'segmentation' or 'labels'); this version runs segmentation bundles only",
}


def inference_config_path(package_dir: str | Path) -> Path | None:
    """configs/inference.json, else configs/inference.yaml (or .yml); None when the bundle has none."""
    for name in INFERENCE_CONFIG_NAMES:
        path = Path(package_dir) / CONFIG_DIR / name
        if path.is_file():
            return path
    return None


def parse_config_text(text: str, name: str) -> dict[str, Any]:
    """Config text as plain data: JSON, or YAML (by ``name``'s suffix) read with the safe loader (no objects built)."""
    try:
        if Path(name).suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as error:
                raise ModelError(
                    f"{Path(name).name} is a YAML config and reading it needs the Python package PyYAML, which is "
                    f"not installed (install it with: pip install pyyaml)."
                ) from error
            content = yaml.safe_load(text)
        else:
            content = json.loads(text)
    except ModelError:
        raise
    except Exception as error:  # JSON or YAML syntax
        detail = " ".join(str(error).split()).rstrip(".")
        raise ModelError(f"The bundle config {name} cannot be read ({detail}).") from error
    if not isinstance(content, Mapping):
        raise ModelError(f"The bundle config {name} is not a mapping of settings.")
    return dict(content)


def read_config(path: str | Path) -> dict[str, Any]:
    """A bundle config file as plain data (JSON, or YAML read with the safe loader: no objects are built)."""
    path = Path(path)
    name = f"{path.parent.name}/{path.name}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as error:
        detail = " ".join(str(error).split()).rstrip(".")
        raise ModelError(f"The bundle config {name} cannot be read ({detail}).") from error
    return parse_config_text(text, name)


def _target(item: Any) -> str:
    """The class name a config component builds ("monai.inferers.SliceInferer" -> "SliceInferer")."""
    target = item.get("_target_", "") if isinstance(item, Mapping) else ""
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else ""


def main_output(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    """The description of the bundle's prediction (``network_data_format.outputs.pred``, else the first output)."""
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    if not isinstance(outputs, Mapping) or not outputs:
        return {}
    output = outputs.get("pred") or next(iter(outputs.values()))
    return output if isinstance(output, Mapping) else {}


def bundle_kind(metadata: Mapping[str, Any], config: Mapping[str, Any] | None) -> str:
    """One of the kinds above, from the bundle's output description, inferer and network (plain data only)."""
    output = main_output(metadata)
    kind, form = str(output.get("type", "")).lower(), str(output.get("format", "")).lower()
    config = config or {}
    inferer, network = _target(config.get("inferer")), _target(config.get("network_def"))
    if kind in ("object", "box", "boxes") or form in ("dict", "box", "boxes") or "detect" in inferer.lower() \
            or "retinanet" in network.lower():
        return DETECTION
    classifier = any(name in network for name in ("TorchVisionFCModel", "DenseNet", "EfficientNet", "Classifier",
                                                  "SEResNet", "ViT"))
    if classifier:
        return CLASSIFICATION
    if kind in ("probabilities", "probability", "label", "labels", "tuples") and form not in ("segmentation",):
        return CLASSIFICATION if kind != "tuples" else OTHER
    if form in ("classes", "classification", "regression"):
        return CLASSIFICATION
    if kind == "feature" or "diffusion" in network.lower() or "autoencoder" in network.lower():
        return GENERATIVE
    if kind == "image" and form in ("segmentation", "labels", "label"):
        spatial = output.get("spatial_shape") or []
        network_dims = config.get("network_def", {}).get("spatial_dims") if isinstance(
            config.get("network_def"), Mapping) else None
        if inferer == "SliceInferer" or network_dims == 2 or (isinstance(spatial, list) and len(spatial) == 2):
            return SEGMENTATION_2D
        return SEGMENTATION_3D
    if kind == "image" and form in ("magnitude", "hounsfield"):
        return GENERATIVE
    return OTHER


def input_channel_names(metadata: Mapping[str, Any], image_key: str = "image") -> list[str]:
    """Names of the image channels the bundle takes (``inputs.<key>.channel_def``, else ``num_channels``)."""
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    entry = inputs.get(image_key) if isinstance(inputs, Mapping) else None
    if not isinstance(entry, Mapping) and isinstance(inputs, Mapping) and inputs:
        entry = next(iter(inputs.values()))
    if not isinstance(entry, Mapping):
        return []
    channel_def = entry.get("channel_def") if isinstance(entry.get("channel_def"), Mapping) else {}
    try:
        count = int(entry.get("num_channels") or len(channel_def) or 0)
    except (TypeError, ValueError):
        count = len(channel_def)
    return [str(channel_def.get(str(index), channel_def.get(index, f"channel {index}"))) for index in range(count)]


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Config overrides of a bundle run from "KEY=VALUE" items (MONAI's override syntax for the key, e.g.
    "network_def#in_channels=2"; the value is read as JSON when it parses, else kept as text): the CLI's repeated
    --config and the module's "Bundle settings" field (items separated by ";") both come here. ValueError (one
    sentence) for an item that is not KEY=VALUE."""
    overrides: dict[str, Any] = {}
    for item in items:
        if not item.strip():
            continue
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"'{item.strip()}' must be KEY=VALUE (for example network_def#in_channels=2).")
        try:
            overrides[key.strip()] = json.loads(value)
        except ValueError:
            overrides[key.strip()] = value.strip()
    return overrides


def refuse_unless_runnable(kind: str, title: str) -> None:
    """One sentence, before any work, for a bundle this version cannot run."""
    if kind not in RUNNABLE_KINDS:
        raise ModelError(f"Model '{title}' cannot run here: {_REFUSALS.get(kind, _REFUSALS[OTHER])}.")


# ------------------------------------------------------------------------------------------ weights of a zoo bundle

LARGE_FILES_NAMES = ("large_files.yml", "large_files.yaml", "large_files.json")
WEIGHT_SUFFIXES = (".pt", ".pth", ".ts")
HASH_TYPES = ("md5", "sha1", "sha256")
MODELS_DIR = "models"


def _file_digests(path: Path, names: tuple[str, ...]) -> dict[str, str]:
    """Hex digests of one file for several algorithms in one read (weights can be gigabytes)."""
    digests = {name: hashlib.new(name) for name in names}
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            for digest in digests.values():
                digest.update(chunk)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def _minimal_large_files(text: str) -> list[dict[str, str]]:
    """large_files.yml without PyYAML: its only shape is a list of flat ``key: "value"`` mappings."""
    items: list[dict[str, str]] = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#") or line == "large_files:":
            continue
        if line.startswith("- "):
            items.append({})
            line = line[2:].strip()
        if ":" not in line or not items:
            raise ValueError(f"unexpected line '{raw.strip()}'")
        key, value = line.split(":", 1)
        items[-1][key.strip()] = value.strip().strip("'\"")
    return items


def read_large_files(package_dir: str | Path) -> list[dict[str, str]]:
    """The bundle's large_files list (path, url, hash_val, hash_type), [] when it has none.

    This is where the zoo records each weight file's download address and (usually md5) hash.
    """
    for name in LARGE_FILES_NAMES:
        path = Path(package_dir) / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
            if name.endswith(".json"):
                content = json.loads(text)
            else:
                try:
                    import yaml
                except ImportError:
                    return _minimal_large_files(text)
                content = yaml.safe_load(text)
        except Exception as error:  # syntax, encoding
            detail = " ".join(str(error).split()).rstrip(".")
            raise ModelError(f"The bundle's {name} cannot be read ({detail}).") from error
        items = content.get("large_files", []) if isinstance(content, Mapping) else content
        if not isinstance(items, list) or not all(isinstance(item, Mapping) and item.get("path") for item in items):
            raise ModelError(f"The bundle's {name} is not a list of files with a path each.")
        return [{key: "" if value is None else str(value) for key, value in item.items()} for item in items]
    return []


def _relative(path: str, where: str) -> str:
    """A weight path from large_files that must stay inside the package."""
    posix = PurePosixPath(path.replace("\\", "/"))
    if not path or posix.is_absolute() or ".." in posix.parts or ":" in path:
        raise ModelError(f"{where} lists the file '{path}', which is not a relative path inside the bundle.")
    return posix.as_posix()


def _role_names(paths: list[str]) -> dict[str, str]:
    """path -> role: the file stem ("model", "model_lowres"); a TorchScript twin of a state dict gets "<stem>_ts"."""
    stems: dict[str, list[str]] = {}
    for path in paths:
        stems.setdefault(PurePosixPath(path).stem, []).append(path)
    roles: dict[str, str] = {}
    for stem, same in stems.items():
        for path in same:
            suffix = PurePosixPath(path).suffix.lower()
            if len(same) == 1:
                role = stem
            elif suffix == ".ts" and any(PurePosixPath(other).suffix.lower() in (".pt", ".pth") for other in same):
                role = f"{stem}_ts"
            elif suffix == ".pt" or (suffix == ".pth" and not any(o.lower().endswith(".pt") for o in same)):
                role = stem
            else:
                role = f"{stem}_{suffix.lstrip('.')}"
            while role in roles.values():  # same stem in two folders
                role += "_"
            roles[path] = role
    return roles


def weight_files(package_dir: str | Path, where: str) -> list[dict[str, Any]]:
    """The slicer ``files`` of a zoo bundle: every file of large_files that is present (its listed hash checked),
    and every other models/*.pt|*.pth|*.ts; each with the sha256 and size computed here.

    Listed files that are absent are skipped (a release may carry model.pt but not model.ts).
    """
    package_dir = Path(package_dir)
    listed = {}
    for item in read_large_files(package_dir):
        listed[_relative(item["path"], where)] = item
    present = [path for path in listed if (package_dir / path).is_file()]
    models_dir = package_dir / MODELS_DIR
    extra = sorted(
        path.relative_to(package_dir).as_posix() for path in (models_dir.rglob("*") if models_dir.is_dir() else [])
        if path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES
    )
    paths = present + [path for path in extra if path not in listed]
    roles = _role_names(paths)
    files = []
    for relative in paths:
        path = package_dir / relative
        if path.is_symlink():
            raise ModelError(f"{where} has a symbolic link as its weight file {relative}.")
        item = listed.get(relative, {})
        hash_type, hash_value = item.get("hash_type", "").lower().strip(), item.get("hash_val", "").lower().strip()
        if hash_value and hash_type not in HASH_TYPES:
            raise ModelError(
                f"{where} gives the weight file {relative} a hash of unknown type '{hash_type}' (known: "
                f"{', '.join(HASH_TYPES)})."
            )
        digests = _file_digests(path, tuple(sorted({"sha256", hash_type} if hash_value else {"sha256"})))
        if hash_value and digests[hash_type] != hash_value:
            raise ModelError(
                f"{where} has a weight file {relative} that does not match the {hash_type} its large_files list "
                f"gives (expected {hash_value[:12]}…, found {digests[hash_type][:12]}…); the package was refused."
            )
        entry: dict[str, Any] = {"role": roles[relative], "path": relative, "sha256": digests["sha256"],
                                 "size": path.stat().st_size}
        if hash_value:
            entry["checked"] = f"{hash_type} from the bundle's large_files list"
        if item.get("url"):
            entry["url"] = item["url"]
        files.append(entry)
    return files


def derive_slicer_section(package_dir: str | Path, metadata: Mapping[str, Any], model_id: str,
                          where: str) -> dict[str, Any]:
    """What the extension needs of a zoo bundle without a ``slicer`` section, from the bundle's own files.

    Refuses (one sentence) a bundle without a readable inference config, of a kind this version cannot run, or
    without any weight file.
    """
    title = str(metadata.get("name") or model_id)
    config_path = inference_config_path(package_dir)
    if config_path is None:
        raise ModelError(
            f"{where} has no configs/inference.json or configs/inference.yaml, so this extension cannot run it."
        )
    config = read_config(config_path)
    kind = bundle_kind(metadata, config)
    refuse_unless_runnable(kind, title)
    files = weight_files(package_dir, where)
    if not files:
        raise ModelError(
            f"{where} has no weight file (none of the files in its large_files list is present, and there is no "
            "models/*.pt, *.pth or *.ts)."
        )
    section: dict[str, Any] = {
        "id": model_id,
        "title": title,
        "task": "segmentation",
        "pipeline": "monai_bundle",
        "files": files,
        "bundle_kind": kind,
        "derived_from": "the bundle's own metadata, inference config and large_files list",
    }
    modality = _input_modality(metadata)
    if modality:
        section["modality"] = modality
    return section


def _input_modality(metadata: Mapping[str, Any]) -> str:
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    first = next(iter(inputs.values()), {}) if isinstance(inputs, Mapping) and inputs else {}
    return str(first.get("modality", "")) if isinstance(first, Mapping) else ""
