"""Speed of the MRI sequence-type classifier: per volume, on a folder from the command line, and as the input type
check inside a brain extraction run. Prints tables; asserts nothing. Synthetic volumes only, so it runs anywhere:

    python Testing/Benchmarks/classification_speed.py [--runs 3] [--folder-size 100] [--device cpu]

1. Classification alone, per volume (median of --runs): read the file, resample onto the classifier's 64³ grid,
   run the network (and, in a second column, the Grad-CAM saliency map back on the input grid), on a 256³ 1 mm
   head-like volume and on a thick-slice 0.9 × 0.9 × 5.5 mm volume of the same head.
2. `python -m MIADeepLearningLib classify -i FOLDER` on --folder-size small volumes (96 × 112 × 104 voxels of 2 mm,
   NRRD gz), wall time of the whole process (start-up, model load, every volume, JSON + CSV).
3. The time the type check adds to brain extraction (deepbet) of the 256³ volume: a new worker process per run (an
   Apply with the default settings: the classifier is loaded in every run) and in one process with the pipeline
   cache (a warm worker: both models stay loaded), each with the check on and off (job option type_check).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MIADeepLearning"))

from MIADeepLearningLib import jobs, runner
from MIADeepLearningLib.testing import sample_data

LIBRARY = Path(__file__).resolve().parents[2] / "MIADeepLearning"


def head_volume(shape_zyx, spacing_xyz, seed: int = 0) -> sitk.Image:
    """sample_data's phantom head (bright scalp shell around a textured brain) on the given grid, int16 like a
    scanner's volume, filling its field of view."""
    voxels = np.clip(sample_data.phantom_head(tuple(shape_zyx), seed=seed), 0, None).astype(np.int16)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing([float(value) for value in spacing_xyz])
    image.SetOrigin([-(n - 1) * s / 2 for n, s in zip(image.GetSize(), image.GetSpacing())])
    return image


def median(values) -> float:
    return statistics.median(values)


def per_volume(classifier, path: Path, runs: int) -> dict[str, float]:
    """Median seconds of read, prepare (resample + channels), network, total without and with saliency."""
    from MIADeepLearningLib.engine import imageio

    rows = []
    for _ in range(runs):
        started = time.perf_counter()
        image = imageio.read_image(path)
        imageio.check_scalar_volume(image)
        read = time.perf_counter() - started
        result = classifier.classify(image)
        total = time.perf_counter() - started
        tick = time.perf_counter()
        with_saliency = classifier.classify(image, saliency=True)
        saliency_total = read + time.perf_counter() - tick
        rows.append({"read": read, "prepare": result.timings["prepare_seconds"],
                     "network": result.timings["network_seconds"], "total": total,
                     "saliency": with_saliency.timings["saliency_seconds"], "total_saliency": saliency_total})
    return {key: median(row[key] for row in rows) for key in rows[0]}


def folder_run(folder: Path, device: str) -> tuple[float, int, str]:
    """Wall seconds of the classify command on the folder, its exit code, and what its JSON holds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LIBRARY), env.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "MIADeepLearningLib", "classify", "-i", str(folder), "--json",
                                str(folder.parent / "folder.json"), "--device", device, "-q"],
                               capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - started
    try:
        entries = json.loads((folder.parent / "folder.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return seconds, completed.returncode, (completed.stderr.strip().splitlines() or ["no output"])[-1]
    failed = sum(entry["error"] is not None for entry in entries)
    return seconds, completed.returncode, f"{len(entries)} entries in the JSON, {failed} failed"


def apply_run(path: Path, folder: Path, device: str, type_check: bool) -> dict[str, float]:
    """One brain extraction job in a new worker process (what Apply does by default): wall seconds and the
    worker's own stage times."""
    job = jobs.Job(task="segment", model="deepbet", inputs={"image": str(path)}, folder=str(folder),
                   outputs={"label": "label.nrrd"}, device=device,
                   options={"input_name": "head", "type_check": type_check})
    started = time.perf_counter()
    run = runner.run(job, timeout_s=900)
    wall = time.perf_counter() - started
    if run.state != runner.STATE_DONE:
        raise RuntimeError(f"the job failed: {run.final_event}")
    timings = run.final_event.result["timings"]
    return {"wall": wall, "type_check": timings.get("type_check", 0.0), "inference": timings["inference"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--folder-size", type=int, default=100, help="volumes in the CLI folder run")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda")
    parser.add_argument("--skip-apply", action="store_true", help="leave out the brain extraction table")
    args = parser.parse_args()

    import torch

    from MIADeepLearningLib.engine import imageio, registry, tasks
    from MIADeepLearningLib.engine.classification import SequenceClassifier
    from MIADeepLearningLib.engine.devices import choose_device, cpu_name

    model = registry.get_model(tasks.TYPE_CHECK_MODEL)
    device = choose_device(args.device).device
    print(f"CPU: {cpu_name()}; {os.cpu_count()} logical CPUs; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; device {device}; SimpleITK {sitk.Version_VersionString()}")
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"model: {model.id} v{model.version} ({model.weights[0].sha256[:12]}…){load}\n")
    started = time.perf_counter()
    classifier = SequenceClassifier(model, registry.verified_weight_paths(model), device,
                                    model.slicer.get("options", {}))
    print(f"model load (sha256 + network build): {time.perf_counter() - started:.2f} s\n")

    with tempfile.TemporaryDirectory(prefix="miadl-classification-speed-") as temporary:
        root = Path(temporary)
        volumes = {
            "head 256³, 1 mm": head_volume((256, 256, 256), (1.0, 1.0, 1.0)),
            "thick slices 256×256×32, 0.9×0.9×5.5 mm": head_volume((32, 256, 256), (0.9, 0.9, 5.5)),
        }
        paths = {name: imageio.write_image(image, root / f"volume{index}.nrrd")
                 for index, (name, image) in enumerate(volumes.items())}
        classifier.classify(volumes["head 256³, 1 mm"], saliency=True)  # warm-up (first-call costs, MONAI import)

        print(f"1. Classification alone, seconds per volume (median of {args.runs})")
        header = f"{'volume':44s} {'read':>6s} {'prepare':>8s} {'network':>8s} {'total':>7s} {'saliency':>9s} " \
                 f"{'total+sal':>10s}"
        print(header)
        print("-" * len(header))
        for name, path in paths.items():
            row = per_volume(classifier, path, args.runs)
            print(f"{name:44s} {row['read']:6.2f} {row['prepare']:8.2f} {row['network']:8.2f} {row['total']:7.2f} "
                  f"{row['saliency']:9.2f} {row['total_saliency']:10.2f}")
        print("(read: file + structure checks; prepare: foreground box, anti-aliasing, resampling to 64³, channels)\n")

        folder = root / "folder"
        folder.mkdir()
        for index in range(args.folder_size):
            imageio.write_image(head_volume((104, 112, 96), (2.0, 2.0, 2.0), seed=index),
                                folder / f"case{index:03d}.nrrd")
        seconds, code, last = folder_run(folder, args.device)
        print(f"2. CLI `classify -i FOLDER` on {args.folder_size} volumes of 96×112×104 voxels (2 mm, NRRD gz)")
        print(f"   wall time {seconds:.1f} s ({seconds / max(1, args.folder_size):.2f} s per volume, process start "
              f"and model load included), exit code {code}; target < 180 s on 2 cores")
        print(f"   {last}\n")

        if args.skip_apply:
            return 0
        head = paths["head 256³, 1 mm"]
        print(f"3. Brain extraction (deepbet) of the 256³ head, seconds (median of {args.runs})")
        header = f"{'':44s} {'check off':>10s} {'check on':>9s} {'added':>7s} {'type_check stage':>17s}"
        print(header)
        print("-" * len(header))
        process = {flag: [apply_run(head, root / f"job-{flag}-{run}", args.device, flag) for run in range(args.runs)]
                   for flag in (False, True)}
        off, on = (median(row["wall"] for row in process[flag]) for flag in (False, True))
        stage = median(row["type_check"] for row in process[True])
        print(f"{'Apply, new worker process per run (wall)':44s} {off:10.2f} {on:9.2f} {on - off:7.2f} {stage:17.2f}")
        cache: dict = {}
        for flag in (False, True):  # load both models once, as a warm worker would have them
            tasks.segment_image(head, "deepbet", device=args.device, pipeline_cache=cache, type_check=flag)
        warm = {}
        for flag in (False, True):
            rows = []
            for _ in range(args.runs):
                started = time.perf_counter()
                output = tasks.segment_image(head, "deepbet", device=args.device, pipeline_cache=cache,
                                             type_check=flag)
                rows.append((time.perf_counter() - started, output.timings.get("type_check", 0.0)))
            warm[flag] = (median(row[0] for row in rows), median(row[1] for row in rows))
        print(f"{'segment_image, models cached (warm worker)':44s} {warm[False][0]:10.2f} {warm[True][0]:9.2f} "
              f"{warm[True][0] - warm[False][0]:7.2f} {warm[True][1]:17.2f}")
        print("(added: on − off, noisy on a shared CPU; type_check stage: the worker's own timing of the check, "
              "classifier load included in a new process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
