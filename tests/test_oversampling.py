"""oversampling: estimates on maps of known oversampling, the resampling rule, resampling itself."""

import numpy as np
import pytest
import scipy.fft as sfft

from defectscope.preprocessing.config import PipelineConfig
from defectscope.preprocessing.oversampling import estimate_oversampling, resample, resample_factor

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


@pytest.mark.parametrize("kind", ["box", "ellipsoid", "polyhedron"])
@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0, 4.0, 6.0])
def test_estimate_within_12_percent_per_axis(kind, sigma):
    volume, true = crystal(kind, sigma)
    per_axis, overall = estimate_oversampling(volume, CONFIG)
    assert per_axis.shape == (3,)
    assert np.all(np.abs(per_axis / true - 1) < 0.12), (per_axis, true)
    assert overall == pytest.approx(np.exp(np.log(per_axis).mean()))


def test_estimate_survives_counting_noise():
    volume, true = crystal("polyhedron", 3.0)
    rng = np.random.default_rng(3)
    noisy = rng.poisson(volume / volume.sum() * 2e5).astype(np.float32)  # 2e5 photons in all
    per_axis, _ = estimate_oversampling(noisy, CONFIG)
    assert np.all(np.abs(per_axis / true - 1) < 0.12)


def test_a_hot_voxel_spoils_the_estimate():
    # Why the pipeline removes isolated voxels before estimating: the flat transform of one voxel holding
    # 10 % of the counts lifts the whole autocorrelation over the threshold.
    volume, true = crystal("box", 3.0)
    volume[5, 60, 7] = 0.1 * volume.sum()
    spoiled, _ = estimate_oversampling(volume, CONFIG)
    assert np.any(np.abs(spoiled / true - 1) > 0.3)


def test_estimate_does_not_depend_on_map_size():
    # sigma = 2 pi / (dq * width): cropping the map in q keeps it (the grid step is unchanged).
    volume, true = crystal("polyhedron", 4.0, n=96)
    cropped = volume[16:80, 16:80, 16:80]
    per_axis, _ = estimate_oversampling(cropped, CONFIG)
    assert np.all(np.abs(per_axis / true - 1) < 0.15)


@pytest.mark.parametrize("overall, factor", [(3.0, 1.0), (2.0, 1.0), (4.0, 1.0), (1.6, 1.25), (8.0, 0.5)])
def test_resample_rule(overall, factor):
    assert resample_factor(overall, CONFIG) == pytest.approx(factor)


def test_resample_rule_disabled():
    assert resample_factor(9.0, PipelineConfig(oversampling_range=None)) == 1.0


def test_resampling_moves_the_oversampling():
    volume, true = crystal("box", 6.0)
    half = resample(volume, 0.5)  # coarser q sampling: half the oversampling
    assert half.shape == (32, 32, 32)
    per_axis, _ = estimate_oversampling(half, CONFIG)
    assert np.all(np.abs(per_axis / (true / 2) - 1) < 0.12)


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
