"""An unexpected failure reaches the client as INTERNAL with a plain message and an incident id; the
detail (exception type, runtime message, traceback) stays in the server log under that id."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from defectscope.errors import Internal, incident
from defectscope.model.fixture import build_fixture_model
from defectscope.model.predictor import Predictor
from defectscope.server.client import Client
from defectscope.server.core import Classifier
from defectscope.server.zmq_server import Server

from conftest import bragg_map

INCIDENT = re.compile(r"incident ([0-9a-f]{12})")


@pytest.fixture(scope="module")
def failing_server(tmp_path_factory):
    """A real model that ONNX Runtime cannot run on a batch of two maps (a genuine run-time error)."""
    path = build_fixture_model(tmp_path_factory.mktemp("m") / "one-map.onnx", single_map_only=True)
    # No sampling check: its three variants go through the model as a batch, which this one cannot run.
    server = Server(Classifier(Predictor(path, provider="cpu"), sampling_check=False), "tcp://127.0.0.1:*").start()
    yield server
    server.stop(drain=False)


def test_runtime_failure_gives_an_incident_id_not_the_detail(failing_server, caplog):
    batch = np.stack([bragg_map(), bragg_map(seed=1)])
    with caplog.at_level(logging.ERROR), Client(failing_server.endpoint, timeout_s=60, retries=0) as client:
        reply = client.classify(batch, raise_on_error=False)
        assert client.classify(bragg_map())["ok"]  # the server goes on serving
    error = reply["error"]
    assert error["reason"] == "INTERNAL"
    found = INCIDENT.search(error["message"])
    assert found and error["incident"] == found.group(1)
    # Nothing of the runtime's own text reaches the client ...
    assert not re.search(r"onnx|Gemm|Exception|Error|\.py|/", error["message"]), error["message"]
    # ... it is in the log, under the same id, with its traceback.
    logged = [r for r in caplog.records if error["incident"] in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert "Gemm" in logged[0].getMessage() or "Gemm" in str(logged[0].exc_info[1])


def test_client_raises_internal_naming_the_incident(failing_server):
    batch = np.stack([bragg_map(), bragg_map(seed=1)])
    with Client(failing_server.endpoint, timeout_s=60, retries=0) as client, pytest.raises(Internal) as info:
        client.classify(batch)
    assert INCIDENT.search(str(info.value))


def test_incident_ids_differ_and_messages_are_plain(caplog):
    with caplog.at_level(logging.ERROR):
        a = incident(RuntimeError("/secret/path exploded"), "doing a thing")
        b = incident(KeyError("k"), "doing a thing")
    assert a.incident != b.incident and "/secret" not in a.message and a.to_dict()["incident"] == a.incident
    assert "/secret/path exploded" in caplog.text
