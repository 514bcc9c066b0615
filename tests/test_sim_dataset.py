"""Simulated datasets: config, HDF5 layout, splits by configuration, bit-reproducibility, Dask, CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("finufft")
h5py = pytest.importorskip("h5py")

from defectscope.errors import BadMessage  # noqa: E402
from defectscope.training import simulator  # noqa: E402
from defectscope.training.dataset import PARAMETERS, SPLITS, SimulatedDataset, assign_splits  # noqa: E402
from defectscope.training.runner import configuration_sizes, simulate_dataset  # noqa: E402
from defectscope.training.sim_config import CLASSES, SimulationConfig, load_config  # noqa: E402

# Few orientations per configuration keep the tests fast while exercising configurations of every class.
FAST = SimulationConfig(orientations_per_configuration=3)
# Every detector option on, so the file holds masks, gaps and background too.
NOISY = FAST.replace(background_range=(0.5, 2.0), gap_probability=1.0, masked_voxel_fraction_range=(1e-4, 1e-3))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- config -------------------------------------------------------------------------------------------
def test_config_round_trips_and_refuses_unknown_or_bad_options(tmp_path):
    cfg = SimulationConfig(elements=("Au", "Pt"), cd_fraction=1.0)
    assert SimulationConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(BadMessage, match="unknown options"):
        SimulationConfig.from_dict({"oversampling": [2, 4]})
    with pytest.raises(BadMessage):
        SimulationConfig(elements=("Cu",))
    with pytest.raises(BadMessage):
        SimulationConfig(oversampling_range=(4.0, 2.0))
    with pytest.raises(BadMessage):
        SimulationConfig(split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(BadMessage):
        SimulationConfig.from_dict({"schema_version": 99})
    toml = tmp_path / "sim.toml"
    toml.write_text('[simulate]\nelements = ["Au"]\nsizes = ["large"]\npeak_counts_range = [1e4, 1e5]\n')
    assert load_config(toml) == SimulationConfig(elements=("Au",), sizes=("large",), peak_counts_range=(1e4, 1e5))
    js = tmp_path / "sim.json"
    js.write_text('{"cd_fraction": 0.5}')
    assert load_config(js).cd_fraction == 0.5
    js.write_text("{not json")
    with pytest.raises(BadMessage):
        load_config(js)


def test_rpd_radius_fraction_is_null_by_default_round_trips_and_refuses_bad_values():
    # Datasets written before the option existed carry no key and must read back as "anywhere".
    assert SimulationConfig.from_dict({"cd_fraction": 0.75}).rpd_radius_fraction is None
    cfg = SimulationConfig(rpd_radius_fraction=0.25)
    assert SimulationConfig.from_json(cfg.to_json()) == cfg
    assert '"rpd_radius_fraction": null' in SimulationConfig().to_json()
    for bad in (0.0, -0.1, 1.5, True, "0.25"):
        with pytest.raises(BadMessage, match="rpd_radius_fraction"):
            SimulationConfig(rpd_radius_fraction=bad)
    assert load_config("training/configs/paper_mix_fig15.json").rpd_radius_fraction == 0.25


# -- sampling and noise ----------------------------------------------------------------------------------
def test_counting_noise_gaps_and_orientation_draws():
    from defectscope.training import sampling

    rng = np.random.default_rng(0)
    intensity = np.zeros((64, 64, 64))
    intensity[32, 32, 32] = 7.0
    counts = sampling.counting_noise(intensity, 1e5, 2.0, rng)
    assert counts.dtype == np.uint32
    assert counts[32, 32, 32] == pytest.approx(1e5, rel=0.02)
    assert (counts.sum() - counts[32, 32, 32]) / (counts.size - 1) == pytest.approx(2.0, rel=0.02)
    cfg = SimulationConfig(gap_probability=1.0, gap_count_range=(2, 2), gap_width_voxels_range=(3, 3))
    draws = [sampling.draw_orientation(rng, cfg) for _ in range(200)]
    assert all(len(d.gap_axes) == 2 and set(d.gap_axes) <= {1, 2} for d in draws)
    assert all(2.0 <= d.oversampling_target <= 4.0 and max(map(abs, d.subpixel_shift_voxels)) <= 0.5 for d in draws)
    decades = np.log10([d.peak_counts_target for d in draws])
    assert 3.0 <= decades.min() < 3.3 and 5.7 < decades.max() <= 6.0  # log-uniform over 1e3-1e6
    mask = sampling.gap_mask((64, 64, 64), draws[0])
    assert mask.any(axis=(1, 2)).all()  # stripes cross the whole map along axis 0
    assert 3 * 64 * 64 <= mask.sum() <= 2 * 3 * 64 * 64


# -- planning -----------------------------------------------------------------------------------------
def test_classes_are_balanced_and_reflections_see_the_burgers_vector_unless_asked():
    labels = [simulator.class_of_configuration(i, (1, 1, 1)) for i in range(300)]
    assert sorted(set(labels[:3])) == [0, 1, 2]
    assert all(abs(labels.count(c) - 100) <= 2 for c in range(3))
    plans = [simulator.plan_configuration(SimulationConfig(), 5, i) for i in range(60)]
    assert all(simulator.g_dot_b(p.reflection_hkl) != 0 and not p.invisible for p in plans)
    assert {p.position_mode for p in plans if p.label} == {"CD", "RPD"}
    plans = [simulator.plan_configuration(SimulationConfig(invisible_fraction=1.0), 5, i) for i in range(30)]
    assert all(p.invisible and simulator.g_dot_b(p.reflection_hkl) == 0 for p in plans if p.label)


def test_splits_are_stratified_and_by_configuration():
    labels = np.array([simulator.class_of_configuration(i, (1, 1, 1)) for i in range(600)])
    splits = assign_splits(labels, (0.85, 0.10, 0.05), np.random.default_rng(0))
    for c in range(3):
        counts = np.bincount(splits[labels == c], minlength=3) / (labels == c).sum()
        assert np.allclose(counts, (0.85, 0.10, 0.05), atol=0.01)
    assert configuration_sizes(23, 10) == [10, 10, 3]


# -- the dataset file -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def noisy_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "noisy.h5"
    return simulate_dataset(14, path, NOISY, seed=11, workers=1, progress=False)


def test_dataset_layout_labels_and_parameters(noisy_dataset):
    with SimulatedDataset(noisy_dataset) as ds:
        assert ds.counts.shape == (14, 64, 64, 64) and ds.counts.dtype == np.uint32
        assert ds.counts.chunks == (1, 64, 64, 64) and ds.counts.compression == "gzip"
        assert list(ds.counts.attrs["axes"]) == ["q_par", "q_perp1", "q_perp2"]
        assert ds.classes == list(CLASSES) and ds.config == NOISY
        p = ds.parameters()
        assert set(p) == set(PARAMETERS)
        for name, (dtype, shape, _) in PARAMETERS.items():
            assert p[name].shape == (14, *shape), name
        attrs = ds._file.attrs
        assert attrs["simulator_version"] == simulator.SIMULATOR_VERSION and attrs["seed"] == 11
        assert attrs["n_configurations"] == 5
        # The file holds exactly what the simulator computed (worker-side chunk encoding round-trips).
        first = simulator.simulate_configuration(NOISY, 11, 0, 3)
        assert np.array_equal(ds.counts[:3], first.counts) and np.array_equal(ds.mask[:3].astype(bool), first.mask)
        # Orientations of a configuration share the crystal, not the orientation.
        conf = p["configuration_index"]
        assert list(conf) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4]
        for c in range(5):
            rows = conf == c
            for name in ("n_atoms", "element", "reflection_hkl", "surface_energy_ratio", "dislocation_offset_angstrom"):
                assert len({np.asarray(v).tobytes() for v in p[name][rows]}) == 1, name
            assert len(set(p["rotation_about_q_rad"][rows])) == rows.sum()
            assert len(set(ds.split[rows])) == 1  # never straddles splits
            assert len(set(ds.labels[rows])) == 1
        # Labels match the defect; the reflection sees b (g·b != 0) by default.
        assert np.all((ds.labels == 0) == (p["position_mode"] == b"none"))
        assert np.all(p["g_dot_b"] != 0) and not p["invisible"].any()
        # Voxel size is 2π dq and gives the recorded oversampling on the recorded extents.
        dq_cryst = p["voxel_size_inv_angstrom"] / (2 * np.pi)
        assert np.allclose(dq_cryst * p["crystal_extent_angstrom"] * p["oversampling"], 1.0)
        assert np.all(p["oversampling"].min(axis=1) >= 2.0 - 1e-9)
        assert np.allclose(p["oversampling"].min(axis=1), p["oversampling_target"])
        # Axis 0 of the frame is along G.
        g = p["reflection_hkl"] / np.linalg.norm(p["reflection_hkl"], axis=1, keepdims=True)
        assert np.allclose(p["frame_axes"][:, 0, :], g)
        # Raw counts: Poisson, peak near the target, masked voxels hold 0, background fills the corners.
        for i in range(14):
            counts, mask = ds.counts[i], ds.mask[i].astype(bool)
            assert mask.sum() == p["n_masked_voxels"][i] > 0 and np.all(counts[mask] == 0)
            assert counts.max() == pytest.approx(p["peak_counts_target"][i] + p["background_counts_per_voxel"][i],
                                                 rel=0.5, abs=60)
            assert 1e3 <= p["peak_counts_target"][i] <= 1e6
            assert counts[:4, :4, :4].mean() >= 0.5 * p["background_counts_per_voxel"][i]  # plus the pattern's tails


def test_same_seed_gives_identical_bytes_and_configurations_do_not_depend_on_n(tmp_path, noisy_dataset):
    again = simulate_dataset(14, tmp_path / "again.h5", NOISY, seed=11, workers=1, progress=False)
    assert sha256(again) == sha256(noisy_dataset)
    other = simulate_dataset(14, tmp_path / "other.h5", NOISY, seed=12, workers=1, progress=False)
    assert sha256(other) != sha256(noisy_dataset)
    shorter = simulate_dataset(7, tmp_path / "short.h5", NOISY, seed=11, workers=1, progress=False)
    with h5py.File(shorter) as a, h5py.File(noisy_dataset) as b:
        assert np.array_equal(a["counts"][:6], b["counts"][:6])  # the first two whole configurations
        assert np.array_equal(a["counts"][6], b["counts"][6])  # and the first orientation of the third


def test_one_and_two_dask_workers_give_identical_datasets(tmp_path):
    pytest.importorskip("distributed")
    one = simulate_dataset(10, tmp_path / "one.h5", FAST, seed=3, workers=1, progress=False)
    two = simulate_dataset(10, tmp_path / "two.h5", FAST, seed=3, workers=2, progress=False)
    assert sha256(one) == sha256(two)


def test_one_split_of_a_run_holds_its_patterns_in_order_on_any_workers(tmp_path):
    pytest.importorskip("distributed")
    cfg = FAST.replace(split_fractions=(0.5, 0.2, 0.3))
    full = simulate_dataset(24, tmp_path / "full.h5", cfg, seed=5, workers=1, progress=False)
    with SimulatedDataset(full) as ds:
        test = ds.indices("test")
        assert 0 < len(test) < 24 and np.any(np.diff(test) > 1)  # a test split with gaps between its configurations
        counts, labels, params = ds.counts[test], ds.labels[test], ds.parameters()
    for workers in (1, 2):
        part = simulate_dataset(24, tmp_path / f"test{workers}.h5", cfg, seed=5, workers=workers, progress=False,
                                only_split="test")
        with SimulatedDataset(part) as ds:
            assert np.array_equal(ds.counts[()], counts) and np.array_equal(ds.labels, labels)
            assert np.array_equal(ds.indices("test"), np.arange(len(test)))
            assert np.array_equal(ds.parameters()["configuration_index"], params["configuration_index"][test])
        with h5py.File(part) as f:
            assert f.attrs["only_split"] == "test" and f.attrs["n_patterns_of_run"] == 24
    with pytest.raises(ValueError, match="only_split"):
        simulate_dataset(24, tmp_path / "bad.h5", cfg, seed=5, workers=1, progress=False, only_split="tests")
    with pytest.raises(ValueError, match="holds no configuration"):  # one configuration: all in train
        simulate_dataset(3, tmp_path / "none.h5", cfg, seed=5, workers=1, progress=False, only_split="test")


@pytest.mark.slow
def test_large_crystals_with_every_option_are_identical_on_one_and_two_workers(tmp_path):
    pytest.importorskip("distributed")
    cfg = NOISY.replace(sizes=("small", "large"), elements=("Au", "Pt"), invisible_fraction=0.3)
    one = simulate_dataset(8, tmp_path / "one.h5", cfg, seed=21, workers=1, progress=False)
    two = simulate_dataset(8, tmp_path / "two.h5", cfg, seed=21, workers=2, progress=False)
    assert sha256(one) == sha256(two)
    with SimulatedDataset(one) as ds:
        assert b"large" in set(ds.parameters()["size"])


def test_an_existing_dask_cluster_gives_the_same_dataset(tmp_path):
    distributed = pytest.importorskip("distributed")
    one = simulate_dataset(6, tmp_path / "one.h5", FAST, seed=4, workers=1, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=50) as cluster:
        remote = simulate_dataset(6, tmp_path / "remote.h5", FAST, seed=4, scheduler=cluster.scheduler_address,
                                  progress=False)
    assert sha256(one) == sha256(remote)


def test_failed_run_leaves_only_its_partial_file(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("worker died")

    monkeypatch.setattr(simulator, "simulate_configuration", boom)
    with pytest.raises(RuntimeError):
        simulate_dataset(3, tmp_path / "x.h5", FAST, workers=1, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5.partial"]  # no dataset, only what resumes it
    monkeypatch.undo()
    assert simulate_dataset(3, tmp_path / "x.h5", FAST, workers=1, progress=False).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5"]


# -- the command line -----------------------------------------------------------------------------------
CLI = [sys.executable, "-m", "defectscope.server.cli"]


def test_cli_simulate_writes_a_dataset_and_refuses_bad_input_in_one_line(tmp_path):
    cfg = tmp_path / "sim.json"
    cfg.write_text(json.dumps({"orientations_per_configuration": 2, "elements": ["Pt"]}))
    out = tmp_path / "data.h5"
    run = subprocess.run([*CLI, "simulate", "--n", "4", "--out", str(out), "--config", str(cfg), "--workers", "1",
                          "--seed", "5", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "wrote 4 patterns" in run.stdout
    with SimulatedDataset(out) as ds:
        assert ds.counts.shape[0] == 4 and ds.config.elements == ("Pt",)
        assert set(ds.split) <= set(range(len(SPLITS)))
    again = subprocess.run([*CLI, "simulate", "--n", "4", "--out", str(out), "--workers", "1"],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists" in again.stderr and "Traceback" not in again.stderr
    cfg.write_text(json.dumps({"elemnts": ["Pt"]}))
    bad = subprocess.run([*CLI, "simulate", "--n", "4", "--out", str(tmp_path / "b.h5"), "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "BAD_MESSAGE" in bad.stderr
    assert not (tmp_path / "b.h5").exists()


def test_cli_without_the_training_extra_says_what_to_install(tmp_path, monkeypatch, capsys):
    from defectscope.server import cli

    monkeypatch.setitem(sys.modules, "finufft", None)  # import finufft now raises ImportError
    assert cli.main(["simulate", "--n", "2", "--out", str(tmp_path / "x.h5")]) == 1
    err = capsys.readouterr().err
    assert "defectscope[train]" in err and err.count("\n") == 1


def test_a_dask_run_does_not_need_port_8787(tmp_path):
    """Another Dask cluster (or anything) on 8787 must not stop a simulation: it failed so once."""
    pytest.importorskip("distributed")
    import socket

    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", 8787))
        blocker.listen()
    except OSError:
        pass  # already taken by something else: the same situation
    try:
        path = simulate_dataset(4, tmp_path / "two.h5", FAST, seed=4, workers=2, progress=False)
        assert path.is_file()
    finally:
        blocker.close()


def stop_after(monkeypatch, patterns: int) -> None:
    """Make the next simulation stop (as a ^C or a session's end would) once ``patterns`` are written."""
    from defectscope.training.dataset import DatasetWriter

    write = DatasetWriter.write

    def stopping(self, result):
        if self.written >= patterns:
            raise KeyboardInterrupt
        write(self, result)

    monkeypatch.setattr(DatasetWriter, "write", stopping)


def test_an_interrupted_run_resumes_after_its_last_configuration(tmp_path, noisy_dataset, monkeypatch):
    stop_after(monkeypatch, 6)  # two configurations of three orientations
    out = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        simulate_dataset(14, out, NOISY, seed=11, workers=1, progress=False)
    monkeypatch.undo()
    partial = out.with_name(out.name + ".partial")
    assert partial.exists() and not out.exists()
    with h5py.File(partial) as f:
        assert f.attrs["written"] == 6
    with pytest.raises(BadMessage, match="another run"):
        simulate_dataset(14, out, NOISY, seed=12, workers=1, progress=False)
    simulated = []
    configuration = simulator.simulate_configuration
    monkeypatch.setattr(simulator, "simulate_configuration",
                        lambda cfg, seed, i, n: simulated.append(i) or configuration(cfg, seed, i, n))
    simulate_dataset(14, out, NOISY, seed=11, workers=1, progress=False)
    assert simulated == [2, 3, 4] and not partial.exists()
    with h5py.File(out) as a, h5py.File(noisy_dataset) as b:
        assert "_progress" not in a and "written" not in a.attrs
        for name in ("counts", "mask", "labels", "split"):
            assert np.array_equal(a[name][()], b[name][()]), name
        for name in PARAMETERS:
            x, y = a["parameters"][name][()], b["parameters"][name][()]
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
        assert set(a.attrs) == set(b.attrs)
        assert all(np.array_equal(a.attrs[k], b.attrs[k]) for k in a.attrs)
    other = simulate_dataset(14, tmp_path / "fresh.h5", NOISY, seed=12, workers=1, progress=False, resume=False)
    assert other.exists()


def test_a_run_stopped_on_one_worker_resumes_on_dask_workers(tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    stop_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        simulate_dataset(10, tmp_path / "r.h5", FAST, seed=3, workers=1, progress=False)
    monkeypatch.undo()
    resumed = simulate_dataset(10, tmp_path / "r.h5", FAST, seed=3, workers=2, progress=False)
    whole = simulate_dataset(10, tmp_path / "w.h5", FAST, seed=3, workers=1, progress=False)
    with h5py.File(resumed) as a, h5py.File(whole) as b:
        for name in ("counts", "mask", "labels", "split"):
            assert np.array_equal(a[name][()], b[name][()]), name


def test_cli_simulate_stopped_by_sigterm_keeps_its_progress_and_resumes(tmp_path):
    import os
    import signal
    import time

    cfg = tmp_path / "sim.json"
    cfg.write_text(json.dumps({"orientations_per_configuration": 2, "elements": ["Pt"]}))
    out = tmp_path / "data.h5"
    partial = tmp_path / "data.h5.partial"
    args = [*CLI, "simulate", "--n", "40", "--out", str(out), "--config", str(cfg), "--workers", "1", "--seed", "5",
            "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HDF5_USE_FILE_LOCKING="FALSE"))
    deadline = time.monotonic() + 120  # bounds a hang only: the run is stopped as soon as it has written
    written = 0
    while written < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        if partial.exists():
            try:
                with h5py.File(partial, "r", locking=False) as f:
                    written = int(f.attrs.get("written", 0))
            except OSError:
                pass  # caught between two writes' metadata: read again
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0 and partial.exists() and not out.exists()
    with h5py.File(partial, "r") as f:
        stopped_at = int(f.attrs["written"])
    assert 4 <= stopped_at < 40
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout and "wrote 40 patterns" in again.stdout
    whole = simulate_dataset(40, tmp_path / "whole.h5", load_config(cfg), seed=5, workers=1, progress=False)
    with h5py.File(out) as a, h5py.File(whole) as b:
        for name in ("counts", "mask", "labels", "split"):
            assert np.array_equal(a[name][()], b[name][()]), name
