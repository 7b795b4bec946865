"""Benchmark of the warm worker: what a second Apply costs when the model stays loaded, against a new process per run.

Prints tables (never asserts on time). Runs brain extraction through the module's SegmentationLogic on a headless
scene, on the ROBEX head as shipped (116×150×155, 1.5 mm) and on the same head resampled to 256³ voxels, three ways:
- cold: the default, a new worker process per run (median of --runs runs);
- warm, 1st run: a WarmWorker that is not running yet (it starts the server, imports the engine, loads the model);
- warm, later runs: the same WarmWorker again (median of --runs runs): model loaded, process running.

Rows: Slicer-side export of the input, worker start (process, Python, engine import), model load (sha256 check and
network build), input reading and checks, inference (deepbet's two networks with pre/post-processing), writing the
outputs, the hand-back of the result, import into the scene (segmentation, closed surface), total, and the overhead
total − inference, i.e. everything the user waits for that is not the network itself.

Usage: python Testing/Benchmarks/warm_worker.py [--runs N] [--device auto|cpu|cuda] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MIADeepLearning"))

from MIADeepLearningLib.mrml import headless

WORKER_STAGES = ("engine_import", "load_model", "read_input", "checks", "inference")
ROWS = [
    ("export input (Slicer)", "export"),
    ("worker start (process + Python + engine import)", "worker_start"),
    ("model load (sha256 + network build)", "load_model"),
    ("read input + checks", "read_checks"),
    ("inference", "inference"),
    ("write outputs", "write"),
    ("hand-back (result event -> import starts)", "handback"),
    ("import into scene (Slicer)", "import"),
    ("total: Apply -> result in scene", "total"),
    ("overhead = total - inference", "overhead"),
    ("total / inference", "ratio"),
]


def timed_run(logic, volume, device: str) -> dict[str, float]:
    """One Apply through `logic`; the stage times of the table for it."""
    seen: dict[str, float] = {}
    started = time.perf_counter()

    def on_event(event) -> None:
        now = time.perf_counter() - started
        seen.setdefault("first_event", now)
        if event.is_final:
            seen["final_event"] = now

    result = logic.run(volume, "deepbet", device=device, on_event=on_event)
    timings = dict(result.timings)
    row = {key: timings.get(key, 0.0) for key in ("export", "load_model", "inference", "import", "total")}
    # the job's first event comes after the process start (cold) or after the server's start and engine import (warm
    # 1st run: the server imports the engine before it reads jobs); the cold worker imports the engine after it
    row["worker_start"] = seen["first_event"] - timings["export"] + timings.get("engine_import", 0.0)
    row["read_checks"] = timings.get("read_input", 0.0) + timings.get("checks", 0.0)
    row["write"] = timings["worker_total"] - sum(timings.get(stage, 0.0) for stage in WORKER_STAGES)
    row["handback"] = timings["total"] - timings["import"] - seen["final_event"]
    row["overhead"] = timings["total"] - timings["inference"]
    row["ratio"] = timings["total"] / timings["inference"]
    row["model_cached"] = float(result.model_cached)
    return row


def median_row(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def volume_256(head, size: int):
    """The head resampled to size³ isotropic voxels that hold all of it (axis-aligned, centred)."""
    import numpy as np
    import SimpleITK as sitk

    from MIADeepLearningLib.mrml.volumes import export_volume, read_volume_file

    folder = Path(tempfile.mkdtemp(prefix="miadl-bench-"))
    source = sitk.ReadImage(str(export_volume(head, folder / "head.nrrd")))
    extent = np.array(source.GetSize()) * np.array(source.GetSpacing())
    spacing = float(extent.max()) / size
    centre = np.array(source.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in source.GetSize()]))
    direction = np.array(source.GetDirection()).reshape(3, 3)
    reference = sitk.Image([size] * 3, sitk.sitkFloat32)
    reference.SetSpacing([spacing] * 3)
    reference.SetDirection(direction.flatten().tolist())
    reference.SetOrigin((centre - direction @ np.full(3, spacing * (size - 1) / 2)).tolist())
    resampled = sitk.Resample(source, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    path = folder / f"head_{size}.nrrd"
    sitk.WriteImage(resampled, str(path), useCompression=False)
    node = read_volume_file(path, f"ROBEX head {size}^3")
    return node, spacing


def server_memory_mib(pid: int | None) -> str:
    """Resident and peak memory of the warm server (Linux /proc), to show what keeping the model loaded costs."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, TypeError):
        return "n/a"
    values = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status.splitlines()
              if line.startswith(("VmRSS", "VmHWM"))}
    return f"{values.get('VmRSS', 0):.0f} MiB resident, {values.get('VmHWM', 0):.0f} MiB peak"


def benchmark(volume, label: str, runs: int, device: str) -> None:
    from MIADeepLearningLib import runner
    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic

    cold = median_row([timed_run(SegmentationLogic(), volume, device) for _ in range(runs)])
    warm_worker = runner.WarmWorker()
    try:
        logic = SegmentationLogic(warm_worker=warm_worker)
        first = timed_run(logic, volume, device)
        later_rows = [timed_run(logic, volume, device) for _ in range(runs)]
        memory = server_memory_mib(warm_worker.pid)
    finally:
        warm_worker.shutdown()
    later = median_row(later_rows)
    assert later["model_cached"] == 1.0 and first["model_cached"] == 0.0, "the warm worker did not keep the model"

    dims = volume.GetImageData().GetDimensions()
    spacing = "×".join(f"{s:.2f}" for s in volume.GetSpacing())
    print(f"## {label}: {dims[0]}×{dims[1]}×{dims[2]} voxels, {spacing} mm")
    print()
    print(f"| seconds | cold: new process (median of {runs}) | warm: 1st run | warm: later runs (median of {runs}) |")
    print("|---|---|---|---|")
    for title, key in ROWS:
        unit = "×" if key == "ratio" else ""
        cells = [f"{row[key]:.2f}{unit}" for row in (cold, first, later)]
        if key in ("total", "overhead", "ratio"):
            title, cells = f"**{title}**", [f"**{cell}**" for cell in cells]
        print(f"| {title} | {' | '.join(cells)} |")
    print()
    print(f"- warm later run vs cold: total {later['total'] / cold['total']:.2f}×, "
          f"Slicer-side overhead {later['overhead']:.2f} s vs {cold['overhead']:.2f} s "
          f"({cold['overhead'] - later['overhead']:.2f} s saved per Apply)")
    print(f"- warm later run latency / pure inference time: {later['ratio']:.2f}× "
          f"({later['total']:.2f} s vs {later['inference']:.2f} s)")
    print(f"- warm server after the runs: {memory}")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="runs for each median (cold, warm later runs)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=256, help="voxels per axis of the resampled head")
    args = parser.parse_args()

    headless.init()
    import torch

    from MIADeepLearningLib.testing import scenarios

    head, _ = scenarios.load_sample_head()
    big, spacing = volume_256(head, args.size)
    print(f"# Warm worker vs a new worker per run — {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}, device {args.device}")
    print()
    benchmark(head, "ROBEX head as shipped", args.runs, args.device)
    benchmark(big, f"ROBEX head resampled to {args.size}³ ({spacing:.2f} mm, whole head in the field of view)",
              args.runs, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
