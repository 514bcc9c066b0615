"""Fit a model's decision rule and out-of-distribution score, and write them into a new model file.

    python -m defectscope.training.decision_fit MODEL.onnx --fit FIT.h5 --calibrate CAL.h5 --out NEW.onnx
        [--risk 0.02] [--version V] [--report docs/eval/decision_<name>.json]

``--fit``, ``--calibrate`` and ``--test`` may each be given several times: a model trained on a mix of data is
fitted and calibrated on the same mix (the maps of all the files together).

- Out-of-distribution score: the Mahalanobis distance of the network's penultimate features (the input of its
  last dense layer) to the nearest class mean, with one covariance shared by the classes (shrunk towards its
  mean variance), fitted on the prepared maps of ``--fit`` (training-distribution data). The computation is
  added to the ONNX graph as the output ``ood_score``, so it costs nothing beside the inference.
  ``ood_threshold`` is its 99th percentile on ``--calibrate`` (held-out maps of the same distribution).
- Answer: the mean of the model's probabilities over the map and its sampling-check variants (``--native``:
  the map's own), as the server will answer (``model.decision``: ``sampling_mean``).
- Decision threshold: the smallest maximum probability at which the answers of ``--calibrate`` that reach it
  are wrong at most ``--risk`` of the time (selective risk), and never below 1 - ``--max-answer-risk``: the
  probabilities are temperature-calibrated, so no single answer whose own chance of being wrong exceeds that
  is called confident, however good the others; for a 3-class model also the threshold of
  max(P(defective), P(defect_free)) at which the defect question alone is that reliable.

Both go into the model file (``model.decision``: metadata ``defectscope.decision``) with the card's version
bumped; the probabilities are unchanged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from defectscope.model.decision import DECISION_KEY, OOD_OUTPUT, SCHEMA_VERSION, DecisionRule
from defectscope.training.eval_metrics import risk_coverage

SHRINKAGE = 0.1
OOD_PERCENTILE = 99.0


def feature_tensor(graph) -> str:
    """The input of the last dense layer (MatMul or Gemm) before the ``probabilities`` output: the
    penultimate features."""
    producers = {o: n for n in graph.node for o in n.output}
    node = producers["probabilities"]
    while node.op_type not in ("MatMul", "Gemm"):
        upstream = [producers[i] for i in node.input if i in producers]
        if not upstream:
            raise ValueError("no dense layer before the probabilities output")
        node = upstream[0]
    return node.input[0]


def with_features(proto):
    """A copy of the model that also outputs its penultimate features (for fitting only)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    name = feature_tensor(copy.graph)
    copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy, name


def prepared_features(proto, pipeline, data, sampling_mean: bool = False):
    """(features, probabilities, labels) of every map of ``data`` (one file or several) prepared by ``pipeline``
    (refused maps left out). Features are the map's own; with ``sampling_mean`` the probabilities are the mean
    over the map and its sampling-check variants, as the server answers (``model.decision``)."""
    if not isinstance(data, (str, Path)):
        parts = [prepared_features(proto, pipeline, d, sampling_mean) for d in data]
        return tuple(np.concatenate(a) for a in zip(*parts))
    import onnxruntime as ort

    from defectscope.errors import DefectscopeError
    from defectscope.preprocessing.pipeline import Preparation
    from defectscope.training.map_files import label_map, open_map_file

    model, name = with_features(proto)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    classes = json.loads({p.key: p.value for p in proto.metadata_props}["defectscope.card"])["classes"]
    feats, probs, labels = [], [], []
    with open_map_file(data) as mf:
        mapping = label_map(mf.classes, classes)
        for i in range(mf.n):
            volume, mask = mf.read(i)
            try:
                prep = Preparation(volume, pipeline, mask=mask, **mf.frame(i))
                per_axis, overall = prep.estimate()
                maps = [prep.finish(per_axis, overall).array[None]]
                if sampling_mean:
                    _, variants = prep.sampling_variants(per_axis)
                    maps += [variants] if variants is not None else []
            except DefectscopeError:
                continue
            p, f = session.run(["probabilities", name], {"cxdp": np.concatenate(maps)[..., None]})
            probs.append(p.mean(axis=0)), feats.append(f[0]), labels.append(int(mapping[mf.labels[i]]))
    return np.stack(feats).astype(np.float64), np.stack(probs).astype(np.float64), np.array(labels)


def fit_gaussian(features: np.ndarray, labels: np.ndarray, n_classes: int):
    """Class means and the shrunk shared precision matrix."""
    means = np.stack([features[labels == c].mean(axis=0) for c in range(n_classes)])
    centred = features - means[labels]
    cov = centred.T @ centred / len(features)
    cov = (1 - SHRINKAGE) * cov + SHRINKAGE * np.trace(cov) / len(cov) * np.eye(len(cov))
    return means, np.linalg.inv(cov)


def mahalanobis(features, means, precision) -> np.ndarray:
    d = features[:, None, :] - means[None]
    return np.sqrt(np.einsum("bcf,fg,bcg->bc", d, precision, d).min(axis=1))


def add_ood_output(proto, means: np.ndarray, precision: np.ndarray) -> None:
    """Append to the graph: ood_score = min_c sqrt((f - mu_c)^T P (f - mu_c)), shape [batch]."""
    import onnx
    from onnx import helper, numpy_helper

    g = proto.graph
    if any(o.name == OOD_OUTPUT for o in g.output):
        raise ValueError(f"the model already has an {OOD_OUTPUT!r} output: fit from the model without it")
    f = feature_tensor(g)
    g.initializer.extend([numpy_helper.from_array(means.astype(np.float32), "ood_means"),
                          numpy_helper.from_array(precision.astype(np.float32), "ood_precision"),
                          numpy_helper.from_array(np.array([1], np.int64), "ood_axis1"),
                          numpy_helper.from_array(np.array([2], np.int64), "ood_axis2")])
    g.node.extend([
        helper.make_node("Unsqueeze", [f, "ood_axis1"], ["ood_f3"]),            # [B, 1, F]
        helper.make_node("Sub", ["ood_f3", "ood_means"], ["ood_d"]),           # [B, C, F]
        helper.make_node("MatMul", ["ood_d", "ood_precision"], ["ood_dp"]),    # [B, C, F]
        helper.make_node("Mul", ["ood_dp", "ood_d"], ["ood_q"]),
        helper.make_node("ReduceSum", ["ood_q", "ood_axis2"], ["ood_m2"], keepdims=0),  # [B, C]
        helper.make_node("ReduceMin", ["ood_m2"], ["ood_min"], axes=[1], keepdims=0),  # [B] (axes attribute: opset 17)
        helper.make_node("Sqrt", ["ood_min"], [OOD_OUTPUT]),
    ])
    g.output.append(helper.make_tensor_value_info(OOD_OUTPUT, onnx.TensorProto.FLOAT, ["batch"]))


def selective_threshold(confidence: np.ndarray, correct: np.ndarray, risk: float) -> tuple[float, float]:
    """The smallest threshold whose confident answers are wrong at most ``risk`` of the time, and its coverage."""
    order = np.argsort(-confidence)
    errors = np.cumsum(~correct[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(errors <= risk)
    if not ok.size:
        return 1.0, 0.0
    k = int(ok.max())
    return float(confidence[order][k]), (k + 1) / len(order)


def _scores(classes, probs, labels) -> dict:
    """Confidence and correctness of the label, and (with a defect_free class and more) of the defect question."""
    out = {"label": (probs.max(axis=1), probs.argmax(axis=1) == labels)}
    if "defect_free" in classes and len(classes) > 2:
        free = list(classes).index("defect_free")
        p_def = 1.0 - probs[:, free]
        out["defective"] = (np.maximum(p_def, 1.0 - p_def), (p_def > 0.5) == (labels != free))
    return out


def _names(data) -> str | list[str]:
    return str(data) if isinstance(data, (str, Path)) else [str(d) for d in data] if len(data) > 1 else str(data[0])


def fit(model_path, fit_data, calibrate_data, risk: float, max_answer_risk: float = 0.1, sampling_mean: bool = True):
    """(the new ONNX proto, the rule, a report of the fit) for one model (module docstring)."""
    import onnx

    from defectscope.model.metadata import parse_metadata

    proto = onnx.load(str(model_path))
    contract = parse_metadata({p.key: p.value for p in proto.metadata_props}, source=str(model_path))
    classes = list(contract.classes)
    f_fit, _, l_fit = prepared_features(proto, contract.pipeline, fit_data)
    f_cal, p_cal, l_cal = prepared_features(proto, contract.pipeline, calibrate_data, sampling_mean)
    means, precision = fit_gaussian(f_fit, l_fit, len(classes))
    ood_cal = mahalanobis(f_cal, means, precision)
    scores = _scores(classes, p_cal, l_cal)
    floor = 1.0 - max_answer_risk
    threshold = max(selective_threshold(*scores["label"], risk)[0], floor)
    coverage = float((scores["label"][0] >= threshold).mean())
    defective = (None, None)
    if "defective" in scores:
        d_threshold = max(selective_threshold(*scores["defective"], risk)[0], floor)
        defective = (d_threshold, float((scores["defective"][0] >= d_threshold).mean()))
    rule = DecisionRule(risk=risk, threshold=round(threshold, 6), sampling_mean=sampling_mean,
                        defective_threshold=None if defective[0] is None else round(defective[0], 6),
                        ood_threshold=round(float(np.percentile(ood_cal, OOD_PERCENTILE)), 4),
                        fitted_on={"ood_gaussian": _names(fit_data), "thresholds": _names(calibrate_data),
                                   "n_fit": len(l_fit), "n_calibrate": len(l_cal),
                                   "ood_percentile": OOD_PERCENTILE, "shrinkage": SHRINKAGE,
                                   "max_answer_risk": max_answer_risk})
    add_ood_output(proto, means, precision)
    report = {"coverage_at_threshold": round(coverage, 4),
              "defective_coverage_at_threshold": None if defective[1] is None else round(defective[1], 4),
              "calibrate": {k: risk_coverage(*v) for k, v in scores.items()}}
    return proto, contract, rule, report


def check(path, data, rule: DecisionRule) -> dict:
    """The written model on other held-out data: risk-coverage, the confident answers' error and coverage, the
    share flagged out of distribution, and that its in-graph OOD score is finite."""
    import onnx

    from defectscope.model.predictor import Predictor

    proto = onnx.load(str(path))
    predictor = Predictor(path, provider="cpu", warmup=False)
    _, probs, labels = prepared_features(proto, predictor.pipeline, data, rule.sampling_mean)
    scores = _scores(predictor.classes, probs, labels)
    confidence, correct = scores["label"]
    confident = confidence >= rule.threshold
    _, ood = predictor.run(np.zeros((1, *predictor.pipeline.shape), np.float32))
    return {"data": str(data), "n": len(labels), **{k: risk_coverage(*v) for k, v in scores.items()},
            "confident_coverage": round(float(confident.mean()), 4),
            "confident_error": round(float(1 - correct[confident].mean()), 4) if confident.any() else None,
            "ood_score_of_an_empty_map": float(ood[0])}


def main(argv=None) -> int:
    import onnx

    from defectscope.training.evaluate import command_line
    from defectscope.training.export import card_path, set_metadata

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--fit", required=True, action="append",
                        help="training-distribution maps for the OOD Gaussian (repeat to combine files)")
    parser.add_argument("--calibrate", required=True, action="append",
                        help="held-out maps for the thresholds (repeat to combine files)")
    parser.add_argument("--test", default=None, action="append", help="other held-out maps to report on (repeatable)")
    parser.add_argument("--risk", type=float, default=0.02)
    parser.add_argument("--max-answer-risk", type=float, default=0.1)
    parser.add_argument("--native", action="store_true",
                        help="answer with the map's own probabilities, not their mean over the sampling variants")
    parser.add_argument("--out", required=True)
    parser.add_argument("--version", default=None, help="the new model version (default: unchanged)")
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args(argv)
    proto, contract, rule, report = fit(args.model, args.fit, args.calibrate, args.risk, args.max_answer_risk,
                                        sampling_mean=not args.native)
    card = dict(contract.card)
    if args.version:
        card["previous_version"], card["version"] = card["version"], args.version
    card["decision"] = {**json.loads(rule.to_json()), **report,
                        "command": command_line("defectscope.training.decision_fit", argv)}
    set_metadata(proto, contract.pipeline, card, extra={DECISION_KEY: rule.to_json()})
    out = Path(args.out)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    card_path(out).write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
    result = {"model": str(out), "schema_version": SCHEMA_VERSION, "rule": json.loads(rule.to_json()), **report}
    if args.test:
        result["test"] = check(out, args.test[0], rule) if len(args.test) == 1 else [check(out, t, rule) for t in args.test]
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("rule", "coverage_at_threshold")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
