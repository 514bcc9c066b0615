"""What an EAM potential gives, measured with LAMMPS, never taken from a table: the 0 K lattice constant,
the cohesive energy and the relaxed intrinsic stacking-fault energy."""

from __future__ import annotations

import functools
import math
import time

import numpy as np

from defectscope.training.lammps_runtime import open_lammps
from defectscope.training.potential_catalogue import EXPERIMENT, Potential

EV_PER_A2_TO_MJ_PER_M2 = 16021.766  # 1 eV/Å² in mJ/m²


def _fcc_block(lmp, a: float, cells: int) -> None:
    lmp.commands_string(f"""
units metal
atom_style atomic
boundary p p p
lattice fcc {a:.10f}
region box block 0 {cells} 0 {cells} 0 {cells}
create_box 1 box
create_atoms 1 box
mass 1 1.0
""")


def lattice_constant_angstrom(potential: Potential) -> float:
    """Zero-pressure lattice constant at 0 K: a periodic 4³-cell fcc block, box relaxed to zero stress."""
    return _bulk(potential)[0]


def cohesive_energy_ev(potential: Potential) -> float:
    """Energy of an isolated atom minus the energy per atom of the relaxed perfect crystal."""
    return _bulk(potential)[1]


@functools.cache
def _bulk_cached(potential: Potential, sha256: str) -> tuple[float, float]:
    cells = 4
    guess = EXPERIMENT.get(potential.element, {}).get("lattice_a_angstrom", 4.0)
    lmp = open_lammps()
    try:
        _fcc_block(lmp, guess, cells)
        lmp.commands_string(potential.lammps_commands() + """
thermo_style custom step pe lx press
fix relax all box/relax iso 0.0 vmax 0.001
min_modify line quadratic
minimize 0.0 1.0e-12 10000 100000
unfix relax
run 0
""")
        a = float(lmp.get_thermo("lx")) / cells
        e_per_atom = float(lmp.get_thermo("pe")) / lmp.get_natoms()
    finally:
        lmp.close()
    lmp = open_lammps()
    try:  # one atom in a large non-periodic box: the isolated-atom energy F(0) (zero for most files, not all)
        lmp.commands_string(f"""
units metal
atom_style atomic
boundary f f f
region box block -20 20 -20 20 -20 20
create_box 1 box
create_atoms 1 single 0 0 0
mass 1 1.0
{potential.lammps_commands()}
run 0
""")
        e_atom = float(lmp.get_thermo("pe"))
    finally:
        lmp.close()
    return a, e_atom - e_per_atom


def _bulk(potential: Potential) -> tuple[float, float]:
    return _bulk_cached(potential, potential.sha256)


# Stacking-fault cell: x ∥ [1-10], y ∥ [11-2], z ∥ [111]; periods a/√2, a√6/2, a√3 (2 atoms per layer
# per period, 3 layers).
_SF_AXES = np.array([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0], [1.0, 1.0, 1.0]])
_SF_AXES /= np.linalg.norm(_SF_AXES, axis=1, keepdims=True)


def _sf_positions(a: float, nx: int, ny: int, nz: int) -> tuple[np.ndarray, np.ndarray]:
    """Atoms of an (nx, ny, nz)-period block of the stacking-fault cell, and its edge lengths (Å)."""
    lengths = np.array([nx / math.sqrt(2.0), ny * math.sqrt(6.0) / 2.0, nz * math.sqrt(3.0)]) * a
    reach = math.ceil(float(np.linalg.norm(lengths)) / (a / 2.0)) + 2
    axis = np.arange(-reach, reach + 1)
    m = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    m = m[m.sum(axis=1) % 2 == 0]  # fcc sites in units of a/2
    rotated = (m * (a / 2.0)) @ _SF_AXES.T
    tol = 1e-6 * a
    keep = np.all((rotated >= -tol) & (rotated < lengths - tol), axis=1)
    positions = rotated[keep] + tol  # nothing sits on the upper box faces
    expected = 6 * nx * ny * nz
    if len(positions) != expected:  # pragma: no cover - a geometry bug, not an input error
        raise RuntimeError(f"stacking-fault cell has {len(positions)} atoms, expected {expected}")
    return positions, lengths


def stacking_fault_energy_mj_m2(potential: Potential, periods: tuple[int, int, int] = (4, 3, 6)) -> float:
    """Relaxed intrinsic stacking-fault energy γ_isf (mJ/m²).

    A periodic block whose z period (along [111]) is tilted by the Shockley vector a/6[11-2] holds exactly
    one intrinsic fault; atoms relax along [111] only (the fault cannot slide away) and the box height
    relaxes to zero normal stress. γ = (E_faulted - E_perfect) / area. Both signs of the tilt are tried:
    one gives the intrinsic fault, the other puts two {111} layers on top of each other (far higher energy).
    """
    a = lattice_constant_angstrom(potential)
    positions, lengths = _sf_positions(a, *periods)
    e_perfect = _sf_energy(potential, positions, lengths, 0.0)
    shift = a / math.sqrt(6.0)
    e_fault = min(_sf_energy(potential, positions, lengths, s) for s in (shift, -shift))
    return (e_fault - e_perfect) / (lengths[0] * lengths[1]) * EV_PER_A2_TO_MJ_PER_M2


def _sf_energy(potential: Potential, positions: np.ndarray, lengths: np.ndarray, yz_tilt: float) -> float:
    lmp = open_lammps()
    try:
        lx, ly, lz = lengths
        lmp.commands_string(f"""
units metal
atom_style atomic
boundary p p p
region box prism 0 {lx:.10f} 0 {ly:.10f} 0 {lz:.10f} 0 0 {yz_tilt:.10f}
create_box 1 box
mass 1 1.0
""")
        n = len(positions)
        lmp.create_atoms(n, list(range(1, n + 1)), [1] * n, positions.ravel().tolist())
        lmp.commands_string(potential.lammps_commands() + """
fix planes all setforce 0.0 0.0 NULL
fix height all box/relax z 0.0 vmax 0.001
minimize 0.0 1.0e-10 10000 100000
run 0
""")
        return float(lmp.get_thermo("pe"))
    finally:
        lmp.close()


# -- measurements and the choice --------------------------------------------------------------------------
def measure(potential: Potential) -> dict:
    """Lattice constant, cohesive energy and intrinsic stacking-fault energy of one potential, measured."""
    t0 = time.perf_counter()
    a, e_coh = _bulk(potential)
    sfe = stacking_fault_energy_mj_m2(potential)
    return {**potential.describe(), "lattice_a_angstrom": round(a, 5), "cohesive_energy_ev": round(e_coh, 4),
            "sfe_mj_m2": round(sfe, 2), "seconds": round(time.perf_counter() - t0, 2)}


@functools.cache
def _measured_cached(potential: Potential, sha256: str) -> dict:
    a, e_coh = _bulk(potential)
    return {"lattice_a_angstrom_exact": a, "lattice_a_angstrom": round(a, 5), "cohesive_energy_ev": round(e_coh, 4),
            "sfe_mj_m2": round(stacking_fault_energy_mj_m2(potential), 2)}


def measured(potential: Potential) -> dict:
    """``measure`` without the description, once per process and potential file (what a relaxation records)."""
    return dict(_measured_cached(potential, potential.sha256))

