"""``python -m defectscope.training.card_notes``: records merged into a model's card, in the file and beside it."""

from __future__ import annotations

import json

import numpy as np
import pytest


def test_notes_are_merged_into_the_card_and_nothing_else_changes(tmp_path):
    from defectscope.model.fixture import build_fixture_model
    from defectscope.model.predictor import Predictor
    from defectscope.training import card_notes
    from defectscope.training.export import card_path

    model = build_fixture_model(tmp_path / "small.onnx", pool=16)
    before = Predictor(model, provider="cpu", warmup=False)
    x = np.random.default_rng(1).random((2, *before.pipeline.shape)).astype(np.float32)
    expected = before.predict(x)
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"previous_version": "0.9", "known_limits": "a fixture: answers nothing real"}))
    assert card_notes.main([str(model), "--merge", str(notes)]) == 0

    after = Predictor(model, provider="cpu", warmup=False)
    assert after.card["previous_version"] == "0.9" and after.card["known_limits"].startswith("a fixture")
    assert {k: v for k, v in after.card.items() if k not in ("previous_version", "known_limits")} == \
        {k: v for k, v in before.card.items() if k not in ("previous_version", "known_limits")}
    assert json.loads(card_path(model).read_text()) == after.card
    assert after.pipeline == before.pipeline
    np.testing.assert_array_equal(after.predict(x), expected)

    notes.write_text("[1, 2]")
    with pytest.raises(SystemExit):
        card_notes.main([str(model), "--merge", str(notes)])
