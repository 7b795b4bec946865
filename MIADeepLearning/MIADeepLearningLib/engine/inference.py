"""Windowed (sliding-window) inference of 3D networks, written for speed and memory.

Same window grid and blending as MONAI's ``sliding_window_inference`` so results can be compared voxel by voxel, with
what makes it cheaper (the network evaluations dominate the time; stitching costs little):

- windows whose input is entirely background are not run through the network; the network's output on one pure
  background window (computed once) is blended in their place, so labels stay those of MONAI (exactly so with the
  default threshold, the input minimum; a higher `background_threshold` treats near-background as pure background);
- on a CPU without native bf16, OpenVINO instead of PyTorch fp32 where it was checked to give the same labels or
  intensities and to be faster (engine/cpu_runtime.py); on a CPU with native bf16, bf16 autocast when a probe on the
  first windows shows that it keeps the labels (and is not slower); on CUDA, bf16 (or fp16) autocast and TF32;
- the stitching buffer is kept in ``output_dtype`` (fp16 by default) in slabs that are freed one by one while the
  float32 result is written, and the input is never copied or padded as a whole: the peak stays at or below MONAI's;
- on CUDA, out of memory falls back step by step: half the batch (down to 1), then stitching on the CPU, then the
  rest of the run on the CPU; each step is listed in ``InferenceReport.fallbacks``.

Documented tolerance against MONAI (same network): with ``autocast=False`` and the fp16 buffer, max abs difference
<= 2e-3 of the largest output magnitude and argmax labels equal on >= 99.9 % of voxels (all but near-ties); with
``output_dtype=torch.float32`` as well, float32 rounding (~1e-6). bf16 autocast (CPU) changes outputs by ~1e-2 and is
only kept when >= 99.9 % of the probed voxels keep their label.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from MIADeepLearningLib.engine import cpu_runtime, devices

ProgressCallback = Callable[[float], None]

PAD_VALUE = 0.0  # MONAI pads images smaller than the window with cval=0
# bf16 on the CPU is a candidate only with native bf16 (AVX512-BF16/AMX), where oneDNN runs 3D convolutions 2-4x
# faster than fp32 (Testing/Benchmarks/sliding_window.py); the probe then vetoes it if it measured clearly slower.
# Only a veto: on a busy machine one timing is noise (contention squeezed a real 2-4x to 1.0-1.2x here).
BF16_VETO_SPEEDUP = 0.8
LABEL_AGREEMENT = 0.999  # share of probe voxels that must keep their label under bf16
INTENSITY_TOLERANCE = 0.01  # intensity outputs: largest bf16 - fp32 difference allowed, as a share of the fp32 range
OUTPUT_KINDS = ("labels", "intensities")
FP16_SUM_LIMIT = 32768.0  # half of fp16's largest value: no weighted sum in an fp16 buffer may go beyond
FP16_MAX_OVERLAPPING = 27  # more windows per voxel (overlap > 0.5; 3 per axis where the last window is shifted
# back to fit the image) and an fp16 sum gets too coarse
STITCH_SLABS = 16  # the stitching buffer is cut into this many slabs along the first axis
DEVICE_STITCH_SHARE = 0.5  # "auto" stitches on the GPU when the buffer takes at most this share of its free memory
BLEND_MODES = ("gaussian", "constant")
STITCH_PLACES = ("auto", "cpu", "device")


@dataclass
class WindowedInferenceConfig:
    roi_size: tuple[int, int, int]  # a size <= 0 takes the whole image along that axis (as MONAI)
    overlap: float = 0.5
    mode: str = "gaussian"  # or "constant"
    sigma_scale: float = 0.125
    sw_batch_size: int | None = None  # None: from free memory (CUDA) / a CPU default
    skip_background: bool = True  # windows whose input is entirely background are not evaluated
    background_threshold: float | None = None  # input values <= this are background; None: the input minimum
    output_dtype: torch.dtype = torch.float16  # stitching buffer dtype for probabilities/logits where exact enough
    stitch_on_device: str = "auto"  # "auto" | "cpu" | "device"
    autocast: bool = True  # bf16/fp16 autocast on CUDA; on the CPU bf16 only where a probe shows it pays off
    output_kind: str = "labels"  # what the CPU bf16 probe protects: "labels" (argmax/thresholds) or "intensities"

    def __post_init__(self) -> None:
        """Refuse settings that would fail deep inside the run, with the setting's name."""
        roi = tuple(int(size) for size in self.roi_size)
        if len(roi) != 3:
            raise ValueError(f"roi_size must have 3 values, got {self.roi_size!r}.")
        self.roi_size = roi  # type: ignore[assignment]
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}.")
        if self.mode not in BLEND_MODES:
            raise ValueError(f"mode must be one of {BLEND_MODES}, got {self.mode!r}.")
        if not float(self.sigma_scale) > 0.0:
            raise ValueError(f"sigma_scale must be positive, got {self.sigma_scale}.")
        if self.sw_batch_size is not None and int(self.sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be >= 1 or None, got {self.sw_batch_size}.")
        if self.stitch_on_device not in STITCH_PLACES:
            raise ValueError(f"stitch_on_device must be one of {STITCH_PLACES}, got {self.stitch_on_device!r}.")
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}.")
        if not self.output_dtype.is_floating_point:
            raise ValueError(f"output_dtype must be a floating-point dtype, got {self.output_dtype}.")


@dataclass
class InferenceReport:
    device: str  # where the network ran at the end ("cpu" after the last fallback)
    sw_batch_size: int  # windows per network call at the end
    windows_total: int
    windows_evaluated: int  # windows of the grid run through the network (the others were background)
    seconds: float
    fallbacks: list[str] = field(default_factory=list)  # out-of-memory steps taken, in order
    precision: str = "float32"  # the network's compute precision: float32, or bfloat16/float16 autocast
    stitch_device: str = "cpu"  # where the blending buffer was at the end
    notes: list[str] = field(default_factory=list)  # decisions that are not fallbacks (bf16 probe, skipped windows)
    runtime: str = "pytorch"  # what ran the network: pytorch, or openvino <version> (engine/cpu_runtime.py)


# ---------------------------------------------------------------------------------------------- grid and weights


@dataclass(frozen=True)
class Window:
    """One window: its start in padded coordinates and the part of the (unpadded) image it covers."""

    start: tuple[int, ...]
    image_slices: tuple[slice, ...]  # the covered image region
    window_slices: tuple[slice, ...]  # the same region inside the window (all of it unless the image is padded)
    inside: bool  # no padding in this window


def resolve_roi(image_size: Sequence[int], roi_size: Sequence[int]) -> tuple[int, ...]:
    """Non-positive sizes take the image's size, as MONAI's fall_back_tuple."""
    return tuple(int(roi) if int(roi) > 0 else int(size) for size, roi in zip(image_size, roi_size))


def window_starts(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> list[list[int]]:
    """Window starts per axis in padded coordinates, by MONAI's rule (_get_scan_interval + dense_patch_slices), so the
    windows are the same as MONAI's for the same roi and overlap."""
    starts: list[list[int]] = []
    for size, roi in zip(image_size, roi_size):
        padded = max(int(size), int(roi))
        interval = roi if roi == padded else max(int(roi * (1 - overlap)), 1)
        count = next(d for d in range(-(-padded // interval)) if d * interval + roi >= padded) + 1
        starts.append([min(d * interval, padded - roi) for d in range(count)])
    return starts


def grid_windows(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> list[Window]:
    """All windows in MONAI's order (first axis slowest), with the image region each one covers."""
    pad_before = [max(roi - size, 0) // 2 for size, roi in zip(image_size, roi_size)]
    per_axis = []
    for axis, axis_starts in enumerate(window_starts(image_size, roi_size, overlap)):
        entries = []
        for start in axis_starts:
            low, high = start - pad_before[axis], start - pad_before[axis] + roi_size[axis]
            covered_low, covered_high = max(low, 0), min(high, image_size[axis])
            entries.append((start, slice(covered_low, covered_high),
                            slice(covered_low - low, covered_high - low), low >= 0 and high <= image_size[axis]))
        per_axis.append(entries)
    windows = []
    for first in per_axis[0]:
        for second in per_axis[1]:
            for third in per_axis[2]:
                parts = (first, second, third)
                windows.append(Window(tuple(p[0] for p in parts), tuple(p[1] for p in parts),
                                      tuple(p[2] for p in parts), all(p[3] for p in parts)))
    return windows


def importance_map(roi_size: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Blending weights of one window, float32, the same values as MONAI's compute_importance_map."""
    if mode == "constant":
        return torch.ones(tuple(roi_size), dtype=torch.float32, device=device)
    weights: torch.Tensor | None = None
    for axis, size in enumerate(roi_size):
        sigma = size * sigma_scale
        x = torch.arange(start=-(size - 1) / 2.0, end=(size - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        x = torch.exp(x**2 / (-2 * sigma**2))
        weights = x if axis == 0 else weights.unsqueeze(-1) * x[(None,) * axis]  # type: ignore[union-attr]
    assert weights is not None
    smallest = max(torch.min(weights).item(), 1e-3)  # MONAI clamps tiny corner weights
    return torch.clamp_(weights, min=smallest)


# ------------------------------------------------------------------------------------------------- stitching


class _Stitcher:
    """Weighted sums of window outputs (in `dtype`) and the sum of weights (float32), in slabs along the first axis.

    Why slabs: the float32 result replaces them one at a time, so an fp16 buffer never coexists with a whole float32
    copy. A float32 buffer on the CPU is the result itself (its slabs are views) and is normalised in place.
    """

    def __init__(self, channels: int, size: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        self.channels, self.size, self.dtype, self.device = channels, tuple(size), dtype, device
        thickness = max(1, -(-self.size[0] // STITCH_SLABS))
        self.bounds = [(low, min(low + thickness, self.size[0])) for low in range(0, self.size[0], thickness)]
        self.output: torch.Tensor | None = None  # the float32 CPU result, when the slabs are its views
        self._result: torch.Tensor | None = None  # the result finish() is writing otherwise
        self.slabs: list[torch.Tensor | None]
        if dtype == torch.float32 and device.type == "cpu":
            self.output = _normal_tensor(torch.zeros, (channels, *self.size))
            self.slabs = [self.output[:, low:high] for low, high in self.bounds]
        else:
            self.slabs = [torch.zeros((channels, high - low, *self.size[1:]), dtype=dtype, device=device)
                          for low, high in self.bounds]
        self.weights = torch.zeros(self.size, dtype=torch.float32, device=device)

    @staticmethod
    def nbytes(channels: int, size: Sequence[int], dtype: torch.dtype) -> int:
        voxels = 1
        for n in size:
            voxels *= int(n)
        return voxels * (channels * torch.empty((), dtype=dtype).element_size() + 4)

    def add(self, region: tuple[slice, ...], output: torch.Tensor, weight: torch.Tensor) -> None:
        """Adds output * weight for a (K, *region) output and its (*region) weights, fused (addcmul_: no temporary,
        and fast into fp16, unlike a mixed-dtype add_). Nothing is allocated once the inputs are on the buffer's
        device, so an out-of-memory error comes before the first write: a window is added or not."""
        output = output.to(self.device)
        weight = weight.to(self.device)
        x_low, x_high = region[0].start, region[0].stop
        for index, (low, high) in enumerate(self.bounds):
            start, stop = max(low, x_low), min(high, x_high)
            if start >= stop:
                continue
            slab = self.slabs[index]
            assert slab is not None
            slab[:, start - low:stop - low, region[1], region[2]].addcmul_(
                output[:, start - x_low:stop - x_low], weight[start - x_low:stop - x_low])
        self.weights[region].add_(weight)

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        """Moves or widens the buffer: to the CPU after a GPU out-of-memory error, to float32 when outputs are too
        large for fp16."""
        dtype = dtype or self.dtype
        if device == self.device and dtype == self.dtype:
            return
        if dtype == torch.float32 and device.type == "cpu" and self._result is None:
            output = _normal_tensor(torch.empty, (self.channels, *self.size))
            for index, (low, high) in enumerate(self.bounds):
                output[:, low:high].copy_(self.slabs[index])  # type: ignore[arg-type]
                self.slabs[index] = output[:, low:high]  # the old slab is freed here
            self.output = output
        else:
            self.slabs = [None if slab is None else slab.to(device=device, dtype=dtype) for slab in self.slabs]
            self.output = None
        self.weights = self.weights.to(device)
        self.device, self.dtype = device, dtype

    def finish(self) -> torch.Tensor:
        """(K, X, Y, Z) float32 on the CPU: weighted sums divided by the weights, slab by slab. Resumable: after an
        out-of-memory error on the GPU it carries on with the slabs not written yet."""
        if self.output is not None:  # the slabs are its views: divide in place, nothing allocated
            self.output.div_(self.weights)
            return self.output
        if self._result is None:
            self._result = _normal_tensor(torch.empty, (self.channels, *self.size))
        for index, (low, high) in enumerate(self.bounds):
            slab = self.slabs[index]
            if slab is None:
                continue
            target = self._result[:, low:high]
            if slab.device.type == "cpu":
                target.copy_(slab).div_(self.weights[low:high])
            else:
                target.copy_(slab.float().div_(self.weights[low:high]))
            self.slabs[index] = None  # frees this slab before the next one is converted
            del slab
        return self._result


def _normal_tensor(factory: Callable[..., torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 CPU tensor that callers may change in place after inference mode (not an inference tensor)."""
    with torch.inference_mode(False):
        return factory(shape, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------- the run


# network -> {(roi, batch, channels): (precision, note)}: the CPU bf16 decision, made once per network and window
_PRECISION_DECISIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cacheable(network: Any) -> bool:
    """Modules can key the decision cache (weakly referenced, hashed by identity); plain functions are probed anew."""
    return isinstance(network, torch.nn.Module)


def _is_cuda(device: torch.device) -> bool:
    """Whether the CUDA rules apply (autocast, memory sizing, out-of-memory fallbacks); tests replace this."""
    return device.type == "cuda"


def _release_cuda_memory(device: torch.device) -> None:
    """Returns cached blocks to the driver so the retry sees them free (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _forward(network: Any, batch: torch.Tensor, precision: torch.dtype | None, roi: tuple[int, ...]) -> torch.Tensor:
    """Network output as float32 (n, K, *roi); the first element of a tuple/list output (deep supervision)."""
    if precision is None:
        output = network(batch)
    else:
        with torch.autocast(batch.device.type, dtype=precision):
            output = network(batch)
    if isinstance(output, (list, tuple)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"The network returned {type(output).__name__}; windowed inference needs a tensor.")
    if output.ndim != 5 or output.shape[0] != batch.shape[0] or tuple(output.shape[2:]) != roi:
        raise ValueError(f"The network turned windows of {tuple(batch.shape)} into {tuple(output.shape)}; windowed "
                         "inference needs (batch, classes) + the window size.")
    return output.float()


def _labels_kept(low: torch.Tensor, full: torch.Tensor) -> float:
    """Share of voxels with the same label: argmax over classes, or for one channel both the logit (> 0) and the
    probability (> 0.5) threshold."""
    if full.shape[1] > 1:
        return (low.argmax(dim=1) == full.argmax(dim=1)).float().mean().item()
    same = ((low > 0) == (full > 0)) & ((low > 0.5) == (full > 0.5))
    return same.float().mean().item()


def _intensity_error(low: torch.Tensor, full: torch.Tensor) -> float:
    """Largest |bf16 - fp32| difference as a share of the fp32 output's range (regression outputs have no labels)."""
    spread = float(full.max() - full.min())
    return float((low - full).abs().max()) / max(spread, 1e-12)


def _precision_name(precision: torch.dtype | None) -> str:
    return "float32" if precision is None else str(precision).replace("torch.", "")


class _WindowedRun:
    """State of one call: which windows are done, the batch size, where the buffer lives, the fallbacks taken."""

    def __init__(self, network: Any, image: torch.Tensor, config: WindowedInferenceConfig, device: torch.device,
                 progress: ProgressCallback | None) -> None:
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise ValueError(f"image must be a (C, X, Y, Z) tensor, got {getattr(image, 'shape', type(image))}.")
        self.network, self.config, self.progress = network, config, progress
        self.fallbacks: list[str] = []
        self.notes: list[str] = []
        self.image = image if image.dtype == torch.float32 else image.float()
        self.device = device
        self.on_cuda = _is_cuda(device)
        self.size = tuple(int(n) for n in self.image.shape[1:])
        self.roi = resolve_roi(self.size, config.roi_size)
        self.windows = grid_windows(self.size, self.roi, float(config.overlap))
        self.weights_cpu = importance_map(self.roi, config.mode, float(config.sigma_scale))
        # most windows summed in one voxel: bounds the fp16 buffer's range and rounding
        overlapping = 1
        for axis_starts, roi in zip(window_starts(self.size, self.roi, float(config.overlap)), self.roi):
            overlapping *= max(sum(1 for other in axis_starts if other <= start < other + roi) for start in axis_starts)
        self.fp16_limit = FP16_SUM_LIMIT / overlapping
        self.output_dtype = config.output_dtype
        if self.output_dtype == torch.float16 and overlapping > FP16_MAX_OVERLAPPING:
            self.output_dtype = torch.float32
            self.notes.append(f"stitching in float32: up to {overlapping} windows overlap in a voxel, too many to sum "
                              "in fp16")
        self._weights_on: dict[torch.device, torch.Tensor] = {}
        self._last_progress = -1.0

        self.background_fill = self.image.amin(dim=(1, 2, 3))  # per channel: what a pure background window holds
        self.foreground, self.background = self._split_background()
        self.next_foreground = 0
        self.next_background = 0
        self.background_output: torch.Tensor | None = None

        self.batch: int | None = config.sw_batch_size  # None on CUDA: one window is measured first
        if self.batch is None and not (self.on_cuda and device.type == "cuda"):
            self.batch = devices.sw_batch_size_for(device, self.roi, self.image.shape[0])
        self.precision: torch.dtype | None = None
        self.probe_pending = False
        self.call = self._network_call()
        self._choose_precision()
        self.stitcher: _Stitcher | None = None
        self.stitching_on_device = False  # the buffer is on the (CUDA) device, so moving it can free memory
        self.cpu_stitching_only = not self.on_cuda or config.stitch_on_device == "cpu"

    # ------------------------------------------------------------------------------------------ decisions
    def _split_background(self) -> tuple[list[Window], list[Window]]:
        """Foreground windows (centre-most first: the bf16 probe should see the object) and background windows."""
        if not self.config.skip_background:
            foreground, background = list(self.windows), []
        else:
            if self.config.background_threshold is None:
                thresholds = self.background_fill
            else:
                thresholds = torch.full_like(self.background_fill, float(self.config.background_threshold))
            thresholds = thresholds.view(-1, 1, 1, 1)
            # padded voxels hold PAD_VALUE: background only where that is the fill value, so the window stays pure
            pad_is_background = bool((self.background_fill == PAD_VALUE).all())
            foreground, background = [], []
            for window in self.windows:
                region = self.image[(slice(None), *window.image_slices)]
                pure = (window.inside or pad_is_background) and not bool((region > thresholds).any())
                (background if pure else foreground).append(window)
        if foreground:
            centre = [size / 2.0 for size in self.size]

            def distance(window: Window) -> float:
                return sum(((s.start + s.stop) / 2.0 - c) ** 2 for s, c in zip(window.image_slices, centre))

            first = min(range(len(foreground)), key=lambda index: distance(foreground[index]))
            foreground.insert(0, foreground.pop(first))
        return foreground, background

    def _network_call(self) -> Any:
        """What runs the network: on the CPU a runner that may use OpenVINO (checked against PyTorch fp32 first),
        on CUDA the network itself."""
        if self.on_cuda:
            return self.network
        kind = "intensities" if self.config.output_kind == "intensities" else "labels"
        return cpu_runtime.runner(self.network, self.device, kind)

    def _choose_precision(self) -> None:
        """CUDA: autocast in bf16/fp16. CPU: bf16 is only a candidate, decided by a probe on the first windows, and
        only where the CPU runtime is PyTorch (OpenVINO's own check compares against fp32)."""
        self.precision, self.probe_pending = None, False
        if not self.config.autocast:
            return
        if isinstance(self.call, cpu_runtime.NetworkRunner) and not (
                self.call.decided and self.call.accelerated is None):
            return
        candidate = devices.autocast_dtype(self.device)
        if candidate is None:
            return
        if self.on_cuda:
            self.precision = candidate
        else:
            self.probe_pending = True

    def _weights(self, device: torch.device) -> torch.Tensor:
        if device not in self._weights_on:
            self._weights_on[device] = self.weights_cpu.to(device)
        return self._weights_on[device]

    def _ensure_stitcher(self, channels: int) -> None:
        """The blending buffer, on the GPU when asked for or ("auto") when it takes at most half of the free memory;
        if allocating it there fails, on the CPU."""
        if self.stitcher is not None:
            if self.stitcher.channels != channels:
                raise ValueError(f"The network gave {channels} output channels after {self.stitcher.channels}.")
            return
        dtype, cpu = self.output_dtype, torch.device("cpu")
        on_device = not self.cpu_stitching_only
        if on_device and self.config.stitch_on_device == "auto":
            needed = _Stitcher.nbytes(channels, self.size, dtype)
            free = devices.free_memory_bytes(self.device)
            on_device = free is not None and needed <= DEVICE_STITCH_SHARE * free
            if not on_device:
                self.notes.append(f"stitching on the CPU: the {needed / 2**30:.2f} GiB blending buffer would take "
                                  f"more than {DEVICE_STITCH_SHARE:.0%} of the GPU's free memory")
        if on_device:
            try:
                self.stitcher = _Stitcher(channels, self.size, dtype, self.device)
                self.stitching_on_device = True
                return
            except Exception as error:
                if not devices.is_out_of_memory(error):
                    raise
            _release_cuda_memory(self.device)
            self.fallbacks.append("GPU out of memory: stitching moved to the CPU")
        self.cpu_stitching_only = True
        self.stitcher = _Stitcher(channels, self.size, dtype, cpu)

    # --------------------------------------------------------------------------------------------- steps
    def _gather(self, windows: Sequence[Window]) -> torch.Tensor:
        """(n, C, *roi) window batch on the device; only windows are copied (and padded), never the whole input."""
        batch = torch.empty((len(windows), self.image.shape[0], *self.roi), dtype=torch.float32,
                            device=self.image.device)
        for index, window in enumerate(windows):
            source = self.image[(slice(None), *window.image_slices)]
            if window.inside:
                batch[index].copy_(source)
            else:
                batch[index].fill_(PAD_VALUE)
                batch[index][(slice(None), *window.window_slices)].copy_(source)
        return batch.to(self.device)

    def _predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Float32 outputs of a batch; the first CPU batch also decides bf16 against fp32."""
        if self.probe_pending:
            return self._probe(batch)
        return _forward(self.call, batch, self.precision, self.roi)

    def _probe(self, batch: torch.Tensor) -> torch.Tensor:
        """Runs the first batch in fp32 (the output blended) and in bf16, and keeps bf16 if the labels stay (>= 99.9 %
        of voxels) and it was not clearly slower (process CPU time, less distorted by other processes than wall
        time; fp32 runs first and takes the process's one-off warm-up). The decision is kept for later runs of the
        same network and window size (a warm worker pays for the probe once)."""
        self.probe_pending = False
        key = (self.roi, batch.shape[0], batch.shape[1])
        decided = _PRECISION_DECISIONS.get(self.network, {}).get(key) if _cacheable(self.network) else None
        if decided is not None:
            self.precision, note = decided
            self.notes.append(note + " (decided on an earlier run)")
            return _forward(self.call, batch, self.precision, self.roi)
        started = time.process_time()
        full = _forward(self.call, batch, None, self.roi)
        full_seconds = time.process_time() - started
        started = time.process_time()
        low = _forward(self.call, batch, torch.bfloat16, self.roi)
        low_seconds = time.process_time() - started
        speedup = full_seconds / max(low_seconds, 1e-6)
        if self.config.output_kind == "intensities":
            error = _intensity_error(low, full)
            accurate = error <= INTENSITY_TOLERANCE
            accuracy = f"its largest difference from fp32 on the first windows is {error:.2%} of the output range"
            needed = f"needs <= {INTENSITY_TOLERANCE:.0%}"
        else:
            kept = _labels_kept(low, full)
            accurate = kept >= LABEL_AGREEMENT
            accuracy = f"{kept:.3%} of the first windows' voxels keep their label"
            needed = f"needs {LABEL_AGREEMENT:.1%}"
        del low
        if speedup >= BF16_VETO_SPEEDUP and accurate:
            self.precision = torch.bfloat16
            note = (f"bf16 autocast on the CPU (native bf16): {accuracy}; {speedup:.1f}x as fast as fp32 there in "
                    "CPU time, first call included")
        else:
            note = (f"fp32 on the CPU: under bf16 autocast {accuracy} ({needed}) at {speedup:.1f}x the speed of fp32 "
                    f"(needs {BF16_VETO_SPEEDUP}x)")
        self.notes.append(note)
        if _cacheable(self.network):
            _PRECISION_DECISIONS.setdefault(self.network, {})[key] = (self.precision, note)
        return full

    def _add(self, window: Window, output: torch.Tensor) -> None:
        """Blends one window's float32 output (K, *roi) into the buffer."""
        assert self.stitcher is not None
        weights = self._weights(output.device)
        if window.inside:
            self.stitcher.add(window.image_slices, output, weights)
        else:
            self.stitcher.add(window.image_slices, output[(slice(None), *window.window_slices)],
                              weights[window.window_slices])

    def _check_range(self, outputs: torch.Tensor) -> None:
        """Widens an fp16 buffer to float32 before outputs this large could overflow it once summed."""
        if self.stitcher is None or self.stitcher.dtype != torch.float16:
            return
        low, high = torch.aminmax(outputs)
        if max(-float(low), float(high)) > self.fp16_limit:
            self.stitcher.to(self.stitcher.device, torch.float32)
            self.notes.append(f"stitching in float32: outputs reach {max(-float(low), float(high)):.3g}, too large "
                              "for an fp16 sum")

    def _foreground_step(self) -> None:
        """Evaluates and blends the next batch of foreground windows (on CUDA with an automatic batch size, the first
        window alone, measured, to size the batch from the free memory)."""
        measure = self.batch is None
        count = 1 if self.batch is None else min(self.batch, len(self.foreground) - self.next_foreground)
        windows = self.foreground[self.next_foreground:self.next_foreground + count]
        batch = self._gather(windows)
        before = 0
        if measure:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        outputs = self._predict(batch)
        del batch
        per_window = int(1.25 * (torch.cuda.max_memory_allocated(self.device) - before)) if measure else 0
        self._ensure_stitcher(outputs.shape[1])
        self._check_range(outputs)
        for index, window in enumerate(windows):
            self._add(window, outputs[index])
            self.next_foreground += 1
        if measure:
            self.batch = devices.sw_batch_size_for(self.device, self.roi, self.image.shape[0], outputs.shape[1],
                                                   bytes_per_window=per_window)
            self.notes.append(f"{per_window / 2**20:.0f} MiB per window measured on the GPU: batches of {self.batch}")

    def _background_step(self) -> None:
        """Blends every background window with the network's output on one pure background window."""
        if self.background_output is None:
            window = self.background_fill.view(1, -1, 1, 1, 1).expand(1, -1, *self.roi).contiguous()
            outputs = self._predict(window.to(self.device))
            self._ensure_stitcher(outputs.shape[1])
            self._check_range(outputs)
            assert self.stitcher is not None
            self.background_output = outputs[0].to(self.stitcher.device)
        assert self.stitcher is not None
        while self.next_background < len(self.background):
            # windows with padding are here only when the padding equals the fill: still pure background
            self._add(self.background[self.next_background], self.background_output)
            self.next_background += 1

    # ------------------------------------------------------------------------------------------ fallbacks
    def _attempt(self, step: Callable[[], Any], batch_matters: bool = True) -> Any:
        """Runs a step; a GPU out-of-memory error takes the next fallback and the step is retried. The fallback runs
        outside the `except` block, so the failed step's tensors (held by the traceback) are already freed."""
        while True:
            try:
                return step()
            except Exception as error:
                if not (self.on_cuda and devices.is_out_of_memory(error)) or not self._next_fallback(batch_matters):
                    raise
            self._fall_back(self._next_fallback(batch_matters))

    def _next_fallback(self, batch_matters: bool) -> str:
        """"batch", "stitching", "cpu", or "" when nothing is left (the error is raised)."""
        if batch_matters and (self.batch or 1) > 1:
            return "batch"
        if self.stitching_on_device:
            return "stitching"
        if hasattr(self.network, "to"):
            return "cpu"
        return ""

    def _fall_back(self, kind: str) -> None:
        """Half the batch (down to 1) -> stitching on the CPU -> the rest of the run on the CPU."""
        _release_cuda_memory(self.device)
        cpu = torch.device("cpu")
        if kind == "batch":
            smaller = max(1, int(self.batch or 1) // 2)
            self.fallbacks.append(f"GPU out of memory: batch {self.batch} -> {smaller}")
            self.batch = smaller
            return
        self.cpu_stitching_only, self.stitching_on_device = True, False
        if self.stitcher is not None:
            self.stitcher.to(cpu)
        if self.background_output is not None:
            self.background_output = self.background_output.to(cpu)
        if kind == "stitching":
            self.fallbacks.append("GPU out of memory: stitching moved to the CPU")
            _release_cuda_memory(self.device)
            return
        self.network.to(cpu)
        _release_cuda_memory(self.device)
        self.device, self.on_cuda = cpu, False
        if self.config.sw_batch_size is None:
            self.batch = devices.sw_batch_size_for(cpu, self.roi, self.image.shape[0])
        self.batch = self.batch or 1
        self.call = self._network_call()
        self._choose_precision()
        self.fallbacks.append("GPU out of memory: ran on the CPU")

    # ------------------------------------------------------------------------------------------------ run
    def _report(self, fraction: float) -> None:
        fraction = min(max(fraction, self._last_progress), 1.0)
        if self.progress is not None and fraction > self._last_progress:
            self.progress(fraction)
        self._last_progress = fraction

    def run(self) -> tuple[torch.Tensor, InferenceReport]:
        started = time.perf_counter()
        if self.on_cuda:
            devices.configure_cuda(self.device)
        with torch.inference_mode():
            self._report(0.0)
            while self.next_foreground < len(self.foreground):
                self._attempt(self._foreground_step)
                self._report(0.97 * self.next_foreground / len(self.foreground))
            if self.background:
                self._attempt(self._background_step, batch_matters=False)
                self.notes.append(f"{len(self.background)} of {len(self.windows)} windows were background: blended "
                                  "with the network's output on one background window")
            assert self.stitcher is not None
            output = self._attempt(self.stitcher_finish, batch_matters=False)
        self._report(1.0)
        runtime = "pytorch"
        if isinstance(self.call, cpu_runtime.NetworkRunner):
            runtime = self.call.runtime
            self.notes.append(self.call.note)
        report = InferenceReport(
            device=str(self.device), sw_batch_size=int(self.batch or 1), windows_total=len(self.windows),
            windows_evaluated=len(self.foreground), seconds=time.perf_counter() - started, fallbacks=self.fallbacks,
            precision=_precision_name(self.precision), stitch_device=str(self.stitcher.device), notes=self.notes,
            runtime=runtime)
        return output, report

    def stitcher_finish(self) -> torch.Tensor:
        assert self.stitcher is not None
        return self.stitcher.finish()


def pad_to_multiple(volume: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Replicate-pad (C, D, H, W) at the far ends so every spatial size is a multiple (a U-Net's downsampling needs
    it); returns the padded volume and the original size, to crop the output back."""
    size = tuple(int(n) for n in volume.shape[1:])
    padding: list[int] = []
    for n in reversed(size):
        padding.extend([0, (-n) % multiple])
    if any(padding):
        volume = torch.nn.functional.pad(volume[None], padding, mode="replicate")[0]
    return volume, size


def sliding_window_predict(network: Any, image: torch.Tensor, config: WindowedInferenceConfig, device: torch.device,
                           progress: ProgressCallback | None = None) -> tuple[torch.Tensor, InferenceReport]:
    """image (C, X, Y, Z) on the CPU -> network output blended over windows, (K, X, Y, Z) float32 on the CPU,
    matching monai.inferers.sliding_window_inference(image[None], roi_size, sw_batch_size, network, overlap, mode)[0]
    up to the documented tolerance; with an OOM-fallback chain on CUDA: smaller sw batch -> CPU stitching -> CPU.

    The network must already be on `device`; after the last fallback it is left on the CPU (the report says so).
    `progress` gets fractions in [0, 1], non-decreasing, ending with 1.0.
    """
    return _WindowedRun(network, image, config, torch.device(device), progress).run()
