"""The transport-free core: a job in, a reply out (pyFAI ``Worker`` style).

``Classifier.classify_map`` / ``classify_scan`` / ``classify_file`` and the streamed-scan trio
(``begin_stream``, ``add_frame``, ``finish_stream``) take typed inputs; ``classify`` runs a ``server.job.Job``,
which is what the ZeroMQ protocol parses a request into. The ZeroMQ server, the Tango device and the local
CLI all call it; none of them prepares or predicts on its own, so the same map gives the same probabilities
whichever door it came in by. Nothing here knows the wire format.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import threading
import time
from pathlib import Path

import numpy as np

from defectscope import PROTOCOL, __version__
from defectscope.errors import BadMessage, DefectscopeError, Internal, PathNotAllowed, ShapeMismatch, incident
from defectscope.model.predictor import Predictor
from defectscope.preprocessing.config import Limits
from defectscope.preprocessing.frames import CANONICAL_AXES
from defectscope.preprocessing.geometry import geometry_from_dict
from defectscope.preprocessing.loaders import load_map, open_under_root
from defectscope.preprocessing.orthonormalise import Orthonormaliser
from defectscope.preprocessing.pipeline import Preparation, prepare_each, source_extent
from defectscope.preprocessing.scan_prepare import prepare_scan
from defectscope.preprocessing.scans import load_hdf5_scan
from defectscope.preprocessing.validate import amplitude_to_intensity
from defectscope.server import lookahead
from defectscope.server.checks import DISAGREEMENT, check_models, check_ood, check_sampling, decisions  # noqa: F401
from defectscope.server.job import Job, Outcome, ScanStream, _Staged, file_job, map_job, scan_job
from defectscope.server.stats import Stats  # noqa: F401 (imported from here by the adapters)

Request = Job  # the name the core's signatures use: a job, parsed from the wire or made by the typed calls

log = logging.getLogger(__name__)

class _EstimatorPool:
    """The threads a classifier runs oversampling estimates on (``Classifier._overlapped``): made on first use and
    again in a forked child (which inherits none of its threads); a reload hands it on, adding no threads."""

    def __init__(self, workers: int = 4):
        self.workers = workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pid = None
        self._lock = threading.Lock()

    def get(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="defectscope-estimate")
                self._pid = os.getpid()
            return self._pool


def open_data_file(root: Path | None, path: str):
    """``(file, name)``: ``path`` under the data root, open for reading, and its name under the root (``loaders.
    open_under_root``: nothing outside the root is ever opened). Read it all from that file, never reopen the path."""
    if root is None:
        raise PathNotAllowed("file input is disabled on this server (no data root configured)")
    return open_under_root(root, path)


def _intensity(spec: dict) -> str:
    """What a request's numbers are (SPEC §4 ``input.intensity``; validated by the protocol)."""
    return spec.get("intensity") or "counts"


def _frame_intensity(frame: np.ndarray, intensity: str) -> np.ndarray:
    """A detector frame as intensities: an amplitude frame squared (float32), others as they are."""
    return amplitude_to_intensity(np.array(frame, dtype=np.float32)) if intensity == "amplitude" else frame


class Classifier:
    """Prepare and predict for validated requests; every failure becomes a protocol reason."""

    def __init__(self, predictor: Predictor, *, limits: Limits | None = None, data_root: str | Path | None = None,
                 overlap: bool = True, orthonormaliser: Orthonormaliser | None = None, sampling_check: bool = True,
                 cross_check: Predictor | None = None, estimators: _EstimatorPool | None = None):
        """``overlap``: run a single map's oversampling estimate beside its centring and inference
        (``_overlapped``; same answer, lower latency on a machine with a free core). ``orthonormaliser``:
        one to share (a reload hands the old classifier's over, with its cache of geometry mappings); it
        must apply the same ``limits``. By default a new one under ``limits``. ``sampling_check``: classify
        every map also at oversamplings across the trained range and warn ``SAMPLING_SENSITIVE`` when the
        label changes (``_check_sampling``; three more maps in the inference). ``cross_check``: a second model
        (the 2-class beside a 3-class one, or the reverse) asked on the same prepared map; where the two
        disagree on defect-free vs defective by more than ``DISAGREEMENT``, the reply warns ``MODELS_DISAGREE``."""
        if cross_check is not None and cross_check.pipeline != predictor.pipeline:
            raise ValueError("the cross-check model prepares its maps differently (another pipeline)")
        if cross_check is not None and not {"defect_free"} <= set(predictor.classes) & set(cross_check.classes):
            raise ValueError("both models need a 'defect_free' class to be compared")
        self.predictor = predictor
        self.overlap = overlap
        self.sampling_check = sampling_check
        self.cross_check = cross_check
        self.estimators = estimators or _EstimatorPool()
        self.limits = limits or Limits()
        self.data_root = Path(data_root).resolve() if data_root else None
        self.stats = Stats()
        if orthonormaliser is not None and orthonormaliser.limits != self.limits:
            raise ValueError("the orthonormaliser applies other limits than the classifier")
        self.orthonormaliser = orthonormaliser or Orthonormaliser(limits=self.limits)
        self.warmup_ms = self._warm_up()

    def _warm_up(self) -> float:
        """Run the whole preparation path once at start, so the first scan of a beamtime does not pay
        for first-call costs, and a model whose pipeline cannot run fails at start, not on a request."""
        t0 = time.perf_counter()
        n0, n1, n2 = self.predictor.pipeline.shape
        grids = np.meshgrid(*(np.arange(n) - n / 2 + 0.3 for n in (n0, n1, n2)), indexing="ij", sparse=True)
        blob = (1e4 * np.exp(-sum((g / w) ** 2 for g, w in zip(grids, (2.5, 3.0, 3.5))))).astype(np.float32)
        preparation = Preparation(blob, self.predictor.pipeline, limits=self.limits)
        # The estimate through the helper pool as requests use it (its threads start here, not on a request).
        estimate = self._estimator().submit(preparation.estimate) if self.overlap else None
        per_axis, overall = estimate.result() if estimate is not None else preparation.estimate()
        self.predictor.predict(preparation.finish(per_axis, overall).array[np.newaxis])
        return (time.perf_counter() - t0) * 1e3

    # -- ops --------------------------------------------------------------------------------------
    def info(self) -> dict:
        p = self.predictor
        return {
            "server_version": __version__,
            "protocol": PROTOCOL,
            "model": p.describe(),
            "card": p.card,
            "classes": list(p.classes),
            "pipeline": p.pipeline.to_dict(),
            "provider": p.provider,
            "provider_requested": p.requested_provider,
            "degraded": p.degraded,
            "limits": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.limits).items()},
            "file_input": self.data_root is not None,
            # Thread settings decide latency on a shared machine (see server.cli.SERVING_COMMANDS).
            "threads": {var.lower(): os.environ.get(var) for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
        }

    def health(self, queue_depth: int = 0, state: str = "ON") -> dict:
        return {
            "state": "DEGRADED" if self.predictor.degraded and state == "ON" else state,
            "queue_depth": queue_depth,
            "queue_length": self.limits.queue_length,
            "provider": self.predictor.provider,
            "model": self.predictor.describe(),
            **self.stats.snapshot(),
        }

    def classify(self, request: Request, decode_ms: float = 0.0) -> Outcome:
        """Run one job (``server.job``); raises only ``DefectscopeError``."""
        return self._run(request, lambda: self._volumes(request), decode_ms)

    # -- the typed calls: each makes its job (``server.job``) and runs it -------------------------------
    def classify_map(self, volume, *, axes=CANONICAL_AXES, voxel_size=None, q_direction=None,
                     intensity: str = "counts", request_id: str | None = None,
                     return_prepared: bool = False) -> Outcome:
        """One map ``[n0,n1,n2]`` or a batch ``[B,n0,n1,n2]`` (SPEC §4 ``map``)."""
        return self.classify(map_job(volume, axes=axes, voxel_size=voxel_size, q_direction=q_direction,
                                     intensity=intensity, request_id=request_id, return_prepared=return_prepared))

    def classify_scan(self, frames, geometry: dict, *, mask=None, intensity: str = "counts",
                      request_id: str | None = None, return_prepared: bool = False) -> Outcome:
        """A raw rocking scan and its geometry (SPEC §4 ``scan``), gridded by this classifier."""
        return self.classify(scan_job(frames, geometry, mask=mask, intensity=intensity, request_id=request_id,
                                      return_prepared=return_prepared))

    def classify_file(self, path: str, *, dataset: str | None = None, geometry: dict | None = None, axes=None,
                      voxel_size=None, q_direction=None, intensity: str = "counts", request_id: str | None = None,
                      return_prepared: bool = False) -> Outcome:
        """A map (or with ``geometry`` a raw scan) in a file under the data root (SPEC §4 ``file``)."""
        return self.classify(file_job(path, dataset=dataset, geometry=geometry, axes=axes, voxel_size=voxel_size,
                                      q_direction=q_direction, intensity=intensity, request_id=request_id,
                                      return_prepared=return_prepared))

    # -- streamed scans (frames arrive one by one; see server.protocol) -----------------------------
    def begin_stream(self, request: Request) -> "ScanStream":
        """Open the gridding of a scan whose frames will follow; builds the geometry's mapping if needed."""
        n_frames, rows, cols = request.spec["shape"]
        try:
            geom = geometry_from_dict(request.spec["geometry"], n_frames=n_frames, frame_shape=(rows, cols))
            state = self.orthonormaliser.start(geom, mask=request.mask)
        except DefectscopeError:
            raise
        except Exception as exc:
            raise incident(exc, f"opening stream {request.request_id}", log) from None
        return ScanStream(request=request, state=state, frame_shape=(rows, cols),
                          dtype=np.dtype(request.spec["dtype"]))

    def add_frame(self, stream: "ScanStream", index: int, frame: np.ndarray, decode_ms: float = 0.0) -> None:
        t0 = time.perf_counter()
        try:
            frame = _frame_intensity(frame, _intensity(stream.request.spec))
            self.orthonormaliser.accumulate_frame(stream.state, index, frame)
            if stream.ahead is not None:
                stream.ahead.frame_added(stream.state, index, frame)
        except DefectscopeError:
            raise
        except Exception as exc:
            raise incident(exc, f"gridding frame {index} of stream {stream.request.request_id}", log) from None
        stream.gridding_ms += (time.perf_counter() - t0) * 1e3
        stream.decode_ms += decode_ms

    def finish_stream(self, stream: "ScanStream") -> Outcome:
        """Classify a streamed scan once its last frame is in; every frame must have arrived."""
        received = stream.state.received
        if not received.all():
            missing = np.flatnonzero(~received)
            raise ShapeMismatch(f"stream ended with {len(missing)} of {len(received)} frames missing "
                                f"(first: {int(missing[0])})")
        ready = lookahead.answer(stream)
        if ready is not None:
            return ready
        intensity, box = _intensity(stream.request.spec), lookahead.kept_box(stream)
        return self._run(stream.request, lambda: self._scan_volume(stream.state, stream.gridding_ms, intensity, box=box),
                         stream.decode_ms, prior_ms=stream.gridding_ms)

    def look_ahead(self, stream: "ScanStream") -> bool:
        """Answer a streamed scan from its frames so far, for ``finish_stream`` to give if no frame still to
        come changes what the answer read (``server.lookahead``); True if an answer was made."""
        return lookahead.look_ahead(self, stream)

    def _run(self, request: Request, volumes, decode_ms: float, prior_ms: float = 0.0) -> Outcome:
        """``volumes()`` -> prepare -> infer -> reply. ``prior_ms``: work done before this call (gridding of
        a streamed scan's frames as they arrived), counted in ``total``."""
        if self.overlap:
            done = self._guarded(request, lambda: self._overlapped(request, volumes, decode_ms, prior_ms))
            if isinstance(done, Outcome):
                return done
            staged = done  # not a single map: prepared in order
        else:
            staged = self._stage(request, volumes, decode_ms, prior_ms)
        probabilities, ood = self._guarded(request, lambda: self._infer(staged.prepared, staged.timings))
        return self._reply(staged, probabilities, ood)

    def _overlapped(self, request: Request, volumes, decode_ms: float, prior_ms: float):
        """One map: the oversampling estimate runs in a helper thread while the window is centred and the
        model infers on it; when the estimate asks for no resampling (the common case) that inference is
        the answer, identical to the serial one (``Preparation``); otherwise the map is resampled and
        inferred again. Other inputs return a ``_Staged`` prepared in order."""
        t0 = time.perf_counter()
        timings = {"decode": round(decode_ms, 3), "orthonormalise": 0.0}
        vols, kw, warnings, timings["orthonormalise"] = volumes()
        if len(vols) != 1 or "scan" in kw:
            prepared, warnings_per, reports, timings["prepare"], variants = self._prepare(vols, kw)
            return _Staged(request, prepared, warnings, warnings_per, reports, timings, t0, prior_ms, variants)
        t1 = time.perf_counter()
        preparation = Preparation(vols[0], self.predictor.pipeline, limits=self.limits, **kw)
        estimate = self._estimator().submit(preparation.estimate)
        try:
            unresampled = preparation.centre_unresampled()
            probabilities, ood = self._infer(unresampled.array[np.newaxis], timings)
        finally:
            per_axis, overall = estimate.result()  # never leave it running behind a failure
        prepared = preparation.finish(per_axis, overall, unresampled)
        if any(f != 1.0 for f in prepared.report["resample_factor"]):
            probabilities, ood = self._infer(prepared.array[np.newaxis], timings)
        variants = preparation.sampling_variants(per_axis) if self.sampling_check else ((), None)
        timings["prepare"] = (time.perf_counter() - t1) * 1e3 - timings["infer"]
        staged = _Staged(request, prepared.array[np.newaxis], warnings, [prepared.warnings], [prepared.report],
                         timings, t0, prior_ms, [variants])
        return self._reply(staged, probabilities, ood)

    def _estimator(self) -> concurrent.futures.ThreadPoolExecutor:
        return self.estimators.get()

    def classify_many(self, items: list[tuple[Request, float]]) -> list:
        """Single-map requests ``(request, decode_ms)`` prepared one by one and inferred in one ONNX Runtime
        call; a list of ``Outcome`` or ``DefectscopeError`` (one bad map fails only its own request).
        Each reply's ``infer`` is the shared call's time and ``batched`` the number of maps in it."""
        staged, results = [], [None] * len(items)
        for k, (request, decode_ms) in enumerate(items):
            try:
                staged.append((k, self._stage(request, lambda r=request: self._volumes(r), decode_ms)))
            except DefectscopeError as exc:
                results[k] = exc
        if staged:
            timings = {}
            try:
                probabilities, ood = self._guarded(
                    staged[0][1].request, lambda: self._infer(np.concatenate([s.prepared for _, s in staged]), timings))
            except DefectscopeError as exc:
                for k, _ in staged:
                    results[k] = exc
                return results
            for row, (k, s) in enumerate(staged):
                s.timings.update(infer=timings["infer"], batched=len(staged))
                results[k] = self._reply(s, probabilities[row : row + 1], None if ood is None else ood[row : row + 1])
        return results

    def _guarded(self, request: Request, step):
        """Run a step; anything but a DefectscopeError becomes INTERNAL (a bug fails one request)."""
        try:
            return step()
        except DefectscopeError:
            raise
        except MemoryError:
            raise Internal("out of memory while classifying") from None
        except Exception as exc:
            raise incident(exc, f"classifying request {request.request_id}", log) from None

    def _stage(self, request: Request, volumes, decode_ms: float, prior_ms: float = 0.0) -> "_Staged":
        t0 = time.perf_counter()
        timings = {"decode": round(decode_ms, 3), "orthonormalise": 0.0}

        def run():
            vols, kw, warnings, timings["orthonormalise"] = volumes()
            prepared, warnings_per, reports, timings["prepare"], variants = self._prepare(vols, kw)
            return prepared, warnings, warnings_per, reports, variants

        prepared, warnings, warnings_per, reports, variants = self._guarded(request, run)
        return _Staged(request, prepared, warnings, warnings_per, reports, timings, t0, prior_ms, variants)

    def _infer(self, prepared: np.ndarray, timings: dict) -> tuple[np.ndarray, np.ndarray | None]:
        t1 = time.perf_counter()  # probabilities and the OOD score (None when the model has none), one call
        probabilities, ood = self.predictor.run(prepared)
        timings["infer"] = (time.perf_counter() - t1) * 1e3
        if not np.all(np.isfinite(probabilities)):
            raise Internal("the model returned non-finite probabilities")
        return probabilities, ood

    def _reply(self, staged: "_Staged", probabilities: np.ndarray, ood: np.ndarray | None = None) -> Outcome:
        if any(v is not None for _, v in staged.variants):
            probabilities = check_sampling(self.predictor, staged, probabilities, self._guarded)
        if self.cross_check is not None:
            check_models(self.predictor, self.cross_check, staged, probabilities, self._guarded)
        check_ood(self.predictor, staged, ood)
        request, prepared, timings = staged.request, staged.prepared, staged.timings
        timings["total"] = timings["decode"] + staged.prior_ms + (time.perf_counter() - staged.t0) * 1e3
        batch = request.kind == "map" and request.array is not None and request.array.ndim == 4
        classes = list(self.predictor.classes)
        labels = [classes[int(i)] for i in np.argmax(probabilities, axis=1)]
        warnings, warnings_per, reports = staged.warnings, staged.warnings_per, staged.reports
        reply = {
            "protocol": PROTOCOL,
            "request_id": request.request_id,
            "ok": True,
            "model": self.predictor.describe(),
            "provider": self.predictor.provider,
            "classes": classes,
            "probabilities": [[round(float(v), 7) for v in row] for row in probabilities] if batch
            else [round(float(v), 7) for v in probabilities[0]],
            "label": labels if batch else labels[0],
            "timings_ms": {k: round(v, 3) for k, v in timings.items()},
            "warnings": warnings + [w for ws in warnings_per for w in ws] if not batch
            else warnings + [dict(w, index=i) for i, ws in enumerate(warnings_per) for w in ws],
            "preparation": reports if batch else reports[0],
            **decisions(self.predictor, probabilities, warnings, warnings_per, batch),
        }
        frames = []
        if request.options.get("return_prepared"):
            reply["prepared"] = {"shape": list(prepared.shape if batch else prepared.shape[1:]), "dtype": "<f4"}
            frames.append(np.ascontiguousarray(prepared, dtype="<f4").tobytes())
        return Outcome(reply, frames)

    # -- steps ------------------------------------------------------------------------------------
    def _volumes(self, request: Request):
        """Maps to prepare, the keyword arguments for ``prepare``, warnings, orthonormalisation ms."""
        spec = request.spec
        if request.kind == "map":
            volumes = request.array if request.array.ndim == 4 else request.array[np.newaxis]
            kw = dict(axes=tuple(spec["axes"]), q_direction=spec.get("q_direction"), voxel_size=spec.get("voxel_size"),
                      intensity=_intensity(spec))
            return volumes, kw, [], 0.0
        if request.kind == "scan":
            frames = request.array if request.array is not None else request.frames
            return self._from_scan(frames, spec["geometry"], request.mask, _intensity(spec))
        return self._from_file(request)

    def _from_scan(self, frames, geometry: dict, mask, intensity: str = "counts"):
        n_frames = len(frames)
        frame_shape = tuple(frames[0].shape)
        geom = geometry_from_dict(geometry, n_frames=n_frames, frame_shape=frame_shape)
        t0 = time.perf_counter()
        if intensity == "amplitude":  # gridding sums intensities: square each frame first
            frames = [_frame_intensity(f, intensity) for f in frames]
        state = self.orthonormaliser.accumulate(frames, geom, mask=mask)
        return self._scan_volume(state, (time.perf_counter() - t0) * 1e3, intensity)

    def scan_window(self) -> int:
        """Voxels per axis of the box cut around the peak of a gridded scan (Orthonormaliser.finish_window):
        what the preparation reads of a map in the trained range (the window and its centring margins,
        ``source_extent`` at factor 1); with the sampling check, whose variants read further, 1.5x the
        model's window (a resampling factor down to 0.83). A map that needs more is re-cut larger
        (``_prepare_scan``)."""
        shape = self.predictor.pipeline.shape
        if not self.sampling_check:
            return int(source_extent(shape, 1.0).max())
        return int(math.ceil(1.5 * max(shape)))

    def _scan_volume(self, state, gridding_ms: float, intensity: str = "counts", ahead: bool = False, box=None):
        """Volumes, prepare() arguments, warnings and orthonormalisation ms of a gridded scan; only a box
        around the peak is made (the prepared map is the one of the whole grid, see ``_prepare_scan``).
        ``intensity``: of the frames as sent (an amplitude scan's frames were squared before gridding).
        ``ahead``: a stream still arriving, boxes cut as they will be once complete; ``box``: the first box,
        already made (``server.lookahead``)."""
        t0 = time.perf_counter()
        if box is None:
            qmap, where = self.orthonormaliser.finish_window(state, self.scan_window(), close=False, dtype=np.float32,
                                                             complete=ahead)
            box = (qmap.volume, qmap.voxel_size, where)
        volume, voxel_size, where = box
        ms = gridding_ms + (time.perf_counter() - t0) * 1e3
        kw = dict(axes=CANONICAL_AXES, voxel_size=[float(v) for v in voxel_size],
                  intensity="relative" if intensity == "amplitude" else intensity, scan=(state, where, ahead))
        return volume[np.newaxis], kw, [], ms

    def _prepare_scan(self, volume, kw):
        state, where, ahead = kw.pop("scan")
        return prepare_scan(self.orthonormaliser, state, where, volume, kw, self.predictor.pipeline,
                            limits=self.limits, sampling_check=self.sampling_check, ahead=ahead)

    def load_file(self, request: Request) -> None:
        """Read a ``file`` request's data into the request (``array``; ``mask`` too for a scan), once: what
        is classified, and what a replay's digest covers (``results.request_digest``), is what was read."""
        if request.array is not None:
            return
        spec = request.spec
        fh, name = open_data_file(self.data_root, spec["path"])
        with fh:  # opened once: the loaders read this file and never the path again
            if spec.get("geometry") is not None:
                request.array, _, request.mask = load_hdf5_scan(fh, spec.get("dataset"), limits=self.limits, name=name)
                return
            volume = load_map(fh, spec.get("dataset"), limits=self.limits, name=name)
        if volume.ndim != 3:
            raise BadMessage(f"file {spec['path']!r} holds an array of shape {volume.shape}, expected one 3D map")
        request.array = volume

    def _from_file(self, request: Request):
        self.load_file(request)
        spec = request.spec
        if spec.get("geometry") is not None:
            return self._from_scan(request.array, spec["geometry"], request.mask, _intensity(spec))
        kw = dict(axes=tuple(spec.get("axes") or CANONICAL_AXES), q_direction=spec.get("q_direction"),
                  voxel_size=spec.get("voxel_size"), intensity=_intensity(spec))
        return request.array[np.newaxis], kw, [], 0.0

    def _prepare(self, volumes: np.ndarray, kw: dict):
        t0 = time.perf_counter()
        if "scan" in kw:  # one gridded scan, prepared from its box (re-cut if the resampling needs more)
            each = [self._prepare_scan(volume, dict(kw)) for volume in volumes]
        else:
            each = prepare_each(volumes, self.predictor.pipeline, limits=self.limits, name_the_map=len(volumes) > 1,
                                sampling_check=self.sampling_check, **kw)
        return (np.stack([p.array for p in each]), [p.warnings for p in each], [p.report for p in each],
                (time.perf_counter() - t0) * 1e3, [(p.variant_oversampling, p.variants) for p in each])
