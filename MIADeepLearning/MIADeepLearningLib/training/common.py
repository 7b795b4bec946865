"""What every resumable training entry point shares: the checkpoint's contents, atomic saves, the learning-rate
schedule, resuming, the weights-only export, where batches come from and the loop (validate, save, stop on time).

Why one place: the promise that a resumed run equals an uninterrupted one (bit for bit) depends on all of these
agreeing — a batch that is a function of (seed, cumulative iteration) alone, a learning rate that is too, saves that
never leave a half-written checkpoint — so each model's script only says how a batch is drawn, how its loss and a
validation are computed.

Batches are drawn on the CPU, in the training process or (``workers`` > 0) in a pool of processes that prepares the
next ones while the network trains on the GPU: the same batches either way, since each comes from its own seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data

CHECKPOINT_KEYS = ("model", "optimiser", "iteration", "wall_seconds", "history", "settings", "commands")
Batch = tuple  # the tensors a draw returns (inputs, target, ...), on the CPU


@dataclass
class TrainingState:
    iteration: int = 0
    wall_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)


def learning_rate(base: float, iteration: int, half_life: int) -> float:
    """Halves every `half_life` cumulative iterations, never below base/16 — a function of the checkpoint alone."""
    return base * max(0.5 ** (iteration // max(half_life, 1)), 1.0 / 16.0)


def save_atomically(payload: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash mid-save leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def add_run_arguments(parser: argparse.ArgumentParser, best_metric: str) -> None:
    """The options every training script has: where it runs, how batches are drawn, precision, and the export."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the network trains: cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes drawing batches ahead (0: in the training process); same batches either way")
    parser.add_argument("--no-autocast", action="store_true", help="train in float32 even where bf16 is native")
    parser.add_argument("--export", type=Path, help="write the weights-only file from the checkpoint and exit")
    parser.add_argument("--export-best", action="store_true",
                        help=f"with --export: take the copy saved at the best {best_metric} (<checkpoint>.best.pt)")


def export_or_prepare(args: argparse.Namespace, keys: Sequence[str] = ("features",)) -> torch.device | None:
    """With --export: write the weights-only file, print its sha256 (sha256sum's format) and return None (the script
    then exits). Otherwise set the run up — threads, the seed of the network's initialisation — and return the device
    the network trains on."""
    if args.export:
        source = export_source(args.checkpoint, args.export_best)
        print(f"sha256 {export_weights(source, args.export, keys)}  {args.export}")
        return None
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch.device(args.device)


def require_patch_multiple(network: torch.nn.Module, args: argparse.Namespace) -> None:
    """SystemExit naming --patch or --validation-patch when it does not fit the network's poolings."""
    multiple = network.size_multiple
    for name, size in (("--patch", args.patch), ("--validation-patch", args.validation_patch)):
        if size % multiple:
            raise SystemExit(f"{name} {size} is not a multiple of {multiple} ({len(args.features)} levels).")


def autocast(device: torch.device, precision: torch.dtype | None) -> torch.autocast:
    """Reduced-precision forward passes where `precision` is set (autocast_dtype's choice), float32 where it is None."""
    return torch.autocast(device.type, dtype=precision or torch.bfloat16, enabled=precision is not None)


def _on_cpu(value: Any) -> Any:
    """Tensors (nested in dicts and lists) moved to the CPU: a checkpoint saved on a GPU loads anywhere."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


def checkpoint_payload(network: torch.nn.Module, optimiser: torch.optim.Optimizer,
                       state: TrainingState) -> dict[str, Any]:
    """Everything a later run needs to continue exactly where this one stopped (keys in CHECKPOINT_KEYS order)."""
    return {"model": _on_cpu(network.state_dict()), "optimiser": _on_cpu(optimiser.state_dict()),
            "iteration": state.iteration, "wall_seconds": state.wall_seconds, "history": state.history,
            "settings": state.settings, "commands": state.commands}


def resume(checkpoint: Path, network: torch.nn.Module, optimiser: torch.optim.Optimizer, state: TrainingState,
           check: Callable[[dict[str, Any]], None] | None = None) -> TrainingState:
    """Continue `checkpoint` when it exists: weights, optimiser, iterations, wall time, history and commands come
    from it; settings stay those of this run. `check(saved_settings)` refuses (SystemExit) a checkpoint this run
    cannot continue, before anything is loaded. The optimiser's state follows the network's device."""
    if not checkpoint.exists():
        return state
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if check is not None:
        check(saved["settings"])
    network.load_state_dict(saved["model"])
    optimiser.load_state_dict(saved["optimiser"])
    state = TrainingState(**{**asdict(state), **{key: saved[key] for key in ("iteration", "wall_seconds", "history",
                                                                              "commands")}})
    print(f"resumed at iteration {state.iteration} ({state.wall_seconds / 3600:.2f} h so far)", flush=True)
    return state


def require_same(saved: dict[str, Any], current: dict[str, Any], keys: Sequence[str]) -> None:
    """SystemExit naming the first setting in `keys` that the checkpoint has with another value (the architecture
    and grid cannot change in the middle of a training)."""
    for key in keys:
        if key in saved and saved[key] != current[key]:
            raise SystemExit(f"The checkpoint has {key.replace('_', ' ')} {saved[key]}, not {current[key]}.")


def command_line(module: str, state: TrainingState, argv: list[str], device: torch.device | None = None) -> str:
    """The record of one run in the checkpoint: where it started, what it was asked to do and on what hardware."""
    where = f"  # on {device_description(device)}" if device is not None else ""
    return f"[from iteration {state.iteration}] python -m {module} " + " ".join(argv) + where


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads != 1 else ''})"


def batch_seed(seed: int, iteration: int) -> int:
    """The seed of the batch of one cumulative iteration: independent streams per iteration, whatever the order or
    the process that draws them."""
    return int(np.random.SeedSequence([seed, iteration]).generate_state(1, dtype=np.uint64)[0])


class _IterationBatches(torch.utils.data.Dataset):
    """Item i = the batch of cumulative iteration i, drawn from its own generator."""

    def __init__(self, draw: Callable[[torch.Generator, int], Batch], seed: int) -> None:
        self.draw, self.seed = draw, seed

    def __getitem__(self, iteration: int) -> Batch:
        return self.draw(torch.Generator().manual_seed(batch_seed(self.seed, iteration)), iteration)


def batches(draw: Callable[[torch.Generator, int], Batch], seed: int, start: int, stop: int, workers: int = 0,
            pin_memory: bool = False) -> Iterator[Batch]:
    """The batches of iterations start..stop-1 in order; with `workers` > 0 they are drawn ahead by that many
    processes (forked, so they share the loaded label maps; each uses one thread)."""
    loader = torch.utils.data.DataLoader(
        _IterationBatches(draw, seed), batch_size=None, sampler=range(start, stop), num_workers=workers,
        prefetch_factor=4 if workers else None, multiprocessing_context="fork" if workers else None,
        pin_memory=pin_memory)
    return iter(loader)


def export_weights(checkpoint: Path, destination: Path, keys: Sequence[str] = ("features",)) -> str:
    """Weights-only state dict (loads with weights_only=True) plus the settings `keys` that rebuild the network;
    returns the file's sha256 (what configs/metadata.json and models.json record)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    broken = [name for name, value in state["model"].items()
              if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise SystemExit(f"{checkpoint} has non-finite weights ({', '.join(broken[:3])}"
                         f"{', ...' if len(broken) > 3 else ''}); nothing was exported.")
    save_atomically({"state_dict": state["model"], **{key: state["settings"][key] for key in keys}}, destination)
    return hashlib.sha256(destination.read_bytes()).hexdigest()


def best_path(checkpoint: Path) -> Path:
    """Where the checkpoint with the best validation score so far is copied (what --export-best ships)."""
    return checkpoint.with_name(checkpoint.stem + ".best" + checkpoint.suffix)


def export_source(checkpoint: Path, best: bool) -> Path:
    """The file --export reads: the checkpoint, or its best-validation copy, which exists only once a validation
    after training matched or beat every earlier one."""
    source = best_path(checkpoint) if best else checkpoint
    if not source.is_file():
        what = "best-validation copy" if best else "checkpoint"
        raise SystemExit(f"There is no {what} {source} to export (without --export-best the checkpoint itself is "
                         "exported).")
    return source


def train(state: TrainingState, network: torch.nn.Module, optimiser: torch.optim.Optimizer, checkpoint: Path, *,
          iterations: int, max_minutes: float | None, validate_every: int, base_lr: float, lr_half_life: int,
          draw: Callable[[torch.Generator, int], Batch], seed: int, compute_loss: Callable[[Batch], torch.Tensor],
          evaluate: Callable[[], dict[str, Any]], loss_name: str, best_metric: str, gradient_clip: float | None = 1.0,
          workers: int = 0, device: torch.device | None = None) -> None:
    """The loop: a validation row before the first iteration, then steps until `iterations` (cumulative) or
    `max_minutes`. A step takes the iteration's batch (`draw(generator, iteration)`, see batches()), moves it to
    `device` and computes the loss (`compute_loss(batch)`); a non-finite loss, or non-finite gradients, count as an
    iteration but are not learned from, and gradients are clipped to `gradient_clip` (one odd batch cannot undo what
    was learned). Every `validate_every` iterations and at the end a row (mean training loss since the last row,
    None if none, + `evaluate()`) is added to the history, printed as JSON, and the checkpoint saved; when the row's
    `best_metric` (higher is better) is the best so far the checkpoint is also copied to best_path(checkpoint). A
    final save at the stop."""
    device = device or torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch sizes: the fastest convolution algorithms are kept

    def save() -> None:
        save_atomically(checkpoint_payload(network, optimiser, state), checkpoint)

    started = time.perf_counter()
    stretch_start_wall = state.wall_seconds
    losses: list[float] = []
    if not state.history:
        state.history.append({"iteration": 0, "hours": 0.0, loss_name: None, **evaluate()})
    network.train()
    upcoming = batches(draw, seed, state.iteration, max(iterations, state.iteration), workers,
                       pin_memory=device.type == "cuda")
    while state.iteration < iterations:
        if max_minutes is not None and time.perf_counter() - started > 60.0 * max_minutes:
            break
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(base_lr, state.iteration, lr_half_life)
        batch = tuple(tensor.to(device, non_blocking=True) for tensor in next(upcoming))
        loss = compute_loss(batch)
        optimiser.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            print(f"iteration {state.iteration + 1}: non-finite loss, step skipped", flush=True)
        else:
            loss.backward()
            # the norm is measured even without clipping: a finite loss can still give inf/NaN gradients (seen once
            # in CI after one step of a tiny network), and one such step would turn every weight into NaN
            norm = torch.nn.utils.clip_grad_norm_(network.parameters(),
                                                  math.inf if gradient_clip is None else gradient_clip)
            if torch.isfinite(norm):
                optimiser.step()
                losses.append(loss.item())
            else:
                print(f"iteration {state.iteration + 1}: non-finite gradient, step skipped", flush=True)
        state.iteration += 1
        state.wall_seconds = stretch_start_wall + time.perf_counter() - started
        if state.iteration % validate_every == 0 or state.iteration == iterations:
            row = {"iteration": state.iteration, "hours": round(state.wall_seconds / 3600.0, 4),
                   loss_name: float(np.mean(losses)) if losses else None, **evaluate()}
            state.history.append(row)
            losses = []
            print(json.dumps(row), flush=True)
            save()
            if row[best_metric] >= max(previous.get(best_metric, -math.inf) for previous in state.history):
                shutil.copyfile(checkpoint, best_path(checkpoint))
    del upcoming  # stops the workers that were drawing ahead
    state.wall_seconds = stretch_start_wall + time.perf_counter() - started
    save()
    print(f"stopped at iteration {state.iteration} ({state.wall_seconds / 3600:.2f} h in all)", flush=True)
