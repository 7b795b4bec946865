"""The synthetic training data of the thick-slice model (training/generator.py), checked statistically and seeded:
a seed reproduces a render, contrasts vary between draws but T1/T2-like draws keep the tissue order, the render
stays aligned with its labels, and the simulated thick-slice acquisition (slice profile, slice positions, Rician
noise, linear upsampling) is geometrically exact. Small volumes only: the whole file runs in a few seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from MIADeepLearningLib.training import generator as gen

SIZE = 20  # voxels per side of the test label map
WM, GM, CSF, VENTRICLE = 2, 3, 24, 4  # FreeSurfer values: white matter, cortex, extra-cerebral CSF, lateral ventricle


@pytest.fixture(scope="module")
def labels() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(compact indices as a tensor, their label values, the label values per voxel): nested spheres, a head-like
    background / CSF / GM / WM / ventricle layering."""
    z, y, x = np.mgrid[:SIZE, :SIZE, :SIZE]
    centre = (SIZE - 1) / 2.0
    radius = np.sqrt((z - centre) ** 2 + (y - centre) ** 2 + (x - centre) ** 2)
    values = np.zeros((SIZE,) * 3, dtype=np.int32)
    values[radius < 9.5] = CSF
    values[radius < 7.5] = GM
    values[radius < 5.0] = WM
    values[radius < 2.2] = VENTRICLE
    indices, label_values = gen.compact_labels(values)
    return torch.from_numpy(indices.astype(np.int64)), label_values, values


def _render(labels, seed: int, contrast: str = "random") -> torch.Tensor:
    indices, values, _ = labels
    return gen.render(indices, values, torch.Generator().manual_seed(seed), gen.RenderSettings(contrast=contrast))


def _label_means(image: torch.Tensor, label_values: np.ndarray) -> dict[int, float]:
    array = image.numpy()
    return {int(value): float(array[label_values == value].mean()) for value in np.unique(label_values)}


def _boundary_and_interior(label_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(voxels with a 6-neighbour of another label, voxels at least 3 voxels away from any such boundary)."""
    boundary = np.zeros(label_values.shape, dtype=bool)
    for axis in range(3):
        changes = np.diff(label_values, axis=axis) != 0
        low = [slice(None)] * 3
        high = [slice(None)] * 3
        low[axis], high[axis] = slice(0, -1), slice(1, None)
        boundary[tuple(low)] |= changes
        boundary[tuple(high)] |= changes
    near = boundary.copy()
    for _ in range(2):
        grown = near.copy()
        for axis in range(3):
            grown |= np.roll(near, 1, axis) | np.roll(near, -1, axis)
        near = grown
    return boundary, ~near


def _explained_variance(image: np.ndarray, label_values: np.ndarray) -> float:
    """Share of the image's variance explained by its labels (1 - within-label / total sum of squares)."""
    total = float(((image - image.mean()) ** 2).sum())
    within = sum(float(((image[label_values == value] - image[label_values == value].mean()) ** 2).sum())
                 for value in np.unique(label_values))
    return 1.0 - within / total


# ---------------------------------------------------------------------------------------------- rendering


def test_same_seed_gives_the_same_render_and_acquisition(labels):
    first, second = _render(labels, 7), _render(labels, 7)
    assert torch.equal(first, second), "the same seed must reproduce the render bit for bit"
    acquisition = gen.Acquisition(spacing=4.0, thickness=4.0, offset=1.0, noise_std=0.03, in_plane_sigma=0.3)
    slices = [gen.acquire(first, acquisition, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(slices[0], slices[1]), "the same seed must reproduce the noisy acquisition"
    other = gen.acquire(first, acquisition, torch.Generator().manual_seed(4))
    assert not torch.equal(slices[0], other), "another seed must draw other noise"
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0 + 1e-6, "renders are in [0, 1]"
    assert first.dtype == torch.float32 and tuple(first.shape) == (SIZE,) * 3


def test_random_acquisitions_are_reproducible_and_plausible():
    draws = [gen.Acquisition.random(torch.Generator().manual_seed(seed)) for seed in range(40)]
    assert gen.Acquisition.random(torch.Generator().manual_seed(5)) == draws[5], "seeded draws must repeat"
    for acquisition in draws:
        assert 2.0 <= acquisition.spacing <= 7.0, acquisition
        assert 0.7 * acquisition.spacing - 1e-6 <= acquisition.thickness <= acquisition.spacing + 1e-6, acquisition
        assert 0.0 <= acquisition.offset < acquisition.spacing, acquisition
        assert 0.0 <= acquisition.noise_std <= 0.04 and 0.0 <= acquisition.in_plane_sigma <= 0.5, acquisition
    assert any(a.thickness < a.spacing - 1e-3 for a in draws), "some acquisitions should have a slice gap"
    assert any(a.thickness == a.spacing for a in draws), "some acquisitions should be contiguous"


def test_different_seeds_draw_different_contrasts(labels):
    _, _, label_values = labels
    means = np.array([list(_label_means(_render(labels, seed), label_values).values()) for seed in range(6)])
    spread = means.std(axis=0)
    assert np.all(spread[1:] > 0.05), f"each label's mean should vary across draws; std per label {spread}"
    orders = {tuple(np.argsort(row[1:])) for row in means}  # order of the tissues (background aside)
    assert len(orders) >= 3, f"random contrasts should reorder the tissues between draws; orders seen: {orders}"


def test_label_means_keep_the_tissue_order_of_t1_and_t2():
    values = np.array([0, WM, GM, VENTRICLE, CSF, 41, 42, 43])  # both hemispheres' WM/GM/ventricle too
    families = gen.tissue_of(values)
    assert families == ["background", "wm", "gm", "csf", "csf", "wm", "gm", "csf"]
    for seed in range(50):
        generator = torch.Generator().manual_seed(seed)
        t1 = gen.label_means(values, "t1", generator).numpy()
        t2 = gen.label_means(values, "t2", generator).numpy()
        by_family = {family: [i for i, f in enumerate(families) if f == family] for family in set(families)}
        for contrast, means, order in (("t1", t1, ["wm", "gm", "csf", "background"]),
                                       ("t2", t2, ["csf", "gm", "wm", "background"])):
            for brighter, darker in zip(order, order[1:]):
                assert means[by_family[brighter]].min() > means[by_family[darker]].max(), (
                    f"{contrast} seed {seed}: every {brighter} label must be brighter than every {darker} label "
                    f"({dict(zip(values.tolist(), np.round(means, 3).tolist()))})")
    with pytest.raises(ValueError, match="contrast must be one of"):
        gen.label_means(values, "flair", torch.Generator())


def test_t1_and_t2_renders_keep_the_tissue_order_on_average(labels):
    """After blur, bias field and gamma: WM > GM > CSF for T1-like and CSF > GM > WM for T2-like draws, with CSF
    averaged over its labels (the small ventricle and the outer CSF)."""
    _, _, label_values = labels
    for contrast in ("t1", "t2"):
        kept = []
        for seed in range(5):
            means = _label_means(_render(labels, seed, contrast), label_values)
            wm, gm, csf = means[WM], means[GM], (means[CSF] + means[VENTRICLE]) / 2.0
            kept.append(wm > gm > csf if contrast == "t1" else csf > gm > wm)
            assert means[0] < min(wm, gm, csf), f"{contrast} seed {seed}: background must stay darkest ({means})"
        assert all(kept), f"{contrast}: the tissue order must survive bias field and gamma in every draw ({kept})"


def test_render_stays_aligned_with_its_labels(labels):
    """Labels explain most of the render's variance (much less when shifted by 2 voxels), and edges coincide with
    label boundaries: the gradient is much larger on boundaries than inside labels."""
    _, _, label_values = labels
    boundary, interior = _boundary_and_interior(label_values)
    assert boundary.sum() > 100 and interior.sum() > 100, "the test label map needs boundaries and interiors"
    for seed, contrast in ((0, "random"), (1, "random"), (2, "t1"), (3, "t2")):
        image = _render(labels, seed, contrast).numpy()
        explained = _explained_variance(image, label_values)
        assert explained > 0.85, f"seed {seed} {contrast}: labels explain only {explained:.2f} of the variance"
        for axis in range(3):
            shifted = _explained_variance(image, np.roll(label_values, 2, axis=axis))
            assert shifted < explained - 0.1, (
                f"seed {seed} {contrast}: labels shifted by 2 voxels along axis {axis} explain {shifted:.2f}, "
                f"about as much as the true labels ({explained:.2f}): the render is not aligned with them")
        gradient = np.sqrt(sum(component**2 for component in np.gradient(image)))
        ratio = gradient[boundary].mean() / max(gradient[interior].mean(), 1e-9)
        assert ratio > 3.0, f"seed {seed} {contrast}: boundary/interior gradient ratio only {ratio:.1f}"
    means = _label_means(_render(labels, 2, "t1"), label_values)
    distinct = sorted(means[value] for value in (0, CSF, GM, WM))
    assert min(np.diff(distinct)) > 0.05, f"neighbouring tissues must differ in intensity: {means}"


# ---------------------------------------------------------------------------------------- acquisition


def test_slice_profile_is_a_normalised_symmetric_box_of_the_slice_thickness():
    widths = []
    for thickness in (1.0, 2.0, 3.0, 5.0, 7.0):
        weights = gen.slice_profile(thickness).double()
        assert weights.numel() % 2 == 1, "the profile must have a centre tap"
        assert math.isclose(float(weights.sum()), 1.0, abs_tol=1e-6), f"{thickness} mm: weights sum to {weights.sum()}"
        assert float(weights.min()) >= 0.0
        asymmetry = float((weights - weights.flip(0)).abs().max())
        offsets = torch.arange(weights.numel(), dtype=torch.float64) - (weights.numel() - 1) / 2.0
        centroid = float((weights * offsets).sum())
        assert asymmetry < 1e-6 and abs(centroid) < 1e-6, (
            f"{thickness} mm: the profile must be symmetric about its centre tap (largest difference to its mirror "
            f"{asymmetry:.4f}, centre of mass at {centroid:+.4f} voxels); an off-centre profile shifts every "
            "simulated slice")
        above_half = int((weights >= 0.5 * weights.max()).sum())
        widths.append((thickness, above_half, float((weights * offsets**2).sum())))
    # an odd thickness covers whole voxels (5 mm: 5 taps at or above half maximum); an even one half of two more
    assert [item[1] for item in widths if item[0] % 2 == 1] == [1, 3, 5, 7], f"taps above half maximum: {widths}"
    assert all(abs(taps - thickness) <= 1 for thickness, taps, _ in widths), f"taps above half maximum: {widths}"
    second_moments = [item[2] for item in widths]
    assert all(a < b for a, b in zip(second_moments, second_moments[1:])), f"width must grow: {widths}"


@pytest.mark.parametrize(("length", "spacing", "offset"), [(40, 5.0, 0.0), (40, 5.0, 2.5), (40, 3.0, 1.0),
                                                           (33, 7.0, 6.5), (20, 2.2, 0.3)])
def test_acquire_records_one_slice_per_position(length, spacing, offset):
    image = torch.rand((length, 6, 5), generator=torch.Generator().manual_seed(0))
    acquisition = gen.Acquisition(spacing=spacing, thickness=spacing, offset=offset, noise_std=0.0,
                                  in_plane_sigma=0.0)
    expected = math.floor((length - 1 - offset) / spacing) + 1
    slices = gen.acquire(image, acquisition, torch.Generator().manual_seed(0))
    assert tuple(slices.shape) == (expected, 6, 5), f"{acquisition}: {tuple(slices.shape)} slices"
    positions = acquisition.slice_positions(length)
    assert positions.numel() == expected and float(positions[-1]) <= length - 1 + 1e-6
    np.testing.assert_allclose(positions.numpy(), offset + spacing * np.arange(expected), atol=1e-5)
    coordinates = gen.slice_coordinates(length, acquisition)
    np.testing.assert_allclose(coordinates.numpy(), (np.arange(length) - offset) / spacing, atol=1e-6)


def test_acquired_slices_sit_at_their_positions():
    """A ramp along the slice axis is kept by a symmetric profile, so an interior slice records the ramp's value at
    its centre: the acquisition is not shifted against the 1 mm render it is trained to reconstruct."""
    length = 48
    ramp = (0.5 + 0.01 * torch.arange(length, dtype=torch.float32)).view(-1, 1, 1).expand(length, 4, 4).contiguous()
    for spacing, thickness, offset in ((5.0, 5.0, 2.0), (4.0, 3.0, 0.5), (3.0, 3.0, 1.5)):
        acquisition = gen.Acquisition(spacing=spacing, thickness=thickness, offset=offset, noise_std=0.0,
                                      in_plane_sigma=0.0)
        slices = gen.acquire(ramp, acquisition, torch.Generator())
        positions = acquisition.slice_positions(length)
        radius = (gen.slice_profile(thickness).numel() - 1) // 2
        interior = (positions >= radius + 1) & (positions <= length - 2 - radius)
        assert int(interior.sum()) >= 3, "the test needs interior slices"
        recorded = slices[interior, 2, 2].double().numpy()
        expected = 0.5 + 0.01 * positions[interior].double().numpy()
        error = np.abs(recorded - expected).max() / 0.01
        assert error < 1e-3, (f"{acquisition}: interior slices record the ramp {error:.4f} voxels away from their "
                              "centres")


def test_upsampling_a_slice_stack_keeps_linear_data_linear():
    length = 45
    acquisition = gen.Acquisition(spacing=5.0, thickness=5.0, offset=2.0, noise_std=0.0, in_plane_sigma=0.0)
    positions = acquisition.slice_positions(length).double()
    in_plane = torch.rand((7, 6), generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def field(z: torch.Tensor) -> torch.Tensor:  # linear along the slice axis, anything in-plane
        return (in_plane[None] + 0.3 * z.view(-1, 1, 1)).float()

    slices = field(positions)
    coordinates = gen.slice_coordinates(length, acquisition)
    upsampled = gen.upsample_slices(slices, coordinates)
    assert tuple(upsampled.shape) == (length, 7, 6)
    z = torch.arange(length, dtype=torch.float64)
    inside = (z >= positions[0]) & (z <= positions[-1])
    np.testing.assert_allclose(upsampled[inside].numpy(), field(z[inside]).numpy(), rtol=0, atol=2e-5,
                               err_msg="between the outer slices, linear data must be interpolated exactly")
    np.testing.assert_array_equal(upsampled[z < positions[0]].numpy(),
                                  slices[:1].expand(int((z < positions[0]).sum()), -1, -1).numpy(),
                                  err_msg="before the first slice: the first slice (nearest)")
    np.testing.assert_array_equal(upsampled[z > positions[-1]].numpy(),
                                  slices[-1:].expand(int((z > positions[-1]).sum()), -1, -1).numpy(),
                                  err_msg="after the last slice: the last slice (nearest)")
    on_slices = gen.upsample_slices(slices, torch.arange(slices.shape[0], dtype=torch.float32))
    assert torch.equal(on_slices, slices), "at the slice positions the acquired slices come back unchanged"
    np.testing.assert_array_equal(upsampled[positions.long()].numpy(), slices.numpy(),
                                  err_msg="1 mm positions that are slice centres must hold the slices")


def test_rician_noise_makes_the_background_positive():
    background = torch.zeros((30, 16, 16))
    sigma = 0.05
    noisy = gen.acquire(background, gen.Acquisition(spacing=3.0, thickness=3.0, offset=0.0, noise_std=sigma,
                                                    in_plane_sigma=0.0), torch.Generator().manual_seed(2))
    assert float(noisy.min()) > 0.0, "magnitude (Rician) noise on a zero background is positive everywhere"
    rayleigh_mean = sigma * math.sqrt(math.pi / 2.0)
    assert abs(float(noisy.mean()) - rayleigh_mean) < 0.1 * rayleigh_mean, (
        f"the background of a magnitude image is Rayleigh-distributed: mean {float(noisy.mean()):.4f}, expected "
        f"{rayleigh_mean:.4f}")
    clean = gen.acquire(background, gen.Acquisition(spacing=3.0, thickness=3.0, offset=0.0, noise_std=0.0,
                                                    in_plane_sigma=0.0), torch.Generator().manual_seed(2))
    assert float(clean.abs().max()) == 0.0, "without noise a zero background stays zero"


def test_compact_labels_round_trip():
    values = np.array([[[0, 41, 41], [2, 3, 0]], [[24, 24, 2], [3, 3, 41]]])
    indices, table = gen.compact_labels(values)
    assert indices.dtype == np.int16 and indices.shape == values.shape
    assert table.tolist() == [0, 2, 3, 24, 41]
    np.testing.assert_array_equal(table[indices], values)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_blur_axis_is_a_correlation_with_replicated_borders(axis):
    """blur_axis (shifted sums) against torch's conv1d on rows with replicate padding, for a symmetric Gaussian and
    an asymmetric kernel (the sum must be a correlation, as conv1d is)."""
    volume = torch.rand(7, 9, 11, generator=torch.Generator().manual_seed(axis), dtype=torch.float64)
    for kernel in (gen.gaussian_kernel(0.9).double(), torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)[:3]):
        radius = (kernel.numel() - 1) // 2
        moved = volume.movedim(axis, -1)
        rows = torch.nn.functional.pad(moved.reshape(-1, 1, moved.shape[-1]), (radius, radius), mode="replicate")
        expected = torch.nn.functional.conv1d(rows, kernel.view(1, 1, -1)).reshape(moved.shape).movedim(-1, axis)
        assert torch.allclose(gen.blur_axis(volume, kernel, axis), expected, atol=1e-12)
