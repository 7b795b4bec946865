"""Volume export/import: exact geometry against SimpleITK, untouched user nodes, clear refusals of bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import rotation

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
SPACING = np.array([0.7, 1.3, 3.0])




# Direction cosines (columns = where the i, j, k axes point in RAS) for the grids the engine must survive.
DIRECTIONS = {
    "anisotropic": np.eye(3),
    "oblique": rotation(0, 30.0) @ rotation(2, 30.0),  # ~30 degrees about two axes
    "flipped": np.diag([-1.0, 1.0, 1.0]),  # left-handed: Slicer's reader reverses the slices of such grids
    "flipped_two": np.diag([1.0, -1.0, -1.0]),
    "permuted": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),  # i->A, j->S, k->R
    "permuted_flipped": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
}


def _ijk_to_ras(kind: str) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = DIRECTIONS[kind] @ np.diag(SPACING)
    matrix[:3, 3] = [12.5, -30.25, 7.125]
    return matrix


def _volume(kind: str, name: str = "input", dtype=np.float32, shape=(6, 7, 8)):
    import slicer

    voxels = np.random.default_rng(0).normal(100, 20, size=shape).astype(dtype)
    node = slicer.util.addVolumeFromArray(voxels, ijkToRAS=_ijk_to_ras(kind), name=name)
    return node, voxels


def _sitk_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    matrix = np.eye(4)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin())
    return matrix


def _node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


@pytest.mark.parametrize("kind", sorted(DIRECTIONS))
def test_export_matches_simpleitk_voxels_and_geometry(scene, tmp_path, kind):
    from MIADeepLearningLib.mrml import volumes

    node, voxels = _volume(kind)
    path = volumes.export_volume(node, tmp_path / "input.nrrd")
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (8, 7, 6)
    assert np.array_equal(sitk.GetArrayFromImage(image), voxels)
    assert np.allclose(image.GetSpacing(), SPACING, atol=1e-9)
    # LPS geometry in the file = the node's RAS geometry, converted once by Slicer's writer
    assert np.abs(_sitk_ijk_to_ras(image) - _ijk_to_ras(kind)).max() < 1e-9
    assert np.abs(volumes.ijk_to_ras(node) - _ijk_to_ras(kind)).max() < 1e-12


@pytest.mark.parametrize("kind", sorted(DIRECTIONS))
def test_exported_file_reads_back_onto_the_input_grid(scene, tmp_path, kind):
    import slicer

    from MIADeepLearningLib.mrml import volumes

    node, voxels = _volume(kind)
    path = volumes.export_volume(node, tmp_path / "input.nrrd")
    back = volumes.read_volume_file(path, "back", reference=node)
    assert back.GetName() == "back"
    assert back.GetScene() is scene
    assert back.GetStorageNode() is None  # no link to the (temporary) job folder
    assert back.GetDisplayNode() is not None
    assert np.abs(volumes.ijk_to_ras(back) - volumes.ijk_to_ras(node)).max() < 1e-6
    assert np.array_equal(slicer.util.arrayFromVolume(back), voxels)


@pytest.mark.parametrize("kind", ["flipped", "permuted_flipped"])
def test_slicer_reader_keeps_voxel_positions_of_left_handed_grids(scene, tmp_path, kind):
    """Why read_volume_file re-indexes: Slicer's own reader may reorder a left-handed grid's slices, but every
    voxel value must stay at its physical position."""
    import slicer

    from MIADeepLearningLib.mrml import headless, volumes

    node, voxels = _volume(kind)
    loaded = headless.load_volume(volumes.export_volume(node, tmp_path / "input.nrrd"))
    loaded_voxels = slicer.util.arrayFromVolume(loaded)
    k, j, i = np.meshgrid(*[np.arange(n) for n in voxels.shape], indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    ras = volumes.ijk_to_ras(node) @ ijk
    loaded_ijk = np.rint(np.linalg.inv(volumes.ijk_to_ras(loaded)) @ ras).astype(int)
    assert np.array_equal(loaded_voxels[loaded_ijk[2], loaded_ijk[1], loaded_ijk[0]], voxels.ravel())


def test_export_preserves_integer_type(scene, tmp_path):
    from MIADeepLearningLib.mrml import volumes

    node, voxels = _volume("oblique", dtype=np.int16)
    image = sitk.ReadImage(str(volumes.export_volume(node, tmp_path / "int.nrrd")))
    assert image.GetPixelID() == sitk.sitkInt16
    assert np.array_equal(sitk.GetArrayFromImage(image), voxels)


def test_export_leaves_the_node_and_scene_untouched(scene, tmp_path):
    from MIADeepLearningLib.mrml import headless, volumes

    original, _ = _volume("oblique", name="original")
    saved = headless.save_node(original, tmp_path / "original.nrrd")
    node = headless.load_volume(saved, name="loaded")  # a node with its own storage node and file name
    storage = node.GetStorageNode()

    def state():
        return (node.GetMTime(), node.GetImageData().GetMTime(), node.GetStorageNodeID(), storage.GetFileName(),
                storage.GetMTime(), node.GetModifiedSinceRead(), node.GetName())

    before = state()
    ids = _node_ids(scene)
    volumes.export_volume(node, tmp_path / "job" / "input.nrrd")
    assert (tmp_path / "job" / "input.nrrd").is_file()
    assert state() == before
    assert _node_ids(scene) == ids


def test_export_refuses_a_transformed_volume(scene, tmp_path):
    from MIADeepLearningLib.engine.errors import InputError
    from MIADeepLearningLib.mrml import volumes

    node, _ = _volume("anisotropic", name="moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(InputError, match="'moved' is under the transform 'shift'; harden"):
        volumes.export_volume(node, tmp_path / "x.nrrd")
    assert not (tmp_path / "x.nrrd").exists()


def test_read_off_grid_result_raises_and_adds_nothing(scene, tmp_path):
    import slicer

    from MIADeepLearningLib.mrml import volumes

    node, voxels = _volume("oblique")
    shifted_matrix = _ijk_to_ras("oblique")
    shifted_matrix[0, 3] += 0.5  # half a millimetre off
    other = slicer.util.addVolumeFromArray(voxels, ijkToRAS=shifted_matrix, name="other")
    smaller = slicer.util.addVolumeFromArray(voxels[:, :, :7].copy(), ijkToRAS=_ijk_to_ras("oblique"), name="small")
    for source in (other, smaller):
        path = volumes.export_volume(source, tmp_path / f"{source.GetName()}.nrrd")
        ids = _node_ids(scene)
        with pytest.raises(RuntimeError, match="not on the grid of the input volume 'input'"):
            volumes.read_volume_file(path, "result", reference=node)
        assert _node_ids(scene) == ids
    with pytest.raises(RuntimeError, match="does not exist"):
        volumes.read_volume_file(tmp_path / "missing.nrrd", "result", reference=node)


def test_read_labelmap_without_reference(scene, tmp_path):
    import slicer

    from MIADeepLearningLib.mrml import volumes

    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:4, 2:5] = 3
    source = slicer.util.addVolumeFromArray(labels, ijkToRAS=_ijk_to_ras("permuted"), name="labels")
    path = volumes.export_volume(source, tmp_path / "labels.nrrd")
    node = volumes.read_volume_file(path, "labels back", labelmap=True)
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    assert np.array_equal(slicer.util.arrayFromVolume(node), labels)
    assert np.abs(volumes.ijk_to_ras(node) - _ijk_to_ras("permuted")).max() < 1e-6


def test_place_beside_puts_the_result_in_the_input_folder(scene):
    import slicer

    from MIADeepLearningLib.mrml import volumes

    node, _ = _volume("anisotropic")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    sh.SetItemParent(sh.GetItemByDataNode(node), study)
    result = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "result")
    assert sh.GetItemParent(sh.GetItemByDataNode(result)) == sh.GetSceneItemID()
    volumes.place_beside(result, node)
    assert sh.GetItemParent(sh.GetItemByDataNode(result)) == study


# --- check_input_volume ------------------------------------------------------------------------------------------


def _assert_one_sentence(message: str, *fragments: str) -> None:
    assert message.endswith(".") and message.count(". ") == 0, message
    for fragment in fragments:
        assert fragment in message, message


def test_check_input_volume_accepts_a_3d_scalar_volume(scene):
    from MIADeepLearningLib.mrml import volumes

    node, _ = _volume("oblique")
    assert volumes.check_input_volume(node) is None


def test_check_input_volume_rejects_each_bad_case_clearly(scene):
    import slicer
    import vtk

    from MIADeepLearningLib.engine.errors import InputError
    from MIADeepLearningLib.mrml import volumes

    def message(node) -> str:
        with pytest.raises(InputError) as info:
            volumes.check_input_volume(node)
        return str(info.value)

    _assert_one_sentence(message(None), "No input volume is selected")

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    _assert_one_sentence(message(segmentation), "'my segmentation'", "not a scalar volume")

    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    _assert_one_sentence(message(empty), "'empty'", "no image data")

    flat = slicer.util.addVolumeFromArray(np.ones((1, 20, 30), np.float32), name="single slice")
    _assert_one_sentence(message(flat), "'single slice' is 2D", "30×20×1", "needs a 3D volume")

    rgb = vtk.vtkImageData()
    rgb.SetDimensions(5, 6, 7)
    rgb.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour photo")
    vector.SetAndObserveImageData(rgb)
    _assert_one_sentence(message(vector), "'colour photo' has 3 components per voxel", "single scalar volume")

    two = vtk.vtkImageData()
    two.SetDimensions(5, 6, 7)
    two.AllocateScalars(vtk.VTK_FLOAT, 2)
    scalar_with_two = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "two channels")
    scalar_with_two.SetAndObserveImageData(two)
    _assert_one_sentence(message(scalar_with_two), "'two channels' has 2 components per voxel")

    moved, _ = _volume("anisotropic", name="moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    moved.SetAndObserveTransformNodeID(transform.GetID())
    _assert_one_sentence(message(moved), "'moved' is under the transform 'registration'", "harden")


def test_check_input_volume_rejects_a_sequence_frame(scene):
    import slicer

    from MIADeepLearningLib.engine.errors import InputError
    from MIADeepLearningLib.mrml import volumes

    frame, _ = _volume("anisotropic", name="frame")
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine")
    sequence.SetDataNodeAtValue(frame, "0")
    sequence.SetDataNodeAtValue(frame, "1")
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "cine browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    slicer.modules.sequences.logic().UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(sequence)
    assert proxy is not None
    with pytest.raises(InputError, match="one frame of a 4D sequence"):
        volumes.check_input_volume(proxy)
    volumes.check_input_volume(frame)  # the plain node is fine


# --- odd inputs a clinician may pick: label maps, warps, multi-volumes, colour ------------------------------------


def _refusal(node) -> str:
    from MIADeepLearningLib.engine.errors import InputError
    from MIADeepLearningLib.mrml import volumes

    with pytest.raises(InputError) as info:
        volumes.check_input_volume(node)
    return str(info.value)


def test_check_input_volume_refuses_a_label_map_and_says_how_to_convert_it(scene):
    import slicer

    labels = slicer.util.addVolumeFromArray(np.arange(6 * 7 * 8, dtype=np.uint8).reshape(6, 7, 8) % 4,
                                            ijkToRAS=_ijk_to_ras("oblique"), name="brain labels",
                                            nodeClassName="vtkMRMLLabelMapVolumeNode")
    assert labels.IsA("vtkMRMLScalarVolumeNode")  # a scalar volume subclass: the class check alone lets it through
    message = _refusal(labels)
    _assert_one_sentence(message, "'brain labels' is a label map", "not an image",
                         "Volumes module (Volume Information > Convert to scalar volume)")


def test_check_input_volume_refuses_a_colour_volume_and_names_the_converter(scene):
    import vtk

    rgb = vtk.vtkImageData()
    rgb.SetDimensions(5, 6, 7)
    rgb.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    photo = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "RGB photo")
    photo.SetAndObserveImageData(rgb)
    _assert_one_sentence(_refusal(photo), "'RGB photo' has 3 components per voxel", "single scalar volume",
                         "convert it first (Vector to Scalar Volume module)")


def test_check_input_volume_names_a_multi_volume_as_4d(scene):
    """slicer-core has no vtkMRMLMultiVolumeNode (it comes with the MultiVolumeExplorer extension), so a node that
    answers IsA like one stands in: a scalar volume subclass whose components are its frames."""
    import slicer
    import vtk

    frames = vtk.vtkImageData()
    frames.SetDimensions(5, 6, 7)
    frames.AllocateScalars(vtk.VTK_SHORT, 12)
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName("DCE series")
    node.SetAndObserveImageData(frames)
    node.IsA = lambda name: name == "vtkMRMLMultiVolumeNode" or slicer.vtkMRMLScalarVolumeNode.IsA(node, name)
    _assert_one_sentence(_refusal(node), "'DCE series' is a 4D multi-volume (12 frames)", "one 3D scalar volume",
                         "extract the frame")


def _warp(scene, name: str):
    from MIADeepLearningLib.mrml import transforms

    field = np.zeros((4, 5, 6, 3))
    field[..., 0] = 1.5
    return transforms.grid_transform_node_from_field(field, (0.0, 0.0, 0.0), (10.0, 10.0, 10.0), np.eye(3), name,
                                                     scene)


def _bspline(scene, name: str):
    import slicer
    import vtk

    coefficients = vtk.vtkImageData()
    coefficients.SetDimensions(4, 4, 4)
    coefficients.SetSpacing(20.0, 20.0, 20.0)
    coefficients.AllocateScalars(vtk.VTK_DOUBLE, 3)
    coefficients.GetPointData().GetScalars().Fill(0.5)
    transform = slicer.vtkOrientedBSplineTransform()
    transform.SetCoefficientData(coefficients)
    node = scene.AddNewNodeByClass("vtkMRMLBSplineTransformNode", name)
    node.SetAndObserveTransformFromParent(transform)
    return node


@pytest.mark.parametrize("kind", ["grid", "bspline", "linear under a grid"])
def test_a_volume_under_a_non_linear_transform_is_refused_with_the_right_words(scene, tmp_path, kind):
    from MIADeepLearningLib.engine.errors import InputError
    from MIADeepLearningLib.mrml import volumes

    node, _ = _volume("anisotropic", name="moving")
    if kind == "bspline":
        parent = _bspline(scene, "warp")
    else:
        parent = _warp(scene, "warp")
    if kind == "linear under a grid":  # the chain to the world is non-linear although the node's own is linear
        linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
        linear.SetAndObserveTransformNodeID(parent.GetID())
        parent = linear
    node.SetAndObserveTransformNodeID(parent.GetID())
    assert not parent.IsTransformToWorldLinear()
    message = _refusal(node)
    _assert_one_sentence(message, f"'moving' is under the non-linear transform '{parent.GetName()}'",
                         "harden the transform (Data module, right-click > Harden transform",
                         "resamples the volume onto a new grid")
    with pytest.raises(InputError, match="non-linear transform"):  # the export refuses it in the same words
        volumes.export_volume(node, tmp_path / "x.nrrd")
    assert not (tmp_path / "x.nrrd").exists()
    node.SetAndObserveTransformNodeID(None)
    assert volumes.check_input_volume(node) is None  # hardened (or taken out): accepted


def test_a_linear_transform_keeps_the_plain_harden_message(scene):
    node, _ = _volume("anisotropic", name="moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    node.SetAndObserveTransformNodeID(transform.GetID())
    message = _refusal(node)
    _assert_one_sentence(message, "'moved' is under the transform 'registration'", "harden")
    assert "non-linear" not in message


# --- disk space of the job folder ----------------------------------------------------------------------------------


def test_nrrd_size_is_what_the_export_writes(scene, tmp_path):
    from MIADeepLearningLib.mrml import volumes

    node, _ = _volume("oblique", dtype=np.int16, shape=(9, 10, 11))
    path = volumes.export_volume(node, tmp_path / "input.nrrd")
    assert 9 * 10 * 11 * 2 < path.stat().st_size <= volumes.nrrd_bytes(node) < path.stat().st_size + 4096


def test_export_refuses_when_the_job_folder_drive_is_too_full(scene, tmp_path, monkeypatch):
    from MIADeepLearningLib.engine.errors import InputError
    from MIADeepLearningLib.mrml import volumes

    node, _ = _volume("oblique", dtype=np.int16, shape=(9, 10, 11), name="whole body")
    needed = volumes.nrrd_bytes(node)
    folders = []

    def free_bytes(folder) -> int:
        folders.append(folder)
        return needed - 1

    monkeypatch.setattr(volumes, "free_disk_bytes", free_bytes)
    with pytest.raises(InputError) as refused:
        volumes.export_volume(node, tmp_path / "job" / "input.nrrd")
    _assert_one_sentence(str(refused.value), "Handing 'whole body' to the model needs 0.00 GB of disk space in the "
                                             f"job folder {tmp_path / 'job'}", "is free on that drive", "TMPDIR")
    assert folders == [tmp_path / "job"] and not (tmp_path / "job" / "input.nrrd").exists()
    monkeypatch.setattr(volumes, "free_disk_bytes", lambda folder: needed)  # exactly enough: written
    assert volumes.export_volume(node, tmp_path / "job" / "input.nrrd").is_file()


def test_a_too_full_drive_stops_the_module_before_a_job_folder_or_worker(scene, tmp_path, monkeypatch):
    from MIADeepLearningLib import runner
    from MIADeepLearningLib.engine.errors import InputError
    from MIADeepLearningLib.mrml import volumes
    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic

    node, _ = _volume("oblique", dtype=np.int16, shape=(9, 10, 11), name="whole body")
    started = []
    monkeypatch.setattr(runner, "start", lambda *args, **kwargs: started.append(args))
    monkeypatch.setattr(volumes, "free_disk_bytes", lambda folder: 1000)
    jobs_root = tmp_path / "jobs"
    ids = _node_ids(scene)
    with pytest.raises(InputError, match=r"'whole body' to the model needs .* disk space"):
        SegmentationLogic(jobs_root=jobs_root).start(node, "deepbet", device="cpu")
    assert started == [] and list(jobs_root.iterdir()) == [] and _node_ids(scene) == ids
