"""What the serving benchmarks share: percentiles, the machine, the example map and scan, bare inference,
timed round trips and the concurrent-client throughput (``bench_serving``)."""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np

VERSIONS = ("numpy", "onnxruntime", "pyzmq", "xrayutilities", "scipy")


def pct(values, q) -> float:
    return round(float(np.percentile(np.asarray(values, dtype=float), q)), 3)


def summary(values) -> dict:
    return {"p50_ms": pct(values, 50), "p99_ms": pct(values, 99), "n": len(values)}


def stage_medians(replies) -> dict:
    keys = sorted({k for r in replies for k in r["timings_ms"]})
    return {k: round(float(np.median([r["timings_ms"].get(k, 0.0) for r in replies])), 3) for k in keys}


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "versions": {name: _version(name) for name in VERSIONS},
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def example_map() -> np.ndarray:
    """One simulated 64^3 pattern (screw dislocation, Au, seed of the demo), raw counts."""
    from defectscope.server.demo import make_examples

    counts, rows, _ = make_examples(n_per_class=1)
    return np.ascontiguousarray(counts[[r["label"] for r in rows].index("screw")])


def example_scan():
    """(name, frames, geometry dict, mask) of a 201x256x256 scan."""
    from defectscope.benchmarks.bench_orthonormalise import SCAN_34IDC, synthetic_scan
    from defectscope.server.demo import load_measured_scan

    measured = load_measured_scan() if SCAN_34IDC.is_dir() else None
    if measured is not None:
        frames, geometry, mask = measured
        return "APS 34-ID-C Au(111) scan 54 (measured)", frames, geometry, mask
    name, frames, geometry = synthetic_scan()[:3]
    return name, frames, geometry.to_dict(), None


# -- the floor ------------------------------------------------------------------------------------
def bare_inference(model_path: Path, prepared: np.ndarray, threads: int | None, repeat: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = prepared[np.newaxis, ..., np.newaxis].astype(np.float32)
    for _ in range(10):
        session.run(None, {name: x})
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1e3)
    return {**summary(times), "threads": threads or "onnxruntime default", "provider": session.get_providers()[0]}


# -- through the server ---------------------------------------------------------------------------
def round_trips(send, repeat: int, warmup: int = 5) -> tuple[list[float], list[dict]]:
    for _ in range(warmup):
        send()
    times, replies = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        reply = send()
        times.append((time.perf_counter() - t0) * 1e3)
        replies.append(reply)
    return times, replies


def throughput(endpoint: str, volume: np.ndarray, clients: int, per_client: int, curve=None) -> dict:
    """``clients`` threads, each its own DEALER, sending maps back to back; requests per second overall."""
    from defectscope.errors import Busy
    from defectscope.server.client import Client

    latencies, busy, errors = [], [0], []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def run():
        with Client(endpoint, timeout_s=60, retries=0, curve=curve) as client:
            client.classify(volume)  # connected and warm
            start.wait()
            for _ in range(per_client):
                t0 = time.perf_counter()
                try:
                    client.classify(volume)
                except Busy:
                    with lock:
                        busy[0] += 1
                    continue
                except Exception as exc:  # reported, not hidden
                    errors.append(repr(exc))
                    continue
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1e3)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"clients": clients, "requests": clients * per_client, "completed": len(latencies), "busy": busy[0],
            "errors": errors[:3], "per_s": round(len(latencies) / elapsed, 2), **summary(latencies)}
