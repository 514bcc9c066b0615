"""A whole scan's frames gridded in slabs on several threads (``Orthonormaliser.accumulate``) give the very
sums the frame-by-frame path gives (``Orthonormaliser.accumulate_frame``, as a stream is gridded): the same
additions in the same order, sparse or dense frames, 2-D or 3-D masks; and a bad frame is named alike."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.errors import NonFinite
from defectscope.preprocessing import scatter
from defectscope.preprocessing.orthonormalise import Orthonormaliser

from test_orthonormalise import make_synthetic


def frame_by_frame(ortho, frames, geometry, mask=None):
    from defectscope.preprocessing.geometry import geometry_from_dict

    geom = geometry_from_dict(geometry.to_dict(), n_frames=len(frames), frame_shape=frames.shape[1:])
    state = ortho.start(geom, mask=mask)
    for i in range(len(frames)):
        ortho.accumulate_frame(state, i, frames[i])
    return state


def cases():
    geometry, frames, _ = make_synthetic()
    rng = np.random.default_rng(7)
    # Flat-field corrected and background subtracted: no zero anywhere (the dense path), and values whose
    # float64 sums depend on the order they are added in.
    dense = (frames * rng.uniform(0.9, 1.1, frames.shape)).astype(np.float32) - 0.25
    dense[::3] = np.where(rng.random(dense[::3].shape) < 0.3, dense[::3], 0)  # and some sparse frames
    mask2 = rng.random(frames.shape[1:]) < 0.05
    mask3 = rng.random(frames.shape) < 0.05
    # float64 frames with full mantissas: unlike float32 values (exact in float64 sums), their sums change
    # with the order of the additions.
    exact64 = frames * rng.uniform(0.9, 1.1, frames.shape) - 0.25
    return geometry, [(frames, None), (frames, mask2), (dense, mask3), (exact64, None)]


@pytest.mark.parametrize("as_list", [False, True], ids=["array", "list of frames"])
@pytest.mark.parametrize("case", range(4))
def test_slabs_on_threads_give_the_frame_by_frame_sums_bit_for_bit(case, as_list):
    """A scan sent one frame per message part arrives as a list of frames: it takes the slab path too."""
    geometry, all_cases = cases()
    frames, mask = all_cases[case]
    assert len(frames) >= 2 * scatter.SLAB_FRAMES  # the slab path is the one taken
    ortho = Orthonormaliser()
    whole = ortho.accumulate(list(frames) if as_list else frames, geometry, mask=mask)
    each = frame_by_frame(ortho, frames, geometry, mask)
    np.testing.assert_array_equal(whole.total, each.total)
    np.testing.assert_array_equal(whole.block_total, each.block_total)
    assert whole.received.all()


def test_a_non_finite_frame_is_named_as_frame_by_frame():
    geometry, frames, _ = make_synthetic()
    frames = frames.astype(np.float32)
    frames[27, 5, 9] = np.nan
    frames[33, 1, 1] = np.inf
    ortho = Orthonormaliser()
    with pytest.raises(NonFinite, match="frame 27 "):
        ortho.accumulate(frames, geometry)
    with pytest.raises(NonFinite, match="frame 27 "):
        ortho.accumulate(list(frames), geometry)
    with pytest.raises(NonFinite, match="frame 27 "):
        frame_by_frame(ortho, frames, geometry)


def test_in_order_yields_in_order_with_bounded_look_ahead():
    started = []

    def work(i):
        started.append(i)
        return i * i

    out = []
    for value in scatter.in_order(work, range(20), ahead=3):
        out.append(value)
        assert max(started) <= len(out) + 2  # never more than `ahead` results waiting
    assert out == [i * i for i in range(20)]
