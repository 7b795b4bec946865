"""Benchmark of windowed inference: the engine's sliding_window_predict against MONAI's sliding_window_inference.

Prints tables (never asserts on time). Same network, same input, same window grid:
- network: MONAI UNet as in the Model Zoo spleen_ct_segmentation bundle (channels 16-256, strides 2, 2 residual
  units, batch norm, 2 classes), trained for a few steps on the phantom so its outputs are as confident as a real
  model's (random weights give near-ties everywhere, which says nothing about labels);
- input: a CT-like torso phantom, 192x192x128 voxels at 1.5 mm (body ellipse in air, fat, muscle, liver, spleen,
  kidneys, aorta, spine, lungs), scaled like the bundle (-57..164 HU -> 0..1, clipped);
- windows 96³, Gaussian blending, overlap 0.25 and 0.5. MONAI runs in fp32 with sw_batch_size 2 (its fastest setting
  on the 2-core CPU this was written on). Ours: "ours" with its defaults (MIADL_CPU_RUNTIME unset, i.e. auto: on a CPU
  without native bf16 the network runs through OpenVINO fp32 once it passed its check against PyTorch fp32,
  engine/cpu_runtime.py), "ours-pytorch" with MIADL_CPU_RUNTIME=pytorch (PyTorch: fp32, or bf16 autocast where the
  CPU has native bf16 and the probe keeps it), and "ours-fp32" with autocast off (runtime auto, as "ours").
  Issue 17's target: ours <= 0.6x MONAI's sliding_window_inference time; the ratio is printed for each of ours.

Each (method, overlap) runs in fresh subprocesses. Memory: before each run the process's resident peak (VmHWM) is
reset to its current resident size (/proc/self/clear_refs), so "peak RSS" is the largest resident size during a run
(libraries, network and input included) and "working set" is that peak minus the resident size just before the run;
both are the largest over all runs. Times: the median and the minimum of the warm runs of all rounds (the first, cold
run of each subprocess is shown separately; it includes oneDNN's first-call set-up and, for ours, the bf16 probe or
OpenVINO's set-up: the conversion and the check against PyTorch in the first subprocess, loading and compiling the
cached conversion in later ones; the children share one cache folder, <data>/cache, as MIADL_CACHE_DIR).
Rounds alternate the methods so load from other processes hits all of them alike; the load average is printed.

Usage: python Testing/Benchmarks/sliding_window.py [--rounds 2] [--runs 3] [--roi 96] [--train-steps 80]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MIADeepLearning"))

SPACING_MM = 1.5
SHAPE = (192, 192, 128)
METHODS = ("monai", "ours", "ours-pytorch", "ours-fp32")
MONAI_SW_BATCH_SIZE = 2
RUNTIME_ENV = "MIADL_CPU_RUNTIME"  # engine/cpu_runtime.py: auto (unset) | openvino | pytorch
TARGET_VS_MONAI = 0.6  # issue 17: windowed inference at most this share of MONAI's time


# ------------------------------------------------------------------------------------------------ phantom, network


def torso_phantom(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(HU image, spleen mask), x left-right, y anterior-posterior, z caudal-cranial; venous-phase CT values."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    cx, cy = shape[0] / 2.0, shape[1] / 2.0
    hu = np.full(shape, -1000.0, dtype=np.float32)

    def ellipsoid(centre, radii):
        return sum(((axis - c) / r) ** 2 for axis, c, r in zip((x, y, z), centre, radii)) <= 1.0

    body = ((x - cx) / 84.0) ** 2 + ((y - cy) / 62.0) ** 2 <= 1.0  # 252 x 186 mm: air is ~56 % of each slice
    inner = ((x - cx) / 76.0) ** 2 + ((y - cy) / 54.0) ** 2 <= 1.0
    hu[body] = -100.0  # subcutaneous fat
    hu[inner] = 50.0  # muscle and soft tissue
    lungs = inner & (z > 0.7 * shape[2]) & ~ellipsoid((cx, cy + 10, 0), (22, 30, 1e4))
    hu[lungs] = -850.0
    liver = ellipsoid((cx - 35, cy - 5, 0.55 * shape[2]), (38, 35, 30))
    hu[liver & inner] = 105.0
    spleen = ellipsoid((cx + 48, cy + 22, 0.5 * shape[2]), (14, 20, 22)) & inner
    hu[spleen] = 125.0
    for side in (-1, 1):
        hu[ellipsoid((cx + side * 32, cy + 28, 0.35 * shape[2]), (9, 12, 18))] = 160.0  # kidneys
    hu[ellipsoid((cx + 6, cy + 18, 0), (7, 7, 1e4))] = 170.0  # aorta
    hu[ellipsoid((cx, cy + 42, 0), (11, 11, 1e4))] = 450.0  # vertebrae
    hu += rng.normal(0.0, 12.0, size=shape).astype(np.float32)
    return hu, spleen.astype(np.uint8)


def scale_like_the_bundle(hu: np.ndarray) -> np.ndarray:
    """ScaleIntensityRanged(a_min=-57, a_max=164, b_min=0, b_max=1, clip=True) of spleen_ct_segmentation."""
    return np.clip((hu + 57.0) / (164.0 + 57.0), 0.0, 1.0).astype(np.float32)


def spleen_unet() -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
                num_res_units=2, norm="batch")


def train(image: torch.Tensor, label: torch.Tensor, steps: int, crop: int = 64, seed: int = 0) -> dict:
    """A few Adam steps on crops (half of them around the spleen) so the outputs are confident."""
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    network = spleen_unet().train()
    optimiser = torch.optim.Adam(network.parameters(), lr=2e-3)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    spleen_voxels = torch.nonzero(label[0]).numpy()
    size = image.shape[1:]
    for step in range(steps):
        images, labels = [], []
        for sample in range(2):
            if sample == 0:
                centre = spleen_voxels[rng.integers(len(spleen_voxels))]
            else:
                centre = [rng.integers(n) for n in size]
            low = [int(min(max(c - crop // 2, 0), n - crop)) for c, n in zip(centre, size)]
            region = (slice(None), *[slice(lo, lo + crop) for lo in low])
            images.append(image[region])
            labels.append(label[region])
        optimiser.zero_grad()
        loss = loss_function(network(torch.stack(images)), torch.stack(labels).long())
        loss.backward()
        optimiser.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"  training step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    return network.eval().state_dict()


# ---------------------------------------------------------------------------------------------------- one method


def _status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (resident peak) of this process, from /proc/self/status."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so the next peak is the measured section's own. Why not
    ru_maxrss: Linux carries it across exec, so a child started from a large parent reports the parent's peak."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def child(method: str, overlap: float, data: Path, runs: int, roi: int, save: bool) -> None:
    """Runs one method `runs` times in this fresh process and prints one JSON line."""
    from monai.inferers import sliding_window_inference

    from MIADeepLearningLib.engine.inference import WindowedInferenceConfig, sliding_window_predict

    network = spleen_unet()
    network.load_state_dict(torch.load(data / "weights.pt", weights_only=True))
    network.eval()
    image = torch.load(data / "image.pt", weights_only=True)
    roi_size = (roi, roi, roi)
    cpu = torch.device("cpu")
    times, peaks, baselines, report = [], [], [], None
    output = None
    for _ in range(runs):
        output = None
        gc.collect()
        baselines.append(_status_bytes("VmRSS"))
        if not _reset_peak():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); this benchmark needs Linux >= 4.0")
        started = time.perf_counter()
        if method == "monai":
            with torch.inference_mode():
                output = sliding_window_inference(image[None], roi_size, MONAI_SW_BATCH_SIZE, network, overlap,
                                                  mode="gaussian")[0]
        else:
            config = WindowedInferenceConfig(roi_size=roi_size, overlap=overlap, mode="gaussian",
                                             autocast=method != "ours-fp32")
            output, report = sliding_window_predict(network, image, config, cpu)
        times.append(time.perf_counter() - started)
        peaks.append(_status_bytes("VmHWM"))
    result = {"method": method, "overlap": overlap, "times": times, "peaks": peaks, "baselines": baselines}
    if report is not None:
        result.update(windows_total=report.windows_total, windows_evaluated=report.windows_evaluated,
                      precision=report.precision, sw_batch_size=report.sw_batch_size, notes=report.notes,
                      runtime=getattr(report, "runtime", "pytorch"))
    if save and output is not None:
        torch.save(output.contiguous().clone(), data / f"output-{method}-{overlap}.pt")
    print("RESULT " + json.dumps(result), flush=True)


def child_environment(method: str, data: Path) -> dict[str, str]:
    """ours-pytorch: MIADL_CPU_RUNTIME=pytorch; the others: unset (auto). All share <data>/cache as the engine's
    cache, so OpenVINO converts and checks the network once (in the first child that needs it)."""
    env = dict(os.environ)
    env.pop(RUNTIME_ENV, None)
    if method == "ours-pytorch":
        env[RUNTIME_ENV] = "pytorch"
    env["MIADL_CACHE_DIR"] = str(data / "cache")
    return env


def run_child(method: str, overlap: float, data: Path, runs: int, roi: int, save: bool) -> dict:
    command = [sys.executable, __file__, "--child", method, "--overlap", str(overlap), "--data", str(data),
               "--runs", str(runs), "--roi", str(roi)] + (["--save"] if save else [])
    completed = subprocess.run(command, capture_output=True, text=True, check=False,
                               env=child_environment(method, data))
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{method} at overlap {overlap} failed:\n{completed.stdout}\n{completed.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


# -------------------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="subprocesses per method and overlap (alternating)")
    parser.add_argument("--runs", type=int, default=3, help="runs per subprocess (the first one is cold)")
    parser.add_argument("--roi", type=int, default=96, help="window edge in voxels (a multiple of 16)")
    parser.add_argument("--train-steps", type=int, default=80)
    parser.add_argument("--overlaps", default="0.25,0.5")
    parser.add_argument("--data", type=Path, default=None, help="folder for the phantom, weights and outputs")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--overlap", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.overlap, args.data, args.runs, args.roi, args.save)
        return 0

    import monai

    data = args.data or Path(tempfile.mkdtemp(prefix="miadl-sliding-window-"))
    data.mkdir(parents=True, exist_ok=True)
    hu, spleen = torso_phantom()
    image = torch.from_numpy(scale_like_the_bundle(hu))[None]
    label = torch.from_numpy(spleen)[None]
    torch.save(image, data / "image.pt")
    if not (data / "weights.pt").exists():
        print(f"Training the spleen UNet for {args.train_steps} steps on the phantom ...", flush=True)
        started = time.perf_counter()
        torch.save(train(image, label, args.train_steps), data / "weights.pt")
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    overlaps = [float(value) for value in args.overlaps.split(",")]
    load_before = os.getloadavg()[0]
    results: dict[tuple[str, float], list[dict]] = {}
    for overlap in overlaps:
        for round_index in range(args.rounds):
            order = METHODS if round_index % 2 == 0 else tuple(reversed(METHODS))
            for method in order:
                result = run_child(method, overlap, data, args.runs, args.roi, save=round_index == 0)
                results.setdefault((method, overlap), []).append(result)
                print(f"  overlap {overlap} round {round_index + 1} {method}: "
                      + " ".join(f"{t:.2f}" for t in result["times"]) + " s", flush=True)
    load_after = os.getloadavg()[0]

    from MIADeepLearningLib.engine import devices

    air_share = float((hu < -57).mean())
    print()
    print(f"# Windowed inference vs MONAI sliding_window_inference — {devices.cpu_name()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}, MONAI {monai.__version__}, {torch.get_num_threads()} threads")
    print()
    print(f"Input: torso phantom {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} at {SPACING_MM} mm, {air_share:.0%} of voxels at the "
          f"background value (air, fat and lung clip to 0). Network: spleen UNet (16-256, strides 2, 2 res units, "
          f"batch norm), {args.train_steps} training steps on the phantom. Windows {args.roi}³, Gaussian; MONAI fp32 "
          f"with sw_batch_size {MONAI_SW_BATCH_SIZE}. Load average {load_before:.1f} before, {load_after:.1f} after.")
    print()
    print("| overlap | method | runtime | windows run / total | precision | time s, warm: median (min) | first run s | "
          "time vs MONAI: median (min) | peak RSS MiB | working set MiB | peak vs MONAI | working set vs MONAI | "
          "labels same as MONAI | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ratios: dict[tuple[str, float], float] = {}
    for overlap in overlaps:
        reference = torch.load(data / f"output-monai-{overlap}.pt", weights_only=True)
        reference_labels = reference.argmax(0)
        summary = {}
        for method in METHODS:
            entries = results[(method, overlap)]
            warm = [t for entry in entries for t in entry["times"][1:]] or [entry["times"][0] for entry in entries]
            summary[method] = {
                "time": statistics.median(warm),
                "best": min(warm),
                "cold": statistics.median(entry["times"][0] for entry in entries),
                "peak": max(max(entry["peaks"]) for entry in entries) / 2**20,
                "work": max(max(p - b for p, b in zip(entry["peaks"], entry["baselines"])) for entry in entries)
                / 2**20,
                "entry": entries[0],
            }
        base = summary["monai"]
        for method in METHODS:
            row, entry = summary[method], summary[method]["entry"]
            output = torch.load(data / f"output-{method}-{overlap}.pt", weights_only=True)
            same = (output.argmax(0) == reference_labels).float().mean().item()
            diff = (output - reference).abs().max().item()
            windows = (f"{entry['windows_evaluated']} / {entry['windows_total']}" if "windows_total" in entry
                       else "all")
            precision = entry.get("precision", "float32")
            runtime = entry.get("runtime", "pytorch")
            ratios[(method, overlap)] = row["time"] / base["time"]
            print(f"| {overlap} | {method} | {runtime} | {windows} | {precision} | "
                  f"{row['time']:.2f} ({row['best']:.2f}) | "
                  f"{row['cold']:.2f} | {row['time'] / base['time']:.2f}x ({row['best'] / base['best']:.2f}x) | "
                  f"{row['peak']:.0f} | {row['work']:.0f} | "
                  f"{row['peak'] / base['peak']:.2f}x | {row['work'] / base['work']:.2f}x | {same:.4%} | "
                  f"{diff:.2e} |")
    print()
    for method in METHODS[1:]:
        verdicts = ", ".join(f"overlap {overlap}: {ratios[(method, overlap)]:.2f}x "
                             f"({'met' if ratios[(method, overlap)] <= TARGET_VS_MONAI else 'not met'})"
                             for overlap in overlaps)
        print(f"{method} / MONAI time (median, target <= {TARGET_VS_MONAI}x): {verdicts}")
    print()
    monai_labels = torch.load(data / f"output-monai-{overlaps[-1]}.pt", weights_only=True).argmax(0)
    truth = label[0].bool()
    found = monai_labels.bool()
    dice = 2.0 * (found & truth).sum().item() / max(found.sum().item() + truth.sum().item(), 1)
    confident = (reference.softmax(0).amax(0) > 0.9).float().mean().item()
    print(f"Network: MONAI's labels vs the phantom's spleen, Dice {dice:.3f}; {confident:.1%} of voxels with a "
          f"softmax above 0.9 (overlap {overlaps[-1]}). A briefly trained stand-in: what matters here is its cost "
          "and that its outputs are as confident as a real model's, not its accuracy.")
    for method in METHODS[1:]:
        for overlap in overlaps:
            notes = results[(method, overlap)][0].get("notes", [])
            print(f"{method} at overlap {overlap}: " + ("; ".join(notes) if notes else "no notes"))
    print(f"Data and outputs: {data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
