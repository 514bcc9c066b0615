"""Prometheus metrics (``server.metrics``, ``serve --metrics-port``): a real server, real requests over
ZeroMQ, the real HTTP endpoint scraped and parsed with prometheus-client's own parser; the numbers must
be those of the replies the test received and of ``health``."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from defectscope.errors import ModelUnavailable
from defectscope.model.fixture import build_fixture_model
from defectscope.model.predictor import Predictor
from defectscope.server.client import Client
from defectscope.server.core import Classifier
from defectscope.server.metrics import start_metrics
from defectscope.server.zmq_server import Server

from conftest import bragg_map
from sync import HANG_S, reap, wait_until
from test_orthonormalise import make_synthetic

CLI = [sys.executable, "-m", "defectscope.server.cli"]
TOKEN = "a-reload-token-of-some-length"


def scrape(url: str) -> list:
    """Every sample of one scrape, parsed as Prometheus parses the text format."""
    with urllib.request.urlopen(url, timeout=HANG_S) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode("utf-8")
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples, name: str, **labels) -> float:
    """The one sample ``name`` whose labels include ``labels``."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{len(found)} samples {name}{labels}"
    return found[0]


def by(samples, name: str, label: str, **labels) -> dict:
    """``{label value: sample value}`` of the samples ``name`` with ``labels``."""
    return {s.labels[label]: s.value for s in samples if s.name == name and labels.items() <= s.labels.items()}


def warnings_of(replies) -> collections.Counter:
    return collections.Counter(w["reason"] for r in replies for w in r["warnings"])


@pytest.fixture(scope="module")
def scan():
    geometry, frames, _ = make_synthetic()
    return geometry.to_dict(), frames


def test_metrics_count_what_the_server_answered(make_server, scan):
    server = make_server()
    name = server.default_model
    with start_metrics(server, 0) as metrics:
        assert metrics.addr == "127.0.0.1" and metrics.port > 0  # loopback by default; the port the OS gave
        with Client(server.endpoint, timeout_s=HANG_S, retries=0) as c:
            oks = [c.classify(bragg_map(seed=1)), c.classify(bragg_map(seed=2), request_id="metrics-2"),
                   c.classify_scan_stream(scan[1], scan[0])]  # a streamed scan: answered by server.streams
            malformed, _ = c.request({"op": "classify", "input": "not a spec"}, raise_on_error=False)
            unknown = c.classify(bragg_map(seed=3), model="no-such-model", raise_on_error=False)
            health = c.health()
        samples = scrape(metrics.url)

    assert all(r["ok"] for r in oks)
    assert malformed["error"]["reason"] == "BAD_MESSAGE" and unknown["error"]["reason"] == "MODEL_UNAVAILABLE"
    # Requests and failures: the server's own counters, as health reports them.
    assert value(samples, "defectscope_requests_total", model=name) == 5 == health["requests_total"]
    assert by(samples, "defectscope_requests_failed_total", "reason", model=name) == \
        {"BAD_MESSAGE": 1, "MODEL_UNAVAILABLE": 1} == health["failures_by_reason"]
    assert value(samples, "defectscope_requests_replayed_total", model=name) == 0 == health["replayed"]
    assert by(samples, "defectscope_reloads_total", "result", model=name) == {"ok": 0, "failed": 0}
    # Latency: one observation per answered request and stage, summing to the replies' own timings.
    totals = [r["timings_ms"]["total"] / 1e3 for r in oks]
    assert value(samples, "defectscope_request_duration_seconds_count", model=name, stage="total") == 3
    assert value(samples, "defectscope_request_duration_seconds_sum", model=name, stage="total") == pytest.approx(sum(totals))
    assert value(samples, "defectscope_request_duration_seconds_bucket", model=name, stage="total", le="+Inf") == 3
    assert value(samples, "defectscope_request_duration_seconds_bucket", model=name, stage="total", le="60.0") == \
        sum(t <= 60 for t in totals)
    for stage in ("decode", "orthonormalise", "prepare", "infer"):
        ran = [r["timings_ms"][stage] / 1e3 for r in oks if r["timings_ms"].get(stage, 0) > 0]
        assert value(samples, "defectscope_request_duration_seconds_count", model=name, stage=stage) == len(ran)
        assert value(samples, "defectscope_request_duration_seconds_sum", model=name, stage=stage) == pytest.approx(sum(ran))
    # Only the streamed scan was gridded (a map's orthonormalise is 0 ms: not observed).
    assert value(samples, "defectscope_request_duration_seconds_count", model=name, stage="orthonormalise") == 1
    # Warnings: those the replies carried, by reason.
    expected = warnings_of(oks)
    assert expected, "the test's maps should carry warnings (e.g. OVERSAMPLING_OUT_OF_RANGE)"
    assert by(samples, "defectscope_reply_warnings_total", "reason", model=name) == expected
    # Queue, streams, state, model.
    assert value(samples, "defectscope_queue_depth") == 0 == health["queue_depth"]
    assert value(samples, "defectscope_in_flight") == 0
    assert value(samples, "defectscope_queue_length") == health["queue_length"]
    assert value(samples, "defectscope_streams_open") == 0 == health["streams"]["open"]
    assert value(samples, "defectscope_draining") == 0
    info = [s.labels for s in samples if s.name == "defectscope_model_info"]
    assert info == [{"model": name, "card_name": health["model"]["name"], "version": health["model"]["version"],
                     "sha256": health["model"]["sha256"], "provider": health["provider"], "provider_requested": "cpu",
                     "cross_check": "", "default": "true"}]
    assert value(samples, "defectscope_model_degraded", model=name) == 0
    assert value(samples, "process_resident_memory_bytes") > 0  # the standard process metrics too
    assert server.on_reply == []  # stopped: no longer counting


@pytest.fixture(scope="module")
def two_class(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    return (build_fixture_model(folder / "two-1.onnx", classes=("defect_free", "defective"), version="2c-1", seed=4),
            build_fixture_model(folder / "two-2.onnx", classes=("defect_free", "defective"), version="2c-2", seed=5))


def test_metrics_per_served_model_and_reloads(predictor, two_class, tmp_path):
    """Two models under names of their own (both cards say ``defectscope-fixture``): each labelled by the name
    requests give it; a reload that swaps and one that is refused are counted on the model reloaded."""
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    two = Predictor(two_class[0], provider="cpu")
    models = {"three": Classifier(predictor, cross_check=two), "two": Classifier(two, cross_check=predictor)}
    server = Server(models, "tcp://127.0.0.1:*", reload_token_file=str(token)).start()
    try:
        with start_metrics(server, 0) as metrics, Client(server.endpoint, timeout_s=HANG_S, retries=0) as c:
            volume = bragg_map(seed=5)
            replies = {"three": [c.classify(volume)], "two": [c.classify(volume, model="two")]}
            c.reload(TOKEN, name="two", model=str(two_class[1]))
            # The reload answers before its thread lets go of the one-reload-at-a-time lock: a second reload
            # sent at once could get BUSY (counted as a failed request), so wait for that thread to end.
            wait_until(lambda: not any(t.name == "defectscope-reload" for t in threading.enumerate()),
                       what="the first reload's thread to end")
            with pytest.raises(ModelUnavailable, match="refused"):
                c.reload(TOKEN, name="two", model=str(tmp_path / "missing.onnx"))
            replies["two"].append(c.classify(volume, model="two"))
            health = {n: c.health(model=n) for n in models}
            samples = scrape(metrics.url)
    finally:
        server.stop(drain=False)

    assert [r["model"]["version"] for r in replies["two"]] == ["2c-1", "2c-2"]
    for n in models:
        assert value(samples, "defectscope_requests_total", model=n) == len(replies[n]) == health[n]["requests_total"]
        assert value(samples, "defectscope_request_duration_seconds_count", model=n, stage="total") == len(replies[n])
        assert by(samples, "defectscope_reply_warnings_total", "reason", model=n) == warnings_of(replies[n])
        # The cross-check ran on every map of both models.
        assert value(samples, "defectscope_request_duration_seconds_count", model=n, stage="cross_check") == len(replies[n])
    assert by(samples, "defectscope_reloads_total", "result", model="two") == {"ok": 1, "failed": 1}
    assert by(samples, "defectscope_reloads_total", "result", model="three") == {"ok": 0, "failed": 0}
    assert value(samples, "defectscope_last_reload_timestamp_seconds", model="two") == \
        health["two"]["reloads"]["last"]["time"]
    info = {s.labels["model"]: s.labels for s in samples if s.name == "defectscope_model_info"}
    assert info["two"]["version"] == "2c-2" and info["two"]["default"] == "false"
    assert info["two"]["sha256"] == health["two"]["model"]["sha256"] == replies["two"][1]["model"]["sha256"]
    assert info["three"]["version"] == "fixture-1" and info["three"]["default"] == "true"
    assert info["three"]["cross_check"] == "defectscope-fixture:2c-2"  # moved to the reloaded model
    assert {i["card_name"] for i in info.values()} == {"defectscope-fixture"}


def test_a_failing_reply_hook_does_not_cost_the_reply(server):
    """``Server.on_reply`` hooks (what the metrics count with) never take a reply down."""
    seen = []

    def broken(reply, request):
        seen.append(reply["request_id"])
        raise RuntimeError("a broken hook")

    server.on_reply.append(broken)
    with Client(server.endpoint, timeout_s=HANG_S, retries=0) as c:
        reply = c.classify(bragg_map(seed=6), request_id="hooked")
        health = c.health()
    assert reply["ok"] and seen == ["hooked"]
    assert health["requests_total"] == 1 and health["requests_failed"] == 0


def test_serve_metrics_port(fixture_model):
    """``defectscope serve --metrics-port 0``: the bound endpoint is printed after the readiness line, scraped
    once after a real request, and the process stops cleanly on SIGTERM."""
    proc = subprocess.Popen([*CLI, "serve", "--model", str(fixture_model), "--bind", "tcp://127.0.0.1:*",
                             "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("defectscope serving on tcp://127.0.0.1:"), line + proc.stderr.read()
        endpoint = line.split()[3]
        line = proc.stdout.readline()
        assert line.startswith("defectscope metrics on http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[3]
        assert url.endswith("/metrics") and not url.endswith(":0/metrics")
        with Client(endpoint, timeout_s=HANG_S, retries=0) as c:
            reply = c.classify(bragg_map(seed=7))
            health = c.health()
        samples = scrape(url)
        name = reply["model"]["name"]
        assert value(samples, "defectscope_requests_total", model=name) == 1 == health["requests_total"]
        assert value(samples, "defectscope_request_duration_seconds_count", model=name, stage="total") == 1
        assert value(samples, "defectscope_request_duration_seconds_sum", model=name, stage="total") == \
            pytest.approx(reply["timings_ms"]["total"] / 1e3)
        assert value(samples, "defectscope_model_info", model=name, sha256=reply["model"]["sha256"],
                     provider=reply["provider"]) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG_S) == 0
        assert "defectscope stopped" in proc.stdout.read()
    finally:
        reap(proc, HANG_S)


def test_serve_refuses_a_metrics_port_it_cannot_bind(fixture_model):
    """A metrics address that cannot be bound: one error line and a non-zero exit, no traceback."""
    out = subprocess.run([*CLI, "serve", "--model", str(fixture_model), "--bind", "tcp://127.0.0.1:*",
                          "--metrics-port", "0", "--metrics-addr", "192.0.2.1"],  # TEST-NET-1: not this host's
                         capture_output=True, text=True, timeout=HANG_S * 2)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "defectscope: error: cannot serve metrics on 192.0.2.1" in out.stderr and "Traceback" not in out.stderr
