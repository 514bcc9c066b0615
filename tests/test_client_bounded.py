"""Every ``Client`` call returns or raises within its time limit, whatever the peer does (issue: a client
call blocked forever in ``send_multipart`` after a refused CURVE handshake).

Each case runs the call in a thread and waits for it with a generous bound: a call that blocks forever
fails the test by name instead of hanging the suite. The refused-handshake race showed up in about one
run in three, so each case is repeated (``REPEAT``).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zmq
import zmq.auth

from defectscope.server.client import Client
from defectscope.server.core import Classifier
from defectscope.server.zmq_server import Server

REPEAT = 20
TIMEOUT_S = 0.1
# Far above any scheduling delay, far below "forever": only a call that does not honour its deadline misses it.
MARGIN_S = 10.0


def _bounded(call, limit_s: float):
    """Run ``call()`` in a thread; return what it raised (or returned) if it ends within ``limit_s``."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"the client call did not return within {limit_s:g} s"
    return outcome


def _times_out(make_client, call=lambda c: c.health(), retries: int = 0):
    def attempt():
        with make_client() as client:
            return call(client)

    outcome = _bounded(attempt, (retries + 1) * TIMEOUT_S + MARGIN_S)
    assert isinstance(outcome.get("error"), TimeoutError), outcome


@pytest.fixture(scope="module")
def curve(tmp_path_factory, predictor):
    tmp = tmp_path_factory.mktemp("curve")
    allow, other = tmp / "allow", tmp / "other"
    allow.mkdir(), other.mkdir()
    _, server_secret = zmq.auth.create_certificates(tmp, "server")
    zmq.auth.create_certificates(other, "stranger")
    server = Server(Classifier(predictor), "tcp://127.0.0.1:*", curve_secret_file=str(server_secret),
                    curve_allow_dir=str(allow)).start()
    public, secret = zmq.auth.load_certificate(other / "stranger.key_secret")
    keys = {"server_public": zmq.auth.load_certificate(tmp / "server.key")[0], "public": public, "secret": secret}
    yield server, keys
    server.stop(drain=False)


@pytest.fixture
def silent_peer():
    """A real ROUTER that accepts connections and never reads or answers (a wedged server)."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVHWM, 4)
    router.bind("tcp://127.0.0.1:*")
    yield router.getsockopt(zmq.LAST_ENDPOINT).decode()
    router.close(0)


@pytest.mark.parametrize("retries", [0, 1])
def test_refused_plaintext_handshake_times_out(curve, retries):
    server, _ = curve
    for _ in range(REPEAT):
        _times_out(lambda: Client(server.endpoint, timeout_s=TIMEOUT_S, retries=retries), retries=retries)


@pytest.mark.parametrize("retries", [0, 1])
def test_refused_curve_key_times_out(curve, retries):
    server, keys = curve
    for _ in range(REPEAT):
        _times_out(lambda: Client(server.endpoint, timeout_s=TIMEOUT_S, retries=retries, curve=keys),
                   retries=retries)


def test_refused_stream_times_out(curve):
    server, keys = curve
    frames = np.zeros((3, 8, 8), np.uint16)
    for _ in range(REPEAT):
        _times_out(lambda: Client(server.endpoint, timeout_s=TIMEOUT_S, retries=0, curve=keys),
                   call=lambda c: c.classify_scan_stream(frames, {"preset": "aps-34idc"}))


def test_server_down_times_out(tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody-listens"
    for _ in range(REPEAT):
        _times_out(lambda: Client(endpoint, timeout_s=TIMEOUT_S, retries=1), retries=1)


def test_server_that_never_answers_times_out(silent_peer):
    for _ in range(REPEAT):
        _times_out(lambda: Client(silent_peer, timeout_s=TIMEOUT_S, retries=1), retries=1)


def test_full_send_queue_times_out(silent_peer):
    """A stream into a peer that reads nothing fills its receive queue, the socket buffers and then the
    client's send queue (1000 messages): the send that finds no room must give up at its deadline."""
    frame = np.zeros((128, 256), np.uint16)  # 64 KiB, the same buffer each time: nothing is copied
    n = 20_000

    def frames():
        for _ in range(n):
            yield frame

    for _ in range(REPEAT):
        _times_out(lambda: Client(silent_peer, timeout_s=TIMEOUT_S, retries=0),
                   call=lambda c: c.classify_scan_stream(frames(), {"preset": "aps-34idc"}, n_frames=n))


def test_client_recovers_when_the_server_comes_up(predictor, tmp_path):
    """A timed-out call leaves the client usable: once a server listens, the same client is answered."""
    endpoint = f"ipc://{tmp_path}/later"
    with Client(endpoint, timeout_s=TIMEOUT_S, retries=0) as client:
        assert isinstance(_bounded(client.health, TIMEOUT_S + MARGIN_S).get("error"), TimeoutError)
        server = Server(Classifier(predictor), endpoint).start()
        try:
            client.timeout_s = 30
            assert client.health()["ok"]
        finally:
            server.stop(drain=False)
