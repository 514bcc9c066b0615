"""A peak cut by a detector edge, chip gap or mask is warned PEAK_NEAR_EDGE and never answered confidently."""

import numpy as np
import pytest
from conftest import bragg_map
from defectscope.preprocessing.cut import cut_near_peak
from defectscope.preprocessing.pipeline import prepare


def peak_of(volume):
    return np.array(np.unravel_index(int(np.argmax(volume)), volume.shape))


@pytest.mark.parametrize("axis, sign, d", [(0, 1, 2), (1, -1, 3), (2, 1, 4)])
def test_a_cut_plane_next_to_the_peak_is_found(axis, sign, d):
    volume = bragg_map(peak=1e5).astype(np.float32)
    p = peak_of(volume)
    index = [slice(None)] * 3
    index[axis] = slice(p[axis] + d, None) if sign > 0 else slice(0, p[axis] - d + 1)
    volume[tuple(index)] = 0
    prepared = prepare(volume)
    warnings = [w for w in prepared.warnings if w["reason"] == "PEAK_NEAR_EDGE"]
    assert len(warnings) == 1 and f"{d} voxel(s) from the peak" in warnings[0]["message"]


@pytest.mark.parametrize("peak", [1e3, 1e5])
def test_whole_maps_and_poisson_zeros_are_not_cut(peak):
    for seed in range(5):
        volume = bragg_map(peak=peak, seed=seed).astype(np.float32)
        p = peak_of(volume)
        assert cut_near_peak(np.roll(volume, tuple(32 - p), axis=(0, 1, 2))) is None
        assert "PEAK_NEAR_EDGE" not in [w["reason"] for w in prepare(volume).warnings]


def test_a_chip_gap_through_the_peak_is_a_cut():
    volume = bragg_map(peak=1e5).astype(np.float32)
    p = peak_of(volume)
    mask = np.zeros(volume.shape, bool)
    mask[:, p[1] + 2 : p[1] + 5, :] = True  # a 3-voxel gap two voxels beside the peak
    assert "PEAK_NEAR_EDGE" in [w["reason"] for w in prepare(volume, mask=mask).warnings]


def test_cut_answers_are_uncertain(predictor):
    from defectscope.server.core import Classifier

    volume = bragg_map(peak=1e5).astype(np.float32)
    volume[:, peak_of(volume)[1] + 3 :, :] = 0
    reply = Classifier(predictor, overlap=False).classify_map(volume).reply
    assert reply["decision"] == "uncertain" and "warning PEAK_NEAR_EDGE" in reply["decision_detail"]["reasons"]
