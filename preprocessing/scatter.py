"""What the frames of a scan add to the grid's sums (``preprocessing.orthonormalise``): each pixel's voxel
rank (from the cached mapping; masked pixels go to the spare bin) and its value, frame by frame for a stream,
or slabs of frames at once on several threads for a whole scan, added in frame order either way, so every
voxel's sum gets its additions in the same order and the same bits."""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os

import numpy as np

from defectscope.errors import NonFinite


def contributions(state, i: int, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What frame ``i`` adds to the sums: the voxel rank of each pixel that adds (masked pixels: the spare
    bin) and its float64 value, in pixel order. Only nonzero pixels of a sparse frame (detector frames are
    mostly zeros); every pixel of a dense one. NaN or infinite values raise ``NonFinite``."""
    flat = frame.ravel()
    nonzero = flat != 0  # NaN != 0 is kept
    if np.count_nonzero(nonzero) * 2 < flat.size:  # sparse frame: only its nonzero pixels
        nonzero = np.flatnonzero(nonzero)  # 2x faster than flatnonzero(flat)
        values = flat[nonzero].astype(np.float64)  # float64 values: np.add.at's fast path
        ranks = state.mapping.rank[i][nonzero]
    else:  # dense frame: every pixel, without gathering
        nonzero = slice(None)
        values = flat.astype(np.float64)
        ranks = state.mapping.rank[i].copy() if state.mask is not None else state.mapping.rank[i]
    if frame.dtype.kind == "f" and not math.isfinite(values.sum()) and not np.isfinite(values).all():
        raise NonFinite(f"frame {i} holds NaN or infinite values; mask those pixels instead")
    if state.mask is not None:
        ranks[(state.mask if state.mask.ndim == 2 else state.mask[i]).ravel()[nonzero]] = state.mapping.spare
    return ranks, values


# Frames whose nonzero pixels ``accumulate`` finds at once, on ``_THREADS`` threads.
SLAB_FRAMES = 16
_THREADS = min(4, os.cpu_count() or 1)


def slab_contributions(state, start: int, slab) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``contributions`` of frames ``start`` .. ``start + len(slab) - 1`` at once, frame after frame: their
    nonzero pixels only (the zeros a dense frame adds change no sum), and the coarse block of each (None when
    the state keeps no block sums), gathered here, on the calling thread, not where they are added. ``slab``:
    a 3-D array, or a list of 2-D frames (a scan sent one frame per message part), each taken as
    ``contributions`` takes it."""
    if isinstance(slab, np.ndarray):
        ranks, values = _array_slab(state, start, slab)
    else:
        parts = [contributions(state, start + k, frame) for k, frame in enumerate(slab)]
        ranks, values = np.concatenate([r for r, _ in parts]), np.concatenate([v for _, v in parts])
    blocks = None if state.block_total is None else state.mapping.block_of_rank[ranks]
    return ranks, values, blocks


def _array_slab(state, start: int, slab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = slab.reshape(-1)
    nonzero = np.flatnonzero(flat != 0)  # NaN != 0 is kept
    values = flat[nonzero].astype(np.float64)
    npix = slab.shape[1] * slab.shape[2]
    if slab.dtype.kind == "f" and not math.isfinite(values.sum()) and not np.isfinite(values).all():
        first = int(nonzero[np.flatnonzero(~np.isfinite(values))[0]]) // npix + start
        raise NonFinite(f"frame {first} holds NaN or infinite values; mask those pixels instead")
    ranks = state.mapping.rank[start:start + len(slab)].reshape(-1)[nonzero]  # a copy: ours to edit
    if state.mask is not None:
        masked = state.mask.ravel()[nonzero % npix] if state.mask.ndim == 2 else \
            state.mask[start:start + len(slab)].reshape(-1)[nonzero]
        ranks[masked] = state.mapping.spare
    return ranks, values


def add_contributions(state, ranks: np.ndarray, values: np.ndarray, blocks: np.ndarray | None = None) -> None:
    """Add values to their voxels' sums (and their coarse blocks', ``blocks`` as ``slab_contributions`` gives
    them, or gathered here)."""
    np.add.at(state.total, ranks, values)
    if state.block_total is not None:
        np.add.at(state.block_total, state.mapping.block_of_rank[ranks] if blocks is None else blocks, values)


def in_order(work, items, ahead: int = 2 * _THREADS):
    """``work(item)`` of each item, computed on ``_THREADS`` threads at most ``ahead`` items in advance, yielded
    in the items' order (memory stays bounded by ``ahead`` results)."""
    items = list(items)
    with concurrent.futures.ThreadPoolExecutor(_THREADS, thread_name_prefix="defectscope-grid") as pool:
        pending = collections.deque(pool.submit(work, item) for item in items[:ahead])
        for item in items[ahead:]:
            yield pending.popleft().result()
            pending.append(pool.submit(work, item))
        while pending:
            yield pending.popleft().result()
