"""centring: robust peak, crop/pad without wrap-around, whole-voxel centre of mass on shape // 2."""

import numpy as np
import pytest

from defectscope.preprocessing.centring import centre_of_mass, centre_of_mass_shift, crop_pad, find_peak, isolated_voxels
from defectscope.preprocessing.config import PipelineConfig

CONFIG = PipelineConfig()


def gaussian_peak(shape=(64, 60, 56), centre=(30.3, 25.6, 33.2), widths=(2.5, 1.8, 3.1), height=1e4, seed=0):
    """An anisotropic Gaussian peak on Poisson background: asymmetric in every axis."""
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r2 = sum(((g - c) / w) ** 2 for g, c, w in zip(grids, centre, widths))
    rng = np.random.default_rng(seed)
    return (height * np.exp(-r2 / 2) + rng.poisson(3.0, size=shape)).astype(np.float32)


def test_peak_found_and_refined():
    peak = find_peak(gaussian_peak(), CONFIG)
    assert peak.index == (30, 26, 33)
    assert np.allclose(peak.centre, (30.3, 25.6, 33.2), atol=0.15)
    assert peak.counts > 9000 and 0 < peak.median_counts <= peak.counts


def test_isolated_hot_voxel_does_not_capture_the_peak():
    volume = gaussian_peak()
    volume[5, 50, 3] = 1e7  # a hot pixel 1000x the Bragg peak, far from it
    peak = find_peak(volume, CONFIG)
    assert peak.index == (30, 26, 33)


def test_hot_voxel_next_to_the_peak_does_not_pull_the_centre():
    volume = gaussian_peak()
    volume[32, 26, 33] = 1e6  # a one-voxel alien two voxels from the maximum
    peak = find_peak(volume, CONFIG)
    assert peak.index == (30, 26, 33)
    assert np.allclose(peak.centre, (30.3, 25.6, 33.2), atol=0.3)


def test_many_hot_voxels_and_a_hot_line_do_not_win():
    volume = gaussian_peak(seed=1)
    rng = np.random.default_rng(7)
    for i, j, k in zip(rng.integers(0, 64, 30), rng.integers(0, 60, 30), rng.integers(0, 56, 30)):
        if abs(i - 30) + abs(j - 26) + abs(k - 33) > 8:
            volume[i, j, k] = 5e5  # more hot voxels than block candidates
    volume[:, 10, 45] = 2e5  # a hot detector pixel seen through the whole rocking curve
    peak = find_peak(volume, CONFIG)
    assert peak.index == (30, 26, 33)


def test_peak_at_the_edge_of_the_array():
    volume = gaussian_peak(centre=(1.2, 40.0, 54.6))
    peak = find_peak(volume, CONFIG)
    assert peak.index == (1, 40, 55)


def test_crop_pad_centres_and_pads_without_wrapping():
    volume = np.arange(1, 20 * 22 * 24 + 1, dtype=np.float32).reshape(20, 22, 24)
    window = crop_pad(volume, (2, 20, 12), (16, 16, 16))
    assert window[8, 8, 8] == volume[2, 20, 12]
    # Beyond faces 0 (axis 0) and 21 (axis 1): zeros, never the opposite face's content.
    assert not window[:6].any() and not window[:, 10:].any()
    assert np.array_equal(window[6:, :10, :], volume[0:10, 12:22, 4:20])
    assert np.isin(window[window > 0], volume[0:10, 12:22, 4:20]).all()


def test_crop_pad_entirely_outside_is_zero():
    assert not crop_pad(np.ones((8, 8, 8), np.float32), (40, 4, 4), (8, 8, 8)).any()


def test_peak_near_a_face_gets_no_content_from_the_opposite_face():
    volume = gaussian_peak(centre=(3.0, 30.0, 28.0))
    volume[-3:, :, :] = 777.0  # distinctive content at the far face of axis 0
    found = find_peak(volume, CONFIG)
    centred = centre_of_mass_shift(volume, found.index, (64, 64, 64))
    assert not np.any(centred.array == 777.0)
    start = centred.centre[0] - 32
    assert start < 0 and not centred.array[: -start].any()  # the part before face 0 is zeros


@pytest.mark.parametrize("seed", range(4))
def test_centre_of_mass_lands_on_the_centre_voxel(seed):
    rng = np.random.default_rng(seed)
    centre = rng.uniform(20, 40, 3)
    volume = gaussian_peak(shape=(70, 66, 62), centre=centre, widths=rng.uniform(1.5, 4, 3), seed=seed)
    # A weaker side lobe makes the centre of mass differ from the maximum, as a split Bragg peak does.
    volume += gaussian_peak(shape=(70, 66, 62), centre=centre + rng.uniform(-6, 6, 3), widths=(3, 3, 3), height=4e3, seed=seed + 10)
    peak = find_peak(volume, CONFIG)
    centred = centre_of_mass_shift(volume, peak.index, (64, 64, 64))
    assert centred.converged
    assert tuple(np.floor(centre_of_mass(centred.array) + 0.5).astype(int)) == (32, 32, 32)
    assert np.array_equal(centred.array, crop_pad(volume, centred.centre, (64, 64, 64)))
    assert tuple(np.array(centred.centre) - np.array(peak.index)) == centred.shift


def test_centre_of_mass_of_odd_window_lands_on_shape_half():
    volume = gaussian_peak(shape=(40, 40, 40), centre=(18.2, 21.7, 19.9))
    centred = centre_of_mass_shift(volume, (10, 30, 25), (33, 31, 32))
    assert tuple(np.floor(centre_of_mass(centred.array) + 0.5).astype(int)) == (16, 15, 16)


def test_centre_of_mass_values():
    volume = np.zeros((5, 6, 7), np.float32)
    volume[1, 2, 3] = 1.0
    volume[3, 4, 5] = 3.0
    assert np.allclose(centre_of_mass(volume), (2.5, 3.5, 4.5))


def test_isolated_voxels_finds_hot_pixels_but_not_the_peak_or_photon_noise():
    volume = gaussian_peak(widths=(1.2, 0.9, 1.5))  # a sharp peak: neighbours well below its maximum
    volume[10, 12, 14] = 4e5  # hot pixel
    volume[31, 26, 33] = 9e5  # one-voxel alien on the peak's flank
    volume[50, 40, 20] = 45.0  # photons next to empty voxels: < ratio counts, plausible noise
    volume[50, 39:42, 19:22] = 0
    volume[49:52, 40, 20] = 0
    index, brightest = isolated_voxels(volume, floor=100.0, ratio=50.0)
    assert sorted(map(tuple, index.tolist())) == [(10, 12, 14), (31, 26, 33)]
    assert np.all(brightest < 2e4)
