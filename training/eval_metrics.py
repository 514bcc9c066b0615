"""The scores of an evaluation: accuracy, per-class precision/recall/F1 and the confusion matrix, the 2-class
collapse of a 3-class model, calibration (ECE, NLL, Brier), accuracy by group (element, position mode, size,
the line's distance from the centroid, peak-count decade, estimated oversampling), and the part of it all
that goes into a model card."""

from __future__ import annotations

import numpy as np
from defectscope.training.calibration import expected_calibration_error

TWO_CLASSES = ("defect_free", "defective")


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, classes) -> dict:
    """Accuracy, per-class precision/recall/F1 and confusion matrix (rows: true, columns: predicted)."""
    classes = list(classes)
    k = len(classes)
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(probabilities).argmax(axis=1) if len(labels) else np.zeros(0, np.int64)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (labels, predicted), 1)
    per_class = {}
    for c, name in enumerate(classes):
        tp = counts[c, c]
        support, called = counts[c].sum(), counts[:, c].sum()
        precision = tp / called if called else None
        recall = tp / support if support else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if support else None)
        per_class[name] = {"precision": round6(precision), "recall": round6(recall), "f1": round6(f1), "support": int(support)}
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    return {
        "n": int(labels.size),
        "accuracy": round6((predicted == labels).mean()) if labels.size else None,
        "per_class": per_class,
        "confusion_matrix": {"classes": classes, "rows": "true class", "columns": "predicted class",
                             "counts": counts.tolist(), "normalised": np.round(normalised, 5).tolist()},
    }


def collapse_two_class(probabilities: np.ndarray, labels: np.ndarray, classes) -> tuple[np.ndarray, np.ndarray]:
    """3-class probabilities and labels -> (defect_free, defective): p_defective = p_screw + p_edge."""
    classes = list(classes)
    df = classes.index("defect_free")
    p = np.asarray(probabilities, dtype=np.float64)
    p2 = np.stack([p[:, df], p.sum(axis=1) - p[:, df]], axis=1)
    return p2, (np.asarray(labels) != df).astype(np.int64)


def group_accuracy(correct: np.ndarray, keys) -> dict:
    keys = np.asarray(keys, dtype=object)
    out = {}
    for key in sorted(set(keys.tolist()), key=str):
        sel = keys == key
        out[str(key)] = {"n": int(sel.sum()), "accuracy": round6(correct[sel].mean())}
    return out


def round6(x):
    """None, or ``x`` as a float rounded to 6 decimals (the precision of every score in the JSON)."""
    return None if x is None else round(float(x), 6)


def _decade(counts: float) -> str:
    if not counts > 0:
        return "0"
    e = int(np.floor(np.log10(counts)))
    return f"1e{e}-1e{e + 1}"


def _oversampling_bin(value: float) -> str:
    lo = np.floor(value * 2) / 2
    return f"{lo:.1f}-{lo + 0.5:.1f}"


OFFSET_BINS = (0.25, 0.5, 0.75)  # distance of the line from the centroid / half the mean crystal extent


def _offset_key(params: dict, i: int) -> str | None:
    """'screw 0.50-0.75' etc.: the dislocation's character and its distance from the centroid relative to
    half the crystal's mean extent (0 at the centre, ~1 at the surface); None for defect-free maps."""
    if not all(k in params for k in ("dislocation_offset_angstrom", "crystal_extent_angstrom", "line_direction",
                                     "burgers_vector_angstrom")):
        return None
    offset = float(params["dislocation_offset_angstrom"][i])
    b = np.asarray(params["burgers_vector_angstrom"][i], dtype=float)
    if not np.isfinite(offset) or not np.any(b):
        return None
    t = np.asarray(params["line_direction"][i], dtype=float)
    kind = "screw" if abs(t @ b) > 0.99 * np.linalg.norm(b) * np.linalg.norm(t) else "edge"
    r = offset / (0.5 * float(np.mean(params["crystal_extent_angstrom"][i])))
    edges = (0.0, *OFFSET_BINS, None)
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi is None or r < hi:
            return f"{kind} {lo:.2f}-{hi:.2f}" if hi is not None else f"{kind} >{lo:.2f}"
    return None  # unreachable


def group_keys(params: dict, i: int) -> dict:
    """The groups map ``i`` of a simulated dataset belongs to (element, position mode, size, line offset)."""
    keys = {}
    for name in ("element", "position_mode", "size"):
        if name in params:
            v = params[name][i]
            keys[name] = v.decode() if isinstance(v, bytes) else str(v)
    offset = _offset_key(params, i)
    if offset is not None:
        keys["dislocation_offset"] = offset
    return keys


def accuracy_by_group(correct: np.ndarray, keys: list[dict], reports: list[dict]) -> dict:
    """Accuracy per group of ``group_keys`` (defective maps only for the line offset), and per peak-count
    decade and estimated oversampling of the prepare ``reports``."""
    out = {}
    for name in ("element", "position_mode", "size"):
        if keys and all(name in k for k in keys):
            out[name] = group_accuracy(correct, [k[name] for k in keys])
    defective = [j for j, k in enumerate(keys) if "dislocation_offset" in k]
    if defective:  # defective maps only, by character and distance of the line from the centroid
        out["dislocation_offset"] = group_accuracy(correct[defective], [keys[j]["dislocation_offset"] for j in defective])
    if reports:
        out["peak_counts_decade"] = group_accuracy(correct, [_decade(r["peak_counts"]) for r in reports])
        out["oversampling_estimated"] = group_accuracy(correct, [_oversampling_bin(r["oversampling"]) for r in reports])
    return out


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> dict:
    """Risk-coverage of answering only the most confident maps: the accuracy of the most confident answers at
    80/90/95/100 % coverage, and the curve (error rate of the answered at 20 coverages)."""
    order = np.argsort(-confidence)
    acc = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    at = {f"{c}%": round(float(acc[max(int(np.ceil(c / 100 * len(acc))) - 1, 0)]), 4) for c in (80, 90, 95, 100)}
    points = np.linspace(0.05, 1.0, 20)
    return {"accuracy_at_coverage": at, "curve": {"coverage": points.round(2).tolist(),
            "risk": [round(1 - float(acc[max(int(np.ceil(c * len(acc))) - 1, 0)]), 4) for c in points]}}


def verdict_metrics(verdicts, labels: np.ndarray, label_space) -> dict:
    """What the replies would say (``model.decision.decide``: the model's rule and the preparation's warnings;
    the server's own checks, sampling sensitivity, the cross-check and OOD, can only add abstentions): the
    verdicts per true class, and the rates a beamline pays for. ``false_dislocated``: defect-free crystals
    given a dislocated verdict (screw, edge or defective); ``missed_dislocation``: dislocated crystals given
    ``defect_free``; ``wrong_character``: a screw answered edge or the reverse; ``answered``: not ``uncertain``."""
    label_space = list(label_space)
    counts = {c: {} for c in label_space}
    for verdict, label in zip(verdicts, labels):
        row = counts[label_space[int(label)]]
        row[verdict] = row.get(verdict, 0) + 1

    def rate(classes, wrong) -> dict:  # wrong(true class, verdict)
        n = sum(sum(counts[c].values()) for c in classes)
        k = sum(m for c in classes for v, m in counts[c].items() if wrong(c, v))
        return {"n": n, "count": k, "rate": round6(k / n) if n else None}

    free = [c for c in label_space if c == "defect_free"]
    defective = [c for c in label_space if c != "defect_free"]
    out = {"counts": counts,
           "false_dislocated": rate(free, lambda c, v: v not in ("defect_free", "uncertain")),
           "missed_dislocation": rate(defective, lambda c, v: v == "defect_free"),
           "answered": rate(label_space, lambda c, v: v != "uncertain")}
    if len(defective) > 1:
        out["wrong_character"] = rate(defective, lambda c, v: v in defective and v != c)
    return out


def split_metrics(probs: np.ndarray, labels: np.ndarray, label_space, keys: list[dict],
                  reports: list[dict]) -> dict:
    """Every score of one split: ``classification_metrics``, calibration, the 2-class collapse of a 3-class
    label space and accuracy by group (``keys`` from ``group_keys`` and prepare ``reports``, one per map)."""
    metrics = classification_metrics(probs, labels, label_space)
    correct = probs.argmax(axis=1) == labels if len(labels) else np.zeros(0, bool)
    p = np.asarray(probs, dtype=np.float64)
    metrics["calibration"] = {
        **expected_calibration_error(p, labels),
        "nll": round6(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1)).mean()) if len(labels) else None,
        "brier": round6(((p - np.eye(len(label_space))[labels]) ** 2).sum(axis=1).mean()) if len(labels) else None,
    }
    if len(label_space) == 3:
        p2, l2 = collapse_two_class(probs, labels, label_space)
        metrics["two_class"] = classification_metrics(p2, l2, TWO_CLASSES)
        metrics["two_class"]["rule"] = "defective when p_screw + p_edge > p_defect_free"
    metrics["by_group"] = accuracy_by_group(correct, keys, reports)
    if len(labels):
        metrics["risk_coverage"] = risk_coverage(p.max(axis=1), correct)
    return metrics


def summary_metrics(metrics: dict) -> dict:
    """The part of an evaluation that goes into a model card."""
    out = {k: metrics[k] for k in ("split", "n", "accuracy", "per_class", "refused") if k in metrics}
    out["confusion_matrix_normalised"] = metrics["confusion_matrix"]["normalised"]
    if "two_class" in metrics:
        out["two_class_accuracy"] = metrics["two_class"]["accuracy"]
    out["ece"] = metrics["calibration"]["ece"]
    out["by_group"] = {g: {k: v["accuracy"] for k, v in d.items()} for g, d in metrics.get("by_group", {}).items()}
    out["data"] = [d["path"] for d in metrics.get("data", [])]
    out["evaluated_with"] = "defectscope evaluate (Predictor + prepare, the serving path)"
    return out
