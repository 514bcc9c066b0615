"""What a reply says about how far to trust its answer (``Classifier._reply``), beside the answer itself.

- ``check_sampling``: the map's answer against its answers at other oversamplings across the trained
  range (``Preparation.sampling_variants``); a label that changes is warned ``SAMPLING_SENSITIVE``.
- ``check_models``: a second model asked on the same prepared map; P(defective) that differs by more
  than ``DISAGREEMENT`` is warned ``MODELS_DISAGREE``.
- ``check_ood``: the model's out-of-distribution score (``model.decision``) above its threshold is warned
  ``OUT_OF_DISTRIBUTION``.
- ``decisions``: the reply's ``decision`` and ``verdict`` from the model's calibrated rule and the warnings.

``staged`` is the classifier's prepared request (its ``reports``, ``warnings_per``, ``variants``,
``prepared``, ``timings``); ``guarded`` runs a step so that any failure becomes a protocol reason.
"""

from __future__ import annotations

import time

import numpy as np

from defectscope.model.decision import decide
from defectscope.preprocessing.validate import make_warning

# Largest |P(defective) by one model - P(defective) by the other| still called agreement (MODELS_DISAGREE).
DISAGREEMENT = 0.3


def defective(classes, probabilities) -> float:
    """P(defective) = 1 - P(defect_free); the classes must include ``defect_free`` (checked by the
    ``Classifier`` that takes a cross-check)."""
    return float(1.0 - probabilities[list(classes).index("defect_free")])


def check_sampling(predictor, staged, probabilities: np.ndarray, guarded) -> np.ndarray:
    """Compare each map's answer with the answers on its sampling variants (``Preparation.sampling_variants``):
    the variants' labels and probabilities go into its report as ``sampling_check``, and a label that
    changes with the sampling is warned ``SAMPLING_SENSITIVE``: on such a map the answer is not reliable.

    Returns the probabilities to answer with: a model whose rule says ``sampling_mean`` (``model.decision``)
    answers with the mean over the map and its variants (the map's own answer kept as ``native_probabilities``)."""
    t0 = time.perf_counter()
    classes = list(predictor.classes)
    answered = np.array(probabilities, dtype=np.float32, copy=True)
    for i, (targets, variants) in enumerate(staged.variants):
        if variants is None:
            continue
        answers = guarded(staged.request, lambda v=variants: predictor.predict(v))
        labels = [classes[int(k)] for k in np.argmax(answers, axis=1)]
        check = {"oversampling": list(targets), "labels": labels,
                 "probabilities": [[round(float(v), 4) for v in row] for row in answers]}
        if predictor.decision.sampling_mean:
            answered[i] = (probabilities[i] + answers.sum(axis=0)) / (1 + len(answers))
            check["native_probabilities"] = [round(float(v), 4) for v in probabilities[i]]
            labels = [classes[int(np.argmax(probabilities[i]))], *labels]
        staged.reports[i]["sampling_check"] = check
        label = classes[int(np.argmax(answered[i]))]
        if any(other != label for other in labels):
            shown = ", ".join(f"{lab} at {t:g}" for lab, t in zip(check["labels"], targets))
            staged.warnings_per[i].append(make_warning(
                "SAMPLING_SENSITIVE",
                f"the answer {label} changes when the map is sampled elsewhere in the trained range "
                f"({shown}): it depends on how the map was gridded and is not reliable"))
    staged.timings["sampling_check"] = (time.perf_counter() - t0) * 1e3
    return answered


def check_models(predictor, other, staged, probabilities: np.ndarray, guarded) -> None:
    """Ask the cross-check model on the same prepared maps; say where the two disagree on whether the
    crystal is defective (P(defective) = 1 - P(defect_free) for either model)."""
    t0 = time.perf_counter()
    if other.decision.sampling_mean and any(v is not None for _, v in staged.variants):
        # The other model answers as it would when served, over the variants too: one call per map.
        answers = np.stack([
            guarded(staged.request, lambda x=np.concatenate([staged.prepared[i:i + 1], *([] if v is None else [v])]):
                    other.predict(x)).mean(axis=0)
            for i, (_, v) in enumerate(staged.variants)])
    else:
        answers = guarded(staged.request, lambda: other.predict(staged.prepared))
    for i, (mine, theirs) in enumerate(zip(probabilities, answers)):
        a, b = defective(predictor.classes, mine), defective(other.classes, theirs)
        staged.reports[i]["cross_check"] = {"model": other.describe(), "classes": list(other.classes),
                                            "probabilities": [round(float(v), 4) for v in theirs]}
        if abs(a - b) > DISAGREEMENT:
            staged.warnings_per[i].append(make_warning(
                "MODELS_DISAGREE",
                f"P(defective) is {a:.2f} by {predictor.describe()['name']} and {b:.2f} by "
                f"{other.describe()['name']}: the two models contradict each other on this map, so neither "
                "answer is reliable"))
    staged.timings["cross_check"] = (time.perf_counter() - t0) * 1e3


def check_ood(predictor, staged, ood) -> None:
    """Record each map's out-of-distribution score in its report and warn ``OUT_OF_DISTRIBUTION`` above the
    model's threshold: the map is unlike anything the model was trained on, whatever its probabilities say."""
    threshold = predictor.decision.ood_threshold
    if ood is None:
        return
    for i, score in enumerate(ood):
        staged.reports[i]["ood_score"] = round(float(score), 3)
        if threshold is not None and not float(score) <= threshold:  # NaN is out of distribution too
            staged.warnings_per[i].append(make_warning(
                "OUT_OF_DISTRIBUTION",
                f"the map is unlike the training data (out-of-distribution score {float(score):.1f} > {threshold:.1f}, "
                "the 99th percentile of held-out simulated maps): the answer is not reliable"))


def decisions(predictor, probabilities: np.ndarray, warnings: list, warnings_per: list, batch: bool) -> dict:
    """The reply's ``decision`` and ``verdict`` (lists for a batch) and ``decision_detail`` (``model.decision``)."""
    rule = predictor.decision
    common = [w["reason"] for w in warnings]
    made = [decide(predictor.classes, row, rule, common + [w["reason"] for w in warnings_per[i]])
            for i, row in enumerate(probabilities)]
    detail = {"calibrated": rule.calibrated, "risk": rule.risk, "threshold": rule.threshold,
              "defective_threshold": rule.defective_threshold, "ood_threshold": rule.ood_threshold,
              "sampling_mean": rule.sampling_mean}
    if batch:
        return {"decision": [m["decision"] for m in made], "verdict": [m["verdict"] for m in made],
                "decision_detail": {**detail, "reasons": [m["reasons"] for m in made]}}
    return {"decision": made[0]["decision"], "verdict": made[0]["verdict"],
            "decision_detail": {**detail, "reasons": made[0]["reasons"]}}
