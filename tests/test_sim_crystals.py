"""Simulator geometry: Winterbottom particles and Volterra dislocation fields (training/crystals, dislocations)."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.errors import BadMessage
from defectscope.training import crystals, dislocations
from defectscope.training.conventions import canonical_axes


@pytest.mark.parametrize("ratio,fraction", [(0.90, 0.65), (1.00, 0.75)])
def test_small_au_particles_match_the_papers_size(ratio, fraction):
    # Paper: small crystals 15x15x(9-12) nm, 1.0-1.4e5 atoms; the default surface-energy-ratio and truncation
    # ranges span that (these are the two extreme corners).
    c = crystals.build_crystal("Au", 40, ratio, (1, 1, 1), fraction)
    assert 0.95e5 <= c.n_atoms <= 1.45e5
    height_nm = np.ptp(c.positions_angstrom @ np.ones(3) / np.sqrt(3)) / 10
    assert 9.0 <= height_nm <= 12.1
    assert np.ptp(c.positions_angstrom, axis=0).max() / 10 == pytest.approx(40 * 0.40782, rel=0.01)


def test_sites_are_fcc_lattice_vectors_and_facets_sit_where_the_wulff_construction_puts_them():
    c = crystals.build_crystal("Pt", 30, 0.93, (-1, 1, 1), 0.7)
    a = c.element.lattice_a_angstrom
    half = np.rint(c.positions_angstrom / (a / 2)).astype(int)
    assert np.allclose(half * a / 2, c.positions_angstrom)
    assert np.all(half.sum(axis=1) % 2 == 0)  # fcc: even coordinate sum in a/2 units
    h100, h111 = 30.0, 0.93 * 30.0  # in a/2 units
    assert np.abs(half).max() == h100  # {100} facets present
    assert np.abs(half).sum(axis=1).max() / np.sqrt(3) <= h111 + 1e-9
    assert np.abs(half).sum(axis=1).max() / np.sqrt(3) > h111 - 1.0  # {111} facets within one layer
    # Truncation: 70 % of the free height 2·h111 along the interface normal remains.
    along = half @ np.array([-1, 1, 1]) / np.sqrt(3)
    assert along.min() >= -h111 - 1e-9
    assert along.max() <= h111 * (2 * 0.7 - 1) + 1e-9
    # Heights between the outermost atomic (111) planes (spacing a/√3 = 2/√3 half-units) fall short of the
    # continuum height by less than two plane spacings.
    layer = 2 / np.sqrt(3)
    assert 0.7 - 2 * layer / (2 * h111) <= (along.max() - along.min()) / (2 * h111) <= 0.7


def test_free_particle_is_centrosymmetric_and_truncation_removes_atoms():
    free = crystals.build_crystal("Ag", 10, 0.95)
    assert np.allclose(free.centre_angstrom, 0.0, atol=1e-9)
    cut = crystals.build_crystal("Ag", 10, 0.95, (1, 1, -1), 0.7)
    assert cut.n_atoms < free.n_atoms
    assert cut.truncation_fraction == 0.7 and cut.interface_normal == (1, 1, -1)


@pytest.mark.parametrize("kwargs", [dict(symbol="Cu"), dict(surface_energy_ratio=2.0),
                                    dict(interface_normal=(1, 0, 0), truncation_fraction=0.7),
                                    dict(interface_normal=(1, 1, 1), truncation_fraction=0.3)])
def test_bad_crystal_parameters_are_refused(kwargs):
    args = dict(symbol="Au", n_unit_cells=6, surface_energy_ratio=0.95) | kwargs
    with pytest.raises(BadMessage):
        crystals.build_crystal(**args)


@pytest.mark.parametrize("kind", ["screw", "edge"])
def test_dislocation_geometry_is_the_papers(kind):
    d = dislocations.make_dislocation(kind, 4.0, 0.4, [0.0, 0.0, 0.0])
    b = d.burgers_vector_angstrom
    assert np.allclose(b, [2.0, -2.0, 0.0]) and np.linalg.norm(b) == pytest.approx(4.0 / np.sqrt(2))
    if kind == "screw":
        assert np.allclose(np.cross(b, d.line_direction), 0.0)
    else:
        assert b @ d.line_direction == pytest.approx(0.0, abs=1e-12)
        normal = np.cross(b, d.line_direction)  # glide plane (111)
        assert np.allclose(normal / np.linalg.norm(normal), np.ones(3) / np.sqrt(3))


@pytest.mark.parametrize("kind", ["screw", "edge"])
def test_burgers_circuit_closure_failure_is_b(kind):
    """Crossing the cut surface, the displacement jumps by exactly b (a lattice vector): a Volterra dislocation."""
    d = dislocations.make_dislocation(kind, 4.08, 0.44, [1.3, -0.7, 0.4])
    t = d.line_direction
    if kind == "edge":
        x_axis = d.burgers_vector_angstrom / np.linalg.norm(d.burgers_vector_angstrom)
    else:
        from defectscope.training.conventions import reference_perpendicular

        x_axis = reference_perpendicular(t)
    y_axis = np.cross(t, x_axis)
    radius, eps = 25.0, 1e-7
    above = d.position_angstrom - radius * x_axis + eps * y_axis + 3.0 * t
    below = d.position_angstrom - radius * x_axis - eps * y_axis + 3.0 * t
    u = dislocations.displacement_angstrom(np.array([above, below]), d)
    assert np.allclose(u[0] - u[1], d.burgers_vector_angstrom, atol=1e-5)
    # Along the line the field does not change (a straight, infinite dislocation).
    shifted = dislocations.displacement_angstrom(np.array([above + 7.0 * t]), d)
    assert np.allclose(shifted[0], u[0])


def test_edge_field_is_in_elastic_equilibrium():
    """Navier: ∇²u + ∇(∇·u)/(1-2ν) = 0 away from the core (fixes the relative signs of the terms)."""
    nu = 0.38
    d = dislocations.make_dislocation("edge", 3.92, nu, [0.3, 0.1, -0.2])
    h, eye = 1e-3, np.eye(3)

    def u(p):
        return dislocations.displacement_angstrom(np.atleast_2d(p), d)[0]

    def div(p):
        return sum((u(p + h * eye[i])[i] - u(p - h * eye[i])[i]) / (2 * h) for i in range(3))

    for p in ([5.0, 3.0, 1.0], [-4.0, 7.0, 2.0], [2.0, -6.0, 0.5]):
        p = np.array(p)
        laplacian = sum((u(p + h * eye[i]) - 2 * u(p) + u(p - h * eye[i])) / h**2 for i in range(3))
        grad_div = np.array([(div(p + h * eye[i]) - div(p - h * eye[i])) / (2 * h) for i in range(3)])
        residual = laplacian + grad_div / (1 - 2 * nu)
        assert np.abs(residual).max() < 1e-6 * max(1.0, np.abs(laplacian).max() * 1e3)
        assert np.abs(laplacian).max() > 1e-3  # the check is not vacuous


def test_cd_positions_lie_within_ten_percent_of_the_lateral_size_and_rpd_inside_the_particle():
    c = crystals.build_crystal("Au", 20, 0.95, (1, -1, 1), 0.7)
    rng = np.random.default_rng(7)
    for kind in ("screw", "edge"):
        for _ in range(50):
            p = dislocations.draw_position_angstrom(c, kind, "CD", rng)
            d = dislocations.make_dislocation(kind, 4.0782, 0.44, p)
            assert dislocations.perpendicular_offset_angstrom(c.centre_angstrom, d) <= 0.1 * c.lateral_size_angstrom + 1e-9
        lo, hi = c.positions_angstrom.min(axis=0), c.positions_angstrom.max(axis=0)
        for _ in range(50):
            p = dislocations.draw_position_angstrom(c, kind, "RPD", rng)
            assert np.all(p >= lo - 2.1) and np.all(p <= hi + 2.1)


def test_rpd_radius_fraction_keeps_lines_near_the_centre_and_none_is_the_old_draw():
    c = crystals.build_crystal("Au", 20, 0.95, (1, -1, 1), 0.7)
    half_cell_diagonal = 0.5 * np.sqrt(3) * c.element.lattice_a_angstrom
    for kind in ("screw", "edge"):
        rng = np.random.default_rng(11)
        offsets = []
        for _ in range(200):
            p = dislocations.draw_position_angstrom(c, kind, "RPD", rng, rpd_radius_fraction=0.25)
            d = dislocations.make_dislocation(kind, 4.0782, 0.44, p)
            offsets.append(dislocations.perpendicular_offset_angstrom(c.centre_angstrom, d))
        offsets = np.array(offsets) / c.lateral_size_angstrom
        assert offsets.max() <= 0.25 + half_cell_diagonal / c.lateral_size_angstrom
        # Uniform in the volume of the cylinder: most lines sit in its outer half, not piled at the centre.
        assert 0.5 < np.mean(offsets > 0.125) < 0.9
        # Without the option, the draw is the original one: a random atom plus a jitter, same generator calls.
        a, b = np.random.default_rng(5), np.random.default_rng(5)
        p = dislocations.draw_position_angstrom(c, kind, "RPD", a)
        expected = c.positions_angstrom[b.integers(c.n_atoms)] + (b.random(3) - 0.5) * c.element.lattice_a_angstrom
        assert np.array_equal(p, expected)
    anywhere = [dislocations.perpendicular_offset_angstrom(
        c.centre_angstrom, dislocations.make_dislocation("screw", 4.0782, 0.44, dislocations.draw_position_angstrom(
            c, "screw", "RPD", np.random.default_rng(i)))) for i in range(200)]
    assert np.max(anywhere) / c.lateral_size_angstrom > 0.35  # the bound above is not vacuous


def test_canonical_frame_is_right_handed_with_axis_0_along_g():
    for hkl in [(1, -1, 1), (0, 0, 2), (2, -2, 0), (-1, -1, 1)]:
        for angle in (0.0, 1.0, 4.0):
            f = canonical_axes(hkl, angle)
            assert np.allclose(f @ f.T, np.eye(3), atol=1e-12)
            assert np.linalg.det(f) == pytest.approx(1.0)
            assert np.allclose(f[0], np.array(hkl) / np.linalg.norm(hkl))
    # Rotation about Q turns axes 1, 2 and leaves axis 0.
    f0, f1 = canonical_axes((1, -1, 1), 0.0), canonical_axes((1, -1, 1), np.pi / 2)
    assert np.allclose(f1[1], f0[2]) and np.allclose(f1[2], -f0[1])
