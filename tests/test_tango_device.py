"""The Tango device ``DefectClassifier`` (SPEC §5) through ``DeviceTestContext(..., process=True)``.

No Tango database is needed here (the test context runs the device server with a file database); the
real-database test is ``test_tango_integration.py``. Each context is a real device server process, so
contexts are shared per module where the tests do not change the device, and kept few.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import bragg_map
from sync import HANG_S, FileGate, wait_until

if os.environ.get("CI", "").lower() == "true":
    import tango  # in CI a missing PyTango is a failure, not a skip
else:
    tango = pytest.importorskip("tango", reason="PyTango is not installed (pip install -e '.[test]')")
from tango import DevState  # noqa: E402
from tango.server import device_property  # noqa: E402
from tango.test_context import DeviceTestContext, get_server_port_via_pid  # noqa: E402

from defectscope.server.tango_device import BUSY_WAIT_S, DefectClassifier  # noqa: E402

AXES = ["q_par", "q_perp1", "q_perp2"]


# -- helpers (also used by test_tango_integration) ---------------------------------------------------
def wait_settled(proxy, timeout_s: float = HANG_S):
    """The state once the model load is over (not INIT); the timeout only bounds a hang."""
    seen = []  # DevState.ON is 0, false: return the state itself, not the predicate's value

    def settled():
        seen.append(proxy.state())
        return seen[-1] != DevState.INIT

    wait_until(settled, timeout_s, lambda: f"the model load over; status: {proxy.status()}", interval=0.05)
    return seen[-1]


def refusal(call) -> tango.DevError:
    """The first DevError of the DevFailed a command raised (its reason is the SPEC §4 reason)."""
    with pytest.raises(tango.DevFailed) as info:
        call()
    return info.value.args[0]


class EventLog:
    """Change events of some attributes, collected from a subscription."""

    def __init__(self, proxy, names):
        self.proxy, self.values, self.errors = proxy, {n: [] for n in names}, []
        self._cond = threading.Condition()
        self.ids = [proxy.subscribe_event(n, tango.EventType.CHANGE_EVENT, self._push) for n in names]

    def _push(self, event):
        with self._cond:
            if event.err:
                self.errors.append(event.errors)
            else:
                name = event.attr_name.split("#")[0].rsplit("/", 1)[-1].lower()  # drops "#dbase=no"
                self.values[name].append(event.attr_value.value)
            self._cond.notify_all()

    def wait(self, counts: dict, timeout_s: float = HANG_S):
        with self._cond:
            ok = self._cond.wait_for(lambda: all(len(self.values[n]) >= c for n, c in counts.items()), timeout_s)
        assert ok, f"events expected {counts}, got { {n: len(v) for n, v in self.values.items()} } errors {self.errors}"

    def close(self):
        for i in self.ids:
            self.proxy.unsubscribe_event(i)


def write_model(path, nodes, initializers, *, version: str, out_shape=("batch", 3)):
    """An ONNX model with defectscope metadata (as model.fixture writes), for a graph given as nodes."""
    import onnx
    from onnx import TensorProto, helper

    from defectscope.model.metadata import CARD_KEY, INPUT_NAME, OUTPUT_NAME, PIPELINE_KEY
    from defectscope.preprocessing.config import PipelineConfig

    graph = helper.make_graph(
        nodes, f"defectscope_{version}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 64, 64, 64, 1])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, list(out_shape))],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    card = {"name": "defectscope-test", "version": version, "classes": ["defect_free", "screw", "edge"]}
    for key, value in ((PIPELINE_KEY, PipelineConfig().to_json()), (CARD_KEY, json.dumps(card))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def nan_model(path):
    """A valid model whose output is NaN: the core must fail that request (INTERNAL), not the device."""
    from onnx import numpy_helper
    from onnx import helper

    w = np.full((1, 3), np.nan, dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["cxdp"], ["m"], axes=[1, 2, 3, 4], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "one"], ["m2"]),
        helper.make_node("MatMul", ["m2", "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    return write_model(path, nodes, [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([1], np.int64), "one")],
                       version="nan-1")


def device_server_command(instance: str, *extra: str) -> list[str]:
    """``DefectClassifier INSTANCE ...``: the installed executable (SPEC §6), else the module."""
    exe = Path(sys.executable).parent / "DefectClassifier"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "defectscope.server.tango_device"]
    return [*head, instance, *extra]


def wait_for_device(proxy_name: str, proc: subprocess.Popen, timeout_s: float = 60.0):
    """A proxy to a device served by ``proc`` once it answers and its model load is over."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"device server exited with {proc.returncode}"
        try:
            proxy = tango.DeviceProxy(proxy_name)
            proxy.ping()
            wait_settled(proxy, max(1.0, deadline - time.monotonic()))
            return proxy
        except tango.DevFailed:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def stream_then_kill_9(proxy, proc, results_file, n_before_kill: int = 25) -> None:
    """Classify a stream of maps, kill -9 the server mid-stream, check every reply received is logged."""
    from defectscope.server.results import read_results

    received, stop = [], threading.Event()
    amap = bragg_map(seed=21).ravel()

    def stream():
        while not stop.is_set():
            try:
                received.append(json.loads(proxy.ClassifyMap(amap))["request_id"])
            except tango.DevFailed:  # the server died under us: that request got no reply
                return

    worker = threading.Thread(target=stream)
    worker.start()
    try:
        wait_until(lambda: len(received) >= n_before_kill or not worker.is_alive(), HANG_S,
                   lambda: f"{n_before_kill} replies (got {len(received)})")
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # while requests are in flight
    proc.wait(10)
    stop.set()
    worker.join(30)
    assert len(received) >= n_before_kill
    logged = {r["request_id"] for r in read_results(results_file)}
    assert set(received) <= logged, f"replies sent but not logged: {set(received) - logged}"


class GatedDefectClassifier(DefectClassifier):
    """The real device, with gates a test opens by creating a file in the ``GateDir`` property's directory:
    ``load`` (the model load waits there before the real load runs) and ``classify`` (each classification
    waits there before the real one runs). Synchronisation only: the real load and classification still run."""

    GateDir = device_property(dtype=str, default_value="", doc="directory of the test's gate files")

    def _build_classifier(self, config):
        assert self.GateDir, "GatedDefectClassifier needs its GateDir property"
        FileGate(Path(self.GateDir, "load")).passing()
        classifier = super()._build_classifier(config)
        gate, real = FileGate(Path(self.GateDir, "classify")), classifier.classify

        def classify(*args, **kwargs):
            gate.passing()
            return real(*args, **kwargs)

        classifier.classify = classify
        return classifier


SCAN_GEOMETRY = {"direct_beam": [300.0, 290.0], "angles": {"chi": 90.0, "phi": -5.0, "delta": 32.174, "gamma": 12.6346},
                 "rocking": {"motor": "theta", "start_deg": 0.1, "step_deg": 0.004}}


def scan_frames():
    """Detector frames of a synthetic rocking scan (34-ID-C geometry, as in test_scan_end_to_end)."""
    peak = bragg_map(shape=(24, 40, 48), centre=(12.3, 19.6, 25.2), size=(5, 4, 3), peak=2e4, noise=False)
    return np.random.default_rng(4).poisson(peak + 0.2).astype("<u4")


# -- the data files ClassifyFile is tested with ------------------------------------------------------
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_root")
    outside = tmp_path_factory.mktemp("outside")
    amap = bragg_map(seed=3)
    with h5py.File(root / "map.h5", "w") as f:
        f["entry/data/data"] = amap
    np.save(root / "map.npy", amap)
    np.save(root / "amplitude.npy", np.sqrt(amap / amap.max()))  # as phase-retrieval tools store a map
    with h5py.File(outside / "secret.h5", "w") as f:
        f["data"] = amap
    (root / "escape.h5").symlink_to(outside / "secret.h5")
    (root / "sub").mkdir()
    (root / "sub" / "alias.h5").symlink_to(root / "map.h5")  # a symlink that stays inside is fine
    with h5py.File(root / "extlink.h5", "w") as f:
        f["entry/data"] = h5py.ExternalLink(str(outside / "secret.h5"), "/data")
    with h5py.File(root / "softext.h5", "w") as f:  # the external link hides behind a soft link
        f["real/data"] = h5py.ExternalLink(str(outside / "secret.h5"), "/data")
        f["entry"] = h5py.SoftLink("/real")
    layout = h5py.VirtualLayout(shape=amap.shape, dtype=amap.dtype)
    layout[...] = h5py.VirtualSource(str(outside / "secret.h5"), "data", shape=amap.shape)
    with h5py.File(root / "vds.h5", "w", libver="latest") as f:
        f.create_virtual_dataset("data", layout)
    amap.tofile(outside / "raw.bin")
    with h5py.File(root / "extstore.h5", "w") as f:
        f.create_dataset("data", shape=amap.shape, dtype=amap.dtype, external=[(str(outside / "raw.bin"), 0, amap.nbytes)])
    with h5py.File(root / "complex.h5", "w") as f:
        f["data"] = amap.astype(np.complex64)
    with h5py.File(root / "huge.h5", "w") as f:  # claims 300^3 voxels, stores none: refused from the header
        f.create_dataset("data", shape=(300, 300, 300), dtype="<f4", chunks=(32, 32, 32))
    with h5py.File(root / "flat.h5", "w") as f:
        f["data"] = amap[0]
    with h5py.File(root / "scan.h5", "w") as f:  # a raw rocking scan: detector frames, geometry sent apart
        f["entry/instrument/detector/data"] = scan_frames()
    return root, outside, amap


@pytest.fixture(scope="module")
def results_path(tmp_path_factory):
    return tmp_path_factory.mktemp("results") / "tango-results.h5"


@pytest.fixture(scope="module")
def device(fixture_model, data_root, results_path):
    """One ON device for the tests that do not change it: fixture model, a data root, a results log."""
    props = {"ModelPath": str(fixture_model), "Provider": "cpu", "DataRoot": str(data_root[0]),
             "ResultsFile": str(results_path), "GeometryPreset": "aps-34idc"}
    with DeviceTestContext(DefectClassifier, properties=props, process=True, timeout=30) as proxy:
        assert wait_settled(proxy) == DevState.ON, proxy.status()
        yield proxy


# -- state and attributes ----------------------------------------------------------------------------
def test_ready_device_is_on_and_status_names_model_and_provider(device):
    assert device.state() == DevState.ON
    status = device.status()
    assert "Ready" in status and "defectscope-fixture" in status and "CPUExecutionProvider" in status
    assert device.classes == ("defect_free", "screw", "edge")
    assert device.model_version == "defectscope-fixture fixture-1"
    assert device.provider == "CPUExecutionProvider"


def test_classify_map_reply_and_attributes(device):
    amap = bragg_map(seed=7)
    before = device.requests_total
    reply = json.loads(device.ClassifyMap(amap.ravel()))
    assert reply["ok"] is True and reply["protocol"] == "defectscope/1"
    assert reply["classes"] == ["defect_free", "screw", "edge"]
    assert abs(sum(reply["probabilities"]) - 1) < 1e-5
    assert reply["label"] == reply["classes"][int(np.argmax(reply["probabilities"]))]
    np.testing.assert_allclose(device.probabilities, reply["probabilities"], rtol=0, atol=1e-7)
    assert device.label == reply["label"]
    assert device.last_request_id == reply["request_id"] and reply["request_id"].startswith("tango-")
    assert device.last_latency_ms == pytest.approx(reply["timings_ms"]["total"])
    assert device.requests_total == before + 1
    assert json.loads(device.last_reply) == reply
    assert device.state() == DevState.ON


def test_classify_file_map_and_symlink_inside_root(device, data_root):
    _, _, amap = data_root
    by_h5 = json.loads(device.ClassifyFile(json.dumps({"path": "map.h5", "dataset": "/entry/data/data",
                                                       "request_id": "scan-0054"})))
    assert by_h5["ok"] and by_h5["request_id"] == "scan-0054"
    by_npy = json.loads(device.ClassifyFile(json.dumps({"path": "map.npy", "kind": "map"})))
    by_alias = json.loads(device.ClassifyFile(json.dumps({"path": "sub/alias.h5", "dataset": "entry/data/data"})))
    by_map = json.loads(device.ClassifyMap(amap.ravel()))
    assert by_h5["probabilities"] == by_npy["probabilities"] == by_alias["probabilities"] == by_map["probabilities"]


def test_classify_file_intensity(device):
    """ClassifyFile's JSON takes input.intensity: an amplitude map gives the answer of its counts, with the
    RELATIVE_INTENSITY warning; sent as counts it is refused LOW_SIGNAL naming the option."""
    by_counts = json.loads(device.ClassifyFile(json.dumps({"path": "map.npy"})))
    by_amplitude = json.loads(device.ClassifyFile(json.dumps({"path": "amplitude.npy", "intensity": "amplitude"})))
    np.testing.assert_allclose(by_amplitude["probabilities"], by_counts["probabilities"], atol=1e-5)
    assert "RELATIVE_INTENSITY" in [w["reason"] for w in by_amplitude["warnings"]]
    error = refusal(lambda: device.ClassifyFile(json.dumps({"path": "amplitude.npy"})))
    assert error.reason == "LOW_SIGNAL" and "amplitude" in error.desc


def test_classify_file_raw_scan_with_the_device_preset_equals_zeromq_scan(device, make_server):
    """A raw rocking scan from a file: GeometryPreset fills in the preset; same answer as a ZeroMQ 'scan'."""
    from defectscope.server.client import Client

    reply = json.loads(device.ClassifyFile(json.dumps({"path": "scan.h5", "dataset": "entry/instrument/detector/data",
                                                       "kind": "scan", "geometry": SCAN_GEOMETRY})))
    assert reply["ok"] and reply["timings_ms"]["orthonormalise"] > 0
    with Client(make_server().endpoint, timeout_s=30, retries=0) as client:
        by_zmq = client.classify_scan(scan_frames(), {**SCAN_GEOMETRY, "preset": "aps-34idc"})
    assert reply["probabilities"] == by_zmq["probabilities"]
    # The sampling the device saw, per axis, and the crystal extent it implies (a scan has its voxel size).
    prep = reply["preparation"]
    assert list(device.oversampling) == pytest.approx(prep["oversampling_per_axis"])
    assert len(prep["crystal_extent_nm"]) == 3 and all(e > 0 for e in prep["crystal_extent_nm"])
    assert list(device.crystal_extent_nm) == pytest.approx(prep["crystal_extent_nm"])
    assert list(device.oversampling_confidence) == prep["oversampling_confidence"]
    assert device.decision == reply["decision"] and device.verdict == reply["verdict"]
    assert list(device.warnings) == [w["reason"] for w in reply["warnings"]]


def test_commands_answer_inside_the_tango_timeout(device):
    """A classification answers a client that keeps Tango's default timeout (3 s): the client itself is
    the clock (a late answer raises its timeout DevFailed); no bound of this test's own on the time."""
    client = tango.DeviceProxy(device.dev_name())
    assert client.get_timeout_millis() == 3000  # what an operator's client waits
    amap = bragg_map(seed=8).ravel()
    for _ in range(10):
        assert json.loads(client.ClassifyMap(amap))["ok"]


def test_change_events_after_every_classification(device):
    events = EventLog(device, ["probabilities", "label"])
    try:
        events.wait({"probabilities": 1, "label": 1})  # the value at subscription
        amap = bragg_map(seed=9).ravel()
        first = json.loads(device.ClassifyMap(amap))
        events.wait({"probabilities": 2, "label": 2})
        np.testing.assert_allclose(events.values["probabilities"][1], first["probabilities"], atol=1e-7)
        assert events.values["label"][1] == first["label"]
        # The same answer again is still an event: a client learns of every classification.
        device.ClassifyMap(amap)
        events.wait({"probabilities": 3, "label": 3})
        assert events.values["label"][2] == first["label"]
    finally:
        events.close()


# -- refusals: every SPEC §4 reason a Tango command can meet ------------------------------------------
def _file(**args):
    return ("ClassifyFile", json.dumps(args))


REFUSALS = [
    ("BAD_MESSAGE", ("ClassifyFile", "not json")),
    ("BAD_MESSAGE", ("ClassifyFile", "[1, 2]")),
    ("BAD_MESSAGE", _file(path="map.h5", colour="red")),
    ("BAD_MESSAGE", _file(path="map.h5", dataset="/entry/nothing")),
    ("BAD_MESSAGE", _file(path="map.h5", kind="movie")),
    ("BAD_MESSAGE", _file(path="map.h5", kind="map", geometry={"preset": "aps-34idc"})),
    ("DTYPE_NOT_ALLOWED", _file(path="complex.h5", dataset="data")),
    ("SHAPE_MISMATCH", ("ClassifyMap", np.ones(1001, np.float32))),
    ("SHAPE_MISMATCH", ("ClassifyMap", np.ones(0, np.float32))),
    ("SHAPE_MISMATCH", _file(path="flat.h5", dataset="data")),
    ("TOO_LARGE", _file(path="huge.h5", dataset="data")),
    ("NON_FINITE", ("ClassifyMap", np.where(np.arange(32**3) == 77, np.nan, 50.0).astype(np.float32))),
    ("LOW_SIGNAL", ("ClassifyMap", np.zeros(32**3, np.float32))),
    ("BAD_GEOMETRY", _file(path="scan.h5", dataset="entry/instrument/detector/data", kind="scan",
                           geometry={**SCAN_GEOMETRY, "preset": "no-such-beamline"})),
    ("BAD_GEOMETRY", _file(path="scan.h5", dataset="entry/instrument/detector/data", kind="scan",
                           geometry={**SCAN_GEOMETRY, "energy_eV": 9.0})),  # keV sent as eV
    ("BAD_GEOMETRY", _file(path="scan.h5", dataset="entry/instrument/detector/data", kind="scan",
                           geometry="aps-34idc")),
    ("PATH_NOT_ALLOWED", _file(path="missing.h5")),
    ("PATH_NOT_ALLOWED", _file(path="sub/../map.h5")),
    ("PATH_NOT_ALLOWED", _file(path="escape.h5", dataset="data")),
    ("PATH_NOT_ALLOWED", _file(path="extlink.h5", dataset="entry/data")),
    ("PATH_NOT_ALLOWED", _file(path="softext.h5", dataset="entry/data")),
    ("PATH_NOT_ALLOWED", _file(path="vds.h5", dataset="data")),
    ("PATH_NOT_ALLOWED", _file(path="extstore.h5", dataset="data")),
]


@pytest.mark.parametrize("reason, call", REFUSALS, ids=[f"{r}-{i}" for i, (r, _) in enumerate(REFUSALS)])
def test_refusal_is_devfailed_with_the_protocol_reason(device, reason, call):
    failed = device.requests_failed
    error = refusal(lambda: device.command_inout(*call))
    assert error.reason == reason, error.desc
    assert error.desc and error.origin == f"DefectClassifier.{call[0]}"
    assert device.requests_failed == failed + 1
    assert device.state() == DevState.ON  # one bad request fails alone


def test_paths_outside_the_data_root_are_refused(device, data_root):
    root, outside, _ = data_root
    secret = outside / "secret.h5"
    for path in (str(secret), os.path.relpath(secret, root)):
        error = refusal(lambda: device.ClassifyFile(json.dumps({"path": path, "dataset": "data"})))
        assert error.reason == "PATH_NOT_ALLOWED", (path, error.desc)


# -- results log, read while the device runs ---------------------------------------------------------
def test_results_log_has_a_row_per_reply_readable_while_running(device, results_path):
    from defectscope.server.results import read_results

    reply = json.loads(device.ClassifyMap(bragg_map(seed=12).ravel()))
    rows = read_results(results_path)  # SWMR read, the device keeps the file open for writing
    assert len(rows) == device.requests_total
    last = rows[-1]
    assert last["request_id"] == reply["request_id"] and last["ok"] and last["server"] == "tango"
    assert last["probabilities"] == pytest.approx(reply["probabilities"], abs=1e-7)
    assert last["source"] == "map [64, 64, 64] <f4"
    assert last["model_version"] == "fixture-1" and last["provider"] == "CPUExecutionProvider"
    reasons = {r["error_reason"] for r in rows if not r["ok"]}
    assert {"PATH_NOT_ALLOWED", "SHAPE_MISMATCH", "BAD_MESSAGE"} <= reasons


# -- the same map through Tango and through ZeroMQ ---------------------------------------------------
def test_same_probabilities_through_tango_and_zeromq(device, make_server, data_root):
    from defectscope.server.client import Client

    root, _, _ = data_root
    server = make_server(data_root=root)  # the same fixture model file (session fixture)
    amap = bragg_map(seed=11)
    with Client(server.endpoint, timeout_s=10, retries=0) as client:
        by_zmq = client.classify(amap, axes=AXES)
        file_zmq = client.classify_file("map.h5", "entry/data/data")
    by_tango = json.loads(device.ClassifyMap(amap.ravel()))
    file_tango = json.loads(device.ClassifyFile(json.dumps({"path": "map.h5", "dataset": "entry/data/data"})))
    assert by_tango["model"] == by_zmq["model"]
    assert by_tango["probabilities"] == by_zmq["probabilities"]
    assert by_tango["label"] == by_zmq["label"]
    assert by_tango["preparation"] == by_zmq["preparation"]
    assert file_tango["probabilities"] == file_zmq["probabilities"]


# -- state machine -----------------------------------------------------------------------------------
def test_missing_model_is_fault_then_fixed_and_init_is_on(tmp_path, fixture_model):
    model = tmp_path / "model.onnx"
    with DeviceTestContext(DefectClassifier, properties={"ModelPath": str(model), "Provider": "cpu"},
                           process=True, timeout=30) as proxy:
        assert wait_settled(proxy) == DevState.FAULT
        status = proxy.status()
        assert "MODEL_UNAVAILABLE" in status and str(model) in status and "does not exist" in status
        for call in (lambda: proxy.ClassifyMap(bragg_map().ravel()),
                     lambda: proxy.ClassifyFile(json.dumps({"path": "map.h5"}))):
            error = refusal(call)
            assert error.reason == "MODEL_UNAVAILABLE" and "does not exist" in error.desc
        assert proxy.classes == () and proxy.model_version == "" and proxy.requests_failed == 2

        shutil.copy(fixture_model, model)  # the operator puts the model in place
        proxy.Init()
        assert wait_settled(proxy) == DevState.ON, proxy.status()
        good = json.loads(proxy.ClassifyMap(bragg_map().ravel()))
        assert good["ok"]
        # No DataRoot: ClassifyFile is off. No GeometryPreset: a scan must bring its geometry.
        error = refusal(lambda: proxy.ClassifyFile(json.dumps({"path": "map.h5"})))
        assert error.reason == "PATH_NOT_ALLOWED" and "disabled" in error.desc
        error = refusal(lambda: proxy.ClassifyFile(json.dumps({"path": "scan.h5", "kind": "scan"})))
        assert error.reason == "BAD_GEOMETRY" and "GeometryPreset" in error.desc

        # A failed Reload keeps the model in use serving (and the device ON).
        model.write_bytes(b"this is not an ONNX model")
        error = refusal(proxy.Reload)
        assert error.reason == "MODEL_UNAVAILABLE" and "previous model keeps serving" in error.desc
        assert proxy.state() == DevState.ON and proxy.model_version == "defectscope-fixture fixture-1"
        assert "Last Reload failed" in proxy.status()
        assert json.loads(proxy.ClassifyMap(bragg_map().ravel()))["probabilities"] == good["probabilities"]

        # Reload picks up a new model; one that answers NaN fails each request with INTERNAL, not the device.
        nan_model(model)
        proxy.Reload()
        assert proxy.model_version == "defectscope-test nan-1" and "Last Reload failed" not in proxy.status()
        error = refusal(lambda: proxy.ClassifyMap(bragg_map().ravel()))
        assert error.reason == "INTERNAL" and "non-finite" in error.desc
        assert proxy.state() == DevState.ON


def test_bad_provider_property_is_fault_and_says_why(fixture_model):
    with DeviceTestContext(DefectClassifier, properties={"ModelPath": str(fixture_model), "Provider": "quantum"},
                           process=True, timeout=30) as proxy:
        assert wait_settled(proxy) == DevState.FAULT
        assert "Provider" in proxy.status() and "quantum" in proxy.status()


def test_cuda_without_gpu_and_config_problems_are_alarm(fixture_model, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime sees CUDA here: asking for it is not degraded")
    props = {"ModelPath": str(fixture_model), "Provider": "cuda", "GeometryPreset": "no-such-beamline",
             "DataRoot": str(tmp_path / "absent")}
    with DeviceTestContext(DefectClassifier, properties=props, process=True, timeout=30) as proxy:
        assert wait_settled(proxy) == DevState.ALARM
        status = proxy.status()
        assert "degraded" in status and "'cuda'" in status and "CPUExecutionProvider" in status
        assert "no-such-beamline" in status and "DataRoot" in status
        assert proxy.provider == "CPUExecutionProvider"
        reply = json.loads(proxy.ClassifyMap(bragg_map().ravel()))  # degraded still classifies
        assert reply["ok"] and reply["provider"] == "CPUExecutionProvider"
        assert proxy.state() == DevState.ALARM


def test_model_load_init_running_and_busy(tmp_path, fixture_model):
    """INIT while the model loads (Init does not wait for it), RUNNING while classifying, BUSY rather than
    a client timeout. The load, then the first classification, are held at gates (``GatedDefectClassifier``)
    until the test has seen each state, so each is observed, not hoped for from a model made slow."""
    gates = tmp_path / "gates"
    gates.mkdir()
    props = {"ModelPath": str(fixture_model), "Provider": "cpu", "GateDir": str(gates)}
    with DeviceTestContext(GatedDefectClassifier, properties=props, process=True, timeout=30) as proxy:
        assert proxy.state() == DevState.INIT  # the load is held; Init did not wait for it
        error = refusal(lambda: proxy.ClassifyMap(bragg_map().ravel()))
        assert error.reason == "BUSY" and "loading" in error.desc
        (gates / "load").touch()
        assert wait_settled(proxy) == DevState.ON, proxy.status()

        first: dict = {}
        slow = tango.DeviceProxy(proxy.dev_name())
        slow.set_timeout_millis(HANG_S * 1000)
        worker = threading.Thread(target=lambda: first.update(json.loads(slow.ClassifyMap(bragg_map().ravel()))))
        worker.start()
        try:
            # State answers during a classification (NO_SYNC): the held one shows as RUNNING.
            wait_until(lambda: proxy.state() == DevState.RUNNING, what="RUNNING during the held classification",
                       interval=0.02)
            # A second classification waits BUSY_WAIT_S for the running one, then is refused BUSY: well inside
            # the timeout of a Tango client (3 s by default). The client here waits far longer, so that a
            # device that waited for the running classification instead would fail on the reason, not the clock.
            impatient = tango.DeviceProxy(proxy.dev_name())
            assert BUSY_WAIT_S * 1000 < impatient.get_timeout_millis() == 3000
            impatient.set_timeout_millis(HANG_S * 1000)
            t0 = time.perf_counter()
            error = refusal(lambda: impatient.ClassifyMap(bragg_map(seed=2).ravel()))
            waited = time.perf_counter() - t0
            assert error.reason == "BUSY" and f"waited {BUSY_WAIT_S} s" in error.desc, error.desc
            assert waited >= 0.9 * BUSY_WAIT_S, waited  # it did wait for the running one (a lower bound)
            assert proxy.state() == DevState.RUNNING  # the first is still held
        finally:
            (gates / "classify").touch()
            worker.join(HANG_S)
        assert first.get("ok") is True
        assert proxy.state() == DevState.ON


def test_device_server_killed_with_9_keeps_every_sent_reply(fixture_model, tmp_path):
    """SPEC §7 through the real ``DefectClassifier`` executable (file database, no Tango DB needed)."""
    results = tmp_path / "killed.h5"
    db = tmp_path / "tango.db"
    db.write_text("DefectClassifier/kill/DEVICE/DefectClassifier: test/defectscope/kill\n")
    tango.Database(str(db)).put_device_property(
        "test/defectscope/kill", {"ModelPath": str(fixture_model), "Provider": "cpu", "ResultsFile": str(results)})
    # Port 0: the ORB binds a port the OS picks (no bind-release-reuse race); it is read from the process.
    proc = subprocess.Popen(device_server_command("kill", "-ORBendPoint", "giop:tcp:127.0.0.1:0", f"-file={db}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = get_server_port_via_pid(proc.pid, "127.0.0.1", retries=int(HANG_S / 0.03))
        proxy = wait_for_device(f"tango://127.0.0.1:{port}/test/defectscope/kill#dbase=no", proc)
        assert proxy.state() == DevState.ON, proxy.status()
        stream_then_kill_9(proxy, proc, results)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
