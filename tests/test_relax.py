"""The relaxation stage: EAM potentials measured with LAMMPS, and relaxed tiny crystals (real LAMMPS runs,
a few hundred to a few thousand atoms, about a second each)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from defectscope.errors import BadMessage
from defectscope.training import potentials, relax

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _configuration(kind="defect_free", n_cells=10, element="Au", index=None):
    base = relax.CrystalConfiguration(element, n_cells, 0.95, (1, 1, 1), 0.7, index=index)
    if kind == "defect_free":
        return base
    # Off the centroid by a fraction of a cell, so the line runs between atomic columns.
    centre_a = relax.ideal_sites_half_a(base).mean(axis=0) / 2.0 + np.array([0.13, 0.21, -0.17])
    return relax.CrystalConfiguration(element, n_cells, 0.95, (1, 1, 1), 0.7, kind, "CD", tuple(centre_a), index)


# -- potentials ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("element", sorted(potentials.ZHOU_2004))
def test_zhou_embedding_is_continuous_at_its_joints(element):
    # Guards the Pt row: with the paper's printed ρn = 0.85 ρe its embedding function jumps by 2.6 eV.
    p = potentials.ZHOU_2004[element]
    for joint in (p.rho_n_fraction * p.rho_e, p.rho_0_fraction * p.rho_e):
        below, above = potentials.zhou_embedding(p, np.array([joint * (1 - 1e-9), joint * (1 + 1e-9)]))
        assert abs(above - below) < 1e-3


def test_zhou_setfl_files_are_deterministic(tmp_path):
    first = potentials.get_potential("Au_zhou04", tmp_path / "a")
    second = potentials.get_potential("Au_zhou04", tmp_path / "b")
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.sha256 == second.sha256
    assert str(REPO) not in str(first.path)


@pytest.mark.parametrize("element", sorted(potentials.ZHOU_2004))
def test_generated_zhou_lattice_constant_matches_its_parameters(element, tmp_path):
    measured = potentials.lattice_constant_angstrom(potentials.get_potential(f"{element}_zhou04", tmp_path))
    expected = potentials.ZHOU_2004[element].lattice_a_angstrom  # √2 re
    assert measured == pytest.approx(expected, rel=5e-3)


def test_generated_zhou_cohesive_energy_matches_its_parameters(tmp_path):
    # At equilibrium F(ρe) = F_0 = -2.98 eV and the pair sum brings Au to the paper's 3.93 eV.
    assert potentials.cohesive_energy_ev(potentials.get_potential("Au_zhou04", tmp_path)) == pytest.approx(3.93, abs=0.01)


def test_stacking_fault_method_reproduces_an_independent_measurement():
    # Issue #16: an independent check measured the Foiles u3 Au file at 4.7 mJ/m².
    assert potentials.stacking_fault_energy_mj_m2(potentials.get_potential("Au_u3")) == pytest.approx(4.7, abs=0.3)


def test_au_zhou_stacking_fault_energy_is_in_its_expected_range(tmp_path):
    # 3.55 mJ/m² measured (docs/eval/potentials.json): ZJW 2004 did not fit stacking faults, and its Au is
    # as far below experiment (30-45) as the Foiles file. A change of the tables or of the method moves it.
    sfe = potentials.stacking_fault_energy_mj_m2(potentials.get_potential("Au_zhou04", tmp_path))
    assert 2.5 < sfe < 5.0


def test_choice_is_closest_to_experiment_and_matches_the_code():
    rows = [{"element": "Au", "name": "low", "sfe_mj_m2": 4.0}, {"element": "Au", "name": "near", "sfe_mj_m2": 60.0},
            {"element": "Al", "name": "inside", "sfe_mj_m2": 130.0}, {"element": "Al", "name": "high", "sfe_mj_m2": 170.0}]
    assert potentials.choose(rows) == {"Au": "near", "Al": "inside"}
    written = json.loads((REPO / "docs" / "eval" / "potentials.json").read_text())
    assert written["chosen"] == potentials.CHOSEN == potentials.choose(written["potentials"])


# -- configurations -----------------------------------------------------------------------------------
def test_configuration_from_plan_is_the_simulators_crystal_and_line():
    from defectscope.training import simulator
    from defectscope.training.sim_config import SimulationConfig

    cfg = SimulationConfig()
    plan = next(p for p in (simulator.plan_configuration(cfg, 0, i) for i in range(20)) if p.label != 0)
    built = simulator.build_configuration(cfg, 0, plan)
    conf = relax.configuration_from_plan(cfg, 0, plan)
    a = built.crystal.element.lattice_a_angstrom
    np.testing.assert_allclose(np.asarray(conf.dislocation_position_a) * a, built.dislocation.position_angstrom, atol=1e-9)
    np.testing.assert_allclose(relax.ideal_sites_half_a(conf) * (a / 2.0), built.crystal.positions_angstrom, atol=1e-9)
    assert conf.kind == plan.kind and conf.index == plan.index


def test_relaxation_config_refuses_what_it_does_not_know():
    with pytest.raises(BadMessage):
        relax.RelaxationConfig.from_json(json.dumps({"energy_tolerence": 1e-6}))
    with pytest.raises(BadMessage):
        relax.RelaxationConfig(potentials={"Au": "Pt_zhou04"})
    with pytest.raises(BadMessage):
        relax.RelaxationConfig(energy_tolerance=0.0, force_tolerance_ev_per_angstrom=0.0)
    cfg = relax.RelaxationConfig()
    assert relax.RelaxationConfig.from_json(cfg.to_json()) == cfg


# -- relaxations ----------------------------------------------------------------------------------------
def test_defect_free_crystal_relaxes_at_its_surface_not_in_its_bulk(tmp_path):
    result = relax.relax_configuration(_configuration(), tmp_path)
    record = result.record
    assert not result.from_cache
    assert record["stopping_criterion"] == "energy tolerance" and record["cg_iterations"] > 0
    assert record["energy_change_ev"] < 0
    assert record["lattice_a_angstrom"] == pytest.approx(potentials.lattice_constant_angstrom(
        potentials.chosen_potential("Au", tmp_path)))
    # Surface stress contracts the whole particle (an affine strain); what is left after removing the best
    # affine displacement of the interior is the local relaxation: large at the surface, small inside.
    x, u = result.ideal_positions_angstrom, result.displacement_angstrom
    depth = relax.depth_below_surface_a(result.sites_half_a)
    interior, surface = depth >= relax.INTERIOR_DEPTH_A, depth == 0
    design = np.c_[x, np.ones(len(x))]
    affine, *_ = np.linalg.lstsq(design[interior], u[interior], rcond=None)
    residual = np.linalg.norm(u - design @ affine, axis=1)
    assert np.median(residual[interior]) < 0.05
    assert np.median(residual[surface]) > 3 * np.median(residual[interior])
    assert record["interior_defect_atoms"] == 0 and record["cna_final"]["hcp"] == 0 and record["state"] == "none"


def test_second_call_reads_the_cache_without_running_lammps(tmp_path, monkeypatch):
    conf = _configuration(n_cells=8, index=3)
    first = relax.relax_configuration(conf, tmp_path)

    def no_lammps(*args, **kwargs):
        raise AssertionError("LAMMPS ran although the configuration was cached")

    monkeypatch.setattr(relax, "minimise", no_lammps)
    # Another index (another orientation or reflection of the same crystal) is the same relaxation.
    again = relax.relax_configuration(_configuration(n_cells=8, index=7), tmp_path)
    assert again.from_cache and not first.from_cache
    np.testing.assert_allclose(again.relaxed_positions_angstrom, first.relaxed_positions_angstrom, atol=1e-5)
    np.testing.assert_array_equal(again.cna, first.cna)
    assert again.record["cg_iterations"] == first.record["cg_iterations"]
    records = relax.relax_all([conf], tmp_path)
    assert records[0]["from_cache"] is True


def test_another_stopping_rule_is_another_relaxation(tmp_path):
    conf = _configuration(n_cells=8)
    relax.relax_configuration(conf, tmp_path)
    tighter = relax.RelaxationConfig(energy_tolerance=1e-8)
    assert relax.load_cached(conf, tmp_path, tighter) is None
    assert relax.relax_configuration(conf, tmp_path, tighter).record["stopping_rule"]["energy_tolerance"] == 1e-8


@pytest.mark.parametrize("kind", ["screw", "edge"])
def test_dislocated_crystal_dissociates_into_partials(kind, tmp_path):
    # The Volterra field has no hcp atom; relaxation splits the perfect dislocation into two Shockley
    # partials bounding a stacking fault, which common-neighbour analysis sees as two {111} layers of hcp
    # atoms. Whether the partials stay inside is not tested: in a 4 nm crystal with Au's low stacking-fault
    # energy they reach the surfaces (image forces), which is what a crystal this small does.
    result = relax.relax_configuration(_configuration(kind), tmp_path)
    record = result.record
    assert record["cna_initial"]["hcp"] == 0
    assert record["cna_final"]["hcp"] >= 40 and record["ribbon_hcp_atoms"] >= 40
    plane = np.abs(record["ribbon_plane"])
    assert sorted(plane) == [1, 1, 1]
    assert record["state"] in ("dissociated", "one_partial_left", "fault_across")


def test_relax_all_resumes_and_runs_in_worker_processes(tmp_path):
    confs = [_configuration(n_cells=6), _configuration(n_cells=6, element="Pt"), _configuration(n_cells=7, element="Al")]
    relax.relax_configuration(confs[0], tmp_path)  # as if a batch had stopped after the first
    records = relax.relax_all(confs, tmp_path, workers=2)
    assert [r["from_cache"] for r in records] == [True, False, False]
    assert [r["configuration"]["element"] for r in records] == ["Au", "Pt", "Al"]
    assert [r["from_cache"] for r in relax.relax_all(confs, tmp_path, workers=2)] == [True, True, True]
    assert not list(Path(tmp_path).glob("*.partial"))
    for record in records:
        assert math.isfinite(record["energy_final_ev"]) and record["potential"]["name"] == potentials.CHOSEN[
            record["configuration"]["element"]]


def test_a_dislocation_that_glides_out_is_reported_as_gone(tmp_path):
    # An edge in a 4 nm Al crystal (high stacking-fault energy, tiny Peierls stress) is pulled out by its
    # image forces within the paper's stopping rule: no interior core atom and no fault remain.
    record = relax.relax_configuration(_configuration("edge", element="Al"), tmp_path).record
    assert record["cna_initial"]["other"] > record["cna_final"]["other"]
    assert record["interior_defect_atoms"] == 0 and record["cna_final"]["hcp"] == 0
    assert record["state"] == "left" and record["dislocation_left_crystal"] is True
