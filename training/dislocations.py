"""Straight dislocations and their isotropic-elasticity (Volterra) displacement fields.

The paper's dislocations: Burgers vector b = ½[1-10] for all configurations; screw line t = [1-10]
(b ∥ t), edge line t = [11-2] (b ⊥ t, glide plane (111) ∋ b, t). Positions: CD — within 10 % of the
lateral size from the particle centre; RPD — anywhere inside the particle.

Fields are those of a straight dislocation in an infinite isotropic medium (Hull & Bacon, *Introduction
to Dislocations*, §4.2; Hirth & Lothe ch. 3) — the paper's initial, unrelaxed fields ("isotropic and
semi-infinite volume"); the atomistic relaxation (LAMMPS/EAM) of the paper is not reproduced here.
In the dislocation frame (x' ∥ b_edge, z' ∥ t, y' = z' × x', θ = atan2(y', x')):

    screw:  u = (b·t) θ / 2π  t
    edge:   u_x' =  b/2π [θ + x'y' / (2(1-ν) r²)]
            u_y' = -b/2π [(1-2ν)/(4(1-ν)) ln(r²/b²) + (x'² - y'²) / (4(1-ν) r²)]

The branch cut of θ (θ = ±π) makes u jump by b, a lattice vector: the cut itself is invisible, as in a
Volterra construction. The ln term is referred to r = |b| (any other reference is a rigid translation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defectscope.errors import BadMessage
from defectscope.training.conventions import TWO_PI, dot_rows, reference_perpendicular
from defectscope.training.crystals import Crystal

KINDS = ("screw", "edge")
POSITION_MODES = ("CD", "RPD")

# Lattice-frame directions, in units of a (Burgers vector) or unnormalised (lines, plane).
BURGERS_VECTOR_A = np.array([0.5, -0.5, 0.0])
LINE_DIRECTIONS = {"screw": np.array([1.0, -1.0, 0.0]), "edge": np.array([1.0, 1.0, -2.0])}
EDGE_GLIDE_PLANE = np.array([1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Dislocation:
    """A straight dislocation: kind, b (Å, lattice frame), unit line direction, a point on the line (Å)."""

    kind: str
    burgers_vector_angstrom: np.ndarray
    line_direction: np.ndarray
    position_angstrom: np.ndarray
    poisson_ratio: float


def make_dislocation(kind: str, lattice_a_angstrom: float, poisson_ratio: float, position_angstrom) -> Dislocation:
    """The paper's screw or edge dislocation through ``position_angstrom``."""
    if kind not in KINDS:
        raise BadMessage(f"dislocation kind must be one of {KINDS}, got {kind!r}")
    t = LINE_DIRECTIONS[kind] / np.linalg.norm(LINE_DIRECTIONS[kind])
    return Dislocation(kind, BURGERS_VECTOR_A * lattice_a_angstrom, t,
                       np.asarray(position_angstrom, dtype=np.float64), float(poisson_ratio))


def _local_coordinates(positions_angstrom: np.ndarray, origin, x_axis, y_axis):
    rel = positions_angstrom - origin
    return dot_rows(rel, x_axis), dot_rows(rel, y_axis)


def screw_displacement_angstrom(positions_angstrom: np.ndarray, d: Dislocation) -> np.ndarray:
    """u = (b·t) θ/2π t for a screw dislocation (any b; only its component along t acts)."""
    t = d.line_direction
    x_axis = reference_perpendicular(t)
    y_axis = np.cross(t, x_axis)
    x, y = _local_coordinates(positions_angstrom, d.position_angstrom, x_axis, y_axis)
    theta = np.arctan2(y, x)
    return np.outer(theta * (d.burgers_vector_angstrom @ t) / TWO_PI, t)


def edge_displacement_angstrom(positions_angstrom: np.ndarray, d: Dislocation) -> np.ndarray:
    """Hull & Bacon's isotropic edge field; x' ∥ b, z' ∥ t, y' = t × b̂ (normal of the glide plane)."""
    t = d.line_direction
    b_len = float(np.linalg.norm(d.burgers_vector_angstrom))
    x_axis = d.burgers_vector_angstrom / b_len
    if abs(x_axis @ t) > 1e-9:
        raise BadMessage("an edge dislocation needs b ⊥ t")
    y_axis = np.cross(t, x_axis)
    nu = d.poisson_ratio
    x, y = _local_coordinates(positions_angstrom, d.position_angstrom, x_axis, y_axis)
    # Atoms on the line itself: the continuum field is singular there; a core radius of b/4 keeps it finite
    # (only the few atoms of the core column are affected).
    r2 = np.maximum(x * x + y * y, (0.25 * b_len) ** 2)
    theta = np.arctan2(y, x)
    ux = b_len / TWO_PI * (theta + x * y / (2.0 * (1.0 - nu) * r2))
    uy = -b_len / TWO_PI * ((1.0 - 2.0 * nu) / (4.0 * (1.0 - nu)) * np.log(r2 / b_len**2)
                            + (x * x - y * y) / (4.0 * (1.0 - nu) * r2))
    return np.outer(ux, x_axis) + np.outer(uy, y_axis)


def displacement_angstrom(positions_angstrom: np.ndarray, d: Dislocation | None) -> np.ndarray:
    """Displacement of every atom (Å, lattice frame); zeros for a defect-free crystal."""
    if d is None:
        return np.zeros_like(positions_angstrom)
    if d.kind == "screw":
        return screw_displacement_angstrom(positions_angstrom, d)
    return edge_displacement_angstrom(positions_angstrom, d)


def perpendicular_offset_angstrom(point_angstrom, d: Dislocation) -> float:
    """Distance from a point (e.g. the particle centre) to the dislocation line."""
    rel = np.asarray(point_angstrom, dtype=float) - d.position_angstrom
    return float(np.linalg.norm(rel - (rel @ d.line_direction) * d.line_direction))


def _perpendicular_axes(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors that make a right-handed frame with the line direction of ``kind``."""
    t = LINE_DIRECTIONS[kind] / np.linalg.norm(LINE_DIRECTIONS[kind])
    e1 = reference_perpendicular(t)
    return e1, np.cross(t, e1)


def draw_position_angstrom(crystal: Crystal, kind: str, mode: str, rng: np.random.Generator,
                           cd_radius_fraction: float = 0.10, rpd_radius_fraction: float | None = None) -> np.ndarray:
    """A point the dislocation line passes through.

    CD: uniform in the disc ⊥ t of radius ``cd_radius_fraction`` × lateral size around the centroid
    (moving the point along t changes nothing). RPD: uniform in the particle's volume — a random atom
    plus a jitter of up to half a cell, so the line does not run through an atomic column. With
    ``rpd_radius_fraction`` r, the atom is drawn among those within r × lateral size of the line through
    the centroid along t, so the line lies (up to the jitter) within that distance of the centre.
    """
    if mode == "CD":
        e1, e2 = _perpendicular_axes(kind)
        radius = cd_radius_fraction * crystal.lateral_size_angstrom * np.sqrt(rng.random())
        phi = TWO_PI * rng.random()
        return crystal.centre_angstrom + radius * (np.cos(phi) * e1 + np.sin(phi) * e2)
    if mode == "RPD":
        candidates = crystal.positions_angstrom
        if rpd_radius_fraction is not None:
            x, y = _local_coordinates(candidates, crystal.centre_angstrom, *_perpendicular_axes(kind))
            candidates = candidates[x * x + y * y <= (rpd_radius_fraction * crystal.lateral_size_angstrom) ** 2]
            if not len(candidates):  # cannot happen for r > 0 with the centroid inside the particle
                raise BadMessage(f"no atom within rpd_radius_fraction={rpd_radius_fraction} of the centre")
        atom = candidates[rng.integers(len(candidates))]
        jitter = (rng.random(3) - 0.5) * crystal.element.lattice_a_angstrom
        return atom + jitter
    raise BadMessage(f"dislocation position mode must be one of {POSITION_MODES}, got {mode!r}")
