"""Measurement-like sampling of a simulated pattern: orientation, voxel size, shift, counts, gaps, masks.

The paper augments each relaxed configuration with ~10 random rotations about Q, a random δq (zoom,
keeping the oversampling ratio in the experimental range) and a random sub-pixel shift. Counting noise,
background, detector gaps and masked voxels make the raw counts look like an orthonormalised
measurement; the serving pipeline (``PipelineConfig``) prepares them exactly as it prepares real data.

Detector gaps are modelled as slabs of constant index along axis 1 or 2 (⊥ Q) crossing the region
around the peak: after orthonormalisation a gap is a thin, nearly planar slab whose exact orientation
depends on the beamline geometry, which the simulator does not know.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defectscope.training.conventions import TWO_PI, transform_columns


@dataclass(frozen=True)
class OrientationDraw:
    """Every random choice made for one pattern of a configuration."""

    rotation_about_q_rad: float
    oversampling_target: float  # oversampling along the crystal's largest canonical extent
    subpixel_shift_voxels: tuple[float, float, float]
    peak_counts_target: float  # photons in the brightest voxel before noise (without background)
    background_counts_per_voxel: float
    gap_axes: tuple[int, ...]  # canonical axis (1 or 2) of each gap stripe
    gap_starts: tuple[int, ...]  # first voxel of each stripe
    gap_widths: tuple[int, ...]
    masked_voxel_fraction: float


def _between(u: float, bounds) -> float:
    lo, hi = bounds
    return float(lo + u * (hi - lo))


def _integer_between(u: float, bounds) -> int:
    """Uniform integer in [lo, hi] (both included) from a uniform u in [0, 1)."""
    lo, hi = int(bounds[0]), int(bounds[1])
    return min(lo + int(u * (hi - lo + 1)), hi)


def draw_orientation(rng: np.random.Generator, cfg, shape=(64, 64, 64)) -> OrientationDraw:
    """Draw one pattern's sampling and noise parameters from ``cfg`` (a ``SimulationConfig``).

    Exactly the same random numbers are consumed whatever the options (a fixed block of uniforms mapped
    onto the configured ranges), so switching one option on or off does not reshuffle the others.
    """
    u = rng.random(22)
    # u: 0 rotation, 1 oversampling, 2-4 shift, 5 peak counts, 6 background, 7 gaps on?, 8 gap count,
    #    9-12 gap axes, 13-16 gap widths, 17-20 gap starts, 21 masked-voxel fraction (at most 4 stripes)
    shift = (u[2:5] - 0.5) if cfg.subpixel_shift else np.zeros(3)
    log_lo, log_hi = np.log10(cfg.peak_counts_range[0]), np.log10(cfg.peak_counts_range[1])
    n_gaps = _integer_between(u[8], cfg.gap_count_range) if u[7] < cfg.gap_probability else 0
    reach = cfg.gap_offset_max_voxels
    starts = [_integer_between(v, (shape[1] // 2 - reach, shape[1] // 2 + reach)) for v in u[17:21]]
    return OrientationDraw(
        rotation_about_q_rad=float(TWO_PI * u[0]),
        oversampling_target=_between(u[1], cfg.oversampling_range),
        subpixel_shift_voxels=tuple(float(v) for v in shift),
        peak_counts_target=float(10.0 ** _between(u[5], (log_lo, log_hi))),  # log-uniform: every decade alike
        background_counts_per_voxel=_between(u[6], cfg.background_range),
        gap_axes=tuple(1 + int(v < 0.5) for v in u[9:9 + n_gaps]),
        gap_starts=tuple(starts[:n_gaps]),
        gap_widths=tuple(_integer_between(v, cfg.gap_width_voxels_range) for v in u[13:13 + n_gaps]),
        masked_voxel_fraction=_between(u[21], cfg.masked_voxel_fraction_range),
    )


def canonical_extent_angstrom(frame_axes: np.ndarray, positions_angstrom_3xn: np.ndarray) -> np.ndarray:
    """Extent (max - min) of the atoms along each canonical axis, Å."""
    projected = transform_columns(frame_axes, positions_angstrom_3xn)
    return projected.max(axis=1) - projected.min(axis=1)


def voxel_size_for_oversampling(oversampling: float, extent_angstrom: np.ndarray) -> float:
    """Crystallographic dq giving ``oversampling`` along the largest extent (so every axis has at least it)."""
    return 1.0 / (oversampling * float(np.max(extent_angstrom)))


def oversampling_per_axis(dq_inv_angstrom_cryst: float, extent_angstrom: np.ndarray) -> np.ndarray:
    """Field of view / extent per canonical axis (see ``conventions``)."""
    return 1.0 / (dq_inv_angstrom_cryst * np.asarray(extent_angstrom, dtype=float))


def counting_noise(intensity: np.ndarray, peak_counts: float, background_counts: float,
                   rng: np.random.Generator, extra_counts: np.ndarray | None = None) -> np.ndarray:
    """Poisson counts (uint32) of the pattern scaled to ``peak_counts`` at its maximum, plus a flat background
    and ``extra_counts`` (expected counts of anything else the detector sees, e.g. alien spots)."""
    expected = intensity * (peak_counts / float(intensity.max()))
    if background_counts > 0.0:
        expected = expected + background_counts
    if extra_counts is not None:
        expected = expected + extra_counts
    return rng.poisson(expected).astype(np.uint32)


def gap_mask(shape, draw: OrientationDraw) -> np.ndarray:
    """True in the detector-gap stripes of ``draw``."""
    mask = np.zeros(shape, dtype=bool)
    for axis, start, width in zip(draw.gap_axes, draw.gap_starts, draw.gap_widths):
        index = [slice(None)] * 3
        index[axis] = slice(max(start, 0), min(start + width, shape[axis]))
        mask[tuple(index)] = True
    return mask


def random_voxel_mask(shape, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Isolated masked voxels (hot or dead pixels); draws from ``rng`` only when fraction > 0."""
    if fraction <= 0.0:
        return np.zeros(shape, dtype=bool)
    return rng.random(shape) < fraction
