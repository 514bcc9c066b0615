"""What the Tango device ``DefectClassifier`` does that is not Tango: loading its model, state and status,
turning commands into jobs for the core, refusing, logging (``server.tango_device`` is the device itself).

``DeviceLogic`` is a mixin of the device class: its methods use the device's properties and state and the
PyTango ``Device`` methods (``set_state``, ``push_change_event``) the device class brings.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tango
from tango import DevState

from defectscope.errors import (
    BadGeometry, BadMessage, Busy, DefectscopeError, ModelUnavailable, ShapeMismatch, TooLarge, incident,
)
from defectscope.preprocessing.frames import CANONICAL_AXES
from defectscope.server import protocol
from defectscope.server.core import Classifier
from defectscope.server.job import Job, file_job, map_job
from defectscope.server.results import ResultsLog, describe_source

log = logging.getLogger("defectscope.server.tango_device")

PROVIDERS = ("auto", "cpu", "cuda")
BUSY_WAIT_S = 1.0      # a classification waits this long for the one running, then BUSY (clients time out at 3 s)
TEARDOWN_WAIT_S = 2.0  # Init waits this long for a running classification
RELOAD_WAIT_S = 2.0    # Reload answers after this long at most; a slower load finishes in the background
FILE_ARG_KEYS = {"path", "dataset", "kind", "geometry", "axes", "q_direction", "voxel_size", "intensity", "request_id"}
MAX_CLASSES = 16


@dataclass(frozen=True)
class LastResult:
    """What the read attributes show; replaced as a whole, so a reader never sees half of two results."""

    probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0))
    label: str = ""
    request_id: str = ""
    latency_ms: float = 0.0
    reply: str = ""
    oversampling: np.ndarray = field(default_factory=lambda: np.zeros(0))
    crystal_extent_nm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    warnings: tuple[str, ...] = ()
    oversampling_confidence: tuple[str, ...] = ()
    decision: str = ""
    verdict: str = ""


def _warm_up(classifier: Classifier) -> None:
    """Pay import and first-call costs (scipy, xrayutilities) while loading, not in the first command."""
    try:
        if getattr(classifier, "warmup_ms", None) is None:  # the core did not warm the pipeline up itself
            from defectscope.preprocessing.pipeline import prepare

            n0, n1, n2 = classifier.predictor.pipeline.shape
            grid = np.meshgrid(*[np.arange(n) - n / 2 for n in (n0, n1, n2)], indexing="ij", sparse=True)
            peak = (1e4 * np.exp(-sum((g / w) ** 2 for g, w in zip(grid, (3.0, 4.0, 5.0))))).astype(np.float32)
            prepare(peak, classifier.predictor.pipeline, limits=classifier.limits, axes=tuple(CANONICAL_AXES))
        if classifier.data_root is not None:  # files may hold raw scans: orthonormalisation needs xrayutilities
            from defectscope.preprocessing.geometry import load_xrayutilities

            load_xrayutilities()
    except Exception as exc:  # a warm-up is an optimisation, never a reason to refuse a model
        log.warning("warm-up failed (first request will be slower): %s", exc)


def _new_request_id() -> str:
    return "tango-" + uuid.uuid4().hex[:16]


class DeviceLogic:
    """The device's non-Tango methods (see the module docstring)."""

    def _check_config(self) -> list[str]:
        """Problems that leave the device usable for maps: they make it ALARM, not FAULT."""
        notes = []
        if self.DataRoot and not Path(self.DataRoot).is_dir():
            notes.append(f"DataRoot {self.DataRoot!r} is not a directory: ClassifyFile will refuse every path")
        if self.GeometryPreset:
            from defectscope.preprocessing.geometry import PRESETS

            if self.GeometryPreset not in PRESETS:
                notes.append(f"GeometryPreset {self.GeometryPreset!r} is unknown (known: {', '.join(sorted(PRESETS))})")
        return notes

    def _open_results(self) -> None:
        if not self.ResultsFile:
            return
        try:
            self._results = ResultsLog(self.ResultsFile, server="tango")
        except Exception as exc:
            self._notes.append(f"results log unavailable: {exc}")

    def _model_config(self) -> dict:
        return {"ModelPath": self.ModelPath, "Provider": self.Provider, "DataRoot": self.DataRoot}

    # -- model loading ------------------------------------------------------------------------------
    def _build_classifier(self, config: dict) -> Classifier:
        from defectscope.model.predictor import Predictor
        from defectscope.model.registry import resolve_model

        provider = (config["Provider"] or "auto").strip().lower()
        if provider not in PROVIDERS:
            raise ModelUnavailable(f"Provider property {config['Provider']!r} is not one of {', '.join(PROVIDERS)}")
        path = resolve_model(config["ModelPath"] or None)
        predictor = Predictor(path, provider=provider, on_missing_cuda="degrade")
        classifier = Classifier(predictor, limits=self._limits, data_root=config["DataRoot"] or None,
                                orthonormaliser=self._orthonormaliser)  # its mapping cache outlives a Reload
        classifier.stats = self._stats  # counters survive a Reload
        _warm_up(classifier)
        return classifier

    def _begin_load(self, config: dict, *, reload: bool) -> tuple[threading.Event, dict]:
        generation = self._generation
        done, outcome = threading.Event(), {}
        self._loading = True
        if not reload:
            self._refresh_state()

        def load():
            try:
                outcome["classifier"] = self._build_classifier(config)
            except Exception as exc:
                outcome["error"] = exc if isinstance(exc, DefectscopeError) else incident(exc, "loading the model", log)
            try:
                if generation == self._generation:
                    self._loaded(outcome, reload)
            finally:
                done.set()

        threading.Thread(target=load, name="defectscope-model-load", daemon=True).start()
        return done, outcome

    def _loaded(self, outcome: dict, reload: bool) -> None:
        self._loading = False
        if "classifier" in outcome:
            self._classifier = outcome["classifier"]  # one assignment: a running command keeps the old one
            self._fault = self._reload_error = ""
            p = self._classifier.predictor
            log.info("model %s %s loaded on %s", p.describe()["name"], p.describe()["version"], p.provider)
        else:
            exc = outcome["error"]
            message = f"{exc.reason}: {exc.message}"
            if reload and self._classifier is not None:
                self._reload_error = message
                log.error("reload failed, the previous model keeps serving: %s", message)
            else:
                self._fault = (f"no usable model: {message}. Fix the ModelPath/Provider properties "
                               "(or put the model file in place) and run Init")
                log.error(self._fault)
        self._refresh_state()

    # -- state --------------------------------------------------------------------------------------
    def _refresh_state(self) -> None:
        classifier = self._classifier
        if classifier is None:
            if self._loading:
                self.set_state(DevState.INIT)
                self.set_status(f"Loading model {self.ModelPath or '(bundled default)'}...")
            else:
                self.set_state(DevState.FAULT)
                self.set_status(self._fault or "no usable model")
            return
        p = classifier.predictor
        ident = p.describe()
        problems = list(self._notes)
        if p.degraded:
            problems.insert(0, f"degraded: provider {p.requested_provider!r} requested but running on {p.provider}")
        if self._results is not None and self._results.failures:
            problems.append(f"results log: {self._results.failures} rows not written, last: {self._results.last_error}")
        lines = [f"Model {ident['name']} {ident['version']} (sha256 {ident['sha256'][:12]}) on {p.provider}."]
        lines.append(f"ClassifyFile reads under {classifier.data_root}." if classifier.data_root
                     else "ClassifyFile disabled (no DataRoot).")
        if self._results is not None:
            lines.append(f"Results logged to {self._results.path}.")
        if self._reload_error:
            lines.append(f"Last Reload failed, this model keeps serving: {self._reload_error}")
        if self._running:
            state, head = DevState.RUNNING, "Classifying."
        elif problems:
            state, head = DevState.ALARM, "ALARM: " + "; ".join(problems) + "."
        else:
            state, head = DevState.ON, "Ready."
        self.set_state(state)
        self.set_status("\n".join([head, *lines]))

    # -- classification (one path for both commands) -----------------------------------------------
    def _classify(self, name: str, build) -> str:
        t0 = time.perf_counter()
        request, classifier = None, self._classifier
        try:
            if classifier is None:
                if self._loading:
                    raise Busy("the model is still loading (state INIT); try again shortly")
                raise ModelUnavailable(self._fault or "no usable model")
            request = build()  # checked before waiting: a bad request is refused at once, not after BUSY_WAIT_S
            decode_ms = (time.perf_counter() - t0) * 1e3
            if not self._work.acquire(timeout=BUSY_WAIT_S):
                raise Busy(f"another classification is running (waited {BUSY_WAIT_S} s); try again")
        except Exception as exc:
            self._refuse(name, exc, request, classifier)
        # Holding the lock until the row is logged: Init cannot close the results log under a reply.
        try:
            self._running = True
            self._refresh_state()
            try:
                reply = classifier.classify(request, decode_ms=decode_ms).reply
            except Exception as exc:
                self._refuse(name, exc, request, classifier)
            self._stats.record(True, reply["timings_ms"]["total"])
            self._log(reply, request, classifier)  # before the reply leaves: a received reply is a logged reply
            text = protocol.encode(reply).decode("utf-8")
            prep = reply.get("preparation") or {}
            self._last = LastResult(np.asarray(reply["probabilities"], dtype=np.float64), reply["label"],
                                    request.request_id, float(reply["timings_ms"]["total"]), text,
                                    np.asarray(prep.get("oversampling_per_axis") or [], dtype=np.float64),
                                    np.asarray(prep.get("crystal_extent_nm") or [], dtype=np.float64),
                                    tuple(w["reason"] for w in reply.get("warnings", [])),
                                    tuple(str(c) for c in prep.get("oversampling_confidence") or ()),
                                    str(reply.get("decision", "")), str(reply.get("verdict", "")))
            self.push_change_event("probabilities", self._last.probabilities)
            self.push_change_event("label", self._last.label)
            return text
        finally:
            self._running = False
            self._work.release()
            self._refresh_state()

    def _refuse(self, name: str, exc: Exception, request, classifier) -> None:
        """Count and log a refusal, then raise it as DevFailed with the protocol reason (SPEC §4)."""
        if not isinstance(exc, DefectscopeError):  # a bug fails this request, never the device
            exc = incident(exc, name, log)
        self._stats.record(False, reason=exc.reason)
        self._log(protocol.error_reply(request.request_id if request else None, exc), request, classifier)
        self._refresh_state()
        tango.Except.throw_exception(exc.reason, exc.message, f"DefectClassifier.{name}")

    def _log(self, reply: dict, request, classifier) -> None:
        if self._results is None:
            return
        predictor = classifier.predictor if classifier is not None else None
        self._results.append(reply, source=describe_source(request) if request is not None else "",
                             model=predictor.describe() if predictor else None,
                             provider=predictor.provider if predictor else None)

    def _map_request(self, values) -> Job:
        values = np.ascontiguousarray(values, dtype="<f4").ravel()
        n = int(round(values.size ** (1.0 / 3.0)))
        if values.size == 0 or n**3 != values.size:
            raise ShapeMismatch(f"ClassifyMap takes n^3 values (one cubic map, C order, axes {CANONICAL_AXES}); "
                                f"got {values.size}, which is not a cube")
        if values.size > self._limits.max_map_voxels:
            raise TooLarge(f"map of {values.size} voxels, limit {self._limits.max_map_voxels}")
        return map_job(values.reshape(n, n, n), axes=CANONICAL_AXES, request_id=_new_request_id())

    def _file_request(self, text: str) -> Job:
        try:
            args = json.loads(text)
        except ValueError:
            raise BadMessage('ClassifyFile takes a JSON object {"path", "dataset", "kind", "geometry", "intensity"}') from None
        if not isinstance(args, dict):
            raise BadMessage(f"ClassifyFile takes a JSON object, got {type(args).__name__}")
        unknown = sorted(set(args) - FILE_ARG_KEYS)
        if unknown:
            raise BadMessage(f"ClassifyFile got unknown keys {unknown}; allowed: {sorted(FILE_ARG_KEYS)}")
        rid = args.pop("request_id", None) or _new_request_id()
        if not isinstance(rid, str) or len(rid) > protocol.MAX_REQUEST_ID:
            raise BadMessage(f"request_id must be a string of at most {protocol.MAX_REQUEST_ID} characters")
        kind = args.pop("kind", None) or ("scan" if args.get("geometry") is not None else "map")
        if kind == "scan":
            geometry = args.get("geometry") or {}
            if not isinstance(geometry, dict):
                raise BadGeometry("geometry must be a JSON object (a preset and/or explicit fields)")
            if "preset" not in geometry and self.GeometryPreset:
                geometry = {"preset": self.GeometryPreset, **geometry}
            if not geometry:
                raise BadGeometry("a 'scan' file needs a geometry (or the device's GeometryPreset property)")
            args["geometry"] = geometry
        elif kind == "map":
            if args.get("geometry") is not None:
                raise BadMessage("geometry is only for kind 'scan' (a raw rocking scan); a 'map' is already in q")
        else:
            raise BadMessage(f"kind {str(kind)[:32]!r} is unknown; ClassifyFile kinds are 'map' and 'scan'")
        return file_job(args.pop("path", None), request_id=rid, **args)
