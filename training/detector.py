"""Beam and detector nuisances of a measured map: partial coherence, point-spread, alien spots, hot pixels
and dead detector lines (counting noise, flat background and chip gaps are in ``sampling``).

Geometry of the model. A map is gridded from a rocking scan: each detector frame covers (roughly) the
plane of canonical axes 1 and 2, the rocking motion moves it along axis 0 (the same picture as the gap
stripes of ``sampling``, planes of constant axis-1 or axis-2 index). So the detector point-spread blurs
along axes 1 and 2 only, a hot pixel is bright in every frame (a line along axis 0 at fixed axis-1, 2
indices), and a dead row or column is a plane of constant axis-1 or axis-2 index. The exact orientation
after orthonormalisation depends on the beamline, which the simulator does not know.

Partial coherence. With a Gaussian mutual coherence function γ(Δr) = exp(−Δr²/2ξ²) per axis, the
measured intensity is the coherent one convolved with γ's Fourier transform (a Gaussian of width
1/(2πξ) in q = 1/d). Equivalently, the Patterson function (the FT of I) is multiplied by γ: interference
between points Δr apart keeps a fraction γ(Δr) of its contrast. The drawn number is the *fringe
visibility* V per axis, γ at the crystal's extent D along that axis (its finest fringes): ξ = D / √(−2 ln V).
The convolution is done as that multiplication, with FFTs over the map (periodic; the map's edges hold
nothing the blur could carry across).

Every random choice comes from one fixed block of uniforms (``draw_nuisances``), so switching one
nuisance on or off does not reshuffle the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_UNIFORMS = 48
MAX_HOT, MAX_DEAD, MAX_ALIENS = 4, 2, 3


@dataclass(frozen=True)
class NuisanceDraw:
    """Every beam/detector choice of one pattern."""

    fringe_visibility: tuple[float, float, float]  # per canonical axis; 1: coherent
    psf_sigma_voxels: float  # 0: none
    hot_pixels: tuple[tuple[int, int], ...]  # (axis-1 index, axis-2 index) of each hot line
    hot_pixel_counts: float
    dead_lines: tuple[tuple[int, int], ...]  # (axis 1 or 2, index)
    aliens: tuple[tuple[float, float, float, float, float], ...]  # centre (3 voxels), sigma (voxels), × peak
    defects_masked: bool  # hot pixels and dead lines flagged in the mask


def _between(u: float, bounds) -> float:
    return float(bounds[0] + u * (bounds[1] - bounds[0]))


def _log_between(u: float, bounds) -> float:
    return float(10.0 ** _between(u, (np.log10(bounds[0]), np.log10(bounds[1]))))


def _count(on: float, u: float, probability: float, bounds) -> int:
    lo, hi = int(bounds[0]), int(bounds[1])
    return min(lo + int(u * (hi - lo + 1)), hi) if on < probability else 0


def _index(u: float, n: int) -> int:
    return min(int(u * n), n - 1)


def draw_nuisances(rng: np.random.Generator, cfg, shape) -> NuisanceDraw:
    """One pattern's nuisances from ``cfg`` (``SimulationConfig``); always ``N_UNIFORMS`` uniforms."""
    u = rng.random(N_UNIFORMS)
    # u: 0-3 coherence (on, V per axis), 4-5 psf, 6-16 hot pixels (on, n, counts, 4 × 2 positions),
    #    17-22 dead lines (on, n, 2 × (axis, index)), 23-39 aliens (on, n, 3 × (3 centre, sigma, intensity)),
    #    40 masked?, 41-47 spare
    coherent = u[0] >= cfg.coherence_probability
    visibility = tuple(1.0 if coherent else _between(v, cfg.fringe_visibility_range) for v in u[1:4])
    psf = _between(u[5], cfg.psf_sigma_voxels_range) if u[4] < cfg.psf_probability else 0.0
    n_hot = _count(u[6], u[7], cfg.hot_pixel_probability, cfg.hot_pixel_count_range)
    hot = tuple((_index(u[9 + 2 * k], shape[1]), _index(u[10 + 2 * k], shape[2])) for k in range(n_hot))
    n_dead = _count(u[17], u[18], cfg.dead_line_probability, cfg.dead_line_count_range)
    dead = tuple((1 + int(u[19 + 2 * k] < 0.5), _index(u[20 + 2 * k], shape[1 + int(u[19 + 2 * k] < 0.5)]))
                 for k in range(n_dead))
    n_alien = _count(u[23], u[24], cfg.alien_probability, cfg.alien_count_range)
    aliens = []
    for k in range(n_alien):
        v = u[25 + 5 * k: 30 + 5 * k]
        centre = [2.0 + v[a] * (shape[a] - 5.0) for a in range(3)]  # anywhere, off the map's edges
        aliens.append((*centre, _between(v[3], cfg.alien_sigma_voxels_range),
                       _log_between(v[4], cfg.alien_relative_intensity_range)))
    return NuisanceDraw(visibility, psf, hot, _log_between(u[8], cfg.hot_pixel_counts_range), dead, tuple(aliens),
                        bool(u[40] < cfg.detector_defects_masked_probability))


def coherence_length_angstrom(visibility: float, extent_angstrom: float) -> float:
    """ξ such that γ(extent) = visibility (∞ for a coherent beam)."""
    return float("inf") if visibility >= 1.0 else float(extent_angstrom) / float(np.sqrt(-2.0 * np.log(visibility)))


def blur(intensity: np.ndarray, draw: NuisanceDraw, extent_angstrom, dq_inv_angstrom_cryst: float) -> np.ndarray:
    """Partial coherence and detector point-spread: the intensity's FT multiplied by Gaussians per axis.

    Returns ``intensity`` itself (same object) when neither is drawn, so the counts do not change.
    """
    factors = []
    for axis, n in enumerate(intensity.shape):
        k = np.fft.fftfreq(n)  # cycles per voxel
        xi = coherence_length_angstrom(draw.fringe_visibility[axis], extent_angstrom[axis])
        dr = k / dq_inv_angstrom_cryst  # real-space separation (Å) of frequency k on a grid of step dq
        f = np.ones(n) if np.isinf(xi) else np.exp(-0.5 * (dr / xi) ** 2)
        if axis > 0 and draw.psf_sigma_voxels > 0.0:  # FT of a Gaussian of σ voxels, in the detector plane
            f = f * np.exp(-2.0 * (np.pi * draw.psf_sigma_voxels * k) ** 2)
        factors.append(f)
    if all(np.all(f == 1.0) for f in factors):
        return intensity
    spectrum = np.fft.fftn(intensity)
    spectrum *= factors[0][:, None, None] * factors[1][None, :, None] * factors[2][None, None, :]
    return np.maximum(np.fft.ifftn(spectrum).real, 0.0)  # FFT round-off leaves ~1e-16 negatives


def alien_counts(shape, draw: NuisanceDraw, peak_counts: float) -> np.ndarray | None:
    """Expected counts of the alien spots (None when there are none)."""
    if not draw.aliens:
        return None
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij", sparse=True)
    out = np.zeros(shape)
    for c0, c1, c2, sigma, relative in draw.aliens:
        r2 = (grids[0] - c0) ** 2 + (grids[1] - c1) ** 2 + (grids[2] - c2) ** 2
        out += relative * peak_counts * np.exp(-0.5 * r2 / sigma**2)
    return out


def defect_mask(shape, draw: NuisanceDraw) -> np.ndarray:
    """True on the hot-pixel lines and dead planes."""
    mask = np.zeros(shape, dtype=bool)
    for i1, i2 in draw.hot_pixels:
        mask[:, i1, i2] = True
    for axis, index in draw.dead_lines:
        mask[(slice(None),) * axis + (index,)] = True
    return mask


def apply_detector_defects(counts: np.ndarray, draw: NuisanceDraw) -> None:
    """Hot pixels (a constant high count along axis 0) and dead lines (zero), in place."""
    for axis, index in draw.dead_lines:
        counts[(slice(None),) * axis + (index,)] = 0
    for i1, i2 in draw.hot_pixels:
        counts[:, i1, i2] = np.uint32(round(draw.hot_pixel_counts))


def parameters(draw: NuisanceDraw, extent_angstrom) -> dict:
    """Per-pattern nuisance parameters (``dataset.PARAMETERS`` names)."""
    hot = np.full((MAX_HOT, 2), -1, dtype=np.int16)
    hot[:len(draw.hot_pixels)] = draw.hot_pixels if draw.hot_pixels else np.empty((0, 2))
    dead_axes, dead_index = np.zeros(MAX_DEAD, dtype=np.int8), np.full(MAX_DEAD, -1, dtype=np.int16)
    for k, (axis, index) in enumerate(draw.dead_lines):
        dead_axes[k], dead_index[k] = axis, index
    aliens = np.full((MAX_ALIENS, 5), np.nan)
    aliens[:len(draw.aliens)] = draw.aliens if draw.aliens else np.empty((0, 5))
    return {
        "fringe_visibility": np.asarray(draw.fringe_visibility),
        "coherence_length_angstrom": np.asarray([coherence_length_angstrom(v, e) for v, e in
                                                 zip(draw.fringe_visibility, extent_angstrom)]),
        "psf_sigma_voxels": draw.psf_sigma_voxels,
        "n_hot_pixels": len(draw.hot_pixels),
        "hot_pixel_counts": draw.hot_pixel_counts if draw.hot_pixels else 0.0,
        "hot_pixel_voxels": hot,
        "n_dead_lines": len(draw.dead_lines),
        "dead_line_axes": dead_axes,
        "dead_line_indices": dead_index,
        "n_aliens": len(draw.aliens),
        "alien_centres_voxels": aliens[:, :3],
        "alien_sigma_voxels": aliens[:, 3],
        "alien_relative_intensity": aliens[:, 4],
        "detector_defects_masked": draw.defects_masked and bool(draw.hot_pixels or draw.dead_lines),
    }
