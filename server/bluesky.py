"""A bluesky callback that classifies each run's rocking scan as it is measured (issue #20, item 2).

Subscribe :class:`ClassifyCallback` to a RunEngine (``RE.subscribe(cb)`` or ``RE(plan, cb)``) or to a
``bluesky.callbacks.zmq.RemoteDispatcher`` on a 0MQ proxy. Per run:

- ``start``: the number of frames is ``n_frames`` if given, else the start document's ``num_points``.
  A background thread opens one streamed scan (``Client.classify_scan_stream``) fed from a queue, so
  the RunEngine never waits on the network while the scan runs.
- ``event`` (stream ``primary``): the detector field is queued as the next frame. When the geometry has
  no rocking ``start_deg``/``step_deg``, they are taken from the rocking motor's readings in the first
  two events (its field: ``rocking_motor``, else the run's only scanned motor); the stream starts then.
- ``stop``: waits (at most ``timeout_s``) for the server's answer, logs it, stores it in
  ``results[run_uid]`` and ``last``, and calls ``on_result(run_uid, reply)``. A run that ends without all
  its frames (aborted, too few events), or whose request fails, is stored in ``errors[run_uid]`` instead
  (and ``on_error(run_uid, exc)``); the callback never raises into the RunEngine for a server error.

Externally stored detector data (a ``filled: False`` field) is loaded with an ``event_model.Filler``
when ``handler_registry`` is given. The client is used by one run at a time (a ZeroMQ socket is not
thread-safe): a run that starts while the previous one is still waiting for its answer queues its
frames until the client is free.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from bluesky.callbacks.core import CallbackBase

log = logging.getLogger(__name__)

_END = object()


class RunNotClassified(RuntimeError):
    """A run whose frames could not all be sent (aborted, too few events, no frame count)."""


class _Run:
    """One run's stream: a queue of frames, the thread that sends them, and the outcome."""

    def __init__(self, uid: str, n_frames: int):
        self.uid = uid
        self.n_frames = n_frames
        self.queue: queue.Queue = queue.Queue()
        self.sent = 0  # frames queued so far
        self.pending: list[np.ndarray] = []  # frames held until the rocking geometry is known
        self.motor_values: list[float] = []
        self.geometry: dict | None = None
        self.thread: threading.Thread | None = None
        self.done = threading.Event()
        self.reply: dict | None = None
        self.error: BaseException | None = None
        self.failed_early: str | None = None  # a problem seen on the RunEngine side
        self.motors: tuple = ()  # the start document's scanned motors


class ClassifyCallback(CallbackBase):
    """Classify each bluesky run's rocking scan on a ``defectscope serve`` server while it is measured.

    ``client``: a :class:`defectscope.server.client.Client` (used only from this callback's threads).
    ``geometry``: the SPEC §4 geometry dict; without ``rocking.start_deg``/``step_deg`` they come from the
    rocking motor's first two readings. ``detector_field``: the event data key of the 2-D frames.
    ``rocking_motor``: the event data key of the rocking motor (default: the start document's only motor).
    ``n_frames``: frames per run (default: the start document's ``num_points``). ``model``, ``intensity``,
    ``mask``: passed to the request. ``stream_name``: the event stream the frames are in. ``timeout_s``:
    how long ``stop`` waits for the answer (it is still stored when it arrives later).
    """

    def __init__(self, client, geometry: dict, *, detector_field: str, rocking_motor: str | None = None,
                 n_frames: int | None = None, model: str | None = None, intensity: str | None = None,
                 mask: np.ndarray | None = None, stream_name: str = "primary", timeout_s: float = 60.0,
                 on_result: Callable[[str, dict], Any] | None = None,
                 on_error: Callable[[str, BaseException], Any] | None = None,
                 handler_registry: dict | None = None):
        super().__init__()
        self.client = client
        self.geometry = copy.deepcopy(dict(geometry))
        self.detector_field = detector_field
        self.rocking_motor = rocking_motor
        self.n_frames = n_frames
        self.model = model
        self.intensity = intensity
        self.mask = mask
        self.stream_name = stream_name
        self.timeout_s = float(timeout_s)
        self.on_result = on_result
        self.on_error = on_error
        self.results: dict[str, dict] = {}
        self.errors: dict[str, BaseException] = {}
        self.last: dict | None = None
        self._filler = None
        if handler_registry is not None:
            from event_model import Filler

            self._filler = Filler(handler_registry, inplace=False)
        self._client_lock = threading.Lock()  # one stream on the client's socket at a time
        self._runs: dict[str, _Run] = {}
        self._descriptors: dict[str, str] = {}  # descriptor uid -> stream name
        self._run: _Run | None = None

    # -- the document stream -------------------------------------------------------------------------------
    def __call__(self, name, doc, *args, **kwargs):
        if self._filler is not None:
            name, doc = self._filler(name, doc)
        return super().__call__(name, doc, *args, **kwargs)

    def start(self, doc):
        if self._run is not None:  # a run that never stopped
            self._fail(self._run, "a new run started before this one stopped")
        n = self.n_frames if self.n_frames is not None else doc.get("num_points")
        run = self._run = _Run(doc["uid"], int(n) if n is not None else 0)
        self._runs[run.uid] = run
        run.motors = tuple(doc.get("motors") or ())
        self._descriptors.clear()
        if n is None or int(n) < 2:
            run.failed_early = (f"run {run.uid}: no frame count (give n_frames, or a plan that sets num_points)"
                                if n is None else f"run {run.uid}: {n} frame(s), a rocking scan needs >= 2")
            log.error("defectscope: %s", run.failed_early)
            return
        if self.rocking_motor is None and not self._rocking_given():
            motors = doc.get("motors") or ()
            if len(motors) != 1:
                run.failed_early = (f"run {run.uid}: the geometry has no rocking start_deg/step_deg and the rocking "
                                    f"motor is not known (give rocking_motor; the run's motors: {list(motors)})")
                log.error("defectscope: %s", run.failed_early)
                return
        if self._rocking_given():
            run.geometry = self.geometry
            self._start_thread(run)
        log.info("defectscope: run %s, classifying %d frames of %r", run.uid, run.n_frames, self.detector_field)

    def descriptor(self, doc):
        self._descriptors[doc["uid"]] = doc.get("name", "primary")
        if self._run is None or self._run.failed_early or doc.get("name", "primary") != self.stream_name:
            return
        keys = doc.get("data_keys", {})
        if self.detector_field not in keys:
            self._fail(self._run, f"stream {self.stream_name!r} has no field {self.detector_field!r} "
                                  f"(fields: {sorted(keys)})")
        elif keys[self.detector_field].get("external") and self._filler is None:
            self._fail(self._run, f"{self.detector_field!r} is stored externally "
                                  f"({keys[self.detector_field]['external']}): give handler_registry to load it")

    def event(self, doc):
        run = self._run
        if run is None or run.failed_early or self._descriptors.get(doc.get("descriptor")) != self.stream_name:
            return
        if run.sent + len(run.pending) >= run.n_frames:
            log.warning("defectscope: run %s has more than %d events; event %s not sent", run.uid, run.n_frames,
                        doc.get("seq_num"))
            return
        frame = np.asarray(doc["data"][self.detector_field])
        if frame.ndim != 2:
            self._fail(run, f"{self.detector_field!r} is not a 2-D frame (shape {frame.shape})")
            return
        if run.geometry is None:  # the rocking start and step come from the first two motor readings
            motor = self._motor_field(run)
            value = doc["data"].get(motor) if motor else None
            if value is None:
                self._fail(run, f"event {doc.get('seq_num')} has no rocking motor reading {motor!r}")
                return
            run.motor_values.append(float(value))
            run.pending.append(frame)
            if len(run.motor_values) < 2:
                return
            start, second = run.motor_values[:2]
            geometry = copy.deepcopy(self.geometry)
            rocking = dict(geometry.get("rocking") or {})
            rocking.setdefault("start_deg", start)
            rocking.setdefault("step_deg", second - start)
            geometry["rocking"] = rocking
            run.geometry = geometry
            self._start_thread(run)
            for held in run.pending:
                self._put(run, held)
            run.pending.clear()
            return
        self._put(run, frame)

    def stop(self, doc):
        run = self._runs.get(doc.get("run_start"))
        if run is None:
            return
        if self._run is run:
            self._run = None
        status = doc.get("exit_status", "success")
        if run.failed_early:
            self._finish(run, error=RunNotClassified(run.failed_early))
            return
        if run.sent < run.n_frames:
            why = (f"run {run.uid} ended ({status}{': ' + doc['reason'] if doc.get('reason') else ''}) after "
                   f"{run.sent + len(run.pending)} of {run.n_frames} frames")
            self._fail(run, why)
            if run.thread is None:
                self._finish(run, error=RunNotClassified(why))
            run.done.wait(self.timeout_s)  # the sending thread gives up on its next read of the queue
            return
        run.queue.put(_END)
        if not run.done.wait(self.timeout_s):
            log.warning("defectscope: no answer for run %s within %g s; it is stored when it comes", run.uid,
                        self.timeout_s)

    # -- results ---------------------------------------------------------------------------------------------
    def wait(self, run_uid: str | None = None, timeout: float | None = None) -> dict:
        """The answer for ``run_uid`` (default: the latest run), waiting up to ``timeout`` s; raises the
        run's error if it failed and ``TimeoutError`` if no answer came."""
        if run_uid is None:
            if not self._runs:
                raise KeyError("no run seen yet")
            run_uid = list(self._runs)[-1]
        run = self._runs[run_uid]
        if not run.done.wait(timeout):
            raise TimeoutError(f"no answer for run {run_uid} within {timeout} s")
        if run.error is not None:
            raise run.error
        return run.reply

    # -- internals -------------------------------------------------------------------------------------------
    def _rocking_given(self) -> bool:
        rocking = self.geometry.get("rocking") or {}
        return rocking.get("start_deg") is not None and rocking.get("step_deg") is not None

    def _motor_field(self, run: _Run) -> str | None:
        if self.rocking_motor is not None:
            return self.rocking_motor
        return run.motors[0] if len(run.motors) == 1 else None

    def _put(self, run: _Run, frame: np.ndarray) -> None:
        run.queue.put(frame)
        run.sent += 1

    def _fail(self, run: _Run, why: str) -> None:
        """Stop this run's stream: the sending thread's frame source raises, and the run is an error."""
        if run.failed_early is None:
            run.failed_early = why
            log.error("defectscope: %s", why)
        run.queue.put(RunNotClassified(why))

    def _start_thread(self, run: _Run) -> None:
        run.thread = threading.Thread(target=self._send, args=(run,), name=f"defectscope-run-{run.uid[:8]}",
                                      daemon=True)
        run.thread.start()

    def _frames(self, run: _Run):
        for _ in range(run.n_frames):
            item = run.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                raise RunNotClassified(f"run {run.uid} stopped before its last frame")
            yield item

    def _send(self, run: _Run) -> None:
        try:
            with self._client_lock:
                frames = self._frames(run)
                reply = self.client.classify_scan_stream(frames, run.geometry, n_frames=run.n_frames,
                                                         mask=self.mask, intensity=self.intensity,
                                                         model=self.model, request_id=f"bluesky-{run.uid}")
        except BaseException as exc:  # noqa: BLE001 - stored for the plan and logged, never lost
            self._finish(run, error=exc)
        else:
            self._finish(run, reply=reply)

    def _finish(self, run: _Run, reply: dict | None = None, error: BaseException | None = None) -> None:
        if run.done.is_set():
            return
        run.reply, run.error = reply, error
        if error is not None:
            self.errors[run.uid] = error
            log.error("defectscope: run %s not classified: %s", run.uid, error)
            hook = self.on_error
        else:
            self.results[run.uid] = reply
            self.last = reply
            log.info("defectscope: run %s -> %s %s", run.uid, reply.get("label"), reply.get("probabilities"))
            hook = self.on_result
        try:
            if hook is not None:
                hook(run.uid, reply if error is None else error)
        except Exception:
            log.exception("defectscope: the %s hook raised", "on_error" if error else "on_result")
        finally:
            run.done.set()
