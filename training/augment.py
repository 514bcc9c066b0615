"""Augmentation of prepared maps: the symmetries of the (q_perp1, q_perp2) square, about the centre voxel."""

from __future__ import annotations

import numpy as np


def mirror_about_centre(x: np.ndarray, axis: int) -> np.ndarray:
    """Reflect a prepared map about voxel n//2 along ``axis`` (where ``prepare`` put the centre of mass).

    ``x[::-1]`` alone would move the centre to n//2 - 1 on an even axis; here out[i] = x[n - i] for
    i >= 1 and out[0] = 0 (the first voxel is at the map's edge, where a prepared map is ~0).
    """
    out = np.zeros_like(x)
    src = [slice(None)] * x.ndim
    dst = [slice(None)] * x.ndim
    src[axis] = slice(x.shape[axis] - 1, 0, -1)
    dst[axis] = slice(1, None)
    out[tuple(dst)] = x[tuple(src)]
    return out


def augment_mirror(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random element of the 8 symmetries of the (q_perp1, q_perp2) square: swap, mirror 1, mirror 2.

    Each is a mirror or a rotation about Q, so the pattern stays that of a physically possible crystal of
    the same class: the simulator already draws rotations about Q; a mirror through a plane containing Q
    adds the other handedness (a left-handed screw, the mirror image of the facets). Axis 0 (along Q) is
    never flipped.
    """
    if x.shape[1] == x.shape[2] and rng.random() < 0.5:
        x = np.swapaxes(x, 1, 2)
    for axis in (1, 2):
        if rng.random() < 0.5:
            x = mirror_about_centre(x, axis)
    return np.ascontiguousarray(x)
