"""The EPICS PV Access bridge (``server.epics``): p4p servers started here play the IOCs - an areaDetector
(NTNDArray frames, ``cam1:Acquire``, ``cam1:NumImages_RBV``) and a motor IOC - and a real ``defectscope serve``
classifies. The result PVs, read back with a p4p client, must equal a direct classify of the same frames.

Everything PV Access does here stays on loopback: each server binds 127.0.0.1 on ports the OS chose, the
clients search those ports by unicast (no broadcast, no auto address list), and a restarted IOC announces
itself with beacons to the bridge's client, on 127.0.0.1. The environment's EPICS_* variables are not read
(``useenv=False``; the command-line test sets them for its subprocess)."""

from __future__ import annotations

import json
import re
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from p4p.client.thread import Context  # p4p: in [test], so a missing one fails here, not skips
from p4p.nt import NTEnum, NTNDArray, NTScalar
from p4p.server import Server
from p4p.server.thread import SharedPV

from defectscope.server.client import Client
from defectscope.server.epics import EpicsBridge
from defectscope.server.epics_config import BridgeConfig

from sync import HANG_S, reap, wait_until
from test_orthonormalise import make_synthetic

CLI = [sys.executable, "-m", "defectscope.server.cli"]
P = "TEST:"  # the detector IOC's prefix
PREFIX = "TEST:ds:"  # the bridge's result PVs


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_conf(tcp: int = 0, udp: int = 0, beacons_to: int | None = None) -> dict:
    """A PVA server on loopback only (ports 0: the OS chooses); beacons only to the bridge's client."""
    return {"EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_PVAS_SERVER_PORT": str(tcp),
            "EPICS_PVAS_BROADCAST_PORT": str(udp), "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
            "EPICS_PVAS_BEACON_ADDR_LIST": f"127.0.0.1:{beacons_to}" if beacons_to else "",
            "EPICS_PVAS_IGNORE_ADDR_LIST": ""}


def client_conf(*servers: dict, beacon_port: int | None = None) -> dict:
    """A PVA client that searches exactly these servers, by unicast on loopback."""
    return {"EPICS_PVA_ADDR_LIST": " ".join(f"127.0.0.1:{s['EPICS_PVAS_BROADCAST_PORT']}" for s in servers),
            "EPICS_PVA_AUTO_ADDR_LIST": "NO", "EPICS_PVA_BROADCAST_PORT": str(beacon_port or udp_port()),
            "EPICS_PVA_NAME_SERVERS": ""}


class Ioc:
    """A p4p server publishing ``pvs`` (name -> SharedPV) on loopback; ``restart()`` comes back on the same
    ports, as an IOC restarted on its host, and says so with a beacon."""

    def __init__(self, pvs: dict, beacon_port: int):
        self.pvs, self.beacon_port = pvs, beacon_port
        self.server = Server(providers=[pvs], conf=server_conf(beacons_to=beacon_port), useenv=False)
        self.conf = self.server.conf()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def restart(self) -> None:
        self.stop()
        self.server = Server(providers=[self.pvs], conf=server_conf(
            self.conf["EPICS_PVAS_SERVER_PORT"], self.conf["EPICS_PVAS_BROADCAST_PORT"], self.beacon_port),
            useenv=False)


class Detector:
    """An areaDetector as the bridge sees it: ``cam1:Acquire`` (a busy record: NTEnum over PVA),
    ``cam1:NumImages_RBV``, and ``Pva1:Image`` whose ``uniqueId`` counts the arrays, with the rocking motor's
    readback as the NDAttribute ``THETA`` when ``attribute`` is true."""

    CHOICES = ["Done", "Acquire"]

    def __init__(self, beacon_port: int, n_images: int):
        self.nt = NTNDArray()
        self.counter = 0
        self.image = SharedPV(initial=self._array(np.zeros((4, 4), np.int32), None))
        self.acquire = SharedPV(nt=NTEnum(), initial={"index": 0, "choices": self.CHOICES})
        self.num_images = SharedPV(nt=NTScalar("i"), initial=n_images)
        self.ioc = Ioc({P + "Pva1:Image": self.image, P + "cam1:Acquire": self.acquire,
                        P + "cam1:NumImages_RBV": self.num_images}, beacon_port)

    def _array(self, frame, theta):
        value = self.nt.wrap(frame, attrib={} if theta is None else {"THETA": float(theta)})
        value["uniqueId"] = self.counter
        return value

    def set_acquire(self, on: bool) -> None:
        self.acquire.post({"index": int(on), "choices": self.CHOICES})

    def publish(self, frame, theta=None, skip: int = 0) -> None:
        self.counter += 1 + skip
        self.image.post(self._array(np.ascontiguousarray(frame), theta))


class Beamline:
    """The detector IOC, a motor IOC (``m1.RBV``), the bridge's client and server settings, and a p4p client
    that reads the result PVs."""

    def __init__(self, n_images: int = 40):
        self.beacon_port = udp_port()
        self.detector = Detector(self.beacon_port, n_images)
        self.motor = SharedPV(nt=NTScalar("d"), initial=0.0)
        self.motor_ioc = Ioc({P + "m1.RBV": self.motor}, self.beacon_port)
        self.bridge_client_conf = client_conf(self.detector.ioc.conf, self.motor_ioc.conf, beacon_port=self.beacon_port)
        self.reader = None

    def config(self, **changes) -> BridgeConfig:
        d = dict(frames_pv=P + "Pva1:Image", motor_pv=P + "m1.RBV", acquire_pv=P + "cam1:Acquire",
                 num_images_pv=P + "cam1:NumImages_RBV", prefix=PREFIX, geometry=changes.pop("geometry"),
                 motor_attribute="THETA", frame_timeout_s=HANG_S)
        d.update(changes)
        return BridgeConfig(**d)

    def bridge(self, client, config: BridgeConfig) -> EpicsBridge:
        bridge = EpicsBridge(client, config, client_conf=self.bridge_client_conf, server_conf=server_conf(),
                             useenv=False).start()
        self.read_from(bridge.server_conf)
        self.wait_idle()
        return bridge

    def wait_idle(self) -> None:
        """Until the bridge is connected to every PV (its status then says ``idle``)."""
        wait_until(lambda: self.value("status") == "idle", HANG_S, lambda: f"idle (status {self.value('status')!r})",
                   interval=0.02)

    def read_from(self, conf: dict) -> None:
        self.reader = Context("pva", conf=client_conf(conf), useenv=False, nt=False)

    def get(self, name: str):
        return self.reader.get(PREFIX + name, timeout=HANG_S)

    def value(self, name: str):
        value = self.get(name).value
        return list(value) if isinstance(value, (list, np.ndarray)) else value

    def wait_scanning(self) -> None:
        wait_until(lambda: self.value("status").startswith("scanning"), HANG_S, "a scan started", interval=0.02)

    def wait_scans(self, n: int) -> None:
        wait_until(lambda: self.value("scans") >= n, HANG_S, f"{n} scans published", interval=0.02)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.detector.ioc.stop()
        self.motor_ioc.stop()


def run_scan(beamline: Beamline, bridge: EpicsBridge | None, frames, start: float, step: float, *,
             stop_after: int | None = None, attribute: bool = True) -> None:
    """Acquire rises; frame k is published with the motor at ``start + k * step``; acquire falls. Without
    the attribute the angle is the motor PV's value when the frame arrives, and the motor and the detector
    are two IOCs whose updates may overtake each other: each step waits until the bridge has seen it."""
    det = beamline.detector
    det.set_acquire(True)
    beamline.wait_scanning()  # the rise reached the bridge (frames of no scan are ignored)
    for k, frame in enumerate(frames[:stop_after]):
        theta = start + k * step
        if not attribute:  # the angle comes from the motor PV: the bridge has its new value first
            beamline.motor.post(theta)
            wait_until(lambda: bridge.motor_value == theta, HANG_S, f"the bridge saw the motor at {theta}")
        det.publish(frame, theta if attribute else None)
        if not attribute and k + 1 < len(frames):  # and the frame reached it before the motor moves on
            wait_until(lambda: beamline.value("status") == f"scanning {k + 1}/{len(frames)}", HANG_S,
                       f"the bridge got frame {k}", interval=0.002)
    det.set_acquire(False)


@pytest.fixture(scope="module")
def synthetic():
    geometry, frames, _ = make_synthetic()
    return geometry, frames


@pytest.fixture(scope="module")
def serve(fixture_model, tmp_path_factory):
    """A real ``defectscope serve`` process on a loopback port the OS chose (its log in a file: a pipe
    nobody reads would block it)."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*CLI, "serve", "--model", str(fixture_model), "--bind", "tcp://127.0.0.1:*"],
                                stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("defectscope serving on tcp://127.0.0.1:"), line + log_path.read_text()
        yield line.split()[3]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(HANG_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(HANG_S)
            proc.stdout.close()
        if "ERROR" in log_path.read_text():
            print(log_path.read_text()[-5000:])


@pytest.fixture(scope="module")
def direct(serve, synthetic):
    """The server's answer to the whole scan sent at once, with its true geometry."""
    geometry, frames = synthetic
    with Client(serve, timeout_s=HANG_S, retries=0) as c:
        return c.classify_scan(frames, geometry.to_dict())


@pytest.fixture
def client(serve):
    with Client(serve, timeout_s=HANG_S, retries=0) as c:
        yield c


@pytest.fixture
def beamline():
    b = Beamline()
    yield b
    b.close()


def assert_published(beamline: Beamline, want: dict, scans: int, failed: int = 0) -> None:
    """The result PVs hold ``want``, the answer of the same frames classified directly."""
    assert want["ok"]
    assert beamline.value("label") == want["label"]
    np.testing.assert_allclose(beamline.value("probabilities"), want["probabilities"], rtol=0, atol=1e-6)
    assert beamline.value("classes") == want["classes"]
    assert beamline.value("decision") == want.get("decision", "")
    assert beamline.value("model") == want["model"]["name"]
    assert beamline.value("model_version") == f"{want['model']['name']} {want['model']['version']}"
    assert beamline.value("provider") == want["provider"]
    assert beamline.value("warnings") == [f"{w['reason']}: {w['message']}" for w in want["warnings"]]
    reply = json.loads(beamline.value("reply"))
    assert beamline.value("last_latency_ms") == reply["timings_ms"]["total"] > 0
    assert reply["request_id"] == beamline.value("request_id") and reply["request_id"].startswith("epics-")
    assert beamline.value("error") == "" and beamline.value("status") == "classified"
    assert beamline.value("scans") == scans and beamline.value("scans_failed") == failed


def rocking_from_motor(geometry) -> dict:
    d = geometry.to_dict()
    d["rocking"] = {"motor": geometry.rocking_motor}  # start_deg / step_deg: from the frames' angles
    return d


def test_a_scan_is_published_as_the_direct_classify_of_its_frames(beamline, client, synthetic, direct):
    geometry, frames = synthetic
    with beamline.bridge(client, beamline.config(geometry=rocking_from_motor(geometry))) as bridge:
        assert beamline.value("scans") == 0 and beamline.value("label") == ""
        run_scan(beamline, bridge, frames, geometry.rocking_start_deg, geometry.rocking_step_deg)
        beamline.wait_scans(1)
        assert_published(beamline, direct, scans=1)
        (rid, reply), = bridge.results.items()
        assert json.loads(beamline.value("reply")) == reply and bridge.errors == {}
        assert beamline.get("status").alarm.severity == 0


def test_the_rocking_angles_come_from_the_motor_pv(beamline, client, synthetic, direct):
    """Frames without the NDAttribute: each frame's angle is the motor PV's value when it arrives."""
    geometry, frames = synthetic
    with beamline.bridge(client, beamline.config(geometry=rocking_from_motor(geometry))) as bridge:
        run_scan(beamline, bridge, frames, geometry.rocking_start_deg, geometry.rocking_step_deg, attribute=False)
        beamline.wait_scans(1)
        assert_published(beamline, direct, scans=1)


def wrong_shape(beamline, bridge, frames, start, step):
    bad = [*frames[:5], frames[5][:, :-1], *frames[6:]]
    run_scan(beamline, bridge, bad, start, step)
    return "SHAPE_MISMATCH: frame 5 is 48x55; this scan's frames are 48x56"


def ended_short(beamline, bridge, frames, start, step):
    run_scan(beamline, bridge, frames, start, step, stop_after=10)
    return "BAD_MESSAGE: acquisition ended after 10 of 40 frames"


def lost_frames(beamline, bridge, frames, start, step):
    det = beamline.detector
    det.set_acquire(True)
    beamline.wait_scanning()
    for k, frame in enumerate(frames):
        det.publish(frame, start + k * step, skip=2 if k == 7 else 0)
    det.set_acquire(False)
    return "BAD_MESSAGE: frames lost: uniqueId went from"


@pytest.mark.parametrize("bad_scan", [wrong_shape, ended_short, lost_frames], ids=lambda f: f.__name__)
def test_a_bad_scan_is_a_published_error_and_the_next_is_classified(beamline, client, synthetic, direct, bad_scan,
                                                                    caplog):
    geometry, frames = synthetic
    start, step = geometry.rocking_start_deg, geometry.rocking_step_deg
    config = beamline.config(geometry=rocking_from_motor(geometry), end_grace_s=0.05)
    with beamline.bridge(client, config) as bridge:
        why = bad_scan(beamline, bridge, frames, start, step)
        beamline.wait_scans(1)
        assert beamline.value("error").startswith(f"scan 1: {why}"), beamline.value("error")
        assert beamline.value("status") == "failed" and beamline.get("status").alarm.severity == 2
        assert beamline.value("scans_failed") == 1 and beamline.value("label") == ""
        assert any(why in r.getMessage() for r in caplog.records if r.name == "defectscope.server.epics")
        # The server's stream of the failed scan is closed at once, not held for stream_idle_s.
        wait_until(lambda: client.health()["streams"]["open"] == 0, HANG_S, "the server closed the stream")

        run_scan(beamline, bridge, frames, start, step)
        beamline.wait_scans(2)
        assert_published(beamline, direct, scans=2, failed=1)
        assert len(bridge.errors) == 1 and len(bridge.results) == 1


def test_a_missing_motor_fails_the_scan_and_the_next_is_classified(beamline, client, synthetic, direct):
    """The motor IOC is down when a scan starts (and the frames carry no angle): that scan is refused; the
    motor IOC comes back and the next scan is classified."""
    geometry, frames = synthetic
    start, step = geometry.rocking_start_deg, geometry.rocking_step_deg
    with beamline.bridge(client, beamline.config(geometry=rocking_from_motor(geometry), motor_attribute=None)) as bridge:
        beamline.motor_ioc.stop()
        wait_until(lambda: bridge.motor_value is None, HANG_S, "the bridge saw the motor IOC go")
        det = beamline.detector
        det.set_acquire(True)
        beamline.wait_scans(1)
        assert beamline.value("error") == f"scan 1: BAD_GEOMETRY: the rocking motor {P}m1.RBV is not connected: " \
                                          "no angle for the frames"
        for frame in frames:  # the refused scan's frames are not sent anywhere
            det.publish(frame)
        det.set_acquire(False)

        beamline.motor_ioc.restart()
        wait_until(lambda: bridge.motor_value is not None, HANG_S, "the bridge reconnected to the motor")
        run_scan(beamline, bridge, frames, start, step, attribute=False)
        beamline.wait_scans(2)
        assert_published(beamline, direct, scans=2, failed=1)


def test_a_dropped_connection_mid_scan_fails_the_scan_and_the_next_is_classified(beamline, client, synthetic,
                                                                                  direct):
    geometry, frames = synthetic
    start, step = geometry.rocking_start_deg, geometry.rocking_step_deg
    with beamline.bridge(client, beamline.config(geometry=rocking_from_motor(geometry))) as bridge:
        det = beamline.detector
        det.set_acquire(True)
        beamline.wait_scanning()
        for k in range(10):
            det.publish(frames[k], start + k * step)
        det.ioc.stop()  # the detector IOC goes away mid-scan
        beamline.wait_scans(1)
        assert beamline.value("error").startswith(f"scan 1: BAD_MESSAGE: {P}Pva1:Image disconnected")
        assert beamline.value("error").endswith("after 10 of 40 frames")
        wait_until(lambda: client.health()["streams"]["open"] == 0, HANG_S, "the server closed the stream")

        det.set_acquire(False)
        det.ioc.restart()  # on the same ports; its beacon brings the bridge back
        beamline.wait_idle()
        run_scan(beamline, bridge, frames, start, step)
        beamline.wait_scans(2)
        assert_published(beamline, direct, scans=2, failed=1)


def test_watch_epics_command(beamline, serve, synthetic, direct, tmp_path):
    """``defectscope watch epics`` as a process: PVA settings from the EPICS_* environment, the readiness line
    names the result PVs' ports, one scan is published, SIGTERM stops it cleanly."""
    geometry, frames = synthetic
    geometry_file = tmp_path / "geometry.json"
    geometry_file.write_text(json.dumps(rocking_from_motor(geometry)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    env.update(beamline.bridge_client_conf)
    env.update(server_conf())
    proc = subprocess.Popen([*CLI, "watch", "epics", "--frames", P + "Pva1:Image", "--motor", P + "m1.RBV",
                             "--acquire", P + "cam1:Acquire", "--num-images", P + "cam1:NumImages_RBV",
                             "--motor-attribute", "THETA", "--prefix", PREFIX, "--geometry", str(geometry_file),
                             "--server", serve], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"defectscope watching {P}Pva1:Image"), line + proc.stderr.read()
        words = line.split()
        beamline.read_from({"EPICS_PVAS_BROADCAST_PORT": words[words.index("udp") + 1]})
        beamline.wait_idle()
        run_scan(beamline, None, frames, geometry.rocking_start_deg, geometry.rocking_step_deg)
        beamline.wait_scans(1)
        assert_published(beamline, direct, scans=1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG_S) == 0
        assert "defectscope stopped" in proc.stdout.read()
    finally:
        reap(proc, HANG_S)


def test_watch_epics_refuses_an_incomplete_config_in_one_line(tmp_path):
    out = subprocess.run([*CLI, "watch", "epics", "--frames", "X:Image", "--motor", "X:m1.RBV", "--prefix", "X:ds:",
                          "--n-frames", "40"], capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "defectscope: error: BAD_MESSAGE: epics bridge config needs ['acquire_pv']"


def test_the_deployed_example_config_is_valid():
    """deploy/epics/34idc.toml, the configuration docs/epics.md shows, is one the bridge accepts."""
    from pathlib import Path

    from defectscope.preprocessing.config import read_config_file

    path = Path(__file__).resolve().parents[1] / "deploy" / "epics" / "34idc.toml"
    config = BridgeConfig.from_dict(read_config_file(path))
    assert config.prefix == "34idc:defectscope:" and config.motor_attribute == "THETA"
    assert config.geometry["rocking"] == {"motor": "theta"}


@pytest.mark.parametrize("change, message", [
    ({"frames_pv": "has space"}, "frames_pv must be a PV name"),
    ({"n_frames": 40}, "exactly one of num_images_pv"),
    ({"end_grace_s": 0}, "end_grace_s must be in (0, 3600]"),
    ({"colour": "blue"}, "unknown fields ['colour']"),
])
def test_a_bad_config_is_refused_at_start(change, message):
    d = dict(frames_pv="X:Image", motor_pv="X:m1.RBV", acquire_pv="X:Acquire", num_images_pv="X:NumImages_RBV",
             prefix="X:ds:")
    with pytest.raises(ValueError, match=re.escape(message)):
        BridgeConfig.from_dict({**d, **change})
