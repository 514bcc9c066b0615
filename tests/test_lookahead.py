"""A streamed scan answered ahead of its last frame (``server.lookahead``) gets the reply of the scan
answered at its end: the answer made ahead when no later frame lands in what it read, the kept box when
one does, neither when the peak moved. The gridding thread's look-aheads are made here by hand, after
each frame, as the thread makes them when nothing is queued."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.preprocessing.orthonormalise import Orthonormaliser
from defectscope.server import lookahead
from defectscope.server.core import Classifier
from defectscope.server.demo import load_measured_scan
from defectscope.server.job import Job, scan_job

from test_orthonormalise import make_synthetic

SAME = ("probabilities", "label", "decision", "warnings", "preparation", "classes", "model")


@pytest.fixture(scope="module")
def photon_counting():
    """The synthetic scan without background (a photon-counting detector's frames): the frames after the
    peak has passed hold no counts at all."""
    geometry, frames, _ = make_synthetic()
    frames = np.where(frames > 2, frames, 0).astype(np.int32)
    frames[32:] = 0
    return geometry.to_dict(), frames


def stream(classifier, frames, geometry, mask=None, *, look=True, last_frames=()):
    """Stream ``frames`` (then ``last_frames``, (index, frame) pairs) into ``classifier``, looking ahead after
    every frame but the last; the reply and the stream."""
    spec = {"kind": "scan", "shape": list(frames.shape), "dtype": frames.dtype.str, "geometry": geometry, "stream": True}
    s = classifier.begin_stream(Job("classify", "s", {}, kind="scan", spec=spec, mask=mask,
                                    options={"return_prepared": False}))
    order = [(i, frames[i]) for i in range(len(frames)) if i not in dict(last_frames)] + list(last_frames)
    for k, (i, frame) in enumerate(order):
        classifier.add_frame(s, i, frame)
        if look and k < len(order) - 1:
            classifier.look_ahead(s)
    return classifier.finish_stream(s).reply, s


def at_once(classifier, frames, geometry, mask=None):
    return classifier.classify(scan_job(frames, geometry, mask=mask)).reply


def assert_same(reply, ref):
    for key in SAME:
        assert reply[key] == ref[key], key


def test_the_answer_made_ahead_is_given_when_no_later_frame_adds_to_it(predictor, photon_counting):
    geometry, frames = photon_counting
    classifier = Classifier(predictor)
    reply, s = stream(classifier, frames, geometry)
    assert reply["timings_ms"]["ahead"] > 0 and s.ahead.holds
    assert_same(reply, at_once(classifier, frames, geometry))
    assert reply["timings_ms"]["orthonormalise"] >= s.gridding_ms and s.state.total.size == 0  # spent


def test_a_late_frame_landing_in_the_box_is_added_to_the_kept_box(predictor, photon_counting):
    geometry, frames = photon_counting
    late = frames.copy()
    late[36] = frames[24] // 50 + (frames[24] > 0)  # counts in the peak's voxels, after the look-ahead
    classifier = Classifier(predictor)
    reply, s = stream(classifier, late, geometry, last_frames=[(36, late[36]), (37, late[37])])
    assert "ahead" not in reply["timings_ms"] and not s.ahead.holds
    ref = at_once(classifier, late, geometry)
    assert_same(reply, ref)
    assert reply["probabilities"] != at_once(classifier, frames, geometry)["probabilities"]  # the frame counted


def test_masked_counts_of_a_late_frame_do_not_count(predictor, photon_counting):
    geometry, frames = photon_counting
    late = frames.copy()
    late[39, 20:30, 20:30] = 7
    mask = np.zeros(frames.shape[1:], dtype=bool)
    mask[20:30, 20:30] = True
    classifier = Classifier(predictor)
    reply, s = stream(classifier, late, geometry, mask=mask)
    assert reply["timings_ms"]["ahead"] > 0
    pixels = s.state.mapping.rank[39].reshape(frames.shape[1:])[20:30, 20:30]
    assert s.ahead.read[pixels].any()  # unmasked, those counts would have landed in what the answer read
    assert_same(reply, at_once(classifier, late, geometry, mask=mask))


def test_a_moved_peak_answers_at_the_end(predictor, photon_counting):
    geometry, frames = photon_counting
    classifier = Classifier(predictor)
    plain, _ = stream(classifier, frames, geometry, look=False)
    spec = {"kind": "scan", "shape": list(frames.shape), "dtype": frames.dtype.str, "geometry": geometry, "stream": True}
    s = classifier.begin_stream(Job("classify", "s", {}, kind="scan", spec=spec, options={"return_prepared": False}))
    for i in range(len(frames) - 1):
        classifier.add_frame(s, i, frames[i])
    assert classifier.look_ahead(s)
    s.ahead.centre = (0, 0, 0)  # as if the peak were elsewhere when the answer was made
    assert lookahead.kept_box(s) is None
    classifier.add_frame(s, len(frames) - 1, frames[-1])
    reply = classifier.finish_stream(s).reply
    assert "ahead" not in reply["timings_ms"]
    assert_same(reply, plain)
    assert_same(reply, at_once(classifier, frames, geometry))


def test_no_look_ahead_before_half_the_frames_nor_twice_on_the_same_frames(predictor, photon_counting):
    geometry, frames = photon_counting
    classifier = Classifier(predictor)
    spec = {"kind": "scan", "shape": list(frames.shape), "dtype": frames.dtype.str, "geometry": geometry, "stream": True}
    s = classifier.begin_stream(Job("classify", "s", {}, kind="scan", spec=spec, options={"return_prepared": False}))
    for i in range(len(frames) // 2 - 1):
        classifier.add_frame(s, i, frames[i])
    assert not classifier.look_ahead(s) and s.ahead is None
    classifier.add_frame(s, len(frames) // 2 - 1, frames[len(frames) // 2 - 1])
    assert classifier.look_ahead(s) and not classifier.look_ahead(s)


def test_the_complete_box_of_a_partial_scan_is_the_box_once_the_missing_zero_frames_come(photon_counting):
    from defectscope.preprocessing.geometry import geometry_from_dict

    geometry, frames = photon_counting
    geom = geometry_from_dict(geometry, n_frames=len(frames), frame_shape=frames.shape[1:])
    ortho = Orthonormaliser()
    state = ortho.start(geom)
    for i in range(32):
        ortho.accumulate_frame(state, i, frames[i])
    ahead, where = ortho.finish_window(state, 20, close=False, complete=True)
    for i in range(32, len(frames)):
        ortho.accumulate_frame(state, i, frames[i])
    done, where_done = ortho.finish_window(state, 20)
    assert where == where_done
    np.testing.assert_array_equal(ahead.volume, done.volume)


def test_measured_scan_streamed_with_look_ahead_is_the_scan_at_once(predictor):
    measured = load_measured_scan()
    if measured is None:
        pytest.skip("../shared/data (APS 34-ID-C scan) not present")
    frames, geometry, mask = measured
    classifier = Classifier(predictor)
    reply, s = stream(classifier, frames, geometry, mask=mask)
    assert s.ahead is not None  # made; its late frames (background everywhere) land in it: the kept box answers
    assert_same(reply, at_once(classifier, frames, geometry, mask=mask))


def test_looks_again_when_the_peak_moved_or_frames_stopped_landing(predictor, photon_counting):
    geometry, frames = photon_counting
    classifier = Classifier(predictor)
    spec = {"kind": "scan", "shape": list(frames.shape), "dtype": frames.dtype.str, "geometry": geometry, "stream": True}
    s = classifier.begin_stream(Job("classify", "s", {}, kind="scan", spec=spec, options={"return_prepared": False}))
    for i in range(20):
        classifier.add_frame(s, i, frames[i])
    assert classifier.look_ahead(s)
    classifier.add_frame(s, 20, frames[20])  # lands in it; then the rate limit holds a new look back
    assert not s.ahead.holds and s.ahead.touched_last and not classifier.look_ahead(s)
    for i in range(21, 34):
        classifier.add_frame(s, i, frames[i])
    assert not s.ahead.touched_last  # frame 33 held no counts: the peak has passed
    assert classifier.look_ahead(s) and s.ahead.holds
    s.ahead.centre = (0, 0, 0)  # as if the peak had moved since
    s.ahead_tried_at -= 2
    assert classifier.look_ahead(s) and s.ahead.centre != (0, 0, 0)
