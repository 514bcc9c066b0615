"""Training -> export -> serving, with TensorFlow: smoke training through the CLI, ONNX/Keras parity on 100
maps, temperature folding, bit-exact resume, fine-tuning on labelled maps, 2-class collapse, evaluate.

Kept small for a 2-core machine: one 30-pattern simulated dataset and a network of a few thousand weights
trained for two epochs (the shipped architecture itself is exercised by the parity test).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported: no C++ info lines
pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
pytest.importorskip("finufft")

from defectscope.model.predictor import Predictor  # noqa: E402
from defectscope.preprocessing.config import PipelineConfig  # noqa: E402
from defectscope.server.cli import main  # noqa: E402
from defectscope.training import calibration, data, export  # noqa: E402
from defectscope.training.model import (  # noqa: E402
    ARCHITECTURES,
    Architecture,
    build_model,
    get_temperature,
    load_model,
    logits_model,
    set_temperature,
)
from defectscope.training.train import Run, TrainConfig, load_model_compiled  # noqa: E402

TINY = Architecture(filters=(4, 8, 8, 8, 8), dense_units=16)
TINY_2 = Architecture(filters=(4, 8, 8), dense_units=16)
QUIET = {"progress": False, "log": lambda *a: None}


def tiny_config(epochs: int = 2, classes: int = 3, **kw) -> TrainConfig:
    arch = TINY if classes == 3 else TINY_2
    return TrainConfig(classes=classes, epochs=epochs, batch=8, architecture=arch.to_dict(), parity_maps=8, **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from defectscope.training.runner import simulate_dataset
    from defectscope.training.sim_config import SimulationConfig

    # 15 configurations x 2 orientations; a 60/20/20 split leaves every split all three classes.
    cfg = SimulationConfig(orientations_per_configuration=2, split_fractions=(0.6, 0.2, 0.2))
    return simulate_dataset(30, tmp_path_factory.mktemp("data") / "tiny.h5", cfg, seed=5, workers=1, progress=False)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """``defectscope train`` through the CLI (config file with the tiny architecture), two epochs."""
    out = tmp_path_factory.mktemp("model")
    cfg = out.parent / "run.json"
    cfg.write_text(json.dumps({"train": {"architecture": TINY.to_dict(), "parity_maps": 8}}))
    rc = main(["train", "--data", str(dataset), "--out", str(out), "--config", str(cfg), "--epochs", "2",
               "--batch", "8", "--no-progress"])
    assert rc == 0
    return out


def prepared_maps(dataset, n=None) -> np.ndarray:
    with data.open_map_file(dataset) as mf:
        idx = range(mf.n if n is None else min(n, mf.n))
        return np.stack([mf.prepare(i, PipelineConfig()).array for i in idx])


# -- training smoke test: files, card, serving -----------------------------------------------------------
def test_train_writes_model_card_keras_and_checkpoints(trained, dataset):
    onnx_path = trained / "defectscope-3class.onnx"
    for name in ("defectscope-3class.onnx", "defectscope-3class.keras", "defectscope-3class.card.json",
                 "defectscope-3class.test-metrics.json", "history.json", "training-curves.png", "checkpoints/state.json"):
        assert (trained / name).is_file(), name
    p = Predictor(onnx_path, provider="cpu")
    card = p.card
    assert card == json.loads((trained / "defectscope-3class.card.json").read_text())
    assert card["classes"] == ["defect_free", "screw", "edge"]
    assert p.pipeline == PipelineConfig()
    assert "--epochs 2" in card["training_command"] and card["training_command"].startswith("defectscope")
    assert card["training_data"]["files"][0]["seed"] == 5
    assert card["training_data"]["files"][0]["split_source"] == "file"
    assert card["training"]["epochs_run"] == 2 and 1 <= card["training"]["best_epoch"] <= 2
    assert card["training"]["onnx_keras_parity_max_abs"] <= 1e-5
    assert card["test_metrics"]["n"] == card["training_data"]["maps_used"]["test"] > 0
    assert "two_class_accuracy" in card["test_metrics"]
    assert card["changes_from_paper"]
    history = json.loads((trained / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]


def test_exported_model_serves_through_a_real_server(trained, dataset):
    from defectscope.preprocessing.config import Limits
    from defectscope.server.client import Client
    from defectscope.server.core import Classifier
    from defectscope.server.zmq_server import Server

    predictor = Predictor(trained / "defectscope-3class.onnx", provider="cpu")
    server = Server(Classifier(predictor, limits=Limits()), "tcp://127.0.0.1:*", workers=1, drain_s=5).start()
    try:
        with data.open_map_file(dataset) as mf:
            counts, _ = mf.read(0)
        with Client(server.endpoint, timeout_s=20, retries=0) as client:
            reply = client.classify(counts, request_id="train-smoke")
    finally:
        server.stop(drain=False)
    assert reply["ok"] and reply["model"]["name"] == "defectscope-3class"
    assert reply["classes"] == ["defect_free", "screw", "edge"]
    expected = predictor.predict(prepared_maps(dataset, 1))[0]
    np.testing.assert_allclose(reply["probabilities"], expected, atol=1e-6)


# -- export parity and temperature folding -----------------------------------------------------------------
@pytest.mark.parametrize("n_classes", [3, 2])
def test_export_parity_onnx_vs_keras_on_100_maps(tmp_path, dataset, n_classes):
    """The shipped architecture, confident outputs (logit weights scaled up), T != 1: <= 1e-5 on 100 maps."""
    model = build_model(n_classes, ARCHITECTURES[f"{n_classes}class"], seed=1)
    rng = np.random.default_rng(0)
    real = prepared_maps(dataset)
    grid = np.indices((64, 64, 64)).astype(np.float32) - 32
    synthetic = [np.exp(-(grid**2 * rng.uniform(0.01, 0.2, (3, 1, 1, 1))).sum(0)) * (1 + 0.1 * rng.random((64, 64, 64)))
                 for _ in range(100 - len(real))]
    synthetic = np.stack(synthetic).astype(np.float32)
    synthetic[synthetic < 1e-6] = 0.0  # no subnormal floats: they slow ONNX Runtime's CPU kernels ~50x
    maps = np.concatenate([real, synthetic])
    assert maps.shape == (100, 64, 64, 64)
    # An untrained net answers ~uniformly: scale the logit layer so the logits spread by ~4 across maps.
    kernel, bias = model.get_layer("logits").get_weights()
    spread = np.asarray(logits_model(model)(maps[:20, ..., None], training=False)).std(axis=0).mean()
    model.get_layer("logits").set_weights([kernel * (4.0 / spread), bias + 0.3])
    set_temperature(model, 1.7)
    card = {"name": "parity", "version": "0", "classes": list(("defect_free", "screw", "edge")[:n_classes])
            if n_classes == 3 else ["defect_free", "defective"]}
    path = export.export_model(model, tmp_path / "m.onnx", pipeline=PipelineConfig(), card=card)
    assert export.parity(model, path, maps) <= export.PARITY_TOLERANCE
    probs = Predictor(path, provider="cpu").predict(maps)
    assert probs.max(axis=1).mean() > 0.6  # not a trivially uniform output


def test_temperature_is_folded_into_the_exported_model(trained, dataset):
    onnx_path = trained / "defectscope-3class.onnx"
    model = load_model(trained / "defectscope-3class.keras")
    t = get_temperature(model)
    assert t == pytest.approx(Predictor(onnx_path, provider="cpu").card["training"]["temperature"], rel=1e-6)
    assert t != 1.0
    maps = prepared_maps(dataset, 12)
    logits = np.asarray(logits_model(model)(maps[..., None], training=False))
    onnx_probs = Predictor(onnx_path, provider="cpu").predict(maps)
    np.testing.assert_allclose(onnx_probs, calibration.softmax(logits, t), atol=1e-5)
    # and the fitted T minimises the validation NLL (a different T would not do better)
    with data.open_map_file(dataset) as mf:
        ex = data.select([mf], "validation", ("defect_free", "screw", "edge"))
        x, y = data.MapStream(ex, PipelineConfig()).arrays()
    val_logits = np.asarray(logits_model(model)(x, training=False))
    best = calibration.nll(val_logits, y, t)
    # Within the search bounds (calibration.T_BOUNDS): a tiny model's optimum may sit on a bound.
    lo, hi = calibration.T_BOUNDS
    assert best <= calibration.nll(val_logits, y, min(t * 1.3, hi)) + 1e-6
    assert best <= calibration.nll(val_logits, y, max(t / 1.3, lo)) + 1e-6


# -- resume, fine-tuning, 2 classes ------------------------------------------------------------------------
def test_resume_continues_with_optimizer_state_and_matches_an_uninterrupted_run(tmp_path, dataset):
    cfg = dict(plateau_patience=1, stop_patience=0)  # the rate is lowered after epoch 2: state that must survive
    Run([dataset], tmp_path / "full", tiny_config(3, **cfg), **QUIET).execute()
    Run([dataset], tmp_path / "cut", tiny_config(2, **cfg), command="defectscope train --epochs 2 (first)", **QUIET).execute()
    resumed = Run([dataset], tmp_path / "cut", tiny_config(3, **cfg), resume=True,
                  command="defectscope train --resume --epochs 3", **QUIET).execute()
    # the card says how the run started and how it was resumed (the resume line alone reproduces nothing)
    assert resumed["card"]["training_command"] == "defectscope train --epochs 2 (first)"
    assert resumed["card"]["resumed_with"] == "defectscope train --resume --epochs 3"
    full = load_model_compiled(tmp_path / "full/checkpoints/epoch-0003.keras")
    cut = load_model_compiled(tmp_path / "cut/checkpoints/epoch-0003.keras")
    assert int(cut.optimizer.iterations) == int(full.optimizer.iterations) > 0
    assert float(cut.optimizer.learning_rate) == pytest.approx(float(full.optimizer.learning_rate))
    for a, b in zip(full.get_weights(), cut.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    hist_full = json.loads((tmp_path / "full/history.json").read_text())
    hist_cut = json.loads((tmp_path / "cut/history.json").read_text())
    assert [h["epoch"] for h in hist_cut] == [1, 2, 3]
    np.testing.assert_allclose([h["loss"] for h in hist_cut], [h["loss"] for h in hist_full], rtol=1e-5)


def test_resume_and_restart_guards(tmp_path, dataset, capsys):
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "none"), "--resume"]) == 1
    assert "nothing to resume" in capsys.readouterr().err
    Run([dataset], tmp_path / "run", tiny_config(1), **QUIET).execute()
    with pytest.raises(ValueError, match="--resume to continue"):
        Run([dataset], tmp_path / "run", tiny_config(1), **QUIET).execute()


def test_fine_tune_from_keras_on_labelled_maps(tmp_path, trained, dataset):
    with data.open_map_file(dataset) as mf:
        maps = np.stack([mf.read(i)[0] for i in range(mf.n)])
        labels = mf.labels.copy()
    measured = data.write_labelled_maps(tmp_path / "measured.h5", maps, labels, ("defect_free", "screw", "edge"))
    result = Run([dataset, measured], tmp_path / "ft", tiny_config(1), init=trained / "defectscope-3class.keras",
                 **QUIET).execute()
    card = result["card"]
    assert card["training"]["fine_tuned_from"].endswith("defectscope-3class.keras")
    assert card["training"]["config"]["learning_rate"] == pytest.approx(1e-4)  # a tenth of the paper's
    assert card["architecture"] == TINY.to_dict()  # read from the --init model, not the default
    assert [f["layout"] for f in card["training_data"]["files"]] == ["simulated", "labelled"]
    assert card["training_data"]["maps_used"]["train"] > 18


def test_two_class_model_collapses_screw_and_edge(tmp_path, dataset):
    result = Run([dataset], tmp_path / "two", tiny_config(1, classes=2), **QUIET).execute()
    p = Predictor(result["onnx"], provider="cpu")
    assert p.classes == ("defect_free", "defective") and p.card["name"] == "defectscope-2class"
    assert "two_class_accuracy" not in p.card["test_metrics"]
    assert sum(d["support"] for d in p.card["test_metrics"]["per_class"].values()) == p.card["test_metrics"]["n"]


# -- evaluate -----------------------------------------------------------------------------------------------
def test_evaluate_cli_writes_json_and_pngs(trained, dataset, tmp_path, capsys):
    plots = tmp_path / "plots"
    rc = main(["evaluate", str(trained / "defectscope-3class.onnx"), str(dataset), "--split", "all", "--plots",
               str(plots), "--robust-maps", "3", "--no-progress"])
    assert rc == 0
    assert "accuracy" in capsys.readouterr().out
    result = json.loads((plots / "metrics.json").read_text())
    for png in ("confusion.png", "reliability.png", "accuracy-by-group.png", "robustness.png"):
        assert (plots / png).stat().st_size > 1000, png
    assert result["n"] == 30 and sum(map(sum, result["confusion_matrix"]["counts"])) == 30
    assert set(result["by_group"]) >= {"element", "position_mode", "peak_counts_decade"}
    assert 0 <= result["calibration"]["ece"] <= 1
    assert result["two_class"]["n"] == 30
    verdicts = result["verdicts"]  # what the replies would say: one verdict per scored map
    assert sum(sum(row.values()) for row in verdicts["counts"].values()) == 30
    assert verdicts["false_dislocated"]["n"] == sum(verdicts["counts"]["defect_free"].values())
    rob = result["robustness"]
    assert rob["maps"] == 3 and len(rob["rotation"]["random_axis"]["accuracy"]) == len(rob["rotation"]["angles_deg"])
    assert rob["zoom"]["n"] == [3] * len(rob["zoom"]["factors"])
    # at angle 0 and zoom 1 the transform is the identity: same answers as the plain evaluation
    assert rob["rotation"]["random_axis"]["accuracy"][0] == rob["rotation"]["about_q"]["accuracy"][0]


def test_evaluate_errors_are_one_line(tmp_path, trained, capsys):
    assert main(["evaluate", str(trained / "defectscope-3class.onnx"), str(tmp_path / "missing.h5")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err


def test_resume_with_fewer_epochs_ends_the_run_and_exports(tmp_path, dataset):
    """A long run can be stopped and exported: --resume with a smaller --epochs finishes at once."""
    Run([dataset], tmp_path / "run", tiny_config(2), **QUIET).execute()
    result = Run([dataset], tmp_path / "run", tiny_config(1), resume=True, **QUIET).execute()
    assert result["card"]["training"]["epochs_run"] == 2
    assert (tmp_path / "run" / "defectscope-3class.onnx").is_file()


def test_resume_without_epochs_keeps_the_saved_cap(tmp_path, dataset, capsys):
    """Regression: --resume without --epochs took the default 150 as an extension of a shorter run."""
    Run([dataset], tmp_path / "run", tiny_config(1), **QUIET).execute()
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0
    card = json.loads((tmp_path / "run" / "defectscope-3class.card.json").read_text())
    assert card["training"]["epochs_run"] == 1
    assert card["training"]["config"]["epochs"] == 1


# -- symmetrised export (training.symmetrise) ----------------------------------------------------------
def test_tf_symmetry_images_match_the_numpy_ones():
    from defectscope.training.symmetrise import tf_symmetry_images
    from defectscope.training.symmetry import symmetry_images

    x = np.random.default_rng(0).random((2, 6, 8, 8)).astype(np.float32)
    got = np.asarray(tf_symmetry_images(x[..., None]))[..., 0].reshape(8, 2, 6, 8, 8)
    for b in range(2):
        assert np.array_equal(got[:, b], symmetry_images(x[b]))


def test_symmetrised_export_is_invariant_calibrated_and_served(trained, dataset, tmp_path):
    from defectscope.training.data import mirror_about_centre
    from defectscope.training.symmetrise import main as symmetrise_main
    from defectscope.training.symmetry import symmetry_images

    out = tmp_path / "sym" / "defectscope-3class.onnx"
    rc = symmetrise_main([str(trained / "defectscope-3class.onnx"), "--data", str(dataset), "--out", str(out),
                          "--model-version", "9.9", "--parity-maps", "4"])
    assert rc == 0
    card = json.loads(export.card_path(out).read_text())
    sym = card["symmetrised"]
    assert card["version"] == "9.9" and sym["views"] == 8 and sym["temperature"] > 0
    assert sym["onnx_keras_parity_max_abs"] <= 1e-5 and sym["parity_maps"] == 4
    assert card["test_metrics"]["split"] == "test" and card["commands"]["symmetrise"].startswith("python -m")
    assert (out.with_suffix(".keras")).is_file()

    predictor = Predictor(out, provider="cpu")
    assert predictor.card["symmetrised"]["temperature"] == sym["temperature"]  # the card is in the graph too
    x = prepared_maps(dataset, 3)
    p = predictor.predict(x)
    # The answer is that of the geometric mean over the 8 images under the base model ...
    base = Predictor(trained / "defectscope-3class.onnx", provider="cpu")
    for k in range(3):
        logp = np.log(np.clip(base.predict(symmetry_images(x[k])), 1e-30, 1)).astype(np.float64)
        z = logp.mean(axis=0) * get_temperature(load_model(trained / "defectscope-3class.keras")) / sym["temperature"]
        np.testing.assert_allclose(p[k], calibration.softmax(z), atol=2e-5)
    # ... and so the same for a map and its mirror image, which the base model need not be.
    mirrored = np.stack([mirror_about_centre(m, 2) for m in x])
    np.testing.assert_allclose(predictor.predict(mirrored), p, atol=1e-5)

    assert symmetrise_main([str(out), "--data", str(dataset), "--out", str(tmp_path / "again.onnx"),
                            "--model-version", "1"]) == 1  # symmetrised already: refused, nothing written
    assert not (tmp_path / "again.onnx").exists()
