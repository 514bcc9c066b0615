"""Property-based fuzz of the wire protocol over a real socket: malformed multipart messages of every
shape get exactly one reply each, with a reason from SPEC §4, and the server keeps serving."""

from __future__ import annotations

import json

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defectscope.errors import REASONS
from defectscope.preprocessing.config import Limits

from conftest import bragg_map

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                         st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), c, max_size=4)),
                           max_leaves=12)
dtypes = st.sampled_from(["<f4", "<f8", "<u2", "<u4", "<i4", "|O", "<c8", "<U8", ">f4", "float16", "", "?", 3])
shapes = st.one_of(st.lists(st.integers(-3, 2**33), min_size=0, max_size=5), json_values)


@st.composite
def headers(draw):
    """Mostly plausible classify headers with one or more fields broken, plus raw junk."""
    kind = draw(st.sampled_from(["map", "scan", "file", "video", None]))
    spec = {"kind": kind, "shape": draw(shapes), "dtype": draw(dtypes)}
    if draw(st.booleans()):
        spec["axes"] = draw(st.one_of(st.just(["q_par", "q_perp1", "q_perp2"]), json_values))
    if draw(st.booleans()):
        spec[draw(st.sampled_from(["voxel_size", "q_direction", "geometry", "mask", "path", "extra"]))] = draw(json_values)
    header = {"protocol": draw(st.sampled_from(["defectscope/1", "defectscope/1", "defectscope/2", None])),
              "op": draw(st.sampled_from(["classify", "classify", "classify", "info", "health", "reload", "nope"])),
              "request_id": draw(st.one_of(st.text(min_size=1, max_size=20), st.integers(), st.none())),
              "input": spec}
    if draw(st.booleans()):
        header["options"] = draw(st.one_of(st.just({"return_prepared": True}), json_values))
    encoded = json.dumps(header, allow_nan=True).encode()
    return draw(st.one_of(st.just(encoded), st.binary(max_size=64),
                          st.just(b"\x80\x04\x95" + encoded[:20]),  # pickle-looking
                          st.just(b"\x82\xa2op\xa8classify")))     # msgpack-looking


messages = st.tuples(headers(), st.lists(st.binary(max_size=256), max_size=3))


@pytest.fixture(scope="module")
def fuzz_server(predictor):
    from defectscope.server.core import Classifier
    from defectscope.server.zmq_server import Server

    server = Server(Classifier(predictor, limits=Limits(queue_length=64)), "tcp://127.0.0.1:*").start()
    yield server
    server.stop(drain=False)


@pytest.fixture(scope="module")
def sock(fuzz_server):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(fuzz_server.endpoint)
    yield s
    s.close(0)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(message=messages)
def test_every_malformed_message_gets_one_reply_with_a_reason(sock, message):
    header, buffers = message
    sock.send_multipart([b"", header, *buffers])
    assert sock.poll(10000), "no reply"
    parts = sock.recv_multipart()
    reply = json.loads(parts[1])
    json.dumps(reply, allow_nan=False)  # no NaN or Inf ever reaches a client
    if not reply["ok"]:
        assert reply["error"]["reason"] in REASONS and reply["error"]["message"]
    assert not sock.poll(0), "more than one reply to one request"


def test_server_alive_after_the_fuzz(sock):
    volume = bragg_map()
    header = {"protocol": "defectscope/1", "op": "classify", "request_id": "after-fuzz",
              "input": {"kind": "map", "shape": list(volume.shape), "dtype": "<f4",
                        "axes": ["q_par", "q_perp1", "q_perp2"]}}
    sock.send_multipart([b"", json.dumps(header).encode(), volume.tobytes()])
    assert sock.poll(10000)
    reply = json.loads(sock.recv_multipart()[1])
    assert reply["ok"] and reply["request_id"] == "after-fuzz"
