"""Benchmark: the transport floor -- what the same requests cost when the server does nothing at all.

    python -m defectscope.benchmarks.bench_floor [--out FILE.json] [--repeat N] [--scan-repeat N]

An echo server (a ROUTER in a child process, as ``defectscope serve`` is one) receives each request, looks
at nothing, and answers a one-line JSON reply; the client is the production ``Client``, sending the very
messages of ``bench_serving``: a 64^3 uint32 map (one buffer, 1 MiB) and a 201x256x256 float32 scan (one
message, one frame per part, 53 MB). The round trip is then only ZeroMQ over loopback, both processes'
memory copies and the client's own work: no server can answer faster on this machine. Dividing by bare
inference says whether a ratio target of issue 6 is reachable at all, before any preparation is counted.

``bench_serving`` calls ``measure`` in the same run as the figures it is compared with.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "out" / "floor.json"


def _echo(endpoint_queue, stop_queue) -> None:
    """Child process: answer every request with ``{"ok": true}`` and its request id; read nothing else."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    endpoint_queue.put(f"tcp://127.0.0.1:{port}")
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while stop_queue.empty():
        if not poller.poll(100):
            continue
        parts = sock.recv_multipart(copy=False)
        identity, header = parts[0].bytes, json.loads(parts[2].bytes)
        reply = {"protocol": header.get("protocol"), "request_id": header.get("request_id"), "ok": True}
        sock.send_multipart([identity, b"", json.dumps(reply).encode()])
    sock.close(0)
    ctx.term()


class EchoServer:
    """The echo server in a child process (spawned: no state of the parent's is shared)."""

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self._endpoint, self._stop = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_echo, args=(self._endpoint, self._stop), daemon=True)
        self.proc.start()
        self.endpoint = self._endpoint.get(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop.put(True)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def measure(volume: np.ndarray, frames: np.ndarray, repeat: int, scan_repeat: int) -> dict:
    """Median and p99 round trips (ms) of the map and the scan message through the echo server."""
    from defectscope.benchmarks.bench_serving import round_trips, summary
    from defectscope.server.client import Client, _wire_array

    volume, frames = _wire_array(volume), _wire_array(frames)
    map_header = {"op": "classify", "input": {"kind": "map", "shape": list(volume.shape), "dtype": volume.dtype.str}}
    scan_header = {"op": "classify", "input": {"kind": "scan", "shape": list(frames.shape), "dtype": frames.dtype.str}}
    map_parts = [memoryview(volume).cast("B")]
    with EchoServer() as echo, Client(echo.endpoint, timeout_s=60, retries=0) as client:
        map_times, _ = round_trips(lambda: client.request(dict(map_header), map_parts)[0], repeat)
        # As Client.classify_scan builds them, inside the timed call: one part per frame.
        scan_times, _ = round_trips(
            lambda: client.request(dict(scan_header), [memoryview(np.ascontiguousarray(f)).cast("B") for f in frames])[0],
            scan_repeat, 2)
    return {"map": {**summary(map_times), "bytes": int(volume.nbytes)},
            "scan": {**summary(scan_times), "bytes": int(frames.nbytes), "parts": int(frames.shape[0])},
            "what": "echo server, nothing read or computed: ZeroMQ over loopback, memory copies and the client"}


def main(argv=None) -> int:
    from defectscope.benchmarks.bench_serving import example_map, example_scan, machine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--repeat", type=int, default=200)
    p.add_argument("--scan-repeat", type=int, default=15)
    args = p.parse_args(argv)
    _, frames, _, _ = example_scan()
    result = {"machine": machine(), **measure(example_map(), frames, args.repeat, args.scan_repeat)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"transport floor: map {result['map']['p50_ms']:.2f} ms, scan {result['scan']['p50_ms']:.1f} ms -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
