"""The Markdown tables of ``make bench``, made from ``benchmarks/results.json`` and ``benchmarks/prepare_steps.json``
only (``report`` writes them into docs/performance.md and README.md), so every figure in them names its file."""

from __future__ import annotations


def ms(v) -> str:
    if v is None:
        return ""
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _stages(s: dict, skip=("total",)) -> str:
    return ", ".join(f"{k} {ms(v)}" for k, v in s.items() if k not in skip and v)


def header(r: dict) -> str:
    m = r["machine"]
    paused = r.get("paused_background_job")
    return (f"From `benchmarks/results.json` (`make bench`, {r['generated']}): model `{r['model']}`, provider "
            f"`{r['provider']}`, {m['cpu_count']} CPU cores ({m['processor']}), load average {m['load_average'][0]} "
            f"before / {(r.get('load_average_after') or ['?'])[0]} after"
            + (f", background job {paused} paused during the run" if paused else "") + ". Medians (p50).")


def target_table(r: dict) -> str:
    """One row per target: its floor, the measured figure, the ratio, the target and whether it is met."""
    lines = ["| what | floor | floor ms | measured | ratio | target | met | bound on this machine |",
             "|---|---|---|---|---|---|---|---|"]
    for t in r["targets"].values():
        measured = f"{ms(t['measured'])} ms" if "measured_ms" in t or t["floor"].startswith("best") else str(t["measured"])
        if t["what"].startswith("throughput"):
            measured = f"{t['measured']:.1f} maps/s"
        if t["what"].startswith("orthonormalisation"):
            measured = f"{t['measured']:.1f} ms, relative difference {t['relative_difference']:.0e}"
        met = "yes" if t["met"] else "**no**"
        ratio = "" if t["floor_ms"] is None else t["ratio"]
        bound = ""
        if t.get("least_possible") is not None:
            bound = f"at least {t['least_possible']} ({t['least_possible_is']})"
        elif t.get("most_possible") is not None:
            bound = f"at most {t['most_possible']} ({t['most_possible_is']})"
        lines.append(f"| {t['what']} | {t['floor']} | {ms(t['floor_ms'])} | {measured} | {ratio} | {t['target']} | {met} | {bound} |")
    return "\n".join(lines) + "\n"


def measurement_table(r: dict) -> str:
    floors, best = r["floors"], r["floors"]["best"]["p50_ms"]
    lines = ["| measurement | p50 ms | p99 ms | × best bare | stages (p50 ms, from the replies) |", "|---|---|---|---|---|"]

    def row(what, d, stages=""):
        lines.append(f"| {what} | {ms(d['p50_ms'])} | {ms(d['p99_ms'])} | {d['p50_ms'] / best:.2f} | {stages} |")

    for t, b in floors["by_threads"].items():
        row(f"bare ONNX Runtime inference, batch 1, {t} thread{'s' if t != '1' else ''}", b,
            "**the floor**" if b["p50_ms"] == best else "")
    if floors.get("default_request"):
        row("bare inference of a default request (map, 3 sampling variants, cross-check model)", floors["default_request"])
    row("the map's message to an echo server that reads nothing (transport floor)", floors["transport"]["map"])
    row(f"the scan's message ({floors['transport']['scan']['parts']} parts) to the echo server", floors["transport"]["scan"])
    row(f"64³ map end to end (`serve {r['server_options']}`)", r["map"], _stages(r["map"]["stages_ms"]))
    if r.get("map_default"):
        row("64³ map end to end, `serve` as shipped (sampling check and cross-check on)", r["map_default"],
            _stages(r["map_default"]["stages_ms"]))
    if r.get("map_results"):
        row("64³ map end to end with `--results`", r["map_results"], _stages(r["map_results"]["stages_ms"]))
    if r.get("map_results_off"):
        row("the same without `--results`, requests alternating with the row above", r["map_results_off"],
            _stages(r["map_results_off"]["stages_ms"]))
    sc, st = r["scan"], r["scan_stream"]
    row(f"raw {'×'.join(map(str, sc['shape']))} scan ({sc['bytes'] / 1e6:.0f} MB), one message", sc, _stages(sc["stages_ms"]))
    row("same scan streamed, one message per frame, as fast as the client sends", st,
        f"after the last frame {ms(st['after_last_frame_p50_ms'])}; " + _stages(st["stages_ms"], ("total", "after_last_frame")))
    if r.get("scan_stream_paced"):
        sp = r["scan_stream_paced"]
        row(f"same scan streamed, one frame every {sp['frame_interval_ms']:g} ms (a detector)", sp,
            f"**after the last frame {ms(sp['after_last_frame_p50_ms'])}** (p99 {ms(sp['after_last_frame_p99_ms'])})")
    if r.get("curve"):
        row("64³ map with CURVE on", r["curve"], f"{r['curve']['vs_plaintext']:.2f}× the plaintext p50")
    o = r["orthonormalise"]
    lines.append(f"| orthonormalisation, reference (`Ang2Q` + `Gridder3D`) | {o['median_s']['reference'] * 1e3:.0f} | | | {o['data']} |")
    lines.append(f"| orthonormalisation, fast path (cached mapping) | {o['median_s']['fast_warm'] * 1e3:.1f} | | | "
                 f"**{o['speedup']['warm']:.1f}×** faster, relative difference {o['fast_vs_reference']['relative_l2']:.0e} |")
    return "\n".join(lines) + "\n"


def throughput_table(r: dict) -> str:
    lines = [f"Throughput against `serve {r.get('throughput_options') or ''}`:", "",
             "| concurrent clients | maps/s | p50 ms | p99 ms | BUSY |", "|---|---|---|---|---|"]
    for t in r["throughput"]:
        lines.append(f"| {t['clients']} | {t['per_s']:.1f} | {ms(t['p50_ms'])} | {ms(t['p99_ms'])} | {t['busy']} |")
    if r.get("throughput_batched"):
        b = r["throughput_batched"]
        for t in b["runs"]:
            lines.append(f"| {t['clients']}, batching (`--batch-max {b['batch_max']}`) | {t['per_s']:.1f} | "
                         f"{ms(t['p50_ms'])} | {ms(t['p99_ms'])} | {t['busy']} |")
    return "\n".join(lines) + "\n"


def steps_table(steps: dict) -> str:
    """Each preparation step's own time before (``reference_commit``) and after, one interleaved run."""
    lines = [f"From `benchmarks/prepare_steps.json` (`{steps['command']}`, {steps['measured_at']}, load average "
             f"{steps['load_average_before'][0]}): `prepare` of {steps['map']}, each step's own time, median of "
             f"{steps['repeat']} runs, before (commit {steps['reference_commit']}) and after, interleaved.", "",
             "| step | before ms | after ms |", "|---|---|---|"]
    for row in steps["steps"]:
        lines.append(f"| {row['step']} | {ms(row['before_ms'])} | {ms(row['after_ms'])} |")
    p, v = steps["prepare_ms"], steps["sampling_variants_ms"]
    lines.append(f"| **whole `prepare`** (unwrapped) | **{ms(p['before'])}** | **{ms(p['after'])}** |")
    lines.append(f"| the three sampling-check variants | {ms(v['before'])} | {ms(v['after'])} |")
    same = "the same prepared map" if steps.get("same_prepared_map_checksum") else "**prepared maps differ**"
    return "\n".join(lines) + f"\n\nBoth give {same} (checksum; `tests/test_prepare_fast.py` checks every step).\n"


def page(r: dict, steps: dict | None) -> str:
    """The whole bench block of docs/performance.md."""
    parts = [header(r), "", target_table(r), measurement_table(r), throughput_table(r)]
    if steps:
        parts.append(steps_table(steps))
    return "\n".join(parts)


def readme(r: dict) -> str:
    """The README's speed line: every target's ratio and verdict, and where the figures come from."""
    parts = []
    for t in r["targets"].values():
        figure = f"{t['measured']} ms" if t["floor_ms"] is None else f"{t['ratio']}× {t['floor']}"
        parts.append(f"{t['what']}: **{figure}** (target {t['target'].replace('<=', '≤').replace('>=', '≥')}, "
                     f"{'met' if t['met'] else 'not met'})")
    return header(r) + " " + "; ".join(parts) + ". Tables: [performance](docs/performance.md).\n"


def orthonormalise_table(r: dict) -> str:
    """docs/orthonormalisation.md: each path's median per scan and its speed-up over the reference."""
    o = r["orthonormalise"]
    med, ref = o["median_s"], o["median_s"]["reference"]
    rows = [("reference (`Ang2Q` + `Gridder3D`)", med["reference"], None),
            ("fast path, cached mapping", med["fast_warm"], "bold"),
            ("fast path, frame by frame", med.get("fast_stream"), ""),
            ("fast path, first scan of a geometry (builds the cache)", med.get("fast_cold"), ""),
            ("floor: the scan read once, the full grid written once (no method is faster)", med.get("floor"), "")]
    lines = [f"From `benchmarks/results.json` ({r['generated']}, load average {r['machine']['load_average'][0]}): "
             f"{o['data']}, relative difference fast path vs reference "
             f"{o['fast_vs_reference']['relative_l2']:.0e}.", "", "| path | median per scan |", "|---|---|"]
    for what, t, style in rows:
        if t is None:
            continue
        speed = "" if style is None else (f" (**{ref / t:.1f}×**)" if style == "bold" else f" ({ref / t:.1f}×)")
        lines.append(f"| {what} | {t:.3f} s{speed} |")
    if med.get("reference_masked") and med.get("fast_warm_masked"):
        lines.append(f"| with a detector mask: reference / fast path, cached mapping | {med['reference_masked']:.2f} s / "
                     f"{med['fast_warm_masked']:.3f} s ({med['reference_masked'] / med['fast_warm_masked']:.1f}×) |")
    return "\n".join(lines) + "\n"
