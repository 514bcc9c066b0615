"""``TrainConfig``: every knob of one training run, with the paper's values for what is left ``None``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from defectscope.training import data as data_mod
from defectscope.training.model import CLASS_SETS, Architecture, default_architecture

from defectscope.errors import BadMessage

FINE_TUNE_LR_FACTOR = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of one training run; recorded in the checkpoint state and the model card.

    ``None`` learning rates and batch take the paper's value for the class count: 3 classes lr 1e-3
    (then 5e-4), batch 64; 2 classes lr 2e-3 (then 1e-3), batch 32.
    """

    classes: int = 3
    epochs: int = 150
    batch: int | None = None
    learning_rate: float | None = None
    final_learning_rate: float | None = None
    plateau_patience: int = 10
    stop_patience: int = 15
    seed: int = 0
    augment: bool = True
    cache: bool = True
    architecture: dict | None = None
    parity_maps: int = 100
    # Repeat factors per simulated position mode in each training epoch, e.g. {"RPD": 3}: the rare,
    # hard random-position dislocations are seen more often without changing the dataset. Maps of files
    # without position modes (measured maps) keep factor 1. Validation and test are never repeated.
    oversample: dict | None = None
    split_fractions: tuple[float, float, float] = data_mod.DEFAULT_SPLIT_FRACTIONS

    def __post_init__(self):
        if self.classes not in CLASS_SETS:
            raise BadMessage(f"classes must be 3 or 2, got {self.classes!r}")
        for name in ("epochs", "plateau_patience", "stop_patience", "parity_maps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "epochs" else 0):
                raise BadMessage(f"train config {name} must be a non-negative integer (epochs >= 1), got {value!r}")
        if self.batch is not None and (not isinstance(self.batch, int) or self.batch < 1):
            raise BadMessage(f"train config batch must be a positive integer, got {self.batch!r}")
        for name in ("learning_rate", "final_learning_rate"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < 1):
                raise BadMessage(f"train config {name} must lie in (0, 1), got {value!r}")
        if self.oversample is not None:
            if not isinstance(self.oversample, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 100
                    for k, v in self.oversample.items()):
                raise BadMessage(f"train config oversample must map position modes to integers 1-100, got {self.oversample!r}")
            unknown = sorted(set(self.oversample) - set(data_mod.POSITION_MODES))
            if unknown:
                raise BadMessage(f"train config oversample has unknown position modes {unknown} (known: {list(data_mod.POSITION_MODES)})")
        if self.architecture is not None:
            try:
                Architecture.from_dict(self.architecture)
            except (TypeError, KeyError) as exc:
                raise BadMessage(f"train config architecture is malformed: {exc}") from None
        object.__setattr__(self, "split_fractions", tuple(float(v) for v in self.split_fractions))

    @property
    def paper_defaults(self) -> dict:
        return {3: {"batch": 64, "learning_rate": 1e-3, "final_learning_rate": 5e-4},
                2: {"batch": 32, "learning_rate": 2e-3, "final_learning_rate": 1e-3}}[self.classes]

    def resolved(self, fine_tune: bool = False) -> "TrainConfig":
        """Fill the ``None`` fields (paper values; a tenth of the rates when fine-tuning)."""
        d = self.paper_defaults
        factor = FINE_TUNE_LR_FACTOR if fine_tune else 1.0
        arch = self.architecture or default_architecture(self.classes).to_dict()
        return dataclasses.replace(
            self,
            batch=self.batch or d["batch"],
            learning_rate=self.learning_rate or d["learning_rate"] * factor,
            final_learning_rate=self.final_learning_rate or d["final_learning_rate"] * factor,
            architecture=arch,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["split_fractions"] = list(self.split_fractions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BadMessage(f"train config has unknown options {unknown}")
        return cls(**d)
