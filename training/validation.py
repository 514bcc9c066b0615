"""Physics checks of the simulator against the paper, as functions (tests and reports call them).

- ``invisibility_r``: R = Σ|I - I0| / Σ I0 between a dislocated crystal and the same crystal without the
  dislocation, on the same grid.
- ``peak_maximum_ratios``: max I of a dislocated crystal / max I of the same crystal without it
  (supplement Fig. 15: Au small crystals, CD screw 38.1 ± 7.8 %, CD edge 43.2 ± 9.2 %, RPD screw
  45.4 ± 11.6 %, RPD edge 49.8 ± 13.0 %).

``python -m defectscope.training.validation --n 50 --large --out benchmarks/out/sim_validation.json`` prints
every acceptance figure (NUFFT vs direct sum, invisibility R, ring centre, peak maxima next to the paper's)
and writes them to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from defectscope.errors import BadMessage
from defectscope.training import crystals, dislocations, sampling, simulator
from defectscope.training.conventions import canonical_axes, reciprocal_vector_inv_angstrom_cryst
from defectscope.training.diffraction import NufftAmplitude, ReciprocalGrid, intensity, scattering_atoms
from defectscope.training.sim_config import SimulationConfig

# Supplement Fig. 15 (Au, small crystals): mean and standard deviation of max I / max I_defect-free, %.
PAPER_PEAK_MAXIMA_PERCENT = {
    ("screw", "CD"): (38.1, 7.8),
    ("edge", "CD"): (43.2, 9.2),
    ("screw", "RPD"): (45.4, 11.6),
    ("edge", "RPD"): (49.8, 13.0),
}


def pattern(crystal: crystals.Crystal, dislocation, hkl, oversampling: float = 3.0, rotation_rad: float = 0.0,
            shift_voxels=(0.0, 0.0, 0.0), shape=(64, 64, 64), nufft: NufftAmplitude | None = None) -> np.ndarray:
    """Noiseless intensity of ``crystal`` (with ``dislocation`` or None) at reflection ``hkl``.

    The voxel size gives ``oversampling`` along the defect-free crystal's largest canonical extent, so
    patterns of the same crystal with and without a dislocation share one grid.
    """
    g = reciprocal_vector_inv_angstrom_cryst(hkl, crystal.element.lattice_a_angstrom)
    u = dislocations.displacement_angstrom(crystal.positions_angstrom, dislocation)
    atoms = scattering_atoms(crystal.positions_angstrom, u, g)
    frame = canonical_axes(g, rotation_rad)
    extent = sampling.canonical_extent_angstrom(frame, (crystal.positions_angstrom - crystal.centre_angstrom).T)
    grid = ReciprocalGrid(frame, sampling.voxel_size_for_oversampling(oversampling, extent),
                          np.asarray(shift_voxels, dtype=float), tuple(shape))
    return intensity((nufft or NufftAmplitude(shape))(atoms, grid))


def invisibility_r(crystal: crystals.Crystal, dislocation, hkl, **kwargs) -> float:
    """R = Σ|I - I0| / Σ I0 against the defect-free crystal of the same shape."""
    with_defect = pattern(crystal, dislocation, hkl, **kwargs)
    without = pattern(crystal, None, hkl, **kwargs)
    return float(np.abs(with_defect - without).sum() / without.sum())


def peak_maximum_ratio(cfg: SimulationConfig, seed: int, index: int, nufft: NufftAmplitude | None = None) -> dict:
    """max I / max I_defect-free for dataset configuration ``index`` (its first orientation's rotation and
    oversampling, no sub-pixel shift: the defect-free maximum then sits exactly on a voxel)."""
    plan = simulator.plan_configuration(cfg, seed, index)
    built = simulator.build_configuration(cfg, seed, plan)
    draw_rng = np.random.default_rng(np.random.SeedSequence(
        seed, spawn_key=(simulator.STREAM_ORIENTATION, index, 0)).spawn(3)[0])
    draw = sampling.draw_orientation(draw_rng, cfg, cfg.shape)
    nufft = nufft or NufftAmplitude(cfg.shape, eps=cfg.nufft_eps)
    kwargs = dict(oversampling=draw.oversampling_target, rotation_rad=draw.rotation_about_q_rad, shape=cfg.shape,
                  nufft=nufft)
    with_defect = pattern(built.crystal, built.dislocation, plan.reflection_hkl, **kwargs)
    without = pattern(built.crystal, None, plan.reflection_hkl, **kwargs)
    offset = (dislocations.perpendicular_offset_angstrom(built.crystal.centre_angstrom, built.dislocation)
              if built.dislocation is not None else float("nan"))
    return {"index": index, "kind": plan.kind, "mode": plan.position_mode, "element": plan.element,
            "ratio": float(with_defect.max() / without.max()), "offset_angstrom": offset,
            "reflection_hkl": list(plan.reflection_hkl), "n_atoms": built.crystal.n_atoms}


def peak_maximum_ratios(kind: str, mode: str, n: int, seed: int = 0, element: str = "Au", size: str = "small",
                        rpd_radius_fraction: float | None = None) -> list[dict]:
    """Ratios for ``n`` configurations of one kind ("screw"/"edge") and mode ("CD"/"RPD")."""
    weights = {"screw": (0.0, 1.0, 0.0), "edge": (0.0, 0.0, 1.0)}[kind]
    cfg = replace(SimulationConfig(), elements=(element,), sizes=(size,), class_weights=weights,
                  cd_fraction=1.0 if mode == "CD" else 0.0, rpd_radius_fraction=rpd_radius_fraction)
    nufft = NufftAmplitude(cfg.shape, eps=cfg.nufft_eps)
    return [peak_maximum_ratio(cfg, seed, i, nufft) for i in range(n)]


def summarise(rows: list[dict]) -> dict:
    ratios = 100.0 * np.array([r["ratio"] for r in rows])
    return {"n": len(rows), "mean_percent": float(ratios.mean()), "std_percent": float(ratios.std(ddof=1)),
            "min_percent": float(ratios.min()), "max_percent": float(ratios.max())}


def nufft_vs_direct(kind: str | None, n_unit_cells: int = 3) -> float:
    """Relative l2 difference of the NUFFT and direct-sum intensities, tiny Pt crystal, rotated and shifted grid."""
    from defectscope.training.diffraction import direct_amplitude, nufft_amplitude

    c = crystals.build_crystal("Pt", n_unit_cells, 0.95, (1, -1, -1), 0.7)
    a = c.element.lattice_a_angstrom
    d = None if kind is None else dislocations.make_dislocation(kind, a, 0.38, c.centre_angstrom + [0.31, 0.22, -0.13])
    u = dislocations.displacement_angstrom(c.positions_angstrom, d)
    g = reciprocal_vector_inv_angstrom_cryst((1, -1, 1), a)
    grid = ReciprocalGrid(canonical_axes(g, 0.7), 1.0 / (2.5 * np.ptp(c.positions_angstrom, axis=0).max()),
                          np.array([0.3, -0.2, 0.45]))
    reference = intensity(direct_amplitude(c.positions_angstrom, u, g, grid))
    fast = intensity(nufft_amplitude(scattering_atoms(c.positions_angstrom, u, g), grid, eps=SimulationConfig().nufft_eps))
    return float(np.linalg.norm(fast - reference) / np.linalg.norm(reference))


def invisibility_table(size: str = "small", seed: int = 3) -> list[dict]:
    """R of a near-centred screw at every {111} reflection, for two interface planes (Au)."""
    rng = np.random.default_rng(seed)
    rows = []
    for normal in [(1, 1, -1), (-1, 1, 1)]:
        c = crystals.build_crystal("Au", crystals.SIZES[size], 0.95, normal, 0.7)
        d = dislocations.make_dislocation("screw", c.element.lattice_a_angstrom, 0.44, c.centre_angstrom + rng.normal(0, 3, 3))
        for hkl in crystals.INTERFACE_NORMALS:
            rows.append({"size": size, "interface_normal": list(normal), "reflection_hkl": list(hkl),
                         "g_dot_b": simulator.g_dot_b(hkl), "R": invisibility_r(c, d, hkl, oversampling=3.0)})
    return rows


def ring_centre_fraction() -> float:
    """Centre / max of the pattern of an untruncated Au particle with a centred screw at g = (2-20) ∥ b."""
    c = crystals.build_crystal("Au", 40, 0.95)
    d = dislocations.make_dislocation("screw", c.element.lattice_a_angstrom, 0.44, c.centre_angstrom)
    i = pattern(c, d, (2, -2, 0), oversampling=3.0, rotation_rad=0.2)
    return float(i[32, 32, 32] / i.max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="The simulator's acceptance figures (NUFFT accuracy, invisibility, "
                                                 "ring, peak maxima of supplement Fig. 15)")
    parser.add_argument("--n", type=int, default=50, help="configurations per kind and mode for the peak maxima")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--element", default="Au")
    parser.add_argument("--size", default="small")
    parser.add_argument("--large", action="store_true", help="also the invisibility table of large crystals (slower)")
    parser.add_argument("--rpd-radius-fraction", type=float, action="append", default=[],
                        help="also the RPD peak maxima with lines within this fraction of the lateral size from "
                             "the centre (SimulationConfig.rpd_radius_fraction); repeatable")
    parser.add_argument("--only-peak-maxima", action="store_true", help="skip the NUFFT, invisibility and ring checks")
    parser.add_argument("--out", help="JSON file for the figures")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error(f"--n must be at least 2 (the figures are a mean and a spread), got {args.n}")
    for r in args.rpd_radius_fraction:
        try:
            SimulationConfig(rpd_radius_fraction=r)
        except BadMessage as exc:
            parser.error(str(exc))
    report: dict = {"simulator_version": simulator.SIMULATOR_VERSION, "seed": args.seed}

    if not args.only_peak_maxima:
        _geometry_checks(report, args.large)
    report["peak_maxima"] = {"element": args.element, "size": args.size, "groups": []}
    runs = [(kind, mode, None) for kind, mode in PAPER_PEAK_MAXIMA_PERCENT]
    runs += [(kind, "RPD", r) for r in args.rpd_radius_fraction for kind in ("screw", "edge")]
    for kind, mode, radius in runs:
        paper_mean, paper_std = PAPER_PEAK_MAXIMA_PERCENT[(kind, mode)]
        t0 = time.perf_counter()
        summary = summarise(peak_maximum_ratios(kind, mode, args.n, args.seed, args.element, args.size, radius))
        summary.update(kind=kind, mode=mode, rpd_radius_fraction=radius, paper_mean_percent=paper_mean,
                       paper_std_percent=paper_std,
                       within_one_paper_sd=bool(abs(summary["mean_percent"] - paper_mean) <= paper_std),
                       seconds=round(time.perf_counter() - t0, 1))
        report["peak_maxima"]["groups"].append(summary)
        where = "" if radius is None else f" r<={radius:g}"
        print(f"peak maxima {mode:>3}{where} {kind:<5}: {summary['mean_percent']:5.1f} ± {summary['std_percent']:4.1f} %"
              f"  (paper {paper_mean} ± {paper_std} %, n={summary['n']})", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _geometry_checks(report: dict, large: bool) -> None:
    report["nufft_vs_direct_relative_l2"] = {str(k): nufft_vs_direct(k) for k in (None, "screw", "edge")}
    print("NUFFT vs direct sum (relative l2 of I): " + ", ".join(
        f"{k}: {v:.1e}" for k, v in report["nufft_vs_direct_relative_l2"].items()), flush=True)

    report["invisibility"] = invisibility_table("small") + (invisibility_table("large") if large else [])
    for size in ("small", "large") if large else ("small",):
        rows = [r for r in report["invisibility"] if r["size"] == size]
        zero = [r["R"] for r in rows if r["g_dot_b"] == 0]
        nonzero = [r["R"] for r in rows if r["g_dot_b"] != 0]
        print(f"invisibility ({size}): g·b = 0: R = {min(zero):.3f} .. {max(zero):.3f}; "
              f"g·b != 0: R = {min(nonzero):.2f} .. {max(nonzero):.2f}", flush=True)

    report["ring_centre_over_max"] = ring_centre_fraction()
    print(f"ring (centred screw, g = (2-20) ∥ b, free particle): centre / max = {report['ring_centre_over_max']:.4f}",
          flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
