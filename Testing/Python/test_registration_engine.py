"""The registration engine (engine/registration.py, tasks.register_images) with the shipped brain-registration weights.

- The flow operations moved from training to engine/flow.py are the ones training uses, unchanged in behaviour.
- Exactness: the working grid, the working-grid -> fixed-grid conversion of the network's voxel displacement and the
  composition with the affine reproduce analytic mappings on oblique, anisotropic, flipped and permuted fixed grids
  (checked against SimpleITK's own index <-> physical maps), the network's velocity channels are the working grid's
  array axes, and the written .h5 warps exactly as SimpleITK's Resample with a DisplacementFieldTransform.
- Accuracy on a phantom pair (moving = fixed under a known shift and smooth deformation): Dice over the labels after
  registration against after the affine alone, and folding (% of det J <= 0).
- Inputs that cannot be registered are refused with one clear sentence.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import (
    REGISTRATION_GRIDS,
    grid_image,
    physical_points,
    registration_phantom_pair,
    rotation,
    smooth_field,
)

from MIADeepLearningLib.engine import affine, displacement, flow, geometry, registration, registry, tasks
from MIADeepLearningLib.engine.errors import InputError, ModelError

MODEL_ID = "brain-registration"
FOLDS_LIMIT = 0.1  # % of the fixed foreground where det J <= 0


def _pipeline(**options) -> registration.DeformableRegistration:
    model = registry.get_model(MODEL_ID)
    return registration.DeformableRegistration(model, registry.verified_weight_paths(model), torch.device("cpu"),
                                               {**model.slicer.get("options", {}), **options})


def _affine(center=(3.0, -4.0, 5.0)) -> sitk.AffineTransform:
    transform = sitk.AffineTransform(3)
    transform.SetCenter(center)
    transform.SetMatrix((rotation(2, 6.0) @ rotation(0, -4.0) @ np.diag([1.04, 0.97, 1.02])).ravel().tolist())
    transform.SetTranslation((2.5, -1.5, 3.0))
    return transform


def _apply(transform: sitk.AffineTransform, points: np.ndarray) -> np.ndarray:
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre, translation = np.asarray(transform.GetCenter()), np.asarray(transform.GetTranslation())
    return (points - centre) @ matrix.T + centre + translation


def _fixed(kind: str) -> sitk.Image:
    direction, spacing = REGISTRATION_GRIDS[kind]
    return grid_image(direction, spacing, (30, 26, 22))


def _voxel_displacement(grid: sitk.Image, field) -> np.ndarray:
    """(3, D, H, W) displacement in voxels of `grid` (channels z, y, x) of a physical field u(p), found through the
    inverse of SimpleITK's index -> physical map: index(p + u(p)) - index(p)."""
    points = physical_points(grid)
    to_index = np.linalg.inv(np.asarray(grid.GetDirection()).reshape(3, 3) @ np.diag(grid.GetSpacing()))
    index = (field(points)) @ to_index.T  # (D, H, W, 3) in (i, j, k): a linear map, so differences are exact
    return np.stack([index[..., 2], index[..., 1], index[..., 0]])


# ------------------------------------------------------------------------------------------------ (a) flow.py


def test_training_integrates_and_warps_with_the_engine_flow():
    from MIADeepLearningLib.training import spatial, train_registration

    assert spatial.integrate_velocity is flow.integrate_velocity and spatial.warp is flow.warp
    assert train_registration.integrate_velocity is flow.integrate_velocity
    assert train_registration.warp is flow.warp


def test_constant_velocity_integrates_to_itself_and_warps_as_a_shift():
    velocity = torch.zeros(3, 12, 10, 14)
    velocity[0], velocity[1], velocity[2] = 2.0, -1.0, 3.0
    displacement_ = flow.integrate_velocity(velocity, 7)
    assert torch.allclose(displacement_, velocity, atol=1e-5)
    volume = torch.arange(12 * 10 * 14, dtype=torch.float32).reshape(1, 12, 10, 14)
    warped = flow.warp(volume, displacement_.round())
    # x samples x + (2, -1, 3): away from the border that is the volume shifted by that many voxels
    assert torch.allclose(warped[0, :-2, 1:, :-3], volume[0, 2:, :-1, 3:], atol=1e-3)  # float32 grid coordinates
    assert torch.allclose(flow.warp(volume, torch.zeros(3, 12, 10, 14)), volume, atol=1e-3)


def test_integration_is_differentiable_and_gives_an_invertible_map():
    generator = torch.Generator().manual_seed(3)
    velocity = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4, 4, generator=generator) * 1.5,
                                               size=(20, 20, 20), mode="trilinear", align_corners=True)[0]
    velocity.requires_grad_(True)
    forward = flow.integrate_velocity(velocity)
    forward.square().sum().backward()
    assert velocity.grad is not None and velocity.grad.abs().sum() > 0
    backward = flow.integrate_velocity(-velocity.detach())
    round_trip = (backward + flow.warp(forward.detach(), backward))[:, 4:-4, 4:-4, 4:-4].abs()
    assert float(forward.detach().abs().max()) > 2.0, "the test field must move voxels by a few voxels"
    assert float(round_trip.max()) < 0.25 and float(round_trip.mean()) < 0.03, "forward after backward: identity"


# ------------------------------------------------------------------------------------------- (b) exactness


@pytest.mark.parametrize("kind", sorted(REGISTRATION_GRIDS))
def test_working_grid_covers_the_fixed_image_in_lia_axes(kind):
    fixed = _fixed(kind)
    grid = registration.working_grid(fixed, 2.0, "LIA", 8)
    assert all(n % 8 == 0 for n in grid.GetSize()) and grid.GetSpacing() == (2.0, 2.0, 2.0)
    axes = np.asarray(grid.GetDirection()).reshape(3, 3)
    cosines = np.sum(axes * geometry.orientation_axes("LIA"), axis=0)  # each grid axis against L, I, A
    assert np.all(cosines > 0.7), cosines
    # every fixed voxel centre lies strictly inside the working grid's voxel centres: interpolation, never
    # extrapolation, when the field comes back onto the fixed grid
    size = np.asarray(fixed.GetSize()) - 1
    for corner in np.array(np.meshgrid(*[[0, 1]] * 3, indexing="ij")).reshape(3, -1).T * size:
        point = fixed.TransformContinuousIndexToPhysicalPoint([float(v) for v in corner])
        index = np.asarray(grid.TransformPhysicalPointToContinuousIndex(point))
        assert np.all(index > 0.0) and np.all(index < np.asarray(grid.GetSize()) - 1.0), (corner, index)


@pytest.mark.parametrize("kind", sorted(REGISTRATION_GRIDS))
def test_voxel_displacement_becomes_lps_millimetres(kind):
    grid = registration.working_grid(_fixed(kind), 2.0, "LIA", 8)
    shape = tuple(reversed(grid.GetSize()))
    start = [3.0, 2.0, 1.0]
    origin = np.asarray(grid.TransformContinuousIndexToPhysicalPoint(start))
    for channel in range(3):  # channel c of the network's output moves along array axis c = index axis 2 - c
        voxels = np.zeros((3, *shape))
        voxels[channel] = 1.5
        vectors = registration.physical_displacement(voxels, grid)
        step = list(start)
        step[2 - channel] += 1.5
        expected = np.asarray(grid.TransformContinuousIndexToPhysicalPoint(step)) - origin
        np.testing.assert_allclose(vectors[1, 2, 3], expected, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(REGISTRATION_GRIDS))
def test_conversion_and_composition_reproduce_the_analytic_mapping(kind):
    """A known working-grid voxel displacement -> the field on the fixed grid (LPS mm) -> composed with an affine:
    equal to A(p + u(p)) - p at every fixed voxel; exact (1e-9 mm) for a linear u, within interpolation error of a
    2 mm grid for a smooth one."""
    fixed = _fixed(kind)
    grid = registration.working_grid(fixed, 2.0, "LIA", 8)
    transform = _affine()
    points = physical_points(fixed)
    matrix = rotation(1, 3.0) @ np.diag([1.02, 0.99, 1.01]) - np.eye(3)

    def linear(p):
        return (p - np.array([3.0, -4.0, 5.0])) @ matrix.T + np.array([1.5, -2.0, 0.5])

    on_fixed = registration.field_on_fixed(_voxel_displacement(grid, linear), grid, fixed)
    assert np.abs(on_fixed - linear(points)).max() < 1e-9
    total = sitk.GetArrayFromImage(registration.total_field(transform, fixed, _voxel_displacement(grid, linear),
                                                            grid))
    assert np.abs(total - (_apply(transform, points + linear(points)) - points)).max() < 1e-9

    def smooth(p):  # helpers.smooth_field's formula, evaluated anywhere
        q = p - np.array([3.0, -4.0, 5.0])
        return np.stack([3.0 * np.sin(q[..., 1] / 9.0) + 1.0,
                         2.5 * np.cos(q[..., 2] / 11.0) - 0.5 * np.sin(q[..., 0] / 7.0),
                         2.0 * np.sin((q[..., 0] + q[..., 1]) / 13.0)], axis=-1)

    np.testing.assert_allclose(smooth(points), smooth_field(fixed))
    total = sitk.GetArrayFromImage(registration.total_field(transform, fixed, _voxel_displacement(grid, smooth),
                                                            grid))
    error = np.linalg.norm(total - (_apply(transform, points + smooth(points)) - points), axis=-1)
    assert error.max() < 0.06, error.max()  # second derivatives <= 3/81 mm^-1: linear interpolation error on 2 mm


def test_without_a_displacement_the_field_is_the_affine():
    fixed = _fixed("left_handed")
    points = physical_points(fixed)
    field = sitk.GetArrayFromImage(registration.total_field(_affine(), fixed))
    assert np.abs(field - (_apply(_affine(), points) - points)).max() < 1e-9


class _ConstantVelocity(torch.nn.Module):
    """Stands in for the network: the same velocity (voxels, channels z, y, x) everywhere."""

    size_multiple = 8

    def __init__(self, velocity: tuple[float, float, float]):
        super().__init__()
        self.velocity = torch.tensor(velocity).view(1, 3, 1, 1, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        assert inputs.shape[:2] == (1, 2) and all(n % 8 == 0 for n in inputs.shape[2:])
        return self.velocity.expand(1, 3, *inputs.shape[2:]).clone()


def test_pipeline_reads_the_velocity_channels_as_working_grid_array_axes():
    """A constant velocity integrates to itself; through the whole pipeline it must come out as that many working
    voxels along the working grid's array axes (SimpleITK's index map), composed with the affine it found."""
    fixed, _, moving, _ = registration_phantom_pair()
    pipeline = _pipeline()
    pipeline.network = _ConstantVelocity((1.0, -2.0, 0.5))
    result = pipeline.register(fixed, moving)
    grid = pipeline.working_grid(fixed)
    origin = np.asarray(grid.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, 0.0]))
    shift = np.asarray(grid.TransformContinuousIndexToPhysicalPoint([0.5, -2.0, 1.0])) - origin  # (i, j, k)
    points = physical_points(fixed)
    expected = _apply(result["affine"], points + shift) - points
    assert np.abs(sitk.GetArrayFromImage(result["field"]) - expected).max() < 1e-4
    assert result["field"].GetSize() == fixed.GetSize() and result["field"].GetPixelID() == sitk.sitkVectorFloat64
    np.testing.assert_allclose(result["field"].GetDirection(), fixed.GetDirection())
    assert result["provenance"]["working_grid"]["size"] == list(grid.GetSize())


def test_written_transform_warps_exactly_as_simpleitk(tmp_path):
    fixed, _, moving, moving_labels = registration_phantom_pair()
    grid = registration.working_grid(fixed, 2.0, "LIA", 8)
    field = registration.total_field(_affine(), fixed, _voxel_displacement(grid, lambda p: 0.05 * np.sin(p)), grid)
    path = displacement.write_field(field, tmp_path / "transform.h5")
    read = displacement.read_field(path)
    stored = read.GetDisplacementField()
    assert stored.GetSize() == fixed.GetSize()
    np.testing.assert_allclose(stored.GetOrigin(), fixed.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(stored.GetSpacing(), fixed.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(stored.GetDirection(), fixed.GetDirection(), atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), sitk.GetArrayFromImage(field))
    reference = sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(sitk.Image(field)), sitk.sitkLinear,
                              0.0, sitk.sitkFloat32)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(displacement.warp_image(moving, fixed, read)),
                                  sitk.GetArrayFromImage(reference))
    labels = displacement.warp_labels(moving_labels, fixed, read)
    assert labels.GetPixelID() == moving_labels.GetPixelID()
    values = set(np.unique(sitk.GetArrayViewFromImage(labels)))
    assert values <= set(np.unique(sitk.GetArrayViewFromImage(moving_labels))) and len(values) > 5


# ------------------------------------------------------------------------------- (c), (d) accuracy, identity


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    """The phantom pair as files: fixed on an oblique anisotropic grid, moving (same and inverted contrast) under a
    known shift and deformation, with label maps."""
    folder = tmp_path_factory.mktemp("registration-phantom")
    paths = {}
    for contrast in ("t1", "t2"):
        fixed, fixed_labels, moving, moving_labels = registration_phantom_pair(t2=contrast == "t2")
        for name, image in (("fixed", fixed), ("fixed_labels", fixed_labels), (f"moving_{contrast}", moving),
                            ("moving_labels", moving_labels)):
            paths[name] = folder / f"{name}.nrrd"
            sitk.WriteImage(image, str(paths[name]))
    return paths


def _register(files, moving: str = "moving_t1", **options) -> tasks.RegistrationOutput:
    return tasks.register_images(files["fixed"], files[moving], MODEL_ID, device="cpu", options=options or None,
                                 moving_labels_path=files["moving_labels"], fixed_labels_path=files["fixed_labels"])


@pytest.fixture(scope="module")
def network_only(phantom_files):
    return _register(phantom_files)


@pytest.fixture(scope="module")
def refined(phantom_files):
    return _register(phantom_files, instance_steps=20)


def test_report_describes_the_total_field_and_the_labels(phantom_files, network_only):
    result = network_only
    fixed = sitk.ReadImage(str(phantom_files["fixed"]))
    report = result.report
    region = sitk.GetArrayFromImage(affine.foreground(fixed)) > 0
    stats = displacement.jacobian_stats(displacement.jacobian_determinant(result.field), region)
    assert report["jacobian_non_positive_percent"] == pytest.approx(stats.non_positive_percent, abs=1e-6)
    assert report["jacobian_log_std"] == pytest.approx(stats.log_std, abs=1e-6)
    assert report["jacobian_mean"] == pytest.approx(stats.mean, abs=1e-6)
    assert report["jacobian_min"] <= report["jacobian_mean"] <= report["jacobian_max"]
    assert report["jacobian_voxels"] == int(region.sum()) and report["jacobian_region"] == "fixed foreground"
    labels = [str(value) for value in range(1, 8)]
    for key in ("dice", "dice_before", "dice_affine"):
        assert list(report[key]) == labels
        assert report[f"{key}_mean"] == pytest.approx(np.mean(list(report[key].values())), abs=1e-6)
    fixed_labels = sitk.ReadImage(str(phantom_files["fixed_labels"]))
    recomputed = displacement.dice_per_label(result.warped_labels, fixed_labels)
    assert report["dice"] == {str(k): pytest.approx(v, abs=1e-6) for k, v in recomputed.items()}
    for image in (result.warped, result.warped_labels, result.field):
        assert image.GetSize() == fixed.GetSize()
        np.testing.assert_allclose(image.GetOrigin(), fixed.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(image.GetDirection(), fixed.GetDirection(), atol=1e-9)
    assert result.warped.GetPixelID() == sitk.sitkFloat32
    assert result.warped_labels.GetPixelID() == sitk.sitkInt16
    assert set(np.unique(sitk.GetArrayViewFromImage(result.warped_labels))) <= set(range(8))
    assert report["dice_affine_mean"] > report["dice_before_mean"] + 0.05, "the affine corrects the shift"
    provenance = result.provenance
    assert provenance["model_id"] == MODEL_ID and provenance["inputs"]["moving"] == "moving_t1.nrrd"
    assert set(provenance["pipeline"]["timings"]) >= {"affine", "resample", "network", "field"}
    assert set(result.timings) >= {"load_model", "read_input", "checks", "inference", "postprocess"}


def test_instance_optimisation_improves_dice_over_the_affine_without_folding(refined):
    report = refined.report
    assert report["dice_mean"] > report["dice_affine_mean"] + 0.08, report
    assert report["jacobian_non_positive_percent"] < FOLDS_LIMIT
    info = refined.provenance["pipeline"]["instance_optimisation"]
    assert info["steps"] == 20 and info["dissimilarity_after"] < 0.5 * info["dissimilarity_before"]


def test_instance_optimisation_works_across_contrasts(phantom_files):
    """Moving with inverted tissue contrast (T2-like): MIND-SSC still finds the deformation. Measured with the 0.1.1
    weights: affine 0.710, network alone 0.671 (the phantom's inverted contrast misleads it), + 20 steps 0.731; so
    the refinement must gain on the network's answer and end above the affine's."""
    network = _register(phantom_files, "moving_t2").report
    report = _register(phantom_files, "moving_t2", instance_steps=20).report
    assert report["dice_mean"] > network["dice_mean"] + 0.04, (network, report)
    assert report["dice_mean"] > report["dice_affine_mean"] + 0.01, report
    assert report["jacobian_non_positive_percent"] < FOLDS_LIMIT


def test_instance_optimisation_runs_on_one_cpu_thread_and_restores_the_count(phantom_files, monkeypatch):
    """The refinement's steps (small tensors) gain almost no wall time from more threads (INSTANCE_CPU_THREADS): they
    run on one, the descriptors before them on all, and the process's thread count is restored afterwards, also
    when a step fails."""
    seen = []
    real = registration.integrate_velocity

    def recording(velocity, *args, **kwargs):
        if velocity.requires_grad:  # a refinement step (the network's and the final integrations need no gradient)
            seen.append(torch.get_num_threads())
        return real(velocity, *args, **kwargs)

    monkeypatch.setattr(registration, "integrate_velocity", recording)
    descriptors = []
    real_mind = registration.mind_ssc
    monkeypatch.setattr(registration, "mind_ssc", lambda *a, **k: descriptors.append(torch.get_num_threads())
                        or real_mind(*a, **k))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _register(phantom_files, instance_steps=2)
        assert seen == [1, 1] and descriptors == [2, 2] and torch.get_num_threads() == 2

        def failing(self):
            raise RuntimeError("refinement failed")

        monkeypatch.setattr(registration._Adam, "step", failing)
        with pytest.raises(RuntimeError, match="refinement failed"):
            _register(phantom_files, instance_steps=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("options", [{"instance_sampling": 1.0}, {"instance_resolution": "half"},
                                     {"instance_resolution": "half", "instance_sampling": 1.0}],
                         ids=["dense", "half-sampled", "half-dense"])
def test_every_refinement_variant_improves_dice_without_folding(phantom_files, options):
    """The package's refinement reads the similarity at a random share of the foreground per step (the `refined`
    fixture); dense (every voxel) and half-resolution descriptors are the other variants: each must find the
    phantom's deformation."""
    result = _register(phantom_files, instance_steps=20, **options)
    report = result.report
    assert report["dice_mean"] > report["dice_affine_mean"] + 0.05, report
    assert report["jacobian_non_positive_percent"] < FOLDS_LIMIT
    info = result.provenance["pipeline"]["instance_optimisation"]
    assert info["resolution"] == options.get("instance_resolution", "full")
    assert info["sampling"] == options.get("instance_sampling", registry.get_model(MODEL_ID).slicer["options"][
        "instance_sampling"])
    assert info["dissimilarity_after"] < 0.7 * info["dissimilarity_before"], info


def test_half_resolution_correction_lands_on_the_block_centres():
    """A displacement on the 2x2x2-block grid, in block voxels, is the motion of the blocks' centres (full voxel
    2m + 0.5): a linear field there must come out as the same linear field in full voxels, inside the grid."""
    shape = (8, 12, 10)
    blocks = tuple(n // 2 for n in shape)
    index = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in blocks), indexing="ij")
    block_field = torch.stack([0.5 + 0.1 * index[0], -0.3 * index[1] / 5, 0.25 + 0 * index[2]])
    full = registration.from_half_resolution(block_field, shape)
    fine = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    as_blocks = [(axis - 0.5) / 2 for axis in fine]  # full voxel x is block coordinate (x - 0.5) / 2
    expected = 2 * torch.stack([0.5 + 0.1 * as_blocks[0], -0.3 * as_blocks[1] / 5, 0.25 + 0 * as_blocks[2]])
    inside = (slice(None), slice(1, -1), slice(1, -1), slice(1, -1))  # the outermost voxels are clamped
    torch.testing.assert_close(full[inside], expected[inside], atol=1e-5, rtol=0)


def test_diffusion_over_a_region_counts_only_that_region():
    """The smoothness term over a region (where a masked similarity looks) is the mean over that region: all ones
    gives the plain mean; a displacement rough only outside the region costs nothing."""
    generator = torch.Generator().manual_seed(5)
    rough = torch.randn((3, 6, 7, 8), generator=generator)
    assert float(registration.diffusion(rough, torch.ones(6, 7, 8))) == pytest.approx(
        float(registration.diffusion(rough)), rel=1e-6)
    region = torch.zeros(6, 7, 8)
    region[:3] = 1.0
    outside_only = rough.clone()
    outside_only[:, :4] = 0.0  # constant (zero) over the region and one voxel beyond it
    assert float(registration.diffusion(outside_only, region)) == pytest.approx(0.0, abs=1e-9)
    assert float(registration.diffusion(outside_only)) > 0.1


def test_sampled_similarity_at_every_voxel_equals_the_dense_one():
    """Reading the similarity at points must be the dense similarity restricted to them: with every voxel as a point
    (and a weight), the sampled value equals the dense one on the coarse correction upsampled to the grid."""
    generator = torch.Generator().manual_seed(3)
    shape = (10, 12, 14)
    fixed_features = torch.rand((12, *shape), generator=generator)
    moving_features = torch.rand((12, *shape), generator=generator)
    coarse = 0.8 * torch.randn((3, 5, 6, 7), generator=generator)
    weight = torch.rand(shape, generator=generator)
    dense = registration._dissimilarity(fixed_features, moving_features,
                                        registration.from_coarse_grid(coarse, shape), weight)
    points = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij"),
                         dim=-1).reshape(-1, 3)
    sampled = registration._sampled_dissimilarity(fixed_features.flatten(1), moving_features, coarse, points,
                                                  weight.flatten())
    torch.testing.assert_close(sampled, dense, atol=1e-5, rtol=1e-5)


# The network alone still moves identical images (it never saw a pair without any deformation, and was trained for
# 13,750 CPU iterations only); this test states what it must do. Strict: once re-exported weights pass, the mark
# makes the suite fail until it is removed.
NETWORK_NOT_TRAINED_YET = pytest.mark.xfail(
    strict=True, reason="brain-registration 0.1.1 weights (13,750 CPU training iterations, held-out val Dice 0.639 vs "
                        "0.572 identity): 1.52 mm mean (3.35 mm 95th percentile) displacement for identical phantom "
                        "images")


def test_network_alone_does_not_fold(network_only):
    assert network_only.report["jacobian_non_positive_percent"] < FOLDS_LIMIT


def test_network_improves_dice_over_the_affine(network_only):
    report = network_only.report
    assert report["dice_mean"] > report["dice_affine_mean"] + 0.02, report


def test_affine_only_option_gives_the_affine_field(phantom_files):
    result = _register(phantom_files, deformable=False)
    fixed = sitk.ReadImage(str(phantom_files["fixed"]))
    points = physical_points(fixed)
    expected = _apply(result.affine, points) - points
    assert np.abs(sitk.GetArrayFromImage(result.field) - expected).max() < 1e-9
    assert result.report["dice_mean"] == pytest.approx(result.report["dice_affine_mean"], abs=0.01)
    assert "working_grid" not in result.provenance["pipeline"]


@NETWORK_NOT_TRAINED_YET
def test_identical_images_give_a_near_zero_field(phantom_files):
    fixed = sitk.ReadImage(str(phantom_files["fixed"]))
    result = _pipeline().register(fixed, fixed)
    length = np.linalg.norm(sitk.GetArrayFromImage(result["field"]), axis=-1)
    inside = sitk.GetArrayFromImage(affine.foreground(fixed)) > 0
    assert float(length[inside].mean()) < 0.5 and float(np.percentile(length[inside], 95)) < 1.0, (
        length[inside].mean(), np.percentile(length[inside], 95))


def test_mind_descriptors_are_contrast_independent():
    fixed, _, moving_t1, _ = registration_phantom_pair()
    _, _, moving_t2, _ = registration_phantom_pair(t2=True)
    t1 = torch.from_numpy(sitk.GetArrayFromImage(moving_t1))
    t2 = torch.from_numpy(sitk.GetArrayFromImage(moving_t2))
    other = torch.from_numpy(sitk.GetArrayFromImage(geometry.resample(fixed, moving_t1)))
    same_anatomy = float((registration.mind_ssc(t1) - registration.mind_ssc(t2)).square().mean())
    other_anatomy = float((registration.mind_ssc(t1) - registration.mind_ssc(other)).square().mean())
    intensity = float((t1 - t2).square().mean())
    assert same_anatomy < 0.3 * other_anatomy, (same_anatomy, other_anatomy)
    assert intensity > float((t1 - other).square().mean()), "in intensities, T1 vs T2 is the worse match"


def test_mind_patch_means_are_avg_pool3d():
    """MIND's patch distances are box means taken as sums of shifted views: the numbers of avg_pool3d (stride 1)."""
    volume = torch.rand(12, 9, 11, 13, generator=torch.Generator().manual_seed(3))
    for width in (1, 3, 5):
        expected = torch.nn.functional.avg_pool3d(volume[None], width, stride=1)[0]
        torch.testing.assert_close(registration._box_mean(volume, width), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ (e) bad inputs


def _write(image: sitk.Image, path) -> str:
    sitk.WriteImage(image, str(path))
    return str(path)


@pytest.mark.parametrize("case", ["2d", "single slice", "constant", "mismatched dimensions", "labels off grid",
                                  "fixed labels alone", "mask off grid", "no overlap", "nan", "bad option",
                                  "bad sampling", "bad resolution"])
def test_inputs_that_cannot_be_registered(phantom_files, tmp_path, case):
    fixed, moving = str(phantom_files["fixed"]), str(phantom_files["moving_t1"])
    fixed_image = sitk.ReadImage(fixed)
    arguments: dict = {}
    expected = {
        "2d": "The fixed image is 2D; registration needs a 3D volume.",
        "single slice": "The fixed image is a single slice",
        "constant": "The moving image is empty (every voxel is 7); there is nothing to register.",
        "mismatched dimensions": "The fixed image is 3D and the moving image 2D",
        "labels off grid": "The moving label map is not on the grid of the moving image",
        "fixed labels alone": "A fixed label map is only used with a moving label map",
        "mask off grid": "The fixed mask is not on the grid of the fixed image",
        "no overlap": "no overlap after affine alignment",
        "nan": "The fixed image has values that are NaN or infinite",
        "bad option": "instance_steps must be 0 or more",
        "bad sampling": "instance_sampling above 0 and at most 1",
        "bad resolution": "instance_resolution must be one of full, half, not 'quarter'",
    }[case]
    if case in ("2d", "mismatched dimensions"):
        moving = _write(sitk.Image([20, 20], sitk.sitkFloat32) + 1.0, tmp_path / "flat.nrrd")
        if case == "2d":
            fixed = moving
    elif case == "single slice":
        fixed = _write(sitk.Image([20, 20, 1], sitk.sitkFloat32), tmp_path / "slice.nrrd")
    elif case == "constant":
        moving = _write(sitk.Image([20, 20, 20], sitk.sitkFloat32) + 7.0, tmp_path / "constant.nrrd")
    elif case == "labels off grid":
        arguments["moving_labels_path"] = phantom_files["fixed_labels"]
    elif case == "fixed labels alone":
        arguments["fixed_labels_path"] = phantom_files["fixed_labels"]
    elif case == "mask off grid":
        arguments["fixed_mask_path"] = phantom_files["moving_labels"]
    elif case == "no overlap":
        far = sitk.ReadImage(moving)
        far.SetOrigin([value + 500.0 for value in far.GetOrigin()])
        moving = _write(far, tmp_path / "far.nrrd")
        arguments["options"] = {"affine_initialization": "none"}
    elif case == "nan":
        values = sitk.GetArrayFromImage(fixed_image)
        values[3, 4, 5] = np.nan
        broken = sitk.GetImageFromArray(values)
        broken.CopyInformation(fixed_image)
        fixed = _write(broken, tmp_path / "nan.nrrd")
    elif case == "bad option":
        arguments["options"] = {"instance_steps": -1}
    elif case == "bad sampling":
        arguments["options"] = {"instance_steps": 5, "instance_sampling": 0}
    elif case == "bad resolution":
        arguments["options"] = {"instance_steps": 5, "instance_resolution": "quarter"}
    with pytest.raises(InputError) as caught:
        tasks.register_images(fixed, moving, MODEL_ID, device="cpu", **arguments)
    message = str(caught.value)
    assert expected in message and "\n" not in message and message.endswith("."), message


def test_affine_runs_on_the_working_spacing_for_finer_images():
    """A 1 mm image is aligned on 2 mm voxels over the same extent (same axes); a coarser one as it is."""
    fine = grid_image(rotation(1, 10.0), (1.0, 1.0, 1.2), (60, 50, 40))
    coarse = grid_image(np.eye(3), (2.5, 2.5, 2.5), (20, 20, 20))
    box = np.zeros(tuple(reversed(fine.GetSize())), np.uint8)
    box[10:30, 15:35, 20:40] = 1
    mask = sitk.GetImageFromArray(box)
    mask.CopyInformation(fine)
    fixed, moving, fixed_mask, moving_mask = registration.affine_inputs(fine, coarse, mask, None, 2.0)
    assert fixed.GetSpacing() == (2.0, 2.0, 2.0) and fixed.GetSize() == (30, 25, 24)
    np.testing.assert_allclose(fixed.GetDirection(), fine.GetDirection())
    centre = fine.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fine.GetSize()])
    np.testing.assert_allclose(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]),
                               centre, atol=1e-9)
    assert fixed_mask.GetSize() == fixed.GetSize()
    assert int(sitk.GetArrayViewFromImage(fixed_mask).sum()) == pytest.approx(20 * 20 * 20 * 1.2 / 8, rel=0.15)
    assert moving is coarse and moving_mask is None
    # register blurs each image once and hands the blurred copies in: the same copies come out
    smoothed = (geometry.anti_aliased(fine, 2.0), geometry.anti_aliased(coarse, 2.0))
    again = registration.affine_inputs(fine, coarse, mask, None, 2.0, smoothed)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again[0]), sitk.GetArrayFromImage(fixed))
    assert again[1] is coarse
    box[:] = 0
    box[20, 25, 30] = 1
    speck = sitk.GetImageFromArray(box)
    speck.CopyInformation(fine)
    with pytest.raises(InputError, match="The fixed mask is thinner than the 2 mm voxels"):
        registration.affine_inputs(fine, coarse, speck, None, 2.0)


# ---------------------------------------------------------------------------- (f) the head's box, faster pieces


def _padded(image: sitk.Image, voxels: int) -> sitk.Image:
    """The image with `voxels` of air (0) on every side, its content where it was (a wide field of view)."""
    return sitk.ConstantPad(image, [voxels] * 3, [voxels] * 3, 0.0)


class _SmoothVelocity(torch.nn.Module):
    """Stands in for the network: a velocity that varies smoothly over whatever grid it is given (several voxels
    everywhere, so a field that dropped to zero beyond the head's box would jump); records the input shapes."""

    size_multiple = 8

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(inputs.shape))
        axes = torch.meshgrid(*(torch.linspace(0.0, 3.0, n) for n in inputs.shape[2:]), indexing="ij")
        return torch.stack([2.0 + torch.sin(axes[1]), -1.5 + 0.5 * torch.cos(axes[2]), 1.0 + 0.3 * axes[0]])[None]


def _box_of(crop: dict, grid: sitk.Image, fixed: sitk.Image) -> np.ndarray:
    """(z, y, x) bool on the fixed grid: the fixed voxel centres inside the crop's voxel centres."""
    index = np.asarray([grid.TransformPhysicalPointToContinuousIndex(point) for point in
                        physical_points(fixed).reshape(-1, 3).tolist()]).reshape(*reversed(fixed.GetSize()), 3)
    start, size = np.asarray(crop["start"]), np.asarray(crop["size"])
    return np.all((index >= start) & (index <= start + size - 1), axis=-1)


def test_a_wide_field_of_view_is_cropped_to_the_head_and_the_field_stays_continuous():
    """Fixed and moving heads with air around them: the network runs on the head's box only (provenance says which),
    and the field still covers the whole fixed grid, with the box's border displacement carried on outside it: no
    jump where the box ends, none larger than between neighbours inside."""
    fixed, _, moving, _ = registration_phantom_pair()
    fixed, moving = _padded(fixed, 16), _padded(moving, 16)
    pipeline = _pipeline()
    pipeline.network = _SmoothVelocity()
    result = pipeline.register(fixed, moving)
    grid = pipeline.working_grid(fixed)
    crop = result["provenance"]["working_grid"]["crop"]
    assert result["provenance"]["working_grid"]["size"] == list(grid.GetSize()), "the whole grid, as before"
    assert crop is not None and crop["voxel_share"] < 0.6 and crop["margin_mm"] == registration.CROP_MARGIN_MM
    assert pipeline.network.shapes == [(1, 2, *reversed(crop["size"]))]
    field = result["field"]
    assert field.GetSize() == fixed.GetSize() and field.GetPixelID() == sitk.sitkVectorFloat64
    np.testing.assert_allclose(field.GetOrigin(), fixed.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(field.GetDirection(), fixed.GetDirection(), atol=1e-12)
    deformable = (sitk.GetArrayFromImage(field)
                  - sitk.GetArrayFromImage(registration.total_field(result["affine"], fixed)))
    inside = _box_of(crop, grid, fixed)
    assert 0.1 < inside.mean() < 0.9, "the fixed grid reaches beyond the box"
    assert float(np.linalg.norm(deformable, axis=-1)[~inside].min()) > 2.0, "outside: the border's displacement"
    for axis in range(3):
        step = np.linalg.norm(np.diff(deformable, axis=axis), axis=-1)
        both = np.logical_and(inside.take(range(inside.shape[axis] - 1), axis=axis),
                              inside.take(range(1, inside.shape[axis]), axis=axis))
        assert step[~both].max() <= 1.01 * step[both].max(), (axis, step[~both].max(), step[both].max())


def test_the_head_box_does_not_depend_on_how_the_fixed_image_is_stored():
    """The same padded fixed phantom stored with permuted and flipped axes (same voxels, same physical place): the
    working grid is in LIA axes either way, so the crop keeps the same box and the registration the same Dice."""
    fixed, fixed_labels, moving, moving_labels = registration_phantom_pair()
    fixed, moving = _padded(fixed, 16), _padded(moving, 16)
    fixed_labels, moving_labels = _padded(fixed_labels, 16), _padded(moving_labels, 16)
    restored = tuple(sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [True, False, False])
                     for image in (fixed, fixed_labels))
    stored = [(fixed, fixed_labels), restored]
    assert not np.allclose(restored[0].GetDirection(), fixed.GetDirection())
    np.testing.assert_allclose(restored[0].TransformContinuousIndexToPhysicalPoint([0.0, 0.0, 0.0]),
                               fixed.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, fixed.GetSize()[2] - 1.0]),
                               atol=1e-6)  # new axis 0 is old axis 2, flipped: it starts at that axis's far end
    crops, scores = [], []
    for image, labels in stored:
        result = _pipeline(instance_steps=10).register(image, moving)
        crops.append(result["provenance"]["working_grid"]["crop"])
        warped = displacement.warp_labels(moving_labels, image, result["field"])
        scores.append(float(np.mean(list(displacement.dice_per_label(warped, labels).values()))))
    assert crops[0] is not None and crops[0]["size"] == crops[1]["size"], crops
    assert abs(scores[0] - scores[1]) < 0.02, scores


def test_a_head_that_fills_the_grid_is_not_cropped_and_registers_as_before():
    """No air to cut (the phantom fills its grid): with or without the crop option, the same field."""
    fixed, _, moving, _ = registration_phantom_pair()
    results = [_pipeline(instance_steps=2, crop_to_head=crop).register(fixed, moving) for crop in (True, False)]
    assert [result["provenance"]["working_grid"]["crop"] for result in results] == [None, None]
    np.testing.assert_array_equal(*(sitk.GetArrayFromImage(result["field"]) for result in results))


def test_cropping_keeps_the_accuracy_on_a_padded_phantom():
    """The real network and 20 refinement steps on the phantom pair with air around both heads: on the head's box
    about as good as on the whole grid, in a fraction of its voxels, without folding."""
    fixed, fixed_labels, moving, moving_labels = registration_phantom_pair()
    fixed, moving = _padded(fixed, 16), _padded(moving, 16)
    fixed_labels, moving_labels = _padded(fixed_labels, 16), _padded(moving_labels, 16)
    scores = {}
    for crop in (True, False):
        result = _pipeline(instance_steps=20, crop_to_head=crop).register(fixed, moving)
        assert (result["provenance"]["working_grid"]["crop"] is not None) == crop
        warped = displacement.warp_labels(moving_labels, fixed, result["field"])
        scores[crop] = float(np.mean(list(displacement.dice_per_label(warped, fixed_labels).values())))
        determinant = displacement.jacobian_determinant(result["field"])
        inside = sitk.GetArrayFromImage(affine.foreground(fixed)) > 0
        assert displacement.jacobian_stats(determinant, inside).non_positive_percent < FOLDS_LIMIT
    assert scores[True] > scores[False] - 0.02, scores


def test_a_fixed_mask_beyond_the_head_box_keeps_the_whole_grid():
    """The refinement's similarity counts inside the fixed mask; a mask reaching into the air keeps every voxel."""
    fixed, _, moving, _ = registration_phantom_pair()
    fixed, moving = _padded(fixed, 16), _padded(moving, 16)
    everywhere = sitk.Image(fixed.GetSize(), sitk.sitkUInt8) + 1
    everywhere.CopyInformation(fixed)
    pipeline = _pipeline(instance_steps=1)
    pipeline.network = _SmoothVelocity()
    result = pipeline.register(fixed, moving, fixed_mask=everywhere)
    assert result["provenance"]["working_grid"]["crop"] is None
    assert pipeline.network.shapes == [(1, 2, *reversed(pipeline.working_grid(fixed).GetSize()))]


def test_the_crop_option_is_checked():
    with pytest.raises(ModelError, match="crop_to_head must be true or false"):
        _pipeline(crop_to_head="no")


@pytest.mark.parametrize("kind", [*sorted(REGISTRATION_GRIDS), "not_parallel"])
def test_field_on_fixed_equals_simpleitk_resampling(kind):
    """The axis-by-axis interpolation onto the fixed grid (working axes parallel to the fixed ones, as
    working_grid makes them) gives SimpleITK's linear resampling of the same vectors; a grid at another angle goes
    through SimpleITK itself."""
    fixed = _fixed("oblique_anisotropic" if kind == "not_parallel" else kind)
    grid = registration.working_grid(fixed, 2.0, "LIA", 8, margin=1 if kind != "not_parallel" else 6)
    if kind == "not_parallel":  # turned about its centre, still enclosing the fixed grid (wider margin)
        centre = grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in grid.GetSize()])
        grid.SetDirection((np.asarray(grid.GetDirection()).reshape(3, 3) @ rotation(2, 7.0)).ravel().tolist())
        grid.SetOrigin((np.asarray(grid.GetOrigin()) + centre - np.asarray(grid.TransformContinuousIndexToPhysicalPoint(
            [(n - 1) / 2 for n in grid.GetSize()]))).tolist())
        assert registration._axis_map(grid, fixed) is None
    else:
        assert registration._axis_map(grid, fixed) is not None
    generator = torch.Generator().manual_seed(7)
    voxels = torch.nn.functional.interpolate(torch.randn((1, 3, 4, 4, 4), generator=generator),
                                             size=tuple(reversed(grid.GetSize())), mode="trilinear",
                                             align_corners=True)[0].double().numpy()
    vectors = sitk.GetImageFromArray(registration.physical_displacement(voxels, grid), isVector=True)
    vectors.CopyInformation(grid)
    expected = sitk.GetArrayFromImage(sitk.Resample(vectors, fixed, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                    sitk.sitkVectorFloat64, True))
    np.testing.assert_allclose(registration.field_on_fixed(voxels, grid, fixed), expected, rtol=0, atol=1e-9)


def test_sampling_on_every_cpu_thread_equals_one_grid_sample():
    """flow.sample cuts the grid into slabs, one per torch thread: the same values, and the same gradients up to
    float summation order, as one grid_sample call, for slab counts that do and do not divide the depth."""
    generator = torch.Generator().manual_seed(11)
    threads = torch.get_num_threads()
    try:
        for count, depth in ((2, 12), (3, 13)):
            torch.set_num_threads(count)
            volume = torch.randn((1, 3, depth, 9, 8), generator=generator, requires_grad=True)
            grid = (torch.rand((1, depth, 9, 8, 3), generator=generator) * 2.4 - 1.2).requires_grad_()
            expected = torch.nn.functional.grid_sample(volume, grid, mode="bilinear", padding_mode="border",
                                                       align_corners=True)
            sampled = flow.sample(volume, grid)
            torch.testing.assert_close(sampled, expected, rtol=0, atol=0)
            weights = torch.rand(expected.shape, generator=generator)
            for ours, theirs in zip(torch.autograd.grad((sampled * weights).sum(), (volume, grid)),
                                    torch.autograd.grad((expected * weights).sum(), (volume, grid))):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_descriptor_rows_interpolate_as_grid_sample_and_box_max_as_max_pool():
    """The refinement reads descriptors at scattered points from a channels-last table and dilates masks axis by
    axis: the numbers (and point gradients) of grid_sample and max_pool3d."""
    generator = torch.Generator().manual_seed(5)
    shape = (9, 11, 7)
    features = torch.rand((12, *shape), generator=generator)
    points = (torch.rand((400, 3), generator=generator) * (torch.tensor(shape) + 2.0) - 1.0).requires_grad_()
    expected = torch.nn.functional.grid_sample(features[None], registration._normalised_points(points, shape),
                                               mode="bilinear", padding_mode="border",
                                               align_corners=True)[0, :, :, 0, 0]
    rows = registration._trilinear_rows(registration.channels_last(features), shape, points).T
    torch.testing.assert_close(rows, expected, rtol=0, atol=1e-5)
    ours = torch.autograd.grad(rows.square().sum(), points)[0]
    theirs = torch.autograd.grad(expected.square().sum(), points)[0]
    interior = ((points > 0.01) & (points < torch.tensor(shape) - 1.01)).all(dim=1)
    interior &= ((points - points.round()).abs() > 1e-3).all(dim=1)  # a kink of the interpolant: either slope
    torch.testing.assert_close(ours[interior], theirs[interior], rtol=1e-4, atol=1e-4)
    mask = (torch.rand(shape, generator=generator) > 0.97).float()
    torch.testing.assert_close(registration.box_max(mask),
                               torch.nn.functional.max_pool3d(mask[None, None], 5, stride=1, padding=2)[0, 0],
                               rtol=0, atol=0)


def test_the_refinement_optimiser_steps_as_torch_adam():
    """The refinement's own Adam (it avoids the seconds torch.optim's first use costs) moves a tensor exactly as
    torch.optim.Adam with the same step size."""
    generator = torch.Generator().manual_seed(2)
    target = torch.randn((3, 5, 6, 7), generator=generator)
    ours, theirs = (torch.zeros((3, 5, 6, 7), requires_grad=True) for _ in range(2))
    optimiser, reference = registration._Adam(ours, 0.4), torch.optim.Adam([theirs], lr=0.4)
    for _ in range(25):
        ours.grad = None
        ((ours - target) ** 4).sum().backward()
        optimiser.step()
        reference.zero_grad()
        ((theirs - target) ** 4).sum().backward()
        reference.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=0)
