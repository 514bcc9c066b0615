"""The calibrated decision rule (model.decision), its fit (training.decision_fit) and the reply's decision,
verdict and OUT_OF_DISTRIBUTION warning through the real serving path."""

import json

import numpy as np
import pytest

from defectscope.errors import ModelUnavailable
from defectscope.model.decision import DECISION_KEY, DecisionRule, decide, parse_decision

onnx = pytest.importorskip("onnx")

CLASSES = ("defect_free", "screw", "edge")
RULE = DecisionRule(risk=0.02, threshold=0.9, defective_threshold=0.95, ood_threshold=10.0)


def test_confident_only_above_threshold_and_without_unreliable_warnings():
    assert decide(CLASSES, [0.95, 0.03, 0.02], RULE, []) == {"decision": "confident", "verdict": "defect_free", "reasons": []}
    low = decide(CLASSES, [0.85, 0.1, 0.05], RULE, [])
    assert low["decision"] == "uncertain" and low["verdict"] == "uncertain" and "0.850 < 0.900" in low["reasons"][0]
    flagged = decide(CLASSES, [0.99, 0.005, 0.005], RULE, ["LOW_COUNTS", "MODELS_DISAGREE"])
    assert flagged == {"decision": "uncertain", "verdict": "uncertain", "reasons": ["warning MODELS_DISAGREE"]}


def test_defective_with_unclear_character():
    made = decide(CLASSES, [0.01, 0.55, 0.44], RULE, [])
    assert made["decision"] == "uncertain" and made["verdict"] == "defective"
    # A warning that the answer is unreliable takes the defect question too.
    assert decide(CLASSES, [0.01, 0.55, 0.44], RULE, ["OUT_OF_DISTRIBUTION"])["verdict"] == "uncertain"
    # A 2-class model has no character to be unsure of.
    assert decide(("defect_free", "defective"), [0.2, 0.8], RULE, [])["verdict"] == "uncertain"


def test_uncalibrated_rule_follows_the_warnings_only():
    rule = parse_decision({})
    assert not rule.calibrated
    assert decide(CLASSES, [0.4, 0.3, 0.3], rule, [])["decision"] == "confident"
    assert decide(CLASSES, [0.99, 0.0, 0.01], rule, ["SAMPLING_SENSITIVE"])["decision"] == "uncertain"


@pytest.mark.parametrize("text", ["not json", json.dumps({"schema_version": 2, "risk": 0.1, "threshold": 0.5}),
                                  json.dumps({"schema_version": 1, "risk": 0.1, "threshold": 1.5}),
                                  json.dumps({"schema_version": 1, "risk": 0.1}),
                                  json.dumps({"schema_version": 1, "risk": 0.1, "threshold": 0.5, "ood_threshold": "x"})])
def test_bad_decision_metadata_is_refused(text):
    with pytest.raises(ModelUnavailable, match=DECISION_KEY):
        parse_decision({DECISION_KEY: text})


def test_selective_threshold_and_risk_coverage():
    from defectscope.training.decision_fit import risk_coverage, selective_threshold

    confidence = np.linspace(1.0, 0.5, 100)
    correct = np.ones(100, bool)
    correct[[50, 60, 70, 80, 90]] = False  # the errors are among the least confident
    threshold, coverage = selective_threshold(confidence, correct, 0.02)
    # The 60 most confident answers hold one error (1.7 %); with the 61st, two (3.3 %).
    assert coverage == pytest.approx(0.6) and threshold == pytest.approx(confidence[59])
    assert risk_coverage(confidence, correct)["accuracy_at_coverage"]["100%"] == 0.95
    assert selective_threshold(confidence, ~correct, 0.02) == (1.0, 0.0)  # unreachable risk: nothing confident


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A real fit: a small fixture model (64 pooled features), simulated maps for the Gaussian and the thresholds."""
    from defectscope.model.fixture import build_fixture_model
    from defectscope.training import decision_fit
    from defectscope.training.runner import simulate_dataset
    from defectscope.training.sim_config import SimulationConfig

    tmp = tmp_path_factory.mktemp("decision")
    model = build_fixture_model(tmp / "small.onnx", pool=16)
    cfg = SimulationConfig(orientations_per_configuration=4)
    fit_data = simulate_dataset(24, tmp / "fit.h5", cfg, seed=3, workers=1, progress=False)
    cal_data = simulate_dataset(24, tmp / "cal.h5", cfg, seed=4, workers=1, progress=False)
    cal_more = simulate_dataset(8, tmp / "cal2.h5", cfg, seed=5, workers=1, progress=False)
    out = tmp / "small-decided.onnx"
    decision_fit.main([str(model), "--fit", str(fit_data), "--calibrate", str(cal_data), "--calibrate", str(cal_more),
                       "--out", str(out),
                       "--version", "fixture-2", "--risk", "0.5", "--max-answer-risk", "0.9", "--report", str(tmp / "report.json")])
    return out, json.loads((tmp / "report.json").read_text())


def test_fit_writes_a_servable_model_with_its_rule(fitted):
    from defectscope.model.predictor import Predictor

    path, report = fitted
    predictor = Predictor(path, provider="cpu")
    rule = predictor.decision
    assert rule.calibrated and rule.risk == 0.5 and rule.ood_threshold > 0 and predictor.has_ood
    assert predictor.card["version"] == "fixture-2" and predictor.card["previous_version"] == "fixture-1"
    assert report["rule"] == json.loads(rule.to_json())
    # Two --calibrate files: the thresholds are fitted on both together, and both are named.
    assert len(rule.fitted_on["thresholds"]) == 2 and isinstance(rule.fitted_on["ood_gaussian"], str)
    assert rule.fitted_on["n_calibrate"] > rule.fitted_on["n_fit"]
    x = np.random.default_rng(0).random((3, 64, 64, 64)).astype(np.float32)
    probabilities, ood = predictor.run(x)
    assert ood.shape == (3,) and np.all(np.isfinite(ood)) and np.all(ood >= 0)
    np.testing.assert_array_equal(probabilities, predictor.predict(x))


def test_reply_carries_decision_and_warns_out_of_distribution(fitted, tmp_path):
    from conftest import bragg_map
    from defectscope.model.predictor import Predictor
    from defectscope.server.core import Classifier

    path, _ = fitted
    predictor = Predictor(path, provider="cpu")
    reply = Classifier(predictor, overlap=False).classify_map(bragg_map().astype(np.float32)).reply
    assert reply["decision"] in ("confident", "uncertain") and "ood_score" in reply["preparation"]
    assert reply["decision_detail"]["calibrated"] and reply["verdict"] in (*predictor.classes, "defective", "uncertain")
    # The same model with a threshold no map passes: every answer is out of distribution, never confident.
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == DECISION_KEY:
            p.value = json.dumps({**json.loads(p.value), "ood_threshold": 0.0})
    strict = tmp_path / "strict.onnx"
    onnx.save(proto, str(strict))
    reply = Classifier(Predictor(strict, provider="cpu"), overlap=True).classify_map(bragg_map().astype(np.float32)).reply
    assert "OUT_OF_DISTRIBUTION" in [w["reason"] for w in reply["warnings"]]
    assert reply["decision"] == "uncertain" and reply["verdict"] == "uncertain"


def test_batch_reply_has_one_decision_per_map(predictor):
    from conftest import bragg_map
    from defectscope.server.core import Classifier
    from defectscope.server.protocol import Request

    maps = np.stack([bragg_map(seed=s) for s in (1, 2)]).astype(np.float32)
    reply = Classifier(predictor, overlap=False).classify(
        Request("classify", "b", {}, kind="map", array=maps, spec={"axes": ["q_par", "q_perp1", "q_perp2"]})).reply
    assert len(reply["decision"]) == 2 and len(reply["verdict"]) == 2 and not reply["decision_detail"]["calibrated"]


def test_the_two_bundled_rules_never_give_confident_opposite_answers():
    """With the cross-check on (MODELS_DISAGREE above a 0.3 gap in P(defective)), the 3-class and 2-class rules
    as shipped can never both be confident and disagree on defect-free vs defective: any pair of probabilities."""
    from defectscope.model.predictor import Predictor
    from defectscope.model.registry import resolve_model
    from defectscope.server.checks import DISAGREEMENT

    three = Predictor(resolve_model("defectscope-3class"), provider="cpu", warmup=False)
    two = Predictor(resolve_model("defectscope-2class"), provider="cpu", warmup=False)
    rng = np.random.default_rng(0)
    p3 = rng.dirichlet([0.3, 0.3, 0.3], 20000)
    p2 = np.clip(1 - p3[:, 0] + rng.normal(0, 0.25, len(p3)), 0, 1)
    both, defective = 0, 0
    for a, d in zip(p3, p2):
        warned = ["MODELS_DISAGREE"] if abs((1 - a[0]) - d) > DISAGREEMENT else []
        x = decide(three.classes, a, three.decision, warned)
        y = decide(two.classes, [1 - d, d], two.decision, warned)
        if x["decision"] == "confident" and y["decision"] == "confident":
            both += 1
            assert (x["verdict"] == "defect_free") == (y["verdict"] == "defect_free"), (a, d)
        if x["verdict"] == "defective" and y["decision"] == "confident":
            defective += 1
            assert y["verdict"] == "defective", (a, d)
    assert both > 1000 and defective > 100  # the draw reaches the cases that could contradict


def test_a_sampling_mean_rule_answers_with_the_mean_over_the_variants(fitted):
    from conftest import bragg_map

    from defectscope.model.predictor import Predictor
    from defectscope.server.core import Classifier

    path, _ = fitted
    predictor = Predictor(path, provider="cpu")
    assert predictor.decision.sampling_mean
    reply = Classifier(predictor, overlap=False, cross_check=predictor).classify_map(bragg_map().astype(np.float32)).reply
    check = reply["preparation"]["sampling_check"]
    mean = np.mean([check["native_probabilities"], *check["probabilities"]], axis=0)
    np.testing.assert_allclose(reply["probabilities"], mean, atol=1e-4)
    assert reply["label"] == list(predictor.classes)[int(np.argmax(mean))]
    # the cross-check, here the same model, answers the same way: no disagreement with itself
    np.testing.assert_allclose(reply["preparation"]["cross_check"]["probabilities"], reply["probabilities"], atol=1e-4)
    # without the sampling check there are no variants: the map's own answer
    alone = Classifier(predictor, overlap=False, sampling_check=False).classify_map(bragg_map().astype(np.float32)).reply
    np.testing.assert_allclose(alone["probabilities"], check["native_probabilities"], atol=1e-4)


def test_the_recorded_command_is_the_one_run_from_the_shell(monkeypatch):
    """A main(argv=None) run from the shell records its real arguments (the cards once said only
    'python -m defectscope.training.decision_fit')."""
    from defectscope.training.evaluate import command_line

    monkeypatch.setattr("sys.argv", ["decision_fit.py", "m.onnx", "--fit", "a b.h5"])
    assert command_line("defectscope.training.decision_fit", None) == \
        "python -m defectscope.training.decision_fit m.onnx --fit 'a b.h5'"
    assert command_line("x", ["--n", "3"]) == "python -m x --n 3"


def test_the_bundled_cards_say_how_their_rule_was_fitted():
    from defectscope.model.predictor import Predictor
    from defectscope.model.registry import resolve_model

    for name in ("defectscope-3class", "defectscope-2class"):
        card = Predictor(resolve_model(name), provider="cpu", warmup=False).card
        assert "--fit" in card["decision"]["command"] and "--calibrate" in card["decision"]["command"]


def test_verdict_metrics_count_what_a_beamline_pays_for():
    from defectscope.training.eval_metrics import verdict_metrics

    classes = ["defect_free", "screw", "edge"]
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    verdicts = ["defect_free", "uncertain", "defective", "screw", "screw", "edge", "defect_free", "uncertain"]
    m = verdict_metrics(verdicts, labels, classes)
    assert m["counts"]["defect_free"] == {"defect_free": 1, "uncertain": 1, "defective": 1, "screw": 1}
    # "defective, character uncertain" on a defect-free crystal is a false dislocation too
    assert m["false_dislocated"] == {"n": 4, "count": 2, "rate": 0.5}
    assert m["missed_dislocation"] == {"n": 4, "count": 1, "rate": 0.25}
    assert m["wrong_character"] == {"n": 4, "count": 1, "rate": 0.25}
    assert m["answered"] == {"n": 8, "count": 6, "rate": 0.75}
    two = verdict_metrics(["defective", "defect_free"], np.array([0, 1]), ["defect_free", "defective"])
    assert two["false_dislocated"]["rate"] == 1.0 and two["missed_dislocation"]["rate"] == 1.0
    assert "wrong_character" not in two
