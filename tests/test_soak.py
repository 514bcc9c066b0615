"""Soak: `defectscope serve` in a subprocess under a steady request rate with 1 % malformed requests, for
DEFECTSCOPE_SOAK_S seconds (default 3600). Runs only with --slow; writes benchmarks/out/soak.json."""

from __future__ import annotations

import json
import os
import pickle
import random
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, bragg_map
from test_hardening import dealer, health, map_header, rss_kb, serve_process, strict_json

pytestmark = pytest.mark.slow

RATE = 20.0  # requests per second
MALFORMED_EVERY = 100  # 1 %
RSS_EVERY_S = 1.0


def malformed(k: int) -> tuple[list[bytes], str]:
    """The k-th malformed request (cycling through kinds a careless or hostile client sends) and its reason."""
    shape = (64, 64, 64)
    kinds = [
        ([pickle.dumps({"protocol": "defectscope/1", "op": "classify"})], "BAD_MESSAGE"),
        ([random.Random(k).randbytes(256)], "BAD_MESSAGE"),
        ([map_header(shape, request_id=f"bad-{k}"), np.zeros(shape, "<f4").tobytes()[:-4]], "SHAPE_MISMATCH"),
        ([map_header(shape, request_id=f"bad-{k}"), np.full(shape, np.nan, "<f4").tobytes()], "NON_FINITE"),
        ([map_header(shape, "|O", request_id=f"bad-{k}"), bytes(8 * 64**3)], "DTYPE_NOT_ALLOWED"),
        ([map_header((4096, 4096, 4096), request_id=f"bad-{k}"), b"tiny"], "TOO_LARGE"),
    ]
    return kinds[k % len(kinds)]


def robust_p99(latencies_ms, windows: int = 3, per_window: int = 100) -> float:
    """Median, over consecutive windows of requests, of each window's p99 (windows of ``per_window``
    requests, at least ``windows`` of them): a burst of load from elsewhere on the machine moves one
    window's p99, not the figure."""
    lat = np.asarray(latencies_ms, dtype=float)
    size = max(10, min(per_window, len(lat) // windows))
    chunks = [lat[i:i + size] for i in range(0, len(lat) - size + 1, size)]
    return float(np.median([np.percentile(c, 99) for c in chunks]))


def scheduler_ms(pid: int) -> tuple[float, float]:
    """(CPU time, run-queue wait) in ms summed over a process's threads, from /proc/PID/task/*/schedstat:
    the wait is time the server was ready to run but other work held the CPUs."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            r, w, _ = (task / "schedstat").read_text().split()
        except (OSError, ValueError):  # a thread that just ended
            continue
        run, wait = run + int(r), wait + int(w)
    return run / 1e6, wait / 1e6


def test_soak_steady_rate_with_malformed_requests(fixture_model, tmp_path):
    """At 20 requests/s (64^3 maps; every 100th request malformed, of six kinds) for DEFECTSCOPE_SOAK_S s:
    every request gets one reply; the server's RSS at the end (median of the last 10 % of 1 s samples) is
    within 5 % of its RSS over the first 10 % of the run after a warm-up (the first 10 %, at most 120 s);
    the latency of valid requests does not degrade: the robust p99 of the last quarter (median over windows
    of 100 requests of each window's p99, so one burst of outside load cannot decide it) is at most 10 %
    above the first quarter's (one-sided: faster is fine); health's error count equals the malformed
    requests sent, reason by reason, and its request count equals all requests sent. The summary also gives
    the server's CPU and run-queue wait per request and the load average per quarter: the latency criterion
    assumes the machine's other load is steady, and those figures tell a busier machine from a slower server."""
    duration = float(os.environ.get("DEFECTSCOPE_SOAK_S", "3600"))
    warm_up = min(120.0, 0.1 * duration)
    n = int(duration * RATE)
    maps = [bragg_map(seed=s, centre=(30.3 + s % 3, 34.1 - s % 2, 29.2 + s % 4)) for s in range(8)]
    payloads = [m.tobytes() for m in maps]
    sent_bad: dict[str, int] = {}
    records = []  # (seconds since start, latency ms, valid?)
    rss = []  # (seconds since start, kB)
    sched = []  # (seconds since start, server CPU ms, server run-queue wait ms, load average 1 min)

    with serve_process(fixture_model, tmp_path / "serve.log") as (proc, endpoint), dealer(endpoint) as sock:
        start = health(sock)
        t0 = time.monotonic()
        next_rss = 0.0
        for i in range(n):
            due = t0 + i / RATE
            # Wait for the slot on the socket itself: nothing may arrive in between (no stray replies).
            while (wait := due - time.monotonic()) > 0:
                assert not sock.poll(wait * 1000), "a reply nobody asked for"
            if time.monotonic() - t0 >= next_rss:
                rss.append((time.monotonic() - t0, rss_kb(proc.pid)))
                sched.append((time.monotonic() - t0, *scheduler_ms(proc.pid), os.getloadavg()[0]))
                next_rss += RSS_EVERY_S
            valid = i % MALFORMED_EVERY != MALFORMED_EVERY // 2
            if valid:
                frames, reason = [map_header(request_id=f"r{i}"), payloads[i % len(payloads)]], None
            else:
                frames, reason = malformed(i // MALFORMED_EVERY)
                sent_bad[reason] = sent_bad.get(reason, 0) + 1
            t_send = time.perf_counter()
            sock.send_multipart([b"", *frames], copy=False)
            assert sock.poll(30000), f"no reply to request {i}"
            reply = strict_json(sock.recv_multipart()[1])
            records.append((time.monotonic() - t0, (time.perf_counter() - t_send) * 1e3, valid))
            if valid:
                assert reply["ok"] and reply["request_id"] == f"r{i}", reply
            else:
                assert not reply["ok"] and reply["error"]["reason"] == reason, (reason, reply)
        elapsed = time.monotonic() - t0
        rss.append((elapsed, rss_kb(proc.pid)))
        sched.append((elapsed, *scheduler_ms(proc.pid), os.getloadavg()[0]))
        end = health(sock)

    t_rss, kb = np.array(rss, dtype=float).T
    baseline = float(np.median(kb[(t_rss >= warm_up) & (t_rss < warm_up + 0.1 * duration)]))
    final = float(np.median(kb[t_rss >= 0.9 * elapsed]))
    t_req, lat, ok = (np.array(c) for c in zip(*records))
    lat_ok = lat[ok.astype(bool)]
    t_ok = t_req[ok.astype(bool)]
    first, last = lat_ok[t_ok < elapsed / 4], lat_ok[t_ok >= 3 * elapsed / 4]
    p99_first, p99_last = robust_p99(first), robust_p99(last)
    # Diagnostics for the latency criterion: what the server spent and waited per request in each quarter,
    # and the machine's load - a slower last quarter with more waiting is the machine, not the server.
    t_s, cpu_ms, wait_ms, load = np.array(sched, dtype=float).T

    def quarter(lo, hi):
        a, b = np.searchsorted(t_s, lo), np.searchsorted(t_s, hi, side="right") - 1
        reqs = max(1, int(np.sum((t_req >= t_s[a]) & (t_req < t_s[b]))))
        return {"server_cpu_ms_per_request": round((cpu_ms[b] - cpu_ms[a]) / reqs, 2),
                "server_runqueue_wait_ms_per_request": round((wait_ms[b] - wait_ms[a]) / reqs, 2),
                "loadavg_1min": round(float(np.mean(load[a:b + 1])), 2)}

    errors = end["requests_failed"] - start["requests_failed"]
    by_reason = {r: end["failures_by_reason"].get(r, 0) - start["failures_by_reason"].get(r, 0)
                 for r in set(end["failures_by_reason"]) | set(start["failures_by_reason"])}
    summary = {
        "duration_s": round(elapsed, 1), "rate_per_s": RATE, "requests": n,
        "achieved_rate_per_s": round(n / elapsed, 2),
        "malformed_sent": sum(sent_bad.values()), "malformed_by_reason": sent_bad,
        "server_errors": errors, "server_errors_by_reason": {r: c for r, c in by_reason.items() if c},
        "server_requests_total": end["requests_total"] - start["requests_total"],
        "rss_kb": {"start": int(kb[0]), "baseline": baseline, "end": final, "max": int(kb.max()),
                   "growth_pct": round(100 * (final / baseline - 1), 2), "warm_up_s": warm_up, "samples": len(kb),
                   # At most ~100 points of the series: [seconds, kB].
                   "series": [[round(t, 1), int(k)] for t, k in zip(t_rss[::max(1, len(kb) // 100)],
                                                                     kb[::max(1, len(kb) // 100)])]},
        "latency_ms": {
            "first_quarter": {"n": len(first), "p50": round(float(np.median(first)), 2),
                              "p99": round(float(np.percentile(first, 99)), 2), "robust_p99": round(p99_first, 2)},
            "last_quarter": {"n": len(last), "p50": round(float(np.median(last)), 2),
                             "p99": round(float(np.percentile(last, 99)), 2), "robust_p99": round(p99_last, 2)},
            "all_valid": {"p50": round(float(np.median(lat_ok)), 2), "p99": round(float(np.percentile(lat_ok, 99)), 2),
                          "max": round(float(lat_ok.max()), 2)},
            "server_reported": end["latency_ms"],
        },
        "machine": {"cpus": os.cpu_count(), "first_quarter": quarter(0, elapsed / 4),
                    "last_quarter": quarter(3 * elapsed / 4, elapsed)},
    }
    out = REPO / "benchmarks" / "out" / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print("\nsoak:", json.dumps(summary))

    assert summary["server_requests_total"] == n
    assert errors == sum(sent_bad.values()) and summary["server_errors_by_reason"] == sent_bad
    assert final <= 1.05 * baseline, f"RSS grew {summary['rss_kb']['growth_pct']} %"
    assert p99_last <= 1.10 * p99_first, f"p99 {p99_first:.1f} ms -> {p99_last:.1f} ms; {summary['machine']}"
