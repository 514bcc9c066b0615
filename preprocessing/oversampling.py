"""Oversampling ratio of a map, and resampling into the range the model was trained on.

Oversampling along an axis = real-space field of view / object size = n / w, with ``w`` the object's
width in voxels of the FFT grid of the map (so it does not depend on the map size n, only on the
voxel size in q: sigma = 2 pi / (dq * width)).

Estimate: the inverse FFT of the intensity is the autocorrelation of the crystal's electron density;
its support is the difference body S - S, whose extent along an axis is twice the object's width w.
For each axis we take the profile max |A| over the perpendicular plane, from 0 to n/2 (normalised to 1
at the origin), and fit the edge model

    P(x) = c * [g(x) + g(n - x)],   g(x) = (1 - x / w)_+ ** p

over the points where the profile stays above ``config.oversampling_threshold`` (x = 0, where flat
background and noise add a spike, is left out). The exponent p absorbs the shape: a flat facet
perpendicular to the axis gives p = 1 (a box's tent), a rounded end p ~ 2 (a sphere's autocorrelation
vanishes quadratically), so faceted and rounded crystals are both measured to their full width where a
bare threshold crossing would take a sphere 12 % too small. The second term is the periodic image:
below sigma = 2 the autocorrelation wraps around (the intensity itself is under-sampled), and fitting
the wrapped profile still recovers w, down to about sigma = 1.2.

Measured on |FFT|^2 of zero-padded asymmetric boxes, ellipsoids and faceted polyhedra at sigma 1.3-6.4
per axis (tests/test_oversampling.py): within 10 % per axis.
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


def estimate_oversampling(volume: np.ndarray, config: PipelineConfig, *, details: bool = False):
    """Per-axis oversampling (3,) and the overall one (geometric mean: resampling is isotropic).

    A hot voxel adds a flat floor (its value / total counts) under the whole autocorrelation; above
    ``oversampling_threshold`` it hides the edge, so the pipeline removes isolated voxels first.

    ``details``: also return, per axis, whether the crystal's edge was seen (``resolved``: the profile falls
    below the threshold somewhere) and the profile's lowest value (``floor``). On measured maps, background,
    facet streaks, a second scatterer or gridding artefacts can hold the whole profile above the threshold;
    the width fitted there is not the crystal's, and the caller says so (``SAMPLING_UNDETERMINED``).
    """
    profiles = autocorrelation_profiles(volume)
    per_axis = np.array([
        n / fit_autocorrelation_width(p, n, config.oversampling_threshold)[0] for n, p in zip(volume.shape, profiles)
    ])
    overall = float(np.exp(np.log(per_axis).mean()))
    if not details:
        return per_axis, overall
    floors = [float(p[1:].min()) if p.size > 1 else 1.0 for p in profiles]
    return per_axis, overall, {"resolved": [f < config.oversampling_threshold for f in floors],
                               "floor": [round(f, 4) for f in floors]}


def crystal_extent_nm(per_axis: Sequence[float], voxel_size: Sequence[float] | None) -> list[float] | None:
    """The crystal's extent per axis implied by the oversampling: 2 pi / (sigma * dq), in nm (dq in 1/A, the
    Q = 2 pi / d convention); None without voxel sizes."""
    if voxel_size is None:
        return None
    return [round(2 * np.pi / (s * d) / 10.0, 1) for s, d in zip(per_axis, voxel_size)]


def undetermined_warning(info: dict, config: PipelineConfig) -> dict | None:
    """The warning of a map along whose axes the crystal's edge was not seen (``estimate_oversampling``)."""
    axes = [k for k, ok in enumerate(info["resolved"]) if not ok]
    if not axes:
        return None
    floors = ", ".join(f"axis {k}: {info['floor'][k]:.3f}" for k in axes)
    return make_warning(
        "SAMPLING_UNDETERMINED",
        f"the crystal's extent is not seen along {len(axes)} axis(es): the map's autocorrelation never falls "
        f"below {config.oversampling_threshold:g} ({floors}): the map is under-sampled there (oversampling < 2, "
        "its fringes are not resolved) or background, streaks, a second scatterer or gridding artefacts hold it "
        "up; the oversampling estimate there, and the resampling built on it, are not reliable")


def resample_factor(overall: float, config: PipelineConfig) -> float:
    """1 inside ``config.oversampling_range``; else the factor that brings ``overall`` to the nearest bound."""
    if config.oversampling_range is None:
        return 1.0
    lo, hi = config.oversampling_range
    if overall < lo:
        return lo / overall
    if overall > hi:
        return hi / overall
    return 1.0


def resample(volume: np.ndarray, factor: float, *, centre: Sequence[float] | None = None,
             shape: Sequence[int] | None = None) -> np.ndarray:
    """Isotropic resampling: ``factor`` > 1 samples q more finely (oversampling x factor).

    Without ``centre``/``shape`` the whole map is resampled about its centre to round(n * factor) voxels.
    With them, only the window of ``shape`` whose voxel ``shape // 2`` sits on source position ``centre``
    is computed (zeros beyond the source), so a large input costs no more than the window; an integer
    ``centre`` keeps the peak voxel's value exactly. Linear interpolation (no negative intensities).
    """
    if not factor > 0:
        raise ValueError(f"resampling factor must be positive, got {factor!r}")
    step = np.full(3, 1.0 / factor)
    if shape is None:
        shape = tuple(max(1, int(round(n * factor))) for n in volume.shape)
        start = (np.asarray(volume.shape) - 1) / 2 - step * (np.asarray(shape) - 1) / 2
    else:
        if centre is None:
            centre = [n // 2 for n in volume.shape]
        start = np.asarray(centre, dtype=np.float64) - step * np.array([n // 2 for n in shape])
    return zoom_linear(volume, step, start, shape)


def oversampling_warning(per_axis: np.ndarray, overall: float, factor: float, config: PipelineConfig) -> dict:
    lo, hi = config.oversampling_range
    axes = ", ".join(f"{s:.2f}" for s in per_axis)
    return make_warning(
        "OVERSAMPLING_OUT_OF_RANGE",
        f"oversampling estimated {overall:.2f} (per axis {axes}) is outside the trained range "
        f"[{lo:g}, {hi:g}]: map resampled by x{factor:.3f} to {overall * factor:.2f}",
    )

