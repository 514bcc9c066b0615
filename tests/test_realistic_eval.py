"""``training.realistic_eval`` scores every map of a file, or one split of it, stratum by stratum."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from defectscope.training import realistic_eval
from defectscope.training.runner import simulate_dataset
from defectscope.training.sim_config import SimulationConfig


def test_one_split_is_scored_alone(tmp_path, fixture_model):
    cfg = SimulationConfig(orientations_per_configuration=2, split_fractions=(0.5, 0.25, 0.25))
    data = simulate_dataset(16, tmp_path / "d.h5", cfg, seed=5, workers=1, progress=False)
    with h5py.File(data, "r") as f:
        split, labels = f["split"][()], f["labels"][()]
    assert 0 < (split == 2).sum() < len(split)
    out = tmp_path / "eval.json"
    assert realistic_eval.main(["--model", str(fixture_model), "--data", str(data), "--split", "test", "--out", str(out)]) == 0
    table = json.loads(out.read_text())["models"][fixture_model.stem]["files"]["d.h5"]
    assert table["all"]["n"] == (split == 2).sum()
    free = table.get("relaxed=no", {}).get("n")
    assert free == (split == 2).sum()  # nothing relaxed in this config
    probs, _, params = realistic_eval.predict(fixture_model, data, split="test")
    assert probs.shape[0] == (split == 2).sum() and np.array_equal(params["label"], labels[split == 2])
    everything, _, _ = realistic_eval.predict(fixture_model, data)
    np.testing.assert_array_equal(everything[split == 2], probs)


def test_the_twin_of_a_test_split_is_paired_with_it_and_another_file_is_refused(tmp_path, fixture_model):
    cfg = SimulationConfig(orientations_per_configuration=2, split_fractions=(0.5, 0.25, 0.25))
    data = simulate_dataset(16, tmp_path / "d.h5", cfg, seed=5, workers=1, progress=False)
    twin = simulate_dataset(16, tmp_path / "t.h5", cfg, seed=5, workers=1, progress=False, only_split="test")
    out = tmp_path / "eval.json"
    args = ["--model", str(fixture_model), "--data", str(data), "--split", "test", "--out", str(out)]
    assert realistic_eval.main([*args, "--twin", str(twin)]) == 0
    assert "relaxed_vs_unrelaxed_twin" in json.loads(out.read_text())["models"][fixture_model.stem]
    other = simulate_dataset(16, tmp_path / "o.h5", cfg, seed=6, workers=1, progress=False, only_split="test")
    with pytest.raises(SystemExit, match="not the twin"):
        realistic_eval.main([*args, "--twin", str(other)])
