"""``training.coarsen``: simulated maps gridded at a coarser voxel, as the server's gridder would."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from defectscope.training.coarsen import (
    centred,
    coarse_indices,
    draw_factor,
    grid_coarser,
    main,
    write_coarse,
)
from defectscope.training.map_files import open_map_file
from defectscope.training.runner import simulate_dataset
from defectscope.training.sim_config import SimulationConfig

from defectscope.errors import BadMessage


def test_an_integer_factor_is_the_block_mean():
    rng = np.random.default_rng(0)
    counts = rng.poisson(50.0, size=(8, 6, 4)).astype(np.uint32)
    coarse, mask = grid_coarser(counts, None, 2.0)
    blocks = counts.reshape(4, 2, 3, 2, 2, 2).mean(axis=(1, 3, 5))
    assert coarse.shape == (4, 3, 2) and np.allclose(coarse, blocks) and not mask.any()


def test_each_voxel_goes_whole_to_the_coarse_voxel_holding_its_centre():
    idx = coarse_indices(6, 1.5, 0.0)  # centres 0.5, 1.5, ... 5.5 in bins [0, 1.5), [1.5, 3), ...
    assert list(idx) == [0, 1, 1, 2, 3, 3]
    assert list(coarse_indices(4, 2.0, 1.0)) == [0, 1, 1, 2]  # the grid's origin one fine voxel earlier
    with pytest.raises(BadMessage, match="factor"):
        coarse_indices(4, 0.5, 0.0)
    with pytest.raises(BadMessage, match="origin"):
        coarse_indices(4, 2.0, 2.0)


def test_masked_voxels_are_left_out_and_a_voxel_with_none_left_is_masked():
    counts = np.arange(16, dtype=np.float64).reshape(4, 4, 1)
    mask = np.zeros_like(counts, dtype=np.uint8)
    mask[0, 0, 0] = 1               # one of four in the first coarse voxel
    mask[2:4, 2:4, 0] = 1           # the whole last one
    coarse, cmask = grid_coarser(counts, mask, 2.0)
    assert coarse[0, 0, 0] == pytest.approx((1 + 4 + 5) / 3)
    assert cmask[1, 1, 0] == 1 and coarse[1, 1, 0] == 0 and cmask.sum() == 1


def test_the_factor_puts_the_mean_oversampling_in_range_and_never_refines():
    rng = np.random.default_rng(1)
    for _ in range(50):
        os_ = rng.uniform(2.0, 6.0, size=3)
        b = draw_factor(os_, 1.3, 2.1, rng)
        mean = float(np.exp(np.mean(np.log(os_ / b))))
        assert b >= 1.0 and (1.3 - 1e-9 <= mean <= 2.1 + 1e-9 or b == 1.0)
    assert draw_factor([1.0, 1.0, 1.0], 1.3, 2.1, rng) == 1.0
    padded = centred(np.ones((3, 5, 4)), (8, 8, 8))
    assert padded.sum() == 60 and padded[2:5, 1:6, 2:6].all()
    with pytest.raises(BadMessage, match="fit"):
        centred(np.ones((9, 1, 1)), (8, 8, 8))


def test_a_coarse_file_is_labelled_maps_with_the_coarse_sampling(tmp_path):
    data = simulate_dataset(10, tmp_path / "d.h5", SimulationConfig(orientations_per_configuration=2), seed=4,
                            workers=1, progress=False)
    out = tmp_path / "c.h5"
    assert main(["--data", str(data), "--split", "train", "--n", "3", "--seed", "5", "--out", str(out)]) == 0
    with h5py.File(out) as c, h5py.File(data) as d:
        src = c["parameters/source_index"][()]
        assert len(src) == 3 and set(d["split"][()][src]) == {0} and set(c["split"][()]) == {0}
        assert np.array_equal(c["labels"][()], d["labels"][()][src])
        b, origin = c["parameters/coarsening_factor"][()], c["parameters/coarsening_origin"][()]
        assert np.allclose(c["parameters/oversampling"][()] * b[:, None], d["parameters/oversampling"][()][src])
        assert np.all((1.3 - 1e-9 <= np.exp(np.log(c["parameters/oversampling"][()]).mean(axis=1))) | (b == 1.0))
        for k in range(3):  # each map is its source gridded coarser, at the centre of the source's shape
            coarse, cmask = grid_coarser(d["counts"][src[k]], d["mask"][src[k]], b[k], origin[k])
            shape = d["counts"].shape[1:]
            assert np.array_equal(c["maps"][k], centred(coarse, shape))
            assert np.array_equal(c["mask"][k], centred(cmask, shape)) and c["mask"][k].sum() == cmask.sum()
    mf = open_map_file(out)  # what train and evaluate read
    try:
        assert mf.n == 3 and list(mf.indices("train")) == [0, 1, 2] and "element" in mf.parameters()
    finally:
        mf.close()
    with pytest.raises(BadMessage, match="split"):
        write_coarse(data, tmp_path / "x.h5", split="nope")
    with pytest.raises(BadMessage, match="at least 1"):
        write_coarse(data, tmp_path / "x.h5", n=0)
    with pytest.raises(BadMessage, match="oversampling"):
        write_coarse(data, tmp_path / "x.h5", oversampling=(2.0, 1.0))
