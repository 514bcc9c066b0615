"""Shared fixtures: the fixture ONNX model, a real server on a random loopback port, measured data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sync import gated

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="run slow tests (full-size physics, soaks)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test, run with --slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        for item in items:  # soaks run for an hour: they get a ceiling of their own, not the default one
            if "slow" in item.keywords and item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(3 * 3600))
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"measured data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fixture_model(tmp_path_factory) -> Path:
    from defectscope.model.fixture import build_fixture_model

    return build_fixture_model(tmp_path_factory.mktemp("models") / "fixture-3class.onnx")


@pytest.fixture(scope="session")
def predictor(fixture_model):
    from defectscope.model.predictor import Predictor

    return Predictor(fixture_model, provider="cpu")


@pytest.fixture
def make_server(predictor):
    """Factory: a started server bound to a random loopback port; stopped at teardown."""
    from defectscope.preprocessing.config import Limits
    from defectscope.server.core import Classifier
    from defectscope.server.zmq_server import Server

    servers, gates = [], []

    def make(limits: Limits | None = None, data_root=None, workers: int = 1, gate=None, drain_s: float = 5,
             **server_options):
        """``gate`` (``sync.Gate``): every classification waits at it before the real one runs, so a test can
        hold the worker; opened at teardown. ``server_options``: more ``Server`` keywords (``batch_max``)."""
        cls = Classifier if gate is None else gated(Classifier, gate)
        classifier = cls(predictor, limits=limits or Limits(), data_root=data_root)
        server = Server(classifier, "tcp://127.0.0.1:*", workers=workers, drain_s=drain_s, **server_options).start()
        servers.append(server)
        if gate is not None:
            gates.append(gate)
        return server

    yield make
    for g in gates:  # no worker left waiting for a test that has ended
        g.open()
    for s in servers:
        s.stop(drain=False)


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture
def client(server):
    from defectscope.server.client import Client

    with Client(server.endpoint, timeout_s=10, retries=0) as c:
        yield c


def bragg_map(shape=(64, 64, 64), centre=(30.3, 34.1, 29.2), size=(11.0, 8.0, 6.0), peak=1e5, seed=0,
              noise=True) -> np.ndarray:
    """An asymmetric synthetic Bragg peak: |FT of an off-centre ellipsoidal crystal|^2 with Poisson noise.

    The crystal is an ellipsoid with unequal axes and a wedge cut off, so no transpose or flip of the
    map leaves it unchanged (symmetric test volumes hide axis mistakes).
    """
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    r = sum((g / s) ** 2 for g, s in zip(grids, size))
    obj = ((r <= 1.0) & (grids[0] + 0.6 * grids[1] < size[0] * 0.7)).astype(float)
    amp = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(obj)))
    intensity = np.abs(amp) ** 2
    shift = [int(round(c - n / 2)) for c, n in zip(centre, shape)]
    intensity = np.roll(intensity, shift, axis=(0, 1, 2))
    intensity *= peak / intensity.max()
    if noise:
        intensity = rng.poisson(intensity).astype(np.float64)
    return intensity.astype(np.float32)


@pytest.fixture
def asym_map():
    return bragg_map()
