"""``make bench``: run the benchmarks, then write every figure with its floor and ratio, and the tables.

    python -m defectscope.benchmarks.report [--skip-run] [--quick]

Runs ``bench_prepare`` (each preparation step before and after, ``benchmarks/prepare_steps.json``),
``bench_orthonormalise`` and ``bench_serving`` (raw JSON in ``benchmarks/out/``, not kept), then writes
``benchmarks/results.json`` (machine, load, versions, every floor, every figure, each target with its floor,
ratio and whether it is met) and ``benchmarks/results.md``, and replaces the blocks between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` in docs/performance.md and README.md with the tables made
from ``benchmarks/results.json``: the figures in those pages are always those of the last ``make bench``.
``--skip-run`` rebuilds the files from the JSON already written (``python -m defectscope.benchmarks.report
--skip-run`` regenerates the pages from the committed results alone when ``benchmarks/out/`` is gone).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
RESULTS = REPO / "benchmarks" / "results.json"
STEPS = REPO / "benchmarks" / "prepare_steps.json"
TABLE = REPO / "benchmarks" / "results.md"
PAGE = REPO / "docs" / "performance.md"  # the page whose bench block holds the tables
README = REPO / "README.md"  # its bench block holds the speed line
ORTHO_PAGE = REPO / "docs" / "orthonormalisation.md"  # its bench block holds the orthonormalisation table
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# Issue 19, on these 2-core machines: every target a ratio to a floor measured in the same run (p50).
TARGETS = {
    "map_e2e": ("<=", 1.3, "64³ map end to end (served without the two checks)", "best bare inference"),
    "prepare": ("<=", 0.5, "`prepare` of a 64³ map, whole pipeline (ms)", "none (absolute target)"),
    "scan_e2e": ("<=", 2.0, "raw 201×256×256 scan end to end, one message", "its transport floor + best bare inference"),
    "stream_after_last_frame": ("<=", 2.0, "streamed scan (a frame every 5 ms), answer after the last frame",
                                "best bare inference"),
    "orthonormalise": (">=", 40.0, "orthonormalisation of the scan, cached geometry (speed-up)",
                       "xrayutilities `Ang2Q` + `Gridder3D`"),
    "throughput_16": (">=", 0.6, "throughput, 16 concurrent clients (maps/s)", "1 / best bare inference"),
    "results_on": ("<=", 1.05, "`--results` on, map end to end", "the same request without"),
}


def _target(name: str, measured: float, floor_ms, ratio: float, measured_ms=None, **extra) -> dict:
    op, limit, what, floor_what = TARGETS[name]
    met = ratio <= limit if op == "<=" else ratio >= limit
    return {"what": what, "floor": floor_what, "floor_ms": floor_ms, "measured": measured, "ratio": round(ratio, 3),
            "target": f"{op} {limit}", "met": bool(met), **({"measured_ms": measured_ms} if measured_ms else {}),
            **extra}


def targets(serving: dict, ortho: dict, steps: dict | None) -> dict:
    """Each target of ``TARGETS`` with its floor, the measured figure, the ratio and whether it is met."""
    best = serving["floors"]["best"]["p50_ms"]
    transport = serving["transport_floor"]
    out = {}
    mp = serving["map"]["p50_ms"]
    out["map_e2e"] = _target("map_e2e", mp, best, mp / best, mp,
                             least_possible=round((best + transport["map"]["p50_ms"]) / best, 3),
                             least_possible_is="best bare inference + the map's transport floor")
    if steps:
        prep = steps["prepare_ms"]["after"]
        passes = steps.get("data_passes_ms")
        out["prepare"] = _target("prepare", prep, None, prep, prep, before_ms=steps["prepare_ms"]["before"],
                                 **({} if passes is None else {
                                     "least_possible": f"{passes:.2f} ms",
                                     "least_possible_is": "its passes over the whole map alone, as bare numpy calls"}))
    own = serving["scan"].get("floor")  # measured alternating with the scans, when there
    floor = (own["transport"]["p50_ms"] + own["bare_inference"]["p50_ms"]) if own else transport["scan"]["p50_ms"] + best
    sc = serving["scan"]["p50_ms"]
    scatter = ortho["timings_s"]["median"].get("scatter")
    out["scan_e2e"] = _target("scan_e2e", sc, round(floor, 3), sc / floor, sc, **({} if scatter is None else {
        "least_possible": round((floor + scatter * 1e3) / floor, 3),
        "least_possible_is": f"+ the scatter of its nonzero pixels into the voxel sums alone, {scatter * 1e3:.1f} ms"}))
    paced = serving["scan_stream_paced"]["after_last_frame_p50_ms"]
    between = (serving["scan_stream_paced"].get("bare_inference_between") or {}).get("p50_ms") or best
    out["stream_after_last_frame"] = _target("stream_after_last_frame", paced, between, paced / between, paced)
    o = ortho["timings_s"]["median"]
    out["orthonormalise"] = _target("orthonormalise", round(o["fast_warm"] * 1e3, 2), round(o["reference"] * 1e3, 1),
                                    o["reference"] / o["fast_warm"],
                                    relative_difference=ortho["fast_vs_reference"]["relative_l2"],
                                    floor_pass_ms=round(o["floor"] * 1e3, 2) if "floor" in o else None,
                                    most_possible=round(ortho["speedup"]["at_most"], 1) if "at_most" in ortho["speedup"] else None,
                                    most_possible_is="the reference over reading the scan once and writing the grid",
                                    same_result=ortho["fast_vs_reference"]["relative_l2"] <= 1e-6)
    tp = serving["throughput"][-1]
    ideal = 1e3 / best
    cores = serving["machine"]["cpu_count"]
    out["throughput_16"] = _target("throughput_16", tp["per_s"], best, tp["per_s"] / ideal,
                                   ideal_per_s=round(ideal, 1), options=serving.get("throughput_options"),
                                   least_possible=None, most_possible=round(
                                       cores * best / serving["floors"]["by_threads"]["1"]["p50_ms"], 3),
                                   most_possible_is=f"{cores} cores, each inferring on one thread, nothing else")
    on, off = serving["map_results"]["p50_ms"], (serving.get("map_results_off") or serving["map"])["p50_ms"]
    out["results_on"] = _target("results_on", on, off, on / off, on)
    return out


def collect(serving: dict, ortho: dict, steps: dict | None = None) -> dict:
    floors = serving["floors"]
    best = floors["best"]["p50_ms"]
    default = serving.get("map_default")
    return {
        # When the serving benchmark ran (a --skip-run rebuild keeps it), else now.
        "generated": serving.get("measured_at") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "make bench  (python -m defectscope.benchmarks.report)",
        "machine": serving["machine"],
        "load_average_after": serving.get("load_average_after"),
        "paused_background_job": serving.get("paused_background_job"),
        "provider": serving["server"]["provider"],
        "server_options": serving["server"].get("options"),
        "model": serving["model"],
        "floors": {**floors, "transport": serving["transport_floor"]},
        "bare_inference": serving["bare_inference"],
        "map": serving["map"],
        "map_default": default and {**default, "floor_ms": (floors.get("default_request") or {}).get("p50_ms"),
                                    "over_best_bare": round(default["p50_ms"] / best, 3)},
        "map_results": serving.get("map_results"),
        "map_results_off": serving.get("map_results_off"),
        "scan": serving["scan"],
        "scan_stream": serving["scan_stream"],
        "scan_stream_paced": serving.get("scan_stream_paced"),
        "throughput": serving["throughput"],
        "throughput_options": serving.get("throughput_options"),
        "throughput_batched": serving.get("throughput_batched"),
        "curve": serving.get("curve"),
        "orthonormalise": {"data": ortho["data"], "median_s": ortho["timings_s"]["median"],
                           "speedup": ortho["speedup"], "fast_vs_reference": ortho["fast_vs_reference"]},
        "prepare_steps": steps and {"file": str(STEPS.relative_to(REPO)), "prepare_ms": steps["prepare_ms"],
                                    "sampling_variants_ms": steps["sampling_variants_ms"]},
        "targets": targets(serving, ortho, steps),
        "gpu": "no GPU on this machine: not measured",
    }


def markdown(result: dict) -> str:
    """The bench block of docs/performance.md for ``result``, with the step table of ``benchmarks/prepare_steps.json``."""
    from defectscope.benchmarks import tables

    return tables.page(result, json.loads(STEPS.read_text()) if STEPS.is_file() else None)


def update_page(table: str, page: Path = PAGE) -> bool:
    """Replace the block between the bench markers of ``page`` with ``table``; False if it has none."""
    text = page.read_text()
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{START}\n{table}{END}{tail}")
    return True


def write(result: dict, steps: dict | None) -> list[str]:
    """results.json, results.md and the pages' bench blocks; the names of the files written."""
    from defectscope.benchmarks import tables

    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    block = tables.page(result, steps)
    TABLE.write_text(block)
    written = [RESULTS, TABLE]
    pages = ((PAGE, block), (README, tables.readme(result)), (ORTHO_PAGE, tables.orthonormalise_table(result)))
    written += [p for p, t in pages if update_page(t, p)]
    return [str(p.relative_to(REPO)) for p in written]


def _paused_before(serving: dict):
    """What the run that wrote ``serving`` paused, as recorded in results.json (a --skip-run rebuild keeps it)."""
    try:
        previous = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        return None
    return previous.get("paused_background_job") if previous.get("generated") == serving.get("measured_at") else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-run", action="store_true",
                   help="no benchmark: rebuild the tables from benchmarks/out (or, without it, from benchmarks/results.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: few repetitions (figures not for the docs)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads of the latency server (default: those of the faster floor)")
    p.add_argument("--paused", default="", help="PIDs of a background job paused for the run (recorded)")
    args = p.parse_args(argv)
    if not args.skip_run:
        from defectscope.benchmarks import bench_orthonormalise, bench_prepare, bench_serving

        if not args.quick:
            bench_prepare.main([])
        bench_orthonormalise.main(["--repeat", "3" if args.quick else "11"])
        bench_serving.main((["--threads", str(args.threads)] if args.threads else []) + (["--quick"] if args.quick else []))
    steps = json.loads(STEPS.read_text()) if STEPS.is_file() else None
    if (OUT / "serving.json").is_file() and (OUT / "orthonormalise.json").is_file():
        serving = json.loads((OUT / "serving.json").read_text())
        serving["paused_background_job"] = args.paused.strip() or _paused_before(serving)
        result = collect(serving, json.loads((OUT / "orthonormalise.json").read_text()), steps)
    else:  # the committed results alone: only the pages are made again
        result = json.loads(RESULTS.read_text())
    if args.quick:
        from defectscope.benchmarks import tables

        print(tables.page(result, steps))
        return 0
    written = write(result, steps)
    from defectscope.benchmarks import tables

    print(tables.target_table(result))
    print("-> " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
