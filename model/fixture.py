"""A small but real ONNX model with valid defectscope metadata, for tests and benchmarks.

It is the "simulated hardware" of this package (as ophyd ships simulated devices): a genuine ONNX graph
(average pooling, one dense layer, softmax) that ONNX Runtime executes like any trained model, so the
server, client and Tango device are tested end to end without TensorFlow. Its weights are random:
its answers mean nothing, and its card says so. Needs the ``onnx`` package (``[test]`` extra).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np

from defectscope.model.metadata import CARD_KEY, INPUT_NAME, OUTPUT_NAME, PIPELINE_KEY
from defectscope.preprocessing.config import PipelineConfig


def build_fixture_model(
    path: str | Path,
    *,
    classes: tuple[str, ...] = ("defect_free", "screw", "edge"),
    version: str = "fixture-1",
    seed: int = 0,
    pipeline: PipelineConfig | None = None,
    pool: int = 4,
    metadata: bool = True,
    single_map_only: bool = False,
) -> Path:
    """Write a fixture model to ``path`` and return the path. ``single_map_only``: the graph flattens to one
    row whatever the batch, so ONNX Runtime fails on a batch of two or more maps (a genuine run-time error
    from inside the runtime, for the tests of unexpected failures)."""
    import onnx
    from onnx import helper

    pipeline = pipeline or PipelineConfig()
    graph = _graph(pipeline.shape, len(classes), seed=seed, pool=pool, single_map_only=single_map_only)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="defectscope.fixture")
    model.ir_version = 8  # readable by every onnxruntime we support
    if metadata:
        for key, value in ((PIPELINE_KEY, pipeline.to_json()), (CARD_KEY, json.dumps(_card(classes, version)))):
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _graph(shape, n_classes: int, *, seed: int, pool: int, single_map_only: bool):
    """The ONNX graph: maps of ``shape`` (channels last) average-pooled by ``pool``, one dense layer of
    random weights (``seed``), softmax over ``n_classes``."""
    from onnx import TensorProto, helper, numpy_helper

    n0, n1, n2 = shape
    rng = np.random.default_rng(seed)
    features = (n0 // pool) * (n1 // pool) * (n2 // pool)
    weights = rng.normal(0.0, 1.0, size=(features, n_classes)).astype(np.float32)
    bias = rng.normal(0.0, 0.1, size=(n_classes,)).astype(np.float32)

    nodes = [
        # [B, n0, n1, n2, 1] -> [B, 1, n0, n1, n2]: channels-last as Keras exports, pooled as NCDHW.
        helper.make_node("Transpose", [INPUT_NAME], ["x_ncdhw"], perm=[0, 4, 1, 2, 3]),
        helper.make_node("AveragePool", ["x_ncdhw"], ["pooled"], kernel_shape=[pool] * 3, strides=[pool] * 3),
        helper.make_node("Reshape", ["pooled", "one_row"], ["flat"]) if single_map_only
        else helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        # Scale so that a max-normalised map gives logits of order one.
        helper.make_node("Mul", ["flat", "gain"], ["scaled"]),
        helper.make_node("Gemm", ["scaled", "W", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=1),
    ]
    return helper.make_graph(
        nodes,
        "defectscope_fixture",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", n0, n1, n2, 1])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_classes])],
        initializer=[
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array(0.05, dtype=np.float32), "gain"),
            *([numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "one_row")] if single_map_only else []),
        ],
    )


def _card(classes: tuple[str, ...], version: str) -> dict:
    """The model card: says the weights are random and the answers mean nothing."""
    return {
        "name": "defectscope-fixture",
        "version": version,
        "classes": list(classes),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "training_data": "none: random weights, for tests only",
        "test_metrics": {},
        "training_command": "defectscope.model.fixture.build_fixture_model",
    }
