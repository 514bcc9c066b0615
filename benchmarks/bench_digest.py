"""Benchmark: what the replay digest costs on a raw 201x256x256 scan (53 MB) with ``--results`` on.

    python -m defectscope.benchmarks.bench_digest [--repeat N] [--out FILE.json]

A server with a results log fingerprints every ok request that chose its own id
(``results.request_digest``: the input, the model, every byte of the frames), before its reply leaves.
This measures, in one run:

- ``digest``: ``request_digest`` of the scan as the server holds it (one buffer per frame, parsed by
  ``protocol.parse_classify`` from the same bytes the client sends), and SHA-256 of the same bytes for
  reference (the digest used before XXH3);
- ``end_to_end``: the same scan sent by the client with a fresh request id to two real ``defectscope
  serve`` processes, one with ``--results`` and one without, alternately (so both see the same load);
- ``digest_over_end_to_end``: the digest's median over the median end to end with ``--results`` (target
  below 0.05), and ``results_on_over_off``: the cost of the whole results log (digest + row + flush).

The scan is the measured 34-ID-C one when ``../shared/data`` is there, else a synthetic one of the same
shape. Writes JSON to ``docs/eval/digest.json`` (kept in the repository: the docs quote it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from defectscope.benchmarks.bench_serving import example_scan, machine, serve, summary

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "eval" / "digest.json"  # kept: docs/performance.md quotes it


def digest_times(frames, geometry: dict, model: dict, repeat: int) -> dict:
    from defectscope import PROTOCOL
    from defectscope.preprocessing.config import Limits
    from defectscope.server.protocol import parse_classify
    from defectscope.server.results import request_digest

    frames = np.ascontiguousarray(frames)
    header = {"protocol": PROTOCOL, "op": "classify", "request_id": "bench",
              "input": {"kind": "scan", "shape": list(frames.shape), "dtype": frames.dtype.str, "geometry": geometry}}
    request = parse_classify(header, "bench", [memoryview(f).cast("B") for f in frames], Limits())
    xxh, sha = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        request_digest(request, model)
        xxh.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        h = hashlib.sha256()
        for f in request.frames:
            h.update(memoryview(f).cast("B"))
        h.hexdigest()
        sha.append((time.perf_counter() - t0) * 1e3)
    return {"xxh3_128": summary(xxh), "sha256_reference": summary(sha), "bytes": int(frames.nbytes)}


def _end_to_end(plain, logged, frames, geometry, mask, repeat: int):
    """Client-side milliseconds of the scan on both servers, alternately; and the model's identity."""
    from defectscope.server.client import Client

    times = {"off": [], "on": []}
    with Client(plain.endpoint, timeout_s=120, retries=0) as c_off, \
            Client(logged.endpoint, timeout_s=120, retries=0) as c_on:
        for client in (c_off, c_on):  # warm: mappings built, first-call costs paid
            model = client.classify_scan(frames, geometry, mask=mask)["model"]
        for _ in range(repeat):
            for key, client in (("off", c_off), ("on", c_on)):
                t0 = time.perf_counter()
                client.classify_scan(frames, geometry, mask=mask, request_id=uuid.uuid4().hex)
                times[key].append((time.perf_counter() - t0) * 1e3)
    return times, model


def run(repeat: int) -> dict:
    name, frames, geometry, mask = example_scan()
    with tempfile.TemporaryDirectory() as tmp:
        plain = serve("defectscope-3class")
        logged = serve("defectscope-3class", args=("--results", str(Path(tmp) / "results.h5")))
        try:
            times, model = _end_to_end(plain, logged, frames, geometry, mask, repeat)
        finally:
            plain.stop(), logged.stop()
    digest = digest_times(frames, geometry, model, repeat)
    on, off = summary(times["on"]), summary(times["off"])
    return {
        "scan": name, "shape": list(np.shape(frames)), "machine": machine(),
        "digest": digest,
        "end_to_end": {"results_on": on, "results_off": off},
        "digest_over_end_to_end": round(digest["xxh3_128"]["p50_ms"] / on["p50_ms"], 4),
        "sha256_over_end_to_end": round(digest["sha256_reference"]["p50_ms"] / on["p50_ms"], 4),
        "results_on_over_off": round(on["p50_ms"] / off["p50_ms"], 4),
        "target_digest_over_end_to_end": 0.05,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    result = run(args.repeat)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    d = result["digest"]
    print(f"{result['scan']}: digest {d['xxh3_128']['p50_ms']:.2f} ms (sha256 {d['sha256_reference']['p50_ms']:.2f} ms) "
          f"of {d['bytes'] / 1e6:.1f} MB; end to end with --results {result['end_to_end']['results_on']['p50_ms']:.1f} ms, "
          f"without {result['end_to_end']['results_off']['p50_ms']:.1f} ms; digest / end to end "
          f"{result['digest_over_end_to_end']:.3f} (target < 0.05) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
