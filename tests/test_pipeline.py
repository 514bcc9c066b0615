"""prepare / prepare_batch: the whole path from a map in any frame to the model's 64^3 input."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.fft as sfft

from defectscope.errors import DtypeNotAllowed, LowSignal, NonFinite, ShapeMismatch, TooLarge
from defectscope.preprocessing.centring import centre_of_mass
from defectscope.preprocessing.config import Limits, PipelineConfig
from defectscope.preprocessing.frames import CANONICAL_AXES, minimal_rotation
from defectscope.preprocessing.pipeline import Prepared, prepare, prepare_batch

CONFIG = PipelineConfig()
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def bcdi_map(n=72, sigma=3.0, peak=2e5, offset=(3, -4, 2), seed=0):
    """|FFT|^2 of a strained faceted crystal: fringes, a peak off the array centre, Poisson counts.

    The strain phase makes the pattern non-centrosymmetric (I(q) != I(-q)), so that a wrong flip shows.
    """
    c = (n - 1) / 2
    x, y, z = np.meshgrid(*(np.arange(n) - c,) * 3, indexing="ij")
    half = n / (sigma * np.array([1.0, 0.9, 1.1])) / 2
    u, v, w = x / half[0], y / half[1], z / half[2]
    shape = (abs(u) <= 1) & (abs(v) <= 1) & (abs(w) <= 1) & (abs(u) + abs(v) + abs(w) <= 1.9) & (u + 0.6 * v - 0.3 * w <= 1.0)
    phase = 1.2 * u * v + 0.8 * w**2 + 0.5 * u**3 + 2 * np.pi * (np.array(offset)[:, None, None, None] * np.stack([x, y, z])).sum(0) / n
    intensity = np.abs(sfft.fftshift(sfft.fftn(shape * np.exp(1j * phase)))) ** 2
    intensity *= peak / intensity.max()
    return np.random.default_rng(seed).poisson(intensity + 0.3).astype(np.float32)


@pytest.fixture(scope="module")
def canonical():
    return bcdi_map()


def check_model_input(prepared: Prepared, config=CONFIG):
    a = prepared.array
    assert a.shape == config.shape and a.dtype == np.float32 and a.flags["C_CONTIGUOUS"]
    assert np.isfinite(a).all() and a.min() >= 0
    json.dumps(prepared.report)  # JSON-ready, numpy types included
    for w in prepared.warnings:
        assert set(w) == {"reason", "message"} and w["reason"].isupper() and "\n" not in w["message"]


def test_prepare_canonical_map(canonical):
    prepared = prepare(canonical, CONFIG)
    check_model_input(prepared)
    assert prepared.array.max() == 1.0
    assert tuple(np.floor(centre_of_mass(prepared.array) + 0.5).astype(int)) == (32, 32, 32)
    r = prepared.report
    assert r["input_shape"] == [72, 72, 72] and r["peak_counts"] > 1e5
    assert r["com_converged"] and r["resample_factor"] == [1.0, 1.0, 1.0]
    # A faceted, strained crystal reads ~15 % small (the central peak's width: shape and strain, oversampling.py).
    assert r["oversampling"] == pytest.approx(3.0, rel=0.25) and len(r["oversampling_per_axis"]) == 3
    assert prepared.warnings == []


def test_prepare_is_deterministic_and_leaves_input_alone(canonical):
    before = canonical.copy()
    a, b = prepare(canonical, CONFIG), prepare(canonical, CONFIG)
    assert np.array_equal(a.array, b.array) and a.report == b.report
    assert np.array_equal(canonical, before)


@pytest.mark.parametrize("perm", [(0, 2, 1), (1, 0, 2), (2, 0, 1), (1, 2, 0)])
def test_permuted_axes_give_the_same_model_input(canonical, perm):
    sent = np.ascontiguousarray(canonical[:, :70, :68].transpose(perm))  # non-cubic: sizes travel too
    reference = prepare(canonical[:, :70, :68], CONFIG)
    prepared = prepare(sent, CONFIG, axes=[CANONICAL_AXES[p] for p in perm])
    assert np.array_equal(prepared.array, reference.array)


@pytest.mark.parametrize("q, build", [
    # The inverse minimal rotation written out by hand: sent(x) = canonical(R x).
    ((0, 1, 0), lambda v: v.transpose(1, 0, 2)[::-1]),
    ((0, 0, -1), lambda v: v.transpose(2, 1, 0)[:, :, ::-1]),
    ((-1, 0, 0), lambda v: v[::-1, ::-1, :]),
])
def test_q_direction_along_another_axis_gives_the_same_model_input(canonical, q, build):
    sent = np.ascontiguousarray(build(canonical))
    prepared = prepare(sent, CONFIG, axes=("rocking", "det_row", "det_col"), q_direction=q)
    assert np.array_equal(prepared.array, prepare(canonical, CONFIG).array)
    assert prepared.report["frame"]["interpolated"] is False


def smooth_peak(grid):
    """A smooth asymmetric peak (centred coordinates (..., 3)) with a side lobe: Gaussians only, so
    one linear interpolation is good to ~1 % and the oblique comparison measures the geometry."""
    x = grid
    f = np.exp(-(x[..., 0] ** 2 / 40 + x[..., 1] ** 2 / 22 + x[..., 2] ** 2 / 30))
    f += 0.5 * np.exp(-(((x[..., 0] - 8.3) ** 2) / 20 + ((x[..., 1] + 3.1) ** 2) / 16 + ((x[..., 2] - 2.4) ** 2) / 24))
    f += 0.2 * np.exp(-(((x[..., 0] + 2.2) ** 2) / 14 + ((x[..., 1] - 7.7) ** 2) / 30 + ((x[..., 2] + 9.6) ** 2) / 18))
    return 1e5 * f


@pytest.mark.parametrize("q", [(1.0, 0.8, 0.0), (0.35, -0.55, 0.76)])
def test_oblique_q_direction_close_to_canonical(q):
    n = 81
    c = (n - 1) / 2
    grid = np.stack(np.meshgrid(*(np.arange(n) - c,) * 3, indexing="ij"), axis=-1)
    r = minimal_rotation(q)
    config = PipelineConfig(oversampling_range=None)  # isolate the frame conversion
    reference = prepare(smooth_peak(grid).astype(np.float32), config)
    prepared = prepare(smooth_peak(grid @ r.T).astype(np.float32), config, axes=("x", "y", "z"), q_direction=q)
    assert prepared.report["frame"]["interpolated"] is True
    assert reference.report["window_centre"] == prepared.report["window_centre"]
    assert np.max(np.abs(prepared.array - reference.array)) < 0.03


@pytest.mark.parametrize("kw", [
    dict(axes=("x", "y", "z"), q_direction=(0.3, 0.5, 0.6)),
    dict(axes=CANONICAL_AXES, voxel_size=(1.0, 1.3, 1.0)),
    dict(axes=("x", "y", "z"), q_direction=(0, -1, 0), voxel_size=(1.2, 1.0, 1.0)),
])
def test_large_interpolated_map_converts_only_a_region_with_the_same_result(kw):
    # A 96^3 map that needs interpolation is converted only around its peak (an 80^3 region): the
    # model input must be what converting the whole map gives.
    from defectscope.preprocessing.frames import to_canonical

    volume = bcdi_map(n=96, offset=(5, -3, 2), seed=4)
    prepared = prepare(volume, CONFIG, **kw)
    assert prepared.report["frame"]["window_shape"] == [80, 80, 80]
    whole, _ = to_canonical(volume, **kw)
    reference = prepare(whole, CONFIG)
    assert prepared.report["window_centre"] == reference.report["window_centre"]
    assert prepared.report["peak_index"] == reference.report["peak_index"]
    assert np.allclose(prepared.array, reference.array, atol=1e-5)


@pytest.mark.parametrize("dtype", ["<u2", "<u4", "<i4", "<f8", ">f4"])
def test_integer_and_double_inputs_match_float32(canonical, dtype):
    counts = np.minimum(canonical, 60000)  # fits in uint16
    assert np.array_equal(prepare(counts.astype(dtype), CONFIG).array, prepare(counts, CONFIG).array)


def test_mask_zeroes_bad_voxels_first(canonical):
    sent = canonical.copy()
    mask = np.zeros(sent.shape, bool)
    mask[:, 40:42, :] = True  # detector gap
    sent[mask] = np.nan  # masked voxels may hold anything
    prepared = prepare(sent, CONFIG, mask=mask)
    check_model_input(prepared)
    assert prepared.report["masked_voxels"] == int(mask.sum())
    as_int = prepare(sent, CONFIG, mask=mask.astype(np.int8))
    assert np.array_equal(as_int.array, prepared.array)


def test_high_masked_fraction_warns(canonical):
    mask = np.zeros(canonical.shape, bool)
    mask[:, :, :20] = True
    prepared = prepare(canonical, CONFIG, mask=mask)
    assert "HIGH_MASKED_FRACTION" in [w["reason"] for w in prepared.warnings]


def test_mask_shape_mismatch(canonical):
    with pytest.raises(ShapeMismatch, match="mask shape"):
        prepare(canonical, CONFIG, mask=np.zeros((72, 72, 71), bool))


def test_everything_masked_is_low_signal(canonical):
    with pytest.raises(LowSignal, match="masked"):
        prepare(canonical, CONFIG, mask=np.ones(canonical.shape, bool))


def test_low_counts_warns():
    prepared = prepare(bcdi_map(peak=300.0, seed=1), CONFIG)
    check_model_input(prepared)
    assert [w["reason"] for w in prepared.warnings] == ["LOW_COUNTS"]
    assert "below 1000" in prepared.warnings[0]["message"]


def test_peak_near_edge_warns_and_nothing_wraps():
    volume = bcdi_map(offset=(31, 0, 0), seed=2)  # peak 4 voxels from the last face of axis 0
    prepared = prepare(volume, CONFIG)
    check_model_input(prepared)
    assert "PEAK_NEAR_EDGE" in [w["reason"] for w in prepared.warnings]
    start = prepared.report["window_centre"][0] - 32
    end = start + 64
    assert end > 72 and not prepared.array[64 - int(end - 72):].any()


def test_hot_voxel_is_suppressed_and_does_not_set_the_scale(canonical):
    reference = prepare(canonical, CONFIG)
    sent = canonical.copy()
    sent[40, 30, 33] = 5e8  # a hot pixel 2500x the peak, inside the model's window
    prepared = prepare(sent, CONFIG)
    assert [w["reason"] for w in prepared.warnings] == ["ISOLATED_VOXELS_SUPPRESSED"]
    assert prepared.report["oversampling"] == pytest.approx(reference.report["oversampling"], rel=0.02)
    assert prepared.report["peak_index"] == reference.report["peak_index"]
    # Divided by the Bragg peak, not by the hot voxel: the two inputs agree away from the hot voxel.
    assert np.max(np.abs(prepared.array - reference.array)) < 0.01


def test_out_of_range_oversampling_is_resampled():
    volume = bcdi_map(n=96, sigma=6.0, offset=(0, 0, 0))
    prepared = prepare(volume, CONFIG)
    check_model_input(prepared)
    assert [w["reason"] for w in prepared.warnings] == ["OVERSAMPLING_OUT_OF_RANGE"]
    r = prepared.report
    per_axis = np.array(r["oversampling_per_axis"])
    assert np.all(per_axis > 4.0) and r["oversampling"] == pytest.approx(6.0, rel=0.25)
    assert r["resample_factor"] == pytest.approx((4.0 / per_axis).tolist(), rel=1e-3)  # each axis its own
    assert r["oversampling_after"] == pytest.approx([4.0] * 3, rel=1e-3)
    assert tuple(np.floor(centre_of_mass(prepared.array) + 0.5).astype(int)) == (32, 32, 32)
    # The resampled map really is at the bound: estimate it again.
    again = prepare(prepared.array * np.float32(1e5), CONFIG)
    assert np.array(again.report["oversampling_per_axis"]) == pytest.approx([4.0] * 3, rel=0.15)


def test_fixed_target_puts_every_axis_on_it():
    config = PipelineConfig(oversampling_target=3.0)
    for sigma in (2.5, 6.0):
        r = prepare(bcdi_map(n=96, sigma=sigma, offset=(0, 0, 0)), config).report
        assert r["oversampling_after"] == pytest.approx([3.0] * 3, rel=0.011)


def test_under_sampled_map_is_resampled_up_and_said():
    prepared = prepare(bcdi_map(n=64, sigma=1.6, offset=(0, 0, 0)), CONFIG)
    assert [w["reason"] for w in prepared.warnings][0] == "OVERSAMPLING_OUT_OF_RANGE"
    assert "under-sampled" in prepared.warnings[0]["message"]
    assert min(prepared.report["resample_factor"]) > 1.1
    assert "low" in prepared.report["oversampling_confidence"]


def test_unresolved_peak_gets_sampling_undetermined():
    prepared = prepare(bcdi_map(n=64, sigma=0.9, offset=(0, 0, 0)), CONFIG)
    reasons = [w["reason"] for w in prepared.warnings]
    assert "SAMPLING_UNDETERMINED" in reasons
    assert "none" in prepared.report["oversampling_confidence"]


def test_small_input_is_padded():
    prepared = prepare(bcdi_map(n=40, sigma=2.5, offset=(1, 0, -1)), CONFIG)
    check_model_input(prepared)
    assert not prepared.array[:8].any() and not prepared.array[-8:].any()


@pytest.mark.parametrize("transform, normalisation", [("sqrt", "max"), ("log1p", "sum"), ("none", "none")])
def test_intensity_options(canonical, transform, normalisation):
    config = PipelineConfig(intensity_transform=transform, normalisation=normalisation)
    prepared = prepare(canonical, config)
    plain = prepare(canonical, PipelineConfig(normalisation="none")).array
    expected = {"none": plain, "sqrt": np.sqrt(plain), "log1p": np.log1p(plain)}[transform]
    expected = {"max": expected / expected.max(), "sum": expected / expected.sum(dtype=np.float64), "none": expected}[normalisation]
    assert np.allclose(prepared.array, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("volume, error", [
    (np.zeros((64, 64, 64), np.float32), LowSignal),
    (np.full((64, 64, 64), np.nan, np.float32), NonFinite),
    (np.zeros((64, 64, 64), np.uint8), DtypeNotAllowed),
    (np.zeros((64, 64), np.float32), ShapeMismatch),
])
def test_bad_maps_refused(volume, error):
    with pytest.raises(error):
        prepare(volume, CONFIG)


def test_lone_hot_voxel_on_empty_map_is_low_signal():
    volume = np.zeros((64, 64, 64), np.float32)
    volume[10, 20, 30] = 1e6
    with pytest.raises(LowSignal, match="isolated"):
        prepare(volume, CONFIG)


def test_limits_apply():
    with pytest.raises(TooLarge):
        prepare(np.ones((20, 20, 20), np.float32), CONFIG, limits=Limits(max_map_voxels=1000))


def test_prepare_batch(canonical):
    other = bcdi_map(seed=5, offset=(-2, 1, 5), peak=500.0)
    batch, warnings, reports = prepare_batch(np.stack([canonical, other]), CONFIG)
    assert batch.shape == (2, 64, 64, 64) and batch.dtype == np.float32
    assert np.array_equal(batch[0], prepare(canonical, CONFIG).array)
    assert np.array_equal(batch[1], prepare(other, CONFIG).array)
    assert warnings[0] == [] and [w["reason"] for w in warnings[1]] == ["LOW_COUNTS"]
    assert len(reports) == 2


def test_prepare_batch_names_the_bad_map(canonical):
    with pytest.raises(NonFinite, match="map 1 of 2"):
        prepare_batch([canonical, np.full(canonical.shape, np.inf, np.float32)], CONFIG)
    with pytest.raises(TooLarge):
        prepare_batch(np.zeros((65, 8, 8, 8), np.float32), CONFIG)


def test_prepare_batch_with_one_mask_for_all(canonical):
    mask = np.zeros(canonical.shape, bool)
    mask[0, 0, 0] = True
    batch, _, reports = prepare_batch([canonical, canonical], CONFIG, mask=mask)
    assert [r["masked_voxels"] for r in reports] == [1, 1]


# --- measured data --------------------------------------------------------------------------------
def cdinn(name):
    path = DATA / "cdinn_example_64" / name
    if not path.exists():
        pytest.skip(f"measured data not available ({path})")
    return path


def test_measured_tiff_prepares():
    from defectscope.preprocessing.loaders import load_map

    volume = load_map(cdinn("ft_crop_64.tif"))
    prepared = prepare(volume, CONFIG)
    check_model_input(prepared)
    r = prepared.report
    assert r["peak_counts"] > 1e6 and all(2.0 < s < 8.0 for s in r["oversampling_per_axis"])
    print("cdinn ft_crop_64.tif oversampling", r["oversampling_per_axis"], r["oversampling"])


def test_measured_npy_agrees_with_tiff():
    from defectscope.preprocessing.loaders import load_map

    # The .npy holds sqrt(I)/max in another orientation (README: rot90(tif[:, :, ::-1], 1, axes=(0, 2))).
    amplitude = load_map(cdinn("ft_crop_64.npy"))
    tif = load_map(cdinn("ft_crop_64.tif"))
    assert np.allclose(amplitude, np.sqrt(np.rot90(tif[:, :, ::-1], 1, axes=(0, 2)) / tif.max()), atol=1e-6)
    with pytest.raises(LowSignal):  # an amplitude scaled to 1 is not counts: refused by default
        prepare(amplitude, CONFIG)
    config = PipelineConfig(min_peak_counts=0.0, low_counts_peak=0.0)
    from_npy = prepare(amplitude**2, config)
    check_model_input(from_npy)
    tif_axes = prepare(tif, CONFIG).report["oversampling_per_axis"]
    assert from_npy.report["oversampling_per_axis"] == pytest.approx(tif_axes[::-1], rel=0.02)
