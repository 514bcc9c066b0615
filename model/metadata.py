"""The model contract of SPEC §3: tensor names, shapes and the ``defectscope.*`` metadata keys.

A model file that does not carry a valid pipeline config and card is refused here, before anything
is served from it, with a message that says which part is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from defectscope.errors import ModelUnavailable
from defectscope.preprocessing.config import PipelineConfig

INPUT_NAME = "cxdp"
OUTPUT_NAME = "probabilities"
PIPELINE_KEY = "defectscope.pipeline"
CARD_KEY = "defectscope.card"
CARD_REQUIRED = ("name", "version", "classes")
KNOWN_CLASS_SETS = (("defect_free", "screw", "edge"), ("defect_free", "defective"))


@dataclass(frozen=True)
class ModelContract:
    pipeline: PipelineConfig
    card: dict

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.card["classes"])

    @property
    def name(self) -> str:
        return str(self.card["name"])

    @property
    def version(self) -> str:
        return str(self.card["version"])


def parse_metadata(props: dict, source: str = "model") -> ModelContract:
    """Check the metadata_props of an ONNX model and return its pipeline config and card."""
    missing = [k for k in (PIPELINE_KEY, CARD_KEY) if k not in props]
    if missing:
        raise ModelUnavailable(f"{source}: metadata_props lacks {', '.join(missing)} (SPEC §3); not a defectscope model")
    try:
        pipeline = PipelineConfig.from_json(props[PIPELINE_KEY])
    except Exception as exc:  # BadMessage from the config, reported as an unusable model
        raise ModelUnavailable(f"{source}: bad {PIPELINE_KEY}: {exc}") from None
    try:
        card = json.loads(props[CARD_KEY])
    except ValueError as exc:
        raise ModelUnavailable(f"{source}: {CARD_KEY} is not valid JSON: {exc}") from None
    if not isinstance(card, dict):
        raise ModelUnavailable(f"{source}: {CARD_KEY} must be a JSON object")
    absent = [k for k in CARD_REQUIRED if k not in card]
    if absent:
        raise ModelUnavailable(f"{source}: card lacks {', '.join(absent)}")
    classes = card["classes"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise ModelUnavailable(f"{source}: card classes must be a non-empty list of names")
    if len(set(classes)) != len(classes):
        raise ModelUnavailable(f"{source}: card classes repeat a name: {classes}")
    return ModelContract(pipeline=pipeline, card=card)
