"""The floors of the speed targets: the echo server answers every message, and the report gives every target
its floor, ratio and verdict, and the pages' tables are those made from the committed results."""

import numpy as np

from defectscope.benchmarks import bench_floor, report


def test_echo_server_answers_map_and_scan_messages():
    volume = np.arange(8 ** 3, dtype=np.uint32).reshape(8, 8, 8)
    frames = np.ones((4, 16, 16), dtype=np.float32)
    result = bench_floor.measure(volume, frames, repeat=5, scan_repeat=3)
    assert result["map"]["n"] == 5 and result["scan"]["n"] == 3
    assert result["map"]["bytes"] == volume.nbytes and result["scan"]["bytes"] == frames.nbytes
    assert result["scan"]["parts"] == 4
    assert 0 < result["map"]["p50_ms"] <= result["map"]["p99_ms"]
    assert 0 < result["scan"]["p50_ms"] <= result["scan"]["p99_ms"]


def _serving(bare_ms, map_floor_ms, scan_floor_ms):
    timing = {"p50_ms": 10.0, "p99_ms": 12.0, "n": 3, "stages_ms": {"infer": 4.0}}
    bare = {"p50_ms": bare_ms, "p99_ms": bare_ms, "n": 3, "threads": 1}
    return {
        "floors": {"by_threads": {"1": bare, "2": {**bare, "p50_ms": bare_ms * 1.5, "threads": 2}}, "best": bare,
                   "default_request": {"p50_ms": 5 * bare_ms, "p99_ms": 6 * bare_ms, "n": 3}},
        "bare_inference": bare,
        "machine": {"cpu_count": 2, "processor": "x86_64", "load_average": [0.1, 0.1, 0.1]},
        "server": {"provider": "CPUExecutionProvider", "options": "--no-sampling-check --cross-check none"},
        "model": "m.onnx",
        "map": timing, "map_results": {**timing, "p50_ms": 10.4}, "map_results_off": {**timing, "p50_ms": 10.0}, "map_default": {**timing, "p50_ms": 30.0},
        "scan": {**timing, "p50_ms": 90.0, "shape": [201, 256, 256], "bytes": 52690944,
                 "floor": {"transport": {"p50_ms": scan_floor_ms}, "bare_inference": {"p50_ms": bare_ms}}},
        "scan_stream": {**timing, "after_last_frame_p50_ms": 5.0},
        "scan_stream_paced": {**timing, "frame_interval_ms": 5, "after_last_frame_p50_ms": 7.0, "after_last_frame_p99_ms": 9.0,
                              "bare_inference_between": {"p50_ms": bare_ms}},
        "throughput": [{"clients": 16, "per_s": 150.0, "p50_ms": 100.0, "p99_ms": 120.0, "busy": 0}],
        "transport_floor": {"map": {"p50_ms": map_floor_ms, "p99_ms": map_floor_ms, "n": 3, "bytes": 1},
                            "scan": {"p50_ms": scan_floor_ms, "p99_ms": scan_floor_ms, "n": 3, "bytes": 1, "parts": 201}},
    }


ORTHO = {"data": "d", "timings_s": {"median": {"reference": 1.0, "fast_warm": 0.02, "floor": 0.01}},
         "speedup": {"warm": 50.0, "at_most": 100.0}, "fast_vs_reference": {"relative_l2": 1e-17}}
STEPS = {"command": "c", "measured_at": "t", "load_average_before": [0.5], "map": "m", "repeat": 3,
         "reference_commit": "abc", "steps": [{"step": "peak search", "name": "find_peak", "before_ms": 1.0, "after_ms": 0.2}],
         "prepare_ms": {"before": 3.0, "after": 0.6}, "sampling_variants_ms": {"before": 8.0, "after": 4.0},
         "same_prepared_map_checksum": True}


def test_every_target_has_its_floor_ratio_and_verdict():
    result = report.collect(_serving(bare_ms=4.0, map_floor_ms=0.4, scan_floor_ms=40.0), ORTHO, STEPS)
    t = result["targets"]
    assert set(t) == set(report.TARGETS)
    assert t["map_e2e"]["ratio"] == 2.5 and t["map_e2e"]["met"] is False and t["map_e2e"]["least_possible"] == 1.1
    assert t["scan_e2e"]["floor_ms"] == 44.0 and t["scan_e2e"]["ratio"] == round(90 / 44, 3) and t["scan_e2e"]["met"] is False
    assert t["stream_after_last_frame"]["ratio"] == 1.75 and t["stream_after_last_frame"]["met"] is True
    assert t["orthonormalise"]["ratio"] == 50.0 and t["orthonormalise"]["met"] and t["orthonormalise"]["same_result"]
    assert t["throughput_16"]["ratio"] == 0.6 and t["throughput_16"]["met"] is True  # 150 maps/s x 4 ms
    assert t["results_on"]["ratio"] == 1.04 and t["results_on"]["met"] is True
    assert t["prepare"]["measured"] == 0.6 and t["prepare"]["met"] is False
    assert result["map_default"]["floor_ms"] == 20.0


def test_tables_name_their_files_and_every_target():
    from defectscope.benchmarks import tables

    result = report.collect(_serving(bare_ms=4.0, map_floor_ms=0.4, scan_floor_ms=40.0), ORTHO, STEPS)
    page, readme = tables.page(result, STEPS), tables.readme(result)
    assert "`benchmarks/results.json`" in page and "`benchmarks/prepare_steps.json`" in page
    assert "`benchmarks/results.json`" in readme
    for t in result["targets"].values():
        assert t["what"] in readme and t["what"] in page
    assert page.count("**no**") == 3  # the map, prepare and scan targets of this made-up run


def test_update_page_replaces_only_the_bench_block(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(f"head\n{report.START}\nold\n{report.END}\ntail\n")
    assert report.update_page("new\n", page)
    assert page.read_text() == f"head\n{report.START}\nnew\n{report.END}\ntail\n"
    (tmp_path / "q.md").write_text("no markers")
    assert not report.update_page("x", tmp_path / "q.md")


def test_the_committed_results_regenerate_the_committed_tables():
    """The tables in README.md and docs/performance.md are those made from benchmarks/results.json."""
    import json

    from defectscope.benchmarks import tables

    result = json.loads(report.RESULTS.read_text())
    steps = json.loads(report.STEPS.read_text()) if report.STEPS.is_file() else None
    assert tables.readme(result) in report.README.read_text()
    assert tables.page(result, steps) in report.PAGE.read_text()
    assert tables.orthonormalise_table(result) in report.ORTHO_PAGE.read_text()


def test_the_preparation_benchmark_measures_its_steps_and_the_data_passes_alone():
    from defectscope.benchmarks.bench_prepare import measure

    r = measure(3)
    assert r["shape"] == [64, 64, 64] and 0 < r["data_passes_ms"] and 0 < r["prepare_ms"]
    assert {"find_peak", "estimate_oversampling", "_centre"} <= set(r["steps_ms"])
