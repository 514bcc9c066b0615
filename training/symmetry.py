"""What averaging buys: the 8 symmetries of the plane ⊥ Q, and ensembles of exported models.

A rotation about Q or a mirror through a plane containing Q turns a crystal's pattern into that of a
physically possible crystal of the same class (the simulator draws rotations about Q; training adds the
mirrors, ``data.augment_mirror``). A prepared map has eight such images on the 64^3 grid: the symmetries
of the (q_perp1, q_perp2) square, made of the axis swap and the mirrors about the centre voxel that
``prepare`` centres on. Averaging a model's log-probabilities over the eight makes its answer invariant
to them ("symmetrised"); averaging over several models is an ensemble.

``python -m defectscope.training.symmetry MODEL.onnx [MODEL.onnx ...] DATA.h5 [--split validation]
--out RESULT.json`` prepares every map of the split once per distinct pipeline config (through the
serving path, as ``evaluate`` does), runs each model on the eight images and writes the accuracy of
every model alone and symmetrised, and of their ensemble. It measures; the shipped models are
unchanged by it (docs/experiments.md, "Where the 3-class model errs").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from defectscope.errors import BadMessage, DefectscopeError
from defectscope.training.calibration import softmax
from defectscope.training.data import label_map, mirror_about_centre, open_map_file

N_SYMMETRIES = 8


def symmetry_images(x: np.ndarray) -> np.ndarray:
    """The 8 images of a prepared map [n0, n1, n2] under the symmetries of the (axis 1, axis 2) square.

    Index ``4*swap + 2*mirror1 + mirror2``: 0 is the map itself, 3 the rotation by 180° about Q,
    5 and 6 the rotations by ±90°, 1, 2, 4 and 7 the mirrors. Axis 0 (along Q) is never flipped.
    """
    if x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"need a map with a square (axis 1, axis 2) section, got shape {x.shape}")
    images = []
    for swap in (False, True):
        y = np.swapaxes(x, 1, 2) if swap else x
        for m1 in (False, True):
            z = mirror_about_centre(y, 1) if m1 else y
            for m2 in (False, True):
                images.append(mirror_about_centre(z, 2) if m2 else z)
    return np.ascontiguousarray(np.stack(images))


def average_log_probabilities(probabilities: np.ndarray, axis: int) -> np.ndarray:
    """Geometric-mean probabilities along ``axis`` (mean of the logs, renormalised)."""
    return softmax(np.log(np.clip(probabilities, 1e-12, 1.0)).mean(axis=axis))


def score_models(model_paths, data_path, split: str = "validation", progress: bool = True) -> dict:
    """Probabilities of every model on the 8 images of every map of ``split``; accuracies as JSON."""
    from defectscope.model.predictor import Predictor

    predictors = [Predictor(str(p), provider="cpu") for p in model_paths]
    classes = predictors[0].classes
    if any(p.classes != classes for p in predictors):
        raise BadMessage("the models of an ensemble must have the same classes in the same order")
    with open_map_file(data_path) as f:
        to_model = label_map(f.classes, classes)
        indices = f.indices(split)
        probs = np.zeros((len(indices), len(predictors), N_SYMMETRIES, len(classes)), dtype=np.float64)
        labels = np.zeros(len(indices), dtype=np.int64)
        keep = np.zeros(len(indices), dtype=bool)
        for k, i in enumerate(indices):
            prepared = {}
            try:
                for m, predictor in enumerate(predictors):
                    key = predictor.pipeline.to_json()
                    if key not in prepared:
                        prepared[key] = symmetry_images(f.prepare(i, predictor.pipeline).array)[..., None]
                    probs[k, m] = predictor.predict(prepared[key])
            except DefectscopeError:
                continue  # refused by the pipeline (as in evaluate: counted, not scored)
            labels[k], keep[k] = to_model[f.labels[i]], True
            if progress and k % 200 == 0:
                print(f"  {k}/{len(indices)} maps", file=sys.stderr)
    probs, labels = probs[keep], labels[keep]

    def accuracy(p):
        return round(float((p.argmax(axis=-1) == labels).mean()), 6)

    rotations = [0, 3, 5, 6]
    result = {
        "data": str(data_path), "split": split, "n": int(keep.sum()), "refused": int((~keep).sum()),
        "classes": list(classes), "models": {},
        "method": "geometric mean of probabilities (mean of log-probabilities, renormalised)",
    }
    for m, (path, predictor) in enumerate(zip(model_paths, predictors)):
        single = probs[:, m, 0]
        symmetrised = average_log_probabilities(probs[:, m], axis=1)
        right0, right8 = single.argmax(-1) == labels, symmetrised.argmax(-1) == labels
        fixed_broken = {"fixed": int((~right0 & right8).sum()), "broken": int((right0 & ~right8).sum())}
        result["models"][str(path)] = {
            "name": predictor.card.get("name"), "version": predictor.card.get("version"),
            "intensity_transform": predictor.pipeline.intensity_transform,
            "accuracy": accuracy(single),
            "accuracy_each_symmetry": [accuracy(probs[:, m, s]) for s in range(N_SYMMETRIES)],
            "accuracy_rotations_about_q": accuracy(average_log_probabilities(probs[:, m, rotations], axis=1)),
            "accuracy_symmetrised": accuracy(symmetrised),
            "symmetrised_vs_single": fixed_broken,
        }
    if len(predictors) > 1:
        result["ensemble"] = {
            "accuracy": accuracy(average_log_probabilities(probs[:, :, 0], axis=1)),
            "accuracy_symmetrised": accuracy(average_log_probabilities(probs.reshape(len(labels), -1, len(classes)),
                                                                       axis=1)),
        }
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m defectscope.training.symmetry", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="MODEL.onnx ... DATA.h5")
    p.add_argument("--split", default="validation", choices=("train", "validation", "test", "all"))
    p.add_argument("--out", metavar="RESULT.json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if len(args.paths) < 2:
        p.error("give at least one model and one dataset")
    *models, data = args.paths
    result = score_models(models, data, split=args.split, progress=not args.no_progress)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
