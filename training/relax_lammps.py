"""One LAMMPS energy minimisation of a crystal with free surfaces (``boundary m m m``: a non-periodic box
larger than the crystal), with common-neighbour analysis before and after and what LAMMPS reports of the
run (iterations, force evaluations, stopping criterion, energies)."""

from __future__ import annotations

import math
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from defectscope.training import potentials
from defectscope.training.relax_config import RelaxationConfig


def minimise(positions: np.ndarray, potential: potentials.Potential, relax_cfg: RelaxationConfig,
             lattice_a_angstrom: float) -> dict:
    """LAMMPS energy minimisation with free surfaces; positions come back in input order."""
    lammps = potentials.import_lammps()
    lo = positions.min(axis=0) - relax_cfg.vacuum_angstrom
    hi = positions.max(axis=0) + relax_cfg.vacuum_angstrom
    cna_cutoff = 0.5 * (1.0 + 1.0 / math.sqrt(2.0)) * lattice_a_angstrom  # between 1st and 2nd fcc neighbours
    with tempfile.TemporaryDirectory(prefix="defectscope-relax-") as tmp:
        log = Path(tmp) / "log.lammps"
        lmp = potentials.open_lammps(log)
        try:
            lmp.commands_string(f"""
units metal
atom_style atomic
atom_modify map array
boundary m m m
region box block {lo[0]:.6f} {hi[0]:.6f} {lo[1]:.6f} {hi[1]:.6f} {lo[2]:.6f} {hi[2]:.6f}
create_box 1 box
mass 1 1.0
""")
            n = len(positions)
            lmp.create_atoms(n, list(range(1, n + 1)), [1] * n, np.ascontiguousarray(positions).ravel().tolist())
            if lmp.get_natoms() != n:
                raise RuntimeError(f"LAMMPS created {lmp.get_natoms()} of {n} atoms")
            lmp.commands_string(potential.lammps_commands() + f"""
compute cna all cna/atom {cna_cutoff:.6f}
thermo_style custom step pe fnorm
run 0
""")
            e_initial = float(lmp.get_thermo("pe"))
            cna_initial = _per_atom(lmp, "cna", lammps.LMP_STYLE_ATOM, lammps.LMP_TYPE_VECTOR)
            t0 = time.perf_counter()
            lmp.command(f"min_style {relax_cfg.min_style}")
            lmp.command(f"minimize {relax_cfg.energy_tolerance!r} {relax_cfg.force_tolerance_ev_per_angstrom!r} "
                        f"{int(relax_cfg.max_iterations)} {int(relax_cfg.max_evaluations)}")
            seconds = time.perf_counter() - t0
            e_final = float(lmp.get_thermo("pe"))
            fnorm = float(lmp.get_thermo("fnorm"))
            iterations = int(lmp.get_thermo("step"))
            cna_final = _per_atom(lmp, "cna", lammps.LMP_STYLE_ATOM, lammps.LMP_TYPE_VECTOR)
            final = np.ctypeslib.as_array(lmp.gather_atoms("x", 1, 3)).reshape(-1, 3).astype(np.float64)
            if lmp.get_natoms() != n:
                raise RuntimeError(f"{n - lmp.get_natoms()} atoms were lost during the minimisation")
        finally:
            lmp.close()
        stop, evaluations = _minimise_summary(log.read_text(errors="replace"))
    return {"positions": final, "cna_initial": cna_initial, "cna_final": cna_final,
            "cg_iterations": iterations, "force_evaluations": evaluations, "stopping_criterion": stop,
            "energy_initial_ev": e_initial, "energy_final_ev": e_final, "energy_change_ev": e_final - e_initial,
            "energy_change_per_atom_ev": (e_final - e_initial) / len(positions), "final_force_norm_ev_per_angstrom": fnorm,
            "seconds_minimise": round(seconds, 3)}


def _per_atom(lmp, compute_id: str, style, kind) -> np.ndarray:
    """A per-atom compute in atom-ID order (LAMMPS keeps its own local order)."""
    values = np.array(lmp.numpy.extract_compute(compute_id, style, kind), dtype=np.float64)
    ids = np.array(lmp.numpy.extract_atom("id"), dtype=np.int64)
    out = np.empty(len(ids), dtype=np.int8)
    out[ids - 1] = np.rint(values).astype(np.int8)
    return out


def _minimise_summary(log_text: str) -> tuple[str | None, int | None]:
    stop = re.search(r"Stopping criterion = (.+)", log_text)
    evals = re.search(r"Iterations, force evaluations = (\d+) (\d+)", log_text)
    return (stop.group(1).strip() if stop else None), (int(evals.group(2)) if evals else None)
