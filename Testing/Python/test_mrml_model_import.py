"""Importing a model package through the worker's "import" job, as the DLSegmentation module does
(mrml/model_import.py), and segmenting with an imported multi-channel bundle (SegmentationLogic extra_volumes).

Real worker processes (the same `python -m MIADeepLearningLib.worker` the module starts), zoo-shaped bundles
(zoo_shaped.py: configs written in the zoo's formats, random weights) and a private model cache (MIADL_CACHE_DIR,
which the worker inherits), so nothing here touches the developer's own models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zoo_shaped

from MIADeepLearningLib import jobs, paths
from MIADeepLearningLib.engine import errors, registry
from MIADeepLearningLib.mrml.model_import import ModelImportRun, start_model_import

WORKER_TIMEOUT_S = 300.0
BRATS_ID = "tiny_brats_mri_segmentation"
BRATS_SEGMENTS = [(1, "Tumor core"), (2, "Whole tumor"), (4, "Enhancing tumor")]  # the bundle's Lambdad values


def _one_sentence(message: str) -> bool:
    return bool(message) and "\n" not in message and "Traceback" not in message and message.endswith(".")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A private model cache for this process and the workers it starts; no extra model folders."""
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(registry.EXTRA_MODELS_ENV, raising=False)
    return tmp_path / "cache" / "models"


def _installed(cache: Path) -> list[str]:
    """The folders in the model cache (staging leftovers included)."""
    return sorted(path.name for path in cache.iterdir()) if cache.exists() else []


def _start(package: Path, jobs_root: Path, replace: bool = False,
           events: list[jobs.Event] | None = None) -> ModelImportRun:
    return start_model_import(package, replace=replace, jobs_root=jobs_root, timeout_s=WORKER_TIMEOUT_S,
                              on_event=events.append if events is not None else None)


def _import(package: Path, jobs_root: Path, replace: bool = False, events: list[jobs.Event] | None = None) -> dict:
    run = _start(package, jobs_root, replace, events)
    run.wait()
    return run.finish()


def _failed_import(package: Path, jobs_root: Path, error_class: type) -> errors.MIADLError:
    run = _start(package, jobs_root)
    run.wait()
    with pytest.raises(error_class) as caught:
        run.finish()
    return caught.value


def test_zoo_zip_is_imported_by_the_worker_job(tmp_path, cache):
    package = zoo_shaped.write_bundle(tmp_path / "downloads", "spleen", zip_release=True)
    events: list[jobs.Event] = []
    summary = _import(package, tmp_path / "jobs", events=events)

    assert summary["id"] == "tiny_spleen_ct_segmentation" and summary["task"] == "segmentation"
    assert summary["origin_kind"] == "imported" and summary["origin"] == "import"
    assert summary["segments"] == ["spleen"] and summary["version"] == "0.1.0"
    assert Path(summary["package_dir"]).parent == cache and _installed(cache) == ["tiny_spleen_ct_segmentation-0.1.0"]
    model = registry.get_model(summary["id"])  # this process sees what the worker installed
    assert model.origin_kind == "imported" and model.package_dir == Path(summary["package_dir"])
    assert registry.read_install_marker(model.package_dir)["trust"]["confirmed"] is True
    stages = [event.stage for event in events]
    assert "import" in stages and stages[-1] == jobs.STAGE_DONE, stages
    assert not list((tmp_path / "jobs").iterdir()), "the job folder was left behind"


def test_detection_bundle_is_refused_in_one_sentence(tmp_path, cache):
    package = zoo_shaped.write_bundle(tmp_path / "downloads", "detection", zip_release=True)
    error = _failed_import(package, tmp_path / "jobs", errors.ModelError)
    assert not isinstance(error, errors.MissingPackages)
    assert _one_sentence(str(error)) and "detection" in str(error).lower(), str(error)
    assert _installed(cache) == [] and not list((tmp_path / "jobs").iterdir())
    with pytest.raises(errors.ModelError):
        registry.get_model("tiny_lung_nodule_ct_detection")


def test_missing_optional_package_is_named_with_its_requirement(tmp_path, cache):
    package = zoo_shaped.write_bundle(tmp_path / "downloads", "optional_network")
    error = _failed_import(package, tmp_path / "jobs", errors.MissingPackages)
    assert isinstance(error, errors.ModelError) and "Traceback" not in str(error)
    assert any(requirement.startswith(zoo_shaped.ABSENT_MODULE) for requirement in error.requirements), \
        error.requirements
    assert zoo_shaped.ABSENT_MODULE in str(error)
    assert _installed(cache) == []


def test_replace_swaps_a_changed_package_of_the_same_id(tmp_path, cache):
    first = zoo_shaped.write_bundle(tmp_path / "v1", "spleen", zip_release=True)
    assert _import(first, tmp_path / "jobs")["version"] == "0.1.0"
    second = zoo_shaped.write_bundle(tmp_path / "v2", zoo_shaped.spleen_like(version="0.2.0"), zip_release=True, seed=7)

    error = _failed_import(second, tmp_path / "jobs", errors.ModelError)  # without replace: refused, old one kept
    assert "already installed" in str(error) and _one_sentence(str(error)), str(error)
    assert _installed(cache) == ["tiny_spleen_ct_segmentation-0.1.0"]

    summary = _import(second, tmp_path / "jobs", replace=True)
    assert (summary["id"], summary["version"]) == ("tiny_spleen_ct_segmentation", "0.2.0")
    assert _installed(cache) == ["tiny_spleen_ct_segmentation-0.2.0"]
    model = registry.get_model("tiny_spleen_ct_segmentation")
    assert model.version == "0.2.0"
    expected = zoo_shaped.file_hash(tmp_path / "v2" / "tiny_spleen_ct_segmentation" / "models" / "model.pt", "sha256")
    assert [weight.sha256 for weight in model.weights] == [expected]


# ------------------------------------------------------------------------------------- multi-channel segmentation


def _channel_volumes(count: int):
    """`count` MR-like volumes on one oblique, anisotropic, flipped grid (each its own contrast)."""
    import slicer

    matrix = zoo_shaped.phantom_ijk_to_ras()
    names = ["T1c", "T1", "T2", "FLAIR"]
    return [slicer.util.addVolumeFromArray(
        zoo_shaped.phantom_voxels((34, 30, 12), modality="MR", seed=index, contrast=1.0 - 0.3 * index),
        ijkToRAS=matrix, name=f"case {names[index]}") for index in range(count)]


def _labelmap_matrix(segment) -> np.ndarray:
    import vtk

    labelmap = segment.GetRepresentation("Binary labelmap")
    world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(world)
    return np.array([[world.GetElement(row, column) for column in range(4)] for row in range(4)])


def test_imported_brats_bundle_segments_four_volumes(scene, tmp_path, cache):
    import slicer

    from MIADeepLearningLib.mrml.provenance import get_provenance
    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic
    from MIADeepLearningLib.mrml.segmentations import label_array
    from MIADeepLearningLib.mrml.volumes import ijk_to_ras

    summary = _import(zoo_shaped.write_bundle(tmp_path / "downloads", "brats", zip_release=True), tmp_path / "jobs")
    assert summary["id"] == BRATS_ID and summary["segments"] == [name for _, name in BRATS_SEGMENTS]
    model = registry.get_model(BRATS_ID)
    assert model.input_channels == ["T1c", "T1", "T2", "FLAIR"]
    assert [(segment["value"], segment["name"]) for segment in model.segments] == BRATS_SEGMENTS

    volumes = _channel_volumes(4)
    jobs_root = tmp_path / "segment-jobs"
    logic = SegmentationLogic(jobs_root=jobs_root)
    result = logic.run(volumes[0], BRATS_ID, device="cpu", extra_volumes=volumes[1:], timeout_s=WORKER_TIMEOUT_S)

    node = result.segmentation_node
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]
    assert names == [name for _, name in BRATS_SEGMENTS], names
    grid = ijk_to_ras(volumes[0])
    shape = slicer.util.arrayFromVolume(volumes[0]).shape
    masks = {}
    for name in names:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
        masks[name] = label_array(node, name, volumes[0])
        assert masks[name].shape == shape
        if masks[name].any():  # an empty segment has no extent of its own
            assert np.abs(_labelmap_matrix(segment) - grid).max() < 1e-6, f"{name} is not on the input grid"
    assert any(mask.any() for mask in masks.values()), "the bundle labelled nothing"
    overlap = sum(mask.astype(int) for mask in masks.values())
    assert overlap.max() <= 1, "segments of one label file overlap"
    provenance = get_provenance(node)
    assert provenance["model_id"] == BRATS_ID and provenance["input_node"] == "case T1c"
    assert provenance["extra_input_nodes"] == ["case T1", "case T2", "case FLAIR"]
    assert not list(jobs_root.iterdir()), "the job folder was left behind"

    # refused before any job starts: the wrong number of channels, or one volume in two channels
    nodes_before = scene.GetNumberOfNodes()
    for extras, words in (
        (volumes[1:3], ("T1c, T1, T2, FLAIR", "2 given")),
        ([], ("T1c, T1, T2, FLAIR", "0 given")),
        ([volumes[1], volumes[2], volumes[2]], ("case T2", "twice")),
        ([volumes[0], volumes[2], volumes[3]], ("case T1c", "twice")),
    ):
        with pytest.raises(errors.InputError) as caught:
            logic.start(volumes[0], BRATS_ID, device="cpu", extra_volumes=extras)
        message = str(caught.value)
        assert _one_sentence(message) and all(word in message for word in words), message
        assert not list(jobs_root.iterdir()), "a job was started"
        assert scene.GetNumberOfNodes() == nodes_before


def test_bundle_settings_and_weights_reach_the_run_and_its_provenance(scene, tmp_path, cache):
    """The module's "Bundle settings" and "Weights file" arrive as the run's model options: the bundle runs with
    them and the provenance on the segmentation records both."""
    from MIADeepLearningLib.mrml.provenance import get_provenance
    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic

    summary = _import(zoo_shaped.write_bundle(tmp_path / "downloads", "spleen", zip_release=True), tmp_path / "jobs")
    (volume,) = _channel_volumes(1)
    options = {"overrides": {"inferer#overlap": 0.5}, "weights": "model.pt"}
    result = SegmentationLogic(jobs_root=tmp_path / "segment-jobs").run(
        volume, summary["id"], device="cpu", model_options=options, timeout_s=WORKER_TIMEOUT_S)
    pipeline = get_provenance(result.segmentation_node)["pipeline"]
    assert pipeline["config_overrides"] == {"inferer#overlap": 0.5}, pipeline
    assert pipeline["window"]["overlap"] == 0.5 and pipeline["weights_file"] == "model.pt", pipeline
