"""A gridded raw scan -> the prepared map, from a box around its peak (``Orthonormaliser.finish_window``).

The server grids a raw scan at its natural voxel and makes only a box around the peak. The oversampling
estimated on that box decides the rest:

* a map sampled at least twice as finely as the trained range needs on every axis (resampling factors
  <= 0.5: a small crystal, whose fringes span many voxels) is gridded again at a whole multiple of the voxel
  that brings it towards the range (``finish_window(binning=...)``): each coarse voxel is the sum over the
  pixels it holds over their count, what the gridder gives at that voxel, so nothing is resampled from a
  finer map that noise dominates;
* a box too small for the resampling (its margins, the sampling-check variants) is cut again larger around
  the same centre, so the prepared map is that of the whole grid.

Only a map whose sampling is known with ``high`` confidence on every axis is binned: an unresolved estimate
is no reason to change the grid.
"""

from __future__ import annotations

import numpy as np

from defectscope.preprocessing.config import Limits, PipelineConfig
from defectscope.preprocessing.pipeline import Prepared, Preparation, sampling_targets, source_extent


def binning_for(report: dict) -> np.ndarray:
    """Voxels per coarse voxel, the same on every axis: floor(1 / the largest resampling factor), once the
    sampling of every axis is known well. The same on every axis because the canonical frame makes voxels
    isotropic (``frames.plan_canonical`` would resample a binned axis back to the finest one); an axis still
    oversampled beyond the range after it is averaged by the resampling (``oversampling.resample``)."""
    factors = np.asarray(report["resample_factor"], dtype=np.float64)
    if not all(c == "high" for c in report["oversampling_confidence"]) or not np.all(factors > 0):
        return np.ones(3, dtype=int)
    return np.full(3, max(1, int(np.floor(1.0 / factors.max() + 1e-9))))


def prepare_scan(orthonormaliser, state, where: dict, volume, kw: dict, config: PipelineConfig, *, limits: Limits,
                 sampling_check: bool, ahead: bool = False) -> Prepared:
    """The prepared map of a gridded scan's ``state`` from its first box (``volume``, placed by ``where``);
    ``kw``: ``Preparation`` arguments. The state's sums are spent afterwards, unless ``ahead``: a scan still
    arriving, prepared from boxes as they will be once complete (``finish_window(complete=True)``), kept open."""

    def prepared(vol, kw):
        preparation = Preparation(vol, config, limits=limits, **kw)
        per_axis, overall = preparation.estimate()
        return preparation, preparation.finish(per_axis, overall), per_axis

    def recut(extent, binning):
        qmap, where = orthonormaliser.finish_window(state, np.asarray(extent).astype(int), centre=where_now["window_centre"],
                                                    close=False, binning=None if np.all(binning == 1) else binning,
                                                    dtype=np.float32, complete=ahead)
        return qmap, where, {**kw, "voxel_size": [float(v) for v in qmap.voxel_size]}

    try:
        where_now, binning = where, np.ones(3, dtype=int)
        preparation, p, per_axis = prepared(volume, kw)
        if np.any(binning_for(p.report) > 1):  # grid the box at a coarser voxel instead of resampling it finely
            binning = binning_for(p.report)
            qmap, where_now, kw = recut(np.array(where["window_shape"]) // binning, binning)
            preparation, p, per_axis = prepared(qmap.volume, kw)
        # The smallest factor the map is resampled by: its own, or a sampling-check variant's.
        targets = sampling_targets(config) if sampling_check else ()
        factors = [p.report["resample_factor"], *(t / np.asarray(per_axis) for t in targets)]
        needed = source_extent(config.shape, np.min(factors, axis=0))
        box = np.array(where_now["window_shape"]) // binning
        grid = np.array(where_now["grid_shape"]) // binning
        if np.any((needed > box) & (box < grid)):
            qmap, where_now, kw = recut(np.maximum(box, needed), binning)
            preparation, p, per_axis = prepared(qmap.volume, kw)
        if sampling_check:  # made once, from the box the map was finally prepared from
            p.variant_oversampling, p.variants = preparation.sampling_variants(per_axis)
    finally:
        if not ahead:
            state.total = np.empty(0)  # the sums are spent
    p.report["scan_window"] = where_now
    return p
