"""How well each handle on a map's sampling works, and the central-peak ratio ``prepare`` uses.

    python -m defectscope.training.sampling_calibration [--configurations 60] [--out docs/eval/sampling_estimators.json]

- Simulated maps (the simulator's default crystals, every class, counting noise): the central-peak width in
  voxels over the true oversampling per axis (its median on defect-free crystals is
  ``PipelineConfig.central_peak_ratio``), and both handles' estimate over the truth, by class.
- Measured data (``../shared/data``, skipped when absent): the crystal extent in nm each handle gives on the
  same scan gridded at 1x, 2x and 3x the server's voxel. The extent does not depend on the grid, so a handle
  that works gives the same nm on every grid (an independent phase retrieval of the 34-ID-C scan puts that
  crystal at roughly 300-400 nm).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from defectscope.preprocessing.config import PipelineConfig
from defectscope.preprocessing.oversampling import autocorrelation_oversampling, central_peak_width, crystal_extent_nm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "eval" / "sampling_estimators.json"


def _quantiles(x) -> dict:
    x = np.asarray(x, dtype=float).ravel()
    x = x[np.isfinite(x)]
    return {"median": round(float(np.median(x)), 4), "p10": round(float(np.percentile(x, 10)), 4),
            "p90": round(float(np.percentile(x, 90)), 4), "n": int(x.size)}


def simulated(n_configurations: int, seed: int = 5) -> dict:
    from defectscope.training.sim_config import CLASSES, SimulationConfig
    from defectscope.training.simulator import simulate_configuration

    cfg = SimulationConfig(orientations_per_configuration=5)
    config = PipelineConfig(oversampling_target=None)
    rows = {c: {"width_ratio": [], "central_peak": [], "autocorrelation": []} for c in CLASSES}
    for i in range(n_configurations):
        r = simulate_configuration(cfg, seed, i)
        for counts, true, label in zip(r.counts, r.params["oversampling"], r.params["label"]):
            m = counts.astype(np.float32)
            width, _ = central_peak_width(m)
            row = rows[CLASSES[int(label)]]
            row["width_ratio"].append(width / true)
            row["central_peak"].append(width / config.central_peak_ratio / true)
            row["autocorrelation"].append(autocorrelation_oversampling(m)[0] / true)
    return {c: {k: _quantiles(v) for k, v in r.items()} for c, r in rows.items()}


def measured() -> dict:
    from defectscope.preprocessing.centring import crop_pad
    from defectscope.training.invariance import datasets

    config = PipelineConfig()
    out = {}
    for name, variants in datasets().items():
        if name not in ("aps34idc", "sixs"):
            continue
        for variant, volume, voxel in variants:
            if "gridded" not in variant or "shifted" in variant:
                continue
            peak = np.unravel_index(int(np.argmax(volume)), volume.shape)
            window = crop_pad(np.asarray(volume, np.float32), peak, config.shape)
            width, info = central_peak_width(window)
            central = np.where(info["resolved"], width / config.central_peak_ratio, np.nan)
            extent = crystal_extent_nm(central, voxel)
            auto, floors = autocorrelation_oversampling(window)
            out[variant] = {
                "voxel_size_inv_angstrom": voxel,
                # None: the central peak is not resolved on that axis (the grid is too coarse for this crystal).
                "central_peak": {"oversampling": [None if np.isnan(c) else round(float(c), 3) for c in central],
                                 "resolved": info["resolved"],
                                 "crystal_extent_nm": [None if np.isnan(e) else float(e) for e in extent]},
                "autocorrelation": {"oversampling": np.round(auto, 3).tolist(),
                                    "profile_floor": [round(f, 4) for f in floors],
                                    "crystal_extent_nm": [float(e) for e in crystal_extent_nm(auto, voxel)]},
            }
    return out


def main(argv=None) -> int:
    from defectscope.training.evaluate import write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configurations", type=int, default=60)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    result = {"command": "python -m defectscope.training.sampling_calibration"
                         + (f" --configurations {args.configurations}" if args.configurations != 60 else ""),
              "central_peak_ratio_in_use": PipelineConfig().central_peak_ratio,
              "simulated": simulated(args.configurations), "measured": measured()}
    write_json(result, args.out)
    print(json.dumps(result["simulated"], indent=1))
    for variant, r in result["measured"].items():
        print(f"{variant:28s} central peak {r['central_peak']['crystal_extent_nm']} nm | "
              f"autocorrelation {r['autocorrelation']['crystal_extent_nm']} nm")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
