"""Pick the compute device and explain the choice: clinicians ask "why is my GPU not used?" more than anything."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any

import torch

from MIADeepLearningLib.engine.errors import InputError


@dataclass
class DeviceChoice:
    device: torch.device
    reason: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def cuda_unavailable_reason() -> str | None:
    """None when CUDA can be used, else one sentence saying why not."""
    if torch.version.cuda is None:
        return f"this PyTorch build ({torch.__version__}) has no CUDA support"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides all GPUs"
    try:
        available = torch.cuda.is_available()
    except Exception as error:  # a broken driver raises here on some systems
        return f"the CUDA driver could not be initialised ({error})"
    if not available:
        return "no CUDA GPU or a driver too old for this PyTorch build"
    major, minor = torch.cuda.get_device_capability(0)
    built_for = [int(arch[3:]) for arch in torch.cuda.get_arch_list() if arch.startswith("sm_") and arch[3:].isdigit()]
    if built_for and major * 10 + minor > max(built_for):
        return (f"GPU compute capability {major}.{minor} is newer than this PyTorch build supports "
                f"(up to sm_{max(built_for)}); install a newer PyTorch")
    return None


def choose_device(requested: str = "auto") -> DeviceChoice:
    """`auto` takes the first usable CUDA GPU, else the CPU; a `cuda[:N]` that cannot run is an error, never a
    silent CPU run."""
    requested = (requested or "auto").strip().lower()
    if requested == "cpu":
        return DeviceChoice(torch.device("cpu"), "CPU requested")
    if requested == "auto":
        reason = cuda_unavailable_reason()
        if reason is None:
            return DeviceChoice(torch.device("cuda:0"), f"CUDA GPU {torch.cuda.get_device_name(0)}")
        return DeviceChoice(torch.device("cpu"), f"CPU: {reason}")
    if requested == "cuda" or requested.startswith("cuda:"):
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise InputError(f"CUDA was requested but cannot be used: {reason}.")
        index = int(requested.split(":", 1)[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"CUDA device {index} was requested but only {torch.cuda.device_count()} GPU(s) exist.")
        return DeviceChoice(torch.device(f"cuda:{index}"), f"CUDA GPU {torch.cuda.get_device_name(index)}")
    raise InputError(f"Unknown device '{requested}'; use auto, cpu, cuda or cuda:N.")


def device_report() -> dict[str, Any]:
    """Everything needed to understand why a GPU is or is not used (CLI `device`, module's device report)."""
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "cuda_usable": False,
        "cuda_unavailable_reason": None,
        "gpus": [],
    }
    reason = cuda_unavailable_reason()
    report["cuda_unavailable_reason"] = reason
    if reason is None:
        report["cuda_usable"] = True
        report["cudnn"] = torch.backends.cudnn.version()
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            major, minor = torch.cuda.get_device_capability(index)
            report["gpus"].append({
                "index": index,
                "name": torch.cuda.get_device_name(index),
                "compute_capability": f"{major}.{minor}",
                "memory_free_gib": round(free / 2**30, 2),
                "memory_total_gib": round(total / 2**30, 2),
            })
    report["auto_choice"] = choose_device("auto").reason
    report["cpu_native_bf16"] = cpu_has_native_bf16()
    from MIADeepLearningLib.engine import cpu_runtime  # imports this module: not at the top

    report["cpu_runtime"] = cpu_runtime.status()
    return report


# ------------------------------------------------------------------------------------------- memory and precision

# Windows per network call on the CPU. Measured on 2 Zen 4 cores (torch 2.13, oneDNN), MONAI UNet 16-256 at 96³:
# fp32 0.23 s/window at batch 1, 0.13 at batch 2; bf16 0.05-0.07 at either. Larger batches only cost memory there.
CPU_SW_BATCH_SIZE = 2
# Most windows per call on a GPU: beyond this, throughput no longer grows for 3D U-Nets while memory does.
MAX_SW_BATCH_SIZE = 8
# Guess of the memory one window needs inside the network, per voxel (activations kept alive at once), used until
# the first window was measured: generous enough for nnU-Net-sized nets in fp16, so the first guess rarely fails.
ACTIVATION_BYTES_PER_VOXEL = 1024
# Share of free memory left alone: the allocator's fragmentation, cuDNN workspaces, other processes.
MEMORY_RESERVE_FRACTION = 0.2


def is_out_of_memory(error: BaseException) -> bool:
    """True for a CUDA or allocator out-of-memory error (the ones a smaller batch or another device can fix)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory on a device in bytes: the CUDA driver's count, or the available RAM; None when unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:  # POSIX; the worker runs on Linux and macOS, where "available pages" exists (not on Windows)
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def sw_batch_size_for(device: torch.device, roi_size: tuple[int, ...], channels: int, out_channels: int = 2,
                      bytes_per_window: int | None = None, reserved_bytes: int = 0,
                      max_batch: int = MAX_SW_BATCH_SIZE) -> int:
    """Windows per network call: what fits in the free memory of the device (CUDA), capped where more stops paying.

    `bytes_per_window` is the measured peak of one window inside the network when known; otherwise a generous
    per-voxel guess. `reserved_bytes` is memory the caller still needs (e.g. a stitching buffer on the GPU).
    On the CPU, batching barely changes throughput, so the result is a small constant unless RAM is short.
    """
    voxels = 1
    for size in roi_size:
        voxels *= int(size)
    if bytes_per_window is None:
        bytes_per_window = voxels * (ACTIVATION_BYTES_PER_VOXEL + 4 * (channels + out_channels))
    bytes_per_window = max(int(bytes_per_window), 1)
    cap = CPU_SW_BATCH_SIZE if device.type != "cuda" else max_batch
    free = free_memory_bytes(device)
    if free is None:
        return max(1, min(cap, max_batch))
    usable = free * (1.0 - MEMORY_RESERVE_FRACTION) - reserved_bytes
    return int(max(1, min(cap, max_batch, usable // bytes_per_window)))


def configure_cuda(device: torch.device) -> None:
    """TF32 for convolutions and matrix products on Ampere and newer: ~10 mantissa bits inside the products, far below
    what changes a segmentation label; PyTorch already enables it for cuDNN convolutions by default."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def cpu_name() -> str:
    """The CPU's model name (benchmarks print it beside their timings)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Reduced precision for the network: bf16 where the hardware supports it, else fp16 on CUDA; on the CPU bf16
    only with native support (and the caller still checks that it is faster and keeps the labels); None: fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None
