"""Orthonormalisation: fast path == xrayutilities reference, Gridder3D's rule, canonical frame, cache, streaming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from defectscope.errors import BadGeometry, BadMessage, DtypeNotAllowed, NonFinite, ShapeMismatch, TooLarge
from defectscope.preprocessing.config import Limits
from defectscope.preprocessing.geometry import geometry_from_dict, load_xrayutilities
from defectscope.preprocessing.orthonormalise import (
    Grid,
    Orthonormaliser,
    _voxel_index,
    canonical_frame,
    natural_grid,
    orthonormalise,
    orthonormalise_reference,
    pixel_q_lab,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SCAN_34IDC = SHARED_DATA / "aps34idc_au111_s54"
AU111_Q = 2 * np.pi / (4.07999 / np.sqrt(3))  # 2.667 1/A, lattice from the SPEC file's #G1

N, SHAPE = 40, (48, 56)
ANGLES = {"chi": 90.0, "phi": -5.0, "delta": 32.174, "gamma": 12.6346}


def synthetic_geometry(**angles):
    d = {"preset": "aps-34idc", "direct_beam": [256.0, 250.0], "angles": {**ANGLES, **angles},
         "rocking": {"start_deg": -0.1, "step_deg": 0.01}}  # fmt: skip
    return geometry_from_dict(d, n_frames=N, frame_shape=SHAPE)


def relative_differences(fast, ref):
    diff = fast.volume - ref.volume
    return np.linalg.norm(diff) / np.linalg.norm(ref.volume), np.abs(diff).max() / np.abs(ref.volume).max()


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic()


def make_synthetic():
    """An asymmetric peak (tilted anisotropic Gaussian + off-axis satellite) rendered into detector frames."""
    geometry = synthetic_geometry()
    q = pixel_q_lab(geometry, np.arange(N))
    q0 = q[N // 2 + 3, SHAPE[0] // 2 - 5, SHAPE[1] // 2 + 4]
    d = q - q0
    r2 = (d[..., 0] / 2e-3) ** 2 + (d[..., 1] / 1.2e-3) ** 2 + (d[..., 2] / 2.5e-3) ** 2 + d[..., 0] * d[..., 2] / 5e-6
    s2 = ((d - np.array([3e-3, -2e-3, 1e-3])) ** 2).sum(-1) / (1e-3) ** 2
    rng = np.random.default_rng(20240611)
    frames = rng.poisson(5e4 * np.exp(-0.5 * r2) + 8e3 * np.exp(-0.5 * s2) + 0.3).astype(np.int32)
    return geometry, frames, q0


@pytest.fixture(scope="module")
def synthetic_ref(synthetic):
    geometry, frames, _ = synthetic
    return orthonormalise_reference(frames, geometry)


def test_fast_equals_reference_on_a_synthetic_scan(synthetic, synthetic_ref):
    geometry, frames, _ = synthetic
    fast = Orthonormaliser()(frames, geometry)
    assert fast.volume.shape == synthetic_ref.volume.shape
    assert np.count_nonzero(synthetic_ref.volume) > 10_000  # a real 3-D map, not an empty grid
    rel_l2, rel_max = relative_differences(fast, synthetic_ref)
    assert rel_l2 <= 1e-6 and rel_max <= 1e-6
    for name in ("voxel_size", "origin", "rotation", "q_centre_lab"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(synthetic_ref, name))


def test_map_puts_the_peak_at_its_q(synthetic, synthetic_ref):
    _, _, q0 = synthetic
    peak = np.unravel_index(np.argmax(synthetic_ref.volume), synthetic_ref.volume.shape)
    voxel = synthetic_ref.voxel_size[0]
    assert np.linalg.norm(synthetic_ref.q_lab_at(peak) - q0) < 2 * voxel
    assert synthetic_ref.q_norm_at(peak) == pytest.approx(np.linalg.norm(q0), abs=2 * voxel)


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_masked_pixels_contribute_nothing(synthetic, kind):
    geometry, frames, _ = synthetic
    rng = np.random.default_rng(7)
    mask = rng.random(SHAPE if kind == "2d" else (N, *SHAPE)) < 0.15
    mask[..., 20:30, 25:31] = True  # a block over the peak, so whole voxels lose all their pixels
    every_frame = np.broadcast_to(mask, frames.shape)
    spoiled, clean = frames.copy(), frames.copy()
    spoiled[every_frame] = 10**6
    clean[every_frame] = 0
    ref = orthonormalise_reference(spoiled, geometry, mask=mask)
    fast = Orthonormaliser()(spoiled, geometry, mask=mask)
    assert max(relative_differences(fast, ref)) <= 1e-6
    np.testing.assert_allclose(Orthonormaliser()(clean, geometry, mask=mask).volume, fast.volume, rtol=1e-12)
    assert ref.volume.max() < 10**5  # the spoiled values never reached the map
    assert not np.allclose(ref.volume, orthonormalise_reference(frames, geometry).volume)


def test_dense_frames_take_the_whole_frame_path_and_leave_the_cache_intact(synthetic):
    # Frames with no zeros are added whole; masking them must not write into the cached mapping.
    geometry, frames, _ = synthetic
    dense = frames + 1.5
    mask = np.zeros(SHAPE, dtype=bool)
    mask[10:30, 5:40] = True
    ortho = Orthonormaliser()
    masked = ortho(dense, geometry, mask=mask)
    assert max(relative_differences(masked, orthonormalise_reference(dense, geometry, mask=mask))) <= 1e-6
    unmasked = ortho(dense, geometry)
    assert max(relative_differences(unmasked, orthonormalise_reference(dense, geometry))) <= 1e-6


def test_float_frames_as_a_list_equal_the_int_stack(synthetic, synthetic_ref):
    geometry, frames, _ = synthetic
    as_list = [f.astype(np.float32) for f in frames]
    fast = Orthonormaliser()(as_list, geometry.to_dict())  # a SPEC §4 dict is accepted too
    assert max(relative_differences(fast, synthetic_ref)) <= 1e-6


def test_frame_by_frame_in_any_order_equals_whole_scan(synthetic, synthetic_ref):
    geometry, frames, _ = synthetic
    ortho = Orthonormaliser()
    whole = ortho(frames, geometry)
    state = ortho.start(geometry)
    for i in np.random.default_rng(3).permutation(N):
        ortho.accumulate_frame(state, int(i), frames[i])
    streamed = ortho.finish(state)
    np.testing.assert_allclose(streamed.volume, whole.volume, rtol=1e-13, atol=0)
    assert ortho.cache_info().misses == 1


def test_missing_frames_are_refused_or_treated_as_masked(synthetic):
    geometry, frames, _ = synthetic
    ortho = Orthonormaliser()
    state = ortho.start(geometry)
    for i in range(N):
        if i not in (5, 21):
            ortho.accumulate_frame(state, i, frames[i])
    with pytest.raises(ShapeMismatch, match="2 of 40 frames never arrived"):
        ortho.finish(state)
    partial = ortho.finish(state, allow_partial=True)
    missing = np.zeros((N, *SHAPE), dtype=bool)
    missing[[5, 21]] = True
    ref = orthonormalise_reference(frames, geometry, mask=missing)
    assert max(relative_differences(partial, ref)) <= 1e-6


def test_stream_input_errors(synthetic):
    geometry, frames, _ = synthetic
    ortho = Orthonormaliser()
    state = ortho.start(geometry)
    ortho.accumulate_frame(state, 0, frames[0])
    with pytest.raises(BadMessage, match="already accumulated"):
        ortho.accumulate_frame(state, 0, frames[0])
    with pytest.raises(BadMessage, match="outside 0..39"):
        ortho.accumulate_frame(state, N, frames[0])
    with pytest.raises(ShapeMismatch, match="expected"):
        ortho.accumulate_frame(state, 1, frames[1][:, :-1])
    with pytest.raises(DtypeNotAllowed):
        ortho.accumulate_frame(state, 1, frames[1].astype(np.int8))
    with pytest.raises(BadGeometry, match="with_scan"):
        ortho.start(geometry_from_dict(geometry.to_dict()))
    ortho.finish(state, allow_partial=True)
    with pytest.raises(BadMessage, match="already finished"):
        ortho.accumulate_frame(state, 1, frames[1])
    with pytest.raises(BadMessage, match="already finished"):
        ortho.finish(state)


def test_cache_hit_for_same_geometry_and_miss_when_a_motor_moves(synthetic):
    geometry, frames, _ = synthetic
    ortho = Orthonormaliser(cache_size=2)
    ortho(frames, geometry)
    ortho(frames[::-1].copy(), geometry.to_dict())  # another scan, same geometry and motors
    assert ortho.cache_info()[:3] == (1, 1, 1)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[3, 4] = True
    ortho(frames, geometry, mask=mask)  # a mask changes counts, not the mapping
    assert ortho.cache_info()[:3] == (2, 1, 1)
    moved = synthetic_geometry(delta=32.3)
    other = ortho(frames, moved)
    assert ortho.cache_info()[:3] == (2, 2, 2)
    assert not np.array_equal(other.rotation, ortho(frames, geometry).rotation)
    assert ortho.cache_info()[:3] == (3, 2, 2)


def test_binning_rule_is_gridder3d(synthetic):
    """Random points, exact ties between bins and points on the range edges bin as in Gridder3D."""
    xu = load_xrayutilities()
    # Binary fractions: bin edges and the ties half-way between bin centres are exact in floating point.
    grid = Grid(shape=(7, 5, 9), origin=(2.5, -(2.0**-7), 2.0**-5), voxel_size=2.0**-10)
    rng = np.random.default_rng(11)
    lo, hi = np.array(grid.origin), np.array(grid.upper)
    points = rng.uniform(lo - 2e-3, hi + 2e-3, size=(4000, 3))
    assert np.all(grid.steps == 2.0**-10)
    ties = lo + (rng.integers(0, 6, size=(500, 3)) + 0.5) * grid.steps
    edges = np.where(rng.random((300, 3)) < 0.5, lo, hi)
    points = np.concatenate([points, ties, edges])
    coords = [points[:, k].copy() for k in range(3)]
    index = _voxel_index(coords, grid)
    ours = np.bincount(index[index >= 0], minlength=grid.n_voxels).reshape(grid.shape)
    gridder = xu.Gridder3D(*grid.shape)
    gridder.Normalize(False)
    gridder.dataRange(lo[0], hi[0], lo[1], hi[1], lo[2], hi[2], fixed=True)
    gridder(*coords, np.ones(len(points)))
    np.testing.assert_array_equal(ours, gridder.data)
    assert (index < 0).sum() > 100  # some points were outside and dropped


def test_canonical_frame_is_right_handed_with_axis0_along_q(synthetic):
    geometry, _, _ = synthetic
    frame = canonical_frame(geometry)
    r = frame.rotation
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    np.testing.assert_allclose(r @ frame.q_centre_lab, [np.linalg.norm(frame.q_centre_lab), 0, 0], atol=1e-12)
    centre = pixel_q_lab(geometry, [(N - 1) // 2], roi=[24, 25, 28, 29]).reshape(3)
    np.testing.assert_array_equal(frame.q_centre_lab, centre)  # data-independent: centre pixel, middle frame
    grid = natural_grid(geometry, frame, max_grid=16)
    assert grid.shape == (16, 16, 16) and grid.voxel_size == frame.natural_voxel


def test_input_errors_are_precise(synthetic):
    geometry, frames, _ = synthetic
    ortho = Orthonormaliser()
    with pytest.raises(ShapeMismatch, match=r"\[n_frames, rows, cols\]"):
        ortho(frames[0], geometry)
    with pytest.raises(DtypeNotAllowed, match=r"\|i1"):
        ortho(frames.astype(np.int8), geometry)
    with pytest.raises(DtypeNotAllowed, match="b1"):
        orthonormalise_reference(frames > 0, geometry)
    with pytest.raises(ShapeMismatch, match="one shape"):
        ortho([frames[0], frames[1][:-1]], geometry)
    with pytest.raises(TooLarge, match="frames exceed"):
        Orthonormaliser(limits=Limits(max_scan_frames=10))(frames, geometry)
    with pytest.raises(TooLarge, match="voxels"):
        Orthonormaliser(limits=Limits(max_scan_voxels=1000))(frames, geometry)
    with pytest.raises(TooLarge, match="grid"):
        orthonormalise_reference(frames, geometry, limits=Limits(max_map_voxels=1000))
    with pytest.raises(ShapeMismatch, match="geometry is for 40 frames"):
        ortho(frames[:-1], geometry)
    with pytest.raises(ShapeMismatch, match="mask shape"):
        ortho(frames, geometry, mask=np.zeros((5, 5), bool))
    with pytest.raises(DtypeNotAllowed, match="mask dtype"):
        ortho(frames, geometry, mask=np.zeros(SHAPE, np.float32))
    nan = frames.astype(np.float32)
    nan[3, 4, 5] = np.nan
    with pytest.raises(NonFinite, match="frame 3"):
        ortho(nan, geometry)
    with pytest.raises(NonFinite, match="frame 3"):
        orthonormalise_reference(nan, geometry)


def test_module_level_orthonormalise(synthetic, synthetic_ref):
    geometry, frames, _ = synthetic
    assert max(relative_differences(orthonormalise(frames, geometry), synthetic_ref)) <= 1e-6


# The measured APS 34-ID-C Au(111) scan -------------------------------------------------------------
@pytest.fixture(scope="module")
def au_scan():
    if not SCAN_34IDC.is_dir():
        pytest.skip(f"measured data not present at {SCAN_34IDC}")
    from defectscope.preprocessing.scans import load_spec_tiff_scan

    frames, geometry, mask = load_spec_tiff_scan(
        SCAN_34IDC / "example.spec", 54, SCAN_34IDC / "Staff20-1a_S0054", dark=SCAN_34IDC / "dark.tif"
    )
    return frames, geometry, mask, orthonormalise_reference(frames, geometry, mask=mask)


def test_fast_equals_reference_on_the_34idc_scan(au_scan):
    frames, geometry, mask, ref = au_scan
    fast = Orthonormaliser()(frames, geometry, mask=mask)
    rel_l2, rel_max = relative_differences(fast, ref)
    assert rel_l2 <= 1e-6 and rel_max <= 1e-6


def test_34idc_peak_is_au111_along_axis0(au_scan):
    frames, geometry, _, ref = au_scan
    peak = np.unravel_index(np.argmax(ref.volume), ref.volume.shape)
    assert ref.q_norm_at(peak) == pytest.approx(AU111_Q, rel=0.01)
    q = ref.q_at(peak)
    assert np.degrees(np.arctan2(np.hypot(q[1], q[2]), q[0])) < 0.5  # the peak's q is along axis 0
    # And it sits where the brightest detector pixel says it should.
    brightest = np.unravel_index(np.argmax(frames), frames.shape)
    q_pixel = pixel_q_lab(geometry, [brightest[0]], roi=[brightest[1], brightest[1] + 1, brightest[2], brightest[2] + 1])
    assert np.linalg.norm(ref.q_lab_at(peak) - q_pixel.reshape(3)) < 3 * ref.voxel_size[0]


def test_window_around_the_peak_equals_the_same_box_of_the_whole_map(synthetic):
    """finish_window makes only a box around the brightest coarse block; each of its voxels is the full map's."""
    geometry, frames, q0 = synthetic
    ortho = Orthonormaliser()
    whole = ortho(frames, geometry)
    mask = np.zeros(frames.shape[1:], dtype=bool)
    mask[3, 4] = True  # a masked pixel: the counts are the masked ones in both paths
    whole_masked = ortho(frames, geometry, mask=mask)
    for m, ref in ((None, whole), (mask, whole_masked)):
        qmap, where = ortho.finish_window(ortho.accumulate(frames, geometry, mask=m), 12)
        lo = np.array(where["window_origin"])
        assert qmap.volume.shape == (12, 12, 12) and where["grid_shape"] == list(ref.volume.shape)
        np.testing.assert_array_equal(qmap.volume, ref.volume[tuple(slice(a, a + 12) for a in lo)])
        np.testing.assert_allclose(qmap.q_at((0, 0, 0)), ref.q_at(lo), rtol=0, atol=1e-12)
        # The box holds the peak of the whole map.
        peak = np.array(np.unravel_index(np.argmax(ref.volume), ref.volume.shape))
        assert np.all((peak >= lo) & (peak < lo + 12))


def test_window_ignores_a_hot_pixel_and_is_clipped_to_the_grid(synthetic):
    """One pixel far brighter than any voxel of the peak does not move the box: block sums, not maxima."""
    geometry, frames, _ = synthetic
    ortho = Orthonormaliser()
    hot = frames.copy()
    hot[2, 1, 1] = 20 * frames.max()  # far from the peak, near a face of the grid
    whole = ortho(hot, geometry)
    qmap, where = ortho.finish_window(ortho.accumulate(hot, geometry), 16)
    hot_voxel = np.array(np.unravel_index(np.argmax(whole.volume), whole.volume.shape))
    peak = np.array(np.unravel_index(np.argmax(ortho(frames, geometry).volume), whole.volume.shape))
    assert np.abs(hot_voxel - peak).max() > 10  # the hot voxel is the maximum of the whole map...
    lo = np.array(where["window_origin"])
    assert np.all((peak >= lo + 2) & (peak < lo + 14))  # ...but the box is around the Bragg peak
    # A box larger than the grid is the whole grid.
    qmap, where = ortho.finish_window(ortho.accumulate(frames, geometry), 10_000)
    np.testing.assert_array_equal(qmap.volume, ortho(frames, geometry).volume)
    assert where["window_origin"] == [0, 0, 0]


def test_binned_window_is_gridding_at_the_coarser_voxel(synthetic):
    """finish_window(binning=k) grids the box at k voxels per axis: the same map as xrayutilities' Gridder3D
    run on a grid of twice the voxel (whose bins hold whole fine bins), with a masked pixel too; not the mean of
    the fine voxels, which would weight a voxel of few pixels like one of many."""
    geometry, frames, _ = synthetic
    ortho = Orthonormaliser()
    fine = natural_grid(geometry)
    mask = np.zeros(frames.shape[1:], dtype=bool)
    mask[20:22, 30] = True
    _, near_peak = ortho.finish_window(ortho.accumulate(frames, geometry, mask=mask), 10, binning=(2, 2, 2))
    centre = np.array(near_peak["window_centre"]) // 2 * 2  # the box then starts on an even voxel: whole coarse bins
    qmap, where = ortho.finish_window(ortho.accumulate(frames, geometry, mask=mask), 10, binning=(2, 2, 2),
                                      centre=centre)
    lo = np.array(where["window_origin"])
    assert qmap.volume.shape == (10, 10, 10) and where["binning"] == [2, 2, 2] and where["window_shape"] == [20] * 3
    assert np.all(lo % 2 == 0)
    d = fine.voxel_size
    coarse = Grid(shape=tuple(n // 2 for n in fine.shape), origin=tuple(o + 0.5 * d for o in fine.origin), voxel_size=2 * d)
    ref = orthonormalise_reference(frames, geometry, mask=mask, grid=coarse)
    box = ref.volume[tuple(slice(a // 2, a // 2 + 10) for a in lo)]
    assert np.count_nonzero(box) > 500
    np.testing.assert_allclose(qmap.volume, box, rtol=1e-12, atol=1e-12 * box.max())
    np.testing.assert_allclose(qmap.q_at((0, 0, 0)), ref.q_at(lo // 2), rtol=0, atol=1e-12)
    whole = ortho(frames, geometry, mask=mask).volume[tuple(slice(a, a + 20) for a in lo)]
    mean_of_fine = whole.reshape(10, 2, 10, 2, 10, 2).mean(axis=(1, 3, 5))
    assert np.abs(qmap.volume - mean_of_fine).max() > 1e-3 * qmap.volume.max()
    np.testing.assert_allclose(qmap.volume.sum() * 8, whole.sum(), rtol=0.2)  # same map, 8x fewer voxels
    with pytest.raises(BadMessage, match="binning"):
        ortho.finish_window(ortho.accumulate(frames, geometry), 10, binning=(2, 0, 1))
