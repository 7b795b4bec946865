"""What every resumable training entry point shares: the checkpoint's contents, atomic saves, the learning-rate
schedule, resuming, the weights-only export and the loop (validate, save, stop on time).

Why one place: the promise that a resumed run equals an uninterrupted one (bit for bit) depends on all of these
agreeing — the data generator's state saved with the weights, a learning rate that is a function of the cumulative
iteration alone, saves that never leave a half-written checkpoint — so each model's script only says how a batch's
loss and a validation are computed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_KEYS = ("model", "optimiser", "generator", "iteration", "wall_seconds", "history", "settings", "commands")


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


def checkpoint_payload(network: torch.nn.Module, optimiser: torch.optim.Optimizer, data_generator: torch.Generator,
                       state: TrainingState) -> dict[str, Any]:
    """Everything a later run needs to continue exactly where this one stopped (keys in CHECKPOINT_KEYS order)."""
    return {"model": network.state_dict(), "optimiser": optimiser.state_dict(),
            "generator": data_generator.get_state(), "iteration": state.iteration,
            "wall_seconds": state.wall_seconds, "history": state.history, "settings": state.settings,
            "commands": state.commands}


def resume(checkpoint: Path, network: torch.nn.Module, optimiser: torch.optim.Optimizer,
           data_generator: torch.Generator, state: TrainingState,
           check: Callable[[dict[str, Any]], None] | None = None) -> TrainingState:
    """Continue `checkpoint` when it exists: weights, optimiser, data-generator state, iterations, wall time, history
    and commands come from it; settings stay those of this run. `check(saved_settings)` refuses (SystemExit) a
    checkpoint this run cannot continue, before anything is loaded."""
    if not checkpoint.exists():
        return state
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if check is not None:
        check(saved["settings"])
    network.load_state_dict(saved["model"])
    optimiser.load_state_dict(saved["optimiser"])
    data_generator.set_state(saved["generator"])
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


def command_line(module: str, state: TrainingState, argv: list[str]) -> str:
    """The record of one run in the checkpoint: where it started and what it was asked to do."""
    return f"[from iteration {state.iteration}] python -m {module} " + " ".join(argv)


def export_weights(checkpoint: Path, destination: Path, keys: Sequence[str] = ("features",)) -> str:
    """Weights-only state dict (loads with weights_only=True) plus the settings `keys` that rebuild the network;
    returns the file's sha256 (what configs/metadata.json and models.json record)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
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


def train(state: TrainingState, network: torch.nn.Module, optimiser: torch.optim.Optimizer,
          data_generator: torch.Generator, checkpoint: Path, *, iterations: int, max_minutes: float | None,
          validate_every: int, base_lr: float, lr_half_life: int, compute_loss: Callable[[], torch.Tensor],
          evaluate: Callable[[], dict[str, Any]], loss_name: str, best_metric: str,
          gradient_clip: float | None = 1.0) -> None:
    """The loop: a validation row before the first iteration, then steps until `iterations` (cumulative) or
    `max_minutes`. A step draws a batch and computes the loss (`compute_loss`); a non-finite loss is counted as an
    iteration (the data generator moved on) but not learned from, and gradients are clipped to `gradient_clip` (one
    odd batch cannot undo what was learned). Every `validate_every` iterations and at the end a row (mean training
    loss since the last row, None if none, + `evaluate()`) is added to the history, printed as JSON, and the
    checkpoint saved; when the row's `best_metric` (higher is better) is the best so far the checkpoint is also
    copied to best_path(checkpoint). A final save at the stop."""

    def save() -> None:
        save_atomically(checkpoint_payload(network, optimiser, data_generator, state), checkpoint)

    started = time.perf_counter()
    stretch_start_wall = state.wall_seconds
    losses: list[float] = []
    if not state.history:
        state.history.append({"iteration": 0, "hours": 0.0, loss_name: None, **evaluate()})
    network.train()
    while state.iteration < iterations:
        if max_minutes is not None and time.perf_counter() - started > 60.0 * max_minutes:
            break
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(base_lr, state.iteration, lr_half_life)
        loss = compute_loss()
        optimiser.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            if gradient_clip is not None:
                torch.nn.utils.clip_grad_norm_(network.parameters(), gradient_clip)
            optimiser.step()
            losses.append(loss.item())
        else:
            print(f"iteration {state.iteration + 1}: non-finite loss, step skipped", flush=True)
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
    state.wall_seconds = stretch_start_wall + time.perf_counter() - started
    save()
    print(f"stopped at iteration {state.iteration} ({state.wall_seconds / 3600:.2f} h in all)", flush=True)
