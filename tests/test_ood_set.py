"""The out-of-distribution maps (training.ood_set): the loop's Volterra cut, determinism, the ROC statistic."""

import numpy as np
import pytest

from defectscope.training.ood_set import KINDS, auc, loop_displacement, make_map


def test_loop_displacement_jumps_by_b_across_the_loop_and_vanishes_far_away():
    a, half = 4.0, 10.0
    n = np.array([1.0, 1.0, 1.0]) / np.sqrt(3)
    centre = np.zeros(3)
    eps = 1e-3
    points = np.stack([centre + eps * n, centre - eps * n, centre + 1e4 * n])
    u = loop_displacement(points, centre, half, a)
    b = a / 2.0 * np.array([1.0, -1.0, 0.0])
    np.testing.assert_allclose(np.abs(u[0] - u[1]), np.abs(b), atol=1e-3)  # the cut: a jump of b
    assert np.linalg.norm(u[2]) < 1e-5 * np.linalg.norm(b)


@pytest.mark.parametrize("kind", KINDS)
def test_maps_are_reproducible_counts(kind):
    m = make_map(kind, 0, 3)
    assert m.shape == (64, 64, 64) and m.dtype == np.float32 and m.min() >= 0 and m.max() > 0
    np.testing.assert_array_equal(m, make_map(kind, 0, 3))


def test_auc():
    assert auc([1, 2, 3], [4, 5]) == 1.0 and auc([4, 5], [1, 2]) == 0.0 and auc([1, 2], [1, 2]) == 0.5


def test_stacking_faults_are_visible_at_the_maps_reflection():
    from defectscope.training.ood_set import visible_fault
    from defectscope.training.simulator import VISIBLE_111

    for g in VISIBLE_111:
        normal, shift = visible_fault(g)
        assert np.dot(normal, shift) == 0  # the shift lies in the fault plane
        assert np.dot(g, shift) / 6.0 % 1.0 == pytest.approx(1 / 3) or np.dot(g, shift) / 6.0 % 1.0 == pytest.approx(2 / 3)
