"""Input checks of a raw rocking scan before it is gridded (``preprocessing.orthonormalise``): frames as one
3-D array or a list of 2-D ones, their sizes checked against ``Limits`` before anything large is allocated,
their dtypes and values, and a detector mask."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from defectscope.errors import BadMessage, DtypeNotAllowed, NonFinite, ShapeMismatch
from defectscope.preprocessing.config import Limits
from defectscope.preprocessing.validate import check_scan_size


class _Scan:
    """Frames given as a 3-D array or a list of 2-D arrays, checked against ``Limits``; never copied."""

    def __init__(self, frames, limits: Limits):
        if isinstance(frames, np.ndarray):
            if frames.ndim != 3:
                raise ShapeMismatch(f"frames must be [n_frames, rows, cols], got shape {frames.shape}")
            self.n, self.shape, dtypes = frames.shape[0], frames.shape[1:], {frames.dtype.str}
        elif isinstance(frames, Sequence) and not isinstance(frames, (str, bytes)):
            if not all(isinstance(f, np.ndarray) for f in frames):
                raise BadMessage("frames must be a numpy array or a list of 2-D numpy arrays")
            shapes = {f.shape for f in frames}
            if len(shapes) > 1 or any(len(s) != 2 for s in shapes):
                raise ShapeMismatch(f"frames must all be 2-D of one shape, got shapes {sorted(shapes)[:4]}")
            self.n, self.shape, dtypes = len(frames), (shapes.pop() if shapes else (0, 0)), {f.dtype.str for f in frames}
        else:
            raise BadMessage(f"frames must be a numpy array or a list of 2-D numpy arrays, got {type(frames).__name__}")
        bad = sorted(dtypes - set(limits.allowed_dtypes))
        if bad:
            raise DtypeNotAllowed(f"frame dtype {bad[0]} not allowed (allowed: {list(limits.allowed_dtypes)})")
        self.check_size(self.n, self.shape, limits)
        self.frames = frames

    @staticmethod
    def check_size(n: int, shape, limits: Limits) -> None:
        rows, cols = shape
        if n < 2 or rows < 2 or cols < 2:
            raise ShapeMismatch(f"a rocking scan needs >= 2 frames of >= 2x2 pixels, got {n} frames of {rows}x{cols}")
        check_scan_size(n, rows, cols, limits)

    def frame(self, i: int) -> np.ndarray:
        return _checked_frame(self.frames[i], i)


def _checked_frame(frame: np.ndarray, i: int) -> np.ndarray:
    """The frame as float64, refusing NaN/inf (the gridder would silently drop NaN but not inf)."""
    out = frame.astype(np.float64).ravel()
    if frame.dtype.kind == "f" and not math.isfinite(out.sum()) and not np.isfinite(out).all():
        raise NonFinite(f"frame {i} holds NaN or infinite values; mask those pixels instead")
    return out


def _mask_array(mask, n: int, shape) -> np.ndarray | None:
    """Validated boolean mask (True = bad), 2-D (every frame) or 3-D; None when nothing is masked."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype != bool and mask.dtype.kind not in "iu":
        raise DtypeNotAllowed(f"mask dtype {mask.dtype.str} not allowed (boolean or integer, nonzero = bad)")
    if mask.shape not in (tuple(shape), (n, *shape)):
        raise ShapeMismatch(f"mask shape {mask.shape} fits neither a frame {tuple(shape)} nor the scan {(n, *shape)}")
    mask = mask.astype(bool, copy=False)
    return mask if mask.any() else None


def _mask_key(mask: np.ndarray | None):
    if mask is None:
        return None
    digest = hashlib.blake2b(np.packbits(mask).tobytes(), digest_size=16)
    return (mask.shape, digest.hexdigest())
