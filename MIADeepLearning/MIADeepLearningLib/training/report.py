"""`python -m MIADeepLearningLib.training.report CHECKPOINT [--every N]`: a checkpoint's learning curve as a Markdown
table (the one model cards show), plus its cumulative iterations, wall time and the commands that produced it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch


def curve_table(history: list[dict[str, Any]], every: int = 1) -> str:
    """One row per validation (every `every`-th, always the first and last); columns in the history's key order."""
    if not history:
        return "(no validation recorded)"
    rows = [row for index, row in enumerate(history) if index % every == 0 or index == len(history) - 1]
    keys = list(history[-1].keys())

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--every", type=int, default=1, help="show every N-th validation row")
    args = parser.parse_args(argv)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    print(f"iterations: {state['iteration']}, wall time: {state['wall_seconds'] / 3600:.2f} h")
    for command in state.get("commands", []):
        print(f"command: {command}")
    print()
    print(curve_table(state.get("history", []), max(args.every, 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
