"""The part of a volume that holds the head: networks need not run over the air around it.

A 1 mm 256³ field of view is often half air. Running a network only over the foreground's bounding box (plus a
margin as wide as what the network looks at) gives about the same answer inside the head in less time: exactly the
same for a convolutional network when one window covers the box, slightly different where window seams fall
elsewhere or where normalisation layers (InstanceNorm) see other statistics. The caller fills the rest with what
the network gives on air (background for a segmenter, the input itself for a residual restoration network).

Windowed inference works in whole windows, so a smaller box only saves time where it needs fewer or smaller windows
(`windowed_work`); a pipeline crops only then, because a crop that saves nothing can still change the result a
little (InstanceNorm statistics and window positions depend on the box).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from MIADeepLearningLib.engine.errors import ModelError
from MIADeepLearningLib.engine.inference import window_starts

POOL = 4  # the foreground is found on 4x4x4 block means: air noise averages out, and it is 64x fewer values
FOREGROUND_FRACTION = 0.1  # a block is foreground above this share of the way from the minimum to the 99.5th pct
WORTH_CROPPING = 0.85  # a box with more than this share of the volume's voxels is not worth cropping to
MIN_SAVING = 0.1  # a pipeline crops only when the windows it runs shrink by at least this share
OPTION = "crop_to_head"  # the package / run option that switches cropping off (false: the whole field of view)


def _block_means(volume: np.ndarray, pool: int) -> np.ndarray:
    """Means over pool³ blocks (the last partial block of each axis included, averaged over what it has)."""
    padded_shape = [-(-n // pool) * pool for n in volume.shape]
    padding = [(0, p - n) for n, p in zip(volume.shape, padded_shape)]
    data = np.pad(volume.astype(np.float32, copy=False), padding, mode="edge")
    blocks = data.reshape(padded_shape[0] // pool, pool, padded_shape[1] // pool, pool, padded_shape[2] // pool, pool)
    return blocks.mean(axis=(1, 3, 5))


def _without_isolated_blocks(inside: np.ndarray) -> np.ndarray:
    """`inside` less the blocks none of whose 26 neighbours is foreground. Why: one hot voxel (a spike, a fiducial
    speck in the air) lights a single block and would otherwise stretch the box across the field of view; anything a
    network should see spans more than one block."""
    padded = np.pad(inside, 1)
    neighbours = np.zeros(inside.shape, np.uint8)
    for dz, dy, dx in itertools.product(range(3), repeat=3):
        if (dz, dy, dx) != (1, 1, 1):
            neighbours += padded[dz:dz + inside.shape[0], dy:dy + inside.shape[1], dx:dx + inside.shape[2]]
    return inside & (neighbours > 0)


def foreground_box(volume: np.ndarray, margin: int, multiple: int = 1, pool: int = POOL,
                   fraction: float = FOREGROUND_FRACTION) -> tuple[slice, ...] | None:
    """Index slices (one per axis) of the box around the volume's foreground, grown by `margin` voxels on every
    side, each starting on a multiple of `multiple` and as long as one unless it reaches the end of its axis
    (_grow_to_multiple); None when there is nothing to gain
    (the box would cover more than WORTH_CROPPING of the volume, or no foreground was found).

    Foreground: pool³ block means above `fraction` of the way from the volume's minimum to its 99.5th percentile
    (robust to a few hot voxels; air noise averages out in the blocks), less isolated blocks (a lone hot voxel).
    Every other foreground block is kept, so two separate objects give one box around both: cropping never cuts off
    anything a block wide or more."""
    data = np.asarray(volume)
    if data.ndim != 3 or min(data.shape) < 1:
        raise ValueError(f"foreground_box needs a 3D volume, got shape {data.shape}.")
    means = _block_means(data, pool)
    low = float(means.min())
    high = float(np.percentile(means, 99.5))
    if not high > low:
        return None
    inside = _without_isolated_blocks(means > low + fraction * (high - low))
    if not inside.any():
        return None
    box = []
    for axis, size in enumerate(data.shape):
        others = tuple(index for index in range(3) if index != axis)
        hits = np.flatnonzero(inside.any(axis=others))
        start = max(0, int(hits[0]) * pool - margin)
        stop = min(size, (int(hits[-1]) + 1) * pool + margin)
        start, stop = _grow_to_multiple(start, stop, size, multiple)
        box.append(slice(start, stop))
    kept = np.prod([s.stop - s.start for s in box]) / float(np.prod(data.shape))
    return None if kept > WORTH_CROPPING else tuple(box)


def _grow_to_multiple(start: int, stop: int, size: int, multiple: int) -> tuple[int, int]:
    """[start, stop) grown to start on a multiple of `multiple` and to a length that is one, or to the axis's end.

    Why aligned starts: a U-Net downsamples on a grid fixed to its input's first voxel; a box that starts on a
    multiple of its size multiple is downsampled on the same voxels as the whole volume (whose windows all start on
    such multiples); another phase would change the network's output everywhere a little. A box that reaches the end
    of an axis stops there: the pipeline pads that end exactly as it pads the whole volume."""
    multiple = max(1, int(multiple))
    start = start // multiple * multiple
    stop = min(size, start + -(-(stop - start) // multiple) * multiple)
    return start, stop


def box_volume_share(box: Sequence[slice] | None, shape: Sequence[int]) -> float:
    """Share of the volume's voxels inside `box` (1.0 for None: no crop)."""
    if box is None:
        return 1.0
    return float(np.prod([s.stop - s.start for s in box]) / float(np.prod(list(shape))))


def describe_box(box: Sequence[slice] | None, shape: Sequence[int]) -> str:
    """For provenance: 'network over 96x112x104 of 128x128x128 voxels (49 %)' or 'network over the whole volume'."""
    if box is None:
        return "network over the whole volume"
    size = "x".join(str(s.stop - s.start) for s in box)
    return (f"network over {size} of {'x'.join(str(int(n)) for n in shape)} voxels "
            f"({box_volume_share(box, shape):.0%}): the head's box")


def unet_reach(size_multiple: int) -> int:
    """How far (voxels) the project's U-Nets (networks._UNetBody: two 3³ convolutions a level, size_multiple =
    2 ** (levels - 1)) look from an output voxel: 6 * size_multiple - 4, measured by gradients (2, 8, 20, 44 for 1-4
    levels; e.g. the shipped 3-level synthesis network sees voxels 19 away). A margin this wide keeps what the network
    gives inside the head independent of where the box ends."""
    return 6 * max(1, int(size_multiple)) - 4


def windowed_work(shape: Sequence[int], roi_size: int, overlap: float, multiple: int = 1) -> int:
    """Voxels the network computes over a volume of `shape` (padded to `multiple`) in windows of at most `roi_size`
    (each clipped to the volume, as the pipelines do) at the window positions sliding_window_predict uses."""
    step = max(1, int(multiple))
    padded = [-(-int(size) // step) * step for size in shape]
    roi = [min(int(roi_size), size) for size in padded]
    return int(np.prod([len(starts) * size for starts, size in zip(window_starts(padded, roi, overlap), roi)]))


def worth_it(box: Sequence[slice] | None, shape: Sequence[int], roi_size: int, overlap: float,
             multiple: int = 1) -> bool:
    """Whether running the network over `box` saves at least MIN_SAVING of the windowed work over `shape`."""
    if box is None:
        return False
    cropped = [s.stop - s.start for s in box]
    return windowed_work(cropped, roi_size, overlap, multiple) <= (1.0 - MIN_SAVING) * windowed_work(
        shape, roi_size, overlap, multiple)


def crop_option(options: Mapping[str, Any], title: str) -> bool:
    """The option crop_to_head checked: true (the default) or false; anything else is refused, because a typo such
    as "no" would otherwise silently keep cropping."""
    value = options.get(OPTION, True)
    if not isinstance(value, bool):
        raise ModelError(f"Model '{title}': option {OPTION} must be true or false, got {value!r}.")
    return value
