"""ZeroMQ server for protocol ``defectscope/1``: a ROUTER socket, a bounded queue, worker threads.

One I/O thread owns the ROUTER socket (ZeroMQ sockets are not thread-safe). It parses and checks every
header itself, answers ``info``/``health`` at once, answers ``BUSY`` at once when the queue is full, and
hands valid classify requests to the workers, who send their replies back over an inproc PUSH/PULL
pair. Every request gets exactly one reply; nothing a client sends can stop the loop.

- Several models (``server.models.ModelSet``): a request names one (``"model"``), the default answers
  otherwise. ``reload`` (``server.reload``, only when enabled and authenticated) loads a new model beside
  the running ones and swaps it in with one assignment; a request runs on the classifier it was given.
- Idempotent request ids (``server.results``): with a results log, a retried client-chosen ``request_id``
  answered ``ok`` for the same input by the same model is answered with the recorded reply, marked
  ``"replayed": true`` (without its prepared-map frame: ``PREPARED_NOT_REPLAYED``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid

import zmq

from defectscope import PROTOCOL
from defectscope.errors import BadMessage, Busy, DefectscopeError, Unauthorized, incident
from defectscope.server import protocol
from defectscope.server.core import Classifier
from defectscope.server.models import ModelSet
from defectscope.server.reload import Reloader
from defectscope.server.results import describe_source, replayable, request_digest
from defectscope.server.streams import StreamGridder

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:5557"


def _batchable(item) -> bool:
    """A queued request that can share an inference call: one map, no prepared map asked back."""
    request = item[1]
    return (request.kind == "map" and request.array is not None and request.array.ndim == 3
            and not request.options.get("return_prepared"))


class Server:
    def __init__(
        self,
        classifier: Classifier,
        bind: str = DEFAULT_BIND,
        *,
        workers: int = 1,
        batch_max: int = 1,
        drain_s: float = 10.0,
        context: zmq.Context | None = None,
        results=None,
        curve_secret_file: str | None = None,
        curve_allow_dir: str | None = None,
        reload_token_file: str | None = None,
    ):
        """``results``: a ``server.results.ResultsLog``; every classify reply (errors too) is appended
        and flushed before it is sent, so the log holds every answer a client could have seen; it also
        makes request ids idempotent (a repeated ok request is replayed from it, see the module doc).
        ``reload_token_file``: enables the ``reload`` op for requests carrying the secret in this file,
        which must be ``chmod 600`` (``server.reload.ReloadTokenError``, a ``ValueError``, otherwise).

        ``classifier``: one ``Classifier``, or several by name (``{name: Classifier}``, the first is the
        default): a request names one with ``"model": NAME`` in its header (SPEC §4), the default answers
        otherwise, ``info`` lists them all, and ``reload`` swaps one while the others serve."""
        self.models = ModelSet(classifier)
        self.limits = self.classifier.limits
        self.bind = bind
        self.n_workers = max(1, int(workers))
        # Up to this many single-map requests already queued are inferred in one call (1: never batch).
        self.batch_max = max(1, int(batch_max))
        self.drain_s = drain_s
        self.results = results
        self._replaying = results is not None and getattr(results, "replay_window", 0) > 0
        # CURVE (SPEC §4, off loopback): the server's key pair from a zmq.auth ``.key_secret`` file and a
        # directory of allowed client public keys; a client without a listed key never gets through the
        # handshake (libzmq drops it before any request is read, so it gets no reply at all).
        if (curve_secret_file is None) != (curve_allow_dir is None):
            raise ValueError("CURVE needs both the server secret key file and the client allow-list directory")
        self.curve = (curve_secret_file, curve_allow_dir) if curve_secret_file else None
        self._authenticator = None
        self._ctx = context or zmq.Context.instance()
        self._queue: queue.Queue = queue.Queue(maxsize=self.limits.queue_length)
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._replies_addr = f"inproc://defectscope-replies-{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._error: BaseException | None = None
        self.endpoint: str | None = None
        self._streams: StreamGridder | None = None
        self._reloader = Reloader(self, reload_token_file) if reload_token_file else None
        # Called as ``hook(reply, request)`` for every classify reply (ok or error, computed or streamed;
        # not replays) as it is logged, before it is sent (``_logged``): e.g. ``server.metrics``. A hook
        # that raises is logged and the reply still goes out.
        self.on_reply: list = []

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "Server":
        """Run the server in a background thread; returns once the socket is bound."""
        self._thread = threading.Thread(target=self._run_guarded, name="defectscope-io", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("server did not become ready")
        if self._error:
            raise self._error
        return self

    def serve_forever(self) -> None:
        self._run()

    def stop(self, drain: bool = True) -> None:
        """Refuse new work, answer what is queued or in flight (up to ``drain_s``), then stop."""
        self._draining.set()
        if drain:
            deadline = time.monotonic() + self.drain_s
            while (self._queue.qsize() or self._in_flight or self._stream_pending()) and time.monotonic() < deadline:
                time.sleep(0.01)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.drain_s + 5)

    def _stream_pending(self) -> int:
        return self._streams.pending if self._streams is not None else 0

    # -- for the parts that work beside the I/O loop (server.streams, server.reload) -----------------
    @property
    def draining(self) -> bool:
        """Stopping: new work is refused."""
        return self._draining.is_set()

    def begin_work(self) -> None:
        """Count work done outside the queue as in flight (``health`` queue depth; a draining stop waits)."""
        with self._in_flight_lock:
            self._in_flight += 1

    def end_work(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1

    def send_reply(self, frames) -> None:
        """Send reply frames (envelope first) from any thread: the I/O loop forwards them to the client."""
        push = self.reply_socket()
        try:
            push.send_multipart(frames, copy=False)
        finally:
            push.close()

    def reply_socket(self):
        """A PUSH socket to the I/O loop for a thread that sends many replies (close it when done)."""
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self._replies_addr)
        return push

    def log_reply(self, reply: dict, request=None) -> dict:
        """Append a reply to the results log, if any, before it is sent (``_logged``); returns it."""
        return self._logged(reply, request)

    # -- models (server.models.ModelSet) ----------------------------------------------------------
    @property
    def default_model(self) -> str:
        return self.models.default

    @property
    def classifier(self):
        """The default model's classifier."""
        return self.models[self.models.default]

    @classifier.setter
    def classifier(self, new) -> None:
        self.models.replace(self.models.default, new)

    def replace_model(self, name: str, new) -> None:
        self.models.replace(name, new)

    def classifier_for(self, header: dict):
        return self.models.pick(header)

    def queue_depth(self) -> int:
        return self._queue.qsize() + self._in_flight

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaced to start(); the thread must not die silently
            self._error = exc
            self._ready.set()
            log.exception("server loop failed")

    # -- the I/O loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a vanished client's reply is dropped, not an error
        # Per-frame ceiling enforced by libzmq before the frame is buffered in full.
        router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes + protocol.MAX_HEADER_BYTES)
        if self.curve:
            self._start_curve(router)
        router.bind(self.bind)
        self.endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        replies = self._ctx.socket(zmq.PULL)
        replies.bind(self._replies_addr)
        self._streams = StreamGridder(self)
        self._streams.start()
        self._workers = [
            threading.Thread(target=self._work, name=f"defectscope-worker-{i}", daemon=True)
            for i in range(self.n_workers)
        ]
        for w in self._workers:
            w.start()
        log.info("defectscope serving on %s (model %s, provider %s)", self.endpoint,
                 self.classifier.predictor.describe()["version"], self.classifier.predictor.provider)
        self._ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        try:
            next_expiry = time.monotonic() + 1.0
            while not self._stop.is_set():
                events = dict(poller.poll(50))
                if time.monotonic() > next_expiry:  # streams that stopped sending frames
                    next_expiry = time.monotonic() + 1.0
                    self._stream_errors(router, self._streams.expire())
                if replies in events:
                    self._forward(replies, router)
                if router in events:
                    for _ in range(256):  # bounded batch so replies are not starved
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._incoming(router, frames)
        finally:
            self._stream_errors(router, self._streams.abort_all("server stopped before the stream's last frame"))
            self._streams.stop()
            for _ in self._workers:
                self._queue.put(None)
            for w in self._workers:
                w.join(5)
            self._forward(replies, router)
            replies.close(0)
            router.close()
            if self._authenticator is not None:
                self._authenticator.stop()

    def _stream_errors(self, router, errors) -> None:
        for stream, exc in errors:
            self.classifier.stats.record(False, reason=exc.reason)
            self._send(router, stream.envelope, self._logged(protocol.error_reply(stream.key[1], exc), stream.request))

    def _start_curve(self, router) -> None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        secret_file, allow_dir = self.curve
        public, secret = zmq.auth.load_certificate(secret_file)
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret key (use the server's .key_secret file)")
        self._authenticator = ThreadAuthenticator(self._ctx)
        self._authenticator.start()
        self._authenticator.configure_curve(domain="*", location=str(allow_dir))
        router.curve_publickey, router.curve_secretkey = public, secret
        router.curve_server = True

    def _forward(self, replies, router) -> None:
        while True:
            try:
                router.send_multipart(replies.recv_multipart(zmq.NOBLOCK, copy=False), copy=False)
            except zmq.Again:
                return

    def _incoming(self, router, frames) -> None:
        # Envelope: identity, then the empty delimiter REQ (and a REQ-compatible DEALER) sends.
        if len(frames) > 1 and len(frames[1]) == 0:
            envelope, body = frames[:2], frames[2:]
        else:
            envelope, body = frames[:1], frames[1:]
        rid = raw = None
        t0 = time.perf_counter()
        try:
            if not body:
                raise BadMessage("request has no header frame")
            raw = body[0].bytes if len(body[0]) <= protocol.MAX_HEADER_BYTES else body[0].buffer
            header, rid, op = protocol.parse_header(raw)
            if op == "info":
                _, classifier = self.classifier_for(header)
                return self._send(router, envelope, {"protocol": PROTOCOL, "request_id": rid, "ok": True,
                                                     **classifier.info(), "models": self.models.describe()})
            if op == "health":
                _, classifier = self.classifier_for(header)
                state = "DRAINING" if self._draining.is_set() else "ON"
                return self._send(router, envelope, {"protocol": PROTOCOL, "request_id": rid, "ok": True,
                                                     **classifier.health(self.queue_depth(), state),
                                                     "models": {n: c.predictor.describe() for n, c in self.models.items()},
                                                     "streams": {"open": len(self._streams.registry),
                                                                 "late_frames_dropped": self._streams.registry.frames_dropped}})
            if op == "reload":
                if self._reloader is None:
                    raise Unauthorized("reload is not enabled on this server (serve --reload-token-file)")
                return self._reloader.start(envelope, header, rid)  # replies when the load is done
            if op == "frame":  # a frame of a streamed scan (server.streams): a reply only on error
                error = self._streams.frame(envelope, header, rid, [f.buffer for f in body[1:]], t0)
                if error is not None:
                    raise error
                return
            if self._draining.is_set():
                raise Busy("server is shutting down and accepts no new work")
            name, classifier = self.classifier_for(header)
            request = protocol.parse_classify(header, rid, [f.buffer for f in body[1:]], self.limits)
            if request.kind == "scan" and request.spec.get("stream"):  # frames follow; never replayed
                return self._streams.begin(envelope, request, (time.perf_counter() - t0) * 1e3)
            # A file's data are read by a worker, never on this thread: its replay is looked up there.
            if self._replaying and request.kind != "file" and replayable(request):
                reply = self._replayed(request, classifier)
                if reply is not None:
                    return self._send(router, envelope, reply)
            decode_ms = (time.perf_counter() - t0) * 1e3
            try:
                self._queue.put_nowait((envelope, request, decode_ms, name))
            except queue.Full:
                raise Busy(f"queue full ({self.limits.queue_length} requests waiting); try again") from None
        except DefectscopeError as exc:
            if rid is None and raw is not None:  # the header failed to parse: echo its id if it has one
                rid = protocol.peek_request_id(raw)
            self.classifier.stats.record(False, reason=exc.reason)
            self._send(router, envelope, self._logged(protocol.error_reply(rid, exc)))
        except Exception as exc:  # never let a request take the loop down
            self.classifier.stats.record(False, reason="INTERNAL")
            self._send(router, envelope, self._logged(protocol.error_reply(rid, incident(exc, "reading a request", log))))

    def _replayed(self, request, classifier) -> dict | None:
        """The recorded reply (logged again, counted) if this request id was answered ok before for the same
        input by the model ``classifier`` serves now; None otherwise. The digest covers the model, so after a
        reload, or a restart on another model, a retried id is classified afresh."""
        model = classifier.predictor.describe()
        reply = self.results.replay(request.request_id, lambda: request_digest(request, model))
        if reply is None or reply.get("model") != model:
            return None
        reply["replayed"] = True
        if reply.pop("prepared", None) is not None or request.options.get("return_prepared"):
            reply.setdefault("warnings", []).append({
                "reason": "PREPARED_NOT_REPLAYED",
                "message": "this reply was given before and is replayed from the results log, without the prepared map"})
        self.results.append(reply, source=describe_source(request), replayed=True)
        classifier.stats.record_replay()
        return reply

    @staticmethod
    def _send(router, envelope, reply: dict, extra=()) -> None:
        router.send_multipart([*envelope, protocol.encode(reply), *extra], copy=False)

    # -- workers ----------------------------------------------------------------------------------
    def _work(self) -> None:
        push = self.reply_socket()
        try:
            stop = False
            while not stop:
                item = self._queue.get()
                if item is None:
                    return
                items = [item]
                # Batching: single maps already waiting join this one in one inference call; nothing waits
                # for more to arrive, so a lone request is never delayed.
                while self.batch_max > 1 and _batchable(items[0]) and len(items) < self.batch_max:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    items.append(more)
                with self._in_flight_lock:
                    self._in_flight += len(items)
                replies = []
                try:
                    # Maps for the same model share one inference call; anything else is answered alone.
                    groups: dict = {}
                    for i in items:
                        groups.setdefault(i[3] if _batchable(i) else id(i), []).append(i)
                    for group in groups.values():
                        replies += self._answer_many(group) if len(group) > 1 else [self._answer(*group[0])]
                finally:
                    # Out of flight before the reply leaves: a health asked right after its reply sees the
                    # queue as the client does. A stopping server still forwards these (the loop's finally).
                    with self._in_flight_lock:
                        self._in_flight -= len(items)
                for reply in replies:
                    push.send_multipart(reply, copy=False)
        finally:
            push.close()

    def _answer_many(self, items) -> list[list]:
        """Replies to single-map requests for one model inferred together (``Classifier.classify_many``)."""
        classifier = self.models[items[0][3]]
        outcomes = classifier.classify_many([(request, decode_ms) for _, request, decode_ms, _ in items])
        return [self._answer(envelope, request, decode_ms, name, outcome=o, classifier=classifier)
                for (envelope, request, decode_ms, name), o in zip(items, outcomes)]

    def _answer(self, envelope, request, decode_ms, name=None, *, outcome=None, classifier=None) -> list:
        """The reply frames to one request for model ``name`` (``outcome``: its result or error, when
        already computed). The classifier is read when the work starts: a reload meanwhile is honoured."""
        classifier = classifier or self.models.get(name) or self.classifier
        stats = classifier.stats
        try:
            if isinstance(outcome, Exception):
                raise outcome
            if outcome is None and request.kind == "file" and self._replaying and replayable(request):
                classifier.load_file(request)  # read once: the digest covers the bytes that are classified
                reply = self._replayed(request, classifier)
                if reply is not None:
                    return [*envelope, protocol.encode(reply)]
            outcome = outcome or classifier.classify(request, decode_ms)
            body = [protocol.encode(outcome.reply), *outcome.frames]
            stats.record(True, outcome.reply["timings_ms"]["total"])
            self._logged(outcome.reply, request)
        except DefectscopeError as exc:
            stats.record(False, reason=exc.reason)
            body = [protocol.encode(self._logged(protocol.error_reply(request.request_id, exc), request))]
        except Exception as exc:  # e.g. a non-JSON-able value: still one reply
            stats.record(False, reason="INTERNAL")
            error = protocol.error_reply(request.request_id,
                                         incident(exc, f"encoding the reply to request {request.request_id}", log))
            body = [protocol.encode(self._logged(error, request))]
        return [*envelope, *body]

    def _logged(self, reply: dict, request=None) -> dict:
        """Append the reply to the results log (when there is one) before it is sent; returns it."""
        if self.results is not None:
            p = self.classifier.predictor
            keep = request is not None and reply.get("ok") and self._replaying and replayable(request)
            self.results.append(reply, source=describe_source(request) if request is not None else "",
                                model=p.describe(), provider=p.provider,
                                digest=request_digest(request, reply.get("model")) if keep else None)
        for hook in list(self.on_reply):
            try:
                hook(reply, request)
            except Exception:
                log.exception("a reply hook failed (the reply is sent regardless)")
        return reply
