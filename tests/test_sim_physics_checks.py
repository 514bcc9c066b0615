"""Physics checks of relaxed configurations (training/physics_checks.py): the elastic estimate of the partial
separation, invisibility after relaxation on a tiny crystal relaxed here with LAMMPS, the line's depth; the full
check on small crystals behind --slow."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("finufft")

from defectscope.training import physics_checks, relax, relax_simulator, simulator  # noqa: E402
from defectscope.training.crystals import Crystal, element  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_elastic_partial_separation_follows_the_isotropic_formula():
    a, nu = 4.08, 0.44
    screw = physics_checks.elastic_partial_separation_angstrom(a, 30.0, 27.0, nu, 0.0)
    edge = physics_checks.elastic_partial_separation_angstrom(a, 30.0, 27.0, nu, 90.0)
    assert edge / screw == pytest.approx((2.0 + nu) / (2.0 - 3.0 * nu), rel=1e-12)
    # d ∝ μ b² / γ: half the stacking-fault energy, twice the separation; b_p = a/√6.
    assert physics_checks.elastic_partial_separation_angstrom(a, 15.0, 27.0, nu, 0.0) == pytest.approx(2 * screw, rel=1e-12)
    assert physics_checks.elastic_partial_separation_angstrom(2 * a, 30.0, 27.0, nu, 0.0) == pytest.approx(4 * screw, rel=1e-12)
    mu_b2 = 27e9 * (a * 1e-10 / np.sqrt(6.0)) ** 2
    assert screw == pytest.approx(1e10 * mu_b2 / (8 * np.pi * 0.030) * (2 - 3 * nu) / (1 - nu), rel=1e-12)


def _tiny(kind="screw", offset=(0.13, 0.21, -0.17), n_cells=7):
    base = relax.CrystalConfiguration("Au", n_cells, 0.95, (1, 1, 1), 0.7)
    centre_a = relax.ideal_sites_half_a(base).mean(axis=0) / 2.0 + np.asarray(offset)
    return relax.CrystalConfiguration("Au", n_cells, 0.95, (1, 1, 1), 0.7, kind, "CD", tuple(centre_a))


def test_a_relaxed_centred_screw_stays_less_visible_at_g_dot_b_zero(tmp_path):
    conf = _tiny(n_cells=14)
    relax_cfg = relax.RelaxationConfig()
    line = relax_simulator.atoms_of(conf, tmp_path, relax_cfg)
    free = relax_simulator.atoms_of(physics_checks.defect_free_counterpart(conf), tmp_path, relax_cfg)
    assert np.array_equal(free.crystal.positions_angstrom, line.crystal.positions_angstrom)
    x, a = line.crystal.positions_angstrom, line.crystal.element.lattice_a_angstrom
    maker = physics_checks.PatternMaker((20, 22, 18), 1e-6)
    r = {}
    for hkl in (simulator.INVISIBLE_111[0], simulator.VISIBLE_111[0]):
        grid = maker.grid(x, hkl, a, 0.4, 3.0)
        reference = maker(x, free.displacement_angstrom, hkl, a, grid)
        r[simulator.g_dot_b(hkl)] = physics_checks._r(maker(x, line.displacement_angstrom, hkl, a, grid), reference)
    visible = max(v for k, v in r.items() if k != 0.0)
    # The Shockley partials have g·b_p = ±1/3 at g·b = 0 and relaxation moves the core: a residual remains, large
    # on a crystal of 14 cells (~0.45 here); docs/eval/physics_checks.json reports it on the dataset's crystals.
    assert 0.02 < r[0.0] < 0.6 * visible


def test_a_line_near_a_side_facet_runs_shallower_than_a_centred_one():
    def depth(offset):
        conf = _tiny("edge", offset, n_cells=10)
        sites = relax.ideal_sites_half_a(conf)
        a = element("Au").lattice_a_angstrom
        crystal = Crystal(element("Au"), conf.n_unit_cells, conf.surface_energy_ratio, conf.interface_normal,
                          conf.truncation_fraction, sites * (a / 2.0))
        atoms = relax_simulator.RelaxedAtoms(crystal, relax.dislocation_at(conf, a), np.zeros_like(sites, float),
                                             np.zeros_like(sites, float), {})
        return physics_checks.line_to_surface_angstrom(atoms)

    assert depth((0.0, 0.0, 0.0)) > 2.0 * depth((3.0, -3.0, 0.0)) > 0.0


@pytest.mark.slow
def test_physics_checks_run_end_to_end_on_small_relaxed_crystals(tmp_path):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"schema_version": 3, "elements": ["Au"], "relaxed_fraction": 1.0,
                                    "class_weights": [0, 1, 1], "orientations_per_configuration": 1}))
    from defectscope.training.sim_config import load_config

    cfg = load_config(cfg_path)
    relax.relax_all(relax.simulator_configurations(cfg, 0, range(3)), tmp_path / "cache", cfg.relaxation_config())
    out = tmp_path / "checks.json"
    physics_checks.main(["--config", str(cfg_path), "--cache-dir", str(tmp_path / "cache"), "--counterpart-cache-dir",
                         str(tmp_path / "free"), "--n", "3", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["configurations"] == 3
    for row in result["rows"]:
        assert 0.05 < row["visible"]["peak_ratio_relaxed"] < 1.0 and row["line_to_surface_angstrom"] > 0
    assert sum(v["relaxed_percent"]["n"] for k, v in result["peak_maxima"].items() if k.endswith(" all")) == 3
