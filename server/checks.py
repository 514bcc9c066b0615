"""What a reply says about how far to trust its answer (``Classifier._reply``), beside the answer itself.

- ``check_sampling``: the map's answer against its answers at other oversamplings across the trained
  range (``Preparation.sampling_variants``); a label that changes is warned ``SAMPLING_SENSITIVE``.
- ``check_models``: a second model asked on the same prepared map; P(defective) that differs by more
  than ``DISAGREEMENT`` is warned ``MODELS_DISAGREE``.

``staged`` is the classifier's prepared request (its ``reports``, ``warnings_per``, ``variants``,
``prepared``, ``timings``); ``guarded`` runs a step so that any failure becomes a protocol reason.
"""

from __future__ import annotations

import time

import numpy as np

from defectscope.preprocessing.validate import make_warning

# Largest |P(defective) by one model - P(defective) by the other| still called agreement (MODELS_DISAGREE).
DISAGREEMENT = 0.3


def defective(classes, probabilities) -> float:
    """P(defective) = 1 - P(defect_free); the classes must include ``defect_free`` (checked by the
    ``Classifier`` that takes a cross-check)."""
    return float(1.0 - probabilities[list(classes).index("defect_free")])


def check_sampling(predictor, staged, probabilities: np.ndarray, guarded) -> None:
    """Compare each map's answer with the answers on its sampling variants (``Preparation.sampling_variants``):
    the variants' labels and probabilities go into its report as ``sampling_check``, and a label that
    changes with the sampling is warned ``SAMPLING_SENSITIVE``: on such a map the answer is not reliable."""
    t0 = time.perf_counter()
    classes = list(predictor.classes)
    for i, (targets, variants) in enumerate(staged.variants):
        if variants is None:
            continue
        answers = guarded(staged.request, lambda v=variants: predictor.predict(v))
        labels = [classes[int(k)] for k in np.argmax(answers, axis=1)]
        label = classes[int(np.argmax(probabilities[i]))]
        staged.reports[i]["sampling_check"] = {
            "oversampling": list(targets), "labels": labels,
            "probabilities": [[round(float(v), 4) for v in row] for row in answers]}
        if any(other != label for other in labels):
            shown = ", ".join(f"{lab} at {t:g}" for lab, t in zip(labels, targets))
            staged.warnings_per[i].append(make_warning(
                "SAMPLING_SENSITIVE",
                f"the answer {label} changes when the map is sampled elsewhere in the trained range "
                f"({shown}): it depends on how the map was gridded and is not reliable"))
    staged.timings["sampling_check"] = (time.perf_counter() - t0) * 1e3


def check_models(predictor, other, staged, probabilities: np.ndarray, guarded) -> None:
    """Ask the cross-check model on the same prepared maps; say where the two disagree on whether the
    crystal is defective (P(defective) = 1 - P(defect_free) for either model)."""
    t0 = time.perf_counter()
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

