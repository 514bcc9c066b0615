"""The server grids a raw scan into a box around the peak only; the prepared map is that of the whole grid."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.preprocessing.frames import CANONICAL_AXES
from defectscope.preprocessing.orthonormalise import Orthonormaliser
from defectscope.preprocessing.pipeline import prepare
from defectscope.server.core import Classifier
from defectscope.server.protocol import Request

from test_orthonormalise import make_synthetic


class SmallBoxClassifier(Classifier):
    """Cuts a box too small for the resampling, so the re-cut path has to run."""

    def scan_window(self) -> int:
        return 20


def scan_request(frames, geometry) -> Request:
    return Request(op="classify", request_id="scan-w", header={}, kind="scan", array=frames,
                   spec={"geometry": geometry.to_dict()}, options={"return_prepared": True})


@pytest.fixture(scope="module")
def synthetic_scan():
    geometry, frames, _ = make_synthetic()
    return geometry, frames


@pytest.mark.parametrize("cls", [Classifier, SmallBoxClassifier])
def test_scan_prepared_from_a_box_equals_prepared_from_the_whole_grid(predictor, synthetic_scan, cls):
    geometry, frames = synthetic_scan
    classifier = cls(predictor)
    outcome = classifier.classify(scan_request(frames, geometry))
    served = np.frombuffer(outcome.frames[0], dtype="<f4").reshape(predictor.pipeline.shape)
    whole = Orthonormaliser()(frames, geometry)
    expected = prepare(whole.volume, predictor.pipeline, axes=CANONICAL_AXES, voxel_size=list(whole.voxel_size))
    np.testing.assert_array_equal(served, expected.array)
    where = outcome.reply["preparation"]["scan_window"]
    assert where["grid_shape"] == list(whole.volume.shape)
    if cls is SmallBoxClassifier:  # the first box of 20 was too small for the margins: re-cut larger
        assert min(where["window_shape"]) > 20 or where["window_shape"] == where["grid_shape"]


def test_block_sums_made_at_the_end_place_the_same_box(synthetic_scan):
    """``accumulate(blocks=False)`` (the whole-grid path skips the per-frame block sums) still lets
    ``finish_window`` place its box: the sums it then makes from the voxel sums give the same box."""
    geometry, frames = synthetic_scan
    o = Orthonormaliser()
    kept = o.accumulate(frames, geometry)
    later = o.accumulate(frames, geometry, blocks=False)
    assert later.block_total is None
    a, where_a = o.finish_window(kept, 24)
    b, where_b = o.finish_window(later, 24)
    np.testing.assert_allclose(later.block_total, kept.block_total, rtol=1e-12, atol=1e-9)
    assert where_a == where_b
    np.testing.assert_array_equal(a.volume, b.volume)


def test_measured_scan_without_sampling_check_is_prepared_from_the_smaller_box_as_from_the_grid(predictor):
    """Without the sampling check the first box is only what the preparation reads in the trained range
    (82 voxels for a 64^3 model); on the measured 34-ID-C scan (grid 244 x 155 x 256) it gives the map of
    the whole grid."""
    from defectscope.server.demo import load_measured_scan

    measured = load_measured_scan()
    if measured is None:
        pytest.skip("../shared/data (APS 34-ID-C scan) not present")
    frames, geometry, mask = measured
    classifier = Classifier(predictor, sampling_check=False)
    assert classifier.scan_window() < Classifier(predictor).scan_window()
    outcome = classifier.classify(Request(op="classify", request_id="scan-lean", header={}, kind="scan", array=frames,
                                          mask=mask, spec={"geometry": geometry}, options={"return_prepared": True}))
    served = np.frombuffer(outcome.frames[0], dtype="<f4").reshape(predictor.pipeline.shape)
    whole = Orthonormaliser()(frames, geometry, mask=mask)
    expected = prepare(whole.volume, predictor.pipeline, axes=CANONICAL_AXES, voxel_size=list(whole.voxel_size))
    np.testing.assert_array_equal(served, expected.array)
    assert outcome.reply["preparation"]["scan_window"]["window_shape"][0] < whole.volume.shape[0]
