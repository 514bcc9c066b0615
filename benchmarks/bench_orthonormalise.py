"""Benchmark: orthonormalisation, xrayutilities reference vs cached fast path, on a 201x256x256 scan.

    python -m defectscope.benchmarks.bench_orthonormalise [--out FILE.json] [--repeat N]

Uses the measured APS 34-ID-C scan when ``../shared/data`` exists beside the repository, else a synthetic scan
of the same shape and geometry. Times, per scan: the reference (``orthonormalise_reference``), the fast path on
its first call (cold: builds and caches the mapping), the fast path on a new scan with the same geometry (warm),
and warm frame-by-frame streaming and masked runs; and the floor (``floor_pass``: the scan read once, the
full grid written where pixels land), which bounds the speed-up any method can reach on this machine. Medians of ``--repeat`` runs; writes JSON (machine, versions,
timings, speed-ups, fast-vs-reference difference) to ``benchmarks/out/orthonormalise.json`` by default and
prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from defectscope.preprocessing.geometry import geometry_from_dict
from defectscope.preprocessing.orthonormalise import Orthonormaliser, orthonormalise_reference, pixel_q_lab

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SCAN_34IDC = SHARED_DATA / "aps34idc_au111_s54"
DEFAULT_OUT = REPO / "benchmarks" / "out" / "orthonormalise.json"
AU111_Q = 2 * np.pi / (4.07999 / np.sqrt(3))


def measured_scan():
    from defectscope.preprocessing.scans import load_spec_tiff_scan

    frames, geometry, _ = load_spec_tiff_scan(SCAN_34IDC / "example.spec", 54, SCAN_34IDC / "Staff20-1a_S0054")
    _, _, mask = load_spec_tiff_scan(
        SCAN_34IDC / "example.spec", 54, SCAN_34IDC / "Staff20-1a_S0054", dark=SCAN_34IDC / "dark.tif"
    )
    return "APS 34-ID-C Au(111) scan 54 (measured)", frames, geometry, mask


def synthetic_scan(seed: int = 0):
    """The 34-ID-C geometry with an anisotropic Gaussian Bragg peak rendered into the frames, Poisson noise."""
    geometry = geometry_from_dict(
        {"preset": "aps-34idc", "direct_beam": [256, 256],
         "angles": {"chi": 90.0, "phi": -5.0, "delta": 32.174, "gamma": 12.6346},
         "rocking": {"start_deg": -0.28, "step_deg": 0.005}},
        n_frames=201, frame_shape=(256, 256),
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    q0 = pixel_q_lab(geometry, [100], roi=[126, 127, 127, 128]).reshape(3)
    frames = np.empty((201, 256, 256), dtype=np.int32)
    for start in range(0, 201, 16):
        q = pixel_q_lab(geometry, np.arange(start, min(start + 16, 201))) - q0
        r2 = (q[..., 0] / 3e-3) ** 2 + (q[..., 1] / 2e-3) ** 2 + (q[..., 2] / 4e-3) ** 2 + q[..., 0] * q[..., 1] / 1e-5
        frames[start : start + 16] = rng.poisson(1e5 * np.exp(-0.5 * r2) + 0.1)  # ~9 % nonzero, as measured
    mask = np.zeros((256, 256), dtype=bool)
    mask[rng.integers(0, 256, 400), rng.integers(0, 256, 400)] = True
    return "synthetic 201x256x256, 34-ID-C geometry", frames, geometry, mask


def floor_pass(frames: np.ndarray, mapping) -> None:
    """What any orthonormalisation of the whole scan must do at least: read every pixel once (a count of
    the nonzero ones) and make the full grid, writing every voxel a pixel lands in; nothing computed."""
    np.count_nonzero(frames)
    volume = np.zeros(mapping.grid.n_voxels)
    volume[mapping.touched] = 1.0


def scatter_pass(frames: np.ndarray, mapping):
    """The scatter alone, timed by the returned call: every nonzero pixel added to its voxel's sum (indices and
    values gathered beforehand, untimed). A gridding that adds pixels to voxels cannot be cheaper; its cost
    here is the cache misses of ~1e6 additions spread over a sum array larger than the CPU's caches."""
    flat = frames.reshape(-1)
    nonzero = np.flatnonzero(flat)
    ranks, values = mapping.rank.reshape(-1)[nonzero], flat[nonzero].astype(np.float64)
    return lambda: np.add.at(np.zeros(mapping.spare + 1), ranks, values)


def _time(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _versions() -> dict:
    names = ("numpy", "scipy", "xrayutilities", "defectscope")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}


def run(repeat: int) -> dict:
    source, frames, geometry, mask = measured_scan() if SCAN_34IDC.is_dir() else synthetic_scan()
    new_scan = frames[::-1].copy()  # same geometry, other data: what a warm cache serves
    reference = orthonormalise_reference(frames, geometry)
    t_ref = _time(lambda: orthonormalise_reference(new_scan, geometry), repeat)
    t_cold = _time(lambda: Orthonormaliser()(frames, geometry), max(1, min(3, repeat)))
    fast = Orthonormaliser()
    fast_map = fast(frames, geometry)
    t_warm = _time(lambda: fast(new_scan, geometry), repeat)

    def stream():
        state = fast.start(geometry)
        for i in range(new_scan.shape[0]):
            fast.accumulate_frame(state, i, new_scan[i])
        fast.finish(state)

    t_stream = _time(stream, repeat)
    fast(frames, geometry, mask=mask)  # the mask's normalisation is computed once, then cached
    t_mask = _time(lambda: fast(new_scan, geometry, mask=mask), repeat)
    t_ref_mask = _time(lambda: orthonormalise_reference(new_scan, geometry, mask=mask), max(1, min(3, repeat)))
    mapping = fast.accumulate(frames, geometry, blocks=False).mapping  # the cached one
    t_floor = _time(lambda: floor_pass(new_scan, mapping), repeat)
    t_scatter = _time(scatter_pass(new_scan, mapping), repeat)

    diff = fast_map.volume - reference.volume
    peak = np.unravel_index(np.argmax(reference.volume), reference.volume.shape)
    med = {k: statistics.median(v) for k, v in
           dict(reference=t_ref, fast_cold=t_cold, fast_warm=t_warm, fast_stream=t_stream,
                fast_warm_masked=t_mask, reference_masked=t_ref_mask, floor=t_floor, scatter=t_scatter).items()}  # fmt: skip
    return {
        "benchmark": "orthonormalise",
        "data": source,
        "scan_shape": list(frames.shape),
        "grid_shape": list(reference.volume.shape),
        "voxel_size_inv_angstrom": reference.voxel_size.tolist(),
        "repeat": repeat,
        "machine": _machine(),
        "versions": _versions(),
        "timings_s": {"median": med, "runs": {"reference": t_ref, "fast_cold": t_cold, "fast_warm": t_warm,
                                              "fast_stream": t_stream, "fast_warm_masked": t_mask,
                                              "reference_masked": t_ref_mask}},  # fmt: skip
        "speedup": {
            "warm": med["reference"] / med["fast_warm"],
            "cold": med["reference"] / med["fast_cold"],
            "stream": med["reference"] / med["fast_stream"],
            "masked_warm": med["reference_masked"] / med["fast_warm_masked"],
            # The most any method could reach here: the reference over the floor (``floor_pass``).
            "at_most": med["reference"] / med["floor"],
        },
        "fast_vs_reference": {
            "relative_l2": float(np.linalg.norm(diff) / np.linalg.norm(reference.volume)),
            "max_abs_over_max": float(np.abs(diff).max() / np.abs(reference.volume).max()),
        },
        "peak": {"voxel": [int(i) for i in peak], "q_norm_inv_angstrom": reference.q_norm_at(peak),
                 "au111_q_inv_angstrom": float(AU111_Q)},  # fmt: skip
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m defectscope.benchmarks.bench_orthonormalise", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})")
    parser.add_argument("--repeat", type=int, default=5, help="runs per timing, median reported (default 5)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    result = run(args.repeat)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    med, speed = result["timings_s"]["median"], result["speedup"]
    print(
        f"orthonormalise {'x'.join(map(str, result['scan_shape']))} -> {'x'.join(map(str, result['grid_shape']))}: "
        f"reference {med['reference']:.3f} s, fast warm {med['fast_warm']:.3f} s ({speed['warm']:.1f}x), "
        f"cold {med['fast_cold']:.3f} s ({speed['cold']:.2f}x), stream {med['fast_stream']:.3f} s, "
        f"rel diff {result['fast_vs_reference']['relative_l2']:.1e} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
