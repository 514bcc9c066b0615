"""frames: axis permutations, rotations bringing Q onto axis 0, isotropic voxels."""

import itertools

import numpy as np
import pytest
import scipy.ndimage as ndi

from defectscope.errors import BadMessage, ShapeMismatch, TooLarge
from defectscope.preprocessing.frames import (
    CANONICAL_AXES, apply_plan, minimal_rotation, plan_canonical, to_canonical, zoom_linear,
)


def asymmetric(shape=(10, 12, 14), seed=0):
    # Random values: no symmetry, so any wrong transpose or flip changes the array.
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def blobs(coords):
    """A smooth asymmetric function of centred coordinates (..., 3): three anisotropic Gaussians,
    a few voxels wide so that linear interpolation is good to ~1 %."""
    x = coords
    f = np.exp(-(x[..., 0] ** 2 / 50 + x[..., 1] ** 2 / 30 + x[..., 2] ** 2 / 40))
    f += 0.6 * np.exp(-(((x[..., 0] - 9) ** 2) / 25 + ((x[..., 1] + 4) ** 2) / 20 + ((x[..., 2] - 3) ** 2) / 30))
    f += 0.3 * np.exp(-(((x[..., 0] + 3) ** 2) / 20 + ((x[..., 1] - 8) ** 2) / 35 + ((x[..., 2] + 10) ** 2) / 25))
    return f


def centred_grid(shape, spacing=(1.0, 1.0, 1.0)):
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_permuted_axes_are_transposed_exactly(perm):
    canonical = asymmetric()
    sent = canonical.transpose(perm)  # sent axis i is canonical axis perm[i]
    axes = [CANONICAL_AXES[p] for p in perm]
    out, info = to_canonical(sent, axes)
    assert np.array_equal(out, canonical) and out.flags["C_CONTIGUOUS"] and out.dtype == np.float32
    assert info["interpolated"] is False


@pytest.mark.parametrize("q, build", [
    # W(x) = V(R x) with R the minimal rotation, written out by hand (not with the code under test).
    ((0, 1, 0), lambda v: v.transpose(1, 0, 2)[::-1]),
    ((0, 0, 1), lambda v: v.transpose(2, 1, 0)[::-1]),
    ((-1, 0, 0), lambda v: v[::-1, ::-1, :]),
    ((0, -2.5, 0), lambda v: v.transpose(1, 0, 2)[:, ::-1]),
    ((1, 0, 0), lambda v: v),
])
def test_axis_aligned_q_direction_is_exact(q, build):
    canonical = asymmetric((12, 12, 12))
    sent = np.ascontiguousarray(build(canonical))
    out, info = to_canonical(sent, ("x", "y", "z"), q_direction=q)
    assert np.array_equal(out, canonical)
    assert info["interpolated"] is False


def test_q_direction_within_tolerance_of_an_axis_is_exact():
    canonical = asymmetric((12, 12, 12))
    sent = np.ascontiguousarray(canonical.transpose(1, 0, 2)[::-1])
    out, info = to_canonical(sent, ("x", "y", "z"), q_direction=(3e-4, 1.0, -2e-4))
    assert np.array_equal(out, canonical) and not info["interpolated"]


@pytest.mark.parametrize("q", [(1, 1, 0), (0.3, -0.5, 0.8), (-0.7, 0.2, 0.4)])
def test_minimal_rotation_takes_q_to_axis0(q):
    r = minimal_rotation(q)
    q = np.asarray(q, float) / np.linalg.norm(q)
    assert np.allclose(r @ q, [1, 0, 0], atol=1e-12)
    assert np.allclose(r @ r.T, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(r), 1)
    # Minimal: the turn angle equals the angle between q and axis 0, and the axis is normal to both.
    angle = np.arccos((np.trace(r) - 1) / 2)
    assert np.isclose(angle, np.arccos(q[0]))
    assert np.allclose(r @ np.cross(q, [1, 0, 0]), np.cross(q, [1, 0, 0]))


@pytest.mark.parametrize("q", [(1, 1, 0), (0.3, -0.5, 0.8)])
def test_oblique_q_direction_matches_analytic_map(q):
    shape = (41, 41, 41)
    grid = centred_grid(shape)
    r = minimal_rotation(q)
    canonical = blobs(grid).astype(np.float32)
    sent = blobs(grid @ r.T).astype(np.float32)  # sent(x) = canonical(R x): Q along q in the sent frame
    out, info = to_canonical(sent, ("a", "b", "c"), q_direction=q)
    assert info["interpolated"] is True and out.shape == shape
    inner = (slice(8, -8),) * 3  # the corners turn out of the box and zeros come in
    assert np.max(np.abs(out - canonical)[inner]) < 0.02


def test_anisotropic_voxels_resampled_to_finest():
    spacing = (1.0, 1.6, 0.8)
    shape = (30, 20, 40)
    sent = blobs(centred_grid(shape, spacing)).astype(np.float32)
    out, info = to_canonical(sent, CANONICAL_AXES, voxel_size=[s * 1e-3 for s in spacing])
    step = 0.8
    expected_shape = tuple(int(np.floor((n - 1) * s / step + 1e-9)) + 1 for n, s in zip(shape, spacing))
    assert out.shape == expected_shape and info["voxel_size_out"] == pytest.approx([0.8e-3] * 3)
    reference = blobs(centred_grid(expected_shape, (step,) * 3))
    assert np.max(np.abs(out - reference)) < 0.03


def test_anisotropic_voxels_and_oblique_q_in_one_interpolation():
    spacing, shape, q = (1.0, 1.5, 0.75), (40, 28, 52), (0.2, 0.6, -0.5)
    r = minimal_rotation(q)
    sent = blobs(centred_grid(shape, spacing) @ r.T).astype(np.float32)  # physical frame, Q along q
    out, info = to_canonical(sent, ("x", "y", "z"), q_direction=q, voxel_size=spacing)
    reference = blobs(centred_grid(out.shape, (0.75,) * 3))
    assert out.shape == (53, 55, 52) and info["interpolated"]
    inner = (slice(12, -12),) * 3
    assert np.max(np.abs(out - reference)[inner]) < 0.03


def test_anisotropic_voxels_with_permutation():
    spacing = (1.0, 1.6, 0.8)
    sent = blobs(centred_grid((30, 20, 40), spacing)).astype(np.float32)
    plain, _ = to_canonical(sent, CANONICAL_AXES, voxel_size=spacing)
    permuted, _ = to_canonical(np.ascontiguousarray(sent.transpose(2, 0, 1)), ("q_perp2", "q_par", "q_perp1"),
                               voxel_size=(spacing[2], spacing[0], spacing[1]))
    assert np.array_equal(plain, permuted)


def test_nearly_isotropic_voxels_untouched():
    sent = asymmetric()
    out, info = to_canonical(sent, CANONICAL_AXES, voxel_size=(1e-3, 1.005e-3, 0.998e-3))
    assert np.array_equal(out, sent) and not info["interpolated"]


def test_isotropic_resampling_respects_voxel_limit():
    with pytest.raises(TooLarge, match="canonical frame"):
        to_canonical(asymmetric((64, 64, 64)), CANONICAL_AXES, voxel_size=(1, 1, 0.01))  # 64 x 64 x 6301


@pytest.mark.parametrize("axes, error", [
    (("q_par", "q_perp1"), ShapeMismatch),
    (("q_par", "q_par", "q_perp2"), BadMessage),
    (("x", "y", "z"), BadMessage),  # not canonical and no q_direction
    ("q_par", BadMessage),
    (("q_par", "", "q_perp2"), BadMessage),
    (("q_par", 1, "q_perp2"), BadMessage),
])
def test_bad_axes(axes, error):
    with pytest.raises(error) as info:
        to_canonical(asymmetric(), axes)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("q", [(0, 0, 0), (1, 0), (1, 0, 0, 0), (np.nan, 1, 0), (np.inf, 0, 0), "abc", ("a", 1, 2)])
def test_bad_q_direction(q):
    with pytest.raises(BadMessage, match="q_direction"):
        to_canonical(asymmetric(), ("x", "y", "z"), q_direction=q)


@pytest.mark.parametrize("voxel_size", [(1, 1), (1, 0, 1), (1, -1, 1), (1, np.nan, 1)])
def test_bad_voxel_size(voxel_size):
    with pytest.raises(BadMessage, match="voxel_size"):
        to_canonical(asymmetric(), CANONICAL_AXES, voxel_size=voxel_size)


def test_canonical_labels_must_agree_with_q_direction():
    with pytest.raises(BadMessage, match="q_par"):
        to_canonical(asymmetric(), ("q_perp1", "q_par", "q_perp2"), q_direction=(1, 0, 0))
    out, _ = to_canonical(asymmetric(), ("q_perp1", "q_par", "q_perp2"), q_direction=(0, 1, 0))
    assert np.array_equal(out, asymmetric().transpose(1, 0, 2))


def test_not_3d_refused():
    with pytest.raises(ShapeMismatch):
        to_canonical(np.zeros((4, 4)), CANONICAL_AXES)


def test_zoom_linear_matches_map_coordinates():
    volume = asymmetric((20, 18, 16))
    step, start, out_shape = (0.7, 1.3, 0.9), (2.2, -1.5, 0.4), (22, 12, 17)
    out = zoom_linear(volume, step, start, out_shape)
    coords = np.stack(np.meshgrid(*[s0 + d * np.arange(n) for s0, d, n in zip(start, step, out_shape)], indexing="ij"))
    padded = np.pad(volume, 1)  # zero outside, interpolated towards zero over the last voxel
    expected = ndi.map_coordinates(padded, coords + 1, order=1, mode="constant", cval=0.0)
    assert np.allclose(out, expected, atol=1e-6)


def test_zoom_linear_integer_positions_copy_exactly():
    volume = asymmetric((20, 18, 16))
    out = zoom_linear(volume, (1, 1, 1), (3, -2, 0), (10, 10, 10))
    assert np.array_equal(out[:, 2:, :], volume[3:13, 0:8, 0:10]) and not out[:, :2].any()


@pytest.mark.parametrize("q, voxel_size", [((0.3, -0.5, 0.8), None), ((0, 1, 0), (1.0, 1.4, 0.9)), (None, (1.0, 1.4, 0.9))])
def test_window_is_the_same_part_of_the_full_conversion(q, voxel_size):
    sent = asymmetric((30, 26, 34))
    axes = ("x", "y", "z") if q is not None else CANONICAL_AXES
    plan = plan_canonical(sent.shape, axes, q, voxel_size)
    full, _ = apply_plan(sent, plan)
    centre, shape = np.array([14, 9, 20]), (12, 10, 9)
    part, info = apply_plan(sent, plan, window=(centre, shape))
    lo = centre - np.array(shape) // 2
    assert info["window_origin"] == lo.tolist()
    assert np.allclose(part, full[lo[0]:lo[0] + 12, lo[1]:lo[1] + 10, lo[2]:lo[2] + 9], atol=1e-6)
    # canonical_position maps an input voxel to where the conversion puts it.
    point = np.array([12.0, 15.0, 10.0])
    mapped = plan.canonical_position(point)
    c_in, c_out = (np.array(sent.shape) - 1) / 2, (np.array(plan.out_shape) - 1) / 2
    assert np.allclose(c_in + plan.matrix @ (mapped - c_out), point)
