"""Simulator throughput: patterns per second for small and large crystals, against the paper's PyNX GPU times.

    python -m defectscope.benchmarks.bench_simulate [--workers N] [--small N] [--large N] [--out FILE]

For each crystal size it runs ``simulate_dataset`` end to end (Dask local cluster start-up, atoms,
displacement fields, NUFFTs, noise, compressed HDF5 writing) and times it; it also times one configuration
in a single process to separate the per-core cost from the cluster overhead. The paper computed one
64³ pattern in 0.25 s (small) and 2 s (large) with PyNX on a GPU (POWER9 machine); ``speedup_vs_paper``
is their time per pattern divided by ours. Targets on 2 CPU cores: >= 8 patterns/s small, >= 2 large.
Results go to ``benchmarks/simulate.json`` (kept in the repository: docs/simulator.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

PAPER_SECONDS_PER_PATTERN = {"small": 0.25, "large": 2.0}
TARGET_PATTERNS_PER_S = {"small": 8.0, "large": 2.0}
DEFAULT_OUT = Path(__file__).resolve().parent / "simulate.json"  # kept: docs/simulator.md quotes it


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_seconds() -> float:
    self_usage, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_usage.ru_utime + self_usage.ru_stime + children.ru_utime + children.ru_stime


def bench_size(size: str, n_patterns: int, workers: int, seed: int = 0) -> dict:
    from defectscope.training import simulator
    from defectscope.training.runner import simulate_dataset
    from defectscope.training.sim_config import SimulationConfig

    cfg = SimulationConfig(sizes=(size,))
    # Per-core cost: one full configuration (10 orientations) in this process, after a warm-up.
    simulator.simulate_configuration(cfg, seed, 0, 1)
    t0 = time.perf_counter()
    result = simulator.simulate_configuration(cfg, seed, 1, cfg.orientations_per_configuration)
    single_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"bench-{size}.h5"
        load_before = os.getloadavg()[0]
        cpu0 = _cpu_seconds()
        t0 = time.perf_counter()
        simulate_dataset(n_patterns, path, cfg, seed=seed, workers=workers, progress=False)
        wall_s = time.perf_counter() - t0
        cpu_s = _cpu_seconds() - cpu0
        file_mb = path.stat().st_size / 1e6
    rate = n_patterns / wall_s
    return {
        "size": size,
        "n_patterns": n_patterns,
        "workers": workers,
        "wall_s": round(wall_s, 2),
        "patterns_per_s": round(rate, 2),
        "seconds_per_pattern": round(1.0 / rate, 4),
        "single_process_patterns_per_s": round(cfg.orientations_per_configuration / single_s, 2),
        # CPU time of this process and its (finished) worker processes: what the run cost, even when other
        # jobs shared the cores; workers / cpu_s_per_pattern is the rate on otherwise idle cores.
        "cpu_s_per_pattern": round(cpu_s / n_patterns, 4),
        "idle_machine_estimate_patterns_per_s": round(min(workers, os.cpu_count() or 1) * n_patterns / cpu_s, 2),
        "load_average_before": round(load_before, 2),
        "atoms_per_crystal_example": int(result.params["n_atoms"][0]),
        "file_mb_per_pattern": round(file_mb / n_patterns, 3),
        "paper_seconds_per_pattern": PAPER_SECONDS_PER_PATTERN[size],
        "speedup_vs_paper": round(PAPER_SECONDS_PER_PATTERN[size] * rate, 2),
        "target_patterns_per_s": TARGET_PATTERNS_PER_S[size],
        "meets_target": bool(rate >= TARGET_PATTERNS_PER_S[size]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--small", type=int, default=200, help="small-crystal patterns to simulate")
    parser.add_argument("--large", type=int, default=40, help="large-crystal patterns to simulate")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)

    import finufft

    from defectscope import __version__
    from defectscope.training.simulator import SIMULATOR_VERSION

    report = {
        "benchmark": "simulate",
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_average": [round(v, 2) for v in os.getloadavg()]},
        "versions": {"defectscope": __version__, "simulator": SIMULATOR_VERSION, "finufft": finufft.__version__},
        "note": "end to end: Dask local cluster start-up, simulation, gzip HDF5 writing; 64^3 patterns, "
                "10 orientations per configuration, default SimulationConfig with the given size",
        "results": [],
    }
    for size, n in (("small", args.small), ("large", args.large)):
        if n <= 0:
            continue
        r = bench_size(size, n, args.workers)
        report["results"].append(r)
        print(f"{size:>5}: {r['patterns_per_s']:6.2f} patterns/s on {r['workers']} workers "
              f"({r['seconds_per_pattern']:.3f} s/pattern; paper PyNX GPU {r['paper_seconds_per_pattern']} s → "
              f"{r['speedup_vs_paper']}x; single process {r['single_process_patterns_per_s']} patterns/s; "
              f"target {r['target_patterns_per_s']}: {'met' if r['meets_target'] else 'NOT met'})", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
