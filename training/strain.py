"""Strain as measured crystals have it, for every class: substrate misfit and smooth random fields.

Both are displacement fields u(r) (Å, lattice frame) added to the configuration's own (Volterra field or
relaxation); the pattern sees them through the Bragg phase φ_j = 2π G·u_j. Their amplitude is not drawn
directly but through the phase range they give at the configuration's reflection: the 1st–99th
percentile range of φ over the crystal's atoms (``phase_range_rad``), the number reconstructions of
supported crystals report. The field is linear in its amplitude, so scaling a unit field to the drawn
range is exact.

Substrate interface (``interface_displacement_angstrom``). The particle sits on a substrate along its
{111} truncation facet (normal n̂, pointing from the particle into the substrate). The substrate imposes
an in-plane misfit strain ε at the interface that relaxes with depth z below it over a length λ
(Saint-Venant decay, as for an epitaxial island):

    u_∥ = ε e^(−z/λ) (r − c)_∥                 (in-plane dilatation about the footprint's centre c)
    u_n = (2ν/(1−ν)) ε λ (1 − e^(−z/λ)) n̂      (Poisson response: ε_zz = −2ν/(1−ν) ε_∥, u_n = 0 at the interface)

ε > 0 is tensile (substrate lattice larger). For an untruncated particle there is no interface and no field.

Smooth field (``smooth_displacement_angstrom``): every component a random polynomial of degree 2 and 3 in
the centred coordinates scaled by the crystal's size (standard-normal coefficients), the field used by
the issue's independent check (#16).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations_with_replacement

import numpy as np

from defectscope.training.conventions import TWO_PI, dot_rows

PERCENTILES = (1.0, 99.0)
N_SMOOTH_COEFFICIENTS = 3 * 16  # per component: 6 quadratic + 10 cubic monomials of x, y, z
_MONOMIALS = tuple(m for degree in (2, 3) for m in combinations_with_replacement(range(3), degree))


@dataclass(frozen=True)
class StrainDraw:
    """The strain choices of one configuration (shared by all its orientations)."""

    interface: bool
    interface_phase_range_rad: float  # target 1st-99th percentile range of its Bragg phase
    interface_decay_fraction: float  # λ / particle height along the interface normal
    interface_sign: float  # +1 tensile, -1 compressive
    smooth: bool
    smooth_phase_range_rad: float
    smooth_coefficients: np.ndarray  # (3, 16) standard normals


def _between(u: float, bounds) -> float:
    return float(bounds[0] + u * (bounds[1] - bounds[0]))


def draw_strain(rng: np.random.Generator, cfg) -> StrainDraw:
    """Draw from a fixed block (8 uniforms, then 48 normals) whatever the options, so toggling one
    option does not reshuffle the others. u: 1-4 interface (on, phase range, decay, sign), 5-6 smooth
    (on, phase range); 0 and 7 spare."""
    u = rng.random(8)
    coefficients = rng.standard_normal(N_SMOOTH_COEFFICIENTS).reshape(3, -1)
    return StrainDraw(
        interface=bool(u[1] < cfg.interface_strain_probability),
        interface_phase_range_rad=_between(u[2], cfg.interface_phase_range_rad),
        interface_decay_fraction=_between(u[3], cfg.interface_decay_fraction_range),
        interface_sign=1.0 if u[4] < 0.5 else -1.0,
        smooth=bool(u[5] < cfg.smooth_strain_probability),
        smooth_phase_range_rad=_between(u[6], cfg.smooth_phase_range_rad),
        smooth_coefficients=coefficients,
    )


def bragg_phase_rad(displacement_angstrom: np.ndarray, g_inv_angstrom_cryst) -> np.ndarray:
    return TWO_PI * dot_rows(displacement_angstrom, g_inv_angstrom_cryst)


def phase_range_rad(phase_rad: np.ndarray) -> float:
    """1st-99th percentile range of a (smooth, unwrapped) phase over the crystal's atoms."""
    if phase_rad.size == 0:
        return 0.0
    lo, hi = np.percentile(phase_rad, PERCENTILES)
    return float(hi - lo)


def interface_displacement_angstrom(positions_angstrom: np.ndarray, interface_normal, misfit: float,
                                    decay_length_angstrom: float, poisson_ratio: float) -> np.ndarray:
    """Misfit strain ``misfit`` at the interface facet, decaying over ``decay_length_angstrom`` (module doc)."""
    n = np.asarray(interface_normal, dtype=np.float64)
    n = n / np.linalg.norm(n)
    height = dot_rows(positions_angstrom, n)
    depth = height.max() - height  # 0 on the interface layer, growing into the particle
    footprint = positions_angstrom[depth < 1.0]  # the interface layer ({111} spacing ≥ 2.2 Å)
    rel = positions_angstrom - footprint.mean(axis=0)
    in_plane = rel - np.outer(dot_rows(rel, n), n)
    decay = np.exp(-depth / decay_length_angstrom)
    normal = (2.0 * poisson_ratio / (1.0 - poisson_ratio)) * misfit * decay_length_angstrom * (1.0 - decay)
    return (misfit * decay)[:, None] * in_plane + np.outer(normal, n)


def smooth_displacement_angstrom(positions_angstrom: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """Σ c_(k,m) x̂^m per component k over the quadratic and cubic monomials m; x̂ = (r − centroid) / half-size."""
    rel = positions_angstrom - positions_angstrom.mean(axis=0)
    scaled = rel / (0.5 * float(np.ptp(rel, axis=0).max()))
    columns = [scaled[:, m[0]] * scaled[:, m[1]] * (scaled[:, m[2]] if len(m) == 3 else 1.0) for m in _MONOMIALS]
    u = np.zeros_like(positions_angstrom)
    for j, column in enumerate(columns):
        for k in range(3):
            u[:, k] += coefficients[k, j] * column
    return u


def _scaled_to_range(field_angstrom: np.ndarray, g, target_rad: float) -> tuple[np.ndarray, float]:
    """The field scaled so its Bragg-phase range is ``target_rad``; also the scale."""
    unit_range = phase_range_rad(bragg_phase_rad(field_angstrom, g))
    if unit_range <= 0.0 or target_rad <= 0.0:
        return np.zeros_like(field_angstrom), 0.0
    scale = target_rad / unit_range
    return field_angstrom * scale, scale


def strain_field(positions_angstrom: np.ndarray, g_inv_angstrom_cryst, draw: StrainDraw, interface_normal,
                 poisson_ratio: float) -> tuple[np.ndarray, dict]:
    """The configuration's added displacement (Å) and what it is (``dataset.PARAMETERS`` names)."""
    g = np.asarray(g_inv_angstrom_cryst, dtype=np.float64)
    total = np.zeros_like(positions_angstrom)
    record = {"interface_strain": False, "interface_misfit": 0.0, "interface_decay_length_angstrom": 0.0,
              "interface_phase_range_rad": 0.0, "smooth_strain": False, "smooth_phase_range_rad": 0.0}
    if draw.interface and interface_normal is not None:
        n = np.asarray(interface_normal, dtype=np.float64) / np.linalg.norm(interface_normal)
        height = float(np.ptp(dot_rows(positions_angstrom, n)))
        decay = draw.interface_decay_fraction * height
        unit = interface_displacement_angstrom(positions_angstrom, interface_normal, draw.interface_sign, decay, poisson_ratio)
        field, scale = _scaled_to_range(unit, g, draw.interface_phase_range_rad)
        total += field
        record.update(interface_strain=True, interface_misfit=draw.interface_sign * scale,
                      interface_decay_length_angstrom=decay,
                      interface_phase_range_rad=phase_range_rad(bragg_phase_rad(field, g)))
    if draw.smooth:
        unit = smooth_displacement_angstrom(positions_angstrom, draw.smooth_coefficients)
        field, _ = _scaled_to_range(unit, g, draw.smooth_phase_range_rad)
        total += field
        record.update(smooth_strain=True, smooth_phase_range_rad=phase_range_rad(bragg_phase_rad(field, g)))
    record["strain_phase_range_rad"] = phase_range_rad(bragg_phase_rad(total, g))
    return total, record
