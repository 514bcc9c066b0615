"""Several models served at once (SPEC §4 ``model``): a request names one, ``info`` lists them all, each
reply names the model that answered, and a reload of one keeps the others serving."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from defectscope.errors import ModelUnavailable
from defectscope.model.fixture import build_fixture_model
from defectscope.model.predictor import Predictor
from defectscope.server.client import Client
from defectscope.server.core import Classifier
from defectscope.server.zmq_server import Server

from conftest import bragg_map
from sync import HANG_S, wait_until

TOKEN = "a-reload-token-of-some-length"


@pytest.fixture(scope="module")
def two_class(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    return (build_fixture_model(folder / "two-1.onnx", classes=("defect_free", "defective"), version="2c-1", seed=4),
            build_fixture_model(folder / "two-2.onnx", classes=("defect_free", "defective"), version="2c-2", seed=5))


@pytest.fixture
def served(predictor, two_class, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    two = Predictor(two_class[0], provider="cpu")
    models = {"three": Classifier(predictor, cross_check=two), "two": Classifier(two, cross_check=predictor)}
    server = Server(models, "tcp://127.0.0.1:*", reload_token_file=str(token), batch_max=4).start()
    yield server
    server.stop(drain=False)


def test_requests_name_their_model(served):
    volume = bragg_map(seed=2)
    with Client(served.endpoint, timeout_s=60, retries=0) as c:
        default, three, two = c.classify(volume), c.classify(volume, model="three"), c.classify(volume, model="two")
        streamed = c.classify_scan_stream(np.zeros((2, 4, 4), np.uint16), {"preset": "aps-34idc"}, model="nope",
                                          raise_on_error=False)
        info, info_two = c.info(), c.info(model="two")
        with pytest.raises(ModelUnavailable, match="not served here; models: three, two"):
            c.classify(volume, model="nope")
    assert default["probabilities"] == three["probabilities"] and three["classes"] == ["defect_free", "screw", "edge"]
    assert two["classes"] == ["defect_free", "defective"] and two["model"]["version"] == "2c-1"
    assert three["preparation"]["cross_check"]["model"]["version"] == "2c-1"
    assert streamed["error"]["reason"] == "MODEL_UNAVAILABLE"
    assert list(info["models"]) == ["three", "two"] and info["models"]["three"]["default"]
    assert info["models"]["two"]["classes"] == ["defect_free", "defective"] and info["models"]["two"]["card"]
    assert info_two["classes"] == ["defect_free", "defective"]


def test_a_reload_of_one_model_keeps_the_other_serving(served, two_class):
    """The 2-class model is reloaded (held mid-load until the 3-class one has answered more requests) while
    a client keeps asking the 3-class one: every request is answered by it, none fails."""
    reloader = served._reloader
    real_load, loading, release = reloader.load, threading.Event(), threading.Event()

    def held_load(model, old):
        loading.set()
        assert release.wait(HANG_S), "the test never released the load"
        return real_load(model, old)

    reloader.load = held_load
    volume, replies, done = bragg_map(seed=5), [], threading.Event()

    def ask_three():
        with Client(served.endpoint, timeout_s=60, retries=0) as c:
            while not done.is_set():
                replies.append(c.classify(volume, model="three", raise_on_error=False))

    asker = threading.Thread(target=ask_three)
    asker.start()
    result = {}

    def reload_two():
        with Client(served.endpoint, timeout_s=HANG_S, retries=0) as c:
            result["reply"] = c.reload(TOKEN, str(two_class[1]), name="two")

    reloading = threading.Thread(target=reload_two)
    reloading.start()
    try:
        assert loading.wait(HANG_S), "the reload never started loading"
        during = len(replies)
        wait_until(lambda: len(replies) >= during + 5, what="5 answers of the 3-class model during the load")
        release.set()
        reloading.join(HANG_S)
        after = len(replies)
        wait_until(lambda: len(replies) >= after + 5, what="5 answers after the reload")
    finally:
        release.set()
        done.set()
        asker.join(HANG_S)
    assert result["reply"]["ok"] and result["reply"]["served_as"] == "two"
    assert result["reply"]["model"]["version"] == "2c-2" and result["reply"]["previous_model"]["version"] == "2c-1"
    assert all(r["ok"] and r["classes"] == ["defect_free", "screw", "edge"] for r in replies)
    assert {r["model"]["version"] for r in replies} == {"fixture-1"}
    with Client(served.endpoint, timeout_s=60, retries=0) as c:
        two = c.classify(volume, model="two")
        three = c.classify(volume, model="three")
    assert two["model"]["version"] == "2c-2"
    assert three["preparation"]["cross_check"]["model"]["version"] == "2c-2"  # the cross-check moved too


def test_models_of_one_server_share_its_limits(predictor, two_class):
    from defectscope.preprocessing.config import Limits

    with pytest.raises(ValueError, match="same limits"):
        Server({"a": Classifier(predictor), "b": Classifier(Predictor(two_class[0]), limits=Limits(queue_length=3))})


def test_the_typed_calls_give_the_wire_answer(server, predictor, tmp_path):
    """classify_map / classify_file (what the Tango device and the CLI call) and a ZeroMQ request: one answer."""
    volume = bragg_map(seed=9)
    np.save(tmp_path / "map.npy", volume)
    classifier = Classifier(predictor, data_root=tmp_path)
    by_map = classifier.classify_map(volume).reply
    by_file = classifier.classify_file("map.npy").reply
    with Client(server.endpoint, timeout_s=60, retries=0) as c:
        by_wire = c.classify(volume)
    assert by_map["probabilities"] == by_file["probabilities"] == by_wire["probabilities"]
    with pytest.raises(Exception, match="intensity"):
        classifier.classify_map(volume, intensity="photons")


def test_the_core_knows_no_wire_format():
    import ast
    from pathlib import Path

    import defectscope.server.core as core

    tree = ast.parse(Path(core.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "defectscope.server.protocol" not in imported and "zmq" not in imported


def test_reloads_back_to_back_are_both_taken(served, two_class):
    """A reload's reply comes after its one-at-a-time lock is released: the next one is not BUSY (the old
    order lost that race about one time in five, so it is run ten times)."""
    with Client(served.endpoint, timeout_s=HANG_S, retries=0) as c:
        for _ in range(10):
            first = c.reload(TOKEN, str(two_class[1]), name="two")
            second = c.reload(TOKEN, str(two_class[0]), name="two")
            assert first["model"]["version"] == "2c-2" and second["model"]["version"] == "2c-1"
