"""Idempotent request ids: with a results log, a request id answered ``ok`` is answered again from the log
(``replayed: true``), never computed twice - in one run and across a ``kill -9`` of the server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import zmq

from defectscope.server.client import Client
from defectscope.server.results import ResultsLog, read_results

from conftest import bragg_map
from sync import GATED_SERVE, HANG_S

AXES = ["q_par", "q_perp1", "q_perp2"]


@pytest.fixture
def logged_server(predictor, tmp_path):
    """Factory: a server with a results log at ``path``; all stopped (and logs closed) at teardown."""
    from defectscope.server.core import Classifier
    from defectscope.server.zmq_server import Server

    running = []

    def make(path=tmp_path / "results.h5"):
        results = ResultsLog(path)
        server = Server(Classifier(predictor), "tcp://127.0.0.1:*", drain_s=5, results=results).start()
        running.append((server, results))
        return server, results

    def stop_all():
        while running:
            server, results = running.pop()
            server.stop(drain=False)
            results.close()

    make.stop_all = stop_all
    yield make
    stop_all()


def computed_rows(rows, rid):
    return [r for r in rows if r["request_id"] == rid and r["ok"] and not r["replayed"]]


def test_same_id_twice_is_replayed_with_identical_probabilities(logged_server, tmp_path):
    server, results = logged_server()
    volume = bragg_map(seed=7)
    with Client(server.endpoint, timeout_s=10, retries=0) as c:
        first = c.classify(volume, request_id="scan-0054")
        again = c.classify(volume, request_id="scan-0054")
        assert "replayed" not in first and again["replayed"] is True
        assert again["probabilities"] == first["probabilities"] and again["label"] == first["label"]
        assert again["timings_ms"] == first["timings_ms"] and again["model"] == first["model"]
        assert {k: v for k, v in again.items() if k != "replayed"} == first  # the recorded reply, as sent
        health = c.health()
    assert health["replayed"] == 1 and health["requests_total"] == 2
    rows = read_results(tmp_path / "results.h5")
    assert len(computed_rows(rows, "scan-0054")) == 1  # computed once
    assert [r["replayed"] for r in rows] == [False, True]  # the replayed reply is logged too (a client saw it)
    assert rows[0]["reply"] == first


def test_what_is_not_replayed(logged_server, tmp_path):
    server, results = logged_server()
    volume, other = bragg_map(seed=8), bragg_map(seed=9)
    with Client(server.endpoint, timeout_s=10, retries=0) as c:
        # An error is not replayed: the retry of a refused request can succeed.
        refused = c.classify(np.zeros((64, 64, 64), np.float32), request_id="e-1", raise_on_error=False)
        assert refused["error"]["reason"] == "LOW_SIGNAL"
        assert c.classify(volume, request_id="e-1").get("replayed") is None
        # The same id for other data (a scan name used again) is classified anew, and replayed as such later.
        a = c.classify(volume, request_id="reused")
        b = c.classify(other, request_id="reused")
        assert "replayed" not in b and b["probabilities"] != a["probabilities"]
        assert c.classify(other, request_id="reused")["replayed"] is True
        # Without a request id of its own a request is never replayed.
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        header = json.dumps({"protocol": "defectscope/1", "op": "classify",
                             "input": {"kind": "map", "shape": [64, 64, 64], "dtype": "<f4", "axes": AXES}}).encode()
        for _ in range(2):
            sock.send_multipart([b"", header, volume.tobytes()])
            assert sock.poll(10000)
            reply = json.loads(sock.recv_multipart()[1])
            assert reply["ok"] and reply["request_id"].startswith("srv-") and "replayed" not in reply
        sock.close(0)
        # A replayed reply cannot carry the prepared map: it says so.
        with_map = c.classify(volume, request_id="prep", return_prepared=True)
        assert with_map["prepared"].shape == (64, 64, 64)
        replayed = c.classify(volume, request_id="prep", return_prepared=True)
        assert replayed["replayed"] and "prepared" not in replayed
        assert replayed["warnings"][-1]["reason"] == "PREPARED_NOT_REPLAYED"
        assert replayed["probabilities"] == with_map["probabilities"]


def test_replay_survives_a_clean_restart(logged_server, tmp_path):
    server, _ = logged_server()
    volume = bragg_map(seed=10)
    with Client(server.endpoint, timeout_s=10, retries=0) as c:
        first = c.classify(np.stack([volume, volume[::-1]]), request_id="batch-1")
    logged_server.stop_all()
    server, results = logged_server()  # same file: the index is rebuilt from it
    assert results.replayable == 1
    with Client(server.endpoint, timeout_s=10, retries=0) as c:
        again = c.classify(np.stack([volume, volume[::-1]]), request_id="batch-1")
    assert again["replayed"] is True and again["probabilities"] == first["probabilities"]
    assert len(again["label"]) == 2


# -- kill -9 -------------------------------------------------------------------------------------------
def _serve(path, fixture_model, gated: bool = False):
    """`defectscope serve --results PATH`; ``gated``: each classification first takes a byte from the
    process's stdin (``sync.GATED_SERVE``), so the test decides how many may run."""
    exe = os.path.join(os.path.dirname(sys.executable), "defectscope")
    proc = subprocess.Popen([*(GATED_SERVE if gated else [exe]), "serve", "--bind", "tcp://127.0.0.1:*",
                             "--model", str(fixture_model), "--provider", "cpu", "--results", str(path)],
                            stdin=subprocess.PIPE if gated else None,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert line.startswith("defectscope serving on "), line
    return proc, line.split()[3]


def _kill(proc):
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    if proc.stdin is not None:
        proc.stdin.close()


def _key(probabilities):
    """A hashable, exact form of one reply's probabilities (as float32, the log's precision)."""
    return tuple(tuple(np.float32(v) for v in row) for row in np.atleast_2d(np.asarray(probabilities, dtype=np.float64)))


def test_retry_after_kill_9_gives_one_result_per_request_id(tmp_path, fixture_model):
    path = tmp_path / "results.h5"
    n, batch = 8, 4
    payloads = {f"job-{i}": np.stack([bragg_map(seed=100 + batch * i + k) for k in range(batch)]) for i in range(n)}
    received: dict[str, list] = {rid: [] for rid in payloads}

    # Only the first request may be classified before the kill: the worker then waits inside the second
    # one's classification, the others in the queue, whatever the machine's load.
    proc, endpoint = _serve(path, fixture_model, gated=True)
    try:
        proc.stdin.write("x")
        proc.stdin.flush()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        for rid, maps in payloads.items():  # all sent at once: the server works through its queue
            header = {"protocol": "defectscope/1", "op": "classify", "request_id": rid,
                      "input": {"kind": "map", "shape": list(maps.shape), "dtype": "<f4", "axes": AXES}}
            sock.send_multipart([b"", json.dumps(header).encode(), maps.tobytes()])
        assert sock.poll(HANG_S * 1000), "no first reply"
        first = json.loads(sock.recv_multipart()[1])
        os.kill(proc.pid, signal.SIGKILL)  # while the next requests are queued or being classified
        proc.wait(10)
        assert first["ok"]
        received[first["request_id"]].append(first)
        while sock.poll(200):  # replies that were already on their way when the server died
            reply = json.loads(sock.recv_multipart()[1])
            received[reply["request_id"]].append(reply)
        sock.close(0)
    finally:
        _kill(proc)
    answered_before = {rid for rid, rs in received.items() if rs}
    assert answered_before == {first["request_id"]}, "only the request let through is answered before the kill"

    proc, endpoint = _serve(path, fixture_model)  # the same file: recovered, its replies indexed
    try:
        with Client(endpoint, timeout_s=30, retries=1) as c:
            retries = {rid: c.classify(maps, request_id=rid) for rid, maps in payloads.items()}
    finally:
        _kill(proc)

    for rid, reply in retries.items():
        received[rid].append(reply)
        if rid in answered_before:
            assert reply["replayed"] is True, rid  # answered before the kill: given again, not recomputed
    assert any(not r.get("replayed") for r in retries.values()), "some request should have been computed after the restart"

    rows = read_results(path)
    for rid in payloads:
        logged = [r for r in rows if r["request_id"] == rid and r["ok"]]
        by_reply = {}
        for r in logged:  # group a batch reply's rows: (computed or replayed occurrence) -> per-map probabilities
            by_reply.setdefault((r["time_unix"], r["replayed"]), []).append(r["probabilities"])
        results_seen = {_key(r["probabilities"]) for r in received[rid]} | {_key(p) for p in by_reply.values()}
        assert len(results_seen) == 1, f"{rid}: {len(results_seen)} different results"
        computed = [r for r in logged if not r["replayed"] and r["index"] == 0]
        assert len(computed) == 1, f"{rid} was computed {len(computed)} times"
        assert computed[0]["reply"]["probabilities"] == received[rid][-1]["probabilities"]
