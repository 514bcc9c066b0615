"""The ONNX predictor: metadata contract, provider truth, batches, threads."""

import json
import threading

import numpy as np
import pytest

from defectscope.errors import ModelUnavailable, ShapeMismatch
from defectscope.model.fixture import build_fixture_model
from defectscope.model.predictor import Predictor


def test_loads_fixture_and_reports_cpu_provider(predictor):
    assert predictor.provider == "CPUExecutionProvider"
    assert predictor.classes == ("defect_free", "screw", "edge")
    assert predictor.describe()["name"] == "defectscope-fixture"
    assert len(predictor.describe()["sha256"]) == 64
    assert predictor.warmup_ms is not None and predictor.warmup_ms > 0
    assert not predictor.degraded


def test_batch_probabilities_sum_to_one_and_match_single(predictor):
    rng = np.random.default_rng(1)
    batch = rng.random((3, 64, 64, 64), dtype=np.float32) ** 8
    probs = predictor.predict(batch)
    assert probs.shape == (3, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    single = np.concatenate([predictor.predict(batch[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(probs, single, atol=1e-6)
    # The fixture is a real network: different inputs give different answers.
    assert not np.allclose(probs[0], probs[1])


def test_wrong_prepared_shape_is_refused(predictor):
    with pytest.raises(ShapeMismatch):
        predictor.predict(np.zeros((1, 32, 64, 64), np.float32))


def test_cuda_requested_without_gpu_degrades_or_refuses(fixture_model):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is present here")
    degraded = Predictor(fixture_model, provider="cuda", on_missing_cuda="degrade")
    assert degraded.provider == "CPUExecutionProvider" and degraded.degraded
    with pytest.raises(ModelUnavailable, match="CUDA"):
        Predictor(fixture_model, provider="cuda", on_missing_cuda="refuse")


def test_model_without_metadata_is_refused(tmp_path):
    path = build_fixture_model(tmp_path / "bare.onnx", metadata=False)
    with pytest.raises(ModelUnavailable, match="defectscope.pipeline"):
        Predictor(path)


def test_bad_card_and_bad_pipeline_are_refused(tmp_path):
    import onnx

    path = build_fixture_model(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    for entry in model.metadata_props:
        if entry.key == "defectscope.pipeline":
            entry.value = json.dumps({"schema_version": 99})
    onnx.save(model, str(tmp_path / "future.onnx"))
    with pytest.raises(ModelUnavailable, match="schema_version"):
        Predictor(tmp_path / "future.onnx")


def test_corrupt_and_missing_files_are_refused(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelUnavailable, match="cannot be loaded"):
        Predictor(junk)
    with pytest.raises(ModelUnavailable, match="does not exist"):
        Predictor(tmp_path / "absent.onnx")


def test_class_count_must_match_card(tmp_path):
    import onnx

    path = build_fixture_model(tmp_path / "m.onnx", classes=("defect_free", "defective"))
    model = onnx.load(str(path))
    for entry in model.metadata_props:
        if entry.key == "defectscope.card":
            card = json.loads(entry.value)
            card["classes"] = ["defect_free", "screw", "edge"]
            entry.value = json.dumps(card)
    onnx.save(model, str(tmp_path / "lying.onnx"))
    with pytest.raises(ModelUnavailable, match="classes"):
        Predictor(tmp_path / "lying.onnx")


def test_predict_is_thread_safe(predictor):
    rng = np.random.default_rng(2)
    inputs = rng.random((8, 64, 64, 64), dtype=np.float32) ** 6
    expected = predictor.predict(inputs)
    results = [None] * 8

    def run(i):
        for _ in range(5):
            results[i] = predictor.predict(inputs[i : i + 1])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_allclose(np.stack(results), expected, atol=1e-6)


def test_subnormal_inputs_are_zeroed_without_touching_the_process(fixture_model):
    """Regression: ONNX Runtime's set_denormal_as_zero switched the whole process to flush-to-zero
    (found by the hypothesis fuzz); subnormal inputs are now zeroed in the input array only."""
    tiny = np.float32(1e-40)  # subnormal
    predictor = Predictor(fixture_model)
    maps = np.zeros((1, 64, 64, 64), np.float32)
    maps[0, 30:34, 30:35, 29:33] = 1.0
    with_subnormals = maps.copy()
    with_subnormals[0, :10] = tiny
    np.testing.assert_array_equal(predictor.predict(with_subnormals), predictor.predict(maps))
    assert with_subnormals[0, 0, 0, 0] == tiny, "the caller's array is not modified"
    assert tiny * np.float32(1.0) != 0, "this process still computes with subnormal floats"
