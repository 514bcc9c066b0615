"""CURVE authentication on the ZeroMQ server (SPEC §4): only clients with a listed key are served."""

from __future__ import annotations

import pytest
import zmq.auth

from defectscope.server.client import Client
from defectscope.server.core import Classifier
from defectscope.server.zmq_server import Server

from conftest import bragg_map


@pytest.fixture
def keys(tmp_path):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    for d in (allowed, other):
        d.mkdir()
    _, server_secret = zmq.auth.create_certificates(tmp_path, "server")
    zmq.auth.create_certificates(allowed, "beamline")
    zmq.auth.create_certificates(other, "stranger")
    # The server's allow-list holds only public keys.
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "beamline.key").write_bytes((allowed / "beamline.key").read_bytes())
    return {"server_secret": server_secret, "allow": allow,
            "server_public": zmq.auth.load_certificate(tmp_path / "server.key")[0],
            "beamline": zmq.auth.load_certificate(allowed / "beamline.key_secret"),
            "stranger": zmq.auth.load_certificate(other / "stranger.key_secret")}


@pytest.fixture
def curve_server(predictor, keys):
    server = Server(Classifier(predictor), "tcp://127.0.0.1:*", curve_secret_file=str(keys["server_secret"]),
                    curve_allow_dir=str(keys["allow"])).start()
    yield server
    server.stop(drain=False)


def test_listed_key_is_served(curve_server, keys):
    public, secret = keys["beamline"]
    with Client(curve_server.endpoint, timeout_s=10, retries=0,
                curve={"server_public": keys["server_public"], "public": public, "secret": secret}) as client:
        assert client.health()["ok"]
        reply = client.classify(bragg_map(), request_id="curve-1")
        assert reply["ok"] and abs(sum(reply["probabilities"]) - 1) < 1e-5


def test_plaintext_and_unknown_keys_are_refused(curve_server, keys):
    with Client(curve_server.endpoint, timeout_s=1.0, retries=0) as plain:
        with pytest.raises(TimeoutError):
            plain.health()
    public, secret = keys["stranger"]
    with Client(curve_server.endpoint, timeout_s=1.0, retries=0,
                curve={"server_public": keys["server_public"], "public": public, "secret": secret}) as stranger:
        with pytest.raises(TimeoutError):
            stranger.health()
    # Refused clients do not disturb the server: a listed client is still served.
    public, secret = keys["beamline"]
    with Client(curve_server.endpoint, timeout_s=10, retries=0,
                curve={"server_public": keys["server_public"], "public": public, "secret": secret}) as client:
        assert client.health()["requests_failed"] == 0


def test_curve_needs_both_halves(predictor, keys):
    with pytest.raises(ValueError, match="both"):
        Server(Classifier(predictor), "tcp://127.0.0.1:*", curve_secret_file=str(keys["server_secret"]))
