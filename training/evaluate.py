"""Evaluation of an exported model through the serving path: ``Predictor`` + ``prepare`` on raw maps.

``evaluate_model(MODEL.onnx, DATA.h5, split="test")`` prepares every map of the split with the pipeline
config stored *in the ONNX file* and classifies it with ONNX Runtime, exactly as the server would, then
computes: accuracy; per-class precision, recall and F1; the confusion matrix (counts, and normalised per
true class); for a 3-class model its 2-class collapse (defective = screw + edge, probabilities summed);
accuracy by element, CD/RPD position, crystal size, peak-count decade and estimated oversampling; the
expected calibration error (15 confidence bins), NLL and Brier score. Maps the pipeline refuses (e.g.
LOW_SIGNAL) are counted by reason and left out of the scores.

Robustness (``robust_maps`` > 0), after the paper's supplementary Fig. 14, on a class-balanced random
subset of the split (maps in the canonical frame): the raw counts (and mask) are transformed about the peak with
``scipy.ndimage.affine_transform`` (linear interpolation; masks nearest), then prepared and classified:

- rotation by an angle about a random axis (tilts Q off axis 0 by up to that angle, as a wrong
  ``q_direction`` would) and, as a control, about Q itself (the simulator draws those: should be flat);
- zoom by a factor f about the peak (voxel size / f, oversampling x f): how far the pipeline's
  oversampling resampling and the network hold up for finer and coarser sampling.

``--plots DIR`` writes PNGs (matplotlib, Agg): confusion matrices, reliability diagram, accuracy by group,
robustness curves. Every number is in the JSON.

The parts: ``eval_metrics`` (the scores), ``eval_robustness`` (the transforms and their curves),
``eval_plots`` (the figures); their public names are importable from here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from defectscope.training.data import DEFAULT_SPLIT_FRACTIONS, label_map, open_map_file, progress_bar
from defectscope.training.eval_metrics import (
    OFFSET_BINS,
    TWO_CLASSES,
    accuracy_by_group,
    classification_metrics,
    collapse_two_class,
    group_accuracy,
    group_keys,
    split_metrics,
    summary_metrics,
    verdict_metrics,
)
from defectscope.training.eval_plots import write_plots
from defectscope.training.eval_robustness import (
    ROTATION_ANGLES_DEG,
    ZOOM_FACTORS,
    robustness,
    rotation_matrix,
    transform_about,
)

from defectscope.errors import BadMessage, DefectscopeError
from defectscope.model.decision import decide

__all__ = [
    "OFFSET_BINS", "ROTATION_ANGLES_DEG", "TWO_CLASSES", "ZOOM_FACTORS", "accuracy_by_group", "classification_metrics",
    "collapse_two_class", "evaluate_model", "group_accuracy", "group_keys", "rotation_matrix", "split_metrics",
    "summary_metrics", "transform_about", "write_json", "write_plots",
]


class _Scorer:
    """Prepare + predict, batched, through the serving path; remembers refusals by reason."""

    def __init__(self, predictor, batch: int = 32):
        self.predictor, self.batch = predictor, batch
        self.warning_reasons: list[list[str]] = []  # of the last ``run``, one list per scored map

    def run(self, items):
        """items: iterable of (volume, mask, frame kwargs, tag) -> (probabilities, tags, reports, refused).

        As served: a model whose rule says ``sampling_mean`` (``model.decision``) answers with the mean over the
        map and its sampling-check variants."""
        from defectscope.preprocessing.pipeline import prepare

        pipeline, mean = self.predictor.pipeline, self.predictor.decision.sampling_mean
        probs, tags, reports, refused = [], [], [], {}
        self.warning_reasons = []
        xs, pending = [], []  # pending: (tag, report, number of maps in xs, warning reasons)

        def flush():
            if xs:
                p = self.predictor.predict(np.stack(xs))
                ends = np.cumsum([k for _, _, k, _ in pending])
                probs.append(np.stack([p[e - k:e].mean(axis=0) for e, (_, _, k, _) in zip(ends, pending)]))
                tags.extend(t for t, _, _, _ in pending)
                reports.extend(r for _, r, _, _ in pending)
                self.warning_reasons.extend(w for _, _, _, w in pending)
                xs.clear()
                pending.clear()

        for volume, mask, frame, tag in items:
            try:
                prepared = prepare(volume, pipeline, mask=mask, sampling_check=mean, **frame)
            except DefectscopeError as exc:
                refused[exc.reason] = refused.get(exc.reason, 0) + 1
                continue
            maps = [prepared.array, *(prepared.variants if prepared.variants is not None else [])]
            xs.extend(maps)
            pending.append((tag, prepared.report, len(maps), [w["reason"] for w in prepared.warnings]))
            if len(xs) >= self.batch:
                flush()
        flush()
        p = np.concatenate(probs) if probs else np.zeros((0, len(self.predictor.classes)), np.float32)
        return p, tags, reports, refused


def evaluate_model(model_path, data_paths, *, split: str = "test", seed: int = 0,
                   split_fractions=DEFAULT_SPLIT_FRACTIONS, plots_dir=None, robust_maps: int = 0,
                   rotation_angles=ROTATION_ANGLES_DEG, zoom_factors=ZOOM_FACTORS, progress: bool = True,
                   batch: int = 32) -> dict:
    """All metrics of one model on one split of one or more data files (module docstring)."""
    from defectscope.model.predictor import Predictor

    t_start = time.perf_counter()
    predictor = Predictor(model_path, provider="cpu", warmup=False)
    classes = list(predictor.classes)
    paths = [Path(p) for p in ([data_paths] if isinstance(data_paths, (str, Path)) else data_paths)]
    files = [open_map_file(p, seed=seed, split_fractions=split_fractions) for p in paths]
    try:
        label_space, collapse_model = _label_space(files, classes)
        scorer = _Scorer(predictor, batch)
        meta = _split_maps(files, split, label_space)
        if not meta:
            raise BadMessage(f"the {split!r} split of {', '.join(str(p) for p in paths)} holds no maps")
        probs, tags, reports, refused = scorer.run(_read(files, meta, f"evaluating {split}", progress))
        labels = np.array([meta[t][2] for t in tags], dtype=np.int64)
        rule = predictor.decision
        # Before a 3-class model's answers are collapsed: its rule is fitted on its own probabilities.
        verdicts = [decide(classes, p, rule, w)["verdict"] for p, w in zip(probs, scorer.warning_reasons)]
        if collapse_model:
            probs, _ = collapse_two_class(probs, np.zeros(len(probs), np.int64), classes)
        metrics = split_metrics(probs, labels, label_space, [meta[t][3] for t in tags], reports)
        metrics["refused"] = refused
        metrics["verdicts"] = verdict_metrics(verdicts, labels, label_space)
        if rule.calibrated and len(labels):  # the model's own decision rule (model.decision), warnings aside
            confident = probs.max(axis=1) >= rule.threshold
            metrics["decision"] = {"threshold": rule.threshold, "coverage": round(float(confident.mean()), 6),
                                   "accuracy_confident": round(float((probs.argmax(axis=1) == labels)[confident].mean()), 6)
                                   if confident.any() else None}
        result = {
            "model": {**predictor.describe(), "path": str(model_path), "classes": classes,
                      "decision": json.loads(rule.to_json())},
            "data": [{"path": str(mf.path), "layout": mf.layout, "split_source": mf.split_source} for mf in files],
            "split": split, "label_space": list(label_space),
            "model_collapsed_to_data_classes": collapse_model,
            "n": metrics.pop("n"), **metrics,
        }
        if robust_maps > 0:
            result["robustness"] = robustness(scorer, files, meta, tags, reports, label_space, collapse_model,
                                              robust_maps, seed, rotation_angles, zoom_factors, progress)
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        if plots_dir is not None:
            result["plots"] = write_plots(result, Path(plots_dir))
        return result
    finally:
        for mf in files:
            mf.close()


def _split_maps(files, split: str, label_space) -> list[tuple]:
    """(file index, map index, label in ``label_space``, group keys) of every map of ``split``."""
    meta = []
    for f_index, mf in enumerate(files):
        idx = mf.indices(split)
        mapping = label_map(mf.classes, label_space)
        params = mf.parameters()
        for i in idx:
            meta.append((f_index, int(i), int(mapping[mf.labels[i]]), group_keys(params, int(i))))
    return meta


def _read(files, meta, desc: str, progress: bool):
    """The scorer's items for the maps of ``meta``, read in order: (volume, mask, frame, position in meta)."""
    bar = progress_bar(len(meta), desc, progress)
    for m, (f_index, i, _, _) in enumerate(meta):
        volume, mask = files[f_index].read(i)
        bar.update(1)
        yield volume, mask, files[f_index].frame(i), m
    bar.close()


def _label_space(files, model_classes) -> tuple[list, bool]:
    """The classes scores are computed in: the model's, or (3-class model on 2-class labels) the data's."""
    try:
        for mf in files:
            label_map(mf.classes, model_classes)
        return list(model_classes), False
    except BadMessage:
        if len(model_classes) == 3 and all(list(mf.classes) == list(TWO_CLASSES) for mf in files):
            return list(TWO_CLASSES), True
        raise

def command_line(module: str, argv) -> str:
    """The command that made a result file: ``python -m MODULE`` and its arguments (``sys.argv`` when a
    ``main(argv=None)`` was run from the shell)."""
    import shlex
    import sys

    return " ".join(["python -m " + module, *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])


def write_json(result: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
