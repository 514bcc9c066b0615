"""Oversampling ratio of a map, per axis, and resampling onto the sampling the model was trained on.

Oversampling along an axis = real-space field of view / object size: sigma = 2 pi / (dq * L) for a crystal
of extent L sampled every dq (Q = 2 pi / d). It depends on the map's voxel size, not on its size.

Two handles, measured on simulated and measured maps by ``python -m defectscope.training.sampling_calibration``
(docs/eval/sampling_estimators.json):

- ``estimate_oversampling`` (used by ``prepare``): the central peak's width. Near the Bragg peak
  ln I(q) ~ -q_k^2 Var_k(rho) (Guinier), so the peak's width along axis k, s_k voxels, is inversely
  proportional to the crystal's extent along k: sigma_k = s_k / ratio, with ``config.central_peak_ratio``
  fitted on the simulator's crystals. The width needs only the well-counted top of the peak, so it holds on
  measured maps (large crystals, partial coherence, streaks, background, masks, gaps) and follows a re-gridding
  (a map binned k x k x k: the width in voxels divides by k, after the voxel's own width is removed). Its
  limit: it measures the crystal's radius of gyration, so a shape far from the simulator's truncated
  octahedra is misjudged (a box by 20-25 %), and a split (dislocated) peak reads narrower, its oversampling
  6-8 % higher in the median and up to 40 % for the worst tenth of screw dislocations.
- ``autocorrelation_oversampling`` (evaluation only): the support of the autocorrelation (the inverse FFT of
  the intensity), twice the object's width, fitted with the edge model
  ``P(x) = c [g(x) + g(n - x)], g(x) = (1 - x / w)_+ ** p``. Exact for coherent simulated maps (within 10 %
  per axis for boxes, ellipsoids and polyhedra at sigma 1.3-6.4, tests/test_oversampling.py), but on measured
  maps partial coherence multiplies the autocorrelation by the coherence function and gridding and
  background hold it above any threshold, so the support is not seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft as sfft

from defectscope.preprocessing.config import PipelineConfig
from defectscope.preprocessing.frames import zoom_linear
from defectscope.preprocessing.validate import make_warning

# Widths searched: up to 1.5 n (sigma down to 0.67); exponents of the edge model.
_MAX_WIDTH_FRACTION = 1.5
_EXPONENTS = (1.0, 3.0)
_FFT_WORKERS = 2


def autocorrelation_profiles(volume: np.ndarray) -> list[np.ndarray]:
    """Per axis, max |autocorrelation| over the perpendicular plane at lags 0..n//2, normalised to 1 at 0."""
    # rfftn of real I is the conjugate of its inverse FFT times n^3, so |.| is the autocorrelation up to
    # a constant; the half spectrum along axis 2 is enough because |A(-x)| = |A(x)|.
    a = np.abs(sfft.rfftn(volume.astype(np.float32, copy=False), workers=_FFT_WORKERS))
    profiles = []
    for axis in range(3):
        others = tuple(k for k in range(3) if k != axis)
        p = a.max(axis=others).astype(np.float64)
        n = volume.shape[axis]
        if axis < 2:
            p = np.maximum(p, p[(-np.arange(n)) % n])  # lag -x lives at index n - x
        p = p[: n // 2 + 1]
        profiles.append(p / p[0] if p[0] > 0 else p)
    return profiles


def fit_autocorrelation_width(profile: np.ndarray, n: int, threshold: float) -> tuple[float, float]:
    """Half-width w (voxels) of the autocorrelation = object width, and the edge exponent p, for one axis.

    ``profile`` is lags 0..n//2 normalised to 1 at lag 0.
    """
    below = np.flatnonzero(profile < threshold)
    end = int(below[0]) if below.size else len(profile)  # first lag under the threshold
    x = np.arange(1, end, dtype=np.float64)
    y = profile[1:end]
    if x.size < 2:
        # Fewer than two lags above threshold: the object is about one voxel; take the crossing.
        if end <= 1 or profile[end - 1] <= threshold:
            return 1.0, 1.0
        x0 = end - 1
        crossing = x0 + (profile[x0] - threshold) / (profile[x0] - profile[end]) if end < len(profile) else x0 + 1.0
        return float(max(crossing, 1.0)), 1.0
    # w lies beyond the last lag above threshold; when the profile does cross the threshold, even the
    # steepest edge (p = 3) puts w within end / (1 - threshold ** (1/3)) of the origin.
    lo = max(1.0, float(x[-1]))
    hi = _MAX_WIDTH_FRACTION * n
    if below.size:
        hi = min(hi, end / (1 - threshold ** (1 / _EXPONENTS[1])) + 1.0)
    # Coarse grid, then a fine one around the best coarse point: deterministic and cheap.
    widths, exponents = np.arange(lo, hi, 0.5), np.arange(_EXPONENTS[0], _EXPONENTS[1] + 1e-9, 0.25)
    w, p = _best_fit(x, y, n, widths, exponents)
    widths = np.arange(max(lo, w - 0.5), min(hi, w + 0.5) + 1e-9, 0.05)
    exponents = np.arange(max(_EXPONENTS[0], p - 0.25), min(_EXPONENTS[1], p + 0.25) + 1e-9, 0.05)
    return _best_fit(x, y, n, widths, exponents)


def _best_fit(x, y, n, widths, exponents) -> tuple[float, float]:
    w = widths[:, None, None]
    p = exponents[None, :, None]
    model = np.clip(1 - x / w, 0, None) ** p + np.clip(1 - (n - x) / w, 0, None) ** p
    # Relative residuals: the low end of the profile (the edge that fixes w) counts as much as the top.
    u = 1.0 / y**2
    scale = (u * model * y).sum(-1) / np.maximum((u * model * model).sum(-1), 1e-300)
    cost = (u * (scale[..., None] * model - y) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
    return float(widths[i]), float(exponents[j])


# -- the estimate used by ``prepare``: the central peak's width ------------------------------------------
# The fit reads the (2 h + 1)^3 voxels around the peak that hold at least CENTRAL_PEAK_FLOOR of it.
CENTRAL_PEAK_HALF = 2
CENTRAL_PEAK_FLOOR = 0.02
# A voxel that integrates the intensity over its width (a binned detector, a gridder averaging pixels, a
# map summed k x k x k) widens a peak by this variance (voxel^2): removed before the width is used.
VOXEL_VARIANCE = 1.0 / 12.0
# Below this width (voxels) the peak is not resolved: the map is too coarse for the estimate (and for
# the network: its oversampling is then below ~1.2, half the Nyquist rate of the intensity).
UNRESOLVED_WIDTH = 0.6
# Above this rms residual of log I about the fitted peak the central peak is not one smooth lobe.
IRREGULAR_RESIDUAL = 0.35


def central_peak_width(volume: np.ndarray) -> tuple[np.ndarray, dict]:
    """Per-axis width s (voxels) of the central peak: ln I ~ -x^2 / (2 s^2) along each axis through it.

    A weighted least-squares fit of a full quadratic to ln I on the voxels around the brightest voxel of the
    central region (weights I^2: the top of the peak, where counts are high and the quadratic holds);
    s along axis k comes from the second derivative along k (the crystal's extent along k, Guinier's law:
    the curvature of ln I at the peak is the variance of the density along k), less ``VOXEL_VARIANCE``.
    Unlike the autocorrelation's support, the width does not need resolved fringes, so partial coherence,
    streaks, background and masks far from the peak do not move it. ``info``: the fit's points, its rms
    residual and, per axis, whether the width is resolved.
    """
    volume = np.asarray(volume)
    mid = np.array(volume.shape) // 2
    # Only the voxels within 2 h of the middle are read: they alone are made float64 (not the whole map).
    reach = tuple(slice(max(m - 2 * CENTRAL_PEAK_HALF, 0), m + 2 * CENTRAL_PEAK_HALF + 1) for m in mid)
    v = np.asarray(volume[reach], dtype=np.float64)
    offset = np.array([s.start for s in reach])
    mid = mid - offset
    n = np.array(v.shape)
    near = tuple(slice(max(m - CENTRAL_PEAK_HALF, 0), m + CENTRAL_PEAK_HALF + 1) for m in mid)
    local = np.array(np.unravel_index(int(np.argmax(v[near])), v[near].shape))
    peak = local + np.array([s.start for s in near])
    lo = np.maximum(peak - CENTRAL_PEAK_HALF, 0)
    hi = np.minimum(peak + CENTRAL_PEAK_HALF + 1, n)
    top = float(v[tuple(peak)])
    sub = v[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] / top if top > 0 else np.zeros(1)
    keep = sub > CENTRAL_PEAK_FLOOR
    x = [g[keep] - float(p - l) for g, p, l in zip(np.indices(sub.shape), peak, lo)] if sub.ndim == 3 else []
    y = sub[keep]
    width, residual = np.full(3, np.nan), np.inf
    if y.size >= 10:
        design = np.stack([np.ones_like(y), *x, *(c * c for c in x), x[0] * x[1], x[0] * x[2], x[1] * x[2]], axis=1)
        coef, *_ = np.linalg.lstsq(design * (y * y)[:, None], np.log(y) * y * y, rcond=None)
        residual = float(np.sqrt(np.average((design @ coef - np.log(y)) ** 2, weights=y * y)))
        curvature = -2.0 * coef[4:7]  # 1 / s^2 per axis
        with np.errstate(divide="ignore", invalid="ignore"):
            variance = np.where(curvature > 0, 1.0 / curvature, np.nan) - VOXEL_VARIANCE
            width = np.sqrt(np.where(variance > 0, variance, np.nan))
    resolved = np.isfinite(width) & (width >= UNRESOLVED_WIDTH)
    return width, {"points": int(y.size), "residual": round(residual, 3) if np.isfinite(residual) else None,
                   "resolved": [bool(r) for r in resolved]}


def estimate_oversampling(volume: np.ndarray, config: PipelineConfig, *, details: bool = False):
    """Per-axis oversampling (3,) and the overall one (geometric mean), from the central peak's width.

    sigma_k = s_k / ``config.central_peak_ratio`` (``central_peak_width``; the ratio is calibrated on the
    simulator's crystals). An axis whose width is not resolved gets the bound ``UNRESOLVED_WIDTH / ratio``
    (the map is at most that finely sampled there) and ``resolved`` False; the caller warns
    (``SAMPLING_UNDETERMINED``). ``details`` adds, per axis, the width in voxels, whether it is resolved and
    the estimate's confidence (``high``; ``low``: below the Nyquist rate of the intensity (2) or an
    irregular central peak; ``none``: not resolved), and the fit's residual.
    """
    width, info = central_peak_width(volume)
    ratio = config.central_peak_ratio
    resolved = np.array(info["resolved"])
    per_axis = np.where(resolved, width / ratio, UNRESOLVED_WIDTH / ratio)
    overall = float(np.exp(np.log(per_axis).mean()))
    if not details:
        return per_axis, overall
    irregular = info["residual"] is None or info["residual"] > IRREGULAR_RESIDUAL
    confidence = ["none" if not r else ("low" if (s < 2.0 or irregular) else "high") for r, s in zip(resolved, per_axis)]
    return per_axis, overall, {
        "method": "central_peak", "resolved": info["resolved"], "confidence": confidence,
        "peak_width_voxels": [round(float(w), 3) if np.isfinite(w) else None for w in width],
        "fit_residual": info["residual"], "fit_points": info["points"]}


# -- a second handle, for evaluation: the autocorrelation's support -----------------------------------------
def autocorrelation_oversampling(volume: np.ndarray, threshold: float = 0.02) -> tuple[np.ndarray, list[float]]:
    """Per-axis oversampling from the autocorrelation's support (``fit_autocorrelation_width``) and each
    profile's floor. Exact on coherent simulated maps; on measured maps partial coherence, background and
    gridding hold the profile up and the support is not seen (docs/eval/sampling_estimators.json), which is
    why ``prepare`` uses the central peak."""
    profiles = autocorrelation_profiles(volume)
    per_axis = np.array([n / fit_autocorrelation_width(p, n, threshold)[0] for n, p in zip(volume.shape, profiles)])
    return per_axis, [float(p[1:].min()) if p.size > 1 else 1.0 for p in profiles]


def crystal_extent_nm(per_axis: Sequence[float], voxel_size: Sequence[float] | None) -> list[float] | None:
    """The crystal's extent per axis implied by the oversampling: 2 pi / (sigma * dq), in nm (dq in 1/A, the
    Q = 2 pi / d convention); None without voxel sizes."""
    if voxel_size is None:
        return None
    return [round(2 * np.pi / (s * d) / 10.0, 1) for s, d in zip(per_axis, voxel_size)]


def undetermined_warning(info: dict, config: PipelineConfig) -> dict | None:
    """The warning of a map along whose axes the central peak is not resolved (``estimate_oversampling``)."""
    axes = [k for k, ok in enumerate(info["resolved"]) if not ok]
    if not axes:
        return None
    widths = ", ".join(f"axis {k}: {info['peak_width_voxels'][k]}" for k in axes)
    return make_warning(
        "SAMPLING_UNDETERMINED",
        f"the crystal's extent is not determined along {len(axes)} axis(es): the central peak is narrower than "
        f"{UNRESOLVED_WIDTH:g} voxel or not a smooth maximum there (width {widths}): the map is too coarsely "
        "sampled (oversampling below ~1.2) or the peak is cut; its sampling, and the answer, are not reliable")


def resample_factors(per_axis, config: PipelineConfig) -> np.ndarray:
    """Per-axis resampling factors (> 1: finer q sampling): to ``config.oversampling_target`` on every axis,
    or, without a target, each axis outside ``config.oversampling_range`` to its nearest bound; all ones
    without a range. A factor within 1 % of 1 is 1 (no resampling for a map already there)."""
    per_axis = np.asarray(per_axis, dtype=np.float64)
    if config.oversampling_range is None:
        return np.ones(3)
    lo, hi = config.oversampling_range
    target = np.full(3, config.oversampling_target) if config.oversampling_target is not None else np.clip(per_axis, lo, hi)
    factors = target / per_axis
    return np.where(np.abs(factors - 1.0) < 0.01, 1.0, factors)


def resample(volume: np.ndarray, factor, *, centre: Sequence[float] | None = None,
             shape: Sequence[int] | None = None) -> np.ndarray:
    """Resampling by ``factor`` (one number, or one per axis): > 1 samples q more finely (oversampling x factor).

    Without ``centre``/``shape`` the whole map is resampled about its centre to round(n * factor) voxels.
    With them, only the window of ``shape`` whose voxel ``shape // 2`` sits on source position ``centre``
    is computed (zeros beyond the source), so a large input costs no more than the window; an integer
    ``centre`` keeps the peak voxel's value exactly. Linear interpolation (no negative intensities).

    Along an axis sampled at least twice as coarsely (factor <= 0.5: a small crystal on a fine grid), each
    output voxel is first averaged over the floor(1 / factor) input voxels it stands for (``_box_average``),
    as gridding at the coarser voxel would: interpolation alone would keep one voxel's counts in that many
    and their noise with them. Training maps never need it (their oversampling is at most ~6).
    """
    factor = np.broadcast_to(np.asarray(factor, dtype=np.float64), (3,))
    if not np.all(factor > 0):
        raise ValueError(f"resampling factors must be positive, got {factor.tolist()!r}")
    step = 1.0 / factor
    if shape is None:
        shape = tuple(max(1, int(round(n * f))) for n, f in zip(volume.shape, factor))
        start = (np.asarray(volume.shape) - 1) / 2 - step * (np.asarray(shape) - 1) / 2
    else:
        if centre is None:
            centre = [n // 2 for n in volume.shape]
        start = np.asarray(centre, dtype=np.float64) - step * np.array([n // 2 for n in shape])
    width = np.floor(step + 1e-9).astype(int)
    if np.any(width > 1):
        volume, start = _box_average(volume, width, start, step, shape)
    return zoom_linear(volume, step, start, shape)


def _box_average(volume: np.ndarray, width: np.ndarray, start: np.ndarray, step: np.ndarray, shape):
    """The part of ``volume`` the resampling reads, each axis with width > 1 replaced by its running mean over
    ``width`` voxels centred on each voxel (zeros beyond the map), and ``start`` in that part's voxels."""
    from scipy.ndimage import uniform_filter1d

    lo = np.maximum(np.floor(start).astype(int) - width, 0)
    hi = np.minimum(np.ceil(start + step * (np.asarray(shape) - 1)).astype(int) + width + 2, volume.shape)
    if np.any(hi <= lo):  # the window lies beyond the map: nothing to average
        return volume, start
    part = np.asarray(volume[tuple(slice(a, b) for a, b in zip(lo, hi))], dtype=np.float32)
    start = start - lo
    for axis in np.flatnonzero(width > 1):
        part = uniform_filter1d(part, int(width[axis]), axis=int(axis), mode="constant")
        if width[axis] % 2 == 0:  # an even window's mean at index i is centred on i - 1/2
            start[axis] += 0.5
    return part, start


def oversampling_warning(per_axis, factors, config: PipelineConfig) -> dict | None:
    """``OVERSAMPLING_OUT_OF_RANGE`` when an axis lies outside the trained range (the map is resampled into
    it; below 2 the fringes the network was trained on are not in the data and resampling cannot add them)."""
    lo, hi = config.oversampling_range
    per_axis = np.asarray(per_axis, dtype=np.float64)
    if np.all((per_axis >= lo) & (per_axis <= hi)):
        return None
    axes = ", ".join(f"{s:.2f}" for s in per_axis)
    after = ", ".join(f"{s * f:.2f}" for s, f in zip(per_axis, factors))
    return make_warning(
        "OVERSAMPLING_OUT_OF_RANGE",
        f"oversampling estimated {axes} per axis, outside the trained range [{lo:g}, {hi:g}]: map resampled "
        f"per axis by x{', x'.join(f'{f:.3f}' for f in factors)} to {after}"
        + ("; below 2 the intensity is under-sampled, and the fringes it lacks cannot be restored" if per_axis.min() < 2 else ""),
    )
