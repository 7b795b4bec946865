"""The OpenVINO CPU path (engine/cpu_runtime.py): converted once and cached with checksums, checked against PyTorch
fp32 before it is used on a machine, the decision stored and reported, PyTorch whenever anything is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MIADeepLearningLib.engine import cpu_runtime, devices
from MIADeepLearningLib.engine.inference import WindowedInferenceConfig, sliding_window_predict
from MIADeepLearningLib.engine.networks import ResidualUNet3D, UNet3D

pytest.importorskip("openvino")
CPU = torch.device("cpu")


@pytest.fixture
def runtime(monkeypatch, tmp_path):
    """OpenVINO allowed (the suite runs PyTorch by default), a fresh cache, no runners kept from other tests, and no
    speed requirement (tiny test networks are not where OpenVINO's speed shows)."""
    monkeypatch.setenv(cpu_runtime.RUNTIME_ENV, "auto")
    monkeypatch.setenv("MIADL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_runtime, "SPEED_NEEDED", 0.0)
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    cpu_runtime._RUNNERS.clear()
    yield tmp_path / "cache" / "cpu-runtime"
    cpu_runtime._RUNNERS.clear()


def small_unet(seed: int = 0, out_channels: int = 3) -> UNet3D:
    torch.manual_seed(seed)
    return UNet3D(in_channels=1, out_channels=out_channels, features=(4, 8)).eval()


def phantom(shape=(1, 1, 24, 32, 16), seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator)


def test_agreement_rules():
    reference = torch.zeros((1, 3, 4, 4, 4))
    reference[:, 1] = 1.0
    same, text = cpu_runtime.agreement(reference + 1e-4, reference, "labels")
    assert same and "100.0000%" in text
    changed = reference.clone()
    changed[0, 2, 0, 0, 0] = 5.0  # one voxel of 64 changes its label: 98.4 % kept
    assert not cpu_runtime.agreement(changed, reference, "labels")[0]
    one_channel = torch.linspace(-1, 1, 64).view(1, 1, 4, 4, 4)
    assert cpu_runtime.agreement(one_channel * 1.0001, one_channel, "labels")[0]
    assert cpu_runtime.agreement(one_channel + 0.001, one_channel, "intensities")[0]  # 0.05 % of the range of 2
    assert not cpu_runtime.agreement(one_channel + 0.01, one_channel, "intensities")[0]
    assert not cpu_runtime.agreement(one_channel[..., :2], one_channel, "intensities")[0]
    assert not cpu_runtime.agreement(one_channel * float("nan"), one_channel, "intensities")[0]


def test_converted_once_checked_and_decision_reused(runtime):
    network, inputs = small_unet(), phantom()
    with torch.inference_mode():
        expected = network(inputs)
        first = cpu_runtime.runner(network, CPU, "labels")
        assert first is cpu_runtime.runner(network, CPU, "labels")  # one per network object
        output = first(inputs)
    assert torch.equal(output, expected)  # the checking call returns PyTorch's own output
    assert first.runtime.startswith("openvino ")
    assert "checked against PyTorch fp32" in first.note and "converted for the first time" in first.note
    with torch.inference_mode():
        again = first(inputs)
    assert torch.allclose(again, expected, atol=1e-4)
    stored = sorted(path.suffix for path in runtime.iterdir())
    assert stored == [".bin", ".json", ".xml"]
    record = json.loads(next(runtime.glob("*.json")).read_text())
    assert record["weights_sha256"] == cpu_runtime.weights_fingerprint(network)
    assert record["decisions"][cpu_runtime.machine_key()]["runtime"] == first.runtime

    # another process (no runner kept) with the same weights in a new network object: loads, no second check
    cpu_runtime._RUNNERS.clear()
    twin = small_unet()
    calls: list[int] = []
    twin.register_forward_hook(lambda *args: calls.append(1))
    with torch.inference_mode():
        later = cpu_runtime.runner(twin, CPU, "labels")
        result = later(inputs)
    assert calls == []  # PyTorch did not run: the stored decision was used
    assert later.runtime == first.runtime and "checked on an earlier run" in later.note
    assert torch.allclose(result, expected, atol=1e-4)
    report = cpu_runtime.status()
    assert report["cpu_runtime"].startswith("openvino")
    assert [entry["runtime"] for entry in report["decisions_on_this_machine"]] == [first.runtime]


def test_batch_norm_networks_convert(runtime):
    """Batch norm keeps a 0-dim counter among its weights: the fingerprint must take it (MONAI's UNet has them)."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4),
                                  torch.nn.Conv3d(4, 2, 1)).eval()
    inputs = phantom((1, 1, 12, 12, 12))
    with torch.inference_mode():
        runner = cpu_runtime.runner(network, CPU)
        runner(inputs)
        assert runner.runtime.startswith("openvino"), runner.note
        assert torch.allclose(runner(inputs), network(inputs), atol=1e-4)


def test_other_weights_other_conversion_and_shapes_are_dynamic(runtime):
    inputs = phantom()
    with torch.inference_mode():
        cpu_runtime.runner(small_unet(0), CPU)(inputs)
        other = cpu_runtime.runner(small_unet(1), CPU)
        other(inputs)
        bigger = phantom((2, 1, 40, 24, 48), seed=3)
        assert torch.allclose(other(bigger), small_unet(1)(bigger), atol=1e-4)
    assert len(list(runtime.glob("*.xml"))) == 2


def test_a_changed_cached_file_is_converted_again(runtime):
    network, inputs = small_unet(), phantom()
    with torch.inference_mode():
        cpu_runtime.runner(network, CPU)(inputs)
    weights_file = next(runtime.glob("*.bin"))
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    cpu_runtime._RUNNERS.clear()
    with torch.inference_mode():
        again = cpu_runtime.runner(network, CPU)
        output = again(inputs)
        assert torch.allclose(output, network(inputs), atol=1e-4)
    assert "failed the sha256 check" in again.note
    record = json.loads(next(runtime.glob("*.json")).read_text())
    assert record["bin_sha256"] == cpu_runtime._file_sha256(weights_file)


def test_a_failed_check_keeps_pytorch_and_is_remembered(runtime, monkeypatch):
    monkeypatch.setattr(cpu_runtime, "agreement", lambda *args: (False, "70.0000% of voxels keep their label"))
    network, inputs = small_unet(), phantom()
    with torch.inference_mode():
        runner = cpu_runtime.runner(network, CPU)
        runner(inputs)
        assert runner.accelerated is None and runner.runtime == "pytorch"
        assert "failed the check on this machine: 70.0000%" in runner.note
        assert torch.equal(runner(inputs), network(inputs))
    cpu_runtime._RUNNERS.clear()
    with torch.inference_mode():
        later = cpu_runtime.runner(network, CPU)
        later(inputs)
    assert later.runtime == "pytorch" and "checked on an earlier run" in later.note


def test_too_slow_is_not_used(runtime, monkeypatch):
    monkeypatch.setattr(cpu_runtime, "SPEED_NEEDED", 1e9)
    with torch.inference_mode():
        runner = cpu_runtime.runner(small_unet(), CPU)
        runner(phantom())
    assert runner.runtime == "pytorch" and "as fast (needs" in runner.note


class _DataDependent(torch.nn.Module):
    """Returns a dict: nothing a converter can turn into a graph output."""

    def forward(self, inputs: torch.Tensor) -> dict:
        return {"logits": inputs * 2.0}


def test_a_network_openvino_cannot_take_runs_in_pytorch(runtime):
    network = _DataDependent()
    with torch.inference_mode():
        runner = cpu_runtime.runner(network, CPU)
        output = runner(phantom())
    assert isinstance(output, dict) and runner.runtime == "pytorch"
    assert runner.note.startswith("PyTorch fp32: OpenVINO could not convert the network")


@pytest.mark.parametrize("setting, expected", [
    ("pytorch", "MIADL_CPU_RUNTIME=pytorch"),
    ("native_bf16", "native bf16"),
    ("no_openvino", "OpenVINO is not installed"),
])
def test_reasons_for_pytorch(runtime, monkeypatch, setting, expected):
    if setting == "pytorch":
        monkeypatch.setenv(cpu_runtime.RUNTIME_ENV, "pytorch")
    elif setting == "native_bf16":
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    else:
        monkeypatch.setattr(cpu_runtime, "openvino_version", lambda: None)
    network = small_unet()
    with torch.inference_mode():
        runner = cpu_runtime.runner(network, CPU)
        assert torch.equal(runner(phantom()), network(phantom()))
    assert runner.runtime == "pytorch" and expected in runner.note
    assert not runtime.exists()  # nothing converted
    assert cpu_runtime.unavailable_reason(torch.device("cuda")) == "the network runs on CUDA"


def test_windowed_inference_reports_the_runtime_and_matches_pytorch(runtime, monkeypatch):
    network = small_unet(out_channels=4)
    image = phantom((1, 1, 40, 48, 36), seed=5)[0]
    config = WindowedInferenceConfig(roi_size=(24, 24, 24), overlap=0.5, sw_batch_size=2)
    fast, report = sliding_window_predict(network, image, config, CPU)
    assert report.runtime.startswith("openvino") and report.precision == "float32"
    assert any("checked against PyTorch fp32" in note for note in report.notes)
    monkeypatch.setenv(cpu_runtime.RUNTIME_ENV, "pytorch")
    reference, reference_report = sliding_window_predict(network, image, config, CPU)
    assert reference_report.runtime == "pytorch"
    assert (fast.argmax(0) == reference.argmax(0)).float().mean() >= 0.999
    assert float((fast - reference).abs().max()) < 2e-3 * float(reference.abs().max())


def test_residual_network_intensities(runtime):
    torch.manual_seed(0)
    network = ResidualUNet3D(in_channels=3, features=(4, 8)).eval()
    torch.nn.init.normal_(network.head.weight, std=0.1)  # not the identity it starts as
    inputs = phantom((1, 3, 16, 24, 20))
    with torch.inference_mode():
        runner = cpu_runtime.runner(network, CPU, "intensities")
        runner(inputs)
        assert runner.runtime.startswith("openvino")
        assert torch.allclose(runner(inputs), network(inputs), atol=1e-4)


def test_brain_tissue_pipeline_same_labels_on_both_paths(runtime, monkeypatch, tmp_path):
    """The shipped tissue model on a small phantom head: OpenVINO and PyTorch agree on >= 99.9 % of the labels, and
    the provenance says which path ran."""
    from MIADeepLearningLib.engine import tasks
    from MIADeepLearningLib.testing import sample_data

    voxels = sample_data.phantom_head((40, 48, 44)).astype(np.float32)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((2.0, 2.0, 2.0))
    path = tmp_path / "head.nrrd"
    sitk.WriteImage(image, str(path))
    fast = tasks.segment_image(path, "brain-tissue", device="cpu")
    inference = fast.provenance["pipeline"]["inference"]
    assert all("OpenVINO" in " ".join(entry["notes"]) for entry in inference)
    monkeypatch.setenv(cpu_runtime.RUNTIME_ENV, "pytorch")
    reference = tasks.segment_image(path, "brain-tissue", device="cpu")
    assert all("MIADL_CPU_RUNTIME=pytorch" in " ".join(entry["notes"])
               for entry in reference.provenance["pipeline"]["inference"])
    same = (sitk.GetArrayFromImage(fast.label) == sitk.GetArrayFromImage(reference.label)).mean()
    assert same >= 0.999


def test_device_report_names_the_cpu_runtime(runtime):
    report = devices.device_report()
    assert report["cpu_native_bf16"] is False
    assert report["cpu_runtime"]["cpu_runtime"].startswith("openvino")
    assert report["cpu_runtime"]["openvino"] == cpu_runtime.openvino_version()


def test_openvino_sends_no_usage_telemetry(tmp_path):
    """OpenVINO's converter reports usage to a web analytics service unless told otherwise; the engine imports it
    with the offline stub, so a worker converting a network neither loads the telemetry package nor writes its
    client-id files into the home folder."""
    import os
    import subprocess
    import sys

    from MIADeepLearningLib import paths

    script = (
        "import sys, torch\n"
        "from MIADeepLearningLib.engine import cpu_runtime\n"
        "net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1)).eval()\n"
        "cpu_runtime._convert(net, torch.zeros(1, 1, 8, 8, 8))\n"
        "print(sorted(m for m in sys.modules if m.startswith('openvino_telemetry') and sys.modules[m] is not None))\n"
    )
    environment = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(paths.library_parent_dir())}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert not (tmp_path / "intel").exists()


def test_registration_velocity_goes_through_the_runner(runtime):
    """The registration network runs once per pair outside windowed inference; its runtime reaches the provenance."""
    from types import SimpleNamespace

    from MIADeepLearningLib.engine import registration

    pipeline = SimpleNamespace(network=UNet3D(in_channels=2, out_channels=3, features=(4, 8)).eval(), device=CPU)
    inputs = phantom((1, 2, 16, 24, 16))[0]
    velocity = registration.DeformableRegistration._velocity(pipeline, inputs)
    assert velocity.shape == (3, 16, 24, 16)
    assert "OpenVINO" in pipeline.network_runtime and "checked against PyTorch fp32" in pipeline.network_runtime
