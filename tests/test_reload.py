"""Authenticated ``reload`` (SPEC §4): the model is swapped under load without a failed request, a bad model
is refused while the old one keeps serving, and nobody without the token can reload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import zmq

from defectscope.errors import BadMessage, DefectscopeError, ModelUnavailable, Unauthorized
from defectscope.server.client import Client
from defectscope.server.reload import ReloadTokenError, read_token_file

from conftest import bragg_map
from sync import HANG_S, wait_until

TOKEN = "s3cret-reload-token-0123456789"


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    from defectscope.model.fixture import build_fixture_model

    return build_fixture_model(tmp_path_factory.mktemp("models2") / "fixture-v2.onnx", version="fixture-2", seed=1)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "reload.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def reload_server(predictor, token_file):
    """A server with reload enabled, serving the fixture model (version fixture-1)."""
    from defectscope.server.core import Classifier
    from defectscope.server.zmq_server import Server

    server = Server(Classifier(predictor), "tcp://127.0.0.1:*", drain_s=5, reload_token_file=str(token_file)).start()
    yield server
    server.stop(drain=False)


def expected_probabilities(model_path, volume):
    from defectscope.model.predictor import Predictor
    from defectscope.server.core import Classifier
    from defectscope.server.protocol import Request

    classifier = Classifier(Predictor(model_path, provider="cpu"))
    request = Request("classify", "x", {}, kind="map", array=volume, spec={"axes": ["q_par", "q_perp1", "q_perp2"]})
    return classifier.classify(request).reply["probabilities"]


# -- (1) a reload under a steady stream of requests ----------------------------------------------------
def small_map():
    """A 32^3 map (padded to the model's 64^3 by the pipeline): a quarter of the work of a 64^3 one."""
    return bragg_map(shape=(32, 32, 32), centre=(16.2, 15.8, 16.1), size=(6.0, 5.0, 4.0), seed=2)


def test_reload_under_load_switches_model_once_without_a_failed_request(reload_server, fixture_model, second_model):
    """A client classifies without pause while the model is reloaded: no request fails, the replies switch
    from the old model to the new one exactly once, each request's answer is that of the model it names,
    and the I/O loop keeps answering classifications while the new model loads.

    The load is held (it waits for an event before the real load runs) until the stream has been answered
    five more times, so "served during the load" is observed, not inferred from how long a sleep lasted;
    the stream goes on until the reload has answered, and a little beyond, so the switch lies inside it."""
    volume = small_map()
    expected = {"fixture-1": expected_probabilities(fixture_model, volume),
                "fixture-2": expected_probabilities(second_model, volume)}
    assert expected["fixture-1"] != expected["fixture-2"]

    reloader = reload_server._reloader
    real_load = reloader.load
    load_entered, load_release, times = threading.Event(), threading.Event(), {}

    def held_load(model, old):
        times["entered"] = time.perf_counter()
        load_entered.set()
        assert load_release.wait(HANG_S), "the load was never let go"
        return real_load(model, old)

    reloader.load = held_load

    BEFORE, DURING, AFTER, CAP = 20, 5, 20, 5000
    replies, failures = [], []
    stream_started, reload_answered = threading.Event(), threading.Event()

    def stream():
        with Client(reload_server.endpoint, timeout_s=20, retries=0) as c:
            after = 0
            for i in range(CAP):  # CAP only bounds a hang
                try:
                    replies.append(c.classify(volume, request_id=f"steady-{i}"))
                except Exception as exc:  # any failure at all fails the test
                    failures.append(repr(exc))
                if i == BEFORE:
                    stream_started.set()
                if reload_answered.is_set():
                    after += 1
                    if after > AFTER:
                        return

    t = threading.Thread(target=stream)
    t.start()
    try:
        assert stream_started.wait(HANG_S)
        result = {}

        def ask_reload():
            with Client(reload_server.endpoint, timeout_s=HANG_S, retries=0) as admin:
                try:
                    result["reply"] = admin.reload(TOKEN, str(second_model))
                except (DefectscopeError, TimeoutError) as exc:
                    result["error"] = exc
            reload_answered.set()

        admin_thread = threading.Thread(target=ask_reload)
        admin_thread.start()
        assert load_entered.wait(HANG_S), "the reload never started loading"
        during_before = len(replies)
        wait_until(lambda: len(replies) >= during_before + DURING or not t.is_alive(),
                   what=lambda: f"{DURING} classifications answered while the model loads (got "
                                f"{len(replies) - during_before}): the I/O loop is blocked")
        during = len(replies) - during_before
        assert not reload_answered.is_set(), "the reload answered before its load was let go"
        times["released"] = time.perf_counter()
        load_release.set()
        admin_thread.join(HANG_S)
        t.join(HANG_S)
        assert not t.is_alive() and not admin_thread.is_alive()
    finally:
        load_release.set()
        reload_answered.set()
    with Client(reload_server.endpoint, timeout_s=30, retries=0) as admin:
        health = admin.health()

    assert "error" not in result, result
    reply = result["reply"]
    assert failures == [] and len(replies) < CAP
    assert during >= DURING, f"only {during} classifications answered while the model loaded"
    assert reply["ok"] and reply["model"]["version"] == "fixture-2"
    # load_ms covers the whole load, the time it was held included (rounded to 0.1 ms).
    assert reply["previous_model"]["version"] == "fixture-1"
    assert reply["load_ms"] >= 1e3 * (times["released"] - times["entered"]) - 0.1
    versions = [r["model"]["version"] for r in replies]
    assert "fixture-2" in versions, "the stream ended before the switch"
    switch = versions.index("fixture-2")
    assert BEFORE + DURING < switch <= len(replies) - AFTER, "the reload did not happen inside the stream"
    assert versions == ["fixture-1"] * switch + ["fixture-2"] * (len(replies) - switch)  # exactly one switch
    for r in replies:  # each request ran on exactly the model its reply names (no half-swapped pipeline)
        assert r["probabilities"] == pytest.approx(expected[r["model"]["version"]], abs=1e-6)
    assert health["requests_failed"] == 0 and health["requests_total"] >= len(replies)  # counters carried over
    assert health["reloads"]["ok"] == 1 and health["reloads"]["failed"] == 0
    assert health["reloads"]["last"]["from"]["version"] == "fixture-1"
    assert health["reloads"]["last"]["to"]["version"] == "fixture-2"
    assert health["model"]["version"] == "fixture-2"


def test_reload_without_model_rereads_the_configured_path(predictor, token_file, tmp_path, fixture_model, second_model):
    from defectscope.model.predictor import Predictor
    from defectscope.server.core import Classifier
    from defectscope.server.zmq_server import Server

    configured = tmp_path / "current.onnx"
    shutil.copy(fixture_model, configured)
    server = Server(Classifier(Predictor(configured, provider="cpu")), "tcp://127.0.0.1:*",
                    reload_token_file=str(token_file)).start()
    try:
        shutil.copy(second_model, configured)  # the operator puts the new model in place...
        with Client(server.endpoint, timeout_s=60, retries=0) as c:
            reply = c.reload(TOKEN)  # ...and reloads
            assert reply["model"]["version"] == "fixture-2" and reply["path"] == str(configured)
            assert c.classify(bragg_map(seed=3))["model"]["version"] == "fixture-2"
    finally:
        server.stop(drain=False)


# -- (2) a bad model is refused, the old one keeps serving ---------------------------------------------
def test_corrupt_missing_or_foreign_model_is_refused_and_old_model_keeps_serving(reload_server, fixture_model, tmp_path):
    from defectscope.model.fixture import build_fixture_model

    truncated = tmp_path / "truncated.onnx"
    data = fixture_model.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    foreign = build_fixture_model(tmp_path / "no-metadata.onnx", metadata=False)
    volume = bragg_map(seed=6)
    with Client(reload_server.endpoint, timeout_s=60, retries=0) as c:
        before = c.classify(volume)
        for model, why in [(truncated, "cannot be loaded"), (tmp_path / "nowhere.onnx", "does not exist"),
                           ("no-such-bundled-model", "no model"), (foreign, "metadata")]:
            with pytest.raises(ModelUnavailable) as info:
                c.reload(TOKEN, str(model))
            assert why in str(info.value) and "fixture-1 keeps serving" in str(info.value)
            after = c.classify(volume)
            assert after["ok"] and after["model"] == before["model"]
            assert after["probabilities"] == before["probabilities"]
        health = c.health()
    assert health["reloads"]["ok"] == 0 and health["reloads"]["failed"] == 4
    assert "metadata" in health["reloads"]["last"]["error"] and health["reloads"]["last"]["ok"] is False


# -- (3) authentication ------------------------------------------------------------------------------
def raw(endpoint, header):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"", json.dumps({"protocol": "defectscope/1", "op": "reload", **header}).encode()])
        assert sock.poll(10000), "no reply"
        return json.loads(sock.recv_multipart()[1])
    finally:
        sock.close(0)


def test_wrong_or_missing_token_is_unauthorized_and_loads_nothing(reload_server, second_model):
    def must_not_load(model, old):
        raise AssertionError("a model was loaded for an unauthenticated request")

    reload_server._reloader.load = must_not_load
    model = str(second_model)
    for header in [{"model": model}, {"auth": {"token": "wrong-token-wrong-token"}, "model": model},
                   {"auth": {"token": TOKEN[:-1]}}, {"auth": {"token": TOKEN + "x"}}, {"auth": TOKEN},
                   {"auth": {"token": 12345}}, {"auth": {}}, {"auth": {"token": ""}}]:
        reply = raw(reload_server.endpoint, {"request_id": "r-1", **header})
        assert reply["ok"] is False and reply["error"]["reason"] == "UNAUTHORIZED", header
        assert reply["request_id"] == "r-1" and TOKEN not in json.dumps(reply)
    with Client(reload_server.endpoint, retries=0) as c:
        with pytest.raises(Unauthorized):
            c.reload("not-the-token-at-all", model)
        with pytest.raises(BadMessage):  # a valid token, then a malformed 'model'
            c.request({"op": "reload", "auth": {"token": TOKEN}, "model": ["a.onnx"]}, retries=0)
        assert c.health()["reloads"] == {"ok": 0, "failed": 0, "last": None}


def test_reload_is_unauthorized_when_not_enabled(client, second_model):
    with pytest.raises(Unauthorized, match="not enabled"):
        client.reload(TOKEN, str(second_model))
    assert client.info()["model"]["version"] == "fixture-1"


def test_token_file_must_be_private_and_long_enough(tmp_path, predictor):
    from defectscope.server.core import Classifier
    from defectscope.server.zmq_server import Server

    path = tmp_path / "token"
    path.write_text(TOKEN)
    for mode in (0o644, 0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(ReloadTokenError, match="chmod 600"):
            read_token_file(path)
    with pytest.raises(ValueError, match="group or others"):
        Server(Classifier(predictor), "tcp://127.0.0.1:*", reload_token_file=str(path))
    path.chmod(0o600)
    assert read_token_file(path) == TOKEN.encode()
    path.write_text("short\n")
    with pytest.raises(ReloadTokenError, match="at least 16"):
        read_token_file(path)
    with pytest.raises(ReloadTokenError):
        read_token_file(tmp_path / "missing")


# -- (4) the command line ----------------------------------------------------------------------------
@pytest.mark.skipif(os.name != "posix", reason="file permissions are POSIX")
def test_serve_refuses_a_world_readable_token_file(tmp_path, fixture_model):
    path = tmp_path / "reload.token"
    path.write_text(TOKEN)
    path.chmod(0o644)
    proc = subprocess.run([sys.executable, "-m", "defectscope.server.cli", "serve", "--model", str(fixture_model),
                           "--bind", "tcp://127.0.0.1:*", "--reload-token-file", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "defectscope serving" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("defectscope: error:")]
    assert len(lines) == 1 and "0644" in lines[0] and "chmod 600" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_reloaded_classifier_keeps_the_servers_settings(predictor, token_file, second_model):
    """The new classifier is made like the old one: limits, data root and the overlap setting (the overlap
    was once dropped, so a server built without it got it back after a reload)."""
    from defectscope.preprocessing.config import Limits
    from defectscope.server.core import Classifier
    from defectscope.server.reload import Reloader

    old = Classifier(predictor, limits=Limits(queue_length=3), overlap=False)
    server = type("S", (), {"classifier": old})()
    new = Reloader(server, token_file).load(str(second_model), old)
    assert new.overlap is False and new.limits == old.limits and new.data_root == old.data_root
    assert new.stats is old.stats and new.predictor.describe()["version"] == "fixture-2"
