"""The transport floor of issue 6's ratio targets: the echo server answers every message, and the report
calls a target unreachable exactly when inference plus the bytes' round trip already exceeds it."""

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
    return {
        "bare_inference": {"p50_ms": bare_ms, "p99_ms": bare_ms, "n": 3, "threads": 1},
        "ratios": {"map_e2e_over_bare": 2.0, "scan_e2e_over_bare": 25.0},
        "machine": {"cpu_count": 2, "processor": "x86_64", "load_average": [0.1, 0.1, 0.1]},
        "server": {"provider": "CPUExecutionProvider"}, "model": "m.onnx",
        "map": timing, "scan": {**timing, "shape": [201, 256, 256], "bytes": 52690944},
        "scan_stream": {**timing, "after_last_frame_p50_ms": 5.0}, "throughput": [],
        "transport_floor": {"map": {"p50_ms": map_floor_ms, "p99_ms": map_floor_ms, "n": 3, "bytes": 1},
                            "scan": {"p50_ms": scan_floor_ms, "p99_ms": scan_floor_ms, "n": 3, "bytes": 1, "parts": 201}},
    }


def test_report_marks_a_target_below_the_floor_unreachable():
    ortho = {"data": "d", "timings_s": {"median": {"reference": 1.0, "fast_warm": 0.08}},
             "speedup": {"warm": 12.5}, "fast_vs_reference": {"relative_l2": 1e-17}}
    result = report.collect(_serving(bare_ms=4.0, map_floor_ms=0.4, scan_floor_ms=40.0), ortho)
    map_t, scan_t = result["targets"]["map_e2e_over_bare"], result["targets"]["scan_e2e_over_bare"]
    assert map_t["floor_over_bare"] == 1.1 and map_t["reachable_here"] is True
    assert abs(map_t["budget_ms"] - 0.2) < 1e-9  # (1.15 - 1.1) x 4 ms left for everything but inference
    assert scan_t["floor_over_bare"] == 11.0 and scan_t["reachable_here"] is False
    table = report.markdown(result)
    assert "unreachable on this machine" in table and "leaves 0.20 ms" in table
