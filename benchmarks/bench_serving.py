"""Benchmark: the serving path end to end against its floor, bare ONNX Runtime inference, in one run.

    python -m defectscope.benchmarks.bench_serving [--out FILE.json] [--model NAME|PATH] [--quick]

Everything runs against a real ``defectscope serve`` child process (the production command: BLAS on one
thread, the model's own pipeline) over real ZeroMQ sockets on loopback, with the same model as the floor:

- ``floors``: ``onnxruntime.InferenceSession.run`` on one prepared 64^3 map, batch 1, on one and on two
  intra-op threads (``best``: the faster, the floor of every ratio), and the bare inferences of a default
  request (the map, its three sampling variants, the cross-check model); the one-map floors are measured
  again alternating request by request with the ``map`` round trips, and those are the figures kept, so a
  ratio's two figures see the same load; ``bare_inference``: the floor at the server's threads (``--threads``);
- ``map``: a 64^3 simulated pattern (raw counts, uint32) from client send to reply, and the reply's stages,
  against ``serve --no-sampling-check --cross-check none`` (so are the scans, the throughput and CURVE);
  ``map_default``: the same against ``serve`` as shipped (both checks on); ``map_results``: with ``--results``,
  and ``map_results_off`` without, two servers at once, requests alternating between them;
- ``scan``: a raw 201x256x256 rocking scan (the measured 34-ID-C scan when ``../shared/data`` is there,
  else a synthetic one of that shape and geometry) sent as one message, one frame per message part;
- ``scan_stream``: the same scan streamed, one message per frame, as fast as the client can send, and
  ``scan_stream_paced``: one frame every 5 ms, as a (fast) detector delivers them; ``after_last_frame``
  is the wait a beamline sees once the detector's last frame is out;
- ``throughput``: 1, 4 and 16 concurrent clients sending maps to ``--workers`` server workers (one ONNX
  Runtime thread each), with and without batching (``--batch-max``);
- ``curve``: the map round trip with CURVE encryption and authentication on;
- ``transport_floor``: the same map and scan messages answered by an echo server that reads nothing
  (``bench_floor``): ZeroMQ and the memory copies alone, the least any server can take on this machine;
  the scan's floor (echo round trip + bare inference) is measured again alternating with the scans
  (``scan.floor``), and the paced stream's bare inference between the streams: the figures the ratios use.

Medians and p99 of ``--repeat`` requests (default 200 maps, 15 scans); writes JSON to
``benchmarks/out/serving.json`` with the machine's load average before and after (the machines are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from defectscope.benchmarks.serving_common import (  # noqa: F401 (imported from here by report and tests)
    VERSIONS,
    pct,
    summary,
    stage_medians,
    machine,
    _version,
    example_map,
    example_scan,
    bare_inference,
    round_trips,
    throughput,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "out" / "serving.json"


FRAME_INTERVAL_S = 0.005


def _paced(frames):
    next_at = time.perf_counter()
    for frame in frames:
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        next_at += FRAME_INTERVAL_S
        yield frame


def serve(model: str, args=()):
    from defectscope.server.demo import ServedModel

    return ServedModel(model, args=args)


def curve_keys(tmp: Path):
    import zmq.auth

    (tmp / "allow").mkdir()
    server_pub, server_secret = zmq.auth.create_certificates(tmp, "server")
    client_pub, client_secret = zmq.auth.create_certificates(tmp / "allow", "client")
    s_pub, _ = zmq.auth.load_certificate(server_pub)
    c_pub, c_sec = zmq.auth.load_certificate(client_secret)
    return server_secret, tmp / "allow", {"server_public": s_pub, "public": c_pub, "secret": c_sec}


LEAN = ["--no-sampling-check", "--cross-check", "none"]  # the served map without the two checks


def floors(model_path: Path, prepared: np.ndarray, repeat: int) -> dict:
    """Bare ONNX Runtime inference, batch 1, on one and on two threads (``best``: the faster), and the bare
    inferences a default request makes (the map, its three sampling variants, the cross-check model)."""
    from defectscope.model.registry import cross_check_for

    by_threads = {str(t): bare_inference(model_path, prepared, t, repeat) for t in (1, 2)}
    best = min(by_threads.values(), key=lambda b: b["p50_ms"])
    other = cross_check_for(model_path)
    checks = bare_checks(model_path, other, prepared, max(20, repeat // 4)) if other else None
    return {"by_threads": by_threads, "best": best, "default_request": checks,
            "sessions": bare_sessions(model_path, prepared)}  # for ``interleaved`` (not written out)


def interleaved(client, volume, sessions: dict, repeat: int):
    """Map round trips and bare inferences (each thread count) in turn, request by request: the figure and its
    floor under the same load. Returns the round-trip times, the replies and the floors by thread count."""
    times, replies, bare = [], [], {t: [] for t in sessions}
    for i in range(repeat + 10):
        for t, (session, feed) in sessions.items():
            t0 = time.perf_counter()
            session.run(None, feed)
            if i >= 10:
                bare[t].append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        reply = client.classify(volume)
        if i >= 10:
            times.append((time.perf_counter() - t0) * 1e3)
            replies.append(reply)
    floors = {t: {**summary(v), "threads": int(t), "provider": "CPUExecutionProvider",
                  "measured": "alternating with the map requests"} for t, v in bare.items()}
    return times, replies, floors


def _bare_times(session_feed, n: int) -> list[float]:
    session, feed = session_feed
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        session.run(None, feed)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def interleaved_scan(client, frames, geometry, mask, best, repeat: int):
    """The scan's round trips, each followed by its floor's parts: the same message to an echo server
    (``bench_floor``) and a bare inference. Returns the times, the replies and the floor."""
    from defectscope.benchmarks.bench_floor import EchoServer
    from defectscope.server.client import Client, _wire_array

    wire = _wire_array(frames)
    header = {"op": "classify", "input": {"kind": "scan", "shape": list(wire.shape), "dtype": wire.dtype.str}}
    times, replies, echo, bare = [], [], [], []
    with EchoServer() as server, Client(server.endpoint, timeout_s=60, retries=0) as echo_client:
        for i in range(repeat + 2):
            t0 = time.perf_counter()
            reply = client.classify_scan(frames, geometry, mask=mask)
            t1 = time.perf_counter()
            echo_client.request(dict(header), [memoryview(np.ascontiguousarray(f)).cast("B") for f in wire])
            t2 = time.perf_counter()
            b = _bare_times(best, 3)
            if i >= 2:
                times.append((t1 - t0) * 1e3)
                replies.append(reply)
                echo.append((t2 - t1) * 1e3)
                bare += b
    floor = {"transport": summary(echo), "bare_inference": summary(bare),
             "what": "the echo server's round trip of the same message and bare inference, alternating with the scans"}
    return times, replies, floor


def bare_sessions(model_path: Path, prepared: np.ndarray, threads=(1, 2)) -> dict:
    import onnxruntime as ort

    out = {}
    for t in threads:
        options = ort.SessionOptions()
        options.intra_op_num_threads = t
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        out[str(t)] = (session, {session.get_inputs()[0].name: prepared[np.newaxis, ..., np.newaxis].astype(np.float32)})
    return out


def bare_checks(model_path: Path, other: Path, prepared: np.ndarray, repeat: int) -> dict:
    """Bare inference of what a default request infers: the map (batch 1), its three sampling variants
    (batch 3) and the cross-check model on the map (batch 1), ONNX Runtime's default threads."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (model_path, other)]
    x = prepared[np.newaxis, ..., np.newaxis].astype(np.float32)
    x3 = np.repeat(x, 3, axis=0)
    name = [s.get_inputs()[0].name for s in sessions]

    def once():
        sessions[0].run(None, {name[0]: x})
        sessions[0].run(None, {name[0]: x3})
        sessions[1].run(None, {name[1]: x})

    times, _ = round_trips(once, repeat, 3)
    return {**summary(times), "what": "batch 1 + batch 3 (sampling variants) + the cross-check model, batch 1",
            "cross_check_model": other.name}


def run(model: str, repeat_maps: int, repeat_scans: int, per_client: int, threads: int | None,
        batch_max: int, workers: int = 2) -> dict:
    """Every measurement of the module docstring, with ``model``, as one dict (``main`` adds the machine)."""
    from defectscope.benchmarks.bench_floor import measure as transport_floor
    from defectscope.model.predictor import Predictor
    from defectscope.model.registry import resolve_model
    from defectscope.preprocessing.pipeline import prepare

    model_path = Path(resolve_model(model))
    pipeline = Predictor(model_path, provider="cpu").pipeline
    volume = example_map()
    prepared = prepare(volume, pipeline).array
    scan_name, frames, geometry, mask = example_scan()
    out = {"model": str(model_path.name), "map_shape": list(volume.shape), "map_dtype": volume.dtype.str,
           "scan": {"name": scan_name, "shape": list(frames.shape), "dtype": frames.dtype.str,
                    "bytes": int(frames.nbytes)}}
    out["floors"] = floors(model_path, prepared, repeat_maps)
    if threads is None:  # the latency server runs ONNX Runtime as the best floor did, here and now
        threads = out["floors"]["best"]["threads"]
    out["transport_floor"] = transport_floor(volume, frames, repeat_maps, repeat_scans)

    server_args = ["--threads", threads] if threads else []
    served = serve(model, server_args + LEAN)
    try:
        through_server(served, out, volume, frames, geometry, mask, repeat_maps, repeat_scans)
    finally:
        out["floors"].pop("sessions", None)
        out["server"]["exit_code"] = served.stop()
    out["bare_inference"] = out["floors"]["by_threads"][str(threads)]
    out["server"]["options"] = " ".join(map(str, server_args + LEAN))
    out["map_default"] = map_only(model, server_args, volume, repeat_maps // 2, "as shipped: sampling check and cross-check on")
    with tempfile.TemporaryDirectory() as tmp:
        out["map_results"], out["map_results_off"] = paired(
            model, server_args + LEAN + ["--results", Path(tmp) / "results.h5"], server_args + LEAN, volume, repeat_maps,
            "--results on (HDF5 log, one row per reply, flushed)")
    tp_args = ["--threads", 1, "--workers", workers, *LEAN]
    served = serve(model, tp_args)
    try:
        out["throughput"] = [throughput(served.endpoint, volume, c, per_client) for c in (1, 4, 16)]
    finally:
        served.stop()
    out["throughput_options"] = " ".join(map(str, tp_args))
    if batch_max > 1:
        out["throughput_batched"] = batched_throughput(model, tp_args, volume, per_client, batch_max)
    out["curve"] = with_curve(model, server_args + LEAN, volume, repeat_maps, plaintext_p50_ms=out["map"]["p50_ms"])
    return out


def paired(model: str, args_on: list, args_off: list, volume, repeat: int, what: str) -> tuple[dict, dict]:
    """The map round trip against two servers at once, requests alternating between them, so that both
    figures of a ratio see the same load (the machine is shared): (with ``args_on``, with ``args_off``)."""
    from defectscope.server.client import Client

    on, off = serve(model, args_on), serve(model, args_off)
    try:
        with Client(on.endpoint, timeout_s=60, retries=0) as a, Client(off.endpoint, timeout_s=60, retries=0) as b:
            times = {"on": [], "off": []}
            replies = {"on": [], "off": []}
            for i in range(repeat + 5):
                for key, client in (("on", a), ("off", b)) if i % 2 else (("off", b), ("on", a)):
                    t0 = time.perf_counter()
                    reply = client.classify(volume)
                    if i >= 5:
                        times[key].append((time.perf_counter() - t0) * 1e3)
                        replies[key].append(reply)
        return tuple({**summary(times[k]), "stages_ms": stage_medians(replies[k]), "what": what if k == "on" else
                      "the same, without --results, interleaved request by request"} for k in ("on", "off"))
    finally:
        on.stop()
        off.stop()


def map_only(model: str, args: list, volume, repeat: int, what: str) -> dict:
    """The map round trip against a server started with ``args``."""
    from defectscope.server.client import Client

    served = serve(model, args)
    try:
        with Client(served.endpoint, timeout_s=60, retries=0) as client:
            times, replies = round_trips(lambda: client.classify(volume), repeat)
        return {**summary(times), "stages_ms": stage_medians(replies), "what": what,
                "options": " ".join(str(a) for a in args if "results.h5" not in str(a))}
    finally:
        served.stop()


def through_server(served, out: dict, volume, frames, geometry, mask, repeat_maps: int, repeat_scans: int) -> None:
    """Round trips to the server ``served`` from one client, written into ``out``: ``server`` first (``run``
    adds the server's exit code even when a later step fails), ``map``, ``scan`` (completing the scan's
    description), ``scan_stream`` and ``scan_stream_paced``."""
    from defectscope.server.client import Client

    with Client(served.endpoint, timeout_s=120, retries=0) as client:
        info = client.info()
        out["server"] = {"provider": info["provider"], "threads": info.get("threads"), "banner": served.banner}
        sessions = out["floors"].pop("sessions")
        times, replies, bare = interleaved(client, volume, sessions, repeat_maps)
        out["map"] = {**summary(times), "stages_ms": stage_medians(replies),
                      "sent": "alternating with the bare inferences of the floor, so that both see the same load"}
        out["floors"]["by_threads"] = bare
        out["floors"]["best"] = min(bare.values(), key=lambda b: b["p50_ms"])
        best = sessions[str(out["floors"]["best"]["threads"])]
        times, replies, floor = interleaved_scan(client, frames, geometry, mask, best, repeat_scans)
        out["scan"].update({**summary(times), "stages_ms": stage_medians(replies), "sent": "one message, one frame per part",
                            "floor": floor})
        times, replies = round_trips(lambda: client.classify_scan_stream(frames, geometry, mask=mask), repeat_scans, 2)
        out["scan_stream"] = {**summary(times), "stages_ms": stage_medians(replies),
                              "after_last_frame_p50_ms": pct([r["timings_ms"]["after_last_frame"] for r in replies], 50),
                              "sent": "one message per frame, as fast as the client can"}
        # As a detector delivers them: one frame every FRAME_INTERVAL_S (faster than any rocking scan's
        # exposures), so each frame is gridded before the next arrives and only the tail remains.
        paced = lambda: client.classify_scan_stream(_paced(frames), geometry, n_frames=len(frames), mask=mask)  # noqa: E731
        bare_between = []

        def paced_then_bare():  # the floor's bare inference between the streams, under their load
            reply = paced()
            bare_between.extend(_bare_times(best, 10))
            return reply

        times, replies = round_trips(paced_then_bare, max(3, repeat_scans // 3), 1)
        out["scan_stream_paced"] = {"bare_inference_between": summary(bare_between),
            "frame_interval_ms": FRAME_INTERVAL_S * 1e3, **summary(times), "stages_ms": stage_medians(replies),
            "after_last_frame_p50_ms": pct([r["timings_ms"]["after_last_frame"] for r in replies], 50),
            "after_last_frame_p99_ms": pct([r["timings_ms"]["after_last_frame"] for r in replies], 99),
            # Answers made before the last frame and given as made (server.lookahead); the others were
            # prepared from the box kept up to date, or made at the end.
            "answered_ahead": sum("ahead" in r["timings_ms"] for r in replies), "replies": len(replies)}


def batched_throughput(model: str, server_args: list, volume, per_client: int, batch_max: int) -> dict:
    """The throughput runs against a server that batches up to ``batch_max`` maps."""
    served = serve(model, [*server_args, "--batch-max", batch_max])
    try:
        return {"batch_max": batch_max, "runs": [throughput(served.endpoint, volume, c, per_client) for c in (1, 4, 16)]}
    finally:
        served.stop()


def with_curve(model: str, server_args: list, volume, repeat_maps: int, *, plaintext_p50_ms: float) -> dict:
    """The map round trip with CURVE encryption and authentication on, and its ratio to plain text."""
    from defectscope.server.client import Client

    with tempfile.TemporaryDirectory() as tmp:
        secret, allow, keys = curve_keys(Path(tmp))
        served = serve(model, [*server_args, "--curve-secret", secret, "--curve-allow", allow])
        try:
            with Client(served.endpoint, timeout_s=60, retries=0, curve=keys) as client:
                times, _ = round_trips(lambda: client.classify(volume), repeat_maps)
            return {**summary(times), "vs_plaintext": round(pct(times, 50) / plaintext_p50_ms, 3)}
        finally:
            served.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="defectscope-3class", help="bundled model name or .onnx path")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--repeat", type=int, default=200, help="map requests per measurement")
    p.add_argument("--scan-repeat", type=int, default=15, help="scan requests per measurement")
    p.add_argument("--per-client", type=int, default=60, help="requests per client in the throughput runs")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads of the latency server (default: those of the best floor)")
    p.add_argument("--batch-max", type=int, default=8, help="batching for the batched throughput run (1: skip)")
    p.add_argument("--workers", type=int, default=2, help="server workers in the throughput runs")
    p.add_argument("--quick", action="store_true", help="few repetitions (a smoke run, not figures)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeat, args.scan_repeat, args.per_client = 20, 2, 5
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the server runs (server.cli)
    before = machine()
    t0 = time.time()
    measured_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result = run(args.model, args.repeat, args.scan_repeat, args.per_client, args.threads, args.batch_max,
                 args.workers)
    result["machine"] = before
    result["measured_at"] = measured_at
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    result["wall_s"] = round(time.time() - t0, 1)
    bare = result["floors"]["best"]["p50_ms"]  # every ratio against the best bare inference here
    f = result["transport_floor"]
    result["ratios"] = {
        "map_e2e_over_bare": round(result["map"]["p50_ms"] / bare, 3),
        "scan_e2e_over_bare": round(result["scan"]["p50_ms"] / bare, 3),
        "scan_e2e_over_transport_and_bare": round(result["scan"]["p50_ms"] / (
            result["scan"]["floor"]["transport"]["p50_ms"] + result["scan"]["floor"]["bare_inference"]["p50_ms"]), 3),
        "map_transport_floor_over_bare": round(f["map"]["p50_ms"] / bare, 3),
        "scan_transport_floor_over_bare": round(f["scan"]["p50_ms"] / bare, 3),
        "scan_stream_after_last_frame_over_bare": round(result["scan_stream"]["after_last_frame_p50_ms"] / bare, 3),
        "scan_stream_paced_after_last_frame_over_bare": round(result["scan_stream_paced"]["after_last_frame_p50_ms"]
                                                              / result["scan_stream_paced"]["bare_inference_between"]["p50_ms"], 3),
        "throughput_16_over_one_per_bare": round(result["throughput"][-1]["per_s"] * bare / 1e3, 3),
        "results_on_over_off": round(result["map_results"]["p50_ms"] / result["map_results_off"]["p50_ms"], 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"best bare {bare:.2f} ms; map e2e {result['map']['p50_ms']:.2f} ms ({result['ratios']['map_e2e_over_bare']}x); "
          f"scan e2e {result['scan']['p50_ms']:.1f} ms ({result['ratios']['scan_e2e_over_bare']}x); "
          f"stream after last frame {result['scan_stream']['after_last_frame_p50_ms']:.1f} ms -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
