"""oversampling: the central-peak estimate on simulator maps and shapes of known oversampling, the
autocorrelation handle, the per-axis resampling rule, resampling itself."""

import numpy as np
import pytest
import scipy.fft as sfft

from defectscope.preprocessing.config import PipelineConfig
from defectscope.preprocessing.oversampling import (
    autocorrelation_oversampling,
    central_peak_width,
    estimate_oversampling,
    resample,
    resample_factors,
)
from defectscope.training.invariance import binned
from defectscope.training.sim_config import SimulationConfig
from defectscope.training.simulator import simulate_configuration

CONFIG = PipelineConfig()
N = 64
# Different widths per axis, so a transposed estimate fails.
ASPECT = np.array([1.0, 0.85, 1.15])


def crystal(kind: str, sigma: float, n: int = N):
    """|FFT|^2 of a zero-padded asymmetric object with oversampling ~sigma; returns (map, true per axis).

    True oversampling per axis = n / the object's extent in voxels along that axis.
    """
    c = (n - 1) / 2
    x, y, z = np.meshgrid(*(np.arange(n) - c,) * 3, indexing="ij")
    half = n / (sigma * ASPECT) / 2
    u, v, w = x / half[0], y / half[1], z / half[2]
    if kind == "box":
        obj = (abs(u) < 1) & (abs(v) < 1) & (abs(w) < 1)
    elif kind == "ellipsoid":
        obj = u**2 + v**2 + w**2 <= 1
    else:  # faceted: {100} and {111}-like facets cut by one oblique plane (a Winterbottom-like shape)
        obj = (abs(u) <= 1) & (abs(v) <= 1) & (abs(w) <= 1) & (abs(u) + abs(v) + abs(w) <= 1.9) & (u + 0.6 * v - 0.3 * w <= 1.0)
    obj = np.roll(obj, (3, -2, 1), axis=(0, 1, 2)).astype(np.float64)  # off-centre object
    extent = np.array([np.ptp(i) + 1 for i in np.nonzero(obj)])
    intensity = np.abs(sfft.fftshift(sfft.fftn(obj))) ** 2
    return (intensity / intensity.max() * 1e6).astype(np.float32), n / extent


@pytest.fixture(scope="module")
def simulated():
    """Noisy simulator maps (every class) and their true per-axis oversampling."""
    cfg = SimulationConfig(orientations_per_configuration=4)
    runs = [simulate_configuration(cfg, 5, i) for i in range(6)]
    return (np.concatenate([r.counts for r in runs]).astype(np.float32),
            np.concatenate([r.params["oversampling"] for r in runs]), np.concatenate([r.params["label"] for r in runs]))


def test_central_peak_estimate_on_simulator_maps(simulated):
    maps, true, labels = simulated
    ratio = np.array([estimate_oversampling(m, CONFIG)[0] for m in maps]) / true
    free = ratio[labels == 0]
    assert abs(np.median(free) - 1) < 0.08, np.median(free)  # the calibration (config.central_peak_ratio)
    assert np.all(np.abs(free - 1) < 0.3), free
    assert abs(np.median(ratio) - 1) < 0.12  # dislocated peaks read a little narrower


@pytest.mark.parametrize("k", [2, 3])
def test_central_peak_estimate_follows_a_coarser_grid(simulated, k):
    # The same map summed k x k x k (a grid k times coarser) has k times lower oversampling.
    maps, true, labels = simulated
    for m, t in zip(maps[labels == 0][:4], true[labels == 0][:4]):
        fine, _ = estimate_oversampling(m, CONFIG)
        if (fine / k).min() < 1.3:  # below that the peak is not resolved (next test)
            continue
        coarse, _ = estimate_oversampling(binned(m, k), CONFIG)
        assert np.all(np.abs(coarse * k / fine - 1) < 0.15), (coarse * k, fine)


def test_unresolved_peak_is_reported_not_guessed(simulated):
    maps, _, _ = simulated
    per_axis, _, info = estimate_oversampling(binned(maps[0], 8), CONFIG, details=True)
    assert not all(info["resolved"]) and "none" in info["confidence"]
    per_axis, _, info = estimate_oversampling(maps[0], CONFIG, details=True)
    assert all(info["resolved"]) and info["method"] == "central_peak"


def test_central_peak_shape_dependence():
    # Guinier: the width measures the radius of gyration. An ellipsoid reads within ~10 % (the ratio is close to a
    # sphere's, 0.503); a box, whose extent is sqrt(12) radii of gyration instead of sqrt(20), reads 15-30 % low.
    volume, true = crystal("ellipsoid", 3.0)
    per_axis, _ = estimate_oversampling(volume, CONFIG)
    assert np.all(np.abs(per_axis / true - 1) < 0.12), (per_axis, true)
    volume, true = crystal("box", 3.0)
    per_axis, _ = estimate_oversampling(volume, CONFIG)
    assert np.all((per_axis / true > 0.7) & (per_axis / true < 0.85)), (per_axis, true)


def test_central_peak_survives_noise_hot_voxels_and_far_masks():
    volume, true = crystal("ellipsoid", 3.0)
    rng = np.random.default_rng(3)
    noisy = rng.poisson(volume / volume.sum() * 2e5).astype(np.float32)  # 2e5 photons in all
    assert np.all(np.abs(estimate_oversampling(noisy, CONFIG)[0] / true - 1) < 0.12)
    clean, _ = estimate_oversampling(volume, CONFIG)
    spoiled = volume.copy()
    spoiled[5, 60, 7] = 0.1 * volume.sum()  # a hot voxel holding 10 % of the counts, far from the peak
    spoiled[:, 44:47, :] = 0  # a detector gap away from the peak
    assert np.allclose(estimate_oversampling(spoiled, CONFIG)[0], clean)


@pytest.mark.parametrize("kind", ["box", "ellipsoid", "polyhedron"])
@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0, 4.0, 6.0])
def test_autocorrelation_handle_within_12_percent_per_axis(kind, sigma):
    volume, true = crystal(kind, sigma)
    per_axis, floors = autocorrelation_oversampling(volume)
    assert per_axis.shape == (3,) and len(floors) == 3
    assert np.all(np.abs(per_axis / true - 1) < 0.12), (per_axis, true)


def test_central_peak_width_is_per_axis():
    volume, true = crystal("ellipsoid", 3.0)
    width, info = central_peak_width(volume)
    assert info["points"] >= 10 and all(info["resolved"])
    assert np.argsort(width).tolist() == np.argsort(true).tolist()  # a transposed estimate would fail


@pytest.mark.parametrize("per_axis, target, factors", [
    ((3.0, 2.5, 3.9), None, (1.0, 1.0, 1.0)),
    ((1.6, 3.0, 8.0), None, (1.25, 1.0, 0.5)),
    ((1.5, 3.0, 6.0), 3.0, (2.0, 1.0, 0.5)),
    ((3.02, 2.98, 3.0), 3.0, (1.0, 1.0, 1.0)),  # within 1 %: left alone
])
def test_resample_rule_per_axis(per_axis, target, factors):
    config = PipelineConfig(oversampling_target=target)
    assert resample_factors(per_axis, config) == pytest.approx(factors)


def test_resample_rule_disabled():
    assert resample_factors((9.0, 1.0, 3.0), PipelineConfig(oversampling_range=None)).tolist() == [1.0, 1.0, 1.0]


def test_resampling_moves_the_oversampling_per_axis():
    volume, true = crystal("ellipsoid", 4.0)
    moved = resample(volume, (0.5, 1.0, 0.75))
    assert moved.shape == (32, 64, 48)
    before, _ = estimate_oversampling(volume, CONFIG)
    after, _ = estimate_oversampling(moved, CONFIG)
    assert np.all(np.abs(after / (before * np.array([0.5, 1.0, 0.75])) - 1) < 0.1), (after, before)


def test_resampled_window_keeps_the_peak_voxel():
    volume, _ = crystal("polyhedron", 3.0)
    peak = np.unravel_index(int(np.argmax(volume)), volume.shape)
    window = resample(volume, 1.4, centre=peak, shape=(40, 40, 40))
    assert window.shape == (40, 40, 40) and window.dtype == np.float32
    assert window[20, 20, 20] == volume[peak] and window.max() == volume[peak]


def test_resample_window_beyond_the_source_is_zero():
    volume = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32) + 1
    window = resample(volume, 2.0, centre=(2, 10, 10), shape=(30, 30, 30))
    assert not window[:10].any() and window[12:].all()


def test_coarse_resampling_averages_the_voxels_it_merges():
    """A small crystal on a fine grid (oversampling 12) brought to 4: each output voxel averages the 3 input voxels
    per axis it stands for, as gridding at the coarser voxel would, instead of keeping one in 27 and its noise."""
    from defectscope.preprocessing.frames import zoom_linear

    volume, _ = crystal("ellipsoid", 12.0, n=96)
    clean = volume / volume.max() * 200.0  # 200 counts at the peak
    noisy = np.random.default_rng(1).poisson(clean).astype(np.float32)
    peak = np.array(np.unravel_index(int(np.argmax(clean)), clean.shape))
    shape = (28, 28, 28)

    def plain(v):
        return zoom_linear(v, np.full(3, 3.0), peak - 3.0 * 14, shape)

    def averaged(v):
        return resample(v, 1 / 3, centre=peak, shape=shape)

    noise_averaged = np.linalg.norm(averaged(noisy) - averaged(clean))
    noise_plain = np.linalg.norm(plain(noisy) - plain(clean))
    assert noise_averaged < 0.4 * noise_plain  # 27 voxels averaged: about 1/5 of the noise
    # and the smooth pattern itself barely changes (the peak is 12 voxels wide)
    assert np.linalg.norm(averaged(clean) - plain(clean)) < 0.1 * np.linalg.norm(plain(clean))
    assert averaged(clean).argmax() == plain(clean).argmax()
