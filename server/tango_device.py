"""Tango device server ``DefectClassifier`` (SPEC §5): a thin adapter over ``server.core.Classifier``.

Commands make the same ``server.job.Job`` the ZeroMQ protocol makes (with ``map_job``/``file_job``: no wire
headers) and hand it to the same ``Classifier``; a refusal is the ``DefectscopeError``
of the core, re-thrown as a ``DevFailed`` whose reason is the SPEC §4 reason. Nothing is prepared or
predicted here, so a map gives the same probabilities through Tango and through ZeroMQ.

Threading, and why it is not Tango's default: the server runs with ``SerialModel.NO_SYNC`` so that reading
``State``/attributes does not wait behind a running classification (a GUI polling ``State`` would otherwise
never see ``RUNNING``, and would freeze for the length of every command). The device serialises what needs
it itself: one classification at a time (a second waits up to ``BUSY_WAIT_S`` then gets ``BUSY``, well
inside the 3 s client timeout), and ``Init`` waits for a running classification before tearing down.

The model is loaded in a background thread (state ``INIT``): creating a CUDA session and warming up a 3-D
CNN can take longer than the 3 s a Tango client waits for ``Init``. ``Reload`` loads the new model beside
the one in use and swaps only on success (a failed reload keeps the old model serving).
"""

from __future__ import annotations

import os

# Before numpy loads: the preparation's small matrix products run in BLAS, and a multi-threaded OpenBLAS
# spin-waits for cores that ONNX Runtime or a busy machine hold - measured here, a 128^3 map took 1-4 s
# instead of 25 ms. The device server is a program of its own: one BLAS thread unless the operator sets one.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import logging
import sys
import threading

import tango
from tango.server import Device, attribute, command, device_property

from defectscope.preprocessing.config import Limits
from defectscope.preprocessing.orthonormalise import Orthonormaliser
from defectscope.server.core import Classifier, Stats
from defectscope.server.results import ResultsLog
from defectscope.server.tango_support import (  # noqa: F401 (BUSY_WAIT_S: the tests and clients read it here)
    BUSY_WAIT_S, MAX_CLASSES, RELOAD_WAIT_S, TEARDOWN_WAIT_S, DeviceLogic, LastResult,
)

log = logging.getLogger(__name__)


class DefectClassifier(DeviceLogic, Device):
    """Classifies 3-D Bragg coherent diffraction maps as defect_free / screw / edge (defectscope)."""

    ModelPath = device_property(dtype=str, default_value="",
                                doc="ONNX model file or bundled model name; empty: the bundled 3-class model")
    Provider = device_property(dtype=str, default_value="auto", doc="ONNX Runtime execution provider: auto | cpu | cuda")
    DataRoot = device_property(dtype=str, default_value="",
                               doc="directory ClassifyFile may read (resolved, no escape); empty: ClassifyFile disabled")
    ResultsFile = device_property(dtype=str, default_value="", doc="HDF5 results log, one row per reply; empty: none")
    GeometryPreset = device_property(dtype=str, default_value="",
                                     doc="beamline preset for ClassifyFile scans without one (aps-34idc, esrf-id01, ...)")

    # -- life cycle ---------------------------------------------------------------------------------
    def init_device(self):
        """Never raises: every problem becomes FAULT (no model) or ALARM (degraded), with Status saying why."""
        self._load_gate = getattr(self, "_load_gate", None) or threading.Lock()  # one Reload at a time
        self._work = getattr(self, "_work", None) or threading.Lock()
        self._generation = getattr(self, "_generation", 0) + 1
        self._classifier: Classifier | None = None
        self._results: ResultsLog | None = None
        self._loading = False
        self._running = False
        self._fault = ""
        self._reload_error = ""
        self._notes: list[str] = []
        self._stats = Stats()
        self._last = LastResult()
        self._limits = Limits()
        self._orthonormaliser = Orthonormaliser(limits=self._limits)
        try:
            super().init_device()  # reads the properties
            for name in ("ModelPath", "Provider", "DataRoot", "ResultsFile", "GeometryPreset"):
                setattr(self, name, (getattr(self, name) or "").strip())  # a stray space typed in Jive
            tango.Util.instance().set_serial_model(tango.SerialModel.NO_SYNC)
            self.set_change_event("probabilities", True, False)
            self.set_change_event("label", True, False)
            self._notes = self._check_config()
            self._open_results()
            self._begin_load(self._model_config(), reload=False)
        except Exception as exc:  # a bug here must still leave a device that says what happened
            log.exception("init_device failed")
            self._fault = f"initialisation failed: {type(exc).__name__}: {exc}"
            self._loading = False
        self._refresh_state()

    def delete_device(self):
        self._generation += 1  # a model load still running belongs to the old life: its result is dropped
        got = self._work.acquire(timeout=TEARDOWN_WAIT_S)
        try:
            self._classifier = None
            if self._results is not None:
                self._results.close()
                self._results = None
        finally:
            if got:
                self._work.release()

    # -- commands -----------------------------------------------------------------------------------
    @command(dtype_in=str, dtype_out=str,
             doc_in='JSON {"path", "dataset", "kind": "map"|"scan", "geometry", "intensity": "counts"|"relative"|'
                    '"amplitude", "request_id"}; path relative to DataRoot',
             doc_out="JSON reply of protocol defectscope/1 (probabilities, label, timings_ms, warnings)")
    def ClassifyFile(self, argin: str) -> str:
        return self._classify("ClassifyFile", lambda: self._file_request(argin))

    @command(dtype_in="DevVarFloatArray", dtype_out=str,
             doc_in="n^3 intensities of one map, C order, canonical frame (axis 0 along Q)",
             doc_out="JSON reply of protocol defectscope/1")
    def ClassifyMap(self, argin) -> str:
        return self._classify("ClassifyMap", lambda: self._map_request(argin))

    @command(doc_in="re-read ModelPath and Provider and load that model; on failure the model in use keeps serving")
    def Reload(self):
        with self._load_gate:
            if self._loading:
                tango.Except.throw_exception("BUSY", "a model is already loading; try again shortly",
                                             "DefectClassifier.Reload")
            keep = {name: getattr(self, name) for name in ("DataRoot", "ResultsFile", "GeometryPreset")}
            self.get_device_properties()  # ModelPath/Provider as the database holds them now
            for name, value in keep.items():  # the others change with Init only (they are in use)
                setattr(self, name, value)
            self.ModelPath, self.Provider = (self.ModelPath or "").strip(), (self.Provider or "").strip()
            done, outcome = self._begin_load(self._model_config(), reload=True)
        if done.wait(RELOAD_WAIT_S) and "error" in outcome:
            exc = outcome["error"]
            still = "; the previous model keeps serving" if self._classifier is not None else ""
            tango.Except.throw_exception(exc.reason, f"reload failed: {exc.message}{still}", "DefectClassifier.Reload")

    # -- attributes ---------------------------------------------------------------------------------
    @attribute(dtype=(float,), max_dim_x=MAX_CLASSES, doc="class probabilities of the last classification (order: classes)")
    def probabilities(self):
        return self._last.probabilities

    @attribute(dtype=str, doc="most probable class of the last classification")
    def label(self):
        return self._last.label

    @attribute(dtype=(str,), max_dim_x=MAX_CLASSES, doc="class names in the order of probabilities")
    def classes(self):
        c = self._classifier
        return list(c.predictor.classes) if c is not None else []

    @attribute(dtype=str, doc="name and version of the model in use")
    def model_version(self):
        c = self._classifier
        return "" if c is None else "{name} {version}".format(**c.predictor.describe())

    @attribute(dtype=str, doc="ONNX Runtime execution provider actually in use")
    def provider(self):
        c = self._classifier
        return "" if c is None else c.predictor.provider

    @attribute(dtype=float, unit="ms", doc="total time of the last classification (decode + prepare + infer)")
    def last_latency_ms(self):
        return self._last.latency_ms

    @attribute(dtype=int, doc="classification requests since Init (refused ones included)")
    def requests_total(self):
        return self._stats.requests_total

    @attribute(dtype=int, doc="refused or failed classification requests since Init")
    def requests_failed(self):
        return self._stats.requests_failed

    @attribute(dtype=str, doc="request id of the classification the probabilities/label attributes show")
    def last_request_id(self):
        return self._last.request_id

    @attribute(dtype=str, doc="the whole JSON reply of the last classification (warnings, timings, preparation)")
    def last_reply(self):
        return self._last.reply

    @attribute(dtype=(float,), max_dim_x=3, doc="oversampling per axis (q_par, q_perp1, q_perp2) of the last map")
    def oversampling(self):
        return self._last.oversampling

    @attribute(dtype=str, doc="confident or uncertain: the model's calibrated decision on the last answer (SPEC §4)")
    def decision(self):
        return self._last.decision

    @attribute(dtype=str, doc="the most specific confident answer: the label, 'defective' (character unclear) or 'uncertain'")
    def verdict(self):
        return self._last.verdict

    @attribute(dtype=(str,), max_dim_x=3,
               doc="confidence of the oversampling estimate per axis: high, low (under-sampled or irregular peak), none")
    def oversampling_confidence(self):
        return list(self._last.oversampling_confidence)

    @attribute(dtype=(float,), max_dim_x=3, unit="nm",
               doc="crystal extent per axis implied by the oversampling (empty when the voxel size is unknown)")
    def crystal_extent_nm(self):
        return self._last.crystal_extent_nm

    @attribute(dtype=(str,), max_dim_x=32, doc="warning reasons of the last classification (SPEC §4)")
    def warnings(self):
        return list(self._last.warnings)


def main(args=None):
    """``DefectClassifier INSTANCE [tango options]``: run the device server."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # run_server names the server after the class, not argv[0]: ``python -m`` registers the same way.
    return DefectClassifier.run_server(args=sys.argv[1:] if args is None else list(args))


if __name__ == "__main__":
    main()
