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

This module runs the procedure and the batches (and ``python -m defectscope.training.relax``); the parts
live beside it: ``relax_config`` (the inputs), ``relax_cache`` (the files), ``relax_lammps`` (the
minimisation), ``relax_analysis`` (what became of the dislocation). Their public names are importable
from here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from defectscope.training import dislocations, potentials
from defectscope.training.relax_analysis import CNA_NAMES, INTERIOR_DEPTH_A, analyse_defect, depth_below_surface_a
from defectscope.training.relax_cache import (
    RELAX_VERSION,
    RelaxedConfiguration,
    cache_key,
    cache_path,
    load_cached,
    save,
)
from defectscope.training.relax_config import (
    SCHEMA_VERSION,
    CrystalConfiguration,
    RelaxationConfig,
    configuration_from_plan,
    dislocation_at,
    ideal_sites_half_a,
    simulator_configurations,
)
from defectscope.training.relax_lammps import minimise
from defectscope.training.sim_config import SimulationConfig

__all__ = [
    "CNA_NAMES", "INTERIOR_DEPTH_A", "RELAX_VERSION", "SCHEMA_VERSION", "CrystalConfiguration", "RelaxationConfig",
    "RelaxedConfiguration", "analyse_defect", "cache_key", "configuration_from_plan", "depth_below_surface_a",
    "dislocation_at", "ideal_sites_half_a", "load_cached", "main", "minimise", "relax_all", "relax_configuration",
    "simulator_configurations",
]


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
    save(cache_path(cache_dir, cache_key(conf, potential, relax_cfg)), sites, displacement, cna_final, record)
    return RelaxedConfiguration(conf, a, sites, displacement, cna_final, record, from_cache=False)


def _cna_counts(cna: np.ndarray) -> dict:
    counts = np.bincount(np.minimum(cna.astype(np.int64), 5), minlength=6)
    return {"fcc": int(counts[1]), "hcp": int(counts[2]), "bcc": int(counts[3]), "icosahedral": int(counts[4]),
            "other": int(counts[0] + counts[5])}


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
    p.add_argument("--only-drawn-relaxed", action="store_true",
                   help="only the configurations the config builds relaxed (its relaxed_fraction draw)")
    p.add_argument("--out", default=None, help="write the records and a timing summary here (JSON)")
    p.add_argument("--energy-tolerance", type=float, default=None, help="default: the config's (paper: 1e-6)")
    p.add_argument("--force-tolerance", type=float, default=None, help="eV/Å; default: the config's (0)")
    p.add_argument("--max-iterations", type=int, default=None, help="default: the config's (2000)")
    args = p.parse_args(argv)
    from defectscope.training.sim_config import load_config

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = load_config(args.config) if args.config else SimulationConfig()
    # The config's stopping rule and potentials (what ``defectscope simulate`` uses), unless overridden here.
    overrides = {"relax_energy_tolerance": args.energy_tolerance, "relax_force_tolerance_ev_per_angstrom": args.force_tolerance,
                 "relax_max_iterations": args.max_iterations}
    relax_cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None}).relaxation_config()
    indices = args.index if args.index else range(args.n)
    if args.only_drawn_relaxed:
        from defectscope.training.simulator import is_relaxed

        indices = [i for i in indices if is_relaxed(cfg, args.seed, i)]
    confs = simulator_configurations(cfg, args.seed, indices)
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
