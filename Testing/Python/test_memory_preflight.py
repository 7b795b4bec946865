"""Pre-flight memory check (engine/memory.py): a run that cannot fit is refused from the input's header, before any
voxel is read, in one sentence with the numbers and what to do; a run that fits goes on. Header-only inputs (a
.nhdr describing a 512×512×1200 whole-body CT with an empty data file) keep these tests fast: reading their voxels
would fail, so a run that got past the check is seen by that other error. Also: the bound's grids against the
pipelines' own grid functions, where the available memory comes from, and 4-D files through the CLI."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import rotation, run_worker_job

from MIADeepLearningLib import jobs
from MIADeepLearningLib.engine import geometry, memory, registration, registry, tasks
from MIADeepLearningLib.engine.errors import InputError

BODY_SIZE = (512, 512, 1200)
BODY_SPACING = (0.7, 0.7, 0.6)
GB = memory.GB


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message[:-1]


def header_only(folder: Path, name: str = "body", size=BODY_SIZE, spacing=BODY_SPACING, kind: str = "short") -> Path:
    """A detached NRRD header describing a large volume, with an empty data file: ITK reads the header's
    information without a byte of voxels (the data file must exist), and refuses to read the voxels."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.raw").write_bytes(b"")
    directions = " ".join(f"({','.join(str(spacing[i]) if i == j else '0' for j in range(3))})" for i in range(3))
    header = folder / f"{name}.nhdr"
    header.write_text(
        "NRRD0004\n"
        f"type: {kind}\n"
        "dimension: 3\n"
        "space: left-posterior-superior\n"
        f"sizes: {' '.join(str(n) for n in size)}\n"
        f"space directions: {directions}\n"
        "kinds: domain domain domain\n"
        "endian: little\n"
        "encoding: raw\n"
        "space origin: (0,0,0)\n"
        f"data file: {name}.raw\n", encoding="ascii")
    return header


def small_head(folder: Path, name: str = "head") -> Path:
    """A small real MR-like volume (1.5 mm), for runs that must pass the check and read their voxels."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (40, 48, 44)), indexing="ij")
    voxels = np.where(x**2 + y**2 + z**2 < 0.7, 400.0, 5.0).astype(np.float32)
    voxels += np.random.default_rng(0).normal(0, 5, voxels.shape).astype(np.float32)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((1.5, 1.5, 1.5))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.nrrd"
    sitk.WriteImage(image, str(path))
    return path


class _RecordingPipeline:
    """Stands in for a pipeline: records whether it was ever asked to run."""

    predicted: ClassVar[list] = []

    def __init__(self, model, weight_paths, device, options):
        self.device = device

    def to(self, device):
        return self

    def predict(self, image, progress):
        _RecordingPipeline.predicted.append(image.GetSize())
        label = sitk.Cast(image > 100, sitk.sitkUInt8)
        label.CopyInformation(image)
        return {"label": label}


@pytest.fixture
def fake_deepbet(monkeypatch):
    _RecordingPipeline.predicted = []
    monkeypatch.setitem(tasks.PIPELINES, registry.get_model("deepbet").pipeline, _RecordingPipeline)
    return _RecordingPipeline


# --------------------------------------------------------------------------------------------------- headers


def test_the_header_gives_size_spacing_and_pixel_bytes_without_the_voxels(tmp_path):
    info = memory.read_image_info(header_only(tmp_path))
    assert info is not None
    assert info.size == BODY_SIZE and info.voxels == 512 * 512 * 1200
    assert np.allclose(info.spacing, BODY_SPACING) and info.components == 1 and info.pixel_bytes == 2
    assert (tmp_path / "body.raw").stat().st_size == 0
    assert memory.read_image_info(header_only(tmp_path / "f", kind="float")).pixel_bytes == 4
    assert memory.read_image_info(tmp_path / "missing.nrrd") is None  # the reader reports that one itself


# ---------------------------------------------------------------------------------------------- the bounds


def _oblique_image(size=(37, 45, 23), spacing=(0.7, 1.3, 2.1)) -> sitk.Image:
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in reversed(size)), indexing="ij")
    image = sitk.GetImageFromArray(np.where(x**2 + y**2 + z**2 < 0.8, 300.0, 0.0).astype(np.float32))
    image.SetSpacing(spacing)
    image.SetDirection((rotation(0, 25.0) @ rotation(2, -35.0)).ravel().tolist())
    image.SetOrigin((12.0, -40.0, 7.5))
    return image


def _info(image: sitk.Image, pixel_bytes: int = 4) -> memory.ImageInfo:
    return memory.ImageInfo(image.GetSize(), image.GetSpacing(), image.GetDirection(), 1, pixel_bytes)


def test_working_grids_of_the_bound_are_the_pipelines_own():
    image = _oblique_image()
    info = _info(image)
    for spacing in (1.0, 2.0):
        grid, _ = geometry.isotropic_grid(image, spacing, "LIA")
        assert memory.isotropic_voxels(info, spacing) == math.prod(grid.GetSize())
    grid = registration.working_grid(image, 2.0, "LIA", memory.REGISTRATION_MULTIPLE)
    assert memory.registration_grid_voxels(info, 2.0) == math.prod(grid.GetSize())
    # deepbet's grid follows the foreground, which the header does not know: the bound takes the whole box
    assert memory.deepbet_grid_voxels(info) >= math.prod(geometry.ras_model_grid(image).GetSize())


def test_estimate_is_the_documented_linear_bound():
    info = memory.ImageInfo(BODY_SIZE, BODY_SPACING, tuple(np.eye(3).ravel()), 1, 2)
    voxels = info.voxels
    for pipeline, working in (("deepbet_brain_extraction", memory.deepbet_grid_voxels(info)),
                              ("brain_tissue_segmentation", memory.isotropic_voxels(info, 2.0)),
                              ("thick_slice_super_resolution", memory.isotropic_voxels(info, 1.0))):
        found = memory.estimate(pipeline, {"image": info}, model_bytes=1000)
        expected = (memory.BASE_BYTES[pipeline] + 2000 + (2 + memory.INPUT_BYTES_PER_VOXEL[pipeline]) * voxels
                    + memory.WORKING_BYTES_PER_VOXEL[pipeline] * working)
        assert found is not None and found.working_voxels == working
        assert found.total_bytes == pytest.approx(expected)
    moving = memory.ImageInfo((176, 208, 176), (1.0, 1.0, 1.0), tuple(np.eye(3).ravel()), 1, 2)
    found = memory.estimate("synthmorph_registration", {"fixed": info, "moving": moving})
    pipeline = "synthmorph_registration"
    expected = (memory.BASE_BYTES[pipeline] + (2 + memory.INPUT_BYTES_PER_VOXEL[pipeline]) * voxels
                + (2 + memory.MOVING_BYTES_PER_VOXEL) * moving.voxels
                + memory.WORKING_BYTES_PER_VOXEL[pipeline] * memory.registration_grid_voxels(info, 2.0))
    assert found is not None and found.total_bytes == pytest.approx(expected)
    # options that keep more on a grid cost more; a bundle and a 4-D or colour input have no bound here
    tissue = memory.estimate("brain_tissue_segmentation", {"image": info})
    assert memory.estimate("brain_tissue_segmentation", {"image": info}, {"uncertainty": True}).total_bytes > \
        tissue.total_bytes
    assert memory.estimate("brain_tissue_segmentation", {"image": info}, working_spacing=1.0).total_bytes > \
        tissue.total_bytes
    assert memory.estimate("monai_bundle", {"image": info}) is None
    four_d = memory.ImageInfo((64, 64, 30, 5), (1.0,) * 4, tuple(np.eye(4).ravel()), 1, 2)
    assert memory.estimate("deepbet_brain_extraction", {"image": four_d}) is None
    rgb = memory.ImageInfo(BODY_SIZE, BODY_SPACING, tuple(np.eye(3).ravel()), 3, 1)
    assert memory.estimate("deepbet_brain_extraction", {"image": rgb}) is None


def test_check_refuses_exactly_when_the_memory_still_needed_exceeds_what_is_available():
    info = memory.ImageInfo(BODY_SIZE, BODY_SPACING, tuple(np.eye(3).ravel()), 1, 2)
    found = memory.estimate("brain_tissue_segmentation", {"image": info})
    total = found.total_bytes
    memory.check_estimate(found, available=int(total) + 1, in_use=0)
    memory.check_estimate(found, available=int(total - 1e9) + 1, in_use=int(1e9))  # what the worker holds counts
    memory.check_estimate(None, available=0)  # no bound: never refused
    with pytest.raises(InputError) as refused:
        memory.check_estimate(found, available=16 * GB, in_use=GB // 2)
    message = str(refused.value)
    assert _one_sentence(message), message
    assert message.startswith("This run on a 512×512×1200-voxel volume needs about ")
    assert f"more memory ({total / GB:.1f} GB in all), but only 16.0 GB is available; crop it" in message
    assert "Crop Volume module" in message and "resample it to larger voxels" in message


# ------------------------------------------------------------------------------------------ available memory


def test_available_memory_override_and_system_figures(monkeypatch):
    monkeypatch.setenv(memory.AVAILABLE_MEMORY_ENV, "2.5")
    assert memory.available_memory_bytes() == int(2.5 * GB)
    monkeypatch.setenv(memory.AVAILABLE_MEMORY_ENV, "lots")  # not a number: ignored, the system's figure counts
    system = memory.available_memory_bytes()
    assert system is not None and system > 0
    monkeypatch.delenv(memory.AVAILABLE_MEMORY_ENV)
    monkeypatch.setitem(sys.modules, "psutil", None)  # inside Slicer psutil may be missing: the fallbacks answer
    without_psutil = memory.available_memory_bytes()
    assert without_psutil is not None and without_psutil > 0
    if sys.platform.startswith("linux"):
        meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024
                   for line in Path("/proc/meminfo").read_text().splitlines()}
        assert abs(memory._linux_available() - meminfo["MemAvailable"]) < 0.5 * meminfo["MemTotal"]
        assert 0 < memory._sysconf_available() <= meminfo["MemTotal"]
        status = {line.split(":")[0]: line for line in Path("/proc/self/status").read_text().splitlines()}
        rss = int(status["VmRSS"].split()[1]) * 1024
        assert abs(memory.own_memory_bytes() - rss) < 0.2 * rss


def test_each_system_has_its_fallback_without_psutil(monkeypatch):
    monkeypatch.delenv(memory.AVAILABLE_MEMORY_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(memory, "_windows_available", lambda: 7 * GB)
    monkeypatch.setattr(memory, "_linux_available", lambda: 5 * GB)
    monkeypatch.setattr(memory, "_sysconf_available", lambda: 3 * GB)
    for platform, expected in (("win32", 7 * GB), ("linux", 5 * GB), ("darwin", 3 * GB)):
        monkeypatch.setattr(sys, "platform", platform)
        assert memory.available_memory_bytes() == expected, platform
    monkeypatch.setattr(memory, "_linux_available", lambda: 1 / 0)  # a failing probe: unknown, never refused
    monkeypatch.setattr(sys, "platform", "linux")
    assert memory.available_memory_bytes() is None


def test_sysconf_falls_back_to_the_installed_memory_where_free_pages_are_unknown(monkeypatch):
    """macOS has no SC_AVPHYS_PAGES: the installed memory is an upper bound, so only what never fits is refused."""
    def sysconf(name: str) -> int:
        if name == "SC_AVPHYS_PAGES":
            raise ValueError(name)
        return {"SC_PHYS_PAGES": 4 * 1024 * 1024, "SC_PAGE_SIZE": 4096}[name]

    monkeypatch.setattr(memory.os, "sysconf", sysconf)
    assert memory._sysconf_available() == 16 * GB


# ------------------------------------------------------------------------- the tasks, the CLI and the worker


def test_a_whole_body_ct_is_refused_before_its_voxels_are_read(fake_deepbet, tmp_path, monkeypatch):
    monkeypatch.setenv(memory.AVAILABLE_MEMORY_ENV, "2")
    stages = []
    with pytest.raises(InputError) as refused:
        tasks.segment_image(header_only(tmp_path), "deepbet", device="cpu",
                            progress=lambda stage, fraction, message: stages.append(stage))
    message = str(refused.value)
    assert _one_sentence(message), message
    assert "512×512×1200-voxel volume needs about" in message and "only 2.0 GB is available" in message
    assert fake_deepbet.predicted == [] and "read_input" not in stages


def test_enough_memory_lets_the_run_go_on(fake_deepbet, tmp_path, monkeypatch):
    monkeypatch.setenv(memory.AVAILABLE_MEMORY_ENV, "1000")
    with pytest.raises(InputError) as other:  # past the check: reading the (absent) voxels is what fails
        tasks.segment_image(header_only(tmp_path), "deepbet", device="cpu")
    assert "memory" not in str(other.value) and "body.nhdr" in str(other.value)
    monkeypatch.setenv(memory.AVAILABLE_MEMORY_ENV, "8")  # a real small volume fits in a small budget
    output = tasks.segment_image(small_head(tmp_path), "deepbet", device="cpu")
    assert fake_deepbet.predicted == [(44, 48, 40)] and output.label.GetSize() == (44, 48, 40)


@pytest.mark.parametrize("model_id,words", [
    ("brain-tissue", "crop it to the region you need (Crop Volume module, or any image tool) or resample it"),
    ("thick-slice-sr", "the output is 1 mm over the whole field of view"),
])
def test_every_model_is_sized_before_it_reads(tmp_path, monkeypatch, model_id, words):
    monkeypatch.setenv(memory.AVAILABLE_MEMORY_ENV, "4")
    run = tasks.segment_image if model_id == "brain-tissue" else tasks.synthesize_image
    stages = []
    with pytest.raises(InputError) as refused:
        run(header_only(tmp_path), model_id, device="cpu", progress=lambda stage, fraction, text: stages.append(stage))
    assert "read_input" not in stages and "load_model" in stages
    assert _one_sentence(str(refused.value)) and words in str(refused.value), str(refused.value)


def test_registration_is_sized_by_its_fixed_image(tmp_path, monkeypatch):
    monkeypatch.setenv(memory.AVAILABLE_MEMORY_ENV, "4")
    stages = []
    with pytest.raises(InputError) as refused:
        tasks.register_images(header_only(tmp_path), small_head(tmp_path), "brain-registration", device="cpu",
                              progress=lambda stage, fraction, message: stages.append(stage))
    assert "read_input" not in stages
    message = str(refused.value)
    assert _one_sentence(message), message
    assert message.startswith("This run on the fixed image of 512×512×1200 voxels needs about ")
    assert "crop the fixed image to the region to register (Crop Volume module, for example to the head)" in message


def test_cli_refuses_with_one_line_and_writes_nothing(fake_deepbet, tmp_path, monkeypatch, capsys):
    from MIADeepLearningLib import cli

    monkeypatch.setenv(memory.AVAILABLE_MEMORY_ENV, "2")
    output = tmp_path / "out" / "brain.nii.gz"
    code = cli.main(["segment", "--model", "deepbet", "-i", str(header_only(tmp_path)), "-o", str(output), "-q",
                     "--device", "cpu"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_USAGE and len(error) == 1 and error[0].startswith("error: This run on a 512×512×1200")
    assert not output.exists() and fake_deepbet.predicted == []


def test_worker_refuses_with_an_error_event_and_leaves_no_outputs(fake_deepbet, tmp_path, monkeypatch):
    monkeypatch.setenv(memory.AVAILABLE_MEMORY_ENV, "2")
    folder = tmp_path / "job"
    folder.mkdir()
    job = jobs.Job(task="segment", model="deepbet", inputs={"image": str(header_only(tmp_path / "in"))},
                   folder=str(folder), outputs={"label": "label.nrrd"}, device="cpu")
    code, events = run_worker_job(job)
    final = events[-1]
    assert code == 2 and final.stage == jobs.STAGE_ERROR and final.error_type == "InputError"
    assert _one_sentence(final.message) and "needs about" in final.message and "2.0 GB is available" in final.message
    assert "read_input" not in [event.stage for event in events]
    assert not job.outputs_dir.exists() and not job.partial_dir.exists() and fake_deepbet.predicted == []


# ------------------------------------------------------------------------------------------ 4-D files, CLI


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_a_4d_file_through_the_cli_is_refused_in_one_line(fake_deepbet, tmp_path, capsys, suffix):
    from MIADeepLearningLib import cli

    frames = np.random.default_rng(0).normal(300, 50, (3, 10, 12, 14)).astype(np.float32)  # (t, z, y, x)
    path = tmp_path / f"fmri{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(frames, isVector=False), str(path))
    assert sitk.ReadImage(str(path)).GetDimension() == 4
    output = tmp_path / "brain.nii.gz"
    code = cli.main(["segment", "--model", "deepbet", "-i", str(path), "-o", str(output), "-q", "--device", "cpu"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_USAGE and error == ["error: The input volume is 4D; the model needs a 3D volume."]
    assert not output.exists() and fake_deepbet.predicted == []


def test_benchmark_inputs_are_what_the_bound_was_measured_on(tmp_path):
    """The benchmark's synthetic whole-body CT is HU int16 with air, fat, soft tissue and bone."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Benchmarks"))
    try:
        import large_volumes
    finally:
        sys.path.pop(0)
    body = large_volumes.body_ct(24)
    assert body.dtype == np.int16 and body.shape == (24, 512, 512)
    assert body.min() == -1000 and body.max() > 500 and np.mean(body < -500) > 0.3  # air around the body
    assert np.mean((body > -150) & (body < -50)) > 0.01 and np.mean((body > 20) & (body < 80)) > 0.05  # fat, muscle
    path = large_volumes.write_volume(body, large_volumes.BODY_SPACING, tmp_path / "body.nrrd")
    info = memory.read_image_info(path)
    assert info.size == (512, 512, 24) and info.pixel_bytes == 2 and np.allclose(info.spacing, (0.7, 0.7, 0.6))
