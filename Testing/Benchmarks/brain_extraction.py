"""Benchmark of brain extraction through the module's logic: accuracy, geometry consistency, time, memory.

Prints tables (never asserts on time). Runs on a headless scene with the ROBEX sample head:
- Dice against ROBEX's brain mask;
- Dice between the result on the original grid and on flipped / permuted / oblique / anisotropic copies and
  copies round-tripped through NRRD (LPS) and NIfTI files, compared in physical space;
- time per stage (worker start-up, model load with sha256 check, inference, import into the scene), median of N runs;
- peak resident memory of this (Slicer-side) process and of the worker processes.

Usage: python Testing/Benchmarks/brain_extraction.py [--runs N] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MIADeepLearning"))

from MIADeepLearningLib.mrml import headless


def timed_run(logic, volume, device: str):
    """One Apply; returns the result and the seconds from start() to the worker's first event."""
    first_event_at: list[float] = []
    started = time.perf_counter()

    def on_event(event) -> None:
        if not first_event_at:
            first_event_at.append(time.perf_counter() - started)

    result = logic.run(volume, "deepbet", device=device, on_event=on_event)
    return result, first_event_at[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs on the original head (median reported)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    headless.init()
    import torch

    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic
    from MIADeepLearningLib.mrml.segmentations import label_array
    from MIADeepLearningLib.mrml.volumes import ijk_to_ras
    from MIADeepLearningLib.testing import scenarios

    logic = SegmentationLogic()
    head, robex_mask = scenarios.load_sample_head()
    rows = []
    for _ in range(args.runs):
        result, worker_start = timed_run(logic, head, args.device)
        timings = dict(result.timings)
        timings["worker start (to first event)"] = worker_start
        rows.append(timings)
    reference = label_array(result.segmentation_node, "Brain", head)

    print(f"# Brain extraction (deepbet) — {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}, device {result.provenance['device']}")
    print()
    print("| accuracy | value |")
    print("|---|---|")
    print(f"| Dice vs ROBEX brain mask (ROBEX head, 1.5 mm) | {scenarios.dice(reference, robex_mask):.4f} |")
    print()
    print(f"| stage (median of {args.runs} runs) | seconds |")
    print("|---|---|")
    stages = ["export", "worker start (to first event)", "engine_import", "load_model", "read_input", "inference",
              "worker_total", "import", "total"]
    for stage in stages:
        print(f"| {stage} | {statistics.median(row[stage] for row in rows):.2f} |")
    print()

    print("| copy of the head | grid | Dice vs original (physical space) |")
    print("|---|---|---|")
    for label, copy in scenarios.geometry_copies(head).items():
        mask = label_array(logic.run(copy, "deepbet", device=args.device).segmentation_node, "Brain", copy)
        dims = copy.GetImageData().GetDimensions()
        spacing = "×".join(f"{s:.2f}" for s in copy.GetSpacing())
        score = scenarios.dice(scenarios.mask_in_reference_space(mask, ijk_to_ras(copy), head), reference)
        print(f"| {label} | {dims[0]}×{dims[1]}×{dims[2]}, {spacing} mm | {score:.4f} |")
    print()
    print("| peak resident memory | MiB |")
    print("|---|---|")
    print(f"| this process (Slicer side: scene, import, surfaces) | "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} |")
    print(f"| largest worker process | {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
