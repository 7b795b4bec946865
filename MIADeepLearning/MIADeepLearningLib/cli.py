"""Batch use without Slicer: `python -m MIADeepLearningLib segment|synthesize|register|classify|detect|models|device`.

Runs the same engine code as the Slicer worker, in-process; outputs land exactly on the input's grid.

`segment -i` takes one image file or a folder of them. A folder is a batch: every NIfTI (.nii, .nii.gz), NRRD
(.nrrd, .nhdr) and MetaImage (.mha, .mhd) file directly in it is one case, in name order (other files, hidden files
and subfolders are ignored); the model is loaded once for all cases; a case that fails is recorded and the batch
goes on. Each case's label is written as `<output folder>/<case>_<suffix><ext>`, where `<case>` is the input's
name without its image extension and `<ext>` is, by default, the input's own extension (`--format` picks one for all),
so a NRRD stays a NRRD and nothing about the input's grid or format is lost in the round trip. A CSV report (case,
input, status, seconds, output, masked_output, warnings, error) is written row by row, by default to
`<output folder>/report.csv`.

A model that lists "uncertainty" in its package's slicer.optional_outputs (e.g. brain tissue segmentation) also
writes a voxel-wise uncertainty map on the input grid: `--uncertainty FILE` for one input file,
`--uncertainty-suffix [SUFFIX]` (default `uncertainty`) in an output folder; the batch report then gets an
`uncertainty_output` column.

`synthesize --model ID -i in.nii.gz -o out.nii.gz [--uncertainty U] [--difference D]` runs a synthesis model on one
file (e.g. thick-slice MRI to a 1 mm volume over the input's extent, same orientation); all outputs are written, or
none.

`register --model ID --fixed F --moving M -o warped.nii.gz --transform field.h5 [--moving-labels L --warped-labels
WL] [--fixed-labels FL] [--report report.json] [--fixed-mask FM] [--moving-mask MM] [--instance-steps N]` registers
one pair; every output lies on the fixed grid, the transform is an ITK/Slicer .h5 displacement field; all outputs are
written, or none.

Cohorts: `synthesize -i FOLDER -o FOLDER` and `register --pairs PAIRS.csv -o FOLDER` (fixed,moving[,name] per line)
are folder runs like `segment -i FOLDER`, through one runner (cohort.py): `--engine local` (default) or `--engine ray
[--ray-address ADDRESS] [--workers N] [--cpus-per-worker C] [--gpus-per-worker G]` (a pool of Ray actors, each
loading the model once); a case already done (outputs + sidecar with matching input and weight sha256) is skipped,
a failing case or dead worker is retried once; report.csv also has worker and attempts.

`classify [--model sequence-type] -i IN [-i IN ...] [--json OUT.json] [--csv OUT.csv] [--saliency-dir DIR]` names
each volume's scan type (t1w, t1c, t2w, flair, pdw, dwi, ct, other) with its class probabilities; -i takes files and
folders (every image file directly in a folder); the model is loaded once and a volume that fails is reported while
the others go on. JSON: a list of {input, label, probabilities, ood, reasons, error} (label null on error); a folder
input also writes a CSV (input, label, probability, runner_up, runner_up_probability, ood, error) beside the JSON.
`--saliency-dir DIR` writes `<case>_saliency.nii.gz` (Grad-CAM, 0..1) on each input's grid.

`detect [--model brain-lesion] -i IN [-i IN2 ...] -o ANOMALY --lesions LABELS [--brain BRAIN] [--json OUT.json]
[--threshold T] [--min-volume MM3]` runs a lesion detection model on one scan (more co-registered contrasts of the
same visit may follow): the anomaly map (0..1), the candidates as a label map (k = candidate k) and optionally the
brain map, all exactly on the first input's grid, and a JSON summary {input, inputs, model, threshold, case_score,
candidates [{label, volume_ml, center_ras, max_score, mean_score, tissue}], warnings, provenance} (stdout without
--json); all outputs are written, or none.

Input type check: segment, synthesize, register and detect classify their (first) input with the sequence-type model
when it is installed and the model's package states the types it accepts; a volume that looks like another type gets a
warning (never a refusal). `--no-type-check` or the environment variable MIADL_TYPE_CHECK=0 turns it off.

Exit codes: 0 success; 2 a problem with the command line, the input, the model or the device before any case ran,
or a model that cannot be loaded (one sentence on stderr; in a batch the report lists what ran); 3 one or more cases
of a folder (or volumes of a classify run) failed (the others were written; see the report); 1 unexpected failure
(detect: one line on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from MIADeepLearningLib import cohort
from MIADeepLearningLib.cohort import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED
from MIADeepLearningLib.engine.errors import InputError, MIADLError, ModelError
from MIADeepLearningLib.engine.registry import MODEL_TASKS

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_SOME_CASES_FAILED = 3
EXIT_INTERRUPTED = 130

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")  # longest match first
OUTPUT_FORMATS = ("same", "nii.gz", "nii", "nrrd", "mha")
REPORT_COLUMNS = ["case", "input", "status", "seconds", "output", "masked_output", "warnings", "error", "worker",
                  "attempts"]
UNCERTAINTY_COLUMN = "uncertainty_output"  # after masked_output, only in reports of runs that ask for the map
DEFAULT_UNCERTAINTY_SUFFIX = "uncertainty"
SYNTHESIZE_REPORT_COLUMNS = ["case", "input", "status", "seconds", "output", "uncertainty_output",
                             "difference_output", "warnings", "error", "worker", "attempts"]
REGISTER_REPORT_COLUMNS = ["case", "fixed", "moving", "status", "seconds", "output", "transform", "report",
                           "warnings", "error", "worker", "attempts"]


class UsageError(MIADLError):
    """Options that contradict each other or the input (exit code 2, like argparse's own errors)."""


def _progress_printer(quiet: bool):
    started = time.perf_counter()

    def report(stage: str, fraction: float, message: str) -> None:
        if not quiet:
            sys.stderr.write(f"[{time.perf_counter() - started:6.1f} s] {100 * fraction:3.0f}% {stage}: {message}\n")

    return report


def image_suffix(name: str) -> str | None:
    """The image extension of a file name (lower case, e.g. ``.nii.gz``), or None for a file that is no image."""
    lower = name.lower()
    return next((suffix for suffix in IMAGE_SUFFIXES if lower.endswith(suffix) and len(lower) > len(suffix)), None)


def find_cases(folder: Path) -> list[tuple[str, Path]]:
    """(case name, file) for every image file directly in `folder`, sorted by file name.

    Two files that differ only by extension (head.nii.gz, head.nrrd) keep their extension in the case name so
    their outputs cannot overwrite each other.
    """
    files = sorted((path for path in folder.iterdir()
                    if not path.name.startswith(".") and path.is_file() and image_suffix(path.name)),
                   key=lambda path: path.name)
    stems = [case_name(path) for path in files]
    return [(path.name if stems.count(stem) > 1 else stem, path) for stem, path in zip(stems, files)]


def case_name(path: Path) -> str:
    """``head.nii.gz`` -> ``head``: the file name without its image extension."""
    suffix = image_suffix(path.name)
    return path.name[: -len(suffix)] if suffix else path.stem


def output_extension(input_path: Path, output_format: str) -> str:
    if output_format == "same":
        return image_suffix(input_path.name) or ".nii.gz"
    return f".{output_format}"


def _type_check(args: argparse.Namespace) -> bool | None:
    """--no-type-check turns the input type check off; otherwise MIADL_TYPE_CHECK decides (engine.tasks)."""
    return False if getattr(args, "no_type_check", False) else None


COPIES_HELP = ("how many copies of the input the network sees, averaged: 1 (fastest), 2 (+ its left-right mirror) or "
               "4 (+ both on a half-voxel shifted grid); brain tissue and lesion detection only (default: the "
               "model's, see its model card for what each costs and gains)")


def check_model(model_id: str, device: str, task: str = "segmentation"):
    """Everything about the model and device that can fail, checked once before the first case (exit code 2)."""
    from MIADeepLearningLib.engine import registry
    from MIADeepLearningLib.engine.devices import choose_device

    model = registry.get_model(model_id)
    if model.task != task:
        raise ModelError(f"Model '{model.title}' is a {model.task or 'unknown'} model, not a {task} model.")
    choose_device(device)
    registry.verified_weight_paths(model)
    return model


def _format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class BatchProgress:
    """Case i/N, its name, elapsed time and ETA on stderr.

    On a terminal one line is redrawn as the stages advance and every finished case leaves a line above it; when
    stderr is a file or a pipe (logs, CI) only plain lines are written: one when a case starts, one when it ends.
    """

    BAR_WIDTH = 20

    def __init__(self, total: int, stream: TextIO | None = None, quiet: bool = False,
                 clock: Callable[[], float] = time.perf_counter):
        self.total = total
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.clock = clock
        self.started = clock()
        self.finished = 0
        self.index = 0
        self.name = ""
        self._last_draw = 0.0

    def eta(self) -> str:
        if not self.finished:
            return "--"
        per_case = (self.clock() - self.started) / self.finished
        return _format_duration(per_case * (self.total - self.finished))

    def _times(self) -> str:
        return f"elapsed {_format_duration(self.clock() - self.started)}, ETA {self.eta()}"

    def case_started(self, index: int, name: str) -> None:
        self.index, self.name = index, name
        if self.quiet:
            return
        if self.tty:
            self._draw("starting", 0.0, force=True)
        else:
            self.line(f"[{index}/{self.total}] {name} ...")

    def stage(self, stage: str, fraction: float, message: str) -> None:
        """segment_image's progress callback: redraws the bar on a terminal (at most 10 times a second)."""
        if self.tty:
            self._draw(stage, fraction)

    def case_finished(self, status: str, seconds: float, detail: str) -> None:
        self.finished += 1
        if self.quiet:
            return
        word = "ok" if status == STATUS_OK else status.upper()
        self.line(f"[{self.index}/{self.total}] {self.name}: {word} in {seconds:.1f} s{detail} | {self._times()}")

    def _draw(self, stage: str, fraction: float, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        done = (self.finished + max(0.0, min(1.0, fraction))) / max(1, self.total)
        filled = round(self.BAR_WIDTH * done)
        text = (f"[{'#' * filled}{'-' * (self.BAR_WIDTH - filled)}] {self.index}/{self.total} {self.name} "
                f"{stage} {100 * fraction:3.0f}% | {self._times()}")
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r\x1b[K" + text[:width])
        self.stream.flush()

    def line(self, text: str) -> None:
        """A line that stays (above the redrawn bar on a terminal)."""
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.stream.flush()


class CsvReport:
    """The batch report, written and flushed row by row: an interrupted batch still leaves what it did."""

    def __init__(self, path: Path, columns: list[str] | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.columns = list(columns or REPORT_COLUMNS)
        self._file = path.open("w", encoding="utf-8", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, lineterminator="\n")
        self._writer.writeheader()
        self._file.flush()
        self.rows: list[dict[str, str]] = []

    def add(self, row: dict[str, Any]) -> None:
        clean = {column: "" if row.get(column) is None else str(row[column]) for column in self.columns}
        self.rows.append(clean)
        self._writer.writerow(clean)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _write_all(images: dict[Path, Any]) -> None:
    """Write every image into a staging folder beside its destination, then move them all into place: a failure
    while writing leaves none of the outputs (a .mhd/.nhdr header and its data file move together). A value may also
    be a function that writes its file at the path it is given (a transform, a JSON report)."""
    from MIADeepLearningLib.engine import imageio

    stagings: dict[Path, Path] = {}
    try:
        for target, image in images.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = stagings.setdefault(target.parent, target.parent / f".miadl-staging-{os.getpid()}")
            staging.mkdir(exist_ok=True)
            if callable(image):
                image(staging / target.name)
            else:
                imageio.write_image(image, staging / target.name)
        for destination, staging in stagings.items():
            for written in sorted(staging.iterdir()):
                os.replace(written, destination / written.name)
    finally:
        for staging in stagings.values():
            shutil.rmtree(staging, ignore_errors=True)


def _make_folders(paths: Iterable[Path]) -> None:
    """The folders of the output files, made before the model runs: one that cannot be made fails now, in one line
    (exit code 2), not after minutes of work."""
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"Cannot create the folder for {path} ({error.strerror or error}).") from error


def _remove_stale(paths: list[Path]) -> None:
    """A failed case must not leave an older output of the same name that the report would contradict."""
    for path in paths:
        if path.is_file():
            path.unlink()


def segment_run_options(args: argparse.Namespace) -> dict[str, Any]:
    """--config KEY=VALUE (MONAI's override syntax, "network_def#in_channels=2") and --weights NAME as run options
    of a MONAI bundle (engine/bundles.py records both in the provenance)."""
    from MIADeepLearningLib.engine import zoo

    options: dict[str, Any] = {}
    try:
        overrides = zoo.parse_overrides(getattr(args, "config", None) or [])
    except ValueError as error:
        raise UsageError(f"--config {error}") from error
    if overrides:
        options["overrides"] = overrides
    if getattr(args, "weights", None):
        options["weights"] = args.weights
    return options


def command_segment(args: argparse.Namespace) -> int:
    args.run_options = segment_run_options(args)
    if Path(args.input).is_dir():
        if args.extra_input:
            raise UsageError("--extra-input is for a single input file (the further channels of one case), not for "
                             "a folder input.")
        return segment_folder(args)
    if args.report:
        raise UsageError("--report is for a folder input (-i FOLDER); a single file reports on stderr.")
    _refuse_cohort_options(args)
    output = Path(args.output)
    masked = Path(args.masked) if args.masked else None
    uncertainty = Path(args.uncertainty) if args.uncertainty else None
    if output.is_dir():  # -o FOLDER for one file: named like the cases of a batch
        model = check_model(args.model, args.device)
        check_optional_outputs(model, args)
        suffix, masked_suffix, uncertainty_suffix = _suffixes(args, model)
        stem, extension = case_name(Path(args.input)), output_extension(Path(args.input), args.format)
        output = output / f"{stem}_{suffix}{extension}"
        if masked is None and masked_suffix is not None:
            masked = output.parent / f"{stem}_{masked_suffix}{extension}"
        if uncertainty is None and uncertainty_suffix is not None:
            uncertainty = output.parent / f"{stem}_{uncertainty_suffix}{extension}"
    elif args.masked_suffix is not None:
        raise UsageError("--masked-suffix names outputs in an output folder; for one output file use --masked FILE.")
    elif args.uncertainty_suffix is not None:
        raise UsageError("--uncertainty-suffix names outputs in an output folder; for one output file use "
                         "--uncertainty FILE.")
    if uncertainty is not None:
        if image_suffix(uncertainty.name) is None:
            raise UsageError(f"--uncertainty {uncertainty} needs an image extension ({', '.join(IMAGE_SUFFIXES)}).")
        others = [Path(args.input), output, *filter(None, [masked])]
        if uncertainty.resolve() in {path.resolve() for path in others}:
            raise UsageError(f"--uncertainty {uncertainty} must be a file of its own, not the input or another "
                             "output.")
    return segment_file(args, output, masked, uncertainty)


COPIES_PIPELINES = ("brain_tissue_segmentation", "lesion_detection")  # pipelines with the test_time_copies option


def with_copies(args: argparse.Namespace, options: dict | None) -> dict | None:
    """`options` plus --test-time-copies, which only the brain tissue and lesion pipelines take (a clear error for
    other models rather than a silently ignored flag)."""
    copies = getattr(args, "test_time_copies", None)
    if copies is None:
        return options
    from MIADeepLearningLib.engine import registry

    model = registry.get_model(args.model)
    if model.pipeline not in COPIES_PIPELINES:
        raise ModelError(f"Model '{model.title}' has no test-time copies; --test-time-copies is for the brain tissue "
                         "and lesion detection models.")
    return {**(options or {}), "test_time_copies": copies}


def check_optional_outputs(model, args: argparse.Namespace) -> None:
    """The optional outputs the command line asks for must be ones the model lists (slicer.optional_outputs)."""
    requested = ["uncertainty"] if args.uncertainty or args.uncertainty_suffix is not None else []
    missing = [name for name in requested if name not in model.optional_outputs]
    if missing:
        raise ModelError(f"Model '{model.title}' makes no {' or '.join(missing)} map.")


def segment_file(args: argparse.Namespace, output: Path, masked: Path | None, uncertainty: Path | None = None) -> int:
    from MIADeepLearningLib.engine import imageio
    from MIADeepLearningLib.engine.tasks import segment_image

    options = with_copies(args, {"uncertainty": True} if uncertainty is not None else None)
    options = {**(options or {}), **getattr(args, "run_options", {})} or None
    result = segment_image(args.input, args.model, device=args.device, options=options,
                           create_masked_volume=masked is not None, progress=_progress_printer(args.quiet),
                           type_check=_type_check(args), extra_image_paths=getattr(args, "extra_input", None))
    imageio.write_image(result.label, output)
    if masked is not None:
        imageio.write_image(result.masked, masked)
    if uncertainty is not None:
        imageio.write_image(result.uncertainty, uncertainty)
    for warning in result.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    if args.provenance:
        Path(args.provenance).write_text(json.dumps({"segments": result.segments, **result.provenance}, indent=2))
    if not args.quiet:
        sys.stderr.write(f"wrote {output}\n")
    return EXIT_OK


def command_synthesize(args: argparse.Namespace) -> int:
    """One file in, a synthesized volume (and the optional maps) out; nothing is written unless all succeed."""
    from MIADeepLearningLib.engine.tasks import synthesize_image

    source = Path(args.input)
    if source.is_dir():
        return synthesize_folder(args)
    if not source.is_file():
        raise InputError(f"The input {source} is not a file or a folder of image files.")
    folder_only = [option for option, value in (("--report", args.report), ("--suffix", args.suffix),
                                                ("--uncertainty-suffix", args.uncertainty_suffix),
                                                ("--difference-suffix", args.difference_suffix)) if value is not None]
    if folder_only:
        raise UsageError(f"{folder_only[0]} is for a folder input (-i FOLDER -o FOLDER).")
    _refuse_cohort_options(args)
    targets = {"output": Path(args.output), "uncertainty": args.uncertainty, "difference": args.difference}
    targets = {role: Path(path) for role, path in targets.items() if path}
    for role, path in targets.items():
        if image_suffix(path.name) is None:
            raise UsageError(f"--{role} {path} needs an image extension ({', '.join(IMAGE_SUFFIXES)}).")
        if path.resolve() == source.resolve():
            raise UsageError(f"--{role} would overwrite the input {source}; choose another file.")
    if len({path.resolve() for path in targets.values()}) != len(targets):
        raise UsageError("The output, uncertainty and difference files must be different files.")
    _make_folders(targets.values())
    check_model(args.model, args.device, task="synthesis")
    options = {"uncertainty": "uncertainty" in targets, "difference": "difference" in targets}
    result = synthesize_image(source, args.model, device=args.device, options=options,
                              progress=_progress_printer(args.quiet), type_check=_type_check(args))
    images = {"output": result.image, "uncertainty": result.uncertainty, "difference": result.difference}
    _write_all({path: images[role] for role, path in targets.items()})
    for warning in result.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    if args.provenance:
        Path(args.provenance).write_text(json.dumps(result.provenance, indent=2))
    if not args.quiet:
        sys.stderr.write(f"wrote {', '.join(str(path) for path in targets.values())}\n")
    return EXIT_OK


def command_register(args: argparse.Namespace) -> int:
    """Two files in (fixed, moving), the warped moving image, the transform, the warped labels and the report out,
    all on the fixed grid; nothing is written unless everything succeeded."""
    from MIADeepLearningLib.engine import displacement
    from MIADeepLearningLib.engine.tasks import register_images

    if args.pairs:
        return register_pairs(args)
    if not (args.fixed and args.moving):
        raise UsageError("register needs --fixed and --moving (one pair), or --pairs PAIRS.csv -o FOLDER.")
    _refuse_cohort_options(args)
    inputs = {"fixed": args.fixed, "moving": args.moving, "fixed-mask": args.fixed_mask,
              "moving-mask": args.moving_mask, "moving-labels": args.moving_labels, "fixed-labels": args.fixed_labels}
    inputs = {role: Path(path) for role, path in inputs.items() if path}
    for role, path in inputs.items():
        if not path.is_file():
            raise InputError(f"--{role} {path} is not a file.")
    targets = {"output": args.output, "transform": args.transform, "warped-labels": args.warped_labels,
               "report": args.report}
    targets = {role: Path(path) for role, path in targets.items() if path}
    if "output" not in targets and "transform" not in targets:
        raise UsageError("Nothing to write: give -o WARPED and/or --transform FIELD.h5.")
    if "warped-labels" in targets and "moving-labels" not in inputs:
        raise UsageError("--warped-labels needs --moving-labels (the label map to propagate).")
    if "fixed-labels" in inputs and "moving-labels" not in inputs:
        raise UsageError("--fixed-labels is compared with the propagated --moving-labels; give both.")
    for role in ("output", "warped-labels"):
        if role in targets and image_suffix(targets[role].name) is None:
            raise UsageError(f"--{role} {targets[role]} needs an image extension ({', '.join(IMAGE_SUFFIXES)}).")
    if "transform" in targets and targets["transform"].suffix.lower() not in displacement.FIELD_SUFFIXES:
        raise UsageError(f"--transform {targets['transform']} must end in .h5 (an ITK transform file Slicer reads).")
    sources = {path.resolve() for path in inputs.values()}
    for role, path in targets.items():
        if path.resolve() in sources:
            raise UsageError(f"--{role} would overwrite an input ({path}); choose another file.")
    if len({path.resolve() for path in targets.values()}) != len(targets):
        raise UsageError("The outputs (-o, --transform, --warped-labels, --report) must be different files.")
    _make_folders(targets.values())
    check_model(args.model, args.device, task="registration")
    options = {"instance_steps": args.instance_steps} if args.instance_steps is not None else None
    result = register_images(inputs["fixed"], inputs["moving"], args.model, device=args.device, options=options,
                             fixed_mask_path=inputs.get("fixed-mask"), moving_mask_path=inputs.get("moving-mask"),
                             moving_labels_path=inputs.get("moving-labels"),
                             fixed_labels_path=inputs.get("fixed-labels"), progress=_progress_printer(args.quiet),
                             type_check=_type_check(args))

    def write_report(path: Path) -> None:
        path.write_text(json.dumps(result.report, indent=2), encoding="utf-8")

    files = {"output": result.warped, "warped-labels": result.warped_labels, "report": write_report,
             "transform": lambda path: displacement.write_field(result.field, path)}
    _write_all({path: files[role] for role, path in targets.items()})
    for warning in result.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    if args.provenance:
        Path(args.provenance).write_text(json.dumps(result.provenance, indent=2), encoding="utf-8")
    if not args.quiet:
        report = result.report

        def number(key: str) -> str:
            return "n/a" if report.get(key) is None else f"{report[key]:.3f}"

        summary = (f"det J <= 0 in {number('jacobian_non_positive_percent')} % of the {report['jacobian_region']}, "
                   f"SDlogJ {number('jacobian_log_std')}")
        if "dice" in report:
            summary += (f", mean Dice {number('dice_before_mean')} before -> {number('dice_affine_mean')} affine -> "
                        f"{number('dice_mean')} registered")
        sys.stderr.write(f"{summary}\nwrote {', '.join(str(path) for path in targets.values())}\n")
    return EXIT_OK


def _suffixes(args: argparse.Namespace, model) -> tuple[str, str | None, str | None]:
    """(label suffix, masked suffix or None, uncertainty suffix or None): the model's own names unless given."""
    suffix = args.suffix or model.slicer.get("output_name_suffix") or model.id
    masked_suffix = uncertainty_suffix = None
    if args.masked_suffix is not None:
        masked_suffix = args.masked_suffix or model.slicer.get("masked_name_suffix") or "masked"
    if args.uncertainty_suffix is not None:
        uncertainty_suffix = args.uncertainty_suffix or DEFAULT_UNCERTAINTY_SUFFIX
    names = [name for name in (suffix, masked_suffix, uncertainty_suffix) if name]
    for name in names:
        if any(character in name for character in "/\\") or name.startswith("."):
            raise UsageError(f"The suffix '{name}' must be a plain name (no folders, not starting with a dot).")
    if suffix == masked_suffix:
        raise UsageError(f"The label and the masked volume cannot both use the suffix '{suffix}'.")
    if len(set(names)) != len(names):
        raise UsageError(f"The outputs of a case need different suffixes, not {', '.join(names)}.")
    return suffix, masked_suffix, uncertainty_suffix


def _refuse_cohort_options(args: argparse.Namespace) -> None:
    """The engine options are for folders (cohorts); one file always runs here."""
    given = [option for option, value in (("--engine ray", args.engine == "ray" or None),
                                          ("--ray-address", args.ray_address), ("--workers", args.workers),
                                          ("--cpus-per-worker", args.cpus_per_worker),
                                          ("--gpus-per-worker", args.gpus_per_worker),
                                          ("--no-resume", args.no_resume or None)) if value is not None]
    if given:
        raise UsageError(f"{given[0]} is for a cohort (a folder input, or register --pairs), not a single case.")


def cohort_choice(args: argparse.Namespace) -> cohort.EngineChoice:
    """--engine and the Ray options, checked before anything runs (exit code 2)."""
    choice = cohort.EngineChoice(engine=args.engine, ray_address=args.ray_address, workers=args.workers,
                                 cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker or 0.0)
    if choice.engine == "local":
        given = [option for option, value in (("--ray-address", args.ray_address), ("--workers", args.workers),
                                              ("--gpus-per-worker", args.gpus_per_worker)) if value is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} {'go' if len(given) > 1 else 'goes'} with --engine ray.")
    if choice.workers is not None and choice.workers < 1:
        raise UsageError(f"--workers must be 1 or more, not {choice.workers}.")
    if choice.cpus_per_worker is not None and not choice.cpus_per_worker > 0:
        raise UsageError(f"--cpus-per-worker must be more than 0, not {choice.cpus_per_worker:g}.")
    if not choice.gpus_per_worker >= 0:
        raise UsageError(f"--gpus-per-worker must be 0 or more, not {choice.gpus_per_worker:g}.")
    if choice.engine == "ray":
        cohort._import_ray(local=not choice.ray_address)  # a missing Ray is named before the model is checked
        if choice.ray_address:
            cohort.check_ray_address(choice.ray_address)  # and an unreachable cluster before anything is written
    return choice


def _check_output_folder(input_dir: Path | None, output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"The output {output_dir} is a file; for a folder input, -o must be a folder.")
    if input_dir is not None and output_dir.resolve() == input_dir.resolve():
        raise UsageError("Choose an output folder other than the input folder, so outputs are never taken as inputs.")


def _folder_cases(input_dir: Path) -> list[tuple[str, Path]]:
    cases = find_cases(input_dir)
    if not cases:
        raise InputError(f"The folder {input_dir} has no image files ({', '.join(IMAGE_SUFFIXES)}).")
    return cases


def run_folder(args: argparse.Namespace, cases: list[cohort.Case], spec: cohort.TaskSpec, columns: list[str],
               columns_of: dict[str, str], row_of: Callable[[cohort.Case], dict[str, Any]], output_dir: Path,
               choice: cohort.EngineChoice, provenance_of: Callable[[Any], Any] = lambda record: record) -> int:
    """The shared tail of every folder run: the report, the cohort runner, the summary and the exit code (0 all
    done, 3 some failed, 2 the model failed to load)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    report = CsvReport(Path(args.report) if getattr(args, "report", None) else output_dir / "report.csv", columns)
    outcome = None
    try:
        outcome = cohort.run_cohort(cases, spec, choice, report, row_of, columns_of, quiet=args.quiet,
                                    resume=not args.no_resume)
    except KeyboardInterrupt:
        sys.stderr.write(f"\ninterrupted; the report so far is in {report.path} (run the same command again to "
                         "continue)\n")
        return EXIT_INTERRUPTED
    finally:
        report.close()
        if args.provenance and outcome is not None:
            Path(args.provenance).write_text(json.dumps({case.name: provenance_of(outcome.provenance[case.name])
                                                         for case in cases if case.name in outcome.provenance},
                                                        indent=2), encoding="utf-8")
    if outcome.model_problem is not None:
        sys.stderr.write(f"error: {outcome.model_problem}\n")
        return EXIT_USAGE
    failed = [row for row in report.rows if row["status"] == STATUS_FAILED]
    skipped = sum(row["status"] == STATUS_SKIPPED for row in report.rows)
    if failed or not args.quiet:
        summary = f"{len(cases) - len(failed)} of {len(cases)} cases succeeded"
        if skipped:
            summary += f" ({skipped} already done)"
        if failed:
            summary += f", {len(failed)} failed ({', '.join(row['case'] for row in failed)})"
        sys.stderr.write(f"{summary} in {_format_duration(outcome.seconds)}; report: {report.path}\n")
    return EXIT_SOME_CASES_FAILED if failed else EXIT_OK


def _weights(model) -> dict[str, str]:
    return {weight.role: weight.sha256 for weight in getattr(model, "weights", [])}


def segment_folder(args: argparse.Namespace) -> int:
    """Run every image of a folder; returns 0 when all cases succeeded, 3 when some failed."""
    input_dir, output_dir = Path(args.input), Path(args.output)
    if args.masked:
        raise UsageError("--masked FILE is for a single input file; for a folder use --masked-suffix.")
    if args.uncertainty:
        raise UsageError("--uncertainty FILE is for a single input file; for a folder use --uncertainty-suffix.")
    _check_output_folder(input_dir, output_dir)
    found = _folder_cases(input_dir)
    choice = cohort_choice(args)
    model = check_model(args.model, args.device)
    check_optional_outputs(model, args)
    suffix, masked_suffix, uncertainty_suffix = _suffixes(args, model)
    columns = list(REPORT_COLUMNS)
    if uncertainty_suffix:
        columns.insert(columns.index("masked_output") + 1, UNCERTAINTY_COLUMN)
    options = with_copies(args, {"uncertainty": True} if uncertainty_suffix else None)
    options = {**(options or {}), **getattr(args, "run_options", {})} or None
    cases = []
    for case, path in found:
        extension = output_extension(path, args.format)
        outputs = {"output": output_dir / f"{case}_{suffix}{extension}"}
        if masked_suffix:
            outputs["masked"] = output_dir / f"{case}_{masked_suffix}{extension}"
        if uncertainty_suffix:
            outputs["uncertainty"] = output_dir / f"{case}_{uncertainty_suffix}{extension}"
        cases.append(cohort.Case(case, {"image": path}, outputs))
    spec = cohort.TaskSpec("segment", model.id, args.device, options, _type_check(args), _weights(model))
    return run_folder(args, cases, spec, columns,
                      {"output": "output", "masked": "masked_output", "uncertainty": UNCERTAINTY_COLUMN},
                      lambda case: {"input": case.inputs["image"]}, output_dir, choice)


def synthesize_folder(args: argparse.Namespace) -> int:
    """Every image of a folder through a synthesis model: <case>_<suffix><ext> (and the optional maps) per case."""
    input_dir, output_dir = Path(args.input), Path(args.output)
    if args.uncertainty or args.difference:
        raise UsageError("--uncertainty and --difference name files for a single input; for a folder use "
                         "--uncertainty-suffix and --difference-suffix.")
    _check_output_folder(input_dir, output_dir)
    found = _folder_cases(input_dir)
    choice = cohort_choice(args)
    model = check_model(args.model, args.device, task="synthesis")
    suffixes = {"output": args.suffix or model.slicer.get("output_name_suffix") or model.id}
    if args.uncertainty_suffix is not None:
        suffixes["uncertainty"] = args.uncertainty_suffix or DEFAULT_UNCERTAINTY_SUFFIX
    if args.difference_suffix is not None:
        suffixes["difference"] = args.difference_suffix or "difference"
    for name in suffixes.values():
        if any(character in name for character in "/\\") or name.startswith("."):
            raise UsageError(f"The suffix '{name}' must be a plain name (no folders, not starting with a dot).")
    if len(set(suffixes.values())) != len(suffixes):
        raise UsageError(f"The outputs of a case need different suffixes, not {', '.join(suffixes.values())}.")
    cases = [cohort.Case(case, {"image": path},
                         {role: output_dir / f"{case}_{name}{output_extension(path, args.format)}"
                          for role, name in suffixes.items()}) for case, path in found]
    columns = [column for column in SYNTHESIZE_REPORT_COLUMNS
               if column not in ("uncertainty_output", "difference_output") or column[:-7] in suffixes]
    spec = cohort.TaskSpec("synthesize", model.id, args.device, None, _type_check(args), _weights(model))
    return run_folder(args, cases, spec, columns,
                      {"output": "output", "uncertainty": "uncertainty_output", "difference": "difference_output"},
                      lambda case: {"input": case.inputs["image"]}, output_dir, choice)


def read_pairs(path: Path) -> list[tuple[str, Path, Path]]:
    """(name, fixed, moving) per row of a pairs CSV: fixed,moving[,name]; an optional header row, blank lines and
    lines starting with # are ignored; relative paths are relative to the CSV's folder."""
    if not path.is_file():
        raise InputError(f"The pairs file {path} does not exist.")
    pairs: list[tuple[str, Path, Path]] = []
    with path.open(encoding="utf-8", newline="") as stream:
        for number, row in enumerate(csv.reader(stream), start=1):
            cells = [cell.strip() for cell in row]
            if not any(cells) or cells[0].startswith("#"):
                continue
            if number == 1 and cells[0].lower() == "fixed":
                continue
            if len(cells) not in (2, 3) or not all(cells):
                raise InputError(f"Line {number} of {path.name} must be fixed,moving or fixed,moving,name.")
            fixed, moving = (Path(cell) if Path(cell).is_absolute() else path.parent / cell for cell in cells[:2])
            for role, image in (("fixed", fixed), ("moving", moving)):
                if not image.is_file():
                    raise InputError(f"Line {number} of {path.name}: the {role} image {image} does not exist.")
            name = cells[2] if len(cells) == 3 else f"{case_name(moving)}_to_{case_name(fixed)}"
            if any(character in name for character in "/\\") or name.startswith("."):
                raise InputError(f"Line {number} of {path.name}: the name '{name}' must be a plain name (no "
                                 "folders, not starting with a dot).")
            pairs.append((name, fixed, moving))
    if not pairs:
        raise InputError(f"The pairs file {path} lists no pairs (fixed,moving[,name] per line).")
    names = [name for name, _, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"The pairs file {path.name} names several pairs {', '.join(repeated)}; add a third "
                         "column with a name of its own for each.")
    return pairs


def register_pairs(args: argparse.Namespace) -> int:
    """Every pair of a pairs CSV: <name>_warped<ext>, <name>_field.h5 and <name>_report.json on the fixed grid."""
    if args.fixed or args.moving:
        raise UsageError("--pairs replaces --fixed and --moving; give one or the other.")
    single = [option for option, value in (("--transform", args.transform), ("--report", args.report),
                                           ("--moving-labels", args.moving_labels), ("--fixed-mask", args.fixed_mask),
                                           ("--moving-mask", args.moving_mask), ("--fixed-labels", args.fixed_labels),
                                           ("--warped-labels", args.warped_labels)) if value]
    if single:
        raise UsageError(f"{', '.join(single)} {'are' if len(single) > 1 else 'is'} for a single pair; with --pairs "
                         "each pair gets <name>_warped, <name>_field.h5 and <name>_report.json in the -o folder.")
    if not args.output:
        raise UsageError("--pairs needs -o FOLDER for the outputs of every pair.")
    output_dir = Path(args.output)
    _check_output_folder(None, output_dir)
    pairs = read_pairs(Path(args.pairs))
    choice = cohort_choice(args)
    model = check_model(args.model, args.device, task="registration")
    cases = [cohort.Case(name, {"fixed": fixed, "moving": moving},
                         {"output": output_dir / f"{name}_warped{output_extension(fixed, args.format)}",
                          "transform": output_dir / f"{name}_field.h5", "report": output_dir / f"{name}_report.json"})
             for name, fixed, moving in pairs]
    options = {"instance_steps": args.instance_steps} if args.instance_steps is not None else None
    spec = cohort.TaskSpec("register", model.id, args.device, options, _type_check(args), _weights(model))
    return run_folder(args, cases, spec, REGISTER_REPORT_COLUMNS,
                      {"output": "output", "transform": "transform", "report": "report"},
                      lambda case: {"fixed": case.inputs["fixed"], "moving": case.inputs["moving"]}, output_dir,
                      choice)


DEFAULT_CLASSIFIER = "sequence-type"
CLASSIFY_COLUMNS = ["input", "label", "probability", "runner_up", "runner_up_probability", "ood", "error"]
SALIENCY_FILE_SUFFIX = "_saliency.nii.gz"


def classify_cases(values: list[str]) -> tuple[list[tuple[str, Path]], bool]:
    """(case name, file) for the -i values in order, each folder expanded to its image files (find_cases), and
    whether any value was a folder. A file that does not exist stays in the list: its entry reports the error."""
    cases: list[tuple[str, Path]] = []
    folder = False
    for value in values:
        path = Path(value)
        if path.is_dir():
            found = find_cases(path)
            if not found:
                raise InputError(f"The folder {path} has no image files ({', '.join(IMAGE_SUFFIXES)}).")
            cases += found
            folder = True
        else:
            cases.append((case_name(path), path))
    return cases, folder


def _classify_targets(args: argparse.Namespace, cases: list[tuple[str, Path]], folder: bool
                      ) -> tuple[Path | None, Path | None, Path | None]:
    """(JSON, CSV, saliency folder) after the checks that must pass before the model runs (exit code 2)."""
    json_path = Path(args.json) if args.json else None
    csv_path = Path(args.csv) if args.csv else (json_path.with_suffix(".csv") if folder and json_path else None)
    if json_path is not None and csv_path is not None and csv_path.resolve() == json_path.resolve():
        raise UsageError(f"--csv {csv_path} and --json must be different files.")
    sources = {path.resolve() for _, path in cases}
    for option, path in (("--json", json_path), ("--csv", csv_path)):
        if path is None:
            continue
        if path.resolve() in sources:
            raise UsageError(f"{option} {path} would overwrite an input; choose another file.")
        if path.is_dir():
            raise UsageError(f"{option} {path} is a folder; give a file name.")
    saliency_dir = Path(args.saliency_dir) if args.saliency_dir else None
    if saliency_dir is not None:
        if saliency_dir.exists() and not saliency_dir.is_dir():
            raise UsageError(f"--saliency-dir {saliency_dir} is a file; give a folder.")
        names = [name for name, _ in cases]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise UsageError(f"Several inputs are named {', '.join(repeated)}; their saliency maps would overwrite "
                             "each other in one --saliency-dir.")
    for path in filter(None, (json_path, csv_path, saliency_dir)):
        folder_to_make = path if path is saliency_dir else path.parent
        try:
            folder_to_make.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"Cannot create the folder {folder_to_make} ({error.strerror or error}).") from error
    return json_path, csv_path, saliency_dir


def _classification_row(entry: dict[str, Any]) -> dict[str, Any]:
    """The CSV row of one entry: the label, its probability and the runner-up."""
    ranked = sorted(entry["probabilities"].items(), key=lambda item: -item[1])
    row: dict[str, Any] = {"input": entry["input"], "label": entry["label"], "error": entry["error"],
                           "ood": "" if entry["error"] else str(bool(entry["ood"])).lower()}
    if entry["label"] is not None:
        row["probability"] = f"{entry['probabilities'][entry['label']]:.4f}"
    if len(ranked) > 1 and entry["label"] is not None:
        runner_up = next(item for item in ranked if item[0] != entry["label"])
        row["runner_up"], row["runner_up_probability"] = runner_up[0], f"{runner_up[1]:.4f}"
    return row


def command_classify(args: argparse.Namespace) -> int:
    """Classify files and folders of volumes; JSON (and CSV) out; 0 when every volume was classified, 3 when some
    failed (each one printed), 2 before any volume for a bad command line, model or device."""
    from MIADeepLearningLib.engine.tasks import classify_images

    cases, folder = classify_cases(args.input)
    json_path, csv_path, saliency_dir = _classify_targets(args, cases, folder)
    model = check_model(args.model, args.device, task="classification")
    if saliency_dir is not None and "saliency" not in model.optional_outputs:
        raise ModelError(f"Model '{model.title}' makes no saliency map.")
    progress = BatchProgress(len(cases), quiet=args.quiet)
    report = CsvReport(csv_path, CLASSIFY_COLUMNS) if csv_path is not None else None
    entries: list[dict[str, Any]] = []

    def finished(index: int, entry: dict[str, Any]) -> None:
        case, _path = cases[index]
        record = {key: entry[key] for key in ("input", "label", "probabilities", "ood", "reasons", "error")}
        record["probabilities"] = {name: round(value, 6) for name, value in record["probabilities"].items()}
        if saliency_dir is not None:
            target = saliency_dir / f"{case}{SALIENCY_FILE_SUFFIX}"
            record["saliency"] = None
            if entry["saliency"] is not None:
                try:
                    _write_all({target: entry["saliency"]})
                    record["saliency"] = str(target)
                except (OSError, RuntimeError) as error:
                    record["error"] = f"The saliency map could not be written to {target} ({error})."
            else:
                _remove_stale([target])
        entries.append(record)
        if report is not None:
            report.add(_classification_row(record))
        seconds = float(sum(value for key, value in entry["timings"].items() if key in ("read_input", "classify")))
        if record["error"]:
            progress.case_finished(STATUS_FAILED, seconds, f": {record['error']}")
        else:
            ood = ", out of distribution" if record["ood"] else ""
            probability = record["probabilities"][record["label"]]
            progress.case_finished(STATUS_OK, seconds, f": {record['label']} (p = {probability:.2f}{ood})")
        if index + 1 < len(cases):
            progress.case_started(index + 2, cases[index + 1][0])

    def write_json() -> None:
        text = json.dumps(entries, indent=2)
        if json_path is None:
            sys.stdout.write(text + "\n")
            return
        partial = json_path.with_name(f".{json_path.name}.partial")
        partial.write_text(text + "\n", encoding="utf-8")
        os.replace(partial, json_path)

    def case_progress(stage: str, fraction: float, message: str) -> None:
        """classify_images reports the whole run's fraction (0.05 + 0.9 · done / N); the bar wants the case's."""
        progress.stage(stage, max(0.0, min(1.0, (fraction - 0.05) / 0.9 * len(cases) - progress.finished)), message)

    progress.case_started(1, cases[0][0])
    try:
        output = classify_images([path for _, path in cases], model.id, device=args.device,
                                 saliency=saliency_dir is not None, progress=case_progress,
                                 input_names=[path.name for _, path in cases], on_result=finished)
    except KeyboardInterrupt:
        write_json()
        sys.stderr.write(f"\ninterrupted; the results so far are in {json_path or 'the output above'}\n")
        return EXIT_INTERRUPTED
    finally:
        if report is not None:
            report.close()
    write_json()
    if args.provenance:
        Path(args.provenance).write_text(json.dumps(output.provenance, indent=2), encoding="utf-8")
    failed = [(case, record) for (case, _), record in zip(cases, entries) if record["error"]]
    for case, record in failed:
        sys.stderr.write(f"failed: {case} ({record['input']}): {record['error']}\n")
    if failed or not args.quiet:
        summary = f"{len(cases) - len(failed)} of {len(cases)} volumes classified"
        if failed:
            summary += f", {len(failed)} failed"
        written = ", ".join(str(path) for path in (json_path, csv_path) if path is not None)
        sys.stderr.write(f"{summary} in {_format_duration(time.perf_counter() - progress.started)}"
                         f"{'; results: ' + written if written else ''}\n")
    return EXIT_SOME_CASES_FAILED if failed else EXIT_OK


DEFAULT_DETECTOR = "brain-lesion"
DETECT_CANDIDATE_FIELDS = ("label", "volume_ml", "center_ras", "max_score", "mean_score", "tissue")


def _detect_targets(args: argparse.Namespace, inputs: list[Path]) -> dict[str, Path]:
    """The files to write (option -> path), after the checks that must pass before the model runs (exit code 2)."""
    targets = {"-o": args.output, "--lesions": args.lesions, "--brain": args.brain, "--json": args.json,
               "--provenance": args.provenance}
    targets = {option: Path(path) for option, path in targets.items() if path}
    for option in ("-o", "--lesions", "--brain"):
        if option in targets and image_suffix(targets[option].name) is None:
            raise UsageError(f"{option} {targets[option]} needs an image extension ({', '.join(IMAGE_SUFFIXES)}).")
    sources = {path.resolve() for path in inputs}
    for option, path in targets.items():
        if path.resolve() in sources:
            raise UsageError(f"{option} {path} would overwrite an input; choose another file.")
        if path.is_dir():
            raise UsageError(f"{option} {path} is a folder; give a file name.")
    if len({path.resolve() for path in targets.values()}) != len(targets):
        raise UsageError("The outputs (-o, --lesions, --brain, --json, --provenance) must be different files.")
    _make_folders(targets.values())
    return targets


def detection_summary(result: Any, inputs: list[Path], model_id: str) -> dict[str, Any]:
    """The JSON that `detect` writes: the case, its score and candidates (by decreasing max score)."""
    return {"input": str(inputs[0]), "inputs": [str(path) for path in inputs], "model": model_id,
            "threshold": result.threshold, "case_score": result.case_score,
            "candidates": [{key: candidate[key] for key in DETECT_CANDIDATE_FIELDS} for candidate in result.candidates],
            "warnings": list(result.warnings), "provenance": result.provenance}


def command_detect(args: argparse.Namespace) -> int:
    """One scan (and optionally more co-registered contrasts) in; the anomaly map, the candidate label map, the
    brain map and the JSON summary out, on the first input's grid; nothing is written unless everything succeeded,
    and no failure ends in a traceback."""
    from MIADeepLearningLib.engine.tasks import detect_lesions

    inputs = [Path(value) for value in args.input]
    for path in inputs:
        if not path.exists():
            raise InputError(f"Input image {path} does not exist.")
        if not path.is_file():
            raise InputError(f"The input {path} is not a file (detect takes image files, not folders).")
    if len({path.resolve() for path in inputs}) != len(inputs):
        raise UsageError("The same file is given twice as an input; give each contrast once.")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise UsageError(f"--threshold must lie between 0 and 1 (both excluded), not {args.threshold:g}.")
    if args.min_volume is not None and not args.min_volume >= 0.0:
        raise UsageError(f"--min-volume must be 0 or more cubic millimetres, not {args.min_volume:g}.")
    targets = _detect_targets(args, inputs)
    model = check_model(args.model, args.device, task="detection")
    options = {"threshold": args.threshold, "min_volume_mm3": args.min_volume,
               "test_time_copies": args.test_time_copies}
    try:
        result = detect_lesions(inputs, model.id, device=args.device,
                                options={key: value for key, value in options.items() if value is not None} or None,
                                progress=_progress_printer(args.quiet), type_check=_type_check(args))
        summary = detection_summary(result, inputs, model.id)

        def writer(content: Any) -> Callable[[Path], None]:
            return lambda path: path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")

        files = {"-o": result.anomaly, "--lesions": result.label, "--brain": result.brain, "--json": writer(summary),
                 "--provenance": writer({"segments": result.segments, **result.provenance})}
        _write_all({path: files[option] for option, path in targets.items()})
    except MIADLError:
        raise
    except Exception as error:  # the user gets one line, like every other failure of this command
        text = (str(error).strip().splitlines() or [""])[0]
        sys.stderr.write(f"error: Lesion detection failed unexpectedly ({type(error).__name__}: {text}).\n")
        return EXIT_UNEXPECTED
    if "--json" not in targets:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    for warning in result.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    if not args.quiet:
        found = ", ".join(f"C{item['label']} {item['volume_ml']:.2f} mL (max {item['max_score']:.2f}, "
                          f"{item['tissue'] or 'unknown tissue'})" for item in result.candidates[:5])
        more = f" and {len(result.candidates) - 5} more" if len(result.candidates) > 5 else ""
        sys.stderr.write(f"{len(result.candidates)} candidate(s) above {result.threshold:g}"
                         f"{': ' + found + more if found else ''}; case score {result.case_score:.3f}\n"
                         f"wrote {', '.join(str(path) for path in targets.values())}\n")
    return EXIT_OK


def _download_printer(model_id: str, quiet: bool, stream: TextIO | None = None) -> Callable[[int, int | None], None]:
    """Download progress on stderr: redrawn on a terminal, a line per 10 % (or 10 MiB) otherwise."""
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    last = [-1.0]

    def report(done: int, total: int | None) -> None:
        if quiet:
            return
        mib = done / (1 << 20)
        step = 100 * done / total // 10 if total else mib // 10
        text = f"downloading {model_id}: {mib:.1f}" + (f" / {total / (1 << 20):.1f} MiB ({100 * done / total:3.0f}%)"
                                                        if total else " MiB")
        if tty:
            stream.write("\r\x1b[K" + text + ("\n" if total and done >= total else ""))
        elif step != last[0] or (total and done >= total):
            stream.write(text + "\n")
        last[0] = step
        stream.flush()

    return report


def _describe(model) -> str:
    details = ", ".join(filter(None, [f"v{model.version}", model.license,
                                      "imported" if model.origin_kind == "imported" else ""]))
    return f"{model.id}\t{model.task}\t{model.title} ({details})"


def _confirm(question: str) -> bool | None:
    """Ask y/N on the terminal; None when there is no terminal to ask on (then a flag must confirm)."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return None
    sys.stderr.write(f"{question}\nImport it and allow its code to run? [y/N] ")
    sys.stderr.flush()
    try:
        answer = input()
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _import_with_confirmation(args: argparse.Namespace):
    from MIADeepLearningLib.engine import model_store

    try:
        return model_store.import_model(args.import_path, trust_code=args.trust is True, replace=args.replace)
    except model_store.ConfirmationNeeded as needed:
        answer = _confirm(str(needed))
        if answer is None:
            raise ModelError(
                f"{model_store.confirmation_text(needed.description)}; add --trust to confirm that it may run "
                "(there is no terminal to ask on)."
            ) from None
        if not answer:
            raise ModelError(f"Nothing was imported from {args.import_path} (its code was not confirmed).") from None
    return model_store.import_model(args.import_path, trust_code=True, replace=args.replace)


def _models_action(args: argparse.Namespace) -> str | None:
    """The one thing `models` was asked to do besides listing, or an error for a mix that makes no sense."""
    trust_id = args.trust if isinstance(args.trust, str) else None
    actions = [name for name, value in (("--download", args.download), ("--import", args.import_path),
                                        ("--remove", args.remove), ("--segments", args.segments),
                                        ("--trust ID", trust_id)) if value]
    if len(actions) > 1:
        raise InputError(f"models takes one of --download, --import, --remove, --segments and --trust ID, not "
                         f"{' and '.join(actions)}.")
    if args.replace and actions != ["--import"]:
        raise InputError("--replace goes with --import PATH (it replaces the installed copy of that model).")
    if args.trust is True and actions != ["--import"]:
        raise InputError("--trust without an id goes with --import PATH (use --trust ID for an installed model).")
    return actions[0] if actions else None


def _models(args: argparse.Namespace) -> int:
    from MIADeepLearningLib.engine import registry

    action = _models_action(args)
    if action in ("--download", "--import", "--segments", "--trust ID"):
        from MIADeepLearningLib.engine import model_store

        if action == "--download":
            model = model_store.download_model(args.download, progress=_download_printer(args.download, args.quiet))
            done = f"installed {model.id} v{model.version} in {model.package_dir}"
        elif action == "--import":
            model = _import_with_confirmation(args)
            done = f"installed {model.id} v{model.version} in {model.package_dir}"
        elif action == "--segments":
            model = model_store.set_segments(*args.segments)
            done = f"segments of {model.id}: " + ", ".join(
                f"{segment['value']} {segment['name']}" for segment in model.segments)
        else:
            model = model_store.trust_model(args.trust)
            done = f"confirmed: the code of {model.id} v{model.version} ({model.package_dir}) may run"
        if args.json:
            print(json.dumps(model.summary(), indent=2))
        else:
            print(_describe(model))
        if not args.quiet:
            sys.stderr.write(done + "\n")
        return EXIT_OK
    if action == "--remove":
        from MIADeepLearningLib.engine import model_store

        removed = model_store.remove_model(args.remove)
        if args.json:
            print(json.dumps({"id": args.remove, "removed": [str(folder) for folder in removed]}, indent=2))
        elif not args.quiet:
            for folder in removed:
                sys.stderr.write(f"removed {folder}\n")
        return EXIT_OK
    models = registry.list_models(task=args.task)
    if args.json:
        print(json.dumps([model.summary() for model in models], indent=2))
    else:
        for model in models:
            untrusted = registry.trust_problem(model)
            print(_describe(model) + (f"\t(code not confirmed: {registry.TRUST_HINT} {model.id})" if untrusted
                                      else ""))
    return EXIT_OK


def command_models(args: argparse.Namespace) -> int:
    """List, download, import, remove, confirm or correct models; every failure is one sentence, never a
    traceback (a file system error is named, anything else is reported as unexpected)."""
    try:
        return _models(args)
    except MIADLError:
        raise
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        raise ModelError(f"A file operation on the model cache failed: {error.strerror or error}{where}.") from error
    except Exception as error:  # the user gets one line that names the cause
        detail = " ".join(str(error).split())[:200]
        sys.stderr.write(f"error: Unexpected error ({type(error).__name__}: {detail}).\n")
        return EXIT_UNEXPECTED


def command_device(args: argparse.Namespace) -> int:
    from MIADeepLearningLib.engine.devices import device_report

    report = device_report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


SEGMENT_EPILOG = """\
input and output:
  -i FILE -o FILE       one image; the label is written to FILE (format from its extension)
  -i FILE -o FOLDER     one image; the label is written as FOLDER/<case>_<suffix><ext>
  -i FOLDER -o FOLDER   a batch: every .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd file directly in the input folder,
                        in name order; outputs FOLDER/<case>_<suffix><ext>, where <ext> is the input's own extension
                        unless --format says otherwise; the model is loaded once; a failing case is reported and the
                        batch goes on; a CSV report is written (default FOLDER/report.csv)

exit codes:
  0  every image was segmented
  2  bad command line, input, model or device (nothing was segmented; one line on stderr)
  3  some cases of a folder failed; the others were written and the report says which and why
  1  unexpected failure
"""


CLASSIFY_EPILOG = """\
input and output:
  -i FILE [-i FILE ...]   the volumes to classify, in order
  -i FOLDER               every .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd file directly in the folder, in name order;
                          also writes a CSV (input,label,probability,runner_up,runner_up_probability,ood,error),
                          beside the JSON with the same name and .csv unless --csv says where
  --json OUT.json         a list with, per input: {"input", "label" (t1w, t1c, t2w, flair, pdw, dwi, ct, other; null
                          when the volume failed), "probabilities" {class: p}, "ood" (out of distribution: a label
                          map, no head, ...), "reasons" [...], "error" (null or one sentence)}; stdout without --json
  --saliency-dir DIR      DIR/<case>_saliency.nii.gz: the Grad-CAM map of the predicted class (0..1), exactly on the
                          input's grid (size, spacing, origin, direction)

exit codes:
  0  every volume was classified
  3  some volumes failed (each is printed on stderr and has its error in the JSON and CSV); the others were written
  2  bad command line, model or device (nothing was classified; one line on stderr)
  1  unexpected failure
"""

DETECT_EPILOG = """\
input and output:
  -i FILE [-i FILE ...]   the scan, then optionally more contrasts of the same visit, co-registered with it (each is
                          resampled onto the first one's grid; one that covers too little of its head is refused)
  -o FILE                 the anomaly map (lesion probability 0..1, float32), exactly on the first input's grid
                          (size, spacing, origin, direction)
  --lesions FILE          the candidates as a label map on the same grid: 0 none, k = candidate k (k = 1 scores
                          highest)
  --brain FILE            the brain map used (1 CSF, 2 gray matter, 3 white matter), on the same grid
  --json OUT.json         {"input", "inputs", "model", "threshold", "case_score", "candidates": [{"label",
                          "volume_ml", "center_ras" (RAS mm), "max_score", "mean_score", "tissue"}], "warnings",
                          "provenance"}; stdout without --json
  nothing is written unless everything succeeded

exit codes:
  0  the scan was analysed (with or without candidates)
  2  bad command line, input, model, option or device (nothing was written; one line on stderr)
  1  unexpected failure (nothing was written; one line on stderr)
"""

MODELS_EPILOG = """\
import:
  --import PATH           a folder or .zip: a model package of this extension, or a MONAI Model Zoo bundle exactly
                          as downloaded (configs/metadata.json + configs/inference.json or .yaml, models/model.pt,
                          large_files.yml); the zoo's md5/sha1/sha256 of each weight file is checked, the sha256 of
                          every weight file is recorded, the network is built and its weights loaded before it is
                          installed; detection, classification and generative bundles are refused
  trust                   a bundle's configuration is code that runs on this computer: importing a model is like
                          installing software; the import asks (y/N) on a terminal, otherwise needs --trust;
                          models --trust ID confirms a model imported before; built-in and registry models need no
                          confirmation

segments file (--segments ID FILE.json), applied over the model's own segments by label value:
  [{"value": 1, "name": "Liver", "color": [221, 130, 101], "terminology": "..."}, {"value": 2, "name": "Spleen"}]
  value        the label value in the output (1, 2, ...)
  name         the segment name shown in Slicer
  color        red, green, blue, each 0-255 (optional)
  terminology  a Slicer terminology string (optional), e.g. "Segmentation category and type - 3D Slicer General
               Anatomy list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM
               master list~^^~^^" (one line)
  an empty list [] removes the corrections

exit codes:
  0  done
  2  bad command line, package or model (nothing was changed; one line on stderr)
  1  unexpected failure (one line on stderr)
"""

TYPE_CHECK_HELP = ("skip the input type check (the sequence-type classifier, when installed, warns when the volume "
                   "looks like a type the model was not made for; also: environment variable MIADL_TYPE_CHECK=0)")


def add_cohort_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the cases of a cohort (folder input, register --pairs) run; see cohort.py."""
    group = parser.add_argument_group("cohorts (a folder input, register --pairs)")
    group.add_argument("--engine", choices=cohort.ENGINES, default="local",
                       help="local: one case after another in this process (default); ray: a pool of Ray actors, "
                            "each loading the model once (a local Ray instance unless --ray-address)")
    group.add_argument("--ray-address", metavar="ADDRESS",
                       help="--engine ray: connect to this Ray cluster (e.g. ray://head:10001 or auto) instead of "
                            "starting a local instance")
    group.add_argument("--workers", type=int, metavar="N",
                       help="--engine ray: how many actors (default: as many as the cluster's CPUs or GPUs hold)")
    group.add_argument("--cpus-per-worker", type=float, metavar="C",
                       help="CPUs per worker, also its torch threads (ray default 1; local: torch threads)")
    group.add_argument("--gpus-per-worker", type=float, metavar="G",
                       help="--engine ray: GPUs per worker (default 0; 1 puts one worker on every GPU)")
    group.add_argument("--no-resume", action="store_true",
                       help="run every case, even one whose outputs and sidecar say it is already done")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m MIADeepLearningLib", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", help="segment one image file or a folder of them (NIfTI, NRRD, MHA)",
                                  epilog=SEGMENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    segment.add_argument("--model", required=True, help="model id (see `models`)")
    segment.add_argument("-i", "--input", required=True, help="input image file, or a folder of image files")
    segment.add_argument("--extra-input", action="append", metavar="FILE",
                         help="one input file: a further input channel of a multi-channel model, on the first "
                              "input's grid (repeat it, in the order `models` lists the model's input channels)")
    segment.add_argument("--config", action="append", metavar="KEY=VALUE",
                         help="MONAI bundles: override a setting of the bundle's inference config (MONAI's syntax, "
                              "e.g. network_def#in_channels=2; the value is read as JSON, else as text; repeatable)")
    segment.add_argument("--weights", metavar="NAME",
                         help="MONAI bundles: the verified weight file (or role) to use, e.g. model_lowres.pt")
    segment.add_argument("-o", "--output", required=True,
                         help="output label file (same grid as the input), or a folder")
    segment.add_argument("--masked", help="one input file: also write the input with everything outside the "
                                          "segmentation removed, to this file")
    segment.add_argument("--masked-suffix", nargs="?", const="", default=None, metavar="SUFFIX",
                         help="output folder: also write the masked input as <case>_<SUFFIX><ext> "
                              "(without a value: the model's name for it, e.g. skull-stripped)")
    segment.add_argument("--uncertainty", metavar="FILE",
                         help="one input file: also write the model's voxel-wise uncertainty (0 certain .. 1 "
                              "undecided) to this file; only for models that make one (slower: mirrored copies)")
    segment.add_argument("--uncertainty-suffix", nargs="?", const="", default=None, metavar="SUFFIX",
                         help="output folder: also write the uncertainty map as <case>_<SUFFIX><ext> (default "
                              f"{DEFAULT_UNCERTAINTY_SUFFIX})")
    segment.add_argument("--suffix", help="output folder: the label's suffix (default: the model's, e.g. brain)")
    segment.add_argument("--format", choices=OUTPUT_FORMATS, default="same",
                         help="output folder: file format of the outputs (default: the input's own)")
    segment.add_argument("--report", help="folder input: the CSV report (default <output folder>/report.csv)")
    segment.add_argument("--test-time-copies", type=int, choices=(1, 2, 4), metavar="{1,2,4}", help=COPIES_HELP)
    segment.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    segment.add_argument("--provenance", help="write model, weights sha256, device and parameters as JSON here "
                                              "(a folder input: one entry per successful case)")
    segment.add_argument("--no-type-check", action="store_true", help=TYPE_CHECK_HELP)
    segment.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    add_cohort_arguments(segment)
    segment.set_defaults(handler=command_segment)

    synthesize = commands.add_parser("synthesize", help="run a synthesis model (e.g. thick slices -> 1 mm) on one "
                                                        "file or a folder of them",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    synthesize.add_argument("--model", required=True, help="model id (see `models --task synthesis`)")
    synthesize.add_argument("-i", "--input", required=True, help="input image file (NIfTI, NRRD, MHA), or a folder")
    synthesize.add_argument("-o", "--output", required=True, help="output image file, or a folder")
    synthesize.add_argument("--uncertainty", help="also write the voxel-wise std over 4 in-plane flips (4x slower)")
    synthesize.add_argument("--difference", help="also write output minus B-spline interpolation of the input")
    synthesize.add_argument("--suffix", help="output folder: the output's suffix (default: the model's)")
    synthesize.add_argument("--uncertainty-suffix", nargs="?", const="", default=None, metavar="SUFFIX",
                            help="output folder: also write the uncertainty as <case>_<SUFFIX><ext> (default "
                                 f"{DEFAULT_UNCERTAINTY_SUFFIX})")
    synthesize.add_argument("--difference-suffix", nargs="?", const="", default=None, metavar="SUFFIX",
                            help="output folder: also write the difference as <case>_<SUFFIX><ext> (default "
                                 "difference)")
    synthesize.add_argument("--format", choices=OUTPUT_FORMATS, default="same",
                            help="output folder: file format of the outputs (default: the input's own)")
    synthesize.add_argument("--report", help="folder input: the CSV report (default <output folder>/report.csv)")
    synthesize.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    synthesize.add_argument("--provenance", help="write model, weights sha256, device and parameters as JSON here")
    synthesize.add_argument("--no-type-check", action="store_true", help=TYPE_CHECK_HELP)
    synthesize.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    add_cohort_arguments(synthesize)
    synthesize.set_defaults(handler=command_synthesize)

    register = commands.add_parser(
        "register", help="register a moving image to a fixed one (deformable; any MRI contrast)",
        description="Register --moving to --fixed. Every output lies on the fixed image's grid: the warped moving "
                    "image (-o), the displacement field (--transform, .h5: an ITK/Slicer grid transform in LPS mm, "
                    "the fixed point p samples the moving image at p + u(p), affine included), the propagated "
                    "moving labels (--warped-labels) and a JSON report (--report: Jacobian determinant statistics "
                    "over the fixed foreground; Dice before, after the affine and after registration with "
                    "--moving-labels and --fixed-labels). Nothing is written unless everything succeeded. Exit "
                    "codes: 0 success, 2 bad command line, input, model or device, 1 unexpected failure.")
    register.add_argument("--model", required=True, help="model id (see `models --task registration`)")
    register.add_argument("--fixed", help="the fixed (reference) image file")
    register.add_argument("--moving", help="the moving image file, aligned to the fixed one")
    register.add_argument("--pairs", metavar="PAIRS.csv",
                          help="a cohort: one pair per line, fixed,moving[,name] (paths relative to the CSV); with "
                               "-o FOLDER: <name>_warped<ext>, <name>_field.h5, <name>_report.json and report.csv")
    register.add_argument("-o", "--output", help="the warped moving image (linear, on the fixed grid); with --pairs "
                                                 "the output folder")
    register.add_argument("--format", choices=OUTPUT_FORMATS, default="same",
                          help="--pairs: file format of the warped images (default: the fixed image's)")
    register.add_argument("--transform", help="the displacement field as an ITK transform file (.h5)")
    register.add_argument("--moving-labels", help="a label map on the moving image's grid, to propagate")
    register.add_argument("--warped-labels", help="the moving labels on the fixed grid (nearest neighbour)")
    register.add_argument("--fixed-labels", help="a label map on the fixed grid: the report gets Dice per label")
    register.add_argument("--report", help="write the report (Jacobian statistics, Dice) as JSON here")
    register.add_argument("--fixed-mask", help="a mask on the fixed grid (e.g. the brain): restricts the affine "
                                               "metric, the instance optimisation and the Jacobian statistics")
    register.add_argument("--moving-mask", help="a mask on the moving grid: restricts the affine metric")
    register.add_argument("--instance-steps", type=int, metavar="N",
                          help="refine the network's deformation on this pair by N optimisation steps (default: the "
                               "model's, 0 for the shipped one; slow on CPUs)")
    register.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    register.add_argument("--provenance", help="write model, weights sha256, device and parameters as JSON here")
    register.add_argument("--no-type-check", action="store_true", help=TYPE_CHECK_HELP)
    register.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    add_cohort_arguments(register)
    register.set_defaults(handler=command_register)

    classify = commands.add_parser(
        "classify", help="name the scan type of volumes (T1, T1 contrast, T2, FLAIR, PD, diffusion, CT, other)",
        description="Classify each volume's scan type with a classification model (default: sequence-type), loaded "
                    "once; a volume that fails is reported and the others go on.",
        epilog=CLASSIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    classify.add_argument("--model", default=DEFAULT_CLASSIFIER,
                          help="model id (default %(default)s; see `models --task classification`)")
    classify.add_argument("-i", "--input", required=True, action="append", metavar="IN",
                          help="an image file or a folder of them (repeat for more)")
    classify.add_argument("--json", metavar="OUT.json", help="write the results as JSON here (default: stdout)")
    classify.add_argument("--csv", metavar="OUT.csv", help="also write a CSV table here (default for a folder "
                                                           "input: beside the JSON)")
    classify.add_argument("--saliency-dir", metavar="DIR", help="write each volume's saliency map as "
                                                                "DIR/<case>_saliency.nii.gz on its grid")
    classify.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    classify.add_argument("--provenance", help="write model, weights sha256, device and versions as JSON here")
    classify.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    classify.set_defaults(handler=command_classify)

    detect = commands.add_parser(
        "detect", help="lesion detection in brain MRI: anomaly map, lesion candidates, brain map (any contrast)",
        description="Detect what does not fit healthy brain anatomy in one scan (optionally with more co-registered "
                    "contrasts of the same visit); every output lies exactly on the first input's grid.",
        epilog=DETECT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    detect.add_argument("--model", default=DEFAULT_DETECTOR,
                        help="model id (default %(default)s; see `models --task detection`)")
    detect.add_argument("-i", "--input", required=True, action="append", metavar="IN",
                        help="an image file; repeat for more co-registered contrasts (the first sets the grid)")
    detect.add_argument("-o", "--output", required=True, metavar="ANOMALY", help="the anomaly map (0..1)")
    detect.add_argument("--lesions", required=True, metavar="LABELS", help="the lesion candidates as a label map")
    detect.add_argument("--brain", metavar="BRAIN", help="also write the brain map (1 CSF, 2 GM, 3 WM)")
    detect.add_argument("--json", metavar="OUT.json", help="the candidates and case score as JSON (default: stdout)")
    detect.add_argument("--threshold", type=float, metavar="T",
                        help="anomaly above which a voxel belongs to a candidate, between 0 and 1 (default: the "
                             "model's, 0.5 for the shipped one; lower finds more)")
    detect.add_argument("--min-volume", type=float, metavar="MM3",
                        help="smallest candidate kept, in cubic millimetres (default: the model's, 10)")
    detect.add_argument("--test-time-copies", type=int, choices=(1, 2, 4), metavar="{1,2,4}", help=COPIES_HELP)
    detect.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    detect.add_argument("--provenance", help="write model, weights sha256, device, options and segments as JSON here")
    detect.add_argument("--no-type-check", action="store_true", help=TYPE_CHECK_HELP)
    detect.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    detect.set_defaults(handler=command_detect)

    models = commands.add_parser(
        "models", help="list, download, import, remove, confirm or correct models",
        description="List the models (built in, downloaded, imported), or change what is installed.",
        epilog=MODELS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.add_argument("--task", choices=MODEL_TASKS, help="only models of this task")
    install = models.add_mutually_exclusive_group()
    install.add_argument("--download", metavar="ID",
                         help="download a registered model into the user cache (sha256-verified before use)")
    install.add_argument("--import", dest="import_path", metavar="PATH",
                         help="install a model package or a MONAI Model Zoo bundle as downloaded, from a local "
                              "folder or .zip (sites without internet)")
    install.add_argument("--remove", metavar="ID", help="delete the downloaded or imported copies of a model")
    install.add_argument("--segments", nargs=2, metavar=("ID", "FILE.json"),
                         help="correct the segment names, colours and terminology of an installed model (format "
                              "below)")
    models.add_argument("--trust", nargs="?", const=True, default=None, metavar="ID",
                        help="with --import: confirm that the package's code may run (needed when there is no "
                             "terminal to ask on); alone with an id: confirm an imported model")
    models.add_argument("--replace", action="store_true",
                        help="with --import: replace the installed copy of that model (any version); the old copy "
                             "stays if the new one fails its checks")
    models.add_argument("-q", "--quiet", action="store_true", help="no progress or confirmation lines on stderr")
    models.set_defaults(handler=command_models)

    device = commands.add_parser("device", help="report the compute device and why a GPU is or is not used")
    device.add_argument("--json", action="store_true", help="machine-readable output")
    device.set_defaults(handler=command_device)

    serve = commands.add_parser(
        "serve", help="the inference server: Slicer workstations run their jobs on this computer's devices",
        description="HTTP server (TLS and a token) running the same worker tasks; see server.py for the API.")
    from MIADeepLearningLib import server  # light: FastAPI and uvicorn are imported only when it starts

    server.build_parser(serve)
    serve.set_defaults(handler=server.serve)
    return parser


MODEL_COMMANDS = (command_segment, command_synthesize, command_register, command_classify, command_detect)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.handler in MODEL_COMMANDS:
            # an unsupported torch is named with the minimum before the engine meets an API it lacks
            from MIADeepLearningLib.worker import check_torch_version

            check_torch_version()
        return args.handler(args)
    except MIADLError as error:
        sys.stderr.write(f"error: {error}\n")
        return EXIT_USAGE
