"""The q space of a rocking scan: canonical frame, grid, pixel coordinates, voxel of a point (SPEC §2).

Shared by both orthonormalisation paths (``preprocessing.orthonormalise``), so they see bit-identical
coordinates.

Canonical frame
    Axis 0 (``q_par``) is along Q̂, the q of the centre pixel ``(rows//2, cols//2)`` of the frame in the middle
    of the scan (``(n_frames-1)//2``). It depends on the geometry only, never on the data, so the whole
    pixel -> voxel mapping can be cached. Axis 1 (``q_perp1``) is the rocking direction (how that pixel's q
    moves from the middle frame to the next) made orthogonal to Q̂; axis 2 = axis 0 x axis 1 (right-handed).
    Canonical coordinates are absolute: ``canonical = rotation @ q_lab``, so the first coordinate of a voxel
    is close to ``|Q|`` and ``QMap.q_norm_at`` is the exact ``|q|`` of a voxel. (q_lab: see ``geometry``.)

Grid (``natural_grid``)
    Isotropic voxels at the scan's natural resolution: the finest voxel that leaves no voxel empty between
    measured points. The measured q form, near the centre pixel, the lattice spanned by the q steps between
    neighbouring rows, columns and frames, s_1..s_3; a box of edges e_k = sum_i |s_i . axis_k| contains a
    point of that lattice wherever it is placed, so the voxel is the largest e_k. (The largest step length
    alone, used before, left whole planes of empty voxels in an oblique lattice: 8 % of the voxels around
    the peak of the 34-ID-C scan, and the classifier read those planes as structure.) The extent is the range of canonical coordinates of all measured pixels (taken
    on the six faces of the (frame, row, col) box, where a smooth map of a box attains its extremes), padded
    by 1 % of a voxel. An axis longer than ``max_grid`` voxels (default 256) keeps the voxel size and is
    cropped to ``max_grid`` voxels centred on Q (data outside are dropped): resolution is what the classifier
    needs, and its 64^3 input window sits around the peak.

Binning rule: exactly xrayutilities' ``Gridder3D`` with a fixed data range. Bin centres are ``origin + k*d`` with
``d = |upper - origin| / (n - 1)``; a point counts when ``origin <= c <= upper`` on every axis; its bin is
``rint((c - origin) / d)`` (round half to even); a voxel holds the mean of its points; a voxel without points is
0. Masked pixels (mask True = bad) contribute neither value nor count, as NaN data do in ``Gridder3D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from defectscope.errors import BadGeometry, BadMessage, ShapeMismatch
from defectscope.preprocessing.geometry import Geometry, load_xrayutilities

from defectscope.preprocessing.config import CANONICAL_AXES as AXES  # noqa: E402, F401 (the one definition, re-exported)
CHUNK_PIXELS = 1 << 20  # q coordinates are computed ~1M pixels at a time: bounded memory, cache friendly
PAD_VOXELS = 0.01


# Results ------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class QMap:
    """An orthonormal map in the canonical frame; all q in inverse angstrom (2π/d)."""

    volume: np.ndarray  # float64 [n0, n1, n2], mean intensity per voxel
    voxel_size: np.ndarray  # (3,) voxel edge per axis
    origin: np.ndarray  # (3,) canonical coordinates of voxel (0, 0, 0)
    rotation: np.ndarray  # (3, 3) lab -> canonical: canonical = rotation @ q_lab
    q_centre_lab: np.ndarray  # (3,) the q that defines axis 0

    def q_at(self, index) -> np.ndarray:
        """Canonical q vector of a voxel (fractional indices allowed)."""
        return self.origin + np.asarray(index, dtype=np.float64) * self.voxel_size

    def q_norm_at(self, index) -> float:
        """|Q| at a voxel."""
        return float(np.linalg.norm(self.q_at(index)))

    def q_lab_at(self, index) -> np.ndarray:
        return self.rotation.T @ self.q_at(index)

    @property
    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self.origin[k] + self.voxel_size[k] * np.arange(n) for k, n in enumerate(self.volume.shape))


@dataclass(frozen=True, eq=False)
class CanonicalFrame:
    q_centre_lab: np.ndarray
    rotation: np.ndarray
    natural_voxel: float  # the finest voxel with no empty one between measured points (module docstring)


@dataclass(frozen=True)
class Grid:
    """Fixed data range of the gridder: ``origin``/``upper`` are the first/last bin centres per axis."""

    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    voxel_size: float

    def __post_init__(self):
        if len(self.shape) != 3 or any(int(n) < 2 for n in self.shape):
            raise ShapeMismatch(f"grid shape must be three sizes >= 2, got {self.shape!r}")
        if not (math.isfinite(self.voxel_size) and self.voxel_size > 0) or not all(map(math.isfinite, self.origin)):
            raise BadGeometry(f"grid voxel_size must be positive and origin finite, got {self.voxel_size!r}, {self.origin!r}")
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))

    @property
    def upper(self) -> tuple[float, float, float]:
        return tuple(o + (n - 1) * self.voxel_size for o, n in zip(self.origin, self.shape))

    @property
    def steps(self) -> np.ndarray:
        # Gridder3D's own step: recomputed from the range exactly as its C code does.
        return np.array([abs(u - o) / float(n - 1) for o, u, n in zip(self.origin, self.upper, self.shape)])

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))


# Pixel coordinates (shared by both paths, so they see bit-identical coordinates) -----------------
def pixel_q_lab(geometry: Geometry, frame_indices, roi=None) -> np.ndarray:
    """q_lab of every pixel of the given frames: float64 [len(frames), rows, cols, 3] (xrayutilities)."""
    xu = load_xrayutilities()
    rows, cols = geometry.frame_shape
    qconv = xu.experiment.QConversion(
        list(geometry.sample_circles), list(geometry.detector_circles), list(geometry.incident_beam), en=geometry.energy_ev
    )
    qconv.init_area(
        geometry.pixel_directions[0], geometry.pixel_directions[1],
        cch1=geometry.direct_beam[0], cch2=geometry.direct_beam[1], Nch1=rows, Nch2=cols,
        distance=geometry.distance_m, pwidth1=geometry.pixel_size_m[0], pwidth2=geometry.pixel_size_m[1],
    )  # fmt: skip
    frame_indices = np.atleast_1d(np.asarray(frame_indices))
    sample, detector = geometry.circle_angles_deg(frame_indices)
    roi = list(roi) if roi is not None else [0, rows, 0, cols]
    q = qconv.area(*sample, *detector, roi=roi)
    shape = (len(frame_indices), roi[1] - roi[0], roi[3] - roi[2])
    return np.stack([np.reshape(c, shape) for c in q], axis=-1)


def _canonical(frame: CanonicalFrame, q_lab: np.ndarray) -> list[np.ndarray]:
    # Written out per component (not a matmul) so every caller gets identical floating-point results.
    r = frame.rotation
    qx, qy, qz = q_lab[..., 0], q_lab[..., 1], q_lab[..., 2]
    return [r[k, 0] * qx + r[k, 1] * qy + r[k, 2] * qz for k in range(3)]


def _frame_chunks(geometry: Geometry):
    rows, cols = geometry.frame_shape
    step = max(1, CHUNK_PIXELS // (rows * cols))
    for start in range(0, geometry.n_frames, step):
        yield np.arange(start, min(start + step, geometry.n_frames))


def canonical_frame(geometry: Geometry) -> CanonicalFrame:
    """Q̂ and the canonical rotation from the centre pixel of the middle frame (see module docstring)."""
    rows, cols = geometry.frame_shape
    mid, r0, c0 = (geometry.n_frames - 1) // 2, rows // 2, cols // 2
    q = pixel_q_lab(geometry, [mid, mid + 1], roi=[r0, r0 + 2, c0, c0 + 2])
    q_centre = q[0, 0, 0]
    rocking = q[1, 0, 0] - q_centre
    steps = np.stack([q[0, 1, 0] - q_centre, q[0, 0, 1] - q_centre, rocking])
    norm = np.linalg.norm(q_centre)
    if norm < 1e-3:
        raise BadGeometry(f"|Q| at the centre pixel is {norm:.2e} 1/A: the detector sits at the direct beam")
    e0 = q_centre / norm
    e1 = rocking - (rocking @ e0) * e0
    if np.linalg.norm(e1) < 1e-9 * norm:
        raise BadGeometry(f"rocking {geometry.rocking_motor!r} does not move Q (its axis is along Q): not a 3-D scan")
    e1 /= np.linalg.norm(e1)
    rotation = np.stack([e0, e1, np.cross(e0, e1)])
    voxel = np.abs(steps @ rotation.T).sum(axis=0).max()  # per canonical axis: sum over steps of |component|
    return CanonicalFrame(q_centre_lab=q_centre, rotation=rotation, natural_voxel=float(voxel))


def natural_grid(geometry: Geometry, frame: CanonicalFrame | None = None, *, max_grid: int = 256) -> Grid:
    """The grid at the scan's natural resolution covering all its pixels (see module docstring)."""
    if isinstance(max_grid, bool) or not isinstance(max_grid, int) or max_grid < 2:
        raise BadMessage(f"max_grid must be an integer >= 2, got {max_grid!r}")
    frame = frame or canonical_frame(geometry)
    n, (rows, cols) = geometry.n_frames, geometry.frame_shape
    every = np.arange(n)
    faces = [
        pixel_q_lab(geometry, [0, n - 1]),
        pixel_q_lab(geometry, every, roi=[0, 1, 0, cols]),
        pixel_q_lab(geometry, every, roi=[rows - 1, rows, 0, cols]),
        pixel_q_lab(geometry, every, roi=[0, rows, 0, 1]),
        pixel_q_lab(geometry, every, roi=[0, rows, cols - 1, cols]),
    ]
    coords = [np.concatenate([c.ravel() for c in axis]) for axis in zip(*(_canonical(frame, f) for f in faces))]
    d = frame.natural_voxel
    centre = frame.rotation @ frame.q_centre_lab
    origin, shape = [], []
    for k in range(3):
        lo, hi = coords[k].min() - PAD_VOXELS * d, coords[k].max() + PAD_VOXELS * d
        size = int(math.ceil((hi - lo) / d)) + 1
        if size > max_grid:  # keep the resolution, crop around Q
            size = max_grid
            lo = min(max(centre[k] - 0.5 * (size - 1) * d, lo), hi - (size - 1) * d)
        origin.append(lo)
        shape.append(max(size, 2))
    return Grid(shape=tuple(shape), origin=tuple(origin), voxel_size=d)


def _voxel_index(coords: list[np.ndarray], grid: Grid) -> np.ndarray:
    """Flat voxel index of each point (-1 outside), by Gridder3D's rule (see module docstring)."""
    index = np.zeros(coords[0].shape, dtype=np.int64)
    inside = np.ones(coords[0].shape, dtype=bool)
    for c, lo, hi, d, n in zip(coords, grid.origin, grid.upper, grid.steps, grid.shape):
        inside &= (c >= lo) & (c <= hi)
        index *= n
        index += np.minimum(np.rint((c - lo) / d), n - 1).astype(np.int64)
    index[~inside] = -1
    return index


def _qmap(volume: np.ndarray, grid: Grid, frame: CanonicalFrame) -> QMap:
    return QMap(
        volume=volume.reshape(grid.shape),
        voxel_size=grid.steps,
        origin=np.array(grid.origin),
        rotation=frame.rotation.copy(),
        q_centre_lab=frame.q_centre_lab.copy(),
    )
