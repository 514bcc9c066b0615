"""``make bench``: run the serving and orthonormalisation benchmarks, then write the figures.

    python -m defectscope.benchmarks.report [--skip-run] [--quick]

Runs ``bench_orthonormalise`` and ``bench_serving`` (each writes its raw JSON to ``benchmarks/out/``), then
writes ``benchmarks/results.json`` (machine, versions, provider, every figure, each target with its
measured value and whether it is met) and ``benchmarks/results.md`` (the Markdown table), and replaces the
block between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in docs/performance.md with that table, so
the performance page's figures are always those of the last ``make bench``. ``--skip-run`` rebuilds the
files from the JSON already in ``benchmarks/out/``.
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
TABLE = REPO / "benchmarks" / "results.md"
PAGE = REPO / "docs" / "performance.md"  # the page whose bench block holds the table
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

TARGETS = {  # issue 6, on these 2-core machines, ratios measured in the same run
    "map_e2e_over_bare": 1.15,
    "scan_e2e_over_bare": 3.0,
    "orthonormalise_speedup": 10.0,
}


def collect(serving: dict, ortho: dict) -> dict:
    bare = serving["bare_inference"]
    measured = {
        "map_e2e_over_bare": serving["ratios"]["map_e2e_over_bare"],
        "scan_e2e_over_bare": serving["ratios"]["scan_e2e_over_bare"],
        "orthonormalise_speedup": round(ortho["speedup"]["warm"], 2),
    }
    targets = {name: {"target": f"<= {limit}" if name != "orthonormalise_speedup" else f">= {limit}",
                      "measured": measured[name],
                      "met": measured[name] >= limit if name == "orthonormalise_speedup" else measured[name] <= limit}
               for name, limit in TARGETS.items()}
    # The least any server can take end to end: the bytes' round trip (an echo server, same run) plus the
    # one inference the answer needs (it needs the whole map, so it cannot overlap the receiving). A target
    # below it is out of reach on this machine whatever the server does with the data; above it,
    # ``budget_ms`` is what is left for decoding, validation and preparation.
    floor = serving.get("transport_floor")
    if floor:
        for name, kind in (("map_e2e_over_bare", "map"), ("scan_e2e_over_bare", "scan")):
            least = round(1 + floor[kind]["p50_ms"] / bare["p50_ms"], 3)
            targets[name]["floor_over_bare"] = least
            targets[name]["reachable_here"] = least < TARGETS[name]
            targets[name]["budget_ms"] = round((TARGETS[name] - least) * bare["p50_ms"], 3)
    targets["gpu_map_e2e_p50_ms"] = {"target": "<= 2 (CUDA provider, whenever a GPU is available)",
                                     "measured": None, "met": None,
                                     "note": "no GPU on this machine: not measured"}
    return {
        # When the serving benchmark ran (a --skip-run rebuild keeps it), else now.
        "generated": serving.get("measured_at") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "make bench  (python -m defectscope.benchmarks.report)",
        "machine": serving["machine"],
        "load_average_after": serving.get("load_average_after"),
        "provider": serving["server"]["provider"],
        "model": serving["model"],
        "bare_inference": bare,
        "map": serving["map"],
        "scan": serving["scan"],
        "scan_stream": serving["scan_stream"],
        "scan_stream_paced": serving.get("scan_stream_paced"),
        "throughput": serving["throughput"],
        "throughput_batched": serving.get("throughput_batched"),
        "curve": serving.get("curve"),
        "transport_floor": serving.get("transport_floor"),
        "orthonormalise": {"data": ortho["data"], "median_s": ortho["timings_s"]["median"],
                           "speedup": ortho["speedup"], "fast_vs_reference": ortho["fast_vs_reference"]},
        "targets": targets,
    }


def markdown(r: dict) -> str:
    m = r["machine"]
    bare, mp, sc, st = r["bare_inference"], r["map"], r["scan"], r["scan_stream"]
    ms = lambda v: f"{v:.2f}" if v < 100 else f"{v:.0f}"  # noqa: E731
    stages = lambda s: ", ".join(f"{k} {ms(v)}" for k, v in s.items() if k not in ("total",) and v)  # noqa: E731
    lines = [
        f"Model `{r['model']}`, provider `{r['provider']}`, {m['cpu_count']} CPU cores ({m['processor']}), "
        f"load average {m['load_average'][0]} before / {(r.get('load_average_after') or ['?'])[0]} after; "
        f"{r['generated']}. Medians (p50) and p99 in ms.",
        "",
        "| measurement | p50 ms | p99 ms | × bare | stages (p50 ms, from the replies) |",
        "|---|---|---|---|---|",
        f"| bare ONNX Runtime inference, batch 1 (the floor) | {ms(bare['p50_ms'])} | {ms(bare['p99_ms'])} | 1 | threads: {bare['threads']} |",
        f"| 64³ map over ZeroMQ, end to end | {ms(mp['p50_ms'])} | {ms(mp['p99_ms'])} | {mp['p50_ms'] / bare['p50_ms']:.2f} | {stages(mp['stages_ms'])} |",
        f"| raw {'×'.join(map(str, sc['shape']))} scan ({sc['bytes'] / 1e6:.0f} MB), one message | {ms(sc['p50_ms'])} | {ms(sc['p99_ms'])} | {sc['p50_ms'] / bare['p50_ms']:.1f} | {stages(sc['stages_ms'])} |",
        f"| same scan streamed, one message per frame | {ms(st['p50_ms'])} | {ms(st['p99_ms'])} | {st['p50_ms'] / bare['p50_ms']:.1f} | after the last frame {ms(st['after_last_frame_p50_ms'])}; {stages({k: v for k, v in st['stages_ms'].items() if k != 'after_last_frame'})} |",
    ]
    if r.get("scan_stream_paced"):
        sp = r["scan_stream_paced"]
        lines.append(f"| same scan streamed, one frame every {sp['frame_interval_ms']:g} ms (a detector) | {ms(sp['p50_ms'])} | {ms(sp['p99_ms'])} | | **after the last frame {ms(sp['after_last_frame_p50_ms'])}** (p99 {ms(sp['after_last_frame_p99_ms'])}), {sp['after_last_frame_p50_ms'] / bare['p50_ms']:.1f}× bare |")
    if r.get("transport_floor"):
        f = r["transport_floor"]
        lines.append(f"| the map's message to an echo server that reads nothing (transport floor) | {ms(f['map']['p50_ms'])} | {ms(f['map']['p99_ms'])} | {f['map']['p50_ms'] / bare['p50_ms']:.2f} | ZeroMQ over loopback and the copies only |")
        lines.append(f"| the scan's message ({f['scan']['parts']} parts) to the echo server | {ms(f['scan']['p50_ms'])} | {ms(f['scan']['p99_ms'])} | {f['scan']['p50_ms'] / bare['p50_ms']:.1f} | ZeroMQ over loopback and the copies only |")
    if r.get("curve"):
        c = r["curve"]
        lines.append(f"| 64³ map with CURVE on | {ms(c['p50_ms'])} | {ms(c['p99_ms'])} | {c['p50_ms'] / bare['p50_ms']:.2f} | {c['vs_plaintext']:.2f}× the plaintext p50 |")
    o = r["orthonormalise"]
    lines.append(f"| orthonormalisation, reference (`Ang2Q` + `Gridder3D`) | {o['median_s']['reference'] * 1e3:.0f} | | | {o['data']} |")
    lines.append(f"| orthonormalisation, fast path (cached mapping) | {o['median_s']['fast_warm'] * 1e3:.0f} | | | **{o['speedup']['warm']:.1f}×** faster, relative difference {o['fast_vs_reference']['relative_l2']:.0e} |")
    lines += ["", "| concurrent clients | maps/s | p50 ms | p99 ms | BUSY |", "|---|---|---|---|---|"]
    for t in r["throughput"]:
        lines.append(f"| {t['clients']} | {t['per_s']:.1f} | {ms(t['p50_ms'])} | {ms(t['p99_ms'])} | {t['busy']} |")
    if r.get("throughput_batched"):
        b = r["throughput_batched"]
        for t in b["runs"]:
            lines.append(f"| {t['clients']}, batching (`--batch-max {b['batch_max']}`) | {t['per_s']:.1f} | {ms(t['p50_ms'])} | {ms(t['p99_ms'])} | {t['busy']} |")
    lines += ["", "| target | measured | met | least possible here: inference + transport floor (× bare) |",
              "|---|---|---|---|"]
    names = {"map_e2e_over_bare": "map end to end / bare inference (p50)",
             "scan_e2e_over_bare": "raw scan end to end / bare inference (p50)",
             "orthonormalise_speedup": "fast orthonormalisation / reference",
             "gpu_map_e2e_p50_ms": "GPU map end to end p50 (ms)"}
    for k, t in r["targets"].items():
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        floor = t.get("floor_over_bare")
        if floor is not None:
            floor = (f"{floor}: leaves {t['budget_ms']:.2f} ms for decoding, validation and preparation" if t["reachable_here"]
                     else f"{floor}: **above the target, unreachable on this machine**")
        lines.append(f"| {names[k]} {t['target']} | {t['measured'] if t['measured'] is not None else t.get('note', '')} | {met} | {floor or ''} |")
    return "\n".join(lines) + "\n"


def update_page(table: str, page: Path = PAGE) -> bool:
    """Replace the block between the bench markers of ``page`` with ``table``; False if it has none."""
    text = page.read_text()
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{START}\n{table}{END}{tail}")
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-run", action="store_true", help="only rebuild results.json/.md and docs/performance.md from benchmarks/out")
    p.add_argument("--quick", action="store_true", help="smoke run: few repetitions (figures not for the docs)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads of server and floor (default 1)")
    args = p.parse_args(argv)
    if not args.skip_run:
        from defectscope.benchmarks import bench_orthonormalise, bench_serving

        bench_orthonormalise.main(["--repeat", "3" if args.quick else "11"])
        # One ONNX Runtime thread: on these 2-core machines it answers as fast as two (the oversampling
        # estimate overlaps the inference on the other core) and leaves a core to the rest of the server.
        bench_serving.main(["--threads", str(args.threads)] + (["--quick"] if args.quick else []))
    serving = json.loads((OUT / "serving.json").read_text())
    ortho = json.loads((OUT / "orthonormalise.json").read_text())
    result = collect(serving, ortho)
    table = markdown(result)
    if args.quick:
        print(table)
        return 0
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    TABLE.write_text(table)
    print(table)
    page = PAGE.relative_to(REPO)
    print(f"-> {RESULTS.relative_to(REPO)}, {TABLE.relative_to(REPO)}"
          + (f", {page}" if update_page(table) else f" ({page} has no bench markers)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
