"""What detector-frame sampling does to a pattern, and what it costs, per beamline preset.

    OMP_NUM_THREADS=1 python -m defectscope.training.detector_frame_check --n 6 --out docs/eval/detector_frame.json

For configurations 0 .. n-1 of the config (unrelaxed, strain and nuisances off, noiseless, orientation 0),
each preset's scan at the two ends and the middle of ``detector_frame_rocking_ratio_range`` (log scale):
the gridded pattern against the orthonormal pattern of the same crystal on the grid where its peak landed
(R = Σ|I − I_orth| / ΣI_orth after both are scaled to unit sum; peak-maximum ratio; centre-of-mass shift in
voxels), voxels no pixel reached, pixels per voxel, the equivalent measured crystal size, and seconds per pattern
(one core, the NUFFT and the gridding together) against the orthonormal NUFFT's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from defectscope.training import detector_frame, sampling, simulator
from defectscope.training.diffraction import NufftAmplitude, ReciprocalGrid, intensity
from defectscope.training.sim_config import load_config


def _centre_of_mass(volume: np.ndarray) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij", sparse=True)
    return np.array([float((g * volume).sum() / volume.sum()) for g in grids])


def compare(cfg, seed: int, index: int, draw: detector_frame.DetectorFrameDraw, nufft: NufftAmplitude) -> dict:
    built = simulator.build_configuration(cfg, seed, simulator.plan_configuration(cfg, seed, index), relaxed=False)
    draw_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(simulator.STREAM_ORIENTATION, index, 0)).spawn(1)[0])
    grid, extent = simulator.orientation_grid(built, sampling.draw_orientation(draw_rng, cfg, cfg.shape), cfg.shape)
    start = time.perf_counter()
    sampled = detector_frame.sample_pattern(built.atoms, grid, extent, draw, built.crystal.element.lattice_a_angstrom,
                                            built.plan.reflection_hkl, cfg.nufft_eps)
    seconds = time.perf_counter() - start
    landed = ReciprocalGrid(grid.frame_axes, grid.dq_inv_angstrom_cryst, sampled.shift_voxels, grid.shape)
    start = time.perf_counter()
    ideal = intensity(nufft(built.atoms, landed))
    orthonormal_seconds = time.perf_counter() - start
    gridded = sampled.intensity
    r = float(np.abs(gridded / gridded.sum() - ideal / ideal.sum()).sum())
    com = float(np.linalg.norm(_centre_of_mass(gridded) - _centre_of_mass(ideal)))
    record = sampled.record
    return {"index": index, "element": built.plan.element, "kind": built.plan.kind, "preset": draw.preset,
            "rocking_ratio": round(draw.rocking_ratio, 4), "r": round(r, 4),
            "peak_ratio": round(float(gridded.max() / ideal.max()), 4), "centre_of_mass_shift_voxels": round(com, 4),
            "empty_voxels": record["detector_frame_empty_voxels"],
            "pixels_per_voxel": round(record["detector_frame_pixels_per_voxel"], 3),
            "scan_shape": [int(v) for v in record["detector_frame_scan_shape"]],
            "raw_oversampling": [round(float(v), 3) for v in record["detector_frame_raw_oversampling"]],
            "equivalent_extent_nm": round(record["detector_frame_equivalent_extent_nm"], 1),
            "seconds": round(seconds, 3), "orthonormal_seconds": round(orthonormal_seconds, 3)}


def summarise(rows: list[dict]) -> dict:
    by_preset = defaultdict(list)
    for row in rows:
        by_preset[row["preset"]].append(row)
    stats = lambda v: {"mean": round(float(np.mean(v)), 4), "min": round(float(np.min(v)), 4),
                       "max": round(float(np.max(v)), 4)}
    keys = ("r", "peak_ratio", "centre_of_mass_shift_voxels", "pixels_per_voxel", "equivalent_extent_nm", "seconds")
    out = {p: {k: stats([r[k] for r in v]) for k in keys} for p, v in sorted(by_preset.items())}
    out["all"] = {k: stats([r[k] for r in rows]) for k in (*keys, "orthonormal_seconds")}
    out["all"]["empty_voxels_max"] = int(max(r["empty_voxels"] for r in rows))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m defectscope.training.detector_frame_check", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="training/configs/realistic_mix.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=6, help="configurations 0 .. n-1")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cfg = load_config(args.config).replace(interface_strain_probability=0.0, smooth_strain_probability=0.0)
    lo, hi = cfg.detector_frame_rocking_ratio_range
    ratios = (lo, math.sqrt(lo * hi), hi)
    nufft = NufftAmplitude(cfg.shape, eps=cfg.nufft_eps)
    rows = [compare(cfg, args.seed, i, detector_frame.DetectorFrameDraw(True, preset, ratios[(i + k) % 3]), nufft)
            for i in range(args.n) for k, preset in enumerate(cfg.detector_frame_presets)]
    result = {"command": " ".join(["python -m defectscope.training.detector_frame_check", *(argv or sys.argv[1:])]),
              "config": args.config, "rocking_ratios": [round(v, 4) for v in ratios], "summary": summarise(rows),
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"]["all"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
