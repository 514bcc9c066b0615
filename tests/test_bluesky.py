"""The bluesky callback (issue #20, item 2): a real RunEngine scans an ophyd simulated rocking motor and a
simulated 2-D detector whose frames are a real rocking scan, against a real server."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from bluesky import RunEngine  # bluesky and ophyd: in [test], so a missing one fails here, not skips
from bluesky.plans import scan
from defectscope.server.bluesky import ClassifyCallback, RunNotClassified
from defectscope.server.client import Client
from ophyd.sim import NumpySeqHandler, SynAxis, SynSignal, SynSignalWithRegistry
from test_orthonormalise import make_synthetic


@pytest.fixture(scope="module")
def synthetic():
    geometry, frames, _ = make_synthetic()
    return geometry, frames


class Beamline:
    """The rocking motor (``theta``, the preset's) and a detector that reads the frame measured at the
    motor's position: frame k at ``start + k * step``."""

    def __init__(self, geometry, frames, fail_at: int | None = None, save_path=None):
        self.start, self.step = geometry.rocking_start_deg, geometry.rocking_step_deg
        self.frames = frames
        self.fail_at = fail_at
        self.motor = SynAxis(name=geometry.rocking_motor)
        self.motor.set(self.start).wait(5)  # SynSignal reads once when made: frame 0
        if save_path is None:
            self.det = SynSignal(func=self._read, name="det")
        else:  # an area detector writing files: the events hold datum ids, the frames are in .npy files
            self.det = SynSignalWithRegistry(func=self._read, name="det", save_path=str(save_path))

    def _read(self):
        k = round((self.motor.position - self.start) / self.step)
        if k == self.fail_at:
            raise RuntimeError(f"detector fault at frame {k}")
        return self.frames[k].copy()

    def scan(self, n=None):
        n = len(self.frames) if n is None else n
        return scan([self.det], self.motor, self.start, self.start + (n - 1) * self.step, n)


class Documents:
    def __init__(self):
        self.names = []
        self.stop = None

    def __call__(self, name, doc):
        self.names.append(name)
        if name == "stop":
            self.stop = doc


@pytest.fixture
def cb_client(server):
    with Client(server.endpoint, timeout_s=30, retries=0) as c:
        yield c


def assert_same_answer(got, want):
    assert got["ok"] and want["ok"]
    assert got["label"] == want["label"]
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=0, atol=1e-6)


def test_a_scan_in_the_run_engine_is_classified_as_the_whole_scan(server, client, cb_client, synthetic, caplog):
    geometry, frames = synthetic
    beamline = Beamline(geometry, frames)
    seen = []
    cb = ClassifyCallback(cb_client, geometry.to_dict(), detector_field="det",
                          on_result=lambda uid, reply: seen.append((uid, reply)))
    docs = Documents()
    answers = []

    def plan():  # the answer is the plan's to use once the run is over
        uid = yield from beamline.scan()
        answers.append((uid, cb.results[uid]))

    RE = RunEngine({})
    with caplog.at_level(logging.INFO, logger="defectscope.server.bluesky"):
        (uid,) = RE(plan(), [docs, cb])
    want = client.classify_scan(frames, geometry.to_dict())

    assert docs.names[0] == "start" and docs.names[-1] == "stop"
    assert docs.names.count("event") == len(frames)
    assert docs.stop["exit_status"] == "success" and docs.stop["num_events"] == {"primary": len(frames)}
    assert cb.errors == {}
    assert list(cb.results) == [uid] and cb.last is cb.results[uid]
    assert_same_answer(cb.results[uid], want)
    assert cb.results[uid]["request_id"] == f"bluesky-{uid}"
    assert answers == [(uid, cb.results[uid])] and seen == [(uid, cb.results[uid])]
    assert cb.wait(uid, timeout=0) is cb.results[uid]
    assert any(uid in r.getMessage() and want["label"] in r.getMessage() for r in caplog.records)


def test_the_rocking_start_and_step_come_from_the_motor(server, client, cb_client, synthetic):
    """A geometry without rocking start/step: filled from the scanned motor's first two readings, and the
    answer is that of the whole scan with its true geometry."""
    geometry, frames = synthetic
    beamline = Beamline(geometry, frames)
    partial = geometry.to_dict()
    partial["rocking"] = {"motor": geometry.rocking_motor}
    cb = ClassifyCallback(cb_client, partial, detector_field="det")  # rocking_motor: the run's only motor
    RE = RunEngine({})
    (uid,) = RE(beamline.scan(), cb)
    assert cb.errors == {}
    assert_same_answer(cb.results[uid], client.classify_scan(frames, geometry.to_dict()))



def test_frames_stored_in_files_are_loaded_with_the_handler_registry(server, client, cb_client, synthetic,
                                                                     tmp_path):
    geometry, frames = synthetic
    beamline = Beamline(geometry, frames, save_path=tmp_path)
    RE = RunEngine({})
    unfilled = ClassifyCallback(cb_client, geometry.to_dict(), detector_field="det")
    (uid,) = RE(beamline.scan(), unfilled)
    assert unfilled.results == {} and "give handler_registry" in str(unfilled.errors[uid])

    cb = ClassifyCallback(cb_client, geometry.to_dict(), detector_field="det",
                          handler_registry={"NPY_SEQ": NumpySeqHandler})
    (uid,) = RE(beamline.scan(), cb)
    assert cb.errors == {} and len(list(tmp_path.glob("*.npy"))) == 2 * len(frames)
    assert_same_answer(cb.results[uid], client.classify_scan(frames, geometry.to_dict()))


def test_an_aborted_run_is_an_error_and_the_next_run_is_classified(server, client, cb_client, synthetic):
    geometry, frames = synthetic
    failing = Beamline(geometry, frames, fail_at=10)
    failed = []
    cb = ClassifyCallback(cb_client, geometry.to_dict(), detector_field="det",
                          on_error=lambda uid, exc: failed.append((uid, exc)))
    docs = Documents()
    RE = RunEngine({})
    with pytest.raises(RuntimeError, match="detector fault at frame 10"):
        RE(failing.scan(), [docs, cb])
    assert docs.stop["exit_status"] == "fail"
    (bad,) = cb.errors
    assert bad == docs.stop["run_start"] and cb.results == {} and cb.last is None
    assert isinstance(cb.errors[bad], RunNotClassified) and "10 of 40 frames" in str(cb.errors[bad])
    assert failed == [(bad, cb.errors[bad])]
    with pytest.raises(RunNotClassified):
        cb.wait(bad, timeout=0)

    good = Beamline(geometry, frames)
    (uid,) = RE(good.scan(), cb)
    assert list(cb.results) == [uid] and list(cb.errors) == [bad]
    assert_same_answer(cb.results[uid], client.classify_scan(frames, geometry.to_dict()))


def test_a_server_error_is_stored_not_raised_into_the_run_engine(server, cb_client, synthetic):
    geometry, frames = synthetic
    beamline = Beamline(geometry, frames)
    cb = ClassifyCallback(cb_client, geometry.to_dict(), detector_field="det", model="no-such-model")
    docs = Documents()
    (uid,) = RunEngine({})(beamline.scan(), [docs, cb])
    assert docs.stop["exit_status"] == "success"
    assert cb.results == {} and uid in cb.errors
    with pytest.raises(Exception, match="no-such-model"):
        cb.wait(uid, timeout=0)


def test_a_run_without_a_frame_count_or_rocking_motor_is_refused_at_start(server, cb_client, synthetic):
    geometry, frames = synthetic
    beamline = Beamline(geometry, frames)
    partial = geometry.to_dict()
    del partial["rocking"]
    other = SynAxis(name="chi")
    from bluesky.plans import grid_scan

    cb = ClassifyCallback(cb_client, partial, detector_field="det")
    (uid,) = RunEngine({})(grid_scan([beamline.det], beamline.motor, beamline.start, beamline.start + beamline.step,
                                     2, other, 0, 0, 1), cb)
    assert cb.results == {} and "rocking motor is not known" in str(cb.errors[uid])



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_remote_dispatcher_on_a_0mq_proxy_classifies_the_run(server, client, cb_client, synthetic):
    """The callback away from the RunEngine: RunEngine -> Publisher -> bluesky-0MQ-proxy (its own process)
    -> RemoteDispatcher -> callback."""
    from bluesky.callbacks.zmq import Publisher, RemoteDispatcher

    geometry, frames = synthetic
    beamline = Beamline(geometry, frames)
    in_address, out_address = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    script = Path(sys.executable).with_name("bluesky-0MQ-proxy")
    proxy = subprocess.Popen([str(script), "--in-address", in_address, "--out-address", out_address],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dispatcher = RemoteDispatcher(out_address)
    cb = ClassifyCallback(cb_client, geometry.to_dict(), detector_field="det")
    heard = threading.Event()
    dispatcher.subscribe(lambda name, doc: heard.set())
    dispatcher.subscribe(cb)

    def dispatch():
        try:
            dispatcher.start()
        except asyncio.CancelledError:
            pass

    dispatcher_thread = threading.Thread(target=dispatch, daemon=True)
    dispatcher_thread.start()
    publisher = Publisher(in_address)
    try:
        # PUB/SUB drops what is sent before both connections are up: a stop document of no run (which the
        # callback ignores) until one arrives.
        while not heard.wait(0.05):
            assert proxy.poll() is None, proxy.stderr.read().decode()
            publisher("stop", {"uid": "handshake", "run_start": "handshake", "time": 0.0, "exit_status": "success"})
        RE = RunEngine({})
        RE.subscribe(publisher)
        (uid,) = RE(beamline.scan())
        reply = cb.wait(uid, timeout=30)  # the dispatcher runs behind the RunEngine
    finally:
        publisher.close()
        if dispatcher._task is not None:  # started (it has dispatched the handshake)
            dispatcher.loop.call_soon_threadsafe(dispatcher._task.cancel)
            dispatcher_thread.join(10)
        proxy.terminate()
        proxy.wait(10)
        proxy.stderr.close()
    assert not dispatcher_thread.is_alive()
    assert cb.errors == {} and cb.last is reply and list(cb.results) == [uid]
    assert_same_answer(reply, client.classify_scan(frames, geometry.to_dict()))


def test_the_deployed_profile_startup_classifies_every_run(server, client, synthetic, tmp_path, monkeypatch):
    """deploy/bluesky/50-defectscope.py, run as IPython runs a profile's startup file (in the session's
    namespace, after RE exists), subscribes a callback that classifies the session's runs."""
    import json
    import runpy

    geometry, frames = synthetic
    (tmp_path / "geometry.json").write_text(json.dumps(geometry.to_dict()))
    monkeypatch.setenv("DEFECTSCOPE_SERVER", server.endpoint)
    monkeypatch.setenv("DEFECTSCOPE_GEOMETRY", str(tmp_path / "geometry.json"))
    monkeypatch.setenv("DEFECTSCOPE_DETECTOR_FIELD", "det")
    RE = RunEngine({})
    session = runpy.run_path(str(Path(__file__).resolve().parents[1] / "deploy" / "bluesky" / "50-defectscope.py"),
                             init_globals={"RE": RE})
    try:
        beamline = Beamline(geometry, frames)
        (uid,) = RE(beamline.scan())
        assert_same_answer(session["defectscope_cb"].wait(uid, timeout=60), client.classify_scan(frames, geometry.to_dict()))
    finally:
        session["defectscope_client"].close()
