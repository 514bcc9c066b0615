"""Physics checks of relaxed configurations: peak maxima, dissociation, escapes, invisibility, stopping rule.

    OMP_NUM_THREADS=1 python -m defectscope.training.physics_checks --config training/configs/realistic_mix.json \\
        --cache-dir /work/data/relax-cache --counterpart-cache-dir /work/data/relax-cache-checks --n 200 \\
        --stop-cache-dir /tmp/defectscope-relax-timing --out docs/eval/physics_checks.json

Over the dislocated configurations among the first ``--n`` of the config whose relaxation is cached (nothing
dislocated is relaxed here), each against the *relaxed defect-free crystal of the same shape* (its counterpart,
relaxed here when missing, one process, into ``--counterpart-cache-dir``); noiseless patterns, the configuration's
reflection, orientation 0's rotation and oversampling, no shift, one grid for all (strain fields off):

- ``peak_maxima``: max I / max I_defect-free per kind, position mode and element, beside supplement Fig. 15 (Au);
  the same for the unrelaxed (Volterra) line against the unrelaxed perfect crystal, for reference.
- ``dissociation``: partial separation (fault-ribbon width + a√3/4) against the isotropic elastic estimate from
  the potential's stacking-fault energy (``elastic_partial_separation_angstrom``).
- ``escapes``: what became of RPD and CD lines, by distance from the line to the surface.
- ``invisibility``: CD screws at a g·b = 0 reflection, R = Σ|I − I_free| / ΣI_free relaxed (the residual partials
  and relaxation leave) and unrelaxed, beside R at the configuration's visible reflection.
- ``stopping_rule``: the configurations of ``docs/eval/relax_force_stop.json`` relaxed with the paper's energy
  tolerance and with that file's force-tolerance rule (from ``--stop-cache-dir``; relaxed when missing): states,
  ribbon widths and R between the two relaxed patterns.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from defectscope.training import relax, relax_simulator, sampling, simulator
from defectscope.training.conventions import canonical_axes, reciprocal_vector_inv_angstrom_cryst
from defectscope.training.diffraction import NufftAmplitude, ReciprocalGrid, intensity, scattering_atoms
from defectscope.training.sim_config import load_config
from defectscope.training.validation import PAPER_PEAK_MAXIMA_PERCENT

REPO = Path(__file__).resolve().parents[1]
# Isotropic (polycrystal, Hill-average) shear moduli at room temperature, GPa: Hirth & Lothe, Theory of
# Dislocations (2nd ed.), Table in Appendix / Simmons & Wang single-crystal data averaged. The potentials are
# fitted to these elements' elastic constants; the estimate uses the potential's own lattice constant and SFE.
SHEAR_MODULUS_GPA = {"Al": 26.1, "Ag": 30.3, "Au": 27.0, "Pt": 61.0}


def elastic_partial_separation_angstrom(lattice_a_angstrom: float, sfe_mj_m2: float, shear_modulus_gpa: float,
                                        poisson_ratio: float, beta_deg: float) -> float:
    """Equilibrium separation of two a/6<112> Shockley partials in an infinite isotropic crystal (Hirth & Lothe
    eq. 10-20): d = μ b_p² / (8π γ) · (2 − ν)/(1 − ν) · (1 − 2ν cos 2β / (2 − ν)), β the angle between the total
    Burgers vector and the line (0: screw, 90°: edge)."""
    b_p = lattice_a_angstrom * 1e-10 / math.sqrt(6.0)
    nu, beta = poisson_ratio, math.radians(beta_deg)
    d = shear_modulus_gpa * 1e9 * b_p**2 / (8.0 * math.pi * sfe_mj_m2 * 1e-3)
    return 1e10 * d * (2.0 - nu) / (1.0 - nu) * (1.0 - 2.0 * nu * math.cos(2.0 * beta) / (2.0 - nu))


def defect_free_counterpart(conf: relax.CrystalConfiguration) -> relax.CrystalConfiguration:
    """The same particle (same sites) without the dislocation."""
    return relax.CrystalConfiguration(conf.element, conf.n_unit_cells, conf.surface_energy_ratio, conf.interface_normal,
                                      conf.truncation_fraction, index=conf.index)


def line_to_surface_angstrom(atoms: relax_simulator.RelaxedAtoms) -> float:
    """How deep the inserted line runs: the largest distance to the nearest surface site of its points inside the
    particle (a line crosses two surfaces; one near a side facet stays shallow all along)."""
    from scipy.spatial import cKDTree

    x = atoms.crystal.positions_angstrom
    sites = np.rint(x / (atoms.crystal.element.lattice_a_angstrom / 2.0)).astype(np.int32)
    surface = cKDTree(x[relax.depth_below_surface_a(sites) == 0.0])
    d = atoms.dislocation
    span = float(np.ptp(x, axis=0).max())
    points = d.position_angstrom + np.outer(np.arange(-span, span, 1.0), d.line_direction)
    near_atoms, _ = cKDTree(x).query(points)
    inside = points[near_atoms < atoms.crystal.element.lattice_a_angstrom]  # on the line and within the particle
    return float(surface.query(inside)[0].max()) if len(inside) else 0.0


class PatternMaker:
    """Noiseless patterns of several displacement fields of one particle on one grid."""

    def __init__(self, shape, eps: float):
        self.nufft = NufftAmplitude(shape, eps=eps)
        self.shape = tuple(shape)

    def grid(self, positions_angstrom, hkl, a: float, rotation_rad: float, oversampling: float) -> ReciprocalGrid:
        g = reciprocal_vector_inv_angstrom_cryst(hkl, a)
        frame = canonical_axes(g, rotation_rad)
        extent = sampling.canonical_extent_angstrom(frame, (positions_angstrom - positions_angstrom.mean(axis=0)).T)
        return ReciprocalGrid(frame, sampling.voxel_size_for_oversampling(oversampling, extent), np.zeros(3), self.shape)

    def __call__(self, positions_angstrom, displacement_angstrom, hkl, a: float, grid: ReciprocalGrid) -> np.ndarray:
        g = reciprocal_vector_inv_angstrom_cryst(hkl, a)
        return intensity(self.nufft(scattering_atoms(positions_angstrom, displacement_angstrom, g), grid))


def _r(pattern: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(pattern - reference).sum() / reference.sum())


def configuration_row(cfg, seed: int, index: int, cache_dir, counterpart_dir, maker: PatternMaker) -> dict | None:
    """Every figure of one cached dislocated configuration (None: not dislocated, or not cached)."""
    relax_cfg = cfg.relaxation_config()
    plan = simulator.plan_configuration(cfg, seed, index)
    conf = relax.configuration_from_plan(cfg, seed, plan)
    if plan.label == 0 or relax.load_cached(conf, cache_dir, relax_cfg) is None:
        return None
    line = relax_simulator.atoms_of(conf, cache_dir, relax_cfg)
    free = relax_simulator.atoms_of(defect_free_counterpart(conf), counterpart_dir, relax_cfg)
    r, a, x = line.record, line.crystal.element.lattice_a_angstrom, line.crystal.positions_angstrom
    draw_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(simulator.STREAM_ORIENTATION, index, 0)).spawn(1)[0])
    draw = sampling.draw_orientation(draw_rng, cfg, cfg.shape)
    row = {"index": index, "element": plan.element, "kind": plan.kind, "mode": plan.position_mode, "state": r["state"],
           "potential": r["potential"]["name"], "cg_iterations": r["cg_iterations"],
           "line_to_surface_angstrom": round(line_to_surface_angstrom(line), 2),
           "line_angle_to_b_deg": r.get("line_angle_to_b_deg"), "character": r.get("character_after_relaxation")}
    for name, hkl in (("visible", plan.reflection_hkl), ("invisible", simulator.INVISIBLE_111[0])):
        if name == "invisible" and plan.kind != "screw":
            continue
        grid = maker.grid(x, hkl, a, draw.rotation_about_q_rad, draw.oversampling_target)
        relaxed, free_relaxed = maker(x, line.displacement_angstrom, hkl, a, grid), maker(x, free.displacement_angstrom, hkl, a, grid)
        volterra, perfect = maker(x, line.volterra_angstrom, hkl, a, grid), maker(x, np.zeros_like(x), hkl, a, grid)
        row[name] = {"reflection_hkl": list(hkl), "g_dot_b": simulator.g_dot_b(hkl),
                     "peak_ratio_relaxed": float(relaxed.max() / free_relaxed.max()),
                     "peak_ratio_unrelaxed": float(volterra.max() / perfect.max()),
                     "r_relaxed": _r(relaxed, free_relaxed), "r_unrelaxed": _r(volterra, perfect)}
    width = r.get("stacking_fault_width_angstrom")
    if width is not None:
        beta = r.get("line_angle_to_b_deg")
        beta = float(beta) if beta is not None else (0.0 if plan.kind == "screw" else 90.0)
        row["partial_separation_angstrom"] = float(width) + a * math.sqrt(3.0) / 4.0
        row["elastic_estimate_angstrom"] = elastic_partial_separation_angstrom(
            a, r["potential"]["sfe_mj_m2"], SHEAR_MODULUS_GPA[plan.element], line.crystal.element.poisson_ratio, beta)
    return row


def _stats(values) -> dict:
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "mean": round(float(v.mean()), 4), "std": round(float(v.std(ddof=1)) if v.size > 1 else 0.0, 4),
            "min": round(float(v.min()), 4), "max": round(float(v.max()), 4)}


def peak_maxima(rows: list[dict]) -> dict:
    groups = defaultdict(list)
    for row in rows:
        groups[(row["kind"], row["mode"], "all")].append(row)
        groups[(row["kind"], row["mode"], row["element"])].append(row)
    out = {}
    for (kind, mode, element), members in sorted(groups.items()):
        paper = PAPER_PEAK_MAXIMA_PERCENT[(kind, mode)]
        out[f"{kind} {mode} {element}"] = {
            "relaxed_percent": _stats(100.0 * m["visible"]["peak_ratio_relaxed"] for m in members),
            "unrelaxed_percent": _stats(100.0 * m["visible"]["peak_ratio_unrelaxed"] for m in members),
            "paper_au_percent": {"mean": paper[0], "std": paper[1]}}
    return out


def dissociation(rows: list[dict]) -> dict:
    groups = defaultdict(list)
    for row in rows:
        if "partial_separation_angstrom" in row:
            groups[f"{row['element']} {row['potential']} {row['kind']}"].append(row)
    return {key: {"measured_angstrom": _stats(m["partial_separation_angstrom"] for m in members),
                  "elastic_estimate_angstrom": _stats(m["elastic_estimate_angstrom"] for m in members),
                  "measured_over_estimate": _stats(m["partial_separation_angstrom"] / m["elastic_estimate_angstrom"]
                                                   for m in members)}
            for key, members in sorted(groups.items())}


ESCAPED = ("left", "fault_across", "one_partial_left")
SURFACE_BANDS_ANGSTROM = ((0.0, 10.0), (10.0, 20.0), (20.0, 40.0), (40.0, 1e9))


def escapes(rows: list[dict]) -> dict:
    out = {}
    for mode in ("CD", "RPD"):
        for lo, hi in SURFACE_BANDS_ANGSTROM:
            members = [r for r in rows if r["mode"] == mode and lo <= r["line_to_surface_angstrom"] < hi]
            if members:
                left = sum(r["state"] in ESCAPED for r in members)
                out[f"{mode} {lo:g}-{hi:g} A"] = {"n": len(members), "escaped": left, "fraction": round(left / len(members), 4),
                                                  "states": dict(sorted(_count(r["state"] for r in members).items()))}
    return out


def _count(items) -> dict:
    counts: dict = defaultdict(int)
    for item in items:
        counts[item] += 1
    return counts


def invisibility(rows: list[dict]) -> dict:
    screws = [r for r in rows if r["kind"] == "screw" and r["mode"] == "CD"]
    return {"n": len(screws),
            "invisible_r_relaxed": _stats(r["invisible"]["r_relaxed"] for r in screws),
            "invisible_r_unrelaxed": _stats(r["invisible"]["r_unrelaxed"] for r in screws),
            "visible_r_relaxed": _stats(r["visible"]["r_relaxed"] for r in screws),
            "by_element": {e: _stats(r["invisible"]["r_relaxed"] for r in screws if r["element"] == e)
                           for e in sorted({r["element"] for r in screws})}}


def stopping_rule(stop_cache_dir, maker: PatternMaker, records_file=REPO / "docs" / "eval" / "relax_force_stop.json") -> dict:
    """Energy tolerance 1e-6 against the force-tolerance rule of ``records_file``, on its configurations."""
    spec = json.loads(Path(records_file).read_text())
    force_rule = relax.RelaxationConfig(**spec["stopping_rule"])
    energy_rule = relax.RelaxationConfig()
    rows = []
    for record in spec["records"]:
        conf = relax.CrystalConfiguration.from_dict(record["configuration"])
        by_rule = {name: relax_simulator.atoms_of(conf, stop_cache_dir, rule) for name, rule in
                   (("energy", energy_rule), ("force", force_rule))}
        x, a = by_rule["energy"].crystal.positions_angstrom, by_rule["energy"].crystal.element.lattice_a_angstrom
        hkl = simulator.VISIBLE_111[0]
        grid = maker.grid(x, hkl, a, 0.0, 3.0)
        patterns = {name: maker(x, atoms.displacement_angstrom, hkl, a, grid) for name, atoms in by_rule.items()}
        rows.append({"element": conf.element, "kind": conf.kind, "mode": conf.position_mode,
                     "potential": by_rule["energy"].record["potential"]["name"],
                     **{f"{name}_{key}": atoms.record.get(field) for name, atoms in by_rule.items()
                        for key, field in (("state", "state"), ("cg_iterations", "cg_iterations"),
                                           ("stopped_by", "stopping_criterion"),
                                           ("fault_width_angstrom", "stacking_fault_width_angstrom"))},
                     "r_force_vs_energy": round(_r(patterns["force"], patterns["energy"]), 4),
                     "peak_ratio_force_over_energy": round(float(patterns["force"].max() / patterns["energy"].max()), 4)})
    return {"energy_rule": energy_rule.stopping_rule(), "force_rule": force_rule.stopping_rule(), "rows": rows,
            "state_changed": sum(r["energy_state"] != r["force_state"] for r in rows),
            "r_force_vs_energy": _stats(r["r_force_vs_energy"] for r in rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m defectscope.training.physics_checks", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="training/configs/realistic_mix.json")
    p.add_argument("--cache-dir", required=True, help="relaxation cache of the config's configurations (read only)")
    p.add_argument("--counterpart-cache-dir", required=True, help="where the defect-free counterparts are relaxed")
    p.add_argument("--stop-cache-dir", default=None, help="relaxations of the stopping-rule check (skipped without)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=200, help="configurations 0 .. n-1 looked up in the cache")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cfg = load_config(args.config).replace(interface_strain_probability=0.0, smooth_strain_probability=0.0)
    maker = PatternMaker(cfg.shape, cfg.nufft_eps)
    rows = []
    for i in range(args.n):
        row = configuration_row(cfg, args.seed, i, args.cache_dir, args.counterpart_cache_dir, maker)
        if row is not None:
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("index", "element", "kind", "mode", "state")}), flush=True)
    result = {"command": " ".join(["python -m defectscope.training.physics_checks", *(argv or sys.argv[1:])]),
              "configurations": len(rows), "shear_modulus_gpa": SHEAR_MODULUS_GPA, "peak_maxima": peak_maxima(rows),
              "dissociation": dissociation(rows), "escapes": escapes(rows), "invisibility": invisibility(rows)}
    if args.stop_cache_dir:
        result["stopping_rule"] = stopping_rule(args.stop_cache_dir, maker)
    result["rows"] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "peak_maxima", "dissociation")})[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
