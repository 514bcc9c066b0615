"""Keras model -> ONNX model file of SPEC §3 (input ``cxdp``, output ``probabilities``, metadata), with card.

The graph is converted with ``tf2onnx.convert.from_function`` around ``model(x, training=False)``
(``from_keras`` does not follow Keras 3), so dropout is off and the temperature layer is inside the graph:
the file computes softmax(logits / T) exactly as the calibrated Keras model does. ``parity`` checks that.

Next to ``<name>.onnx`` go ``<name>.card.json`` (the card, as in the file's metadata) and ``<name>.keras``
(the calibrated Keras model, for fine-tuning with ``defectscope train --init``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import numpy as np
from defectscope.model.metadata import CARD_KEY, INPUT_NAME, OUTPUT_NAME, PIPELINE_KEY
from defectscope.preprocessing.config import PipelineConfig

DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-5

def changes_from_paper(architecture: dict, *, augment: bool, classes: int) -> list[str]:
    """What this model does differently from Lim et al. (2021), for its card."""
    paper_filters = {3: [16, 32, 64, 128, 256], 2: [16, 32, 64]}[classes]
    changes = []
    if architecture.get("first_stride", 1) != 1 or list(architecture.get("filters", [])) != paper_filters:
        changes.append(f"sizes chosen for CPU training (training.model docstring): filters {architecture.get('filters')}, "
                       f"first convolution stride {architecture.get('first_stride')} (the paper gives no widths)")
    changes += [
        "maps prepared by the defectscope PipelineConfig pipeline (crop/pad, oversampling resampling, whole-voxel "
        "centre of mass, normalisation), identical at training and serving",
        "training data from the defectscope kinematic simulator: isotropic-elasticity (Volterra) displacement "
        "fields, no LAMMPS relaxation",
        "learning rate lowered once on a validation-accuracy plateau (the paper lowered it by hand at the end)",
        "temperature scaling fitted on the validation split, folded into the exported graph",
    ]
    if augment:
        changes.append("random mirrors through planes containing Q (q_perp axes) as training augmentation")
    return changes


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def to_onnx(model, *, shape=(64, 64, 64), opset: int = DEFAULT_OPSET):
    """The ONNX ModelProto of a Keras model (inference mode), input ``cxdp`` [batch, *shape, 1]."""
    import tensorflow as tf
    import tf2onnx

    if opset < 13:
        raise ValueError(f"opset must be >= 13, got {opset}")
    spec = [tf.TensorSpec((None, *shape, 1), tf.float32, name=INPUT_NAME)]
    fn = tf.function(lambda x: {OUTPUT_NAME: model(x, training=False)}, input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset)
    return proto


def set_metadata(proto, pipeline: PipelineConfig, card: dict, extra: dict | None = None) -> None:
    """Write (or replace) the SPEC §3 metadata_props of a ModelProto, and any ``extra`` keys (e.g. the decision
    rule, ``model.decision``); other keys are kept."""
    values = {PIPELINE_KEY: pipeline.to_json(), CARD_KEY: json.dumps(card, sort_keys=True), **(extra or {})}
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    for key, value in [*kept, *values.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _save_atomic(proto, path: Path) -> None:
    import onnx

    tmp = path.with_name(path.name + ".partial")
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)


def card_path(onnx_path) -> Path:
    p = Path(onnx_path)
    return p.with_name(p.name[: -len(".onnx")] + ".card.json") if p.name.endswith(".onnx") else p.with_suffix(".card.json")


def export_model(model, path, *, pipeline: PipelineConfig, card: dict, opset: int = DEFAULT_OPSET,
                 keras_copy: bool = True) -> Path:
    """Write ``path`` (.onnx) with metadata, its ``.card.json`` and (``keras_copy``) the ``.keras`` file."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    proto = to_onnx(model, shape=pipeline.shape, opset=opset)
    proto.producer_name = "defectscope.training.export"
    set_metadata(proto, pipeline, card)
    onnx.checker.check_model(proto)
    _save_atomic(proto, path)
    card_path(path).write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
    if keras_copy:
        save_keras(model, path.with_suffix(".keras"))
    return path


def update_card(path, card: dict) -> None:
    """Replace the card of an exported ONNX file (and its ``.card.json``), keeping the graph and pipeline."""
    import onnx
    from defectscope.model.metadata import parse_metadata

    path = Path(path)
    proto = onnx.load(str(path))
    contract = parse_metadata({p.key: p.value for p in proto.metadata_props}, source=str(path))
    set_metadata(proto, contract.pipeline, card)
    _save_atomic(proto, path)
    card_path(path).write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")


def save_keras(model, path) -> Path:
    """Save the model without optimizer state (an uncompiled clone), atomically."""
    import keras

    path = Path(path)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    tmp = path.with_name(path.stem + ".partial.keras")
    clone.save(tmp)
    os.replace(tmp, path)
    return path


def parity(model, onnx_path, maps: np.ndarray, batch: int = 16) -> float:
    """Max |ONNX - Keras| of the probabilities on ``maps`` [N, *shape(, 1)] through ``Predictor``."""
    from defectscope.model.predictor import Predictor

    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim == 4:
        maps = maps[..., None]
    predictor = Predictor(onnx_path, provider="cpu", warmup=False)
    worst = 0.0
    for start in range(0, maps.shape[0], batch):
        x = maps[start : start + batch]
        keras_p = np.asarray(model(x, training=False))
        worst = max(worst, float(np.abs(predictor.predict(x) - keras_p).max()))
    return worst
