"""Temperature scaling (Guo et al. 2017) and calibration metrics; numpy/scipy only.

One scalar T > 0 divides the logits before the softmax. It is fitted on the validation split by minimising
the negative log-likelihood, which leaves every argmax (so the accuracy) unchanged and only makes the
probabilities honest: a network stopped at its validation-accuracy maximum is usually over-confident.
"""

from __future__ import annotations

import numpy as np

# A validation split classified all right with margin drives the NLL optimum towards T -> 0 (ever sharper
# probabilities, the data cannot say how sharp): the lower bound keeps such a fit from making the model
# absurdly over-confident. Typical fitted values lie between 0.5 and 3.
T_BOUNDS = (0.2, 10.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """T minimising the NLL of ``labels`` under softmax(logits / T); 1.0 without data.

    A bounded 1-D search over log T (the NLL is smooth and unimodal in T for fixed logits). When every
    example is already right with margin, the NLL keeps falling as T -> 0; ``T_BOUNDS`` stops it.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.shape[0] == 0:
        return 1.0
    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    result = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=(lo, hi),
                             method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict:
    """ECE over equal-width confidence bins of the top-class probability, with the reliability table."""
    p = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if p.shape[0] == 0:
        return {"ece": None, "n_bins": n_bins, "bins": []}
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        sel = which == b
        if not sel.any():
            continue
        acc, conf, frac = correct[sel].mean(), confidence[sel].mean(), sel.mean()
        ece += frac * abs(acc - conf)
        bins.append({"low": round(edges[b], 4), "high": round(edges[b + 1], 4), "count": int(sel.sum()),
                     "accuracy": float(acc), "confidence": float(conf)})
    return {"ece": float(ece), "n_bins": n_bins, "bins": bins}
