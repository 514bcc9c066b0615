"""The server's limits reach the orthonormaliser, and its cache of geometry mappings outlives a reload."""

from __future__ import annotations

import pytest

from defectscope.errors import TooLarge
from defectscope.model.fixture import build_fixture_model
from defectscope.model.predictor import Predictor
from defectscope.preprocessing.config import Limits, PipelineConfig
from defectscope.preprocessing.orthonormalise import Orthonormaliser
from defectscope.server.client import Client
from defectscope.server.core import Classifier
from defectscope.server.zmq_server import Server

from test_orthonormalise import make_synthetic

# The synthetic scan grids to 52 x 44 x 51 = 116 688 voxels: over this limit, under the default one.
SMALL = Limits(max_map_voxels=100_000)


@pytest.fixture(scope="module")
def scan():
    geometry, frames, _ = make_synthetic()
    return geometry.to_dict(), frames


@pytest.fixture(scope="module")
def small_predictor(tmp_path_factory):
    """A model on 32^3 maps, so that its own maps fit under ``SMALL``."""
    path = build_fixture_model(tmp_path_factory.mktemp("m") / "small.onnx", pipeline=PipelineConfig(shape=(32, 32, 32)))
    return Predictor(path, provider="cpu")


def test_server_limits_bound_the_scan_grid(small_predictor, scan):
    geometry, frames = scan
    classifier = Classifier(small_predictor, limits=SMALL)
    assert classifier.orthonormaliser.limits == SMALL
    server = Server(classifier, "tcp://127.0.0.1:*").start()
    try:
        with Client(server.endpoint, timeout_s=60, retries=0) as client:
            with pytest.raises(TooLarge, match="100000 voxels"):
                client.classify_scan(frames, geometry)
            with pytest.raises(TooLarge, match="100000 voxels"):
                client.classify_scan_stream(frames, geometry)
    finally:
        server.stop(drain=False)


def test_orthonormaliser_must_share_the_limits(predictor):
    with pytest.raises(ValueError, match="other limits"):
        Classifier(predictor, limits=SMALL, orthonormaliser=Orthonormaliser())


def test_mapping_cache_survives_a_reload(predictor, fixture_model, scan, tmp_path):
    geometry, frames = scan
    token = tmp_path / "token"
    token.write_text("a-reload-token-of-some-length")
    token.chmod(0o600)
    server = Server(Classifier(predictor), "tcp://127.0.0.1:*", reload_token_file=str(token)).start()
    try:
        with Client(server.endpoint, timeout_s=60, retries=0) as client:
            assert client.classify_scan(frames, geometry)["ok"]
            before = server.classifier.orthonormaliser
            assert before.cache_info().misses == 1
            assert client.reload("a-reload-token-of-some-length", str(fixture_model))["ok"]
            assert server.classifier.orthonormaliser is before
            assert client.classify_scan(frames, geometry)["ok"]
            info = server.classifier.orthonormaliser.cache_info()
            assert (info.hits, info.misses) == (1, 1)  # the mapping built before the reload was used again
    finally:
        server.stop(drain=False)
