"""Checks of the realism options (issue #16), written to one JSON file, and the relaxed-vs-unrelaxed figure.

    python -m defectscope.training.realism_checks --config training/configs/realistic_mix.json \\
        --cache-dir /work/data/relax-cache --n 200 --out docs/eval/realism_checks.json --figure docs/relaxed_vs_unrelaxed.png

- ``exact_sum``: NUFFT of a relaxed, strained tiny crystal (relaxed here with LAMMPS) against the direct sum.
- ``coherence``: fringe visibility measured on two-point fringes after ``detector.blur``, against the drawn one.
- ``strain``: recorded phase ranges against the drawn targets, over configurations of the config.
- ``relaxation``: over the configurations among the first ``--n`` whose relaxation is already cached: what
  relaxation made of them (states, fault-ribbon widths per element, escapes by position mode) and how much
  their patterns differ from their unrelaxed twins (R = Σ|I − I_twin| / ΣI_twin and the peak-maximum ratio,
  noiseless, orientation 0, strain and nuisances off, one grid for both).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from defectscope.training import detector, relax, relax_simulator, sampling, simulator, strain
from defectscope.training.conventions import reciprocal_vector_inv_angstrom_cryst
from defectscope.training.diffraction import NufftAmplitude, ReciprocalGrid, direct_amplitude, intensity, nufft_amplitude
from defectscope.training.diffraction import scattering_atoms
from defectscope.training.sim_config import SimulationConfig, load_config

OFF = {"interface_strain_probability": 0.0, "smooth_strain_probability": 0.0}


def exact_sum_error() -> float:
    """max |I_nufft − I_direct| / max I_direct for a relaxed Au screw of 6 cells with both strain fields."""
    base = relax.CrystalConfiguration("Au", 6, 0.95, (1, 1, 1), 0.7)
    centre = relax.ideal_sites_half_a(base).mean(axis=0) / 2.0 + np.array([0.13, 0.21, -0.17])
    conf = relax.CrystalConfiguration("Au", 6, 0.95, (1, 1, 1), 0.7, "screw", "CD", tuple(centre))
    with tempfile.TemporaryDirectory() as tmp:
        atoms = relax_simulator.atoms_of(conf, tmp, relax.RelaxationConfig())
    r = atoms.crystal.positions_angstrom
    g = reciprocal_vector_inv_angstrom_cryst((1, -1, 1), atoms.crystal.element.lattice_a_angstrom)
    draw = strain.draw_strain(np.random.default_rng(0), SimulationConfig(interface_strain_probability=1.0,
                                                                         smooth_strain_probability=1.0))
    u = atoms.displacement_angstrom + strain.strain_field(r, g, draw, (1, 1, 1), 0.44)[0]
    frame = np.array([[1, -1, 1], [1, 1, 0], [-1, 1, 2]], dtype=float)
    frame /= np.linalg.norm(frame, axis=1)[:, None]
    grid = ReciprocalGrid(frame, 1.0 / (2.7 * float(np.ptp(r, axis=0).max())), np.array([0.3, -0.2, 0.1]), (12, 14, 10))
    fast = intensity(nufft_amplitude(scattering_atoms(r, u, g), grid))
    exact = intensity(direct_amplitude(r, u, g, grid))
    return float(np.abs(fast - exact).max() / exact.max())


def coherence_visibilities(visibilities=(0.5, 0.62, 0.75, 0.9, 1.0)) -> list[dict]:
    shape, dq = (32, 8, 8), 1e-3
    d = 4.0 / (shape[0] * dq)
    q = dq * (np.arange(shape[0]) - shape[0] // 2)
    coherent = np.broadcast_to((2.0 + 2.0 * np.cos(2 * np.pi * q * d))[:, None, None], shape).copy()
    rows = []
    for v in visibilities:
        blurred = detector.blur(coherent, detector.NuisanceDraw((v, 1.0, 1.0), 0.0, (), 0.0, (), (), False),
                                np.full(3, d), dq)
        rows.append({"drawn": v, "measured": round(float((blurred.max() - blurred.min()) / (blurred.max() + blurred.min())), 12)})
    return rows


def strain_ranges(cfg: SimulationConfig, seed: int, n: int) -> dict:
    worst = 0.0
    cfg = cfg.replace(interface_strain_probability=1.0, smooth_strain_probability=1.0, relaxed_fraction=0.0)
    for i in range(n):
        built = simulator.build_configuration(cfg, seed, simulator.plan_configuration(cfg, seed, i))
        draw = strain.draw_strain(simulator.rng_for(seed, simulator.STREAM_STRAIN, i), cfg)
        worst = max(worst, abs(built.strain["interface_phase_range_rad"] - draw.interface_phase_range_rad),
                    abs(built.strain["smooth_phase_range_rad"] - draw.smooth_phase_range_rad))
    return {"configurations": n, "max_abs_difference_rad": worst}


def relaxed_and_twin(cfg: SimulationConfig, seed: int, index: int, nufft: NufftAmplitude) -> tuple[np.ndarray, np.ndarray, dict]:
    """Noiseless orientation-0 patterns of the relaxed configuration and its twin, on the twin's grid."""
    cfg = cfg.replace(**OFF)
    plan = simulator.plan_configuration(cfg, seed, index)
    relaxed = simulator.build_configuration(cfg, seed, plan, relaxed=True)
    twin = simulator.build_configuration(cfg.replace(relaxed_twin=True), seed, plan, relaxed=True)
    draw_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(simulator.STREAM_ORIENTATION, index, 0)).spawn(1)[0])
    grid, _ = simulator.orientation_grid(twin, sampling.draw_orientation(draw_rng, cfg, cfg.shape), cfg.shape)
    return intensity(nufft(relaxed.atoms, grid)), intensity(nufft(twin.atoms, grid)), relaxed.relaxation.record


def relaxation_summary(cfg: SimulationConfig, seed: int, n: int, cache_dir) -> tuple[dict, list]:
    cfg = cfg.replace(relax_cache_dir=str(cache_dir))
    relax_cfg = cfg.relaxation_config()
    nufft = NufftAmplitude(cfg.shape, eps=cfg.nufft_eps)
    rows, examples = [], {}
    for i in range(n):
        plan = simulator.plan_configuration(cfg, seed, i)
        conf = relax.configuration_from_plan(cfg, seed, plan)
        if relax.load_cached(conf, cache_dir, relax_cfg) is None:
            continue
        i_relaxed, i_twin, record = relaxed_and_twin(cfg, seed, i, nufft)
        rows.append({"index": i, "element": plan.element, "kind": plan.kind, "mode": plan.position_mode,
                     "state": record["state"], "width_angstrom": record.get("stacking_fault_width_angstrom"),
                     "cg_iterations": record["cg_iterations"],
                     "r": float(np.abs(i_relaxed - i_twin).sum() / i_twin.sum()),
                     "peak_ratio": float(i_relaxed.max() / i_twin.max())})
        examples.setdefault(plan.kind, (plan, i_relaxed, i_twin))
    return _summarise(rows), [examples[k] for k in ("defect_free", "screw", "edge") if k in examples]


def _summarise(rows: list[dict]) -> dict:
    by_kind, widths, escapes = defaultdict(list), defaultdict(list), defaultdict(Counter)
    for r in rows:
        by_kind[r["kind"]].append(r)
        if r["width_angstrom"] is not None:
            widths[r["element"]].append(r["width_angstrom"])
        if r["kind"] != "defect_free":
            escapes[r["mode"]][r["state"]] += 1
    stats = lambda v: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4)}  # noqa: E731
    return {
        "configurations": len(rows),
        "states": dict(Counter(r["state"] for r in rows)),
        "states_by_position_mode": {m: dict(c) for m, c in escapes.items()},
        "stacking_fault_width_angstrom_median": {e: round(float(np.median(w)), 2) for e, w in sorted(widths.items())},
        "cg_iterations": stats([r["cg_iterations"] for r in rows]) if rows else None,
        "r_relaxed_vs_twin": {k: stats([r["r"] for r in v]) for k, v in sorted(by_kind.items())},
        "peak_max_relaxed_over_twin": {k: stats([r["peak_ratio"] for r in v]) for k, v in sorted(by_kind.items())},
        "rows": rows,
    }


def plot(examples, out_path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(examples), 2, figsize=(7, 3.3 * len(examples)), constrained_layout=True, squeeze=False)
    for row, (plan, relaxed, twin) in enumerate(examples):
        top = float(twin.max())
        for col, (name, pattern) in enumerate((("unrelaxed twin", twin), ("relaxed", relaxed))):
            centre = pattern.shape[1] // 2
            axes[row, col].imshow(np.log10(np.maximum(pattern[:, :, centre] / top, 1e-6)), vmin=-6, vmax=0, origin="lower")
            axes[row, col].set_title(f"#{plan.index} {plan.element} {plan.kind} {plan.position_mode}: {name}", fontsize=8)
            axes[row, col].set_xlabel("q_perp1")
            axes[row, col].set_ylabel("q_par")
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return Path(out_path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m defectscope.training.realism_checks", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="training/configs/realistic_mix.json")
    p.add_argument("--cache-dir", required=True, help="relaxation cache (only configurations already there are used)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=200, help="configurations 0 .. n-1 looked up in the cache")
    p.add_argument("--out", required=True)
    p.add_argument("--figure", default=None)
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    summary, examples = relaxation_summary(cfg, args.seed, args.n, args.cache_dir)
    result = {"command": " ".join(["python -m defectscope.training.realism_checks", *(argv or sys.argv[1:])]),
              "exact_sum_relative_error": exact_sum_error(), "coherence_visibility": coherence_visibilities(),
              "strain_phase_ranges": strain_ranges(cfg, args.seed, 8), "relaxation": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.figure and examples:
        plot(examples, args.figure)
    print(json.dumps({k: v for k, v in result.items() if k != "relaxation"}))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
