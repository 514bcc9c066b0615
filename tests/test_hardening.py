"""Hardening of the ZeroMQ server against hostile and careless clients, each over real sockets against a
real server: foreign serialisations, huge shape claims, non-finite maps, overload, vanishing clients.

The in-process servers (``make_server``) run in threads of this process, so ``tracemalloc`` sees what
they allocate (numpy reports its buffers to it); the vanishing-client test runs ``defectscope serve`` in a
subprocess and reads its RSS from /proc. Figures are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import random
import select
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from defectscope.errors import REASONS
from defectscope.preprocessing.config import Limits

from conftest import bragg_map
from sync import GATED_SERVE, HANG_S, Gate, wait_until

AXES = ["q_par", "q_perp1", "q_perp2"]
CLI = [sys.executable, "-m", "defectscope.server.cli"]
MB = 1024 * 1024
GEOMETRY = {"preset": "aps-34idc", "direct_beam": [300.0, 290.0],
            "angles": {"chi": 90.0, "phi": -5.0, "delta": 32.174, "gamma": 12.6346},
            "rocking": {"motor": "theta", "start_deg": 0.1, "step_deg": 0.004}}


# -- helpers (also used by test_soak.py) -------------------------------------------------------------
def strict_json(raw: bytes) -> dict:
    """A reply parsed by a JSON parser that refuses NaN, Infinity and -Infinity (plain json.loads takes them)."""

    def refuse(token):
        raise AssertionError(f"{token} reached a client: {bytes(raw[:300])!r}")

    return json.loads(raw, parse_constant=refuse)


def header(op: str = "classify", request_id: str = "h-1", **fields) -> bytes:
    return json.dumps({"protocol": "defectscope/1", "op": op, "request_id": request_id, **fields}).encode()


def map_header(shape=(64, 64, 64), dtype="<f4", request_id="h-1", **fields) -> bytes:
    return header(request_id=request_id, input={"kind": "map", "shape": list(shape), "dtype": dtype, "axes": AXES},
                  **fields)


def scan_header(shape, dtype="<u4", request_id="h-1") -> bytes:
    return header(request_id=request_id, input={"kind": "scan", "shape": list(shape), "dtype": dtype,
                                                "geometry": GEOMETRY})


@contextlib.contextmanager
def dealer(endpoint: str, context: zmq.Context | None = None):
    sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close(0)


def ask(sock, frames, timeout_ms: int = 10000) -> tuple[dict, list[bytes]]:
    """Send one request from a REQ-compatible DEALER; return its one reply, strictly parsed, and extra frames."""
    sock.send_multipart([b"", *frames], copy=False)
    assert sock.poll(timeout_ms), "no reply"
    parts = sock.recv_multipart()
    assert parts[0] == b"", parts[:1]
    reply = strict_json(parts[1])
    assert not sock.poll(0), "more than one reply to one request"
    return reply, parts[2:]


def health(sock) -> dict:
    reply, _ = ask(sock, [header(op="health", request_id="health")])
    assert reply["ok"], reply
    return reply


def failures(health_reply: dict, reason: str) -> int:
    return health_reply["failures_by_reason"].get(reason, 0)


def assert_reason(reply: dict, *reasons: str) -> None:
    assert reply["ok"] is False, reply
    assert reply["error"]["reason"] in reasons, reply
    assert reply["error"]["reason"] in REASONS and reply["error"]["message"]


def assert_serves(sock, request_id: str = "still-serving") -> dict:
    reply, _ = ask(sock, [map_header(request_id=request_id), bragg_map(seed=5).tobytes()])
    assert reply["ok"] and reply["request_id"] == request_id, reply
    return reply


@contextlib.contextmanager
def traced_peak():
    """Peak of traced memory above the level at entry, over everything this process allocates meanwhile
    (the in-process server's threads included); read ``.bytes`` after the block."""
    result = SimpleNamespace(bytes=None)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        yield result
        result.bytes = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@contextlib.contextmanager
def serve_process(model, log_path, *args, gated: bool = False):
    """`defectscope serve` in a subprocess on a free loopback port; yields (process, endpoint) once it has
    printed its readiness line; then SIGTERM, and a clean exit is required. Its log goes to ``log_path``
    (a pipe nobody reads would fill and stall the server). ``gated``: each classification first takes one
    byte from the process's stdin (``sync.GATED_SERVE``; write to ``proc.stdin`` to let one through, close
    it to let all through), so the test decides when the worker may answer."""
    command = [*(GATED_SERVE if gated else CLI), "serve", "--model", str(model), "--bind", "tcp://127.0.0.1:*",
               *map(str, args)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                stdin=subprocess.PIPE if gated else None)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("defectscope serving on tcp://127.0.0.1:"), line + Path(log_path).read_text()
        yield proc, line.split()[3]
        if gated:
            proc.stdin.close()  # no worker left waiting for a token
        proc.terminate()
        assert proc.wait(30) == 0, Path(log_path).read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        if gated and not proc.stdin.closed:
            proc.stdin.close()


def let_through(proc, n: int = 1) -> None:
    """Let ``n`` more classifications of a gated ``serve_process`` run."""
    proc.stdin.write("x" * n)
    proc.stdin.flush()


def rss_kb(pid: int) -> int:
    """Resident set size of a process, in kB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@pytest.fixture(scope="module")
def hard_server(predictor):
    """One server (default limits, 1 worker) for the stateless checks; tests compare counter deltas."""
    from defectscope.server.core import Classifier
    from defectscope.server.zmq_server import Server

    server = Server(Classifier(predictor), "tcp://127.0.0.1:*", drain_s=5).start()
    yield server
    server.stop(drain=False)


@pytest.fixture
def sock(hard_server):
    with dealer(hard_server.endpoint) as s:
        yield s


# -- 1. foreign serialisations as the header ---------------------------------------------------------
class _Trap:
    """Unpickling this opens ``path`` for writing, i.e. creates it: proof that a pickle was executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def msgpack(obj) -> bytes:
    """A minimal MessagePack encoder (dict, list, short str, small int), byte-identical to msgpack.packb for
    these: what a msgpack client would send, without depending on msgpack."""
    if isinstance(obj, dict) and len(obj) < 16:
        return bytes([0x80 | len(obj)]) + b"".join(msgpack(k) + msgpack(v) for k, v in obj.items())
    if isinstance(obj, list) and len(obj) < 16:
        return bytes([0x90 | len(obj)]) + b"".join(msgpack(v) for v in obj)
    if isinstance(obj, str) and len(obj.encode()) < 32:
        return bytes([0xA0 | len(obj.encode())]) + obj.encode()
    if isinstance(obj, int) and 0 <= obj < 128:
        return bytes([obj])
    if isinstance(obj, int) and 0 <= obj < 2**16:
        return (b"\xcc" + bytes([obj])) if obj < 256 else (b"\xcd" + obj.to_bytes(2, "big"))
    raise TypeError(f"msgpack helper cannot encode {obj!r}")


def test_pickle_msgpack_and_random_headers_are_refused_unexecuted(sock, tmp_path):
    """Pickles (whose loading would create a file), MessagePack and random bytes as the header frame, alone
    or followed by a valid map buffer, each get exactly one BAD_MESSAGE reply; no pickle is loaded, no
    classification runs, the counters say so, and the server then answers a valid request."""
    marker, armed = tmp_path / "unpickled", tmp_path / "armed"
    pickle.loads(pickle.dumps(_Trap(armed))).close()
    assert armed.exists(), "the trap must work: loading such a pickle anywhere creates its file"
    valid = {"protocol": "defectscope/1", "op": "classify", "request_id": "foreign",
             "input": {"kind": "map", "shape": [64, 64, 64], "dtype": "<f4", "axes": AXES}}
    foreign = [pickle.dumps(_Trap(marker), protocol=p) for p in (0, 2, 4, pickle.HIGHEST_PROTOCOL)]
    foreign.append(pickle.dumps({**valid, "trap": _Trap(marker)}))  # a "header" dict, pickled
    foreign += [msgpack(valid), msgpack({"protocol": "defectscope/1", "op": "health"})]
    rng = random.Random(1)
    foreign += [rng.randbytes(n) for n in (1, 3, 64, 1024, 60000)]
    payload = bragg_map(seed=1).tobytes()

    before = health(sock)
    for raw in foreign:
        for frames in ([raw], [raw, payload]):
            reply, extra = ask(sock, frames)
            assert_reason(reply, "BAD_MESSAGE")
            assert extra == []
    after = health(sock)

    assert not marker.exists(), "a pickle sent to the server was loaded"
    n = 2 * len(foreign)
    assert after["requests_total"] - before["requests_total"] == n
    assert failures(after, "BAD_MESSAGE") - failures(before, "BAD_MESSAGE") == n
    assert after["latency_ms"]["window"] == before["latency_ms"]["window"], "a classification ran"
    assert_serves(sock)


# -- 2. shape claims, byte counts, dtypes ------------------------------------------------------------
# Limits lifted far above the claims, so only the byte count of the payload can refuse them.
LIFTED = Limits(max_message_bytes=2**40, max_map_voxels=2**40, max_batch=2**32, max_scan_frames=2**32,
                max_frame_pixels=2**40, max_scan_voxels=2**40)


@pytest.mark.parametrize("limits, reason", [(None, "TOO_LARGE"), (LIFTED, "SHAPE_MISMATCH")],
                         ids=["default-limits", "limits-lifted"])
def test_huge_shape_claims_allocate_nothing(make_server, limits, reason):
    """Claims of 4096^3 and 2^31x1x1 voxels (map, batch, scan) with a 4-byte payload are refused - by the
    limits, or with the limits lifted by the byte count - before anything of the claimed size exists: the
    traced peak while the server handles them is < 5 MB, and the same measurement sees a valid 128^3 map
    (8 MiB) cost more than that, so it does watch the server's threads."""
    server = make_server(limits=limits)
    claims = [map_header((4096, 4096, 4096), request_id="map-4096^3"),
              map_header((2**31, 1, 1), request_id="map-2^31"),
              map_header((2**31, 1, 1, 1), request_id="batch-2^31"),
              scan_header((2**31, 1, 1), request_id="scan-2^31")]
    control = [map_header((128, 128, 128), request_id="control"),
               bragg_map(shape=(128, 128, 128), centre=(60.3, 70.1, 64.2), size=(20, 15, 12)).tobytes()]
    with dealer(server.endpoint) as sock:
        health(sock)  # connected: the handshake is not part of the measurement
        with traced_peak() as claimed:
            for claim in claims:
                reply, _ = ask(sock, [claim, b"tiny"])
                assert_reason(reply, reason)
        with traced_peak() as valid:
            reply, _ = ask(sock, control, timeout_ms=60000)
            assert reply["ok"], reply
    print(f"\nhuge claims ({reason}): traced peak {claimed.bytes / 1e3:.1f} kB; "
          f"control 128^3 map: {valid.bytes / MB:.1f} MiB")
    assert claimed.bytes < 5e6
    assert valid.bytes > 5e6


def test_payload_bytes_must_match_dtype_times_shape(sock):
    """A payload whose byte count is not dtype x shape is SHAPE_MISMATCH, whichever way it is off: the wrong
    dtype for the bytes, one byte short or over, a 3-D map split in two, a short map in a batch, short
    frames of a scan."""
    good = bragg_map(seed=2).tobytes()  # 64^3 float32: 1 MiB
    frame_u2 = np.ones((8, 8), "<u2").tobytes()
    cases = {
        "f4 bytes declared f8": [map_header(dtype="<f8"), good],
        "f4 bytes declared u2": [map_header(dtype="<u2"), good],
        "shape one plane short": [map_header(shape=(64, 64, 63)), good],
        "one byte over": [map_header(), good + b"\0"],
        "one byte short": [map_header(), good[:-1]],
        "3-D map in two buffers": [map_header(), good[: MB // 2], good[MB // 2:]],
        "second map of a batch short": [map_header(shape=(2, 64, 64, 64)), good, good[:-4]],
        "scan one value short": [scan_header((4, 8, 8)), np.ones((4, 8, 8), "<u4").tobytes()[:-4]],
        "u2 frames declared u4": [scan_header((4, 8, 8)), frame_u2, frame_u2, frame_u2, frame_u2],
    }
    for name, frames in cases.items():
        reply, _ = ask(sock, frames)
        assert reply["ok"] is False and reply["error"]["reason"] == "SHAPE_MISMATCH", (name, reply)
    assert_serves(sock)


@pytest.mark.parametrize("dtype, itemsize", [("|O", 8), ("<U8", 32), ("<c8", 8), ("<c16", 16), (">f4", 4),
                                             ("<f2", 2), ("|V4", 4)])
def test_exotic_dtypes_are_refused(sock, dtype, itemsize):
    """Object, unicode, complex, big-endian, half and void dtypes are DTYPE_NOT_ALLOWED, even when the
    payload has exactly the bytes that dtype would need (an object array's would be pointers)."""
    payload = np.random.default_rng(0).integers(0, 256, 64**3 * itemsize, dtype=np.uint8).tobytes()
    reply, _ = ask(sock, [map_header(dtype=dtype), payload])
    assert_reason(reply, "DTYPE_NOT_ALLOWED")
    assert_serves(sock)


# -- 3. non-finite and signal-free maps --------------------------------------------------------------
def _bad_map(name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """A map of the named kind and the reasons it may be refused with."""
    m = bragg_map(seed=4)
    peak = np.unravel_index(np.argmax(m), m.shape)
    if name in ("nan-voxel", "inf-voxel", "minus-inf-voxel"):
        m[10, 20, 30] = {"nan-voxel": np.nan, "inf-voxel": np.inf, "minus-inf-voxel": -np.inf}[name]
        return m, ("NON_FINITE",)
    if name == "nan-at-the-peak":
        m[peak] = np.nan
        return m, ("NON_FINITE",)
    if name == "all-nan-f8":
        return np.full(m.shape, np.nan, "<f8"), ("NON_FINITE",)
    if name == "nan-in-second-map-of-batch":
        second = m.copy()
        second[peak] = np.nan
        return np.stack([m, second]), ("NON_FINITE",)
    if name == "all-zero":
        return np.zeros(m.shape, "<f4"), ("LOW_SIGNAL", "NON_FINITE")
    if name == "all-zero-u2":
        return np.zeros(m.shape, "<u2"), ("LOW_SIGNAL", "NON_FINITE")
    if name == "constant":
        return np.full(m.shape, 7.0, "<f4"), ("LOW_SIGNAL", "NON_FINITE")
    if name == "constant-negative":
        return np.full(m.shape, -7.0, "<f4"), ("LOW_SIGNAL", "NON_FINITE")
    if name == "negative":
        return -m, ("LOW_SIGNAL", "NON_FINITE")
    if name == "below-min-counts":
        return m / m.max() * 5, ("LOW_SIGNAL",)
    raise ValueError(name)


BAD_MAPS = ["nan-voxel", "inf-voxel", "minus-inf-voxel", "nan-at-the-peak", "all-nan-f8",
            "nan-in-second-map-of-batch", "all-zero", "all-zero-u2", "constant", "constant-negative",
            "negative", "below-min-counts"]


@pytest.mark.parametrize("name", BAD_MAPS)
def test_non_finite_and_signal_free_maps(sock, name):
    """NaN/Inf anywhere in a map (or in one map of a batch) is NON_FINITE; all-zero, constant, negative and
    too-faint maps are LOW_SIGNAL or NON_FINITE; every reply - and health after it - parses with a JSON
    parser that refuses NaN and Infinity."""
    volume, reasons = _bad_map(name)
    reply, extra = ask(sock, [map_header(volume.shape, volume.dtype.str, request_id=name,
                                         options={"return_prepared": True}), volume.tobytes()])
    assert_reason(reply, *reasons)
    assert reply["request_id"] == name and extra == []
    health(sock)  # strictly parsed too: latency figures and counters hold no NaN


def test_valid_reply_and_prepared_frame_are_finite(sock):
    """The success path: the reply header parses strictly and the prepared map frame holds finite values."""
    volume = bragg_map(seed=8)
    reply, extra = ask(sock, [map_header(options={"return_prepared": True}), volume.tobytes()])
    assert reply["ok"], reply
    prepared = np.frombuffer(extra[0], reply["prepared"]["dtype"]).reshape(reply["prepared"]["shape"])
    assert np.isfinite(prepared).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # as deployed: numpy's overflow warnings are not errors there
@pytest.mark.parametrize("peak", [1e37, 3.4e38])
def test_map_at_the_top_of_float32_is_prepared_as_at_normal_scale_or_refused(sock, peak):
    """Preparation normalises by the maximum, so a finite float32 map scaled up must give the same prepared
    map as at normal scale - or be refused NON_FINITE/TOO_LARGE - never a silently different one, and no
    warning may carry 'nan'. It failed so once: a peak of 1e37 was prepared without the oversampling
    correction (4 % of the maximum off, no warning); 3.4e38 added 'centre of mass at (nan, nan, nan)'."""
    base = bragg_map(seed=6)
    scaled = (base.astype(np.float64) / base.max() * peak).astype("<f4")
    assert np.isfinite(scaled).all()

    def ask_prepared(volume, request_id):
        return ask(sock, [map_header(request_id=request_id, options={"return_prepared": True}), volume.tobytes()])

    reference, ref_frames = ask_prepared(base, "normal-scale")
    reply, frames = ask_prepared(scaled, "top-of-float32")
    if not reply["ok"]:
        assert_reason(reply, "NON_FINITE", "TOO_LARGE")
        return
    assert "nan" not in json.dumps(reply["warnings"]).lower(), reply["warnings"]
    assert [w["reason"] for w in reply["warnings"]] == [w["reason"] for w in reference["warnings"]]
    np.testing.assert_allclose(np.frombuffer(frames[0], "<f4"), np.frombuffer(ref_frames[0], "<f4"), atol=1e-5)


# -- 4. overload -------------------------------------------------------------------------------------
def test_overload_answers_busy_at_once_with_bounded_memory(make_server):
    """64 DEALER clients send one 64^3 map each to 1 worker with a queue of 4. The worker is held inside the
    first client's classification while the other 63 send at once, so the queue is full deterministically:
    exactly Q of them are accepted and the other 63 - Q are answered BUSY while the worker is still held
    (refused at once, not queued behind the worker: a server that waited for room before saying BUSY would
    give no reply until the worker is let go); health then counts the held request, the queued ones and
    nothing else in flight. Let go, every accepted request completes ok; each client gets exactly one
    reply; health counts all 64 and the BUSYs. Traced memory during the burst stays under one request's
    working set per worker (measured alone first) plus (Q + 2) requests: nothing per refused request is
    kept or copied. (The raw frames sit in libzmq buffers, which tracemalloc does not see; the bound is on
    what the server itself allocates.)"""
    Q, WORKERS, N = 4, 1, 64
    gate = Gate()
    server = make_server(limits=Limits(queue_length=Q), workers=WORKERS, gate=gate)
    payload = bragg_map(seed=11).tobytes()
    ctx = zmq.Context()  # the clients' own I/O thread, as separate client processes would have
    socks = [ctx.socket(zmq.DEALER) for _ in range(N)]
    monitor = ctx.socket(zmq.DEALER)
    try:
        for i, s in enumerate([*socks, monitor]):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(server.endpoint)
        for i, s in enumerate(socks):  # every connection up before the burst
            health(s)
        with traced_peak() as alone:
            reply, _ = ask(socks[0], [map_header(request_id="alone"), payload])
            assert reply["ok"], reply
        before = health(monitor)

        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        index = {s: i for i, s in enumerate(socks)}
        replies: dict[int, dict] = {}

        def collect(n: int) -> None:
            while len(replies) < n:
                ready = poller.poll(HANG_S * 1000)
                assert ready, f"{N - len(replies)} clients got no reply within {HANG_S:g} s"
                for s, _ in ready:
                    parts = s.recv_multipart()
                    i = index[s]
                    assert i not in replies, f"client {i} got a second reply"
                    replies[i] = strict_json(parts[1])

        with traced_peak() as burst:
            gate.close()
            held = gate.arrived + 1
            socks[0].send_multipart([b"", map_header(request_id="c0"), payload], copy=False)
            gate.wait_arrived(held)  # the worker is inside c0's classification
            for i, s in enumerate(socks[1:], 1):
                s.send_multipart([b"", map_header(request_id=f"c{i}"), payload], copy=False)
            collect(N - 1 - Q)  # while the worker is held, only refusals can be answered
            busy_while_held = dict(replies)
            during = health(monitor)
            gate.open()
            collect(N)
        assert not poller.poll(200), "a client got a second reply"
        after = health(monitor)
    finally:
        gate.open()
        for s in [*socks, monitor]:
            s.close(0)
        ctx.term()

    assert len(replies) == N, f"{N - len(replies)} clients got no reply"
    assert all(reply["request_id"] == f"c{i}" for i, reply in replies.items())
    assert all(not r["ok"] and r["error"]["reason"] == "BUSY" for r in busy_while_held.values()), busy_while_held
    assert during["queue_depth"] == Q + WORKERS, during  # the held request and a full queue, no more
    ok = [i for i, reply in replies.items() if reply["ok"]]
    busy = [i for i, reply in replies.items() if not reply["ok"]]
    assert all(replies[i]["error"]["reason"] == "BUSY" for i in busy)
    assert 0 in ok and len(ok) == Q + WORKERS and len(busy) == N - Q - WORKERS, (ok, busy)
    bound = WORKERS * alone.bytes + (Q + 2) * len(payload)
    print(f"\noverload: {len(ok)} accepted, {len(busy)} BUSY (all while the worker was held); "
          f"traced peak {burst.bytes / MB:.1f} MiB (one request alone {alone.bytes / MB:.1f} MiB, "
          f"bound {bound / MB:.1f} MiB)")
    assert after["requests_total"] - before["requests_total"] == N
    assert failures(after, "BUSY") - failures(before, "BUSY") == len(busy)
    assert after["requests_failed"] - before["requests_failed"] == len(busy)
    assert burst.bytes < bound


# -- 5. clients that vanish mid-request --------------------------------------------------------------
def theil_sen(x, y) -> float:
    """Median of the pairwise slopes: a steady leak shows in full, a one-off step of the heap barely moves it."""
    i, j = np.triu_indices(len(x), 1)
    return float(np.median((y[j] - y[i]) / (x[j] - x[i])))


def drained(sock, handled: int = 0, timeout_s: float = HANG_S) -> dict:
    """Poll health until the queue is empty and at least ``handled`` requests are counted; its last reply."""
    last = {}

    def settled():
        last["health"] = h = health(sock)
        return h if h["queue_depth"] == 0 and h["requests_total"] >= handled else None

    return wait_until(settled, timeout_s, lambda: f"queue drained, {handled} handled; health {last.get('health')}")


def test_clients_vanishing_mid_request_leak_nothing(fixture_model, tmp_path):
    """1000 short-lived clients each send a 32^3 map and close (linger 0) before its reply, against
    `defectscope serve` in a subprocess: the server's RSS, sampled every 100 clients once the queue is
    drained, grows by < 2 KB per client over the last 800 (Theil-Sen slope: the heap's one-off steps are
    not leaks); afterwards it answers a normal request, and health counts every request with none failed.
    The server's worker takes a client's map only after that client has left (``gated``: the test lets
    one classification through per departed client), so every reply goes to a vanished client whatever
    the machine's load, and none may reach a client."""
    N, EVERY, WARM_UP, BACKLOG = 1000, 100, 200, 8
    payload = bragg_map(shape=(32, 32, 32), centre=(15.3, 17.1, 14.2), size=(5.5, 4.0, 3.0), seed=3).tobytes()
    contexts = [zmq.Context() for _ in range(4)]
    samples = []  # (clients so far, RSS kB)
    answered = 0  # classify replies that beat the client's departure
    try:
        with serve_process(fixture_model, tmp_path / "serve.log", "--queue", 256, gated=True) as (proc, endpoint), \
                dealer(endpoint) as monitor:
            samples.append((0, rss_kb(proc.pid)))
            t0 = time.perf_counter()
            for i in range(N):
                with dealer(endpoint, contexts[i % len(contexts)]) as sock:
                    sock.send_multipart([b"", map_header((32, 32, 32), request_id=f"v{i}"), payload], copy=False)
                    # One connection is read in order: the reply to this health request proves the server
                    # has read the classify request; the socket closes before that one is answered.
                    sock.send_multipart([b"", header(op="health", request_id=f"v{i}-seen")])
                    while True:
                        assert sock.poll(HANG_S * 1000), f"client {i}: no reply"
                        seen = strict_json(sock.recv_multipart()[1])
                        if seen["request_id"] == f"v{i}-seen":
                            break
                        answered += 1
                let_through(proc)  # the client has gone: its map may be classified now
                # Keep the backlog short (a long one raises the heap's high-water mark, not a leak), and
                # sample RSS with the queue empty and every request so far handled.
                if seen["queue_depth"] >= BACKLOG or (i + 1) % EVERY == 0:
                    drained(monitor, i + 1 if (i + 1) % EVERY == 0 else 0)
                if (i + 1) % EVERY == 0:
                    samples.append((i + 1, rss_kb(proc.pid)))
            elapsed = time.perf_counter() - t0
            let_through(proc)
            assert_serves(monitor, "after-the-vanished")
            # The worker counts itself idle just after pushing its reply: poll, as a client of health would.
            final = drained(monitor, N + 1)
    finally:
        for ctx in contexts:
            ctx.term()

    x, kb = np.array(samples, dtype=float).T
    late = x >= WARM_UP
    slope = theil_sen(x[late], kb[late] * 1024)  # bytes per client
    least_squares = np.polyfit(x[late], kb[late] * 1024, 1)[0]
    print(f"\nvanishing clients: {N} in {elapsed:.1f} s, {answered} answered before leaving; RSS kB "
          + ", ".join(f"{int(n)}:{int(k)}" for n, k in samples) + f"; slope over the last {N - WARM_UP}: "
          f"{slope:.0f} B/client (Theil-Sen), {least_squares:.0f} B/client (least squares)")
    assert answered == 0, "a classify reply reached its client before the client left"
    assert final["requests_total"] == N + 1
    assert final["requests_failed"] == 0 and final["failures_by_reason"] == {}, final
    assert slope < 2048
