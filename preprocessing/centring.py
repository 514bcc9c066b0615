"""Find the Bragg peak, cut the model's window around it, and put the centre of mass on its centre voxel.

Peak finding must not be captured by an isolated hot voxel or a one-voxel alien, yet a median filter
of a whole 64^3 map costs ~100 ms. So the median is taken only where it matters: at a few candidate
voxels (the brightest voxel of each of the brightest 4^3 blocks, and the core of the brightest 2x2x2
group of blocks, which a lone voxel or a one-voxel line can never be), and then in a small box around
the winner for the centre-of-mass refinement.

Windows are always cut with zero padding outside the source, never with ``np.roll``: content from the
opposite face must not wrap into the map the model sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from defectscope.preprocessing.config import PipelineConfig

# Peak candidates: the brightest voxel of each of the N brightest blocks of _BLOCK^3 voxels.
N_BLOCK_CANDIDATES = 8
_BLOCK = 4
# Whole-voxel centre-of-mass re-cuts before giving up (it normally settles in one or two).
MAX_COM_ITERATIONS = 5


class Peak(NamedTuple):
    index: tuple[int, int, int]  # brightest voxel of the peak (isolated outliers excluded)
    centre: tuple[float, float, float]  # centre of mass of the median-filtered box around it
    counts: float  # raw value at ``index``
    median_counts: float  # median-filtered value at ``index`` (a lone hot voxel leaves it ~0)


class CentredWindow(NamedTuple):
    array: np.ndarray  # the window, ``shape``, float32, zero outside the source
    centre: tuple[int, int, int]  # source voxel now at ``shape // 2``
    shift: tuple[int, int, int]  # centre minus the starting centre, voxels of the source
    iterations: int
    converged: bool  # rounded centre of mass on ``shape // 2``


def find_peak(volume: np.ndarray, config: PipelineConfig) -> Peak:
    """The Bragg peak of one 3-D map, robust to isolated hot voxels and one-voxel aliens."""
    size = config.peak_median_size
    candidates = _peak_candidates(volume)
    scores = _neighbourhood_medians(volume, candidates, size)
    raw = np.array([volume[c] for c in candidates], dtype=np.float64)
    # Highest median wins; ties go to the brighter raw voxel, then to the first (deterministic).
    best = candidates[int(np.lexsort((-raw, -scores))[0])]

    half = config.peak_com_halfwidth
    lo = [max(0, best[k] - half) for k in range(3)]
    hi = [min(volume.shape[k] - 1, best[k] + half) for k in range(3)]
    box = _median_filtered(volume, lo, hi, size)
    weights = box.astype(np.float64) - box.min()  # the box's floor is background, not peak
    if weights.sum() > 0:
        centre = tuple(float(lo[k] + c) for k, c in enumerate(centre_of_mass(weights)))
    else:
        centre = tuple(float(b) for b in best)
    # The filtered maximum is robust but may sit a voxel off the raw one (the filter flattens the top);
    # the raw maximum next to it gives the peak voxel and its true counts. (The centre of mass is no
    # start point: next to a face its box is one-sided and the centre is pulled inwards.)
    top = np.unravel_index(int(np.argmax(box)), box.shape)
    index = _brightest_genuine(volume, [lo[k] + top[k] for k in range(3)], config.isolated_voxel_ratio)
    local = tuple(min(max(index[k] - lo[k], 0), box.shape[k] - 1) for k in range(3))
    return Peak(index, centre, float(volume[index]), float(box[local]))


def _brightest_genuine(volume: np.ndarray, around: Sequence[int], ratio: float) -> tuple[int, int, int]:
    """The brightest voxel within one voxel of ``around`` that is not an isolated outlier.

    A Bragg peak sampled at oversampling >= ~1.2 exceeds its brightest face neighbour by at most ~30x
    (sinc^2 at 1/1.2 of the first zero); a voxel ``ratio`` times brighter than all six is a hot pixel or
    an alien, and its value must not become the peak counts.
    """
    n = volume.shape
    lo = [min(max(around[k] - 2, 0), n[k] - 1) for k in range(3)]
    hi = [min(max(around[k] + 3, 1), n[k]) for k in range(3)]
    region = np.zeros(tuple(hi[k] - lo[k] + 2 for k in range(3)), dtype=np.float64)
    region[1:-1, 1:-1, 1:-1] = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    core = region[1:-1, 1:-1, 1:-1]
    neighbours = np.maximum.reduce([
        region[:-2, 1:-1, 1:-1], region[2:, 1:-1, 1:-1], region[1:-1, :-2, 1:-1],
        region[1:-1, 2:, 1:-1], region[1:-1, 1:-1, :-2], region[1:-1, 1:-1, 2:],
    ])
    candidates = np.where(core > ratio * np.maximum(neighbours, 1), -np.inf, core)  # as isolated_voxels
    # Only the 3^3 voxels around `around`; the outer shell was there to judge their neighbours.
    centre_local = [around[k] - lo[k] for k in range(3)]
    window = np.full(candidates.shape, -np.inf)
    sl = tuple(slice(max(c - 1, 0), c + 2) for c in centre_local)
    window[sl] = candidates[sl]
    if not np.isfinite(window.max()):
        return tuple(int(min(max(a, 0), n[k] - 1)) for k, a in enumerate(around))
    local = np.unravel_index(int(np.argmax(window)), window.shape)
    return tuple(int(lo[k] + local[k]) for k in range(3))


def _peak_candidates(volume: np.ndarray) -> list[tuple[int, int, int]]:
    """The brightest voxel of each of the brightest blocks, plus the core of the brightest 2x2x2 group of blocks."""
    _, maxima = _block_maxima(volume, _BLOCK)
    flat = maxima.reshape(-1)
    count = min(N_BLOCK_CANDIDATES, flat.size)
    top = np.argpartition(flat, flat.size - count)[flat.size - count:]
    top = top[np.lexsort((top, -flat[top]))]  # brightest first, ties by position: deterministic
    candidates = _block_argmaxima(volume, np.unravel_index(top, maxima.shape))
    if min(maxima.shape) >= 2:
        # Where 2x2x2 neighbouring blocks all have a high maximum: never around an isolated hot voxel,
        # a hot line or plane, so the real peak is a candidate even when more hot voxels than blocks
        # outshine it. Inside those 8^3 voxels, the same test at voxel level picks the peak's core.
        cube = _cube_minimum(maxima)
        corner = np.unravel_index(int(np.argmax(cube)), cube.shape)
        lo = [c * _BLOCK for c in corner]
        region = volume[tuple(slice(lo[k], lo[k] + 2 * _BLOCK) for k in range(3))]
        if min(region.shape) >= 2:
            core = np.unravel_index(int(np.argmax(_cube_minimum(region))), tuple(n - 1 for n in region.shape))
            candidate = _argmax_in(volume, [lo[k] + core[k] for k in range(3)], 2)
            if candidate not in candidates:
                candidates.append(candidate)
    return candidates


def _cube_minimum(a: np.ndarray) -> np.ndarray:
    """Minimum over every 2x2x2 cube (shape n - 1 per axis)."""
    m = np.minimum(a[1:], a[:-1])
    m = np.minimum(m[:, 1:], m[:, :-1])
    return np.minimum(m[:, :, 1:], m[:, :, :-1])


def _block_argmaxima(volume: np.ndarray, blocks) -> list[tuple[int, int, int]]:
    """``_argmax_in`` of each of the _BLOCK^3 blocks at block coordinates ``blocks`` (three index arrays),
    in one gather. Blocks reaching past a far face read that face's last voxels again: a repeated voxel
    comes after its original in C order, so ``argmax`` (first maximum) picks what the cut block would."""
    offsets = np.arange(_BLOCK)
    index = [np.minimum(np.asarray(b)[:, None] * _BLOCK + offsets, n - 1) for b, n in zip(blocks, volume.shape)]
    sub = volume[index[0][:, :, None, None], index[1][:, None, :, None], index[2][:, None, None, :]]
    local = np.unravel_index(sub.reshape(len(index[0]), -1).argmax(axis=1), sub.shape[1:])
    rows = np.arange(len(index[0]))
    return list(zip(*(index[k][rows, local[k]].tolist() for k in range(3))))


def _argmax_in(volume: np.ndarray, lo: Sequence[int], size: int) -> tuple[int, int, int]:
    sub = volume[tuple(slice(lo[k], lo[k] + size) for k in range(3))]
    local = np.unravel_index(int(np.argmax(sub)), sub.shape)
    return tuple(int(lo[k] + local[k]) for k in range(3))


def _block_maxima(volume: np.ndarray, block: int) -> tuple[tuple[int, int, int], np.ndarray]:
    """Maximum of every block^3 block (zero padded at the far faces), and the block grid shape."""
    n = volume.shape
    padded_shape = [-(-k // block) * block for k in n]
    if list(n) != padded_shape:
        padded = np.zeros(padded_shape, dtype=volume.dtype)
        padded[: n[0], : n[1], : n[2]] = volume
    else:
        padded = volume
    b = tuple(k // block for k in padded_shape)
    # One axis at a time: numpy's multi-axis max over a 6-D view is ten times slower. The last axis, whose
    # blocks are ``block`` adjacent values, is reduced as the maximum of ``block`` strided views (a
    # length-4 inner reduction is slow in numpy). One pass over the data instead of a partial sort of
    # every voxel; distinct blocks also keep a cluster of hot voxels from filling every candidate slot.
    m = padded.reshape(b[0], block, -1).max(axis=1)
    m = m.reshape(b[0], b[1], block, -1).max(axis=2)
    out = m[..., 0::block].copy()
    for j in range(1, block):
        np.maximum(out, m[..., j::block], out=out)
    return b, out


def _neighbourhood_medians(volume: np.ndarray, points: Sequence[Sequence[int]], size: int) -> np.ndarray:
    """Median of the size^3 cube around each point, in one gather.

    Beyond a face the face voxels are repeated (not zeros), so a peak against a face is not scored
    down; a lone hot voxel on a face still fills fewer than half of its cube.
    """
    r = np.arange(-(size // 2), size // 2 + 1)
    offsets = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
    idx = np.clip(np.asarray(points, dtype=np.intp)[:, None, :] + offsets[None], 0, np.asarray(volume.shape) - 1)
    values = volume[idx[..., 0], idx[..., 1], idx[..., 2]]
    middle = size**3 // 2  # an odd count: the median is the middle element (as ``_median_filtered``)
    return np.partition(values, middle, axis=1)[:, middle].astype(np.float64)


def _median_filtered(volume: np.ndarray, lo: Sequence[int], hi: Sequence[int], size: int) -> np.ndarray:
    """The size^3 median filter (faces repeated outward) on the box lo..hi (inclusive) only."""
    if size == 1:
        return volume[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1].astype(np.float32)
    r = size // 2
    index = [np.clip(np.arange(lo[k] - r, hi[k] + r + 1), 0, volume.shape[k] - 1) for k in range(3)]
    region = volume[np.ix_(*index)].astype(np.float32, copy=False)
    windows = np.lib.stride_tricks.sliding_window_view(region, (size, size, size))
    flat = windows.reshape(-1, size**3)
    # An odd count: the median is the middle element, found by a partition (np.median's own machinery
    # costs five times more on these short rows; the value is the same element).
    middle = size**3 // 2
    return np.partition(flat, middle, axis=-1)[:, middle].reshape(windows.shape[:3]).astype(np.float32)


def isolated_voxels(volume: np.ndarray, floor: float, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Voxels above ``floor`` and ``ratio`` times brighter than each of their six face neighbours
    (and than one count).

    Returns their indices (k, 3) and their brightest neighbour's value (k,). Voxels on the faces of
    ``volume`` are not judged (a neighbour is missing).
    """
    n = volume.shape
    # An isolated voxel exceeds ratio x max(neighbours, 1) >= ratio, so only voxels above both bounds
    # are examined: one comparison pass (on a view too: no copy of a window cut from a larger map), then
    # gathers over a few thousand voxels at most (few numpy calls, as these arrays are small).
    index = np.flatnonzero(volume > max(floor, ratio))
    i0, rest = np.divmod(index, n[1] * n[2])
    i1, i2 = np.divmod(rest, n[2])
    inner = (i0 > 0) & (i0 < n[0] - 1) & (i1 > 0) & (i1 < n[1] - 1) & (i2 > 0) & (i2 < n[2] - 1)
    i0, i1, i2 = i0[inner], i1[inner], i2[inner]
    if i0.size == 0:
        return np.zeros((0, 3), dtype=np.intp), np.zeros(0, volume.dtype)
    brightest = np.maximum.reduce([volume[i0 + 1, i1, i2], volume[i0 - 1, i1, i2], volume[i0, i1 + 1, i2],
                                   volume[i0, i1 - 1, i2], volume[i0, i1, i2 + 1], volume[i0, i1, i2 - 1]])
    # Neighbours under one count count as one: at low counts a few photons next to empty voxels are
    # ordinary Poisson noise, while a hot pixel stands ``ratio`` counts above nothing.
    isolated = volume[i0, i1, i2] > ratio * np.maximum(brightest, 1)
    coords = np.stack([i0[isolated], i1[isolated], i2[isolated]], axis=1)
    return coords, brightest[isolated]


def centre_of_mass(volume: np.ndarray) -> np.ndarray:
    """Intensity-weighted mean voxel position (3,), float64; ValueError if the volume sums to <= 0."""
    # Two passes over the data instead of three index grids: marginal sums carry the same information.
    # The big reductions stay in the volume's dtype (float32: ~1e-7 relative, pairwise summed); the small
    # marginals are then summed in float64.
    plane = volume.sum(axis=0).astype(np.float64)
    total = plane.sum()
    if not total > 0:
        raise ValueError(f"centre of mass of a volume summing to {total}")
    s0 = np.ascontiguousarray(volume).reshape(volume.shape[0], -1).sum(axis=1).astype(np.float64)
    return np.array([
        s0 @ np.arange(volume.shape[0]) / total,
        plane.sum(axis=1) @ np.arange(volume.shape[1]) / total,
        plane.sum(axis=0) @ np.arange(volume.shape[2]) / total,
    ])


def window_of(volume: np.ndarray, centre: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """``crop_pad``, but a view of ``volume`` when the window lies inside it (no copy): writing into the
    window then writes into ``volume``."""
    start = [int(centre[k]) - shape[k] // 2 for k in range(3)]
    if all(0 <= a and a + m <= n for a, m, n in zip(start, shape, volume.shape)):
        return volume[start[0]:start[0] + shape[0], start[1]:start[1] + shape[1], start[2]:start[2] + shape[2]]
    return crop_pad(volume, centre, shape)


def crop_pad(volume: np.ndarray, centre: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The window of ``shape`` whose voxel ``shape // 2`` is source voxel ``centre``; zeros outside.

    Never wraps around: what lies beyond a face of the source is zero, not the opposite face.
    """
    out = np.zeros(tuple(shape), dtype=np.float32)
    start = [int(centre[k]) - shape[k] // 2 for k in range(3)]
    src, dst = [], []
    for k in range(3):
        a, b = max(start[k], 0), min(start[k] + shape[k], volume.shape[k])
        if a >= b:
            return out  # the window misses the source entirely
        src.append(slice(a, b))
        dst.append(slice(a - start[k], b - start[k]))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def centre_of_mass_shift(
    source: np.ndarray, centre: Sequence[int], shape: Sequence[int], *, max_iterations: int = MAX_COM_ITERATIONS
) -> CentredWindow:
    """Cut ``shape`` from ``source`` so that the window's rounded centre of mass is its voxel shape // 2.

    Whole voxels only (no interpolation). Each step re-cuts from the source rather than shifting the
    window, so what enters at a face is real data (or zero beyond the source), never wrapped content.
    The centre of mass of a re-cut window can move again as content enters and leaves; the loop stops
    when it settles, or after ``max_iterations`` with ``converged`` False (then the window whose centre
    of mass is nearest the target is returned).
    """
    target = np.array([n // 2 for n in shape])
    start = np.array([int(c) for c in centre])
    current = start.copy()
    seen: dict[tuple, float] = {}
    for iteration in range(1, max_iterations + 1):
        # The window's centre of mass from the source in place (no copy per re-cut: zero padding adds nothing).
        com = _window_centre_of_mass(source, current, shape)
        if com is None:
            break  # an empty window (only when the source is empty around the start)
        step = np.floor(com + 0.5).astype(int) - target  # round half up (np.round rounds half to even)
        key = tuple(current)
        seen[key] = float(np.abs(com - target).max())
        if not step.any():
            window = crop_pad(source, current, shape)
            return CentredWindow(window, tuple(int(c) for c in current), tuple(int(s) for s in current - start), iteration, True)
        current = current + step
        if tuple(current) in seen:
            break  # a cycle: content entering and leaving makes the centre of mass oscillate
    best = min(seen, key=lambda k: seen[k]) if seen else tuple(current)
    window = crop_pad(source, best, shape)
    best_arr = np.array(best)
    return CentredWindow(window, tuple(int(c) for c in best_arr), tuple(int(s) for s in best_arr - start), len(seen), False)


def _window_centre_of_mass(source: np.ndarray, centre: Sequence[int], shape: Sequence[int]) -> np.ndarray | None:
    """``centre_of_mass(crop_pad(source, centre, shape))`` without making the window (None if it sums to
    <= 0): the part of it inside the source is a view, and the zeros around it add nothing. The two
    marginals are float32 sums (einsum, as ``centre_of_mass`` sums in the volume's dtype); the rest float64."""
    start = [int(centre[k]) - shape[k] // 2 for k in range(3)]
    lo = [max(start[k], 0) for k in range(3)]
    hi = [min(start[k] + shape[k], source.shape[k]) for k in range(3)]
    if any(a >= b for a, b in zip(lo, hi)):
        return None
    part = source[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    plane = np.einsum("ijk->jk", part).astype(np.float64)
    total = plane.sum()
    if not total > 0:
        return None
    s0 = np.einsum("ijk->i", part).astype(np.float64)
    positions = [np.arange(lo[k], hi[k]) - start[k] for k in range(3)]
    return np.array([s0 @ positions[0], plane.sum(axis=1) @ positions[1], plane.sum(axis=0) @ positions[2]]) / total
