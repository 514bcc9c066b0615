"""A replayed reply is true of the model serving now and of the bytes sent now: after a reload, a restart on
another model, or a file rewritten in place, a retried request id is classified afresh."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.model.fixture import build_fixture_model
from defectscope.model.predictor import Predictor
from defectscope.server.client import Client
from defectscope.server.core import Classifier
from defectscope.server.results import ResultsLog, read_results
from defectscope.server.zmq_server import Server

from conftest import bragg_map

TOKEN = "a-reload-token-of-some-length"


@pytest.fixture(scope="module")
def two_class(tmp_path_factory):
    return build_fixture_model(tmp_path_factory.mktemp("m") / "two.onnx", classes=("defect_free", "defective"),
                               version="fixture-2class", seed=5)


@pytest.fixture
def serve(tmp_path):
    """Factory: a server on ``model`` with the results log at ``tmp_path/results.h5``; stopped at teardown."""
    running = []

    def make(model, **kw):
        results = ResultsLog(tmp_path / "results.h5")
        server = Server(Classifier(Predictor(model, provider="cpu"), data_root=tmp_path / "data"),
                        "tcp://127.0.0.1:*", results=results, **kw).start()
        running.append((server, results))
        return server

    def stop():
        while running:
            server, results = running.pop()
            server.stop(drain=False)
            results.close()

    make.stop = stop
    (tmp_path / "data").mkdir()
    yield make
    stop()


def test_retry_after_reload_is_answered_by_the_new_model(serve, fixture_model, two_class, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    server = serve(fixture_model, reload_token_file=str(token))
    volume = bragg_map(seed=11)
    with Client(server.endpoint, timeout_s=60, retries=0) as c:
        first = c.classify(volume, request_id="scan-1")
        assert c.classify(volume, request_id="scan-1")["replayed"] is True  # same model: replayed
        assert c.reload(TOKEN, str(two_class))["ok"]
        retry = c.classify(volume, request_id="scan-1")
        assert "replayed" not in retry
        assert retry["classes"] == ["defect_free", "defective"] and first["classes"] != retry["classes"]
        assert retry["model"]["version"] == "fixture-2class"
        assert c.classify(volume, request_id="scan-1")["replayed"] is True  # now replayed as the new model's


def test_retry_after_restart_on_another_model_is_classified_afresh(serve, fixture_model, two_class, tmp_path):
    volume = bragg_map(seed=12)
    server = serve(fixture_model)
    with Client(server.endpoint, timeout_s=60, retries=0) as c:
        first = c.classify(volume, request_id="scan-2")
    serve.stop()
    server = serve(two_class)  # the same results file, read back at start
    with Client(server.endpoint, timeout_s=60, retries=0) as c:
        retry = c.classify(volume, request_id="scan-2")
    assert "replayed" not in retry and retry["classes"] != first["classes"]
    serve.stop()
    server = serve(fixture_model)  # back on the first model: the id's last answer is the 2-class one
    with Client(server.endpoint, timeout_s=60, retries=0) as c:
        again = c.classify(volume, request_id="scan-2")
    assert "replayed" not in again and again["probabilities"] == first["probabilities"]


def test_file_rewritten_in_place_is_classified_afresh(serve, fixture_model, tmp_path):
    server = serve(fixture_model)
    path = tmp_path / "data" / "map.npy"
    np.save(path, bragg_map(seed=13))
    with Client(server.endpoint, timeout_s=60, retries=0) as c:
        first = c.classify_file("map.npy", request_id="file-1")
        assert c.classify_file("map.npy", request_id="file-1")["replayed"] is True  # same bytes
        np.save(path, bragg_map(seed=14, centre=(28.0, 36.0, 31.0)))  # same name and size, other content
        retry = c.classify_file("map.npy", request_id="file-1")
        assert "replayed" not in retry and retry["probabilities"] != first["probabilities"]
    rows = read_results(tmp_path / "results.h5")
    assert [r["replayed"] for r in rows] == [False, True, False]
    assert rows[0]["request_digest"] != rows[2]["request_digest"]


def test_file_scan_is_replayed_only_for_the_same_bytes(serve, fixture_model, tmp_path):
    import h5py

    from test_orthonormalise import make_synthetic

    geometry, frames, _ = make_synthetic()
    path = tmp_path / "data" / "scan.h5"
    with h5py.File(path, "w") as f:
        f["data"] = frames
    server = serve(fixture_model)
    with Client(server.endpoint, timeout_s=60, retries=0) as c:
        c.classify_file("scan.h5", "data", geometry=geometry.to_dict(), request_id="s-1")
        assert c.classify_file("scan.h5", "data", geometry=geometry.to_dict(), request_id="s-1")["replayed"]
        with h5py.File(path, "r+") as f:
            f["data"][3, 10, 10] += 1000
        assert "replayed" not in c.classify_file("scan.h5", "data", geometry=geometry.to_dict(), request_id="s-1")
