"""Damaged or cut-short input files stop a run with one sentence: engine/filecheck.py on every format it knows,
through imageio.read_image (CLI, batch, worker), and on the file a Slicer volume was loaded from (mrml/source_files.py)
before the module's logic exports or starts anything.

Before the check, SimpleITK read a .nii/.nii.gz cut to a third as a partly blank image (the CLI segmented it and
exited 0), and a compressed .mha/.mhd/.nhdr with one flipped byte as wrong voxels; Slicer loaded both kinds too."""

from __future__ import annotations

import bz2
import csv
import gzip
import os
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import run_cli as _cli
from helpers import write_tissue_package

from MIADeepLearningLib import cli
from MIADeepLearningLib.engine import filecheck, imageio, registry
from MIADeepLearningLib.engine.errors import CancelledError, InputError

SHAPE_ZYX = (20, 24, 28)
SHAPE_TEXT = "(28×24×20 voxels of 2 bytes)"
# (file name, compressed, name of the data file for detached headers)
FORMATS = {
    "nii": ("image.nii", False),
    "nii.gz": ("image.nii.gz", True),
    "nrrd raw": ("image.nrrd", False),
    "nrrd gzip": ("image.nrrd", True),
    "nhdr raw": ("image.nhdr", False),
    "nhdr gzip": ("image.nhdr", True),
    "mha raw": ("image.mha", False),
    "mha zlib": ("image.mha", True),
    "mhd raw": ("image.mhd", False),
    "mhd zlib": ("image.mhd", True),
}


def _voxels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(300, 50, SHAPE_ZYX).astype(np.int16)


def _write(folder: Path, kind: str) -> tuple[Path, Path]:
    """(the image file, the file that holds its voxels: itself, or the detached data file ITK wrote beside it)."""
    name, compressed = FORMATS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    sitk.WriteImage(sitk.GetImageFromArray(_voxels()), str(path), useCompression=compressed)
    others = [item for item in folder.iterdir() if item != path]
    return path, (others[0] if others else path)


def _cut_to_a_third(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _assert_one_sentence(message: str, *phrases: str) -> None:
    assert message.endswith(".") and ". " not in message[:-1] and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, (phrase, message)


# ------------------------------------------------------------------------------------------------ each format


@pytest.mark.parametrize("kind", FORMATS)
def test_intact_file_passes_and_reads(tmp_path, kind):
    path, _ = _write(tmp_path, kind)
    assert filecheck.verify_image_file(path) is True  # checked, not merely skipped
    np.testing.assert_array_equal(sitk.GetArrayFromImage(imageio.read_image(path)), _voxels())


@pytest.mark.parametrize("kind", FORMATS)
def test_file_cut_to_a_third_is_one_sentence_naming_it(tmp_path, kind):
    path, data_file = _write(tmp_path, kind)
    _cut_to_a_third(data_file)
    with pytest.raises(InputError) as refused:
        imageio.read_image(path)
    message = str(refused.value)
    _assert_one_sentence(message, f"Input image {path.name} is damaged or cut short: ", " ends after ",
                         "of the 26.9 kB its header describes", SHAPE_TEXT)
    if data_file != path:
        assert f"in its data file {data_file.name} ends after" in message


def test_cut_by_one_byte_is_refused_in_every_format(tmp_path):
    """The smallest loss: one byte off the end (for gzip, a piece of the CRC/length trailer, which SimpleITK ignores
    when it reads a .nii.gz or a gzip NRRD)."""
    for kind in FORMATS:
        path, data_file = _write(tmp_path / kind.replace(" ", "-"), kind)
        data_file.write_bytes(data_file.read_bytes()[:-1])
        with pytest.raises(InputError, match="is damaged or cut short: "):
            filecheck.verify_image_file(path)


def test_cut_inside_the_header(tmp_path):
    path, _ = _write(tmp_path, "nii.gz")
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:200]))
    with pytest.raises(InputError) as refused:
        filecheck.verify_image_file(path)
    _assert_one_sentence(str(refused.value), "its compressed data ends after 200 bytes, inside its 348-byte header")


# ------------------------------------------------------------------------------------------------ corrupt data


def test_flipped_byte_in_a_gzip_stream_fails_its_crc(tmp_path):
    """Stored (level 0) deflate blocks copy bytes as they are, so a flipped voxel byte leaves a valid deflate
    stream: only the gzip CRC-32 can tell. SimpleITK/ITK's gzip reader refuses this one too, with an unrelated
    message ("Unable to determine ImageIO reader")."""
    path, _ = _write(tmp_path, "nii")
    stored = bytearray(gzip.compress(path.read_bytes(), compresslevel=0))
    stored[len(stored) // 2] ^= 0x01
    damaged = tmp_path / "flipped.nii.gz"
    damaged.write_bytes(bytes(stored))
    with pytest.raises(InputError) as refused:
        imageio.read_image(damaged)
    _assert_one_sentence(str(refused.value), "Input image flipped.nii.gz is damaged or cut short: ",
                         "checksum of its compressed data does not match")


@pytest.mark.parametrize("kind", ["nii.gz", "nrrd gzip", "nhdr gzip", "mha zlib", "mhd zlib"])
def test_flipped_byte_in_compressed_voxels_is_refused(tmp_path, kind):
    """ITK reads the MetaImage and detached-NRRD cases as wrong voxels without a word; the check refuses all."""
    path, data_file = _write(tmp_path, kind)
    data = bytearray(data_file.read_bytes())
    data[len(data) * 2 // 3] ^= 0xFF
    data_file.write_bytes(bytes(data))
    with pytest.raises(InputError) as refused:
        imageio.read_image(path)
    _assert_one_sentence(str(refused.value), f"Input image {path.name} is damaged or cut short: ", "corrupt")


# ------------------------------------------------------------------------------------------------ detached data


def test_detached_nhdr_with_missing_and_short_data_file(tmp_path):
    path, data_file = _write(tmp_path, "nhdr raw")
    assert data_file.suffix == ".raw"
    voxel_bytes = data_file.read_bytes()
    data_file.unlink()
    with pytest.raises(InputError) as missing:
        imageio.read_image(path)
    _assert_one_sentence(str(missing.value),
                         f"Input image image.nhdr is incomplete: its data file {data_file.name} (named in its header) "
                         "does not exist.")
    data_file.write_bytes(voxel_bytes[:-100])
    with pytest.raises(InputError) as short:
        imageio.read_image(path)
    _assert_one_sentence(str(short.value), f"the voxel data in its data file {data_file.name} ends after "
                                           "26.8 kB of the 26.9 kB its header describes", SHAPE_TEXT)


def test_detached_data_file_with_byte_skip_and_absolute_path(tmp_path):
    """`byte skip` bytes before the voxels count, and a data file may be named by its absolute path."""
    path, data_file = _write(tmp_path, "nhdr raw")
    moved = tmp_path / "elsewhere" / "voxels.bin"
    moved.parent.mkdir()
    moved.write_bytes(b"\0" * 64 + data_file.read_bytes())
    header = path.read_text(encoding="latin-1").replace(f"data file: {data_file.name}",
                                                        f"byte skip: 64\ndata file: {moved}")
    path.write_text(header, encoding="latin-1")
    assert filecheck.verify_image_file(path) is True
    np.testing.assert_array_equal(sitk.GetArrayFromImage(imageio.read_image(path)), _voxels())
    moved.write_bytes(moved.read_bytes()[:-1])
    with pytest.raises(InputError, match=r"voxels\.bin ends after 26,879 bytes of the 26,880 bytes"):
        filecheck.verify_image_file(path)


# ------------------------------------------------------------------------------------------------ not refused


def _nrrd_with_encoding(folder: Path, encoding: str, body: bytes) -> Path:
    path, _ = _write(folder, "nrrd raw")
    header, _, _ = path.read_bytes().partition(b"\n\n")
    path.write_bytes(header.replace(b"encoding: raw", b"encoding: " + encoding.encode()) + b"\n\n" + body)
    return path


def test_valid_files_it_cannot_check_are_passed_not_refused(tmp_path):
    voxels = _voxels()
    ascii_nrrd = _nrrd_with_encoding(tmp_path / "ascii", "ascii",
                                     " ".join(str(value) for value in voxels.ravel()).encode() + b"\n")
    assert filecheck.verify_image_file(ascii_nrrd) is False
    np.testing.assert_array_equal(sitk.GetArrayFromImage(imageio.read_image(ascii_nrrd)), voxels)
    # bzip2 is not checked either (nor is it read by SimpleITK, which says so itself): no sentence from the check
    bzip2_nrrd = _nrrd_with_encoding(tmp_path / "bzip2", "bzip2", bz2.compress(voxels.astype("<i2").tobytes()))
    assert filecheck.verify_image_file(bzip2_nrrd) is False
    dicom_folder = tmp_path / "dicom"
    dicom_folder.mkdir()
    assert filecheck.verify_image_file(dicom_folder) is False
    (tmp_path / "slice.dcm").write_bytes(b"\0" * 128 + b"DICM")
    assert filecheck.verify_image_file(tmp_path / "slice.dcm") is False


def test_a_file_that_is_no_image_is_left_to_the_reader(tmp_path):
    garbage = tmp_path / "broken.nii.gz"
    garbage.write_bytes(b"this is not an image")
    assert filecheck.verify_image_file(garbage) is False
    with pytest.raises(InputError, match=r"broken\.nii\.gz cannot be read \("):
        imageio.read_image(garbage)


def test_valid_gzip_variants_pass(tmp_path):
    """Several gzip members (pigz, concatenated files), trailing zeros, and a .nii.gz that is not compressed at all:
    ITK reads each, so none may be refused."""
    path, _ = _write(tmp_path, "nii")
    raw = path.read_bytes()
    variants = {
        "members.nii.gz": gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]),
        "trailing.nii.gz": gzip.compress(raw) + b"\0" * 100,
        "plain.nii.gz": raw,
    }
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
        assert filecheck.verify_image_file(tmp_path / name) is True, name
        np.testing.assert_array_equal(sitk.GetArrayFromImage(imageio.read_image(tmp_path / name)), _voxels())
    (tmp_path / "members-cut.nii.gz").write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:])[:-3000])
    with pytest.raises(InputError, match="is damaged or cut short"):
        filecheck.verify_image_file(tmp_path / "members-cut.nii.gz")


def test_large_compressed_file_is_checked_in_bounded_memory(tmp_path):
    """64 MB of voxels behind 64 kB of gzip: the check holds a few MB at a time, never the image."""
    path, _ = _write(tmp_path, "nii")
    header = bytearray(path.read_bytes()[:352])
    header[40:56] = struct.pack("<8h", 3, 1024, 1024, 32, 1, 1, 1, 1)  # dim: 1024×1024×32 int16 = 64 MiB
    big = tmp_path / "big.nii.gz"
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with big.open("wb") as stream:
        stream.write(compressor.compress(bytes(header)))
        for _ in range(64):
            stream.write(compressor.compress(zeros))
        stream.write(compressor.flush())
    tracemalloc.start()
    try:
        assert filecheck.verify_image_file(big) is True
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB for a 64 MiB image"
    with big.open("r+b") as stream:
        stream.truncate(big.stat().st_size // 3)
    with pytest.raises(InputError, match=r"ends after \d+\.\d MB of the 67\.1 MB its header describes "
                                         r"\(1024×1024×32 voxels of 2 bytes\)"):
        filecheck.verify_image_file(big)


# ------------------------------------------------------------------------------------------------ CLI and batch




def test_cli_segment_refuses_a_cut_nii_gz_and_writes_nothing(tmp_path):
    """The brief's case: before the check this exited 0 and wrote a segmentation of a partly blank head."""
    path, _ = _write(tmp_path / "in", "nii.gz")
    cut = path.with_name("cut.nii.gz")
    path.rename(cut)
    _cut_to_a_third(cut)
    output = tmp_path / "out" / "brain.nii.gz"
    completed = _cli("segment", "--model", "deepbet", "-i", str(cut), "-o", str(output), "--device", "cpu", "-q")
    assert completed.returncode == cli.EXIT_USAGE, completed.stderr
    lines = completed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), completed.stderr
    _assert_one_sentence(lines[0], "Input image cut.nii.gz is damaged or cut short: its compressed voxel data "
                                   "ends after ", SHAPE_TEXT)
    assert completed.stdout == "" and not output.exists() and not output.parent.exists()


@pytest.fixture
def tissue_model(tmp_path, monkeypatch) -> str:
    """The tiny random brain tissue package: a real model through the real pipeline in a fraction of a second."""
    root = tmp_path / "models"
    write_tissue_package(root)
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(root))
    return "tiny-tissue"


def test_batch_reports_the_cut_case_as_failed_and_runs_the_good_one(tissue_model, tmp_path, capsys):
    cases = tmp_path / "cases"
    good, _ = _write(cases, "nrrd gzip")
    good.rename(cases / "good.nrrd")
    cut, _ = _write(tmp_path / "cut", "nii.gz")
    shutil.move(str(cut), str(cases / "cut.nii.gz"))
    _cut_to_a_third(cases / "cut.nii.gz")
    out = tmp_path / "out"
    code = cli.main(["segment", "--model", tissue_model, "-i", str(cases), "-o", str(out), "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_SOME_CASES_FAILED, err
    with (out / "report.csv").open(encoding="utf-8", newline="") as stream:
        rows = {row["case"]: row for row in csv.DictReader(stream)}
    assert rows["good"]["status"] == "ok" and Path(rows["good"]["output"]).is_file()
    assert rows["cut"]["status"] == "failed" and rows["cut"]["output"] == ""
    _assert_one_sentence(rows["cut"]["error"], "Input image cut.nii.gz is damaged or cut short: ", SHAPE_TEXT)
    assert "1 of 2 cases succeeded, 1 failed (cut)" in err
    assert sorted(path.name for path in out.iterdir()) == [".miadl-cohort", "good_tissue.nrrd", "report.csv"]
    # the cohort's own folder: the provenance sidecar of the good case only, nothing staged left of the cut one
    assert sorted(path.name for path in (out / ".miadl-cohort").iterdir()) == ["good.json"]


# ------------------------------------------------------------------------------------------------ Slicer module


def _node_ids(scene) -> list[str]:
    return [scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())]


def _loaded_cut_volume(tmp_path: Path, name: str = "cut"):
    """A .nii.gz cut to a third, loaded the way File > Add Data loads it (Slicer accepts it without a word)."""
    from MIADeepLearningLib.mrml import headless

    path, _ = _write(tmp_path / name, "nii.gz")
    cut = path.with_name(f"{name}.nii.gz")
    path.rename(cut)
    _cut_to_a_third(cut)
    node = headless.load_volume(cut, name=name)
    assert node.GetImageData() is not None and not node.GetModifiedSinceRead()
    assert node.GetStorageNode().GetFileName() == cut.as_posix()
    return node, cut


def test_module_refuses_a_volume_loaded_from_a_cut_file_before_anything(scene, tmp_path):
    import slicer

    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic

    node, _ = _loaded_cut_volume(tmp_path)
    jobs_root = tmp_path / "jobs"
    nodes_before = _node_ids(scene)
    with pytest.raises(InputError) as refused:
        SegmentationLogic(jobs_root=jobs_root).start(node, "deepbet", device="cpu")
    _assert_one_sentence(str(refused.value), "The file cut.nii.gz of the input volume 'cut' is damaged or cut short: "
                                             "its compressed voxel data ends after ", SHAPE_TEXT)
    assert not jobs_root.exists() and _node_ids(scene) == nodes_before

    # Once the user changed the voxels, they are the user's data, not the file's: the run starts.
    voxels = slicer.util.arrayFromVolume(node)
    voxels[0, 0, 0] += 1
    slicer.util.arrayFromVolumeModified(node)
    assert node.GetModifiedSinceRead()
    run = SegmentationLogic(jobs_root=jobs_root).start(node, "deepbet", device="cpu")
    try:
        assert [path.name.startswith("miadl-job-") for path in jobs_root.iterdir()] == [True]
    finally:
        run.cancel()
        with pytest.raises(CancelledError):
            run.finish()
    assert list(jobs_root.iterdir()) == []


def test_registration_refuses_a_moving_volume_loaded_from_a_cut_file(scene, tmp_path):
    from MIADeepLearningLib.mrml import headless
    from MIADeepLearningLib.mrml.registration_logic import RegistrationLogic

    fixed_path, _ = _write(tmp_path / "fixed", "nrrd gzip")
    fixed = headless.load_volume(fixed_path, name="fixed")
    moving, _ = _loaded_cut_volume(tmp_path, "moving")
    nodes_before = _node_ids(scene)
    with pytest.raises(InputError) as refused:
        RegistrationLogic(jobs_root=tmp_path / "jobs").start(fixed, moving, "brain-registration", device="cpu")
    _assert_one_sentence(str(refused.value), "The file moving.nii.gz of the moving volume 'moving' is damaged or cut "
                                             "short: ")
    assert not (tmp_path / "jobs").exists() and _node_ids(scene) == nodes_before


def test_source_file_verdict_is_cached_per_file_version(scene, tmp_path, monkeypatch):
    from MIADeepLearningLib.mrml import source_files

    node, cut = _loaded_cut_volume(tmp_path)
    calls: list[Path] = []

    def counting(path):
        calls.append(Path(path))
        return filecheck.examine_image_file(path)

    monkeypatch.setattr(source_files, "examine_image_file", counting)
    for _ in range(2):  # a second Apply does not decompress the file again
        with pytest.raises(InputError, match=r"cut\.nii\.gz of the input volume 'cut' is damaged"):
            source_files.verify_source_file(node)
    assert calls == [cut]
    status = cut.stat()
    os.utime(cut, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))  # the file changed on disk
    with pytest.raises(InputError):
        source_files.verify_source_file(node)
    assert calls == [cut, cut]


def test_volumes_without_an_unchanged_source_file_are_not_checked(scene, tmp_path):
    from MIADeepLearningLib.mrml import headless, source_files

    node, cut = _loaded_cut_volume(tmp_path)
    assert source_files.source_file(node) == cut
    cut.unlink()  # the file is gone: the node's voxels are all there is
    assert source_files.source_file(node) is None
    source_files.verify_source_file(node)
    created = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "made here")
    assert source_files.source_file(created) is None and source_files.source_file(None) is None
    good_path, _ = _write(tmp_path / "good", "nii.gz")
    good = headless.load_volume(good_path, name="good")
    source_files.verify_source_file(good)
    assert source_files.cached_verdict(good_path) == filecheck.FileVerdict(True)
