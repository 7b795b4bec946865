"""Compatibility of MONAI Model Zoo bundles with the product's "Import model" and `segment` (issue 18).

Why: the issue is done when zoo bundles as downloaded import with no hand edits and segment like MONAI's own
pipeline. Given a folder of bundles (release zips `<bundle>.zip` laid out as `<bundle>/...`, or bundle folders; a zip
wins over a folder of the same name), e.g. made by zoo_release.py or by Testing/Python/zoo_shaped.py, this checks each
bundle in its own subprocess with its own model cache (MIADL_CACHE_DIR and HOME in a scratch folder):
1. import with the real CLI: `python -m MIADeepLearningLib models --import PATH --json` (+ `--trust` when the CLI has
   it: an imported package is code, and this run confirms it for the user);
2. a phantom fitting the bundle (zoo_shaped.phantom_image: an oblique, anisotropic, flipped grid with a bright blob),
   CT-like or MR-like from the metadata's input modality, one file per input channel (num_channels; the first as
   `-i`, the others as `--extra-input`), a thin 3-D stack for a 2-D model; --size sets the grid (x,y,z voxels);
3. `python -m MIADeepLearningLib segment --model ID -i ... -o ... --device cpu --no-type-check` (the product's CLI
   runs in --product-python, default this python: give one that also has the bundles' optional packages, e.g.
   einops and scikit-image, to measure what a user gets after installing what the import asked for);
4. the output must lie on the input grid (size, spacing, origin, direction), and its labels must be values of the
   model's segments (the installed package's slicer.segments when it has them, else the output channel_def keys);
5. with --monai-python PATH (a python with MONAI plus what `monai.bundle run` needs: pytorch-ignite, fire, and the
   bundle's optional packages), `PATH -m monai.bundle run --config_file ... --meta_file ... --args_file ...` on the
   same input and the same weights (the bundle's dataset#data, output_dir and bundle_root overridden), and the share
   of voxels with the same label as the product's output (MONAI's resampled onto the product's grid by nearest
   neighbour where it is not on it; not comparable when MONAI wrote non-integer labels).
Prints: bundle | kind | imported (s) | ran (s) | on grid | labels | agreement with monai.bundle run | message (the
one-sentence error of the first step that failed; "traceback" when a step ended in one). A failure is a row, never a
crash. Times are wall seconds of the whole command (Python start-up included), at --threads (default 1).

Usage: python Testing/Benchmarks/zoo_compat.py FOLDER [--monai-python PATH] [--product-python PATH] [--work DIR]
       [--only A,B] [--size 64,64,40] [--threads 1] [--timeout 1200] [--json rows.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LIBRARY_ROOT = Path(__file__).resolve().parents[2] / "MIADeepLearning"
TESTING_PYTHON = Path(__file__).resolve().parents[1] / "Python"
COLUMNS = ("bundle", "kind", "imported (s)", "ran (s)", "on grid", "labels", "agreement with monai.bundle run",
           "message")
GRID_TOLERANCE = 1e-3  # mm for origin and spacing, absolute for direction cosines
DEFAULT_SIZE = (64, 64, 40)
SPACING = (1.4, 1.2, 2.5)
THIN_STACK = 6  # slices of the input of a 2-D model


# ------------------------------------------------------------------------------------------------ bundles


def find_bundles(folder: Path) -> list[Path]:
    """Release zips and bundle folders (a folder with configs/) in `folder`; a zip wins over a same-named folder."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_dir() and (path / "configs").is_dir():
            found.setdefault(path.name, path)
        elif path.suffix == ".zip" and path.is_file():
            found[path.stem] = path
    return [found[name] for name in sorted(found)]


def unpack(path: Path, into: Path) -> Path:
    """A working copy of the bundle (for reading its configs and for monai.bundle run): the zip's single top folder,
    or a copy of the folder."""
    into.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        target = into / path.name
        shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
        return target
    with zipfile.ZipFile(path) as archive:
        archive.extractall(into)
        tops = {name.split("/", 1)[0] for name in archive.namelist()}
    return into / tops.pop() if len(tops) == 1 else into


def read_plain_config(root: Path) -> dict[str, Any] | None:
    """The inference config as plain data (JSON or safe YAML; no config code runs); None when absent or unreadable."""
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        path = root / "configs" / name
        if path.is_file():
            try:
                if name.endswith(".json"):
                    return json.loads(path.read_text())
                import yaml

                return yaml.safe_load(path.read_text())
            except Exception:
                return None
    return None


def config_file(root: Path) -> Path | None:
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        if (root / "configs" / name).is_file():
            return root / "configs" / name
    return None


def _first(mapping: Any) -> dict[str, Any]:
    """The first value of a metadata inputs/outputs mapping."""
    if isinstance(mapping, dict) and mapping:
        value = next(iter(mapping.values()))
        return value if isinstance(value, dict) else {}
    return {}


def describe(metadata: dict[str, Any], config: dict[str, Any] | None) -> dict[str, Any]:
    """What the bundle is, from its metadata and config: kind, 2-D, modality, channels, channel_def of the output."""
    data_format = metadata.get("network_data_format", {}) if isinstance(metadata, dict) else {}
    inputs, outputs = _first(data_format.get("inputs")), _first(data_format.get("outputs"))
    network_def = (config or {}).get("network_def", {})
    inferer = (config or {}).get("inferer", {})
    two_d = (isinstance(network_def, dict) and network_def.get("spatial_dims") == 2) or (
        isinstance(inferer, dict) and str(inferer.get("_target_", "")).endswith("SliceInferer")) or (
        len(inputs.get("spatial_shape", [0, 0, 0])) == 2)
    output_type, output_format = str(outputs.get("type", "")), str(outputs.get("format", ""))
    if output_type == "object" or output_format == "dict" or (config and "detector" in config):
        kind = "detection"
    elif output_type in ("probabilities", "probability") or output_format in ("classes", "classification"):
        kind = "classification"
    else:
        kind = "2-D seg" if two_d else "3-D seg"
    try:
        channels = int(inputs.get("num_channels", 1))
    except (TypeError, ValueError):
        channels = 1
    if channels > 1:
        kind += f", {channels} ch"
    return {"kind": kind, "two_d": two_d, "modality": str(inputs.get("modality", "CT")).upper(),
            "channels": max(channels, 1), "channel_def": outputs.get("channel_def", {}) or {}}


def image_key(config: dict[str, Any]) -> str:
    """The key the bundle's loader reads (its LoadImaged keys, references followed as plain data); 'image' else."""
    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if str(value.get("_target_", "")).endswith("LoadImaged"):
                return value.get("keys")
            values = list(value.values())
        elif isinstance(value, list):
            values = value
        else:
            return None
        for item in values:
            found = walk(item)
            if found is not None:
                return found
        return None

    key = walk(config.get("preprocessing", config))
    for _ in range(3):
        if isinstance(key, list) and key:
            key = key[0]
        if isinstance(key, str) and key.startswith("@"):
            key = config.get(key[1:], "image")
    if not isinstance(key, str) or key.startswith("$"):
        return "image"  # e.g. $monai.utils.CommonKeys.IMAGE
    return key


# ------------------------------------------------------------------------------------------------ images


def read_labels(path: Path) -> Any:
    """A label file as a 3-D SimpleITK image (a trailing channel or 4th axis of size 1 dropped)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = sitk.VectorIndexSelectionCast(image, 0)
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        size[3] = 0
        image = sitk.Extract(image, size, [0, 0, 0, 0])
    return image


def same_grid(first: Any, second: Any) -> bool:
    import numpy as np

    return (first.GetSize() == second.GetSize()
            and np.allclose(first.GetSpacing(), second.GetSpacing(), atol=GRID_TOLERANCE)
            and np.allclose(first.GetOrigin(), second.GetOrigin(), atol=GRID_TOLERANCE)
            and np.allclose(first.GetDirection(), second.GetDirection(), atol=GRID_TOLERANCE))


def grid_difference(output: Any, reference: Any) -> str:
    """'yes', or what differs."""
    import numpy as np

    if same_grid(output, reference):
        return "yes"
    if output.GetSize() != reference.GetSize():
        return f"no (size {output.GetSize()} vs {reference.GetSize()})"
    for name in ("Spacing", "Origin", "Direction"):
        if not np.allclose(getattr(output, f"Get{name}")(), getattr(reference, f"Get{name}")(), atol=GRID_TOLERANCE):
            return f"no ({name.lower()})"
    return "no"


def label_values(image: Any) -> list[float]:
    import numpy as np
    import SimpleITK as sitk

    return [float(v) for v in np.unique(sitk.GetArrayViewFromImage(image))]


def labels_cell(values: Sequence[float], allowed: set[int]) -> str:
    """'ok {0,1}' when every value is background or a segment's, else what is not."""
    shown = "{" + ",".join(f"{v:g}" for v in values[:12]) + (",…" if len(values) > 12 else "") + "}"
    extra = [v for v in values if v != 0 and (v != round(v) or round(v) not in allowed)]
    if not extra:
        return f"ok {shown}"
    return f"not in segments: {{{','.join(f'{v:g}' for v in extra[:6])}}} of {shown}"


def agreement(product: Any, monai_output: Any) -> str:
    """Share of voxels with the same label, MONAI's output on the product's grid (nearest neighbour if needed)."""
    import numpy as np
    import SimpleITK as sitk

    if not same_grid(product, monai_output):
        monai_output = sitk.Resample(monai_output, product, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    theirs = sitk.GetArrayFromImage(monai_output).astype(np.float64)
    if np.any(np.abs(theirs - np.round(theirs)) > 1e-3):
        return f"not comparable (MONAI wrote {len(np.unique(theirs))} non-integer label values)"
    ours = sitk.GetArrayFromImage(product).astype(np.float64)
    return f"{100.0 * float(np.mean(ours == np.round(theirs))):.3f} %"


def allowed_labels(package_dir: str | None, channel_def: dict[str, Any]) -> set[int]:
    """Label values of the installed model's segments (its slicer.segments, or the section derived at import and
    kept beside the bundle), else the output channel_def keys."""
    if package_dir:
        for relative in ("configs/metadata.json", ".miadl-slicer.json"):
            try:
                content = json.loads((Path(package_dir) / relative).read_text())
                section = content.get("slicer", content) if relative.endswith("metadata.json") else content
                segments = section.get("segments") or []
                values = {int(segment["value"]) for segment in segments if "value" in segment}
                if values:
                    return values | {0}
            except Exception:
                pass
    values = set()
    for key in channel_def:
        try:
            values.add(int(key))
        except (TypeError, ValueError):
            pass
    return values


# ------------------------------------------------------------------------------------------------ commands


def last_line(text: str) -> str:
    """The message of a failed command: its last non-empty stderr line (plus 'traceback' when there was one)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    if not any(line.startswith("Traceback") for line in lines):
        return lines[-1][:300]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b:?", line)]
    return f"traceback: {(errors or lines)[-1][:300]}"


def run(command: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None
        ) -> tuple[int, float, str, str]:
    """(rc, seconds, stdout, stderr); rc 124 on timeout."""
    start = time.monotonic()
    try:
        done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        return done.returncode, time.monotonic() - start, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        err = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        return 124, time.monotonic() - start, out, err + f"\ntimed out after {timeout:.0f} s"


def product_env(work: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MIADL_CACHE_DIR=str(work / "cache"), HOME=str(work / "home"), MIADL_TYPE_CHECK="0",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(LIBRARY_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    (work / "home").mkdir(parents=True, exist_ok=True)
    return env


PRODUCT_PYTHON = [sys.executable]  # --product-python: set once in main()


def cli_help(env: dict[str, str], command: str) -> str:
    _, _, out, err = run([PRODUCT_PYTHON[0], "-m", "MIADeepLearningLib", command, "--help"], env, 120)
    return out + err


def parse_summary(stdout: str) -> dict[str, Any]:
    """The model summary `models --import --json` prints (the JSON object in stdout)."""
    start = stdout.find("{")
    if start < 0:
        return {}
    try:
        value = json.loads(stdout[start:])
    except json.JSONDecodeError:
        try:
            value, _ = json.JSONDecoder().raw_decode(stdout[start:])
        except json.JSONDecodeError:
            return {}
    return value if isinstance(value, dict) else {}


def write_inputs(folder: Path, info: dict[str, Any], size: tuple[int, int, int]) -> list[Path]:
    """Phantom file(s) for the bundle: one per input channel, CT- or MR-like, a thin stack for a 2-D model."""
    import SimpleITK as sitk

    sys.path[:0] = [str(TESTING_PYTHON), str(LIBRARY_ROOT)]  # Testing/Python/zoo_shaped.py builds on the library's
    import zoo_shaped

    folder.mkdir(parents=True, exist_ok=True)
    grid = (size[0], size[1], THIN_STACK) if info["two_d"] else tuple(size)
    modality = "CT" if info["modality"] == "CT" else "MR"
    if info["channels"] > 1:
        images = zoo_shaped.phantom_channels(info["channels"], size=grid, spacing=SPACING)
    else:
        images = [zoo_shaped.phantom_image(size=grid, spacing=SPACING, modality=modality)]
    paths = []
    for index, image in enumerate(images):
        paths.append(folder / (f"case_c{index}.nii.gz" if len(images) > 1 else "case.nii.gz"))
        sitk.WriteImage(image, str(paths[-1]))
    return paths


def monai_cpu_fixes(config: dict[str, Any]) -> dict[str, Any]:
    """What MONAI's own `monai.bundle run` needs, as shipped, to run at all on a CPU with MONAI 1.6 (the product
    needs none of it: it does the same by itself): the edits the tester of issue 18 made by hand. SwinUNETR's
    `img_size` (removed in MONAI 1.5) is dropped; LoadImaged's `reader: ITKReader` is left to MONAI's choice where
    itk is not installed; DiNTS's search code is loaded on the CPU (it holds numpy arrays:
    weights_only=False, as the config itself asks torch for a full unpickling) and its space built on the CPU."""
    fixes: dict[str, Any] = {}
    network = config.get("network_def")
    if isinstance(network, dict) and str(network.get("_target_", "")).endswith("SwinUNETR") and "img_size" in network:
        fixes["network_def"] = {key: value for key, value in network.items() if key != "img_size"}
    if "cuda" in str(config.get("arch_ckpt", "")):
        fixes["arch_ckpt"] = "$torch.load(@arch_ckpt_path, map_location='cpu', weights_only=False)"
    preprocessing = config.get("preprocessing")
    transforms = preprocessing.get("transforms") if isinstance(preprocessing, dict) else None
    for index, transform in enumerate(transforms if isinstance(transforms, list) else []):
        if isinstance(transform, dict) and str(transform.get("_target_", "")).endswith("LoadImaged") \
                and "ITKReader" in str(transform.get("reader", "")) and importlib.util.find_spec("itk") is None:
            fixes[f"preprocessing#transforms#{index}#reader"] = None  # MONAI picks a reader it has (nibabel)
    space = config.get("dints_space")
    if isinstance(space, dict) and "cuda" in str(space.get("device", "")):
        fixes["dints_space#device"] = "$torch.device('cpu')"
    return fixes


def monai_run(python: str, root: Path, info_config: dict[str, Any], inputs: list[Path], out: Path, threads: int,
              timeout: float) -> tuple[Path | None, float, str]:
    """(output file or None, seconds, message) of `python -m monai.bundle run` on the inputs."""
    config = config_file(root)
    if config is None:
        return None, 0.0, "no inference config"
    if "dataset" not in info_config:
        return None, 0.0, "the config has no dataset to give the input to"
    key = image_key(info_config)
    value: Any = str(inputs[0]) if len(inputs) == 1 else [str(path) for path in inputs]
    overrides: dict[str, Any] = {"dataset#data": [{key: value}], "output_dir": str(out), "bundle_root": str(root)}
    if "dataset_dir" in info_config:  # SaveImaged's data_root_dir often refers to it: outputs stay in output_dir
        overrides["dataset_dir"] = str(inputs[0].parent)
    if isinstance(info_config.get("dataloader"), dict) and "num_workers" in info_config["dataloader"]:
        overrides["dataloader#num_workers"] = 0
    overrides.update(monai_cpu_fixes(info_config))
    args_file = out.parent / "monai_args.json"
    out.mkdir(parents=True, exist_ok=True)
    args_file.write_text(json.dumps(overrides))
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HOME=str(out.parent / "home"))
    env.pop("PYTHONPATH", None)
    command = [python, "-m", "monai.bundle", "run", "--config_file", str(config),
               "--meta_file", str(root / "configs" / "metadata.json"), "--args_file", str(args_file)]
    if "run" not in info_config and "evaluating" in info_config:  # the older bundles' name of the run step
        command += ["--run_id", "evaluating"]
    rc, seconds, _, err = run(command, env, timeout, cwd=root)
    if rc != 0:
        return None, seconds, f"monai.bundle run failed (rc {rc}): {last_line(err)}"
    written = sorted(out.rglob("*.nii*"), key=lambda path: path.stat().st_mtime)
    if not written:
        return None, seconds, "monai.bundle run wrote no image in output_dir"
    return written[-1], seconds, ""


def check_bundle(path: Path, work: Path, options: argparse.Namespace, row: dict[str, Any], save: Any) -> None:
    """Fill `row` step by step (save() after each step, so a timeout still leaves what was learnt)."""
    import SimpleITK as sitk

    root = unpack(path, work / "bundle")
    try:
        metadata = json.loads((root / "configs" / "metadata.json").read_text())
    except Exception:
        metadata = {}
    config = read_plain_config(root)
    info = describe(metadata, config)
    row["kind"] = info["kind"]
    save()
    env = product_env(work, options.threads)
    command = [PRODUCT_PYTHON[0], "-m", "MIADeepLearningLib", "models", "--import", str(path), "--json"]
    if "--trust" in cli_help(env, "models"):
        command.append("--trust")
    rc, seconds, out, err = run(command, env, options.timeout)
    summary = parse_summary(out) if rc == 0 else {}
    row["imported (s)"] = f"{seconds:.1f}" if rc == 0 else f"no (rc {rc}, {seconds:.1f})"
    if rc != 0 or not summary.get("id"):
        row["message"] = last_line(err) or "import printed no model"
        save()
    inputs = write_inputs(work / "input", info, options.size)
    product_out = None
    if rc == 0 and summary.get("id"):
        output = work / "product" / "case_seg.nii.gz"
        output.parent.mkdir(parents=True, exist_ok=True)
        command = [PRODUCT_PYTHON[0], "-m", "MIADeepLearningLib", "segment", "--model", summary["id"], "-i",
                   str(inputs[0])]
        for item in inputs[1:]:  # the bundle's further input channels, in its order
            command += ["--extra-input", str(item)]
        command += ["-o", str(output), "--device", "cpu", "--no-type-check", "-q"]
        rc, seconds, _, err = run(command, env, options.timeout)
        row["ran (s)"] = f"{seconds:.1f}" if rc == 0 else f"no (rc {rc}, {seconds:.1f})"
        if rc == 0 and output.is_file():
            product_out = read_labels(output)
            reference = sitk.ReadImage(str(inputs[0]))
            row["on grid"] = grid_difference(product_out, reference)
            row["labels"] = labels_cell(label_values(product_out),
                                        allowed_labels(summary.get("package_dir"), info["channel_def"]))
        else:
            row["message"] = last_line(err) or ("segment wrote no output" if rc == 0 else f"segment failed (rc {rc})")
        save()
    if options.monai_python:
        if config is None:
            row["agreement with monai.bundle run"] = "— (no readable inference config)"
        else:
            written, seconds, message = monai_run(options.monai_python, root, config, inputs, work / "monai_out",
                                                  options.threads, options.timeout)
            if written is None:
                row["agreement with monai.bundle run"] = f"— ({message})"
            elif product_out is None:
                row["agreement with monai.bundle run"] = f"— (MONAI ran in {seconds:.1f} s; the product did not)"
            else:
                try:
                    edited = ", with the CPU edits MONAI needs" if monai_cpu_fixes(config) else ""
                    row["agreement with monai.bundle run"] = (f"{agreement(product_out, read_labels(written))} "
                                                              f"(MONAI {seconds:.1f} s{edited})")
                except Exception as error:
                    row["agreement with monai.bundle run"] = f"— (comparison failed: {error})"
        save()


# ------------------------------------------------------------------------------------------------ driver


def empty_row(path: Path) -> dict[str, Any]:
    name = path.stem if path.suffix == ".zip" else path.name
    return {column: "—" for column in COLUMNS} | {"bundle": name, "message": ""}


def one(options: argparse.Namespace) -> int:
    """The subprocess for one bundle: checks it and writes its row (as JSON) to --row."""
    path, row_file = Path(options.one), Path(options.row)
    row = empty_row(path)

    def save() -> None:
        row_file.write_text(json.dumps(row))

    save()
    try:
        check_bundle(path, Path(options.work), options, row, save)
    except Exception as error:
        row["message"] = (row["message"] + "; " if row["message"] else "") + \
            f"checker failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    save()
    return 0


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(column, "—") or "—").replace("|", "/")
                                        for column in COLUMNS) + " |")
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int, int]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError("--size takes x,y,z")
    return values  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, help="folder of bundle zips / folders")
    parser.add_argument("--monai-python", help="a python that can run `-m monai.bundle run` (side environment)")
    parser.add_argument("--product-python", default=sys.executable,
                        help="the python that runs the product's CLI (default: this one); e.g. one that also has the "
                             "optional packages the bundles ask for")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one, kept and printed)")
    parser.add_argument("--only", help="comma-separated bundle names")
    parser.add_argument("--size", type=parse_size, default=DEFAULT_SIZE, help="phantom voxels x,y,z (64,64,40)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per command")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    PRODUCT_PYTHON[0] = options.product_python
    if options.one:
        return one(options)
    if options.folder is None or not options.folder.is_dir():
        parser.error("FOLDER must be a folder of bundle zips or folders")
    work = options.work or Path(tempfile.mkdtemp(prefix="zoo-compat-"))
    work.mkdir(parents=True, exist_ok=True)
    wanted = set(options.only.split(",")) if options.only else None
    rows = []
    for path in find_bundles(options.folder):
        row = empty_row(path)
        if wanted and row["bundle"] not in wanted:
            continue
        folder = work / row["bundle"]
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        row_file = folder / "row.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--one", str(path.resolve()), "--row",
                   str(row_file), "--work", str(folder), "--threads", str(options.threads), "--timeout",
                   str(options.timeout), "--size", ",".join(str(v) for v in options.size)]
        if options.monai_python:
            command += ["--monai-python", options.monai_python]
        command += ["--product-python", options.product_python]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=4 * options.timeout + 300)
            failure = "" if done.returncode == 0 else (f"checker exited with rc {done.returncode}: "
                                                       f"{last_line(done.stderr)}")
        except subprocess.TimeoutExpired:
            failure = "checker timed out"
        try:
            row = json.loads(row_file.read_text())
        except Exception:
            pass
        if failure:
            row["message"] = (row.get("message") or "") + ("; " if row.get("message") else "") + failure
        rows.append(row)
        print(f"{row['bundle']}: imported {row['imported (s)']}, ran {row['ran (s)']}", file=sys.stderr)
    print(f"Zoo bundles in {options.folder}: the product's CLI ({LIBRARY_ROOT}), phantoms {options.size[0]}x"
          f"{options.size[1]}x{options.size[2]} at {SPACING} mm (oblique, flipped), {options.threads} thread(s); "
          f"monai.bundle run: {options.monai_python or 'not run (no --monai-python)'}; work folder {work}")
    print(table(rows))
    if options.json:
        options.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
