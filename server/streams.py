"""Streamed scans on the ZeroMQ server: frames gridded as they arrive (protocol: ``server.protocol``).

The I/O thread owns the socket, so it checks each frame message against the open stream (size, state)
and hands the frame to one gridding thread through a bounded queue; that thread adds it to the stream's
sums (``Classifier.add_frame``) and, after the ``last`` frame, classifies and sends the one reply. Either
thread may end a stream (an error, an idle stream, the result): ``StreamRegistry.close`` says which one
got there first, and only that one replies, so a stream gets exactly one reply.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from defectscope.errors import BadMessage, Busy, DefectscopeError, ShapeMismatch, incident
from defectscope.server import protocol

log = logging.getLogger(__name__)

_REMEMBER_CLOSED = 4096  # answered streams whose late frames are dropped without a reply


@dataclass(eq=False)
class OpenStream:
    key: tuple  # (client identity, request id)
    envelope: list
    request: object  # protocol.Request of the first message
    n_frames: int
    frame_bytes: int
    last_seen: float = field(default_factory=time.monotonic)


class StreamRegistry:
    """Open streams by (client identity, request id); thread-safe."""

    def __init__(self, limits):
        self.limits = limits
        self._open: dict[tuple, OpenStream] = {}
        self._closed: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.frames_dropped = 0

    def __len__(self) -> int:
        return len(self._open)

    def open(self, key: tuple, envelope: list, request) -> OpenStream:
        n_frames, rows, cols = request.spec["shape"]
        itemsize = np.dtype(protocol.DTYPE_ALIASES[request.spec["dtype"]]).itemsize
        with self._lock:
            if key in self._open:
                raise BadMessage(f"a stream with request_id {key[1]!r} is already open")
            if len(self._open) >= self.limits.max_streams:
                raise Busy(f"{len(self._open)} streamed scans open (limit {self.limits.max_streams}); try again")
            self._closed.pop(key, None)
            stream = self._open[key] = OpenStream(key, envelope, request, n_frames, rows * cols * itemsize)
            return stream

    def get(self, key: tuple) -> OpenStream | None:
        """The open stream, or None; raises BAD_MESSAGE for a key never opened (late frames of an
        answered stream return None and are dropped)."""
        with self._lock:
            stream = self._open.get(key)
            if stream is None:
                if key in self._closed:
                    self.frames_dropped += 1
                    return None
                raise BadMessage(f"no open stream with request_id {key[1]!r}: open it with a classify message "
                                 "of kind 'scan' with input.stream true")
            return stream

    def close(self, key: tuple) -> OpenStream | None:
        """End a stream; returns it to the one caller that ends it (who then replies), None to others."""
        with self._lock:
            stream = self._open.pop(key, None)
            if stream is not None:
                self._closed[key] = None
                while len(self._closed) > _REMEMBER_CLOSED:
                    self._closed.popitem(last=False)
            return stream

    def idle(self, now: float) -> list[OpenStream]:
        with self._lock:
            return [s for s in self._open.values() if now - s.last_seen > self.limits.stream_idle_s]

    def is_open(self, stream: OpenStream) -> bool:
        with self._lock:
            return self._open.get(stream.key) is stream

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._open)


class StreamGridder:
    """The gridding thread: begin / frame / drop items from the I/O thread, replies over inproc PUSH."""

    def __init__(self, server):
        self.server = server
        self.registry = StreamRegistry(server.limits)
        self.queue: queue.Queue = queue.Queue(maxsize=server.limits.stream_queue_frames)
        self._thread = threading.Thread(target=self._loop, name="defectscope-streams", daemon=True)
        self._busy = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.queue.put(None)  # after everything queued
        self._thread.join(10)

    @property
    def pending(self) -> int:
        return len(self.registry) + self.queue.qsize() + self._busy

    # -- I/O thread side ------------------------------------------------------------------------
    def begin(self, envelope, request, decode_ms: float) -> None:
        """A classify message with ``input.stream`` true; raises (the I/O thread replies) if refused."""
        key = (bytes(envelope[0]), request.request_id)
        stream = self.registry.open(key, envelope, request)
        try:
            self.queue.put_nowait(("begin", stream, decode_ms))
        except queue.Full:
            self.registry.close(key)
            raise Busy("the streamed-scan queue is full; try again") from None

    def frame(self, envelope, header: dict, rid: str, buffers, t_received: float) -> DefectscopeError | None:
        """An ``op: frame`` message. Returns None when handled (no reply now), or the error to send; a
        stream refused here is closed."""
        index, last = protocol.parse_frame(header, buffers)
        key = (bytes(envelope[0]), rid)
        stream = self.registry.get(key)
        if stream is None:
            return None  # a late frame of an answered stream
        stream.last_seen = time.monotonic()
        error = None
        if len(buffers[0]) != stream.frame_bytes:
            error = ShapeMismatch(f"frame {index} has {len(buffers[0])} bytes; the stream's frames have {stream.frame_bytes}")
        elif index >= stream.n_frames:
            error = BadMessage(f"frame index {index} is outside 0..{stream.n_frames - 1}")
        else:
            try:
                self.queue.put_nowait(("frame", stream, index, buffers[0], last, t_received))
            except queue.Full:
                error = Busy(f"more than {self.server.limits.stream_queue_frames} frames waiting to be gridded; "
                             "stream closed, send slower or fewer streams at once")
        if error is not None:
            if self.registry.close(key) is None:
                return None  # answered meanwhile by the gridding thread
            self.queue.put(("drop", stream))
            return error
        return None

    def expire(self) -> list[tuple[OpenStream, DefectscopeError]]:
        """Close streams that waited too long for a frame; the I/O thread sends their errors."""
        out = []
        for stream in self.registry.idle(time.monotonic()):
            if self.registry.close(stream.key) is not None:
                self.queue.put(("drop", stream))
                out.append((stream, BadMessage(
                    f"no frame for {self.server.limits.stream_idle_s:g} s: stream {stream.key[1]!r} abandoned")))
        return out

    def abort_all(self, reason: str) -> list[tuple[OpenStream, DefectscopeError]]:
        out = []
        for key in self.registry.keys():
            stream = self.registry.close(key)
            if stream is not None:
                self.queue.put(("drop", stream))
                out.append((stream, Busy(reason)))
        return out

    # -- gridding thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        push = self.server.reply_socket()
        scans: dict[tuple, object] = {}  # key -> core.ScanStream
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                self._busy = 1
                try:
                    self._handle(item, scans, push)
                    if self.queue.empty():
                        self._look_ahead(scans)
                finally:
                    self._busy = 0
        finally:
            push.close()

    def _look_ahead(self, scans: dict) -> None:
        """Nothing queued: answer one open stream from its frames so far (``server.lookahead``), so that its
        answer can leave as soon as its last frame is gridded; a failure here only loses the head start."""
        for classifier, scan in list(scans.values()):
            if scan is None:
                continue
            try:
                if classifier.look_ahead(scan):
                    return  # one at a time: frames may be waiting again
            except Exception:  # never the thread: the stream is answered at its end as usual
                scan.ahead = None
                log.exception("look-ahead of stream %s failed", scan.request.request_id)

    def _handle(self, item, scans: dict, push) -> None:
        kind, stream = item[0], item[1]
        if kind == "drop":
            scans.pop(stream.key, None)
            return
        # A stream is classified by the model it began with, even if a reload happens meanwhile.
        classifier, scan = scans.get(stream.key, (None, None))
        if classifier is None:  # the model the stream's first message named (checked when it opened)
            classifier = self.server.classifier_for(stream.request.header)[1]
        try:
            if kind == "begin":
                if self.registry.is_open(stream):  # not closed while it waited in the queue
                    scan = classifier.begin_stream(stream.request)
                    scan.decode_ms += item[2]
                    scans[stream.key] = (classifier, scan)
                return
            _, _, index, buffer, last, t_received = item
            if scan is None:
                return  # the stream failed or was closed
            t0 = time.perf_counter()
            frame = np.frombuffer(buffer, dtype=scan.dtype).reshape(scan.frame_shape)
            classifier.add_frame(scan, index, frame, decode_ms=(time.perf_counter() - t0) * 1e3)
            if not last:
                return
            scans.pop(stream.key, None)
            outcome = classifier.finish_stream(scan)
            outcome.reply["timings_ms"]["after_last_frame"] = round((time.perf_counter() - t_received) * 1e3, 3)
            if self.registry.close(stream.key) is not None:
                classifier.stats.record(True, outcome.reply["timings_ms"]["total"])
                self.server.log_reply(outcome.reply, stream.request)
                push.send_multipart([*stream.envelope, protocol.encode(outcome.reply), *outcome.frames], copy=False)
        except Exception as exc:
            scans.pop(stream.key, None)
            if not isinstance(exc, DefectscopeError):
                exc = incident(exc, f"stream {stream.key[1]}", log)
            if self.registry.close(stream.key) is not None:
                classifier.stats.record(False, reason=exc.reason)
                reply = self.server.log_reply(protocol.error_reply(stream.key[1], exc), stream.request)
                push.send_multipart([*stream.envelope, protocol.encode(reply)], copy=False)
