"""Classify BLISS rocking scans as they run, from their blissdata streams (issue #20, item 1).

``BlissWatcher(config).run(stop)`` follows the scans created in a blissdata store (the Redis of a BLISS
installation), one after the other, from the moment it starts:

1. waits until the scan is prepared (its channels exist), then keeps it when it matches the config's
   filters and is a *rocking scan*: it scans the rocking motor's channel (``axis:eta``) and no other axis.
   Other scans are skipped without a trace (``ct``, alignment scans, meshes).
2. builds the geometry: the preset, the config's fixed fields, each preset motor's start position from
   ``scan_info["positioners"]["positioners_start"]``, the energy from the ``energy`` positioner (keV)
   when the config gives none, and the rocking start/step from the first two readings of the motor.
3. streams the detector frames to the server as they arrive (``Client.classify_scan_stream``, request id
   ``bliss-<scan key>``): the answer comes a few milliseconds after the last frame.
4. publishes the answer: logged, one row in the ``results`` HDF5 log (``source``: the scan key),
   ``SET <prefix>:result:<scan key>`` (the reply as JSON, expiring after ``result_ttl_s``) and ``XADD
   <prefix>:results`` (fields ``scan``, ``name``, ``number``, ``ok``, ``label``, ``reply``).

A scan that cannot be classified gets the same treatment with an error reply (``ok: false``): no detector
channel (``BAD_MESSAGE``), frames that are not 2-D (``SHAPE_MISMATCH``), a missing motor
(``BAD_GEOMETRY``), a scan that ends early or stops sending, a lost Redis connection (``INTERNAL``), or
the server's own error reply. The watcher then goes on with the next scan; after a lost connection it
reconnects (every ``reconnect_s``) and publishes the errors it could not publish while Redis was away.
Why a Redis key and not the scan's own metadata: blissdata lets only the scan's writer change it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque

import numpy as np
import redis
from blissdata import DataStore, ScanState
from blissdata.exceptions import EndOfStream, NoScanAvailable, ScanLoadError
from blissdata.streams import CursorGroup

from defectscope.errors import BadGeometry, BadMessage, DefectscopeError, ShapeMismatch
from defectscope.server.bliss_config import BlissWatchConfig
from defectscope.server.client import Client
from defectscope.server.protocol import error_reply

log = logging.getLogger(__name__)

_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class ScanNotClassified(DefectscopeError, RuntimeError):
    """A rocking scan whose frames could not all be read (ended early, went silent, Redis lost)."""

    reason = "INTERNAL"


class _RedisLost(Exception):
    """Redis went away while a scan was read; carries that scan's error reply."""

    def __init__(self, identity: dict, reply: dict):
        super().__init__(reply["error"]["message"])
        self.identity, self.reply = identity, reply


class ScanFrames:
    """The detector frames and rocking motor readings of one scan, read as they arrive."""

    def __init__(self, detector, motor, n_frames: int, timeout_s: float, stop: threading.Event | None = None):
        self.detector, self.motor = detector, motor
        self.n_frames, self.timeout_s = n_frames, timeout_s
        self.stop = stop or threading.Event()
        self._group = CursorGroup([detector, motor])
        self._frames: deque = deque()
        self.frames_read = 0
        self.motor_values: list[float] = []
        self.frame_shape: tuple | None = None

    def _read_more(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        views = {}
        while not views:  # empty also when a read found only a seal (one channel ended, the other goes on)
            left = deadline - time.monotonic()
            if self.stop.is_set():
                raise ScanNotClassified(f"the watcher was stopped after {self.frames_read} of {self.n_frames} frames")
            if left <= 0:
                raise ScanNotClassified(f"no data for {self.timeout_s:g} s after {self.frames_read} of "
                                        f"{self.n_frames} frames")
            try:
                views = self._group.read(timeout=min(max(left, 0.01), 0.5))  # 0 would mean: wait for ever
            except EndOfStream:
                raise ScanNotClassified(f"the scan ended after {self.frames_read} of {self.n_frames} "
                                        "frames") from None
        for stream, view in views.items():
            data = np.asarray(view.get_data())
            if stream.name == self.motor.name:
                self.motor_values.extend(float(v) for v in data.reshape(-1))
                continue
            for frame in data:
                if frame.ndim != 2 or (self.frame_shape is not None and frame.shape != self.frame_shape):
                    raise ShapeMismatch(f"frame {self.frames_read} of {stream.name!r} has shape {frame.shape}, "
                                        f"expected a 2-D frame like the first, {self.frame_shape}")
                self.frame_shape = frame.shape
                self._frames.append(frame)
                self.frames_read += 1

    def rocking(self) -> tuple[float, float]:
        """(start_deg, step_deg) from the motor's first two readings (with the first frame at hand)."""
        while len(self.motor_values) < 2 or not self._frames:
            self._read_more()
        start, second = self.motor_values[:2]
        return start, second - start

    def __iter__(self):
        for _ in range(self.n_frames):
            while not self._frames:
                self._read_more()
            yield self._frames.popleft()


class BlissWatcher:
    """Follows a blissdata store and classifies its rocking scans on a ``defectscope serve`` server."""

    def __init__(self, config: BlissWatchConfig, results=None):
        self.config = config
        self._own_results = results is None and bool(config.results)
        if self._own_results:
            from defectscope.server.results import ResultsLog

            results = ResultsLog(config.results, server="bliss", replay_window=0)
        self.results = results
        self.classified = 0
        self.failed = 0
        self._unpublished: list[tuple[dict, dict]] = []  # (scan identity, reply) waiting for Redis
        self._redis = None
        self._store = None
        self._stop = threading.Event()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.results is not None and self._own_results:
            self.results.close()

    # -- following --------------------------------------------------------------------------------------
    def run(self, stop: threading.Event, *, max_scans: int | None = None, on_ready=None) -> None:
        """Follow new scans until ``stop`` is set (or ``max_scans`` rocking scans are answered)."""
        self._stop = stop
        since = None
        while not stop.is_set():
            try:
                if self._store is None:
                    self._connect()
                if since is None:  # from now on: scans created before the watcher started are not ours
                    since = self._store.get_last_scan_timetag()
                    if on_ready is not None:
                        on_ready(self)
                self._publish_unpublished()
                while not stop.is_set() and (max_scans is None or self.classified + self.failed < max_scans):
                    try:
                        since, key = self._store.get_next_scan(since=since, timeout=0.5)
                    except NoScanAvailable:
                        continue
                    self.handle(key)
                return
            except _RedisLost as lost:
                self._unpublished.append((lost.identity, lost.reply))
                self._lost(stop, lost)
            except _REDIS_DOWN as exc:
                self._lost(stop, exc)

    def _connect(self) -> None:
        try:
            self._store = DataStore(self.config.redis_url)
        except RuntimeError as exc:  # a Redis without blissdata's set-up (yet): try again later
            raise redis.exceptions.ConnectionError(str(exc)) from exc
        self._redis = redis.Redis.from_url(self.config.redis_url)
        log.info("connected to the blissdata store at %s", self.config.redis_url)

    def _lost(self, stop: threading.Event, exc: Exception) -> None:
        log.warning("blissdata store %s: %s; trying again every %g s", self.config.redis_url, exc,
                    self.config.reconnect_s)
        self._store = self._redis = None
        stop.wait(self.config.reconnect_s)

    # -- one scan ---------------------------------------------------------------------------------------
    def handle(self, key: str) -> dict | None:
        """Classify the scan ``key`` if it is a rocking scan to watch; publish and return the answer."""
        identity = {"key": key}
        try:
            scan = self._store.load_scan(key)
            if scan.state >= ScanState.PREPARED:  # blissdata reads the scan's model before its state: a scan
                scan = self._store.load_scan(key)  # prepared in between would look prepared without channels
            identity = self._identity(scan)
            while scan.state < ScanState.PREPARED:  # the channels exist from PREPARED on
                if not scan.update(timeout=self.config.frame_timeout_s):
                    raise ScanNotClassified(f"scan stayed {scan.state.name} for {self.config.frame_timeout_s:g} s")
            if not self.config.selects(identity, scan.info) or not self._is_rocking_scan(scan):
                log.debug("scan %s (%s): not a rocking scan to classify", key, scan.info.get("title"))
                return None
            reply = self._classify(scan)
        except ScanLoadError as exc:
            log.warning("scan %s: %s; skipped", key, exc)
            return None
        except DefectscopeError as exc:
            reply = self._error(key, exc)
        except TimeoutError as exc:
            reply = self._error(key, ScanNotClassified(f"the server did not answer: {exc}"))
        except _REDIS_DOWN as exc:
            reply = self._error(key, ScanNotClassified(f"lost the connection to Redis during the scan: {exc}"))
            self._record(identity, reply)
            raise _RedisLost(identity, reply) from exc
        except Exception as exc:  # noqa: BLE001 - one scan's surprise must not stop the watcher
            log.exception("scan %s", key)
            reply = self._error(key, ScanNotClassified(f"{type(exc).__name__}: {exc}"))
        return self._publish(identity, reply)

    def _is_rocking_scan(self, scan) -> bool:
        rocking = self.config.rocking_stream()
        axes = {name for name in scan.streams if name.startswith("axis:")} - {rocking}
        return rocking in scan.streams and not axes

    def _classify(self, scan) -> dict:
        """Stream the scan's frames to the server; its reply (ok or not)."""
        detector = self._detector(scan)
        n_frames = self._n_frames(scan, detector.name)
        geometry = self._geometry(scan)
        frames = ScanFrames(detector, scan.streams[self.config.rocking_stream()], n_frames,
                            self.config.frame_timeout_s, self._stop)
        start, step = frames.rocking()
        geometry["rocking"] = {"motor": self.config.rocking(), "start_deg": start, "step_deg": step}
        log.info("scan %s (%s): classifying %d frames of %s", scan.key, scan.info.get("title"), n_frames,
                 detector.name)
        c = self.config
        with Client(c.server, timeout_s=c.server_timeout_s, retries=0) as client:
            return client.classify_scan_stream(iter(frames), geometry, n_frames=n_frames, model=c.model or None,
                                               intensity=c.intensity or None, request_id=f"bliss-{scan.key}",
                                               raise_on_error=False)

    def _detector(self, scan):
        streams = scan.streams
        if self.config.detector:
            if self.config.detector not in streams:
                raise BadMessage(f"the scan has no detector channel {self.config.detector!r} "
                                 f"(channels: {', '.join(sorted(streams))})")
            stream = streams[self.config.detector]
            if len(tuple(stream.shape)) != 2:
                raise ShapeMismatch(f"{stream.name!r} holds frames of shape {tuple(stream.shape)}, not 2-D frames")
            return stream
        images = [s for s in streams.values() if len(tuple(getattr(s, "shape", ()) or ())) == 2]
        if len(images) != 1:
            raise BadMessage(f"the scan has {len(images)} 2-D channels ({', '.join(s.name for s in images)}): "
                             "name the detector channel (--detector)")
        return images[0]

    def _n_frames(self, scan, channel: str) -> int:
        n = scan.info.get("npoints") or (scan.info.get("channels", {}).get(channel, {}) or {}).get("points")
        if not isinstance(n, int) or n < 2:
            raise BadMessage(f"the scan announces {n!r} points (scan_info npoints): a rocking scan needs >= 2")
        return n

    def _geometry(self, scan) -> dict:
        c = self.config
        geometry = {"preset": c.preset, **{k: v for k, v in c.geometry.items() if k != "angles"}}
        fixed = dict(c.geometry.get("angles", {}))
        start = ((scan.info.get("positioners") or {}).get("positioners_start") or {})
        angles, missing = {}, []
        for motor in c.preset_motors():
            if motor == c.rocking():
                continue
            value = fixed.get(motor, start.get(c.positioner(motor)))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                angles[motor] = float(value)
            else:
                missing.append(c.positioner(motor))
        if missing:
            raise BadGeometry(f"the scan has no start position of motor(s) {', '.join(missing)} "
                              "(scan_info positioners_start)")
        geometry["angles"] = angles
        if "energy_eV" not in geometry and isinstance(start.get(c.energy_positioner), (int, float)):
            geometry["energy_eV"] = 1000.0 * float(start[c.energy_positioner])
        return geometry

    # -- publishing -------------------------------------------------------------------------------------
    @staticmethod
    def _identity(scan) -> dict:
        return {"key": scan.key, "name": scan.name, "number": scan.number, "session": scan.session}

    @staticmethod
    def _error(key: str, exc: DefectscopeError) -> dict:
        return error_reply(f"bliss-{key}", exc)

    def _record(self, identity: dict, reply: dict) -> None:
        """Log and write the results row (no Redis needed)."""
        if reply.get("ok"):
            self.classified += 1
            log.info("scan %s: %s %s", identity["key"], reply.get("label"), reply.get("probabilities"))
        else:
            self.failed += 1
            log.error("scan %s not classified: %s: %s", identity["key"], reply["error"]["reason"],
                      reply["error"]["message"])
        if self.results is not None:
            self.results.append(reply, source=identity["key"])

    def _publish(self, identity: dict, reply: dict) -> dict:
        self._record(identity, reply)
        self._send(identity, reply)
        return reply

    def _send(self, identity: dict, reply: dict) -> None:
        c = self.config
        text = json.dumps(reply)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(f"{c.publish_prefix}:result:{identity['key']}", text, ex=int(c.result_ttl_s))
        pipe.xadd(f"{c.publish_prefix}:results",
                  {"scan": identity["key"], "name": str(identity.get("name", "")),
                   "number": str(identity.get("number", "")), "ok": int(bool(reply.get("ok"))),
                   "label": str(reply.get("label", "")), "reply": text},
                  maxlen=int(c.results_stream_maxlen), approximate=True)
        pipe.execute()

    def _publish_unpublished(self) -> None:
        while self._unpublished:
            identity, reply = self._unpublished[0]
            self._send(identity, reply)
            self._unpublished.pop(0)
