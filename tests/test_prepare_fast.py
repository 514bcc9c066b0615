"""The faster preparation steps give what the reference steps they replaced give (pipeline of 40d8773).

The reference implementations are kept here, as they were, and each fast step is compared with its own on
seeded, asymmetric maps (peaks off centre, against faces, hot voxels, noise); then ``prepare`` as a whole is
run with the reference steps patched in and must give the same prepared map, warnings and report.
"""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.preprocessing import centring, cut, oversampling, pipeline
from defectscope.preprocessing.config import PipelineConfig


# -- the reference steps ------------------------------------------------------------------------------
def ref_block_maxima(volume, block):
    n = volume.shape
    padded_shape = [-(-k // block) * block for k in n]
    padded = np.zeros(padded_shape, dtype=volume.dtype)
    padded[: n[0], : n[1], : n[2]] = volume
    b = tuple(k // block for k in padded_shape)
    m = padded.reshape(b[0], block, -1).max(axis=1)
    m = m.reshape(b[0], b[1], block, -1).max(axis=2)
    return b, m.reshape(b[0], b[1], b[2], block).max(axis=3)


def ref_median_filtered(volume, lo, hi, size):
    if size == 1:
        return volume[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1].astype(np.float32)
    r = size // 2
    index = [np.clip(np.arange(lo[k] - r, hi[k] + r + 1), 0, volume.shape[k] - 1) for k in range(3)]
    region = volume[np.ix_(*index)].astype(np.float32, copy=False)
    windows = np.lib.stride_tricks.sliding_window_view(region, (size, size, size))
    return np.median(windows.reshape(*windows.shape[:3], size**3), axis=-1).astype(np.float32)


def ref_isolated_voxels(volume, floor, ratio):
    n = volume.shape
    flat = np.ascontiguousarray(volume).reshape(-1)
    index = np.flatnonzero(flat > max(floor, ratio))
    coords = np.stack(np.unravel_index(index, n), axis=1)
    inner = np.all((coords > 0) & (coords < np.asarray(n) - 1), axis=1)
    index, coords = index[inner], coords[inner]
    if index.size == 0:
        return coords.reshape(0, 3), np.zeros(0, volume.dtype)
    strides = np.array([n[1] * n[2], n[2], 1])
    neighbours = (index[:, None] + np.concatenate([strides, -strides])[None]).reshape(-1)
    brightest = flat[neighbours].reshape(-1, 6).max(axis=1)
    isolated = flat[index] > ratio * np.maximum(brightest, 1)
    return coords[isolated], brightest[isolated]


def ref_centre_of_mass_shift(source, centre, shape, *, max_iterations=centring.MAX_COM_ITERATIONS):
    target = np.array([n // 2 for n in shape])
    start = np.array([int(c) for c in centre])
    current = start.copy()
    seen = {}
    for iteration in range(1, max_iterations + 1):
        window = centring.crop_pad(source, current, shape)
        try:
            com = centring.centre_of_mass(window)
        except ValueError:
            break
        step = np.floor(com + 0.5).astype(int) - target
        seen[tuple(current)] = (float(np.abs(com - target).max()), window)
        if not step.any():
            return centring.CentredWindow(window, tuple(int(c) for c in current),
                                          tuple(int(s) for s in current - start), iteration, True)
        current = current + step
        if tuple(current) in seen:
            break
    best = min(seen, key=lambda k: seen[k][0]) if seen else tuple(current)
    window = seen[best][1] if seen else centring.crop_pad(source, best, shape)
    best_arr = np.array(best)
    return centring.CentredWindow(window, tuple(int(c) for c in best_arr), tuple(int(s) for s in best_arr - start),
                                  len(seen), False)


def ref_peak_candidates(volume):
    _, maxima = centring._block_maxima(volume, centring._BLOCK)
    flat = maxima.reshape(-1)
    count = min(centring.N_BLOCK_CANDIDATES, flat.size)
    top = np.argpartition(flat, flat.size - count)[flat.size - count:]
    top = top[np.lexsort((top, -flat[top]))]
    block = centring._BLOCK
    candidates = [centring._argmax_in(volume, [i * block for i in np.unravel_index(int(j), maxima.shape)], block)
                  for j in top]
    if min(maxima.shape) >= 2:
        cube = centring._cube_minimum(maxima)
        corner = np.unravel_index(int(np.argmax(cube)), cube.shape)
        lo = [c * block for c in corner]
        region = volume[tuple(slice(lo[k], lo[k] + 2 * block) for k in range(3))]
        if min(region.shape) >= 2:
            core = np.unravel_index(int(np.argmax(centring._cube_minimum(region))), tuple(n - 1 for n in region.shape))
            candidate = centring._argmax_in(volume, [lo[k] + core[k] for k in range(3)], 2)
            if candidate not in candidates:
                candidates.append(candidate)
    return candidates


def ref_neighbourhood_medians(volume, points, size):
    r = np.arange(-(size // 2), size // 2 + 1)
    offsets = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
    idx = np.clip(np.asarray(points, dtype=np.intp)[:, None, :] + offsets[None], 0, np.asarray(volume.shape) - 1)
    return np.median(volume[idx[..., 0], idx[..., 1], idx[..., 2]], axis=1)


def ref_cut_near_peak(window):
    centre = np.array(window.shape) // 2
    top = float(window[tuple(centre)])
    if not top > 0:
        return None

    def patch(axis, plane, others, box):
        if not 0 <= plane < window.shape[axis]:
            return None
        index = [slice(None)] * 3
        index[axis] = plane
        index[others[0]], index[others[1]] = box
        return window[tuple(index)]

    for axis in range(3):
        others = [k for k in range(3) if k != axis]
        box = [slice(max(centre[k] - cut.HALF, 0), centre[k] + cut.HALF + 1) for k in others]
        for sign in (1, -1):
            previous = top
            for d in range(1, cut.REACH + 1):
                here = patch(axis, centre[axis] + sign * d, others, box)
                if here is None:
                    break
                if not here.any():
                    after = patch(axis, centre[axis] + sign * (d + 1), others, box)
                    if previous >= cut.MIN_RELATIVE * top and (after is None or not after.any()):
                        return axis, sign, d
                    break
                previous = float(here.mean())
    return None


# -- maps -----------------------------------------------------------------------------------------------
def _map(seed: int, shape=(64, 64, 64), centre=None, hot=0, background=0.0):
    rng = np.random.default_rng(seed)
    centre = np.asarray(centre if centre is not None else rng.uniform(20, 44, 3))
    widths = rng.uniform(1.5, 4.0, 3)
    grids = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij", sparse=True)
    intensity = 3e4 * np.exp(-sum(((g - c) / w) ** 2 for g, c, w in zip(grids, centre, widths)))
    counts = rng.poisson(intensity + background).astype(np.uint32)
    for _ in range(hot):
        counts[tuple(rng.integers(1, n - 1) for n in shape)] = rng.integers(50_000, 200_000)
    return counts


MAPS = [_map(1), _map(2, hot=3), _map(3, centre=(3, 40, 60)), _map(4, shape=(70, 61, 66), background=2.0),
        _map(5, centre=(32, 32, 32), hot=1), _map(6, shape=(50, 80, 64), centre=(25, 5, 33))]


@pytest.mark.parametrize("k", range(len(MAPS)))
def test_block_maxima_and_median_filter_as_reference(k):
    volume = MAPS[k].astype(np.float32)
    assert np.array_equal(centring._block_maxima(volume, 4)[1], ref_block_maxima(volume, 4)[1])
    peak = centring.find_peak(volume, PipelineConfig())
    lo = [max(0, peak.index[i] - 4) for i in range(3)]
    hi = [min(volume.shape[i] - 1, peak.index[i] + 4) for i in range(3)]
    for size in (1, 3, 5):
        assert np.array_equal(centring._median_filtered(volume, lo, hi, size), ref_median_filtered(volume, lo, hi, size))


@pytest.mark.parametrize("k", range(len(MAPS)))
def test_peak_candidates_and_their_medians_as_reference(k):
    volume = MAPS[k].astype(np.float32)
    candidates = centring._peak_candidates(volume)
    assert candidates == ref_peak_candidates(volume)
    assert all(type(c) is int for point in candidates for c in point)
    assert np.array_equal(centring._neighbourhood_medians(volume, candidates, 3),
                          ref_neighbourhood_medians(volume, candidates, 3))
    flat = np.zeros((6, 9, 7), np.float32)  # ties everywhere, blocks cut by the far faces
    flat[5, 8, 6] = flat[0, 0, 0] = 1
    assert centring._peak_candidates(flat) == ref_peak_candidates(flat)


def _cut_windows():
    """Windows with data stopping at every side and distance, and ones it must not call cut."""
    base = centring.crop_pad(MAPS[0].astype(np.float32), centring.find_peak(MAPS[0], PipelineConfig()).index, (64,) * 3)
    yield base
    for axis in range(3):
        for sign in (1, -1):
            for d in (1, 2, 4, 6, 7):
                w = base.copy()
                index = [slice(None)] * 3
                index[axis] = slice(32 + d, None) if sign > 0 else slice(None, 32 - d + 1)
                w[tuple(index)] = 0
                yield w
                index[axis] = 32 + sign * d  # a single empty plane: no cut
                one = base.copy()
                one[tuple(index)] = 0
                yield one
    small = np.zeros((5, 9, 3), np.float32)  # planes beyond the window's faces
    small[2, 4, 1] = 10
    yield small


def test_cut_near_peak_as_reference():
    windows = list(_cut_windows())
    found = [cut.cut_near_peak(w) for w in windows]
    assert found == [ref_cut_near_peak(w) for w in windows]
    assert sum(f is not None for f in found) >= 20  # the check is exercised on both answers


def test_window_of_is_a_view_inside_and_a_padded_copy_across_a_face():
    volume = MAPS[0].astype(np.float32)
    inside = centring.window_of(volume, (32, 32, 32), (16, 16, 16))
    assert np.shares_memory(inside, volume) and np.array_equal(inside, centring.crop_pad(volume, (32, 32, 32), (16,) * 3))
    across = centring.window_of(volume, (3, 32, 32), (16, 16, 16))
    assert not np.shares_memory(across, volume) and np.array_equal(across, centring.crop_pad(volume, (3, 32, 32), (16,) * 3))


@pytest.mark.parametrize("k", range(len(MAPS)))
def test_isolated_voxels_as_reference(k):
    volume = MAPS[k].astype(np.float32)
    for floor, ratio in ((100.0, 50.0), (10.0, 2.0), (1e9, 50.0)):
        got, ref = centring.isolated_voxels(volume, floor, ratio), ref_isolated_voxels(volume, floor, ratio)
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
        assert got[0].shape == ref[0].shape and got[0].shape[1:] == (3,)


@pytest.mark.parametrize("k", range(len(MAPS)))
def test_centre_of_mass_shift_as_reference(k):
    volume = MAPS[k].astype(np.float32)
    rng = np.random.default_rng(k)
    for _ in range(4):
        start = tuple(int(rng.integers(0, n)) for n in volume.shape)
        shape = tuple(int(s) for s in rng.choice([31, 32, 48, 64], 3))
        got, ref = centring.centre_of_mass_shift(volume, start, shape), ref_centre_of_mass_shift(volume, start, shape)
        assert got[1:] == ref[1:]
        assert np.array_equal(got.array, ref.array)


def test_centre_of_mass_shift_of_an_empty_window():
    volume = np.zeros((20, 20, 20), np.float32)
    volume[2, 2, 2] = 5
    got, ref = centring.centre_of_mass_shift(volume, (17, 17, 17), (8, 8, 8)), ref_centre_of_mass_shift(volume, (17, 17, 17), (8, 8, 8))
    assert got[1:] == ref[1:] and np.array_equal(got.array, ref.array)


@pytest.mark.parametrize("k", range(len(MAPS)))
def test_central_peak_width_reads_only_the_middle(k):
    volume = MAPS[k].astype(np.float32)
    window = centring.crop_pad(volume, centring.find_peak(volume, PipelineConfig()).index, (64, 64, 64))
    width, info = oversampling.central_peak_width(window)
    # The reference: the same fit on the whole window made float64.
    width_ref, info_ref = oversampling.central_peak_width(np.pad(window.astype(np.float64), 0))
    assert np.array_equal(width, width_ref, equal_nan=True) and info == info_ref
    small = np.zeros((7, 7, 9), np.float32)
    small[2:5, 3, 4] = [1, 4, 1]
    assert oversampling.central_peak_width(small)[1]["points"] >= 0


@pytest.mark.parametrize("k", range(len(MAPS)))
def test_prepare_as_with_the_reference_steps(k, monkeypatch):
    volume = MAPS[k]
    config = PipelineConfig()
    fast = pipeline.prepare(volume, config, sampling_check=True)
    monkeypatch.setattr(centring, "_block_maxima", ref_block_maxima)
    monkeypatch.setattr(centring, "_median_filtered", ref_median_filtered)
    monkeypatch.setattr(pipeline, "isolated_voxels", ref_isolated_voxels)
    monkeypatch.setattr(pipeline, "centre_of_mass_shift", ref_centre_of_mass_shift)
    monkeypatch.setattr(centring, "_peak_candidates", ref_peak_candidates)
    monkeypatch.setattr(centring, "_neighbourhood_medians", ref_neighbourhood_medians)
    monkeypatch.setattr(cut, "cut_near_peak", ref_cut_near_peak)
    monkeypatch.setattr(pipeline, "window_of", centring.crop_pad)
    ref = pipeline.prepare(volume, config, sampling_check=True)
    assert np.array_equal(fast.array, ref.array)
    assert np.array_equal(fast.variants, ref.variants)
    assert fast.warnings == ref.warnings
    assert fast.report.keys() == ref.report.keys()
    for key, value in ref.report.items():
        if key == "total_counts":
            assert fast.report[key] == pytest.approx(value, rel=1e-6)
        else:
            assert fast.report[key] == value, key
