"""A streamed scan answered as its last frame arrives: the work done ahead, while frames still come.

While the gridding thread waits for frames, it answers the scan from the frames so far, each voxel divided
by the pixels of the *whole* scan that reach it (``Orthonormaliser.finish_window(complete=True)``: the
frames still to come count as zero), and keeps that answer with the set of voxels it read. Each frame that
arrives afterwards is checked against that set; its values that land in the first box are added to a copy
of the box's sums, kept up to date. When the last frame is in, and the peak the boxes were cut around is
still where it was:

- if no frame since landed in a voxel the answer read (frames whose pixels past the peak land outside the
  box or hold no counts), the answer is given as it is: every voxel read, every box and so every number of
  the reply are those of the complete scan, and it leaves as soon as the last frame is gridded
  (``timings_ms.ahead``: the work done ahead). Rare on real scans: background and the peak's tails reach
  the box from every frame;
- otherwise the kept box is prepared and inferred again, without cutting it from the grid (a gather over
  the whole grid's sums, cold in cache after a scan's gridding).

Either way the reply is that of the scan answered at its end (``tests/test_lookahead.py``); a moved peak,
or a preparation needing another box, answers it at its end as without a look-ahead.

When: the gridding thread looks ahead when nothing is queued, once at least ``MIN_FRACTION`` of the frames
are in; again (at most every ``RELOOK_FRACTION`` of the frames) when the peak has moved since the last
look, or when frames have stopped landing in what the last answer read (the next answer may then hold to
the end). Measured frames often hold background everywhere, so later frames
land in what the answer read: there the kept box is what saves time. A map that needs a larger box than
the first (oversampling above the trained range) is cut again from the grid at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from defectscope.errors import DefectscopeError
from defectscope.preprocessing.orthonormalise import peak_voxel
from defectscope.preprocessing.scatter import contributions

MIN_FRACTION = 0.5
RELOOK_FRACTION = 0.05


@dataclass(eq=False)
class Ahead:
    """An answer made before the last frame (``look_ahead``), and the first box it read, kept up to date."""

    outcome: object  # server.job.Outcome
    centre: tuple  # the voxel its boxes were cut around
    read: np.ndarray  # bool per voxel rank (the spare bin last, never marked): the voxels the answer read
    ms: float  # the work done ahead: boxes, preparation, inference, checks
    decode_ms: float  # the stream's decoding and gridding when it was made
    gridding_ms: float
    where: dict  # the first box (``finish_window``'s ``where``)
    local: np.ndarray  # int32 per voxel rank: its flat index in the first box, -1 outside it (and the spare bin)
    sums: np.ndarray  # float64, the first box: the grid's sums there, the frames added since included
    inverse: np.ndarray  # float64, the first box: 1 / pixels of the whole scan reaching each voxel (0: none)
    voxel_size: list
    holds: bool = True  # no frame since landed in ``read``
    touched_last: bool = False  # the last frame added landed in ``read``

    def frame_added(self, state, index: int, frame: np.ndarray) -> None:
        """A frame added to ``state`` after this answer. Its values in the first box are added to ``sums``
        as ``Orthonormaliser._add`` adds them to the grid's (the same ``contributions``, in the same order),
        so the kept sums stay the grid's, bit for bit. (The read check counts a masked pixel as the spare
        bin, which is never read.)"""
        ranks, values = contributions(state, index, frame)
        self.touched_last = bool(self.read[ranks].any())
        if self.touched_last:
            self.holds = False
            local = self.local[ranks]
            inside = local >= 0
            np.add.at(self.sums.reshape(-1), local[inside], values[inside])

    def box(self) -> tuple[np.ndarray, list, dict]:
        """The first box as ``finish_window(..., dtype=float32)`` cuts it from the complete scan: (map, voxel
        size, where). Voxels no pixel reaches are 0 (their inverse is 0), never -0.0 or NaN."""
        volume = np.multiply(self.sums, self.inverse).astype(np.float32)
        volume[self.inverse == 0] = 0.0
        return volume, self.voxel_size, self.where


def _box_index(where: dict) -> tuple[slice, ...]:
    return tuple(slice(a, a + n) for a, n in zip(where["window_origin"], where["window_shape"]))


def voxels_read(mapping, boxes) -> np.ndarray:
    """Bool per voxel rank (the spare bin last, never marked): the voxels of ``boxes`` (``finish_window``'s
    ``where``, in voxels of the grid)."""
    read = np.zeros(mapping.spare + 1, dtype=bool)
    for box in boxes:
        read[mapping.rank_grid[_box_index(box)].ravel()] = True
    read[mapping.spare] = False
    return read


def should_look(stream) -> bool:
    received = int(np.count_nonzero(stream.state.received))
    n = len(stream.state.received)
    if received == n or received < MIN_FRACTION * n:
        return False
    # At most one look every ``RELOOK_FRACTION`` of the frames: the peak's centre can move a voxel with each
    # frame while it passes, and a look that found no answer yet (no peak so far) is not tried at every frame.
    if stream.ahead_tried_at >= 0 and received - stream.ahead_tried_at < max(1, RELOOK_FRACTION * n):
        return False
    if stream.ahead is None:
        return True
    # The answer (or its kept box) stands while the peak stays; once it moved, look again.
    if not stream.ahead.holds and not stream.ahead.touched_last:
        return True  # frames no longer land in it: the next answer may hold to the end
    return tuple(peak_voxel(stream.state).tolist()) != stream.ahead.centre


def look_ahead(classifier, stream) -> bool:
    """Answer ``stream`` from its frames so far (see the module's text); True if an answer was made.
    A scan that cannot be answered yet (no peak so far) is simply answered at its end."""
    if not should_look(stream):
        return False
    state = stream.state
    stream.ahead_tried_at = int(np.count_nonzero(state.received))
    stream.ahead = None
    intensity = stream.request.spec.get("intensity") or "counts"  # as core._intensity
    made = []

    def volumes():
        made.append(classifier._scan_volume(state, stream.gridding_ms, intensity, ahead=True))
        return made[-1]

    t0 = time.perf_counter()
    try:
        outcome = classifier._run(stream.request, volumes, stream.decode_ms, prior_ms=stream.gridding_ms)
    except DefectscopeError:
        return False
    _, kw, _, _ = made[0]
    where = kw["scan"][1]
    mapping = state.mapping
    ranks = mapping.rank_grid[_box_index(where)]
    local = np.full(mapping.spare + 1, -1, dtype=np.int32)  # a box holds far fewer than 2**31 voxels
    local[ranks.ravel()] = np.arange(ranks.size, dtype=np.int32)
    local[mapping.spare] = -1
    stream.ahead = Ahead(
        outcome, tuple(where["window_centre"]), voxels_read(mapping, [where, outcome.reply["preparation"]["scan_window"]]),
        (time.perf_counter() - t0) * 1e3, stream.decode_ms, stream.gridding_ms, where, local,
        np.take(state.total, ranks), np.take(classifier.orthonormaliser._inverse(state), ranks), kw["voxel_size"])
    return True


def _current(stream) -> Ahead | None:
    ahead = stream.ahead
    if ahead is None or tuple(peak_voxel(stream.state).tolist()) != ahead.centre:
        return None
    return ahead


def answer(stream):
    """The answer made ahead if it is the complete scan's (every frame in, none landed in what it read),
    with the stream's final decoding and gridding times; else None."""
    ahead = _current(stream)
    if ahead is None or not ahead.holds:
        return None
    stream.state.total = np.empty(0)  # the sums are spent, as a scan answered at its end spends them
    timings = ahead.outcome.reply["timings_ms"]
    later = (stream.decode_ms - ahead.decode_ms) + (stream.gridding_ms - ahead.gridding_ms)
    timings.update(decode=round(stream.decode_ms, 3), total=round(timings["total"] + later, 3), ahead=round(ahead.ms, 3),
                   orthonormalise=round(timings["orthonormalise"] + stream.gridding_ms - ahead.gridding_ms, 3))
    return ahead.outcome


def kept_box(stream):
    """The first box kept up to date (``Ahead.box``) when the peak is still where it was cut; else None."""
    ahead = _current(stream)
    return None if ahead is None else ahead.box()
