"""Add records to a model's card: what it was fine-tuned from, the commands that made its data and its
evaluations, where those evaluations are, and its known limits.

    python -m defectscope.training.card_notes MODEL.onnx --merge NOTES.json

``NOTES.json`` holds an object whose keys replace the card's (``previous_version``, ``commands``,
``known_limits``, ...). The card is written into the model file's metadata and beside it (``.card.json``), as
``export`` does; the weights, the pipeline and the decision rule are unchanged. Figures belong in the
evaluation files the notes name, written after this runs: an evaluation names the model by its sha256, which
any change of the card changes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    import onnx

    from defectscope.model.metadata import parse_metadata
    from defectscope.training.export import card_path, set_metadata

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--merge", type=Path, required=True, help="JSON object whose keys replace the card's")
    args = parser.parse_args(argv)
    proto = onnx.load(str(args.model))
    props = {p.key: p.value for p in proto.metadata_props}
    contract = parse_metadata(props, source=str(args.model))
    card = dict(contract.card)
    notes = json.loads(args.merge.read_text())
    if not isinstance(notes, dict):
        parser.error(f"{args.merge} must hold a JSON object")
    card.update(notes)
    set_metadata(proto, contract.pipeline, card)  # other keys (the decision rule) are kept
    onnx.checker.check_model(proto)
    onnx.save(proto, str(args.model))
    card_path(args.model).write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
