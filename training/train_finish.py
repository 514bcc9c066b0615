"""The end of a training run, after its epochs: the temperature fitted on the validation split, the check
that the exported ONNX graph answers as the Keras model does, and the training curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectscope.errors import Internal


def fit_validation_temperature(model, val, batch: int) -> tuple[float, dict]:
    """Fit the temperature on the validation split (1 when there is none), set it in ``model`` and return it
    with what it did to the validation NLL."""
    from defectscope.training import calibration
    from defectscope.training.model import logits_model, set_temperature

    temperature, calib = 1.0, {"fitted_on": None}
    if len(val):
        set_temperature(model, 1.0)
        logits, labels = split_logits(logits_model(model), val, batch)
        temperature = calibration.fit_temperature(logits, labels)
        calib = {"fitted_on": "validation", "n": int(labels.size),
                 "nll_before": round(calibration.nll(logits, labels, 1.0), 5),
                 "nll_after": round(calibration.nll(logits, labels, temperature), 5)}
    set_temperature(model, temperature)
    return temperature, calib


def export_parity(model, onnx_path: Path, streams: dict, n_maps: int) -> tuple[float, int]:
    """The largest |ONNX - Keras| difference on up to ``n_maps`` maps of the test split (else validation, else
    train), and how many maps; refused above ``export.PARITY_TOLERANCE``."""
    from defectscope.training import export

    val = streams["validation"]
    parity_stream = streams["test"] if len(streams["test"]) else val if len(val) else streams["train"]
    maps, _ = parity_stream.arrays(limit=n_maps)
    worst = export.parity(model, onnx_path, maps)
    if not worst <= export.PARITY_TOLERANCE:
        raise Internal(f"ONNX and Keras disagree by {worst:.3g} (> {export.PARITY_TOLERANCE:g}) on {len(maps)} maps")
    return worst, len(maps)


def split_logits(model, stream, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of a whole split, batch by batch (the split is streamed, not held)."""
    out, labels = [], []
    xs, ys = [], []
    for x, y in stream():
        xs.append(x)
        ys.append(int(np.argmax(y)))
        if len(xs) == batch:
            out.append(np.asarray(model(np.stack(xs), training=False)))
            labels += ys
            xs, ys = [], []
    if xs:
        out.append(np.asarray(model(np.stack(xs), training=False)))
        labels += ys
    return np.concatenate(out), np.asarray(labels, dtype=np.int64)


def plot_history(history: list, path: Path, best_epoch: int) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(epochs, [h["accuracy"] for h in history], label="train")
    a.plot(epochs, [h["val_accuracy"] for h in history], label="validation")
    a.set_xlabel("epoch")
    a.set_ylabel("accuracy")
    b.plot(epochs, [h["loss"] for h in history], label="train")
    b.plot(epochs, [h["val_loss"] for h in history], label="validation")
    b.set_xlabel("epoch")
    b.set_ylabel("cross-entropy")
    for ax in (a, b):
        if best_epoch:
            ax.axvline(best_epoch, color="0.6", ls="--", lw=0.8)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
