"""Conventions of the training-data simulator, stated once.

Every other ``defectscope.training`` simulator module follows these rules and refers here.

Lengths and frames
    Atom positions are in ångström (``*_angstrom``) in the **lattice frame**: x ∥ [100], y ∥ [010],
    z ∥ [001] of the fcc crystal (the paper's simulation cell, fixed for every configuration). Miller
    indices and directions such as ``[1 -1 0]`` are lattice-frame vectors in units of the lattice
    parameter ``a``. The lattice origin is an atom, so every undisplaced atom sits on a lattice vector.

Reciprocal space, two conventions
    *Internally* the simulator uses the crystallographic convention of the paper: q = 1/d, no 2π
    (``*_inv_angstrom_cryst``). The reciprocal-lattice vector of reflection hkl is G = (h, k, l) / a,
    and the kinematic amplitude of atoms at r_j displaced by u_j is

        A(q) = Σ_j exp(-2πi (G + q)·(r_j + u_j)),        I(q) = |A(q)|²   (atomic form factor 1).

    *Everything written to a dataset* uses the xrayutilities convention Q = 2π/d, as the wire protocol
    does (SPEC §4, ``voxel_size`` in Å⁻¹): ``voxel_size_inv_angstrom = 2π · dq_inv_angstrom_cryst``.
    Use :func:`to_inv_angstrom_2pi` at that boundary and nowhere else.

Canonical frame of a map (SPEC §2)
    Axis 0 ∥ Q = G (``q_par``), axes 1 and 2 ⊥ Q (``q_perp1``, ``q_perp2``), right-handed, C order.
    ``frame_axes`` is a 3x3 matrix whose *rows* are the unit vectors of axes 0, 1, 2 expressed in the
    lattice frame; a lattice-frame vector v has canonical coordinates ``frame_axes @ v``.
    Voxel k (0..n-1) along axis a sits at q_a = dq · (k - n//2 + shift_a): the Bragg position q = 0 is
    voxel (32, 32, 32) of a 64³ map when the sub-pixel shift is zero.

Angles
    ``rotation_about_q_rad`` is a right-handed rotation of axes 1 and 2 about axis 0 (Q), counted from
    the reference axes of :func:`reference_perpendicular`.

Oversampling
    Per canonical axis, oversampling = real-space field of view / crystal extent
    = 1 / (dq_inv_angstrom_cryst · extent_angstrom); the Sayre criterion is oversampling ≥ 2.
"""

from __future__ import annotations

import numpy as np

TWO_PI = 2.0 * np.pi
from defectscope.preprocessing.config import CANONICAL_AXES as AXES  # noqa: E402, F401 (the one definition, re-exported)


def to_inv_angstrom_2pi(dq_inv_angstrom_cryst):
    """Crystallographic 1/d to the Q = 2π/d convention written to datasets (SPEC §4 voxel_size)."""
    return TWO_PI * np.asarray(dq_inv_angstrom_cryst, dtype=float)


def reciprocal_vector_inv_angstrom_cryst(hkl, lattice_a_angstrom: float) -> np.ndarray:
    """G = (h, k, l) / a in the lattice frame, crystallographic convention (cubic lattice)."""
    return np.asarray(hkl, dtype=float) / float(lattice_a_angstrom)


def reference_perpendicular(q_unit: np.ndarray) -> np.ndarray:
    """A fixed unit vector ⊥ Q from which the rotation about Q is counted.

    [001] projected ⊥ Q, or [100] when Q is (nearly) along [001]: a deterministic choice, so the same
    rotation angle always means the same frame.
    """
    q_unit = np.asarray(q_unit, dtype=float)
    seed = np.array([0.0, 0.0, 1.0]) if abs(q_unit[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    perp = seed - (seed @ q_unit) * q_unit
    return perp / np.linalg.norm(perp)


def canonical_axes(g_vector, rotation_about_q_rad: float) -> np.ndarray:
    """Rows: unit vectors of canonical axes 0 (∥ G), 1, 2 in the lattice frame, right-handed."""
    e0 = np.asarray(g_vector, dtype=float)
    e0 = e0 / np.linalg.norm(e0)
    ref1 = reference_perpendicular(e0)
    ref2 = np.cross(e0, ref1)
    c, s = np.cos(rotation_about_q_rad), np.sin(rotation_about_q_rad)
    e1 = c * ref1 + s * ref2
    e2 = np.cross(e0, e1)
    return np.stack([e0, e1, e2])


# Coordinate products are written elementwise rather than with `@`: a BLAS call may run multi-threaded
# and pick different kernels from process to process, while these few multiply-adds are single-threaded
# and bit-identical everywhere (datasets must not depend on where they were computed).
def dot_rows(points_nx3: np.ndarray, vector) -> np.ndarray:
    """points · vector for every row, (n,)."""
    v = np.asarray(vector, dtype=np.float64)
    return points_nx3[:, 0] * v[0] + points_nx3[:, 1] * v[1] + points_nx3[:, 2] * v[2]


def transform_columns(matrix_3x3: np.ndarray, points_3xn: np.ndarray) -> np.ndarray:
    """matrix @ points for (3, n) points, (3, n)."""
    m = np.asarray(matrix_3x3, dtype=np.float64)
    return np.stack([m[i, 0] * points_3xn[0] + m[i, 1] * points_3xn[1] + m[i, 2] * points_3xn[2] for i in range(3)])
