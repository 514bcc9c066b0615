"""Export a model whose ONNX graph answers for the 8 symmetries of the plane ⊥ Q at once ("symmetrised").

    python -m defectscope.training.symmetrise BASE.onnx --data DATA.h5 [--data ...] --out OUT.onnx \
        --model-version V [--parity-maps 100] [--no-evaluate]

``training.symmetry`` measures what averaging over the eight images of a prepared map buys (the axis swap
and the mirrors of the (q_perp1, q_perp2) square: rotations about Q and mirrors through planes containing
it, each the pattern of a physically possible crystal of the same class). This module ships it: the graph
makes the eight images of every input map, runs the base network on all of them as one batch, averages
the logits and divides by one temperature fitted again on the validation split. The answer is then
invariant to those symmetries, as the physics is. Same input and output as any model (SPEC §3: ``cxdp``
[batch, 64, 64, 64, 1] -> ``probabilities``), so the server, the Tango device and ``evaluate`` serve and
score it unchanged; it costs eight inferences per map.

Averaging the logits is the geometric mean of the probabilities that ``training.symmetry`` scores: a
mean of log-probabilities differs from the mean logit over the temperature only by a constant per map,
which the softmax removes.

The base network's ``.keras`` file (next to BASE.onnx) is copied next to OUT.onnx for fine-tuning
(``defectscope train --init``); a fine-tuned model is symmetrised again by this command. The card is the
base card with the symmetrisation, the new temperature, the export parity (ONNX against the Keras base
network averaged in numpy, on ``--parity-maps`` test maps) and the test metrics of ``defectscope
evaluate`` on the same data's test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np

from defectscope.errors import BadMessage, DefectscopeError
from defectscope.training.symmetry import N_SYMMETRIES, symmetry_images

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

GROUP = "the 8 symmetries of the (q_perp1, q_perp2) square: axis swap x mirrors about the centre voxel"


def tf_symmetry_images(x):
    """``symmetry.symmetry_images`` in TensorFlow, for a batch [B, n0, n1, n2, 1]: [8 B, ...], image-major
    (rows k*B .. k*B + B - 1 are image k of every map, in the same order as the numpy function)."""
    import tensorflow as tf

    def mirror(y, axis):  # out[i] = y[n - i] for i >= 1, out[0] = 0 (data.mirror_about_centre)
        rest = tf.reverse(y[:, :, 1:] if axis == 2 else y[:, :, :, 1:], axis=[axis])
        edge = tf.zeros_like(y[:, :, :1] if axis == 2 else y[:, :, :, :1])
        return tf.concat([edge, rest], axis=axis)

    images = []
    for swap in (False, True):
        y = tf.transpose(x, [0, 1, 3, 2, 4]) if swap else x
        for m1 in (False, True):
            z = mirror(y, 2) if m1 else y
            for m2 in (False, True):
                images.append(mirror(z, 3) if m2 else z)
    return tf.concat(images, axis=0)


def symmetrised_forward(base, temperature: float):
    """``x`` [B, *shape, 1] -> softmax(mean logits of the 8 images / T) [B, n_classes]; callable like a Keras
    model (``training`` is accepted and ignored: always inference), so ``export.to_onnx`` converts it."""
    import tensorflow as tf

    from defectscope.training.model import logits_model

    logits_of = logits_model(base)
    n_classes = int(logits_of.output.shape[-1])

    def forward(x, training=False):
        logits = logits_of(tf_symmetry_images(x), training=False)
        mean = tf.reduce_mean(tf.reshape(logits, [N_SYMMETRIES, -1, n_classes]), axis=0)
        return tf.nn.softmax(mean / tf.constant(temperature, tf.float32), axis=-1)

    return forward


def mean_logits(base, prepared: np.ndarray) -> np.ndarray:
    """Reference in numpy: the base network's logits averaged over the 8 images of each prepared map [N, ...]."""
    from defectscope.training.model import logits_model

    logits_of = logits_model(base)
    out = []
    for x in prepared:
        images = symmetry_images(np.asarray(x, dtype=np.float32))[..., None]
        out.append(np.asarray(logits_of(images, training=False), dtype=np.float64).mean(axis=0))
    return np.stack(out) if out else np.zeros((0, int(logits_of.output.shape[-1])))


def prepared_split(data_paths, split: str, pipeline, classes, limit: int | None = None):
    """(prepared maps [N, *shape], labels in ``classes``) of ``split``; maps the pipeline refuses are skipped."""
    from defectscope.training.data import label_map, open_map_file

    maps, labels = [], []
    for path in data_paths:
        with open_map_file(path) as f:
            to_model = label_map(f.classes, classes)
            for i in f.indices(split):
                if limit is not None and len(maps) >= limit:
                    break
                try:
                    maps.append(f.prepare(i, pipeline).array)
                except DefectscopeError:
                    continue
                labels.append(int(to_model[f.labels[i]]))
    if not maps:
        raise BadMessage(f"the {split!r} split of {', '.join(map(str, data_paths))} holds no maps the pipeline accepts")
    return np.stack(maps), np.asarray(labels, dtype=np.int64)


def symmetrise(base_onnx, data_paths, out, *, model_version: str, parity_maps: int = 100,
               evaluate: bool = True, command: str | None = None, log=print) -> dict:
    """Write OUT.onnx (+ .card.json, .keras); returns the card."""
    import onnx

    from defectscope.model.predictor import Predictor
    from defectscope.training import calibration
    from defectscope.training.export import _save_atomic, card_path, save_keras, set_metadata, to_onnx
    from defectscope.training.model import load_model

    base_onnx, out = Path(base_onnx), Path(out)
    data_paths = [Path(p) for p in data_paths]
    keras_path = base_onnx.with_suffix(".keras")
    if not keras_path.is_file():
        raise BadMessage(f"{base_onnx} has no Keras file next to it ({keras_path.name}): nothing to symmetrise")
    base_predictor = Predictor(base_onnx, provider="cpu", warmup=False)
    pipeline, base_card, classes = base_predictor.pipeline, base_predictor.card, list(base_predictor.classes)
    if base_card.get("symmetrised"):
        raise BadMessage(f"{base_onnx} is symmetrised already")
    base = load_model(keras_path)

    temperature, calib = _fit_temperature(base, data_paths, pipeline, classes, log)

    proto = to_onnx(symmetrised_forward(base, temperature), shape=pipeline.shape)
    proto.producer_name = "defectscope.training.symmetrise"
    card = _card(base_card, base_onnx, base_predictor, model_version, temperature, calib, command)
    set_metadata(proto, pipeline, card)
    onnx.checker.check_model(proto)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(proto, out)

    # Export parity: the ONNX graph against the Keras base network averaged in numpy, on test maps.
    test_maps, _ = prepared_split(data_paths, "test", pipeline, classes, limit=parity_maps)
    reference = calibration.softmax(mean_logits(base, test_maps), temperature)
    served = Predictor(out, provider="cpu", warmup=False).predict(test_maps[..., None].astype(np.float32))
    worst = float(np.abs(np.asarray(served, dtype=np.float64) - reference).max())
    card["symmetrised"].update({"onnx_keras_parity_max_abs": worst, "parity_maps": int(len(test_maps))})
    log(f"ONNX vs Keras (averaged in numpy) on {len(test_maps)} test maps: max |diff| {worst:.2e}")
    if worst > 1e-5:
        raise DefectscopeError(f"the symmetrised ONNX graph differs from its Keras reference by {worst:.2e} (> 1e-5)")

    if evaluate:
        from defectscope.training.evaluate import evaluate_model, summary_metrics, write_json

        metrics = evaluate_model(out, data_paths, split="test", progress=False)
        write_json(metrics, out.with_name(out.stem + ".test-metrics.json"))
        card["test_metrics"] = summary_metrics(metrics)
        log(f"test accuracy {metrics['accuracy']:.4f} on {metrics['n']} maps (base model card: "
            f"{base_card.get('test_metrics', {}).get('accuracy')})")
    set_metadata(proto, pipeline, card)
    _save_atomic(proto, out)
    card_path(out).write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
    save_keras(base, out.with_suffix(".keras"))
    return card


def _fit_temperature(base, data_paths, pipeline, classes, log) -> tuple[float, dict]:
    """The temperature of the averaged logits, fitted on the validation split, and what it did there."""
    from defectscope.training import calibration
    from defectscope.training.model import get_temperature

    log(f"fitting the temperature of the averaged logits on the validation split of {len(data_paths)} file(s)")
    val_maps, val_labels = prepared_split(data_paths, "validation", pipeline, classes)
    val_logits = mean_logits(base, val_maps)
    temperature = calibration.fit_temperature(val_logits, val_labels)
    calib = {"fitted_on": "validation", "n": int(len(val_labels)),
             "nll_before": round(calibration.nll(val_logits, val_labels, get_temperature(base)), 5),
             "nll_after": round(calibration.nll(val_logits, val_labels, temperature), 5),
             "validation_accuracy": round(float((val_logits.argmax(1) == val_labels).mean()), 6)}
    log(f"temperature {temperature:.4f} (validation NLL with the base temperature {calib['nll_before']} -> "
        f"{calib['nll_after']}); validation accuracy {calib['validation_accuracy']}")
    return temperature, calib


def _card(base_card: dict, base_onnx: Path, base_predictor, version: str, temperature: float, calib: dict,
          command: str | None) -> dict:
    from defectscope.training.export import utc_now

    card = copy.deepcopy(base_card)
    card["version"] = version
    card["created"] = utc_now()
    card["test_metrics"] = {}
    card["symmetrised"] = {
        "views": N_SYMMETRIES, "group": GROUP,
        "how": "the graph averages the base network's logits over the 8 images of each map, then softmax(mean / T)",
        "temperature": temperature, "calibration": calib,
        "base_model": {"name": base_card.get("name"), "version": base_card.get("version"),
                       "sha256": base_predictor.describe().get("sha256"), "path": str(base_onnx),
                       "test_accuracy_in_its_card": base_card.get("test_metrics", {}).get("accuracy")},
        "keras_file": "the base network (for defectscope train --init); symmetrise a fine-tuned model again",
        "cost": "8 inferences of the base network per map",
    }
    changes = list(card.get("changes_from_paper", []))
    changes.append("answer averaged over the 8 symmetries of the plane perpendicular to Q inside the graph "
                   "(training.symmetrise), temperature refitted on the validation split")
    card["changes_from_paper"] = changes
    commands = dict(card.get("commands", {}))
    if command:
        commands["symmetrise"] = command
    card["commands"] = commands
    return card


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m defectscope.training.symmetrise", description=__doc__.split("\n\n")[0])
    p.add_argument("base", metavar="BASE.onnx", help="an exported model with its .keras file next to it")
    p.add_argument("--data", action="append", required=True, metavar="DATA.h5",
                   help="data whose validation split fits the temperature and whose test split is scored")
    p.add_argument("--out", required=True, metavar="OUT.onnx")
    p.add_argument("--model-version", required=True)
    p.add_argument("--parity-maps", type=int, default=100)
    p.add_argument("--no-evaluate", action="store_true", help="skip scoring the test split")
    args = p.parse_args(argv)
    command = "python -m defectscope.training.symmetrise " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        symmetrise(args.base, args.data, args.out, model_version=args.model_version, parity_maps=args.parity_maps,
                   evaluate=not args.no_evaluate, command=command)
    except DefectscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
