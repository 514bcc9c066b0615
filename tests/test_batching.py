"""Batching: single maps waiting in the queue share one inference call; each still gets its own reply."""

from __future__ import annotations

import json

import numpy as np
import zmq

from defectscope import PROTOCOL
from defectscope.preprocessing.config import Limits
from defectscope.server.client import Client
from defectscope.server.core import Classifier
from defectscope.server.zmq_server import Server

from conftest import bragg_map
from sync import HANG_S, Gate, gated, wait_until


def map_message(rid: str, volume: np.ndarray) -> list[bytes]:
    header = {"protocol": PROTOCOL, "op": "classify", "request_id": rid,
              "input": {"kind": "map", "shape": list(volume.shape), "dtype": volume.dtype.str,
                        "axes": ["q_par", "q_perp1", "q_perp2"]}}
    return [b"", json.dumps(header).encode(), volume.tobytes()]


def test_queued_maps_are_inferred_together_with_the_same_answers(predictor):
    """Twelve maps wait in the queue behind a held worker (deterministically all queued before it takes the
    next); with batch_max 4 they are inferred four at a time, each reply says the batch it shared, one bad
    map fails alone, and every answer equals the map's answer alone."""
    maps = [bragg_map(seed=s, centre=(30.3 + s % 3, 34.1, 29.2)).astype("<f4") for s in range(12)]
    maps[5] = np.full_like(maps[5], np.nan)  # a bad one fails alone
    gate = Gate()  # open while the reference answers are computed
    classifier = gated(Classifier, gate)(predictor, limits=Limits(queue_length=32))
    reference = []
    for i, m in enumerate(maps):
        try:
            reference.append(classifier.classify(_request(f"r{i}", m)).reply["probabilities"])
        except Exception as exc:
            reference.append(type(exc).__name__)
    server = Server(classifier, "tcp://127.0.0.1:*", batch_max=4, drain_s=5).start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(server.endpoint)
        gate.close()
        held = gate.arrived + 1
        sock.send_multipart(map_message("hold", maps[0]))
        gate.wait_arrived(held)  # the worker is inside the "hold" classification
        for i, m in enumerate(maps):
            sock.send_multipart(map_message(f"r{i}", m))
        wait_until(lambda: server.queue_depth() == 1 + len(maps), what="all twelve maps queued")
        gate.open()
        replies = {}
        while len(replies) < len(maps) + 1 and sock.poll(HANG_S * 1000):
            r = json.loads(sock.recv_multipart()[1])
            replies[r["request_id"]] = r
    finally:
        gate.open()
        sock.close(0)
        server.stop(drain=False)
    assert len(replies) == len(maps) + 1
    assert replies["hold"]["ok"] and "batched" not in replies["hold"]["timings_ms"]  # it was alone
    # Queue order r0..r11 in calls of 4: r0-r3, r4-r7 (r5 fails in preparation: 3 share the call), r8-r11.
    batched = {rid: r["timings_ms"].get("batched", 1) for rid, r in replies.items() if r["ok"] and rid != "hold"}
    assert batched == {f"r{i}": 3 if 4 <= i < 8 else 4 for i in range(12) if i != 5}, batched
    for i in range(len(maps)):
        r = replies[f"r{i}"]
        if i == 5:
            assert r["error"]["reason"] == "NON_FINITE"
        else:
            np.testing.assert_allclose(r["probabilities"], reference[i], atol=1e-5)


def test_a_lone_request_is_not_batched_nor_delayed(make_server, asym_map):
    server = make_server()
    server.batch_max = 8
    with Client(server.endpoint, timeout_s=10, retries=0) as client:
        reply = client.classify(asym_map)
    assert "batched" not in reply["timings_ms"]


def _request(rid, volume):
    from defectscope.server.protocol import parse_classify

    header = json.loads(map_message(rid, volume)[1])
    return parse_classify(header, rid, [volume.tobytes()], Limits())
