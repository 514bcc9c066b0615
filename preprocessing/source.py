"""The map in the canonical frame around its peak, converted once and re-made only where a step needs more."""

from __future__ import annotations

import numpy as np

from defectscope.preprocessing.centring import find_peak
from defectscope.preprocessing.config import PipelineConfig
from defectscope.preprocessing.frames import FramePlan, apply_plan


class CanonicalSource:
    """The map in the canonical frame, whole or (large maps needing interpolation) a region of it.

    Converting only a region around the peak keeps a 128^3 oblique map at the cost of a ~80^3 one; the
    region is re-made wherever a later step needs data it lacks, so the result is that of the full
    conversion. ``origin`` is the region's first voxel in the full canonical grid.
    """

    def __init__(self, work: np.ndarray, plan: FramePlan):
        self.work, self.plan = work, plan
        self.array, self.info = None, {}
        self.origin = np.zeros(3, dtype=int)
        self.windowed = False
        self.patches: list[tuple[np.ndarray, np.ndarray]] = []  # suppressed voxels, re-applied after re-making

    def start(self, config: PipelineConfig, region: np.ndarray):
        if self.plan.interpolated and np.prod(self.plan.out_shape) > np.prod(region):
            # The peak is found in the frame as sent (a rotation does not change which voxels are hot).
            seed = find_peak(self.work, config)
            centre = np.floor(self.plan.canonical_position(seed.index) + 0.5).astype(int)
            self._convert(centre, region)
        else:
            self._convert(None, None)

    def _convert(self, centre, region):
        window = None if centre is None else (centre, region)
        self.array, self.info = apply_plan(self.work, self.plan, window=window)
        self.origin = np.array(self.info["window_origin"])
        self.windowed = centre is not None
        for index, values in self.patches:
            local = index - self.origin
            inside = np.all((local >= 0) & (local < self.array.shape), axis=1)
            self.array[tuple(local[inside].T)] = values[inside]

    def ensure(self, centre: np.ndarray, extent: np.ndarray) -> bool:
        """Make sure the box of ``extent`` around ``centre`` (full grid) is present wherever the full map
        has data; re-make the region around ``centre`` if not. True if it was re-made."""
        if not self.windowed:
            return False
        full = np.asarray(self.plan.out_shape)
        lo = np.clip(centre - extent // 2, 0, full)
        hi = np.clip(centre - extent // 2 + extent, 0, full)
        if np.all(lo >= self.origin) and np.all(hi <= self.origin + self.array.shape):
            return False
        self._convert(np.asarray(centre, dtype=int), np.maximum(extent, self.array.shape))
        return True

    def local(self, index) -> np.ndarray:
        return np.asarray(index) - self.origin
