"""``training.subset``: some configurations of a dataset, finished or still being written, as a dataset."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from defectscope.errors import BadMessage
from defectscope.training.dataset import PARAMETERS
from defectscope.training.map_files import open_map_file
from defectscope.training.runner import simulate_dataset
from defectscope.training.sim_config import SimulationConfig
from defectscope.training.subset import main, write_subset

from test_sim_dataset import stop_after

CFG = SimulationConfig(orientations_per_configuration=2, gap_probability=0.5)  # masks: some chunks allocated


def same(a, b, lo, hi):
    assert np.array_equal(a["counts"][()], b["counts"][lo:hi]) and np.array_equal(a["mask"][()], b["mask"][lo:hi])


def test_a_finished_dataset_subset_is_a_dataset_of_those_configurations(tmp_path):
    data = simulate_dataset(12, tmp_path / "d.h5", CFG, seed=3, workers=1, progress=False)
    out = write_subset(data, 2, 5, tmp_path / "s.h5", "test")
    with h5py.File(out) as a, h5py.File(data) as b:
        same(a, b, 4, 10)
        masked = a["mask"][()].reshape(6, -1).any(axis=1)
        assert masked.any() and not masked.all()  # allocated mask chunks copied, unallocated ones left all-zero
        assert np.array_equal(a["labels"][()], b["labels"][4:10]) and set(a["split"][()]) == {2}
        for name in PARAMETERS:
            x, y = a["parameters"][name][()], b["parameters"][name][4:10]
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
        assert a.attrs["n_patterns"] == 6 and a.attrs["n_configurations"] == 3
    mf = open_map_file(out)  # what evaluate and realistic_eval read
    try:
        assert mf.n == 6 and list(mf.indices("test")) == list(range(6)) and mf.parameters()["element"].shape == (6,)
    finally:
        mf.close()
    with pytest.raises(BadMessage, match="outside"):
        write_subset(data, 4, 9, tmp_path / "x.h5")


def test_a_partial_dataset_gives_what_it_has_written(tmp_path, monkeypatch):
    stop_after(monkeypatch, 6)  # three configurations of two orientations
    with pytest.raises(KeyboardInterrupt):
        simulate_dataset(12, tmp_path / "d.h5", CFG, seed=3, workers=1, progress=False)
    monkeypatch.undo()
    whole = simulate_dataset(12, tmp_path / "w.h5", CFG, seed=3, workers=1, progress=False)
    partial = tmp_path / "d.h5.partial"
    assert main(["--data", str(partial), "--configurations", "1:3", "--out", str(tmp_path / "s.h5")]) == 0
    with h5py.File(tmp_path / "s.h5") as a, h5py.File(whole) as b:
        same(a, b, 2, 6)
        assert np.array_equal(a["labels"][()], b["labels"][2:6])
    with pytest.raises(BadMessage, match="so far"):
        write_subset(partial, 2, 4, tmp_path / "y.h5")
