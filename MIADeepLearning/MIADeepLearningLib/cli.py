"""Batch use without Slicer: `python -m MIADeepLearningLib segment|models|device ...`.

Runs the same engine code as the Slicer worker, in-process; outputs land exactly on the input's grid.
Exit codes: 0 success, 2 a problem with the input, model or device (one sentence on stderr), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from MIADeepLearningLib.engine.errors import MIADLError


def _progress_printer(quiet: bool):
    started = time.perf_counter()

    def report(stage: str, fraction: float, message: str) -> None:
        if not quiet:
            sys.stderr.write(f"[{time.perf_counter() - started:6.1f} s] {100 * fraction:3.0f}% {stage}: {message}\n")

    return report


def command_segment(args: argparse.Namespace) -> int:
    from MIADeepLearningLib.engine import imageio
    from MIADeepLearningLib.engine.tasks import segment_image

    output = segment_image(args.input, args.model, device=args.device, create_masked_volume=bool(args.masked),
                           progress=_progress_printer(args.quiet))
    imageio.write_image(output.label, args.output)
    if args.masked:
        imageio.write_image(output.masked, args.masked)
    for warning in output.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    if args.provenance:
        Path(args.provenance).write_text(json.dumps({"segments": output.segments, **output.provenance}, indent=2))
    if not args.quiet:
        sys.stderr.write(f"wrote {args.output}\n")
    return 0


def command_models(args: argparse.Namespace) -> int:
    from MIADeepLearningLib.engine.registry import list_models

    models = list_models(task=args.task)
    if args.json:
        print(json.dumps([model.summary() for model in models], indent=2))
    else:
        for model in models:
            print(f"{model.id}\t{model.task}\t{model.title} (v{model.version}, {model.license})")
    return 0


def command_device(args: argparse.Namespace) -> int:
    from MIADeepLearningLib.engine.devices import device_report

    report = device_report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m MIADeepLearningLib", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", help="segment one image file (NIfTI, NRRD, MHA)")
    segment.add_argument("--model", required=True, help="model id (see `models`)")
    segment.add_argument("-i", "--input", required=True, help="input image file")
    segment.add_argument("-o", "--output", required=True, help="output label file (same grid as the input)")
    segment.add_argument("--masked", help="also write the input with everything outside the segmentation removed")
    segment.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    segment.add_argument("--provenance", help="write model, weights sha256, device and parameters as JSON here")
    segment.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    segment.set_defaults(handler=command_segment)

    models = commands.add_parser("models", help="list the available models")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.add_argument("--task", help="only models of this task (e.g. segmentation)")
    models.set_defaults(handler=command_models)

    device = commands.add_parser("device", help="report the compute device and why a GPU is or is not used")
    device.add_argument("--json", action="store_true", help="machine-readable output")
    device.set_defaults(handler=command_device)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except MIADLError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
