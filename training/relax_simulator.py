"""Relaxed configurations in the simulator: the atoms of a planned configuration from its cached LAMMPS
relaxation (relaxed now when missing), or its unrelaxed twin, and what the relaxation made of it.

A relaxed configuration is built at the potential's own lattice constant a: ideal sites ``sites · a/2``
(lattice vectors, so the kinematic sum still factorises, ``diffraction``), displacement = relaxed −
ideal, and G = hkl / a. Its *twin* is the same plan before the minimisation: the same ideal sites at the
same a, displaced by the Volterra field the minimisation starts from. Comparing the two isolates what
relaxation does (surface relaxation, dissociation, escape).

Label: a crystal is labelled by what it is after relaxation. A dislocation that left the crystal
(``state`` ``left``, or ``fault_across``: both partials gone, a stacking fault left behind) makes the
crystal ``defect_free``; the inserted class stays in ``label_inserted``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectscope.training import crystals, dislocations, potentials
from defectscope.training.relax import relax_configuration
from defectscope.training.relax_cache import load_cached
from defectscope.training.relax_config import (
    CrystalConfiguration,
    RelaxationConfig,
    configuration_from_plan,
    dislocation_at,
    ideal_sites_half_a,
)
from defectscope.training.strain import bragg_phase_rad, phase_range_rad

UNRELAXED = "unrelaxed"


@dataclass(frozen=True, eq=False)
class RelaxedAtoms:
    """Atoms of a relaxed configuration (or its twin) and the record of the relaxation."""

    crystal: crystals.Crystal  # ideal sites at the potential's lattice constant
    dislocation: dislocations.Dislocation | None  # the inserted one (at the potential's a)
    displacement_angstrom: np.ndarray  # relaxed − ideal (or the Volterra field, for the twin)
    volterra_angstrom: np.ndarray  # the Volterra field at the same sites
    record: dict  # ``parameters`` reads it


def relax_cache_dir(cfg) -> Path:
    return Path(cfg.relax_cache_dir) if cfg.relax_cache_dir else potentials.default_cache_dir() / "relaxed"


def relaxed_atoms(cfg, seed: int, plan, twin: bool = False) -> RelaxedAtoms:
    """The relaxed configuration of ``plan`` (``twin``: its unrelaxed twin at the same lattice constant)."""
    return atoms_of(configuration_from_plan(cfg, seed, plan), relax_cache_dir(cfg), cfg.relaxation_config(), twin)


def atoms_of(conf: CrystalConfiguration, cache_dir, relax_cfg: RelaxationConfig, twin: bool = False) -> RelaxedAtoms:
    """The relaxed atoms of ``conf`` from ``cache_dir`` (relaxed now when missing), or its twin."""
    if twin:  # no minimisation needed: only the lattice constant (the cached relaxation's, when there is one)
        potential = potentials.get_potential(relax_cfg.potential_name(conf.element), cache_dir)
        cached = load_cached(conf, cache_dir, relax_cfg)
        a = cached.lattice_a_angstrom if cached is not None else potentials.measured(potential)["lattice_a_angstrom_exact"]
        sites = ideal_sites_half_a(conf)
        record = {"potential": {"name": potential.name}, "lattice_a_angstrom": a, "state": UNRELAXED}
    else:
        relaxed = relax_configuration(conf, cache_dir, relax_cfg)
        a, sites, record = relaxed.lattice_a_angstrom, relaxed.sites_half_a, relaxed.record
    element = dataclasses.replace(crystals.element(conf.element), lattice_a_angstrom=float(a))
    ideal = sites.astype(np.float64) * (float(a) / 2.0)
    crystal = crystals.Crystal(element, conf.n_unit_cells, conf.surface_energy_ratio, conf.interface_normal,
                               conf.truncation_fraction, ideal)
    dislocation = dislocation_at(conf, float(a))
    volterra = dislocations.displacement_angstrom(ideal, dislocation)
    # The cache holds float32 displacements: a fresh relaxation is rounded the same way, so a pattern does
    # not depend on whether its relaxation was computed in this run or read back.
    displacement = volterra if twin else relaxed.displacement_angstrom.astype(np.float32).astype(np.float64)
    return RelaxedAtoms(crystal, dislocation, displacement, volterra, record)


def label_after_relaxation(label_inserted: int, record: dict) -> int:
    """0 (defect_free) when the dislocation left the crystal, else the inserted class."""
    return 0 if record.get("dislocation_left_crystal") else int(label_inserted)


def parameters(atoms: RelaxedAtoms | None, g_inv_angstrom_cryst) -> dict:
    """Per-pattern relaxation parameters (``dataset.PARAMETERS``); ``None``: an unrelaxed configuration."""
    if atoms is None:
        return {"relaxed": False, "potential": "", "relax_cg_iterations": -1, "relax_energy_change_ev": np.nan,
                "relax_energy_change_per_atom_ev": np.nan, "relax_hcp_atoms": -1, "stacking_fault_width_angstrom": np.nan,
                "partial_separation_angstrom": np.nan, "relax_state": UNRELAXED, "dislocation_left_crystal": False,
                "character_after_relaxation": "", "relaxation_phase_range_rad": 0.0}
    r = atoms.record
    width = r.get("stacking_fault_width_angstrom")
    a = float(r["lattice_a_angstrom"])
    relaxation = atoms.displacement_angstrom - atoms.volterra_angstrom
    return {
        "relaxed": r["state"] != UNRELAXED,
        "potential": r["potential"]["name"],
        "relax_cg_iterations": int(r.get("cg_iterations", -1)),
        "relax_energy_change_ev": float(r.get("energy_change_ev", np.nan)),
        "relax_energy_change_per_atom_ev": float(r.get("energy_change_per_atom_ev", np.nan)),
        "relax_hcp_atoms": int(r["cna_final"]["hcp"]) if "cna_final" in r else -1,
        "stacking_fault_width_angstrom": float(width) if width is not None else np.nan,
        # relax_analysis: the partial cores sit just outside the hcp ribbon, about one row (a√3/4) further.
        "partial_separation_angstrom": float(width) + a * math.sqrt(3.0) / 4.0 if width is not None else np.nan,
        "relax_state": r["state"],
        "dislocation_left_crystal": bool(r.get("dislocation_left_crystal", False)),
        "character_after_relaxation": r.get("character_after_relaxation", ""),
        "relaxation_phase_range_rad": phase_range_rad(bragg_phase_rad(relaxation, g_inv_angstrom_cryst)),
    }
