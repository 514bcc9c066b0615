"""Detector-frame sampling in the simulator: patterns computed at the q of every pixel of a rocking scan in a
preset geometry (type-3 NUFFT) and gridded by the product's orthonormaliser. Real geometry code, real NUFFTs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("finufft")

from defectscope.training import detector_frame, simulator  # noqa: E402
from defectscope.training.diffraction import NufftAmplitude, ReciprocalGrid, intensity  # noqa: E402
from defectscope.training.sim_config import SimulationConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = SimulationConfig(shape=(32, 32, 32), orientations_per_configuration=4, peak_counts_range=(1e6, 1e6))
MEASURED = json.loads((REPO / "docs" / "eval" / "beamline_sampling.json").read_text())["beamlines"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _ratio(preset) -> float:
    steps = MEASURED[preset]["q_steps"]
    return steps["rocking"] / steps["row"]


def test_default_rocking_ratios_cover_the_measured_beamlines():
    lo, hi = SimulationConfig().detector_frame_rocking_ratio_range
    assert lo <= min(map(_ratio, MEASURED)) and max(map(_ratio, MEASURED)) <= hi
    assert set(SimulationConfig().detector_frame_presets) == set(MEASURED)


@pytest.mark.parametrize("preset", ["aps-34idc", "soleil-sixs"])
def test_the_scan_at_the_measured_ratio_is_the_beamlines_own(preset):
    # beamline_sampling computes each beamline's voxel independently (Au 111, its typical rocking step): the same
    # ratio of rocking to pixel step gives back that step and that voxel.
    draw = detector_frame.DetectorFrameDraw(True, preset, _ratio(preset))
    scan = detector_frame.plan_scan(draw, 2.3548 * np.sqrt(3.0), (1, 1, 1), 1e-3, (32, 32, 32))
    from defectscope.training.beamline_sampling import BEAMLINES

    assert scan.step_deg == pytest.approx(BEAMLINES[preset]["step_deg"], rel=1e-3)
    assert scan.frame.natural_voxel == pytest.approx(MEASURED[preset]["voxel"], rel=1e-3)
    assert scan.scale * scan.frame.natural_voxel == pytest.approx(1e-3, rel=1e-12)


def _configuration_and_grid(cfg, seed=3, index=2):
    built = simulator.build_configuration(cfg, seed, simulator.plan_configuration(cfg, seed, index), relaxed=False)
    from defectscope.training import sampling

    draw = sampling.draw_orientation(np.random.default_rng(seed), cfg, cfg.shape)
    grid, extent = simulator.orientation_grid(built, draw, cfg.shape)
    return built, grid, extent


@pytest.mark.parametrize("preset, ratio", [("aps-34idc", 0.46), ("petra-p10", 2.5)])
def test_gridded_pattern_has_every_voxel_measured_and_its_peak_where_recorded(preset, ratio):
    built, grid, extent = _configuration_and_grid(SMALL)
    sampled = detector_frame.sample_pattern(built.atoms, grid, extent, detector_frame.DetectorFrameDraw(True, preset, ratio),
                                            built.crystal.element.lattice_a_angstrom, built.plan.reflection_hkl, 1e-6)
    record = sampled.record
    assert record["detector_frame_empty_voxels"] == 0 and record["detector_frame_pixels_per_voxel"] >= 1.0
    steps = record["detector_frame_q_steps_inv_angstrom"]
    assert steps[2] / steps[0] == pytest.approx(ratio, rel=1e-6) and steps[0] == pytest.approx(steps[1], rel=1e-6)
    # The orthonormal pattern on the grid where the peak landed: same peak voxel, centre of mass within half a
    # voxel (a voxel holds the mean of its pixels, each up to half a voxel off its centre), not the same values
    # (that is the point).
    landed = ReciprocalGrid(grid.frame_axes, grid.dq_inv_angstrom_cryst, sampled.shift_voxels, grid.shape)
    ideal = intensity(NufftAmplitude(grid.shape, eps=1e-6)(built.atoms, landed))
    assert np.argmax(sampled.intensity) == np.argmax(ideal)
    assert np.allclose(_centre_of_mass(sampled.intensity), _centre_of_mass(ideal), atol=0.5)
    r = np.abs(sampled.intensity / sampled.intensity.sum() - ideal / ideal.sum()).sum()
    assert 0.01 < r < 0.5


def _centre_of_mass(volume):
    grids = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
    return np.array([(g * volume).sum() / volume.sum() for g in grids])


def test_toggling_detector_frame_sampling_reshuffles_no_other_draw():
    half = SMALL.replace(detector_frame_fraction=0.5, coherence_probability=0.5, hot_pixel_probability=0.5)
    off = half.replace(detector_frame_fraction=0.0)
    a, b = (simulator.simulate_configuration(c, 4, 1, 6) for c in (half, off))
    on = a.params["detector_frame"]
    assert on.any() and not on.all() and not b.params["detector_frame"].any()
    assert np.array_equal(a.counts[~on], b.counts[~on])
    for name in ("rotation_about_q_rad", "peak_counts_target", "fringe_visibility", "hot_pixel_voxels", "oversampling"):
        assert np.array_equal(a.params[name], b.params[name]), name
    assert not np.array_equal(a.counts[on], b.counts[on])
    assert (a.params["detector_frame_empty_voxels"][on] == 0).all()
    assert set(a.params["detector_frame_preset"][on]) <= set(SMALL.detector_frame_presets)


def test_same_seed_same_bytes_with_detector_frame_sampling(tmp_path):
    from defectscope.training.runner import simulate_dataset

    cfg = SMALL.replace(detector_frame_fraction=1.0, orientations_per_configuration=1, shape=(24, 24, 24),
                      gap_offset_max_voxels=8)
    paths = [simulate_dataset(2, tmp_path / f"d{k}.h5", cfg, seed=5, progress=False) for k in range(2)]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    import h5py

    with h5py.File(paths[0]) as f:
        assert f["parameters/detector_frame"][:].all() and f.attrs["format_version"] == 3
        assert json.loads(f.attrs["simulator_config"])["detector_frame_fraction"] == 1.0


def test_version_2_configs_load_with_detector_frame_sampling_off():
    cfg = SimulationConfig.from_dict({"schema_version": 2, "relaxed_fraction": 0.5})
    assert cfg.schema_version == 3 and cfg.detector_frame_fraction == 0.0
    with pytest.raises(ValueError, match="detector_frame_presets"):
        SimulationConfig(detector_frame_presets=("nowhere",))
