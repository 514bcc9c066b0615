"""fcc nanocrystals with Winterbottom shapes (paper: "Building the datasets").

A free particle is the Wulff polyhedron of a cube cut by its {100} and {111} facets: the {100} facets at
``h100 = n_unit_cells · a / 2`` from the centre (the paper's n³-cell cube) and the {111} facets at
``h111 = (γ111/γ100) · h100`` (Wulff: facet distance ∝ surface energy). The particle sits on a substrate:
one {111} interface plane cuts it so that a fraction 65-75 % of the free particle's height along the
interface normal (2 · h111) remains — the Winterbottom shape.

Atom positions are in ångström in the lattice frame (x[100], y[010], z[001]); the origin is an atom
(see ``conventions``). Sites are generated on the integer grid of half lattice parameters, where fcc sites
are exactly the points with an even coordinate sum, so shape tests are exact integer-grid comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from defectscope.errors import BadMessage
from defectscope.training.conventions import dot_rows


@dataclass(frozen=True)
class Element:
    symbol: str
    lattice_a_angstrom: float  # room-temperature lattice parameter
    poisson_ratio: float  # isotropic (polycrystal-average) value for the Volterra fields


# Lattice parameters: standard room-temperature values; Poisson ratios: isotropic averages (Hirth & Lothe
# tables / handbook values). Only these four elements were simulated in the paper.
ELEMENTS: dict[str, Element] = {
    "Al": Element("Al", 4.0495, 0.35),
    "Ag": Element("Ag", 4.0853, 0.37),
    "Au": Element("Au", 4.0782, 0.44),
    "Pt": Element("Pt", 3.9242, 0.38),
}

# Crystal sizes of the paper: the edge of the cube the Wulff shape is carved from, in unit cells.
SIZES: dict[str, int] = {"small": 40, "large": 80}

# The eight {111} planes an interface can be, as integer normals (pointing from the particle to the substrate).
INTERFACE_NORMALS: tuple[tuple[int, int, int], ...] = tuple(
    (sx, sy, sz) for sx in (1, -1) for sy in (1, -1) for sz in (1, -1)
)

_EPS = 1e-9  # integer-grid comparisons: a site exactly on a facet plane belongs to the particle


def element(symbol: str) -> Element:
    try:
        return ELEMENTS[symbol]
    except KeyError:
        raise BadMessage(f"unknown element {symbol!r}; known: {sorted(ELEMENTS)}") from None


@dataclass(frozen=True, eq=False)
class Crystal:
    """One particle: its atoms (lattice frame, Å) and the shape parameters that made it."""

    element: Element
    n_unit_cells: int
    surface_energy_ratio: float  # γ111 / γ100
    interface_normal: tuple[int, int, int] | None  # None: free (untruncated) Wulff particle
    truncation_fraction: float | None  # remaining fraction of the free particle's height
    positions_angstrom: np.ndarray = field(repr=False)  # (n_atoms, 3) float64, lattice sites

    @property
    def n_atoms(self) -> int:
        return int(self.positions_angstrom.shape[0])

    @property
    def centre_angstrom(self) -> np.ndarray:
        """Centroid of the atoms: the 'centre' CD dislocations are placed around."""
        return self.positions_angstrom.mean(axis=0)

    @property
    def lateral_size_angstrom(self) -> float:
        """Edge of the cube the particle is carved from (the paper's 15 nm for 40 Au cells)."""
        return self.n_unit_cells * self.element.lattice_a_angstrom


def facet_distances_half_a(n_unit_cells: int, surface_energy_ratio: float) -> tuple[float, float]:
    """(h100, h111) in units of a/2: distances from the centre to the {100} and {111} facets."""
    h100 = float(n_unit_cells)  # n cells of edge a → half-edge n·a/2 = n half-units
    return h100, surface_energy_ratio * h100


def fcc_sites_half_a(n_unit_cells: int) -> np.ndarray:
    """Integer coordinates (units of a/2) of all fcc sites of the centred n³-cell cube, (n_sites, 3) int32."""
    n = int(n_unit_cells)
    axis = np.arange(-n, n + 1, dtype=np.int32)
    mx, my, mz = np.meshgrid(axis, axis, axis, indexing="ij", sparse=True)
    on_lattice = ((mx + my + mz) % 2) == 0  # fcc = simple cubic of a/2 with even coordinate sum
    idx = np.nonzero(on_lattice)
    return np.stack([axis[idx[0]], axis[idx[1]], axis[idx[2]]], axis=1)


def winterbottom_mask(sites_half_a: np.ndarray, n_unit_cells: int, surface_energy_ratio: float,
                      interface_normal=None, truncation_fraction: float | None = None) -> np.ndarray:
    """Boolean mask of the sites inside the (truncated) Wulff polyhedron."""
    h100, h111 = facet_distances_half_a(n_unit_cells, surface_energy_ratio)
    m = sites_half_a.astype(np.float64)
    inside = np.all(np.abs(m) <= h100 + _EPS, axis=1)
    # max over the eight {111} normals of s·m equals |mx|+|my|+|mz|; the facet sits at h111 along s/√3.
    inside &= np.abs(m).sum(axis=1) <= np.sqrt(3.0) * h111 + _EPS
    if interface_normal is not None:
        # The free particle spans [-h111, +h111] along the interface normal; keep the part that is
        # `truncation_fraction` of that height, measured from the facet opposite the substrate.
        cut_half_a = h111 * (2.0 * truncation_fraction - 1.0)
        inside &= dot_rows(m, interface_normal) <= np.sqrt(3.0) * cut_half_a + _EPS
    return inside


def build_crystal(symbol: str, n_unit_cells: int, surface_energy_ratio: float,
                  interface_normal=None, truncation_fraction: float | None = None) -> Crystal:
    """Atoms of a Winterbottom particle; interface_normal=None gives the free Wulff particle."""
    el = element(symbol)
    if not 1.0 / np.sqrt(3.0) < surface_energy_ratio < np.sqrt(3.0):
        # Outside this range one facet family vanishes: no longer a {100}+{111} Wulff shape.
        raise BadMessage(f"surface_energy_ratio γ111/γ100 must lie in (1/√3, √3), got {surface_energy_ratio}")
    if interface_normal is not None:
        interface_normal = tuple(int(v) for v in interface_normal)
        if interface_normal not in INTERFACE_NORMALS:
            raise BadMessage(f"interface_normal must be a <111> vector of ±1, got {interface_normal}")
        if truncation_fraction is None or not 0.5 < truncation_fraction <= 1.0:
            raise BadMessage(f"truncation_fraction must lie in (0.5, 1], got {truncation_fraction}")
    else:
        truncation_fraction = None
    sites = fcc_sites_half_a(n_unit_cells)
    keep = winterbottom_mask(sites, n_unit_cells, surface_energy_ratio, interface_normal, truncation_fraction)
    positions = sites[keep].astype(np.float64) * (el.lattice_a_angstrom / 2.0)
    return Crystal(el, int(n_unit_cells), float(surface_energy_ratio), interface_normal,
                   None if truncation_fraction is None else float(truncation_fraction), positions)
