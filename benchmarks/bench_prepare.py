"""Benchmark: what each step of ``prepare`` costs on one 64^3 map, now and at a reference commit, in one run.

    python -m defectscope.benchmarks.bench_prepare [--reference REV] [--repeat N] [--out FILE.json]

Each step function the pipeline composes (``STEPS``, looked up by name in ``preprocessing.pipeline``) is
wrapped by a timer that counts its *own* time (time spent in a nested wrapped step is that step's), and
``prepare`` of the benchmark's simulated map (``bench_serving.example_map``, raw counts) runs ``--repeat``
times, plus the sampling-check variants. ``other`` is what no wrapped step holds (the cast, Python glue).
The same is done on the pipeline of ``--reference`` (``git archive`` of ``preprocessing/`` at that commit);
each in a fresh child process, before and after interleaved round by round, so both share the machine's load.
Medians of the per-run sums, in ms; writes ``benchmarks/prepare_steps.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the server runs (server.cli); before numpy loads BLAS
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "prepare_steps.json"
REFERENCE = "40d8773"  # the pipeline before issue 19's work (central-peak estimate, per-axis resampling)
# (name in preprocessing.pipeline, or "module:name" in another preprocessing module, alternatives joined by
# "|"; step as the table names it); names a version lacks are skipped.
STEPS = (
    ("check_declared", "validate: declared shape and dtype"),
    ("check_values", "validate: values (finite, range, negatives, signal)"),
    ("apply_plan|source:apply_plan", "frame: canonical axes"),
    ("cut_warning", "peak-cut check (data stopping next to the peak)"),
    ("find_peak", "peak search (hot-voxel robust)"),
    ("scan_map", "one pass: cast, min/max, sum, block maxima"),
    ("crop_pad", "window cut around the peak"),
    ("_suppress_isolated", "isolated-voxel suppression"),
    ("estimate_oversampling", "oversampling estimate (central peak)"),
    ("_centre", "whole-voxel centre of mass"),
    ("apply_intensity", "intensity transform and normalisation"),
    ("Preparation.finish", "warnings and report"),
    ("Preparation.__init__", "cast, mask, glue of the first half"),
)


class _Timer:
    """Own-time accounting for nested wrapped calls."""

    def __init__(self):
        self.own: dict[str, float] = {}
        self._stack: list[float] = []

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                children = self._stack.pop()
                self.own[name] = self.own.get(name, 0.0) + elapsed - children
                if self._stack:
                    self._stack[-1] += elapsed
        return timed


def _owner(pipeline, name: str):
    """The object holding step ``name`` (see ``STEPS``) and the attribute's name; (None, name) if absent."""
    import importlib

    if ":" in name:
        module, attr = name.split(":")
        try:
            return importlib.import_module(f"defectscope.preprocessing.{module}"), attr
        except (ImportError, OSError):  # a module the reference commit does not have
            return None, attr
    if "." in name:
        return pipeline.Preparation, name.split(".")[1]
    return pipeline, name


def measure(repeat: int) -> dict:
    """Per-step own time (median over runs, ms) of ``prepare`` on the example map, and the totals."""
    from defectscope.benchmarks.bench_serving import example_map
    from defectscope.model.predictor import Predictor
    from defectscope.model.registry import resolve_model
    from defectscope.preprocessing import pipeline

    config = Predictor(resolve_model("defectscope-3class"), provider="cpu").pipeline
    volume = example_map()
    timer = _Timer()
    for names, _ in STEPS:
        for name in names.split("|"):
            owner, attr = _owner(pipeline, name)
            if owner is not None and hasattr(owner, attr):
                setattr(owner, attr, timer.wrap(names, getattr(owner, attr)))
    runs, totals, variants = [], [], []
    for i in range(repeat + 10):
        timer.own.clear()
        t0 = time.perf_counter()
        prepared = pipeline.prepare(volume, config)
        total = time.perf_counter() - t0
        if i >= 10:
            runs.append(dict(timer.own))
            totals.append(total)
    bare = {}  # the unwrapped pipeline, for the headline figure
    import importlib
    clean = importlib.reload(pipeline)
    for i in range(repeat + 10):
        t0 = time.perf_counter()
        p = clean.prepare(volume, config)
        if i >= 10:
            bare.setdefault("t", []).append(time.perf_counter() - t0)
    for _ in range(max(5, repeat // 10)):
        preparation = clean.Preparation(volume, config)
        per_axis, _ = preparation.estimate()
        t0 = time.perf_counter()
        preparation.sampling_variants(per_axis)
        variants.append(time.perf_counter() - t0)
    passes = [_time(lambda: data_passes(volume), 5) for _ in range(max(20, repeat // 5))]
    names = [n for n, _ in STEPS if any(n in r for r in runs)]
    steps = {n: round(float(np.median([r.get(n, 0.0) for r in runs])) * 1e3, 4) for n in names}
    steps["other"] = round(float(np.median([t - sum(r.values()) for t, r in zip(totals, runs)])) * 1e3, 4)
    return {"steps_ms": steps, "prepare_ms": round(float(np.median(bare["t"])) * 1e3, 4),
            "data_passes_ms": round(float(np.median(passes)) * 1e3, 4),
            "prepare_p99_ms": round(float(np.percentile(bare["t"], 99)) * 1e3, 4),
            "sampling_variants_ms": round(float(np.median(variants)) * 1e3, 4),
            "checksum": float(np.asarray(p.array, dtype=np.float64).sum()), "shape": list(prepared.array.shape)}


def data_passes(volume: np.ndarray) -> None:
    """The passes over the whole map no preparation of it can skip, as single numpy calls with nothing around
    them: its cast into a buffer of our own, its minimum and maximum, the peak search's block maxima, the
    hot-voxel threshold, the two marginal sums of the centre of mass, the window's copy and the division by
    its maximum. What ``prepare`` takes beyond these is the cost of its other (small) numpy calls and Python."""
    from defectscope.preprocessing.centring import _block_maxima

    work = np.array(volume, dtype=np.float32, order="C", copy=True)
    work.min()
    high = work.max()
    _block_maxima(work, 4)
    np.flatnonzero(work > 0.01 * high)
    np.einsum("ijk->jk", work), np.einsum("ijk->i", work)
    window = work.copy()
    np.divide(window, np.float32(window.max()), out=window)


def _time(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


_CHILD = """
import json, sys
from importlib.util import spec_from_file_location
ROOT = sys.argv[1] + "/preprocessing"
class _Ref:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "defectscope.preprocessing":
            return spec_from_file_location(name, ROOT + "/__init__.py", submodule_search_locations=[ROOT])
        if name.startswith("defectscope.preprocessing.") and name.count(".") == 2:
            return spec_from_file_location(name, ROOT + "/" + name.rsplit(".", 1)[1] + ".py")
        return None
if sys.argv[1]:
    sys.meta_path.insert(0, _Ref)
from defectscope.benchmarks.bench_prepare import measure
print(json.dumps(measure(int(sys.argv[2]))))
"""


def child(rev: str | None, repeat: int) -> dict:
    """``measure`` in a fresh process (BLAS on one thread, as the server runs), on the pipeline of ``rev``
    (its ``preprocessing/``, the rest of today's package) or, with None, on today's."""
    with tempfile.TemporaryDirectory() as tmp:
        if rev is not None:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "preprocessing"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        out = subprocess.run([sys.executable, "-c", _CHILD, tmp if rev is not None else "", str(repeat)],
                             capture_output=True, text=True, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
        if out.returncode:
            raise RuntimeError(f"the preparation benchmark failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", default=REFERENCE, help="git revision of the 'before' pipeline")
    p.add_argument("--repeat", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3, help="before/after interleaved this many times")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    load_before = [round(v, 2) for v in os.getloadavg()]
    before, after = [], []
    for _ in range(args.rounds):  # interleaved: both see the same load
        before.append(child(args.reference, args.repeat))
        after.append(child(None, args.repeat))
    pick = lambda runs: min(runs, key=lambda r: r["prepare_ms"])  # noqa: E731  (least disturbed round)
    b, a = pick(before), pick(after)
    rows = [{"step": label, "name": n, "before_ms": b["steps_ms"].get(n), "after_ms": a["steps_ms"].get(n)}
            for n, label in (*STEPS, ("other", "other (Python glue, small arrays)"))
            if n in b["steps_ms"] or n in a["steps_ms"]]
    result = {"command": "python -m defectscope.benchmarks.bench_prepare", "reference_commit": args.reference,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu_count": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": [round(v, 2) for v in os.getloadavg()],
              "map": "64^3 simulated pattern, uint32 counts (bench_serving.example_map)",
              "rounds": args.rounds, "repeat": args.repeat, "steps": rows,
              "prepare_ms": {"before": b["prepare_ms"], "after": a["prepare_ms"]},
              "data_passes_ms": a["data_passes_ms"],
              "prepare_p99_ms": {"before": b["prepare_p99_ms"], "after": a["prepare_p99_ms"]},
              "sampling_variants_ms": {"before": b["sampling_variants_ms"], "after": a["sampling_variants_ms"]},
              "same_prepared_map_checksum": abs(b["checksum"] - a["checksum"]) <= 1e-6 * abs(b["checksum"])}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(f"{r['step']:55s} {r['before_ms']!s:>9} {r['after_ms']!s:>9}")
    print(f"prepare {b['prepare_ms']} -> {a['prepare_ms']} ms; variants {b['sampling_variants_ms']} -> "
          f"{a['sampling_variants_ms']} ms -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
