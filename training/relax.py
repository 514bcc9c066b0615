"""Atomistic relaxation of simulator configurations (the paper's Methods: EAM, conjugate gradient, energy
tolerance 1e-6, free surfaces), cached per configuration.

One configuration (``CrystalConfiguration``: the shape parameters and, for a defective one, its kind and
line position in units of the lattice parameter) is built at the chosen potential's own 0 K lattice
constant (``potentials.CHOSEN``), given the simulator's unrelaxed Volterra field
(``dislocations.displacement_angstrom``), and minimised with LAMMPS in a non-periodic box larger than
the crystal (``boundary m m m``), so every surface is free.

What comes back (``RelaxedConfiguration``): ideal sites and relaxed positions (atom order = the
simulator's), and a record — CG iterations and force evaluations, the stopping criterion LAMMPS reports,
energies, common-neighbour analysis counts (LAMMPS ``compute cna/atom``: hcp atoms are the stacking-fault
ribbon between Shockley partials), the ribbon's width, what became of the dislocation (``state``), the
measured line direction and character, and the time.

Cache: ``<cache_dir>/<key>.npz`` where ``key`` hashes the configuration, the potential file's bytes, the
stopping rule and ``RELAX_VERSION``. The reflection, orientations and the seed are not in it, so every
pattern made from one crystal reuses one relaxation. Files are written whole (temporary name, then
rename) and read with ``allow_pickle=False``; ``relax_all`` skips what is there, so a stopped batch resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from defectscope.errors import BadMessage
from defectscope.training import crystals, dislocations, potentials
from defectscope.training.sim_config import CLASSES, SimulationConfig

RELAX_VERSION = 1  # bump when the procedure changes what a cached file holds
SCHEMA_VERSION = 1
CNA_NAMES = ("other", "fcc", "hcp", "bcc", "icosahedral")  # LAMMPS cna/atom values 0..4 (its "unknown" is 5)
# An atom is "interior" when its ideal site lies at least this many lattice parameters from the nearest
# surface site: a non-fcc atom there is a defect (core or fault), not a surface or edge atom.
INTERIOR_DEPTH_A = 1.5


@dataclass(frozen=True)
class RelaxationConfig:
    """The stopping rule and the potentials: everything that decides a relaxation besides the crystal."""

    schema_version: int = SCHEMA_VERSION
    potentials: tuple[tuple[str, str], ...] = tuple(sorted(potentials.CHOSEN.items()))  # (element, name)
    min_style: str = "cg"
    energy_tolerance: float = 1e-6  # the paper's; relative change of the energy between iterations
    force_tolerance_ev_per_angstrom: float = 0.0  # 0: energy criterion only
    max_iterations: int = 2000
    max_evaluations: int = 20000
    vacuum_angstrom: float = 10.0  # initial box margin; 'm' boundaries grow it if atoms move out

    def __post_init__(self):
        pots = self.potentials.items() if isinstance(self.potentials, dict) else self.potentials
        object.__setattr__(self, "potentials", tuple(sorted((str(e), str(n)) for e, n in pots)))
        _check(self.schema_version == SCHEMA_VERSION, f"relaxation config schema_version must be {SCHEMA_VERSION}")
        for element, name in self.potentials:
            _check(name in potentials.CANDIDATES.get(element, ()), f"potential {name!r} is not a candidate for {element!r}")
        _check(self.min_style in ("cg", "sd", "fire", "quickmin"), f"min_style {self.min_style!r} not allowed")
        _check(0.0 <= self.energy_tolerance < 1e-2, "energy_tolerance must lie in [0, 1e-2)")
        _check(0.0 <= self.force_tolerance_ev_per_angstrom < 1.0, "force_tolerance_ev_per_angstrom must lie in [0, 1)")
        _check(self.energy_tolerance > 0 or self.force_tolerance_ev_per_angstrom > 0, "one tolerance must be > 0")
        _check(1 <= int(self.max_iterations) <= 10**6 and 1 <= int(self.max_evaluations) <= 10**7,
               "max_iterations / max_evaluations out of range")
        _check(1.0 <= self.vacuum_angstrom <= 100.0, "vacuum_angstrom must lie in [1, 100]")

    def potential_name(self, element: str) -> str:
        names = dict(self.potentials)
        if element not in names:
            raise BadMessage(f"no potential configured for {element!r}")
        return names[element]

    def stopping_rule(self) -> dict:
        return {"min_style": self.min_style, "energy_tolerance": self.energy_tolerance,
                "force_tolerance_ev_per_angstrom": self.force_tolerance_ev_per_angstrom,
                "max_iterations": int(self.max_iterations), "max_evaluations": int(self.max_evaluations),
                "vacuum_angstrom": self.vacuum_angstrom}

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "potentials": dict(self.potentials)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RelaxationConfig:
        d = json.loads(text)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise BadMessage(f"relaxation config has unknown options {unknown}")
        return cls(**d)


@dataclass(frozen=True)
class CrystalConfiguration:
    """What defines one crystal's atoms, independent of the lattice constant it is built at."""

    element: str
    n_unit_cells: int
    surface_energy_ratio: float
    interface_normal: tuple[int, int, int] | None
    truncation_fraction: float | None
    kind: str = "defect_free"  # CLASSES
    position_mode: str = "none"  # none, CD, RPD
    dislocation_position_a: tuple[float, float, float] | None = None  # a point of the line, units of a
    index: int | None = None  # the simulator's configuration index: informative, not part of the key

    def __post_init__(self):
        _check(self.kind in CLASSES, f"kind must be one of {CLASSES}")
        _check((self.kind == "defect_free") == (self.dislocation_position_a is None),
               "a dislocation position is given exactly when the kind is screw or edge")
        if self.interface_normal is not None:
            object.__setattr__(self, "interface_normal", tuple(int(v) for v in self.interface_normal))
        if self.dislocation_position_a is not None:
            object.__setattr__(self, "dislocation_position_a", tuple(float(v) for v in self.dislocation_position_a))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("interface_normal", "dislocation_position_a"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CrystalConfiguration:
        return cls(**d)


def configuration_from_plan(cfg: SimulationConfig, seed: int, plan) -> CrystalConfiguration:
    """The simulator's configuration ``plan`` (``simulator.plan_configuration``), with the line position the
    simulator draws for it (same random stream), expressed in lattice parameters."""
    from defectscope.training import simulator

    position_a = None
    if plan.label != 0:
        crystal = crystals.build_crystal(plan.element, crystals.SIZES[plan.size], plan.surface_energy_ratio,
                                         plan.interface_normal, plan.truncation_fraction)
        position = dislocations.draw_position_angstrom(
            crystal, plan.kind, plan.position_mode, simulator.rng_for(seed, simulator.STREAM_POSITION, plan.index),
            cfg.cd_radius_fraction, cfg.rpd_radius_fraction)
        position_a = tuple(float(v) for v in position / crystal.element.lattice_a_angstrom)
    return CrystalConfiguration(plan.element, crystals.SIZES[plan.size], plan.surface_energy_ratio, plan.interface_normal,
                                plan.truncation_fraction, plan.kind, plan.position_mode, position_a, plan.index)


def simulator_configurations(cfg: SimulationConfig, seed: int, indices) -> list[CrystalConfiguration]:
    from defectscope.training import simulator

    return [configuration_from_plan(cfg, seed, simulator.plan_configuration(cfg, seed, i)) for i in indices]


# -- atoms ----------------------------------------------------------------------------------------------
def ideal_sites_half_a(conf: CrystalConfiguration) -> np.ndarray:
    """Integer fcc sites (units of a/2) of the configuration's particle, in the simulator's atom order."""
    crystal = crystals.build_crystal(conf.element, conf.n_unit_cells, conf.surface_energy_ratio,
                                     conf.interface_normal, conf.truncation_fraction)
    return np.rint(crystal.positions_angstrom / (crystal.element.lattice_a_angstrom / 2.0)).astype(np.int32)


def dislocation_at(conf: CrystalConfiguration, lattice_a_angstrom: float) -> dislocations.Dislocation | None:
    if conf.kind == "defect_free":
        return None
    return dislocations.make_dislocation(conf.kind, lattice_a_angstrom, crystals.element(conf.element).poisson_ratio,
                                         np.asarray(conf.dislocation_position_a) * lattice_a_angstrom)


# -- the cache key and files ------------------------------------------------------------------------------
def cache_key(conf: CrystalConfiguration, potential: potentials.Potential, relax_cfg: RelaxationConfig) -> str:
    content = {k: v for k, v in conf.to_dict().items() if k != "index"}
    text = json.dumps({"configuration": content, "potential_sha256": potential.sha256,
                       "stopping_rule": relax_cfg.stopping_rule(), "relax_version": RELAX_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


@dataclass(frozen=True, eq=False)
class RelaxedConfiguration:
    configuration: CrystalConfiguration
    lattice_a_angstrom: float  # the potential's: ideal sites are sites_half_a · a / 2
    sites_half_a: np.ndarray  # (n, 3) int
    displacement_angstrom: np.ndarray  # (n, 3): relaxed - ideal (Volterra field + relaxation)
    cna: np.ndarray  # (n,) LAMMPS cna/atom of the relaxed crystal: 1 fcc, 2 hcp, 3 bcc, 4 ico, 0/5 other
    record: dict
    from_cache: bool

    @property
    def ideal_positions_angstrom(self) -> np.ndarray:
        return self.sites_half_a * (self.lattice_a_angstrom / 2.0)

    @property
    def relaxed_positions_angstrom(self) -> np.ndarray:
        return self.ideal_positions_angstrom + self.displacement_angstrom


def _cache_path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"relaxed-{key}.npz"


def _save(path: Path, sites: np.ndarray, displacement: np.ndarray, cna: np.ndarray, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, sites_half_a=sites.astype(np.int16), displacement_angstrom=displacement.astype(np.float32),
                                cna=cna.astype(np.int8),
                                record=np.array(json.dumps(record, sort_keys=True)))
        os.replace(tmp, path)  # a killed run leaves a *.partial, never a truncated .npz
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cached(conf: CrystalConfiguration, cache_dir, relax_cfg: RelaxationConfig | None = None,
                potential_cache_dir=None) -> RelaxedConfiguration | None:
    """The cached relaxation of ``conf``, or None when there is none."""
    relax_cfg = relax_cfg or RelaxationConfig()
    potential = potentials.get_potential(relax_cfg.potential_name(conf.element), potential_cache_dir or cache_dir)
    path = _cache_path(cache_dir, cache_key(conf, potential, relax_cfg))
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        record = json.loads(str(z["record"][()]))
        sites = z["sites_half_a"].astype(np.int32)
        displacement = z["displacement_angstrom"].astype(np.float64)
        cna = z["cna"].astype(np.int8)
    return RelaxedConfiguration(conf, record["lattice_a_angstrom"], sites, displacement, cna, record, from_cache=True)


# -- relaxation -----------------------------------------------------------------------------------------
def relax_configuration(conf: CrystalConfiguration, cache_dir, relax_cfg: RelaxationConfig | None = None,
                        potential_cache_dir=None) -> RelaxedConfiguration:
    """Relax one configuration, or return its cached relaxation (``from_cache`` says which)."""
    relax_cfg = relax_cfg or RelaxationConfig()
    cached = load_cached(conf, cache_dir, relax_cfg, potential_cache_dir)
    if cached is not None:
        return cached
    t_start = time.perf_counter()
    potential = potentials.get_potential(relax_cfg.potential_name(conf.element), potential_cache_dir or cache_dir)
    measured = potentials.measured(potential)
    a = measured["lattice_a_angstrom_exact"]
    sites = ideal_sites_half_a(conf)
    ideal = sites * (a / 2.0)
    dislocation = dislocation_at(conf, a)
    start = ideal + dislocations.displacement_angstrom(ideal, dislocation)
    run = minimise(start, potential, relax_cfg, lattice_a_angstrom=a)
    displacement = run.pop("positions") - ideal
    cna_initial, cna_final = run.pop("cna_initial"), run.pop("cna_final")
    moved = np.linalg.norm(ideal + displacement - start, axis=1)
    record = {
        "configuration": conf.to_dict(),
        "relax_version": RELAX_VERSION,
        "potential": {**potential.describe(), **{k: v for k, v in measured.items() if k != "lattice_a_angstrom_exact"}},
        "lattice_a_angstrom": a,
        "stopping_rule": relax_cfg.stopping_rule(),
        "n_atoms": len(sites),
        **run,
        "cna_initial": _cna_counts(cna_initial),
        "cna_final": _cna_counts(cna_final),
        **analyse_defect(sites, ideal + displacement, cna_final, a, dislocation),
        # How far the minimisation moved the atoms from the Volterra start.
        "relaxation_mean_move_angstrom": float(moved.mean()),
        "relaxation_max_move_angstrom": float(moved.max()),
    }
    record["seconds_total"] = round(time.perf_counter() - t_start, 3)
    _save(_cache_path(cache_dir, cache_key(conf, potential, relax_cfg)), sites, displacement, cna_final, record)
    return RelaxedConfiguration(conf, a, sites, displacement, cna_final, record, from_cache=False)


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


def _cna_counts(cna: np.ndarray) -> dict:
    counts = np.bincount(np.minimum(cna.astype(np.int64), 5), minlength=6)
    return {"fcc": int(counts[1]), "hcp": int(counts[2]), "bcc": int(counts[3]), "icosahedral": int(counts[4]),
            "other": int(counts[0] + counts[5])}


# -- what became of the dislocation --------------------------------------------------------------------------
def depth_below_surface_a(sites_half_a: np.ndarray) -> np.ndarray:
    """Distance (lattice parameters) from each ideal site to the nearest surface site (fewer than 12 neighbours)."""
    tree = cKDTree(sites_half_a)
    neighbours = tree.query_ball_point(sites_half_a, r=1.5, return_length=True) - 1  # nn at √2 half-units
    surface = sites_half_a[neighbours < 12]
    depth, _ = cKDTree(surface).query(sites_half_a)
    return depth / 2.0


def analyse_defect(sites_half_a: np.ndarray, relaxed: np.ndarray, cna: np.ndarray, a: float,
                   dislocation: dislocations.Dislocation | None) -> dict:
    """Interior defect atoms, the stacking-fault ribbon and what became of the dislocation.

    ``state``: ``dissociated`` (an interior hcp ribbon bounded by two partial cores), ``compact`` (interior
    core atoms but no ribbon: undissociated or partials closer than CNA resolves), ``one_partial_left``
    (a ribbon from an interior partial to the surface), ``fault_across`` (a ribbon from surface to surface:
    both partials left, the fault stays), ``left`` (no interior defect atoms), ``none`` (defect-free and
    nothing found). ``dislocation_left_crystal`` is true for ``fault_across`` and ``left``.
    ``stacking_fault_width_angstrom``: extent of the ribbon's hcp atoms across the line, in its plane; the
    partial cores sit just outside it, so the partial separation is this plus about one row (a√3/4 ≈ 1.7 Å
    for Au). Reported only for ``dissociated``, where both ends are partial cores.
    """
    depth = depth_below_surface_a(sites_half_a)
    interior = depth >= INTERIOR_DEPTH_A
    defect = interior & (cna != 1)
    hcp = cna == 2
    out: dict = {"interior_defect_atoms": int(defect.sum()), "interior_hcp_atoms": int((hcp & interior).sum())}
    ribbon = _largest_cluster(np.flatnonzero(hcp), relaxed, 1.2 * a / math.sqrt(2.0))
    ribbon_ok = len(ribbon) >= 6 and (interior[ribbon]).any()
    repeat = a / math.sqrt(2.0) if dislocation is None or dislocation.kind == "screw" else a * math.sqrt(6.0) / 2.0
    # A line through the interior leaves at least one non-fcc atom per two repeats along it; fewer is noise
    # (a few interior atoms disturbed by a surface step).
    chord = _chord_length_angstrom(sites_half_a[interior] * (a / 2.0), dislocation) if dislocation is not None else 0.0
    core_found = out["interior_defect_atoms"] >= max(4, 0.5 * chord / repeat)
    out["ribbon_hcp_atoms"] = len(ribbon) if ribbon_ok else 0
    out["line_chord_interior_angstrom"] = round(chord, 2)
    if ribbon_ok:
        points = relaxed[ribbon]
        centred = points - points.mean(axis=0)
        _, vectors = np.linalg.eigh(centred.T @ centred)
        normal = vectors[:, 0]  # least spread: the fault plane's normal
        plane = np.array([[1, 1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, -1]]) / math.sqrt(3.0)
        out["ribbon_plane"] = [int(v) for v in np.rint(plane[np.argmax(np.abs(plane @ normal))] * math.sqrt(3.0))]
        t = dislocation.line_direction if dislocation is not None else vectors[:, 2]
        geometry = _ribbon_geometry(points, relaxed, normal, t, a)
        out.update(geometry)
        state = {0: "dissociated", 1: "one_partial_left", 2: "fault_across"}[sum(geometry["ribbon_ends_at_surface"])]
        if state != "dissociated":
            out.pop("stacking_fault_width_angstrom")
    elif core_found:
        state = "compact"
    else:
        state = "left" if dislocation is not None else "none"
    out["state"] = state
    out["dislocation_left_crystal"] = state in ("fault_across", "left")
    out.update(_line_character(relaxed[defect], dislocation) if state in ("dissociated", "compact") else {})
    return out


def _ribbon_geometry(ribbon: np.ndarray, relaxed: np.ndarray, normal: np.ndarray, t: np.ndarray, a: float) -> dict:
    """Width of the fault ribbon across the line and whether each of its edges is the crystal's surface.

    The ribbon is cut into slices along the line (4 repeats long). In each slice the ribbon's extent across
    the line is compared with the crystal's own extent in the fault plane: an edge within one lattice
    parameter of the crystal's is the surface (no surface atom is hcp), otherwise it is a partial core.
    Per slice, not over the whole ribbon, so a line that bows near the surfaces does not count as a fault
    that reaches them; an edge is "at the surface" in more than half of the slices.
    """
    origin = ribbon.mean(axis=0)
    t_in = t - (t @ normal) * normal
    t_in /= np.linalg.norm(t_in)
    across = np.cross(normal, t_in)
    s_r, l_r = (ribbon - origin) @ across, (ribbon - origin) @ t_in
    rel = relaxed - origin
    in_plane = np.abs(rel @ normal) < a / math.sqrt(3.0)  # the two {111} layers of the fault
    s_c, l_c = rel[in_plane] @ across, rel[in_plane] @ t_in
    step = 4.0 * a / math.sqrt(2.0)
    widths, low, high = [], [], []
    for start in np.arange(l_r.min(), l_r.max() + 1e-9, step):
        r_in = (l_r >= start) & (l_r < start + step)
        c_in = (l_c >= start) & (l_c < start + step)
        if r_in.sum() < 4 or not c_in.any():
            continue
        widths.append(s_r[r_in].max() - s_r[r_in].min())
        low.append(s_r[r_in].min() - s_c[c_in].min() < a)
        high.append(s_c[c_in].max() - s_r[r_in].max() < a)
    if not widths:
        return {"ribbon_ends_at_surface": [False, False], "stacking_fault_width_angstrom": None}
    return {"ribbon_ends_at_surface": [bool(np.mean(low) > 0.5), bool(np.mean(high) > 0.5)],
            "stacking_fault_width_angstrom": round(float(np.median(widths)), 2)}


def _largest_cluster(indices: np.ndarray, positions: np.ndarray, cutoff: float) -> np.ndarray:
    if len(indices) == 0:
        return indices
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = cKDTree(positions[indices]).query_pairs(cutoff, output_type="ndarray")
    n = len(indices)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)) if len(pairs) else coo_matrix((n, n))
    _, labels = connected_components(graph, directed=False)
    return indices[labels == np.bincount(labels).argmax()]


def _chord_length_angstrom(interior_positions: np.ndarray, d: dislocations.Dislocation) -> float:
    """Length of the inserted line inside the interior: extent along t of interior sites within a of it."""
    rel = interior_positions - d.position_angstrom
    along = rel @ d.line_direction
    off = np.linalg.norm(rel - np.outer(along, d.line_direction), axis=1)
    near = along[off < 2.0 * np.linalg.norm(d.burgers_vector_angstrom)]
    return float(near.max() - near.min()) if len(near) > 1 else 0.0


def _line_character(core_positions: np.ndarray, d: dislocations.Dislocation | None) -> dict:
    """Line direction of the interior defect atoms (cores and fault: their principal axis) and its angle to b:
    screw below 15°, edge above 75°, mixed between."""
    if d is None or len(core_positions) < 8:
        return {}
    centred = core_positions - core_positions.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    if values[2] < 4.0 * values[1]:  # not elongated: no line direction to speak of
        return {}
    t = vectors[:, 2]
    b = d.burgers_vector_angstrom / np.linalg.norm(d.burgers_vector_angstrom)
    angle = math.degrees(math.acos(min(1.0, abs(float(t @ b)))))
    character = "screw" if angle < 15.0 else "edge" if angle > 75.0 else "mixed"
    t = t if t @ d.line_direction >= 0 else -t
    return {"line_direction_measured": [round(float(v), 4) for v in t],
            "line_angle_to_b_deg": round(angle, 1), "character_after_relaxation": character}


# -- batches --------------------------------------------------------------------------------------------
def relax_all(configurations, cache_dir, relax_cfg: RelaxationConfig | None = None, workers: int = 1,
              potential_cache_dir=None, progress: bool = False) -> list[dict]:
    """Relax every configuration not yet in ``cache_dir`` (one per task) and return all records in order.

    Resumable: each finished configuration is one complete file, so a stopped batch reruns only what is
    missing. ``workers > 1`` runs single-threaded LAMMPS instances in that many spawned processes; tasks
    and results cross as JSON text (no objects of ours are pickled).
    """
    relax_cfg = relax_cfg or RelaxationConfig()
    configurations = list(configurations)
    records: list[dict | None] = [None] * len(configurations)
    todo = []
    for k, conf in enumerate(configurations):
        cached = load_cached(conf, cache_dir, relax_cfg, potential_cache_dir)
        if cached is not None:
            records[k] = {**cached.record, "from_cache": True}
        else:
            todo.append(k)
    args = [(json.dumps(configurations[k].to_dict()), relax_cfg.to_json(), str(cache_dir),
             None if potential_cache_dir is None else str(potential_cache_dir)) for k in todo]
    if workers <= 1 or len(todo) <= 1:
        results = map(_task, *zip(*args)) if args else iter(())
        for k, text in zip(todo, results):
            records[k] = json.loads(text)
            _report(progress, records[k])
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: a forked child would inherit whatever LAMMPS/MPI state the parent holds
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            for k, text in zip(todo, pool.map(_task, *zip(*args))):
                records[k] = json.loads(text)
                _report(progress, records[k])
    return records


def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


def _task(conf_json: str, relax_cfg_json: str, cache_dir: str, potential_cache_dir: str | None) -> str:
    conf = CrystalConfiguration.from_dict(json.loads(conf_json))
    result = relax_configuration(conf, cache_dir, RelaxationConfig.from_json(relax_cfg_json), potential_cache_dir)
    return json.dumps({**result.record, "from_cache": result.from_cache})


def _report(progress: bool, record: dict) -> None:
    if progress:
        c = record["configuration"]
        print(json.dumps({"index": c["index"], "element": c["element"], "kind": c["kind"], "mode": c["position_mode"],
                          "atoms": record["n_atoms"], "cg_iterations": record["cg_iterations"], "state": record["state"],
                          "hcp": record["cna_final"]["hcp"], "width": record.get("stacking_fault_width_angstrom"),
                          "seconds": record["seconds_total"]}), flush=True)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BadMessage(message)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m defectscope.training.relax",
                                description="Relax the first N configurations of a simulator config (cached, resumable) "
                                            "and write their records and timings.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--n", type=int, help="configurations 0 .. N-1")
    which.add_argument("--index", type=int, action="append", help="this configuration (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None, help="simulator config file (JSON/TOML); default: the built-in paper mix")
    p.add_argument("--cache-dir", required=True, help="where relaxed configurations go (outside the repository)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default=None, help="write the records and a timing summary here (JSON)")
    defaults = RelaxationConfig()
    p.add_argument("--energy-tolerance", type=float, default=defaults.energy_tolerance)
    p.add_argument("--force-tolerance", type=float, default=defaults.force_tolerance_ev_per_angstrom, help="eV/Å")
    p.add_argument("--max-iterations", type=int, default=defaults.max_iterations)
    args = p.parse_args(argv)
    relax_cfg = RelaxationConfig(energy_tolerance=args.energy_tolerance, force_tolerance_ev_per_angstrom=args.force_tolerance,
                                 max_iterations=args.max_iterations, max_evaluations=max(defaults.max_evaluations,
                                                                                         10 * args.max_iterations))
    from defectscope.training.sim_config import load_config

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = load_config(args.config) if args.config else SimulationConfig()
    confs = simulator_configurations(cfg, args.seed, args.index if args.index else range(args.n))
    t0 = time.perf_counter()
    records = relax_all(confs, args.cache_dir, relax_cfg, workers=args.workers, progress=True)
    wall = time.perf_counter() - t0
    fresh = [r for r in records if not r.get("from_cache")]
    summary = {
        "command": " ".join(["python -m defectscope.training.relax", *(argv if argv is not None else sys.argv[1:])]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg(),
        "stopping_rule": relax_cfg.stopping_rule(), "workers": args.workers, "wall_seconds": round(wall, 1), "relaxed_now": len(fresh), "from_cache": len(records) - len(fresh),
        "seconds_per_configuration": round(float(np.mean([r["seconds_total"] for r in fresh])), 2) if fresh else None,
        "atoms_mean": round(float(np.mean([r["n_atoms"] for r in records]))) if records else None,
        "records": records,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
