"""Streamed scans: frames sent one message each as they are measured, gridded on arrival, one reply."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import zmq

from defectscope import PROTOCOL
from defectscope.errors import Busy, NonFinite
from defectscope.preprocessing.config import Limits
from defectscope.server.client import Client

from sync import HANG_S
from test_orthonormalise import make_synthetic


@pytest.fixture(scope="module")
def scan():
    geometry, frames, _ = make_synthetic()
    return geometry.to_dict(), frames


class Raw:
    """A bare DEALER speaking the protocol by hand, to send what the client never would."""

    def __init__(self, endpoint):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._syncs = 0
        self.health = None

    def send(self, header: dict, *buffers):
        self.sock.send_multipart([b"", json.dumps({"protocol": PROTOCOL, **header}).encode(), *buffers])

    def begin(self, rid, frames, geometry, **extra):
        spec = {"kind": "scan", "shape": list(frames.shape), "dtype": frames.dtype.str, "geometry": geometry,
                "stream": True, **extra}
        self.send({"op": "classify", "request_id": rid, "input": spec})

    def frame(self, rid, index, frame, last=False):
        head = {"op": "frame", "request_id": rid, "index": index, **({"last": True} if last else {})}
        self.send(head, np.ascontiguousarray(frame).tobytes())

    def receive(self) -> dict:
        """The next reply (the wait only bounds a hang)."""
        assert self.sock.poll(HANG_S * 1000), f"no reply within {HANG_S} s"
        return json.loads(self.sock.recv_multipart()[1])

    def replies(self, n: int) -> list[dict]:
        """The next ``n`` replies."""
        return [self.receive() for _ in range(n)]

    def until(self, rid: str) -> list[dict]:
        """Every reply up to the one to ``rid``, which is last."""
        out = [self.receive()]
        while out[-1]["request_id"] != rid:
            out.append(self.receive())
        return out

    def sync(self) -> list[dict]:
        """Every reply the server has sent from its I/O thread to this client so far (a health request's
        reply comes after them: one connection is read and answered in order)."""
        self._syncs += 1
        rid = f"sync-{self._syncs}"
        self.send({"op": "health", "request_id": rid})
        *before, reply = self.until(rid)
        assert reply["ok"], reply
        self.health = reply
        return before

    def barrier(self, frames, geometry) -> list[dict]:
        """Every reply the server has sent to this client so far, from either thread: a stream that fails
        once gridded (its one frame says it is the last) is answered by the gridding thread after every
        earlier frame of this client, and only after the I/O thread has handled every earlier message."""
        self._syncs += 1
        rid = f"barrier-{self._syncs}"
        self.begin(rid, frames, geometry)
        self.frame(rid, 0, frames[0], last=True)
        *before, reply = self.until(rid)
        assert reply["error"]["reason"] == "SHAPE_MISMATCH" and "missing" in reply["error"]["message"], reply
        return before

    def close(self):
        self.sock.close(0)


def test_streamed_scan_equals_the_scan_sent_at_once(server, scan):
    """Frames in any order, one message each: the same prepared map and probabilities as one message."""
    geometry, frames = scan
    with Client(server.endpoint, timeout_s=30, retries=0) as client:
        whole = client.classify_scan(frames, geometry, request_id="whole", return_prepared=True)
        order = np.random.default_rng(1).permutation(len(frames))
        streamed = client.classify_scan_stream((frames[i] for i in order), geometry, n_frames=len(frames),
                                               request_id="streamed", return_prepared=True)
    # classify_scan_stream numbers frames in the order sent; send them by hand in shuffled order instead.
    raw = Raw(server.endpoint)
    try:
        raw.begin("shuffled", frames, geometry)
        for k, i in enumerate(order):
            raw.frame("shuffled", int(i), frames[i], last=k == len(order) - 1)
        reply, *more = raw.replies(1) + raw.barrier(frames, geometry)
        assert more == [], more  # exactly one reply
    finally:
        raw.close()
    assert reply["ok"] and reply["request_id"] == "shuffled"
    assert reply["probabilities"] == whole["probabilities"]
    assert streamed["ok"] and streamed["request_id"] == "streamed"
    np.testing.assert_array_equal(whole["prepared"].shape, streamed["prepared"].shape)
    t = reply["timings_ms"]
    assert t["after_last_frame"] > 0 and t["orthonormalise"] > 0 and t["infer"] > 0
    assert t["orthonormalise"] + t["prepare"] + t["infer"] <= t["total"] + 1e-3


def test_streamed_scan_with_a_mask_equals_the_masked_scan(server, scan):
    geometry, frames = scan
    mask = np.zeros(frames.shape[1:], dtype=bool)
    mask[10:12, :] = True
    with Client(server.endpoint, timeout_s=30, retries=0) as client:
        whole = client.classify_scan(frames, geometry, mask=mask, return_prepared=True)
        streamed = client.classify_scan_stream(frames, geometry, mask=mask, return_prepared=True)
    np.testing.assert_array_equal(whole["prepared"], streamed["prepared"])
    assert whole["probabilities"] == streamed["probabilities"]


@pytest.mark.parametrize("case, reason", [
    ("wrong_size", "SHAPE_MISMATCH"),
    ("index_outside", "BAD_MESSAGE"),
    ("duplicate", "BAD_MESSAGE"),
    ("missing_at_last", "SHAPE_MISMATCH"),
    ("non_finite", "NON_FINITE"),
])
def test_a_bad_frame_ends_the_stream_with_one_error_reply(server, scan, case, reason):
    geometry, frames = scan
    frames = frames.astype("<f4")
    raw = Raw(server.endpoint)
    try:
        raw.begin("s", frames, geometry)
        raw.frame("s", 0, frames[0])
        if case == "wrong_size":
            raw.frame("s", 1, frames[1][:-1])
        elif case == "index_outside":
            raw.frame("s", len(frames), frames[1])
        elif case == "duplicate":
            raw.frame("s", 0, frames[0])
        elif case == "missing_at_last":
            raw.frame("s", 5, frames[5], last=True)
        else:
            bad = frames[1].copy()
            bad[3, 3] = np.nan
            raw.frame("s", 1, bad)
        for i in range(6, 12):  # frames after the error are dropped: still exactly one reply
            raw.frame("s", i, frames[i])
        replies = raw.barrier(frames, geometry)  # also: the same connection still serves streams
        assert len(replies) == 1, replies
        assert replies[0]["request_id"] == "s" and replies[0]["error"]["reason"] == reason
    finally:
        raw.close()
    with Client(server.endpoint, timeout_s=30, retries=0) as client:  # still serving streams
        assert client.classify_scan_stream(scan[1], geometry)["ok"]


def test_frame_for_a_stream_never_opened_is_refused(server, scan):
    raw = Raw(server.endpoint)
    try:
        raw.frame("nobody", 0, scan[1][0])
        (reply,) = raw.sync()
        assert reply["error"]["reason"] == "BAD_MESSAGE" and "no open stream" in reply["error"]["message"]
        # The first message of a stream carries no frames.
        spec = {"kind": "scan", "shape": list(scan[1].shape), "dtype": scan[1].dtype.str, "geometry": scan[0],
                "stream": True}
        raw.send({"op": "classify", "request_id": "x", "input": spec}, scan[1].tobytes())
        (reply,) = raw.barrier(scan[1], scan[0])  # nothing opened that answers later
        assert reply["error"]["reason"] == "SHAPE_MISMATCH"
    finally:
        raw.close()


def test_streams_are_per_client(server, scan):
    """Two clients may use the same request id at once; frames go to the sender's own stream."""
    geometry, frames = scan
    a, b = Raw(server.endpoint), Raw(server.endpoint)
    try:
        a.begin("same", frames, geometry)
        b.begin("same", frames, geometry)
        for i in range(len(frames)):
            a.frame("same", i, frames[i], last=i == len(frames) - 1)
            b.frame("same", i, frames[i], last=i == len(frames) - 1)
        (ra,), (rb,) = a.barrier(frames, geometry), b.barrier(frames, geometry)
        assert ra["ok"] and rb["ok"] and ra["probabilities"] == rb["probabilities"]
    finally:
        a.close()
        b.close()


def test_idle_stream_is_closed_with_an_error(make_server, scan):
    """A stream that gets no frame for the server's stream_idle_s is closed with one error that names the
    limit, no sooner than that limit after its last frame; its late frames are dropped without a reply."""
    geometry, frames = scan
    server = make_server(limits=Limits(stream_idle_s=0.3))
    raw = Raw(server.endpoint)
    try:
        t0 = time.monotonic()  # the server's idle clock for this stream starts later than this
        raw.begin("idle", frames, geometry)
        raw.frame("idle", 0, frames[0])
        reply = raw.receive()  # the once-a-second check closes it; the wait only bounds a hang
        waited = time.monotonic() - t0
        assert reply["request_id"] == "idle" and reply["error"]["reason"] == "BAD_MESSAGE"
        assert "no frame for 0.3 s" in reply["error"]["message"] and "abandoned" in reply["error"]["message"]
        assert waited >= 0.3  # not before the idle limit (a lower bound: load only lengthens it)
        assert raw.sync() == []
        dropped = raw.health["streams"]["late_frames_dropped"]  # 0, unless frame 0 itself came too late
        raw.frame("idle", 1, frames[1])  # late frames of the closed stream: dropped, no reply
        assert raw.sync() == []
        assert raw.health["streams"] == {"open": 0, "late_frames_dropped": dropped + 1}
    finally:
        raw.close()


def test_too_many_open_streams_is_busy(make_server, scan):
    geometry, frames = scan
    server = make_server(limits=Limits(max_streams=2))
    raw = Raw(server.endpoint)
    try:
        for rid in ("a", "b", "c"):
            raw.begin(rid, frames, geometry)
        (reply,) = raw.sync()
        assert reply["request_id"] == "c" and reply["error"]["reason"] == "BUSY"
        with Client(server.endpoint, timeout_s=10, retries=0) as client:
            with pytest.raises(Busy):
                client.classify_scan_stream(frames, geometry)
    finally:
        raw.close()


def test_client_raises_the_early_error(server, scan):
    geometry, frames = scan
    bad = frames.astype("<f4")
    bad[3, 0, 0] = np.inf
    with Client(server.endpoint, timeout_s=10, retries=0) as client:
        with pytest.raises(NonFinite):
            client.classify_scan_stream(bad, geometry)


def test_stop_answers_an_open_stream(make_server, scan):
    """A server stopping with a stream half sent answers it (BUSY), it does not leave the client waiting."""
    geometry, frames = scan
    server = make_server()
    raw = Raw(server.endpoint)
    try:
        raw.begin("half", frames, geometry)
        raw.frame("half", 0, frames[0])
        assert raw.sync() == [] and raw.health["streams"]["open"] == 1  # the stream is open when stop comes
        server.stop(drain=False)
        (reply,) = raw.replies(1)
        assert reply["request_id"] == "half" and reply["error"]["reason"] == "BUSY"
        assert not raw.sock.poll(200), "a second reply"
    finally:
        raw.close()
