"""EPICS PV Access bridge: classify the rocking scans an areaDetector publishes, serve the answers as PVs.

The bridge is a PVA client of the beamline's IOCs and a PVA server of its own result PVs (``p4p``, the
``[epics]`` extra). It subscribes to (names: :class:`~defectscope.server.epics_config.BridgeConfig`):

- ``acquire_pv`` - a scan runs while it is non-zero. **A scan starts when it rises** (0 -> non-zero) and
  **ends with its n-th frame**, n being ``num_images_pv``'s value at the rise (or ``n_frames``). With an
  areaDetector in ``ImageMode`` Multiple (a fly rocking scan) that is ``$(P)cam1:Acquire`` and
  ``$(P)cam1:NumImages_RBV``; with an sscan record stepping the motor, ``$(P)scan1.EXSC`` and
  ``$(P)scan1.NPTS``. A fall before the n-th frame leaves ``end_grace_s`` for frames still queued in the
  IOC's plugins, then the scan fails. The value seen at connection is a state, not a rise: a scan already
  running when the bridge connects is skipped.
- ``frames_pv`` - the NTNDArray of ``NDPluginPva`` (``$(P)Pva1:Image``): each update of a running scan is
  its next frame (2-D; dimension[0] is the fast axis, columns). The update received at connection is the
  last frame of an earlier acquisition and is skipped. A jump in ``uniqueId`` (the IOC's array counter)
  means frames were lost and fails the scan.
- ``motor_pv`` - the rocking motor readback. A frame's rocking angle is its NDAttribute
  ``motor_attribute`` when it has one (areaDetector's attributes file, type ``EPICS_PV``: the readback at
  exposure time), else the motor PV's latest value when the frame arrives - right only if the motor's next
  move is not seen before the frame (two IOCs' updates may overtake each other): prefer the attribute.
  ``rocking.start_deg`` and ``step_deg`` of the geometry, when not given, are the first frame's angle and
  the difference to the second's.

Each scan's frames are streamed as they arrive into the server's streamed-scan path
(``Client.classify_scan_stream``, request id ``epics-<n>-<random>``) by one thread per scan, so the PVA
callbacks never wait on the network. Result PVs, ``<prefix><name>``: ``label``, ``probabilities``,
``classes``, ``decision``, ``model``, ``model_version``, ``provider``, ``last_latency_ms`` (the server's total),
``warnings``, ``request_id``, ``reply`` (the whole reply, JSON), ``error`` (``REASON: message`` of the last
scan, "" when it was classified), ``status`` (``connecting``; between scans ``idle`` or
``disconnected: PV ...``, MINOR alarm; ``scanning k/n``; ``classified``; ``failed``, MAJOR alarm), ``scans`` and ``scans_failed`` (counters, posted last: a client that sees
``scans`` change reads a complete result). A scan that fails - wrong frame shape, no motor reading, a PV
disconnected mid-scan, lost frames, the server's refusal - is logged and published as ``error``; the
result PVs keep the last good answer and the bridge follows the next scan.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid

import numpy as np
from p4p.client.thread import Context
from p4p.util import WorkQueue

from defectscope.errors import BadGeometry, BadMessage, DefectscopeError, ShapeMismatch
from defectscope.server.epics_config import BridgeConfig
from defectscope.server.epics_pvs import ResultPVs, describe_error

log = logging.getLogger(__name__)

# NTNDArray element types -> what the wire accepts (SPEC §4: <u2 <u4 <i4 <f4 <f8), without loss.
_WIRE_DTYPES = {"?": "<u2", "b": "<i4", "B": "<u2", "h": "<i4", "H": "<u2", "i": "<i4", "I": "<u4",
                "l": "<f8", "L": "<f8", "q": "<f8", "Q": "<f8", "f": "<f4", "d": "<f8"}
_ABANDON = np.empty(0, np.uint8)  # a zero-byte frame: the server closes the stream at once (SHAPE_MISMATCH)
_STOP = ("stop", None)


class Scan:
    """One scan: the frames received, the stream's queue and sending thread, and how it ended."""

    def __init__(self, number: int, n_frames: int):
        self.number = number
        self.n_frames = n_frames
        self.request_id = f"epics-{number}-{uuid.uuid4().hex[:12]}"
        self.queue: queue.Queue = queue.Queue()
        self.received = 0
        self.frame_shape: tuple | None = None
        self.unique_id = 0
        self.pending: list[np.ndarray] = []  # frames held until the rocking start and step are known
        self.angles: list[float] = []
        self.geometry: dict | None = None
        self.thread: threading.Thread | None = None
        self.deadline = 0.0
        self.ending = False  # acquire fell: frames still on their way have end_grace_s
        self.failed: DefectscopeError | None = None
        self.done = threading.Event()

    @property
    def receiving(self) -> bool:
        return self.failed is None and self.received < self.n_frames

    def frames(self):
        """The stream's frame source: what the event loop queues, in order. A failure after the stream opened
        (its first frame taken) sends a zero-byte frame first, so the server frees the stream at once."""
        for k in range(self.n_frames):
            item = self.queue.get()
            if isinstance(item, BaseException):
                if k:
                    yield _ABANDON
                raise item
            yield item


def _scalar(value) -> float:
    """The number of an NTScalar or NTEnum update (a busy/bo record over QSRV is an NTEnum: its index)."""
    x = value.value
    return float(x.index if hasattr(x, "index") else x)


class EpicsBridge:
    """Follow one detector's scans over PV Access and classify each on a ``defectscope serve`` server.

    ``client``: a :class:`defectscope.server.client.Client` used only by this bridge (one scan at a time;
    a scan that ends while the previous one awaits its answer queues its frames). ``client_conf`` /
    ``server_conf``: p4p configuration of the PVA client (``EPICS_PVA_ADDR_LIST``, ...) and of the result
    PVs' server (``EPICS_PVAS_INTF_ADDR_LIST``, ...), on top of the environment unless ``useenv`` is False.
    ``results`` / ``errors``: the latest answers and ``REASON: message`` errors by request id.
    """

    REMEMBER = 1000  # answers and errors kept in results / errors

    def __init__(self, client, config: BridgeConfig, *, client_conf: dict | None = None,
                 server_conf: dict | None = None, useenv: bool = True):
        self.client = client
        self.config = config
        self._client_conf, self._server_conf, self._useenv = client_conf, server_conf, useenv
        self.results: dict[str, dict] = {}
        self.errors: dict[str, str] = {}
        self.motor_value: float | None = None
        self.num_images: int | None = None
        self.acquiring: bool | None = None  # None: acquire_pv not connected
        self.pvs: ResultPVs | None = None
        self._events: queue.Queue = queue.Queue()
        self._connected: dict[str, bool] = {}
        self._scan: Scan | None = None
        self._scans: list[Scan] = []  # scans whose answer may still come
        self._count = 0
        self._client_lock = threading.Lock()  # one stream on the client's socket at a time
        self._ctx = None
        self._work = WorkQueue(maxsize=0)
        self._work_thread: threading.Thread | None = None
        self._subs: list = []
        self._thread: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------------------------------
    def start(self) -> "EpicsBridge":
        self.pvs = ResultPVs(self.config.prefix, self._server_conf, self._useenv)
        self._ctx = Context("pva", conf=self._client_conf, useenv=self._useenv, unwrap={})
        self._thread = threading.Thread(target=self._loop, name="defectscope-epics", daemon=True)
        self._thread.start()
        # One p4p worker for all subscriptions: updates reach the event loop in the order they arrived.
        self._work_thread = threading.Thread(target=self._work.handle, name="defectscope-epics-pva", daemon=True)
        self._work_thread.start()
        request = f"record[queueSize={self.config.monitor_queue}]"  # frames are not squashed while we are busy
        for source, pv in self._sources().items():
            self._connected[source] = False
            self._subs.append(self._ctx.monitor(pv, lambda v, s=source: self._events.put((s, v)), request=request,
                                                notify_disconnect=True, queue=self._work))
        log.info("defectscope: following %s (motor %s, acquire %s); results as %s*", self.config.frames_pv,
                 self.config.motor_pv, self.config.acquire_pv, self.config.prefix)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        for sub in self._subs:
            sub.close()
        if self._ctx is not None:
            self._ctx.close()
            self._work.interrupt()
            self._work_thread.join(timeout_s)
        if self._thread is not None:
            self._events.put(_STOP)
            self._thread.join(timeout_s)
        scan = self._scan
        if scan is not None and scan.receiving:
            self._fail(scan, BadMessage(f"the bridge stopped after {scan.received} of {scan.n_frames} frames"))
        for scan in list(self._scans):
            scan.done.wait(timeout_s)
        if self.pvs is not None:
            self.pvs.close()

    def __enter__(self):  # a bridge already started may be entered too: the block stops it
        return self if self.pvs is not None else self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def server_conf(self) -> dict:
        """The result PVs' server configuration as bound (its real ports)."""
        return self.pvs.conf()

    @property
    def connected(self) -> dict[str, bool]:
        """PV name -> whether its subscription is connected now."""
        return {pv: self._connected.get(source, False) for source, pv in self._sources().items()}

    @property
    def scans_done(self) -> int:
        """Scans answered or failed (published) so far."""
        return self.pvs.scans if self.pvs is not None else 0

    def _sources(self) -> dict[str, str]:
        c = self.config
        sources = {"acquire": c.acquire_pv, "frame": c.frames_pv, "motor": c.motor_pv}
        if c.num_images_pv is not None:
            sources["num_images"] = c.num_images_pv
        return sources

    # -- the event loop: every PV update, in the order received, on one thread -------------------------------
    def _loop(self) -> None:
        while True:
            scan = self._scan
            wait = max(0.0, scan.deadline - time.monotonic()) if scan is not None and scan.receiving else None
            try:
                source, value = self._events.get(timeout=wait)
            except queue.Empty:
                self._expire(scan)
                continue
            if source == "stop":
                return
            try:
                if isinstance(value, Exception):  # Disconnected, or the IOC refused the subscription
                    self._on_disconnect(source, value)
                else:
                    first = not self._connected[source]  # the value at connection: a state, not news
                    self._connected[source] = True
                    getattr(self, f"_on_{source}")(value, first)
                    if first:
                        self._connection_changed()
            except Exception:  # noqa: BLE001 - one bad update must not stop the bridge
                log.exception("defectscope: the update of %s could not be handled", self._sources()[source])

    def _on_disconnect(self, source: str, exc: Exception) -> None:
        if self._connected.get(source):
            log.warning("defectscope: %s disconnected (%s)", self._sources()[source], exc)
        self._connected[source] = False
        if source == "motor":
            self.motor_value = None
        elif source == "num_images":
            self.num_images = None
        elif source == "acquire":
            self.acquiring = None
        scan = self._scan
        if source == "frame" and scan is not None and scan.receiving:
            self._fail(scan, BadMessage(f"{self.config.frames_pv} disconnected ({exc}) after {scan.received} of "
                                        f"{scan.n_frames} frames"))
        self._connection_changed()

    def _connection_changed(self) -> None:
        """Between scans, ``status`` says whether every PV is connected (``idle``) or which are not."""
        scan = self._scan
        if scan is None or not scan.receiving:
            down = [pv for pv, up in self.connected.items() if not up]
            self.pvs.status("disconnected: " + " ".join(down) if down else "idle", severity=1 if down else 0)

    def _on_motor(self, value, first: bool) -> None:
        self.motor_value = _scalar(value)

    def _on_num_images(self, value, first: bool) -> None:
        self.num_images = int(_scalar(value))

    def _on_acquire(self, value, first: bool) -> None:
        on, was = bool(_scalar(value)), self.acquiring
        self.acquiring = on
        scan = self._scan
        if first:
            if on:
                log.info("defectscope: %s is already acquiring: that scan is skipped", self.config.acquire_pv)
        elif on and not was:
            self._begin()
        elif not on and was and scan is not None and scan.receiving:
            scan.ending = True  # frames still in the IOC's plugin queues may follow
            scan.deadline = time.monotonic() + self.config.end_grace_s

    # -- scans --------------------------------------------------------------------------------------------
    def _begin(self) -> None:
        c, old = self.config, self._scan
        if old is not None and old.receiving:
            self._fail(old, BadMessage(f"a new scan started after {old.received} of {old.n_frames} frames"))
        self._count += 1
        n = c.n_frames if c.n_frames is not None else self.num_images
        scan = self._scan = Scan(self._count, n or 0)
        scan.deadline = time.monotonic() + c.frame_timeout_s
        if n is None or n < 2:
            self._fail(scan, BadMessage(f"{c.num_images_pv} is not connected: frames per scan unknown" if n is None
                                        else f"{c.num_images_pv} is {n}: a rocking scan needs >= 2 frames"))
        elif c.motor_attribute is None and self.motor_value is None:
            self._fail(scan, BadGeometry(f"the rocking motor {c.motor_pv} is not connected: no angle for the frames"))
        else:
            log.info("defectscope: scan %d started (%d frames), request %s", scan.number, n, scan.request_id)
            self.pvs.status(f"scanning 0/{n}")

    def _on_frame(self, value, first: bool) -> None:
        scan = self._scan
        if first or scan is None or not scan.receiving:  # first: the last frame of an earlier acquisition
            return
        try:
            frame = self._decode(value, scan)
            angle = self._angle(value, scan)
        except DefectscopeError as exc:
            self._fail(scan, exc)
            return
        scan.received += 1
        scan.deadline = time.monotonic() + (self.config.end_grace_s if scan.ending else self.config.frame_timeout_s)
        self.pvs.status(f"scanning {scan.received}/{scan.n_frames}")  # before the frame can reach the server
        if scan.geometry is not None:
            scan.queue.put(frame)
            return
        scan.pending.append(frame)
        scan.angles.append(angle)
        rocking = self.config.geometry.get("rocking") or {}
        if len(scan.angles) < 2 and (rocking.get("start_deg") is None or rocking.get("step_deg") is None):
            return
        try:
            scan.geometry = self._geometry(scan)
        except DefectscopeError as exc:
            self._fail(scan, exc)
            return
        scan.thread = threading.Thread(target=self._send, args=(scan,), name=f"defectscope-epics-{scan.number}",
                                       daemon=True)
        self._scans.append(scan)
        scan.thread.start()
        for held in scan.pending:
            scan.queue.put(held)
        scan.pending.clear()

    def _decode(self, value, scan: Scan) -> np.ndarray:
        """The frame of an NTNDArray update, checked against the scan's first frame, in a wire dtype."""
        k, dims = scan.received, [int(d.size) for d in value.dimension]
        if value.codec.name:
            raise BadMessage(f"frame {k} is compressed ({value.codec.name}): turn compression off in the PVA plugin")
        if len(dims) != 2:
            raise ShapeMismatch(f"frame {k} has dimensions {dims}: a rocking scan's frames are 2-D")
        shape = (dims[1], dims[0])  # dimension[0] is the fast axis (columns)
        data = value.value
        if data is None or data.size != shape[0] * shape[1] or data.dtype.char not in _WIRE_DTYPES:
            raise ShapeMismatch(f"frame {k} holds {0 if data is None else data.size} values of "
                                f"{None if data is None else data.dtype} for dimensions {dims}")
        if scan.frame_shape is None:
            scan.frame_shape = shape
        elif shape != scan.frame_shape:
            raise ShapeMismatch(f"frame {k} is {shape[0]}x{shape[1]}; this scan's frames are "
                                f"{scan.frame_shape[0]}x{scan.frame_shape[1]}")
        unique_id = int(value.uniqueId)
        if scan.unique_id and unique_id and unique_id != scan.unique_id + 1:
            raise BadMessage(f"frames lost: uniqueId went from {scan.unique_id} to {unique_id} at frame {k}")
        scan.unique_id = unique_id
        return data.reshape(shape).astype(_WIRE_DTYPES[data.dtype.char])

    def _angle(self, value, scan: Scan) -> float | None:
        """The rocking angle of a frame: its NDAttribute ``motor_attribute``, else the motor PV's value."""
        name = self.config.motor_attribute
        for attribute in value.attribute if name else ():
            if attribute.name == name:
                return float(attribute.value)
        if self.motor_value is None:
            raise BadGeometry(f"frame {scan.received} has no rocking angle: the motor {self.config.motor_pv} is "
                              "not connected" + (f" and the frame has no attribute {name!r}" if name else ""))
        return self.motor_value

    def _geometry(self, scan: Scan) -> dict:
        geometry = json.loads(json.dumps(self.config.geometry))
        rocking = dict(geometry.get("rocking") or {})
        if rocking.get("start_deg") is None or rocking.get("step_deg") is None:
            if scan.angles[1] == scan.angles[0]:
                raise BadGeometry(f"the rocking motor did not move between frames 0 and 1 (both at {scan.angles[0]})")
            rocking.setdefault("start_deg", scan.angles[0])
            rocking.setdefault("step_deg", scan.angles[1] - scan.angles[0])
        geometry["rocking"] = rocking
        return geometry

    def _expire(self, scan: Scan | None) -> None:
        if scan is None or not scan.receiving or time.monotonic() < scan.deadline:
            return
        c = self.config
        self._fail(scan, BadMessage(
            f"acquisition ended after {scan.received} of {scan.n_frames} frames (waited {c.end_grace_s:g} s more)"
            if scan.ending else f"no frame for {c.frame_timeout_s:g} s after {scan.received} of {scan.n_frames}"))

    def _fail(self, scan: Scan, exc: DefectscopeError) -> None:
        if scan.failed is not None:
            return
        scan.failed = exc
        if scan.thread is not None:
            scan.queue.put(exc)  # the sending thread abandons the stream, then publishes the error
        else:
            self._publish_error(scan, exc)

    # -- the sending thread of a scan -----------------------------------------------------------------------
    def _send(self, scan: Scan) -> None:
        try:
            with self._client_lock:
                reply = self.client.classify_scan_stream(
                    scan.frames(), scan.geometry, n_frames=scan.n_frames, model=self.config.model,
                    intensity=self.config.intensity, request_id=scan.request_id)
        except BaseException as exc:  # noqa: BLE001 - published and logged, never lost
            self._publish_error(scan, scan.failed or exc)  # the bridge's reason, not the abandoned stream's
        else:
            self._publish_result(scan, reply)
        finally:
            self._scans.remove(scan)

    def _publish_result(self, scan: Scan, reply: dict) -> None:
        _remember(self.results, scan.request_id, reply, self.REMEMBER)
        log.info("defectscope: scan %d -> %s %s (%s)", scan.number, reply["label"], reply["probabilities"],
                 reply.get("decision"))
        self.pvs.result(reply)
        scan.done.set()

    def _publish_error(self, scan: Scan, exc: BaseException) -> None:
        text = describe_error(exc)
        _remember(self.errors, scan.request_id, text, self.REMEMBER)
        log.error("defectscope: scan %d not classified: %s", scan.number, text)
        self.pvs.error(f"scan {scan.number}: {text}")
        scan.done.set()


def _remember(d: dict, key, value, keep: int) -> None:
    d[key] = value
    while len(d) > keep:
        del d[next(iter(d))]
