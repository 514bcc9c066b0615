"""Data that stop right next to the Bragg peak: a detector edge, a chip gap or a mask across the peak.

A map whose peak is cut is not one the model was trained on, and a cut peak can look like a smaller,
defect-free one: the networks answered such maps "defect_free" with confidence (docs/eval/ood.json, kind
``peak_cut``). ``cut_near_peak`` walks out from the peak along each axis in both directions and looks at
the (2 ``HALF`` + 1)^2 patch of each plane around the axis through the peak: where, within ``REACH``
voxels, two successive patches hold nothing at all (exact zeros: no measurement, masked, or outside the
map) right after a patch holding at least ``MIN_RELATIVE`` of the peak, the data were cut there. Poisson
counts never empty 50 voxels next to a plane that bright, and simulated intensities are never exactly 0.
"""

from __future__ import annotations

import numpy as np

from defectscope.preprocessing.validate import make_warning

REACH = 6
HALF = 2
MIN_RELATIVE = 0.01


def cut_near_peak(window: np.ndarray) -> tuple[int, int, int] | None:
    """(axis, direction +1/-1, distance in voxels) of the first cut around the peak at the window's centre."""
    centre = np.array(window.shape) // 2
    top = float(window[tuple(centre)])
    if not top > 0:
        return None
    for axis in range(3):
        # The patches of the planes within REACH + 1 of the peak, all at once: per plane, whether it holds
        # anything and its mean (numpy calls on a few hundred voxels cost more than the arithmetic).
        lo, hi = max(centre[axis] - REACH - 1, 0), min(centre[axis] + REACH + 2, window.shape[axis])
        index = [slice(max(c - HALF, 0), c + HALF + 1) for c in centre]
        index[axis] = slice(lo, hi)
        slab = np.moveaxis(window[tuple(index)], axis, 0).reshape(hi - lo, -1)
        nonempty = np.any(slab, axis=1).tolist()
        means = slab.mean(axis=1).tolist()
        for sign in (1, -1):
            previous = top
            for d in range(1, REACH + 1):
                here = centre[axis] + sign * d - lo
                if not 0 <= here < hi - lo:
                    break
                if not nonempty[here]:
                    after = here + sign
                    if previous >= MIN_RELATIVE * top and not (0 <= after < hi - lo and nonempty[after]):
                        return axis, sign, d
                    break
                previous = means[here]
    return None


def cut_warning(window: np.ndarray, axes) -> dict | None:
    """``PEAK_NEAR_EDGE`` for a map whose data stop next to its peak (``cut_near_peak``)."""
    cut = cut_near_peak(window)
    if cut is None:
        return None
    axis, sign, d = cut
    return make_warning(
        "PEAK_NEAR_EDGE",
        f"the data stop {d} voxel(s) from the peak on the {'+' if sign > 0 else '-'}{axes[axis]} side (a detector edge, "
        "chip gap or mask across the peak): part of the peak is missing, and the answer is not reliable")
