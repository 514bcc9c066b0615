"""A raw scan of a small crystal (many voxels per fringe) is gridded at a coarser voxel that lands it in the
trained range (``preprocessing.scan_prepare``), instead of being gridded finely and resampled."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.preprocessing.frames import CANONICAL_AXES
from defectscope.preprocessing.orthonormalise import Orthonormaliser
from defectscope.preprocessing.pipeline import prepare
from defectscope.preprocessing.scan_prepare import binning_for
from defectscope.server.core import Classifier

from test_orthonormalise import N, SHAPE, pixel_q_lab, synthetic_geometry
from test_scan_window import scan_request


def small_crystal_scan(widen: float):
    """A Gaussian peak ``widen`` times as wide as ``make_synthetic``'s (a crystal that much smaller), Poisson."""
    geometry = synthetic_geometry()
    q = pixel_q_lab(geometry, np.arange(N))
    d = q - q[N // 2 + 1, SHAPE[0] // 2 - 2, SHAPE[1] // 2 + 2]
    widths = widen * np.array([2e-3, 1.2e-3, 2.5e-3])
    r2 = ((d / widths) ** 2).sum(-1)
    frames = np.random.default_rng(3).poisson(2e4 * np.exp(-0.5 * r2) + 0.2).astype(np.int32)
    return geometry, frames


@pytest.fixture(scope="module")
def wide_scan():
    return small_crystal_scan(2.6)


def test_binning_follows_the_largest_resampling_factor():
    high = ["high"] * 3
    assert binning_for({"resample_factor": [0.3, 0.45, 0.2], "oversampling_confidence": high}).tolist() == [2, 2, 2]
    assert binning_for({"resample_factor": [0.3, 0.33, 0.2], "oversampling_confidence": high}).tolist() == [3, 3, 3]
    # One axis in range (or near it) keeps the voxel; so does an axis whose sampling is not known well.
    assert binning_for({"resample_factor": [0.3, 0.56, 0.2], "oversampling_confidence": high}).tolist() == [1, 1, 1]
    assert binning_for({"resample_factor": [0.3, 0.3, 0.3], "oversampling_confidence": ["high", "low", "high"]}).tolist() == [1, 1, 1]


def test_small_crystal_scan_is_gridded_at_the_voxel_that_lands_it_in_range(predictor, wide_scan):
    geometry, frames = wide_scan
    config = predictor.pipeline
    fine = Orthonormaliser()(frames, geometry)
    native = prepare(fine.volume, config, axes=CANONICAL_AXES, voxel_size=list(fine.voxel_size)).report
    step = binning_for(native)
    assert np.any(step > 1), native["resample_factor"]  # the scan is oversampled at least twice the range on an axis

    outcome = Classifier(predictor, sampling_check=False).classify(scan_request(frames, geometry))
    served = outcome.reply["preparation"]
    where = served["scan_window"]
    assert where["binning"] == step.tolist()
    lo, hi = config.oversampling_range
    # On the coarse grid the least oversampled axis is resampled by a factor closer to 1 than 1/2.
    assert max(served["resample_factor"]) > 0.5
    np.testing.assert_allclose(np.array(served["oversampling_per_axis"]) * step, native["oversampling_per_axis"], rtol=0.15)
    assert all(lo - 1e-6 <= s <= hi + 1e-6 for s in served["oversampling_after"])
    np.testing.assert_allclose(served["frame"]["voxel_size_out"], fine.voxel_size * step, rtol=1e-12)
    # The served map is prepare() of that coarse box, whatever else the server does around it.
    ortho = Orthonormaliser()
    box, _ = ortho.finish_window(ortho.accumulate(frames, geometry), np.array(where["window_shape"]) // step,
                                 centre=where["window_centre"], binning=step)
    expected = prepare(box.volume, config, axes=CANONICAL_AXES, voxel_size=list(box.voxel_size))
    np.testing.assert_array_equal(np.frombuffer(outcome.frames[0], dtype="<f4").reshape(config.shape), expected.array)
    assert served["oversampling_per_axis"] == expected.report["oversampling_per_axis"]


def test_a_scan_in_range_is_not_binned(predictor):
    geometry, frames = small_crystal_scan(1.0)
    outcome = Classifier(predictor, sampling_check=False).classify(scan_request(frames, geometry))
    assert "binning" not in outcome.reply["preparation"]["scan_window"]
