"""Training-side pieces that need no TensorFlow: calibration, data layouts, augmentation, metrics, transforms."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("finufft")
h5py = pytest.importorskip("h5py")

from defectscope.preprocessing.config import PipelineConfig  # noqa: E402
from defectscope.training import calibration, data  # noqa: E402
from defectscope.training.evaluate import (  # noqa: E402
    classification_metrics,
    collapse_two_class,
    rotation_matrix,
    transform_about,
)

from defectscope.errors import BadMessage  # noqa: E402

SMALL = PipelineConfig()


@pytest.fixture(scope="module")
def sim_file(tmp_path_factory):
    from defectscope.training.runner import simulate_dataset
    from defectscope.training.sim_config import SimulationConfig

    cfg = SimulationConfig(orientations_per_configuration=2, split_fractions=(0.5, 0.25, 0.25))
    return simulate_dataset(12, tmp_path_factory.mktemp("sim") / "tiny.h5", cfg, seed=3, workers=1, progress=False)


# -- calibration ------------------------------------------------------------------------------------------
def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4.0, size=(4000, 3))
    true_t = 2.5
    p = calibration.softmax(logits, true_t)
    labels = np.array([rng.choice(3, p=row) for row in p])
    t = calibration.fit_temperature(logits, labels)
    assert t == pytest.approx(true_t, rel=0.1)
    assert calibration.nll(logits, labels, t) <= calibration.nll(logits, labels, 1.0)
    assert calibration.fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0


def test_expected_calibration_error_is_zero_for_calibrated_and_large_for_overconfident():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.4, 1.0, 20000)
    correct = rng.random(20000) < conf  # right with exactly the stated probability
    p = np.stack([conf, 1 - conf], axis=1)
    labels = np.where(correct, 0, 1)
    assert calibration.expected_calibration_error(p, labels)["ece"] < 0.02
    over = np.stack([np.full(1000, 0.99), np.full(1000, 0.01)], axis=1)
    half = np.arange(1000) % 2  # 50 % right at 99 % confidence
    assert calibration.expected_calibration_error(over, half)["ece"] == pytest.approx(0.49, abs=1e-6)


# -- labels, splits, layouts ------------------------------------------------------------------------------
def test_label_map_collapses_screw_and_edge_for_two_classes_and_refuses_unknown_names():
    three = ("defect_free", "screw", "edge")
    assert data.label_map(three, three).tolist() == [0, 1, 2]
    assert data.label_map(three, ("defect_free", "defective")).tolist() == [0, 1, 1]
    with pytest.raises(BadMessage, match="no counterpart"):
        data.label_map(("defect_free", "defective"), three)


def test_simulated_file_uses_its_configuration_split(sim_file):
    with data.open_map_file(sim_file) as mf:
        assert mf.layout == "simulated" and mf.split_source == "file"
        with h5py.File(sim_file, "r") as f:
            assert np.array_equal(mf.split, f["split"][()])
        assert sorted(np.concatenate([mf.indices(s) for s in data.SPLIT_NAMES]).tolist()) == list(range(mf.n))
        summary = mf.summary()
        assert summary["seed"] == 3 and summary["simulator_config"]["orientations_per_configuration"] == 2


def test_labelled_maps_round_trip_with_random_stratified_split(tmp_path, sim_file):
    with data.open_map_file(sim_file) as mf:
        maps = np.stack([mf.read(i)[0] for i in range(mf.n)])
        labels = mf.labels.copy()
    path = data.write_labelled_maps(tmp_path / "measured.h5", maps, labels, ("defect_free", "screw", "edge"))
    with data.open_map_file(path, seed=4, split_fractions=(0.5, 0.25, 0.25)) as lab:
        assert lab.layout == "labelled" and lab.split_source.startswith("assigned")
        for c in np.unique(labels):  # stratified: every class has training maps
            assert np.any((lab.labels == c) & (lab.split == 0))
        again = data.open_map_file(path, seed=4, split_fractions=(0.5, 0.25, 0.25))
        assert np.array_equal(again.split, lab.split)  # seeded
        again.close()
        with data.open_map_file(sim_file) as sim:
            np.testing.assert_array_equal(lab.prepare(0, SMALL).array, sim.prepare(0, SMALL).array)


def test_labelled_maps_errors_are_one_clear_message(tmp_path):
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["maps"] = np.zeros((2, 8, 8, 8), np.float32)
        f["labels"] = np.array([0, 1])
    with pytest.raises(BadMessage, match="classes"):
        data.open_map_file(bad)
    with pytest.raises(BadMessage, match="does not exist"):
        data.open_map_file(tmp_path / "missing.h5")


# -- augmentation ------------------------------------------------------------------------------------------
def test_mirror_about_centre_keeps_the_centre_voxel_and_is_an_involution_away_from_the_edge():
    rng = np.random.default_rng(2)
    x = rng.random((8, 10, 10)).astype(np.float32)
    m = data.mirror_about_centre(x, 1)
    np.testing.assert_array_equal(m[:, 5], x[:, 5])  # the centre n//2 stays
    np.testing.assert_array_equal(m[:, 3], x[:, 7])
    np.testing.assert_array_equal(m[:, 0], 0)
    np.testing.assert_array_equal(data.mirror_about_centre(m, 1)[:, 1:], x[:, 1:])


def test_augmentation_never_flips_the_q_axis():
    rng = np.random.default_rng(3)
    x = np.zeros((16, 16, 16), np.float32)
    x[8, 8, 8] = 1.0
    x[11, 9, 8] = 0.5  # off-centre along Q (axis 0) and q_perp1
    for _ in range(20):
        y = data.augment_mirror(x, rng)
        i, j, k = np.argwhere(y == 0.5)[0]
        assert i == 11  # the Q coordinate is kept
        assert y[8, 8, 8] == 1.0


def test_stream_order_is_seeded_per_epoch_and_covers_each_map_once(sim_file):
    with data.open_map_file(sim_file) as mf:
        ex = data.select([mf], "train", ("defect_free", "screw", "edge"))
        s = data.MapStream(ex, SMALL, shuffle=True, seed=7)
        e0, e1 = s.order(0), s.order(1)
        assert ex.n >= 4 and sorted(e0.tolist()) == list(range(ex.n))
        assert not np.array_equal(e0, e1)
        assert np.array_equal(s.order(1), data.MapStream(ex, SMALL, shuffle=True, seed=7).order(1))


def test_oversampling_repeats_the_chosen_position_mode_only(sim_file):
    with data.open_map_file(sim_file) as mf:
        ex = data.select([mf], "all", ("defect_free", "screw", "edge"))
        modes = np.array([m.decode() for m in mf.parameters()["position_mode"]])
        reps = data.repeat_factors(ex, {"RPD": 3, "CD": 2})
        assert np.array_equal(reps, np.where(modes == "RPD", 3, np.where(modes == "CD", 2, 1)))
        assert np.array_equal(data.repeat_factors(ex, None), np.ones(ex.n, dtype=np.int64))
        s = data.MapStream(ex, SMALL, shuffle=True, seed=1, repeats=reps)
        assert len(s) == int(reps.sum())
        assert np.array_equal(np.bincount(s.order(0), minlength=ex.n), reps)


def test_oversampling_leaves_labelled_maps_alone(tmp_path):
    maps = np.random.default_rng(0).random((6, 8, 8, 8)).astype(np.float32)
    path = data.write_labelled_maps(tmp_path / "m.h5", maps, np.array([0, 1, 2, 0, 1, 2]), ["defect_free", "screw", "edge"])
    with data.open_map_file(path) as mf:
        ex = data.select([mf], "all", ("defect_free", "screw", "edge"))
        assert np.array_equal(data.repeat_factors(ex, {"RPD": 5}), np.ones(6, dtype=np.int64))


@pytest.mark.parametrize("bad", [{"RPD": 0}, {"RPD": 1.5}, {"RPD": True}, {"middle": 2}, ["RPD"]])
def test_oversample_option_is_checked(bad):
    pytest.importorskip("tensorflow")
    from defectscope.training.train import TrainConfig

    with pytest.raises(BadMessage, match="oversample"):
        TrainConfig(oversample=bad)
    assert TrainConfig.from_dict({"oversample": {"RPD": 3}}).oversample == {"RPD": 3}


def test_prepared_cache_is_reused_and_rebuilt_when_the_config_changes(tmp_path, sim_file):
    with data.open_map_file(sim_file) as mf:
        ex = data.select([mf], "all", ("defect_free", "screw", "edge"))
        cache = data.PreparedCache(tmp_path, "all", ex, SMALL).build(log=lambda *a: None)
        assert cache.valid.all()
        np.testing.assert_array_equal(cache.array[3], mf.prepare(3, SMALL).array)
        stamp = cache.array_path.stat().st_mtime_ns
        assert data.PreparedCache(tmp_path, "all", ex, SMALL).ready()
        other = data.PreparedCache(tmp_path, "all", ex, PipelineConfig(intensity_transform="sqrt"))
        assert not other.ready() and other.array_path != cache.array_path
        assert cache.array_path.stat().st_mtime_ns == stamp


# -- evaluation helpers ------------------------------------------------------------------------------------
def test_classification_metrics_and_two_class_collapse():
    classes = ("defect_free", "screw", "edge")
    labels = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 2, 2, 2])
    probs = np.eye(3)[predicted] * 0.8 + 0.2 / 3
    m = classification_metrics(probs, labels, classes)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"]["counts"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert m["per_class"]["edge"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["edge"]["recall"] == 1.0
    p2, l2 = collapse_two_class(probs, labels, classes)
    assert l2.tolist() == [0, 0, 1, 1, 1, 1]
    np.testing.assert_allclose(p2.sum(axis=1), 1.0)
    assert classification_metrics(p2, l2, ("defect_free", "defective"))["accuracy"] == pytest.approx(5 / 6)


def test_transform_about_the_peak_keeps_the_peak_and_zooms_the_width():
    from conftest import bragg_map

    vol = bragg_map(noise=False)
    centre = np.unravel_index(np.argmax(vol), vol.shape)
    rotated, _ = transform_about(vol, None, rotation_matrix([0.3, -1.0, 0.5], np.radians(40)), centre)
    assert np.unravel_index(np.argmax(rotated), vol.shape) == centre
    same, _ = transform_about(vol, None, np.eye(3), centre)
    np.testing.assert_allclose(same, vol, rtol=1e-5, atol=1e-3)
    zoomed, _ = transform_about(vol, None, np.eye(3) * 2.0, centre)
    width = lambda v: np.count_nonzero(v[:, centre[1], centre[2]] > 0.5 * v.max())  # noqa: E731
    assert width(zoomed) >= 2 * width(vol) - 1
    mask = np.zeros(vol.shape, np.uint8)
    mask[centre[0], :, :] = 1
    _, m = transform_about(vol, mask, rotation_matrix([1, 0, 0], 0.3), centre)
    assert m is not None and m[centre].item() == 1


def test_accuracy_by_dislocation_offset_groups_defective_maps_by_character_and_distance():
    from defectscope.training.eval_metrics import accuracy_by_group as _by_group, group_keys as _group_keys

    b = np.array([2.0, -2.0, 0.0])
    params = {
        "dislocation_offset_angstrom": np.array([np.nan, 10.0, 55.0, 95.0]),
        "crystal_extent_angstrom": np.full((4, 3), 160.0),
        "burgers_vector_angstrom": np.array([[0, 0, 0], b, b, b]),
        "line_direction": np.array([[0, 0, 0], b / np.linalg.norm(b), [1, 1, -2] / np.sqrt(6), b / np.linalg.norm(b)]),
    }
    keys = [_group_keys(params, i) for i in range(4)]
    assert "dislocation_offset" not in keys[0]  # defect-free
    assert [k["dislocation_offset"] for k in keys[1:]] == ["screw 0.00-0.25", "edge 0.50-0.75", "screw >0.75"]
    out = _by_group(np.array([True, True, False, True]), keys, [])
    assert out["dislocation_offset"] == {"edge 0.50-0.75": {"n": 1, "accuracy": 0.0},
                                         "screw 0.00-0.25": {"n": 1, "accuracy": 1.0},
                                         "screw >0.75": {"n": 1, "accuracy": 1.0}}
