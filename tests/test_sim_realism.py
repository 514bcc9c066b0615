"""Training data as real crystals are (issue #16): relaxed configurations in the simulator, strain for every
class, beam and detector nuisances. Real LAMMPS runs on tiny crystals (a few hundred atoms), real NUFFTs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("finufft")

from defectscope.training import detector, relax, relax_simulator, simulator, strain  # noqa: E402
from defectscope.training.conventions import reciprocal_vector_inv_angstrom_cryst  # noqa: E402
from defectscope.training.diffraction import (  # noqa: E402
    ReciprocalGrid,
    direct_amplitude,
    intensity,
    nufft_amplitude,
    scattering_atoms,
)
from defectscope.training.sim_config import SCHEMA_VERSION, SimulationConfig, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = SimulationConfig(shape=(32, 32, 32), orientations_per_configuration=2)
EVERY_NUISANCE = SMALL.replace(
    interface_strain_probability=1.0, smooth_strain_probability=1.0, coherence_probability=1.0, psf_probability=1.0,
    hot_pixel_probability=1.0, dead_line_probability=1.0, alien_probability=1.0, background_range=(0.0, 1.0),
    gap_probability=1.0)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _tiny_dislocated(kind="edge", n_cells=6):
    base = relax.CrystalConfiguration("Au", n_cells, 0.95, (1, 1, 1), 0.7)
    centre_a = relax.ideal_sites_half_a(base).mean(axis=0) / 2.0 + np.array([0.13, 0.21, -0.17])
    return relax.CrystalConfiguration("Au", n_cells, 0.95, (1, 1, 1), 0.7, kind, "CD", tuple(centre_a))


# -- relaxation in the simulator -------------------------------------------------------------------------
def test_relaxed_atoms_round_trip_through_the_cache_and_the_twin_shares_sites_and_lattice(tmp_path):
    conf, relax_cfg = _tiny_dislocated(), relax.RelaxationConfig()
    fresh = relax_simulator.atoms_of(conf, tmp_path, relax_cfg)
    cached = relax_simulator.atoms_of(conf, tmp_path, relax_cfg)  # now read back, no LAMMPS
    assert relax.load_cached(conf, tmp_path, relax_cfg) is not None
    # Bit-identical, so a pattern does not depend on whether its relaxation ran in this process.
    assert np.array_equal(fresh.displacement_angstrom, cached.displacement_angstrom)
    assert np.array_equal(fresh.crystal.positions_angstrom, cached.crystal.positions_angstrom)
    a = cached.record["lattice_a_angstrom"]
    assert cached.crystal.element.lattice_a_angstrom == a and a != pytest.approx(4.0782, abs=1e-4)  # the potential's
    twin = relax_simulator.atoms_of(conf, tmp_path, relax_cfg, twin=True)
    assert np.array_equal(twin.crystal.positions_angstrom, cached.crystal.positions_angstrom)
    assert np.array_equal(twin.displacement_angstrom, cached.volterra_angstrom)
    g = reciprocal_vector_inv_angstrom_cryst((1, -1, 1), a)
    p_relaxed, p_twin = relax_simulator.parameters(cached, g), relax_simulator.parameters(twin, g)
    assert p_relaxed["relaxed"] and not p_twin["relaxed"] and p_twin["relax_state"] == "unrelaxed"
    assert p_relaxed["potential"] == p_twin["potential"] == relax_cfg.potential_name("Au")
    assert p_relaxed["relax_cg_iterations"] == cached.record["cg_iterations"] > 0
    assert p_relaxed["relaxation_phase_range_rad"] > 0.0 == p_twin["relaxation_phase_range_rad"]


def test_relaxed_exact_sum_with_strain_equals_the_direct_sum_over_atoms(tmp_path):
    atoms = relax_simulator.atoms_of(_tiny_dislocated("screw"), tmp_path, relax.RelaxationConfig())
    crystal = atoms.crystal
    g = reciprocal_vector_inv_angstrom_cryst((1, -1, 1), crystal.element.lattice_a_angstrom)
    draw = strain.draw_strain(np.random.default_rng(3), SMALL.replace(interface_strain_probability=1.0,
                                                                      smooth_strain_probability=1.0))
    added, _ = strain.strain_field(crystal.positions_angstrom, g, draw, crystal.interface_normal, 0.44)
    u = atoms.displacement_angstrom + added
    assert np.abs(atoms.displacement_angstrom - atoms.volterra_angstrom).max() > 0.05  # relaxation moved atoms
    extent = float(np.ptp(crystal.positions_angstrom, axis=0).max())
    frame = np.array([[1, -1, 1], [1, 1, 0], [-1, 1, 2]], dtype=float)
    frame /= np.linalg.norm(frame, axis=1)[:, None]
    grid = ReciprocalGrid(frame, 1.0 / (2.7 * extent), np.array([0.3, -0.2, 0.1]), (12, 14, 10))
    fast = intensity(nufft_amplitude(scattering_atoms(crystal.positions_angstrom, u, g), grid))
    exact = intensity(direct_amplitude(crystal.positions_angstrom, u, g, grid))
    assert np.abs(fast - exact).max() / exact.max() <= 1e-4


def test_a_dislocation_that_left_labels_the_crystal_defect_free():
    assert relax_simulator.label_after_relaxation(1, {"dislocation_left_crystal": True, "state": "left"}) == 0
    assert relax_simulator.label_after_relaxation(2, {"dislocation_left_crystal": False, "state": "dissociated"}) == 2


# -- strain ------------------------------------------------------------------------------------------------
def test_recorded_strain_phase_ranges_are_those_of_the_fields_and_the_drawn_targets():
    cfg = SMALL.replace(interface_strain_probability=1.0, smooth_strain_probability=1.0)
    plan = simulator.plan_configuration(cfg, 4, 1)
    built = simulator.build_configuration(cfg, 4, plan)
    unstrained = simulator.build_configuration(SMALL, 4, plan)
    draw = strain.draw_strain(simulator.rng_for(4, simulator.STREAM_STRAIN, 1), cfg)
    record = built.strain
    assert record["interface_strain"] and record["smooth_strain"]
    assert record["interface_phase_range_rad"] == pytest.approx(draw.interface_phase_range_rad, rel=1e-9)
    assert record["smooth_phase_range_rad"] == pytest.approx(draw.smooth_phase_range_rad, rel=1e-9)
    # The recorded total is the 1st-99th percentile range of the phase the atoms actually carry.
    added_phase = built.atoms.bragg_phase_rad - unstrained.atoms.bragg_phase_rad
    lo, hi = np.percentile(added_phase, [1, 99])
    assert record["strain_phase_range_rad"] == pytest.approx(hi - lo, rel=1e-9)
    params = simulator.simulate_configuration(cfg, 4, 1, 1).params
    assert params["strain_phase_range_rad"][0] == record["strain_phase_range_rad"]


def test_interface_misfit_decays_away_from_the_interface_facet():
    from defectscope.training import crystals

    crystal = crystals.build_crystal("Au", 12, 0.95, (1, 1, 1), 0.7)
    r = crystal.positions_angstrom
    u = strain.interface_displacement_angstrom(r, (1, 1, 1), 0.01, 10.0, 0.44)
    depth = (r @ np.ones(3)).max() / np.sqrt(3) - r @ np.ones(3) / np.sqrt(3)
    n = np.ones(3) / np.sqrt(3)
    in_plane = u - np.outer(u @ n, n)
    rel = r - r[depth < 1.0].mean(axis=0)
    radius = np.linalg.norm(rel - np.outer(rel @ n, n), axis=1)
    near, far = (depth < 1.0) & (radius > 10), (depth > 25) & (radius > 10)
    # In-plane strain ε e^(-z/λ): 1 % at the interface, e^(-2.5) of that 25 Å above it.
    assert np.median(np.linalg.norm(in_plane[near], axis=1) / radius[near]) == pytest.approx(0.01, rel=1e-6)
    assert np.max(np.linalg.norm(in_plane[far], axis=1) / radius[far]) < 0.01 * np.exp(-2.4)


# -- beam and detector -------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_partial_coherence_reduces_fringe_visibility_as_drawn(axis):
    # Two points D apart along one axis: I(q) = 2 + 2 cos(2π q D), visibility 1. The coherence function
    # keeps a fraction γ(D) = V of the interference.
    shape, dq = (24, 20, 16), 1e-3
    d_angstrom = 3.0 / (shape[axis] * dq)  # three fringes over the map
    q = dq * (np.arange(shape[axis]) - shape[axis] // 2)
    line = 2.0 + 2.0 * np.cos(2.0 * np.pi * q * d_angstrom)
    coherent = np.broadcast_to(line.reshape([-1 if a == axis else 1 for a in range(3)]), shape).copy()
    visibility = [1.0, 1.0, 1.0]
    visibility[axis] = 0.62
    draw = detector.NuisanceDraw(tuple(visibility), 0.0, (), 0.0, (), (), False)
    extent = np.full(3, d_angstrom)
    blurred = detector.blur(coherent, draw, extent, dq)
    measured = (blurred.max() - blurred.min()) / (blurred.max() + blurred.min())
    assert measured == pytest.approx(0.62, abs=1e-9)
    assert blurred.sum() == pytest.approx(coherent.sum(), rel=1e-12)  # blurring moves intensity, keeps it
    off = detector.NuisanceDraw((1.0, 1.0, 1.0), 0.0, (), 0.0, (), (), False)
    assert detector.blur(coherent, off, extent, dq) is coherent


def test_simulated_fringes_lose_contrast_with_the_drawn_visibility():
    cfg = SMALL.replace(coherence_probability=1.0, fringe_visibility_range=(0.5, 0.5), peak_counts_range=(1e9, 1e9))
    coherent = simulator.simulate_configuration(SMALL, 2, 1, 1, keep_intensity=True).intensity[0]
    result = simulator.simulate_configuration(cfg, 2, 1, 1)
    assert np.allclose(result.params["fringe_visibility"][0], 0.5)
    partial = result.counts[0].astype(float)
    line_c, line_p = coherent[:, 16, 16] / coherent.max(), partial[:, 16, 16] / partial.max()
    # The first minima beside the peak fill in: the dips of the partially coherent line are shallower.
    peak = int(np.argmax(line_c))
    dip = peak + 1 + int(np.argmin(line_c[peak + 1:peak + 6]))
    assert line_p[dip] > 2.0 * line_c[dip]


def test_detector_nuisances_appear_where_recorded():
    cfg = EVERY_NUISANCE.replace(gap_probability=0.0, alien_relative_intensity_range=(0.5, 0.5),
                                 alien_sigma_voxels_range=(1.0, 1.0))
    result = simulator.simulate_configuration(cfg, 7, 3, 2)
    p = result.params
    for o in range(2):
        counts = result.counts[o]
        assert p["n_hot_pixels"][o] >= 1 and p["n_dead_lines"][o] >= 1 and p["n_aliens"][o] >= 1
        for axis, index in zip(p["dead_line_axes"][o][:p["n_dead_lines"][o]], p["dead_line_indices"][o]):
            assert not counts[(slice(None),) * int(axis) + (int(index),)].any()
        for i1, i2 in p["hot_pixel_voxels"][o][:p["n_hot_pixels"][o]]:
            assert np.all(counts[:, i1, i2] == round(p["hot_pixel_counts"][o]))
        for centre in p["alien_centres_voxels"][o][:p["n_aliens"][o]]:
            i = tuple(int(round(c)) for c in centre)
            if not (result.mask[o][i] or _on_defect(p, o, i)):
                assert counts[i] > 0.2 * p["peak_counts_target"][o]
        assert not result.mask[o].any()  # detector_defects_masked_probability = 0: not flagged
    flagged = simulator.simulate_configuration(cfg.replace(detector_defects_masked_probability=1.0), 7, 3, 1)
    expected = detector.defect_mask(cfg.shape, detector.draw_nuisances(_nuisance_rng(7, 3, 0), cfg, cfg.shape))
    assert np.array_equal(flagged.mask[0], expected) and flagged.params["detector_defects_masked"][0]


def _on_defect(p, o, index) -> bool:
    hot = any((index[1], index[2]) == tuple(v) for v in p["hot_pixel_voxels"][o][:p["n_hot_pixels"][o]])
    dead = any(index[int(a)] == i for a, i in zip(p["dead_line_axes"][o][:p["n_dead_lines"][o]], p["dead_line_indices"][o]))
    return hot or dead


def _nuisance_rng(seed, index, orientation):
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(simulator.STREAM_ORIENTATION, index,
                                                                         orientation)).spawn(4)[3])


def test_switching_one_nuisance_on_does_not_reshuffle_the_others():
    only_hot = SMALL.replace(hot_pixel_probability=1.0)
    a = detector.draw_nuisances(_nuisance_rng(1, 2, 0), only_hot, SMALL.shape)
    b = detector.draw_nuisances(_nuisance_rng(1, 2, 0), EVERY_NUISANCE, SMALL.shape)
    assert a.hot_pixels == b.hot_pixels and a.hot_pixel_counts == b.hot_pixel_counts
    assert a.aliens == () and b.aliens != ()
    # And nothing switched on leaves the counts of version 1: the orientation draws, the noise, the masks.
    plain, with_strain_off = (simulator.simulate_configuration(c, 1, 2, 1) for c in (SMALL, SMALL.replace(
        interface_phase_range_rad=(1.0, 2.0), fringe_visibility_range=(0.6, 0.7))))
    assert np.array_equal(plain.counts, with_strain_off.counts)


def test_same_seed_gives_identical_bytes_with_every_option_on(tmp_path):
    from defectscope.training.runner import simulate_dataset

    paths = [simulate_dataset(4, tmp_path / f"d{k}.h5", EVERY_NUISANCE, seed=5, progress=False) for k in range(2)]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    other = simulate_dataset(4, tmp_path / "other.h5", EVERY_NUISANCE, seed=6, progress=False)
    assert other.read_bytes() != paths[0].read_bytes()


# -- configs ----------------------------------------------------------------------------------------------------
def test_version_1_configs_still_load_with_every_new_option_off():
    v1 = json.loads((REPO / "training/configs/paper_mix.json").read_text())
    assert v1["schema_version"] == 1
    cfg = SimulationConfig.from_dict(v1)
    assert cfg.schema_version == SCHEMA_VERSION
    defaults = SimulationConfig()
    for name in ("relaxed_fraction", "interface_strain_probability", "smooth_strain_probability", "coherence_probability",
                 "psf_probability", "hot_pixel_probability", "dead_line_probability", "alien_probability",
                 "detector_frame_fraction"):
        assert getattr(cfg, name) == getattr(defaults, name) == 0.0
    assert SimulationConfig.from_json(cfg.to_json()) == cfg


def test_realistic_mix_config_loads_and_describes_its_relaxation():
    cfg = load_config(REPO / "training/configs/realistic_mix.json")
    assert 0.5 <= cfg.relaxed_fraction <= 1.0 and cfg.cd_fraction == 0.75 and set(cfg.elements) == {"Al", "Ag", "Au", "Pt"}
    assert cfg.relaxation_config().stopping_rule()["energy_tolerance"] == 1e-6
    with pytest.raises(ValueError):
        SimulationConfig(relax_potentials=(("Au", "no_such_potential"),))
    with pytest.raises(ValueError):
        SimulationConfig(fringe_visibility_range=(0.0, 1.0))


@pytest.mark.slow
def test_simulator_builds_relaxed_configurations_at_the_potentials_lattice_constant(tmp_path):
    cfg = SMALL.replace(relaxed_fraction=1.0, relax_cache_dir=str(tmp_path))
    relaxed = simulator.simulate_configuration(cfg, 0, 2, 1)
    twin = simulator.simulate_configuration(cfg.replace(relaxed_twin=True), 0, 2, 1)
    again = simulator.simulate_configuration(cfg, 0, 2, 1)  # from the cache now
    assert np.array_equal(relaxed.counts, again.counts)
    for name in ("lattice_a_angstrom", "potential", "orientation_index", "peak_counts_target"):
        assert relaxed.params[name][0] == twin.params[name][0]
    assert relaxed.params["relaxed"][0] and not twin.params["relaxed"][0]
    assert not np.array_equal(relaxed.counts, twin.counts)


@pytest.mark.slow
def test_relaxed_dataset_is_identical_on_one_and_two_workers_and_when_read_from_the_cache(tmp_path):
    from defectscope.training.runner import simulate_dataset

    cfg = EVERY_NUISANCE.replace(relaxed_fraction=1.0, relax_cache_dir=str(tmp_path / "cache"))
    fresh = simulate_dataset(6, tmp_path / "fresh.h5", cfg, seed=2, workers=2, progress=False)  # relaxes in the workers
    cached = simulate_dataset(6, tmp_path / "cached.h5", cfg, seed=2, workers=1, progress=False)
    assert fresh.read_bytes() == cached.read_bytes()
