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
    return report
