"""When an answer may be given as confident: the calibrated decision rule a model file carries.

A model file may hold, besides SPEC §3's pipeline and card, the metadata key ``defectscope.decision`` (JSON)
and a second graph output ``ood_score`` (float32 ``[batch]``: how unlike the training data a map is, computed
in the same inference call as the probabilities; ``training/decision_fit.py`` writes both):

    {"schema_version": 1, "risk": 0.02,
     "threshold": 0.93,            # the label is confident at max probability >= threshold
     "defective_threshold": 0.97,  # 3-class: the defect question alone is confident at max(P(def), P(free)) >= this
     "ood_threshold": 41.7,        # ood_score above it: OUT_OF_DISTRIBUTION
     "sampling_mean": true,        # the answer is the mean over the map and its sampling-check variants
     "fitted_on": {...}}

With ``sampling_mean`` the server answers with the model's probabilities averaged over the map as prepared and
the same map prepared at oversamplings 2.3, 3.0 and 3.7 (the sampling check's variants, which it infers
anyway): the map's true sampling is known to ~20 %, and the model was trained across that range, so the
answer is marginalised over it. The thresholds are fitted on those averaged probabilities.

``decide`` turns one map's probabilities, its OOD score and the warnings already on it into the reply's
``decision`` (``confident`` / ``uncertain``) and ``verdict``: the most specific answer that is confident,
the label, else ``defective`` (a defective crystal whose character is unclear), else ``uncertain``.
A model without the key is served with ``decision: uncertain`` on every map that carries a warning saying the
answer is unreliable and ``confident`` otherwise, and says it is uncalibrated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from defectscope.errors import ModelUnavailable

DECISION_KEY = "defectscope.decision"
OOD_OUTPUT = "ood_score"
SCHEMA_VERSION = 1
# Warnings with which the answer on a map cannot be confident, whatever its probabilities.
UNRELIABLE = ("SAMPLING_SENSITIVE", "MODELS_DISAGREE", "SAMPLING_UNDETERMINED", "OUT_OF_DISTRIBUTION", "PEAK_NEAR_EDGE")


@dataclass(frozen=True)
class DecisionRule:
    risk: float | None = None
    threshold: float | None = None
    defective_threshold: float | None = None
    ood_threshold: float | None = None
    sampling_mean: bool = False
    fitted_on: dict = field(default_factory=dict)

    @property
    def calibrated(self) -> bool:
        return self.threshold is not None

    def to_json(self) -> str:
        return json.dumps({"schema_version": SCHEMA_VERSION, "risk": self.risk, "threshold": self.threshold,
                           "defective_threshold": self.defective_threshold, "ood_threshold": self.ood_threshold,
                           "sampling_mean": self.sampling_mean, "fitted_on": self.fitted_on}, sort_keys=True)


def parse_decision(props: dict, source: str = "model") -> DecisionRule:
    """The decision rule of a model's metadata_props; an uncalibrated rule when the key is absent."""
    text = props.get(DECISION_KEY)
    if text is None:
        return DecisionRule()
    try:
        d = json.loads(text)
    except ValueError as exc:
        raise ModelUnavailable(f"{source}: {DECISION_KEY} is not valid JSON: {exc}") from None
    if not isinstance(d, dict) or d.get("schema_version") != SCHEMA_VERSION:
        raise ModelUnavailable(f"{source}: {DECISION_KEY} must be an object with schema_version {SCHEMA_VERSION}")

    def number(name, low, high, required=False):
        v = d.get(name)
        if v is None and not required:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
            raise ModelUnavailable(f"{source}: {DECISION_KEY} {name} must be a number in [{low}, {high}], got {v!r}")
        return float(v)

    if not isinstance(d.get("sampling_mean", False), bool):
        raise ModelUnavailable(f"{source}: {DECISION_KEY} sampling_mean must be true or false")
    return DecisionRule(risk=number("risk", 0.0, 1.0, True), threshold=number("threshold", 0.0, 1.0, True),
                        sampling_mean=d.get("sampling_mean", False),
                        defective_threshold=number("defective_threshold", 0.0, 1.0),
                        ood_threshold=number("ood_threshold", 0.0, 1e12),
                        fitted_on=d.get("fitted_on") if isinstance(d.get("fitted_on"), dict) else {})


def p_defective(classes, probabilities) -> float:
    return float(1.0 - probabilities[list(classes).index("defect_free")]) if "defect_free" in classes else float("nan")


def decide(classes, probabilities, rule: DecisionRule, warning_reasons) -> dict:
    """``decision``, ``verdict`` and the reasons for one map (module docstring)."""
    classes = list(classes)
    top = int(max(range(len(classes)), key=lambda k: probabilities[k]))
    confidence = float(probabilities[top])
    blocking = sorted(set(warning_reasons) & set(UNRELIABLE))
    reasons = [f"warning {r}" for r in blocking]
    if rule.calibrated and confidence < rule.threshold:
        reasons.append(f"max probability {confidence:.3f} < {rule.threshold:.3f}")
    if not reasons:
        return {"decision": "confident", "verdict": classes[top], "reasons": []}
    verdict = "uncertain"
    if not blocking and rule.defective_threshold is not None and "defect_free" in classes and len(classes) > 2:
        p = p_defective(classes, probabilities)
        if p >= rule.defective_threshold:
            verdict = "defective"  # the crystal is dislocated; which kind is not clear
        elif 1.0 - p >= rule.defective_threshold:
            verdict = "defect_free"
    return {"decision": "uncertain", "verdict": verdict, "reasons": reasons}
