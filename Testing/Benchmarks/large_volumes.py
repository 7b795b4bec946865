"""Benchmark of large inputs: peak memory and time of every task of the extension on a whole-body CT.

Why: clinicians load whole-body CTs (512×512×1200 voxels, 0.7×0.7×0.6 mm, int16) as readily as heads, and a
model that resamples or copies such a volume in float64 can take a workstation's whole memory. This script measures
what each task really costs on one, so that the pre-flight bound (engine/memory.py) can be checked against it.

Prints one table (never asserts): task, input size, peak RSS of the process that does the work, wall time, outcome,
and the pre-flight estimate for the same input. Each engine task runs through the CLI
(``python -m MIADeepLearningLib segment|synthesize|register ...``, in-process: the CLI process is the worker), with
the pre-flight check switched off (MIADL_AVAILABLE_MEMORY_GB set very high) so that the real cost is measured. The
peak RSS is the kernel's (``os.wait4`` ru_maxrss of that process); a watchdog kills a run whose RSS passes --cap-gb
(the machine is shared) and the row then says at which stage. The last row exports the volume from a headless Slicer
scene with ``mrml.volumes.export_volume`` (what every module's Apply does first) and reports that process's peak.

Inputs are synthetic (nothing from shared data): a whole-body CT in Hounsfield units (legs, pelvis, abdomen, chest
with lungs, neck, head with skull and brain, a table), --slices slices of 0.6 mm on a 512×512 grid of 0.7 mm, and,
as the moving image of the registration, a T1-like 1 mm head (176×208×176). Smaller --slices give the same anatomy
compressed along z: the rows at several sizes give the slope per voxel that the bound uses.

Usage: python Testing/Benchmarks/large_volumes.py [--slices 1200 [300 ...]] [--tasks deepbet,brain-tissue,...]
       [--cap-gb 11] [--workdir DIR] [--threads N] [--instance-steps 50] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "MIADeepLearning"
sys.path.insert(0, str(LIBRARY))

from MIADeepLearningLib.engine.devices import cpu_name  # noqa: E402  (after the library is on sys.path)

TASKS = ("deepbet", "brain-tissue", "thick-slice-sr", "brain-registration", "export")
BODY_SPACING = (0.7, 0.7, 0.6)  # x, y, z in mm
HEAD_SIZE = (176, 208, 176)  # x, y, z voxels of 1 mm
GB = 1024.0**3
NO_PREFLIGHT_GB = "100000"  # MIADL_AVAILABLE_MEMORY_GB for the measured runs: the check never refuses


# ------------------------------------------------------------------------------------------------ synthetic inputs


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def _body_slice(x: np.ndarray, y: np.ndarray, f: float, rng: np.random.Generator) -> np.ndarray:
    """One axial slice (HU) at height f (0 feet end of the field, 1 top of the head); y grows posterior (LPS)."""
    hu = np.full(x.shape, -1000.0, np.float32)
    hu[(y > 135) & (y < 145) & (np.abs(x) < 200)] = 250.0  # the scanner table
    bone: list[tuple[float, float, float, float]] = []  # (cx, cy, outer radius, HU)
    if f < 0.28:  # thighs
        outlines = [(-55.0, 20.0, 62.0, 68.0), (55.0, 20.0, 62.0, 68.0)]
        bone = [(-55.0, 20.0, 14.0, 1100.0), (55.0, 20.0, 14.0, 1100.0)]
    elif f < 0.42:  # pelvis
        outlines = [(0.0, 10.0, 165.0, 110.0)]
        bone = [(-100.0, 20.0, 22.0, 700.0), (100.0, 20.0, 22.0, 700.0), (0.0, 75.0, 18.0, 600.0)]
    elif f < 0.60:  # abdomen
        outlines = [(0.0, 5.0, 150.0, 105.0)]
        bone = [(0.0, 65.0, 17.0, 600.0)]
    elif f < 0.78:  # chest
        outlines = [(0.0, 5.0, 165.0, 112.0)]
        bone = [(0.0, 70.0, 17.0, 600.0)]
    elif f < 0.84:  # neck
        outlines = [(0.0, 10.0, 55.0, 60.0)]
        bone = [(0.0, 30.0, 12.0, 600.0)]
    else:  # head: an ellipsoid cap
        g = float(np.sqrt(max(0.0, 1.0 - ((f - 0.905) / 0.095) ** 2)))
        outlines = [(0.0, 0.0, max(72.0 * g, 5.0), max(92.0 * g, 5.0))]
    inside = np.zeros(x.shape, bool)
    for cx, cy, a, b in outlines:
        body = _ellipse(x, y, cx, cy, a, b)
        inside |= body
        hu[body] = -100.0  # fat under the skin
        hu[_ellipse(x, y, cx, cy, a - 12, b - 12)] = 45.0  # muscle and organs
    if 0.60 <= f < 0.78:  # lungs and heart
        for cx in (-75.0, 75.0):
            hu[_ellipse(x, y, cx, 10.0, 55.0, 75.0)] = -850.0
        hu[_ellipse(x, y, 15.0, -25.0, 50.0, 45.0)] = 40.0
    if 0.42 <= f < 0.60:  # bowel gas
        for cx, cy in ((-40.0, -30.0), (35.0, -10.0), (60.0, -50.0)):
            hu[_ellipse(x, y, cx, cy, 12.0, 9.0)] = -900.0
    if f >= 0.84:  # skull, brain, ventricles
        cx, cy, a, b = outlines[0]
        hu[_ellipse(x, y, cx, cy, a, b)] = 40.0
        hu[_ellipse(x, y, cx, cy, a - 3, b - 3)] = 1000.0
        brain = _ellipse(x, y, cx, cy, a - 9, b - 9)
        hu[brain] = 35.0
        if 0.88 < f < 0.94:
            for vx in (-10.0, 10.0):
                hu[_ellipse(x, y, vx, 0.0, 6.0, 25.0)] = 5.0
    for cx, cy, radius, value in bone:
        hu[_ellipse(x, y, cx, cy, radius, radius)] = value
        hu[_ellipse(x, y, cx, cy, radius * 0.6, radius * 0.6)] = 250.0  # marrow
    noise = rng.normal(0.0, 10.0, x.shape).astype(np.float32)
    return np.where(inside | (hu > -1000), hu + noise, hu)


def body_ct(slices: int, size: int = 512, seed: int = 0) -> np.ndarray:
    """(z, y, x) int16 HU of a whole body from the thighs (z = 0) to the top of the head."""
    rng = np.random.default_rng(seed)
    coordinates = (np.arange(size) - (size - 1) / 2.0)
    x = (coordinates * BODY_SPACING[0])[None, :].repeat(size, 0).astype(np.float32)
    y = (coordinates * BODY_SPACING[1])[:, None].repeat(size, 1).astype(np.float32)
    volume = np.empty((slices, size, size), np.int16)
    for k in range(slices):
        volume[k] = np.clip(_body_slice(x, y, k / max(1, slices - 1), rng), -1024, 3000).astype(np.int16)
    return volume


def head_mr(seed: int = 1) -> np.ndarray:
    """(z, y, x) int16 T1-like head on a 1 mm grid: scalp, skull, CSF, gray and white matter, ventricles."""
    nx, ny, nz = HEAD_SIZE
    z, y, x = np.meshgrid(*(np.arange(n) - (n - 1) / 2.0 for n in (nz, ny, nx)), indexing="ij", sparse=True)
    radius = np.sqrt((x / 72.0) ** 2 + (y / 92.0) ** 2 + (z / 80.0) ** 2)
    values = np.zeros((nz, ny, nx), np.float32)
    for outer, value in ((1.0, 350.0), (0.95, 80.0), (0.90, 150.0), (0.86, 450.0), (0.72, 650.0)):
        values[radius <= outer] = value
    values[(np.abs(np.abs(x) - 9) < 5) & (np.abs(y) < 25) & (np.abs(z) < 15)] = 150.0  # ventricles
    values += np.random.default_rng(seed).normal(0.0, 8.0, values.shape).astype(np.float32)
    return np.clip(values, 0, 2000).astype(np.int16)


def write_volume(voxels: np.ndarray, spacing: tuple[float, float, float], path: Path) -> Path:
    """An uncompressed NRRD (what the Slicer side hands the worker), centred on the origin."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing(spacing)
    image.SetOrigin([-(n - 1) / 2.0 * s for n, s in zip(image.GetSize(), spacing)])
    sitk.WriteImage(image, str(path), useCompression=False)
    return path


# ------------------------------------------------------------------------------------------------------ measuring


def _rss(pid: int) -> int:
    """Current resident set size of a process in bytes (0 when it is gone); /proc, so no psutil is needed."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(command: list[str], env: dict[str, str], cap_bytes: float, log: Path) -> dict[str, Any]:
    """Run one command; its peak RSS (kernel high-water mark), wall time, exit code, the stage (last progress line)
    where its RSS peaked, and whether the watchdog killed it at the cap."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as stderr, \
            open(log.with_suffix(".out"), "w", encoding="utf-8") as stdout:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=stdout, stderr=stderr,
                                   start_new_session=True)
    state = {"killed_at": None, "peak_seen": 0, "peak_stage": ""}
    finished = threading.Event()  # the watcher never waits on the process itself: only wait4 below reaps it

    def stage_now() -> str:
        try:
            lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if "%" in line]
        except OSError:
            return ""
        return lines[-1].split("%", 1)[-1].strip()[:70] if lines else ""

    def watch() -> None:
        while not finished.is_set():
            rss = _rss(process.pid)
            if rss > state["peak_seen"]:
                state["peak_seen"], state["peak_stage"] = rss, stage_now()
            if rss > cap_bytes and state["killed_at"] is None:
                state["killed_at"] = stage_now()
                os.killpg(process.pid, signal.SIGKILL)
            finished.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(process.pid, 0)
    finished.set()
    process.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    text = log.read_text(encoding="utf-8", errors="replace").splitlines()
    return {"peak_rss": usage.ru_maxrss * 1024, "wall_s": time.perf_counter() - started,
            "rc": process.returncode, "killed_at": state["killed_at"], "peak_stage": state["peak_stage"],
            "stderr_tail": text[-6:], "stdout": log.with_suffix(".out").read_text(encoding="utf-8")}


def outcome(run: dict[str, Any]) -> str:
    """One short phrase for the table."""
    if run["killed_at"] is not None:
        return f"killed at the {run['cap_gb']:g} GB cap during: {run['killed_at']}"
    errors = [line for line in run["stderr_tail"] if line.startswith("error:")]
    warnings = [line for line in run["stderr_tail"] if line.startswith("warning:")]
    if run["rc"] == 0:
        return "ok" + (f" ({len(warnings)} warning(s))" if warnings else "")
    return (errors[-1] if errors else f"exit {run['rc']}: {(run['stderr_tail'] or [''])[-1]}")[:160]


def export_child(source: str, target: str) -> None:
    """Runs in its own process: load the volume into a headless scene, export it as the modules do, print JSON."""
    from MIADeepLearningLib.mrml import headless, volumes

    headless.init()
    node = volumes.read_unattached_volume(source, labelmap=False)
    headless.init().scene.AddNode(node)
    before_rss = _rss(os.getpid())
    before_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    volumes.export_volume(node, target)
    seconds = time.perf_counter() - started
    after_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"node_rss": before_rss, "peak_before": before_peak, "peak_after": after_peak,
                      "export_s": seconds, "file_bytes": Path(target).stat().st_size}))


def commands(task: str, body: Path, head: Path, out: Path, instance_steps: int) -> list[str]:
    cli = [sys.executable, "-m", "MIADeepLearningLib"]
    if task == "deepbet":
        return [*cli, "segment", "--model", "deepbet", "-i", str(body), "-o", str(out / "brain.nrrd"),
                "--device", "cpu"]
    if task == "brain-tissue":
        return [*cli, "segment", "--model", "brain-tissue", "-i", str(body), "-o", str(out / "tissue.nrrd"),
                "--device", "cpu"]
    if task == "thick-slice-sr":
        return [*cli, "synthesize", "--model", "thick-slice-sr", "-i", str(body), "-o", str(out / "1mm.nrrd"),
                "--device", "cpu"]
    if task == "brain-registration":
        return [*cli, "register", "--model", "brain-registration", "--fixed", str(body), "--moving", str(head),
                "-o", str(out / "warped.nrrd"), "--transform", str(out / "field.h5"), "--device", "cpu",
                "--instance-steps", str(instance_steps)]
    return [sys.executable, str(Path(__file__).resolve()), "--export-child", str(body), str(out / "export.nrrd")]


def preflight_estimate(task: str, body: Path, head: Path) -> str:
    """What the pre-flight check (engine/memory.py) estimates for the same run, in GB."""
    from MIADeepLearningLib.engine import memory, registry

    if task == "export":
        return ""
    model = registry.get_model(task)
    paths = {"fixed": body, "moving": head} if task == "brain-registration" else {"image": body}
    found = memory.estimate_files(model.pipeline, paths, model.slicer.get("options", {}),
                                  sum(weight.size or 0 for weight in model.weights))
    return f"{found.total_gb:.1f}" if found is not None else ""



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--export-child"]:
        export_child(argv[1], argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[1200], help="body CT sizes along z (default 1200)")
    parser.add_argument("--spacing", type=float, nargs=3, default=list(BODY_SPACING), metavar=("X", "Y", "Z"),
                        help="voxel size of the body CT in mm (default 0.7 0.7 0.6); smaller voxels, same voxel "
                             "count: fewer working-grid voxels")
    parser.add_argument("--with-head", action="store_true",
                        help="also run every task on the 1 mm head (the registration: head to itself)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--cap-gb", type=float, default=11.0, help="kill a run whose RSS passes this (default 11)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch/ITK threads per run")
    parser.add_argument("--instance-steps", type=int, default=50,
                        help="registration refinement steps (default 50, the DL Registration module's default)")
    parser.add_argument("--workdir", help="where the inputs and outputs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {unknown}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="miadl-large-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(LIBRARY), "MIADL_AVAILABLE_MEMORY_GB": NO_PREFLIGHT_GB,
           "OMP_NUM_THREADS": str(args.threads), "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(args.threads),
           "VTK_DEFAULT_OPENGL_WINDOW": "vtkOSOpenGLRenderWindow"}
    head = work / "head.nrrd"
    if not head.exists():
        write_volume(head_mr(), (1.0, 1.0, 1.0), head)
    spacing = tuple(args.spacing)
    spacing_text = "×".join(f"{value:g}" for value in spacing)
    inputs = [("head 176×208×176 (1 mm)", head, int(np.prod(HEAD_SIZE)))] if args.with_head else []
    for slices in args.slices:
        body = work / f"body-{slices}-{spacing_text}.nrrd"
        if not body.exists():
            write_volume(body_ct(slices), spacing, body)
        inputs.append((f"512×512×{slices} ({spacing_text} mm)", body, 512 * 512 * slices))
    rows = []
    try:
        for label, body, voxels in inputs:
            for task in tasks:
                out = work / f"out-{task}-{body.stem}"
                out.mkdir(exist_ok=True)
                run = run_measured(commands(task, body, head, out, args.instance_steps), env, args.cap_gb * GB,
                                   work / f"{task}-{body.stem}.log")
                run["cap_gb"] = args.cap_gb
                size = label + (" + head" if task == "brain-registration" else "")
                row = {"task": task, "size": size, "voxels": voxels, "peak_gb": run["peak_rss"] / GB,
                       "wall_s": run["wall_s"], "outcome": outcome(run), "peak_stage": run["peak_stage"],
                       "estimate_gb": preflight_estimate(task, body, head)}
                if task == "export" and run["rc"] == 0:
                    child = json.loads(run["stdout"].strip().splitlines()[-1])
                    row["outcome"] = (f"ok: {child['file_bytes'] / GB:.2f} GB NRRD in {child['export_s']:.1f} s; the "
                                      f"scene with the node held {child['node_rss'] / GB:.2f} GB, export added "
                                      f"{max(0, child['peak_after'] - child['peak_before']) / GB:.2f} GB")
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"CPU: {cpu_name()}, {args.threads} thread(s); cap {args.cap_gb:g} GB; registration with "
          f"{args.instance_steps} refinement steps; peak RSS = kernel high-water mark of the working process")
    header = ("task", "input (voxels)", "peak RSS GB", "estimate GB", "wall s", "RSS peaked during", "outcome")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        print(" | ".join([row["task"], row["size"], f"{row['peak_gb']:.2f}", row["estimate_gb"] or "-",
                          f"{row['wall_s']:.0f}", row["peak_stage"] or "-", row["outcome"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
