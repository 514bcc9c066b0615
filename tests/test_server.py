"""The ZeroMQ server over real sockets on random loopback ports (SPEC §4)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import zmq

from defectscope.errors import REASONS
from defectscope.preprocessing.config import Limits
from defectscope.server.client import Client

from conftest import bragg_map
from sync import HANG_S, Gate, wait_until

AXES = ["q_par", "q_perp1", "q_perp2"]


def raw_request(endpoint, frames, timeout_ms=10000):
    """Send frames from a REQ socket (REQ-compatible clients are part of the contract)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "no reply"
        parts = sock.recv_multipart()
        return json.loads(parts[0]), parts[1:]
    finally:
        sock.close(0)


def header(**kw):
    h = {"protocol": "defectscope/1", "op": "classify", "request_id": "t-1"}
    h.update(kw)
    return json.dumps(h).encode()


def map_header(shape=(64, 64, 64), dtype="<f4", request_id="t-1", **extra):
    return header(request_id=request_id,
                  input={"kind": "map", "shape": list(shape), "dtype": dtype, "axes": AXES, **extra})


def assert_error(reply, reason):
    assert reply["ok"] is False, reply
    assert reply["error"]["reason"] == reason, reply
    assert reason in REASONS
    assert reply["error"]["message"]


def assert_still_serving(endpoint):
    reply, _ = raw_request(endpoint, [map_header(), bragg_map(seed=5).tobytes()])
    assert reply["ok"] is True, reply


# -- valid requests ---------------------------------------------------------------------------------
def test_valid_map_gives_probabilities(client, asym_map):
    reply = client.classify(asym_map, axes=AXES, request_id="scan-0054")
    assert reply["ok"] and reply["request_id"] == "scan-0054"
    assert reply["classes"] == ["defect_free", "screw", "edge"]
    assert len(reply["probabilities"]) == 3
    assert abs(sum(reply["probabilities"]) - 1) < 1e-5
    assert reply["label"] in reply["classes"]
    assert reply["label"] == reply["classes"][int(np.argmax(reply["probabilities"]))]
    assert reply["provider"] == "CPUExecutionProvider"
    assert set(reply["model"]) == {"name", "version", "sha256"}
    assert {"decode", "prepare", "infer", "total"} <= set(reply["timings_ms"])
    assert reply["timings_ms"]["total"] >= reply["timings_ms"]["infer"] > 0


def test_req_socket_and_integer_counts(server, asym_map):
    counts = np.rint(asym_map).astype("<u2")
    reply, extra = raw_request(server.endpoint, [map_header(dtype="<u2"), counts.tobytes()])
    assert reply["ok"], reply
    assert extra == []


def test_batch_request(client):
    batch = np.stack([bragg_map(seed=s, size=(11 - s, 8, 6)) for s in range(3)])
    reply = client.classify(batch, axes=AXES)
    assert len(reply["probabilities"]) == 3 and len(reply["label"]) == 3
    for row in reply["probabilities"]:
        assert abs(sum(row) - 1) < 1e-5
    # The batch answer is the answer each map gets alone.
    for i in range(3):
        alone = client.classify(batch[i], axes=AXES)
        np.testing.assert_allclose(alone["probabilities"], reply["probabilities"][i], atol=1e-5)


def test_return_prepared_frame(client, asym_map):
    reply = client.classify(asym_map, axes=AXES, return_prepared=True)
    prepared = reply["prepared"]
    assert prepared.shape == (64, 64, 64) and prepared.dtype == np.float32
    assert prepared.max() == pytest.approx(1.0)


def test_permuted_axes_give_the_same_prepared_map(client, asym_map):
    canonical = client.classify(asym_map, axes=AXES, return_prepared=True)
    permuted = np.ascontiguousarray(asym_map.transpose(2, 0, 1))
    other = client.classify(permuted, axes=["q_perp2", "q_par", "q_perp1"], return_prepared=True)
    np.testing.assert_array_equal(canonical["prepared"], other["prepared"])
    assert canonical["probabilities"] == other["probabilities"]


def test_q_direction_gives_the_same_prepared_map(client, asym_map):
    canonical = client.classify(asym_map, axes=AXES, return_prepared=True)
    # Q along +axis 2 of the sent array: the canonical map turned by the proper 90-degree rotation about
    # axis 1 (old axis 0 -> new +axis 2, old axis 2 -> new -axis 0): new[a, b, c] = old[c, b, n-1-a].
    rotated = np.ascontiguousarray(np.flip(asym_map, axis=2).transpose(2, 1, 0))
    from defectscope.preprocessing.frames import to_canonical

    back, _ = to_canonical(rotated, ("x", "y", "z"), q_direction=[0.0, 0.0, 1.0])
    assert back.shape == asym_map.shape
    other = client.classify(back, axes=AXES, return_prepared=True)
    sent = client.classify(rotated, axes=["x", "y", "z"], q_direction=[0, 0, 1], return_prepared=True)
    np.testing.assert_array_equal(other["prepared"], sent["prepared"])
    np.testing.assert_array_equal(canonical["prepared"], sent["prepared"])


def test_info_and_health(client, asym_map):
    info = client.info()
    assert info["ok"] and info["classes"] == ["defect_free", "screw", "edge"]
    assert info["provider"] == "CPUExecutionProvider"
    assert info["pipeline"]["schema_version"] == 2  # the bundled v1 pipeline, patched forward on load
    assert info["card"]["name"] == "defectscope-fixture"
    assert info["limits"]["queue_length"] == 16
    client.classify(asym_map, axes=AXES)
    health = client.health()
    assert health["ok"] and health["state"] == "ON"
    assert health["requests_total"] >= 1
    assert "p50" in health["latency_ms"]


def test_dealer_without_delimiter_is_answered(server):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        sock.send_multipart([json.dumps({"protocol": "defectscope/1", "op": "health", "request_id": "h"}).encode()])
        assert sock.poll(5000)
        reply = json.loads(sock.recv_multipart()[-1])
        assert reply["ok"] and reply["request_id"] == "h"
    finally:
        sock.close(0)


# -- every reason a request can trigger -------------------------------------------------------------
GOOD = bragg_map(seed=3).tobytes()


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([b"\x80\x04\x95 pickled"], "BAD_MESSAGE"),
        ([b"[1, 2, 3]"], "BAD_MESSAGE"),
        ([header(input="nope")], "BAD_MESSAGE"),
        ([map_header(extra_key=1), GOOD], "BAD_MESSAGE"),
        ([header(input={"kind": "map", "shape": [64, 64, 64], "dtype": "<f4"}), GOOD], "BAD_MESSAGE"),
        ([map_header(voxel_size=[0.001, -1, 0.001]), GOOD], "BAD_MESSAGE"),
        ([json.dumps({"protocol": "defectscope/2", "op": "classify"}).encode()], "UNSUPPORTED_PROTOCOL"),
        ([json.dumps({"op": "classify"}).encode()], "UNSUPPORTED_PROTOCOL"),
        ([header(op="explode")], "UNKNOWN_OP"),
        ([map_header(dtype="|O"), GOOD], "DTYPE_NOT_ALLOWED"),
        ([map_header(dtype="<c8"), GOOD], "DTYPE_NOT_ALLOWED"),
        ([map_header(dtype="<U8"), GOOD], "DTYPE_NOT_ALLOWED"),
        ([map_header(), GOOD[:-4]], "SHAPE_MISMATCH"),
        ([map_header()], "SHAPE_MISMATCH"),
        ([map_header(shape=(64, 64)), GOOD], "SHAPE_MISMATCH"),
        ([map_header(shape=(64, 0, 64)), GOOD], "SHAPE_MISMATCH"),
        ([map_header(shape=(4096, 4096, 4096)), b"tiny"], "TOO_LARGE"),
        ([map_header(shape=(2**31, 1, 1)), b"tiny"], "TOO_LARGE"),
        ([map_header(shape=(1000, 64, 64, 64)), b"tiny"], "TOO_LARGE"),
        ([map_header(), np.full((64, 64, 64), np.nan, np.float32).tobytes()], "NON_FINITE"),
        ([map_header(), np.zeros((64, 64, 64), np.float32).tobytes()], "LOW_SIGNAL"),
        ([map_header(), np.full((64, 64, 64), 7.0, np.float32).tobytes()], "LOW_SIGNAL"),
        ([map_header(), (-bragg_map(seed=3)).tobytes()], "NON_FINITE"),
        ([header(input={"kind": "scan", "shape": [4, 8, 8], "dtype": "<u4", "geometry": {"preset": "nowhere"}}),
          np.ones((4, 8, 8), "<u4").tobytes()], "BAD_GEOMETRY"),
        ([header(input={"kind": "file", "path": "scan.h5"})], "PATH_NOT_ALLOWED"),
        ([header(op="reload")], "UNAUTHORIZED"),
    ],
)
def test_error_reason_then_still_serving(server, frames, reason):
    reply, _ = raw_request(server.endpoint, frames)
    assert_error(reply, reason)
    assert_still_serving(server.endpoint)


def test_nan_inside_a_map(server):
    m = bragg_map(seed=4)
    m[10, 20, 30] = np.inf
    reply, _ = raw_request(server.endpoint, [map_header(), m.tobytes()])
    assert_error(reply, "NON_FINITE")
    json.dumps(reply, allow_nan=False)  # raises if any NaN/Inf value reached the reply


def test_error_reply_echoes_request_id(server):
    reply, _ = raw_request(server.endpoint, [map_header(dtype="|O", request_id="keep-me"), GOOD])
    assert reply["request_id"] == "keep-me"


def test_file_path_escape_refused(make_server, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    np.save(tmp_path / "outside.npy", bragg_map())
    np.save(root / "inside.npy", bragg_map())
    (root / "link.npy").symlink_to(tmp_path / "outside.npy")
    server = make_server(data_root=root)
    for path in ("../outside.npy", str(tmp_path / "outside.npy"), "link.npy", "absent.npy"):
        reply, _ = raw_request(server.endpoint, [header(input={"kind": "file", "path": path})])
        assert_error(reply, "PATH_NOT_ALLOWED")
    reply, _ = raw_request(server.endpoint, [header(input={"kind": "file", "path": "inside.npy"})])
    assert reply["ok"], reply


def receive(sock) -> dict:
    """The next reply on a DEALER socket (the wait only bounds a hang)."""
    assert sock.poll(HANG_S * 1000), f"no reply within {HANG_S:g} s"
    return json.loads(sock.recv_multipart()[1])


def test_full_queue_answers_busy_at_once(make_server):
    """The worker is held inside a classification and the queue (length 1) is full: every further request
    is answered BUSY while the worker is still held (at once, not once there is room); the held and the
    queued request are then answered ok, and every request gets exactly one reply."""
    gate = Gate(closed=True)
    server = make_server(limits=Limits(queue_length=1), gate=gate)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    n = 30
    try:
        sock.send_multipart([b"", map_header(request_id="r0"), GOOD])
        gate.wait_arrived(1)  # the worker is inside r0's classification
        for i in range(1, n):
            sock.send_multipart([b"", map_header(request_id=f"r{i}"), GOOD])
        while_held = [receive(sock) for _ in range(n - 2)]  # r1 fills the queue; nothing else can be taken
        assert server.queue_depth() == 2  # r0 in flight, r1 queued: the BUSYs did not wait for room
        gate.open()
        replies = while_held + [receive(sock) for _ in range(2)]
        assert not sock.poll(100), "a request got a second reply"
    finally:
        sock.close(0)
    assert all(not r["ok"] and r["error"]["reason"] == "BUSY" for r in while_held), while_held
    assert sorted(r["request_id"] for r in replies) == sorted(f"r{i}" for i in range(n))
    assert sorted(r["request_id"] for r in replies if r["ok"]) == ["r0", "r1"]
    assert_still_serving(server.endpoint)


def test_late_reply_to_an_abandoned_attempt_is_not_taken_for_the_next(make_server, asym_map):
    """A reply that arrives after the client gave up is recognised by its request id and skipped. The worker
    is held inside the first classification until the client has given up on it, so that attempt times out
    whatever the machine's load; its reply then reaches the socket ahead of the next request's."""
    gate = Gate(closed=True)
    server = make_server(gate=gate)
    with Client(server.endpoint, timeout_s=10, retries=0) as client:
        spec = {"kind": "map", "shape": [64, 64, 64], "dtype": "<f4", "axes": AXES}
        with pytest.raises(TimeoutError):
            client.request({"op": "classify", "request_id": "slow-1", "input": spec}, [asym_map.tobytes()],
                           timeout_s=1.0)
        gate.wait_arrived(1)  # slow-1 reached the worker: it will be answered, late
        gate.open()
        reply = client.classify(bragg_map(seed=9), axes=AXES, request_id="next-1")
        assert reply["request_id"] == "next-1"
        health = client.health()
    assert health["requests_total"] == 2 and health["requests_failed"] == 0  # slow-1 was answered ok, and skipped


def test_client_retry_resends_the_same_request_id(server, asym_map):
    with Client(server.endpoint, timeout_s=10, retries=2) as client:
        reply = client.classify(asym_map, axes=AXES, request_id="again-1")
        assert reply["request_id"] == "again-1"
    with Client("tcp://127.0.0.1:1", timeout_s=0.05, retries=2) as nobody:
        with pytest.raises(TimeoutError, match="3 attempts"):
            nobody.health()


def test_client_raises_the_reason_class(client):
    from defectscope.errors import NonFinite

    bad = np.full((64, 64, 64), np.nan, np.float32)
    with pytest.raises(NonFinite):
        client.classify(bad, axes=AXES)
    with pytest.raises(ValueError):  # the error classes refine the built-ins
        client.classify(bad, axes=AXES)


def test_stop_drains_queued_requests(make_server, asym_map):
    """stop(drain=True) answers what is queued or in flight when it begins: five requests wait behind a
    held worker when stop starts, the worker is let go once the server says DRAINING, and all five are
    answered ok (the drain limit is far away: it only bounds a hang)."""
    gate = Gate(closed=True)
    server = make_server(limits=Limits(queue_length=8), gate=gate, drain_s=HANG_S)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        for i in range(5):
            sock.send_multipart([b"", map_header(request_id=f"d{i}"), asym_map.tobytes()])
        wait_until(lambda: server.queue_depth() == 5, what="five requests queued or in flight")
        stopper = threading.Thread(target=server.stop, kwargs={"drain": True})
        stopper.start()
        with Client(server.endpoint, timeout_s=10, retries=0) as watcher:
            wait_until(lambda: watcher.health()["state"] == "DRAINING", what="the server draining")
            # Still serving while it drains (a stop that did not wait would have left its I/O loop):
            assert watcher.health()["queue_depth"] == 5
        gate.open()
        stopper.join(HANG_S + 10)
        assert not stopper.is_alive(), "stop() did not return"
        got = [receive(sock) for _ in range(5)]
        assert sorted(r["request_id"] for r in got) == [f"d{i}" for i in range(5)]
        assert all(r["ok"] for r in got), got
    finally:
        sock.close(0)


def test_server_limits_reach_the_pipeline(make_server):
    """Regression: prepare() was called with the default Limits, refusing maps a server was configured to take."""
    shape = (260, 256, 256)  # above the default 256**3 voxels
    server = make_server(limits=Limits(max_map_voxels=300**3))
    volume = np.zeros(shape, "<u2")
    volume[120:140, 120:136, 118:134] = bragg_map(shape=(20, 16, 16), centre=(10, 8, 8), size=(4, 3, 2.5),
                                                  peak=5e4, noise=False).astype("<u2")
    with Client(server.endpoint, timeout_s=30, retries=0) as client:
        reply = client.classify(volume, axes=AXES)
    assert reply["ok"] and reply["preparation"]["input_shape"] == list(shape)


def test_no_import_happens_inside_a_request():
    """Regression: the first classify paid ~200-270 ms importing the pipeline inside the request (outside
    every stage timer, so only 'total' showed it). The core now imports its whole path when loaded; a
    timing test cannot see this reliably (a warm page cache hides it), so the cause is checked instead."""
    import subprocess
    import sys

    code = (
        "import sys, defectscope.server.core;"
        "need = ['defectscope.preprocessing.pipeline', 'defectscope.preprocessing.orthonormalise',"
        " 'defectscope.preprocessing.geometry', 'defectscope.preprocessing.loaders', 'defectscope.preprocessing.scans'];"
        "missing = [m for m in need if m not in sys.modules]; print(missing); sys.exit(1 if missing else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_classifier_warms_up_the_whole_path(predictor):
    from defectscope.server.core import Classifier

    classifier = Classifier(predictor)
    assert classifier.warmup_ms > 0
    # The overlapped estimate's helper thread is started by the warm-up, not by the first request (the
    # first map of the demo once took 50 ms instead of 10).
    import threading

    assert any(t.name.startswith("defectscope-estimate") for t in threading.enumerate())


def test_error_before_the_header_parses_still_echoes_request_id(server):
    """The id is recovered from a header that fails its checks (here: wrong protocol)."""
    raw = json.dumps({"protocol": "defectscope/9", "op": "classify", "request_id": "old-client"}).encode()
    reply, _ = raw_request(server.endpoint, [raw])
    assert_error(reply, "UNSUPPORTED_PROTOCOL")
    assert reply["request_id"] == "old-client"


def test_health_right_after_a_reply_shows_an_empty_queue(client, asym_map):
    """The worker leaves 'in flight' before its reply is sent; it once did after, so a health asked at once
    could still count the answered request."""
    for _ in range(20):
        client.classify(asym_map)
        assert client.health()["queue_depth"] == 0


@pytest.mark.parametrize("resampled", [False, True])
def test_overlapped_estimate_gives_the_serial_answer(predictor, resampled):
    """The oversampling estimate beside centring and inference changes nothing: same map, report, answer
    (also when the estimate asks for resampling and the first inference is thrown away)."""
    from defectscope.server.core import Classifier
    from defectscope.server.protocol import parse_classify

    size = (3.0, 2.5, 2.0) if resampled else (14.0, 11.0, 9.0)  # oversampling 13 (resampled) or 3.1
    volume = bragg_map(size=size).astype("<f4")
    header = {"input": {"kind": "map", "shape": list(volume.shape), "dtype": "<f4",
                        "axes": ["q_par", "q_perp1", "q_perp2"]}, "options": {"return_prepared": True}}
    replies = []
    for overlap in (False, True):
        request = parse_classify(dict(header, input=dict(header["input"])), "o", [volume.tobytes()], Limits())
        replies.append(Classifier(predictor, overlap=overlap).classify(request))
    serial, overlapped = replies
    assert overlapped.frames == serial.frames
    for key in ("probabilities", "label", "warnings", "preparation"):
        assert overlapped.reply[key] == serial.reply[key]
    assert any(f != 1.0 for f in serial.reply["preparation"]["resample_factor"]) == resampled


def _classify_in_child(classifier, volume, out):
    from defectscope.server.protocol import parse_classify

    header = {"input": {"kind": "map", "shape": list(volume.shape), "dtype": "<f4", "axes": ["q_par", "q_perp1", "q_perp2"]}}
    out.put(classifier.classify(parse_classify(header, "child", [volume.tobytes()], Limits())).reply["label"])


def test_a_forked_child_classifies_too(predictor):
    """The helper threads of the overlapped estimate do not survive a fork; a forked child (as Tango's
    DeviceTestContext makes) must make its own instead of waiting forever on the parent's pool."""
    import multiprocessing

    from defectscope.server.core import Classifier

    classifier = Classifier(predictor)
    volume = bragg_map().astype("<f4")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    _classify_in_child(classifier, volume, out)  # the parent's pool exists now
    parent_label = out.get(timeout=10)
    child = ctx.Process(target=_classify_in_child, args=(classifier, volume, out))
    child.start()
    try:
        assert out.get(timeout=30) == parent_label
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
