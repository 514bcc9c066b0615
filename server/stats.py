"""Counters and a window of recent latencies of one served model, for ``health``, Tango and Prometheus."""

from __future__ import annotations

import collections
import threading
import time

import numpy as np


class Stats:
    """Counters and a window of recent latencies, for ``health`` and the Tango attributes.

    One ``Stats`` outlives a model reload (the new ``Classifier`` takes the old one's), so the counters
    cover the whole run. ``replayed``: requests answered from the results log (an earlier reply to the same
    request id, SPEC §4 retries), counted in ``requests_total`` too. ``reloads``: model reloads that swapped
    the model (``ok``) or were refused (``failed``), and what the ``last`` one did."""

    def __init__(self, window: int = 1000):
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests_total = 0
        self.requests_failed = 0
        self.replayed = 0
        self.failures_by_reason: collections.Counter = collections.Counter()
        self._latencies = collections.deque(maxlen=window)
        self.reloads = {"ok": 0, "failed": 0, "last": None}

    def record(self, ok: bool, total_ms: float | None = None, reason: str | None = None) -> None:
        with self._lock:
            self.requests_total += 1
            if ok and total_ms is not None:
                self._latencies.append(total_ms)
            if not ok:
                self.requests_failed += 1
                self.failures_by_reason[reason or "INTERNAL"] += 1

    def record_replay(self) -> None:
        with self._lock:
            self.requests_total += 1
            self.replayed += 1

    def record_reload(self, ok: bool, **last) -> None:
        """Count a reload; ``last``: what it did (``from``/``to`` model identities, or ``error``)."""
        with self._lock:
            self.reloads["ok" if ok else "failed"] += 1
            self.reloads["last"] = {"ok": ok, "time": time.time(), **last}

    def snapshot(self) -> dict:
        with self._lock:
            lat = np.array(self._latencies, dtype=float)
            pct = {f"p{p}": round(float(np.percentile(lat, p)), 3) for p in (50, 90, 99)} if lat.size else {}
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "requests_total": self.requests_total,
                "requests_failed": self.requests_failed,
                "failures_by_reason": dict(self.failures_by_reason),
                "replayed": self.replayed,
                "reloads": {**self.reloads, "last": dict(self.reloads["last"]) if self.reloads["last"] else None},
                "latency_ms": {**pct, "window": int(lat.size)},
            }
