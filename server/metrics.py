"""Prometheus metrics of a running ZeroMQ server over HTTP (``defectscope serve --metrics-port N``; SPEC §8).

Needs ``prometheus-client`` (the ``[metrics]`` extra); the serving install does without it. What is exposed
(names, labels, a scrape configuration): docs/prometheus.md.

Two sources, no double bookkeeping:

- ``ServerCollector`` reads the server's own state at scrape time: the per-model ``core.Stats`` counters
  (requests, failures by reason, replays, reloads; the same numbers ``health`` reports), the queue, the
  open streams and the served models (name, version, sha256, provider).
- What exists only as it happens is counted from each classify reply, through the server's ``on_reply``
  hooks (called where a reply is logged, before it is sent): the latency of every stage of an answered
  request (``timings_ms``) into a histogram, and the warnings replies carry, by reason.

``start_metrics(server, port)`` serves both on ``http://ADDR:PORT/metrics`` (loopback by default; port 0:
one the OS picks, read back from ``MetricsEndpoint.port``) until ``MetricsEndpoint.stop()``.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "defectscope"

# Seconds: a fixture-model map answers in a few ms, a 128^3 map on CPU in tens of ms, a large raw scan
# (gridding included) in seconds; a loaded shared machine stretches all of them.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Keys of a reply's ``timings_ms`` that are not durations.
NOT_STAGES = frozenset({"batched"})


def _stats(server):
    """``(name, classifier, stats snapshot)`` of every served model, read once."""
    return [(name, c, c.stats.snapshot()) for name, c in list(server.models.items())]


class ServerCollector(Collector):
    """The server's state, read when Prometheus scrapes (``prometheus_client`` custom collector)."""

    def __init__(self, server):
        self.server = server

    def describe(self):
        return []  # names depend on nothing registered up front; no duplicate check needed

    def collect(self):
        server = self.server
        models = _stats(server)
        requests = CounterMetricFamily(
            f"{PREFIX}_requests", "Classify requests answered (ok, failed or replayed), by served model. Requests "
            "refused before a model was chosen (malformed, unknown model, BUSY) count under the default model.",
            labels=["model"])
        failed = CounterMetricFamily(
            f"{PREFIX}_requests_failed", "Classify requests answered with an error, by model and error reason "
            "(SPEC §4 reasons: BAD_MESSAGE, MODEL_UNAVAILABLE, BUSY, ...).", labels=["model", "reason"])
        replayed = CounterMetricFamily(
            f"{PREFIX}_requests_replayed", "Classify requests answered from the results log (a retried request "
            "id), by model; also in requests_total.", labels=["model"])
        reloads = CounterMetricFamily(
            f"{PREFIX}_reloads", "Model reloads, by served model and result (ok: swapped; failed: refused, the "
            "old model kept serving).", labels=["model", "result"])
        last_reload = GaugeMetricFamily(
            f"{PREFIX}_last_reload_timestamp_seconds", "Unix time of the last reload of a model (ok or failed).",
            labels=["model"])
        info = InfoMetricFamily(
            f"{PREFIX}_model", "Served models: name requests give, card name, version, sha256 of the ONNX file, "
            "execution provider (used and requested), cross-check model, whether it is the default.",
            labels=["model"])
        degraded = GaugeMetricFamily(
            f"{PREFIX}_model_degraded", "1 when a model serves on another provider than the one asked for "
            "(CUDA asked, CPU used).", labels=["model"])
        for name, classifier, snap in models:
            p = classifier.predictor
            ident = p.describe()
            requests.add_metric([name], snap["requests_total"])
            replayed.add_metric([name], snap["replayed"])
            for reason, n in sorted(snap["failures_by_reason"].items()):
                failed.add_metric([name, reason], n)
            for result in ("ok", "failed"):
                reloads.add_metric([name, result], snap["reloads"][result])
            if snap["reloads"]["last"]:
                last_reload.add_metric([name], snap["reloads"]["last"]["time"])
            cross = classifier.cross_check.describe() if classifier.cross_check is not None else None
            info.add_metric([name], {
                "card_name": str(ident["name"]), "version": str(ident["version"]), "sha256": str(ident["sha256"]),
                "provider": str(p.provider), "provider_requested": str(p.requested_provider),
                "cross_check": f"{cross['name']}:{cross['version']}" if cross else "",
                "default": str(name == server.default_model).lower()})
            degraded.add_metric([name], 1.0 if p.degraded else 0.0)
        yield from (requests, failed, replayed, reloads, last_reload, info, degraded)
        yield from self._server_state(server)

    @staticmethod
    def _server_state(server):
        """Queue, streams and life of the server as a whole (not per model)."""
        queued = server._queue.qsize()
        depth = server.queue_depth()
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Classify requests queued or being worked on (as health "
                                "reports queue_depth).", value=depth)
        yield GaugeMetricFamily(f"{PREFIX}_queue_waiting", "Classify requests queued, not started yet.", value=queued)
        yield GaugeMetricFamily(f"{PREFIX}_in_flight", "Work in progress: requests in a worker, streamed scans "
                                "being classified, reloads loading.", value=max(0, depth - queued))
        yield GaugeMetricFamily(f"{PREFIX}_queue_length", "Requests that may wait before BUSY (serve --queue).",
                                value=server.limits.queue_length)
        streams = server._streams
        if streams is not None:
            yield GaugeMetricFamily(f"{PREFIX}_streams_open", "Streamed scans whose frames are still arriving.",
                                    value=len(streams.registry))
            yield CounterMetricFamily(f"{PREFIX}_stream_frames_dropped", "Frames dropped for arriving after "
                                      "their stream had ended.", value=streams.registry.frames_dropped)
        yield GaugeMetricFamily(f"{PREFIX}_draining", "1 while the server stops: new work is refused.",
                                value=1.0 if server.draining else 0.0)
        yield GaugeMetricFamily(f"{PREFIX}_start_time_seconds", "Unix time the server's counters started.",
                                value=server.classifier.stats.started)


class ReplyMetrics:
    """What is counted as each classify reply goes out (``Server.on_reply``): stage latencies and warnings."""

    def __init__(self, server, registry: CollectorRegistry):
        self.server = server
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds", "Time of each stage of an answered classify request (the "
            "reply's timings_ms: decode, orthonormalise, prepare, infer, sampling_check, cross_check; total is "
            "the whole request), by model. A stage that did not run (0 ms) and replayed replies are not observed.",
            ["model", "stage"], buckets=LATENCY_BUCKETS, registry=registry)
        self.batched = Histogram(
            f"{PREFIX}_inference_batch_maps", "Maps inferred in the one call that answered a request "
            "(serve --batch-max), by model; observed once per reply.", ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)
        self.warnings = Counter(
            f"{PREFIX}_reply_warnings", "Warnings carried by answered requests, by model and reason "
            "(SAMPLING_SENSITIVE, MODELS_DISAGREE, ...); a batch reply counts each map's.", ["model", "reason"],
            registry=registry)

    def model_name(self, ident) -> str:
        """The served name of the model a reply names: the one serving that identity, else its card name
        (a reply of a model reloaded away while it was answered)."""
        for name, classifier in list(self.server.models.items()):
            if classifier.predictor.describe() == ident:
                return name
        return str(ident.get("name")) if isinstance(ident, dict) else "unknown"

    def __call__(self, reply: dict, request=None) -> None:
        if not reply.get("ok") or reply.get("replayed"):
            return  # errors: counted by Stats (requests_failed); replays carry an earlier request's times
        model = self.model_name(reply.get("model"))
        timings = reply.get("timings_ms") or {}
        for stage, ms in timings.items():
            # A stage of 0 ms did not run for this input (orthonormalise of a map): not observed.
            if stage not in NOT_STAGES and isinstance(ms, (int, float)) and (ms > 0 or stage == "total"):
                self.latency.labels(model, stage).observe(ms / 1e3)
        if isinstance(timings.get("batched"), int):
            self.batched.labels(model).observe(timings["batched"])
        else:
            self.batched.labels(model).observe(1)
        for w in reply.get("warnings") or ():
            self.warnings.labels(model, str(w.get("reason", "UNKNOWN"))).inc()


class MetricsEndpoint:
    """The HTTP endpoint ``start_metrics`` started: ``port``, ``url``, ``registry``; ``stop()`` ends it."""

    def __init__(self, server, httpd, thread, registry, hook):
        self.server, self._httpd, self._thread, self.registry, self._hook = server, httpd, thread, registry, hook
        self.addr, self.port = httpd.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and counting (idempotent)."""
        if self._hook in self.server.on_reply:
            self.server.on_reply.remove(self._hook)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_metrics(server, port: int, addr: str = "127.0.0.1", *, process: bool = True) -> MetricsEndpoint:
    """Serve ``server``'s metrics on ``http://addr:port/metrics`` from a daemon thread; returns the endpoint
    (``port`` is the bound one: with ``port=0`` the OS picks it). ``process``: also the standard process,
    Python GC and platform metrics (``process_*``, ``python_*``). Raises ``OSError`` when it cannot bind."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))
    if process:
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
        PlatformCollector(registry=registry)
    hook = ReplyMetrics(server, registry)
    httpd, thread = start_http_server(int(port), addr=addr, registry=registry)
    server.on_reply.append(hook)
    endpoint = MetricsEndpoint(server, httpd, thread, registry, hook)
    log.info("defectscope metrics on %s", endpoint.url)
    return endpoint
