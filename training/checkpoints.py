"""What an interrupted run continues from: the epoch loop's state (``LoopState``, written after every epoch
into ``CHECKPOINT_DIR/STATE_FILE``), the model checkpoints, and dropout seeded per epoch (``reseed``) so
that a resumed epoch drops what it would have."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
STATE_VERSION = 1


@dataclass
class LoopState:
    """What the epoch loop needs to continue exactly: written after every epoch."""

    epoch: int = 0  # epochs completed
    best_val_accuracy: float = -1.0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    since_best: int = 0
    lowered: bool = False
    learning_rate: float = 0.0
    history: list = dataclasses.field(default_factory=list)
    model_file: str = ""
    best_file: str = ""
    stopped: str = ""

    def improved(self, acc: float, loss: float) -> bool:
        # Ties in accuracy (small validation sets) are broken by the loss.
        return acc > self.best_val_accuracy or (acc == self.best_val_accuracy and loss < self.best_val_loss)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def reseed(model, seed: int, epoch: int) -> None:
    """Set every dropout layer's random state from (seed, epoch): a resumed epoch drops what it would have."""
    import keras

    for k, layer in enumerate(model.layers):
        gen = getattr(layer, "seed_generator", None)
        if gen is not None:
            base = (seed * 1_000_003 + k * 7919) % (2**31 - 1)
            gen.state.assign(keras.ops.convert_to_tensor([base, epoch * 1_000_000], dtype=gen.state.dtype))


def load_model_compiled(path):
    """A checkpoint's model with its optimizer state (the temperature layer registered first)."""
    import keras
    from defectscope.training.model import temperature_scaling_class

    temperature_scaling_class()
    return keras.models.load_model(path, compile=True)
