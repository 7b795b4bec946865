"""The engine's CUDA path on a real GPU: autocast, measured batch sizes and the out-of-memory fallback chain.

Prints one table from one run (never asserts; meant for a machine with a GPU, which CI does not have). The unit
tests replace CUDA with mocks; this runs engine.inference.sliding_window_predict — the function every pipeline
calls — with the shipped thick-slice-sr network on a whole head, so the decisions are taken on real hardware:

- cpu fp32: the reference (all CPU threads, autocast off);
- cuda auto: what a user gets — bf16 (or fp16) autocast, one window measured, then batches sized from free memory;
- cuda fp32: autocast off (the difference to the reference is then rounding only);
- cuda capped: the process may use only --cap-mib of GPU memory (torch.cuda.set_per_process_memory_fraction) while
  the free-memory count the engine sizes batches from still shows the whole card, and sw_batch_size 32 is asked for:
  the first batches run out of memory and the chain must shrink the batch until it fits;
- cuda tiny: a cap below one window's needs: the chain must end on the CPU with the same result.

Each row: precision, final sw batch, where stitching ended, the fallbacks taken, wall seconds, and the largest
difference to the reference relative to the reference's range inside the head.

The input is a held-out label map (default training_seg_13 from a bundle or folder, see training/label_maps.py)
rendered T1-like, acquired with 5 mm slices and encoded as the pipeline encodes it; without --label-maps, the
nilearn MNI tissue map. Torch only (plus SimpleITK when label maps are read from NIfTI files).

Usage: python Testing/Benchmarks/cuda_inference.py [--label-maps maps.npz|FOLDER] [--map training_seg_13]
       [--cap-mib 1500] [--tiny-cap-mib 48]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MIADeepLearning"))

from MIADeepLearningLib.engine import devices
from MIADeepLearningLib.engine.inference import WindowedInferenceConfig, sliding_window_predict
from MIADeepLearningLib.engine.networks import ResidualUNet3D
from MIADeepLearningLib.training import generator as gen
from MIADeepLearningLib.training.label_maps import load_label_maps

WEIGHTS = Path(__file__).resolve().parents[2] / "Resources/Models/thick-slice-sr/models/model.pt"


def encoded_head(label_maps: Path | None, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, D, H, W) network input of a T1-like render acquired with 5 mm slices, and the head mask."""
    training, held_out = load_label_maps(label_maps, [name])
    label_map = (held_out or training)[0]
    generator = torch.Generator().manual_seed(5)
    labels = torch.from_numpy(label_map.indices.astype("int64"))
    image = gen.render(labels, label_map.values, generator, gen.RenderSettings(contrast="t1"))
    acquisition = gen.Acquisition(spacing=5.0, thickness=5.0, offset=2.0, noise_std=0.02, in_plane_sigma=0.0)
    slice_index = gen.slice_coordinates(image.shape[0], acquisition)
    upsampled = gen.upsample_slices(gen.acquire(image, acquisition, generator), slice_index)
    normalised, _, _ = gen.normalise(upsampled)
    inputs = gen.network_input(normalised, slice_index, acquisition.spacing)
    padding = [(-n) % 4 for n in inputs.shape[1:]]  # the pipeline pads to a multiple of 4 (two poolings)
    inputs = torch.nn.functional.pad(inputs[None], [p for n in reversed(padding) for p in (0, n)], mode="replicate")[0]
    mask = torch.nn.functional.pad(labels > 0, [p for n in reversed(padding) for p in (0, n)])
    return inputs.contiguous(), mask


def run_case(network: torch.nn.Module, inputs: torch.Tensor, device: torch.device, autocast: bool,
             sw_batch_size: int | None, cap_mib: float | None) -> tuple[torch.Tensor, object, float]:
    config = WindowedInferenceConfig(roi_size=(96, 96, 96), overlap=0.25, mode="gaussian", skip_background=False,
                                     output_dtype=torch.float32, output_kind="intensities", autocast=autocast,
                                     sw_batch_size=sw_batch_size)
    index = torch.cuda.current_device() if device.type == "cuda" and device.index is None else device.index
    if device.type == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if cap_mib is None else cap_mib * 2**20 / total, index)
    network = network.to(device)
    started = time.perf_counter()
    try:
        output, report = sliding_window_predict(network, inputs, config, device)
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, index)
    return output, report, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label-maps", type=Path, help="bundle (.npz) or folder of label maps")
    parser.add_argument("--map", default="training_seg_13", help="the label map to render")
    parser.add_argument("--cap-mib", type=float, default=1500.0, help="GPU memory cap of the 'capped' case")
    parser.add_argument("--tiny-cap-mib", type=float, default=48.0, help="GPU memory cap of the 'tiny' case")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: nothing to check here (this benchmark is for a machine with a GPU).")
        return 0
    cuda = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(cuda)}, CPU threads {torch.get_num_threads()}, "
          f"autocast dtype {devices.autocast_dtype(cuda)}")
    payload = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    network = ResidualUNet3D(in_channels=3, features=payload["features"])
    network.load_state_dict(payload["state_dict"])
    network.eval()
    inputs, mask = encoded_head(args.label_maps, args.map)
    print(f"input {tuple(inputs.shape)} ({args.map}, T1-like, 5 mm slices), roi 96, overlap 0.25")
    cases = [("cpu fp32", torch.device("cpu"), False, None, None),
             ("cuda auto", cuda, True, None, None),
             ("cuda fp32", cuda, False, None, None),
             (f"cuda capped {args.cap_mib:.0f} MiB, batch 32", cuda, True, 32, args.cap_mib),
             (f"cuda tiny {args.tiny_cap_mib:.0f} MiB", cuda, True, None, args.tiny_cap_mib)]
    reference = None
    header = "| case | ran on | precision | sw batch | stitching | fallbacks | wall s | max diff / range |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, device, autocast, batch, cap in cases:
        try:
            output, report, seconds = run_case(network, inputs, device, autocast, batch, cap)
        except Exception as error:  # a benchmark reports every case, failures included
            print(f"| {name} | failed: {type(error).__name__}: {str(error).splitlines()[0][:150]} |||||||")
            continue
        if reference is None:
            reference = output
            inside = reference[0][mask]
            value_range = float(inside.max() - inside.min())
            difference = "reference"
        else:
            difference = f"{float((output[0] - reference[0])[mask].abs().max()) / value_range:.2e}"
        fallbacks = "; ".join(report.fallbacks) or "none"
        print(f"| {name} | {report.device} | {report.precision} | {report.sw_batch_size} | {report.stitch_device} | "
              f"{fallbacks} | {seconds:.2f} | {difference} |", flush=True)
        for note in report.notes:
            print(f"|   note | {note} |||||||")
    return 0


if __name__ == "__main__":
    sys.exit(main())
