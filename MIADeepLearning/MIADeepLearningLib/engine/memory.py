"""Pre-flight memory check: refuse, before the voxels are read, a run that would need more memory than is free.

Why: a whole-body CT (512×512×1200 voxels, int16) is 0.6 GB on disk, but the pipelines hold several float copies of
it on the input grid (probabilities per class, a displacement field of three float64 per voxel, ...): brain tissue
or a registration onto it needs about 32 or 37 GB, so the run swaps or is killed by the system after minutes of work,
with no clear message. The header alone (SimpleITK's ``ImageFileReader.ReadImageInformation``) gives the voxel
counts, so the cost can be estimated and a run that cannot fit refused in one sentence, before any work.

The bound of each pipeline is linear in the voxel counts it works on (GB here = 2^30 bytes)::

    peak ≈ BASE + 2 · model file + (pixel bytes + a) · input voxels + b · working-grid voxels

``BASE`` is the worker process itself (Python, torch, SimpleITK) with its networks at their fixed window sizes;
``a`` counts the float copies on the input grid, ``b`` those on the pipeline's own grid (deepbet's RAS grid, the 2 mm
grids of brain tissue and registration, the 1 mm output grid of synthesis); a registration adds its moving image.
Where the coefficients come from: ``Testing/Benchmarks/large_volumes.py`` measured the peak RSS of the CLI process
(the kernel's high-water mark) on a synthetic 1 mm head and on whole-body CTs of 512×512×150, ×300 and ×1200 int16
voxels, and of 512×512×150 voxels at half the spacing (same input voxels, 1/8 of the working grid), on an AMD EPYC
with 2 threads. The coefficients were chosen so that every measured run lies under its estimate (4 to 70 % above
the measured peak; the sum of the stages' costs is an upper bound of their maximum): deepbet 1.15 GB + 17 bytes per
int16 input voxel + 10 per voxel of its ≤ 512³ grid (measured 5.9 GB on the 512×512×1200 CT, bound 6.5); brain
tissue 0.8 GB + 105 bytes per input voxel (four class probabilities in float32 and the intensity refinement's
float64 arrays over the head) + 60 per 2 mm voxel (7.7 GB on 512×512×300, bound 8.7; 32 GB for 512×512×1200, whose
run was stopped at a 10 GB cap); synthesis 0.95 GB + 10 bytes per input voxel + 45 per 1 mm output voxel (5.4 GB on
the whole-body CT, bound 7.8); registration 0.6 GB + 120 bytes per fixed voxel (the float64 displacement field on
the fixed grid, in up to three copies while it is composed and applied) + 120 per 2 mm voxel + 16 per moving voxel
(7.3 GB with a 512×512×300 fixed image, bound 9.9; 37 GB for 512×512×1200, stopped at the cap). The options that
keep more maps (uncertainty, difference) add what their arrays take, counted from the code, not measured.
Since the OpenVINO CPU path the bases of deepbet (1.5 GB) and synthesis (1.5 GB) are higher than the measurements
above gave (1.86 and 2.1 GB peaks on a 1 mm 256³ head were measured with it).

Available memory: ``$MIADL_AVAILABLE_MEMORY_GB`` when set (tests, or a site that wants a smaller share), else the
system's own figure — psutil where it is installed (not guaranteed inside Slicer), else /proc/meminfo's MemAvailable
(and a cgroup limit) on Linux, GlobalMemoryStatusEx on Windows, os.sysconf elsewhere. When none is known the check
passes: a run must never be refused for a number this module could not get.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from MIADeepLearningLib.engine.errors import InputError

AVAILABLE_MEMORY_ENV = "MIADL_AVAILABLE_MEMORY_GB"
GB = 1024**3

# Measured bounds (bytes; "per voxel" = per voxel of that grid). See the module docstring and README.md, Limits.
BASE_BYTES = {
    # incl. the 256³ mask network's activations; + 0.35 GB since OpenVINO (engine/cpu_runtime.py): its first run on a
    # computer holds PyTorch's and OpenVINO's buffers at once (1.86 GB peak on a 1 mm 256³ head, later runs 1.47)
    "deepbet_brain_extraction": 1.5 * GB,
    "brain_tissue_segmentation": 0.8 * GB,
    # incl. the 96³ windows of the network; + 0.55 GB since OpenVINO: 2.1 GB peak for a 5 mm 256x256x51 input -> 1 mm
    "thick_slice_super_resolution": 1.5 * GB,
    "synthmorph_registration": 0.6 * GB,
}
INPUT_BYTES_PER_VOXEL = {  # on top of the input's own pixel bytes
    "deepbet_brain_extraction": 15.0,  # the probability, connected components and masks on the input grid
    "brain_tissue_segmentation": 103.0,  # probabilities per class, the intensity refinement's float64 arrays
    "thick_slice_super_resolution": 8.0,  # the float copy and its in-plane smoothing
    "synthmorph_registration": 118.0,  # the displacement field: 3 float64 per fixed voxel, in several copies
}
WORKING_BYTES_PER_VOXEL = {
    "deepbet_brain_extraction": 10.0,
    "brain_tissue_segmentation": 60.0,
    "thick_slice_super_resolution": 45.0,  # the 1 mm output grid: network input (3 channels), output, weights
    "synthmorph_registration": 120.0,
}
MOVING_BYTES_PER_VOXEL = 14.0  # registration: the moving image's float copies (on top of its pixel bytes)
UNCERTAINTY_BYTES_PER_VOXEL = {  # asked-for uncertainty maps (and, for synthesis, the difference map)
    "brain_tissue_segmentation": 20.0,  # per input voxel: the entropy and its temporaries
    "thick_slice_super_resolution": 40.0,  # per output voxel: four predictions kept for their spread
}
DIFFERENCE_BYTES_PER_VOXEL = 12.0  # synthesis, per output voxel: the B-spline copy and the difference
DEFAULT_WORKING_SPACING_MM = {"brain_tissue_segmentation": 2.0, "synthmorph_registration": 2.0}
DEEPBET_MAX_VOXELS_PER_AXIS = 512  # geometry.ras_model_grid
DEEPBET_MARGIN_MM = 10.0
REGISTRATION_MARGIN_VOXELS = 1  # registration.working_grid
REGISTRATION_MULTIPLE = 16


@dataclass(frozen=True)
class ImageInfo:
    """What the header of an image file says: enough to size a run, nothing read from the voxels."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]
    components: int
    pixel_bytes: int  # bytes of one component

    @property
    def voxels(self) -> int:
        return math.prod(self.size)

    @property
    def size_text(self) -> str:
        return "×".join(str(n) for n in self.size)

    def extent_mm(self) -> list[float]:
        return [n * s for n, s in zip(self.size, self.spacing)]


def read_image_info(path: str | os.PathLike) -> ImageInfo | None:
    """The header of an image file (SimpleITK's ReadImageInformation: no voxel is read); None when it cannot be
    read, so the reader that follows reports the problem in its own words."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    components = max(1, int(reader.GetNumberOfComponents()))
    try:  # a one-voxel image of the file's pixel type knows the bytes of one component
        size = int(sitk.Image([1, 1], reader.GetPixelID(), components).GetSizeOfPixelComponent())
    except RuntimeError:
        size = 8
    return ImageInfo(tuple(int(n) for n in reader.GetSize()), tuple(float(s) for s in reader.GetSpacing()),
                     tuple(float(d) for d in reader.GetDirection()), components, size)


def isotropic_voxels(info: ImageInfo, spacing_mm: float) -> int:
    """Voxels of geometry.isotropic_grid(image, spacing_mm): the input's extent in cubes of that side."""
    return math.prod(max(1, round(extent / spacing_mm)) for extent in info.extent_mm())


def _bounding_box_mm(info: ImageInfo) -> list[float]:
    """Axis-aligned physical extent of the image (of an oblique grid: the box around its corners)."""
    dimension = len(info.size)
    direction = [info.direction[row * dimension:(row + 1) * dimension] for row in range(dimension)]
    extents = info.extent_mm()
    return [sum(abs(direction[row][axis]) * extents[axis] for axis in range(dimension)) for row in range(dimension)]


def deepbet_grid_voxels(info: ImageInfo, spacing_mm: float = 1.0) -> int:
    """An upper bound of geometry.ras_model_grid's voxels: the whole box (the foreground is never larger) plus the
    margin, at the spacing it uses (coarser when an axis would pass 512 voxels)."""
    box = [extent + 2 * DEEPBET_MARGIN_MM for extent in _bounding_box_mm(info)]
    spacing = max(spacing_mm, max(box) / DEEPBET_MAX_VOXELS_PER_AXIS)
    return math.prod(max(2, math.ceil(extent / spacing)) for extent in box)


def registration_grid_voxels(info: ImageInfo, spacing_mm: float) -> int:
    """registration.working_grid's voxels: the fixed image's extent at the working spacing, one voxel wider on
    every side, padded to the network's multiple."""
    return math.prod(-(-(max(1, round(extent / spacing_mm)) + 2 * REGISTRATION_MARGIN_VOXELS) // REGISTRATION_MULTIPLE)
                     * REGISTRATION_MULTIPLE for extent in info.extent_mm())


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one run, from the headers alone; `image` is the input that drives it (the fixed image of a
    registration) and `what` the words for it in a message."""

    total_bytes: float
    image: ImageInfo
    what: str
    working_voxels: int
    advice: str

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB


CROP_ADVICE = ("crop it to the region you need (Crop Volume module, or any image tool) or resample it to larger "
               "voxels, then run again")
SYNTHESIS_ADVICE = ("crop it to the region you need (Crop Volume module, or any image tool), then run again; the "
                    "output is 1 mm over the whole field of view, whatever the input's voxels")
REGISTRATION_ADVICE = ("crop the fixed image to the region to register (Crop Volume module, for example to the head) "
                       "or resample it to larger voxels, then run again")


def estimate(pipeline: str, images: Mapping[str, ImageInfo], options: Mapping[str, Any] | None = None,
             model_bytes: int = 0, working_spacing: float | None = None) -> MemoryEstimate | None:
    """The peak memory of `pipeline` on these inputs (role -> header: "image", or "fixed" and "moving" plus the
    optional masks and label maps of a registration), or None for a pipeline without a measured bound (a MONAI
    bundle) or inputs that are no 3D scalar volumes (the input checks refuse those with their own sentence)."""
    options = dict(options or {})
    main_role = "fixed" if pipeline == "synthmorph_registration" else "image"
    image = images.get(main_role)
    if pipeline not in BASE_BYTES or image is None or len(image.size) != 3 or image.components != 1:
        return None
    spacing = float(working_spacing or options.get("working_spacing_mm")
                    or DEFAULT_WORKING_SPACING_MM.get(pipeline, 1.0))
    voxels = image.voxels
    total = BASE_BYTES[pipeline] + 2 * model_bytes + (image.pixel_bytes + INPUT_BYTES_PER_VOXEL[pipeline]) * voxels
    what, advice = f"a {image.size_text}-voxel volume", CROP_ADVICE
    if pipeline == "deepbet_brain_extraction":
        working = deepbet_grid_voxels(image, spacing)
    elif pipeline == "brain_tissue_segmentation":
        working = isotropic_voxels(image, spacing)
        if options.get("uncertainty"):
            total += UNCERTAINTY_BYTES_PER_VOXEL[pipeline] * voxels
    elif pipeline == "thick_slice_super_resolution":
        working = isotropic_voxels(image, float(options.get("output_spacing_mm", 1.0)))
        if options.get("uncertainty"):
            total += UNCERTAINTY_BYTES_PER_VOXEL[pipeline] * working
        if options.get("difference"):
            total += DIFFERENCE_BYTES_PER_VOXEL * working
        advice = SYNTHESIS_ADVICE
    else:  # registration: everything ends on the fixed grid
        working = registration_grid_voxels(image, spacing)
        moving = images.get("moving")
        if moving is not None:
            total += (moving.pixel_bytes + MOVING_BYTES_PER_VOXEL) * moving.voxels
        for role in ("fixed_mask", "moving_mask", "moving_labels", "fixed_labels"):
            extra = images.get(role)
            if extra is not None:  # read, and the propagated labels written, on the fixed grid
                total += 2 * extra.pixel_bytes * max(extra.voxels, voxels if role == "moving_labels" else 0)
        what, advice = f"the fixed image of {image.size_text} voxels", REGISTRATION_ADVICE
    total += WORKING_BYTES_PER_VOXEL[pipeline] * working
    return MemoryEstimate(float(total), image, what, int(working), advice)


# --------------------------------------------------------------------------------------------- available memory


def _from_environment() -> int | None:
    text = os.environ.get(AVAILABLE_MEMORY_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value * GB) if value >= 0 and math.isfinite(value) else None


def _linux_available() -> int | None:
    """MemAvailable (free + reclaimable cache), lowered to what a cgroup (container, systemd slice) still allows."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="ascii").strip()
        current = Path("/sys/fs/cgroup/memory.current").read_text(encoding="ascii").strip()
        if limit != "max" and available is not None:
            available = min(available, max(0, int(limit) - int(current)))
    except (OSError, ValueError):
        pass
    return available


def _windows_available() -> int | None:
    import ctypes

    class MemoryStatusEx(ctypes.Structure):
        _fields_: Sequence[tuple[str, Any]] = [
            ("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong), ("ullTotalPhys", ctypes.c_ulonglong),
            ("ullAvailPhys", ctypes.c_ulonglong), ("ullTotalPageFile", ctypes.c_ulonglong),
            ("ullAvailPageFile", ctypes.c_ulonglong), ("ullTotalVirtual", ctypes.c_ulonglong),
            ("ullAvailVirtual", ctypes.c_ulonglong), ("ullAvailExtendedVirtual", ctypes.c_ulonglong),
        ]

    status = MemoryStatusEx()
    status.dwLength = ctypes.sizeof(MemoryStatusEx)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
        return None
    return int(status.ullAvailPhys)


def _sysconf_available() -> int | None:
    """Free pages (Linux, BSD); where the system has no such figure (macOS) the installed memory: an upper bound,
    so only a run that could never fit is refused."""
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            count, page = os.sysconf(pages), os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            continue
        if count > 0 and page > 0:
            return int(count * page)
    return None


def available_memory_bytes() -> int | None:
    """Memory a new run can use now, in bytes (see the module docstring for the sources); None when unknown."""
    override = _from_environment()
    if override is not None:
        return override
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # not installed inside Slicer, or no answer on this system: the standard library's figures
        pass
    try:
        if sys.platform.startswith("linux"):
            return _linux_available()
        if sys.platform == "win32":
            return _windows_available()
        return _sysconf_available()
    except Exception:
        return None


def _windows_own_memory() -> int | None:
    import ctypes

    class ProcessMemoryCounters(ctypes.Structure):
        _fields_: Sequence[tuple[str, Any]] = [
            ("cb", ctypes.c_ulong), ("PageFaultCount", ctypes.c_ulong), ("PeakWorkingSetSize", ctypes.c_size_t),
            ("WorkingSetSize", ctypes.c_size_t), ("QuotaPeakPagedPoolUsage", ctypes.c_size_t),
            ("QuotaPagedPoolUsage", ctypes.c_size_t), ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
            ("QuotaNonPagedPoolUsage", ctypes.c_size_t), ("PagefileUsage", ctypes.c_size_t),
            ("PeakPagefileUsage", ctypes.c_size_t),
        ]

    counters = ProcessMemoryCounters()
    counters.cb = ctypes.sizeof(ProcessMemoryCounters)
    windll = ctypes.windll  # type: ignore[attr-defined]
    if not windll.psapi.GetProcessMemoryInfo(windll.kernel32.GetCurrentProcess(), ctypes.byref(counters),
                                             counters.cb):
        return None
    return int(counters.WorkingSetSize)


def own_memory_bytes() -> int:
    """Resident memory of this process now (0 when unknown). Why it matters: the check runs in the worker, which
    already holds Python, torch and the model, a part of the bound that needs no more memory."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        pass
    try:
        if sys.platform.startswith("linux"):
            resident_pages = int(Path("/proc/self/statm").read_text(encoding="ascii").split()[1])
            return resident_pages * os.sysconf("SC_PAGE_SIZE")
        if sys.platform == "win32":
            return _windows_own_memory() or 0
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # bytes on macOS (the peak so far)
    except Exception:
        return 0


def _gb(value: float) -> str:
    return f"{value / GB:.1f} GB"


def check_estimate(estimate: MemoryEstimate | None, available: int | None = None, in_use: int | None = None) -> None:
    """InputError, one sentence (how much, how much is available, what to do), when the estimate does not fit: when
    the memory still to be taken (the estimate less what this process holds already) exceeds what is available."""
    if estimate is None:
        return
    available = available_memory_bytes() if available is None else available
    if available is None:
        return
    in_use = own_memory_bytes() if in_use is None else in_use
    more = max(0.0, estimate.total_bytes - in_use)
    if more <= available:
        return
    raise InputError(
        f"This run on {estimate.what} needs about {_gb(more)} more memory ({_gb(estimate.total_bytes)} in all), "
        f"but only {_gb(available)} is available; {estimate.advice}."
    )


def estimate_files(pipeline: str, paths: Mapping[str, str | os.PathLike | None],
                   options: Mapping[str, Any] | None = None, model_bytes: int = 0,
                   working_spacing: float | None = None) -> MemoryEstimate | None:
    """The estimate for input files (role -> path), from their headers; None when a header cannot be read (the
    reader that follows says why, in its own sentence) or the pipeline has no bound."""
    infos = {}
    for role, path in paths.items():
        if path is None:
            continue
        info = read_image_info(path)
        if info is None:
            return None
        infos[role] = info
    return estimate(pipeline, infos, options, model_bytes, working_spacing)


def check_files(pipeline: str, paths: Mapping[str, str | os.PathLike | None],
                options: Mapping[str, Any] | None = None, model_bytes: int = 0,
                working_spacing: float | None = None) -> MemoryEstimate | None:
    """estimate_files, then InputError (one sentence) when the run does not fit in the memory available."""
    found = estimate_files(pipeline, paths, options, model_bytes, working_spacing)
    check_estimate(found)
    return found
