"""The models one server serves, by the name requests give them (SPEC §4 ``model``)."""

from __future__ import annotations

from collections.abc import Mapping

from defectscope.errors import ModelUnavailable


def model_name(classifier) -> str:
    """A classifier's model name (its card's), as requests name it."""
    return classifier.predictor.describe()["name"]


class ModelSet(dict):
    """name -> ``Classifier``, the first the default. One ``Classifier`` makes a set of one, named by its card.
    Every model of a set applies the same ``Limits`` (one queue, one size check on the wire)."""

    def __init__(self, classifiers):
        super().__init__(classifiers if isinstance(classifiers, Mapping) else {model_name(classifiers): classifiers})
        if not self:
            raise ValueError("a server needs at least one model")
        if len({c.limits for c in self.values()}) != 1:
            raise ValueError("every model of one server must apply the same limits")
        self.default = next(iter(self))

    def pick(self, header: dict):
        """``(name, classifier)`` of the model a request's header names (``"model"``), else the default."""
        name = header.get("model") if isinstance(header, dict) else None
        if name is None:
            return self.default, self[self.default]
        if not isinstance(name, str) or name not in self:
            raise ModelUnavailable(f"model {str(name)[:64]!r} is not served here; models: {', '.join(self)}")
        return name, self[name]

    def replace(self, name: str, new) -> None:
        """Serve ``new`` as model ``name`` (one assignment: a request holds the classifier it started on); the
        other models' cross-check moves to it when it was their cross-check."""
        old = self[name]
        self[name] = new
        for other in self.values():
            if other is not new and other.cross_check is old.predictor:
                other.cross_check = new.predictor

    def describe(self) -> dict:
        """Every model, by name: identity, classes and card; which is the default."""
        return {name: {"model": c.predictor.describe(), "classes": list(c.predictor.classes), "card": c.predictor.card,
                       "default": name == self.default} for name, c in self.items()}
