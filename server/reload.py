"""Authenticated model reload for the ZeroMQ server (SPEC §4: ``reload`` only when enabled and authenticated).

Enabled by a token file (``Server(..., reload_token_file=PATH)``, ``defectscope serve --reload-token-file
PATH``): the file holds one secret (at least ``MIN_TOKEN_CHARS`` characters, surrounding whitespace ignored),
is read once at start, and must not be readable or writable by group or others (``chmod 600``; the server
refuses to start otherwise, as ssh refuses an unprotected key). Request::

    {"protocol": "defectscope/1", "op": "reload", "request_id": "...",
     "auth": {"token": "<the secret>"}, "model": "<optional: .onnx path or bundled model name>"}

- No token file, a missing/wrong token (compared with ``hmac.compare_digest``) -> ``UNAUTHORIZED``. The
  token travels in the request: off loopback use CURVE (``--curve-secret``/``--curve-allow``) so it is
  encrypted. Other ``reload`` fields are looked at only after the token is accepted.
- ``model`` absent: the configured model path (the one the server started with) is read again, so an
  operator can put a new file in its place (or re-point a symlink) and reload. ``model`` given: resolved
  with ``model.registry.resolve_model`` (a bundled name, or any path the server process can read - the
  request is authenticated, so whoever holds the token may load any model file the server can see).
- The new model is loaded *beside* the old one in a background thread, the I/O loop keeps answering
  meanwhile: ``Predictor`` (metadata, signature, warm-up, same provider options as the running model),
  then a new ``Classifier`` on it, whose warm-up runs the whole preparation path. Only when all of that
  succeeded is ``server.classifier`` replaced - one assignment, so each classification runs on exactly one
  model (requests already taken by a worker finish on the model they started with) and the counters carry
  over. A missing, corrupt or foreign file, or a failing warm-up, is refused with ``MODEL_UNAVAILABLE``
  and the reason; the old model keeps serving. One reload at a time (a second one meanwhile gets ``BUSY``).
  A running reload counts as work in flight (``health`` ``queue_depth``), so a draining stop waits for its reply.
- The reply (sent when the load is done, through the workers' inproc PUSH path)::

    {"ok": true, "model": {new name, version, sha256}, "previous_model": {...}, "provider": ..., "load_ms": ...}

- Every swap (old -> new name/version/sha256) and every refusal is logged (``logging``) and counted in
  ``health`` as ``reloads: {ok, failed, last}``.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
import threading
import time
from pathlib import Path

from defectscope import PROTOCOL
from defectscope.errors import BadMessage, Busy, DefectscopeError, ModelUnavailable, Unauthorized, incident
from defectscope.server import protocol

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
MAX_MODEL_CHARS = 4096


class ReloadTokenError(ValueError):
    """The reload token file cannot be used (missing, unprotected, empty or too short)."""


def read_token_file(path: str | Path) -> bytes:
    """The secret in ``path``; refuses a file that group or others may read or write (like ssh)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ReloadTokenError(f"reload token file {str(path)!r}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ReloadTokenError(f"reload token file {str(path)!r} is not a regular file")
    if os.name == "posix" and st.st_mode & 0o077:
        raise ReloadTokenError(
            f"reload token file {str(path)!r} has permissions {stat.S_IMODE(st.st_mode):04o}: it is accessible by "
            f"group or others; refusing to use it. Run: chmod 600 {path}"
        )
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ReloadTokenError(f"reload token file {str(path)!r}: {exc.strerror}") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise ReloadTokenError(
            f"reload token file {str(path)!r} holds {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def _model_string(value, key: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_MODEL_CHARS or "\x00" in value):
        raise BadMessage(f"'{key}' must be a model path or name (a string of 1 to {MAX_MODEL_CHARS} characters)")
    return value


class Reloader:
    """The ``reload`` op of one ``zmq_server.Server``: checks on the I/O thread, the load in a thread."""

    def __init__(self, server, token_file: str | Path):
        self.server = server
        self._token = read_token_file(token_file)
        self.token_file = str(token_file)
        # The file each served model was started from: a reload without a new file reads it again.
        models = getattr(server, "models", None) or {None: server.classifier}
        self.configured = {name: str(c.predictor.path) for name, c in models.items()}
        self.configured_model = str(server.classifier.predictor.path)
        self._running = threading.Lock()
        log.info("reload enabled (token from %s); a reload without 'model' re-reads %s", self.token_file,
                 self.configured_model)

    # -- on the I/O thread ------------------------------------------------------------------------
    def check(self, header: dict) -> tuple[str, str | None]:
        """Raise ``Unauthorized`` unless the header carries the token; return ``(slot, file)``: which served
        model to replace and the model file or bundled name to load there (None: its configured file).

        ``model`` naming a served model reloads that one (from ``path`` when given); any other ``model`` is
        a file or bundled name loaded in place of the default model."""
        auth = header.get("auth")
        token = auth.get("token") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not hmac.compare_digest(token.encode("utf-8"), self._token):
            raise Unauthorized("reload needs a valid auth.token" if token is not None else "reload needs auth.token")
        model, path = (_model_string(header.get(key), key) for key in ("model", "path"))
        if model in self.server.models:
            return model, path
        if path is not None:
            raise BadMessage(f"'path' goes with 'model' naming a served model ({', '.join(self.server.models)})")
        return self.server.default_model, model

    def start(self, envelope, header: dict, rid: str) -> None:
        """Check the request (raising its error reason) and start the load; the reply is sent when done."""
        slot, model = self.check(header)
        if self.server.draining:
            raise Busy("server is shutting down and accepts no new work")
        if not self._running.acquire(blocking=False):
            raise Busy("a reload is already running; try again when it has answered")
        try:
            self.server.begin_work()  # a stop(drain=True) waits for this reply too
            threading.Thread(target=self._run, args=(envelope, rid, slot, model), name="defectscope-reload",
                             daemon=True).start()
        except BaseException:
            self._running.release()
            raise

    # -- in the background ------------------------------------------------------------------------
    def _run(self, envelope, rid: str, slot: str, model: str | None) -> None:
        try:
            try:
                reply = self.reload(rid, model, slot)
            except Exception as exc:  # a bug must still give the one reply
                reply = protocol.error_reply(rid, incident(exc, f"reload {rid}", log))
            finally:
                self._running.release()  # before the reply leaves: whoever has it may reload again at once
            self.server.send_reply([*envelope, protocol.encode(reply)])
        finally:
            self.server.end_work()

    def load(self, model: str | None, old):
        """A new, warmed-up ``Classifier`` for ``model`` (None: the default model's configured file), like ``old``."""
        from defectscope.model.predictor import Predictor
        from defectscope.model.registry import resolve_model
        from defectscope.server.core import Classifier

        path = resolve_model(model or self.configured_model)
        predictor = Predictor(path, **getattr(old.predictor, "load_options", {"provider": old.predictor.requested_provider}))
        # Warms up; keeps the geometry mappings already built (a scan after a reload is not a cold start).
        cross_check = old.cross_check
        if cross_check is not None and cross_check.pipeline != predictor.pipeline:
            log.warning("reload: the cross-check model %s prepares maps differently from the new model; dropped",
                        cross_check.describe()["name"])
            cross_check = None
        new = Classifier(predictor, limits=old.limits, data_root=old.data_root, overlap=old.overlap,
                         orthonormaliser=old.orthonormaliser, sampling_check=old.sampling_check,
                         cross_check=cross_check, estimators=getattr(old, "estimators", None))
        new.stats = old.stats  # counters and latencies cover the whole run
        return new

    def reload(self, rid: str, model: str | None, slot: str | None = None) -> dict:
        """Load, check and swap served model ``slot`` (default: the default model); the reply. Never leaves
        the server without a working model; the other models serve throughout."""
        t0 = time.perf_counter()
        slot = slot or self.server.default_model
        old = self.server.models[slot]
        before = old.predictor.describe()
        wanted = model or self.configured[slot]
        try:
            new = self.load(wanted, old)
        except Exception as exc:
            if isinstance(exc, ModelUnavailable):
                reason = exc.message
            elif isinstance(exc, DefectscopeError):
                reason = f"{exc.reason}: {exc.message}"  # e.g. the warm-up of its pipeline failed
            else:  # not a refusal we made: the detail stays in the log
                reason = incident(exc, f"loading model {wanted!r} for reload {rid}", log).message
            reason = reason[:400]
            old.stats.record_reload(False, model=wanted, error=reason)
            log.error("reload %s refused, model %s %s (sha256 %.12s) keeps serving: %s", rid, before["name"],
                      before["version"], before["sha256"], reason)
            return protocol.error_reply(rid, ModelUnavailable(
                f"reload of {wanted!r} refused, model {before['name']} {before['version']} keeps serving: {reason}"))
        self.server.replace_model(slot, new)  # the swap: one assignment; a request holds the classifier it started on
        after = new.predictor.describe()
        load_ms = (time.perf_counter() - t0) * 1e3
        old.stats.record_reload(True, **{"from": before, "to": after, "load_ms": round(load_ms, 1)})
        log.info("reload %s: model %s %s (sha256 %.12s) -> %s %s (sha256 %.12s) from %s on %s in %.0f ms", rid,
                 before["name"], before["version"], before["sha256"], after["name"], after["version"],
                 after["sha256"], new.predictor.path, new.predictor.provider, load_ms)
        return {"protocol": PROTOCOL, "request_id": rid, "ok": True, "model": after, "previous_model": before,
                "served_as": slot, "provider": new.predictor.provider, "path": str(new.predictor.path),
                "load_ms": round(load_ms, 1)}
