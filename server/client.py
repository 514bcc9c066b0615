"""Python client for ``defectscope/1``.

>>> from defectscope.server.client import Client
>>> with Client("tcp://127.0.0.1:5557") as client:
...     reply = client.classify(volume, axes=["q_par", "q_perp1", "q_perp2"])
...     reply["label"], reply["probabilities"]

A DEALER socket that sends the empty delimiter REQ would (SPEC §4), so one client can retry a request
after a timeout without the REQ lock-step: a retry re-sends the same ``request_id``, and replies to an
earlier attempt, if they arrive late, are recognised by that id and not mistaken for the answer to the
next request. An error reply raises the ``defectscope.errors`` class of its reason.

Retrying is safe: a server with a results log answers a ``request_id`` it already answered ``ok`` (same
input) with the recorded reply, marked ``"replayed": true``, even after it was killed and restarted; pass
your own ``request_id`` (e.g. the scan name) to retry across a client restart too.

Every call returns or raises within its time limit, whatever the peer does: a send waits for room (a peer
to send to, space in the send queue) at most until the attempt's deadline, so a refused CURVE handshake, a
server that is down, one that accepts and never answers, or a full send queue all end in ``TimeoutError``
after ``(retries + 1) * timeout_s`` at most. An attempt whose send could not complete leaves its socket
(which may still hold the unsent message) and the next attempt starts on a fresh one.

``reload(token, model=None)`` asks a server started with ``--reload-token-file`` to load another model
(or re-read its configured one); it is sent once (never retried) and may wait for a long load.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Sequence

import numpy as np
import zmq

from defectscope import PROTOCOL
from defectscope.errors import from_reason
from defectscope.preprocessing.config import CANONICAL_AXES
from defectscope.server.protocol import DTYPE_ALIASES


class Client:
    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5557",
        *,
        timeout_s: float = 10.0,
        retries: int = 2,
        context: zmq.Context | None = None,
        curve: dict | None = None,
    ):
        """``curve``: {"server_public": bytes, "public": bytes, "secret": bytes} for CURVE endpoints."""
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self._ctx = context or zmq.Context.instance()
        self._curve = curve
        self._socket = None
        self._connect()

    def _connect(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve:
            sock.curve_serverkey = self._curve["server_public"]
            sock.curve_publickey = self._curve["public"]
            sock.curve_secretkey = self._curve["secret"]
        sock.connect(self.endpoint)
        self._socket = sock

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- transport --------------------------------------------------------------------------------
    def request(self, header: dict, buffers: Sequence = (), *, raise_on_error: bool = True,
                timeout_s: float | None = None, retries: int | None = None) -> tuple[dict, list[bytes]]:
        """Send one request (with retries) and return ``(reply, extra_frames)``."""
        header = {"protocol": PROTOCOL, **header}
        header.setdefault("request_id", uuid.uuid4().hex)
        rid = header["request_id"]
        frames = [b"", json.dumps(header).encode("utf-8"), *buffers]
        timeout_ms = int(1000 * (self.timeout_s if timeout_s is None else timeout_s))
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            deadline = time.monotonic() + timeout_ms / 1000
            if not self._send(frames, deadline):
                self._reconnect()  # nothing took the request: start the next attempt on a fresh socket
                continue
            reply, extra = self._receive(rid, deadline - time.monotonic(), raise_on_error)
            if reply is not None:
                return reply, extra
        raise TimeoutError(f"no reply from {self.endpoint} to request {rid} after {retries + 1} attempts "
                           f"of {timeout_ms / 1000:g} s")

    def _send(self, frames, deadline: float) -> bool:
        """Send one message if the socket takes it before ``deadline``; False if it does not.

        A DEALER's blocking send waits for as long as it has no peer (none connected yet, a CURVE handshake
        refused) or its send queue is full: never block, wait for room with a poll bounded by the deadline.
        The parts of a message go together: once the first is queued, ZeroMQ queues the rest."""
        while True:
            left = int(1000 * (deadline - time.monotonic()))
            if left <= 0 or not self._socket.poll(left, zmq.POLLOUT):
                return False
            try:
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:  # the room seen by poll was taken or lost: wait again
                continue

    def _reconnect(self) -> None:
        self.close()
        self._connect()

    # -- conveniences -----------------------------------------------------------------------------
    def info(self, model: str | None = None) -> dict:
        """The server's description; ``models`` lists every model it serves. ``model``: describe that one."""
        return self.request({"op": "info", **_model(model)})[0]

    def health(self, model: str | None = None) -> dict:
        return self.request({"op": "health", **_model(model)})[0]

    def reload(self, token: str, model: str | None = None, *, name: str | None = None, timeout_s: float = 300.0,
               request_id: str | None = None) -> dict:
        """Swap a served model: ``name`` says which (default: the server's default model), ``model`` what to
        load there, a ``.onnx`` path on the server or a bundled name (None: the file it was started from, read
        again). Returns the reply (``model``, ``previous_model``, ``served_as``, ``load_ms``); raises
        ``Unauthorized`` (wrong token, reload not enabled) or ``ModelUnavailable`` (the new model does not
        load; the old one keeps serving). Not retried: a second reload while the first still loads would get
        ``BUSY``."""
        header = {"op": "reload", "auth": {"token": token}}
        if name is not None:
            header["model"] = str(name)
            if model is not None:
                header["path"] = str(model)
        elif model is not None:
            header["model"] = str(model)
        if request_id:
            header["request_id"] = request_id
        return self.request(header, timeout_s=timeout_s, retries=0)[0]

    def classify(self, volume: np.ndarray, axes: Sequence[str] = CANONICAL_AXES, *, voxel_size=None,
                 q_direction=None, intensity: str | None = None, model: str | None = None,
                 request_id: str | None = None, return_prepared: bool = False, raise_on_error: bool = True) -> dict:
        """Classify one map ``[n0,n1,n2]`` or a batch ``[B,n0,n1,n2]``; adds ``prepared`` array if asked.

        ``intensity``: what the numbers are (SPEC §4): ``"counts"`` (the default: photon counts),
        ``"relative"`` (a scaled intensity, e.g. maximum 1) or ``"amplitude"`` (sqrt(I)). The same keyword
        is taken by ``classify_scan``, ``classify_scan_stream`` and ``classify_file``, and so is ``model``:
        the name of the served model to answer (``info()["models"]``; default: the server's default)."""
        volume = _wire_array(volume)
        spec = {"kind": "map", "shape": list(volume.shape), "dtype": volume.dtype.str, "axes": list(axes),
                **_intensity(intensity)}
        if voxel_size is not None:
            spec["voxel_size"] = [float(v) for v in voxel_size]
        if q_direction is not None:
            spec["q_direction"] = [float(v) for v in q_direction]
        header = {"op": "classify", "input": spec, "options": {"return_prepared": return_prepared}, **_model(model)}
        if request_id:
            header["request_id"] = request_id
        reply, extra = self.request(header, [memoryview(volume).cast("B")], raise_on_error=raise_on_error)
        return _attach_prepared(reply, extra)

    def classify_scan(self, frames, geometry: dict, *, mask: np.ndarray | None = None, per_frame: bool = True,
                      intensity: str | None = None, model: str | None = None, request_id: str | None = None,
                      return_prepared: bool = False, raise_on_error: bool = True) -> dict:
        """Classify a raw rocking scan ``[n_frames, rows, cols]`` (or a list of frames) with its geometry."""
        if isinstance(frames, np.ndarray):
            stack = _wire_array(frames)
            parts = [memoryview(np.ascontiguousarray(f)).cast("B") for f in stack] if per_frame else [memoryview(stack).cast("B")]
            shape, dtype = stack.shape, stack.dtype
        else:
            frames = [_wire_array(f) for f in frames]
            parts = [memoryview(f).cast("B") for f in frames]
            shape, dtype = (len(frames), *frames[0].shape), frames[0].dtype
        spec = {"kind": "scan", "shape": list(shape), "dtype": dtype.str, "geometry": geometry, **_intensity(intensity)}
        if mask is not None:
            m = np.ascontiguousarray(mask, dtype=np.uint8)
            spec["mask"] = {"shape": list(m.shape), "dtype": "|u1"}
            parts.append(memoryview(m).cast("B"))
        header = {"op": "classify", "input": spec, "options": {"return_prepared": return_prepared}, **_model(model)}
        if request_id:
            header["request_id"] = request_id
        reply, extra = self.request(header, parts, raise_on_error=raise_on_error)
        return _attach_prepared(reply, extra)

    def classify_scan_stream(self, frames, geometry: dict, *, n_frames: int | None = None, frame_shape=None,
                             dtype=None, mask: np.ndarray | None = None, intensity: str | None = None,
                             model: str | None = None, request_id: str | None = None, return_prepared: bool = False,
                             raise_on_error: bool = True) -> dict:
        """Send a scan frame by frame as it is measured (streamed scan, see ``server.protocol``).

        ``frames`` is any iterable of 2-D frames (a generator reading the detector, or an array); give
        ``n_frames`` (and ``frame_shape``/``dtype`` when the first frame is not at hand) unless ``frames``
        has a length. Frames go out as they come; an error reply stops the sending and is raised. Not
        retried: a lost stream is sent again by calling this again.
        """
        it = iter(frames)
        first = _wire_array(next(it))
        n_frames = len(frames) if n_frames is None else int(n_frames)
        shape = tuple(frame_shape or first.shape)
        rid = request_id or uuid.uuid4().hex
        spec = {"kind": "scan", "shape": [n_frames, *shape], "dtype": np.dtype(dtype or first.dtype).str,
                "geometry": geometry, "stream": True, **_intensity(intensity)}
        parts = []
        if mask is not None:
            m = np.ascontiguousarray(mask, dtype=np.uint8)
            spec["mask"] = {"shape": list(m.shape), "dtype": "|u1"}
            parts.append(memoryview(m).cast("B"))
        header = {"protocol": PROTOCOL, "op": "classify", "request_id": rid, "input": spec,
                  "options": {"return_prepared": return_prepared}, **_model(model)}
        self._send_or_raise([b"", json.dumps(header).encode("utf-8"), *parts], rid)
        wire_dtype = np.dtype(spec["dtype"])
        frame = first
        for index in range(n_frames):
            if index:
                frame = next(it)
            frame = np.ascontiguousarray(frame, dtype=wire_dtype)
            head = {"protocol": PROTOCOL, "op": "frame", "request_id": rid, "index": index}
            if index == n_frames - 1:
                head["last"] = True
            self._send_or_raise([b"", json.dumps(head).encode("utf-8"), memoryview(frame).cast("B")], rid)
            if self._socket.poll(0, zmq.POLLIN):  # an early error: the stream is over
                reply, extra = self._receive(rid, self.timeout_s, raise_on_error)
                if reply is not None and not reply.get("ok", False):
                    return reply
        reply, extra = self._receive(rid, self.timeout_s, raise_on_error)
        if reply is None:
            raise TimeoutError(f"no reply from {self.endpoint} to stream {rid} within {self.timeout_s:g} s")
        return _attach_prepared(reply, extra)

    def _send_or_raise(self, frames, rid: str) -> None:
        """One message of a stream, sent within ``timeout_s``; otherwise the stream is abandoned."""
        if not self._send(frames, time.monotonic() + self.timeout_s):
            self._reconnect()
            raise TimeoutError(f"{self.endpoint} took no message of stream {rid} within {self.timeout_s:g} s")

    def _receive(self, rid: str, timeout_s: float, raise_on_error: bool):
        """The reply to ``rid`` (late replies to other ids skipped), or (None, []) at the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = int(1000 * (deadline - time.monotonic()))
            if left <= 0 or not self._socket.poll(left, zmq.POLLIN):
                return None, []
            parts = self._socket.recv_multipart()
            if parts and parts[0] == b"":
                parts = parts[1:]
            try:
                reply = json.loads(parts[0])
            except (IndexError, ValueError):
                continue
            if reply.get("request_id") != rid:
                continue  # a late answer to an earlier request
            if raise_on_error and not reply.get("ok", False):
                err = reply.get("error") or {}
                raise from_reason(err.get("reason", "INTERNAL"), err.get("message", "no message"))
            return reply, parts[1:]

    def classify_file(self, path: str, dataset: str | None = None, *, geometry: dict | None = None,
                      axes: Sequence[str] | None = None, intensity: str | None = None, model: str | None = None,
                      request_id: str | None = None) -> dict:
        spec = {"kind": "file", "path": str(path), **_intensity(intensity)}
        if dataset:
            spec["dataset"] = dataset
        if geometry:
            spec["geometry"] = geometry
        if axes:
            spec["axes"] = list(axes)
        header = {"op": "classify", "input": spec, **_model(model)}
        if request_id:
            header["request_id"] = request_id
        return self.request(header)[0]


def _model(model: str | None) -> dict:
    """The header's ``model`` entry (none for the server's default model)."""
    return {} if model is None else {"model": str(model)}


def _intensity(intensity: str | None) -> dict:
    """The ``input.intensity`` entry (none for the default, counts)."""
    return {} if intensity is None else {"intensity": str(intensity)}


def _wire_array(a) -> np.ndarray:
    """C-ordered little-endian array in a dtype the protocol allows (other floats go as float32)."""
    a = np.asarray(a)
    if a.dtype.newbyteorder("<").str not in DTYPE_ALIASES.values():
        a = a.astype("<f4")
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def _attach_prepared(reply: dict, extra: list[bytes]) -> dict:
    if "prepared" in reply and extra:
        desc = reply["prepared"]
        reply["prepared"] = np.frombuffer(extra[0], dtype=desc["dtype"]).reshape(desc["shape"])
    return reply
