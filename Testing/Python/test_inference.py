"""Windowed inference (engine.inference) against MONAI's sliding_window_inference, background skipping, progress,
the bf16 decision on the CPU, and the CUDA out-of-memory fallback chain simulated on the CPU."""

from __future__ import annotations

import time

import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from monai.networks.nets import UNet

from MIADeepLearningLib.engine import devices, inference
from MIADeepLearningLib.engine.inference import WindowedInferenceConfig, sliding_window_predict

CPU = torch.device("cpu")
LABELS_SAME = 0.999  # share of voxels whose argmax label must equal MONAI's
FP16_BUFFER_TOLERANCE = 2e-3  # max abs difference relative to the largest output, fp16 blending buffer


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    """A small 3D U-Net, 2 input channels, 3 classes, random but fixed weights."""
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=2, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=1).eval()


def _image(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator)


def _monai(network, image: torch.Tensor, roi, overlap: float, mode: str, sw_batch_size: int = 2) -> torch.Tensor:
    with torch.inference_mode():
        return sliding_window_inference(image[None], roi, sw_batch_size, network, overlap, mode)[0]


def _labels_same(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(0) == b.argmax(0)).float().mean().item()


def _config(roi, **options) -> WindowedInferenceConfig:
    options.setdefault("autocast", False)  # the exact comparisons run in fp32; bf16 has its own tests
    return WindowedInferenceConfig(roi_size=roi, **options)


# ------------------------------------------------------------------------------------------ grid and weights


@pytest.mark.parametrize("size,roi,overlap", [
    ((37, 45, 29), (24, 24, 24), 0.5), ((192, 192, 128), (96, 96, 96), 0.25), ((17, 40, 11), (24, 24, 16), 0.25),
    ((96, 97, 95), (96, 96, 96), 0.5), ((50, 50, 50), (16, 24, 32), 0.0), ((31, 33, 35), (8, 8, 8), 0.9),
])
def test_window_grid_is_monais(size, roi, overlap):
    padded = tuple(max(s, r) for s, r in zip(size, roi))
    interval = _get_scan_interval(padded, roi, 3, (overlap,) * 3)
    expected = [tuple(s.start for s in window) for window in dense_patch_slices(padded, roi, interval)]
    assert [window.start for window in inference.grid_windows(size, roi, overlap)] == expected


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_importance_map_is_monais(mode):
    expected = compute_importance_map((24, 20, 16), mode=mode, sigma_scale=0.125)
    assert torch.equal(inference.importance_map((24, 20, 16), mode, 0.125), expected)


# --------------------------------------------------------------------------------------- equality with MONAI


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
@pytest.mark.parametrize("shape,roi", [
    ((2, 37, 45, 29), (24, 24, 24)),  # larger than the window, odd sizes
    ((2, 17, 40, 11), (24, 24, 16)),  # smaller than the window along two axes: padded
    ((2, 9, 13, 7), (16, 16, 16)),  # smaller along every axis: one padded window
])
def test_same_result_as_monai(net, shape, roi, overlap, mode):
    image = _image(shape)
    expected = _monai(net, image, roi, overlap, mode)
    output, report = sliding_window_predict(net, image, _config(roi, overlap=overlap, mode=mode), CPU)
    assert output.shape == expected.shape and output.dtype == torch.float32 and output.device == CPU
    assert (output - expected).abs().max() <= FP16_BUFFER_TOLERANCE * expected.abs().max()
    assert _labels_same(output, expected) >= LABELS_SAME
    assert report.windows_evaluated == report.windows_total == len(inference.grid_windows(shape[1:], roi, overlap))
    assert report.device == "cpu" and report.fallbacks == [] and report.precision == "float32"

    exact, _ = sliding_window_predict(net, image, _config(roi, overlap=overlap, mode=mode,
                                                          output_dtype=torch.float32), CPU)
    torch.testing.assert_close(exact, expected, rtol=1e-5, atol=1e-5)


def test_output_is_an_ordinary_tensor_the_caller_can_modify(net):
    for dtype in (torch.float16, torch.float32):
        output, _ = sliding_window_predict(net, _image((2, 20, 20, 20)), _config((16, 16, 16), output_dtype=dtype),
                                           CPU)
        assert not output.is_inference()
        output.mul_(2.0)  # would raise for an inference tensor


def test_roi_sizes_not_above_zero_take_the_whole_axis(net):
    image = _image((2, 20, 12, 16))
    output, report = sliding_window_predict(net, image, _config((8, 0, -1), output_dtype=torch.float32), CPU)
    torch.testing.assert_close(output, _monai(net, image, (8, 0, -1), 0.5, "gaussian"), rtol=1e-5, atol=1e-5)
    assert report.windows_total == 4  # 20 along x in windows of 8 at overlap 0.5; one window along y and z


def test_outputs_too_large_for_fp16_are_blended_in_float32():
    def loud(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([batch[:, :1] * 1e5, -batch[:, :1] * 1e5], dim=1)

    image = _image((1, 30, 30, 30))
    output, report = sliding_window_predict(loud, image, _config((16, 16, 16)), CPU)
    expected = _monai(loud, image, (16, 16, 16), 0.5, "gaussian")
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1.0)
    assert any("float32" in note for note in report.notes)


def test_many_overlapping_windows_are_blended_in_float32(net):
    image = _image((2, 30, 30, 30))
    output, report = sliding_window_predict(net, image, _config((16, 16, 16), overlap=0.8), CPU)
    assert any("too many to sum in fp16" in note for note in report.notes)
    torch.testing.assert_close(output, _monai(net, image, (16, 16, 16), 0.8, "gaussian"), rtol=1e-5, atol=1e-5)


def test_a_network_that_changes_the_window_size_is_refused():
    with pytest.raises(ValueError, match="window size"):
        sliding_window_predict(lambda batch: batch[:, :, ::2], _image((1, 20, 20, 20)), _config((16, 16, 16)), CPU)


@pytest.mark.parametrize("options,word", [
    ({"roi_size": (16, 16)}, "roi_size"), ({"overlap": 1.0}, "overlap"), ({"mode": "median"}, "mode"),
    ({"sw_batch_size": 0}, "sw_batch_size"), ({"stitch_on_device": "gpu"}, "stitch_on_device"),
    ({"output_dtype": torch.int16}, "output_dtype"), ({"sigma_scale": 0.0}, "sigma_scale"),
])
def test_bad_settings_are_refused_by_name(options, word):
    settings = {"roi_size": (16, 16, 16), **options}
    with pytest.raises(ValueError, match=word):
        WindowedInferenceConfig(**settings)


# ------------------------------------------------------------------------------------------- background skipping


def _body_in_air(shape=(2, 64, 60, 40)) -> torch.Tensor:
    """A small 'body' in the middle of a large constant background (the image minimum)."""
    image = torch.full(shape, -1.0)
    image[:, 24:40, 22:38, 14:26] = _image((shape[0], 16, 16, 12), seed=3).abs()  # above the background
    return image


@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_background_windows_are_skipped_and_labels_stay_monais(net, overlap):
    image = _body_in_air()
    roi = (16, 16, 16)
    expected = _monai(net, image, roi, overlap, "gaussian")
    output, report = sliding_window_predict(net, image, _config(roi, overlap=overlap, output_dtype=torch.float32), CPU)
    assert report.windows_evaluated < report.windows_total / 2
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    assert any("background" in note for note in report.notes)

    zero_background = net(torch.full((1, 2, *roi), -1.0)).abs().max()
    assert zero_background > 0.01  # the network's background output is not zero: blending zeros would be wrong


def test_background_skipping_keeps_labels_with_the_fp16_buffer(net):
    image = _body_in_air()
    expected = _monai(net, image, (16, 16, 16), 0.5, "gaussian")
    output, _ = sliding_window_predict(net, image, _config((16, 16, 16)), CPU)
    assert _labels_same(output, expected) >= LABELS_SAME


def test_padded_windows_are_evaluated_when_the_padding_is_not_background(net):
    image = torch.full((2, 10, 40, 12), 1.0)  # background 1.0, padding 0.0: padded windows are not pure
    image[:, 3:7, 18:24, 4:8] = 5.0
    output, report = sliding_window_predict(net, image, _config((16, 16, 16), output_dtype=torch.float32), CPU)
    torch.testing.assert_close(output, _monai(net, image, (16, 16, 16), 0.5, "gaussian"), rtol=1e-5, atol=1e-5)
    assert report.windows_evaluated == report.windows_total


def test_an_all_background_image_needs_one_evaluation(net):
    calls = []

    def counted(batch):
        calls.append(batch.shape[0])
        return net(batch)

    image = torch.zeros((2, 40, 40, 40))
    output, report = sliding_window_predict(counted, image, _config((16, 16, 16), output_dtype=torch.float32), CPU)
    assert report.windows_evaluated == 0 and calls == [1]
    torch.testing.assert_close(output, _monai(net, image, (16, 16, 16), 0.5, "gaussian"), rtol=1e-5, atol=1e-5)


def test_skip_background_off_evaluates_every_window(net):
    _, report = sliding_window_predict(net, _body_in_air(), _config((16, 16, 16), skip_background=False), CPU)
    assert report.windows_evaluated == report.windows_total


# --------------------------------------------------------------------------------------------------- progress


def test_progress_rises_to_one(net):
    seen: list[float] = []
    sliding_window_predict(net, _image((2, 40, 37, 30)), _config((16, 16, 16), sw_batch_size=3), CPU, seen.append)
    assert len(seen) >= 4
    assert seen[0] == 0.0 and seen[-1] == 1.0
    assert all(later > earlier for earlier, later in zip(seen, seen[1:]))


# ------------------------------------------------------------------------------------------- bf16 on the CPU


def _busy(seconds: float) -> None:
    """Spends CPU time (the bf16 probe measures process CPU time, which sleeping would not use)."""
    started = time.process_time()
    while time.process_time() - started < seconds:
        pass


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled()


class _PrecisionAware(torch.nn.Module):
    """Wraps a network: under CPU autocast it runs `low` (a stand-in for bf16), otherwise the fp32 network slowly."""

    def __init__(self, network, low, fp32_delay: float) -> None:
        super().__init__()
        self.network, self.low, self.fp32_delay = network, low, fp32_delay
        self.calls: list[str] = []

    def forward(self, batch):
        if _cpu_autocast_enabled():
            self.calls.append("bf16")
            with torch.autocast("cpu", enabled=False):
                return self.low(batch)
        self.calls.append("fp32")
        _busy(self.fp32_delay)
        return self.network(batch)


def test_bf16_is_used_on_the_cpu_when_faster_and_labels_are_kept(net, monkeypatch):
    monkeypatch.setattr(devices, "autocast_dtype", lambda device: torch.bfloat16)
    wrapped = _PrecisionAware(net, net, fp32_delay=0.1)
    image = _image((2, 40, 37, 30))
    output, report = sliding_window_predict(wrapped, image, _config((16, 16, 16), autocast=True,
                                                                     output_dtype=torch.float32), CPU)
    assert report.precision == "bfloat16", report.notes
    assert wrapped.calls[:2] == ["fp32", "bf16"] and set(wrapped.calls[2:]) == {"bf16"}
    torch.testing.assert_close(output, _monai(net, image, (16, 16, 16), 0.5, "gaussian"), rtol=1e-5, atol=1e-5)
    assert "bf16 autocast on the CPU" in report.notes[0]

    wrapped.calls.clear()  # a second run of the same network reuses the decision: no probe
    again, report = sliding_window_predict(wrapped, image, _config((16, 16, 16), autocast=True,
                                                                   output_dtype=torch.float32), CPU)
    assert set(wrapped.calls) == {"bf16"} and report.precision == "bfloat16"
    assert report.notes[0].endswith("(decided on an earlier run)")
    torch.testing.assert_close(again, output)


def test_fp32_is_kept_when_bf16_changes_labels(net, monkeypatch):
    monkeypatch.setattr(devices, "autocast_dtype", lambda device: torch.bfloat16)
    wrapped = _PrecisionAware(net, lambda batch: net(batch).flip(1), fp32_delay=0.0)  # classes swapped under "bf16"
    _, report = sliding_window_predict(wrapped, _image((2, 40, 37, 30)), _config((16, 16, 16), autocast=True), CPU)
    assert report.precision == "float32"
    assert set(wrapped.calls[2:]) == {"fp32"}
    assert report.notes[0].startswith("fp32 on the CPU")


def test_intensity_outputs_judge_bf16_by_their_error_not_by_labels(net, monkeypatch):
    """A regression network (e.g. synthesis) has no labels: bf16 is kept only while its largest difference from fp32
    stays within INTENSITY_TOLERANCE of the output range, and the note says so in those terms."""
    monkeypatch.setattr(devices, "autocast_dtype", lambda device: torch.bfloat16)
    image = _image((2, 40, 37, 30))
    for name, bf16_version, expected in (
        ("tiny error", lambda batch: net(batch) * 1.001, "bfloat16"),
        ("5 % error", lambda batch: net(batch) + 0.05 * (net(batch).max() - net(batch).min()), "float32"),
    ):
        wrapped = _PrecisionAware(net, bf16_version, fp32_delay=0.05)
        _, report = sliding_window_predict(wrapped, image, _config((16, 16, 16), autocast=True,
                                                                   output_kind="intensities"), CPU)
        assert report.precision == expected, (name, report.notes)
        assert "of the output range" in report.notes[0], report.notes
    with pytest.raises(ValueError, match="output_kind"):
        _config((16, 16, 16), output_kind="probabilities")


def test_fp32_is_kept_when_bf16_is_clearly_slower(net, monkeypatch):
    monkeypatch.setattr(devices, "autocast_dtype", lambda device: torch.bfloat16)

    def slow_low(batch):
        _busy(0.5)  # far beyond the real network's CPU time on two 16³ windows, even on a busy machine
        return net(batch)

    wrapped = _PrecisionAware(net, slow_low, fp32_delay=0.0)
    _, report = sliding_window_predict(wrapped, _image((2, 30, 30, 30)), _config((16, 16, 16), autocast=True), CPU)
    assert report.precision == "float32"


def test_no_bf16_probe_without_native_bf16(net, monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    wrapped = _PrecisionAware(net, net, fp32_delay=0.0)
    _, report = sliding_window_predict(wrapped, _image((2, 30, 30, 30)), _config((16, 16, 16), autocast=True), CPU)
    assert report.precision == "float32" and set(wrapped.calls) == {"fp32"}


# ------------------------------------------------------------------------- CUDA out-of-memory chain, simulated


class _FakeGpuNetwork(torch.nn.Module):
    """Runs the real network on the CPU but raises CUDA's out-of-memory error for batches larger than `max_batch`
    and on the listed call numbers (1-based), as a GPU would; records where it was moved."""

    def __init__(self, network, max_batch: int | None = None, failing_calls: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.network, self.max_batch, self.failing_calls = network, max_batch, set(failing_calls)
        self.calls: list[int] = []
        self.moved_to: list[torch.device] = []

    def forward(self, batch):
        self.calls.append(batch.shape[0])
        if (self.max_batch is not None and batch.shape[0] > self.max_batch) or len(self.calls) in self.failing_calls:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.network(batch)

    def to(self, *args, **kwargs):
        self.moved_to.append(torch.device(args[0]))
        return self


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA rules (autocast aside) on the CPU: the fallbacks can run without a GPU."""
    monkeypatch.setattr(inference, "_is_cuda", lambda device: True)


def _no_oom_output(net, image, roi, **options):
    output, report = sliding_window_predict(net, image, _config(roi, output_dtype=torch.float32, **options), CPU)
    assert report.fallbacks == []
    return output


def test_gpu_out_of_memory_halves_the_batch_down_to_one(net, fake_cuda):
    image = _image((2, 40, 37, 30))
    fake = _FakeGpuNetwork(net, max_batch=1)
    output, report = sliding_window_predict(fake, image, _config((16, 16, 16), sw_batch_size=4,
                                                                 output_dtype=torch.float32), CPU)
    assert report.fallbacks == ["GPU out of memory: batch 4 -> 2", "GPU out of memory: batch 2 -> 1"]
    assert fake.calls[:3] == [4, 2, 1] and set(fake.calls[3:]) == {1}
    assert report.sw_batch_size == 1 and fake.moved_to == []
    torch.testing.assert_close(output, _no_oom_output(net, image, (16, 16, 16)), rtol=1e-5, atol=1e-5)


def test_gpu_out_of_memory_chain_batch_then_stitching_then_cpu(net, fake_cuda):
    image = _image((2, 40, 37, 30))
    # call 1 (batch 2) fails -> batch 1; call 2 succeeds and puts the buffer on the device; call 3 fails -> CPU
    # stitching; call 4 fails -> the rest on the CPU; every later call succeeds
    fake = _FakeGpuNetwork(net, failing_calls=(1, 3, 4))
    config = _config((16, 16, 16), sw_batch_size=2, stitch_on_device="device", output_dtype=torch.float32)
    output, report = sliding_window_predict(fake, image, config, CPU)
    assert report.fallbacks == ["GPU out of memory: batch 2 -> 1", "GPU out of memory: stitching moved to the CPU",
                                "GPU out of memory: ran on the CPU"]
    assert fake.moved_to == [CPU]
    assert report.device == "cpu" and report.stitch_device == "cpu"
    assert report.windows_evaluated == report.windows_total
    torch.testing.assert_close(output, _no_oom_output(net, image, (16, 16, 16)), rtol=1e-5, atol=1e-5)


def test_gpu_out_of_memory_with_an_fp16_buffer_on_the_device_keeps_the_result(net, fake_cuda):
    image = _image((2, 40, 37, 30))
    fake = _FakeGpuNetwork(net, failing_calls=(4, 5))
    config = _config((16, 16, 16), sw_batch_size=1, stitch_on_device="device")
    output, report = sliding_window_predict(fake, image, config, CPU)
    assert report.fallbacks == ["GPU out of memory: stitching moved to the CPU", "GPU out of memory: ran on the CPU"]
    expected = _monai(net, image, (16, 16, 16), 0.5, "gaussian")
    assert _labels_same(output, expected) >= LABELS_SAME
    assert (output - expected).abs().max() <= FP16_BUFFER_TOLERANCE * expected.abs().max()


def test_gpu_out_of_memory_when_allocating_the_buffer_stitches_on_the_cpu(net, fake_cuda, monkeypatch):
    attempts: list[torch.device] = []

    class FailingOnce(inference._Stitcher):
        def __init__(self, *args, **kwargs):
            attempts.append(args[3])
            if len(attempts) == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(inference, "_Stitcher", FailingOnce)
    image = _image((2, 30, 30, 30))
    fake = _FakeGpuNetwork(net)
    output, report = sliding_window_predict(fake, image, _config((16, 16, 16), sw_batch_size=2,
                                                                 stitch_on_device="device"), CPU)
    assert report.fallbacks == ["GPU out of memory: stitching moved to the CPU"]
    assert fake.moved_to == [] and len(attempts) == 2
    assert _labels_same(output, _monai(net, image, (16, 16, 16), 0.5, "gaussian")) >= LABELS_SAME


def test_gpu_stitching_is_automatic_when_it_fits_and_cpu_when_not(net, fake_cuda, monkeypatch):
    image = _image((2, 30, 30, 30))
    config = _config((16, 16, 16), sw_batch_size=2)
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 2**40)
    _, report = sliding_window_predict(_FakeGpuNetwork(net, failing_calls=(2, 3)), image, config, CPU)
    assert report.fallbacks == ["GPU out of memory: batch 2 -> 1", "GPU out of memory: stitching moved to the CPU"]
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 2**10)  # 1 KiB: the buffer does not fit
    _, report = sliding_window_predict(_FakeGpuNetwork(net, failing_calls=(2, 3)), image, config, CPU)
    assert any("stitching on the CPU" in note for note in report.notes)
    assert report.fallbacks == ["GPU out of memory: batch 2 -> 1", "GPU out of memory: ran on the CPU"]


@pytest.mark.parametrize("error,is_cuda", [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory."), False),  # on the CPU there is nothing to fall back to
    (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB"), False),
], ids=["gpu_non_oom", "oom_on_cpu", "cpu_allocator"])
def test_other_failures_are_raised_unchanged(net, monkeypatch, error, is_cuda):
    monkeypatch.setattr(inference, "_is_cuda", lambda device: is_cuda)

    def failing(batch):
        raise error

    with pytest.raises(RuntimeError) as caught:
        sliding_window_predict(failing, _image((2, 20, 20, 20)), _config((16, 16, 16)), CPU)
    assert caught.value is error


def test_gpu_out_of_memory_at_batch_one_with_an_unmovable_network_is_raised(net, fake_cuda):
    def unmovable(batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        sliding_window_predict(unmovable, _image((2, 20, 20, 20)), _config((16, 16, 16), sw_batch_size=1,
                                                                           stitch_on_device="cpu"), CPU)


# ------------------------------------------------------------------------------------------- device and memory


def test_sw_batch_size_for_the_cpu_is_small_and_shrinks_when_ram_is_short(monkeypatch):
    assert devices.sw_batch_size_for(CPU, (96, 96, 96), 1) == devices.CPU_SW_BATCH_SIZE
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 64 * 2**20)  # 64 MiB free
    assert devices.sw_batch_size_for(CPU, (96, 96, 96), 1) == 1
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: None)
    assert devices.sw_batch_size_for(CPU, (96, 96, 96), 1) == devices.CPU_SW_BATCH_SIZE


def test_sw_batch_size_for_cuda_follows_the_free_memory(monkeypatch):
    gpu = torch.device("cuda", 0)  # constructing the device needs no GPU; free memory is simulated
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 10 * 2**30)
    per_window = 2**30
    assert devices.sw_batch_size_for(gpu, (96, 96, 96), 1, bytes_per_window=per_window) == 8  # 10 GiB * 0.8
    assert devices.sw_batch_size_for(gpu, (96, 96, 96), 1, bytes_per_window=3 * per_window) == 2
    assert devices.sw_batch_size_for(gpu, (96, 96, 96), 1, bytes_per_window=per_window,
                                     reserved_bytes=6 * 2**30) == 2
    assert devices.sw_batch_size_for(gpu, (96, 96, 96), 1, bytes_per_window=20 * per_window) == 1
    assert devices.sw_batch_size_for(gpu, (64, 64, 64), 1) == devices.MAX_SW_BATCH_SIZE  # guessed: 0.27 GiB/window


def test_free_memory_of_the_cpu_is_known_on_posix():
    free = devices.free_memory_bytes(CPU)
    assert free is None or free > 0


def test_out_of_memory_errors_are_recognised():
    assert devices.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert devices.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not devices.is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not devices.is_out_of_memory(ValueError("out of memory"))


def test_autocast_dtype_on_the_cpu_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.autocast_dtype(CPU) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.autocast_dtype(CPU) is None


def test_configure_cuda_leaves_the_cpu_alone():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    devices.configure_cuda(CPU)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
