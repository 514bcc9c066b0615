"""Sampling of measured data: the server's q grid leaves no empty voxel between measured points (the
empty planes of the old grid were read by the classifier as structure), on synthetic oblique geometries
and on the measured 34-ID-C scan."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from defectscope.preprocessing.orthonormalise import Orthonormaliser
from defectscope.preprocessing.qspace import Grid, canonical_frame, natural_grid

from test_orthonormalise import synthetic_geometry


def empty_inside(ortho: Orthonormaliser, geometry, grid: Grid) -> float:
    """Fraction of the voxels inside the measured region (its closing by two voxels, away from the grid's
    faces) that no measured point falls in."""
    mapping = ortho.mapping(geometry, grid=grid)
    touched = np.zeros(grid.n_voxels, bool)
    touched[mapping.touched] = True
    touched = touched.reshape(grid.shape)
    pad = 4
    region = ndimage.binary_closing(np.pad(touched, pad), structure=np.ones((3, 3, 3)), iterations=2)
    region = ndimage.binary_erosion(region, iterations=2)[pad:-pad, pad:-pad, pad:-pad]
    return float((region & ~touched).sum() / max(1, region.sum()))


def finer(grid: Grid, voxel: float, most: int = 160) -> Grid:
    """The same region (its central ``most`` voxels per axis at most) at another voxel size."""
    centre = np.array(grid.origin) + (np.array(grid.shape) - 1) / 2 * grid.voxel_size
    shape = tuple(min(most, int(np.ceil((n - 1) * grid.voxel_size / voxel)) + 1) for n in grid.shape)
    return Grid(shape=shape, origin=tuple(centre - (np.array(shape) - 1) / 2 * voxel), voxel_size=voxel)


@pytest.mark.parametrize("angles", [{}, {"delta": 45.0, "gamma": 20.0}, {"chi": 70.0, "delta": 25.0}])
def test_natural_grid_has_no_empty_voxel_between_measured_points(angles):
    geometry = synthetic_geometry(**angles)
    grid = natural_grid(geometry)
    ortho = Orthonormaliser()
    assert empty_inside(ortho, geometry, grid) == 0.0


def test_the_longest_step_as_voxel_leaves_empty_planes_on_an_oblique_lattice(shared_data):
    """What the grid used to be (the longest of the row, column and frame steps) on the measured scan."""
    from defectscope.server.demo import load_measured_scan
    from defectscope.preprocessing.geometry import geometry_from_dict
    from defectscope.preprocessing.qspace import pixel_q_lab

    frames, geometry, _ = load_measured_scan()
    geometry = geometry_from_dict(geometry, n_frames=len(frames), frame_shape=frames.shape[1:])
    frame = canonical_frame(geometry)
    rows, cols = geometry.frame_shape
    mid = (geometry.n_frames - 1) // 2
    q = pixel_q_lab(geometry, [mid, mid + 1], roi=[rows // 2, rows // 2 + 2, cols // 2, cols // 2 + 2])
    longest = max(np.linalg.norm(q[0, 1, 0] - q[0, 0, 0]), np.linalg.norm(q[0, 0, 1] - q[0, 0, 0]),
                  np.linalg.norm(q[1, 0, 0] - q[0, 0, 0]))
    assert frame.natural_voxel > 1.2 * longest  # the lattice is oblique: the covering voxel is larger
    grid = natural_grid(geometry)
    ortho = Orthonormaliser()
    assert empty_inside(ortho, geometry, grid) < 1e-3  # masked pixels only
    assert empty_inside(ortho, geometry, finer(grid, longest)) > 0.05
