"""Package MONAI Model Zoo bundles as a zoo release would be, with random weights (issue 18).

Why: the zoo's weights cannot be downloaded here, but the import/run work must be tried on the zoo's real configs.
Given a model-zoo checkout (a folder holding models/<bundle>/, or a bare git mirror of the model-zoo repository, read
with `git archive`), this writes one `<bundle>.zip` per bundle, laid out as `<bundle>/...` like a release zip:
* the bundle's own files as they are (configs/, docs/, scripts/, LICENSE, large_files.yml or .yaml, ...);
* models/model.pt: a random-weight state dict of the bundle's own network_def, built with monai.bundle.ConfigParser
  (as the tester did; zoo_shaped.random_state_dict). Where MONAI cannot build the network_def as written, only the
  weights are built with a stated change, the configs stay as they are: an argument this MONAI rejects is left out
  (swin_unetr's img_size), and CUDA-only devices or map_location become CPU (pancreas);
* the other large files the config needs, built likewise: another .pt/.pth state dict of the same network (e.g.
  wholeBody's model_lowres.pt, other seed), and a DiNTS architecture code (pancreas's models/search_code_18590.pt:
  numpy arrays node_a, arch_code_a, arch_code_a_max, arch_code_c plus iter_num, epochs, best_dsc, best_path, the layout
  of the bundle's scripts/search.py, decoded from a randomly initialised monai TopologySearch of the config's
  dints_space; its decode needs scipy, without which a random path through the same graph is taken). Where
  torchvision is not installed, the two torchvision symbols MONAI's RetinaNet feature extractor imports are stood in
  for while the weights are built (lung_nodule_ct_detection; noted). TorchScript files (models/model.ts) are scripted
  from the random network with --torchscript, else left out; files that are not weights (docs/*.npy sample data) are
  left out;
* large_files.yml rewritten so the release is self-consistent, as a real release's files match its list: every file
  kept gets the hash of the random file (the bundle's own hash_type, md5 when none), entries for files left out are
  removed, urls are kept.
Prints a table: bundle | version | network | params | model.pt (MiB) | other large files | note.

Usage: python Testing/Benchmarks/zoo_release.py --zoo /path/to/model-zoo [--rev HEAD] --out FOLDER
       [--seed 0] [--torchscript] [--folders] [BUNDLE ...]
Without BUNDLE names: the 11 bundles of issue 18. `--folders` also keeps the unzipped folders (under FOLDER/folders/).
"""

from __future__ import annotations

import argparse
import copy
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MIADeepLearning"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Python"))

import zoo_shaped

ISSUE_BUNDLES = (
    "spleen_ct_segmentation", "swin_unetr_btcv_segmentation", "wholeBody_ct_segmentation",
    "pancreas_ct_dints_segmentation", "prostate_mri_anatomy", "renalStructures_UNEST_segmentation",
    "wholeBrainSeg_Large_UNEST_segmentation", "brats_mri_segmentation", "segmentation_template",
    "ventricular_short_axis_3label", "lung_nodule_ct_detection",
)
LARGE_FILES_NAMES = ("large_files.yml", "large_files.yaml")
CUDA_DEVICE = re.compile(r"torch\.device\(\s*['\"]cuda(:\d+)?['\"]\s*\)")
UNEXPECTED_KEYWORD = re.compile(r"unexpected keyword argument '(\w+)'")


@dataclass
class Packaged:
    """One row of the table."""

    bundle: str
    version: str = ""
    network: str = ""
    params: int | None = None
    size_mib: float | None = None
    others: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    zip_path: Path | None = None
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ sources


def is_bare_git(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir() and not (path / "models").is_dir()


def fetch_bundle(zoo: Path, rev: str, name: str, into: Path) -> Path:
    """The bundle's folder as in the zoo (copied from a checkout, or exported from a bare mirror with git archive)."""
    candidates = [name, name.replace("-", "_")]
    if is_bare_git(zoo):
        for candidate in candidates:
            listing = subprocess.run(["git", "-C", str(zoo), "ls-tree", "--name-only", rev, f"models/{candidate}"],
                                     capture_output=True, text=True)
            if listing.returncode == 0 and listing.stdout.strip():
                archive = subprocess.run(["git", "-C", str(zoo), "archive", "--format=tar", rev,
                                          f"models/{candidate}"], capture_output=True, check=True)
                with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
                    tar.extractall(into, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(into)
                return into / "models" / candidate
    else:
        for candidate in candidates:
            source = zoo / "models" / candidate
            if source.is_dir():
                target = into / "models" / candidate
                shutil.copytree(source, target)
                return target
    raise FileNotFoundError(f"no bundle models/{name} in {zoo}")


# ------------------------------------------------------------------------------------------------ weights


def cpu_config(value: Any) -> Any:
    """A copy of a config in which CUDA-only devices are the CPU (used only to build the random weights here)."""
    if isinstance(value, dict):
        return {key: cpu_config(item) for key, item in value.items()}
    if isinstance(value, list):
        return [cpu_config(item) for item in value]
    if isinstance(value, str):
        return CUDA_DEVICE.sub("torch.device('cpu')", value)
    return value


class _CpuTorchLoad:
    """torch.load on CPU with full unpickling, while the weights are built: the DiNTS arch code written by this script
    holds numpy arrays, and the bundle loads it onto CUDA."""

    def __enter__(self) -> None:
        self.original = torch.load

        def load(*args: Any, **kwargs: Any) -> Any:
            kwargs["map_location"] = "cpu"
            kwargs.setdefault("weights_only", False)
            return self.original(*args, **kwargs)

        torch.load = load

    def __exit__(self, *exc: Any) -> None:
        torch.load = self.original


class _TorchvisionStandIn:
    """While the weights are built where torchvision is not installed: the two torchvision symbols MONAI's RetinaNet
    feature extractor imports (lung_nodule_ct_detection), written here; `used` says whether they were needed."""

    used = False

    def __enter__(self) -> None:
        import importlib.util
        import types
        from collections import OrderedDict

        self.names: list[str] = []
        if importlib.util.find_spec("torchvision") is not None:
            return
        stand_in = self

        def validate_trainable_layers(is_trained: bool, trainable_layers: Any, max_value: int,
                                      default_value: int) -> Any:
            stand_in.used = True
            return default_value if trainable_layers is None else trainable_layers

        class IntermediateLayerGetter(torch.nn.ModuleDict):
            """The children of `model` up to the last one named in `return_layers`; their outputs by new name."""

            def __init__(self, model: torch.nn.Module, return_layers: dict[str, str]) -> None:
                stand_in.used = True
                wanted, layers = dict(return_layers), OrderedDict()
                for name, child in model.named_children():
                    layers[name] = child
                    wanted.pop(name, None)
                    if not wanted:
                        break
                super().__init__(layers)
                self.return_layers = dict(return_layers)

            def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
                out = OrderedDict()
                for name, child in self.items():
                    x = child(x)
                    if name in self.return_layers:
                        out[self.return_layers[name]] = x
                return out

        modules = {name: types.ModuleType(name) for name in (
            "torchvision", "torchvision.models", "torchvision.models._utils", "torchvision.models.detection",
            "torchvision.models.detection.backbone_utils")}
        modules["torchvision.models._utils"].IntermediateLayerGetter = IntermediateLayerGetter
        modules["torchvision.models.detection.backbone_utils"]._validate_trainable_layers = validate_trainable_layers
        modules["torchvision"].models = modules["torchvision.models"]
        modules["torchvision.models"]._utils = modules["torchvision.models._utils"]
        modules["torchvision.models"].detection = modules["torchvision.models.detection"]
        modules["torchvision.models.detection"].backbone_utils = modules["torchvision.models.detection.backbone_utils"]
        sys.modules.update(modules)
        self.names = list(modules)
        # MONAI modules imported before this resolved the symbols to failing stand-ins of their own: point them here
        self.patched: list[tuple[Any, str, Any]] = []
        for module_name, attribute, value in (
                ("monai.apps.detection.networks.retinanet_network", "_validate_trainable_layers",
                 validate_trainable_layers),
                ("monai.networks.blocks.backbone_fpn_utils", "torchvision_models", modules["torchvision.models"])):
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, attribute):
                self.patched.append((module, attribute, getattr(module, attribute)))
                setattr(module, attribute, value)

    def __exit__(self, *exc: Any) -> None:
        for module, attribute, value in getattr(self, "patched", []):
            setattr(module, attribute, value)
        for name in self.names:
            sys.modules.pop(name, None)


def build_network(root: Path, config_file: Path, seed: int, notes: list[str]) -> torch.nn.Module:
    """The bundle's network_def with random weights; arguments this MONAI rejects are dropped (noted)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_file))
    config = cpu_config(parser.get())
    if config != parser.get():
        notes.append("weights built with CUDA devices as CPU")
    network_def = copy.deepcopy(config["network_def"])
    for _ in range(5):
        attempt = copy.deepcopy(config)
        attempt["network_def"] = copy.deepcopy(network_def)
        attempt["bundle_root"] = str(root)
        try:
            stand_in = _TorchvisionStandIn()
            with _CpuTorchLoad(), stand_in:
                network = zoo_shaped.build_network(_write_json(root, attempt), root, seed=seed)
            if stand_in.used:
                notes.append("weights built with a stand-in for 2 torchvision symbols (not installed here)")
            return network
        except Exception as error:
            text = "".join(str(item) for item in _chain(error))
            match = UNEXPECTED_KEYWORD.search(text)
            if not match or not isinstance(network_def, dict) or match.group(1) not in network_def:
                raise
            network_def.pop(match.group(1))
            notes.append(f"weights built without network_def.{match.group(1)} (this MONAI rejects it)")
    raise RuntimeError("network_def could not be built")


def _chain(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _write_json(root: Path, config: dict[str, Any]) -> Path:
    """The (CPU) config in a scratch file beside the bundle, for ConfigParser; removed by package()."""
    import json

    path = root.parent / f".{root.name}-weights-config.json"
    path.write_text(json.dumps(config))
    return path


def dints_search_code(config_file: Path, seed: int) -> dict[str, Any]:
    """A DiNTS architecture code decoded from a random TopologySearch of the config's dints_space, saved like the
    bundle's scripts/search.py saves the best one."""
    from monai.bundle import ConfigParser
    from monai.networks.nets import TopologySearch

    parser = ConfigParser()
    parser.read_config(str(config_file))
    space = parser.get("dints_space") or {}
    options = {key: space[key] for key in ("channel_mul", "num_blocks", "num_depths", "use_downsample")
               if key in space and not str(space[key]).startswith(("$", "@"))}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        search = TopologySearch(device="cpu", **options)
        try:
            node_a, arch_code_a, arch_code_c, arch_code_a_max = search.decode()
        except ImportError:  # decode's shortest path needs scipy: a random path through the same graph instead
            node_a, arch_code_a, arch_code_c, arch_code_a_max = random_path_code(search, seed)
    return {"node_a": np.asarray(node_a), "arch_code_a": np.asarray(arch_code_a),
            "arch_code_a_max": np.asarray(arch_code_a_max), "arch_code_c": np.asarray(arch_code_c),
            "iter_num": 0, "epochs": 0, "best_dsc": 0.0, "best_path": 0}


def random_path_code(search: Any, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What TopologySearch.decode returns, for a random path instead of the shortest one (no scipy needed): one
    child (set of active paths) per block, each allowed to follow the previous one, as decode's graph allows."""
    children = [np.asarray(child) for child in search.child_list]
    index = {str(child): i for i, child in enumerate(search.child_list)}
    follows = np.zeros((len(children), len(children)), dtype=bool)
    for i, child in enumerate(children):
        active = np.zeros(search.num_depths, dtype=int)
        for path, on in enumerate(child):
            active[search.arch_code2out[path]] += int(on)
        for matrix in search.transfer_mtx[str((active >= 1).astype(int))]:
            follows[i, index[str(matrix.flatten()[search.tidx].astype(int))]] = True
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(children)))]
    while len(chosen) < search.num_blocks:
        options = np.flatnonzero(follows[chosen[-1]])
        chosen = [*chosen, int(rng.choice(options))] if len(options) else [int(rng.integers(len(children)))]
    arch_code_a = np.stack([children[i] for i in chosen]).astype(float)
    node_a = np.zeros((search.num_blocks + 1, search.num_depths))
    for block in range(search.num_blocks):
        for path in range(len(search.arch_code2out)):
            node_a[block + 1, search.arch_code2out[path]] += arch_code_a[block, path]
    for path in range(len(search.arch_code2out)):
        node_a[0, search.arch_code2in[path]] += arch_code_a[0, path]
    arch_code_c = torch.argmax(search.log_alpha_c, -1).numpy()
    return (node_a >= 1).astype(int), arch_code_a, arch_code_c, arch_code_a.copy()


def _has_scipy() -> bool:
    import importlib.util

    return importlib.util.find_spec("scipy") is not None


# ------------------------------------------------------------------------------------------------ packaging


def package(zoo: Path, rev: str, name: str, out: Path, seed: int = 0, torchscript: bool = False,
            keep_folder: bool = False) -> Packaged:
    """One bundle as a release zip in `out`; a row that says what was made (raises on failure)."""
    import yaml

    row = Packaged(name)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zoo-release-") as scratch:
        root = fetch_bundle(zoo, rev, name, Path(scratch))
        row.bundle = root.name
        metadata_file = root / "configs" / "metadata.json"
        if metadata_file.is_file():
            import json

            row.version = str(json.loads(metadata_file.read_text()).get("version", ""))
        config_file = zoo_shaped.inference_config_file(root)
        if config_file is None:
            raise FileNotFoundError("the bundle has no configs/inference.json or .yaml")
        list_file = next((root / n for n in LARGE_FILES_NAMES if (root / n).is_file()), None)
        entries = list((yaml.safe_load(list_file.read_text()) or {}).get("large_files", [])) if list_file else []
        (root / "models").mkdir(exist_ok=True)
        # extra files the network_def reads come first
        for entry in entries:
            if re.search(r"search_code[^/]*\.pt$", str(entry.get("path", ""))):
                torch.save(dints_search_code(config_file, seed), root / entry["path"])
                row.others.append(f"{Path(entry['path']).name} (DiNTS arch code"
                                  + (")" if _has_scipy() else ", random path: no scipy here)"))
        try:
            network = build_network(root, config_file, seed, row.notes)
        finally:
            (root.parent / f".{root.name}-weights-config.json").unlink(missing_ok=True)
        row.network = type(network).__name__
        row.params = sum(p.numel() for p in network.parameters())
        torch.save(network.state_dict(), root / "models" / "model.pt")
        row.size_mib = (root / "models" / "model.pt").stat().st_size / (1 << 20)

        kept = []
        listed = {str(entry.get("path", "")) for entry in entries}
        for index, entry in enumerate(entries, 1):
            path = str(entry.get("path", ""))
            target = root / path
            if path == "models/model.pt" or target.is_file():
                kept.append(entry)
                continue
            if path.endswith((".pt", ".pth")):
                other = build_network(root, config_file, seed + index, [])
                target.parent.mkdir(parents=True, exist_ok=True)
                torch.save(other.state_dict(), target)
                row.others.append(f"{Path(path).name} (random, seed {seed + index})")
                kept.append(entry)
            elif path.endswith(".ts") and torchscript:
                try:
                    torch.jit.save(torch.jit.script(network.eval()), str(target))
                    row.others.append(f"{Path(path).name} (scripted)")
                    kept.append(entry)
                except Exception as error:
                    row.notes.append(f"{path} left out (not scriptable: {str(error).splitlines()[0][:60]})")
            else:
                row.notes.append(f"{path} left out")
        if "models/model.pt" not in listed:
            row.notes.append("model.pt not in the bundle's large-file list" if list_file else "no large_files list")
        if list_file:
            rewritten = []
            for entry in kept:
                hash_type = str(entry.get("hash_type") or "md5").lower()
                new = {"path": entry["path"]}
                if entry.get("url"):
                    new["url"] = entry["url"]
                new.update(hash_val=zoo_shaped.file_hash(root / entry["path"], hash_type), hash_type=hash_type)
                rewritten.append(new)
            list_file.write_text(zoo_shaped.large_files_yaml(rewritten))
        out.mkdir(parents=True, exist_ok=True)
        row.zip_path = zoo_shaped.zip_folder(root, out / f"{root.name}.zip")
        if keep_folder:
            target = out / "folders" / root.name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(root, target, ignore=shutil.ignore_patterns("__pycache__"))
    row.seconds = time.monotonic() - start
    return row


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def millions(count: int | None) -> str:
    if count is None:
        return "—"
    return f"{count / 1e6:.1f} M" if count >= 100_000 else f"{count:,}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="*", help="bundle names (default: the 11 of issue 18)")
    parser.add_argument("--zoo", required=True, type=Path, help="model-zoo checkout or bare git mirror")
    parser.add_argument("--rev", default="HEAD", help="revision of a git mirror (default HEAD)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the release zips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torchscript", action="store_true", help="also script listed models/*.ts files")
    parser.add_argument("--folders", action="store_true", help="also keep the unzipped folders (OUT/folders/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, failed = [], 0
    for name in args.bundles or ISSUE_BUNDLES:
        try:
            row = package(args.zoo, args.rev, name, args.out, args.seed, args.torchscript, args.folders)
        except Exception as error:
            failed += 1
            cause = _chain(error)[-1]
            text = str(cause).strip().splitlines()[0][:160] if str(cause).strip() else ""
            row = Packaged(name, notes=[f"not packaged: {type(cause).__name__}" + (f": {text}" if text else "")])
        rows.append(row)
        print(f"{row.bundle}: {'ok' if row.zip_path else 'FAILED'} ({row.seconds:.1f} s)", file=sys.stderr)
    print(f"Releases from {args.zoo} ({args.rev}) in {args.out}, random weights (seed {args.seed}), "
          f"torch {torch.__version__}")
    print(table(("bundle", "version", "network", "params", "model.pt (MiB)", "other large files", "note"),
                [(row.bundle, row.version or "—", row.network or "—", millions(row.params),
                  f"{row.size_mib:.1f}" if row.size_mib is not None else "—", ", ".join(row.others) or "—",
                  "; ".join(row.notes) or "—") for row in rows]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
