"""Which oversampling do real BCDI scans have? From each beamline's geometry, for crystals of 100-500 nm.

    python -m defectscope.training.beamline_sampling [--out docs/eval/beamline_sampling.json]

The server grids a raw scan on isotropic voxels of the scan's natural size (``qspace.natural_grid``: the
finest voxel with no empty one between measured points), so a crystal of extent D is sampled, along every
axis, at oversampling sigma = 2 pi / (dq D) (the Q = 2 pi / d convention). This computes dq from each
preset's geometry with typical settings of its beamline (an Au 111 reflection, the detector in the
scattering plane, the sample rocked through the Bragg angle), and sigma for crystals of 100, 200, 300 and
500 nm, against the trained range of the bundled models (their ``PipelineConfig.oversampling_range``).

The settings are typical values, stated in ``BEAMLINES`` with where they come from; a real scan's own
geometry gives its own figures (every reply reports them: ``preparation.oversampling_per_axis`` and
``crystal_extent_nm``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "eval" / "beamline_sampling.json"
SIZES_NM = (100, 200, 300, 500)
AU_111_D_A = 2.3548  # Au (111) d-spacing in angstrom (a = 4.0786)

# preset -> typical settings: energy (eV), distance (m), rocking step (deg), and which motors put the detector
# at 2 theta in the scattering plane and the sample at theta; with where the values come from.
BEAMLINES = {
    "aps-34idc": {"energy_eV": 9000.0, "distance_m": 0.5, "step_deg": 0.005, "two_theta": "delta", "theta": "theta",
                  "source": "the measured 34-ID-C scan in ../shared/data (9 keV, 0.5 m, theta step 0.005 deg)"},
    "esrf-id01": {"energy_eV": 9000.0, "distance_m": 0.507, "step_deg": 0.01, "two_theta": "delta", "theta": "eta",
                  "source": "bcdi's ID01 example (CXIDB-I182 S11: 9 keV, 0.507 m); eta step 0.01 deg assumed"},
    "petra-p10": {"energy_eV": 8700.0, "distance_m": 1.8, "step_deg": 0.01, "two_theta": "delta", "theta": "om",
                  "source": "P10 Eiger 4M (75 um) at 1.8 m, 8.7 keV, om step 0.01 deg: assumed typical"},
    "soleil-sixs": {"energy_eV": 8300.0, "distance_m": 1.21, "step_deg": 0.011, "two_theta": "gamma", "theta": "mu",
                    "source": "the SixS Pt scan's author's scripts (8.3 keV, 1.21 m, mu step 0.011 deg)"},
}


def natural_voxel(preset: str, settings: dict) -> dict:
    """The server's voxel for this beamline at the Au 111 reflection, and the q steps it comes from."""
    import numpy as np

    from defectscope.preprocessing.geometry import PRESETS, geometry_from_dict
    from defectscope.preprocessing.qspace import canonical_frame, pixel_q_lab

    wavelength = 12398.42 / settings["energy_eV"]
    theta = math.degrees(math.asin(wavelength / (2 * AU_111_D_A)))
    motors = {m: 0.0 for m in (*PRESETS[preset].sample_motors, *PRESETS[preset].detector_motors)}
    motors.update({settings["two_theta"]: 2 * theta})
    motors.pop(settings["theta"], None)
    rows = cols = 256
    geometry = geometry_from_dict({
        "preset": preset, "energy_eV": settings["energy_eV"], "distance_m": settings["distance_m"],
        "direct_beam": [rows / 2, cols / 2], "angles": motors,
        "rocking": {"motor": settings["theta"], "start_deg": theta - 50 * settings["step_deg"], "step_deg": settings["step_deg"]},
    }, n_frames=101, frame_shape=(rows, cols))
    frame = canonical_frame(geometry)
    q = pixel_q_lab(geometry, [50, 51], roi=[rows // 2, rows // 2 + 2, cols // 2, cols // 2 + 2])
    steps = {"row": q[0, 1, 0] - q[0, 0, 0], "column": q[0, 0, 1] - q[0, 0, 0], "rocking": q[1, 0, 0] - q[0, 0, 0]}
    return {"two_theta_deg": round(2 * theta, 3), "q_steps": {k: float(np.linalg.norm(v)) for k, v in steps.items()},
            "voxel": frame.natural_voxel, "q_norm": float(np.linalg.norm(frame.q_centre_lab))}


def run(trained_range) -> dict:
    lo, hi = trained_range
    out = {"trained_range": [lo, hi], "sizes_nm": list(SIZES_NM), "beamlines": {}}
    for preset, settings in BEAMLINES.items():
        v = natural_voxel(preset, settings)
        sigma = {d: 2 * math.pi / (v["voxel"] * d * 10.0) for d in SIZES_NM}
        out["beamlines"][preset] = {
            **{k: settings[k] for k in ("energy_eV", "distance_m", "step_deg", "source")}, **v,
            "oversampling": {str(d): round(s, 2) for d, s in sigma.items()},
            "in_trained_range": {str(d): lo <= s <= hi for d, s in sigma.items()},
            # the crystal sizes the trained range covers on this grid: sigma in [lo, hi]
            "sizes_in_range_nm": [round(2 * math.pi / (v["voxel"] * hi * 10.0)), round(2 * math.pi / (v["voxel"] * lo * 10.0))],
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    from defectscope.model.predictor import Predictor
    from defectscope.model.registry import resolve_model

    result = run(Predictor(resolve_model(None), provider="cpu").pipeline.oversampling_range)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, b in result["beamlines"].items():
        sig = ", ".join(f"{d} nm: {s}" for d, s in b["oversampling"].items())
        print(f"{name:12s} voxel {b['voxel']:.2e} 1/A (steps: " + ", ".join(f"{k} {s:.1e}" for k, s in b["q_steps"].items())
              + f"); oversampling {sig}; trained range covers {b['sizes_in_range_nm'][0]}-{b['sizes_in_range_nm'][1]} nm")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
