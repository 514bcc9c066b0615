"""``finish_window`` gathers each array once with ``np.take`` and keeps the spare bin's 1/count as 0: its box
is still the whole map's, voxel for voxel, also when the spare bin's sum is negative (masked background-
subtracted pixels), where a product with 0 would give -0.0 instead of the whole map's 0."""

from __future__ import annotations

import numpy as np

from defectscope.preprocessing.orthonormalise import Orthonormaliser

from test_orthonormalise import make_synthetic


def test_box_equals_the_whole_map_with_a_negative_spare_sum():
    geometry, frames, _ = make_synthetic()
    frames = frames.astype(np.float32) - 0.5  # background subtracted: negatives everywhere, none zero
    mask = np.zeros(frames.shape[1:], dtype=bool)
    mask[:, :3] = True  # masked pixels go to the spare bin: its sum is negative
    ortho = Orthonormaliser()
    whole = ortho(frames, geometry, mask=mask)
    state = ortho.accumulate(frames, geometry, mask=mask)
    assert state.total[state.mapping.spare] < 0
    qmap, where = ortho.finish_window(state, 14)
    box = whole.volume[tuple(slice(a, a + 14) for a in where["window_origin"])]
    np.testing.assert_array_equal(qmap.volume, box)
    empty = box == 0
    assert empty.any() and not np.signbit(qmap.volume[empty]).any()


def test_inverse_counts_end_with_the_spare_bin():
    geometry, frames, _ = make_synthetic()
    ortho = Orthonormaliser()
    state = ortho.accumulate(frames, geometry)
    inverse = ortho._inverse(state)
    assert inverse.shape == (state.mapping.spare + 1,) and inverse[-1] == 0
    np.testing.assert_array_equal(inverse[:-1], 1.0 / state.mapping.counts)


def test_box_in_slabs_and_as_float32_is_the_float64_box_rounded_once(monkeypatch):
    from defectscope.preprocessing import orthonormalise

    geometry, frames, _ = make_synthetic()
    ortho = Orthonormaliser()
    whole = ortho(frames, geometry)
    state = ortho.accumulate(frames, geometry)
    monkeypatch.setattr(orthonormalise, "_GATHER_VOXELS", 50)  # many slabs, the last one short
    qmap, where = ortho.finish_window(state, 15, close=False)
    single = ortho.finish_window(state, 15, close=False, dtype=np.float32)[0].volume
    box = whole.volume[tuple(slice(a, a + 15) for a in where["window_origin"])]
    assert qmap.volume.dtype == np.float64 and single.dtype == np.float32
    np.testing.assert_array_equal(qmap.volume, box)
    np.testing.assert_array_equal(single, box.astype(np.float32))
